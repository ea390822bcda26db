// tinyhil wire protocol v2, device end. Every error text below is the Python reference's text
// (harness/protocol.py, harness/board/device.py), because the host shows it to users and the
// native tests compare both engines byte for byte.
#include "tinyhil_protocol.h"

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace tinyhil {

static_assert(sizeof(float) == 4, "f32 fields are IEEE-754 single precision");

namespace {

struct Crc32Table {
  uint32_t entries[256];
};

constexpr Crc32Table make_crc32_table() {
  Crc32Table table{};
  for (uint32_t index = 0; index < 256; ++index) {
    uint32_t value = index;
    for (int bit = 0; bit < 8; ++bit) value = (value & 1u) ? (value >> 1) ^ 0xEDB88320u : value >> 1;
    table.entries[index] = value;
  }
  return table;
}

// In flash (rodata) on the device: no RAM and no start-up work.
constexpr Crc32Table kCrc32Table = make_crc32_table();

void store_le16(uint8_t* out, uint16_t value) {
  out[0] = static_cast<uint8_t>(value);
  out[1] = static_cast<uint8_t>(value >> 8);
}

void store_le32(uint8_t* out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<uint8_t>(value >> (8 * i));
}

void store_le64(uint8_t* out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(value >> (8 * i));
}

uint16_t load_le16(const uint8_t* in) { return static_cast<uint16_t>(in[0] | (in[1] << 8)); }

uint32_t load_le32(const uint8_t* in) {
  return static_cast<uint32_t>(in[0]) | (static_cast<uint32_t>(in[1]) << 8) | (static_cast<uint32_t>(in[2]) << 16) |
         (static_cast<uint32_t>(in[3]) << 24);
}

uint64_t load_le64(const uint8_t* in) {
  return static_cast<uint64_t>(load_le32(in)) | (static_cast<uint64_t>(load_le32(in + 4)) << 32);
}

size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

size_t clamp_payload(size_t max_payload) {
  if (max_payload < kMinPayload) return kMinPayload;
  if (max_payload > kMaxPayload) return kMaxPayload;
  return max_payload;
}

}  // namespace

size_t dtype_itemsize(uint8_t dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kInt16:
      return 2;
    case DType::kUInt8:
    case DType::kInt8:
      return 1;
  }
  return 0;
}

bool is_known_dtype(uint8_t dtype) { return dtype_itemsize(dtype) != 0; }

uint8_t crc8(const uint8_t* data, size_t size, uint8_t crc) {
  for (size_t i = 0; i < size; ++i) {
    crc = static_cast<uint8_t>(crc ^ data[i]);
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x80) ? static_cast<uint8_t>((crc << 1) ^ 0x07) : static_cast<uint8_t>(crc << 1);
    }
  }
  return crc;
}

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = kCrc32Table.entries[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

// --- views and payload access -------------------------------------------------------------------

StrView::StrView(const char* text) : data(text ? text : ""), size(text ? std::strlen(text) : 0) {}

StrView::StrView(const char* text, size_t length) : data(text ? text : ""), size(text ? length : 0) {}

bool StrView::equals(const char* text) const {
  const StrView other(text);
  return other.size == size && (size == 0 || std::memcmp(other.data, data, size) == 0);
}

void ErrorText::format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vformat(fmt, args);
  va_end(args);
}

void ErrorText::vformat(const char* fmt, va_list args) {
  const int written = std::vsnprintf(text, sizeof(text), fmt, args);
  size = written < 0 ? 0 : min_size(static_cast<size_t>(written), sizeof(text) - 1);
  text[size] = '\0';
}

uint8_t* PayloadWriter::reserve(size_t size) {
  if (!ok_ || size > capacity_ - size_) {
    ok_ = false;
    return nullptr;
  }
  uint8_t* at = buffer_ + size_;
  size_ += size;
  return at;
}

void PayloadWriter::u8(uint8_t value) {
  if (uint8_t* at = reserve(1)) *at = value;
}

void PayloadWriter::u16(uint16_t value) {
  if (uint8_t* at = reserve(2)) store_le16(at, value);
}

void PayloadWriter::u32(uint32_t value) {
  if (uint8_t* at = reserve(4)) store_le32(at, value);
}

void PayloadWriter::u64(uint64_t value) {
  if (uint8_t* at = reserve(8)) store_le64(at, value);
}

void PayloadWriter::i32(int32_t value) { u32(static_cast<uint32_t>(value)); }

void PayloadWriter::f32(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  u32(bits);
}

void PayloadWriter::bytes(const uint8_t* data, size_t size) {
  if (size == 0) return;  // data may be null for an empty range; memcpy must not see it
  if (data == nullptr) {
    ok_ = false;
    return;
  }
  // memmove: a payload may be re-packed onto itself (the golden round trip does).
  if (uint8_t* at = reserve(size)) std::memmove(at, data, size);
}

void PayloadWriter::str8(StrView text) {
  const size_t size = min_size(text.size, kMaxStr8);
  u8(static_cast<uint8_t>(size));
  bytes(reinterpret_cast<const uint8_t*>(text.data), size);
}

bool PayloadReader::need(size_t size) {
  if (size > size_ - offset_) {
    error_.format("%s payload too short: needed %lu bytes, got %lu", what_,
                  static_cast<unsigned long>(offset_ + size), static_cast<unsigned long>(size_));
    return false;
  }
  return true;
}

const uint8_t* PayloadReader::take(size_t size) {
  if (size > size_ - offset_) return nullptr;
  const uint8_t* at = data_ + offset_;
  offset_ += size;
  return at;
}

uint8_t PayloadReader::u8() {
  const uint8_t* at = take(1);
  return at ? *at : 0;
}

uint16_t PayloadReader::u16() {
  const uint8_t* at = take(2);
  return at ? load_le16(at) : 0;
}

uint32_t PayloadReader::u32() {
  const uint8_t* at = take(4);
  return at ? load_le32(at) : 0;
}

uint64_t PayloadReader::u64() {
  const uint8_t* at = take(8);
  return at ? load_le64(at) : 0;
}

