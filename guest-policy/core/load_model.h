// Pure pieces of the load generator: latency percentiles, Poisson arrivals,
// offset generation and verify patterns. No I/O, so they are unit-tested.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

namespace vkick {

class LatencyRecorder {
 public:
  void Add(uint64_t ns) { samples_.push_back(ns); }
  void Merge(const LatencyRecorder& o) { samples_.insert(samples_.end(), o.samples_.begin(), o.samples_.end()); }
  size_t count() const { return samples_.size(); }
  // Nearest-rank percentile, p in (0, 100]; 0 when empty. Sorts lazily.
  uint64_t Percentile(double p);

 private:
  std::vector<uint64_t> samples_;
  bool sorted_ = false;
  size_t sorted_n_ = 0;
};

// Exponential inter-arrival times for an open loop at `rate_per_s`.
class PoissonArrivals {
 public:
  PoissonArrivals(double rate_per_s, uint64_t seed) : dist_(rate_per_s / 1e9), rng_(seed) {}
  uint64_t NextGapNs() { return static_cast<uint64_t>(dist_(rng_)); }

 private:
  std::exponential_distribution<double> dist_;
  std::mt19937_64 rng_;
};

// Block offsets (in units of the I/O size) for random or sequential access.
class OffsetGenerator {
 public:
  OffsetGenerator(uint64_t num_blocks, bool random, uint64_t seed, uint64_t start = 0)
      : n_(num_blocks), random_(random), rng_(seed), next_(start % (num_blocks ? num_blocks : 1)) {}
  uint64_t Next();

 private:
  uint64_t n_;
  bool random_;
  std::mt19937_64 rng_;
  uint64_t next_;
};

// verify: every 8-byte word of block `block` holds f(block, seed, word index),
// so a block written at the wrong LBA, a stale or torn block all mismatch.
void FillPattern(std::span<uint8_t> buf, uint64_t block, uint64_t seed);
// Offset of the first mismatching byte, or nullopt when the block is intact.
std::optional<size_t> CheckPattern(std::span<const uint8_t> buf, uint64_t block, uint64_t seed);

}  // namespace vkick
