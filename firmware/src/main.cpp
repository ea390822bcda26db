// tinyhil firmware, chip layer: ESP-IDF glue around the portable core (components/tinyhil: the
// protocol engine and the TFLite Micro model runner, which the virtual board also runs).
//
// This file only connects the core to the link (USB Serial/JTAG or UART0), the clock, the heap and
// the two cores. model_config.h and model_data.cpp are generated per model by harness/firmware.py.
//
// Two tasks: the link (engine) on core 0 and inference on core 1, handing jobs over through two
// FreeRTOS queues. While core 1 runs Invoke() for sample k, core 0 keeps reading, checking and
// staging sample k+1 and sending result k-1. Core 0 takes the link because the driver's interrupt
// is allocated on the core that installs it, next to the few system tasks of a WiFi-less ESP-IDF
// (esp_timer, IPC); core 1 is left to the model. A single-core build (CONFIG_FREERTOS_UNICORE)
// runs the engine synchronously instead.
//
// The console (ESP_LOG, printf) is kept off the link by sdkconfig (harness/firmware.py renders it
// per link kind); nothing here prints.
//
// Not compiled for the ESP32-S3 in this project's CI (no Xtensa toolchain there): written against
// ESP-IDF 5.5.3 and esp-tflite-micro 1.3.8 (docs/hardware.md says what was checked).

#include <cstdio>
#include <cstring>
#include <new>

#include "esp_chip_info.h"
#include "esp_cpu.h"
#include "esp_heap_caps.h"
#include "esp_psram.h"
#include "esp_rom_sys.h"
#include "esp_timer.h"
#include "freertos/FreeRTOS.h"
#include "freertos/queue.h"
#include "freertos/task.h"
#include "model_config.h"
#include "model_data.h"
#include "model_runner.h"
#include "sdkconfig.h"
#include "tinyhil_protocol.h"
#if TINYHIL_LINK_UART
#include "driver/uart.h"
#else
#include "driver/usb_serial_jtag.h"
#endif

// The debug build (platformio.ini [env:esp32s3-debug-tensors]) keeps every tensor for GET_TENSOR.
// Its arena is sized for that by harness/firmware.py, which says in model_config.h which build the
// image was planned for: an image built with the other env would boot with the wrong arena.
#ifndef TINYHIL_PRESERVE_ALL_TENSORS
#define TINYHIL_PRESERVE_ALL_TENSORS 0
#endif
#if TINYHIL_PRESERVE_ALL_TENSORS != TINYHIL_IMAGE_PRESERVES_TENSORS
#error "model_config.h was planned for the other build: build the debug image (preserve_all_tensors) with `pio run -e esp32s3-debug-tensors`, the normal one with `-e esp32s3`"
#endif

