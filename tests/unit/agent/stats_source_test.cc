// The agent's default counter source: each tracked driver's stats block read
// from a real file in a temp dir; and the driver's bucketing (stats_block.h),
// which repeats the protocol's, checked against it on every edge.
#include "tests/unit/temp_dir.h"
#include "agent/stats_source.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "guest-policy/core/stats_block.h"
#include "protocol/messages.h"

namespace vkick::agent {
namespace {

// ---- the driver's buckets are the protocol's ------------------------------

TEST(StatsBuckets, DepthBucketAgreesWithTheProtocolOnEveryEdge) {
  for (uint32_t d = 0; d <= 4096; ++d) {
    ASSERT_EQ(StatsDepthBucket(d), proto::DepthBucket(d)) << "depth " << d;
  }
  for (int k = 0; k < 32; ++k) {
    const uint64_t p = uint64_t{1} << k;
    for (uint64_t d : {p - 1, p, p + 1}) {
      if (d > UINT32_MAX) continue;
      EXPECT_EQ(StatsDepthBucket(d), proto::DepthBucket(static_cast<uint32_t>(d))) << "depth " << d;
    }
  }
  EXPECT_EQ(StatsDepthBucket(UINT32_MAX), proto::DepthBucket(UINT32_MAX));
  // Beyond the protocol's u32: still the open last bucket, never out of range.
  EXPECT_EQ(StatsDepthBucket(uint64_t{1} << 40), kStatsDepthBuckets - 1);
  EXPECT_EQ(StatsDepthBucket(UINT64_MAX), kStatsDepthBuckets - 1);
}

TEST(StatsBuckets, LatencyBucketAgreesWithTheProtocolAroundEveryPowerOfTwoMicroseconds) {
  for (uint64_t ns = 0; ns <= 70'000; ++ns) {
    ASSERT_EQ(StatsLatencyBucket(ns), proto::LatencyBucket(ns)) << ns << " ns";
  }
  for (int k = 0; k < 54; ++k) {
    const uint64_t us = uint64_t{1} << k;
    for (uint64_t ns : {us * 1000 - 1, us * 1000, us * 1000 + 1, us * 1000 + 999, (us - 1) * 1000 + 999}) {
      EXPECT_EQ(StatsLatencyBucket(ns), proto::LatencyBucket(ns)) << ns << " ns";
    }
  }
  for (uint64_t ns : {UINT64_MAX, UINT64_MAX - 1, uint64_t{1} << 63}) {
    EXPECT_EQ(StatsLatencyBucket(ns), proto::LatencyBucket(ns)) << ns << " ns";
    EXPECT_EQ(StatsLatencyBucket(ns), kStatsLatencyBuckets - 1);
  }
  std::mt19937_64 rng(9);
  for (int i = 0; i < 100'000; ++i) {
    const uint64_t ns = rng() >> (rng() % 64);
    ASSERT_EQ(StatsLatencyBucket(ns), proto::LatencyBucket(ns)) << ns << " ns";
  }
}

TEST(StatsBuckets, LayoutMatchesTheProtocol) {
  EXPECT_EQ(kStatsDepthBuckets, proto::kDepthBuckets);
  EXPECT_EQ(kStatsLatencyBuckets, proto::kLatencyBuckets);
  EXPECT_EQ(kStatsWhySlots, kWhySlots);
}

// ---- StatsSource -------------------------------------------------------------

struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-stats-source-test") {}
};

void WriteBlock(const std::string& path, const StatsBlock& b) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  ASSERT_NE(f, nullptr) << tmp;
  ASSERT_EQ(std::fwrite(&b, sizeof(b), 1, f), 1u);
  std::fclose(f);
  ASSERT_EQ(std::rename(tmp.c_str(), path.c_str()), 0);
}

constexpr int32_t kPid = 4242;

// A block with one busy queue: 100 requests at depth 8..15, 95 completed.
std::unique_ptr<StatsBlock> BusyBlock(uint16_t queues = 1, uint64_t writer = kPid) {
  auto b = std::make_unique<StatsBlock>();
  InitStatsBlock(b.get(), queues, writer);
  StatsQueue& q = b->queues[0];
  q.requests = 100;
  q.completions = 95;
  q.kicks = 12;
  q.asks = 40;
  q.suppressed = 30;
  q.depth_sum = 1000;
  q.latency_sum_ns = 95 * 50'000;
  q.kicks_by_why[2] = 8;  // batch full
  q.kicks_by_why[3] = 4;  // timer
  q.depth_hist[0] = 10;
  q.depth_hist[3] = 90;
  q.latency_hist[6] = 95;
  return b;
}

TEST(StatsSource, TrackWithoutAStatsBlockIsAFailedPrecondition) {
  StatsSource s;
  const absl::Status st = s.Track({kPid, "/usr/bin/vkick-blk", ""});
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 0u) << "not tracked, so never read";
}

