// The virtual board's firmware: the chip's portable core (protocol engine and model runner,
// firmware/components/tinyhil) with TFLite Micro from esp-tflite-micro and esp-nn's portable C
// kernels, behind a host layer in place of the chip layer of firmware/src/main.cpp:
//   - transport: a file descriptor (the pseudo-terminal, or a socket to the link emulator of
//     harness/board/virtual_device.py, which paces the link and injects faults);
//   - second core: a std::thread;
//   - heap: heap_caps_malloc's refusal emulated from the free SRAM/PSRAM the harness states;
//   - clock: the host's, but every timing the host sees is the ESP32-S3 cost model's estimate
//     (--estimates), because host time says nothing about the chip. The runner still runs its
//     profiler, so an operator-count mismatch fails here as it would on the chip;
//   - the debug build's mode (--preserve-all-tensors, what the chip's esp32s3-debug-tensors
//     PlatformIO env selects), and one fault only a virtual board has: --corrupt-op N perturbs
//     operator N's output (corrupt_op.h).
// Built and started by harness/board/native_firmware.py.
//
// tinyhil-firmware --fd N --model PATH --arena-bytes N --estimates PATH [options], see usage().
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "corrupt_op.h"
#include "host_layer.h"
#include "model_runner.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "tensorflow/lite/schema/schema_utils.h"
#include "tinyhil_protocol.h"

namespace {

// Room for every op type the firmware generator can register (harness/firmware.py); the chip
// registers only its model's, and so does this program.
constexpr unsigned kMaxOpTypes = 128;
using HostOpResolver = tflite::MicroMutableOpResolver<kMaxOpTypes>;

// Generated from harness/firmware.py's RESOLVER_METHODS by the native build: one
// `case tflite::BuiltinOperator_X: return resolver.AddX();` per op. The same method names go
// into the chip's model_config.h, so a name TFLM lacks fails this build too.
TfLiteStatus register_builtin(HostOpResolver& resolver, tflite::BuiltinOperator op, bool& known) {
  known = true;
  switch (op) {
#include "op_registrations.inc"
    default:
      known = false;
      return kTfLiteError;
  }
}

// TFLM's own custom ops by custom code (harness/firmware.py CUSTOM_RESOLVER_METHODS), likewise:
// `if (std::strcmp(name, "SignalWindow") == 0) return resolver.AddWindow();` per op.
TfLiteStatus register_custom(HostOpResolver& resolver, const char* name) {
#include "custom_op_registrations.inc"
  return kTfLiteError;
}

volatile sig_atomic_t g_stop = 0;
void on_sigterm(int) { g_stop = 1; }

class HostClock final : public tinyhil::Clock {
 public:
  explicit HostClock(uint32_t cpu_mhz) : cpu_mhz_(cpu_mhz) {}
  int64_t micros() override {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start_).count();
  }
  uint32_t cycles() override {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_);
    return static_cast<uint32_t>(static_cast<uint64_t>(ns.count()) * cpu_mhz_ / 1000u);
  }

 private:
  uint32_t cpu_mhz_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

struct Estimates {
  uint32_t total_us = 0;
  uint64_t total_cycles = 0;
  std::vector<uint32_t> op_us;
  std::vector<uint32_t> op_cycles;
};

// The runner does the work; the timings the host sees are the cost model's.
class EstimatedTiming final : public tinyhil::Inference {
 public:
  EstimatedTiming(tinyhil::ModelRunner& runner, const Estimates& estimates) : runner_(runner), estimates_(estimates) {}
  uint8_t* input_buffer(uint8_t index) override { return runner_.input_buffer(index); }
  const uint8_t* output_buffer(uint8_t index) override { return runner_.output_buffer(index); }
  const char* op_name(uint16_t index) override { return runner_.op_name(index); }
  uint16_t tensor_count() override { return runner_.tensor_count(); }
  bool tensor(uint16_t index, tinyhil::TensorDesc& desc, tinyhil::Bytes& data, tinyhil::ErrorText& error) override {
    return runner_.tensor(index, desc, data, error);
  }

