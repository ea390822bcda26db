// tinyhil firmware: the Arduino/TFLite Micro glue around the portable protocol engine.
//
// Everything protocol-shaped lives in lib/tinyhil_protocol (tested natively by `make test`); this
// file only connects it to the USB port, the interpreter and the clock. model_config.h and
// model_data.cpp are generated per model by harness/firmware.py.

#include <Arduino.h>

#include <cstring>

#include "esp_heap_caps.h"
#include "esp_timer.h"
#include "model_config.h"
#include "model_data.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_profiler_interface.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "tensorflow/lite/schema/schema_utils.h"
#include "tinyhil_protocol.h"

namespace {

// Sized to the model's operator count: the stock MicroProfiler keeps 4096 events (about 80 KB).
// TFLM opens one event per operator invoke, in execution order; events past the model's operator
// count (nested subgraphs) are not recorded.
class OpProfiler : public tflite::MicroProfilerInterface {
 public:
  uint32_t BeginEvent(const char* /*tag*/) override {
    if (count_ >= TINYHIL_OP_COUNT) return kDropped;
    start_us_[count_] = esp_timer_get_time();
    start_cycles_[count_] = ESP.getCycleCount();
    return count_++;
  }

  void EndEvent(uint32_t handle) override {
    if (handle >= TINYHIL_OP_COUNT) return;
    const uint32_t cycles = ESP.getCycleCount() - start_cycles_[handle];  // wraps after 17 s at 240 MHz
    op_us_[handle] = static_cast<uint32_t>(esp_timer_get_time() - start_us_[handle]);
    op_cycles_[handle] = cycles;
  }

  void Clear() {
    count_ = 0;
    memset(op_us_, 0, sizeof(op_us_));
    memset(op_cycles_, 0, sizeof(op_cycles_));
  }

  const uint32_t* op_us() const { return op_us_; }
  const uint32_t* op_cycles() const { return op_cycles_; }

 private:
  static constexpr uint32_t kDropped = 0xFFFFFFFFu;
  uint32_t count_ = 0;
  int64_t start_us_[TINYHIL_OP_COUNT] = {};
  uint32_t start_cycles_[TINYHIL_OP_COUNT] = {};
  uint32_t op_us_[TINYHIL_OP_COUNT] = {};
  uint32_t op_cycles_[TINYHIL_OP_COUNT] = {};
};

// The link: the native USB port (USB Serial/JTAG with ARDUINO_USB_MODE=1, baud ignored) or UART0
// through the board's USB-serial bridge, at the suite's baud rate.
#if TINYHIL_LINK_UART
#define TINYHIL_PORT Serial0
#else
#define TINYHIL_PORT Serial
#endif

class StreamTransport : public tinyhil::Transport {
 public:
  explicit StreamTransport(Stream& stream) : stream_(stream) {}
  size_t read(uint8_t* dst, size_t max) override {
    const int available = stream_.available();
    if (available <= 0) return 0;
    return stream_.readBytes(dst, static_cast<size_t>(available) < max ? static_cast<size_t>(available) : max);
  }
  void write(const uint8_t* src, size_t len) override {
    while (len > 0) {
      const size_t written = stream_.write(src, len);
      src += written;
      len -= written;
      if (written == 0) delay(1);  // host not reading yet: wait instead of dropping a frame
    }
  }

 private:
  Stream& stream_;
};

class TflmInference : public tinyhil::Inference {
 public:
  TflmInference(const tflite::Model* model, tflite::MicroInterpreter* interpreter, OpProfiler* profiler)
      : model_(model), interpreter_(interpreter), profiler_(profiler) {}

  uint8_t* input_buffer(uint8_t index) override { return interpreter_->input(index)->data.uint8; }
  const uint8_t* output_buffer(uint8_t index) override { return interpreter_->output(index)->data.uint8; }

