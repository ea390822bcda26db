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
