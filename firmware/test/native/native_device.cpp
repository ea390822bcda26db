// The firmware's protocol engine (components/tinyhil) as a Linux process serving one file
// descriptor: a pty master or a socket, the way harness/board/virtual_device.py serves its pty.
// tests/test_native_engine.py drives it with the Python host and compares it with the Python
// device engine.
//
// The model is FAKE. On the device the Inference is TFLite Micro, which cannot be built here;
// this small deterministic stand-in exists only to drive the protocol engine with known outputs
// and timings:
//   - input 0: int8 [1, K] (K = --input-bytes, default 8);
//   - output 0: int8 [1, M] (M = --output-bytes, default 8), output[i] = the sum of the input bytes
//     whose index is i modulo M, computed exactly, then clamped to [-128, 127];
//   - ops: "ADD", "SUM" (--ops N adds OP<i> names with i % 7 trailing X's, and op 5, when
//     present, has a 300-byte name to exercise str8 truncation);
//   - timing: op_us = 1000 + c, 234, then 10 + i, where c is the sum of the input bytes (unsigned)
//     modulo 251, so that timing belongs to one input as outputs do; op_cycles = 240 * op_us;
//     totals are their sums (1234 + c us for the default two ops);
//   - --invoke-error TEXT makes every invoke fail with TEXT;
//   - --fail-mod N makes an invoke fail when input byte 0 (unsigned) is a multiple of N, so that
//     some inferences succeed and others fail;
//   - --invoke-sleep-us N makes every invoke take at least N us, as a real model takes time;
//   - --tensors preserve keeps six "tensors" of the last invoke for GET_TENSOR and sets
//     kFlagPreservesTensors, as a firmware built with preserve_all_tensors does (default none:
//     the Inference's defaults, as a release build). Every invoke first fills them with 0x5A (the
//     arena is scratch space while the model runs); a successful one then writes, with the input
//     bytes x (as uploaded, K of them) and s = their unsigned sum:
//       0 int8 [1, K] (0.5, -3): x;
//       1 int16 [1, 2, K] (0.125, 0): (x[i % K] * 257 + i) mod 2^16;
//       2 float32 [2500] (0, 0): i * 0.5f + (s mod 1000), 10 KB: several TENSOR_DATA chunks;
//       3 int32 scalar, rank 0: s;
//       4 int64 [2]: a type the protocol has no code for (the engine refuses it);
//       5 int8 [1, M] (0.25, 7): the output.
//
// --worker thread runs inferences on a std::thread, as the firmware runs them on the ESP32-S3's
// second core (FreeRTOS); without it the engine runs them synchronously, as on a single core.
// --rx-ns-per-byte N delivers received bytes no faster than one per N ns, so that taking in an
// upload costs the link thread time, as on a board whose link runs at USB or UART speed;
// --tx-ns-per-byte N does the same for sending.
// --idle-gap-ms N sets the engine's idle gap (default kIdleGapMs, the protocol's): the tests that
// compare both engines byte for byte set one longer than any test, so that a slow machine's pause
// between two requests is never taken for a lost frame.
//
// native_device --fd N [--firmware-id ID] [--model-id ID] [--input-bytes K] [--output-bytes M]
//               [--ops N] [--max-payload P] [--boot-error CODE:TEXT] [--invoke-error TEXT]
//               [--fail-mod N] [--invoke-sleep-us N] [--worker sync|thread] [--rx-ns-per-byte N]
//               [--tx-ns-per-byte N] [--idle-gap-ms N] [--tensors none|preserve]
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "host_layer.h"
#include "tinyhil_protocol.h"

