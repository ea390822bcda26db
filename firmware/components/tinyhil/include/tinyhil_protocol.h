// tinyhil wire protocol v2, device end (docs/protocol.md is the specification).
//
// Portable C++17 with no Arduino, no TFLite Micro, no heap and no exceptions, so the same code
// runs on the ESP32-S3 and in the native tests (tests/test_native_engine.py), which check it
// byte for byte against the Python reference (harness/protocol.py, harness/board/device.py)
// and the golden frames (tests/vectors/golden_frames.json).
//
// Memory: an Engine holds one receive and one transmit frame buffer (kMaxFrame bytes each), a
// small queue of held-back answers (kDeferredAnswerBytes) and two job records, about 11 KB in
// all, and nothing else that grows. Run synchronously, it writes input bytes straight into the
// model's input tensors and sends outputs straight from its output tensors. Run with a Worker,
// it stages inputs and results in memory the glue allocates (StagingBuffers).
//
// Threads: an Engine is used from one thread (the link). With a Worker, InferenceJob::run() runs
// on the worker's thread and touches only its job and the Inference.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>

namespace tinyhil {

constexpr uint8_t kProtocolVersion = 2;
constexpr size_t kMaxPayload = 4096;
constexpr size_t kHeaderSize = 7;   // sync(2) type(1) seq(1) length(2) header-crc8(1)
constexpr size_t kTrailerSize = 4;  // crc32
constexpr size_t kFrameOverhead = kHeaderSize + kTrailerSize;
constexpr size_t kMaxFrame = kMaxPayload + kFrameOverhead;
constexpr uint8_t kSync0 = 0xA5;
constexpr uint8_t kSync1 = 0x5A;

constexpr size_t kMaxRank = 8;
constexpr size_t kMaxTensors = 4;        // per direction, in DeviceInfo
constexpr size_t kMaxStr8 = 255;         // longer strings are cut to this many bytes, as Python does
constexpr size_t kInputDataHeader = 5;   // tensor u8, offset u32
constexpr size_t kOutputDataHeader = 9;  // tensor u8, offset u32, total u32
constexpr size_t kInvokeResultHeader = 14;
constexpr size_t kGetTensorSize = 6;      // tensor u16, offset u32
constexpr size_t kTensorDataHeader = 10;  // tensor u16, offset u32, total u32; then the descriptor
// A receiver holding part of a frame, or bytes it threw away since its last good frame, that gets
// no byte for this long drops them and hunts for a sync pair again; a device then reports the loss
// (ERROR BAD_FRAME). Senders write a frame without pausing, so silence inside a frame means the
// rest is lost. harness.protocol.IDLE_GAP_S; docs/protocol.md, "Idle gap".
constexpr uint32_t kIdleGapMs = 50;
// The engine clamps the max_payload it announces into [kMinPayload, kMaxPayload]: below this an
// output chunk or an OPS page would hold almost nothing.
constexpr size_t kMinPayload = 64;

enum class MsgType : uint8_t {
  kHello = 0x01,
  kGetOps = 0x02,
  kInputBegin = 0x03,
  kInputData = 0x04,
  kInvoke = 0x05,
  kGetTensor = 0x06,
  kDeviceInfo = 0x81,
  kOps = 0x82,
  kAck = 0x84,
  kOutputData = 0x85,
  kInvokeResult = 0x86,
  kTensorData = 0x87,
  kError = 0xFF,
};

enum class ErrorCode : uint16_t {
  kBadFrame = 1,
  kBadSequence = 2,
  kUnknownType = 3,
  kBadPayload = 4,
  kInputSize = 5,
  kInvokeFailed = 6,
  kModelLoadFailed = 7,
  kArenaAllocationFailed = 8,
  kModelTooLarge = 9,
  kUnsupportedOp = 10,
  kNotReady = 11,
  kVersionMismatch = 12,
  kTensorUnavailable = 13,
};

// Tensor element types, numbered as the TFLite schema's TensorType.
enum class DType : uint8_t { kFloat32 = 0, kInt32 = 2, kUInt8 = 3, kInt16 = 7, kInt8 = 9 };

constexpr uint8_t kBoardReal = 0;
constexpr uint8_t kBoardVirtual = 1;
constexpr uint8_t kFlagEspNn = 0x01;
constexpr uint8_t kFlagArenaInPsram = 0x02;
// Set by Engine::use_worker(): the next sample is staged while this one runs, so the host may keep
// one whole sample's requests unanswered beyond its four-frame window (harness/board/link.py).
constexpr uint8_t kFlagDoubleBuffered = 0x04;
// Set by the glue when the interpreter keeps every tensor after an invoke (TFLM
// preserve_all_tensors, the debug build). Without it the engine answers every GET_TENSOR with
// TENSOR_UNAVAILABLE and kNoPreservedTensorsText, whatever the index, and never asks the
// Inference; with it, an index >= Inference::tensor_count() is BAD_PAYLOAD.
constexpr uint8_t kFlagPreservesTensors = 0x08;
constexpr const char* kNoPreservedTensorsText =
    "this firmware does not keep intermediate tensors: it was not built with preserve_all_tensors "
    "(tinyhil's debug build)";
constexpr uint8_t kInvokeProfile = 0x01;

// Bytes of one element; 0 for a code the protocol does not know.
size_t dtype_itemsize(uint8_t dtype);
bool is_known_dtype(uint8_t dtype);

// CRC-8 (poly 0x07, init 0) guards the header; CRC-32/ISO-HDLC (zlib's) guards the frame.
// Both continue a previous value, so a frame can be checked in pieces: crc32(b, n, crc32(a, m)).
uint8_t crc8(const uint8_t* data, size_t size, uint8_t crc = 0);
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);

