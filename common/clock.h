// The monotonic clock every part of vkick agrees on: CLOCK_MONOTONIC in ns,
// the clock of bpf_ktime_get_ns(), of the control block's leases and of the
// kernel driver's hrtimers, so timestamps from BPF maps, drivers and the
// daemon compare directly.
#pragma once

#include <time.h>

#include <cstdint>

namespace vkick {

inline uint64_t MonotonicNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace vkick
