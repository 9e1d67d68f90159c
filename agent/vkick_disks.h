// The vkick_virtio_blk module's disks (docs/kernel-driver.md), as the agent
// sees them: each hardware queue's counters (sysfs `stats`: one read per
// queue per interval, nothing per request) and the host's policy for a queue
// (sysfs `steer`: one write per policy message). Discovery is kernel_disks.h.
//
// Paths start at a sysfs root that is an argument, so everything here is
// unit-tested on a fake tree of regular files (tests/unit/agent/).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "agent/kernel_disks.h"
#include "agent/sample_builder.h"
#include "protocol/messages.h"

namespace vkick::agent {

inline constexpr size_t kMaxVkickStatsBytes = 4096;  // a sysfs attribute is < 1 page

// One queue's `stats` file.
struct VkickQueueStats {
  QueueTotals totals;            // cumulative; interval_max_depth left 0
  uint64_t timer_kicks = 0;      // of `kicks`, by the deferral timer
  uint64_t depth_limit = 0;      // requests in flight at most (blk-mq tag depth)
  uint64_t inflight = 0;         // requests in flight at the read
  uint64_t rejected_writes = 0;  // policy/steer writes the module refused
};

// Pure. Every documented key exactly once with its count of decimal u64
// values, else nullopt (the file is counted unreadable, never trusted in
// part). Lines with keys it does not know are skipped: the module may add
// keys at the end.
std::optional<VkickQueueStats> ParseVkickQueueStats(absl::string_view text);

// Pure: "<generation> <mode> <batch> <defer_ns> <lease_ms>\n", what `steer`
// takes. The host's adaptive is written as static, as vkick-blk's control
// block reads it (the law sends its own B and T); the lease in ms is rounded
// up (the module never ends it before the host's lease) into 10..60000.
std::string SteerLine(const proto::QueuePolicy& p);

// <sysfs_root>/block/<disk>/vkick/q<queue>
std::string VkickQueueDir(const std::string& sysfs_root, const std::string& disk, uint16_t queue);

// Writes SteerLine(p) to the queue's `steer`. The module's -EINVAL (a value
// it refuses) or a missing file come back as the error.
absl::Status WriteSteer(const std::string& sysfs_root, const std::string& disk, const proto::QueuePolicy& p);

// Reads the disks' `stats` files. Not thread-safe (the agent's loop thread).
class VkickDiskStats {
 public:
  explicit VkickDiskStats(std::string sysfs_root) : root_(std::move(sysfs_root)) {}

  // Each queue of the disk whose file reads and parses: its cumulative
  // totals, interval_max_depth from the depth histogram's change since this
  // queue's previous read (DepthHistMax: the module keeps no per-interval
  // maximum). A queue missing from the result was unreadable (counted).
  std::map<uint16_t, QueueTotals> Read(const KernelDisk& disk);
  // Drops a disk's previous reads (it went away).
  void Forget(uint32_t kdev);
  uint64_t unreadable() const { return unreadable_; }

 private:
  std::string root_;
  std::map<std::pair<uint32_t, uint16_t>, QueueTotals> last_;  // (kdev, queue)
  uint64_t unreadable_ = 0;
};

}  // namespace vkick::agent