namespace {

#if defined(CONFIG_FREERTOS_UNICORE) && CONFIG_FREERTOS_UNICORE
constexpr bool kTwoCores = false;
#else
constexpr bool kTwoCores = true;
#endif

constexpr BaseType_t kLinkCore = 0;
constexpr BaseType_t kInferenceCore = 1;
// Each task is alone on its core apart from system tasks.
constexpr UBaseType_t kTaskPriority = 5;
// TFLM does not document kernel stack use: margin. On one core the link task runs Invoke() itself.
constexpr uint32_t kInferenceStackBytes = 16384;
constexpr uint32_t kLinkStackBytes = kTwoCores ? 8192 : 16384;
// The host keeps up to four frames unanswered (harness/board/link.py); they wait in the driver's
// receive buffer whenever the engine cannot take them yet.
constexpr size_t kRxBufferBytes = 4 * tinyhil::kMaxFrame;
constexpr size_t kTxBufferBytes = 2 * tinyhil::kMaxFrame;
// Staging buffers go to internal SRAM only while this much stays free for the system; else to
// PSRAM, where a copy costs more but nothing else has to give way.
constexpr size_t kInternalHeadroom = 16 * 1024;

class ChipClock final : public tinyhil::Clock {
 public:
  int64_t micros() override { return esp_timer_get_time(); }
  uint32_t cycles() override { return static_cast<uint32_t>(esp_cpu_get_cycle_count()); }
};

#if TINYHIL_LINK_UART
// UART0 through the board's USB-serial bridge, at the suite's baud rate.
class LinkTransport final : public tinyhil::Transport {
 public:
  bool begin() {
    uart_config_t config = {};
    config.baud_rate = TINYHIL_UART_BAUD;
    config.data_bits = UART_DATA_8_BITS;
    config.parity = UART_PARITY_DISABLE;
    config.stop_bits = UART_STOP_BITS_1;
    config.flow_ctrl = UART_HW_FLOWCTRL_DISABLE;
    config.source_clk = UART_SCLK_DEFAULT;
    return uart_driver_install(UART_NUM_0, kRxBufferBytes, kTxBufferBytes, 0, nullptr, 0) == ESP_OK &&
           uart_param_config(UART_NUM_0, &config) == ESP_OK;
  }
  size_t read(uint8_t* dst, size_t max) override {
    const int got = uart_read_bytes(UART_NUM_0, dst, max, 0);
    return got > 0 ? static_cast<size_t>(got) : 0;
  }
  void write(const uint8_t* src, size_t len) override {
    // Blocks until the driver has taken everything: a frame is never dropped.
    uart_write_bytes(UART_NUM_0, src, len);
  }
};
#else
// The native USB port through the USB Serial/JTAG driver (full speed; the host's baud is ignored).
class LinkTransport final : public tinyhil::Transport {
 public:
  bool begin() {
    usb_serial_jtag_driver_config_t config = USB_SERIAL_JTAG_DRIVER_CONFIG_DEFAULT();
    config.rx_buffer_size = kRxBufferBytes;
    config.tx_buffer_size = kTxBufferBytes;
    return usb_serial_jtag_driver_install(&config) == ESP_OK;
  }
  size_t read(uint8_t* dst, size_t max) override {
    const int got = usb_serial_jtag_read_bytes(dst, max, 0);
    return got > 0 ? static_cast<size_t>(got) : 0;
  }
  void write(const uint8_t* src, size_t len) override {
    while (len > 0) {
      // Waits while the host is not reading instead of dropping part of a frame.
      const int put = usb_serial_jtag_write_bytes(src, len, pdMS_TO_TICKS(100));
      if (put > 0) {
        src += put;
        len -= static_cast<size_t>(put);
      }
    }
  }
};
#endif

// The engine's Worker: a task pinned to kInferenceCore. The queues carry job pointers both ways;
// their internal locking orders the job's writes on one core before the reads on the other (the
// S3's two cores also share one data cache, so PSRAM staging needs no cache maintenance).
class FreeRtosWorker final : public tinyhil::Worker {
 public:
  bool start() {
    // Two of each: the engine never has more than two jobs outstanding, so neither send blocks.
    submitted_ = xQueueCreate(2, sizeof(tinyhil::InferenceJob*));
    finished_ = xQueueCreate(2, sizeof(tinyhil::InferenceJob*));
    if (submitted_ == nullptr || finished_ == nullptr) return false;
    return xTaskCreatePinnedToCore(&FreeRtosWorker::serve, "tinyhil-infer", kInferenceStackBytes, this, kTaskPriority,
                                   nullptr, kInferenceCore) == pdPASS;
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

LinkTransport transport;
ChipClock chip_clock;
TinyhilOpResolver resolver;
tinyhil::DeviceInfo info;
tinyhil::ErrorText boot_error;
uint32_t op_us[TINYHIL_OP_COUNT + 1];
uint32_t op_cycles[TINYHIL_OP_COUNT + 1];
alignas(tinyhil::ModelRunner) uint8_t runner_storage[sizeof(tinyhil::ModelRunner)];
alignas(tinyhil::Engine) uint8_t engine_storage[sizeof(tinyhil::Engine)];
tinyhil::Engine* engine = nullptr;
FreeRtosWorker worker;
tinyhil::StagingBuffers staging;
// Per-op timings of the two jobs: copied out of the profiler before the next Invoke clears it.
uint32_t staged_op_us[2][TINYHIL_OP_COUNT + 1];
uint32_t staged_op_cycles[2][TINYHIL_OP_COUNT + 1];
char chip_name[32];

uint16_t boot(tinyhil::ModelRunner** runner) {
  if (!tinyhil_register_ops(resolver)) {
    boot_error.format("op resolver rejected a registration (%d op types)", TINYHIL_OP_TYPES);
    return static_cast<uint16_t>(tinyhil::ErrorCode::kUnsupportedOp);
  }
  const uint32_t caps = TINYHIL_ARENA_IN_PSRAM ? (MALLOC_CAP_SPIRAM | MALLOC_CAP_8BIT)
                                               : (MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT);
  auto* arena = static_cast<uint8_t*>(heap_caps_aligned_alloc(16, TINYHIL_ARENA_BYTES, caps));
  if (arena == nullptr) {
    boot_error.format("heap_caps_malloc(%d) for the tensor arena failed: %s has %u bytes free", TINYHIL_ARENA_BYTES,
                      TINYHIL_ARENA_IN_PSRAM ? "PSRAM" : "internal SRAM",
                      static_cast<unsigned>(heap_caps_get_largest_free_block(caps)));
    return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }
  tinyhil::RunnerMemory memory;
  memory.arena = arena;
  memory.arena_bytes = TINYHIL_ARENA_BYTES;
  memory.op_us = op_us;
  memory.op_cycles = op_cycles;
  memory.op_capacity = TINYHIL_OP_COUNT;
  memory.preserve_all_tensors = TINYHIL_PRESERVE_ALL_TENSORS != 0;
  *runner = new (runner_storage) tinyhil::ModelRunner(chip_clock, memory);
  return (*runner)->boot(tinyhil_model, resolver, info, boot_error);
}

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
    boot_error.format("heap_caps_malloc(%u) for staging %s %d of set %d failed: internal SRAM has %u bytes free "
                      "(%u kept back), PSRAM %u",
                      static_cast<unsigned>(bytes), what, index, set,
                      static_cast<unsigned>(heap_caps_get_largest_free_block(internal)),
                      static_cast<unsigned>(kInternalHeadroom),
                      static_cast<unsigned>(heap_caps_get_largest_free_block(psram)));
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
    boot_error.format("xTaskCreatePinnedToCore(%u-byte stack) for the inference task on core %d failed: internal SRAM "
                      "has %u bytes free",
                      static_cast<unsigned>(kInferenceStackBytes), static_cast<int>(kInferenceCore),
                      static_cast<unsigned>(heap_caps_get_largest_free_block(MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT)));
    return static_cast<uint16_t>(tinyhil::ErrorCode::kArenaAllocationFailed);
  }
  return 0;
}

// Serves the link on kLinkCore. The driver is installed here, not in app_main, so that its
// interrupt is allocated on this core and does not interrupt inference on the other.
void link_task(void* /*arg*/) {
  uint16_t error = transport.begin() ? 0 : static_cast<uint16_t>(tinyhil::ErrorCode::kModelLoadFailed);
  tinyhil::ModelRunner* runner = nullptr;
  if (error != 0) {
    // Nothing can be reported without the link; leave the console the reason.
    std::printf("tinyhil: link driver installation failed\n");
    vTaskDelete(nullptr);
    return;
  }
  error = boot(&runner);
  if (error == 0 && kTwoCores) error = start_worker();
  engine = new (engine_storage) tinyhil::Engine(transport, error ? nullptr : runner, info, error,
                                                error ? boot_error.text : nullptr);
  // Refused only for a missing buffer, which start_worker() already reported as a boot error.
  if (error == 0 && kTwoCores) engine->use_worker(worker, staging);
  for (;;) {
    // esp_timer's microseconds as wrapping milliseconds: the engine's clock for the idle gap.
    if (engine->poll(static_cast<uint32_t>(esp_timer_get_time() / 1000))) continue;
    // Nothing arrived and no job finished: block instead of spinning, so core 0's idle task runs
    // (the task watchdog checks it). A finished job wakes the link at once; new bytes are looked
    // for after one tick (1 ms, CONFIG_FREERTOS_HZ=1000), which the receive buffer absorbs.
    if (kTwoCores) {
      worker.wait(engine->waiting_for_worker() ? pdMS_TO_TICKS(100) : 1);
    } else {
      vTaskDelay(1);
    }
  }
}

}  // namespace

