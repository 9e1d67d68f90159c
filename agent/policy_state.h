// Pure: the policies the host sent, their leases, and the control-block
// entries they become. Time is an argument (CLOCK_MONOTONIC ns, the clock the
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

// One driver as announced in the current connection's hello (device_index =
// position in this list).
struct AnnouncedDriver {
  int32_t pid = 0;
  uint16_t queues = 1;
  // A kernel virtio_blk disk (observe only: pid 0, never policed), by the
  // kernel's dev_t.
  bool kernel = false;
  uint32_t kdev = 0;
  friend bool operator==(const AnnouncedDriver&, const AnnouncedDriver&) = default;
};

class PolicyState {
 public:
  struct ApplyResult {
    std::vector<int32_t> changed_pids;   // control blocks to rewrite
    uint64_t ack_generation = 0;         // highest generation applied; 0 = none
    uint32_t unknown_queues = 0;         // refs outside the hello
    uint32_t unsupported_queues = 0;     // queue index >= the control block's 16 entries
    uint32_t observe_only_queues = 0;    // queues of kernel disks: never applied
  };

  // Applies a (validated) policy: each queue's lease starts at now_ns.
  ApplyResult Apply(const proto::Policy& policy, const std::vector<AnnouncedDriver>& hello, uint64_t now_ns);

  // What a sample reports for (pid, queue) at now_ns: none before any policy,
  // active while now < expiry, expired after (the driver then runs its
  // default, immediate, which is what `mode/batch/defer` report).
  AppliedState StateOf(int32_t pid, uint16_t queue, uint64_t now_ns) const;

  // The control block entries for a driver with `queues` queues (at most
  // kControlBlockMaxQueues). Queues without a policy: immediate, expiry 0.
  std::vector<ControlEntry> EntriesFor(int32_t pid, uint16_t queues) const;

  // Forget a driver that went away.
  void Forget(int32_t pid);

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
  std::map<std::pair<int32_t, uint16_t>, Applied> applied_;
};

}  // namespace vkick::agent