int32_t PayloadReader::i32() {
  const uint32_t bits = u32();
  int32_t value = 0;
  std::memcpy(&value, &bits, sizeof(value));  // two's complement without a narrowing cast
  return value;
}

float PayloadReader::f32() {
  const uint32_t bits = u32();
  float value = 0.0f;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

bool PayloadReader::raw(size_t size, Bytes& out) {
  if (!need(size)) return false;
  out.data = take(size);
  out.size = size;
  return true;
}

bool PayloadReader::str8(StrView& out) {
  if (!need(1)) return false;
  Bytes text;
  if (!raw(u8(), text)) return false;
  out = StrView(reinterpret_cast<const char*>(text.data), text.size);
  return true;
}

Bytes PayloadReader::rest() {
  Bytes out{data_ + offset_, size_ - offset_};
  offset_ = size_;
  return out;
}

bool PayloadReader::done() {
  if (offset_ != size_) {
    error_.format("%s payload has %lu unexpected trailing bytes", what_, static_cast<unsigned long>(size_ - offset_));
    return false;
  }
  return true;
}

uint32_t U32Array::at(size_t index) const {
  if (values != nullptr) return values[index];
  if (little_endian != nullptr) return load_le32(little_endian + 4 * index);
  return 0;
}

// --- messages ------------------------------------------------------------------------------------

uint32_t TensorDesc::bytes() const {
  const size_t rank_used = min_size(rank, kMaxRank);
  uint64_t total = dtype_itemsize(dtype);
  for (size_t i = 0; i < rank_used; ++i) {
    total *= dims[i];  // both factors < 2^32 here, so the product fits 64 bits
    if (total > UINT32_MAX) return UINT32_MAX;
  }
  return static_cast<uint32_t>(total);
}

void TensorDesc::pack(PayloadWriter& out) const {
  const uint8_t rank_used = static_cast<uint8_t>(min_size(rank, kMaxRank));
  out.u8(dtype);
  out.u8(rank_used);
  for (size_t i = 0; i < rank_used; ++i) out.u32(dims[i]);
  out.f32(scale);
  out.i32(zero_point);
}

bool TensorDesc::read(PayloadReader& in) {
  if (!in.need(2)) return false;
  dtype = in.u8();
  const uint8_t ndim = in.u8();
  if (ndim > kMaxRank) {
    in.error().format("tensor rank %u is above the protocol maximum %u", static_cast<unsigned>(ndim),
                      static_cast<unsigned>(kMaxRank));
    return false;
  }
  if (!is_known_dtype(dtype)) {
    in.error().format("unknown tensor type code %u", static_cast<unsigned>(dtype));
    return false;
  }
  rank = ndim;
  if (!in.need(4u * ndim)) return false;
  for (size_t i = 0; i < kMaxRank; ++i) dims[i] = i < ndim ? in.u32() : 0;
  if (!in.need(8)) return false;
  scale = in.f32();
  zero_point = in.i32();
  return true;
}

void Hello::pack(PayloadWriter& out) const { out.u8(version); }

bool Hello::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "HELLO", error);
  if (!in.need(1)) return false;
  version = in.u8();
  return in.done();
}

void DeviceInfo::pack(PayloadWriter& out) const {
  out.u8(version);
  out.u8(board_kind);
  out.u16(cpu_mhz);
  out.u32(sram_bytes);
  out.u32(psram_bytes);
  out.u32(flash_bytes);
  out.u32(arena_size);
  out.u32(arena_used);
  out.u16(max_payload);
  out.u16(op_count);
  out.u8(flags);
  out.str8(chip);
  out.str8(firmware_id);
  out.str8(model_id);
  const uint8_t inputs_used = static_cast<uint8_t>(min_size(n_inputs, kMaxTensors));
  out.u8(inputs_used);
  for (size_t i = 0; i < inputs_used; ++i) inputs[i].pack(out);
  const uint8_t outputs_used = static_cast<uint8_t>(min_size(n_outputs, kMaxTensors));
  out.u8(outputs_used);
  for (size_t i = 0; i < outputs_used; ++i) outputs[i].pack(out);
}

namespace {

// Reads `count u8` and that many descriptors, keeping the first kMaxTensors.
bool read_tensor_list(PayloadReader& in, uint8_t& count, TensorDesc* kept) {
  if (!in.need(1)) return false;
  const uint8_t on_wire = in.u8();
  for (size_t i = 0; i < on_wire; ++i) {
    TensorDesc desc;
    if (!desc.read(in)) return false;
    if (i < kMaxTensors) kept[i] = desc;
  }
  count = static_cast<uint8_t>(min_size(on_wire, kMaxTensors));
  return true;
}

}  // namespace

bool DeviceInfo::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "DEVICE_INFO", error);
  if (!in.need(29)) return false;  // Python's "<BBHIIIIIHHB"
  version = in.u8();
  board_kind = in.u8();
  cpu_mhz = in.u16();
  sram_bytes = in.u32();
  psram_bytes = in.u32();
  flash_bytes = in.u32();
  arena_size = in.u32();
  arena_used = in.u32();
  max_payload = in.u16();
  op_count = in.u16();
  flags = in.u8();
  if (!in.str8(chip) || !in.str8(firmware_id) || !in.str8(model_id)) return false;
  if (!read_tensor_list(in, n_inputs, inputs) || !read_tensor_list(in, n_outputs, outputs)) return false;
  return in.done();
}

void GetOps::pack(PayloadWriter& out) const { out.u16(start); }

bool GetOps::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "GET_OPS", error);
  if (!in.need(2)) return false;
  start = in.u16();
  return in.done();
}

StrView OpsPage::name(uint8_t index) const {
  size_t position = 0;
  for (size_t entry = 0; entry <= index; ++entry) {
    if (position >= names.size) return StrView();
    const size_t length = names.data[position];
    if (length > names.size - position - 1) return StrView();
    if (entry == index) return StrView(reinterpret_cast<const char*>(names.data + position + 1), length);
    position += 1 + length;
  }
  return StrView();
}

