// A vkick_virtio_blk queue's `stats` file as the module prints it
// (docs/kernel-driver.md), for the tests that build a fake sysfs tree.
#pragma once

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/vkick_disks.h"

namespace vkick::agent::testing {

inline std::string VkickStatsText(const VkickQueueStats& s) {
  const QueueTotals& t = s.totals;
  return absl::StrCat("requests ", t.requests, "\ncompletions ", t.completions, "\nkicks ", t.kicks,
                      "\ntimer_kicks ", s.timer_kicks, "\nasks ", t.asks, "\nsuppressed ", t.suppressed,
                      "\ndepth_sum ", t.depth_sum, "\nlatency_sum_ns ", t.latency_sum_ns, "\nkicks_by_why ",
                      absl::StrJoin(t.kicks_by_why, " "), "\ndepth_hist ", absl::StrJoin(t.depth_hist, " "),
                      "\nlatency_hist ", absl::StrJoin(t.latency_hist, " "), "\ndepth_limit ", s.depth_limit,
                      "\ninflight ", s.inflight, "\nrejected_writes ", s.rejected_writes, "\n");
}

// n requests at depth d, all completed after lat_ns, one kick each.
inline VkickQueueStats VkickRequests(uint64_t n, uint32_t d, uint64_t lat_ns) {
  VkickQueueStats s;
  QueueTotals& t = s.totals;
  t.requests = t.completions = t.kicks = n;
  t.kicks_by_why[0] = n;
  t.depth_sum = n * d;
  t.latency_sum_ns = n * lat_ns;
  t.depth_hist[proto::DepthBucket(d)] = n;
  t.latency_hist[proto::LatencyBucket(lat_ns)] = n;
  s.depth_limit = 128;
  return s;
}

}  // namespace vkick::agent::testing
