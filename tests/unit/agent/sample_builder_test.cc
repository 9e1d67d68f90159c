#include "agent/sample_builder.h"

#include <random>

#include "gtest/gtest.h"
#include "protocol/codec.h"

namespace vkick::agent {
namespace {

QueueTotals FromEvents(const std::vector<uint32_t>& depths, const std::vector<uint64_t>& lats, uint64_t kicks,
                       uint64_t timer_kicks) {
  QueueTotals t;
  for (uint32_t d : depths) {
    ++t.requests;
    t.depth_sum += d;
    ++t.depth_hist[proto::DepthBucket(d)];
    t.interval_max_depth = std::max(t.interval_max_depth, d);
  }
  for (uint64_t l : lats) {
    ++t.completions;
    t.latency_sum_ns += l;
    ++t.latency_hist[proto::LatencyBucket(l)];
  }
  t.kicks = kicks;
  t.kicks_by_why[kWhyTimer] = timer_kicks;
  t.kicks_by_why[0] = kicks - timer_kicks;
  return t;
}

proto::Rejection ValidateOne(const proto::QueueSample& q) {
  proto::Sample s;
  s.seq = 1;
  s.queues.push_back(q);
  return proto::Validate(s);
}

TEST(SampleBuilder, DeltaOfCumulativeCounters) {
  QueueTotals a = FromEvents({1, 2, 3}, {500, 1500}, 2, 1);
  QueueTotals b = FromEvents({1, 2, 3, 16, 16, 40}, {500, 1500, 3000, 3000}, 5, 2);
  b.interval_max_depth = 40;
  QueueTotals d = Delta(a, b);
  EXPECT_EQ(d.requests, 3u);
  EXPECT_EQ(d.kicks, 3u);
  EXPECT_EQ(d.completions, 2u);
  EXPECT_EQ(d.depth_sum, 72u);
  EXPECT_EQ(d.depth_hist[4], 2u);  // 16 in [16, 32)
  EXPECT_EQ(d.depth_hist[5], 1u);  // 40 in [32, 64)
  EXPECT_EQ(d.kicks_by_why[kWhyTimer], 1u);
  EXPECT_EQ(d.interval_max_depth, 40u);
}

TEST(SampleBuilder, CounterGoingBackwardsIsAReset) {
  QueueTotals a = FromEvents({1, 2, 3, 4}, {}, 4, 0);
  QueueTotals b = FromEvents({8}, {}, 1, 0);  // map entry recreated
  EXPECT_EQ(Delta(a, b), b);
}

TEST(SampleBuilder, DeltaCarriesAsksAndSuppressed) {
  QueueTotals a = FromEvents({1, 2, 3}, {500}, 2, 0);
  a.asks = 3;
  a.suppressed = 1;
  QueueTotals b = FromEvents({1, 2, 3, 4, 4, 4, 4}, {500, 900}, 3, 0);
  b.asks = 10;
  b.suppressed = 6;
  QueueTotals d = Delta(a, b);
  EXPECT_EQ(d.requests, 4u);
  EXPECT_EQ(d.asks, 7u);
  EXPECT_EQ(d.suppressed, 5u);
}

TEST(SampleBuilder, AsksGoingBackwardsIsAReset) {
  QueueTotals a = FromEvents({1, 2, 3, 4}, {}, 1, 0);
  a.asks = 4;
  a.suppressed = 2;
  QueueTotals b = a;  // every other counter equal or ahead
  b.asks = 3;
  EXPECT_EQ(Delta(a, b), b);
  QueueTotals c = a;
  c.suppressed = 1;
  EXPECT_EQ(Delta(a, c), c);
  QueueTotals same = a;
  QueueTotals zero = Delta(a, same);
  EXPECT_EQ(zero.asks, 0u);
  EXPECT_EQ(zero.suppressed, 0u);
}

TEST(SampleBuilder, SampleCarriesAsksAndSuppressed) {
  QueueTotals d = FromEvents({8, 8, 8, 8, 8, 8, 8, 8}, {5000, 5000}, 1, 0);
  d.asks = 2;
  d.suppressed = 1;
  AppliedState applied{proto::LeaseState::kActive, proto::KickMode::kEventIdx, 4, 50000, 3};
  BuiltSample b = BuildQueueSample({0, 1}, d, 1'000'000'000, applied);
  ASSERT_TRUE(b.ok);
  EXPECT_EQ(b.sample.asks, 2u);
  EXPECT_EQ(b.sample.suppressed, 1u);
  EXPECT_EQ(b.sample.applied_mode, proto::KickMode::kEventIdx);
  EXPECT_EQ(b.sample.applied_batch, 4u);
  EXPECT_EQ(b.sample.applied_defer_ns, 50000u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, AsksAndSuppressedAreClampedIntoValidity) {
  // Torn reads: more asks than requests in the histogram, more declined
  // than asked.
  QueueTotals d = FromEvents({2, 2, 2}, {}, 0, 0);
  d.asks = 10;
  d.suppressed = 20;
  BuiltSample b = BuildQueueSample({0, 0}, d, 1'000'000'000, AppliedState{});
  ASSERT_TRUE(b.ok);
  EXPECT_EQ(b.sample.asks, 3u) << "asks <= requests";
  EXPECT_EQ(b.sample.suppressed, 3u) << "suppressed <= asks";
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
  d.asks = 2;
  b = BuildQueueSample({0, 0}, d, 1'000'000'000, AppliedState{});
  EXPECT_EQ(b.sample.asks, 2u);
  EXPECT_EQ(b.sample.suppressed, 2u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
  // No requests at all: nothing can have been asked.
  QueueTotals none;
  none.asks = 5;
  none.suppressed = 5;
  b = BuildQueueSample({0, 0}, none, 1'000'000'000, AppliedState{});
  EXPECT_EQ(b.sample.asks, 0u);
  EXPECT_EQ(b.sample.suppressed, 0u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, RandomAsksAlwaysValidate) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 5000; ++i) {
    QueueTotals d;
    for (auto& v : d.depth_hist) v = rng() % 3 == 0 ? rng() % 1000 : 0;
    d.asks = rng() % 12000;
    d.suppressed = rng() % 12000;
    d.kicks = rng() % 5000;
    d.depth_sum = rng() % 10'000'000;
    BuiltSample b = BuildQueueSample({0, 0}, d, 1'000'000'000, AppliedState{});
    ASSERT_LE(b.sample.suppressed, b.sample.asks);
    ASSERT_LE(b.sample.asks, b.sample.requests);
    ASSERT_EQ(ValidateOne(b.sample), proto::Rejection::kNone) << "iteration " << i;
  }
}

TEST(SampleBuilder, SampleIsConsistentAndValid) {
  QueueTotals d = FromEvents({1, 2, 3, 16, 16, 40}, {500, 1500, 3000, 3000}, 3, 1);
  AppliedState applied{proto::LeaseState::kActive, proto::KickMode::kStatic, 16, 50000, 7};
  BuiltSample b = BuildQueueSample({1, 2}, d, 1'000'000'000, applied);
  ASSERT_TRUE(b.ok);
  const proto::QueueSample& q = b.sample;
  EXPECT_EQ(q.ref, (proto::QueueRef{1, 2}));
  EXPECT_EQ(q.requests, 6u);
  EXPECT_EQ(q.completed, 4u);
  EXPECT_EQ(q.kicks, 3u);
  EXPECT_EQ(q.timer_kicks, 1u);
  EXPECT_EQ(q.max_depth, 40u);
  EXPECT_EQ(q.mean_depth_milli, 13000u);  // 78 / 6
  EXPECT_EQ(q.latency_hist[0], 1u);       // 500 ns < 1 us
  EXPECT_EQ(q.latency_hist[1], 1u);       // 1 us
  EXPECT_EQ(q.latency_hist[2], 2u);       // 3 us in [2, 4)
  EXPECT_EQ(q.lease, proto::LeaseState::kActive);
  EXPECT_EQ(q.applied_batch, 16u);
  EXPECT_EQ(q.applied_generation, 7u);
  EXPECT_EQ(ValidateOne(q), proto::Rejection::kNone);
}

TEST(SampleBuilder, EmptyIntervalIsValid) {
  BuiltSample b = BuildQueueSample({0, 0}, QueueTotals{}, 1'000'000'000, AppliedState{});
  ASSERT_TRUE(b.ok);
  EXPECT_EQ(b.sample.requests, 0u);
  EXPECT_EQ(b.sample.max_depth, 0u);
  EXPECT_EQ(b.sample.mean_depth_milli, 0u);
  EXPECT_EQ(b.sample.applied_generation, 0u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, TornReadsAreClampedIntoValidity) {
  // A read that caught `requests` but not yet the histogram, a max from the
  // next interval, a depth sum off by an in-flight event.
  QueueTotals d = FromEvents({4, 4, 4}, {2000}, 1, 0);
  d.requests = 5;
  d.interval_max_depth = 300;  // bucket 8, histogram top is bucket 2
  d.depth_sum = 1;             // mean would be below 1
  BuiltSample b = BuildQueueSample({0, 0}, d, 1'000'000'000, AppliedState{});
  ASSERT_TRUE(b.ok);
  EXPECT_EQ(b.sample.requests, 3u);  // the histogram is the truth
  EXPECT_EQ(b.sample.max_depth, 7u); // top of bucket 2
  EXPECT_EQ(b.sample.mean_depth_milli, 1000u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);

  d.interval_max_depth = 0;  // max lost at the boundary: raised to the bucket's floor
  b = BuildQueueSample({0, 0}, d, 1'000'000'000, AppliedState{});
  EXPECT_EQ(b.sample.max_depth, 4u);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, ExpiredLeaseKeepsGeneration) {
  AppliedState a;
  a.lease = proto::LeaseState::kExpired;
  a.generation = 3;
  BuiltSample b = BuildQueueSample({0, 0}, QueueTotals{}, 1'000'000, a);
  EXPECT_EQ(b.sample.applied_generation, 3u);
  EXPECT_EQ(b.sample.applied_mode, proto::KickMode::kImmediate);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, ImpossibleRatesAreRefused) {
  QueueTotals d;
  d.depth_hist[0] = 1'000'000;  // 1 M in a 1 ms interval = 1 G/s
  BuiltSample b = BuildQueueSample({0, 0}, d, 1'000'000, AppliedState{});
  EXPECT_FALSE(b.ok);
  EXPECT_EQ(ValidateOne(b.sample), proto::Rejection::kNone);
}

TEST(SampleBuilder, RandomInputsAlwaysValidate) {
  std::mt19937_64 rng(42);
  for (int i = 0; i < 5000; ++i) {
    QueueTotals d;
    for (auto& v : d.depth_hist) v = rng() % 3 == 0 ? rng() % 1000 : 0;
    for (auto& v : d.latency_hist) v = rng() % 2 == 0 ? rng() % 1000 : 0;
    d.kicks = rng() % 5000;
    d.kicks_by_why[kWhyTimer] = rng() % 6000;
    d.depth_sum = rng() % 10'000'000;
    d.interval_max_depth = static_cast<uint32_t>(rng() % 70000);
    AppliedState a;
    a.lease = static_cast<proto::LeaseState>(rng() % 3);
    a.generation = rng() % 2 ? rng() : 0;
    a.batch = static_cast<uint16_t>(rng());
    a.defer_ns = static_cast<uint32_t>(rng());
    BuiltSample b = BuildQueueSample({0, 0}, d, 1 + rng() % 100'000'000'000ull, a);
    ASSERT_EQ(ValidateOne(b.sample), proto::Rejection::kNone) << "iteration " << i;
  }
}

TEST(SampleBuilder, BpfBucketBoundsMatchProtocol) {
  // The BPF program implements the same bounds branch-free; these are the
  // protocol's edges it is checked against in tests/agent (real probes).
  EXPECT_EQ(proto::DepthBucket(1), 0u);
  EXPECT_EQ(proto::DepthBucket(2), 1u);
  EXPECT_EQ(proto::DepthBucket(511), 8u);
  EXPECT_EQ(proto::DepthBucket(512), 9u);
  EXPECT_EQ(proto::LatencyBucket(999), 0u);
  EXPECT_EQ(proto::LatencyBucket(1000), 1u);
  EXPECT_EQ(proto::LatencyBucket(16'383'999), 14u);
  EXPECT_EQ(proto::LatencyBucket(16'384'000), 15u);
}

TEST(SampleBuilder, KernelDiskSampleIsValidWithoutKicks) {
  // A kernel virtio_blk disk's totals (BlockObserver): issues and matched
  // completions, never kicks, and the driver's own state (no policy).
  QueueTotals a = FromEvents({1, 2}, {800}, 0, 0);
  QueueTotals b = FromEvents({1, 2, 4, 64, 1000}, {800, 30'000, 17'000'000}, 0, 0);
  b.interval_max_depth = 1000;
  BuiltSample s = BuildQueueSample({3, 0}, Delta(a, b), 1'000'000'000, AppliedState{});
  ASSERT_TRUE(s.ok);
  EXPECT_EQ(ValidateOne(s.sample), proto::Rejection::kNone);
  EXPECT_EQ(s.sample.requests, 3u);
  EXPECT_EQ(s.sample.completed, 2u);
  EXPECT_EQ(s.sample.kicks, 0u);
  EXPECT_EQ(s.sample.timer_kicks, 0u);
  EXPECT_EQ(s.sample.max_depth, 1000);
  EXPECT_EQ(s.sample.depth_hist[9], 1u);
  EXPECT_EQ(s.sample.latency_hist[15], 1u);
  EXPECT_EQ(s.sample.lease, proto::LeaseState::kNone);
  EXPECT_EQ(s.sample.applied_mode, proto::KickMode::kImmediate);
  EXPECT_EQ(s.sample.applied_batch, 1);
  EXPECT_EQ(s.sample.applied_defer_ns, 0u);
  EXPECT_EQ(s.sample.applied_generation, 0u);
  // More in flight than completed, and an interval with completions only
  // (requests issued in the previous one): still valid.
  QueueTotals c = b;
  c.completions += 4;
  c.latency_hist[5] += 4;
  c.interval_max_depth = 0;
  s = BuildQueueSample({3, 0}, Delta(b, c), 1'000'000'000, AppliedState{});
  EXPECT_EQ(ValidateOne(s.sample), proto::Rejection::kNone);
  EXPECT_EQ(s.sample.requests, 0u);
  EXPECT_EQ(s.sample.completed, 4u);
  EXPECT_EQ(s.sample.max_depth, 0);
}

}  // namespace
}  // namespace vkick::agent