  bool invoke(tinyhil::InvokeTiming& timing, char* error, size_t error_len) override {
    profiler_->Clear();
    const int64_t start_us = esp_timer_get_time();
    const uint32_t start_cycles = ESP.getCycleCount();
    const TfLiteStatus status = interpreter_->Invoke();
    timing.total_cycles = ESP.getCycleCount() - start_cycles;
    timing.total_us = static_cast<uint32_t>(esp_timer_get_time() - start_us);
    // Recurrent state must not leak into the next sample (the reference interpreters start every
    // sample from zero). Reset after, not before, Invoke: the next input is already being
    // uploaded into the input tensor by then, and Reset() must not race it.
    interpreter_->Reset();
    if (status != kTfLiteOk) {
      snprintf(error, error_len, "MicroInterpreter::Invoke() returned %d", static_cast<int>(status));
      return false;
    }
    timing.op_count = TINYHIL_OP_COUNT;
    timing.op_us = profiler_->op_us();
    timing.op_cycles = profiler_->op_cycles();
    return true;
  }

  const char* op_name(uint16_t index) override {
    const auto* operators = model_->subgraphs()->Get(0)->operators();
    if (index >= operators->size()) return "?";
    const auto* code = model_->operator_codes()->Get(operators->Get(index)->opcode_index());
    const tflite::BuiltinOperator builtin = tflite::GetBuiltinCode(code);
    if (builtin == tflite::BuiltinOperator_CUSTOM && code->custom_code() != nullptr) {
      return code->custom_code()->c_str();
    }
    return tflite::EnumNameBuiltinOperator(builtin);
  }

 private:
  const tflite::Model* model_;
  tflite::MicroInterpreter* interpreter_;
  OpProfiler* profiler_;
};

// The wire protocol numbers tensor types as the TFLite schema's TensorType; TfLiteType differs
// (kTfLiteFloat32 is 1, TensorType_FLOAT32 is 0), so map explicitly and refuse the rest.
bool describe(const TfLiteTensor* tensor, tinyhil::TensorDesc& desc) {
  switch (tensor->type) {
    case kTfLiteFloat32: desc.dtype = static_cast<uint8_t>(tinyhil::DType::kFloat32); break;
    case kTfLiteInt32: desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt32); break;
    case kTfLiteUInt8: desc.dtype = static_cast<uint8_t>(tinyhil::DType::kUInt8); break;
    case kTfLiteInt16: desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt16); break;
    case kTfLiteInt8: desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt8); break;
    default: return false;
  }
  if (tensor->dims->size > static_cast<int>(tinyhil::kMaxRank)) return false;
  desc.rank = static_cast<uint8_t>(tensor->dims->size);
  for (int i = 0; i < tensor->dims->size; ++i) desc.dims[i] = static_cast<uint32_t>(tensor->dims->data[i]);
  desc.scale = tensor->params.scale;
  desc.zero_point = tensor->params.zero_point;
  return true;
}

StreamTransport transport(TINYHIL_PORT);
OpProfiler profiler;
TinyhilOpResolver resolver;
tinyhil::DeviceInfo info;
alignas(tflite::MicroInterpreter) uint8_t interpreter_storage[sizeof(tflite::MicroInterpreter)];
alignas(TflmInference) uint8_t inference_storage[sizeof(TflmInference)];
alignas(tinyhil::Engine) uint8_t engine_storage[sizeof(tinyhil::Engine)];
tinyhil::Engine* engine = nullptr;
char boot_error[160] = {};

