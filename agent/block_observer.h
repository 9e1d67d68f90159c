// BlockObserver: the DiskCounterSource over the libbpf skeleton of
// bpf/vkick_blockobs.bpf.c. RAII: Create() opens, loads and attaches the two
// block tracepoint programs (block:block_rq_issue, block:block_rq_complete);
// the destructor detaches and frees everything. Observe only: nothing here
// writes anything a driver reads.
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
    // Where to mount tracefs when attaching fails because it is not mounted
    // (libbpf resolves a tracepoint's id through tracefs). Empty: never mount.
    std::string tracefs_mount = "/sys/kernel/tracing";
    // Told what was done about tracefs (one line), e.g. the agent's Log.
    std::function<void(const std::string&)> log;
  };
  // Errors: kPermissionDenied without CAP_BPF/CAP_PERFMON, kNotFound when the
  // block tracepoints do not exist (no tracefs, kernel without them),
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
  absl::StatusOr<DiskSnapshot> Read() override;

  // For tests: runs the SEC("syscall") program (the tracepoint handlers'
  // counting code with arguments from ctx) through BPF_PROG_TEST_RUN; its
  // retval.
  absl::StatusOr<int> TestRun(const vkick_blockobs_test_ctx& ctx);

 private:
  BlockObserver(vkick_blockobs* skel, int num_cpus) : skel_(skel), num_cpus_(num_cpus) {}
  absl::Status Attach(const Options& opts);
  void ZeroSlot(uint32_t slot);

  vkick_blockobs* skel_;
  int num_cpus_;
  std::map<uint32_t, uint32_t> slots_;  // kdev -> disk_stats slot
  std::vector<uint32_t> free_slots_;
};

}  // namespace vkick::agent