// --- views and bounded payload access ------------------------------------------------------------

struct Bytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

// Strings on the wire are str8: not NUL-terminated. Builds implicitly from a C string, so
// `info.chip = "ESP32-S3";` works; the characters must outlive every use of the view.
struct StrView {
  const char* data = "";
  size_t size = 0;
  StrView() = default;
  StrView(const char* text);  // NOLINT(google-explicit-constructor): convenience is the point
  StrView(const char* text, size_t length);
  bool equals(const char* text) const;
};

// Error text for ERROR frames, formatted without the heap. 255 bytes is all a str8 carries.
struct ErrorText {
  char text[kMaxStr8 + 1] = {};
  size_t size = 0;
#if defined(__GNUC__)
  __attribute__((format(printf, 2, 3)))
#endif
  void format(const char* fmt, ...);
  void vformat(const char* fmt, va_list args);
  StrView view() const { return StrView(text, size); }
};

// Little-endian writes into a fixed buffer. Once something does not fit, nothing more is written
// and ok() stays false; callers check once at the end.
class PayloadWriter {
 public:
  PayloadWriter(uint8_t* buffer, size_t capacity) : buffer_(buffer), capacity_(capacity) {}
  void u8(uint8_t value);
  void u16(uint16_t value);
  void u32(uint32_t value);
  void u64(uint64_t value);
  void i32(int32_t value);
  void f32(float value);
  void bytes(const uint8_t* data, size_t size);
  void str8(StrView text);  // cut to kMaxStr8 bytes, as Python's _str8
  size_t size() const { return size_; }
  bool ok() const { return ok_; }

 private:
  uint8_t* reserve(size_t size);
  uint8_t* buffer_;
  size_t capacity_;
  size_t size_ = 0;
  bool ok_ = true;
};

// Bounds-checked little-endian reads. need() checks a group of fields at once and words its error
// exactly as Python's _Reader.take, so both engines answer a short payload with the same text.
// Field reads after a successful need() never fail; without one they return 0 rather than read
// out of bounds.
class PayloadReader {
 public:
  PayloadReader(Bytes payload, const char* what, ErrorText& error)
      : data_(payload.data), size_(payload.size), what_(what), error_(error) {}
  bool need(size_t size);
  uint8_t u8();
  uint16_t u16();
  uint32_t u32();
  uint64_t u64();
  int32_t i32();
  float f32();
  bool str8(StrView& out);
  bool raw(size_t size, Bytes& out);
  Bytes rest();
  bool done();  // false (with Python's text) when bytes are left over
  size_t offset() const { return offset_; }
  ErrorText& error() { return error_; }

 private:
  const uint8_t* take(size_t size);
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
  const char* what_;
  ErrorText& error_;
};

