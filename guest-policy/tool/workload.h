// vkick-blk's load generator: one poller thread per queue (submit, deferred
// kicks, completions), closed loop at a queue depth or open loop (Poisson).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "guest-policy/core/control_block.h"
#include "guest-policy/core/kick_scheduler.h"
#include "guest-policy/core/load_model.h"
#include "guest-policy/core/stats_block.h"
#include "guest-policy/transport/transport.h"

namespace vkick {

enum class RwMode { kRandRead, kRandWrite, kRead, kWrite, kVerify };
absl::StatusOr<RwMode> ParseRwMode(absl::string_view s);

struct WorkloadOptions {
  RwMode rw = RwMode::kRandRead;
  uint32_t bs = 4096;
  uint32_t qd = 1;               // per queue
  // Closed loop only: the depth follows this schedule (qd is its maximum).
  std::optional<DepthSchedule> depth_schedule;
  double rate = 0;               // per queue, requests/s; 0 = closed loop
  double runtime_s = 5;
  // Closed and open loop: run this long first, unmeasured (not verify).
  double warmup_s = 0;
  uint16_t queues = 1;
  uint16_t queue_size = 256;
  KickPolicy policy;
  // adaptive: the agent's control block. Mapped read-only when it exists;
  // every queue re-checks the path each `control_retry_ns` (appeared,
  // replaced, removed) and runs the immediate fallback while there is none.
  std::string control_path;
  uint64_t control_retry_ns = 100'000'000;
  bool interrupts = false;
  // The driver's stats block (queue i keeps its counters in queues[i]);
  // nullptr: none.
  StatsBlock* stats = nullptr;
  uint64_t seed = 1;
  uint64_t verify_bytes = 64ull << 20;  // verify: region written then read back
  // verify: write+read-back passes; 0 = repeat until runtime_s has elapsed.
  uint64_t verify_passes = 1;
  // Called once the queues run and GET_ID answered (id: raw 20 bytes, empty
  // if the device did not answer), before the I/O: vkick-blk registers there.
  std::function<void(const std::string& device_id)> on_ready;
};

struct WorkloadResult {
  uint64_t requests = 0;
  uint64_t completions = 0;
  uint64_t kicks = 0;
  std::array<uint64_t, 6> kicks_by_why{};
  uint64_t asks = 0;        // event-idx decisions put to the device
  uint64_t suppressed = 0;  // of those, the device wanted no kick
  uint64_t errors = 0;           // failed requests, mismatches and lost ones
  uint64_t verify_mismatches = 0;
  uint64_t lost = 0;
  double elapsed_s = 0;
  double iops = 0;
  double lat_p50_us = 0, lat_p99_us = 0, lat_p999_us = 0;
  double kicks_per_request = 0;
  double cpu_us_per_request = 0;
  uint64_t adaptive_fallbacks = 0;  // lease held -> fallback transitions
  uint64_t policy_changes = 0;      // effective policy switches, all queues
  uint64_t control_maps = 0;        // control block (re)mapped, all queues
  uint64_t control_unmaps = 0;      // control block dropped (gone/invalid)
  bool control_mapped = false;      // queue 0 had the block mapped at the end
  uint64_t zero_mismatches = 0;     // verify: mismatching blocks that read back all zeros
  uint64_t verify_reads = 0;        // verify: blocks read back and checked
  uint64_t verify_passes = 0;       // verify: complete write+read-back passes
  bool transport_failed = false;  // backend gone / device broken mid-run
  std::string first_error;
};

// Runs on a transport whose features/config are negotiated; allocates its
// DMA memory and starts the queues itself.
absl::StatusOr<WorkloadResult> RunWorkload(BlkTransport& t, const WorkloadOptions& o);

}  // namespace vkick