extern "C" void app_main(void) {
  esp_chip_info_t chip;
  esp_chip_info(&chip);
  std::snprintf(chip_name, sizeof(chip_name), "ESP32-S3 rev %d.%d", chip.revision / 100, chip.revision % 100);
  info.board_kind = tinyhil::kBoardReal;
  // The clock sdkconfig set (CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ), as the ROM's tick rate reports it.
  info.cpu_mhz = static_cast<uint16_t>(esp_rom_get_cpu_ticks_per_us());
  info.sram_bytes = TINYHIL_SRAM_BYTES;
  info.psram_bytes = static_cast<uint32_t>(esp_psram_get_size());
  info.flash_bytes = TINYHIL_FLASH_APP_BYTES;
  info.arena_size = TINYHIL_ARENA_BYTES;
  info.flags = (TINYHIL_ESP_NN ? tinyhil::kFlagEspNn : 0) | (TINYHIL_ARENA_IN_PSRAM ? tinyhil::kFlagArenaInPsram : 0);
  info.chip = chip_name;
  info.firmware_id = TINYHIL_FIRMWARE_ID;
  info.model_id = TINYHIL_MODEL_ID;
  if (xTaskCreatePinnedToCore(&link_task, "tinyhil-link", kLinkStackBytes, nullptr, kTaskPriority, nullptr,
                              kLinkCore) != pdPASS) {
    // Without the link task nothing could report anything: serve the link from this task.
    link_task(nullptr);
  }
  // app_main returns; the main task ends and the link and inference tasks carry on.
}
