"""Wire protocol v2: framing, messages, golden frames, and the decoder under hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import protocol as p
from harness.errors import ProtocolError

GOLDEN = json.loads((Path(__file__).parent / "vectors" / "golden_frames.json").read_text())["frames"]


def test_crcs_match_their_published_check_values():
    # CRC-8/SMBUS and CRC-32/ISO-HDLC check values over "123456789", as catalogued for each CRC.
    assert p.crc8(b"123456789") == 0xF4
    assert p.crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize("vector", GOLDEN, ids=[v["name"] for v in GOLDEN])
def test_golden_frames_encode_and_decode(vector):
    payload = bytes.fromhex(vector["payload"])
    assert p.encode_frame(vector["type"], vector["seq"], payload).hex() == vector["frame"]
    frames = p.FrameDecoder().feed(bytes.fromhex(vector["frame"]))
    assert frames == [p.Frame(vector["type"], vector["seq"], payload)]
    message = p.decode_message(frames[0])
    assert message.pack() == payload


def test_every_message_type_has_a_golden_frame():
    assert {v["type"] for v in GOLDEN} == {int(t) for t in p.MsgType}


def test_decoder_resynchronizes_after_garbage_and_reassembles_byte_by_byte():
    frame_a = p.encode_frame(p.MsgType.ACK, 7, p.Ack(p.MsgType.INPUT_DATA, 10).pack())
    frame_b = p.encode_frame(p.MsgType.INVOKE, 8, p.Invoke().pack())
    stream = b"ESP-ROM:esp32s3\r\n\xa5\x00garbage" + frame_a + b"\xa5" + frame_b
    decoder = p.FrameDecoder()
    frames = [f for byte in stream for f in decoder.feed(bytes([byte]))]
    assert [(f.type, f.seq) for f in frames] == [(p.MsgType.ACK, 7), (p.MsgType.INVOKE, 8)]
    assert decoder.stats.garbage_bytes > 0


def test_corrupt_payload_is_dropped_and_the_next_frame_still_arrives():
    good = p.encode_frame(p.MsgType.GET_OPS, 3, p.GetOps(0).pack())
    bad = bytearray(p.encode_frame(p.MsgType.INPUT_DATA, 2, p.InputData(0, 0, b"abcdef").pack()))
    bad[10] ^= 0x40
    decoder = p.FrameDecoder()
    assert decoder.feed(bytes(bad) + good) == [p.Frame(p.MsgType.GET_OPS, 3, p.GetOps(0).pack())]
    assert decoder.stats.crc_errors == 1


def test_corrupt_length_is_caught_by_the_header_check_without_waiting_for_a_payload():
    frame = bytearray(p.encode_frame(p.MsgType.HELLO, 1, p.Hello().pack()))
    frame[4] = 0xFF  # length low byte: would claim a 4095-byte payload
    follow = p.encode_frame(p.MsgType.HELLO, 2, p.Hello().pack())
    decoder = p.FrameDecoder()
    assert [f.seq for f in decoder.feed(bytes(frame) + follow)] == [2]
    assert decoder.stats.header_errors >= 1


def test_oversize_payload_is_refused_by_the_encoder():
    with pytest.raises(ProtocolError, match="exceeds"):
        p.encode_frame(p.MsgType.INPUT_DATA, 0, bytes(p.MAX_PAYLOAD + 1))


def test_short_payloads_raise_protocol_errors_naming_the_message():
    with pytest.raises(ProtocolError, match="DEVICE_INFO payload too short"):
        p.DeviceInfo.unpack(b"\x01\x00")
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode_message(p.Frame(0x42, 0, b""))


def test_ops_pages_respect_the_payload_limit():
    names = [f"OP_{i:03d}_" + "X" * 40 for i in range(300)]
    count = p.ops_page_capacity(names, 0, 512)
    page = p.OpsPage(0, tuple(names[:count]))
    assert len(page.pack()) <= 512
    assert len(p.OpsPage(0, tuple(names[:count + 1])).pack()) > 512


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
def test_decoder_never_raises_on_arbitrary_bytes(data, chunk):
    decoder = p.FrameDecoder()
    for start in range(0, len(data), chunk):
        for frame in decoder.feed(data[start:start + chunk]):
            assert len(frame.payload) <= p.MAX_PAYLOAD
    assert len(decoder.pending()) <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.MESSAGES)), st.binary(max_size=200))
def test_malformed_payloads_raise_only_protocol_errors(msg_type, payload):
    try:
        p.decode_message(p.Frame(msg_type, 0, payload))
    except ProtocolError:
        pass


def test_an_idle_gap_drops_a_cut_frame_so_the_next_hello_is_read():
    # 191 of the 506 bytes of a kws INPUT_DATA frame, then the host goes quiet and resyncs.
    cut = p.encode_frame(p.MsgType.INPUT_DATA, 5, p.InputData(0, 0, bytes(490)).pack())[:191]
    hello = p.encode_frame(p.MsgType.HELLO, 6, p.Hello().pack())
    swallowing = p.FrameDecoder()
    assert swallowing.feed(cut) == [] and swallowing.feed(hello * 25) == []  # 25 HELLOs are payload
    decoder = p.FrameDecoder()
    assert decoder.feed(cut) == [] and decoder.damaged
    assert decoder.expire() == 191 and not decoder.damaged
    assert decoder.feed(hello) == [p.Frame(p.MsgType.HELLO, 6, p.Hello().pack())]
    assert (decoder.stats.idle_drops, decoder.stats.garbage_bytes) == (1, 191)


def test_damage_is_what_came_since_the_last_good_frame():
    hello = p.encode_frame(p.MsgType.HELLO, 1, p.Hello().pack())
    decoder = p.FrameDecoder()
    assert decoder.feed(b"ESP-ROM:" + hello) and not decoder.damaged  # a good frame after noise: fine
    assert decoder.feed(hello + b"\x00\x01") and decoder.damaged      # noise after it: a loss, if idle follows
    assert decoder.expire() == 0 and decoder.stats.idle_drops == 1
    assert decoder.expire() == 0 and decoder.stats.idle_drops == 1   # nothing more to report


def test_the_python_device_reports_a_frame_lost_to_an_idle_gap():
    from harness.board.device import DeviceEngine

    spec = p.TensorSpec(p.DType.INT8, (1, 490), 0.5, 0)
    info = p.DeviceInfo(1, p.BOARD_VIRTUAL, 240, 1, 1, 1, 1, 1, p.MAX_PAYLOAD, 0, 0, "chip", "f" * 16, "m" * 16,
                        (spec,), (spec,))
    engine = DeviceEngine(info, (), None, p.ErrorMsg(p.ErrorCode.MODEL_LOAD_FAILED, "no model"))
    cut = p.encode_frame(p.MsgType.INPUT_DATA, 9, p.InputData(0, 0, bytes(490)).pack())[:191]
    assert engine.receive(cut, now=10.0) == []
    assert engine.idle(10.0 + p.IDLE_GAP_S / 2) == []
    (nack,) = engine.idle(10.0 + p.IDLE_GAP_S)
    (frame,) = p.FrameDecoder().feed(nack)
    assert (frame.type, frame.seq) == (p.MsgType.ERROR, 1)
    assert p.decode_message(frame) == p.ErrorMsg(p.ErrorCode.BAD_FRAME, "frame lost: 191 bytes held, then no byte for 50 ms")
    assert engine.idle(20.0) == []  # reported once


# --- intermediate tensors (GET_TENSOR, TENSOR_DATA) ---------------------------------------------

@pytest.mark.parametrize("rank", range(9))
@pytest.mark.parametrize("dtype", list(p.DType))
def test_tensor_data_round_trips_every_dtype_and_rank(dtype, rank):
    spec = p.TensorSpec(dtype, tuple(range(1, rank + 1)), 0.125 if dtype != p.DType.FLOAT32 else 0.0, -rank)
    chunk = p.TensorData(65535, 7, spec.nbytes, spec, bytes(range(5)))
    packed = chunk.pack()
    assert len(packed) == p.TensorData.header_size(spec) + 5
    assert p.decode_message(p.Frame(p.MsgType.TENSOR_DATA, 3, packed)) == chunk
    assert p.GetTensor.unpack(p.GetTensor(65535, 0xFFFFFFFF).pack()) == p.GetTensor(65535, 0xFFFFFFFF)


def test_malformed_tensor_messages_are_named_protocol_errors():
    spec = p.TensorSpec(p.DType.INT8, (2, 3), 0.5, 1)
    packed = p.TensorData(1, 0, 6, spec, b"abcdef").pack()
    with pytest.raises(ProtocolError, match="TENSOR_DATA payload too short: needed 10 bytes, got 9"):
        p.TensorData.unpack(packed[:9])
    with pytest.raises(ProtocolError, match="tensor rank 9 is above the protocol maximum 8"):
        p.TensorData.unpack(packed[:11] + b"\x09" + packed[12:])
    with pytest.raises(ProtocolError, match="unknown tensor type code 4"):
        p.TensorData.unpack(packed[:10] + b"\x04" + packed[11:])
    with pytest.raises(ProtocolError, match="GET_TENSOR payload has 1 unexpected trailing bytes"):
        p.GetTensor.unpack(p.GetTensor(1, 2).pack() + b"\0")
    with pytest.raises(ProtocolError, match="GET_TENSOR payload too short: needed 6 bytes, got 5"):
        p.GetTensor.unpack(bytes(5))


class KeptTensors:
    """A runtime whose interpreter keeps its tensors: an int16 [3, 40] one and a float scalar."""

    SPECS = (p.TensorSpec(p.DType.INT16, (3, 40), 0.25, 2), p.TensorSpec(p.DType.FLOAT32, ()))

    def __init__(self, short_by: int = 0) -> None:
        self.data = (bytes(range(240)), bytes([1, 2, 3, 4])[:4 - short_by])

    def set_input(self, index, data): ...
    def invoke(self): ...
    def get_output(self, index): return b""

    def tensor_count(self) -> int:
        return 3

    def tensor(self, index: int):
        if index == 2:
            raise p.TensorUnavailable.uncarried_type(2, 4)
        return self.SPECS[index], self.data[index]


class NoTensorMethods:
    def set_input(self, index, data): ...
    def invoke(self): ...
    def get_output(self, index): return b""


def _engine(runtime, flags: int):
    from harness.board.device import DeviceEngine

    spec = p.TensorSpec(p.DType.INT8, (1, 4), 0.5, 0)
    info = p.DeviceInfo(2, p.BOARD_VIRTUAL, 240, 1, 1, 1, 1, 1, 64, 0, flags, "chip", "f" * 16, "m" * 16,
                        (spec,), (spec,))
    return DeviceEngine(info, (), runtime)


def _answer(engine, request, seq: int = 9):
    (frame,) = p.FrameDecoder().feed(b"".join(engine.receive(p.encode_frame(request.TYPE, seq, request.pack()))))
    assert frame.seq == seq
    return p.decode_message(frame)


def test_python_device_sends_a_kept_tensor_in_chunks_that_fit_its_max_payload():
    engine = _engine(KeptTensors(), p.FLAG_PRESERVES_TENSORS)
    spec = KeptTensors.SPECS[0]
    room = 64 - p.TensorData.header_size(spec)  # 64-byte payloads: 36 bytes of data each
    data, offset = b"", 0
    while offset < 240:
        chunk = _answer(engine, p.GetTensor(0, offset))
        assert (chunk.tensor, chunk.offset, chunk.total, chunk.spec) == (0, offset, 240, spec)
        assert len(chunk.data) == min(room, 240 - offset)
        data += chunk.data
        offset += len(chunk.data)
    assert data == bytes(range(240))
    assert _answer(engine, p.GetTensor(0, 240)) == p.TensorData(0, 240, 240, spec, b"")
    assert _answer(engine, p.GetTensor(1, 0)) == p.TensorData(1, 0, 4, KeptTensors.SPECS[1], bytes([1, 2, 3, 4]))
    assert _answer(engine, p.GetTensor(0, 241)) == p.ErrorMsg(
        p.ErrorCode.BAD_PAYLOAD, "tensor 0 has 240 bytes; offset 241 is past its end")
    assert _answer(engine, p.GetTensor(3, 0)) == p.ErrorMsg(
        p.ErrorCode.BAD_PAYLOAD, "tensor 3 does not exist; the model's main subgraph has 3")
    assert _answer(engine, p.GetTensor(2, 0)) == p.ErrorMsg(
        p.ErrorCode.TENSOR_UNAVAILABLE, "tensor 2 has type code 4, which the wire protocol cannot carry")


def test_python_device_without_the_flag_keeps_no_tensors_whatever_the_runtime():
    # The flag is the firmware's word that its interpreter keeps tensors: without it every index,
    # even one past the end, gets the same answer, and the runtime is not asked.
    for runtime in (KeptTensors(), NoTensorMethods()):
        engine = _engine(runtime, 0)
        for index in (0, 3, 65535):
            assert _answer(engine, p.GetTensor(index, 0)) == p.ErrorMsg(
                p.ErrorCode.TENSOR_UNAVAILABLE, p.NO_PRESERVED_TENSORS_TEXT)
    # A runtime without the methods, behind the flag, has no tensors, as the C++ Inference's defaults.
    assert _answer(_engine(NoTensorMethods(), p.FLAG_PRESERVES_TENSORS), p.GetTensor(0, 0)) == p.ErrorMsg(
        p.ErrorCode.BAD_PAYLOAD, "tensor 0 does not exist; the model's main subgraph has 0")


def test_python_device_refuses_a_tensor_whose_bytes_do_not_fit_its_descriptor():
    engine = _engine(KeptTensors(short_by=1), p.FLAG_PRESERVES_TENSORS)
    assert _answer(engine, p.GetTensor(1, 0)) == p.ErrorMsg(
        p.ErrorCode.TENSOR_UNAVAILABLE, "tensor 1: 3 bytes on the device for a descriptor of 4 bytes")