namespace {

using tinyhil_host::FdTransport;
using tinyhil_host::ThreadWorker;
using tinyhil_host::write_all;

// What an ESP32-S3 prints on reset before the firmware runs: the host must skip it.
constexpr char kBootBanner[] =
    "ESP-ROM:esp32s3-20210327\r\nrst:0x1 (POWERON),boot:0x8 (SPI_FAST_FLASH_BOOT)\r\n"
    "tinyhil native ESP32-S3 engine booting\r\n";

volatile sig_atomic_t g_stop = 0;

void on_sigterm(int) { g_stop = 1; }

struct Options {
  int fd = -1;
  std::string firmware_id = "0000000000000000";
  std::string model_id = "0000000000000000";
  uint32_t input_bytes = 8;
  uint32_t output_bytes = 8;
  uint32_t ops = 2;
  uint32_t max_payload = tinyhil::kMaxPayload;
  uint16_t boot_error_code = 0;
  std::string boot_error_text;
  bool invoke_fails = false;
  std::string invoke_error;
  uint32_t fail_mod = 0;
  uint32_t invoke_sleep_us = 0;
  bool worker = false;
  uint32_t rx_ns_per_byte = 0;
  uint32_t tx_ns_per_byte = 0;
  uint32_t idle_gap_ms = tinyhil::kIdleGapMs;
  bool tensors = false;
};

constexpr uint16_t kFakeTensors = 6;
constexpr uint32_t kFloatTensorLength = 2500;
constexpr uint8_t kInt64TypeCode = 4;  // TFLite TensorType INT64: no wire code

class FakeModel final : public tinyhil::Inference {
 public:
  explicit FakeModel(const Options& options)
      : input_(options.input_bytes), output_(options.output_bytes), sums_(options.output_bytes),
        op_us_(options.ops), op_cycles_(options.ops),
        invoke_fails_(options.invoke_fails),
        invoke_error_(options.invoke_error),
        fail_mod_(options.fail_mod),
        invoke_sleep_us_(options.invoke_sleep_us),
        preserves_tensors_(options.tensors) {
    const uint32_t k = options.input_bytes;
    const uint32_t m = options.output_bytes;
    descs_[0] = make_desc(tinyhil::DType::kInt8, {1, k}, 0.5f, -3);
    descs_[1] = make_desc(tinyhil::DType::kInt16, {1, 2, k}, 0.125f, 0);
    descs_[2] = make_desc(tinyhil::DType::kFloat32, {kFloatTensorLength}, 0.0f, 0);
    descs_[3] = make_desc(tinyhil::DType::kInt32, {}, 0.0f, 0);
    descs_[4].dtype = kInt64TypeCode;
    descs_[4].rank = 1;
    descs_[4].dims[0] = 2;
    descs_[5] = make_desc(tinyhil::DType::kInt8, {1, m}, 0.25f, 7);
    const uint32_t sizes[kFakeTensors] = {k, 4 * k, 4 * kFloatTensorLength, 4, 16, m};
    for (uint16_t i = 0; i < kFakeTensors; ++i) tensors_[i].assign(sizes[i], 0);
    for (uint32_t i = 0; i < options.ops; ++i) {
      if (i == 0) {
        names_.push_back("ADD");
      } else if (i == 1) {
        names_.push_back("SUM");
      } else if (i == 5) {
        names_.push_back("LONG" + std::string(296, 'X'));
      } else {
        names_.push_back("OP" + std::to_string(i) + std::string(i % 7, 'X'));
      }
      const uint32_t us = i == 0 ? 1000 : i == 1 ? 234 : 10 + i;
      base_us_.push_back(us);
      if (i == 0) continue;  // op 0 depends on the input: added per invoke
      total_us_ += us;
      total_cycles_ += 240ull * us;
    }
  }

  uint8_t* input_buffer(uint8_t index) override { return index == 0 ? input_.data() : nullptr; }

  const uint8_t* output_buffer(uint8_t index) override { return index == 0 ? output_.data() : nullptr; }

