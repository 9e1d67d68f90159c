// The driver's stats block: per-queue counters and histograms that vkick-blk
// keeps in a small shared file (typically /dev/shm/vkick/stats-<pid>) and the
// guest agent reads once per interval. This is how the loop observes the
// driver without a per-request trap: a USDT probe with a uprobe attached costs
// a trap into the kernel on every request (80 % of vkick-blk's throughput,
// docs/agent.md), these counters cost a few plain stores the driver makes
// anyway. Layout frozen by the static_asserts below (docs/agent.md).
//
// Concurrency: one writer per queue (its poller thread); every field is a
// 64-bit counter that only grows, stored with relaxed atomics (a plain `mov`
// on x86-64, no lock prefix). A reader copies the block with pread() and
// gets each counter untorn; two counters of one copy may disagree by the
// requests in flight, which the agent's Delta() already tolerates (the
// histograms are its source of truth). The reader trusts nothing: the header
// is validated and the counters are judged by the agent as any probe data.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace vkick {

inline constexpr uint32_t kStatsBlockMagic = 0x42534B56;  // "VKSB" little-endian
inline constexpr uint16_t kStatsBlockVersion = 1;
inline constexpr uint16_t kStatsBlockMaxQueues = 16;
// Buckets and slots: exactly protocol/messages.h kDepthBuckets,
// kLatencyBuckets and bpf/vkick_agent.h VKICK_AGENT_WHY_SLOTS (static_asserts
// in agent/stats_source.cc).
inline constexpr size_t kStatsDepthBuckets = 10;
inline constexpr size_t kStatsLatencyBuckets = 16;
inline constexpr size_t kStatsWhySlots = 8;

// One queue's counters, cumulative since the driver started.
struct StatsQueue {                      // 42 x 8 = 336 bytes
  uint64_t depth_limit;                  // requests in flight at most (set once)
  uint64_t requests;                     // published in the avail ring
  uint64_t completions;                  // reaped from the used ring
  uint64_t kicks;                        // notifications performed
  uint64_t asks;                         // event-idx decisions put to the device
  uint64_t suppressed;                   // of those, the device wanted no kick
  uint64_t depth_sum;                    // sum of the depth at each submit
  uint64_t latency_sum_ns;               // sum of submit-to-reap latencies
  uint64_t kicks_by_why[kStatsWhySlots];  // KickWhy; the last slot: other
  uint64_t depth_hist[kStatsDepthBuckets];      // proto::DepthBucket
  uint64_t latency_hist[kStatsLatencyBuckets];  // proto::LatencyBucket
};
static_assert(sizeof(StatsQueue) == 336);

struct StatsBlock {           // 64 + 16 x 336 = 5440 bytes
  uint32_t magic;             // kStatsBlockMagic, stored last (release)
  uint16_t version;           // kStatsBlockVersion
  uint16_t num_queues;        // 1..kStatsBlockMaxQueues
  uint32_t size;              // sizeof(StatsBlock)
  uint32_t reserved0;
  uint64_t writer_pid;        // informational
  uint64_t reserved[5];
  StatsQueue queues[kStatsBlockMaxQueues];
};
static_assert(sizeof(StatsBlock) == 5440);
static_assert(offsetof(StatsBlock, queues) == 64);

// Writer side: the header once (magic last, so a reader never sees a valid
// magic over a half-written header).
void InitStatsBlock(StatsBlock* b, uint16_t num_queues, uint64_t writer_pid);

// Single-writer increments: a relaxed load and store, no read-modify-write
// lock (only the queue's own thread writes its counters).
inline void StatsAdd(uint64_t& counter, uint64_t v) {
  std::atomic_ref<uint64_t> a(counter);
  a.store(a.load(std::memory_order_relaxed) + v, std::memory_order_relaxed);
}

// The protocol's bucketing (protocol/messages.h DepthBucket, LatencyBucket),
// repeated here because guest-policy/core does not depend on the protocol;
// a unit test checks both agree on every edge.
inline size_t StatsDepthBucket(uint64_t depth) {
  if (depth <= 1) return 0;
  const size_t b = 63 - static_cast<size_t>(__builtin_clzll(depth));
  return b < kStatsDepthBuckets - 1 ? b : kStatsDepthBuckets - 1;
}
inline size_t StatsLatencyBucket(uint64_t ns) {
  const uint64_t us = ns / 1000;
  if (us == 0) return 0;
  const size_t b = 64 - static_cast<size_t>(__builtin_clzll(us));
  return b < kStatsLatencyBuckets - 1 ? b : kStatsLatencyBuckets - 1;
}

// Reader side: validates a copy of the block, of which `bytes_read` bytes
// came from the file, and returns its queues. Pure; safe for any contents.
struct StatsView {
  uint16_t num_queues = 0;
  uint64_t writer_pid = 0;
  const StatsQueue* queues = nullptr;  // points into the validated copy
};
absl::StatusOr<StatsView> ParseStatsBlock(const StatsBlock& copy, size_t bytes_read);

// Opens the block at `path` for reading: a regular file, no symlink
// followed (the path comes from an untrusted registry entry). The caller
// keeps the fd: reads through it still see the final counters after the
// driver exits and removes the file.
absl::StatusOr<int> OpenStatsBlockFile(const std::string& path);
// Reads the block with one pread() into `buf` (no mapping: a writer that
// truncates its file cannot SIGBUS the reader) and validates it.
absl::StatusOr<StatsView> ReadStatsBlock(int fd, StatsBlock* buf);
// Both, for one-off readers (tests, tools).
absl::StatusOr<StatsView> ReadStatsBlockFile(const std::string& path, StatsBlock* buf);

}  // namespace vkick
