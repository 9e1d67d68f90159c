// The vkick_virtio_blk module's sysfs interface as the agent uses it: the
// `stats` parser (every malformed shape refused, never a crash), the `steer`
// line, and both read and written on a fake tree of regular files.
#include "agent/vkick_disks.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "gtest/gtest.h"
#include "tests/unit/agent/vkick_stats_text.h"
#include "tests/unit/protocol/test_messages.h"
#include "tests/unit/temp_dir.h"

namespace vkick::agent {
namespace {

namespace fs = std::filesystem;
using testing::VkickRequests;
using testing::VkickStatsText;

constexpr uint64_t kMs = 1'000'000;

// Every field its own value, so a value landing in the wrong field shows.
VkickQueueStats Distinct() {
  VkickQueueStats s;
  uint64_t v = 1;
  QueueTotals& t = s.totals;
  for (uint64_t* f : {&t.requests, &t.completions, &t.kicks, &s.timer_kicks, &t.asks, &t.suppressed, &t.depth_sum,
                      &t.latency_sum_ns, &s.depth_limit, &s.inflight, &s.rejected_writes})
    *f = v++;
  for (uint64_t& x : t.kicks_by_why) x = v++;
  for (uint64_t& x : t.depth_hist) x = v++;
  for (uint64_t& x : t.latency_hist) x = v++;
  return s;
}

void ExpectSame(const VkickQueueStats& a, const VkickQueueStats& b) {
  EXPECT_EQ(a.totals, b.totals);
  EXPECT_EQ(a.timer_kicks, b.timer_kicks);
  EXPECT_EQ(a.depth_limit, b.depth_limit);
  EXPECT_EQ(a.inflight, b.inflight);
  EXPECT_EQ(a.rejected_writes, b.rejected_writes);
}

TEST(VkickStats, ParsesWhatTheModulePrints) {
  const VkickQueueStats want = Distinct();
  auto got = ParseVkickQueueStats(VkickStatsText(want));
  ASSERT_TRUE(got.has_value());
  ExpectSame(*got, want);
  EXPECT_EQ(got->totals.interval_max_depth, 0u);
  // The largest u64, tabs, blank lines and no final newline are fine.
  std::string text = VkickStatsText(want);
  text.replace(text.find("requests 1"), 10, "requests\t18446744073709551615");
  text = "\n" + text.substr(0, text.size() - 1);
  got = ParseVkickQueueStats(text);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->totals.requests, UINT64_MAX);
}

TEST(VkickStats, SkipsKeysItDoesNotKnow) {
  const VkickQueueStats want = Distinct();
  const std::string text = "future_first x y\n" + VkickStatsText(want) + "future_key 1 2 3\nanother -5\n";
  auto got = ParseVkickQueueStats(text);
  ASSERT_TRUE(got.has_value());
  ExpectSame(*got, want);
}

TEST(VkickStats, RefusesEveryMalformedShape) {
  const std::string good = VkickStatsText(Distinct());
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string t = good;
    const size_t at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"missing key", replaced("depth_limit 9\n", "")},
      {"twice", good + "kicks 3\n"},
      {"no value", replaced("kicks 3", "kicks")},
      {"two values", replaced("kicks 3", "kicks 3 4")},
      {"short histogram", replaced("depth_hist 20 ", "depth_hist ")},
      {"long histogram", replaced("depth_hist 20", "depth_hist 0 20")},
      {"sign", replaced("kicks 3", "kicks +3")},
      {"negative", replaced("kicks 3", "kicks -3")},
      {"not a number", replaced("kicks 3", "kicks 3x")},
      {"hex", replaced("kicks 3", "kicks 0x3")},
      {"overflow", replaced("requests 1", "requests 18446744073709551616")},
      {"too many digits", replaced("requests 1", "requests 000000000000000000001")},
      {"empty", ""},
  };
  for (const auto& [what, text] : cases) EXPECT_FALSE(ParseVkickQueueStats(text).has_value()) << what;
}

TEST(VkickStats, RandomDamageNeverCrashes) {
  const std::string good = VkickStatsText(Distinct());
  std::mt19937_64 rng(17);
  for (int i = 0; i < 20'000; ++i) {
    std::string t = good;
    for (int n = 1 + static_cast<int>(rng() % 4); n > 0; --n) {
      const size_t at = rng() % t.size();
      switch (rng() % 3) {
        case 0: t[at] = static_cast<char>(rng()); break;
        case 1: t.erase(at, 1 + rng() % 8); break;
        default: t.insert(at, 1, " \n09a-"[rng() % 6]); break;
      }
      if (t.empty()) t = "x";
    }
    (void)ParseVkickQueueStats(t);  // parsed or refused: both fine
  }
}

TEST(VkickSteer, LineIsWhatTheModuleTakes) {
  proto::QueuePolicy p = proto::testing::StaticQueuePolicy({0, 3}, 16, 30'000, 5'000 * kMs, 42);
  EXPECT_EQ(SteerLine(p), "42 static 16 30000 5000\n");
  p.mode = proto::KickMode::kAdaptive;  // the law's own B and T: static, as vkick-blk's control block reads it
  EXPECT_EQ(SteerLine(p), "42 static 16 30000 5000\n");
  p.mode = proto::KickMode::kEventIdx;
  EXPECT_EQ(SteerLine(p), "42 event-idx 16 30000 5000\n");
  p.batch = 1;
  p.defer_ns = 0;
  EXPECT_EQ(SteerLine(p), "42 event-idx 1 0 5000\n");
  p.mode = proto::KickMode::kImmediate;
  EXPECT_EQ(SteerLine(p), "42 immediate 1 0 5000\n");
}

