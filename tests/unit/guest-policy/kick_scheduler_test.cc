// The kick path: pure scheduler tests, then property tests that run the real
// BlkQueue (virtqueue + scheduler) against a fake device that only looks at
// the ring when kicked (the worst case: a lost kick strands a request forever)
// under a fake clock and random submit/poll schedules.
#include "guest-policy/core/kick_scheduler.h"

#include <algorithm>
#include <array>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "guest-policy/core/blk_queue.h"
#include "tests/unit/guest-policy/fake_device.h"

namespace vkick {
namespace {

using Action = KickScheduler::Action;

TEST(ParseKickPolicy, AcceptsTheFourPoliciesAndValidates) {
  EXPECT_EQ(ParseKickPolicy("immediate", 256)->mode, KickMode::kImmediate);
  EXPECT_EQ(ParseKickPolicy("event-idx", 256)->mode, KickMode::kEventIdx);
  EXPECT_EQ(ParseKickPolicy("adaptive", 256)->mode, KickMode::kAdaptive);
  EXPECT_EQ(*ParseKickPolicy("static:32,50us", 256), (KickPolicy{KickMode::kStatic, 32, 50000}));
  EXPECT_EQ(*ParseKickPolicy("static:4,20", 256), (KickPolicy{KickMode::kStatic, 4, 20000}));
  EXPECT_EQ(*ParseKickPolicy("static:4,1ms", 256), (KickPolicy{KickMode::kStatic, 4, 1000000}));
  EXPECT_EQ(*ParseKickPolicy("static:4,700ns", 256), (KickPolicy{KickMode::kStatic, 4, 700}));
  EXPECT_FALSE(ParseKickPolicy("static:0,10", 256).ok());
  EXPECT_FALSE(ParseKickPolicy("static:257,10", 256).ok());
  EXPECT_FALSE(ParseKickPolicy("static:8,2ms", 256).ok());
  EXPECT_FALSE(ParseKickPolicy("static:8,1001us", 256).ok());
  EXPECT_FALSE(ParseKickPolicy("static:8", 256).ok());
  EXPECT_FALSE(ParseKickPolicy("lazy", 256).ok());
}

TEST(KickScheduler, ImmediateKicksEverySubmit) {
  KickScheduler s({KickMode::kImmediate, 1, 0});
  for (int i = 0; i < 5; ++i) {
    auto d = s.OnSubmit(100 + i);
    EXPECT_EQ(d.action, Action::kKick);
    s.Kicked();
  }
}

TEST(KickScheduler, StaticKicksAtBatchOrTimer) {
  KickScheduler s({KickMode::kStatic, 3, 1000});
  EXPECT_EQ(s.OnSubmit(0).action, Action::kNone);
  EXPECT_EQ(s.OnSubmit(10).action, Action::kNone);
  auto d = s.OnSubmit(20);
  EXPECT_EQ(d.action, Action::kKick);
  EXPECT_EQ(d.why, KickWhy::kBatchFull);
  s.Kicked();
  EXPECT_EQ(s.OnSubmit(100).action, Action::kNone);
  EXPECT_EQ(*s.deadline_ns(), 1100u);
  EXPECT_EQ(s.OnPoll(1099).action, Action::kNone);
  d = s.OnPoll(1100);
  EXPECT_EQ(d.action, Action::kKick);
  EXPECT_EQ(d.why, KickWhy::kTimer);
  s.Kicked();
  EXPECT_FALSE(s.deadline_ns().has_value());
  EXPECT_EQ(s.OnPoll(5000).action, Action::kNone);
  // A submit that finds the oldest already overdue kicks at once.
  s.OnSubmit(6000);
  EXPECT_EQ(s.OnSubmit(7001).why, KickWhy::kTimer);
}

TEST(KickScheduler, PolicyChangeKicksPendingAtOnce) {
  KickScheduler s({KickMode::kStatic, 64, 1000000});
  s.OnSubmit(0);
  s.OnSubmit(1);
  auto d = s.SetPolicy({KickMode::kStatic, 128, 1000000});
  EXPECT_EQ(d.action, Action::kKick);
  EXPECT_EQ(d.why, KickWhy::kPolicyChange);
  s.Kicked();
  EXPECT_EQ(s.SetPolicy({KickMode::kImmediate, 1, 0}).action, Action::kNone);  // nothing pending
  EXPECT_EQ(s.SetPolicy({KickMode::kImmediate, 1, 0}).action, Action::kNone);  // no change
}

TEST(KickScheduler, EventIdxAsksTheDevice) {
  KickScheduler s({KickMode::kEventIdx, 1, 0});
  EXPECT_EQ(s.OnSubmit(0).action, Action::kAskDevice);
  s.Suppressed();
  EXPECT_EQ(s.pending(), 0u);
}

TEST(ParseKickPolicy, EventIdxTakesABatchAndADeferralBound) {
  EXPECT_EQ(*ParseKickPolicy("event-idx:8,50us", 256), (KickPolicy{KickMode::kEventIdx, 8, 50000}));
  EXPECT_EQ(*ParseKickPolicy("event-idx:256,1ms", 256), (KickPolicy{KickMode::kEventIdx, 256, 1000000}));
  EXPECT_EQ(*ParseKickPolicy("event-idx:4,700ns", 256), (KickPolicy{KickMode::kEventIdx, 4, 700}));
}

TEST(ParseKickPolicy, EventIdxBatchOfOneDropsTheDeferral) {
  // Nothing ever waits for a batch of one: plain event-idx.
  EXPECT_EQ(*ParseKickPolicy("event-idx:1,50us", 256), (KickPolicy{KickMode::kEventIdx, 1, 0}));
  EXPECT_EQ(*ParseKickPolicy("event-idx:1,50us", 256), *ParseKickPolicy("event-idx", 256));
}

TEST(ParseKickPolicy, EventIdxRejectsBadBatchesAndDeferrals) {
  for (const char* bad : {"event-idx:0,5", "event-idx:8", "event-idx:8,2ms", "event-idx:8,1001us",
                          "event-idx:257,5", "event-idx:", "event-idx:8,5,5", "event-idx:x,5",
                          "event-idx:8,5s", "event-idx8,5", "event-idx:-1,5"}) {
    EXPECT_FALSE(ParseKickPolicy(bad, 256).ok()) << bad;
  }
}

TEST(FormatKickPolicy, RoundTripsThroughParse) {
  for (const char* text : {"immediate", "event-idx", "adaptive", "static:32,50us", "static:4,0",
                           "event-idx:8,50us", "event-idx:64,1ms", "event-idx:2,1ns", "event-idx:1,50us"}) {
    auto p = ParseKickPolicy(text, 256);
    ASSERT_TRUE(p.ok()) << text << ": " << p.status();
    auto again = ParseKickPolicy(FormatKickPolicy(*p), 256);
    ASSERT_TRUE(again.ok()) << text << " -> " << FormatKickPolicy(*p) << ": " << again.status();
    EXPECT_EQ(*again, *p) << text << " -> " << FormatKickPolicy(*p);
  }
  EXPECT_EQ(FormatKickPolicy({KickMode::kEventIdx, 8, 50000}), "event-idx:8,50000ns");
  EXPECT_EQ(FormatKickPolicy({KickMode::kEventIdx, 1, 0}), "event-idx");
}

TEST(KickScheduler, EventIdxBatchAsksTheDeviceWhenTheBatchFills) {
  KickScheduler s({KickMode::kEventIdx, 4, 50000});
  for (uint64_t i = 0; i < 3; ++i) EXPECT_EQ(s.OnSubmit(100 + i).action, Action::kNone) << i;
  const auto d = s.OnSubmit(103);
  EXPECT_EQ(d.action, Action::kAskDevice);
  EXPECT_EQ(d.why, KickWhy::kBatchFull);
  s.Suppressed();
  EXPECT_EQ(s.pending(), 0u);
  EXPECT_FALSE(s.deadline_ns().has_value());
  // The next batch starts from zero.
  for (uint64_t i = 0; i < 3; ++i) EXPECT_EQ(s.OnSubmit(200 + i).action, Action::kNone) << i;
  EXPECT_EQ(s.OnSubmit(203).action, Action::kAskDevice);
}

TEST(KickScheduler, EventIdxPartialBatchAsksAtTheDeadline) {
  KickScheduler s({KickMode::kEventIdx, 4, 50000});
  EXPECT_EQ(s.OnSubmit(1000).action, Action::kNone);
  EXPECT_EQ(s.OnSubmit(2000).action, Action::kNone);
  ASSERT_TRUE(s.deadline_ns().has_value());
  EXPECT_EQ(*s.deadline_ns(), 1000u + 50000u) << "oldest + T";
  EXPECT_EQ(s.OnPoll(50999).action, Action::kNone);
  const auto d = s.OnPoll(51000);
  EXPECT_EQ(d.action, Action::kAskDevice);
  EXPECT_EQ(d.why, KickWhy::kTimer);
  s.Kicked();
  EXPECT_EQ(s.OnPoll(200000).action, Action::kNone) << "nothing pending";
  // A submit that finds the oldest overdue asks at once, also for the timer.
  s.OnSubmit(300000);
  const auto late = s.OnSubmit(350000);
  EXPECT_EQ(late.action, Action::kAskDevice);
  EXPECT_EQ(late.why, KickWhy::kTimer);
}

TEST(KickScheduler, EventIdxRingFullAndPolicyChangeKickWithoutAsking) {
  KickScheduler s({KickMode::kEventIdx, 4, 50000});
  s.OnSubmit(0);
  auto d = s.OnRingFull();
  EXPECT_EQ(d.action, Action::kKick);
  EXPECT_EQ(d.why, KickWhy::kRingFull);
  s.Kicked();
  s.OnSubmit(10);
  d = s.SetPolicy({KickMode::kStatic, 4, 50000});
  EXPECT_EQ(d.action, Action::kKick);
  EXPECT_EQ(d.why, KickWhy::kPolicyChange);
}

TEST(KickScheduler, EventIdxBatchOfOneAsksAtEverySubmit) {
  KickScheduler s({KickMode::kEventIdx, 1, 0});
  for (uint64_t i = 0; i < 5; ++i) {
    const auto d = s.OnSubmit(100 * i);
    EXPECT_EQ(d.action, Action::kAskDevice) << i;
    EXPECT_EQ(d.why, KickWhy::kEventIdx) << i;
    if (i % 2) s.Kicked(); else s.Suppressed();
    EXPECT_EQ(s.pending(), 0u);
    EXPECT_EQ(s.OnPoll(100 * i + 1'000'000).action, Action::kNone);
  }
}

// ---- property tests over the real BlkQueue -------------------------------

class KickRecorder final : public Notifier {
 public:
  explicit KickRecorder(testing::FakeDevice* dev) : dev_(dev) {}
  bool Notify(uint16_t) override {
    ++kicks;
    // Fault injection: a doorbell the device never hears (what a lost
    // deferred kick looks like from the device's side).
    if (drop && drop()) {
      ++dropped;
      return true;
    }
    if (on_kick) on_kick();
    if (sleepy) {
      awake = true;  // the device runs at its next step, not inside the kick
      return true;
    }
    dev_->Consume(/*defer_complete=*/true);
    return true;
  }
  uint64_t kicks = 0, dropped = 0;
  std::function<void()> on_kick;
  std::function<bool()> drop;
  bool sleepy = false;  // asynchronous device (see SleepyDeviceStep)
  bool awake = false;

