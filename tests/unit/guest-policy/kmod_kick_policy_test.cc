// The kernel driver's kick logic (guest-policy/kernel/kick_policy.h), the
// same header the module compiles, exercised in user space: every decision
// of the deferred kick, the lease, the sysfs syntax and the buckets.
#include <cstring>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "protocol/messages.h"

extern "C" {
#include "kick_policy.h"
}

namespace {

vk_policy Policy(const char* text) {
  vk_policy p{};
  EXPECT_EQ(vk_parse_policy(text, std::strlen(text), &p), 0) << text;
  return p;
}

int Parse(const std::string& text, vk_policy* p) { return vk_parse_policy(text.data(), text.size(), p); }

TEST(KmodKickPolicy, ImmediateKicksAtTheEndOfEveryBlkMqBatchWithoutAsking) {
  vk_policy p = Policy("immediate");
  EXPECT_EQ(vk_on_submit(&p, 1, false, false, false).action, VK_NONE);
  vk_decision d = vk_on_submit(&p, 2, true, false, false);
  EXPECT_EQ(d.action, VK_KICK);
  EXPECT_EQ(d.why, VK_WHY_IMMEDIATE);
}

TEST(KmodKickPolicy, EventIdxAsksTheDeviceAtTheEndOfEveryBatch) {
  vk_policy p = Policy("event-idx");
  EXPECT_EQ(vk_on_submit(&p, 1, false, false, false).action, VK_NONE);
  vk_decision d = vk_on_submit(&p, 1, true, false, false);
  EXPECT_EQ(d.action, VK_ASK);
  EXPECT_EQ(d.why, VK_WHY_EVENT_IDX);
}

TEST(KmodKickPolicy, StaticArmsTheTimerOnceThenKicksAtB) {
  vk_policy p = Policy("static:4,50");
  EXPECT_EQ(p.batch, 4);
  EXPECT_EQ(p.defer_ns, 50'000u);
  EXPECT_EQ(vk_on_submit(&p, 1, true, false, false).action, VK_ARM);  // bd->last does not close a batch
  EXPECT_EQ(vk_on_submit(&p, 2, true, false, true).action, VK_NONE);
  EXPECT_EQ(vk_on_submit(&p, 3, false, false, true).action, VK_NONE);
  vk_decision d = vk_on_submit(&p, 4, false, false, true);
  EXPECT_EQ(d.action, VK_KICK);
  EXPECT_EQ(d.why, VK_WHY_BATCH_FULL);
}

TEST(KmodKickPolicy, EventIdxBatchAsksWhenTheBatchCloses) {
  vk_policy p = Policy("event-idx:8,100us");
  EXPECT_EQ(vk_on_submit(&p, 7, true, false, true).action, VK_NONE);
  vk_decision d = vk_on_submit(&p, 8, false, false, true);
  EXPECT_EQ(d.action, VK_ASK);
  EXPECT_EQ(d.why, VK_WHY_BATCH_FULL);
  EXPECT_EQ(vk_on_flush(&p, 3, VK_WHY_TIMER).action, VK_ASK);
}

TEST(KmodKickPolicy, AFullRingOrTagSetClosesTheBatchAtOnce) {
  for (const char* text : {"immediate", "static:64,1000", "event-idx:64,1000"}) {
    vk_policy p = Policy(text);
    vk_decision d = vk_on_submit(&p, 3, false, true, true);
    EXPECT_NE(d.action, VK_NONE) << text;
    EXPECT_NE(d.action, VK_ARM) << text;
    EXPECT_EQ(d.why, VK_WHY_RING_FULL) << text;
  }
}

TEST(KmodKickPolicy, FlushPointsNotifyOnlyWhatIsPending) {
  vk_policy p = Policy("static:16,50");
  EXPECT_EQ(vk_on_flush(&p, 0, VK_WHY_TIMER).action, VK_NONE);
  vk_decision d = vk_on_flush(&p, 5, VK_WHY_FLUSH);
  EXPECT_EQ(d.action, VK_KICK);
  EXPECT_EQ(d.why, VK_WHY_FLUSH);
}

TEST(KmodKickPolicy, AdaptiveFollowsTheLeaseThenFallsBackToImmediate) {
  vk_policy op = Policy("adaptive");
  vk_steer st{};
  // Never steered: immediate.
  EXPECT_EQ(vk_effective(&op, &st, 100, false).mode, VK_IMMEDIATE);
  st.policy = Policy("event-idx:16,50");
  st.expiry_ns = 1000;
  st.state = VK_LEASE_ACTIVE;
  vk_policy e = vk_effective(&op, &st, 999, false);
  EXPECT_EQ(e.mode, VK_EVENT_IDX);
  EXPECT_EQ(e.batch, 16);
  EXPECT_EQ(vk_effective(&op, &st, 999, true).mode, VK_IMMEDIATE);  // draining wins
  EXPECT_EQ(vk_effective(&op, &st, 1000, false).mode, VK_IMMEDIATE);
  EXPECT_EQ(st.state, VK_LEASE_EXPIRED);
}

TEST(KmodKickPolicy, AStaticQueueIgnoresTheSteer) {
  vk_policy op = Policy("static:8,20");
  vk_steer st{};
  st.policy = Policy("immediate");
  st.expiry_ns = ~0ull;
  st.state = VK_LEASE_ACTIVE;
  EXPECT_EQ(vk_effective(&op, &st, 1, false).mode, VK_STATIC);
}

// Model of one queue under random traffic: requests added, blk-mq batch
// ends, completions making room, the timer firing T after it was armed.
// Whatever the policy, no request stays unnotified longer than T after it
// was added (the "nothing strands" property), and a batch never exceeds B.
TEST(KmodKickPolicy, NoRequestWaitsLongerThanTUnderRandomTraffic) {
  std::mt19937_64 rng(7);
  for (const char* text : {"immediate", "event-idx", "static:8,50", "event-idx:32,20", "static:256,1000"}) {
    vk_policy p = Policy(text);
    const uint64_t t_ns = p.defer_ns;
    uint32_t pending = 0, inflight = 0;
    const uint32_t depth = 64;
    bool armed = false;
    uint64_t armed_at = 0, oldest = 0, now = 0;
    for (int step = 0; step < 200'000; ++step) {
      now += rng() % 20'000;  // up to 20 us between events
      if (armed && now >= armed_at + t_ns) {  // the timer fires first
        armed = false;
        if (vk_on_flush(&p, pending, VK_WHY_TIMER).action != VK_NONE) pending = 0;
      }
      if (pending && vk_batches(&p)) {  // bounded by T (+ the spacing of events)
        ASSERT_LE(now - oldest, t_ns + 20'000) << text;
      }
      if (inflight > 0 && rng() % 3 == 0) --inflight;
      if (inflight >= depth) continue;
      ++inflight;
      if (pending++ == 0) oldest = now;
      const bool last = rng() % 4 == 0;
      vk_decision d = vk_on_submit(&p, pending, last, inflight >= depth, armed);
      ASSERT_LE(pending, p.batch > 1 ? p.batch : depth) << text;
      if (d.action == VK_ARM) {
        armed = true;
        armed_at = now;
      } else if (d.action == VK_KICK || d.action == VK_ASK) {
        pending = 0;
      } else if (!vk_batches(&p) && last) {
        FAIL() << text << ": a batch end without a notification";
      }
      // A non-batching policy leaves pending only until its blk-mq batch ends.
      if (!vk_batches(&p) && pending) {
        ASSERT_FALSE(last) << text;
      }
    }
  }
}

TEST(KmodKickPolicy, PolicySyntaxAcceptsWhatTheDocsSay) {
  vk_policy p{};
  EXPECT_EQ(Parse("immediate\n", &p), 0);
  EXPECT_EQ(p.mode, VK_IMMEDIATE);
  EXPECT_EQ(Parse("  adaptive ", &p), 0);
  EXPECT_EQ(p.mode, VK_ADAPTIVE);
  EXPECT_EQ(Parse("event-idx", &p), 0);
  EXPECT_EQ(p.batch, 1);
  EXPECT_EQ(Parse("static:1,0", &p), 0);
  EXPECT_EQ(Parse("static:256,1000us\n", &p), 0);
  EXPECT_EQ(p.batch, 256);
  EXPECT_EQ(p.defer_ns, 1'000'000u);
}

TEST(KmodKickPolicy, BadPoliciesAreRejectedAndChangeNothing) {
  for (const char* bad : {"", "\n", "fast", "static", "static:", "static:4", "static:4,", "static:0,10",
                          "static:257,10", "static:4,0", "static:4,1001", "static:4,10ms", "event-idx:",
                          "event-idx:2", "immediate now", "adaptive2", "static:-1,5", "static:4,50 x",
                          "static:99999999999999999999,5", "event-idx:8,0"}) {
    vk_policy p = Policy("static:3,7");
    EXPECT_EQ(Parse(bad, &p), -EINVAL) << "'" << bad << "'";
    EXPECT_EQ(p.batch, 3) << bad;
    EXPECT_EQ(p.defer_ns, 7000u) << bad;
  }
}

TEST(KmodKickPolicy, SteerSyntax) {
  vk_steer_write w{};
  const std::string ok = "42 event-idx 16 50000 2000\n";
  ASSERT_EQ(vk_parse_steer(ok.data(), ok.size(), &w), 0);
  EXPECT_EQ(w.generation, 42u);
  EXPECT_EQ(w.policy.mode, VK_EVENT_IDX);
  EXPECT_EQ(w.policy.batch, 16);
  EXPECT_EQ(w.policy.defer_ns, 50'000u);
  EXPECT_EQ(w.lease_ms, 2000u);
  for (const char* bad : {"0 immediate 1 0 1000", "1 adaptive 1 0 1000", "1 static 2 0 1000",
                          "1 static 2 500 1000", "1 static 1 500 1000", "1 static 257 5000 1000", "1 static 2 2000000 1000",
                          "1 immediate 1 0 9", "1 immediate 1 0 60001", "1 immediate 1 0", "1 immediate 1 0 100 7",
                          "x immediate 1 0 100", ""}) {
    vk_steer_write before = w;
    const std::string s = bad;
    EXPECT_EQ(vk_parse_steer(s.data(), s.size(), &w), -EINVAL) << "'" << bad << "'";
    EXPECT_EQ(w.generation, before.generation) << bad;
  }
}

// Random bytes never crash a parser, and whatever is accepted is valid.
TEST(KmodKickPolicy, RandomWritesAreEitherValidOrRejected) {
  std::mt19937_64 rng(11);
  const std::string alphabet = "0123456789 ,:usimedatvcx-\n";
  for (int i = 0; i < 200'000; ++i) {
    std::string s(rng() % 24, ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    vk_policy p{};
    if (Parse(s, &p) == 0) {
      EXPECT_TRUE(vk_policy_valid(&p)) << s;
    }
    vk_steer_write w{};
    if (vk_parse_steer(s.data(), s.size(), &w) == 0) {
      EXPECT_TRUE(vk_policy_valid(&w.policy)) << s;
      EXPECT_NE(w.policy.mode, VK_ADAPTIVE) << s;
    }
  }
}

TEST(KmodKickPolicy, BucketsAreTheProtocols) {
  for (uint32_t d = 1; d < 5000; ++d) EXPECT_EQ(vk_depth_bucket(d), vkick::proto::DepthBucket(d)) << d;
  for (uint64_t ns : {0ull, 999ull, 1000ull, 1999ull, 2000ull, 3999ull, 4000ull, 1'000'000ull, 16'383'999ull,
                      16'384'000ull, 10'000'000'000ull}) {
    EXPECT_EQ(vk_latency_bucket(ns), vkick::proto::LatencyBucket(ns)) << ns;
  }
  for (uint64_t ns = 0; ns < 40'000'000; ns += 997) EXPECT_EQ(vk_latency_bucket(ns), vkick::proto::LatencyBucket(ns));
}

}  // namespace