void OpsPage::pack(PayloadWriter& out) const {
  out.u16(start);
  out.u8(count);
  out.bytes(names.data, names.size);
}

bool OpsPage::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "OPS", error);
  if (!in.need(3)) return false;
  start = in.u16();
  count = in.u8();
  const size_t names_start = in.offset();
  for (size_t i = 0; i < count; ++i) {
    StrView name;
    if (!in.str8(name)) return false;
  }
  names = Bytes{payload.data + names_start, in.offset() - names_start};
  return in.done();
}

void InputBegin::pack(PayloadWriter& out) const {
  out.u8(tensor);
  out.u32(total);
}

bool InputBegin::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "INPUT_BEGIN", error);
  if (!in.need(5)) return false;
  tensor = in.u8();
  total = in.u32();
  return in.done();
}

void InputData::pack(PayloadWriter& out) const {
  out.u8(tensor);
  out.u32(offset);
  out.bytes(data.data, data.size);
}

bool InputData::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "INPUT_DATA", error);
  if (!in.need(kInputDataHeader)) return false;
  tensor = in.u8();
  offset = in.u32();
  data = in.rest();
  return true;
}

void Ack::pack(PayloadWriter& out) const {
  out.u8(acked_type);
  out.u32(value);
}

bool Ack::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "ACK", error);
  if (!in.need(5)) return false;
  acked_type = in.u8();
  value = in.u32();
  return in.done();
}

void Invoke::pack(PayloadWriter& out) const { out.u8(flags); }

bool Invoke::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "INVOKE", error);
  if (!in.need(1)) return false;
  flags = in.u8();
  return in.done();
}

void GetTensor::pack(PayloadWriter& out) const {
  out.u16(tensor);
  out.u32(offset);
}

bool GetTensor::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "GET_TENSOR", error);
  if (!in.need(kGetTensorSize)) return false;
  tensor = in.u16();
  offset = in.u32();
  return in.done();
}

void OutputData::pack(PayloadWriter& out) const {
  out.u8(tensor);
  out.u32(offset);
  out.u32(total);
  out.bytes(data.data, data.size);
}

bool OutputData::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "OUTPUT_DATA", error);
  if (!in.need(kOutputDataHeader)) return false;
  tensor = in.u8();
  offset = in.u32();
  total = in.u32();
  data = in.rest();
  return true;
}

void InvokeResult::pack(PayloadWriter& out) const {
  out.u32(total_us);
  out.u64(total_cycles);
  out.u16(count);
  for (size_t i = 0; i < count; ++i) out.u32(op_us.at(i));
  for (size_t i = 0; i < count; ++i) out.u32(op_cycles.at(i));
}

bool InvokeResult::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "INVOKE_RESULT", error);
  if (!in.need(kInvokeResultHeader)) return false;
  total_us = in.u32();
  total_cycles = in.u64();
  count = in.u16();
  Bytes us;
  Bytes cycles;
  if (!in.raw(4u * count, us) || !in.raw(4u * count, cycles)) return false;
  op_us = U32Array{nullptr, us.data};
  op_cycles = U32Array{nullptr, cycles.data};
  return in.done();
}

size_t TensorData::header_size(const TensorDesc& desc) {
  return kTensorDataHeader + 2 + 4u * min_size(desc.rank, kMaxRank) + 8;
}

void TensorData::pack(PayloadWriter& out) const {
  out.u16(tensor);
  out.u32(offset);
  out.u32(total);
  desc.pack(out);
  out.bytes(data.data, data.size);
}

bool TensorData::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "TENSOR_DATA", error);
  if (!in.need(kTensorDataHeader)) return false;
  tensor = in.u16();
  offset = in.u32();
  total = in.u32();
  if (!desc.read(in)) return false;
  data = in.rest();
  return true;
}

void ErrorMsg::pack(PayloadWriter& out) const {
  out.u16(code);
  out.str8(text);
}

bool ErrorMsg::unpack(Bytes payload, ErrorText& error) {
  PayloadReader in(payload, "ERROR", error);
  if (!in.need(2)) return false;
  code = in.u16();
  if (!in.str8(text)) return false;
  return in.done();
}

MessageCheck check_message(uint8_t type, Bytes payload, ErrorText& error) {
  bool valid = false;
  switch (static_cast<MsgType>(type)) {
    case MsgType::kHello: valid = Hello().unpack(payload, error); break;
    case MsgType::kGetOps: valid = GetOps().unpack(payload, error); break;
    case MsgType::kInputBegin: valid = InputBegin().unpack(payload, error); break;
    case MsgType::kInputData: valid = InputData().unpack(payload, error); break;
    case MsgType::kInvoke: valid = Invoke().unpack(payload, error); break;
    case MsgType::kGetTensor: valid = GetTensor().unpack(payload, error); break;
    case MsgType::kDeviceInfo: valid = DeviceInfo().unpack(payload, error); break;
    case MsgType::kOps: valid = OpsPage().unpack(payload, error); break;
    case MsgType::kAck: valid = Ack().unpack(payload, error); break;
    case MsgType::kOutputData: valid = OutputData().unpack(payload, error); break;
    case MsgType::kInvokeResult: valid = InvokeResult().unpack(payload, error); break;
    case MsgType::kTensorData: valid = TensorData().unpack(payload, error); break;
    case MsgType::kError: valid = ErrorMsg().unpack(payload, error); break;
    default:
      error.format("unknown message type 0x%02x", static_cast<unsigned>(type));
      return MessageCheck::kUnknownType;
  }
  return valid ? MessageCheck::kValid : MessageCheck::kBadPayload;
}

// --- framing -------------------------------------------------------------------------------------

size_t FrameEncoder::payload_capacity() const {
  if (buffer_ == nullptr || capacity_ < kFrameOverhead) return 0;
  return min_size(capacity_ - kFrameOverhead, kMaxPayload);
}