  bool invoke(bool profile, tinyhil::InvokeTiming& timing, char* error, size_t error_len) override {
    if (!runner_.invoke(profile, timing, error, error_len)) return false;
    if (profile && timing.op_count != estimates_.op_us.size()) {
      std::snprintf(error, error_len, "the runner timed %u operators, the cost model estimated %u",
                    static_cast<unsigned>(timing.op_count), static_cast<unsigned>(estimates_.op_us.size()));
      return false;
    }
    timing.total_us = estimates_.total_us;
    timing.total_cycles = estimates_.total_cycles;
    if (profile) {
      timing.op_us = estimates_.op_us.data();
      timing.op_cycles = estimates_.op_cycles.data();
    }
    return true;
  }

 private:
  tinyhil::ModelRunner& runner_;
  const Estimates& estimates_;
};

struct Options {
  int fd = -1;
  std::string model_path;
  std::string estimates_path;
  uint32_t arena_bytes = 0;
  bool arena_in_psram = false;
  uint32_t sram_free = 0;       // largest free internal block once the firmware is up
  uint32_t psram_free = 0;
  uint32_t sram_bytes = 0;      // DeviceInfo
  uint32_t psram_bytes = 0;
  uint32_t flash_app_bytes = 0;
  uint32_t code_bytes = 0;      // the image without the model
  uint32_t cpu_mhz = 240;
  bool esp_nn = true;
  bool preserve_all_tensors = false;
  bool corrupt = false;         // --corrupt-op given
  uint32_t corrupt_op = 0;
  bool worker = true;
  uint32_t max_payload = tinyhil::kMaxPayload;
  std::string firmware_id = "0000000000000000";
  std::string model_id = "0000000000000000";
  std::string chip = "ESP32-S3 (virtual, native firmware)";
  long parent_pid = -1;  // the link emulator: this process ends with it
};

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "tinyhil-firmware: %s\nusage: tinyhil-firmware --fd N --model PATH --arena-bytes N --estimates PATH "
               "[--arena-in-psram 0|1] [--sram-free N] [--psram-free N] [--sram-bytes N] [--psram-bytes N] "
               "[--flash-app-bytes N] [--code-bytes N] [--cpu-mhz N] [--esp-nn 0|1] [--preserve-all-tensors 0|1] "
               "[--corrupt-op N] [--worker sync|thread] "
               "[--max-payload N] [--firmware-id ID] [--model-id ID] [--chip TEXT] [--parent-pid N]\n",
               problem.c_str());
  std::exit(2);
}

uint32_t number(const char* text, const std::string& option) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value > UINT32_MAX) {
    usage(option + " wants a number up to " + std::to_string(UINT32_MAX) + ", got '" + text + "'");
  }
  return static_cast<uint32_t>(value);
}

bool flag(const char* text, const std::string& option) {
  if (std::strcmp(text, "0") != 0 && std::strcmp(text, "1") != 0) usage(option + " wants 0 or 1");
  return text[0] == '1';
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string option = argv[i];
    if (i + 1 >= argc) usage("missing value after " + option);
    const char* value = argv[++i];
    if (option == "--fd") o.fd = static_cast<int>(number(value, option));
    else if (option == "--model") o.model_path = value;
    else if (option == "--estimates") o.estimates_path = value;
    else if (option == "--arena-bytes") o.arena_bytes = number(value, option);
    else if (option == "--arena-in-psram") o.arena_in_psram = flag(value, option);
    else if (option == "--sram-free") o.sram_free = number(value, option);
    else if (option == "--psram-free") o.psram_free = number(value, option);
    else if (option == "--sram-bytes") o.sram_bytes = number(value, option);
    else if (option == "--psram-bytes") o.psram_bytes = number(value, option);
    else if (option == "--flash-app-bytes") o.flash_app_bytes = number(value, option);
    else if (option == "--code-bytes") o.code_bytes = number(value, option);
    else if (option == "--cpu-mhz") o.cpu_mhz = number(value, option);
    else if (option == "--esp-nn") o.esp_nn = flag(value, option);
    else if (option == "--preserve-all-tensors") o.preserve_all_tensors = flag(value, option);
    else if (option == "--corrupt-op") {
      o.corrupt = true;
      o.corrupt_op = number(value, option);
    }
    else if (option == "--max-payload") o.max_payload = number(value, option);
    else if (option == "--firmware-id") o.firmware_id = value;
    else if (option == "--model-id") o.model_id = value;
    else if (option == "--chip") o.chip = value;
    else if (option == "--parent-pid") o.parent_pid = static_cast<long>(number(value, option));
    else if (option == "--worker") {
      if (std::strcmp(value, "sync") != 0 && std::strcmp(value, "thread") != 0) usage("--worker wants sync or thread");
      o.worker = std::strcmp(value, "thread") == 0;
    } else {
      usage("unknown option " + option);
    }
  }
  if (o.fd < 0 || o.model_path.empty() || o.estimates_path.empty() || o.arena_bytes == 0) {
    usage("--fd, --model, --estimates and --arena-bytes are required");
  }
  return o;
}

