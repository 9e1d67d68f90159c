// The agent's BPF object in the kernel (label bpf: root). The SEC("syscall")
// program runs the USDT handlers' counting code through BPF_PROG_TEST_RUN
// with fake tgids (above PID_MAX_LIMIT, so no real process collides):
// bucket bounds equal protocol/messages.h, counters and max depth per
// interval, bad queues and a full map counted.
#include <unistd.h>

#include <memory>
#include <vector>

#include "agent/usdt_probes.h"
#include "gtest/gtest.h"
#include "tests/agent/bucket_edges.h"
#include "protocol/messages.h"

namespace vkick::agent {
namespace {

constexpr uint32_t kFakeTgid = 0x7f000001;

class UsdtProbesBpfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: loading BPF needs CAP_BPF + CAP_PERFMON";
    auto p = UsdtProbes::Create();
    if (!p.ok() && absl::IsPermissionDenied(p.status())) GTEST_SKIP() << p.status();
    ASSERT_TRUE(p.ok()) << p.status();
    probes_ = *std::move(p);
  }
  int Run(uint32_t op, uint32_t tgid, int64_t queue, int64_t a, int64_t b) {
    vkick_agent_test_ctx c{};
    c.op = op;
    c.tgid = tgid;
    c.queue = queue;
    c.a = a;
    c.b = b;
    auto r = probes_->TestRun(c);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : -1;
  }
  std::unique_ptr<UsdtProbes> probes_;
};

TEST_F(UsdtProbesBpfTest, BucketBoundsAreTheProtocols) {
  const std::vector<uint64_t> depths = testing::DepthEdges(), lats = testing::LatencyEdgesNs();
  for (uint64_t d : depths) {
    const int r = Run(VKICK_AGENT_TEST_BUCKETS, 0, 0, static_cast<int64_t>(d), 0);
    ASSERT_EQ(static_cast<size_t>(r & 0xff), proto::DepthBucket(static_cast<uint32_t>(std::min<uint64_t>(d, UINT32_MAX))))
        << "depth " << d;
  }
  for (uint64_t l : lats) {
    const int r = Run(VKICK_AGENT_TEST_BUCKETS, 0, 0, 1, static_cast<int64_t>(l));
    ASSERT_EQ(static_cast<size_t>(r >> 8), proto::LatencyBucket(l)) << "latency " << l;
  }
}

TEST_F(UsdtProbesBpfTest, CountsAndIntervalMaxDepth) {
  for (int64_t d : {1, 2, 3, 16}) Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid, 1, d, 0);
  Run(VKICK_AGENT_TEST_KICK, kFakeTgid, 1, 4, 3);   // timer
  Run(VKICK_AGENT_TEST_KICK, kFakeTgid, 1, 1, 0);   // immediate
  Run(VKICK_AGENT_TEST_KICK, kFakeTgid, 1, 1, 99);  // unknown why -> "other"
  for (int64_t lat : {500, 1500, 20'000'000}) Run(VKICK_AGENT_TEST_COMPLETE, kFakeTgid, 1, 0, lat);

  auto s = probes_->Read();
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->queues.count({static_cast<int32_t>(kFakeTgid), 1}), 1u);
  QueueTotals t = s->queues[{static_cast<int32_t>(kFakeTgid), 1}];
  EXPECT_EQ(t.requests, 4u);
  EXPECT_EQ(t.depth_sum, 22u);
  EXPECT_EQ(t.depth_hist[0], 1u);
  EXPECT_EQ(t.depth_hist[1], 2u);
  EXPECT_EQ(t.depth_hist[4], 1u);
  EXPECT_EQ(t.interval_max_depth, 16u);
  EXPECT_EQ(t.kicks, 3u);
  EXPECT_EQ(t.kicks_by_why[kWhyTimer], 1u);
  EXPECT_EQ(t.kicks_by_why[0], 1u);
  EXPECT_EQ(t.kicks_by_why[kWhySlots - 1], 1u);
  EXPECT_EQ(t.completions, 3u);
  EXPECT_EQ(t.latency_hist[0], 1u);
  EXPECT_EQ(t.latency_hist[1], 1u);
  EXPECT_EQ(t.latency_hist[15], 1u);

  // Next interval: cumulative counters stay, the maximum restarts.
  Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid, 1, 5, 0);
  s = probes_->Read();
  ASSERT_TRUE(s.ok());
  t = s->queues[{static_cast<int32_t>(kFakeTgid), 1}];
  EXPECT_EQ(t.requests, 5u);
  EXPECT_EQ(t.interval_max_depth, 5u);
  s = probes_->Read();  // an interval without submits
  EXPECT_EQ((s->queues[{static_cast<int32_t>(kFakeTgid), 1}].interval_max_depth), 0u);

  probes_->Untrack(static_cast<int32_t>(kFakeTgid));
  s = probes_->Read();
  EXPECT_EQ(s->queues.count({static_cast<int32_t>(kFakeTgid), 1}), 0u);
}

TEST_F(UsdtProbesBpfTest, BadQueueAndFullMapAreCounted) {
  Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid, VKICK_AGENT_MAX_QUEUE, 1, 0);
  Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid, -1, 1, 0);
  auto s = probes_->Read();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->bad_queue, 2u);
  EXPECT_TRUE(s->queues.empty());

  // Fill the map: VKICK_AGENT_MAX_KEYS distinct (tgid, queue) keys.
  for (uint32_t i = 0; i < VKICK_AGENT_MAX_KEYS; ++i)
    Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid + i / VKICK_AGENT_MAX_QUEUE, i % VKICK_AGENT_MAX_QUEUE, 1, 0);
  s = probes_->Read();
  EXPECT_EQ(s->queues.size(), static_cast<size_t>(VKICK_AGENT_MAX_KEYS));
  EXPECT_EQ(s->map_full, 0u);
  Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid + 1000, 0, 1, 0);  // one key too many
  Run(VKICK_AGENT_TEST_KICK, kFakeTgid + 1000, 0, 1, 0);
  s = probes_->Read();
  EXPECT_EQ(s->map_full, 2u);
  // Existing keys still count.
  Run(VKICK_AGENT_TEST_SUBMIT, kFakeTgid, 0, 1, 0);
  s = probes_->Read();
  EXPECT_EQ((s->queues[{static_cast<int32_t>(kFakeTgid), 0}].requests), 2u);
}

}  // namespace
}  // namespace vkick::agent