TEST(StatsSource, ReadsTheTotalsOfATrackedDriver) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats-4242";
  WriteBlock(path, *BusyBlock());
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->queues.size(), 1u);
  ASSERT_EQ(snap->queues.count({kPid, 0}), 1u);
  const QueueTotals& t = snap->queues.at({kPid, 0});
  EXPECT_EQ(t.requests, 100u);
  EXPECT_EQ(t.completions, 95u);
  EXPECT_EQ(t.kicks, 12u);
  EXPECT_EQ(t.asks, 40u);
  EXPECT_EQ(t.suppressed, 30u);
  EXPECT_EQ(t.depth_sum, 1000u);
  EXPECT_EQ(t.latency_sum_ns, 95u * 50'000u);
  EXPECT_EQ(t.kicks_by_why[2], 8u);
  EXPECT_EQ(t.kicks_by_why[kWhyTimer], 4u);
  EXPECT_EQ(t.depth_hist[0], 10u);
  EXPECT_EQ(t.depth_hist[3], 90u);
  EXPECT_EQ(t.latency_hist[6], 95u);
  EXPECT_EQ(t.interval_max_depth, 15u) << "top edge of bucket 3 (8..15)";
  EXPECT_EQ(snap->unreadable, 0u);
  EXPECT_EQ(snap->map_full, 0u);
  EXPECT_EQ(snap->bad_queue, 0u);
}

TEST(StatsSource, EveryQueueOfTheBlockIsReported) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  auto b = BusyBlock(3);
  b->queues[2].requests = 1;
  b->queues[2].depth_hist[0] = 1;
  WriteBlock(path, *b);
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->queues.size(), 3u);
  EXPECT_EQ(snap->queues.at({kPid, 1}).requests, 0u);
  EXPECT_EQ(snap->queues.at({kPid, 1}).interval_max_depth, 0u) << "no requests: no depth";
  EXPECT_EQ(snap->queues.at({kPid, 2}).interval_max_depth, 1u) << "bucket 0 is depth 1";
}

TEST(StatsSource, MaxDepthIsTheTopEdgeOfTheHighestNonEmptyBucket) {
  for (size_t top = 0; top < kStatsDepthBuckets; ++top) {
    auto b = BusyBlock();
    StatsQueue& q = b->queues[0];
    for (auto& c : q.depth_hist) c = 0;
    q.depth_hist[0] = 1;
    q.depth_hist[top] += 2;
    q.requests = 3;
    StatsView v{1, kPid, b->queues};
    CounterSnapshot snap;
    AddStatsQueues(kPid, v, &snap);
    const uint32_t want = top == 0 ? 1 : (2u << top) - 1;
    EXPECT_EQ(snap.queues.at({kPid, 0}).interval_max_depth, want) << "bucket " << top;
    if (top > 0 && top < kStatsDepthBuckets - 1) {
      EXPECT_EQ(proto::DepthBucket(want), top);
      EXPECT_EQ(proto::DepthBucket(want + 1), top + 1) << "the edge, not beyond it";
    }
  }
}

// Rewrites the block in place (same inode), as the driver's shared mapping
// does; a reader's kept fd sees it.
void UpdateInPlace(const std::string& path, const StatsBlock& b) {
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(pwrite(fd, &b, sizeof(b), 0), static_cast<ssize_t>(sizeof(b)));
  close(fd);
}

TEST(StatsSource, AnotherWritersBlockIsSkippedAndCounted) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  WriteBlock(path, *BusyBlock(1, kPid + 1));  // a block of another process
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 1u);
  snap = s.Read();
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 2u) << "cumulative, once per read";
}

TEST(StatsSource, AnInvalidBlockFixedInPlaceIsReadAtTheNextInterval) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  auto bad = BusyBlock();
  bad->magic = 0;  // header not written yet
  WriteBlock(path, *bad);
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 1u);
  UpdateInPlace(path, *BusyBlock());
  snap = s.Read();
  EXPECT_EQ(snap->queues.size(), 1u);
  EXPECT_EQ(snap->unreadable, 1u);
}

// "skipped for that interval" (stats_source.h): a path whose first block was
// not the driver's (another writer's, or invalid) is read again later, so
// the driver's own block, once at the path, is observed.
TEST(StatsSource, ABlockSkippedOnceIsReadOnceTheDriversOwnIsAtThePath) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  WriteBlock(path, *BusyBlock(1, kPid + 1));
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->unreadable, 1u);
  WriteBlock(path, *BusyBlock());  // the driver's own block replaces it
  snap = s.Read();
  EXPECT_EQ(snap->queues.size(), 1u) << "still reading the first file's inode through a kept fd";
  EXPECT_EQ(snap->unreadable, 1u);
}

