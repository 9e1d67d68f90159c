// Pure pieces of the load generator: latency percentiles, Poisson arrivals,
// offset generation and verify patterns. No I/O, so they are unit-tested.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
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

// A closed-loop depth that changes over time: "QD:SECONDS,QD:SECONDS,..."
// (e.g. "1:5,32:5,128:5"), cycled for the whole run. The demo and the study
// use it to show a policy following the load inside one driver process.
struct DepthStep {
  uint32_t qd;
  uint64_t duration_ns;
};
class DepthSchedule {
 public:
  // nullopt (with *error set) for an empty list, a zero depth or duration, or
  // a depth above max_qd.
  static std::optional<DepthSchedule> Parse(std::string_view text, uint32_t max_qd, std::string* error);
  // The depth in force `elapsed_ns` after the start.
  uint32_t DepthAt(uint64_t elapsed_ns) const;
  uint32_t max_depth() const;
  const std::vector<DepthStep>& steps() const { return steps_; }

 private:
  std::vector<DepthStep> steps_;
  uint64_t period_ns_ = 0;
};

// verify: every 8-byte word of block `block` holds f(block, seed, word index),
// so a block written at the wrong LBA, a stale or torn block all mismatch.
void FillPattern(std::span<uint8_t> buf, uint64_t block, uint64_t seed);
// Offset of the first mismatching byte, or nullopt when the block is intact.
std::optional<size_t> CheckPattern(std::span<const uint8_t> buf, uint64_t block, uint64_t seed);

}  // namespace vkick