// Memory the chip would hold in flash (the model) or get from heap_caps_aligned_alloc: 16-byte
// aligned, as TFLM wants.
uint8_t* aligned_bytes(size_t size) {
  return static_cast<uint8_t*>(std::aligned_alloc(16, (size + 15) / 16 * 16));
}

bool read_file(const std::string& path, uint8_t*& data, size_t& size) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return false;
  std::vector<uint8_t> bytes;
  uint8_t chunk[65536];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof(chunk), file)) > 0) bytes.insert(bytes.end(), chunk, chunk + got);
  std::fclose(file);
  size = bytes.size();
  data = aligned_bytes(size == 0 ? 1 : size);
  if (size != 0) std::memcpy(data, bytes.data(), size);
  return true;
}

// "total_us total_cycles" then one "op_us op_cycles" line per operator of the main subgraph.
bool read_estimates(const std::string& path, Estimates& estimates) {
  FILE* file = std::fopen(path.c_str(), "r");
  if (file == nullptr) return false;
  unsigned long long total_us = 0, total_cycles = 0, us = 0, cycles = 0;
  bool ok = std::fscanf(file, "%llu %llu", &total_us, &total_cycles) == 2;
  while (ok && std::fscanf(file, "%llu %llu", &us, &cycles) == 2) {
    estimates.op_us.push_back(static_cast<uint32_t>(us));
    estimates.op_cycles.push_back(static_cast<uint32_t>(cycles));
  }
  std::fclose(file);
  estimates.total_us = static_cast<uint32_t>(total_us);
  estimates.total_cycles = total_cycles;
  return ok;
}

// The builtin ops of every subgraph, each registered once: what the chip's generated
// tinyhil_register_ops() does for its model. An op without a kernel stays unregistered, and the
// runner's boot names it.
void register_model_ops(const tflite::Model* model, HostOpResolver& resolver) {
  bool seen[tflite::BuiltinOperator_MAX + 1] = {};
  const auto* codes = model->operator_codes();
  if (codes == nullptr) return;
  for (const auto* code : *codes) {
    const tflite::BuiltinOperator op = tflite::GetBuiltinCode(code);
    if (op == tflite::BuiltinOperator_CUSTOM) {
      if (code->custom_code() != nullptr && resolver.FindOp(code->custom_code()->c_str()) == nullptr) {
        register_custom(resolver, code->custom_code()->c_str());
      }
      continue;
    }
    if (op < tflite::BuiltinOperator_MIN || op > tflite::BuiltinOperator_MAX || seen[op]) continue;
    seen[op] = true;
    bool known = false;
    register_builtin(resolver, op, known);
  }
}

