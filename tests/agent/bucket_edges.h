// The values both BPF programs' bucket fixtures sweep (every depth to 1100,
// every power of two +-1 for depths and for latencies in ns and us): the
// protocol's DepthBucket/LatencyBucket must agree with the BPF bucketing on
// each. Shared so the two programs are held to the same edges.
#pragma once

#include <cstdint>
#include <vector>

namespace vkick::agent::testing {

inline std::vector<uint64_t> DepthEdges() {
  std::vector<uint64_t> depths;
  for (uint64_t d = 0; d <= 1100; ++d) depths.push_back(d);
  for (int k = 0; k < 34; ++k)
    for (int64_t delta : {-1, 0, 1}) depths.push_back((uint64_t{1} << k) + delta);
  return depths;
}

inline std::vector<uint64_t> LatencyEdgesNs() {
  std::vector<uint64_t> lats;
  for (uint64_t l = 0; l <= 5000; l += 7) lats.push_back(l);
  for (int k = 0; k < 45; ++k)
    for (int64_t delta : {-1, 0, 1}) {
      lats.push_back((uint64_t{1} << k) * 1000 + delta);
      lats.push_back((uint64_t{1} << k) + delta);
    }
  return lats;
}

}  // namespace vkick::agent::testing
