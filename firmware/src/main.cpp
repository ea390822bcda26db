// tinyhil firmware: the Arduino/TFLite Micro glue around the portable protocol engine.
//
// Everything protocol-shaped lives in lib/tinyhil_protocol (tested natively by `make test`); this
// file only connects it to the USB port, the interpreter, the clock and the two cores.
// model_config.h and model_data.cpp are generated per model by harness/firmware.py.
//
// Two tasks: the link (engine) on core 0 and inference on core 1, handing jobs over through two
// FreeRTOS queues. While core 1 runs Invoke() for sample k, core 0 keeps reading, checking and
// staging sample k+1 and sending result k-1, so the link never waits for the model and the
// model never waits for the link. Core 0 is the link's because the USB/UART interrupt is
// allocated on the core that calls begin(), next to the few system tasks of a WiFi-less ESP-IDF
// (esp_timer, IPC); that leaves core 1 to the model alone, with nothing but the tick interrupt to
// disturb the measured latency. A single-core build (CONFIG_FREERTOS_UNICORE) runs the engine
// synchronously instead.
//
// Not compiled for the ESP32-S3 in this project's CI (no Xtensa toolchain there): written against
// Arduino-ESP32 2.x (espressif32 @ 6.9.0) and esp-tflite-micro 1.3.4, and unverified on hardware.

#include <Arduino.h>

#include <cstring>

#include "esp_heap_caps.h"
#include "esp_timer.h"
#include "freertos/FreeRTOS.h"
#include "freertos/queue.h"
#include "freertos/task.h"
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
// count (nested subgraphs) are not recorded. Only the inference task touches it; each job copies
// the arrays out before the next Invoke() clears them.
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

#if defined(CONFIG_FREERTOS_UNICORE) && CONFIG_FREERTOS_UNICORE
#define TINYHIL_TWO_CORES 0
#else
#define TINYHIL_TWO_CORES 1
#endif

constexpr BaseType_t kLinkCore = 0;
constexpr BaseType_t kInferenceCore = 1;
// Above Arduino's loopTask (1); each task is alone on its core apart from system tasks.
constexpr UBaseType_t kTaskPriority = 5;
// Invoke() used to run in Arduino's 8 KB loopTask; TFLM does not document kernel stack use, so
// the inference task gets margin. On one core the link task runs Invoke() itself.
constexpr uint32_t kInferenceStackBytes = 16384;
constexpr uint32_t kLinkStackBytes = TINYHIL_TWO_CORES ? 8192 : 16384;
// The host keeps up to four frames unanswered (harness/board/link.py). They wait here whenever the
// engine cannot take them yet: a request that waits for an inference's outcome, or both staging
// sets in use.
constexpr size_t kRxBufferBytes = 4 * tinyhil::kMaxFrame;
// Staging buffers go to internal SRAM only while this much stays free for what is allocated after
// them (the link's receive buffer, USB/UART driver buffers) and the system; else to PSRAM, where a
// copy costs more but nothing else has to give way.
constexpr size_t kInternalHeadroom = kRxBufferBytes + 16 * 1024;

class TflmInference : public tinyhil::Inference {
 public:
  TflmInference(const tflite::Model* model, tflite::MicroInterpreter* interpreter, OpProfiler* profiler)
      : model_(model), interpreter_(interpreter), profiler_(profiler) {}

  uint8_t* input_buffer(uint8_t index) override { return interpreter_->input(index)->data.uint8; }
  const uint8_t* output_buffer(uint8_t index) override { return interpreter_->output(index)->data.uint8; }

