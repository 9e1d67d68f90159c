#include "guest-policy/core/load_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace vkick {

uint64_t LatencyRecorder::Percentile(double p) {
  if (samples_.empty()) return 0;
  if (!sorted_ || sorted_n_ != samples_.size()) {
    std::sort(samples_.begin(), samples_.end());
    sorted_ = true;
    sorted_n_ = samples_.size();
  }
  // The epsilon keeps 99% of 1000 at rank 990 despite 0.99 * 1000 = 990.0000000000001.
  double rank = std::ceil(p / 100.0 * static_cast<double>(samples_.size()) - 1e-9);
  size_t idx = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
  return samples_[std::min(idx, samples_.size() - 1)];
}

uint64_t OffsetGenerator::Next() {
  if (n_ == 0) return 0;
  if (random_) return std::uniform_int_distribution<uint64_t>(0, n_ - 1)(rng_);
  uint64_t v = next_;
  next_ = (next_ + 1) % n_;
  return v;
}

namespace {
inline uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

void FillPattern(std::span<uint8_t> buf, uint64_t block, uint64_t seed) {
  const uint64_t base = Mix(block ^ Mix(seed));
  for (size_t off = 0; off + 8 <= buf.size(); off += 8) {
    uint64_t w = Mix(base + off);
    std::memcpy(buf.data() + off, &w, 8);
  }
}

std::optional<size_t> CheckPattern(std::span<const uint8_t> buf, uint64_t block, uint64_t seed) {
  const uint64_t base = Mix(block ^ Mix(seed));
  for (size_t off = 0; off + 8 <= buf.size(); off += 8) {
    uint64_t w = Mix(base + off);
    if (std::memcmp(buf.data() + off, &w, 8) != 0) return off;
  }
  return std::nullopt;
}

std::optional<DepthSchedule> DepthSchedule::Parse(std::string_view text, uint32_t max_qd,
                                                 std::string* error) {
  DepthSchedule d;
  auto fail = [&](std::string why) -> std::optional<DepthSchedule> {
    if (error) *error = std::move(why);
    return std::nullopt;
  };
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find(',', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string item(text.substr(pos, end - pos));
    const size_t colon = item.find(':');
    if (colon == std::string::npos) return fail("'" + item + "' is not QD:SECONDS");
    char* e1 = nullptr;
    char* e2 = nullptr;
    const std::string qs = item.substr(0, colon), ss = item.substr(colon + 1);
    const unsigned long qd = std::strtoul(qs.c_str(), &e1, 10);
    const double sec = std::strtod(ss.c_str(), &e2);
    if (qs.empty() || *e1 != '\0' || ss.empty() || *e2 != '\0') return fail("'" + item + "' is not QD:SECONDS");
    if (qd == 0 || qd > max_qd) return fail("depth in '" + item + "' must be 1.." + std::to_string(max_qd));
    if (!(sec > 0) || sec > 3600) return fail("seconds in '" + item + "' must be in (0, 3600]");
    const uint64_t ns = static_cast<uint64_t>(sec * 1e9);
    d.steps_.push_back({static_cast<uint32_t>(qd), ns});
    d.period_ns_ += ns;
    if (d.steps_.size() > 64) return fail("at most 64 steps");
    pos = end + 1;
  }
  if (d.steps_.empty()) return fail("empty schedule");
  return d;
}

uint32_t DepthSchedule::DepthAt(uint64_t elapsed_ns) const {
  uint64_t t = elapsed_ns % period_ns_;
  for (const DepthStep& s : steps_) {
    if (t < s.duration_ns) return s.qd;
    t -= s.duration_ns;
  }
  return steps_.back().qd;
}

uint32_t DepthSchedule::max_depth() const {
  uint32_t m = 0;
  for (const DepthStep& s : steps_) m = std::max(m, s.qd);
  return m;
}

}  // namespace vkick