size_t FrameEncoder::finish(uint8_t type, uint8_t seq, size_t payload_size) {
  if (payload_size > payload_capacity()) return 0;
  buffer_[0] = kSync0;
  buffer_[1] = kSync1;
  buffer_[2] = type;
  buffer_[3] = seq;
  store_le16(buffer_ + 4, static_cast<uint16_t>(payload_size));
  buffer_[6] = crc8(buffer_ + 2, 4);
  // The CRC-32 covers type..length and the payload, not the header check in between.
  const uint32_t crc = crc32(payload(), payload_size, crc32(buffer_ + 2, 4));
  store_le32(payload() + payload_size, crc);
  return payload_size + kFrameOverhead;
}

size_t FrameEncoder::encode(uint8_t type, uint8_t seq, const uint8_t* payload_data, size_t size) {
  if (size > payload_capacity() || (size != 0 && payload_data == nullptr)) return 0;
  if (size != 0 && payload_data != payload()) std::memmove(payload(), payload_data, size);
  return finish(type, seq, size);
}

FrameDecoder::FrameDecoder(size_t max_payload) : max_payload_(min_size(max_payload, kMaxPayload)) {}

void FrameDecoder::reset() {
  start_ = 0;
  end_ = 0;
  returned_ = 0;
  damaged_ = false;
}

size_t FrameDecoder::expire() {
  drop_returned();
  const size_t dropped = end_ - start_;
  if (damaged()) {
    ++stats_.idle_drops;
    stats_.garbage_bytes += static_cast<uint32_t>(dropped);
  }
  start_ = 0;
  end_ = 0;
  damaged_ = false;
  return dropped;
}

void FrameDecoder::drop_returned() {
  start_ += returned_;
  returned_ = 0;
}

void FrameDecoder::skip(size_t count) {
  if (count == 0) return;
  stats_.garbage_bytes += static_cast<uint32_t>(count);
  start_ += count;
  damaged_ = true;
}

uint8_t* FrameDecoder::space(size_t& free) {
  drop_returned();
  if (start_ == end_) {
    start_ = 0;
    end_ = 0;
  } else if (end_ == sizeof(buffer_) && start_ > 0) {
    // Compact only when the tail is full, so a frame arriving in small reads is moved at most
    // about once instead of once per read.
    std::memmove(buffer_, buffer_ + start_, end_ - start_);
    end_ -= start_;
    start_ = 0;
  }
  free = sizeof(buffer_) - end_;
  return buffer_ + end_;
}

void FrameDecoder::commit(size_t size) { end_ += min_size(size, sizeof(buffer_) - end_); }

size_t FrameDecoder::feed(const uint8_t* data, size_t size) {
  if (data == nullptr || size == 0) return 0;
  size_t free = 0;
  uint8_t* at = space(free);
  const size_t taken = min_size(size, free);
  std::memcpy(at, data, taken);
  commit(taken);
  return taken;
}

bool FrameDecoder::next(Frame& frame) {
  drop_returned();
  for (;;) {
    const uint8_t* buffered = buffer_ + start_;
    const size_t available = end_ - start_;
    size_t sync = 0;
    while (sync + 1 < available && !(buffered[sync] == kSync0 && buffered[sync + 1] == kSync1)) ++sync;
    if (sync + 1 >= available) {
      // No sync pair. Keep a trailing A5: it may be the first half of one still in flight.
      const size_t keep = (available > 0 && buffered[available - 1] == kSync0) ? 1 : 0;
      skip(available - keep);
      return false;
    }
    skip(sync);
    const uint8_t* header = buffer_ + start_;
    if (end_ - start_ < kHeaderSize) return false;
    if (crc8(header + 2, 4) != header[6]) {
      ++stats_.header_errors;
      skip(1);
      continue;
    }
    const size_t length = load_le16(header + 4);
    if (length > max_payload_) {
      ++stats_.oversize;
      skip(1);
      continue;
    }
    const size_t total = kFrameOverhead + length;
    if (end_ - start_ < total) return false;
    const uint8_t* payload = header + kHeaderSize;
    if (crc32(payload, length, crc32(header + 2, 4)) != load_le32(payload + length)) {
      ++stats_.crc_errors;
      skip(1);
      continue;
    }
    frame.type = header[2];
    frame.seq = header[3];
    frame.payload = Bytes{payload, length};
    returned_ = total;
    damaged_ = false;
    return true;
  }
}

// --- engine --------------------------------------------------------------------------------------

namespace {

constexpr const char* kNoRuntimeText = "device booted without an inference runtime";
// Bounds one poll() so a host that never stops sending cannot starve the rest of the main loop.
constexpr size_t kPollBudget = 4 * kMaxFrame;
// The largest ERROR frame: code u16 and a str8 of at most kMaxStr8 bytes.
constexpr size_t kMaxErrorFrame = kFrameOverhead + 3 + kMaxStr8;

// Python's encoder refuses an INVOKE_RESULT that does not fit one payload; so does the engine.
bool timing_fits(uint16_t op_count) { return kInvokeResultHeader + 8u * op_count <= kMaxPayload; }

}  // namespace

bool Inference::tensor(uint16_t /*index*/, TensorDesc& /*desc*/, Bytes& /*data*/, ErrorText& error) {
  error.format("%s", kNoPreservedTensorsText);
  return false;
}

