// The agent's view of the drivers' counters: an interface so the loop does
// not depend on where they come from. StatsSource (the default) reads each
// driver's stats block once per interval; UsdtProbes counts its USDT probes
// with eBPF uprobes (a trap per request: --observe=usdt).
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
  uint64_t unreadable = 0;  // stats blocks not read (gone, invalid, another writer)
};

// A registered driver process, as a counter source needs to find it.
struct TrackedDriver {
  int32_t pid = 0;
  std::string binary;       // its executable (USDT note lookup)
  std::string stats_block;  // its stats block file; empty: none
};

class CounterSource {
 public:
  virtual ~CounterSource() = default;
  // Start counting the driver.
  virtual absl::Status Track(const TrackedDriver& d) = 0;
  // Stop counting `pid` and drop its counters.
  virtual void Untrack(int32_t pid) = 0;
  // Reads all counters and closes the max-depth interval.
  virtual absl::StatusOr<CounterSnapshot> Read() = 0;
};

// The kernel's own virtio_blk disks, observed from the block raw tracepoints
// (BlockObserver implements it). Disks are named by the kernel's dev_t as the
// tracepoints report it: (major << 20) | minor (KernelDev()).
struct DiskSnapshot {
  // Cumulative per watched disk, in QueueTotals' shape (kicks stay 0: the
  // guest cannot see the kernel driver's notifications); interval_max_depth
  // per interval.
  std::map<uint32_t, QueueTotals> disks;
  uint64_t map_full = 0;       // issues whose start could not be recorded
  uint64_t missing_start = 0;  // completes without a recorded issue
  uint64_t underflow = 0;      // in-flight kept from going below 0
  uint64_t bad_slot = 0;       // a filter entry naming no counter slot (a bug)
  uint64_t reissue = 0;        // requeued requests handed to the driver again
  uint64_t stale_start = 0;    // starts of requests whose completion was never seen, replaced
                               // when their struct request was issued again
  uint64_t expired_start = 0;  // such starts older than 30 s, dropped by the observer's sweep
  uint64_t prog_misses = 0;    // the kernel's recursion_misses of the two handlers (each a
                               // request or completion not seen)
};

class DiskCounterSource {
 public:
  virtual ~DiskCounterSource() = default;
  // Start counting the disk (idempotent).
  virtual absl::Status Watch(uint32_t kdev) = 0;
  // Stop counting it and drop its counters.
  virtual void Unwatch(uint32_t kdev) = 0;
  // Reads all counters and closes the max-depth interval.
  virtual absl::StatusOr<DiskSnapshot> Read() = 0;
};

// The kernel's dev_t encoding (include/linux/kdev_t.h MKDEV), which the block
// tracepoints report; glibc's makedev() is a different encoding.
constexpr uint32_t KernelDev(uint32_t major, uint32_t minor) { return (major << 20) | (minor & 0xfffff); }

}  // namespace vkick::agent
