#include "agent/stats_source.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace vkick::agent {

static_assert(kStatsDepthBuckets == proto::kDepthBuckets);
static_assert(kStatsLatencyBuckets == proto::kLatencyBuckets);
static_assert(kStatsWhySlots == kWhySlots);

namespace {

// Cumulative totals of one queue; the histograms are copied as they are.
QueueTotals ToTotals(const StatsQueue& q) {
  QueueTotals t;
  t.requests = q.requests;
  t.completions = q.completions;
  t.kicks = q.kicks;
  t.asks = q.asks;
  t.suppressed = q.suppressed;
  t.depth_sum = q.depth_sum;
  t.latency_sum_ns = q.latency_sum_ns;
  std::copy(std::begin(q.kicks_by_why), std::end(q.kicks_by_why), t.kicks_by_why.begin());
  std::copy(std::begin(q.depth_hist), std::end(q.depth_hist), t.depth_hist.begin());
  std::copy(std::begin(q.latency_hist), std::end(q.latency_hist), t.latency_hist.begin());
  return t;
}

}  // namespace

void AddStatsQueues(int32_t pid, const StatsView& v, CounterSnapshot* snap) {
  for (uint16_t i = 0; i < v.num_queues; ++i) {
    QueueTotals t = ToTotals(v.queues[i]);
    t.interval_max_depth = t.requests == 0 ? 0 : DepthHistMax(t.depth_hist, v.queues[i].depth_limit);
    snap->queues[{pid, i}] = t;
  }
}

absl::Status StatsSource::Track(const TrackedDriver& d) {
  if (d.stats_block.empty()) {
    return absl::FailedPreconditionError(
        "the driver keeps no stats block (vkick-blk --stats_block=, or an older vkick-blk); "
        "--observe=usdt observes it with uprobes");
  }
  if (!tracked_.count(d.pid)) tracked_[d.pid] = Tracked{d.stats_block, -1};
  return absl::OkStatus();
}

void StatsSource::Untrack(int32_t pid) {
  auto it = tracked_.find(pid);
  if (it == tracked_.end()) return;
  if (it->second.fd >= 0) close(it->second.fd);
  tracked_.erase(it);
}

StatsSource::~StatsSource() {
  for (auto& [pid, t] : tracked_)
    if (t.fd >= 0) close(t.fd);
}

absl::StatusOr<CounterSnapshot> StatsSource::Read() {
  CounterSnapshot snap;
  for (auto& [pid, t] : tracked_) {
    if (t.fd < 0) {
      absl::StatusOr<int> fd = OpenStatsBlockFile(t.path);
      if (!fd.ok()) {
        ++unreadable_;
        continue;
      }
      t.fd = *fd;
    }
    absl::StatusOr<StatsView> v = ReadStatsBlock(t.fd, &buf_);
    if (!v.ok() || v->writer_pid != static_cast<uint64_t>(pid)) {
      // Invalid, or not the driver's own: skip this interval and open the
      // path again next time (the driver's own block may replace it).
      ++unreadable_;
      close(t.fd);
      t.fd = -1;
      continue;
    }
    AddStatsQueues(pid, *v, &snap);
  }
  snap.unreadable = unreadable_;
  return snap;
}

}  // namespace vkick::agent
