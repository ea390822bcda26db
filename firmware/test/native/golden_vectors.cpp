// The C++ protocol code against tests/vectors/golden_frames.json and the Python decoder, driven
// by tests/test_native_engine.py.
//
//   golden_vectors encode      the golden messages (same fields, same seq), one `name hex` a line
//   golden_vectors roundtrip   stdin: one frame in hex a line; decodes it, unpacks the message,
//                              packs and frames it again: `ok HEX` or `error TEXT`
//   golden_vectors decode [--chunk N] [--max-payload P]
//                              stdin: one byte stream in hex a line, fed N bytes at a time, with
//                              `|` where the line falls idle (the decoder's expire());
//                              `GARBAGE HEADER CRC OVERSIZE IDLE_DROPS PENDING TYPE:SEQ:PAYLOAD...`
//   golden_vectors crc         CRC-8 and CRC-32 of "123456789"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "tinyhil_protocol.h"

namespace {

using tinyhil::Bytes;
using tinyhil::ErrorText;
using tinyhil::FrameEncoder;
using tinyhil::MsgType;
using tinyhil::PayloadWriter;

std::string hex(const uint8_t* data, size_t size) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * size);
  for (size_t i = 0; i < size; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 0x0F];
  }
  return out;
}

bool unhex(const std::string& text, std::vector<uint8_t>& out) {
  out.clear();
  std::string digits;
  for (char c : text) {
    if (c != ' ' && c != '\r' && c != '\t') digits += c;
  }
  if (digits.size() % 2 != 0) return false;
  for (size_t i = 0; i < digits.size(); i += 2) {
    char pair[3] = {digits[i], digits[i + 1], '\0'};
    char* end = nullptr;
    const long value = std::strtol(pair, &end, 16);
    if (end != pair + 2) return false;
    out.push_back(static_cast<uint8_t>(value));
  }
  return true;
}

// Packs `message` into a frame of `type` and `seq`; empty when it does not fit.
template <typename Message>
std::string frame_hex(MsgType type, uint8_t seq, const Message& message) {
  static uint8_t buffer[tinyhil::kMaxFrame];
  FrameEncoder encoder(buffer, sizeof(buffer));
  PayloadWriter out = encoder.writer();
  message.pack(out);
  if (!out.ok()) return "";
  const size_t size = encoder.finish(static_cast<uint8_t>(type), seq, out.size());
  return hex(encoder.frame(), size);
}

tinyhil::TensorDesc int8_tensor(std::initializer_list<uint32_t> shape, float scale, int32_t zero_point) {
  tinyhil::TensorDesc desc;
  desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt8);
  for (uint32_t dim : shape) desc.dims[desc.rank++] = dim;
  desc.scale = scale;
  desc.zero_point = zero_point;
  return desc;
}

