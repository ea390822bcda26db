// The virtual board's `corrupt_op` fault (harness/board/faults.py): after operator N of the main
// subgraph runs, its output 0 is perturbed, deterministically, so a test can check that the
// divergence diagnosis names operator N. A fault of the virtual board only: the chip layer never
// includes this file, and the portable core knows nothing of it.
//
// It sits between the model runner and the op resolver. The interpreter keeps, per operator, the
// TFLMRegistration pointer the resolver returned; this resolver returns its own copies, whose
// invoke is a trampoline. A registration's invoke gets only (context, node), so the trampoline
// finds its copy again through the graph (the registration of the operator now running), and
// from the copy the original registration and this resolver.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/micro_context.h"
#include "tensorflow/lite/micro/micro_interpreter_graph.h"
#include "tensorflow/lite/micro/micro_op_resolver.h"
#include "tensorflow/lite/micro/micro_utils.h"

namespace tinyhil_host {

// How far a perturbed element moves: 32 steps of an 8-bit tensor's quantization (an eighth of
// its range), the same share of an int16 tensor's range. Every second element moves up, or down
// where up would leave the type's range, so that none is lost to saturation: a difference of
// exactly this many LSB, far beyond the 1 LSB that two correct builds may differ by.
constexpr int32_t kCorruptLsb8 = 32;
constexpr int32_t kCorruptLsb16 = kCorruptLsb8 * 256;

// Whether the fault can perturb a tensor of this TFLite schema type (read off the flatbuffer
// before boot, so that an unsupported choice is a boot error, not a silent no-op).
inline bool corruptible(int8_t schema_type) {
  return schema_type == 0 /* FLOAT32 */ || schema_type == 9 /* INT8 */ || schema_type == 3 /* UINT8 */ ||
         schema_type == 7 /* INT16 */;
}

template <typename T>
void shift_every_second(T* values, size_t count, int32_t lsb, int32_t high) {
  for (size_t i = 0; i < count; i += 2) {
    const int32_t value = static_cast<int32_t>(values[i]);
    values[i] = static_cast<T>(value + lsb <= high ? value + lsb : value - lsb);
  }
}

inline void corrupt_tensor(TfLiteEvalTensor* tensor) {
  if (tensor == nullptr || tensor->data.data == nullptr || tensor->dims == nullptr) return;
  const size_t count = static_cast<size_t>(tflite::ElementCount(*tensor->dims));
  switch (tensor->type) {
    case kTfLiteInt8: shift_every_second(tensor->data.int8, count, kCorruptLsb8, 127); break;
    case kTfLiteUInt8: shift_every_second(tensor->data.uint8, count, kCorruptLsb8, 255); break;
    case kTfLiteInt16: shift_every_second(tensor->data.i16, count, kCorruptLsb16, 32767); break;
    case kTfLiteFloat32:
      // Half the magnitude, and at least 0.5: a zero (a ReLU's) moves too.
      for (size_t i = 0; i < count; i += 2) {
        const float value = tensor->data.f[i];
        tensor->data.f[i] = value + 0.5f * (std::fabs(value) + 1.0f);
      }
      break;
    default: break;  // refused before boot (corruptible())
  }
}

class CorruptingOpResolver final : public tflite::MicroOpResolver {
 public:
  // `op_index`: the operator of the main subgraph whose output 0 is perturbed after every invoke.
  CorruptingOpResolver(const tflite::MicroOpResolver& inner, uint32_t op_index) : inner_(inner), target_(op_index) {}

  const TFLMRegistration* FindOp(tflite::BuiltinOperator op) const override { return wrap(inner_.FindOp(op)); }
  const TFLMRegistration* FindOp(const char* op) const override { return wrap(inner_.FindOp(op)); }
  tflite::TfLiteBridgeBuiltinParseFunction GetOpDataParser(tflite::BuiltinOperator op) const override {
    return inner_.GetOpDataParser(op);
  }

  // Invokes of the target seen, for the host layer's log.
  uint32_t corrupted() const { return corrupted_; }

 private:
  // Standard layout with the registration first: a pointer to `wrapped` is a pointer to the Slot.
  struct Slot {
    TFLMRegistration wrapped;
    const TFLMRegistration* original;
    const CorruptingOpResolver* owner;
  };
  static constexpr size_t kSlots = 256;  // distinct registrations: one per op type of the model

  // FindOp is const in MicroOpResolver; the copies are made on the first lookup of each op type,
  // during boot, on the one thread that boots.
  const TFLMRegistration* wrap(const TFLMRegistration* original) const {
    if (original == nullptr) return nullptr;
    for (size_t i = 0; i < used_; ++i) {
      if (slots_[i].original == original) return &slots_[i].wrapped;
    }
    if (used_ == kSlots) return nullptr;  // the runner then names the op as unregistered
    Slot& slot = slots_[used_++];
    slot.wrapped = *original;
    slot.wrapped.invoke = original->invoke != nullptr ? &CorruptingOpResolver::trampoline : nullptr;
    slot.original = original;
    slot.owner = this;
    return &slot.wrapped;
  }

  static TfLiteStatus trampoline(TfLiteContext* context, TfLiteNode* node) {
    // MicroInterpreterContext's graph is the interpreter's MicroInterpreterGraph, which records the
    // operator it is invoking (and restores it when a control-flow body returns).
    auto& graph = static_cast<tflite::MicroInterpreterGraph&>(tflite::GetMicroContext(context)->graph());
    const int subgraph = graph.GetCurrentSubgraphIndex();
    const int op = graph.GetCurrentOperatorIndex();
    const TFLMRegistration* registration = graph.GetAllocations()[subgraph].node_and_registrations[op].registration;
    const Slot* slot = reinterpret_cast<const Slot*>(registration);
    return slot->owner->invoke(*slot, context, node, op);
  }

  // Only invokes entered at depth 0 are operators of the main subgraph: a control-flow operator
  // (IF, WHILE, CALL_ONCE) invokes its body's registrations from inside its own invoke.
  TfLiteStatus invoke(const Slot& slot, TfLiteContext* context, TfLiteNode* node, int op) const {
    const bool top_level = depth_ == 0;
    ++depth_;
    const TfLiteStatus status = slot.original->invoke(context, node);
    --depth_;
    if (status == kTfLiteOk && top_level && static_cast<uint32_t>(op) == target_) {
      corrupt_tensor(tflite::micro::GetEvalOutput(context, node, 0));
      ++corrupted_;
    }
    return status;
  }

  const tflite::MicroOpResolver& inner_;
  uint32_t target_;
  mutable Slot slots_[kSlots] = {};
  mutable size_t used_ = 0;
  mutable uint32_t depth_ = 0;
  mutable uint32_t corrupted_ = 0;
};

}  // namespace tinyhil_host
