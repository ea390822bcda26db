// The host layer of tinyhil's native builds: what the chip layer (firmware/src/main.cpp) does with
// the USB port and the second core, done with a file descriptor and a std::thread. Shared by the
// virtual board's firmware (firmware/host/main.cpp) and the protocol engine's native test program
// (firmware/test/native/native_device.cpp).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <deque>
#include <mutex>
#include <thread>

#include "tinyhil_protocol.h"

namespace tinyhil_host {

class FdTransport final : public tinyhil::Transport {
 public:
  FdTransport(int fd, uint32_t rx_ns_per_byte, uint32_t tx_ns_per_byte)
      : fd_(fd), rx_(rx_ns_per_byte), tx_(tx_ns_per_byte) {}

  size_t read(uint8_t* dst, size_t max) override {
    if (max == 0) return 0;
    struct pollfd ready = {fd_, POLLIN, 0};
    if (::poll(&ready, 1, 0) <= 0 || !(ready.revents & POLLIN)) return 0;
    const ssize_t got = ::read(fd_, dst, max);
    if (got > 0) {
      rx_.pace(static_cast<size_t>(got));
      return static_cast<size_t>(got);
    }
    if (got == 0) {
      closed_ = true;  // a socket's peer went away; a pty master reports EIO instead
    } else if (errno == EIO) {
      nobody_listening_ = true;
    }
    return 0;
  }

  void write(const uint8_t* src, size_t len) override {
    tx_.pace(len);
    while (len > 0) {
      const ssize_t put = ::write(fd_, src, len);
      if (put > 0) {
        src += put;
        len -= static_cast<size_t>(put);
        continue;
      }
      if (put < 0 && errno == EINTR) continue;
      if (put < 0 && errno == EAGAIN) {
        struct pollfd ready = {fd_, POLLOUT, 0};
        ::poll(&ready, 1, 100);
        continue;
      }
      return;  // nobody is listening: a board keeps running and its bytes are lost
    }
  }

  bool closed() const { return closed_; }
  bool take_nobody_listening() {
    const bool was = nobody_listening_;
    nobody_listening_ = false;
    return was;
  }

 private:
  // One direction of a link of limited speed: bytes pass no earlier than they would at that speed.
  // Measured against a running clock, so oversleeping once does not slow the link for good.
  class Pace {
   public:
    explicit Pace(uint32_t ns_per_byte) : ns_per_byte_(ns_per_byte) {}
    void pace(size_t bytes) {
      if (ns_per_byte_ == 0) return;
      const auto now = std::chrono::steady_clock::now();
      if (free_ < now) free_ = now;
      free_ += std::chrono::nanoseconds(static_cast<int64_t>(bytes) * ns_per_byte_);
      std::this_thread::sleep_until(free_);
    }

   private:
    uint32_t ns_per_byte_;
    std::chrono::steady_clock::time_point free_{};
  };

  int fd_;
  Pace rx_;
  Pace tx_;
  bool closed_ = false;
  bool nobody_listening_ = false;
};


// The engine's Worker on a std::thread: what the firmware does with a FreeRTOS task on the other
// core. A byte on `wake_fd` tells the main loop, which sleeps in poll(), that a job finished.
class ThreadWorker final : public tinyhil::Worker {
 public:
  explicit ThreadWorker(int wake_fd) : wake_fd_(wake_fd), thread_([this] { serve(); }) {}

  ~ThreadWorker() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    ready_.notify_one();
    thread_.join();
  }

  void submit(tinyhil::InferenceJob* job) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      todo_.push_back(job);
    }
    ready_.notify_one();
  }

  tinyhil::InferenceJob* finished() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_.empty()) return nullptr;
    tinyhil::InferenceJob* job = done_.front();
    done_.pop_front();
    return job;
  }

 private:
  void serve() {
    for (;;) {
      tinyhil::InferenceJob* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stop_ || !todo_.empty(); });
        if (stop_) return;
        job = todo_.front();
        todo_.pop_front();
      }
      job->run();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.push_back(job);
      }
      const char byte = 1;
      while (::write(wake_fd_, &byte, 1) < 0 && errno == EINTR) {
      }
    }
  }

  int wake_fd_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<tinyhil::InferenceJob*> todo_;
  std::deque<tinyhil::InferenceJob*> done_;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything it uses exists
};


inline void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t put = ::write(fd, data, size);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) return;
    data += put;
    size -= static_cast<size_t>(put);
  }
}


// The link task of the chip layer: serves the engine until `stop` is set, the parent process is gone
// (this process dies with whoever started it) or the peer of a socket closed it. `wake_fd` gets a
// byte from the ThreadWorker whenever a job finishes.
// The chip layer's clock for the engine's idle gap: milliseconds of the steady clock, wrapping.
inline uint32_t now_ms() {
  return static_cast<uint32_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

inline void serve(tinyhil::Engine& engine, FdTransport& transport, int fd, int wake_fd, pid_t parent,
                  volatile sig_atomic_t& stop) {
  while (!stop && getppid() == parent) {
    // While a request waits for the worker, unread bytes must not wake the loop: only the worker can.
    struct pollfd ready[2] = {{fd, static_cast<short>(engine.waiting_for_worker() ? 0 : POLLIN), 0},
                              {wake_fd, POLLIN, 0}};
    // Holding part of a frame, the loop must look again within the idle gap to drop it in time.
    const bool partial = engine.holding_partial_frame();
    const int events = ::poll(ready, 2, partial ? static_cast<int>(std::min<uint32_t>(engine.idle_gap_ms() / 5 + 1, 200)) : 200);
    if (events < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (events == 0 && !partial) continue;
    if (ready[1].revents & POLLIN) {
      char sink[64];
      while (::read(wake_fd, sink, sizeof(sink)) > 0) {
      }
    }
    engine.poll(now_ms());
    if (transport.closed()) break;
    if (transport.take_nobody_listening() || (!(ready[0].revents & POLLIN) && (ready[0].revents & POLLHUP))) {
      usleep(50 * 1000);  // a pty without a reader: wait for the host to come back, as a board does
    }
  }
}

}  // namespace tinyhil_host