 private:
  testing::FakeDevice* dev_;
};

// The queue most tests use: 64 entries, 32 requests in flight at most.
BlkQueueOptions SmallQueue(KickPolicy policy, bool event_idx = true) {
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 32;
  o.event_idx = event_idx;
  o.policy = policy;
  return o;
}

struct Harness {
  explicit Harness(BlkQueueOptions o, const ControlBlock* cb = nullptr)
      : opts(std::move(o)),
        mem(static_cast<uint8_t*>(std::aligned_alloc(4096, VringLayout::AlignUp(BlkQueue::MemoryBytes(opts), 4096)))) {
    std::memset(mem, 0, BlkQueue::MemoryBytes(opts));
    opts.control = cb;
    BlkConfig cfg;
    cfg.capacity_sectors = 1 << 20;
    dev = std::make_unique<testing::FakeDevice>(mem, opts.queue_size, opts.event_idx);
    rec = std::make_unique<KickRecorder>(dev.get());
    rec->on_kick = [this] {
      for (auto& [slot, t] : unkicked) {
        max_wait = std::max(max_wait, clock.NowNs() - t);
      }
      unkicked.clear();
    };
    auto q = BlkQueue::Create(opts, mem, &dma, rec.get(), &clock, cfg);
    EXPECT_TRUE(q.ok()) << q.status();
    queue = *std::move(q);
  }
  ~Harness() { queue.reset(); std::free(mem); }

