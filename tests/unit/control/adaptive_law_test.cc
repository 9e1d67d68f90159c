// The adaptive law against a simulated plant (plant.h) and against crafted
// inputs for the rules a plant rarely exercises (distrust, DIM revert,
// parking).
#include "controller/control/adaptive_law.h"

#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <random>
#include <string>

#include "protocol/codec.h"
#include "tests/unit/control/plant.h"

namespace vkick {
namespace {

using sim::Plant;
using sim::PlantConfig;

struct Trace {
  std::vector<uint32_t> b;  // B decided after each interval
  std::vector<uint64_t> t;
  std::vector<double> npr;  // notifications per request measured in the interval
  std::vector<uint64_t> added_ns;
  std::vector<uint64_t> t_in_effect;
  std::vector<LawAction> action;
};

// Closes the loop for `n` intervals; `before(i)` may change the load.
template <typename F>
Trace RunLoop(Plant& plant, AdaptiveLaw& law, int n, F before, uint32_t b0 = 1, uint64_t t0 = 0) {
  Trace tr;
  uint32_t b = b0;
  uint64_t t = t0;
  for (int i = 0; i < n; ++i) {
    before(i);
    const sim::IntervalResult r = plant.Run(b, t);
    EXPECT_EQ(proto::Validate(proto::Sample{.seq = 1, .queues = {r.sample}}), proto::Rejection::kNone);
    tr.npr.push_back(r.sample.requests ? double(r.host_notifications) / r.sample.requests : 0);
    tr.added_ns.push_back(r.max_added_ns);
    tr.t_in_effect.push_back(t);
    const LawOutput out = law.Step(LawInputFromSample(r.sample, r.host_notifications));
    b = out.b;
    t = out.t_ns;
    tr.b.push_back(b);
    tr.t.push_back(t);
    tr.action.push_back(out.action);
  }
  return tr;
}
Trace RunLoop(Plant& plant, AdaptiveLaw& law, int n) {
  return RunLoop(plant, law, n, [](int) {});
}

int Changes(const std::vector<uint32_t>& v, size_t from, size_t to) {
  int n = 0;
  for (size_t i = std::max<size_t>(from, 1); i < to && i < v.size(); ++i) n += v[i] != v[i - 1];
  return n;
}

// Slack for the vCPU being busy with a submit or an exit when the timer fires.
constexpr uint64_t kCpuSlack = 2'000 + 500;

// No request waited longer than the T in effect (a request submitted before
// a policy switch is bounded by the T it was submitted under).
void ExpectWaitBoundedByT(const Trace& tr) {
  for (size_t i = 0; i < tr.added_ns.size(); ++i) {
    const uint64_t t = std::max(tr.t_in_effect[i], i ? tr.t_in_effect[i - 1] : 0);
    EXPECT_LE(tr.added_ns[i], t + kCpuSlack) << "interval " << i;
  }
}

TEST(AdaptiveLawPlant, QueueDepthOneAddsNoLatency) {
  Plant plant({.closed_loop = true, .qd = 1});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 20);
  for (size_t i = 0; i < tr.b.size(); ++i) {
    EXPECT_EQ(tr.b[i], 1u) << i;
    EXPECT_EQ(tr.t[i], 0u) << i;
    EXPECT_EQ(tr.added_ns[i], 0u) << i;  // every request kicked at once
    EXPECT_DOUBLE_EQ(tr.npr[i], 1.0);
  }
}

TEST(AdaptiveLawPlant, QueueDepth32RemovesMostNotifications) {
  Plant plant({.closed_loop = true, .qd = 32});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 40);
  // Converged within 3 intervals: 1 to see the depth, 1 to confirm, 1 to run.
  for (size_t i = 3; i < tr.npr.size(); ++i) EXPECT_LT(tr.npr[i], 0.1) << "interval " << i;
  EXPECT_EQ(tr.b.back(), 16u);  // half the depth
  EXPECT_EQ(Changes(tr.b, 3, tr.b.size()), 0);  // and stays there
  ExpectWaitBoundedByT(tr);
}