TEST(StatsSource, ABlockRemovedAfterTheFirstReadStillGivesTheFinalCounters) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  WriteBlock(path, *BusyBlock());
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());
  ASSERT_EQ(s.Read()->queues.at({kPid, 0}).requests, 100u);
  auto last = BusyBlock();
  last->queues[0].requests = 150;
  last->queues[0].depth_hist[3] += 50;
  UpdateInPlace(path, *last);  // the driver's last interval
  ASSERT_EQ(unlink(path.c_str()), 0);  // and its exit
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->queues.size(), 1u);
  EXPECT_EQ(snap->queues.at({kPid, 0}).requests, 150u);
  EXPECT_EQ(snap->unreadable, 0u);
}

TEST(StatsSource, ABlockMissingAtTheFirstReadIsCountedNotFatal) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", path}).ok());  // not there yet: accepted
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 1u);
  EXPECT_EQ(s.Read()->unreadable, 2u);
  WriteBlock(path, *BusyBlock());
  snap = s.Read();
  EXPECT_EQ(snap->queues.size(), 1u);
  EXPECT_EQ(snap->unreadable, 2u);
}

TEST(StatsSource, ASymlinkOrFifoAtThePathIsNeverRead) {
  TempDir tmp;
  const std::string real = tmp.path() + "/real", link = tmp.path() + "/link", fifo = tmp.path() + "/fifo";
  WriteBlock(real, *BusyBlock());
  ASSERT_EQ(symlink(real.c_str(), link.c_str()), 0);
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", link}).ok());
  ASSERT_TRUE(s.Track({kPid + 1, "", fifo}).ok());
  auto snap = s.Read();  // must not block on the FIFO
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->queues.empty());
  EXPECT_EQ(snap->unreadable, 2u);
}

TEST(StatsSource, MaxDepthIsCappedByTheQueuesDepthLimit) {
  auto b = BusyBlock();
  StatsQueue& q = b->queues[0];
  q.depth_hist[5] = 1;  // 32..63
  q.depth_limit = 32;   // the driver's slots
  StatsView v{1, kPid, b->queues};
  CounterSnapshot snap;
  AddStatsQueues(kPid, v, &snap);
  EXPECT_EQ(snap.queues.at({kPid, 0}).interval_max_depth, 32u);
  q.depth_limit = 1000;  // above the edge: the edge
  snap = {};
  AddStatsQueues(kPid, v, &snap);
  EXPECT_EQ(snap.queues.at({kPid, 0}).interval_max_depth, 63u);
}

TEST(StatsSource, UntrackStopsReading) {
  TempDir tmp;
  const std::string a = tmp.path() + "/a", b = tmp.path() + "/b";
  WriteBlock(a, *BusyBlock());
  WriteBlock(b, *BusyBlock(2, kPid + 1));
  StatsSource s;
  ASSERT_TRUE(s.Track({kPid, "", a}).ok());
  ASSERT_TRUE(s.Track({kPid + 1, "", b}).ok());
  auto snap = s.Read();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->queues.size(), 3u);
  s.Untrack(kPid);
  snap = s.Read();
  EXPECT_EQ(snap->queues.size(), 2u);
  EXPECT_EQ(snap->queues.count({kPid, 0}), 0u);
  EXPECT_EQ(snap->queues.count({kPid + 1, 1}), 1u);
  s.Untrack(kPid + 1);
  s.Untrack(999);  // never tracked: no effect
  EXPECT_TRUE(s.Read()->queues.empty());
  EXPECT_EQ(s.Read()->unreadable, 0u);
}

size_t OpenFds() {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)e;
    ++n;
  }
  return n;
}

TEST(StatsSource, KeptFdsAreClosedByUntrackAndTheDestructor) {
  TempDir tmp;
  const std::string a = tmp.path() + "/a", b = tmp.path() + "/b";
  WriteBlock(a, *BusyBlock());
  WriteBlock(b, *BusyBlock(1, kPid + 1));
  const size_t before = OpenFds();
  {
    StatsSource s;
    ASSERT_TRUE(s.Track({kPid, "", a}).ok());
    ASSERT_TRUE(s.Track({kPid + 1, "", b}).ok());
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(s.Read().ok());
    EXPECT_EQ(OpenFds(), before + 2) << "one fd per tracked block, kept across reads";
    s.Untrack(kPid);
    EXPECT_EQ(OpenFds(), before + 1);
    ASSERT_TRUE(s.Track({kPid + 1, "", b}).ok());  // tracked already: nothing opened twice
    ASSERT_TRUE(s.Read().ok());
    EXPECT_EQ(OpenFds(), before + 1);
  }
  EXPECT_EQ(OpenFds(), before);
}

}  // namespace
}  // namespace vkick::agent
