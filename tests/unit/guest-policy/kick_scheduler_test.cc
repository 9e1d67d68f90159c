// The kick path: pure scheduler tests, then property tests that run the real
// BlkQueue (virtqueue + scheduler) against a fake device that only looks at
// the ring when kicked (the worst case: a lost kick strands a request forever)
// under a fake clock and random submit/poll schedules.
#include "guest-policy/core/kick_scheduler.h"

#include <map>
#include <random>
#include <set>

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

// ---- property tests over the real BlkQueue -------------------------------

class KickRecorder final : public Notifier {
 public:
  explicit KickRecorder(testing::FakeDevice* dev) : dev_(dev) {}
  bool Notify(uint16_t) override {
    ++kicks;
    if (on_kick) on_kick();
    dev_->Consume(/*defer_complete=*/true);
    return true;
  }
  uint64_t kicks = 0;
  std::function<void()> on_kick;

 private:
  testing::FakeDevice* dev_;
};

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
    return true;
  }
  void PollOnce() {
    queue->Poll([&](const BlkCompletion& c) {
      EXPECT_TRUE(c.status.ok()) << c.status;
      ++completed[c.slot];
      ++completions;
      free_slots.push_back(c.slot);
    });
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
  uint64_t requests = 0, completions = 0;
  std::map<uint32_t, uint64_t> completed;
  std::vector<uint32_t> free_slots;
};

struct Schedule {
  uint64_t seed;
  uint64_t poll_period_ns;
};

// Random submits between polls that are at most P apart; the device completes
// a random share of what it has seen. Checks the invariants, then drains.
void RunProperty(KickPolicy policy, bool event_idx, const Schedule& s, uint64_t* kicks_out,
                 uint64_t* requests_out) {
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 32;
  o.event_idx = event_idx;
  o.policy = policy;
  Harness h(o);
  for (uint32_t i = 0; i < o.slots; ++i) h.free_slots.push_back(i);
  std::mt19937_64 rng(s.seed);
  uint64_t next_id = 0;
  for (int step = 0; step < 4000; ++step) {
    int burst = static_cast<int>(rng() % 6);
    while (burst-- > 0 && !h.free_slots.empty()) {
      uint32_t slot = h.free_slots.back();
      h.free_slots.pop_back();
      ASSERT_TRUE(h.SubmitOne(slot, next_id++));
      h.clock.Advance(rng() % (s.poll_period_ns / 4 + 1));
    }
    h.clock.Advance(rng() % (s.poll_period_ns / 2 + 1));
    h.dev->Complete(rng() % 4);
    h.PollOnce();
    // Every pending request is younger than T + P at every poll.
    for (auto& [slot, t] : h.unkicked) {
      ASSERT_LE(h.clock.NowNs() - t, policy.defer_ns + s.poll_period_ns)
          << "request in slot " << slot << " stranded by " << FormatKickPolicy(policy);
    }
  }
  // Drain: no more submits; polls keep coming; everything must complete.
  for (int i = 0; i < 10000 && h.completions < h.requests; ++i) {
    h.clock.Advance(s.poll_period_ns);
    h.dev->Complete(8);
    h.PollOnce();
  }
  EXPECT_EQ(h.completions, h.requests) << FormatKickPolicy(policy) << ": requests lost";
  uint64_t total = 0;
  for (auto& [slot, n] : h.completed) total += n;
  EXPECT_EQ(total, h.requests);
  EXPECT_EQ(h.queue->stats().completions, h.requests);
  EXPECT_EQ(h.queue->in_flight(), 0u);
  EXPECT_LE(h.max_wait, policy.defer_ns + s.poll_period_ns);
  EXPECT_LE(h.rec->kicks, h.requests);
  EXPECT_EQ(h.rec->kicks, h.queue->stats().kicks);
  *kicks_out = h.rec->kicks;
  *requests_out = h.requests;
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
  BlkQueueOptions o;
  o.queue_size = 64;
  o.slots = 32;
  o.event_idx = true;
  o.policy = {KickMode::kStatic, 32, 1000000};
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
