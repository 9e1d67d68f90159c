// The block observer's BPF object in the kernel (label bpf: root).
//
// BlockObserverBpfTest: the SEC("syscall") program runs the tp_btf
// handlers' counting code through BPF_PROG_TEST_RUN with fake dev_t values
// (major 4095: no real disk here), fake struct request ids and explicit
// timestamps: bucket bounds equal protocol/messages.h, exact depth/latency
// histograms of issue/complete sequences, in-flight never negative, missing
// starts, re-issues, stale starts and a full start map counted, the
// per-interval max depth, Unwatch/Watch, and the sweep expiring starts whose
// completion never came (with an injected clock) giving in-flight back.
//
// BlockObserverTracepointTest: the real block_rq_issue/complete raw
// tracepoints on a loop device over a file in /tmp (created and detached by
// the test): O_DIRECT requests at depth 1, and 4 concurrent readers counted
// exactly.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "agent/block_observer.h"
#include "gtest/gtest.h"
#include "tests/agent/bucket_edges.h"
#include "protocol/messages.h"

namespace vkick::agent {
namespace {

constexpr uint32_t kDevA = KernelDev(4095, 1);
constexpr uint32_t kDevB = KernelDev(4095, 2);

class BlockObserverBpfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: loading BPF needs CAP_BPF + CAP_PERFMON";
    BlockObserver::Options o;
    o.attach = false;            // the counting code only, no tracepoint traffic
    o.clock = [this] { return now_; };  // the fixtures' time for Read's sweep
    auto p = BlockObserver::Create(o);
    if (!p.ok() && absl::IsPermissionDenied(p.status())) GTEST_SKIP() << p.status();
    ASSERT_TRUE(p.ok()) << p.status();
    obs_ = *std::move(p);
  }
  int Run(uint32_t op, uint32_t dev, uint64_t rq, uint64_t now_ns, int64_t a = 0, int64_t b = 0,
          uint64_t sector = 0, uint64_t alloc_ns = 0) {
    vkick_blockobs_test_ctx c{};
    c.op = op;
    c.dev = dev;
    c.rq = rq;
    c.sector = sector;
    c.alloc_ns = alloc_ns;
    c.now_ns = now_ns;
    c.a = a;
    c.b = b;
    auto r = obs_->TestRun(c);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : -1000;
  }
  // A request on struct request `rq` whose identity (sector, allocation
  // time) is derived from rq: issuing the same rq again is a requeue.
  int Issue(uint32_t dev, uint64_t rq, uint64_t t) { return IssueAs(dev, rq, rq * 8, rq + 1, t); }
  // A request on `rq` with an explicit identity: another identity while rq
  // is in flight = a later request reusing the struct (stale start).
  int IssueAs(uint32_t dev, uint64_t rq, uint64_t sector, uint64_t alloc_ns, uint64_t t) {
    return Run(VKICK_BLOCKOBS_TEST_ISSUE, dev, rq, t, 0, 0, sector, alloc_ns);
  }
  int Complete(uint32_t dev, uint64_t rq, uint64_t t) { return Run(VKICK_BLOCKOBS_TEST_COMPLETE, dev, rq, t); }
  int Inflight(uint32_t dev) { return Run(VKICK_BLOCKOBS_TEST_INFLIGHT, dev, 0, 0); }
  DiskSnapshot Read() {
    auto s = obs_->Read();
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : DiskSnapshot{};
  }
  uint64_t Errors(const DiskSnapshot& s) {
    return s.missing_start + s.map_full + s.underflow + s.bad_slot + s.reissue + s.stale_start + s.expired_start;
  }
  std::unique_ptr<BlockObserver> obs_;
  uint64_t now_ = 0;  // Read()'s sweep clock: 0 expires nothing
};

constexpr uint64_t kSec = 1'000'000'000;

TEST_F(BlockObserverBpfTest, BucketBoundsAreTheProtocols) {
  const std::vector<uint64_t> depths = testing::DepthEdges(), lats = testing::LatencyEdgesNs();
  for (uint64_t d : depths) {
    const int r = Run(VKICK_BLOCKOBS_TEST_BUCKETS, 0, 0, 0, static_cast<int64_t>(d), 0);
    ASSERT_EQ(static_cast<size_t>(r & 0xff),
              proto::DepthBucket(static_cast<uint32_t>(std::min<uint64_t>(d, UINT32_MAX))))
        << "depth " << d;
  }
  for (uint64_t l : lats) {
    const int r = Run(VKICK_BLOCKOBS_TEST_BUCKETS, 0, 0, 0, 1, static_cast<int64_t>(l));
    ASSERT_EQ(static_cast<size_t>(r >> 8), proto::LatencyBucket(l)) << "latency " << l;
  }
}

