// BlockObserver: the DiskCounterSource over the libbpf skeleton of
// bpf/vkick_blockobs.bpf.c. RAII: Create() opens, loads and attaches the two
// block raw tracepoint programs (SEC("tp_btf/block_rq_issue"),
// SEC("tp_btf/block_rq_complete")); the destructor detaches and frees
// everything. Observe only: nothing here writes anything a driver reads.
//
// Not thread-safe (the agent calls it from its one loop thread).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "agent/counter_source.h"
#include "bpf/vkick_blockobs.h"

struct vkick_blockobs;  // generated skeleton (vkick_blockobs.skel.h)

namespace vkick::agent {

class BlockObserver final : public DiskCounterSource {
 public:
  struct Options {
    // Attach the tracepoints (false: load only, for BPF_PROG_TEST_RUN tests).
    bool attach = true;
    // CLOCK_MONOTONIC in ns (bpf_ktime_get_ns's clock), the "now" of the
    // sweep Read() runs; tests inject their fixtures' time. Empty: the clock.
    std::function<uint64_t()> clock;
  };
  // Errors: kPermissionDenied without CAP_BPF/CAP_PERFMON, kNotFound when the
  // block tracepoints do not exist (kernel without them or without BTF),
  // kInternal else.
  static absl::StatusOr<std::unique_ptr<BlockObserver>> Create(const Options& opts);
  static absl::StatusOr<std::unique_ptr<BlockObserver>> Create() { return Create(Options{}); }
  ~BlockObserver() override;
  BlockObserver(const BlockObserver&) = delete;
  BlockObserver& operator=(const BlockObserver&) = delete;

  // DiskCounterSource. Watch fails with kResourceExhausted beyond
  // VKICK_BLOCKOBS_MAX_DISKS disks.
  absl::Status Watch(uint32_t kdev) override;
  void Unwatch(uint32_t kdev) override;
  // Sweeps (below) with Options::clock's now, then reads.
  absl::StatusOr<DiskSnapshot> Read() override;

  // Drops every start older than VKICK_BLOCKOBS_START_EXPIRE_NS at `now_ns`
  // (a request whose completion was never seen), gives its disk's in-flight
  // count back and counts it (ERR_EXPIRED_START). Returns how many.
  uint64_t Sweep(uint64_t now_ns);

  // For tests: runs the SEC("syscall") program (the tracepoint handlers'
  // counting code with arguments from ctx) through BPF_PROG_TEST_RUN; its
  // retval.
  absl::StatusOr<int> TestRun(const vkick_blockobs_test_ctx& ctx);

 private:
  BlockObserver(vkick_blockobs* skel, int num_cpus, std::function<uint64_t()> clock)
      : skel_(skel), num_cpus_(num_cpus), clock_(std::move(clock)) {}
  absl::Status Attach(const Options& opts);
  void ZeroSlot(uint32_t slot);
  uint64_t ProgMisses() const;
  // Keys of the `starts` entries `pick` selects (bounded walk).
  std::vector<uint64_t> StartsWhere(const std::function<bool(const vkick_blockobs_start&)>& pick) const;

  vkick_blockobs* skel_;
  int num_cpus_;
  std::function<uint64_t()> clock_;
  uint64_t sweep_underflow_ = 0;  // in-flight the sweep could not give back (already 0)
  std::map<uint32_t, uint32_t> slots_;  // kdev -> disk_stats slot
  std::vector<uint32_t> free_slots_;
};

}  // namespace vkick::agent
