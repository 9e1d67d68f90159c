// Pure: turns cumulative per-queue counters (as read from the BPF maps) into
// one interval's protocol sample. No I/O, no clock; unit-tested in
// tests/unit/agent/sample_builder_test.cc.
#pragma once

#include <array>
#include <cstdint>

#include "protocol/messages.h"

namespace vkick::agent {

inline constexpr size_t kWhySlots = 8;   // bpf/vkick_agent.h VKICK_AGENT_WHY_SLOTS
inline constexpr size_t kWhyTimer = 3;   // KickWhy::kTimer

// Cumulative counters of one (driver, queue), summed over CPUs, plus the
// maximum depth seen in the interval that was just closed (not cumulative).
struct QueueTotals {
  uint64_t requests = 0;
  uint64_t kicks = 0;
  uint64_t completions = 0;
  uint64_t depth_sum = 0;
  uint64_t latency_sum_ns = 0;
  uint64_t asks = 0;        // event-idx decisions put to the device
  uint64_t suppressed = 0;  // of those, the device wanted no kick
  std::array<uint64_t, kWhySlots> kicks_by_why{};
  std::array<uint64_t, proto::kDepthBuckets> depth_hist{};
  std::array<uint64_t, proto::kLatencyBuckets> latency_hist{};
  uint32_t interval_max_depth = 0;
  friend bool operator==(const QueueTotals&, const QueueTotals&) = default;
};

// What the agent applied to the queue (lease logic, lease.h).
struct AppliedState {
  proto::LeaseState lease = proto::LeaseState::kNone;
  proto::KickMode mode = proto::KickMode::kImmediate;
  uint16_t batch = 1;
  uint32_t defer_ns = 0;
  uint64_t generation = 0;
  friend bool operator==(const AppliedState&, const AppliedState&) = default;
};

// The interval's delta. Counters are read field by field while the probes
// run, so two fields of one read may disagree by a few in-flight events; the
// histograms are the source of truth for `requests` and `completed` (they sum
// to them by construction), and max/mean depth are clamped into what the
// histogram allows. When a counter went backwards (the map entry was
// recreated, e.g. a pid reused), `cur` is taken as the delta.
QueueTotals Delta(const QueueTotals& prev, const QueueTotals& cur);

// The top edge of the highest non-empty bucket of a depth histogram (bucket
// 0: 1, bucket i: 2^(i+1) - 1), capped by the queue's depth limit when it has
// one (> 0); 0 for an empty histogram. For drivers that keep a histogram but
// no per-interval maximum the agent could reset (stats blocks, the
// vkick_virtio_blk module): the law only uses the maximum as a bound.
uint32_t DepthHistMax(const std::array<uint64_t, proto::kDepthBuckets>& hist, uint64_t depth_limit);

// A sample that passes proto::Validate for any input: interval clamped to
// the protocol's range; counts above the 100 M/s bound are impossible from a
// real driver and yield ok = false (the caller skips and counts the queue).
struct BuiltSample {
  proto::QueueSample sample;
  bool ok = true;
};
BuiltSample BuildQueueSample(proto::QueueRef ref, const QueueTotals& delta, uint64_t interval_ns,
                             const AppliedState& applied);

}  // namespace vkick::agent