  bool invoke(bool /*profile*/, tinyhil::InvokeTiming& timing, char* error, size_t error_len) override {
    // As on the device, the last result does not survive the next invoke: TFLM's profiler starts
    // from zero, and the arena is scratch space while the model runs. A result sent late from here
    // would go wrong, not pass by luck.
    std::fill(op_us_.begin(), op_us_.end(), 0);
    std::fill(op_cycles_.begin(), op_cycles_.end(), 0);
    std::fill(output_.begin(), output_.end(), 0x5A);
    if (preserves_tensors_) {
      for (std::vector<uint8_t>& tensor : tensors_) std::fill(tensor.begin(), tensor.end(), 0x5A);
    }
    if (invoke_sleep_us_ != 0) std::this_thread::sleep_for(std::chrono::microseconds(invoke_sleep_us_));
    if (invoke_fails_) {
      std::snprintf(error, error_len, "%s", invoke_error_.c_str());
      return false;
    }
    if (fail_mod_ != 0 && !input_.empty() && input_[0] % fail_mod_ == 0) {
      std::snprintf(error, error_len, "input byte 0 is %u, a multiple of %u", static_cast<unsigned>(input_[0]),
                    static_cast<unsigned>(fail_mod_));
      return false;
    }
    const size_t width = output_.size();
    std::fill(sums_.begin(), sums_.end(), 0);
    for (size_t i = 0; i < input_.size() && width > 0; ++i) {
      sums_[i % width] += static_cast<int8_t>(input_[i]);
    }
    for (size_t i = 0; i < width; ++i) {
      const int64_t clamped = sums_[i] < -128 ? -128 : sums_[i] > 127 ? 127 : sums_[i];
      output_[i] = static_cast<uint8_t>(static_cast<int8_t>(clamped));
    }
    // The arrays are rewritten by every invoke, as a profiler's are: whoever sends them later must
    // have copied them.
    std::copy(base_us_.begin(), base_us_.end(), op_us_.begin());
    if (!op_us_.empty()) {
      uint64_t sum = 0;
      for (const uint8_t byte : input_) sum += byte;
      op_us_[0] += static_cast<uint32_t>(sum % 251);
    }
    for (size_t i = 0; i < op_us_.size(); ++i) op_cycles_[i] = 240 * op_us_[i];
    timing.total_us = total_us_ + (op_us_.empty() ? 0 : op_us_[0]);
    timing.total_cycles = total_cycles_ + (op_us_.empty() ? 0 : op_cycles_[0]);
    timing.op_count = static_cast<uint16_t>(op_us_.size());
    timing.op_us = op_us_.data();
    timing.op_cycles = op_cycles_.data();
    if (preserves_tensors_) keep_tensors();
    return true;
  }

  uint16_t tensor_count() override { return preserves_tensors_ ? kFakeTensors : 0; }

  bool tensor(uint16_t index, tinyhil::TensorDesc& desc, tinyhil::Bytes& data, tinyhil::ErrorText& error) override {
    if (!preserves_tensors_ || index >= kFakeTensors) return Inference::tensor(index, desc, data, error);
    desc = descs_[index];
    data = tinyhil::Bytes{tensors_[index].data(), tensors_[index].size()};
    return true;
  }

  const char* op_name(uint16_t index) override { return index < names_.size() ? names_[index].c_str() : nullptr; }

 private:
  static tinyhil::TensorDesc make_desc(tinyhil::DType dtype, std::initializer_list<uint32_t> shape, float scale,
                                       int32_t zero_point) {
    tinyhil::TensorDesc desc;
    desc.dtype = static_cast<uint8_t>(dtype);
    for (uint32_t dim : shape) desc.dims[desc.rank++] = dim;
    desc.scale = scale;
    desc.zero_point = zero_point;
    return desc;
  }

  static void put_le(std::vector<uint8_t>& out, size_t at, uint32_t value, size_t width) {
    for (size_t b = 0; b < width; ++b) out[at + b] = static_cast<uint8_t>(value >> (8 * b));
  }

  // The values the header comment lists, from the input this invoke read.
  void keep_tensors() {
    const size_t k = input_.size();
    uint32_t sum = 0;
    for (const uint8_t byte : input_) sum += byte;
    tensors_[0].assign(input_.begin(), input_.end());
    for (size_t i = 0; i < 2 * k; ++i) {
      const uint32_t value = static_cast<uint32_t>(static_cast<int8_t>(input_[i % k])) * 257u + static_cast<uint32_t>(i);
      put_le(tensors_[1], 2 * i, value & 0xFFFFu, 2);
    }
    for (uint32_t i = 0; i < kFloatTensorLength; ++i) {
      const float value = static_cast<float>(i) * 0.5f + static_cast<float>(sum % 1000);
      uint32_t bits = 0;
      std::memcpy(&bits, &value, sizeof(bits));
      put_le(tensors_[2], 4 * i, bits, 4);
    }
    put_le(tensors_[3], 0, sum, 4);
    for (size_t i = 0; i < 16; ++i) tensors_[4][i] = static_cast<uint8_t>(i);
    tensors_[5].assign(output_.begin(), output_.end());
  }

