// Pure: the policies the host sent, their leases, and the control-block
// entries they become (vkick-blk; a vkick_virtio_blk queue's steer line is
// vkick_disks.h's SteerLine). Time is an argument (CLOCK_MONOTONIC ns, the clock the
// driver compares lease_expiry_ns with), so the lease logic is tested with a
// fake clock (tests/unit/agent/policy_state_test.cc).
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "agent/sample_builder.h"
#include "guest-policy/core/control_block.h"
#include "protocol/messages.h"

namespace vkick::agent {

// Whom a policy applies to: a vkick-blk process (its control block), or a
// vkick_virtio_blk disk by the kernel's dev_t (its sysfs steer files).
struct SteerTarget {
  int32_t pid = 0;
  uint32_t kdev = 0;
  auto operator<=>(const SteerTarget&) const = default;
};

// One driver as announced in the current connection's hello (device_index =
// position in this list).
struct AnnouncedDriver {
  int32_t pid = 0;
  uint16_t queues = 1;
  // kVkickBlk: the process `pid`. A kernel disk otherwise (pid 0), by the
  // kernel's dev_t: kKernel (stock virtio_blk, observe only, never policed)
  // or kVkickVirtioBlk (steered).
  proto::DriverKind driver = proto::DriverKind::kVkickBlk;
  uint32_t kdev = 0;
  bool disk() const { return driver != proto::DriverKind::kVkickBlk; }
  SteerTarget target() const { return {pid, kdev}; }
  friend bool operator==(const AnnouncedDriver&, const AnnouncedDriver&) = default;
};

class PolicyState {
 public:
  struct ApplyResult {
    std::vector<int32_t> changed_pids;   // control blocks to rewrite (vkick-blk only)
    uint64_t ack_generation = 0;         // highest generation applied; 0 = none
    uint32_t unknown_queues = 0;         // refs outside the hello
    uint32_t unsupported_queues = 0;     // vkick-blk queue index >= the control block's 16 entries
    uint32_t observe_only_queues = 0;    // queues of stock virtio_blk disks: never applied
  };

  // Applies a (validated) policy: each queue's lease starts at now_ns.
  // vkick_virtio_blk queues are recorded for their samples; the caller
  // writes their steer files (before: a refused write is not applied).
  ApplyResult Apply(const proto::Policy& policy, const std::vector<AnnouncedDriver>& hello, uint64_t now_ns);

  // What a sample reports for (target, queue) at now_ns: none before any
  // policy, active while now < expiry, expired after (the driver then runs
  // its default, immediate, which is what `mode/batch/defer` report).
  AppliedState StateOf(SteerTarget target, uint16_t queue, uint64_t now_ns) const;

  // The control block entries for a driver with `queues` queues (at most
  // kControlBlockMaxQueues). Queues without a policy: immediate, expiry 0.
  std::vector<ControlEntry> EntriesFor(int32_t pid, uint16_t queues) const;

  // Forget a driver or disk that went away.
  void Forget(SteerTarget target);

  // Latest lease expiry over all queues (0 if none): for logs/tests.
  uint64_t LatestExpiry() const;

 private:
  struct Applied {
    proto::KickMode mode = proto::KickMode::kImmediate;
    uint16_t batch = 1;
    uint32_t defer_ns = 0;
    uint64_t generation = 0;
    uint64_t expiry_ns = 0;
  };
  std::map<std::pair<SteerTarget, uint16_t>, Applied> applied_;
};

}  // namespace vkick::agent
