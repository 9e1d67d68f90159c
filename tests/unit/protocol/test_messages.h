// Valid example messages shared by the protocol tests (and mirrored by the
// fuzz seed generator).
#pragma once

#include <vector>

#include "protocol/codec.h"
#include "protocol/messages.h"

namespace vkick::proto::testing {

inline Hello MakeHello() {
  Hello h;
  h.agent_id = "guest-1.vkick";
  h.kernel = "6.1.0-27-amd64 #1 SMP PREEMPT_DYNAMIC";
  h.devices.push_back({.pci_domain = 0, .pci_bus = 0, .pci_devfn = 4 << 3, .serial = "disk0",
                       .num_queues = 2, .queue_size = 256});
  h.devices.push_back({.pci_domain = 0, .pci_bus = 1, .pci_devfn = (2 << 3) | 1, .serial = "",
                       .num_queues = 4, .queue_size = 1024, .driver = DriverKind::kKernel});
  return h;
}

// A static policy for one queue (the host's usual message in tests).
inline QueuePolicy StaticQueuePolicy(QueueRef ref, uint16_t batch, uint32_t defer_ns,
                                     uint64_t lease_ns, uint64_t generation) {
  QueuePolicy q;
  q.ref = ref;
  q.mode = KickMode::kStatic;
  q.batch = batch;
  q.defer_ns = defer_ns;
  q.lease_ns = lease_ns;
  q.generation = generation;
  return q;
}

// A consistent queue sample: `requests` submissions at depth `depth`,
// all completed with ~100 us latency.
inline QueueSample MakeQueueSample(uint16_t dev, uint16_t q, uint64_t requests = 1000,
                                   uint16_t depth = 32) {
  QueueSample s;
  s.ref = {dev, q};
  s.interval_ns = 1'000'000'000;
  s.requests = requests;
  s.kicks = requests / 16;
  s.timer_kicks = s.kicks / 4;
  s.asks = s.kicks * 2;
  s.suppressed = s.kicks;
  s.completed = requests;
  if (requests) {
    s.depth_hist[DepthBucket(depth)] = requests;
    s.latency_hist[LatencyBucket(100'000)] = requests;
    s.mean_depth_milli = uint32_t{depth} * 1000;
    s.max_depth = depth;
  }
  s.lease = LeaseState::kActive;
  s.applied_mode = KickMode::kAdaptive;
  s.applied_batch = 16;
  s.applied_defer_ns = 50'000;
  s.applied_generation = 7;
  return s;
}

inline Sample MakeSample(uint64_t seq = 1) {
  Sample s;
  s.seq = seq;
  s.queues.push_back(MakeQueueSample(0, 0));
  s.queues.push_back(MakeQueueSample(1, 3, 0));
  return s;
}

inline Policy MakePolicy() {
  Policy p;
  p.queues.push_back({.ref = {0, 0}, .mode = KickMode::kAdaptive, .batch = 16,
                      .defer_ns = 50'000, .lease_ns = 5'000'000'000, .generation = 7});
  p.queues.push_back({.ref = {0, 1}, .mode = KickMode::kImmediate, .batch = 1, .defer_ns = 0,
                      .lease_ns = 5'000'000'000, .generation = 8});
  p.queues.push_back({.ref = {1, 2}, .mode = KickMode::kStatic, .batch = 8,
                      .defer_ns = 1'000'000, .lease_ns = 10'000'000, .generation = 9});
  return p;
}

inline std::vector<Message> AllValidMessages() {
  return {MakeHello(), MakeSample(), MakePolicy(), Ack{.generation = 7},
          Error{.code = ErrorCode::kUnsupported, .text = "event-idx not negotiated"},
          Bye{.reason = ByeReason::kRestart}};
}

inline std::vector<uint8_t> Frame(const Message& m) { return Encode(m).bytes; }

}  // namespace vkick::proto::testing