TEST(VkickSteer, LeaseIsRoundedUpIntoTheModulesRange) {
  proto::QueuePolicy p = proto::testing::StaticQueuePolicy({0, 0}, 8, 50'000, proto::kMinLeaseNs, 1);
  auto lease_of = [&](uint64_t ns) {
    p.lease_ns = ns;
    const std::string line = SteerLine(p);
    return line.substr(line.rfind(' ') + 1);
  };
  EXPECT_EQ(lease_of(proto::kMinLeaseNs), "10\n");
  EXPECT_EQ(lease_of(10 * kMs + 1), "11\n");  // never shorter than the host's lease
  EXPECT_EQ(lease_of(5 * kMs), "10\n");       // below the protocol's range: clamped
  EXPECT_EQ(lease_of(proto::kMaxLeaseNs), "60000\n");
  EXPECT_EQ(lease_of(proto::kMaxLeaseNs + 1), "60000\n");
  EXPECT_EQ(lease_of(UINT64_MAX), "60000\n");
}

class VkickDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    disk_.name = "vkda";
    disk_.major = 253;
    disk_.driver = proto::DriverKind::kVkickVirtioBlk;
    disk_.num_queues = 2;
    for (uint16_t q = 0; q < 2; ++q) {
      fs::create_directories(VkickQueueDir(dir_.path(), "vkda", q));
      std::ofstream(VkickQueueDir(dir_.path(), "vkda", q) + "/steer") << "0 immediate 1 0 0 none\n";
    }
  }
  void SetStats(uint16_t q, const std::string& text) {
    std::ofstream(VkickQueueDir(dir_.path(), "vkda", q) + "/stats") << text;
  }
  std::string Steer(uint16_t q) {
    std::ifstream f(VkickQueueDir(dir_.path(), "vkda", q) + "/steer");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

  vkick::testing::TempDir dir_{"vkick-vkdisk"};
  KernelDisk disk_;
};

TEST_F(VkickDiskTest, ReadsEachQueueAndCountsTheUnreadable) {
  VkickDiskStats stats(dir_.path());
  SetStats(0, VkickStatsText(VkickRequests(100, 4, 20'000)));  // q1: no stats file
  auto got = stats.Read(disk_);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].requests, 100u);
  EXPECT_EQ(got[0].kicks, 100u);
  EXPECT_EQ(got[0].interval_max_depth, 7u);  // depth 4: bucket [4, 8)
  EXPECT_EQ(stats.unreadable(), 1u);
  SetStats(1, "requests 5\n");  // malformed: counted, never half-trusted
  got = stats.Read(disk_);
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(stats.unreadable(), 2u);
  SetStats(1, std::string(kMaxVkickStatsBytes + 1, '\n'));  // longer than an attribute can be
  EXPECT_EQ(stats.Read(disk_).size(), 1u);
  EXPECT_EQ(stats.unreadable(), 3u);
}

TEST_F(VkickDiskTest, IntervalMaxDepthComesFromTheHistogramsChange) {
  VkickDiskStats stats(dir_.path());
  VkickQueueStats s = VkickRequests(100, 40, 20'000);  // bucket [32, 64)
  SetStats(0, VkickStatsText(s));
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 63u);
  // Only depth-1 requests since: the interval's maximum is 1, though the
  // cumulative histogram still holds the deep ones.
  s.totals.requests += 10;
  s.totals.depth_hist[0] += 10;
  SetStats(0, VkickStatsText(s));
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 1u);
  // Nothing new: 0.
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 0u);
  // Capped by the queue's depth limit.
  s.totals.requests += 5;
  s.totals.depth_hist[8] += 5;  // [256, 512)
  s.depth_limit = 300;
  SetStats(0, VkickStatsText(s));
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 300u);
  // The module was reloaded (counters restarted): the new counts are the change.
  SetStats(0, VkickStatsText(VkickRequests(3, 2, 1'000)));
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 3u);
  // A forgotten disk starts over.
  stats.Forget(KernelDevOf(disk_));
  EXPECT_EQ(stats.Read(disk_)[0].interval_max_depth, 3u);
}

TEST_F(VkickDiskTest, SteerWritesTheLineToTheQueuesFile) {
  const proto::QueuePolicy p = proto::testing::StaticQueuePolicy({4, 1}, 8, 50'000, 2'000 * kMs, 9);
  ASSERT_TRUE(WriteSteer(dir_.path(), "vkda", p).ok());
  EXPECT_EQ(Steer(1), "9 static 8 50000 2000\n");
  EXPECT_EQ(Steer(0), "0 immediate 1 0 0 none\n");  // queue 0 untouched
  // No such queue: an error, and no file is created.
  proto::QueuePolicy q5 = p;
  q5.ref.queue_index = 5;
  const absl::Status s = WriteSteer(dir_.path(), "vkda", q5);
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(fs::exists(VkickQueueDir(dir_.path(), "vkda", 5)));
}

}  // namespace
}  // namespace vkick::agent