// Sets `problem` when --corrupt-op N cannot apply to this model; leaves it empty otherwise.
void check_corrupt_op(const tflite::Model* model, uint32_t op, tinyhil::ErrorText& problem) {
  const uint16_t count = tinyhil::main_graph_operator_count(model);
  if (op >= count) {
    problem.format("corrupt_op %lu: the model's main graph has %u operators (0 to %d)", static_cast<unsigned long>(op),
                   static_cast<unsigned>(count), static_cast<int>(count) - 1);
    return;
  }
  const auto* subgraph = model->subgraphs()->Get(0);
  const auto* outputs = subgraph->operators()->Get(op)->outputs();
  if (outputs == nullptr || outputs->size() == 0 || outputs->Get(0) < 0 || subgraph->tensors() == nullptr ||
      static_cast<uint32_t>(outputs->Get(0)) >= subgraph->tensors()->size()) {
    problem.format("corrupt_op %lu: operator %lu (%s) has no output tensor", static_cast<unsigned long>(op),
                   static_cast<unsigned long>(op), tinyhil::operator_name(model, 0, op));
    return;
  }
  const tflite::TensorType type = subgraph->tensors()->Get(static_cast<uint32_t>(outputs->Get(0)))->type();
  if (!tinyhil_host::corruptible(static_cast<int8_t>(type))) {
    problem.format("corrupt_op %lu: output 0 of operator %lu (%s) is %s; the fault perturbs FLOAT32, INT8, UINT8 and "
                   "INT16 outputs", static_cast<unsigned long>(op), static_cast<unsigned long>(op),
                   tinyhil::operator_name(model, 0, op), tflite::EnumNameTensorType(type));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  // Named by the caller, so that a parent that died before this line is noticed too.
  const pid_t parent = options.parent_pid > 0 ? static_cast<pid_t>(options.parent_pid) : getppid();
  struct sigaction action = {};
  action.sa_handler = on_sigterm;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);

  tinyhil::DeviceInfo info;
  info.board_kind = tinyhil::kBoardVirtual;  // estimated latency, whatever code ran
  info.cpu_mhz = static_cast<uint16_t>(options.cpu_mhz);
  info.sram_bytes = options.sram_bytes;
  info.psram_bytes = options.psram_bytes;
  info.flash_bytes = options.flash_app_bytes;
  info.arena_size = options.arena_bytes;
  info.max_payload = static_cast<uint16_t>(options.max_payload);
  info.flags = static_cast<uint8_t>((options.esp_nn ? tinyhil::kFlagEspNn : 0) |
                                    (options.arena_in_psram ? tinyhil::kFlagArenaInPsram : 0));
  info.chip = options.chip.c_str();
  info.firmware_id = options.firmware_id.c_str();
  info.model_id = options.model_id.c_str();

  tinyhil::ErrorText boot_error;
  uint16_t error_code = 0;
  uint8_t* model_data = nullptr;
  size_t model_bytes = 0;
  Estimates estimates;
  if (!read_file(options.model_path, model_data, model_bytes)) {
    boot_error.format("cannot read the model %s", options.model_path.c_str());
    error_code = static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  } else if (!read_estimates(options.estimates_path, estimates)) {
    boot_error.format("cannot read the latency estimates %s", options.estimates_path.c_str());
    error_code = static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  } else if (options.flash_app_bytes != 0 && options.code_bytes + model_bytes > options.flash_app_bytes) {
    // On the chip the link step refuses this; the board of a virtual run says it at boot.
    boot_error.format("firmware image %lu bytes (model %lu) exceeds the %lu-byte app partition",
                      static_cast<unsigned long>(options.code_bytes + model_bytes),
                      static_cast<unsigned long>(model_bytes), static_cast<unsigned long>(options.flash_app_bytes));
    error_code = static_cast<uint16_t>(tinyhil::ErrorCode::kModelTooLarge);
  }
  const uint32_t region_free = options.arena_in_psram ? options.psram_free : options.sram_free;
  if (error_code == 0 && options.arena_bytes > region_free) {
    boot_error.format("heap_caps_malloc(%lu) for the tensor arena failed: %s has %lu bytes free",
                      static_cast<unsigned long>(options.arena_bytes),
                      options.arena_in_psram ? "PSRAM" : "internal SRAM", static_cast<unsigned long>(region_free));
    error_code = static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }

  const tflite::Model* model = error_code == 0 ? tflite::GetModel(model_data) : nullptr;
  const uint16_t op_capacity = model != nullptr ? tinyhil::main_graph_operator_count(model) : 0;
  std::vector<uint32_t> op_us(op_capacity + 1u), op_cycles(op_capacity + 1u);
  tinyhil::RunnerMemory memory;
  memory.arena = error_code == 0 ? aligned_bytes(options.arena_bytes) : nullptr;
  memory.arena_bytes = options.arena_bytes;
  memory.op_us = op_us.data();
  memory.op_cycles = op_cycles.data();
  memory.op_capacity = op_capacity;
  memory.preserve_all_tensors = options.preserve_all_tensors;
  HostClock clock(options.cpu_mhz);
  tinyhil::ModelRunner runner(clock, memory);
  HostOpResolver resolver;
  tinyhil_host::CorruptingOpResolver corrupting(resolver, options.corrupt_op);
  if (model != nullptr && options.corrupt) {
    check_corrupt_op(model, options.corrupt_op, boot_error);
    if (boot_error.size != 0) error_code = static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  }
  if (model != nullptr && error_code == 0) {
    register_model_ops(model, resolver);
    const tflite::MicroOpResolver& used = options.corrupt ? static_cast<const tflite::MicroOpResolver&>(corrupting)
                                                          : static_cast<const tflite::MicroOpResolver&>(resolver);
    error_code = runner.boot(model_data, used, info, boot_error);
  }
  EstimatedTiming timed(runner, estimates);

  // Staging for the worker, sized from the model as the chip layer sizes it.
  std::vector<uint8_t> staged[2][2 * tinyhil::kMaxTensors];
  std::vector<uint32_t> staged_us[2], staged_cycles[2];
  tinyhil::StagingBuffers staging;
  if (error_code == 0) {
    for (int set = 0; set < 2; ++set) {
      for (uint8_t i = 0; i < info.n_inputs; ++i) {
        staged[set][i].resize(info.inputs[i].bytes());
        staging.inputs[set][i] = staged[set][i].data();
      }
      for (uint8_t i = 0; i < info.n_outputs; ++i) {
        staged[set][tinyhil::kMaxTensors + i].resize(info.outputs[i].bytes());
        staging.outputs[set][i] = staged[set][tinyhil::kMaxTensors + i].data();
      }
      staged_us[set].resize(info.op_count + 1u);
      staged_cycles[set].resize(info.op_count + 1u);
      staging.op_us[set] = staged_us[set].data();
      staging.op_cycles[set] = staged_cycles[set].data();
    }
    staging.op_capacity = info.op_count;
  }
  if (error_code != 0) std::fprintf(stderr, "tinyhil-firmware: boot failed (%u): %s\n", error_code, boot_error.text);

  int wake[2];
  if (::pipe(wake) != 0 || ::fcntl(wake[0], F_SETFL, O_NONBLOCK) != 0 || ::fcntl(wake[1], F_SETFL, O_NONBLOCK) != 0) {
    std::perror("tinyhil-firmware: pipe for the worker's wake-ups");
    return 1;
  }
  tinyhil_host::FdTransport transport(options.fd, 0, 0);
  tinyhil::Engine engine(transport, error_code != 0 ? nullptr : &timed, info, error_code,
                         error_code != 0 ? boot_error.text : nullptr);
  tinyhil_host::ThreadWorker worker(wake[1]);
  if (options.worker && error_code == 0 && !engine.use_worker(worker, staging)) {
    std::fprintf(stderr, "tinyhil-firmware: the engine refused the worker and its staging buffers\n");
    return 1;
  }
  std::fprintf(stderr, "tinyhil-firmware: booted, model %s (%lu bytes), %u ops, arena %lu of %lu bytes%s\n",
               options.model_id.c_str(), static_cast<unsigned long>(model_bytes), static_cast<unsigned>(info.op_count),
               static_cast<unsigned long>(info.arena_used), static_cast<unsigned long>(options.arena_bytes),
               options.preserve_all_tensors ? ", every tensor preserved (debug build)" : "");
  if (options.corrupt && error_code == 0) {
    std::fprintf(stderr, "tinyhil-firmware: fault corrupt_op: output 0 of operator %lu (%s) is perturbed after every "
                 "invoke\n", static_cast<unsigned long>(options.corrupt_op),
                 tinyhil::operator_name(model, 0, options.corrupt_op));
  }
  tinyhil_host::serve(engine, transport, options.fd, wake[0], parent, g_stop);
  return 0;
}
