#include "agent/sample_builder.h"

#include <algorithm>

namespace vkick::agent {
namespace {

template <size_t N>
bool AnyBackwards(const std::array<uint64_t, N>& p, const std::array<uint64_t, N>& c) {
  for (size_t i = 0; i < N; ++i)
    if (c[i] < p[i]) return true;
  return false;
}

template <size_t N>
std::array<uint64_t, N> Sub(const std::array<uint64_t, N>& p, const std::array<uint64_t, N>& c) {
  std::array<uint64_t, N> d{};
  for (size_t i = 0; i < N; ++i) d[i] = c[i] - p[i];
  return d;
}

template <size_t N>
uint64_t Sum(const std::array<uint64_t, N>& a) {
  uint64_t s = 0;
  for (uint64_t v : a) s += v;
  return s;
}

// The highest non-empty bucket (0 when all are empty).
size_t TopBucket(const std::array<uint64_t, proto::kDepthBuckets>& hist) {
  size_t top = 0;
  for (size_t b = 0; b < hist.size(); ++b)
    if (hist[b] != 0) top = b;
  return top;
}

}  // namespace

uint32_t DepthHistMax(const std::array<uint64_t, proto::kDepthBuckets>& hist, uint64_t depth_limit) {
  if (Sum(hist) == 0) return 0;
  const size_t top = TopBucket(hist);
  const uint64_t edge = top == 0 ? 1 : (uint64_t{2} << top) - 1;
  return static_cast<uint32_t>(std::min<uint64_t>(depth_limit > 0 ? std::min(edge, depth_limit) : edge, UINT32_MAX));
}

QueueTotals Delta(const QueueTotals& prev, const QueueTotals& cur) {
  const bool reset = cur.requests < prev.requests || cur.kicks < prev.kicks ||
                     cur.completions < prev.completions || cur.depth_sum < prev.depth_sum ||
                     cur.latency_sum_ns < prev.latency_sum_ns || cur.asks < prev.asks ||
                     cur.suppressed < prev.suppressed || AnyBackwards(prev.kicks_by_why, cur.kicks_by_why) ||
                     AnyBackwards(prev.depth_hist, cur.depth_hist) ||
                     AnyBackwards(prev.latency_hist, cur.latency_hist);
  if (reset) return cur;
  QueueTotals d;
  d.requests = cur.requests - prev.requests;
  d.kicks = cur.kicks - prev.kicks;
  d.completions = cur.completions - prev.completions;
  d.depth_sum = cur.depth_sum - prev.depth_sum;
  d.latency_sum_ns = cur.latency_sum_ns - prev.latency_sum_ns;
  d.asks = cur.asks - prev.asks;
  d.suppressed = cur.suppressed - prev.suppressed;
  d.kicks_by_why = Sub(prev.kicks_by_why, cur.kicks_by_why);
  d.depth_hist = Sub(prev.depth_hist, cur.depth_hist);
  d.latency_hist = Sub(prev.latency_hist, cur.latency_hist);
  d.interval_max_depth = cur.interval_max_depth;
  return d;
}

BuiltSample BuildQueueSample(proto::QueueRef ref, const QueueTotals& d, uint64_t interval_ns,
                             const AppliedState& applied) {
  BuiltSample out;
  proto::QueueSample& q = out.sample;
  q.ref = ref;
  q.interval_ns = std::clamp(interval_ns, proto::kMinIntervalNs, proto::kMaxIntervalNs);
  q.depth_hist = d.depth_hist;
  q.latency_hist = d.latency_hist;
  q.requests = Sum(d.depth_hist);
  q.completed = Sum(d.latency_hist);
  q.kicks = d.kicks;
  q.timer_kicks = std::min(d.kicks_by_why[kWhyTimer], q.kicks);
  q.asks = std::min(d.asks, q.requests);
  q.suppressed = std::min(d.suppressed, q.asks);
  const uint64_t max_events = q.interval_ns / proto::kMinNsPerEvent;
  if (q.requests > max_events || q.completed > max_events || q.kicks > max_events) {
    out.ok = false;
    q = proto::QueueSample{};
    q.ref = ref;
    q.interval_ns = std::clamp(interval_ns, proto::kMinIntervalNs, proto::kMaxIntervalNs);
  }
  if (q.requests > 0) {
    const size_t top = TopBucket(q.depth_hist);
    const uint64_t top_lower = top == 0 ? 1 : (uint64_t{1} << top);
    uint64_t max_depth = std::max<uint64_t>(d.interval_max_depth, top_lower);
    // The BPF max may come from an adjacent interval's boundary event: never
    // claim a depth whose bucket is empty above the histogram's top bucket.
    if (proto::DepthBucket(static_cast<uint32_t>(std::min<uint64_t>(max_depth, UINT32_MAX))) > top) {
      max_depth = top == proto::kDepthBuckets - 1 ? max_depth : (uint64_t{1} << (top + 1)) - 1;
      if (top == 0) max_depth = 1;
    }
    max_depth = std::min<uint64_t>(max_depth, proto::kMaxQueueSize);
    q.max_depth = static_cast<uint16_t>(max_depth);
    const uint64_t mean = d.depth_sum / q.requests * 1000 + (d.depth_sum % q.requests) * 1000 / q.requests;
    q.mean_depth_milli = static_cast<uint32_t>(std::clamp<uint64_t>(mean, 1000, max_depth * 1000));
  }
  q.lease = applied.lease;
  q.applied_mode = applied.mode;
  q.applied_batch = std::clamp<uint16_t>(applied.batch, 1, proto::kMaxBatch);
  q.applied_defer_ns = std::min<uint32_t>(applied.defer_ns, proto::kMaxDeferNs);
  q.applied_generation = applied.lease == proto::LeaseState::kNone ? 0 : std::max<uint64_t>(applied.generation, 1);
  return out;
}

}  // namespace vkick::agent