void InferenceJob::run() {
  ok_ = false;
  timing_ = InvokeTiming();
  std::memset(error_, 0, sizeof(error_));
  for (uint8_t index = 0; index < info_->n_inputs; ++index) {
    const uint32_t bytes = info_->inputs[index].bytes();
    if (inputs_[index] == nullptr || bytes == 0) continue;
    uint8_t* tensor = inference_->input_buffer(index);
    if (tensor == nullptr) {
      std::snprintf(error_, sizeof(error_), "input %u has no buffer on the device", static_cast<unsigned>(index));
      return;
    }
    std::memcpy(tensor, inputs_[index], bytes);
  }
  if (!inference_->invoke((flags_ & kInvokeProfile) != 0, timing_, error_, sizeof(error_))) {
    error_[kMaxStr8] = '\0';
    return;
  }
  for (uint8_t index = 0; index < info_->n_outputs; ++index) {
    const uint32_t bytes = info_->outputs[index].bytes();
    if (bytes == 0) continue;
    const uint8_t* tensor = inference_->output_buffer(index);
    if (tensor == nullptr) {
      std::snprintf(error_, sizeof(error_), "output %u has no buffer on the device", static_cast<unsigned>(index));
      return;
    }
    if (outputs_[index] != nullptr) std::memcpy(outputs_[index], tensor, bytes);
  }
  if (staged_) {
    // The Inference's arrays belong to its profiler, which the next job clears: copy what will be
    // sent now, while nothing else runs on the model.
    const bool sent = (flags_ & kInvokeProfile) != 0 && timing_fits(timing_.op_count);
    const uint16_t copied = sent ? timing_.op_count : 0;
    if (copied > op_capacity_) {
      std::snprintf(error_, sizeof(error_), "%u per-op timings, the device keeps %u",
                    static_cast<unsigned>(copied), static_cast<unsigned>(op_capacity_));
      return;
    }
    for (uint16_t i = 0; i < copied; ++i) {
      op_us_[i] = timing_.op_us != nullptr ? timing_.op_us[i] : 0;
      op_cycles_[i] = timing_.op_cycles != nullptr ? timing_.op_cycles[i] : 0;
    }
    timing_.op_us = op_us_;
    timing_.op_cycles = op_cycles_;
  }
  ok_ = true;
}

Engine::Engine(Transport& transport, Inference* inference, const DeviceInfo& info, uint16_t boot_error_code,
               const char* boot_error_text)
    : transport_(transport),
      inference_(inference),
      info_(info),
      max_payload_(clamp_payload(info.max_payload)),
      boot_error_code_(boot_error_code),
      boot_error_text_(boot_error_text),
      decoder_(clamp_payload(info.max_payload)) {
  info_.max_payload = static_cast<uint16_t>(max_payload_);
  if (info_.n_inputs > kMaxTensors) info_.n_inputs = kMaxTensors;
  if (info_.n_outputs > kMaxTensors) info_.n_outputs = kMaxTensors;
  if (inference_ == nullptr && boot_error_code_ == 0) {
    boot_error_code_ = static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
    boot_error_text_ = StrView(kNoRuntimeText);
  }
  PayloadWriter out = reply_writer();
  info_.pack(out);
  info_frame_bytes_ = out.size() + kFrameOverhead;
}

bool Engine::use_worker(Worker& worker, const StagingBuffers& buffers) {
  if (inference_ == nullptr || boot_error_code_ != 0 || worker_ != nullptr) return false;
  for (int set = 0; set < 2; ++set) {
    for (uint8_t i = 0; i < info_.n_inputs; ++i) {
      if (info_.inputs[i].bytes() != 0 && buffers.inputs[set][i] == nullptr) return false;
    }
    for (uint8_t i = 0; i < info_.n_outputs; ++i) {
      if (info_.outputs[i].bytes() != 0 && buffers.outputs[set][i] == nullptr) return false;
    }
    if (buffers.op_capacity != 0 && (buffers.op_us[set] == nullptr || buffers.op_cycles[set] == nullptr)) return false;
  }
  worker_ = &worker;
  staging_ = buffers;
  info_.flags |= kFlagDoubleBuffered;
  return true;
}

bool Engine::poll(uint32_t now_ms) {
  bool progressed = collect();
  if (parked_) {
    // Bytes wait in the transport meanwhile: the line is not idle, this engine is not reading.
    last_rx_ms_ = now_ms;
    if (!resume()) return progressed;
    progressed = true;
  }
  size_t budget = kPollBudget;
  bool read_any = false;
  while (budget > 0 && !parked_) {
    size_t free = 0;
    uint8_t* at = decoder_.space(free);
    const size_t wanted = min_size(free, budget);
    size_t got = transport_.read(at, wanted);
    if (got == 0) break;
    if (got > wanted) got = wanted;  // a transport that overstates must not move the decoder past its buffer
    decoder_.commit(got);
    progressed = true;
    read_any = true;
    drain();
    budget -= got;
  }
  if (read_any || parked_) {
    last_rx_ms_ = now_ms;
  } else {
    check_idle(now_ms);
  }
  return progressed;
}

void Engine::idle(uint32_t now_ms) {
  collect();
  if (parked_) {
    last_rx_ms_ = now_ms;
    return;
  }
  check_idle(now_ms);
}

void Engine::check_idle(uint32_t now_ms) {
  if (!decoder_.damaged() || static_cast<uint32_t>(now_ms - last_rx_ms_) < idle_gap_ms_) return;
  // The loss report is an ERROR frame; behind a running job it must fit the held-back answers.
  if (jobs_in_flight_ > 0 && kMaxErrorFrame > sizeof(deferred_) - deferred_size_) return;
  const size_t dropped = decoder_.expire();
  send_error(static_cast<uint8_t>(last_seq_ + 1u), ErrorCode::kBadFrame,
             "frame lost: %lu bytes held, then no byte for %lu ms", static_cast<unsigned long>(dropped),
             static_cast<unsigned long>(idle_gap_ms_));
}

size_t Engine::receive(const uint8_t* data, size_t size, uint32_t now_ms) {
  collect();
  last_rx_ms_ = now_ms;
  if (parked_ && !resume()) return 0;
  size_t taken_total = 0;
  while (size > 0 && data != nullptr && !parked_) {
    const size_t taken = decoder_.feed(data, size);
    drain();
    if (taken == 0) break;  // unreachable: a drained decoder always has room
    data += taken;
    size -= taken;
    taken_total += taken;
  }
  return taken_total;
}

bool Engine::collect() {
  if (worker_ == nullptr) return false;
  bool any = false;
  while (InferenceJob* job = worker_->finished()) {
    job->finished_ = true;
    any = true;
  }
  if (any) flush();
  return any;
}

