// tinyhil model runner (model_runner.h).
#include "model_runner.h"

#include <cstdio>
#include <cstring>
#include <new>

#include "tensorflow/lite/schema/schema_generated.h"
#include "tensorflow/lite/schema/schema_utils.h"

namespace tinyhil {

void OpProfiler::arm(bool enabled) {
  armed_ = enabled;
  events_ = 0;
  depth_ = 0;
  if (enabled) {
    std::memset(op_us_, 0, sizeof(uint32_t) * capacity_);
    std::memset(op_cycles_, 0, sizeof(uint32_t) * capacity_);
  }
}

uint32_t OpProfiler::BeginEvent(const char* /*tag*/) {
  if (!armed_) return kNotRecorded;
  if (depth_++ != 0) return kNotRecorded;  // inside a control-flow operator's body
  const uint16_t index = events_;
  if (events_ != UINT16_MAX) ++events_;
  if (index >= capacity_) return kNotRecorded;  // more events than operators: invoke() reports it
  start_us_ = clock_.micros();
  start_cycles_ = clock_.cycles();
  return index;
}

void OpProfiler::EndEvent(uint32_t event_handle) {
  if (!armed_) return;
  if (depth_ != 0) --depth_;
  if (event_handle >= capacity_) return;
  const uint32_t cycles = clock_.cycles() - start_cycles_;
  op_us_[event_handle] = static_cast<uint32_t>(clock_.micros() - start_us_);
  op_cycles_[event_handle] = cycles;
}

uint16_t main_graph_operator_count(const tflite::Model* model) {
  const auto* subgraphs = model->subgraphs();
  if (subgraphs == nullptr || subgraphs->size() == 0 || subgraphs->Get(0)->operators() == nullptr) return 0;
  const uint32_t count = subgraphs->Get(0)->operators()->size();
  return count > UINT16_MAX ? UINT16_MAX : static_cast<uint16_t>(count);
}

int resource_variable_count(const tflite::Model* model) {
  int count = 0;
  const auto* subgraphs = model->subgraphs();
  const auto* codes = model->operator_codes();
  if (subgraphs == nullptr || codes == nullptr) return 0;
  for (const auto* subgraph : *subgraphs) {
    if (subgraph->operators() == nullptr) continue;
    for (const auto* op : *subgraph->operators()) {
      if (op->opcode_index() < codes->size() &&
          tflite::GetBuiltinCode(codes->Get(op->opcode_index())) == tflite::BuiltinOperator_VAR_HANDLE) {
        ++count;
      }
    }
  }
  return count;
}

const char* operator_name(const tflite::Model* model, uint32_t subgraph, uint32_t index) {
  const auto* subgraphs = model->subgraphs();
  const auto* codes = model->operator_codes();
  if (subgraphs == nullptr || codes == nullptr || subgraph >= subgraphs->size()) return "?";
  const auto* operators = subgraphs->Get(subgraph)->operators();
  if (operators == nullptr || index >= operators->size()) return "?";
  const uint32_t code_index = operators->Get(index)->opcode_index();
  if (code_index >= codes->size()) return "?";
  const auto* code = codes->Get(code_index);
  const tflite::BuiltinOperator builtin = tflite::GetBuiltinCode(code);
  if (builtin == tflite::BuiltinOperator_CUSTOM) {
    return code->custom_code() != nullptr ? code->custom_code()->c_str() : "CUSTOM";
  }
  return tflite::EnumNameBuiltinOperator(builtin);
}

ModelRunner::ModelRunner(Clock& clock, const RunnerMemory& memory)
    : clock_(clock), memory_(memory), profiler_(clock, memory.op_us, memory.op_cycles, memory.op_capacity) {}

uint16_t ModelRunner::check_resolver(const tflite::MicroOpResolver& resolver, ErrorText& error) const {
  // TFLM resolves the operators of every subgraph in AllocateTensors(), but says only "Failed to
  // get registration" on its log; name the operator and where it is instead.
  const auto* subgraphs = model_->subgraphs();
  const auto* codes = model_->operator_codes();
  for (uint32_t s = 0; s < subgraphs->size(); ++s) {
    const auto* operators = subgraphs->Get(s)->operators();
    if (operators == nullptr) continue;
    for (uint32_t i = 0; i < operators->size(); ++i) {
      const uint32_t code_index = operators->Get(i)->opcode_index();
      if (codes == nullptr || code_index >= codes->size()) {
        error.format("subgraph %u operator %u: opcode index %u, the model has %u operator codes",
                     static_cast<unsigned>(s), static_cast<unsigned>(i), static_cast<unsigned>(code_index),
                     codes == nullptr ? 0u : static_cast<unsigned>(codes->size()));
        return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
      }
      const auto* code = codes->Get(code_index);
      const tflite::BuiltinOperator builtin = tflite::GetBuiltinCode(code);
      const bool found = builtin == tflite::BuiltinOperator_CUSTOM
                             ? code->custom_code() != nullptr && resolver.FindOp(code->custom_code()->c_str()) != nullptr
                             : resolver.FindOp(builtin) != nullptr;
      if (!found) {
        error.format("op %s (subgraph %u, operator %u) is not registered in the firmware's op resolver",
                     operator_name(model_, s, i), static_cast<unsigned>(s), static_cast<unsigned>(i));
        return static_cast<uint16_t>(ErrorCode::kUnsupportedOp);
      }
    }
  }
  return 0;
}

namespace {

// The wire protocol numbers tensor types as the TFLite schema's TensorType; TfLiteType differs
// (kTfLiteFloat32 is 1, TensorType_FLOAT32 is 0), so map explicitly and refuse the rest.
bool describe_type(TfLiteType type, TensorDesc& desc) {
  switch (type) {
    case kTfLiteFloat32: desc.dtype = static_cast<uint8_t>(DType::kFloat32); return true;
    case kTfLiteInt32: desc.dtype = static_cast<uint8_t>(DType::kInt32); return true;
    case kTfLiteUInt8: desc.dtype = static_cast<uint8_t>(DType::kUInt8); return true;
    case kTfLiteInt16: desc.dtype = static_cast<uint8_t>(DType::kInt16); return true;
    case kTfLiteInt8: desc.dtype = static_cast<uint8_t>(DType::kInt8); return true;
    default: return false;
  }
}

bool describe_dims(const TfLiteIntArray* dims, TensorDesc& desc) {
  if (dims == nullptr || dims->size > static_cast<int>(kMaxRank)) return false;
  desc.rank = static_cast<uint8_t>(dims->size);
  for (int i = 0; i < dims->size; ++i) desc.dims[i] = static_cast<uint32_t>(dims->data[i]);
  return true;
}

bool describe_tensor(const TfLiteTensor* tensor, TensorDesc& desc) {
  if (tensor == nullptr || !describe_type(tensor->type, desc) || !describe_dims(tensor->dims, desc)) return false;
  desc.scale = tensor->params.scale;
  desc.zero_point = tensor->params.zero_point;
  return true;
}

}  // namespace

uint16_t ModelRunner::describe(DeviceInfo& info, ErrorText& error) {
  info.arena_used = static_cast<uint32_t>(interpreter_->arena_used_bytes());
  info.op_count = op_count_;
  if (interpreter_->inputs_size() > kMaxTensors || interpreter_->outputs_size() > kMaxTensors) {
    error.format("model has %u inputs and %u outputs; the protocol carries at most %u each",
                 static_cast<unsigned>(interpreter_->inputs_size()), static_cast<unsigned>(interpreter_->outputs_size()),
                 static_cast<unsigned>(kMaxTensors));
    return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
  }
  info.n_inputs = static_cast<uint8_t>(interpreter_->inputs_size());
  info.n_outputs = static_cast<uint8_t>(interpreter_->outputs_size());
  for (uint8_t i = 0; i < info.n_inputs; ++i) {
    if (!describe_tensor(interpreter_->input(i), info.inputs[i])) {
      error.format("input %u has a type or rank the protocol cannot carry", static_cast<unsigned>(i));
      return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
    }
    // The engine checks uploads against the descriptor; Invoke() reads the tensor: both must agree.
    if (info.inputs[i].bytes() != interpreter_->input(i)->bytes) {
      error.format("input %u: protocol descriptor says %lu bytes, TfLiteTensor::bytes %u", static_cast<unsigned>(i),
                   static_cast<unsigned long>(info.inputs[i].bytes()),
                   static_cast<unsigned>(interpreter_->input(i)->bytes));
      return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
    }
  }
  for (uint8_t i = 0; i < info.n_outputs; ++i) {
    if (!describe_tensor(interpreter_->output(i), info.outputs[i])) {
      error.format("output %u has a type or rank the protocol cannot carry", static_cast<unsigned>(i));
      return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
    }
  }
  return 0;
}

uint16_t ModelRunner::boot(const uint8_t* model_data, const tflite::MicroOpResolver& resolver, DeviceInfo& info,
                           ErrorText& error) {
  model_ = tflite::GetModel(model_data);
  if (model_->version() != TFLITE_SCHEMA_VERSION) {
    error.format("model schema version %lu, firmware supports %d", static_cast<unsigned long>(model_->version()),
                 TFLITE_SCHEMA_VERSION);
    return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
  }
  if (model_->subgraphs() == nullptr || model_->subgraphs()->size() == 0) {
    error.format("model has no subgraph");
    return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
  }
  op_count_ = main_graph_operator_count(model_);
  if (op_count_ > memory_.op_capacity) {
    error.format("model has %u operators, the firmware keeps timings for %u", static_cast<unsigned>(op_count_),
                 static_cast<unsigned>(memory_.op_capacity));
    return static_cast<uint16_t>(ErrorCode::kModelLoadFailed);
  }
  if (const uint16_t code = check_resolver(resolver, error)) return code;
  // The allocator and the resource variables live at the start of the arena; MicroInterpreter's
  // own arena constructor would give it no MicroResourceVariables, and a model with VAR_HANDLE
  // (stateful LSTM/RNN exports) would then fail AllocateTensors().
  // The debug build plans the arena as MicroInterpreter's own preserve_all_tensors flag does
  // (FlagToMemoryPlannerType in micro_interpreter.cc): the linear planner, one place per tensor.
  tflite::MicroAllocator* allocator = tflite::MicroAllocator::Create(
      memory_.arena, memory_.arena_bytes,
      memory_.preserve_all_tensors ? tflite::MemoryPlannerType::kLinear : tflite::MemoryPlannerType::kGreedy);
  if (allocator == nullptr) {
    error.format("MicroAllocator::Create failed in a %u-byte arena%s", static_cast<unsigned>(memory_.arena_bytes),
                 memory_.preserve_all_tensors ? " (the preserve-all-tensors debug build's linear memory planner "
                                                "takes 4 KB of it)" : "");
    return static_cast<uint16_t>(ErrorCode::kArenaAllocationFailed);
  }
  tflite::MicroResourceVariables* variables = nullptr;
  const int variable_count = resource_variable_count(model_);
  if (variable_count > 0) {
    variables = tflite::MicroResourceVariables::Create(allocator, variable_count);
    if (variables == nullptr) {
      error.format("MicroResourceVariables::Create(%d) failed in a %u-byte arena", variable_count,
                   static_cast<unsigned>(memory_.arena_bytes));
      return static_cast<uint16_t>(ErrorCode::kArenaAllocationFailed);
    }
  }
  interpreter_ = new (interpreter_storage_) tflite::MicroInterpreter(model_, resolver, allocator, variables, &profiler_);
  if (interpreter_->AllocateTensors() != kTfLiteOk) {
    if (memory_.preserve_all_tensors) {
      error.format("AllocateTensors() failed with a %u-byte arena in the preserve-all-tensors debug build, which "
                   "gives every tensor its own memory and needs more arena than the normal build",
                   static_cast<unsigned>(memory_.arena_bytes));
    } else {
      error.format("AllocateTensors() failed with a %u-byte arena", static_cast<unsigned>(memory_.arena_bytes));
    }
    return static_cast<uint16_t>(ErrorCode::kArenaAllocationFailed);
  }
  const auto* tensors = model_->subgraphs()->Get(0)->tensors();
  const uint32_t tensors_in_main = tensors == nullptr ? 0u : tensors->size();
  tensor_count_ = tensors_in_main > UINT16_MAX ? UINT16_MAX : static_cast<uint16_t>(tensors_in_main);
  if (memory_.preserve_all_tensors) info.flags = static_cast<uint8_t>(info.flags | kFlagPreservesTensors);
  return describe(info, error);
}

uint8_t* ModelRunner::input_buffer(uint8_t index) {
  TfLiteTensor* tensor = interpreter_->input(index);
  return tensor != nullptr ? tensor->data.uint8 : nullptr;
}

const uint8_t* ModelRunner::output_buffer(uint8_t index) {
  TfLiteTensor* tensor = interpreter_->output(index);
  return tensor != nullptr ? tensor->data.uint8 : nullptr;
}

bool ModelRunner::invoke(bool profile, InvokeTiming& timing, char* error, size_t error_len) {
  profiler_.arm(profile);
  const int64_t start_us = clock_.micros();
  const uint32_t start_cycles = clock_.cycles();
  const TfLiteStatus status = interpreter_->Invoke();
  timing.total_cycles = clock_.cycles() - start_cycles;
  timing.total_us = static_cast<uint32_t>(clock_.micros() - start_us);
  // Recurrent state must not leak into the next sample (the reference interpreters start every
  // sample from zero). Reset right after Invoke, inside the same job: the next job may already
  // be queued, and its input is copied into the input tensor only after this returns. Reset()
  // clears variable tensors, resource variables and kernel state, not the output tensors the job
  // copies next.
  interpreter_->Reset();
  if (status != kTfLiteOk) {
    std::snprintf(error, error_len, "MicroInterpreter::Invoke() returned %d", static_cast<int>(status));
    return false;
  }
  timing.op_count = 0;
  timing.op_us = nullptr;
  timing.op_cycles = nullptr;
  if (profile) {
    if (profiler_.top_level_events() != op_count_) {
      std::snprintf(error, error_len, "the profiler saw %u top-level operator events, the main subgraph has %u operators",
                    static_cast<unsigned>(profiler_.top_level_events()), static_cast<unsigned>(op_count_));
      return false;
    }
    timing.op_count = op_count_;
    timing.op_us = profiler_.op_us();
    timing.op_cycles = profiler_.op_cycles();
  }
  return true;
}

const char* ModelRunner::op_name(uint16_t index) { return operator_name(model_, 0, index); }

uint16_t ModelRunner::tensor_count() {
  return memory_.preserve_all_tensors && interpreter_ != nullptr ? tensor_count_ : 0;
}

bool ModelRunner::tensor(uint16_t index, TensorDesc& desc, Bytes& data, ErrorText& error) {
  if (!memory_.preserve_all_tensors || interpreter_ == nullptr) {
    error.format("this firmware reuses tensor memory between operators: intermediate tensors are kept only by the "
                 "debug build (preserve_all_tensors)");
    return false;
  }
  if (index >= tensor_count_) {
    error.format("tensor %u does not exist: the main subgraph has %u tensors", static_cast<unsigned>(index),
                 static_cast<unsigned>(tensor_count_));
    return false;
  }
  const TfLiteEvalTensor* tensor = interpreter_->GetTensor(index);
  if (tensor == nullptr) {
    error.format("MicroInterpreter::GetTensor(%u) returned nothing", static_cast<unsigned>(index));
    return false;
  }
  desc = TensorDesc();
  if (!describe_type(tensor->type, desc)) {
    error.format("tensor %u is %s, a type the protocol cannot carry", static_cast<unsigned>(index),
                 TfLiteTypeGetName(tensor->type));
    return false;
  }
  if (!describe_dims(tensor->dims, desc)) {
    error.format("tensor %u has no shape or a rank above %u", static_cast<unsigned>(index),
                 static_cast<unsigned>(kMaxRank));
    return false;
  }
  if (tensor->data.data == nullptr && desc.bytes() != 0) {
    error.format("tensor %u has no memory in the arena (an optional tensor the model leaves out)",
                 static_cast<unsigned>(index));
    return false;
  }
  // TfLiteEvalTensor carries no quantization: the flatbuffer's first entry (per-channel tensors,
  // which are constant weights, have more; the protocol's descriptor has room for one).
  const auto* quantization = model_->subgraphs()->Get(0)->tensors()->Get(index)->quantization();
  if (quantization != nullptr && quantization->scale() != nullptr && quantization->scale()->size() > 0) {
    desc.scale = quantization->scale()->Get(0);
  }
  if (quantization != nullptr && quantization->zero_point() != nullptr && quantization->zero_point()->size() > 0) {
    desc.zero_point = static_cast<int32_t>(quantization->zero_point()->Get(0));
  }
  data.data = static_cast<const uint8_t*>(tensor->data.data);
  data.size = desc.bytes();
  return true;
}

}  // namespace tinyhil