  std::vector<uint8_t> input_;
  std::vector<uint8_t> output_;
  std::vector<int64_t> sums_;
  std::vector<std::string> names_;
  std::vector<uint32_t> base_us_;
  std::vector<uint32_t> op_us_;
  std::vector<uint32_t> op_cycles_;
  uint32_t total_us_ = 0;  // of every op but op 0
  uint64_t total_cycles_ = 0;
  bool invoke_fails_;
  std::string invoke_error_;
  uint32_t fail_mod_;
  uint32_t invoke_sleep_us_;
  bool preserves_tensors_;
  tinyhil::TensorDesc descs_[kFakeTensors];
  std::vector<uint8_t> tensors_[kFakeTensors];
};

// Staging memory for the worker, sized from the model as the firmware sizes it.
struct Staging {
  std::vector<uint8_t> inputs[2];
  std::vector<uint8_t> outputs[2];
  std::vector<uint32_t> op_us[2];
  std::vector<uint32_t> op_cycles[2];
  tinyhil::StagingBuffers buffers;

  Staging(const tinyhil::DeviceInfo& info) {
    for (int set = 0; set < 2; ++set) {
      inputs[set].resize(info.inputs[0].bytes());
      outputs[set].resize(info.outputs[0].bytes());
      op_us[set].resize(info.op_count);
      op_cycles[set].resize(info.op_count);
      buffers.inputs[set][0] = inputs[set].data();
      buffers.outputs[set][0] = outputs[set].data();
      buffers.op_us[set] = op_us[set].data();
      buffers.op_cycles[set] = op_cycles[set].data();
    }
    buffers.op_capacity = info.op_count;
  }
};

tinyhil::TensorDesc int8_vector(uint32_t length, float scale, int32_t zero_point) {
  tinyhil::TensorDesc desc;
  desc.dtype = static_cast<uint8_t>(tinyhil::DType::kInt8);
  desc.rank = 2;
  desc.dims[0] = 1;
  desc.dims[1] = length;
  desc.scale = scale;
  desc.zero_point = zero_point;
  return desc;
}

[[noreturn]] void usage(const char* problem) {
  std::fprintf(stderr,
               "native_device: %s\nusage: native_device --fd N [--firmware-id ID] [--model-id ID] "
               "[--input-bytes K] [--output-bytes M] [--ops N] [--max-payload P] [--boot-error CODE:TEXT] "
               "[--invoke-error TEXT] [--fail-mod N] [--invoke-sleep-us N] [--worker sync|thread] "
               "[--rx-ns-per-byte N] [--tx-ns-per-byte N] [--idle-gap-ms N] [--tensors none|preserve]\n",
               problem);
  std::exit(2);
}

uint32_t parse_count(const char* text, const char* option, uint32_t low, uint32_t high) {
  char* end = nullptr;
  errno = 0;
  const unsigned long value = std::strtoul(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < low || value > high) {
    static char problem[160];
    std::snprintf(problem, sizeof(problem), "%s wants a number in [%u, %u], got '%s'", option, low, high, text);
    usage(problem);
  }
  return static_cast<uint32_t>(value);
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string option = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + option).c_str());
    const char* value = argv[++i];
    if (option == "--fd") {
      options.fd = static_cast<int>(parse_count(value, "--fd", 0, 1u << 20));
    } else if (option == "--firmware-id") {
      options.firmware_id = value;
    } else if (option == "--model-id") {
      options.model_id = value;
    } else if (option == "--input-bytes") {
      options.input_bytes = parse_count(value, "--input-bytes", 0, 1u << 24);
    } else if (option == "--output-bytes") {
      options.output_bytes = parse_count(value, "--output-bytes", 0, 1u << 24);
    } else if (option == "--ops") {
      options.ops = parse_count(value, "--ops", 0, 65535);
    } else if (option == "--max-payload") {
      options.max_payload = parse_count(value, "--max-payload", 0, 65535);
    } else if (option == "--boot-error") {
      const char* colon = std::strchr(value, ':');
      if (colon == nullptr) usage("--boot-error wants CODE:TEXT");
      const std::string code(value, colon);
      options.boot_error_code = static_cast<uint16_t>(parse_count(code.c_str(), "--boot-error code", 1, 65535));
      options.boot_error_text = colon + 1;
    } else if (option == "--invoke-error") {
      options.invoke_fails = true;
      options.invoke_error = value;
    } else if (option == "--fail-mod") {
      options.fail_mod = parse_count(value, "--fail-mod", 0, 256);
    } else if (option == "--invoke-sleep-us") {
      options.invoke_sleep_us = parse_count(value, "--invoke-sleep-us", 0, 10000000);
    } else if (option == "--worker") {
      if (std::strcmp(value, "sync") != 0 && std::strcmp(value, "thread") != 0) {
        usage("--worker wants sync or thread");
      }
      options.worker = std::strcmp(value, "thread") == 0;
    } else if (option == "--rx-ns-per-byte") {
      options.rx_ns_per_byte = parse_count(value, "--rx-ns-per-byte", 0, 1000000);
    } else if (option == "--tx-ns-per-byte") {
      options.tx_ns_per_byte = parse_count(value, "--tx-ns-per-byte", 0, 1000000);
    } else if (option == "--tensors") {
      if (std::strcmp(value, "none") != 0 && std::strcmp(value, "preserve") != 0) {
        usage("--tensors wants none or preserve");
      }
      options.tensors = std::strcmp(value, "preserve") == 0;
    } else if (option == "--idle-gap-ms") {
      options.idle_gap_ms = parse_count(value, "--idle-gap-ms", 1, 3600000);
    } else {
      usage(("unknown option " + option).c_str());
    }
  }
  if (options.fd < 0) usage("--fd is required");
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const pid_t parent = getppid();

  struct sigaction action = {};
  action.sa_handler = on_sigterm;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: poll() must return so the loop sees the flag
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a closed socket is a write error here, not a death

  // Values of an ESP32-S3 N8R8 devkit, as harness/firmware.py's MemoryBudget.
  tinyhil::DeviceInfo info;
  info.board_kind = tinyhil::kBoardReal;
  info.cpu_mhz = 240;
  info.sram_bytes = 327680;
  info.psram_bytes = 8388608;
  info.flash_bytes = 3342336;
  info.arena_size = 4096;
  info.arena_used = 1024;
  info.max_payload = static_cast<uint16_t>(options.max_payload);
  info.op_count = static_cast<uint16_t>(options.ops);
  info.flags = tinyhil::kFlagEspNn | (options.tensors ? tinyhil::kFlagPreservesTensors : 0);
  info.chip = "ESP32-S3 (native test)";
  info.firmware_id = options.firmware_id.c_str();
  info.model_id = options.model_id.c_str();
  info.n_inputs = 1;
  info.inputs[0] = int8_vector(options.input_bytes, 0.5f, -3);
  info.n_outputs = 1;
  info.outputs[0] = int8_vector(options.output_bytes, 0.25f, 7);

  int wake[2];
  if (::pipe(wake) != 0 || ::fcntl(wake[0], F_SETFL, O_NONBLOCK) != 0 || ::fcntl(wake[1], F_SETFL, O_NONBLOCK) != 0) {
    std::perror("native_device: pipe for the worker's wake-ups");
    return 1;
  }
  FakeModel model(options);
  FdTransport transport(options.fd, options.rx_ns_per_byte, options.tx_ns_per_byte);
  Staging staging(info);
  // A boot error means the firmware has no interpreter to hand over.
  tinyhil::Engine engine(transport, options.boot_error_code != 0 ? nullptr : &model, info, options.boot_error_code,
                         options.boot_error_code != 0 ? options.boot_error_text.c_str() : nullptr);
  // Declared after everything its thread touches (the model, the staging memory, the engine's
  // jobs), so it is joined before they go away.
  engine.set_idle_gap_ms(options.idle_gap_ms);
  ThreadWorker worker(wake[1]);
  if (options.worker && options.boot_error_code == 0 && !engine.use_worker(worker, staging.buffers)) {
    std::fprintf(stderr, "native_device: the engine refused the worker and its staging buffers\n");
    return 1;
  }

  write_all(options.fd, kBootBanner, sizeof(kBootBanner) - 1);
  tinyhil_host::serve(engine, transport, options.fd, wake[0], parent, g_stop);
  const tinyhil::DecodeStats& stats = engine.decode_stats();
  std::fprintf(stderr, "native_device: garbage %u, header errors %u, crc errors %u, oversize %u\n",
               static_cast<unsigned>(stats.garbage_bytes), static_cast<unsigned>(stats.header_errors),
               static_cast<unsigned>(stats.crc_errors), static_cast<unsigned>(stats.oversize));
  return 0;
}
