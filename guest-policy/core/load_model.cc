#include "guest-policy/core/load_model.h"

#include <algorithm>
#include <cmath>
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

}  // namespace vkick
