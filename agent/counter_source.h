// The agent's view of the probes: an interface so the loop does not depend
// on the BPF skeleton (UsdtProbes implements it).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent/sample_builder.h"

namespace vkick::agent {

using QueueKey = std::pair<int32_t, uint16_t>;  // (pid, queue)

struct CounterSnapshot {
  std::map<QueueKey, QueueTotals> queues;  // cumulative; interval_max_depth per interval
  uint64_t map_full = 0;    // events lost: queue_stats was full
  uint64_t bad_queue = 0;   // probe queue argument out of range
};

class CounterSource {
 public:
  virtual ~CounterSource() = default;
  // Start counting `pid` (binary: its executable, for USDT note lookup).
  virtual absl::Status Track(int32_t pid, const std::string& binary) = 0;
  // Stop counting `pid` and drop its counters.
  virtual void Untrack(int32_t pid) = 0;
  // Reads all counters and closes the max-depth interval.
  virtual absl::StatusOr<CounterSnapshot> Read() = 0;
};

}  // namespace vkick::agent
