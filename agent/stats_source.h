// StatsSource: the agent's default CounterSource. Each registered vkick-blk
// keeps its per-queue counters and histograms in its stats block
// (guest-policy/core/stats_block.h); Read() copies every tracked driver's
// block with one pread() per interval. Nothing runs per request on the
// driver's side but a few plain stores: this is what makes the loop nearly
// free to attach (docs/agent.md "Observation"), where a uprobe per request
// (UsdtProbes) cost 80 % of the driver's throughput.
//
// Everything read is untrusted: a block that fails validation, names another
// writer pid, or cannot be read is skipped for that interval and counted.
// Not thread-safe (the agent calls it from its one loop thread).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "agent/counter_source.h"
#include "guest-policy/core/stats_block.h"

namespace vkick::agent {

class StatsSource final : public CounterSource {
 public:
  // FailedPrecondition when the driver announced no stats block (an older
  // vkick-blk, or --stats_block=): it can only be observed with
  // --observe=usdt. A block that is not readable yet is accepted: the driver
  // creates it before it registers, so a failure later is counted per read.
  absl::Status Track(const TrackedDriver& d) override;
  void Untrack(int32_t pid) override;
  absl::StatusOr<CounterSnapshot> Read() override;
  ~StatsSource() override;

 private:
  // pid -> the block's fd, opened at the first successful read and kept, so
  // the last read after the driver's exit still sees its final counters.
  struct Tracked {
    std::string path;
    int fd = -1;
  };
  std::map<int32_t, Tracked> tracked_;
  StatsBlock buf_{};
  uint64_t unreadable_ = 0;
};

// One block's queues in the agent's shape. The interval's maximum depth is
// the top edge of the highest non-empty depth bucket, capped by the queue's
// depth limit (the driver keeps no per-interval maximum the agent would have
// to reset); BuildQueueSample clamps it to what the histogram allows.
void AddStatsQueues(int32_t pid, const StatsView& v, CounterSnapshot* snap);

}  // namespace vkick::agent
