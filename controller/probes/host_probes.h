// HostProbes: the ProbeBackend over the libbpf skeleton of
// bpf/host_probes.bpf.c. RAII: Create() opens, loads and attaches; the
// destructor detaches and frees everything (links, maps, programs).
//
// Not thread-safe: callers serialise (vkickd calls it from one thread).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "bpf/host_probes.h"
#include "controller/probes/probe_backend.h"

struct host_probes;    // generated skeleton (host_probes.skel.h)
struct bpf_link;

namespace vkick {

// Which tracepoint groups to attach. Every program is always loaded (so the
// SEC("syscall") test programs and maps exist); a group that is off is just
// not attached, e.g. to measure the cost of one group or to run tests that
// only use BPF_PROG_TEST_RUN.
struct HostProbesOptions {
  bool attach_exits = true;          // kvm:kvm_exit
  bool attach_notifications = true;  // kvm:kvm_mmio, kvm:kvm_fast_mmio, kvm:kvm_pio
  bool attach_interrupts = true;     // kvm:kvm_msi_set_irq
  // syscalls:sys_enter_sendmsg, syscalls:sys_enter_write, syscalls:sys_enter_connect,
  // sched:sched_process_exit
  bool attach_vhost_user = true;
};

class HostProbes final : public ProbeBackend {
 public:
  using Options = HostProbesOptions;

  // Errors: kPermissionDenied (no CAP_BPF/CAP_PERFMON), kNotFound (a
  // tracepoint is missing: tracefs not mounted, kvm not in this kernel),
  // kInternal otherwise; the message names the program and errno.
  static absl::StatusOr<std::unique_ptr<HostProbes>> Create(Options options = {});
  ~HostProbes() override;
  HostProbes(const HostProbes&) = delete;
  HostProbes& operator=(const HostProbes&) = delete;

  // ProbeBackend.
  absl::Status TrackProcess(uint32_t tgid, uint32_t vm_id) override;
  absl::Status UntrackProcess(uint32_t tgid, uint32_t vm_id) override;
  absl::Status SetNotifyTargets(uint32_t vm_id, absl::Span<const NotifyTarget> targets) override;
  absl::Status SetVhostUserSocket(uint32_t tgid, int32_t socket_fd, uint16_t device_id) override;
  absl::Status SetVhostUserPath(absl::string_view path, uint32_t vm_id,
                                uint16_t device_id) override;
  absl::Status TrackFrontend(uint32_t tgid, int32_t socket_fd, uint32_t vm_id,
                             uint16_t device_id) override;
  absl::Status SweepExitedFrontends() override;
  absl::StatusOr<CounterSnapshot> ReadCounters() override;

  // Names of the attached tracepoint programs ("tp_kvm_mmio", ...).
  const std::vector<std::string>& attached_programs() const { return attached_; }

  // For tests: run the SEC("syscall") programs through BPF_PROG_TEST_RUN.
  // They execute the same inline counting code as the tracepoint handlers,
  // with the tgid taken from the context instead of the current task.
  absl::Status TestRunExit(const vkick_test_exit_ctx& ctx);
  absl::Status TestRunIo(const vkick_test_io_ctx& ctx);
  absl::Status TestRunMsi(const vkick_test_msi_ctx& ctx);
  // For tests: the fd of a map by its name in bpf/host_probes.bpf.c
  // ("notify_counts", ...), or -1.
  int MapFdForTest(absl::string_view name) const;

 private:
  explicit HostProbes(host_probes* skel) : skel_(skel) {}
  absl::Status Attach(const Options& options);
  absl::Status TestRun(int prog_fd, const void* ctx, size_t size, absl::string_view what);

  host_probes* skel_;
  std::vector<bpf_link*> links_;
  std::vector<std::string> attached_;
  int num_cpus_ = 0;
};

}  // namespace vkick