  bool SubmitOne(uint32_t slot, uint64_t id) {
    unkicked[slot] = clock.NowNs();
    absl::Status st = queue->Submit(slot, BlkOp::kRead, id % 1000, 4096);
    if (!st.ok()) {
      unkicked.erase(slot);
      return false;
    }
    ++requests;
    NoteAsks();
    return true;
  }
  // An ask (event-idx) puts every pending request to the device: kicked, or
  // declined, which is the device's promise to look by itself. Either way
  // none is the driver's to kick any more.
  void NoteAsks() {
    const uint64_t a = queue->stats().asks;
    if (a == asks_seen) return;
    asks_seen = a;
    for (auto& [slot, t] : unkicked) max_wait = std::max(max_wait, clock.NowNs() - t);
    unkicked.clear();
  }
  void PollOnce() {
    in_poll = true;
    queue->Poll([&](const BlkCompletion& c) {
      EXPECT_TRUE(c.status.ok()) << c.status;
      ++completed[c.slot];
      ++completions;
      latency_sum += c.latency_ns;
      free_slots.push_back(c.slot);
    });
    NoteAsks();
    in_poll = false;
  }

  BlkQueueOptions opts;
  uint8_t* mem;
  FakeClock clock;
  IdentityDma dma;
  std::unique_ptr<testing::FakeDevice> dev;
  std::unique_ptr<KickRecorder> rec;
  std::unique_ptr<BlkQueue> queue;
  std::map<uint32_t, uint64_t> unkicked;  // slot -> submit time, not yet covered by a kick
  uint64_t max_wait = 0;
  uint64_t asks_seen = 0;
  uint64_t requests = 0, completions = 0, latency_sum = 0;
  std::map<uint32_t, uint64_t> completed;
  std::vector<uint32_t> free_slots;
  bool in_poll = false;  // kicks issued now are the poller's deferred ones
};

struct Schedule {
  uint64_t seed;
  uint64_t poll_period_ns;
};

// What one randomized run observed; the tests decide what is a violation,
// so the same harness can be pointed at a deliberately broken kick path.
struct PropertyReport {
  uint64_t requests = 0, completions = 0, completed_slots_total = 0;
  uint64_t kicks = 0, stats_kicks = 0, stats_completions = 0, in_flight_after = 0;
  uint64_t max_pending_ns = 0;  // oldest published-but-unheard request, at any poll or kick
  uint64_t dropped = 0;
  uint64_t asks = 0, suppressed = 0;  // BlkQueue::stats()
  std::array<uint64_t, 6> kicks_by_why{};
};

enum class Fault { kNone, kDropPollerKicks };

// The device's habit. kSleeps: it looks at the ring only when kicked and
// wants every kick (avail_event = its last_avail_idx, or no NO_NOTIFY flag).
// kPolls: it looks at every step by itself and declines every notification.
enum class Device { kSleeps, kPolls };

// Random submits between polls that are at most P apart; the device completes
// a random share of what it has seen. Then drains: no submits, polls go on.
PropertyReport Explore(KickPolicy policy, bool event_idx, const Schedule& s, Fault fault = Fault::kNone,
                       int steps = 4000, Device device = Device::kSleeps) {
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 32;
  o.event_idx = event_idx;
  o.policy = policy;
  Harness h(o);
  if (fault == Fault::kDropPollerKicks) h.rec->drop = [&h] { return h.in_poll; };
  if (device == Device::kPolls) h.dev->SetPolling(true);
  for (uint32_t i = 0; i < o.slots; ++i) h.free_slots.push_back(i);
  std::mt19937_64 rng(s.seed);
  uint64_t next_id = 0;
  PropertyReport r;
  auto note_pending = [&] {
    for (auto& [slot, t] : h.unkicked) r.max_pending_ns = std::max(r.max_pending_ns, h.clock.NowNs() - t);
  };
  for (int step = 0; step < steps; ++step) {
    int burst = static_cast<int>(rng() % 6);
    while (burst-- > 0 && !h.free_slots.empty()) {
      uint32_t slot = h.free_slots.back();
      h.free_slots.pop_back();
      if (!h.SubmitOne(slot, next_id++)) {
        ADD_FAILURE() << "submit failed";
        return r;
      }
      h.clock.Advance(rng() % (s.poll_period_ns / 4 + 1));
    }
    h.clock.Advance(rng() % (s.poll_period_ns / 2 + 1));
    if (device == Device::kPolls) h.dev->Consume(/*defer_complete=*/true);
    h.dev->Complete(rng() % 4);
    h.PollOnce();
    note_pending();
  }
  for (int i = 0; i < 10000 && h.completions < h.requests; ++i) {
    h.clock.Advance(s.poll_period_ns);
    if (device == Device::kPolls) h.dev->Consume(/*defer_complete=*/true);
    h.dev->Complete(8);
    h.PollOnce();
    note_pending();
  }
  r.requests = h.requests;
  r.completions = h.completions;
  for (auto& [slot, n] : h.completed) r.completed_slots_total += n;
  r.kicks = h.rec->kicks;
  r.dropped = h.rec->dropped;
  r.stats_kicks = h.queue->stats().kicks;
  r.stats_completions = h.queue->stats().completions;
  r.in_flight_after = h.queue->in_flight();
  r.max_pending_ns = std::max(r.max_pending_ns, h.max_wait);
  r.asks = h.queue->stats().asks;
  r.suppressed = h.queue->stats().suppressed;
  r.kicks_by_why = h.queue->stats().kicks_by_why;
  return r;
}

// The invariants of the kick path, as one predicate (used both ways: must
// hold for the real code, must fail for a mutant).
::testing::AssertionResult Holds(const PropertyReport& r, const KickPolicy& p, uint64_t poll_period_ns) {
  if (r.completions != r.requests || r.in_flight_after != 0) {
    return ::testing::AssertionFailure() << r.requests - r.completions << " requests never completed";
  }
  if (r.completed_slots_total != r.requests || r.stats_completions != r.requests) {
    return ::testing::AssertionFailure() << "completions not exactly once";
  }
  if (r.max_pending_ns > p.defer_ns + poll_period_ns) {
    return ::testing::AssertionFailure() << "a request waited " << r.max_pending_ns << " ns for its kick, bound "
                                         << p.defer_ns + poll_period_ns;
  }
  if (r.kicks > r.requests || r.kicks != r.stats_kicks) {
    return ::testing::AssertionFailure() << r.kicks << " kicks for " << r.requests << " requests";
  }
  if (r.suppressed > r.asks || r.asks > r.requests) {
    return ::testing::AssertionFailure() << r.suppressed << " suppressed of " << r.asks << " asks for " << r.requests
                                         << " requests";
  }
  if (p.mode != KickMode::kEventIdx && r.asks != 0) {
    return ::testing::AssertionFailure() << r.asks << " asks under " << FormatKickPolicy(p);
  }
  return ::testing::AssertionSuccess();
}

void RunProperty(KickPolicy policy, bool event_idx, const Schedule& s, uint64_t* kicks_out,
                 uint64_t* requests_out) {
  PropertyReport r = Explore(policy, event_idx, s);
  EXPECT_TRUE(Holds(r, policy, s.poll_period_ns)) << FormatKickPolicy(policy);
  *kicks_out = r.kicks;
  *requests_out = r.requests;
}

TEST(KickProperty, NoRequestPendingLongerThanTPlusPollPeriod) {
  const KickPolicy policies[] = {
      {KickMode::kImmediate, 1, 0},    {KickMode::kEventIdx, 1, 0},   {KickMode::kStatic, 8, 50000},
      {KickMode::kStatic, 32, 200000}, {KickMode::kStatic, 64, 1000000}, {KickMode::kStatic, 4, 0},
  };
  for (const KickPolicy& p : policies) {
    for (bool ei : {false, true}) {
      if (p.mode == KickMode::kEventIdx && !ei) continue;
      for (uint64_t seed = 1; seed <= 5; ++seed) {
        SCOPED_TRACE(FormatKickPolicy(p) + (ei ? " event_idx" : "") + " seed " + std::to_string(seed));
        uint64_t kicks = 0, reqs = 0;
        RunProperty(p, ei, {seed, 20000 * seed}, &kicks, &reqs);
        if (p.mode == KickMode::kImmediate) {
          EXPECT_EQ(kicks, reqs) << "immediate = one kick per request";
        }
        if (p.mode == KickMode::kStatic && p.batch >= 8) {
          EXPECT_LT(kicks, reqs);
        }
        ASSERT_GT(reqs, 200u);
      }
    }
  }
}

// event-idx:B,T in front of a device that wants every kick and one that
// polls and wants none: every request completes exactly once, none waits for
// its kick or its ask longer than T + P, and the counters say which device it
// was (the polling one gets no kick at all).
TEST(KickProperty, EventIdxBatchesBoundThePendingTimeForEveryDevice) {
  const KickPolicy policies[] = {{KickMode::kEventIdx, 8, 50000}, {KickMode::kEventIdx, 32, 200000},
                                 {KickMode::kEventIdx, 4, 1000},  {KickMode::kEventIdx, 64, 1000000},
                                 {KickMode::kEventIdx, 1, 0}};
  for (const KickPolicy& p : policies) {
    for (bool ei : {false, true}) {
      for (Device device : {Device::kSleeps, Device::kPolls}) {
        for (uint64_t seed = 1; seed <= 3; ++seed) {
          SCOPED_TRACE(FormatKickPolicy(p) + (ei ? " event_idx" : " no_notify_flag") +
                       (device == Device::kPolls ? " polling device" : " sleeping device") + " seed " +
                       std::to_string(seed));
          const Schedule sch{seed, 20000 * seed};
          const PropertyReport r = Explore(p, ei, sch, Fault::kNone, 4000, device);
          EXPECT_TRUE(Holds(r, p, sch.poll_period_ns));
          ASSERT_GT(r.requests, 200u);
          ASSERT_GT(r.asks, 0u);
          if (device == Device::kPolls) {
            EXPECT_EQ(r.suppressed, r.asks) << "the polling device declines every ask";
            EXPECT_EQ(r.kicks, 0u);
          } else {
            EXPECT_EQ(r.suppressed, 0u) << "the sleeping device wants every ask";
            EXPECT_EQ(r.kicks, r.asks);
          }
          if (p.batch == 1) {
            EXPECT_EQ(r.asks, r.requests) << "plain event-idx asks at every request";
            EXPECT_EQ(r.kicks_by_why[static_cast<size_t>(KickWhy::kEventIdx)], r.kicks);
          } else {
            EXPECT_LT(r.asks, r.requests) << "a batch is one ask";
            // A kick after an ask says why the batch closed.
            EXPECT_EQ(r.kicks_by_why[static_cast<size_t>(KickWhy::kBatchFull)] +
                          r.kicks_by_why[static_cast<size_t>(KickWhy::kTimer)],
                      r.kicks);
          }
        }
      }
    }
  }
}

// The same harness sees a device that declines an ask and then never looks:
// requests never complete, and Holds() says so (the test can fail).
TEST(KickProperty, CatchesADeviceThatDeclinesAndNeverLooks) {
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 8;
  o.event_idx = true;
  o.policy = {KickMode::kEventIdx, 4, 50000};
  Harness h(o);
  h.dev->SetPolling(true);  // declines, but nobody calls Consume()
  for (uint32_t i = 0; i < 8; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  for (int i = 0; i < 100; ++i) {
    h.clock.Advance(20000);
    h.dev->Complete(8);
    h.PollOnce();
  }
  PropertyReport r;
  r.requests = h.requests;
  r.completions = h.completions;
  r.in_flight_after = h.queue->in_flight();
  EXPECT_EQ(h.queue->stats().suppressed, 2u);
  EXPECT_FALSE(Holds(r, o.policy, 20000));
}

// ---- BlkQueue's counters -------------------------------------------------

TEST(BlkQueueStats, APollingDeviceDeclinesEveryAskAndGetsNoKick) {
  BlkQueueOptions o = SmallQueue({KickMode::kEventIdx, 4, 50000}, true);
  Harness h(o);
  h.dev->SetPolling(true);
  for (uint32_t i = 0; i < 8; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.queue->stats().asks, 2u) << "two full batches";
  EXPECT_EQ(h.queue->stats().suppressed, 2u);
  EXPECT_EQ(h.queue->stats().kicks, 0u);
  EXPECT_EQ(h.rec->kicks, 0u);
  EXPECT_TRUE(h.unkicked.empty()) << "asked: the device promised to look";
  EXPECT_EQ(h.dev->Consume(), 8) << "it finds them by itself";
  h.PollOnce();
  EXPECT_EQ(h.completions, 8u);
  // A partial batch: put to the device at its deadline, declined as well.
  for (uint32_t i = 0; i < 3; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.queue->stats().asks, 2u);
  h.clock.Advance(50000);
  h.PollOnce();
  EXPECT_EQ(h.queue->stats().asks, 3u);
  EXPECT_EQ(h.queue->stats().suppressed, 3u);
  EXPECT_EQ(h.queue->stats().kicks, 0u);
  EXPECT_FALSE(h.queue->NextDeadlineNs().has_value()) << "nothing pending after a declined ask";
}

TEST(BlkQueueStats, ASleepingDeviceWantsEveryAskAndTheKickSaysWhy) {
  BlkQueueOptions o = SmallQueue({KickMode::kEventIdx, 4, 50000}, true);
  Harness h(o);
  for (uint32_t i = 0; i < 8; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.queue->stats().asks, 2u);
  EXPECT_EQ(h.queue->stats().suppressed, 0u);
  EXPECT_EQ(h.queue->stats().kicks, 2u);
  EXPECT_EQ(h.rec->kicks, 2u);
  EXPECT_EQ(h.queue->stats().kicks_by_why[static_cast<size_t>(KickWhy::kBatchFull)], 2u);
  ASSERT_TRUE(h.SubmitOne(8, 8));
  h.clock.Advance(50000);
  h.PollOnce();
  EXPECT_EQ(h.queue->stats().asks, 3u);
  EXPECT_EQ(h.queue->stats().kicks, 3u);
  EXPECT_EQ(h.queue->stats().kicks_by_why[static_cast<size_t>(KickWhy::kTimer)], 1u);
  EXPECT_EQ(h.dev->last_avail(), 9);
}

TEST(BlkQueueStats, WithoutEventIdxTheAskFollowsTheNoNotifyFlag) {
  BlkQueueOptions o = SmallQueue({KickMode::kEventIdx, 1, 0}, false);
  Harness h(o);
  h.dev->SetPolling(true);  // VRING_USED_F_NO_NOTIFY
  for (uint32_t i = 0; i < 5; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.queue->stats().asks, 5u) << "B = 1: one ask per request";
  EXPECT_EQ(h.queue->stats().suppressed, 5u);
  EXPECT_EQ(h.rec->kicks, 0u);
  h.dev->SetPolling(false);
  ASSERT_TRUE(h.SubmitOne(5, 5));
  EXPECT_EQ(h.queue->stats().asks, 6u);
  EXPECT_EQ(h.queue->stats().suppressed, 5u);
  EXPECT_EQ(h.rec->kicks, 1u);
  EXPECT_EQ(h.queue->stats().kicks_by_why[static_cast<size_t>(KickWhy::kEventIdx)], 1u);
}

TEST(BlkQueueStats, StaticAndImmediateNeverAsk) {
  for (KickPolicy p : {KickPolicy{KickMode::kImmediate, 1, 0}, KickPolicy{KickMode::kStatic, 4, 50000}}) {
    BlkQueueOptions o;
    o.queue_size = 64;
    o.slots = 32;
    o.event_idx = true;
    o.policy = p;
    Harness h(o);
    h.dev->SetPolling(true);  // plain kicks ignore what the device wants
    for (uint32_t i = 0; i < 8; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
    EXPECT_EQ(h.queue->stats().asks, 0u) << FormatKickPolicy(p);
    EXPECT_EQ(h.queue->stats().suppressed, 0u) << FormatKickPolicy(p);
    EXPECT_EQ(h.rec->kicks, p.mode == KickMode::kImmediate ? 8u : 2u) << FormatKickPolicy(p);
  }
}

uint64_t SumOf(const uint64_t* a, size_t n) {
  uint64_t s = 0;
  for (size_t i = 0; i < n; ++i) s += a[i];
  return s;
}

TEST(BlkQueueSharedStats, CountsRequestsDepthAndLatencyExactly) {
  StatsQueue shared{};
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 8;
  o.policy = {KickMode::kImmediate, 1, 0};
  o.shared_stats = &shared;
  Harness h(o);
  for (uint32_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(h.SubmitOne(0, i));
    h.clock.Advance(5000);
    ASSERT_EQ(h.dev->Complete(1), 1);
    h.PollOnce();
  }
  EXPECT_EQ(shared.depth_limit, 8u) << "the queue's slots";
  EXPECT_EQ(shared.requests, 10u);
  EXPECT_EQ(shared.completions, 10u);
  EXPECT_EQ(shared.depth_sum, 10u) << "depth 1 at every submit";
  EXPECT_EQ(shared.depth_hist[0], 10u);
  EXPECT_EQ(shared.latency_sum_ns, 50000u);
  EXPECT_EQ(shared.latency_hist[3], 10u) << "5 us is in [4, 8) us";
  EXPECT_EQ(shared.kicks, 10u);
  EXPECT_EQ(shared.kicks_by_why[static_cast<size_t>(KickWhy::kImmediate)], 10u);
  EXPECT_EQ(shared.asks, 0u);
  EXPECT_EQ(shared.suppressed, 0u);
  // The queue's own counters are kept as before.
  EXPECT_EQ(h.queue->stats().requests, 10u);
  EXPECT_EQ(h.queue->stats().completions, 10u);
}

// N requests through the fake device under each kind of policy and device:
// the shared block agrees with the queue's own counters and with itself.
TEST(BlkQueueSharedStats, AgreeWithTheQueuesCountersUnderRandomLoad) {
  struct Case {
    KickPolicy p;
    Device device;
  } cases[] = {{{KickMode::kEventIdx, 8, 50000}, Device::kPolls},
               {{KickMode::kEventIdx, 8, 50000}, Device::kSleeps},
               {{KickMode::kEventIdx, 1, 0}, Device::kPolls},
               {{KickMode::kStatic, 8, 50000}, Device::kSleeps},
               {{KickMode::kImmediate, 1, 0}, Device::kSleeps}};
  for (const Case& c : cases) {
    SCOPED_TRACE(FormatKickPolicy(c.p) + (c.device == Device::kPolls ? " polling" : " sleeping"));
    StatsQueue shared{};
    BlkQueueOptions o;
    o.queue_size = 64;
    o.slots = 32;
    o.event_idx = true;
    o.policy = c.p;
    o.shared_stats = &shared;
    Harness h(o);
    if (c.device == Device::kPolls) h.dev->SetPolling(true);
    for (uint32_t i = 0; i < o.slots; ++i) h.free_slots.push_back(i);
    std::mt19937_64 rng(11);
    uint64_t depth_sum = 0;
    std::array<uint64_t, kStatsDepthBuckets> depth_hist{};
    auto step = [&] {
      h.clock.Advance(rng() % 10000);
      if (c.device == Device::kPolls) h.dev->Consume(/*defer_complete=*/true);
      h.dev->Complete(rng() % 6);
      h.PollOnce();
    };
    for (int i = 0; i < 2000; ++i) {
      for (int burst = static_cast<int>(rng() % 6); burst > 0 && !h.free_slots.empty(); --burst) {
        const uint32_t slot = h.free_slots.back();
        h.free_slots.pop_back();
        ASSERT_TRUE(h.SubmitOne(slot, i));
        const uint32_t depth = h.queue->in_flight();
        depth_sum += depth;
        ++depth_hist[std::min<size_t>(depth <= 1 ? 0 : 31 - __builtin_clz(depth), kStatsDepthBuckets - 1)];
        h.clock.Advance(rng() % 3000);
      }
      step();
    }
    for (int i = 0; i < 1000 && h.completions < h.requests; ++i) step();
    const uint64_t n = h.requests;
    ASSERT_GT(n, 1000u);
    ASSERT_EQ(h.completions, n);
    const BlkQueueStats& st = h.queue->stats();
    EXPECT_EQ(shared.depth_limit, o.slots);
    EXPECT_EQ(shared.requests, n);
    EXPECT_EQ(shared.completions, n);
    EXPECT_EQ(SumOf(shared.depth_hist, kStatsDepthBuckets), n);
    EXPECT_EQ(SumOf(shared.latency_hist, kStatsLatencyBuckets), n);
    EXPECT_EQ(shared.depth_sum, depth_sum);
    for (size_t b = 0; b < kStatsDepthBuckets; ++b) EXPECT_EQ(shared.depth_hist[b], depth_hist[b]) << "bucket " << b;
    EXPECT_EQ(shared.latency_sum_ns, h.latency_sum);
    EXPECT_EQ(shared.kicks, st.kicks);
    EXPECT_EQ(shared.kicks, h.rec->kicks);
    EXPECT_EQ(SumOf(shared.kicks_by_why, kStatsWhySlots), shared.kicks);
    for (size_t w = 0; w < st.kicks_by_why.size(); ++w) EXPECT_EQ(shared.kicks_by_why[w], st.kicks_by_why[w]) << w;
    EXPECT_EQ(shared.kicks_by_why[6], 0u);
    EXPECT_EQ(shared.kicks_by_why[7], 0u);
    EXPECT_EQ(shared.asks, st.asks);
    EXPECT_EQ(shared.suppressed, st.suppressed);
    EXPECT_LE(shared.suppressed, shared.asks);
    if (c.p.mode == KickMode::kEventIdx) {
      EXPECT_GT(shared.asks, 0u);
      EXPECT_EQ(shared.kicks + shared.suppressed, shared.asks) << "every ask is a kick or declined";
    }
    if (c.device == Device::kPolls) {
      EXPECT_EQ(shared.kicks, 0u);
    }
  }
}

TEST(BlkQueueSharedStats, FailAllCountsItsCompletions) {
  StatsQueue shared{};
  BlkQueueOptions o;
  o.queue_size = 16;
  o.slots = 8;
  o.policy = {KickMode::kImmediate, 1, 0};
  o.shared_stats = &shared;
  Harness h(o);
  for (uint32_t i = 0; i < 3; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  h.clock.Advance(2000);
  int failed = 0;
  h.queue->FailAll(absl::UnavailableError("backend gone"), [&](const BlkCompletion&) { ++failed; });
  EXPECT_EQ(failed, 3);
  EXPECT_EQ(shared.requests, 3u);
  EXPECT_EQ(shared.completions, 3u);
  EXPECT_EQ(SumOf(shared.latency_hist, kStatsLatencyBuckets), 3u);
  EXPECT_EQ(shared.depth_sum, 1u + 2u + 3u);
}

// The test would catch a lost kick: a scheduler that drops the timer kick
// leaves requests pending beyond T + P (checked by the same harness).
TEST(KickProperty, HarnessDetectsAStrandedRequest) {
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 8;
  o.policy = {KickMode::kStatic, 8, 1000};
  Harness h(o);
  ASSERT_TRUE(h.SubmitOne(0, 0));
  h.clock.Advance(5000);  // no Poll: nobody runs the deferred kick
  EXPECT_EQ(h.rec->kicks, 0u);
  EXPECT_EQ(h.unkicked.size(), 1u);
  h.PollOnce();           // the poller's turn fires it
  EXPECT_EQ(h.rec->kicks, 1u);
  EXPECT_EQ(h.queue->stats().kicks_by_why[static_cast<size_t>(KickWhy::kTimer)], 1u);
}

TEST(KickProperty, LivePolicySwitchNeverStrandsPending) {
  BlkQueueOptions o = SmallQueue({KickMode::kStatic, 32, 1000000}, true);
  Harness h(o);
  for (uint32_t i = 0; i < 10; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.rec->kicks, 0u);
  h.queue->SetPolicy({KickMode::kImmediate, 1, 0});
  EXPECT_EQ(h.rec->kicks, 1u) << "pending requests kicked at the switch";
  EXPECT_TRUE(h.unkicked.empty());
  EXPECT_EQ(h.dev->last_avail(), 10);
  std::mt19937 rng(3);
  const KickPolicy cycle[] = {{KickMode::kStatic, 16, 100000}, {KickMode::kEventIdx, 1, 0},
                              {KickMode::kStatic, 4, 1000}, {KickMode::kImmediate, 1, 0}};
  uint32_t next_slot = 10;
  for (int round = 0; round < 200; ++round) {
    h.dev->Complete(100);
    h.PollOnce();
    for (uint32_t s : h.free_slots) ASSERT_TRUE(h.SubmitOne(s, round));
    h.free_slots.clear();
    while (next_slot < 32 && rng() % 2) ASSERT_TRUE(h.SubmitOne(next_slot++, round));
    h.queue->SetPolicy(cycle[round % 4]);
    ASSERT_TRUE(h.unkicked.empty()) << "round " << round;
  }
}

TEST(KickProperty, AdaptiveFollowsControlBlockAndFallsBackWhenLeaseExpires) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 32;
  o.policy = {KickMode::kAdaptive, 1, 0};
  Harness h(o, &cb);
  ControlEntry e{};
  e.mode = static_cast<uint8_t>(ControlMode::kStatic);
  e.batch = 8;
  e.defer_ns = 500000;
  e.lease_expiry_ns = h.clock.NowNs() + 10'000'000;
  WriteControlEntries(&cb, &e, 1);
  for (uint32_t i = 0; i < 16; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.rec->kicks, 2u) << "B=8 from the control block";
  for (uint32_t i = 16; i < 20; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.rec->kicks, 2u);
  h.clock.Advance(10'000'000);  // lease over: fallback, pending kicked at once
  h.PollOnce();
  EXPECT_EQ(h.rec->kicks, 3u);
  EXPECT_TRUE(h.unkicked.empty());
  EXPECT_EQ(h.queue->adaptive()->fallbacks(), 1u);
  ASSERT_TRUE(h.SubmitOne(20, 20));
  EXPECT_EQ(h.rec->kicks, 4u) << "immediate after the fallback";
  // Agent dies mid-write (odd seq forever): the old lease still bounds it.
  e.lease_expiry_ns = h.clock.NowNs() + 1'000'000;
  WriteControlEntries(&cb, &e, 1);
  h.PollOnce();
  cb.seq |= 1;
  ASSERT_TRUE(h.SubmitOne(21, 21));
  EXPECT_EQ(h.rec->kicks, 4u) << "still batching on the last good lease";
  h.clock.Advance(1'000'000);
  h.PollOnce();
  EXPECT_EQ(h.rec->kicks, 5u);
  EXPECT_TRUE(h.unkicked.empty());
}

// The agent's event-idx entry reaches the driver with its B and T (adaptive
// runs every queue as event-idx:B,T); a lost lease falls back to immediate.
TEST(KickProperty, AdaptiveRunsTheControlBlocksEventIdxBatch) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  BlkQueueOptions o = SmallQueue({KickMode::kAdaptive, 1, 0}, true);
  Harness h(o, &cb);
  h.dev->SetPolling(true);
  ControlEntry e{};
  e.mode = static_cast<uint8_t>(ControlMode::kEventIdx);
  e.batch = 4;
  e.defer_ns = 50000;
  e.lease_expiry_ns = h.clock.NowNs() + 10'000'000;
  WriteControlEntries(&cb, &e, 1);
  for (uint32_t i = 0; i < 8; ++i) ASSERT_TRUE(h.SubmitOne(i, i));
  EXPECT_EQ(h.queue->scheduler().policy(), (KickPolicy{KickMode::kEventIdx, 4, 50000}));
  EXPECT_EQ(h.queue->stats().asks, 2u) << "B = 4 from the control block";
  EXPECT_EQ(h.queue->stats().suppressed, 2u);
  EXPECT_EQ(h.rec->kicks, 0u);
  ASSERT_TRUE(h.SubmitOne(8, 8));
  h.clock.Advance(10'000'000);  // lease over: pending kicked at the switch, then immediate
  h.PollOnce();
  EXPECT_EQ(h.queue->scheduler().policy().mode, KickMode::kImmediate);
  EXPECT_EQ(h.rec->kicks, 1u);
  EXPECT_EQ(h.queue->stats().kicks_by_why[static_cast<size_t>(KickWhy::kPolicyChange)], 1u);
  ASSERT_TRUE(h.SubmitOne(9, 9));
  EXPECT_EQ(h.rec->kicks, 2u);
  EXPECT_TRUE(h.unkicked.empty());
}

// A test must be able to fail: the same harness and predicate, pointed at a
// kick path whose deferred kick (the one the poller issues) is lost, report
// a violation for every seed: a request waits past T + P, or never completes.
TEST(KickProperty, CatchesALostDeferredKick) {
  const KickPolicy p{KickMode::kStatic, 16, 50000};
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    const Schedule s{seed, 20000};
    PropertyReport good = Explore(p, false, s);
    EXPECT_TRUE(Holds(good, p, s.poll_period_ns)) << "seed " << seed;
    PropertyReport bad = Explore(p, false, s, Fault::kDropPollerKicks);
    ASSERT_GT(bad.dropped, 0u) << "the mutant never fired: the harness would not see a timer kick at all";
    EXPECT_FALSE(Holds(bad, p, s.poll_period_ns)) << "seed " << seed << ": dropped " << bad.dropped
                                                  << " deferred kicks and nothing noticed";
  }
}

// Live policy changes at random moments while requests are in flight: every
// request completes exactly once, none waits longer than the largest T in
// play plus one poll period, kicks <= requests.
TEST(KickProperty, RandomPolicyChangesMidFlightStrandNothing) {
  const KickPolicy policies[] = {{KickMode::kStatic, 32, 1000000}, {KickMode::kImmediate, 1, 0},
                                 {KickMode::kStatic, 8, 50000},    {KickMode::kEventIdx, 1, 0},
                                 {KickMode::kStatic, 3, 0},        {KickMode::kStatic, 64, 200000}};
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    BlkQueueOptions o;
    o.queue_size = 64;
    o.slots = 32;
    o.event_idx = true;
    o.policy = policies[0];
    Harness h(o);
    for (uint32_t i = 0; i < o.slots; ++i) h.free_slots.push_back(i);
    std::mt19937_64 rng(seed);
    const uint64_t P = 30000;
    uint64_t max_pending = 0, switches = 0;
    for (int step = 0; step < 3000; ++step) {
      int burst = static_cast<int>(rng() % 5);
      while (burst-- > 0 && !h.free_slots.empty()) {
        uint32_t slot = h.free_slots.back();
        h.free_slots.pop_back();
        ASSERT_TRUE(h.SubmitOne(slot, step));
        h.clock.Advance(rng() % (P / 4));
        if (rng() % 7 == 0) {  // a switch between two submits, mid-batch
          h.queue->SetPolicy(policies[rng() % 6]);
          ++switches;
        }
      }
      h.clock.Advance(rng() % (P / 2));
      h.dev->Complete(rng() % 4);
      h.PollOnce();
      for (auto& [slot, t] : h.unkicked) max_pending = std::max(max_pending, h.clock.NowNs() - t);
    }
    for (int i = 0; i < 1000 && h.completions < h.requests; ++i) {
      h.clock.Advance(P);
      h.dev->Complete(8);
      h.PollOnce();
    }
    EXPECT_GT(switches, 100u);
    EXPECT_EQ(h.completions, h.requests) << "seed " << seed;
    for (auto& [slot, n] : h.completed) ASSERT_GE(n, 1u);
    EXPECT_EQ(h.queue->stats().completions, h.requests);
    EXPECT_LE(std::max(max_pending, h.max_wait), 1000000 + P) << "seed " << seed;
    EXPECT_LE(h.rec->kicks, h.requests);
    EXPECT_GT(h.queue->stats().policy_changes, 0u);
  }
}

// EVENT_IDX across the 16-bit wrap of avail/used indices with an
// asynchronous device: it polls while awake and, before sleeping, publishes
// avail_event = last_avail and re-checks (as libvhost-user does). Asleep,
// only a kick wakes it, so a request whose kick was wrongly suppressed is
// stranded for good and the drain below would not finish.
TEST(KickProperty, EventIdxAcrossIndexWrapNeverStrands) {
  BlkQueueOptions o = SmallQueue({KickMode::kEventIdx, 1, 0}, true);
  Harness h(o);
  h.rec->sleepy = true;
  h.rec->awake = false;
  for (uint32_t i = 0; i < o.slots; ++i) h.free_slots.push_back(i);
  std::mt19937_64 rng(42);
  auto device_step = [&] {
    if (!h.rec->awake) return;
    h.unkicked.clear();  // the device is looking: whatever is published is seen
    h.dev->Consume(/*defer_complete=*/true);
    h.dev->Complete(rng() % 12);
    if (rng() % 3 == 0) {
      // Going to sleep: Consume() set avail_event = last_avail; re-check once.
      if (h.dev->Consume(true) == 0) h.rec->awake = false;
    }
  };
  const uint64_t kTarget = 3 * 65536 + 1000;  // three wraps of the 16-bit index
  // Bounded: with a stranded ring the slots never come back (no hang, a failure).
  for (int guard = 0; h.requests < kTarget && guard < 2'000'000; ++guard) {
    int burst = static_cast<int>(rng() % 8);
    while (burst-- > 0 && !h.free_slots.empty()) {
      uint32_t slot = h.free_slots.back();
      h.free_slots.pop_back();
      ASSERT_TRUE(h.SubmitOne(slot, h.requests));
    }
    device_step();
    h.PollOnce();
  }
  EXPECT_GE(h.requests, kTarget) << "submitters starved: requests stranded by a suppressed kick";
  // Drain: the device keeps its habits (sleeps when idle); only kicks wake it.
  for (int i = 0; i < 100000 && h.completions < h.requests; ++i) {
    device_step();
    if (!h.rec->awake) h.dev->Complete(64);  // finish what it already took
    h.PollOnce();
  }
  EXPECT_EQ(h.completions, h.requests) << "requests stranded by a suppressed kick";
  EXPECT_EQ(h.queue->stats().completions, h.requests);
  EXPECT_LT(h.rec->kicks, h.requests / 2) << "event-idx should suppress most kicks";
  EXPECT_GT(h.rec->kicks, 100u) << "the device slept often: kicks had to wake it";
  EXPECT_EQ(h.dev->last_avail(), static_cast<uint16_t>(h.requests));
}

TEST(BlkQueue, CompletesWithDeviceStatusAndFailsAllOnReset) {
  BlkQueueOptions o;
  o.queue_size = 16;
  o.slots = 8;
  o.policy = {KickMode::kImmediate, 1, 0};
  Harness h(o);
  ASSERT_TRUE(h.SubmitOne(0, 0));
  ASSERT_TRUE(h.SubmitOne(1, 1));
  h.dev->Complete(1, kVirtioBlkSIoErr);
  int errors = 0, ok = 0;
  h.queue->Poll([&](const BlkCompletion& c) { c.status.ok() ? ++ok : ++errors; });
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(h.queue->stats().errors, 1u);
  std::vector<uint32_t> failed;
  h.queue->FailAll(absl::UnavailableError("backend gone"), [&](const BlkCompletion& c) {
    EXPECT_EQ(c.status.code(), absl::StatusCode::kUnavailable);
    failed.push_back(c.slot);
  });
  EXPECT_EQ(failed, std::vector<uint32_t>{1});
  EXPECT_FALSE(h.queue->slot_busy(1));
  EXPECT_EQ(h.queue->stats().completions, h.queue->stats().requests);
  EXPECT_EQ(h.queue->Submit(9, BlkOp::kRead, 0, 4096).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(h.SubmitOne(2, 2));
  EXPECT_EQ(h.queue->Submit(2, BlkOp::kRead, 0, 4096).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace vkick