// The field values of tests/vectors/golden_frames.json, written out independently of it.
int encode() {
  std::printf("hello %s\n", frame_hex(MsgType::kHello, 1, tinyhil::Hello{2}).c_str());

  tinyhil::DeviceInfo info;
  info.version = 2;
  info.board_kind = tinyhil::kBoardReal;
  info.cpu_mhz = 240;
  info.sram_bytes = 327680;
  info.psram_bytes = 8388608;
  info.flash_bytes = 3342336;
  info.arena_size = 30720;
  info.arena_used = 24272;
  info.max_payload = 4096;
  info.op_count = 13;
  info.flags = tinyhil::kFlagEspNn;
  info.chip = "ESP32-S3";
  info.firmware_id = "0123456789abcdef";
  info.model_id = "fedcba9876543210";
  info.n_inputs = 1;
  info.inputs[0] = int8_tensor({1, 49, 10, 1}, 0.5847029089927673f, 83);
  info.n_outputs = 1;
  info.outputs[0] = int8_tensor({1, 12}, 0.00390625f, -128);
  std::printf("device_info %s\n", frame_hex(MsgType::kDeviceInfo, 38, info).c_str());

  std::printf("get_ops %s\n", frame_hex(MsgType::kGetOps, 75, tinyhil::GetOps{0}).c_str());

  // OPS carries names as str8 entries back to back; build them as they go on the wire.
  uint8_t names[64];
  PayloadWriter names_out(names, sizeof(names));
  for (const char* name : {"CONV_2D", "DEPTHWISE_CONV_2D", "SOFTMAX"}) names_out.str8(name);
  tinyhil::OpsPage page;
  page.start = 0;
  page.count = 3;
  page.names = Bytes{names, names_out.size()};
  std::printf("ops %s\n", frame_hex(MsgType::kOps, 112, page).c_str());

  std::printf("input_begin %s\n", frame_hex(MsgType::kInputBegin, 149, tinyhil::InputBegin{0, 490}).c_str());

  uint8_t counting[16];
  for (uint8_t i = 0; i < sizeof(counting); ++i) counting[i] = i;
  std::printf("input_data %s\n",
              frame_hex(MsgType::kInputData, 186, tinyhil::InputData{0, 0, Bytes{counting, sizeof(counting)}}).c_str());

  std::printf("ack %s\n",
              frame_hex(MsgType::kAck, 223, tinyhil::Ack{static_cast<uint8_t>(MsgType::kInputData), 16}).c_str());
  std::printf("invoke %s\n", frame_hex(MsgType::kInvoke, 4, tinyhil::Invoke{tinyhil::kInvokeProfile}).c_str());

  const uint8_t output[] = {0x80, 0x7F, 0x00, 0x01};
  std::printf("output_data %s\n",
              frame_hex(MsgType::kOutputData, 41, tinyhil::OutputData{0, 0, 4, Bytes{output, sizeof(output)}}).c_str());

  const uint32_t op_us[] = {1000, 27123};
  const uint32_t op_cycles[] = {240000, 6509520};
  tinyhil::InvokeResult result;
  result.total_us = 28123;
  result.total_cycles = 6749520;
  result.count = 2;
  result.op_us = tinyhil::U32Array{op_us, nullptr};
  result.op_cycles = tinyhil::U32Array{op_cycles, nullptr};
  std::printf("invoke_result %s\n", frame_hex(MsgType::kInvokeResult, 78, result).c_str());

  const tinyhil::ErrorMsg error{static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed), "arena too small"};
  std::printf("error %s\n", frame_hex(MsgType::kError, 115, error).c_str());

  std::printf("get_tensor %s\n", frame_hex(MsgType::kGetTensor, 152, tinyhil::GetTensor{12, 16}).c_str());

  // The last 8 of the 24 bytes of an int16 [1, 3, 4] tensor: -300, 7, 32767, -32768.
  const uint8_t int16_values[] = {0xD4, 0xFE, 0x07, 0x00, 0xFF, 0x7F, 0x00, 0x80};
  tinyhil::TensorData chunk;
  chunk.tensor = 12;
  chunk.offset = 16;
  chunk.total = 24;
  chunk.desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt16);
  for (uint32_t dim : {1u, 3u, 4u}) chunk.desc.dims[chunk.desc.rank++] = dim;
  chunk.desc.scale = 0.0078125f;
  chunk.desc.zero_point = 0;
  chunk.data = Bytes{int16_values, sizeof(int16_values)};
  std::printf("tensor_data %s\n", frame_hex(MsgType::kTensorData, 189, chunk).c_str());

  const tinyhil::ErrorMsg unavailable{static_cast<uint16_t>(tinyhil::ErrorCode::kTensorUnavailable),
                                      tinyhil::kNoPreservedTensorsText};
  std::printf("error_tensor_unavailable %s\n", frame_hex(MsgType::kError, 226, unavailable).c_str());
  return 0;
}

template <typename Message>
std::string repack(const tinyhil::Frame& frame, ErrorText& error) {
  Message message;
  if (!message.unpack(frame.payload, error)) return "";
  return frame_hex(static_cast<MsgType>(frame.type), frame.seq, message);
}

std::string roundtrip_one(const std::vector<uint8_t>& bytes, ErrorText& error) {
  static tinyhil::FrameDecoder decoder;  // ~4 KB: not on the stack
  decoder = tinyhil::FrameDecoder();
  size_t fed = 0;
  tinyhil::Frame frame;
  bool found = false;
  while (fed < bytes.size() && !found) {
    fed += decoder.feed(bytes.data() + fed, bytes.size() - fed);
    found = decoder.next(frame);
  }
  if (!found) {
    error.format("no frame decoded (garbage %u, header %u, crc %u, oversize %u)",
                 static_cast<unsigned>(decoder.stats().garbage_bytes),
                 static_cast<unsigned>(decoder.stats().header_errors),
                 static_cast<unsigned>(decoder.stats().crc_errors), static_cast<unsigned>(decoder.stats().oversize));
    return "";
  }
  if (fed != bytes.size() || decoder.pending() != 0 || decoder.stats().garbage_bytes != 0) {
    error.format("the frame does not span the whole input");
    return "";
  }
  switch (static_cast<MsgType>(frame.type)) {
    case MsgType::kHello: return repack<tinyhil::Hello>(frame, error);
    case MsgType::kGetOps: return repack<tinyhil::GetOps>(frame, error);
    case MsgType::kInputBegin: return repack<tinyhil::InputBegin>(frame, error);
    case MsgType::kInputData: return repack<tinyhil::InputData>(frame, error);
    case MsgType::kInvoke: return repack<tinyhil::Invoke>(frame, error);
    case MsgType::kGetTensor: return repack<tinyhil::GetTensor>(frame, error);
    case MsgType::kDeviceInfo: return repack<tinyhil::DeviceInfo>(frame, error);
    case MsgType::kOps: return repack<tinyhil::OpsPage>(frame, error);
    case MsgType::kAck: return repack<tinyhil::Ack>(frame, error);
    case MsgType::kOutputData: return repack<tinyhil::OutputData>(frame, error);
    case MsgType::kInvokeResult: return repack<tinyhil::InvokeResult>(frame, error);
    case MsgType::kTensorData: return repack<tinyhil::TensorData>(frame, error);
    case MsgType::kError: return repack<tinyhil::ErrorMsg>(frame, error);
  }
  error.format("unknown message type 0x%02x", static_cast<unsigned>(frame.type));
  return "";
}

