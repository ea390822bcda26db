// Boots the model runner with a generated model_config.h (harness/firmware.py) the way the chip's
// firmware does, and prints "ok" or the boot error: the generated op resolver must cover every
// operator of every subgraph (tests/test_virtual_native.py).
//
// resolver_check MODEL.tflite
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "model_config.h"
#include "model_runner.h"

namespace {

class SteadyClock final : public tinyhil::Clock {
 public:
  int64_t micros() override {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  uint32_t cycles() override { return static_cast<uint32_t>(micros() * 240); }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: resolver_check MODEL.tflite\n");
    return 2;
  }
  FILE* file = std::fopen(argv[1], "rb");
  if (file == nullptr) {
    std::perror(argv[1]);
    return 2;
  }
  std::vector<unsigned char> bytes;
  int c;
  while ((c = std::fgetc(file)) != EOF) bytes.push_back(static_cast<unsigned char>(c));
  std::fclose(file);
  auto* model = static_cast<uint8_t*>(std::aligned_alloc(16, (bytes.size() + 15) / 16 * 16));
  std::copy(bytes.begin(), bytes.end(), model);
  auto* arena = static_cast<uint8_t*>(std::aligned_alloc(16, TINYHIL_ARENA_BYTES));
  std::vector<uint32_t> op_us(TINYHIL_OP_COUNT + 1), op_cycles(TINYHIL_OP_COUNT + 1);
  static TinyhilOpResolver resolver;
  if (!tinyhil_register_ops(resolver)) {
    std::printf("tinyhil_register_ops failed\n");
    return 1;
  }
  tinyhil::RunnerMemory memory;
  memory.arena = arena;
  memory.arena_bytes = TINYHIL_ARENA_BYTES;
  memory.op_us = op_us.data();
  memory.op_cycles = op_cycles.data();
  memory.op_capacity = TINYHIL_OP_COUNT;
  SteadyClock clock;
  static tinyhil::ModelRunner runner(clock, memory);
  tinyhil::DeviceInfo info;
  tinyhil::ErrorText error;
  const uint16_t code = runner.boot(model, resolver, info, error);
  if (code != 0) {
    std::printf("boot error %u: %s\n", static_cast<unsigned>(code), error.text);
    return 1;
  }
  std::printf("ok: %u operators in the main subgraph\n", static_cast<unsigned>(info.op_count));
  return 0;
}