void Engine::flush() {
  while (jobs_in_flight_ > 0 && jobs_[job_head_].finished_) {
    direct_ = true;
    answer_job(jobs_[job_head_], jobs_in_flight_ == 1);
    if (deferred_split_ != 0) transport_.write(deferred_, deferred_split_);
    direct_ = false;
    std::memmove(deferred_, deferred_ + deferred_split_, deferred_size_ - deferred_split_);
    deferred_size_ -= deferred_split_;
    deferred_split_ = deferred_size_;
    job_head_ ^= 1u;
    --jobs_in_flight_;
  }
}

// A parked frame is still the decoder's latest, valid until the decoder is next called.
bool Engine::resume() {
  if (!handle(parked_frame_)) return false;
  parked_ = false;
  drain();
  return true;
}

void Engine::drain() {
  Frame frame;
  while (decoder_.next(frame)) {
    if (!handle(frame)) {
      parked_frame_ = frame;
      parked_ = true;
      return;
    }
  }
}

PayloadWriter Engine::reply_writer() { return FrameEncoder(tx_, sizeof(tx_)).writer(); }

void Engine::emit(const uint8_t* frame, size_t size) {
  if (direct_ || jobs_in_flight_ == 0) {
    transport_.write(frame, size);
    return;
  }
  // handle() made room for the largest answer before it started, so this always fits.
  if (size > sizeof(deferred_) - deferred_size_) return;
  std::memcpy(deferred_ + deferred_size_, frame, size);
  deferred_size_ += size;
  if (jobs_in_flight_ == 1) deferred_split_ = deferred_size_;
}

void Engine::send(MsgType type, uint8_t seq, const PayloadWriter& payload) {
  if (!payload.ok()) return;
  FrameEncoder encoder(tx_, sizeof(tx_));
  const size_t size = encoder.finish(static_cast<uint8_t>(type), seq, payload.size());
  if (size != 0) emit(tx_, size);
}

void Engine::send_error_text(uint8_t seq, uint16_t code, StrView text) {
  PayloadWriter out = reply_writer();
  ErrorMsg{code, text}.pack(out);
  send(MsgType::kError, seq, out);
}

void Engine::send_error(uint8_t seq, ErrorCode code, const char* fmt, ...) {
  ErrorText text;
  va_list args;
  va_start(args, fmt);
  text.vformat(fmt, args);
  va_end(args);
  send_error_text(seq, static_cast<uint16_t>(code), text.view());
}

size_t Engine::answer_bound(uint8_t type) const {
  switch (static_cast<MsgType>(type)) {
    case MsgType::kHello: return info_frame_bytes_ > kMaxErrorFrame ? info_frame_bytes_ : kMaxErrorFrame;
    case MsgType::kGetOps: return max_payload_ + kFrameOverhead;
    default: return kMaxErrorFrame;  // an ACK, an ERROR, or for INVOKE nothing until the job ends
  }
}

bool Engine::handle(const Frame& frame) {
  if (jobs_in_flight_ > 0 && answer_bound(frame.type) > sizeof(deferred_) - deferred_size_) return false;
  // The tensors live in the arena a running job writes: GET_TENSOR reads them once the last job's
  // answers are out, so it gets that invoke's tensors, and its answer follows them in order.
  if (jobs_in_flight_ > 0 && frame.type == static_cast<uint8_t>(MsgType::kGetTensor)) return false;
  last_seq_ = frame.seq;
  // Decode before anything else, as device.py does: a malformed payload is BAD_PAYLOAD even on a
  // device whose boot failed.
  ErrorText error;
  switch (check_message(frame.type, frame.payload, error)) {
    case MessageCheck::kUnknownType:
      send_error_text(frame.seq, static_cast<uint16_t>(ErrorCode::kUnknownType), error.view());
      return true;
    case MessageCheck::kBadPayload:
      send_error_text(frame.seq, static_cast<uint16_t>(ErrorCode::kBadPayload), error.view());
      return true;
    case MessageCheck::kValid:
      break;
  }
  const auto type = static_cast<MsgType>(frame.type);
  if (type == MsgType::kHello) {
    Hello hello;
    hello.unpack(frame.payload, error);
    answer_hello(frame.seq, hello);
    return true;
  }
  if (boot_error_code_ != 0) {
    send_error_text(frame.seq, boot_error_code_, boot_error_text_);
    return true;
  }
  switch (type) {
    case MsgType::kGetOps: {
      GetOps request;
      request.unpack(frame.payload, error);
      answer_get_ops(frame.seq, request);
      return true;
    }
    case MsgType::kInputBegin: {
      InputBegin request;
      request.unpack(frame.payload, error);
      return answer_input_begin(frame.seq, request);
    }
    case MsgType::kInputData: {
      InputData chunk;
      chunk.unpack(frame.payload, error);
      return answer_input_data(frame.seq, chunk);
    }
    case MsgType::kInvoke: {
      Invoke request;
      request.unpack(frame.payload, error);
      return answer_invoke(frame.seq, request);
    }
    case MsgType::kGetTensor: {
      GetTensor request;
      request.unpack(frame.payload, error);
      answer_get_tensor(frame.seq, request);
      return true;
    }
    default:
      send_error(frame.seq, ErrorCode::kUnknownType, "message type 0x%02x is not a request",
                 static_cast<unsigned>(frame.type));
      return true;
  }
}

void Engine::answer_hello(uint8_t seq, const Hello& hello) {
  if (hello.version != kProtocolVersion) {
    send_error(seq, ErrorCode::kVersionMismatch, "device speaks protocol v%u, host sent v%u",
               static_cast<unsigned>(kProtocolVersion), static_cast<unsigned>(hello.version));
    return;
  }
  if (boot_error_code_ != 0) {
    send_error_text(seq, boot_error_code_, boot_error_text_);
    return;
  }
  PayloadWriter out = reply_writer();
  info_.pack(out);  // at most ~1.1 KB: three 255-byte strings and 2 x 4 tensors of rank 8
  send(MsgType::kDeviceInfo, seq, out);
}

StrView Engine::op_name(uint16_t index) const {
  return StrView(inference_ != nullptr ? inference_->op_name(index) : nullptr);
}