TEST_F(BlockObserverBpfTest, IssueCompleteSequenceGivesExactHistograms) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  // Three requests in flight (depths 1, 2, 3), completed out of order.
  EXPECT_EQ(Issue(kDevA, 100, 1'000), 1);
  EXPECT_EQ(Issue(kDevA, 200, 2'000), 2);
  EXPECT_EQ(Issue(kDevA, 300, 3'000), 3);
  EXPECT_EQ(Inflight(kDevA), 3);
  EXPECT_EQ(Complete(kDevA, 200, 2'500), 1);       // 500 ns   -> bucket 0
  EXPECT_EQ(Complete(kDevA, 100, 5'000), 1);       // 4 us     -> bucket 3
  EXPECT_EQ(Complete(kDevA, 300, 20'003'000), 1);  // 20 ms    -> bucket 15
  EXPECT_EQ(Inflight(kDevA), 0);
  // Depth 1 again once all completed; an unwatched disk is not counted.
  EXPECT_EQ(Issue(kDevA, 400, 30'000'000), 1);
  EXPECT_EQ(Complete(kDevA, 400, 30'001'500), 1);  // 1.5 us   -> bucket 1
  EXPECT_EQ(Issue(kDevB, 1, 1), 0);
  EXPECT_EQ(Complete(kDevB, 1, 2), 0);

  DiskSnapshot s = Read();
  ASSERT_EQ(s.disks.size(), 1u);
  const QueueTotals& t = s.disks[kDevA];
  EXPECT_EQ(t.requests, 4u);
  EXPECT_EQ(t.completions, 4u);
  EXPECT_EQ(t.kicks, 0u);
  EXPECT_EQ(t.depth_sum, 1u + 2 + 3 + 1);
  std::array<uint64_t, proto::kDepthBuckets> dh{};
  dh[0] = 2;
  dh[1] = 2;
  EXPECT_EQ(t.depth_hist, dh);
  std::array<uint64_t, proto::kLatencyBuckets> lh{};
  lh[0] = 1;
  lh[1] = 1;
  lh[3] = 1;
  lh[15] = 1;
  EXPECT_EQ(t.latency_hist, lh);
  EXPECT_EQ(t.latency_sum_ns, 500u + 4'000 + 20'000'000 + 1'500);
  EXPECT_EQ(t.interval_max_depth, 3u);
  EXPECT_EQ(Errors(s), 0u);

  // Next interval: cumulative counters stay, the maximum restarts.
  EXPECT_EQ(Issue(kDevA, 500, 40'000'000), 1);
  s = Read();
  EXPECT_EQ(s.disks[kDevA].requests, 5u);
  EXPECT_EQ(s.disks[kDevA].interval_max_depth, 1u);
  s = Read();  // an interval without issues
  EXPECT_EQ(s.disks[kDevA].interval_max_depth, 0u);
}

TEST_F(BlockObserverBpfTest, MissingStartIsCountedAndInflightNeverNegative) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  EXPECT_EQ(Complete(kDevA, 7, 1'000), 0);  // issued before the disk was watched
  EXPECT_EQ(Complete(kDevA, 7, 2'000), 0);
  EXPECT_EQ(Inflight(kDevA), 0);
  EXPECT_EQ(Issue(kDevA, 8, 3'000), 1);  // depth starts from 0, not -2
  EXPECT_EQ(Complete(kDevA, 8, 4'000), 1);
  EXPECT_EQ(Complete(kDevA, 8, 5'000), 0);  // a second complete of the same request
  EXPECT_EQ(Inflight(kDevA), 0);
  DiskSnapshot s = Read();
  EXPECT_EQ(s.missing_start, 3u);
  EXPECT_EQ(s.underflow, 0u);
  EXPECT_EQ(s.disks[kDevA].requests, 1u);
  EXPECT_EQ(s.disks[kDevA].completions, 1u);
}

TEST_F(BlockObserverBpfTest, ReissueOfTheSameRequestIsOneRequest) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  // The driver refused the request (ring full), blk-mq hands it over again:
  // one request, one in flight, latency from the last hand-over.
  EXPECT_EQ(Issue(kDevA, 64, 1'000), 1);
  EXPECT_EQ(Issue(kDevA, 64, 9'000), 0);
  EXPECT_EQ(Inflight(kDevA), 1);
  EXPECT_EQ(Complete(kDevA, 64, 10'000), 1);  // 1 us
  // Requests without a position (flushes, the driver's GET_ID) pair by their
  // struct request like any other.
  EXPECT_EQ(IssueAs(kDevA, 65, ~uint64_t{0}, 7, 20'000), 1);
  EXPECT_EQ(Complete(kDevA, 65, 22'000), 1);  // 2 us
  EXPECT_EQ(Inflight(kDevA), 0);
  DiskSnapshot s = Read();
  EXPECT_EQ(s.reissue, 1u);
  EXPECT_EQ(s.missing_start, 0u);
  EXPECT_EQ(s.stale_start, 0u);
  const QueueTotals& t = s.disks[kDevA];
  EXPECT_EQ(t.requests, 2u);
  EXPECT_EQ(t.completions, 2u);
  EXPECT_EQ(t.latency_hist[1], 1u);
  EXPECT_EQ(t.latency_hist[2], 1u);
}

TEST_F(BlockObserverBpfTest, StaleStartIsReplacedAndItsInflightGivenBack) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  ASSERT_TRUE(obs_->Watch(kDevB).ok());
  // Request 1 on struct 5; its completion is never seen (a handler that did
  // not run). The next request on the same struct (another sector and
  // allocation time) replaces its start: a new request, and the in-flight
  // count is the true one (1), not 2.
  EXPECT_EQ(IssueAs(kDevA, 5, 100, 1'000, 1'000), 1);
  EXPECT_EQ(IssueAs(kDevA, 5, 200, 50'000, 50'000), 1);
  EXPECT_EQ(Inflight(kDevA), 1);
  // Same sector, new allocation: also a new request.
  EXPECT_EQ(IssueAs(kDevA, 5, 200, 60'000, 60'000), 1);
  // Its own requeue is still a re-issue.
  EXPECT_EQ(IssueAs(kDevA, 5, 200, 60'000, 61'000), 0);
  EXPECT_EQ(Complete(kDevA, 5, 62'000), 1);  // 1 us from the last hand-over
  EXPECT_EQ(Inflight(kDevA), 0);
  // A stale start of another disk (a tag set shared by two disks) gives
  // that disk's in-flight back.
  EXPECT_EQ(IssueAs(kDevA, 9, 8, 1, 70'000), 1);
  EXPECT_EQ(IssueAs(kDevB, 9, 8, 2, 71'000), 1);
  EXPECT_EQ(Inflight(kDevA), 0);
  EXPECT_EQ(Inflight(kDevB), 1);
  EXPECT_EQ(Complete(kDevB, 9, 72'000), 1);
  EXPECT_EQ(Inflight(kDevB), 0);
  DiskSnapshot s = Read();
  EXPECT_EQ(s.stale_start, 3u);
  EXPECT_EQ(s.reissue, 1u);
  EXPECT_EQ(s.missing_start + s.underflow + s.map_full + s.expired_start, 0u);
  EXPECT_EQ(s.disks[kDevA].requests, 4u);
  EXPECT_EQ(s.disks[kDevA].completions, 1u);
  EXPECT_EQ(s.disks[kDevA].latency_hist[1], 1u);
  EXPECT_EQ(s.disks[kDevB].requests, 1u);
  EXPECT_EQ(s.disks[kDevB].completions, 1u);
}

TEST_F(BlockObserverBpfTest, SweepExpiresStartsWhoseCompletionNeverCame) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  ASSERT_TRUE(obs_->Watch(kDevB).ok());
  // Three requests on A, one on B; the completions of A's first two and of
  // B's are never seen.
  EXPECT_EQ(Issue(kDevA, 1, 1 * kSec), 1);
  EXPECT_EQ(Issue(kDevA, 2, 2 * kSec), 2);
  EXPECT_EQ(Issue(kDevA, 3, 20 * kSec), 3);
  EXPECT_EQ(Issue(kDevB, 4, 2 * kSec), 1);
  // Just below the bound: nothing is old enough.
  EXPECT_EQ(obs_->Sweep(1 * kSec + VKICK_BLOCKOBS_START_EXPIRE_NS - 1), 0u);
  EXPECT_EQ(Inflight(kDevA), 3);
  // 32 s: A's 1 and 2 and B's 4 (30 s old and more) expire, A's 3 (12 s) not.
  EXPECT_EQ(obs_->Sweep(32 * kSec), 3u);
  EXPECT_EQ(Inflight(kDevA), 1);
  EXPECT_EQ(Inflight(kDevB), 0);
  EXPECT_EQ(obs_->Sweep(32 * kSec), 0u);  // nothing left to expire
  // A completion arriving after all: a missing start, in-flight untouched.
  EXPECT_EQ(Complete(kDevA, 1, 33 * kSec), 0);
  EXPECT_EQ(Inflight(kDevA), 1);
  // The live one completes normally, in-flight back to exactly 0.
  EXPECT_EQ(Complete(kDevA, 3, 33 * kSec), 1);
  EXPECT_EQ(Inflight(kDevA), 0);
  // The next request on an expired struct is a plain new request.
  EXPECT_EQ(Issue(kDevA, 2, 34 * kSec), 1);
  EXPECT_EQ(Complete(kDevA, 2, 34 * kSec + 1'500), 1);
  EXPECT_EQ(Inflight(kDevA), 0);
  DiskSnapshot s = Read();  // now_ = 0: this sweep expires nothing
  EXPECT_EQ(s.expired_start, 3u);
  EXPECT_EQ(s.missing_start, 1u);
  EXPECT_EQ(s.underflow + s.stale_start + s.reissue + s.map_full, 0u);
  EXPECT_EQ(s.disks[kDevA].requests, 4u);
  EXPECT_EQ(s.disks[kDevA].completions, 2u);
  EXPECT_EQ(s.disks[kDevB].requests, 1u);
  EXPECT_EQ(s.disks[kDevB].completions, 0u);

  // Read() sweeps with its clock.
  EXPECT_EQ(Issue(kDevB, 5, 100 * kSec), 1);
  EXPECT_EQ(Issue(kDevB, 6, 101 * kSec), 2);
  now_ = 130 * kSec + 500'000'000;  // 5: 30.5 s old, 6: 29.5 s
  s = Read();
  EXPECT_EQ(s.expired_start, 4u);
  EXPECT_EQ(Inflight(kDevB), 1);
  now_ = 200 * kSec;
  s = Read();
  EXPECT_EQ(s.expired_start, 5u);
  EXPECT_EQ(Inflight(kDevB), 0);
  EXPECT_EQ(s.underflow, 0u);
}

TEST_F(BlockObserverBpfTest, SweepOfAFullStartMapEmptiesIt) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  for (uint64_t i = 0; i < VKICK_BLOCKOBS_MAX_STARTS; ++i) ASSERT_EQ(Issue(kDevA, i + 1, kSec), static_cast<int>(i + 1));
  EXPECT_EQ(Issue(kDevA, VKICK_BLOCKOBS_MAX_STARTS + 1, kSec), VKICK_BLOCKOBS_MAX_STARTS + 1);  // map_full
  EXPECT_EQ(obs_->Sweep(kSec + VKICK_BLOCKOBS_START_EXPIRE_NS), uint64_t{VKICK_BLOCKOBS_MAX_STARTS});
  EXPECT_EQ(Inflight(kDevA), 0);
  EXPECT_EQ(Issue(kDevA, 1, 40 * kSec), 1);  // room again, depth from 0
  DiskSnapshot s = Read();
  EXPECT_EQ(s.expired_start, uint64_t{VKICK_BLOCKOBS_MAX_STARTS});
  EXPECT_EQ(s.map_full, 1u);
  EXPECT_EQ(s.underflow, 0u);
}

TEST_F(BlockObserverBpfTest, FullStartMapIsCounted) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  for (uint64_t i = 0; i < VKICK_BLOCKOBS_MAX_STARTS; ++i) ASSERT_EQ(Issue(kDevA, i, 1'000), static_cast<int>(i + 1));
  // One more: still a request (at its depth), but its start is lost.
  EXPECT_EQ(Issue(kDevA, VKICK_BLOCKOBS_MAX_STARTS, 2'000), VKICK_BLOCKOBS_MAX_STARTS + 1);
  EXPECT_EQ(Inflight(kDevA), VKICK_BLOCKOBS_MAX_STARTS);
  EXPECT_EQ(Complete(kDevA, VKICK_BLOCKOBS_MAX_STARTS, 3'000), 0);
  for (uint64_t i = 0; i < VKICK_BLOCKOBS_MAX_STARTS; ++i) ASSERT_EQ(Complete(kDevA, i, 3'000), 1);
  EXPECT_EQ(Inflight(kDevA), 0);
  DiskSnapshot s = Read();
  EXPECT_EQ(s.map_full, 1u);
  EXPECT_EQ(s.missing_start, 1u);
  EXPECT_EQ(s.disks[kDevA].requests, VKICK_BLOCKOBS_MAX_STARTS + 1u);
  EXPECT_EQ(s.disks[kDevA].completions, uint64_t{VKICK_BLOCKOBS_MAX_STARTS});
  EXPECT_EQ(s.disks[kDevA].depth_hist[9], VKICK_BLOCKOBS_MAX_STARTS + 1u - 511);
  // The map has room again.
  EXPECT_EQ(Issue(kDevA, 1, 4'000), 1);
}

TEST_F(BlockObserverBpfTest, UnwatchDropsTheDiskAndWatchStartsFresh) {
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  ASSERT_TRUE(obs_->Watch(kDevB).ok());
  EXPECT_EQ(Issue(kDevA, 1, 1'000), 1);
  EXPECT_EQ(Issue(kDevB, 2, 1'000), 1);
  obs_->Unwatch(kDevA);
  EXPECT_EQ(Inflight(kDevA), -1);
  DiskSnapshot s = Read();
  EXPECT_EQ(s.disks.count(kDevA), 0u);
  EXPECT_EQ(s.disks[kDevB].requests, 1u);
  ASSERT_TRUE(obs_->Watch(kDevA).ok());
  EXPECT_EQ(Complete(kDevA, 1, 2'000), 0);  // its start went with the Unwatch
  EXPECT_EQ(Inflight(kDevA), 0);
  s = Read();
  EXPECT_EQ(s.disks[kDevA], QueueTotals{});
  EXPECT_EQ(s.missing_start, 1u);
  EXPECT_EQ(Complete(kDevB, 2, 2'000), 1);  // the other disk unaffected

  for (uint32_t i = 3; obs_->Watch(KernelDev(4095, i)).ok(); ++i) ASSERT_LE(i, 100u);
  EXPECT_TRUE(absl::IsResourceExhausted(obs_->Watch(KernelDev(4094, 0))));
}

// ---- the real tracepoints on a loop device ----------------------------------

std::string Sh(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    *rc = -1;
    return out;
  }
  char buf[256];
  while (fgets(buf, sizeof(buf), p) != nullptr) out += buf;
  *rc = pclose(p);
  return std::string(absl::StripAsciiWhitespace(out));
}

class BlockObserverTracepointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: BPF and losetup need root";
    // BTF raw tracepoints: no tracefs needed; a kernel without them (or
    // without BTF) fails Create with kNotFound.
    auto p = BlockObserver::Create();
    if (!p.ok() && (absl::IsPermissionDenied(p.status()) || absl::IsNotFound(p.status())))
      GTEST_SKIP() << "block tracepoints cannot be attached: " << p.status();
    ASSERT_TRUE(p.ok()) << p.status();
    obs_ = *std::move(p);

    char tmpl[] = "/tmp/vkick-blockobs-XXXXXX";
    const int fd = mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    file_ = tmpl;
    ASSERT_EQ(ftruncate(fd, 8 << 20), 0);
    close(fd);
    int rc = 0;
    loop_ = Sh("losetup --find --show " + file_ + " 2>&1", &rc);
    if (rc != 0 || loop_.rfind("/dev/loop", 0) != 0) {
      loop_.clear();
      GTEST_SKIP() << "no loop device: losetup --find --show failed";
    }
    struct stat st;
    ASSERT_EQ(stat(loop_.c_str(), &st), 0);
    kdev_ = KernelDev(major(st.st_rdev), minor(st.st_rdev));
    // udev may still probe the new device; let it finish before counting.
    (void)Sh("command -v udevadm >/dev/null && udevadm settle -t 5 2>/dev/null", &rc);
  }
  void TearDown() override {
    if (dfd_ >= 0) close(dfd_);
    obs_.reset();
    int rc;
    if (!loop_.empty()) (void)Sh("losetup -d " + loop_ + " 2>&1", &rc);
    if (!file_.empty()) unlink(file_.c_str());
  }
  // Reads until the disk's completions reach `done(t)` (up to 5 s), then
  // its in-flight count.
  DiskSnapshot Settle(const std::function<bool(const QueueTotals&)>& done, int* inflight) {
    DiskSnapshot s;
    for (int i = 0; i < 50; ++i) {  // completions of anything still in flight
      auto r = obs_->Read();
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      s = *r;
      if (done(s.disks[kdev_])) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    vkick_blockobs_test_ctx c{};
    c.op = VKICK_BLOCKOBS_TEST_INFLIGHT;
    c.dev = kdev_;
    auto n = obs_->TestRun(c);
    EXPECT_TRUE(n.ok()) << n.status();
    *inflight = n.ok() ? *n : -1;
    return s;
  }
  std::unique_ptr<BlockObserver> obs_;
  std::string file_, loop_;
  uint32_t kdev_ = 0;
  int dfd_ = -1;
};

TEST_F(BlockObserverTracepointTest, CountsEveryDirectRequestOnALoopDevice) {
  ASSERT_TRUE(obs_->Watch(kdev_).ok());
  dfd_ = open(loop_.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  ASSERT_GE(dfd_, 0) << loop_ << ": " << strerror(errno);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 4096), 0);
  std::unique_ptr<void, decltype(&free)> hold(buf, &free);
  memset(buf, 0x5a, 4096);
  constexpr int kEach = 100;
  // Depth 1: each call returns after its request completed.
  for (int i = 0; i < kEach; ++i) ASSERT_EQ(pwrite(dfd_, buf, 4096, off_t{i} * 4096), 4096) << strerror(errno);
  for (int i = 0; i < kEach; ++i) ASSERT_EQ(pread(dfd_, buf, 4096, off_t{i} * 4096), 4096) << strerror(errno);

  int inflight = -1;
  DiskSnapshot s = Settle([](const QueueTotals& t) { return t.completions == t.requests; }, &inflight);
  const QueueTotals& t = s.disks[kdev_];
  ASSERT_GE(inflight, 0);
  EXPECT_GE(t.requests, uint64_t{2 * kEach});
  // Completions the kernel never traced (rare on this host, see
  // CountsConcurrentReadersExactly) are accounted as stale or in flight.
  EXPECT_EQ(t.completions + s.stale_start + static_cast<uint64_t>(inflight), t.requests);
  uint64_t dsum = 0, lsum = 0;
  for (uint64_t v : t.depth_hist) dsum += v;
  for (uint64_t v : t.latency_hist) lsum += v;
  EXPECT_EQ(dsum, t.requests);
  EXPECT_EQ(lsum, t.completions);
  EXPECT_GE(t.depth_sum, t.requests);  // depth >= 1 each
  EXPECT_GT(t.latency_sum_ns, 0u);
  EXPECT_EQ(s.map_full, 0u);
  EXPECT_EQ(s.underflow, 0u);
  EXPECT_EQ(s.expired_start + s.prog_misses + s.missing_start, 0u);
  EXPECT_GE(inflight, 0);
  std::printf("loop %s: requests %llu completions %llu depth_sum %llu latency_sum %llu ns missing_start %llu\n",
              loop_.c_str(), static_cast<unsigned long long>(t.requests),
              static_cast<unsigned long long>(t.completions), static_cast<unsigned long long>(t.depth_sum),
              static_cast<unsigned long long>(t.latency_sum_ns), static_cast<unsigned long long>(s.missing_start));
}

// Concurrency: 4 threads reading disjoint 4 KiB blocks with O_DIRECT, so
// issues and completions of different requests interleave across CPUs (and
// completions interrupt issues). Every one of the 2000 requests must be seen
// issued and completed, none left in flight.
TEST_F(BlockObserverTracepointTest, CountsConcurrentReadersExactly) {
  constexpr int kThreads = 4, kEach = 500;
  // The 8 MiB file holds 2048 blocks: each thread its own 500.
  static_assert(kThreads * kEach * 4096 <= (8 << 20));
  // Open before watching: opening a block device may read (partition scan).
  std::vector<int> fds;
  for (int i = 0; i < kThreads; ++i) {
    const int fd = open(loop_.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd, 0) << loop_ << ": " << strerror(errno);
    fds.push_back(fd);
  }
  int rc;
  (void)Sh("command -v udevadm >/dev/null && udevadm settle -t 5 2>/dev/null", &rc);
  ASSERT_TRUE(obs_->Watch(kdev_).ok());
  std::vector<std::thread> threads;
  std::vector<int> failed(kThreads, 0);
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      void* buf = nullptr;
      if (posix_memalign(&buf, 4096, 4096) != 0) {
        failed[th] = kEach;
        return;
      }
      for (int i = 0; i < kEach; ++i) {
        const off_t off = (off_t{th} * kEach + i) * 4096;
        if (pread(fds[th], buf, 4096, off) != 4096) ++failed[th];
      }
      free(buf);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int fd : fds) close(fd);
  for (int th = 0; th < kThreads; ++th) ASSERT_EQ(failed[th], 0) << "thread " << th;

  int inflight = -1;
  DiskSnapshot s = Settle([](const QueueTotals& t) { return t.completions >= t.requests; }, &inflight);
  const QueueTotals& t = s.disks[kdev_];
  vkick_blockobs_test_ctx c{};
  c.op = VKICK_BLOCKOBS_TEST_INFLIGHT;
  c.dev = kdev_;
  // Every request issued once, every traced completion paired, none skipped
  // by the BPF side (the kernel's own miss counter), nothing unmatched.
  EXPECT_EQ(t.requests, uint64_t{kThreads * kEach});
  EXPECT_EQ(s.prog_misses, 0u);
  EXPECT_EQ(s.missing_start, 0u);
  EXPECT_EQ(s.map_full + s.underflow + s.bad_slot + s.reissue + s.expired_start, 0u);
  // On this host's 6.18, under load from other processes, about one run in
  // a hundred has 1-4 of the 2000 loop completions never traced at all: a
  // classic tracepoint program attached alongside saw exactly the same
  // count missing, so it is not a BPF skip. Such a request's start is
  // replaced at its struct's next issue (stale_start) or left in flight:
  // the accounting must still be exact, and the sweep must heal it.
  const uint64_t lost = s.stale_start + static_cast<uint64_t>(std::max(inflight, 0));
  EXPECT_EQ(t.completions + lost, uint64_t{kThreads * kEach});
  EXPECT_GE(inflight, 0);
  if (lost > 0) {
    std::printf("NOTE: the kernel traced no completion for %llu of the requests (stale_start %llu, left in "
                "flight %d)\n",
                static_cast<unsigned long long>(lost), static_cast<unsigned long long>(s.stale_start), inflight);
    EXPECT_EQ(obs_->Sweep(UINT64_MAX / 2), static_cast<uint64_t>(inflight));  // expires what is left
    auto after = obs_->TestRun(c);
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(*after, 0);
  } else {
    EXPECT_EQ(t.completions, uint64_t{kThreads * kEach});
    EXPECT_EQ(inflight, 0);
  }
  uint64_t dsum = 0, lsum = 0;
  for (uint64_t v : t.depth_hist) dsum += v;
  for (uint64_t v : t.latency_hist) lsum += v;
  EXPECT_EQ(dsum, t.requests);
  EXPECT_EQ(lsum, t.completions);
  std::printf("loop %s, %d readers: requests %llu completions %llu depth_sum %llu max_depth %u; missing_start %llu "
              "reissue %llu stale_start %llu expired_start %llu map_full %llu underflow %llu prog_misses %llu\n",
              loop_.c_str(), kThreads, static_cast<unsigned long long>(t.requests),
              static_cast<unsigned long long>(t.completions), static_cast<unsigned long long>(t.depth_sum),
              t.interval_max_depth, static_cast<unsigned long long>(s.missing_start),
              static_cast<unsigned long long>(s.reissue), static_cast<unsigned long long>(s.stale_start),
              static_cast<unsigned long long>(s.expired_start), static_cast<unsigned long long>(s.map_full),
              static_cast<unsigned long long>(s.underflow), static_cast<unsigned long long>(s.prog_misses));
}

}  // namespace
}  // namespace vkick::agent