// uint32 arrays either from the device (native values) or from a received payload (little-endian
// bytes, read in place without alignment assumptions).
struct U32Array {
  const uint32_t* values = nullptr;
  const uint8_t* little_endian = nullptr;
  uint32_t at(size_t index) const;  // 0 when neither is set
};

// --- messages (pack appends the payload; unpack validates exactly as harness/protocol.py) ------

struct TensorDesc {
  uint8_t dtype = 0;
  uint8_t rank = 0;
  uint32_t dims[kMaxRank] = {};
  float scale = 0.0f;
  int32_t zero_point = 0;
  // Element count times item size; saturates at UINT32_MAX rather than wrap.
  uint32_t bytes() const;
  void pack(PayloadWriter& out) const;
  bool read(PayloadReader& in);
};

struct Hello {
  uint8_t version = kProtocolVersion;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct DeviceInfo {
  uint8_t version = kProtocolVersion;
  uint8_t board_kind = kBoardReal;  // decides "measured" (real) or "estimated" (virtual) latency
  uint16_t cpu_mhz = 0;
  uint32_t sram_bytes = 0;
  uint32_t psram_bytes = 0;
  uint32_t flash_bytes = 0;  // app partition
  uint32_t arena_size = 0;
  uint32_t arena_used = 0;   // MicroInterpreter::arena_used_bytes()
  uint16_t max_payload = kMaxPayload;
  uint16_t op_count = 0;
  uint8_t flags = 0;         // kFlagEspNn | kFlagArenaInPsram | kFlagPreservesTensors
  StrView chip;
  StrView firmware_id;
  StrView model_id;          // first 16 hex digits of the model's SHA-256
  uint8_t n_inputs = 0;
  TensorDesc inputs[kMaxTensors];
  uint8_t n_outputs = 0;
  TensorDesc outputs[kMaxTensors];
  void pack(PayloadWriter& out) const;
  // A DEVICE_INFO with more than kMaxTensors tensors per direction is valid on the wire and is
  // accepted, but only the first kMaxTensors are kept.
  bool unpack(Bytes payload, ErrorText& error);
};

struct GetOps {
  uint16_t start = 0;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct OpsPage {
  uint16_t start = 0;
  uint8_t count = 0;
  Bytes names;  // `count` str8 entries back to back, as on the wire
  StrView name(uint8_t index) const;  // walks the entries; empty past the end
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct InputBegin {
  uint8_t tensor = 0;
  uint32_t total = 0;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct InputData {
  uint8_t tensor = 0;
  uint32_t offset = 0;
  Bytes data;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct Ack {
  uint8_t acked_type = 0;
  uint32_t value = 0;  // input bytes the device holds
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct Invoke {
  uint8_t flags = kInvokeProfile;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct GetTensor {
  uint16_t tensor = 0;  // index into the main subgraph's tensors, flatbuffer numbering
  uint32_t offset = 0;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct OutputData {
  uint8_t tensor = 0;
  uint32_t offset = 0;
  uint32_t total = 0;
  Bytes data;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct InvokeResult {
  uint32_t total_us = 0;
  uint64_t total_cycles = 0;
  uint16_t count = 0;  // 0 unless per-op timing was asked for
  U32Array op_us;
  U32Array op_cycles;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

// One chunk of a tensor, with its descriptor in every chunk (harness.protocol.TensorData).
struct TensorData {
  uint16_t tensor = 0;
  uint32_t offset = 0;
  uint32_t total = 0;
  TensorDesc desc;
  Bytes data;
  // Bytes before the data for this descriptor: kTensorDataHeader and the descriptor.
  static size_t header_size(const TensorDesc& desc);
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

struct ErrorMsg {
  uint16_t code = 0;
  StrView text;
  void pack(PayloadWriter& out) const;
  bool unpack(Bytes payload, ErrorText& error);
};

enum class MessageCheck : uint8_t { kValid, kUnknownType, kBadPayload };

// Unpacks a payload of any message type, for its verdict only: what the engine does with a
// frame before looking at what it asks for. The error text is Python's ProtocolError text.
MessageCheck check_message(uint8_t type, Bytes payload, ErrorText& error);

// How many op names from `start` fit one OPS payload of at most max_payload bytes (at most 255):
// harness.protocol.ops_page_capacity. name_at(i) gives op i.
template <typename NameAt>
uint8_t ops_page_capacity(NameAt&& name_at, uint16_t op_count, uint16_t start, size_t max_payload) {
  size_t used = 3;
  uint8_t count = 0;
  for (uint32_t index = start; index < op_count; ++index) {
    const StrView name = name_at(static_cast<uint16_t>(index));
    const size_t size = 1 + (name.size < kMaxStr8 ? name.size : kMaxStr8);
    if (used + size > max_payload || count == 255) break;
    used += size;
    ++count;
  }
  return count;
}

// --- framing -------------------------------------------------------------------------------------

struct Frame {
  uint8_t type = 0;
  uint8_t seq = 0;
  Bytes payload;
};

// Writes frames into a caller's buffer. The payload can be built in place (payload(), then
// finish()) so a reply is never copied twice.
class FrameEncoder {
 public:
  FrameEncoder(uint8_t* buffer, size_t capacity) : buffer_(buffer), capacity_(capacity) {}
  uint8_t* payload() { return buffer_ + kHeaderSize; }
  size_t payload_capacity() const;
  PayloadWriter writer() { return PayloadWriter(payload(), payload_capacity()); }
  // Frames the payload_size bytes at payload(); returns the frame size, 0 if it does not fit.
  size_t finish(uint8_t type, uint8_t seq, size_t payload_size);
  // Copies a payload in (it may already be at payload()) and frames it.
  size_t encode(uint8_t type, uint8_t seq, const uint8_t* payload, size_t size);
  const uint8_t* frame() const { return buffer_; }

 private:
  uint8_t* buffer_;
  size_t capacity_;
};

struct DecodeStats {
  uint32_t garbage_bytes = 0;
  uint32_t header_errors = 0;
  uint32_t crc_errors = 0;
  uint32_t oversize = 0;
  uint32_t idle_drops = 0;  // partial frames or thrown-away bytes ended by an idle gap
};

// Incremental frame parser with Python's FrameDecoder resynchronisation: bad header check,
// oversize length or bad CRC-32 drop one byte and the hunt for A5 5A starts again; bytes before a
// sync pair are garbage; a trailing A5 is kept as it may start a sync pair. The same bytes give
// the same frames and stats however they are split. A frame cut off for good is dropped by
// expire(), which the owner calls after kIdleGapMs without a byte: the decoder reads no clock.
// Memory: one frame buffer, never more.
//
//   while (size) { size_t n = d.feed(data, size); data += n; size -= n;
//                  Frame f; while (d.next(f)) handle(f); }
class FrameDecoder {
 public:
  // Frames longer than max_payload (clamped to kMaxPayload) count as oversize.
  explicit FrameDecoder(size_t max_payload = kMaxPayload);
  // Copies as much as fits and returns how much that was; after next() returned false there is
  // always room for at least one byte.
  size_t feed(const uint8_t* data, size_t size);
  // The same without a copy: read() straight into space(), then commit() what arrived.
  uint8_t* space(size_t& free);
  void commit(size_t size);
  // The next complete frame. Its payload points into the decoder and stays valid until the next
  // call of next(), feed(), space() or reset().
  bool next(Frame& frame);
  size_t pending() const { return end_ - start_ - returned_; }
  // Something since the last good frame was not a frame: bytes are held that do not make one yet,
  // or bytes were thrown away. After an idle gap this means a frame was lost.
  bool damaged() const { return damaged_ || pending() != 0; }
  // The line was idle for kIdleGapMs: drops what is held (counted as garbage, and one idle drop
  // when damaged()), returns how many bytes that was, and clears damaged(). Python's expire().
  size_t expire();
  const DecodeStats& stats() const { return stats_; }
  void reset();

 private:
  void drop_returned();
  void skip(size_t count);
  uint8_t buffer_[kMaxFrame];
  size_t max_payload_;
  size_t start_ = 0;
  size_t end_ = 0;
  size_t returned_ = 0;  // bytes of the frame last handed out, dropped on the next call
  bool damaged_ = false;
  DecodeStats stats_;
};

// --- the device engine ---------------------------------------------------------------------------

class Transport {
 public:
  virtual ~Transport() = default;
  virtual size_t read(uint8_t* dst, size_t max) = 0;       // non-blocking: 0 when nothing is there
  virtual void write(const uint8_t* src, size_t len) = 0;  // blocks until queued
};

struct InvokeTiming {
  uint32_t total_us = 0;
  uint64_t total_cycles = 0;
  uint16_t op_count = 0;
  const uint32_t* op_us = nullptr;      // op_count values; nullptr sends zeros
  const uint32_t* op_cycles = nullptr;  // op_count values; nullptr sends zeros
};

class Inference {
 public:
  virtual ~Inference() = default;
  // The model's input tensor memory, DeviceInfo::inputs[index].bytes() long. A synchronous engine
  // writes uploads straight into it, so it must stay put between INPUT_DATA and INVOKE; with a
  // Worker, the job copies the staged input in just before invoke().
  virtual uint8_t* input_buffer(uint8_t index) = 0;
  virtual const uint8_t* output_buffer(uint8_t index) = 0;
  // false: the host gets INVOKE_FAILED "invoke failed: <error>". `error` holds error_len bytes
  // and arrives zeroed; the engine NUL-terminates whatever is written. The timing arrays need
  // only last until the next invoke(): a job copies them out before it reports back.
  // `profile`: the host asked for per-op timing (INVOKE flag kInvokeProfile). Without it the
  // total must not include a profiler's own cost, so that latency runs measure the model alone.
  virtual bool invoke(bool profile, InvokeTiming& timing, char* error, size_t error_len) = 0;
  // With a Worker this is called on the link thread while invoke() may run on the worker, so it
  // must only read what never changes (the model's flatbuffer, a fixed table).
  virtual const char* op_name(uint16_t index) = 0;
  // Tensors of the main subgraph as the last invoke left it, for GET_TENSOR. Only a firmware whose
  // interpreter preserves every tensor (DeviceInfo kFlagPreservesTensors) can answer; the engine
  // calls these only when that flag is set, tensor() only with index < tensor_count(), and with a
  // Worker only while no job is in flight (the worker writes the arena the tensors live in).
  virtual uint16_t tensor_count() { return 0; }
  // false with `error` set (sent as TENSOR_UNAVAILABLE) when it cannot, for example a type the
  // protocol has no code for; else desc and data (data.size == desc.bytes(), data valid until the
  // next invoke()). Per-channel tensors give their first scale and zero point. The default writes
  // kNoPreservedTensorsText and returns false.
  virtual bool tensor(uint16_t index, TensorDesc& desc, Bytes& data, ErrorText& error);
};

// --- asynchronous inference (optional) ----------------------------------------------------------
//
// Without a Worker, poll() runs Inference::invoke() itself and the link stalls for the whole
// inference. With one, the engine hands each INVOKE to the worker (the other core, another
// thread) and goes on parsing, checking and storing the next input while the model runs, so the
// upload of input k+1 overlaps the inference of input k, and input k+1's inference overlaps the
// sending of result k.
//
// The wire stays byte for byte the synchronous engine's. Answers leave in request order: those
// to requests that arrive during an inference are held back until its answers are out. A request
// whose answer depends on how a running inference ends (INPUT_DATA without a new INPUT_BEGIN, an
// INVOKE before a new upload), or that finds no free buffer or job, is not handled until that is
// known; meanwhile the engine reads nothing, and the bytes wait in the transport's receive buffer.
// GET_TENSOR waits likewise until no job is in flight: the tensors live in the arena the worker
// writes, so it reads those of the last invoke, after that invoke's answers.

// One inference in flight: which staged inputs it reads, where its results go, and how it ended.
// The engine owns two; a Worker only calls run().
class InferenceJob {
 public:
  // Copies the staged inputs into the model, invokes it, and copies outputs and per-op timing out
  // of the model and profiler, so both are free for the next job as soon as this returns (a
  // synchronous job copies nothing). Runs on the worker; touches nothing but this job and the
  // Inference.
  void run();

 private:
  friend class Engine;
  Inference* inference_ = nullptr;
  const DeviceInfo* info_ = nullptr;
  uint8_t seq_ = 0;
  uint8_t flags_ = 0;
  // false (synchronous): inputs went straight into the model, and outputs and timing are sent
  // from the model's and the Inference's own memory before anything else runs.
  bool staged_ = false;
  uint8_t input_slot_[kMaxTensors] = {};
  const uint8_t* inputs_[kMaxTensors] = {};
  uint8_t* outputs_[kMaxTensors] = {};
  uint32_t* op_us_ = nullptr;
  uint32_t* op_cycles_ = nullptr;
  uint16_t op_capacity_ = 0;
  bool ok_ = false;
  bool finished_ = false;  // set by the engine when the worker hands the job back
  InvokeTiming timing_;
  char error_[kMaxStr8 + 1] = {};
};

// Where jobs run: implemented by the glue (a FreeRTOS task on the other core in the firmware, a
// std::thread in the native tests), so the engine itself needs no threads.
class Worker {
 public:
  virtual ~Worker() = default;
  // Queues job->run() on the worker and returns without waiting. The engine keeps at most two
  // jobs outstanding (submitted and not yet returned by finished()), so a queue of two never
  // blocks.
  virtual void submit(InferenceJob* job) = 0;
  // Never blocks: a job whose run() has returned and that was not returned before, else nullptr.
  // Everything run() wrote must be visible to the caller once the job is returned (a FreeRTOS
  // queue or a mutex gives that).
  virtual InferenceJob* finished() = 0;
};

// Memory for asynchronous inference, allocated by the glue (the engine has no heap). Two of
// everything: one input is uploaded into one set while the worker reads the other, and one
// result is sent from one set while the next inference writes the other.
struct StagingBuffers {
  uint8_t* inputs[2][kMaxTensors] = {};   // DeviceInfo::inputs[i].bytes() bytes each
  uint8_t* outputs[2][kMaxTensors] = {};  // DeviceInfo::outputs[i].bytes() bytes each
  uint32_t* op_us[2] = {};                // op_capacity values each
  uint32_t* op_cycles[2] = {};
  uint16_t op_capacity = 0;  // the most per-op timings one invoke reports (the model's op count)
};

// Answers held back while an inference runs: enough for the ACKs of several uploads. A request
// whose answer might not fit waits until the inference's answers are out.
constexpr size_t kDeferredAnswerBytes = 1024;

// Serves the protocol exactly as harness/board/device.py's DeviceEngine: same answers, same error
// codes and texts, same frames in the same order for the same requests and runtime results,
// whether inference runs synchronously or on a Worker.
//
// About 11 KB: make it a static or global object, not a local in a task with a small stack.
// `info` is copied; the strings it points to (and boot_error_text) must outlive the engine.
class Engine {
 public:
  // inference == nullptr means boot failed; boot_error_code != 0 then says why (a null inference
  // without a code reports MODEL_LOAD_FAILED). With a boot error, HELLO and every other valid
  // request are answered with it.
  Engine(Transport& transport, Inference* inference, const DeviceInfo& info, uint16_t boot_error_code = 0,
         const char* boot_error_text = nullptr);
  // Runs inferences on `worker` from now on, staging inputs and results in the memory `buffers`
  // points to (which must outlive the engine). Call it once, before the first poll(). false, and
  // the engine stays synchronous, when boot failed or a buffer the model needs is missing.
  bool use_worker(Worker& worker, const StagingBuffers& buffers);
  // Collects finished jobs and sends their answers, reads what the transport has (a bounded
  // amount per call), handles complete frames, writes the answers. Call it from the link's loop.
  // true when anything happened (bytes read, a job finished): a loop may sleep after false.
  // `now_ms` is the chip layer's clock in milliseconds (any origin, wrapping); it times the idle
  // gap, after which a frame the decoder holds is dropped and reported (ERROR BAD_FRAME). Time
  // spent waiting for the worker, when nothing is read, does not count as idle.
  bool poll(uint32_t now_ms);
  // The same for bytes that arrived another way; returns how many were taken, fewer than `size`
  // only while waiting_for_worker(). Call poll() (or idle()) too, so that the idle gap is seen.
  size_t receive(const uint8_t* data, size_t size, uint32_t now_ms);
  // Only the idle-gap check of poll(), for a loop that delivers bytes with receive().
  void idle(uint32_t now_ms);
  // The decoder holds something that an idle gap would drop: a loop that sleeps should wake
  // within kIdleGapMs / 2 to look.
  bool holding_partial_frame() const { return decoder_.damaged(); }
  // The idle gap, kIdleGapMs unless a test program sets another (the protocol fixes kIdleGapMs).
  void set_idle_gap_ms(uint32_t ms) { idle_gap_ms_ = ms; }
  uint32_t idle_gap_ms() const { return idle_gap_ms_; }
  // A request waits for a running inference to end: until then poll() reads nothing, and only a
  // finished job makes progress, so the loop may block on the worker.
  bool waiting_for_worker() const { return parked_; }
  // Jobs submitted whose answers are not all sent yet (0..2).
  size_t jobs_in_flight() const { return jobs_in_flight_; }
  const DecodeStats& decode_stats() const { return decoder_.stats(); }
  // The max_payload announced in DEVICE_INFO after clamping to [kMinPayload, kMaxPayload].
  size_t max_payload() const { return max_payload_; }

 private:
  bool collect();
  void flush();
  void check_idle(uint32_t now_ms);
  void drain();
  bool resume();
  // false: the frame cannot be handled yet (see above); nothing was changed or sent.
  bool handle(const Frame& frame);
  size_t answer_bound(uint8_t type) const;
  // Frames what `payload` wrote into tx_ and writes it; a payload that did not fit is not sent.
  void send(MsgType type, uint8_t seq, const PayloadWriter& payload);
  // Writes a frame, or holds it back behind the answers of jobs in flight.
  void emit(const uint8_t* frame, size_t size);
  PayloadWriter reply_writer();
#if defined(__GNUC__)
  __attribute__((format(printf, 4, 5)))
#endif
  void send_error(uint8_t seq, ErrorCode code, const char* fmt, ...);
  void send_error_text(uint8_t seq, uint16_t code, StrView text);
  void answer_hello(uint8_t seq, const Hello& hello);
  void answer_get_ops(uint8_t seq, const GetOps& request);
  bool answer_input_begin(uint8_t seq, const InputBegin& request);
  bool answer_input_data(uint8_t seq, const InputData& chunk);
  bool answer_invoke(uint8_t seq, const Invoke& request);
  void answer_get_tensor(uint8_t seq, const GetTensor& request);
  void answer_job(const InferenceJob& job, bool newest);
  bool input_in_use(uint8_t slot, uint8_t tensor) const;
  StrView op_name(uint16_t index) const;

  Transport& transport_;
  Inference* inference_;
  DeviceInfo info_;
  size_t max_payload_;
  size_t info_frame_bytes_ = 0;
  uint16_t boot_error_code_;
  StrView boot_error_text_;
  uint32_t received_[kMaxTensors] = {};
  // received_[i] is what it will be if the newest job fails; success makes it 0. Set for every
  // input when a job is submitted, cleared by that input's INPUT_BEGIN or by the job's answer.
  bool pending_[kMaxTensors] = {};
  Worker* worker_ = nullptr;
  StagingBuffers staging_;
  uint8_t input_slot_[kMaxTensors] = {};  // which staging set the next upload of input i goes to
  InferenceJob jobs_[2];
  uint8_t job_head_ = 0;  // the oldest job in flight; the other one, if any, is newer
  uint8_t jobs_in_flight_ = 0;
  // Held-back answers: [0, deferred_split_) go after the oldest job's answers, the rest after the
  // newer job's. With one job in flight the split is at the end.
  uint8_t deferred_[kDeferredAnswerBytes];
  size_t deferred_size_ = 0;
  size_t deferred_split_ = 0;
  bool direct_ = false;  // writing a finished job's answers: they go out at once
  bool parked_ = false;  // parked_frame_ waits for a job to end
  Frame parked_frame_;
  uint32_t last_rx_ms_ = 0;  // when bytes last arrived, or reading last resumed after a park
  uint32_t idle_gap_ms_ = kIdleGapMs;
  uint8_t last_seq_ = 0;     // of the last frame handled: a lost frame's seq is likely the next
  FrameDecoder decoder_;
  uint8_t tx_[kMaxFrame];
};

}  // namespace tinyhil