void Engine::answer_get_ops(uint8_t seq, const GetOps& request) {
  if (request.start > info_.op_count) {
    send_error(seq, ErrorCode::kBadPayload, "op index %u past the model's %u ops", static_cast<unsigned>(request.start),
               static_cast<unsigned>(info_.op_count));
    return;
  }
  const uint8_t count = ops_page_capacity([this](uint16_t index) { return op_name(index); }, info_.op_count,
                                          request.start, max_payload_);
  PayloadWriter out = reply_writer();
  out.u16(request.start);
  out.u8(count);
  for (uint32_t i = 0; i < count; ++i) out.str8(op_name(static_cast<uint16_t>(request.start + i)));
  send(MsgType::kOps, seq, out);
}

bool Engine::input_in_use(uint8_t slot, uint8_t tensor) const {
  for (uint8_t n = 0; n < jobs_in_flight_; ++n) {
    const InferenceJob& job = jobs_[(job_head_ + n) & 1u];
    if (!job.finished_ && job.inputs_[tensor] != nullptr && job.input_slot_[tensor] == slot) return true;
  }
  return false;
}

bool Engine::answer_input_begin(uint8_t seq, const InputBegin& request) {
  if (request.tensor >= info_.n_inputs) {
    send_error(seq, ErrorCode::kBadPayload, "input tensor %u does not exist; the model has %u",
               static_cast<unsigned>(request.tensor), static_cast<unsigned>(info_.n_inputs));
    return true;
  }
  const uint32_t expected = info_.inputs[request.tensor].bytes();
  if (request.total != expected) {
    send_error(seq, ErrorCode::kInputSize, "input %u takes %lu bytes, host announced %lu",
               static_cast<unsigned>(request.tensor), static_cast<unsigned long>(expected),
               static_cast<unsigned long>(request.total));
    return true;
  }
  if (worker_ != nullptr && input_in_use(input_slot_[request.tensor], request.tensor)) {
    // The running job reads this set: upload into the other one, unless a queued job reads that.
    const uint8_t other = input_slot_[request.tensor] ^ 1u;
    if (input_in_use(other, request.tensor)) return false;
    input_slot_[request.tensor] = other;
  }
  received_[request.tensor] = 0;
  pending_[request.tensor] = false;
  PayloadWriter out = reply_writer();
  Ack{static_cast<uint8_t>(MsgType::kInputBegin), 0}.pack(out);
  send(MsgType::kAck, seq, out);
  return true;
}

bool Engine::answer_input_data(uint8_t seq, const InputData& chunk) {
  if (chunk.tensor >= info_.n_inputs) {
    send_error(seq, ErrorCode::kBadPayload, "input tensor %u does not exist", static_cast<unsigned>(chunk.tensor));
    return true;
  }
  // Where the upload stands depends on whether the newest job succeeds.
  if (pending_[chunk.tensor]) return false;
  const uint32_t received = received_[chunk.tensor];
  if (chunk.offset > received) {
    // A gap: an earlier chunk was lost. The ACK carries the bytes held, where the host resumes.
    PayloadWriter out = reply_writer();
    Ack{static_cast<uint8_t>(MsgType::kInputData), received}.pack(out);
    send(MsgType::kAck, seq, out);
    return true;
  }
  const uint32_t tensor_bytes = info_.inputs[chunk.tensor].bytes();
  const uint64_t end = static_cast<uint64_t>(chunk.offset) + chunk.data.size;
  if (end > tensor_bytes) {
    send_error(seq, ErrorCode::kInputSize, "input %u chunk ends at byte %llu, tensor has %lu",
               static_cast<unsigned>(chunk.tensor), static_cast<unsigned long long>(end),
               static_cast<unsigned long>(tensor_bytes));
    return true;
  }
  if (chunk.data.size != 0) {
    uint8_t* tensor = nullptr;
    if (worker_ != nullptr) {
      // Not pending, so INPUT_BEGIN or a finished job chose a set no running job reads.
      if (input_in_use(input_slot_[chunk.tensor], chunk.tensor)) return false;
      tensor = staging_.inputs[input_slot_[chunk.tensor]][chunk.tensor];
    } else {
      tensor = inference_->input_buffer(chunk.tensor);
      if (tensor == nullptr) {
        send_error(seq, ErrorCode::kInvokeFailed, "input %u has no buffer on the device",
                   static_cast<unsigned>(chunk.tensor));
        return true;
      }
    }
    std::memcpy(tensor + chunk.offset, chunk.data.data, chunk.data.size);
  }
  // At or below the bytes held: a chunk sent again carries the same bytes and is taken again.
  const uint32_t held = end > received ? static_cast<uint32_t>(end) : received;
  received_[chunk.tensor] = held;
  PayloadWriter out = reply_writer();
  Ack{static_cast<uint8_t>(MsgType::kInputData), held}.pack(out);
  send(MsgType::kAck, seq, out);
  return true;
}

bool Engine::answer_invoke(uint8_t seq, const Invoke& request) {
  for (uint8_t index = 0; index < info_.n_inputs; ++index) {
    if (pending_[index]) return false;  // is the input still held? The newest job decides.
  }
  for (uint8_t index = 0; index < info_.n_inputs; ++index) {
    const uint32_t expected = info_.inputs[index].bytes();
    if (received_[index] != expected) {
      send_error(seq, ErrorCode::kNotReady, "input %u has %lu of %lu bytes", static_cast<unsigned>(index),
                 static_cast<unsigned long>(received_[index]), static_cast<unsigned long>(expected));
      return true;
    }
  }
  if (jobs_in_flight_ == 2) return false;
  const uint8_t slot = (job_head_ + jobs_in_flight_) & 1u;
  InferenceJob& job = jobs_[slot];
  job = InferenceJob();
  job.inference_ = inference_;
  job.info_ = &info_;
  job.seq_ = seq;
  job.flags_ = request.flags;
  if (worker_ != nullptr) {
    job.staged_ = true;
    for (uint8_t index = 0; index < info_.n_inputs; ++index) {
      job.input_slot_[index] = input_slot_[index];
      job.inputs_[index] = staging_.inputs[input_slot_[index]][index];
    }
    for (uint8_t index = 0; index < info_.n_outputs; ++index) job.outputs_[index] = staging_.outputs[slot][index];
    job.op_us_ = staging_.op_us[slot];
    job.op_cycles_ = staging_.op_cycles[slot];
    job.op_capacity_ = staging_.op_capacity;
  }
  for (uint8_t index = 0; index < info_.n_inputs; ++index) pending_[index] = true;
  ++jobs_in_flight_;
  if (worker_ != nullptr) {
    worker_->submit(&job);
  } else {
    job.run();
    job.finished_ = true;
    flush();
  }
  return true;
}

