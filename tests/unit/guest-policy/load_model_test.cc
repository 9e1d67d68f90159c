#include "guest-policy/core/load_model.h"

#include <cmath>

#include "gtest/gtest.h"

namespace vkick {
namespace {

TEST(LatencyRecorder, NearestRankPercentiles) {
  LatencyRecorder r;
  EXPECT_EQ(r.Percentile(50), 0u);
  for (uint64_t i = 1; i <= 1000; ++i) r.Add(1001 - i);
  EXPECT_EQ(r.Percentile(50), 500u);
  EXPECT_EQ(r.Percentile(99), 990u);
  EXPECT_EQ(r.Percentile(99.9), 999u);
  EXPECT_EQ(r.Percentile(100), 1000u);
}

TEST(PoissonArrivals, MeanGapMatchesRate) {
  PoissonArrivals p(100000, 1);  // mean gap 10 us
  double sum = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) sum += static_cast<double>(p.NextGapNs());
  EXPECT_NEAR(sum / n, 10000.0, 200.0);
}

TEST(OffsetGenerator, SequentialWrapsRandomStaysInRange) {
  OffsetGenerator s(3, false, 0);
  EXPECT_EQ(s.Next(), 0u);
  EXPECT_EQ(s.Next(), 1u);
  EXPECT_EQ(s.Next(), 2u);
  EXPECT_EQ(s.Next(), 0u);
  OffsetGenerator r(10, true, 5);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(r.Next(), 10u);
}

TEST(Pattern, DetectsWrongBlockSeedAndCorruption) {
  std::vector<uint8_t> buf(4096);
  FillPattern(buf, 17, 3);
  EXPECT_FALSE(CheckPattern(buf, 17, 3).has_value());
  EXPECT_TRUE(CheckPattern(buf, 18, 3).has_value());
  EXPECT_TRUE(CheckPattern(buf, 17, 4).has_value());
  buf[4000] ^= 1;
  auto off = CheckPattern(buf, 17, 3);
  ASSERT_TRUE(off.has_value());
  EXPECT_EQ(*off, 4000u);
  std::vector<uint8_t> zero(4096, 0);
  EXPECT_TRUE(CheckPattern(zero, 0, 0).has_value());
}

}  // namespace
}  // namespace vkick

namespace vkick {
namespace {

TEST(DepthSchedule, CyclesThroughItsSteps) {
  std::string why;
  auto d = DepthSchedule::Parse("1:1,32:0.5,128:2", 256, &why);
  ASSERT_TRUE(d.has_value()) << why;
  EXPECT_EQ(d->max_depth(), 128u);
  constexpr uint64_t kS = 1'000'000'000;
  EXPECT_EQ(d->DepthAt(0), 1u);
  EXPECT_EQ(d->DepthAt(kS - 1), 1u);
  EXPECT_EQ(d->DepthAt(kS), 32u);
  EXPECT_EQ(d->DepthAt(kS + kS / 2), 128u);
  EXPECT_EQ(d->DepthAt(3 * kS + kS / 2 - 1), 128u);
  EXPECT_EQ(d->DepthAt(3 * kS + kS / 2), 1u);  // period 3.5 s: back to the start
  EXPECT_EQ(d->DepthAt(7 * kS + kS / 4), 1u);
}

TEST(DepthSchedule, RejectsBadText) {
  for (const char* bad : {"", "8", "8:", ":1", "0:1", "300:1", "8:0", "8:-1", "8:1,", "8:1,x:2", "8:1s"}) {
    std::string why;
    EXPECT_FALSE(DepthSchedule::Parse(bad, 256, &why).has_value()) << bad;
    EXPECT_FALSE(why.empty()) << bad;
  }
}

}  // namespace
}  // namespace vkick
