// tinyhil model runner: TFLite Micro behind the protocol engine's Inference interface.
//
// Portable like the protocol engine: no ESP-IDF, FreeRTOS or OS headers. The chip layer
// (firmware/src/main.cpp) and the host layer of the virtual board (firmware/host/main.cpp) give
// it a Clock, an op resolver and memory; everything that touches the interpreter is here, so the
// code the virtual board runs is the code the chip runs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_op_resolver.h"
#include "tensorflow/lite/micro/micro_profiler_interface.h"
#include "tensorflow/lite/micro/micro_resource_variable.h"
#include "tinyhil_protocol.h"

// esp-tflite-micro compiles TFLM with TF_LITE_STATIC_MEMORY, which changes TfLiteTensor's
// layout. Code built without it reads every tensor at the wrong offsets (a crash at boot was seen
// in a native build). ESP-IDF passes it on only to components that REQUIRE esp-tflite-micro.
#ifndef TF_LITE_STATIC_MEMORY
#error "TF_LITE_STATIC_MEMORY is not defined: this component must REQUIRE esp-tflite-micro (firmware/components/tinyhil/CMakeLists.txt), or the native build must pass -DTF_LITE_STATIC_MEMORY"
#endif

namespace tinyhil {

// The chip layer's time sources. Read on the core that runs Invoke(): the S3's cycle counter is
// per core.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t micros() = 0;
  virtual uint32_t cycles() = 0;  // free-running, wraps (17.9 s at 240 MHz)
};

// Times the operators of the main subgraph, in their execution order.
//
// TFLM opens one profiler event per operator invoke, in every subgraph: the operators of an IF,
// WHILE or CALL_ONCE body run, with their own events, inside the event of the operator that
// called them. Counting every event would shift the main graph's timings by the body's operator
// count, so only top-level events are recorded; a body's time is part of its caller's.
//
// Disarmed (an invoke without per-op timing), each event costs one virtual call and a branch, so
// a latency run measures the model, not the profiler.
class OpProfiler : public tflite::MicroProfilerInterface {
 public:
  OpProfiler(Clock& clock, uint32_t* op_us, uint32_t* op_cycles, uint16_t capacity)
      : clock_(clock), op_us_(op_us), op_cycles_(op_cycles), capacity_(capacity) {}

  // Before each Invoke(): zeroes the timings when armed.
  void arm(bool enabled);
  uint32_t BeginEvent(const char* tag) override;
  void EndEvent(uint32_t event_handle) override;

  // Top-level events seen since arm(true); the main subgraph's operator count after a whole
  // Invoke().
  uint16_t top_level_events() const { return events_; }
  const uint32_t* op_us() const { return op_us_; }
  const uint32_t* op_cycles() const { return op_cycles_; }

 private:
  static constexpr uint32_t kNotRecorded = 0xFFFFFFFFu;
  Clock& clock_;
  uint32_t* op_us_;
  uint32_t* op_cycles_;
  uint16_t capacity_;
  bool armed_ = false;
  uint16_t events_ = 0;
  uint16_t depth_ = 0;
  int64_t start_us_ = 0;
  uint32_t start_cycles_ = 0;
};

// What the chip layer provides. The arena is 16-byte aligned; the timing arrays hold one value
// per operator of the main subgraph.
struct RunnerMemory {
  uint8_t* arena = nullptr;
  size_t arena_bytes = 0;
  uint32_t* op_us = nullptr;
  uint32_t* op_cycles = nullptr;
  uint16_t op_capacity = 0;
  // The debug build (DeviceInfo flag kFlagPreservesTensors): TFLM's linear memory planner gives
  // every tensor of the model its own place in the arena instead of reusing memory between tensors
  // whose lifetimes do not overlap, so each intermediate tensor still holds what the last invoke
  // wrote when the host reads it (GET_TENSOR). The arena must be sized for it
  // (harness/firmware.py plan_debug_firmware); the kernels and their results are the same.
  bool preserve_all_tensors = false;
};

// Operators of the main subgraph (what per-op timings and OPS pages count).
uint16_t main_graph_operator_count(const tflite::Model* model);
// VAR_HANDLE operators in all subgraphs: each creates one resource variable.
int resource_variable_count(const tflite::Model* model);
// The operator's builtin name ("CONV_2D") or custom code; "?" past the end.
const char* operator_name(const tflite::Model* model, uint32_t subgraph, uint32_t index);

class ModelRunner : public Inference {
 public:
  ModelRunner(Clock& clock, const RunnerMemory& memory);

  // Everything the firmware's boot does with the model: schema check, every operator of every
  // subgraph registered, arena, resource variables, AllocateTensors(), and the DeviceInfo fields
  // that come from the model (tensors, arena use, op count). 0, or an ErrorCode with `error` set.
  uint16_t boot(const uint8_t* model_data, const tflite::MicroOpResolver& resolver, DeviceInfo& info,
                ErrorText& error);

  uint8_t* input_buffer(uint8_t index) override;
  const uint8_t* output_buffer(uint8_t index) override;
  bool invoke(bool profile, InvokeTiming& timing, char* error, size_t error_len) override;
  const char* op_name(uint16_t index) override;
  // Tensors of the main subgraph, numbered as in the model, as the last invoke left them; only
  // the debug build keeps them (0 and an error otherwise). Variable tensors (recurrent state) read
  // as zero: invoke() resets them after every sample.
  uint16_t tensor_count() override;
  bool tensor(uint16_t index, TensorDesc& desc, Bytes& data, ErrorText& error) override;

 private:
  uint16_t check_resolver(const tflite::MicroOpResolver& resolver, ErrorText& error) const;
  uint16_t describe(DeviceInfo& info, ErrorText& error);

  Clock& clock_;
  RunnerMemory memory_;
  OpProfiler profiler_;
  const tflite::Model* model_ = nullptr;
  tflite::MicroInterpreter* interpreter_ = nullptr;
  uint16_t op_count_ = 0;
  uint16_t tensor_count_ = 0;  // of the main subgraph
  // No heap: the interpreter lives here, the allocator and resource variables in the arena.
  alignas(tflite::MicroInterpreter) uint8_t interpreter_storage_[sizeof(tflite::MicroInterpreter)] = {};
};

}  // namespace tinyhil
