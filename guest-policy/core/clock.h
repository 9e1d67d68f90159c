// Time source for the kick scheduler: injected so tests drive a fake clock.
#pragma once

#include <cstdint>
#include <ctime>

#include "common/clock.h"

namespace vkick {

class Clock {
 public:
  virtual ~Clock() = default;
  // CLOCK_MONOTONIC in ns: the same clock the control block's lease uses.
  virtual uint64_t NowNs() const = 0;
};

class MonotonicClock final : public Clock {
 public:
  uint64_t NowNs() const override { return MonotonicNowNs(); }
};

class FakeClock final : public Clock {
 public:
  explicit FakeClock(uint64_t start_ns = 1'000'000'000) : now_(start_ns) {}
  uint64_t NowNs() const override { return now_; }
  void Advance(uint64_t ns) { now_ += ns; }
  void Set(uint64_t ns) { now_ = ns; }

 private:
  uint64_t now_;
};

}  // namespace vkick