int roundtrip() {
  std::string line;
  std::vector<uint8_t> bytes;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    ErrorText error;
    if (!unhex(line, bytes)) {
      std::printf("error not hex\n");
      continue;
    }
    const std::string again = roundtrip_one(bytes, error);
    if (again.empty()) {
      std::printf("error %s\n", error.text);
    } else {
      std::printf("ok %s\n", again.c_str());
    }
  }
  return 0;
}

int decode(size_t chunk, size_t max_payload) {
  static tinyhil::FrameDecoder decoder;
  std::string line;
  std::vector<uint8_t> bytes;
  while (std::getline(std::cin, line)) {
    decoder = tinyhil::FrameDecoder(max_payload);
    std::string frames;
    bool ok = true;
    size_t from = 0;
    while (ok && from <= line.size()) {
      size_t bar = line.find('|', from);
      if (bar == std::string::npos) bar = line.size();
      if (!unhex(line.substr(from, bar - from), bytes)) {
        ok = false;
        break;
      }
      if (from != 0) decoder.expire();  // a `|` before this piece: the line was idle
      size_t fed = 0;
      while (fed < bytes.size()) {
        const size_t wanted = std::min(chunk, bytes.size() - fed);
        fed += decoder.feed(bytes.data() + fed, wanted);
        tinyhil::Frame frame;
        while (decoder.next(frame)) {
          char head[16];
          std::snprintf(head, sizeof(head), " %u:%u:", static_cast<unsigned>(frame.type),
                        static_cast<unsigned>(frame.seq));
          frames += head;
          frames += hex(frame.payload.data, frame.payload.size);
        }
      }
      from = bar + 1;
    }
    if (!ok) {
      std::printf("error not hex\n");
      continue;
    }
    const tinyhil::DecodeStats& stats = decoder.stats();
    std::printf("%u %u %u %u %u %u%s\n", static_cast<unsigned>(stats.garbage_bytes),
                static_cast<unsigned>(stats.header_errors), static_cast<unsigned>(stats.crc_errors),
                static_cast<unsigned>(stats.oversize), static_cast<unsigned>(stats.idle_drops),
                static_cast<unsigned>(decoder.pending()), frames.c_str());
  }
  return 0;
}

int crc() {
  const char* check = "123456789";
  const auto* bytes = reinterpret_cast<const uint8_t*>(check);
  std::printf("crc8 %02x\ncrc32 %08lx\n", static_cast<unsigned>(tinyhil::crc8(bytes, 9)),
              static_cast<unsigned long>(tinyhil::crc32(bytes, 9)));
  return 0;
}

int usage() {
  std::fprintf(stderr,
               "usage: golden_vectors encode | roundtrip | decode [--chunk N] [--max-payload P] | crc\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  if (mode == "encode") return encode();
  if (mode == "roundtrip") return roundtrip();
  if (mode == "crc") return crc();
  if (mode == "decode") {
    size_t chunk = 1 << 20;
    size_t max_payload = tinyhil::kMaxPayload;
    for (int i = 2; i + 1 < argc; i += 2) {
      const std::string option = argv[i];
      const size_t value = std::strtoul(argv[i + 1], nullptr, 10);
      if (option == "--chunk" && value > 0) {
        chunk = value;
      } else if (option == "--max-payload") {
        max_payload = value;
      } else {
        return usage();
      }
    }
    return decode(chunk, max_payload);
  }
  return usage();
}