TEST(AdaptiveLawPlant, LoadStepsConvergeBothWays) {
  Plant plant({.closed_loop = true, .qd = 1});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 60, [&](int i) {
    if (i == 10) plant.SetQd(32);
    if (i == 30) plant.SetQd(1);
  });
  // QD 1: no batching.
  for (int i = 0; i < 10; ++i) EXPECT_EQ(tr.b[i], 1u);
  // QD 32: below 0.1 notifications per request within 4 intervals of the step.
  for (int i = 14; i < 30; ++i) EXPECT_LT(tr.npr[i], 0.1) << i;
  EXPECT_LE(Changes(tr.b, 14, 30), 0);
  // Back to QD 1: B = 1 decided in the very interval that saw the drop.
  EXPECT_EQ(tr.b[30], 1u);
  EXPECT_EQ(tr.t[30], 0u);
  for (int i = 31; i < 60; ++i) EXPECT_EQ(tr.b[i], 1u) << i;
  // Interval 31 still flushes what was held under B = 16; after that nothing waits.
  for (int i = 32; i < 60; ++i) EXPECT_EQ(tr.added_ns[i], 0u) << i;
  ExpectWaitBoundedByT(tr);
}

TEST(AdaptiveLawPlant, DeepQueueAndThroughputNotWorse) {
  // QD 128 reaches b_max/2 levels; compare the completions per interval with
  // immediate kicking on the same plant.
  Plant adaptive_plant({.closed_loop = true, .qd = 128});
  Plant immediate_plant({.closed_loop = true, .qd = 128});
  AdaptiveLaw law;
  Trace tr = RunLoop(adaptive_plant, law, 20);
  EXPECT_EQ(tr.b.back(), 64u);
  EXPECT_LT(tr.npr.back(), 0.05);
  uint64_t adaptive_done = adaptive_plant.Run(tr.b.back(), tr.t.back()).sample.completed;
  uint64_t immediate_done = 0;
  for (int i = 0; i < 21; ++i) immediate_done = immediate_plant.Run(1, 0).sample.completed;
  // Each exit costs the vCPU 2 us: at 128 x 10k/s that saturates it.
  EXPECT_GT(adaptive_done, immediate_done);
}