  // Runs on the inference task, pinned to one core: the cycle counter (CCOUNT) is per core, so
  // start and end must be read on the same one.
  bool invoke(tinyhil::InvokeTiming& timing, char* error, size_t error_len) override {
    profiler_->Clear();
    const int64_t start_us = esp_timer_get_time();
    const uint32_t start_cycles = ESP.getCycleCount();
    const TfLiteStatus status = interpreter_->Invoke();
    timing.total_cycles = ESP.getCycleCount() - start_cycles;
    timing.total_us = static_cast<uint32_t>(esp_timer_get_time() - start_us);
    // Recurrent state must not leak into the next sample (the reference interpreters start every
    // sample from zero). Reset right after Invoke, inside the same job: the next job may already
    // be queued, and its input is copied into the input tensor only after this returns. Reset()
    // clears variable tensors and kernel state, not the output tensors the job copies next.
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

// The engine's Worker: a task pinned to kInferenceCore. The queues carry job pointers both ways;
// their internal locking orders the job's writes on one core before the reads on the other (the
// S3's two cores also share one data cache, so PSRAM staging needs no cache maintenance).
class FreeRtosWorker : public tinyhil::Worker {
 public:
  // false when FreeRTOS could not create the queues or the task (no internal memory left).
  bool start() {
    // Two of each: the engine never has more than two jobs outstanding, so neither send blocks.
    submitted_ = xQueueCreate(2, sizeof(tinyhil::InferenceJob*));
    finished_ = xQueueCreate(2, sizeof(tinyhil::InferenceJob*));
    if (submitted_ == nullptr || finished_ == nullptr) return false;
    return xTaskCreatePinnedToCore(&FreeRtosWorker::serve, "tinyhil-infer", kInferenceStackBytes, this,
                                   kTaskPriority, nullptr, kInferenceCore) == pdPASS;
  }

  void submit(tinyhil::InferenceJob* job) override { xQueueSend(submitted_, &job, portMAX_DELAY); }

  tinyhil::InferenceJob* finished() override {
    tinyhil::InferenceJob* job = nullptr;
    return xQueueReceive(finished_, &job, 0) == pdTRUE ? job : nullptr;
  }

  // Blocks the link task until a job has finished (without taking it) or `ticks` have passed.
  void wait(TickType_t ticks) {
    tinyhil::InferenceJob* job = nullptr;
    xQueuePeek(finished_, &job, ticks);
  }

 private:
  static void serve(void* arg) {
    auto* self = static_cast<FreeRtosWorker*>(arg);
    for (;;) {
      tinyhil::InferenceJob* job = nullptr;
      if (xQueueReceive(self->submitted_, &job, portMAX_DELAY) != pdTRUE) continue;
      job->run();
      xQueueSend(self->finished_, &job, portMAX_DELAY);
    }
  }

  QueueHandle_t submitted_ = nullptr;
  QueueHandle_t finished_ = nullptr;
};

StreamTransport transport(TINYHIL_PORT);
OpProfiler profiler;
TinyhilOpResolver resolver;
tinyhil::DeviceInfo info;
alignas(tflite::MicroInterpreter) uint8_t interpreter_storage[sizeof(tflite::MicroInterpreter)];
alignas(TflmInference) uint8_t inference_storage[sizeof(TflmInference)];
alignas(tinyhil::Engine) uint8_t engine_storage[sizeof(tinyhil::Engine)];
tinyhil::Engine* engine = nullptr;
char boot_error[160] = {};
#if TINYHIL_TWO_CORES
FreeRtosWorker worker;
tinyhil::StagingBuffers staging;
// Per-op timings of the two jobs: copied out of the profiler before the next Invoke clears it.
uint32_t staged_op_us[2][TINYHIL_OP_COUNT];
uint32_t staged_op_cycles[2][TINYHIL_OP_COUNT];
#endif

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
  // The engine checks uploads against the descriptors; staging is sized from them; Invoke()
  // reads the tensor. All three must agree.
  for (uint8_t i = 0; i < info.n_inputs; ++i) {
    if (info.inputs[i].bytes() != interpreter->input(i)->bytes) {
      snprintf(boot_error, sizeof(boot_error), "input %u: protocol descriptor says %lu bytes, TfLiteTensor::bytes %u",
               static_cast<unsigned>(i), static_cast<unsigned long>(info.inputs[i].bytes()),
               static_cast<unsigned>(interpreter->input(i)->bytes));
      return static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
    }
  }
  *inference = new (inference_storage) TflmInference(model, interpreter, &profiler);
  return 0;
}

#if TINYHIL_TWO_CORES
// One staging buffer, internal SRAM first (see kInternalHeadroom); nullptr with boot_error set
// when neither region has room.
uint8_t* staging_alloc(size_t bytes, const char* what, int set, int index) {
  const uint32_t internal = MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT;
  const uint32_t psram = MALLOC_CAP_SPIRAM | MALLOC_CAP_8BIT;
  void* buffer = nullptr;
  if (heap_caps_get_largest_free_block(internal) >= bytes + kInternalHeadroom) {
    buffer = heap_caps_aligned_alloc(16, bytes, internal);
  }
  if (buffer == nullptr) buffer = heap_caps_aligned_alloc(16, bytes, psram);
  if (buffer == nullptr) {
    snprintf(boot_error, sizeof(boot_error),
             "heap_caps_malloc(%u) for staging %s %d of set %d failed: internal SRAM has %u bytes free "
             "(%u kept back), PSRAM %u",
             static_cast<unsigned>(bytes), what, index, set,
             static_cast<unsigned>(heap_caps_get_largest_free_block(internal)),
             static_cast<unsigned>(kInternalHeadroom), static_cast<unsigned>(heap_caps_get_largest_free_block(psram)));
  }
  return static_cast<uint8_t*>(buffer);
}

// Two input sets, sized from the model (27,648 bytes each for a 96x96x3 int8 image), two output
// sets and two timing sets, then the inference task.
uint16_t start_worker() {
  for (int set = 0; set < 2; ++set) {
    for (uint8_t i = 0; i < info.n_inputs; ++i) {
      const uint32_t bytes = info.inputs[i].bytes();
      if (bytes != 0 && (staging.inputs[set][i] = staging_alloc(bytes, "input", set, i)) == nullptr) {
        return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
      }
    }
    for (uint8_t i = 0; i < info.n_outputs; ++i) {
      const uint32_t bytes = info.outputs[i].bytes();
      if (bytes != 0 && (staging.outputs[set][i] = staging_alloc(bytes, "output", set, i)) == nullptr) {
        return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
      }
    }
    staging.op_us[set] = staged_op_us[set];
    staging.op_cycles[set] = staged_op_cycles[set];
  }
  staging.op_capacity = TINYHIL_OP_COUNT;
  if (!worker.start()) {
    snprintf(boot_error, sizeof(boot_error),
             "xTaskCreatePinnedToCore(%u-byte stack) for the inference task on core %d failed: internal SRAM has %u "
             "bytes free",
             static_cast<unsigned>(kInferenceStackBytes), static_cast<int>(kInferenceCore),
             static_cast<unsigned>(heap_caps_get_largest_free_block(MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT)));
    return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }
  return 0;
}
#endif

// Serves the link on kLinkCore. begin() runs here, not in setup(), so that the port's interrupt
// is allocated on this core and does not interrupt inference on the other.
void link_task(void* /*arg*/) {
  TINYHIL_PORT.setRxBufferSize(kRxBufferBytes);
  TINYHIL_PORT.begin(TINYHIL_UART_BAUD);
  for (;;) {
    if (engine->poll()) continue;
    // Nothing arrived and no job finished. Block instead of spinning, so core 0's idle task runs
    // (the task watchdog checks it): a finished job wakes the link at once; new bytes are looked
    // for after one tick (1 ms, CONFIG_FREERTOS_HZ=1000), which the receive buffer absorbs. A
    // request that waits for a job needs only the job.
#if TINYHIL_TWO_CORES
    worker.wait(engine->waiting_for_worker() ? pdMS_TO_TICKS(100) : 1);
#else
    vTaskDelay(1);
#endif
  }
}

}  // namespace

void setup() {
  setCpuFrequencyMhz(TINYHIL_CPU_MHZ);
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
  uint16_t error = boot(&inference);
#if TINYHIL_TWO_CORES
  if (error == 0) error = start_worker();
#endif
  engine = new (engine_storage) tinyhil::Engine(transport, error ? nullptr : inference, info, error,
                                                error ? boot_error : nullptr);
#if TINYHIL_TWO_CORES
  // Refused only for a missing buffer, which start_worker() already reported as a boot error; the
  // engine would then stay synchronous and still answer correctly.
  if (error == 0) engine->use_worker(worker, staging);
#endif
  if (xTaskCreatePinnedToCore(&link_task, "tinyhil-link", kLinkStackBytes, nullptr, kTaskPriority, nullptr,
                              kLinkCore) != pdPASS) {
    // Without the link task nothing could report anything: serve the link from loopTask instead.
    link_task(nullptr);
  }
}

// setup() handed everything to the link and inference tasks; loopTask only held its stack.
void loop() { vTaskDelete(nullptr); }
