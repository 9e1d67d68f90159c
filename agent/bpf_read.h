// What the agent's two BPF readers (UsdtProbes: vkick-blk's USDT probes;
// BlockObserver: the kernel's block tracepoints) do alike: errno -> Status,
// walking a hash map's keys, closing the max-depth epoch, summing one per-CPU
// counters value into QueueTotals, summing the per-CPU errors array, and
// running a SEC("syscall") test program. Header-only, used by
// the io library's kernel-touching code only.
#pragma once

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "agent/sample_builder.h"
#include "common/errno_status.h"

namespace vkick::agent {

inline absl::Status BpfErrnoStatus(int err, absl::string_view what) {
  return ErrnoStatus(err, what, "vkick-agent needs root (CAP_BPF + CAP_PERFMON), or the verifier refused a program");
}

// The keys of a hash map, in the kernel's order. A key deleted by the BPF
// side mid-walk makes get_next_key restart from the first key, so the walk
// stops after `max_steps`. ENOENT ends it; any other error ends it too, with
// that errno in *err (0 otherwise), and the keys seen so far are returned.
template <typename Key>
std::vector<Key> MapKeys(int fd, size_t max_steps, int* err = nullptr) {
  std::vector<Key> keys;
  Key k{}, next{};
  const Key* prev = nullptr;
  if (err != nullptr) *err = 0;
  for (size_t n = 0; n < max_steps; ++n) {
    if (bpf_map_get_next_key(fd, prev, &next) != 0) {
      if (errno != ENOENT && err != nullptr) *err = errno;
      break;
    }
    keys.push_back(next);
    k = next;
    prev = &k;
  }
  return keys;
}

// Closes the max-depth interval (the BPF side resets a CPU's maximum at its
// first event of a new epoch) and returns the epoch just closed.
inline uint32_t CloseDepthEpoch(volatile uint32_t* epoch) {
  const uint32_t closed = *epoch;
  __atomic_store_n(epoch, closed + 1, __ATOMIC_RELEASE);
  return closed;
}

// Adds one CPU's value of a counters struct with the common fields
// (requests, completions, depth_sum, latency_sum_ns, depth_hist,
// latency_hist, max_depth/max_epoch).
template <typename Counters>
void AddCpuCounters(QueueTotals& t, const Counters& v, uint32_t closed_epoch) {
  t.requests += v.requests;
  t.completions += v.completions;
  t.depth_sum += v.depth_sum;
  t.latency_sum_ns += v.latency_sum_ns;
  for (size_t i = 0; i < proto::kDepthBuckets; ++i) t.depth_hist[i] += v.depth_hist[i];
  for (size_t i = 0; i < proto::kLatencyBuckets; ++i) t.latency_hist[i] += v.latency_hist[i];
  if (v.max_epoch == closed_epoch && v.max_depth > t.interval_max_depth)
    t.interval_max_depth = v.max_depth;
}

// Sums a per-CPU array map of u64 error counters into `outs` (index i ->
// *outs[i]); an unreadable slot is skipped (the counters are advisory).
inline void SumPerCpuErrors(int fd, int num_cpus, std::span<uint64_t* const> outs) {
  std::vector<uint64_t> ev(static_cast<size_t>(num_cpus));
  for (uint32_t i = 0; i < outs.size(); ++i) {
    if (bpf_map_lookup_elem(fd, &i, ev.data()) != 0) continue;
    for (uint64_t v : ev) *outs[i] += v;
  }
}

// Runs a SEC("syscall") program once through BPF_PROG_TEST_RUN with `ctx`
// as its context; its return value.
template <typename Ctx>
absl::StatusOr<int> RunTestProgram(const bpf_program* prog, const Ctx& ctx) {
  Ctx copy = ctx;
  LIBBPF_OPTS(bpf_test_run_opts, opts, .ctx_in = &copy, .ctx_size_in = static_cast<__u32>(sizeof(copy)));
  if (bpf_prog_test_run_opts(bpf_program__fd(prog), &opts) != 0)
    return BpfErrnoStatus(errno, absl::StrCat("BPF_PROG_TEST_RUN of ", bpf_program__name(prog)));
  return static_cast<int>(opts.retval);
}

}  // namespace vkick::agent