TEST(AdaptiveLawPlant, PoissonOpenLoopIsStableAndBounded) {
  // 200k req/s x 100 us = depth ~20 at the device.
  Plant plant({.closed_loop = false, .lambda_per_s = 200'000, .seed = 7});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 60);
  const uint32_t settled = tr.b[10];
  EXPECT_GE(settled, 4u);
  EXPECT_LE(Changes(tr.b, 10, 60), 2);  // no oscillation in steady state
  for (size_t i = 10; i < tr.npr.size(); ++i) EXPECT_LT(tr.npr[i], 0.5) << i;
  ExpectWaitBoundedByT(tr);
}

TEST(AdaptiveLawPlant, SlowPoissonStaysImmediate) {
  // 2k req/s: depth ~0.2, nothing to batch.
  Plant plant({.closed_loop = false, .lambda_per_s = 2'000, .seed = 3});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 20);
  for (uint32_t b : tr.b) EXPECT_EQ(b, 1u);
}

TEST(AdaptiveLawPlant, OversizedStaticStartShrinksAtOnce) {
  // A live switch from static(64, 1 ms) at QD 2: batches never fill, every
  // kick is the timer's, and the depth supports B = 1: straight there (not
  // halving step by step); nothing waits longer than T meanwhile.
  Plant plant({.closed_loop = true, .qd = 2});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 12, [](int) {}, 64, 1'000'000);
  EXPECT_TRUE(tr.action[0] == LawAction::kShrink || tr.action[0] == LawAction::kTimerShrink);
  EXPECT_EQ(tr.b[0], 1u);
  ExpectWaitBoundedByT(tr);
}

// ---- event-idx: the device's own suppression ---------------------------------

// A device that polls the ring (or never runs dry) declines every ask: the
// guest's kicks are gone whatever B is. The depth still decides B (a batch
// makes the asks rarer, and the device already has every request, so it adds
// no wait): from B = 16 the loop holds 16 with no kick at all.
TEST(AdaptiveLawPlant, PollingDeviceKeepsTheBatchTheDepthSupports) {
  Plant plant({.closed_loop = true, .qd = 32, .event_idx = true, .polling = true});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 20, [](int) {}, 16, 100'000);
  for (size_t i = 0; i < tr.b.size(); ++i) {
    EXPECT_EQ(tr.b[i], 16u) << "interval " << i << ": " << LawActionName(tr.action[i]);
    EXPECT_EQ(tr.npr[i], 0.0) << "a polling device gets no kick";
  }
  ExpectWaitBoundedByT(tr);
}

// From B = 1 against a polling device the depth wants 16; the grow cannot
// remove kicks (there are none) and is judged on latency alone: kept, no
// kick at any point, no wait beyond T.
TEST(AdaptiveLawPlant, PollingDeviceGrowsToTheDepthsLevel) {
  Plant plant({.closed_loop = true, .qd = 32, .event_idx = true, .polling = true});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 12);
  EXPECT_EQ(tr.b.back(), 16u);
  for (LawAction a : tr.action) EXPECT_NE(a, LawAction::kRevert);
  for (double npr : tr.npr) EXPECT_EQ(npr, 0.0);
  ExpectWaitBoundedByT(tr);
}

// A device that sleeps wants every kick: event-idx suppresses nothing, so
// the law batches as with plain kicks (B = half the depth at QD 32).
TEST(AdaptiveLawPlant, SleepingDeviceAtDepth32GrowsB) {
  Plant plant({.closed_loop = true, .qd = 32, .event_idx = true, .polling = false});
  AdaptiveLaw law;
  Trace tr = RunLoop(plant, law, 40);
  for (size_t i = 3; i < tr.npr.size(); ++i) EXPECT_LT(tr.npr[i], 0.1) << "interval " << i;
  EXPECT_EQ(tr.b.back(), 16u);
  EXPECT_EQ(Changes(tr.b, 3, tr.b.size()), 0);
  ExpectWaitBoundedByT(tr);
}

// The same plant says which device it is: a sleeping one is asked and kicked
// per batch, a polling one is asked and declines.
TEST(AdaptiveLawPlant, PlantReportsAsksAndSuppressed) {
  Plant sleeping({.closed_loop = true, .qd = 32, .event_idx = true});
  const sim::IntervalResult a = sleeping.Run(8, 100'000);
  EXPECT_GT(a.sample.asks, 0u);
  EXPECT_EQ(a.sample.suppressed, 0u);
  EXPECT_EQ(a.sample.kicks, a.sample.asks);
  EXPECT_EQ(a.sample.applied_mode, proto::KickMode::kEventIdx);
  Plant polling({.closed_loop = true, .qd = 32, .event_idx = true, .polling = true});
  const sim::IntervalResult b = polling.Run(8, 100'000);
  EXPECT_GT(b.sample.asks, 0u);
  EXPECT_EQ(b.sample.suppressed, b.sample.asks);
  EXPECT_EQ(b.sample.kicks, 0u);
  EXPECT_EQ(b.max_added_ns, 0u) << "the device had each request at its submission";
  EXPECT_GT(b.sample.completed, a.sample.completed / 2);
  EXPECT_EQ(proto::Validate(proto::Sample{.seq = 1, .queues = {a.sample}}), proto::Rejection::kNone);
  EXPECT_EQ(proto::Validate(proto::Sample{.seq = 1, .queues = {b.sample}}), proto::Rejection::kNone);
}

// Load changes device habits: polled at QD 32, then the device sleeps (a
// polling backend stops polling): B ends where the depth puts it.
TEST(AdaptiveLawPlant, DeviceThatStopsPollingGetsBatches) {
  Plant polling({.closed_loop = true, .qd = 32, .event_idx = true, .polling = true});
  Plant sleeping({.closed_loop = true, .qd = 32, .event_idx = true, .polling = false});
  AdaptiveLaw law;
  uint32_t b = 1;
  uint64_t t = 0;
  for (int i = 0; i < 10; ++i) {
    const sim::IntervalResult r = polling.Run(b, t);
    const LawOutput o = law.Step(LawInputFromSample(r.sample, r.host_notifications));
    b = o.b;
    t = o.t_ns;
  }
  for (int i = 0; i < 10; ++i) {
    const sim::IntervalResult r = sleeping.Run(b, t);
    const LawOutput o = law.Step(LawInputFromSample(r.sample, r.host_notifications));
    b = o.b;
    t = o.t_ns;
  }
  EXPECT_EQ(b, 16u);
}

// ---- crafted inputs -------------------------------------------------------------

LawInput Steady(uint32_t b, double depth, uint64_t requests = 10'000) {
  LawInput in;
  in.interval_ns = 1'000'000'000;
  in.requests = requests;
  in.kicks = requests / b;
  in.host_notifications = in.kicks;
  in.mean_depth = depth;
  in.max_depth = static_cast<uint32_t>(depth);
  in.p50_ns = in.p99_ns = 128'000;
  in.b = b;
  in.t_ns = b > 1 ? 100'000 : 0;
  return in;
}

TEST(AdaptiveLaw, TimerDominatedBatchesHalveB) {
  AdaptiveLaw law;
  LawInput in = Steady(16, 32);
  in.timer_kicks = in.kicks * 3 / 4;
  const LawOutput out = law.Step(in);
  EXPECT_EQ(out.action, LawAction::kTimerShrink);
  EXPECT_EQ(out.b, 8u);
  // And B may not grow past 8 for a while even though the depth says 16.
  for (int i = 0; i < 4; ++i) EXPECT_EQ(law.Step(Steady(8, 32)).b, 8u);
}

TEST(AdaptiveLaw, DistrustsAGuestThatUnderReportsKicks) {
  AdaptiveLaw law;
  LawInput in = Steady(16, 32);
  in.host_notifications = in.kicks * 4;  // host saw 4x the kicks the guest claims
  LawOutput a = law.Step(in);
  EXPECT_FALSE(a.sample_trusted);
  EXPECT_EQ(a.action, LawAction::kDistrusted);
  EXPECT_EQ(a.b, 16u);  // hold at first: may be one bad interval
  EXPECT_EQ(law.Step(in).b, 16u);
  LawOutput c = law.Step(in);
  EXPECT_EQ(c.b, 1u);  // third in a row: fall back to per-request kicks
  EXPECT_EQ(c.t_ns, 0u);
  // A small boundary skew is not distrust.
  AdaptiveLaw law2;
  LawInput skew = Steady(16, 32);
  *skew.host_notifications += 10;
  EXPECT_TRUE(law2.Step(skew).sample_trusted);
  // Without a host count the guest is believed.
  LawInput nohost = Steady(16, 32);
  nohost.host_notifications.reset();
  nohost.kicks = 1;
  EXPECT_TRUE(law2.Step(nohost).sample_trusted);
}

TEST(AdaptiveLaw, DistrustUsesTheHostCountNotTheGuests) {
  AdaptiveLaw law;
  LawInput in = Steady(1, 1, 1000);
  in.kicks = 1000;
  in.host_notifications = 1020;  // within tolerance
  EXPECT_NEAR(law.Step(in).notifications_per_request, 1.02, 1e-9);
}

TEST(AdaptiveLaw, GrowThatDoesNotPayIsRevertedAndCapped) {
  AdaptiveLaw law;
  EXPECT_EQ(law.Step(Steady(1, 32)).action, LawAction::kPendingGrow);
  LawOutput g = law.Step(Steady(1, 32));
  ASSERT_EQ(g.action, LawAction::kGrow);
  ASSERT_EQ(g.b, 16u);
  // Under B = 16 the notifications per request did not fall (e.g. the host
  // polls and already suppressed them).
  LawInput after = Steady(16, 32);
  after.kicks = after.requests;
  after.host_notifications = after.requests;
  // The first window that reports B = 16 ran partly under B = 1: not judged.
  LawOutput first = law.Step(after);
  EXPECT_NE(first.action, LawAction::kRevert);
  EXPECT_EQ(first.b, 16u);
  LawOutput r = law.Step(after);
  EXPECT_EQ(r.action, LawAction::kRevert);
  EXPECT_EQ(r.b, 1u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(law.Step(Steady(1, 32)).b, 1u);
}

TEST(AdaptiveLaw, GrowThatHurtsP99IsReverted) {
  AdaptiveLaw law;
  law.Step(Steady(1, 32));
  ASSERT_EQ(law.Step(Steady(1, 32)).b, 16u);
  LawInput after = Steady(16, 32);
  after.p99_ns = 4'000'000;  // from 128 us: far beyond +10% + T
  EXPECT_NE(law.Step(after).action, LawAction::kRevert);  // partly under B = 1: not judged
  EXPECT_EQ(law.Step(after).action, LawAction::kRevert);
}

// The policy takes effect somewhere inside the agent's interval: the first
// sample reporting the grown B mixes both. Judged, a grow that pays would be
// reverted whenever it landed late in the window; it is judged on the next.
TEST(AdaptiveLaw, AGrowIsJudgedOnAWholeWindowNotTheFirstPartialOne) {
  AdaptiveLaw law;
  law.Step(Steady(1, 32));
  ASSERT_EQ(law.Step(Steady(1, 32)).b, 16u);
  LawInput partial = Steady(16, 32);  // 90 % of the window still at B = 1
  partial.kicks = partial.requests * 9 / 10 + partial.requests / 10 / 16;
  partial.host_notifications = partial.kicks;
  LawOutput p = law.Step(partial);
  EXPECT_EQ(p.b, 16u) << LawActionName(p.action);
  LawOutput whole = law.Step(Steady(16, 32));  // pays: kept
  EXPECT_EQ(whole.b, 16u) << LawActionName(whole.action);
  EXPECT_NE(whole.action, LawAction::kRevert);
}

TEST(AdaptiveLaw, OscillatingLoadParksGrowth) {
  AdaptiveLaw law;
  uint32_t b = 1;
  std::vector<uint32_t> bs;
  // Depth alternates 64, 64, 2, ... : without parking B would swing 1 <-> 32
  // every third interval.
  for (int i = 0; i < 60; ++i) {
    const double depth = (i % 3 == 2) ? 2 : 64;
    b = law.Step(Steady(b, depth)).b;
    bs.push_back(b);
  }
  EXPECT_LE(Changes(bs, 0, bs.size()), 12);
  EXPECT_TRUE(law.parked() || Changes(bs, 40, 60) <= 2);
}

TEST(AdaptiveLaw, IdleQueueIsImmediate) {
  AdaptiveLaw law;
  LawInput in = Steady(16, 32, 5);
  const LawOutput out = law.Step(in);
  EXPECT_EQ(out.action, LawAction::kIdle);
  EXPECT_EQ(out.b, 1u);
  EXPECT_EQ(out.t_ns, 0u);
}

TEST(AdaptiveLaw, OutputsAlwaysPassTheProtocol) {
  AdaptiveLaw law;
  std::mt19937_64 rng(5);
  uint32_t b = 1;
  uint64_t t = 0;
  for (int i = 0; i < 5000; ++i) {
    LawInput in = Steady(b, static_cast<double>(rng() % 600), rng() % 100'000);
    in.t_ns = t;
    in.interval_ns = 1'000'000 + rng() % 2'000'000'000;
    in.timer_kicks = in.kicks ? rng() % (in.kicks + 1) : 0;
    const LawOutput out = law.Step(in);
    proto::QueuePolicy p{.ref = {0, 0}, .mode = proto::KickMode::kAdaptive,
                         .batch = static_cast<uint16_t>(out.b),
                         .defer_ns = static_cast<uint32_t>(out.t_ns),
                         .lease_ns = 1'000'000'000, .generation = 1};
    ASSERT_EQ(proto::Validate(proto::Policy{.queues = {p}}), proto::Rejection::kNone)
        << "b=" << out.b << " t=" << out.t_ns;
    ASSERT_LE(out.b, 64u);
    ASSERT_LE(out.t_ns, 1'000'000u);
    b = out.b;
    t = out.t_ns;
  }
}

// A device that declined this share of the asks polls.
LawInput Polled(uint32_t b, double depth, double declined) {
  LawInput in = Steady(b, depth);
  in.asks = in.requests / b;  // one ask per batch
  in.suppressed = static_cast<uint64_t>(std::ceil(declined * static_cast<double>(in.asks)));
  in.kicks = in.asks - in.suppressed;
  in.host_notifications = in.kicks;
  return in;
}

// Two windows at depth 32 (the grow to 16), then the first window that ran
// partly under the old B (not judged): the next Step judges the grow.
void GrowTo16(AdaptiveLaw& law, double declined) {
  law.Step(Polled(1, 32, declined));
  ASSERT_EQ(law.Step(Polled(1, 32, declined)).b, 16u);
  law.Step(Polled(16, 32, declined));
}

// With a polling device the depth still rules: QD 32 grows to 16.
TEST(AdaptiveLaw, APollingDeviceIsBatchedByDepth) {
  AdaptiveLaw law;
  law.Step(Polled(1, 32, 0.95));
  const LawOutput out = law.Step(Polled(1, 32, 0.95));
  EXPECT_EQ(out.action, LawAction::kGrow);
  EXPECT_EQ(out.b, 16u);
  EXPECT_TRUE(out.event_idx);
}

// The grow from a polled window is judged on latency alone: kept although
// notifications per request (about zero before and after) could not fall...
TEST(AdaptiveLaw, APolledGrowIsKeptWithoutFewerKicks) {
  AdaptiveLaw law;
  GrowTo16(law, 0.95);
  const LawOutput out = law.Step(Polled(16, 32, 1.0));
  EXPECT_NE(out.action, LawAction::kRevert);
  EXPECT_EQ(out.b, 16u);
}

// ...and reverted when p99 went beyond one bucket of (p99 before + T).
TEST(AdaptiveLaw, APolledGrowThatStarvesTheDeviceIsReverted) {
  AdaptiveLaw law;
  GrowTo16(law, 0.95);
  LawInput slow = Polled(16, 32, 1.0);
  slow.p99_ns = 50'000'000;
  const LawOutput out = law.Step(slow);
  EXPECT_EQ(out.action, LawAction::kRevert);
  EXPECT_EQ(out.b, 1u);
}

// A sleeping device's grow that removed no kicks is reverted (DIM's rule).
TEST(AdaptiveLaw, ASleepingGrowWithoutFewerKicksIsReverted) {
  AdaptiveLaw law;
  GrowTo16(law, 0.0);
  LawInput same = Polled(16, 32, 0.0);
  same.kicks = same.requests;  // as many kicks as before the grow
  same.asks = same.requests / 16;
  same.suppressed = 0;
  same.host_notifications = same.kicks;
  EXPECT_EQ(law.Step(same).action, LawAction::kRevert);
}

// Below the polled fraction a grow is judged on notifications, as before:
// the kicks fell from 5 % of requests to 1/16 of 0.3: kept.
TEST(AdaptiveLaw, BelowThePolledFractionNotificationsJudge) {
  AdaptiveLaw law;
  GrowTo16(law, 0.5);
  const LawOutput out = law.Step(Polled(16, 32, 0.5));  // same rate, 1/16 of the kicks
  EXPECT_NE(out.action, LawAction::kRevert);
  EXPECT_EQ(out.b, 16u);
}

// A device that wants every kick (asks = batches, none declined) is batched
// as with plain kicks: the grow of GrowThatDoesNotPay..., kept because it pays.
TEST(AdaptiveLaw, ASleepingDeviceAtDepth32GrowsBWithEventIdx) {
  AdaptiveLaw law;
  auto sleeping = [](uint32_t b) {
    LawInput in = Steady(b, 32);
    in.asks = in.kicks;  // one ask per batch, each wanted
    in.suppressed = 0;
    return in;
  };
  EXPECT_EQ(law.Step(sleeping(1)).action, LawAction::kPendingGrow);
  const LawOutput g = law.Step(sleeping(1));
  ASSERT_EQ(g.action, LawAction::kGrow);
  EXPECT_GT(g.b, 1u);
  EXPECT_EQ(g.b, 16u);
  EXPECT_TRUE(g.event_idx);
  EXPECT_GE(g.t_ns, proto::kMinDeferNs);
  for (int i = 0; i < 4; ++i) {
    const LawOutput o = law.Step(sleeping(16));
    EXPECT_EQ(o.b, 16u) << i << ": " << LawActionName(o.action);
    EXPECT_TRUE(o.event_idx);
  }
}

TEST(AdaptiveLaw, InputFromSampleTakesTheEventIdxBatch) {
  proto::QueueSample s;
  s.interval_ns = 1'000'000'000;
  s.requests = 800;
  s.kicks = 20;
  s.asks = 100;
  s.suppressed = 80;
  s.applied_mode = proto::KickMode::kEventIdx;
  s.applied_batch = 8;
  s.applied_defer_ns = 50'000;
  LawInput in = LawInputFromSample(s, 25);
  EXPECT_EQ(in.b, 8u);
  EXPECT_EQ(in.t_ns, 50'000u);
  EXPECT_EQ(in.asks, 100u);
  EXPECT_EQ(in.suppressed, 80u);
  EXPECT_EQ(in.host_notifications, 25u);
  EXPECT_EQ(in.kicks, 20u);
  // Plain event-idx (B = 1): no deferral whatever the field says.
  s.applied_batch = 1;
  in = LawInputFromSample(s, std::nullopt);
  EXPECT_EQ(in.b, 1u);
  EXPECT_EQ(in.t_ns, 0u);
  // Immediate decides per request: B = 1 whatever the fields say.
  s.applied_mode = proto::KickMode::kImmediate;
  s.applied_batch = 8;
  in = LawInputFromSample(s, std::nullopt);
  EXPECT_EQ(in.b, 1u);
  EXPECT_EQ(in.t_ns, 0u);
  EXPECT_EQ(in.asks, 100u);
  // Static and adaptive keep theirs.
  for (proto::KickMode m : {proto::KickMode::kStatic, proto::KickMode::kAdaptive}) {
    s.applied_mode = m;
    in = LawInputFromSample(s, std::nullopt);
    EXPECT_EQ(in.b, 8u);
    EXPECT_EQ(in.t_ns, 50'000u);
  }
}

TEST(AdaptiveLaw, PersistentDistrustFallsBackToPlainKicks) {
  AdaptiveLaw law;  // distrust_limit 3
  LawInput in = Steady(16, 32);
  in.host_notifications = in.kicks * 4;
  LawOutput a = law.Step(in);
  EXPECT_TRUE(a.event_idx) << "one bad interval: hold, still event-idx";
  EXPECT_EQ(a.b, 16u);
  LawOutput b = law.Step(in);
  EXPECT_TRUE(b.event_idx);
  LawOutput c = law.Step(in);
  EXPECT_EQ(c.action, LawAction::kDistrusted);
  EXPECT_FALSE(c.event_idx) << "distrust_limit reached: plain kicks";
  EXPECT_EQ(c.b, 1u);
  EXPECT_EQ(c.t_ns, 0u);
  LawOutput d = law.Step(in);
  EXPECT_FALSE(d.event_idx);
  EXPECT_EQ(d.b, 1u);
  // Trusted again: back to event-idx.
  LawOutput e = law.Step(Steady(1, 32));
  EXPECT_TRUE(e.sample_trusted);
  EXPECT_TRUE(e.event_idx);
}

TEST(AdaptiveLaw, DistrustLimitOneFallsBackAtOnce) {
  AdaptiveLaw law({.distrust_limit = 1});
  LawInput in = Steady(16, 32);
  in.host_notifications = in.kicks * 4;
  const LawOutput out = law.Step(in);
  EXPECT_FALSE(out.event_idx);
  EXPECT_EQ(out.b, 1u);
}

TEST(AdaptiveLaw, WithoutEventIdxPlainKicks) {
  AdaptiveLaw law({.event_idx = false});
  for (uint32_t b : {1u, 16u}) EXPECT_FALSE(law.Step(Polled(b, 32, 1.0)).event_idx) << b;
  // The depth rules, as before v3: QD 32 grows to 16 with plain kicks.
  AdaptiveLaw plain({.event_idx = false});
  plain.Step(Steady(1, 32));
  const LawOutput g = plain.Step(Steady(1, 32));
  EXPECT_EQ(g.b, 16u);
  EXPECT_FALSE(g.event_idx);
  // Also in closed loop with a polling device (it gets every plain kick).
  Plant plant({.closed_loop = true, .qd = 32, .event_idx = false, .polling = true});
  AdaptiveLaw law2({.event_idx = false});
  Trace tr = RunLoop(plant, law2, 10);
  EXPECT_EQ(tr.b.back(), 16u);
}

TEST(AdaptiveLaw, EventIdxOutputsPassTheProtocol) {
  AdaptiveLaw law;
  std::mt19937_64 rng(17);
  uint32_t b = 1;
  uint64_t t = 0;
  for (int i = 0; i < 5000; ++i) {
    LawInput in = Steady(b, static_cast<double>(rng() % 600), rng() % 100'000);
    in.t_ns = t;
    in.asks = in.requests ? rng() % (in.requests + 1) : 0;
    in.suppressed = in.asks ? rng() % (in.asks + 1) : 0;
    const LawOutput out = law.Step(in);
    proto::QueuePolicy p{.ref = {0, 0},
                         .mode = out.event_idx ? proto::KickMode::kEventIdx : proto::KickMode::kAdaptive,
                         .batch = static_cast<uint16_t>(out.b),
                         .defer_ns = static_cast<uint32_t>(out.t_ns),
                         .lease_ns = 1'000'000'000,
                         .generation = 1};
    ASSERT_EQ(proto::Validate(proto::Policy{.queues = {p}}), proto::Rejection::kNone)
        << "b=" << out.b << " t=" << out.t_ns << " " << LawActionName(out.action);
    b = out.b;
    t = out.t_ns;
  }
}

TEST(AdaptiveLaw, PolledFractionIsValidated) {
  EXPECT_FALSE(ValidateLawConfig({.polled_fraction = 0}).ok());
  EXPECT_FALSE(ValidateLawConfig({.polled_fraction = 1.5}).ok());
  EXPECT_FALSE(ValidateLawConfig({.polled_fraction = -0.1}).ok());
  EXPECT_FALSE(ValidateLawConfig({.polled_fraction = std::nan("")}).ok());
  EXPECT_TRUE(ValidateLawConfig({.polled_fraction = 1.0}).ok());
  EXPECT_TRUE(ValidateLawConfig({.polled_fraction = 0.5}).ok());
  EXPECT_TRUE(ValidateLawConfig({.event_idx = false}).ok());
}

TEST(AdaptiveLaw, ConfigValidation) {
  EXPECT_TRUE(ValidateLawConfig({}).ok());
  EXPECT_FALSE(ValidateLawConfig({.b_max = 0}).ok());
  EXPECT_FALSE(ValidateLawConfig({.b_max = 257}).ok());
  EXPECT_FALSE(ValidateLawConfig({.t_max_ns = 2'000'000}).ok());
  EXPECT_FALSE(ValidateLawConfig({.depth_fraction = 0}).ok());
  EXPECT_FALSE(ValidateLawConfig({.grow_confirm = 0}).ok());
}

}  // namespace
}  // namespace vkick