// Everything a boot can fail at becomes the board's boot error: the engine then answers HELLO
// and every request with it, so the host reports why instead of timing out.
uint16_t boot(tinyhil::Inference** inference) {
  const tflite::Model* model = tflite::GetModel(tinyhil_model);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    snprintf(boot_error, sizeof(boot_error), "model schema version %lu, firmware supports %d",
             static_cast<unsigned long>(model->version()), TFLITE_SCHEMA_VERSION);
    return static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  }
  if (!tinyhil_register_ops(resolver)) {
    snprintf(boot_error, sizeof(boot_error), "op resolver rejected a registration (%d op types)", TINYHIL_OP_TYPES);
    return static_cast<uint16_t>(tinyhil::ErrorCode::kUnsupportedOp);
  }
  const uint32_t caps = TINYHIL_ARENA_IN_PSRAM ? (MALLOC_CAP_SPIRAM | MALLOC_CAP_8BIT)
                                               : (MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT);
  uint8_t* arena = static_cast<uint8_t*>(heap_caps_aligned_alloc(16, TINYHIL_ARENA_BYTES, caps));
  if (arena == nullptr) {
    snprintf(boot_error, sizeof(boot_error), "heap_caps_malloc(%d) for the tensor arena failed: %s has %u bytes free",
             TINYHIL_ARENA_BYTES, TINYHIL_ARENA_IN_PSRAM ? "PSRAM" : "internal SRAM",
             static_cast<unsigned>(heap_caps_get_largest_free_block(caps)));
    return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }
  auto* interpreter = new (interpreter_storage)
      tflite::MicroInterpreter(model, resolver, arena, TINYHIL_ARENA_BYTES, nullptr, &profiler);
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    snprintf(boot_error, sizeof(boot_error), "AllocateTensors() failed with a %d-byte arena", TINYHIL_ARENA_BYTES);
    return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }
  info.arena_used = static_cast<uint32_t>(interpreter->arena_used_bytes());
  if (interpreter->inputs_size() > tinyhil::kMaxTensors || interpreter->outputs_size() > tinyhil::kMaxTensors) {
    snprintf(boot_error, sizeof(boot_error), "model has %u inputs and %u outputs; the protocol carries at most %u each",
             static_cast<unsigned>(interpreter->inputs_size()), static_cast<unsigned>(interpreter->outputs_size()),
             static_cast<unsigned>(tinyhil::kMaxTensors));
    return static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  }
  info.n_inputs = static_cast<uint8_t>(interpreter->inputs_size());
  info.n_outputs = static_cast<uint8_t>(interpreter->outputs_size());
  bool described = true;
  for (uint8_t i = 0; i < info.n_inputs; ++i) described &= describe(interpreter->input(i), info.inputs[i]);
  for (uint8_t i = 0; i < info.n_outputs; ++i) described &= describe(interpreter->output(i), info.outputs[i]);
  if (!described) {
    snprintf(boot_error, sizeof(boot_error), "an input or output tensor has a type or rank the protocol cannot carry");
    return static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  }
  *inference = new (inference_storage) TflmInference(model, interpreter, &profiler);
  return 0;
}

}  // namespace

void setup() {
  setCpuFrequencyMhz(TINYHIL_CPU_MHZ);
  // The host keeps up to four frames unanswered (harness/board/link.py); they wait here while
  // Invoke() runs, so the next input's upload overlaps this inference without UART overruns.
  TINYHIL_PORT.setRxBufferSize(4 * tinyhil::kMaxFrame);
  TINYHIL_PORT.begin(TINYHIL_UART_BAUD);
  info.board_kind = tinyhil::kBoardReal;
  info.cpu_mhz = static_cast<uint16_t>(getCpuFrequencyMhz());
  info.sram_bytes = TINYHIL_SRAM_BYTES;
  info.psram_bytes = ESP.getPsramSize();
  info.flash_bytes = TINYHIL_FLASH_APP_BYTES;
  info.arena_size = TINYHIL_ARENA_BYTES;
  info.op_count = TINYHIL_OP_COUNT;
  info.flags = (TINYHIL_ESP_NN ? tinyhil::kFlagEspNn : 0) | (TINYHIL_ARENA_IN_PSRAM ? tinyhil::kFlagArenaInPsram : 0);
  info.chip = tinyhil::StrView(ESP.getChipModel());
  info.firmware_id = tinyhil::StrView(TINYHIL_FIRMWARE_ID);
  info.model_id = tinyhil::StrView(TINYHIL_MODEL_ID);
  tinyhil::Inference* inference = nullptr;
  const uint16_t error = boot(&inference);
  engine = new (engine_storage) tinyhil::Engine(transport, error ? nullptr : inference, info, error,
                                                error ? boot_error : nullptr);
}

void loop() { engine->poll(); }
