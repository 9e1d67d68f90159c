#include "controller/loop/control_loop.h"

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "protocol/codec.h"

namespace vkick {
namespace {

constexpr int64_t kSec = 1'000'000'000;

// A valid sample of one interval at constant depth `d`, `n` requests, with
// the agent reporting the (mode, B, T) it applied; kicks = n / B.
proto::QueueSample MakeSample(uint32_t d, uint64_t n, proto::KickMode mode, uint16_t b,
                              uint32_t t, uint64_t gen) {
  proto::QueueSample s;
  s.interval_ns = kSec;
  s.requests = n;
  s.kicks = (n + b - 1) / b;
  s.completed = n;
  s.depth_hist[proto::DepthBucket(d)] = n;
  s.latency_hist[proto::LatencyBucket(100'000)] = n;
  s.mean_depth_milli = d * 1000;
  s.max_depth = d;
  s.lease = gen ? proto::LeaseState::kActive : proto::LeaseState::kNone;
  s.applied_mode = gen ? mode : proto::KickMode::kImmediate;
  s.applied_batch = gen ? b : 1;
  s.applied_defer_ns = gen ? t : 0;
  s.applied_generation = gen;
  return s;
}

// A fake queue with an ideal agent: applies each policy it is sent, reports
// samples at depth `depth`, and a host probe that counts exactly its kicks.
struct FakeQueue {
  QueueKey key{"vm1", "disk0", 0};
  uint32_t depth = 1;
  uint64_t rate = 10'000;
  uint64_t host_total = 0;
  PolicyOut applied;  // generation 0: none yet
  bool connected = true;

  QueueInput Next() {
    QueueInput in;
    in.key = key;
    in.agent_connected = connected;
    if (connected) {
      proto::QueueSample s = MakeSample(depth, rate, applied.mode, applied.batch,
                                        applied.defer_ns, applied.generation);
      EXPECT_EQ(proto::Validate(proto::Sample{1, {s}}), proto::Rejection::kNone);
      host_total += s.kicks;
      in.sample = s;
    }
    in.host_notifications_total = host_total;
    return in;
  }
};

TEST(ControlLoopTest, StaticPassesThroughWithLeaseAndStableGeneration) {
  PolicyTable table;
  ASSERT_TRUE(table.Set({"vm1", "disk0", 0}, {proto::KickMode::kStatic, 8, 50'000}).ok());
  ControlLoop loop({.lease_ns = 5 * kSec, .law = {}}, 1000);
  FakeQueue q;
  uint64_t gen = 0;
  for (int i = 0; i < 5; ++i) {
    auto out = loop.Step(table, {q.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].mode, proto::KickMode::kStatic);
    EXPECT_EQ(out[0].batch, 8);
    EXPECT_EQ(out[0].defer_ns, 50'000u);
    EXPECT_EQ(out[0].lease_ns, 5 * kSec);  // renewed every interval
    EXPECT_GT(out[0].generation, 1000u);
    if (i == 0) gen = out[0].generation;
    EXPECT_EQ(out[0].generation, gen) << "generation must not change without a change";
    q.applied = out[0];
  }
  auto v = loop.View();
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].source, PolicySource::kQueue);
  EXPECT_EQ(v[0].policy_switches, 0u);
}

TEST(ControlLoopTest, GenerationBumpsOnChangeOnlyAndSwitchesCounted) {
  PolicyTable table;  // default immediate
  ControlLoop loop({}, 0);
  FakeQueue q;
  auto g1 = loop.Step(table, {q.Next()}, kSec).at(0).generation;
  EXPECT_EQ(loop.Step(table, {q.Next()}, 2 * kSec).at(0).generation, g1);
  ASSERT_TRUE(table.Set({"vm1", "", -1}, {proto::KickMode::kStatic, 4, 10'000}).ok());
  auto o = loop.Step(table, {q.Next()}, 3 * kSec).at(0);
  EXPECT_GT(o.generation, g1);
  EXPECT_EQ(o.batch, 4);
  EXPECT_EQ(loop.View()[0].source, PolicySource::kVm);
  EXPECT_EQ(loop.View()[0].policy_switches, 1u);
  // Same mode, other B: a new generation but not a mode switch.
  ASSERT_TRUE(table.Set({"vm1", "", -1}, {proto::KickMode::kStatic, 2, 10'000}).ok());
  auto o2 = loop.Step(table, {q.Next()}, 4 * kSec).at(0);
  EXPECT_GT(o2.generation, o.generation);
  EXPECT_EQ(loop.View()[0].policy_switches, 1u);
  table.Clear({"vm1", "", -1});
  auto o3 = loop.Step(table, {q.Next()}, 5 * kSec).at(0);
  EXPECT_EQ(o3.mode, proto::KickMode::kImmediate);
  EXPECT_EQ(o3.batch, 1);
  EXPECT_EQ(o3.defer_ns, 0u);
  EXPECT_EQ(loop.View()[0].policy_switches, 2u);
  EXPECT_EQ(loop.View()[0].source, PolicySource::kDefault);
}

TEST(ControlLoopTest, AdaptiveConvergesToHalfTheDepthAndStays) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.depth = 32;
  q.rate = 100'000;
  std::vector<uint32_t> bs;
  for (int i = 0; i < 10; ++i) {
    auto out = loop.Step(table, {q.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 1u);
    q.applied = out[0];
    bs.push_back(out[0].batch);
    if (out[0].batch > 1) {
      EXPECT_GE(out[0].defer_ns, proto::kMinDeferNs) << "batch > 1 without a defer bound";
      EXPECT_LE(out[0].defer_ns, proto::kMaxDeferNs);
    }
  }
  EXPECT_EQ(bs.back(), 16u);
  EXPECT_EQ(bs[bs.size() - 2], 16u);
  auto v = loop.View().at(0);
  EXPECT_LT(v.notifications_per_request, 0.1);
  EXPECT_NEAR(v.mean_depth, 32, 1e-9);
  EXPECT_FALSE(v.last_action.empty());
  // Load falls to QD 1: straight back to B = 1, T = 0.
  q.depth = 1;
  auto out = loop.Step(table, {q.Next()}, 11 * kSec);
  EXPECT_EQ(out.at(0).batch, 1);
  EXPECT_EQ(out.at(0).defer_ns, 0u);
}

TEST(ControlLoopTest, NoPolicyWithoutAgentAndGoneQueuesForgotten) {
  PolicyTable table;
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.connected = false;
  EXPECT_TRUE(loop.Step(table, {q.Next()}, kSec).empty());
  EXPECT_EQ(loop.View().size(), 1u);  // still shown in status
  EXPECT_FALSE(loop.View()[0].agent_connected);
  EXPECT_TRUE(loop.Step(table, {}, 2 * kSec).empty());
  EXPECT_TRUE(loop.View().empty());
}

TEST(ControlLoopTest, AcksOnlyForSentGenerations) {
  PolicyTable table;
  ControlLoop loop({}, 0);
  FakeQueue q;
  FakeQueue q2;
  q2.key.queue = 1;
  auto out = loop.Step(table, {q.Next(), q2.Next()}, kSec);
  auto g = out.at(0).generation, g2 = out.at(1).generation;
  ASSERT_GT(g2, g);
  loop.OnAck(q.key, g2 + 5);  // never issued: ignored
  EXPECT_EQ(loop.View()[0].acked_generation, 0u);
  loop.OnAck(q.key, g - 1);  // older than the queue's policy: not acked
  EXPECT_EQ(loop.View()[0].acked_generation, 0u);
  loop.OnAck(q.key, g2);  // the message's highest generation covers queue 0's
  EXPECT_EQ(loop.View()[0].acked_generation, g);
  loop.OnAck(QueueKey{"nope", "x", 0}, 1);  // unknown queue: no effect, no crash
}

TEST(ControlLoopTest, RatesAndCumulativeHistograms) {
  PolicyTable table;
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.depth = 4;
  q.rate = 1000;
  loop.Step(table, {q.Next()}, kSec);
  loop.Step(table, {q.Next()}, 2 * kSec);
  auto v = loop.View().at(0);
  EXPECT_DOUBLE_EQ(v.requests_per_s, 1000);
  EXPECT_DOUBLE_EQ(v.notifications_per_s, 1000);  // host delta over 1 s
  EXPECT_DOUBLE_EQ(v.notifications_per_request, 1.0);
  EXPECT_EQ(v.requests_total, 2000u);
  EXPECT_EQ(v.guest_kicks_total, 2000u);
  EXPECT_EQ(v.depth_hist[proto::DepthBucket(4)], 2000u);
  EXPECT_DOUBLE_EQ(v.depth_sum, 8000);
  EXPECT_GT(v.latency_sum_s, 0);
}

TEST(ControlLoopTest, LeaseExpiryCountedOnTransition) {
  PolicyTable table;
  ControlLoop loop({}, 0);
  QueueInput in;
  in.key = {"vm1", "d", 0};
  in.agent_connected = true;
  in.sample = MakeSample(1, 100, proto::KickMode::kImmediate, 1, 0, 3);
  in.sample->lease = proto::LeaseState::kExpired;
  loop.Step(table, {in}, kSec);
  loop.Step(table, {in}, 2 * kSec);
  EXPECT_EQ(loop.View()[0].lease_expiries, 1u);
  EXPECT_EQ(loop.View()[0].guest_lease, proto::LeaseState::kExpired);
}

// Issue 12, item 4: after its agent left, a queue showed lease "active" and
// its last rates forever. Nobody renews the lease once the agent is gone: it
// runs out `lease_ns` after the last renewal (the last Step with the agent
// connected), and the queue then shows (and counts) it expired, with no
// guest rates.
TEST(ControlLoopTest, AGoneAgentsLeaseExpiresWhenItRunsOut) {
  PolicyTable table;
  ControlLoop loop({.lease_ns = 5 * kSec, .law = {}}, 0);
  FakeQueue q;
  q.applied.generation = 1;  // the agent reports lease active
  loop.Step(table, {q.Next()}, kSec);
  ASSERT_EQ(loop.View().at(0).guest_lease, proto::LeaseState::kActive);
  q.connected = false;
  loop.Step(table, {q.Next()}, 2 * kSec);
  loop.Step(table, {q.Next()}, 5 * kSec);
  EXPECT_EQ(loop.View().at(0).guest_lease, proto::LeaseState::kActive) << "lease still runs";
  loop.Step(table, {q.Next()}, 6 * kSec);  // 5 s after the last renewal
  QueueView v = loop.View().at(0);
  EXPECT_EQ(v.guest_lease, proto::LeaseState::kExpired);
  EXPECT_EQ(v.lease_expiries, 1u);
  EXPECT_EQ(v.requests_per_s, 0);
  EXPECT_EQ(v.mean_depth, 0);
  EXPECT_EQ(v.requests_total, 10'000u);  // cumulative data stays
  loop.Step(table, {q.Next()}, 7 * kSec);
  EXPECT_EQ(loop.View().at(0).lease_expiries, 1u);  // counted once
}

// The agent's sample windows and the loop's Steps are not in phase: a sample
// arrives (its window ends), the Step comes `lag` of an interval later, and
// the policy sent there takes effect from then. A host total read at the
// Step already holds `lag` of the next window's kicks, counted under the
// policy in force before the Step; after a change of B that is a different
// kick rate, so the guest's (honest) kicks and that host delta disagree.
// Stamped on arrival they agree exactly.
struct LaggedQueue {
  QueueKey key{"vm1", "disk0", 0};
  uint32_t depth = 32;
  uint64_t rate = 100'000;  // requests per interval
  double lag = 0.5;         // of an interval, sample arrival -> Step
  uint64_t host_total = 0;  // at the end of the last window
  PolicyOut before, applied;  // in force before / since the last Step

  static uint64_t Kicks(double n, const PolicyOut& p) {
    const uint16_t b = p.generation ? std::max<uint16_t>(p.batch, 1) : 1;
    return static_cast<uint64_t>(n / b);
  }
  QueueInput Next(bool stamp) {
    // The window: `lag` under the policy before the last Step, the rest after.
    const uint64_t kicks = Kicks(lag * rate, before) + Kicks((1 - lag) * rate, applied);
    proto::QueueSample s = MakeSample(depth, rate, applied.mode, applied.batch, applied.defer_ns,
                                      applied.generation);
    s.kicks = kicks;
    host_total += kicks;
    QueueInput in;
    in.key = key;
    in.agent_connected = true;
    in.sample = s;
    if (stamp) in.host_notifications_at_sample = host_total;
    // At the Step: `lag` of the next window, under the policy in force now.
    in.host_notifications_total = host_total + Kicks(lag * rate, applied);
    return in;
  }
  void Apply(const PolicyOut& p) {
    before = applied;
    applied = p;
  }
};

std::vector<std::string> RunLagged(bool stamp, uint32_t* final_b) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  LaggedQueue q;
  std::vector<std::string> actions;
  for (int i = 0; i < 12; ++i) {
    auto out = loop.Step(table, {q.Next(stamp)}, (i + 1) * kSec);
    q.Apply(out.at(0));
    actions.push_back(loop.View().at(0).last_action);
  }
  *final_b = q.applied.batch;
  return actions;
}

TEST(ControlLoopTest, HostCountStampedAtSampleArrivalKeepsTheGuestTrusted) {
  uint32_t b = 0;
  std::vector<std::string> actions = RunLagged(/*stamp=*/true, &b);
  for (size_t i = 0; i < actions.size(); ++i)
    EXPECT_NE(actions[i], "distrusted") << "interval " << i;
  EXPECT_EQ(b, 16u);
}

TEST(ControlLoopTest, StepTimeHostCountMisjudgesAnHonestGuestAfterAChangeOfB) {
  // Why stamping exists: the same plant judged on Step-time totals.
  uint32_t b = 0;
  std::vector<std::string> actions = RunLagged(/*stamp=*/false, &b);
  EXPECT_NE(std::find(actions.begin(), actions.end(), "distrusted"), actions.end());
}

TEST(ControlLoopTest, StampAndStepTotalsAreNeverMixedInOneDelta) {
  PolicyTable table;  // immediate
  ControlLoop loop({}, 0);
  QueueInput in;
  in.key = {"vm1", "d", 0};
  in.agent_connected = true;
  in.sample = MakeSample(1, 100, proto::KickMode::kImmediate, 1, 0, 1);
  in.host_notifications_total = 1000;  // no stamp: Step-time total
  loop.Step(table, {in}, kSec);
  in.host_notifications_total = 1250;
  in.host_notifications_at_sample = 1100;  // stamped now: no delta this once
  loop.Step(table, {in}, 2 * kSec);
  EXPECT_DOUBLE_EQ(loop.View()[0].notifications_per_request, 1.0);  // the guest's 100 kicks
  in.host_notifications_total = 1400;
  in.host_notifications_at_sample = 1200;  // stamp to stamp: 100
  in.sample->kicks = 50;
  loop.Step(table, {in}, 3 * kSec);
  EXPECT_DOUBLE_EQ(loop.View()[0].notifications_per_request, 1.0);  // host: 100 / 100
}

TEST(ControlLoopTest, ObserveOnlyQueuesGetNoPolicyButTheirSamplesCount) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});  // whatever the default says
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.depth = 32;
  q.rate = 100'000;
  for (int i = 0; i < 4; ++i) {
    QueueInput in = q.Next();
    in.observe_only = true;
    EXPECT_TRUE(loop.Step(table, {in}, (i + 1) * kSec).empty());
  }
  auto v = loop.View().at(0);
  EXPECT_TRUE(v.observe_only);
  EXPECT_TRUE(v.has_sample);
  EXPECT_EQ(v.b, 1u);
  EXPECT_EQ(v.t_ns, 0u);
  EXPECT_TRUE(v.last_action.empty());  // no law ran
  EXPECT_EQ(v.requests_total, 400'000u);
  EXPECT_DOUBLE_EQ(v.notifications_per_request, 1.0);  // host-counted
}

TEST(ControlLoopTest, VkickVirtioBlkQueuesAreSteeredLikeVkickBlk) {
  // The module's disks get the same law and policies; only the view says
  // who drives them.
  PolicyTable table({proto::KickMode::kStatic, 8, 50'000});
  ControlLoop loop({}, 0);
  FakeQueue q;
  QueueInput in = q.Next();
  in.driver = proto::DriverKind::kVkickVirtioBlk;
  auto out = loop.Step(table, {in}, kSec);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].mode, proto::KickMode::kStatic);
  EXPECT_EQ(out[0].batch, 8);
  EXPECT_EQ(loop.View().at(0).driver, proto::DriverKind::kVkickVirtioBlk);
  EXPECT_FALSE(loop.View().at(0).observe_only);
}

TEST(ControlLoopTest, ANewAgentConnectionRestartsTheLawFromTheSpec) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.depth = 32;
  q.rate = 100'000;
  auto step = [&](uint64_t conn, bool with_sample, int i) {
    QueueInput in = q.Next();
    in.agent_connection = conn;
    if (!with_sample) in.sample.reset();
    auto out = loop.Step(table, {in}, i * kSec);
    q.applied = out.at(0);
    return out.at(0);
  };
  int i = 1;
  for (; i <= 10; ++i) step(1, true, i);
  EXPECT_EQ(q.applied.batch, 16);
  // The same connection, no sample: B is held.
  EXPECT_EQ(step(1, false, i++).batch, 16);
  // The agent re-announced (a new driver): what is sent at once is the
  // spec's start, not the previous driver's B.
  auto fresh = step(2, false, i++);
  EXPECT_EQ(fresh.batch, 1);
  EXPECT_EQ(fresh.defer_ns, 0u);
  for (int k = 0; k < 8; ++k) step(2, true, i++);
  EXPECT_EQ(q.applied.batch, 16);  // and it converges again
}

// ---- adaptive runs as event-idx with the law's (B, T) ------------------------

// What the agent would send back for a policy: valid on the wire.
proto::Rejection ValidateOut(const PolicyOut& o) {
  proto::QueuePolicy p{.ref = {0, 0}, .mode = o.mode, .batch = o.batch, .defer_ns = o.defer_ns,
                       .lease_ns = o.lease_ns, .generation = o.generation};
  return proto::Validate(proto::Policy{.queues = {p}});
}

// FakeQueue with the device's habit: a sleeping device wants every ask (one
// kick per batch), a polling one declines every ask (no kick at all).
struct EventIdxQueue : FakeQueue {
  bool polling = false;
  QueueInput Next() {
    QueueInput in = FakeQueue::Next();
    if (in.sample && applied.generation && applied.mode == proto::KickMode::kEventIdx) {
      proto::QueueSample& s = *in.sample;
      s.asks = s.kicks;  // one ask per batch (per request at B = 1)
      if (polling) {
        host_total -= s.kicks;
        s.suppressed = s.asks;
        s.kicks = 0;
        in.host_notifications_total = host_total;
      }
      EXPECT_EQ(proto::Validate(proto::Sample{1, {s}}), proto::Rejection::kNone);
    }
    return in;
  }
};

TEST(ControlLoopTest, AdaptiveSendsEventIdxWithTheLawsB) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  EventIdxQueue q;
  q.depth = 32;
  q.rate = 100'000;
  for (int i = 0; i < 10; ++i) {
    auto out = loop.Step(table, {q.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].mode, proto::KickMode::kEventIdx) << "interval " << i;
    EXPECT_EQ(ValidateOut(out[0]), proto::Rejection::kNone) << "interval " << i;
    q.applied = out[0];
  }
  EXPECT_EQ(q.applied.batch, 16);
  EXPECT_GE(q.applied.defer_ns, proto::kMinDeferNs);
  const QueueView v = loop.View().at(0);
  EXPECT_EQ(v.mode, proto::KickMode::kEventIdx);
  EXPECT_EQ(v.spec.mode, proto::KickMode::kAdaptive) << "the spec stays what the user set";
  EXPECT_EQ(v.b, 16u);
  EXPECT_EQ(v.applied_mode, proto::KickMode::kEventIdx);
}

TEST(ControlLoopTest, AdaptiveFirstPolicyIsEventIdxFromTheSpecsStart) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  EventIdxQueue q;
  q.connected = true;
  QueueInput in = q.Next();
  in.sample.reset();  // connected, nothing sampled yet
  auto out = loop.Step(table, {in}, kSec);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].mode, proto::KickMode::kEventIdx);
  EXPECT_EQ(out[0].batch, 1);
  EXPECT_EQ(out[0].defer_ns, 0u);
}

// A polling device: every policy is event-idx with the depth's B, kept
// although it removes no kick (judged on latency alone).
TEST(ControlLoopTest, AdaptiveOnAPollingDeviceBatchesByDepth) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  EventIdxQueue q;
  q.depth = 32;
  q.rate = 100'000;
  q.polling = true;
  for (int i = 0; i < 10; ++i) {
    auto out = loop.Step(table, {q.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].mode, proto::KickMode::kEventIdx) << i;
    EXPECT_EQ(ValidateOut(out[0]), proto::Rejection::kNone) << i;
    EXPECT_NE(loop.View().at(0).last_action, "revert") << i;
    q.applied = out[0];
  }
  EXPECT_EQ(q.applied.batch, 16);
}

TEST(ControlLoopTest, AdaptiveWithoutEventIdxSendsPlainAdaptive) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  LoopConfig config;
  config.law.event_idx = false;
  ControlLoop loop(config, 0);
  FakeQueue q;
  q.depth = 32;
  q.rate = 100'000;
  for (int i = 0; i < 10; ++i) {
    auto out = loop.Step(table, {q.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].mode, proto::KickMode::kAdaptive) << i;
    q.applied = out[0];
  }
  EXPECT_EQ(q.applied.batch, 16);
}

TEST(ControlLoopTest, StaticAndEventIdxSpecsAreSentAsTheyAre) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ASSERT_TRUE(table.Set({"vm1", "disk0", 0}, {proto::KickMode::kStatic, 8, 50'000}).ok());
  ASSERT_TRUE(table.Set({"vm1", "disk0", 1}, {proto::KickMode::kEventIdx, 1, 0}).ok());
  ControlLoop loop({}, 0);
  FakeQueue q0, q1, q2;
  q0.depth = q1.depth = q2.depth = 32;
  q1.key.queue = 1;
  q2.key.queue = 2;  // the adaptive default
  for (int i = 0; i < 4; ++i) {
    auto out = loop.Step(table, {q0.Next(), q1.Next(), q2.Next()}, (i + 1) * kSec);
    ASSERT_EQ(out.size(), 3u);
    for (const PolicyOut& o : out) {
      if (o.key.queue == 0) {
        EXPECT_EQ(o.mode, proto::KickMode::kStatic);
        EXPECT_EQ(o.batch, 8);
        EXPECT_EQ(o.defer_ns, 50'000u);
        q0.applied = o;
      } else if (o.key.queue == 1) {
        EXPECT_EQ(o.mode, proto::KickMode::kEventIdx);
        EXPECT_EQ(o.batch, 1);
        EXPECT_EQ(o.defer_ns, 0u);
        q1.applied = o;
      } else {
        EXPECT_EQ(o.mode, proto::KickMode::kEventIdx);
        q2.applied = o;
      }
      EXPECT_EQ(ValidateOut(o), proto::Rejection::kNone);
    }
  }
}

// A guest whose kick count the host keeps contradicting: after
// distrust_limit intervals the loop sends plain kicks (mode adaptive, B = 1),
// a new generation even where B was already 1.
TEST(ControlLoopTest, PersistentDistrustSwitchesToPlainKicksWithANewGeneration) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({}, 0);
  FakeQueue q;
  q.depth = 1;
  q.rate = 10'000;
  auto out = loop.Step(table, {q.Next()}, kSec);
  q.applied = out.at(0);
  ASSERT_EQ(q.applied.mode, proto::KickMode::kEventIdx);
  ASSERT_EQ(q.applied.batch, 1);
  const uint64_t gen = q.applied.generation;
  for (int i = 0; i < 3; ++i) {
    QueueInput in = q.Next();
    q.host_total += 4 * q.rate;  // the host saw 5x the guest's kicks
    in.host_notifications_total = q.host_total;
    out = loop.Step(table, {in}, (i + 2) * kSec);
    q.applied = out.at(0);
  }
  EXPECT_EQ(loop.View().at(0).last_action, "distrusted");
  EXPECT_EQ(q.applied.mode, proto::KickMode::kAdaptive);
  EXPECT_EQ(q.applied.batch, 1);
  EXPECT_EQ(q.applied.defer_ns, 0u);
  EXPECT_GT(q.applied.generation, gen) << "a change of mode is a change";
  EXPECT_EQ(ValidateOut(q.applied), proto::Rejection::kNone);
}

// A paused, suspended or migrating VM (QueueInput::frozen) sends no samples:
// that absence must change nothing, its lease must not run out (the guest's
// clock stands still too), and nothing is sent to it meanwhile.
TEST(ControlLoopTest, AFrozenQueueHoldsItsLawAndLeaseAndIsSentNothing) {
  PolicyTable table({proto::KickMode::kAdaptive, 1, 0});
  ControlLoop loop({.lease_ns = 5 * kSec, .law = {}}, 0);
  FakeQueue q;
  q.depth = 32;
  q.rate = 100'000;
  int64_t t = 0;
  for (int i = 0; i < 10; ++i) {
    auto out = loop.Step(table, {q.Next()}, t += kSec);
    ASSERT_EQ(out.size(), 1u);
    q.applied = out[0];
  }
  ASSERT_EQ(q.applied.batch, 16u);
  const QueueView before = loop.View().at(0);
  ASSERT_EQ(before.guest_lease, proto::LeaseState::kActive);
  // Paused for 30 s (six leases): the agent is silent, or its channel down.
  for (int i = 0; i < 30; ++i) {
    QueueInput in;
    in.key = q.key;
    in.frozen = true;
    in.agent_connected = i < 10;
    in.host_notifications_total = q.host_total;
    EXPECT_TRUE(loop.Step(table, {in}, t += kSec).empty()) << "nothing is sent to a frozen VM";
    QueueView v = loop.View().at(0);
    EXPECT_TRUE(v.frozen);
    EXPECT_EQ(v.b, before.b);
    EXPECT_EQ(v.t_ns, before.t_ns);
    EXPECT_EQ(v.mode, before.mode);
    EXPECT_EQ(v.generation, before.generation);
    EXPECT_EQ(v.guest_lease, proto::LeaseState::kActive) << "at " << i << " s";
    EXPECT_EQ(v.lease_expiries, 0u);
    EXPECT_EQ(v.requests_per_s, 0);
  }
  // A sample that arrived as the guest stopped: counted, steers nothing.
  const uint64_t requests = loop.View().at(0).requests_total;
  QueueInput late;
  late.key = q.key;
  late.frozen = true;
  late.sample = MakeSample(1, 500, q.applied.mode, q.applied.batch, q.applied.defer_ns,
                           q.applied.generation);
  EXPECT_TRUE(loop.Step(table, {late}, t += kSec).empty());
  EXPECT_EQ(loop.View().at(0).requests_total, requests + 500);
  EXPECT_EQ(loop.View().at(0).b, before.b) << "depth 1 would have taken B to 1";
  // Resumed, agent back: the law goes on from where it was.
  auto out = loop.Step(table, {q.Next()}, t += kSec);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].batch, 16u);
  EXPECT_EQ(out[0].generation, before.generation) << "no change, so no new generation";
  EXPECT_FALSE(loop.View().at(0).frozen);
}

TEST(ControlLoopTest, ALeaseStillRunsOutAfterTheResumeWithoutAnAgent) {
  PolicyTable table;
  ControlLoop loop({.lease_ns = 5 * kSec, .law = {}}, 0);
  FakeQueue q;
  q.applied.generation = 1;
  loop.Step(table, {q.Next()}, kSec);
  QueueInput frozen;
  frozen.key = q.key;
  frozen.frozen = true;
  for (int64_t t = 2; t <= 20; ++t) loop.Step(table, {frozen}, t * kSec);
  ASSERT_EQ(loop.View().at(0).guest_lease, proto::LeaseState::kActive);
  q.connected = false;  // resumed, but no agent renews it
  loop.Step(table, {q.Next()}, 24 * kSec);
  EXPECT_EQ(loop.View().at(0).guest_lease, proto::LeaseState::kActive) << "4 s since the resume";
  loop.Step(table, {q.Next()}, 25 * kSec);
  EXPECT_EQ(loop.View().at(0).guest_lease, proto::LeaseState::kExpired) << "5 s since the resume";
}

TEST(ControlLoopTest, AnOperatorsChangeWhileFrozenIsTakenAtOnceAndSentAtTheResume) {
  PolicyTable table;
  ControlLoop loop({.lease_ns = 5 * kSec, .law = {}}, 0);
  FakeQueue q;
  q.applied.generation = 1;
  auto out = loop.Step(table, {q.Next()}, kSec);
  ASSERT_EQ(out.at(0).mode, proto::KickMode::kImmediate);
  const uint64_t gen = out[0].generation;
  ASSERT_TRUE(table.Set({"vm1", "", -1}, {proto::KickMode::kStatic, 4, 20'000}).ok());
  QueueInput frozen;
  frozen.key = q.key;
  frozen.frozen = true;
  frozen.agent_connected = false;  // a paused guest's agent may be gone too
  EXPECT_TRUE(loop.Step(table, {frozen}, 2 * kSec).empty()) << "nothing sent to a stopped VM";
  QueueView v = loop.View().at(0);
  EXPECT_EQ(v.mode, proto::KickMode::kStatic) << "vkickctl status shows the change";
  EXPECT_EQ(v.b, 4u);
  EXPECT_EQ(v.source, PolicySource::kVm);
  EXPECT_GT(v.generation, gen);
  EXPECT_TRUE(v.frozen);
  EXPECT_FALSE(v.agent_connected);
  for (int64_t t = 3; t <= 12; ++t) loop.Step(table, {frozen}, t * kSec);
  EXPECT_EQ(loop.View().at(0).lease_expiries, 0u);
  EXPECT_EQ(loop.View().at(0).generation, v.generation) << "taken once";
  out = loop.Step(table, {q.Next()}, 13 * kSec);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].mode, proto::KickMode::kStatic);
  EXPECT_EQ(out[0].batch, 4);
  EXPECT_EQ(out[0].generation, v.generation);
}

TEST(ControlLoopTest, AQueueFirstSeenFrozenGetsItsInitialPolicy) {
  PolicyTable table({proto::KickMode::kStatic, 8, 50'000});
  ControlLoop loop({}, 0);
  QueueInput in;
  in.key = {"vm1", "disk0", 0};
  in.frozen = true;  // started with -S, or discovered paused
  loop.Step(table, {in}, kSec);
  QueueView v = loop.View().at(0);
  EXPECT_EQ(v.mode, proto::KickMode::kStatic);
  EXPECT_EQ(v.b, 8u);
  EXPECT_NE(v.generation, 0u);
  EXPECT_TRUE(v.frozen);
}

TEST(ControlLoopTest, BucketBoundsMatchProtocol) {
  const auto& d = DepthBucketBounds();
  ASSERT_EQ(d.size(), proto::kDepthBuckets - 1);
  for (size_t i = 0; i < d.size(); ++i) {
    EXPECT_EQ(proto::DepthBucket(static_cast<uint32_t>(d[i])), i);
    EXPECT_EQ(proto::DepthBucket(static_cast<uint32_t>(d[i]) + 1), i + 1);
  }
  const auto& l = LatencyBucketBoundsSeconds();
  ASSERT_EQ(l.size(), proto::kLatencyBuckets - 1);
  for (size_t i = 0; i < l.size(); ++i) {
    uint64_t ns = static_cast<uint64_t>(l[i] * 1e9 + 0.5);
    EXPECT_EQ(proto::LatencyBucket(ns - 1), i);
    EXPECT_EQ(proto::LatencyBucket(ns), i + 1);
  }
}

}  // namespace
}  // namespace vkick