void Engine::answer_job(const InferenceJob& job, bool newest) {
  const uint8_t seq = job.seq_;
  if (!job.ok_) {
    // A failed invoke keeps the inputs: the host may invoke again (device.py does the same).
    if (newest) {
      for (bool& pending : pending_) pending = false;
    }
    send_error(seq, ErrorCode::kInvokeFailed, "invoke failed: %s", job.error_);
    return;
  }
  // TFLM's planner may reuse input memory for intermediate tensors: after an invoke the inputs
  // are gone, and the host must upload them again (device.py resets its counters the same way).
  // Only inputs not begun again since this job was submitted: the newer uploads stand.
  if (newest) {
    for (uint8_t index = 0; index < kMaxTensors; ++index) {
      if (pending_[index]) received_[index] = 0;
      pending_[index] = false;
    }
  }

  const bool profiled = (job.flags_ & kInvokeProfile) != 0;
  const InvokeTiming& timing = job.timing_;
  const uint16_t op_count = profiled ? timing.op_count : 0;
  if (!timing_fits(op_count)) {
    // Python's engine has no answer for this (its encoder raises); a frame it cannot send beats
    // silence.
    send_error(seq, ErrorCode::kInvokeFailed,
               "invoke failed: per-op timing of %u ops does not fit one INVOKE_RESULT; invoke without profiling",
               static_cast<unsigned>(op_count));
    return;
  }

  const size_t chunk_size = max_payload_ - kOutputDataHeader;
  for (uint8_t index = 0; index < info_.n_outputs; ++index) {
    const uint32_t total = info_.outputs[index].bytes();
    const uint8_t* data = nullptr;
    if (total != 0) data = job.staged_ ? job.outputs_[index] : inference_->output_buffer(index);
    uint32_t offset = 0;
    do {  // an empty output still gets one (empty) chunk, as in device.py
      const size_t piece = min_size(chunk_size, total - offset);
      PayloadWriter out = reply_writer();
      OutputData{index, offset, total, Bytes{data != nullptr ? data + offset : nullptr, piece}}.pack(out);
      send(MsgType::kOutputData, seq, out);
      offset += static_cast<uint32_t>(piece);
    } while (offset < total);
  }

  PayloadWriter out = reply_writer();
  InvokeResult result;
  result.total_us = timing.total_us;
  result.total_cycles = timing.total_cycles;
  result.count = op_count;
  result.op_us = U32Array{timing.op_us, nullptr};
  result.op_cycles = U32Array{timing.op_cycles, nullptr};
  result.pack(out);
  send(MsgType::kInvokeResult, seq, out);
}

// Checked in device.py's order: the flag, the index, what the Inference gives, the offset.
void Engine::answer_get_tensor(uint8_t seq, const GetTensor& request) {
  const auto unavailable = static_cast<uint16_t>(ErrorCode::kTensorUnavailable);
  if ((info_.flags & kFlagPreservesTensors) == 0) {
    send_error_text(seq, unavailable, StrView(kNoPreservedTensorsText));
    return;
  }
  const uint16_t count = inference_->tensor_count();
  if (request.tensor >= count) {
    send_error(seq, ErrorCode::kBadPayload, "tensor %u does not exist; the model's main subgraph has %u",
               static_cast<unsigned>(request.tensor), static_cast<unsigned>(count));
    return;
  }
  TensorData chunk;
  ErrorText error;
  if (!inference_->tensor(request.tensor, chunk.desc, chunk.data, error)) {
    send_error_text(seq, unavailable, error.view());
    return;
  }
  const TensorDesc& desc = chunk.desc;
  if (!is_known_dtype(desc.dtype)) {
    send_error(seq, ErrorCode::kTensorUnavailable, "tensor %u has type code %u, which the wire protocol cannot carry",
               static_cast<unsigned>(request.tensor), static_cast<unsigned>(desc.dtype));
    return;
  }
  if (desc.rank > kMaxRank) {
    send_error(seq, ErrorCode::kTensorUnavailable, "tensor %u has rank %u, above the protocol maximum %u",
               static_cast<unsigned>(request.tensor), static_cast<unsigned>(desc.rank),
               static_cast<unsigned>(kMaxRank));
    return;
  }
  const uint32_t total = desc.bytes();
  if (chunk.data.size != total || (total != 0 && chunk.data.data == nullptr)) {
    send_error(seq, ErrorCode::kTensorUnavailable, "tensor %u: %lu bytes on the device for a descriptor of %lu bytes",
               static_cast<unsigned>(request.tensor),
               static_cast<unsigned long>(chunk.data.data == nullptr ? 0 : chunk.data.size),
               static_cast<unsigned long>(total));
    return;
  }
  if (request.offset > total) {
    send_error(seq, ErrorCode::kBadPayload, "tensor %u has %lu bytes; offset %lu is past its end",
               static_cast<unsigned>(request.tensor), static_cast<unsigned long>(total),
               static_cast<unsigned long>(request.offset));
    return;
  }
  const size_t piece = min_size(total - request.offset, max_payload_ - TensorData::header_size(desc));
  chunk.tensor = request.tensor;
  chunk.offset = request.offset;
  chunk.total = total;
  chunk.data = Bytes{piece != 0 ? chunk.data.data + request.offset : nullptr, piece};
  PayloadWriter out = reply_writer();
  chunk.pack(out);
  send(MsgType::kTensorData, seq, out);
}

}  // namespace tinyhil
