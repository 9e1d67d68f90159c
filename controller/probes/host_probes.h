// HostProbes: the ProbeBackend over the libbpf skeleton of
// bpf/host_probes.bpf.c. RAII: Create() opens, sizes the maps, chooses the
// kvm programs' flavour (tp_btf or classic), loads and attaches; the
// destructor detaches and frees everything (links, maps, programs), except
// what is pinned (Options::pin_dir): pinned maps and kvm links outlive the
// object and the process, so counting goes on while vkickd is down and the
// next HostProbes on the same pin dir continues the counts.
//
// Not thread-safe: callers serialise (vkickd calls it from one thread).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "bpf/host_probes.h"
#include "controller/probes/map_ops.h"
#include "controller/probes/map_read.h"
#include "controller/probes/notify_table.h"
#include "controller/probes/probe_backend.h"
#include "controller/probes/probe_capacity.h"
#include "controller/probes/probe_pins.h"

struct host_probes;    // generated skeleton (host_probes.skel.h)
struct bpf_link;
struct bpf_program;

namespace vkick {

// Which flavour of the kvm programs to load (kvm_exit is always classic:
// its reason is not an argument, bpf/host_probes.bpf.c).
enum class KvmTracepoints {
  kAuto,     // tp_btf where the kernel's BTF has the tracepoint, else classic
  kBtf,      // tp_btf or fail (kNotFound)
  kClassic,  // the classic tracepoints (the fallback, forced)
};
// "auto", "tp_btf", "classic".
const char* KvmTracepointsName(KvmTracepoints k);
absl::StatusOr<KvmTracepoints> ParseKvmTracepoints(absl::string_view s);

// Which tracepoint groups to attach. Every program of the chosen flavour is
// loaded (so the SEC("syscall") test programs and maps exist); a group that
// is off is just not attached, e.g. to measure the cost of one group or to
// run tests that only use BPF_PROG_TEST_RUN.
struct HostProbesOptions {
  bool attach_exits = true;          // kvm:kvm_exit
  bool attach_notifications = true;  // kvm:kvm_mmio, kvm:kvm_fast_mmio, kvm:kvm_pio
  bool attach_interrupts = true;     // kvm:kvm_msi_set_irq
  // The kick syscall group: syscalls:sys_enter_sendmsg, sys_enter_write,
  // sys_enter_connect, sched:sched_process_exit. Attached at Create when set;
  // SetKickSyscalls() attaches and detaches it later (vkickd: only while a
  // TCG VM with a vhost-user device or a --vhost-user frontend needs it).
  bool attach_vhost_user = true;
  KvmTracepoints kvm_tracepoints = KvmTracepoints::kAuto;
  ProbeCapacity capacity;  // max_entries of the maps, set before the load
  // A bpffs directory (vkickd's --pin-dir) for the maps (<dir>/maps/) and
  // the kvm groups' links (<dir>/links/); empty: nothing pinned. Pinned
  // maps compatible with this object are reused and the VMs in them
  // adopted (adopted_vms()); else every pin is discarded (pin_state() says
  // why) and all starts fresh. A pinned link whose program is this
  // object's code over these maps is kept (not attached twice); any other
  // is detached and replaced. The kick syscall group is never pinned: it
  // is attached only while needed, so it detaches when vkickd dies.
  std::string pin_dir;
};

class HostProbes final : public ProbeBackend {
 public:
  using Options = HostProbesOptions;

  // Errors: kPermissionDenied (no CAP_BPF/CAP_PERFMON; also a program the
  // verifier refused), kNotFound (a tracepoint is missing: tracefs not
  // mounted, kvm not in this kernel; or kBtf forced without the BTF),
  // kInvalidArgument (capacity out of bounds), kInternal otherwise; the
  // message names the program and errno. kAuto whose tp_btf programs the
  // kernel refuses loads the classic ones instead (kvm_flavour() says so).
  static absl::StatusOr<std::unique_ptr<HostProbes>> Create(Options options = {});
  ~HostProbes() override;
  HostProbes(const HostProbes&) = delete;
  HostProbes& operator=(const HostProbes&) = delete;

  // ProbeBackend.
  AdoptedVms adopted_vms() const override { return adopted_; }
  bool keeps_counts_across_restart() const override { return !pins_.dir.empty(); }
  absl::Status TrackProcess(uint32_t tgid, uint32_t vm_id) override;
  absl::Status UntrackProcess(uint32_t tgid, uint32_t vm_id) override;
  absl::Status SetNotifyTargets(uint32_t vm_id, absl::Span<const NotifyTarget> targets) override;
  absl::Status SetVhostUserSocket(uint32_t tgid, int32_t socket_fd, uint16_t device_id) override;
  absl::Status SetVhostUserPath(absl::string_view path, uint32_t vm_id,
                                uint16_t device_id) override;
  absl::Status TrackFrontend(uint32_t tgid, int32_t socket_fd, uint32_t vm_id,
                             uint16_t device_id) override;
  absl::Status SweepExitedFrontends() override;
  absl::Status SetKickSyscalls(bool attached) override;
  // Batched (map_read.h) where the kernel can, else a key walk.
  absl::StatusOr<CounterSnapshot> ReadCounters() override;
  // Per queue: its counter slot and the notify_counts hash (one lookup
  // each), no walk.
  absl::StatusOr<std::map<ProbeQueueId, uint64_t>> ReadNotificationTotals(
      absl::Span<const ProbeQueueId> queues) override;

  // Names of the attached programs ("btf_kvm_mmio", "tp_kvm_exit", ...).
  std::vector<std::string> attached_programs() const;
  bool kick_syscalls_attached() const { return !syscall_links_.empty(); }
  // "tp_btf", "classic", or "tp_btf+classic" when the BTF has only some;
  // auto mode's fallback says why tp_btf was refused.
  std::string kvm_flavour() const;
  // With a pin dir: what was found there and done with it, for the log.
  const std::string& pin_state() const { return pin_state_; }
  // The notify map's and the counter slots' occupancy, as vkickd (their
  // only writer) keeps it.
  const NotifyTargetTable& notify_targets() const { return *notify_; }

  // For tests: run the SEC("syscall") programs through BPF_PROG_TEST_RUN.
  // They execute the same inline counting code as the tracepoint handlers,
  // with the tgid taken from the context instead of the current task.
  absl::Status TestRunExit(const vkick_test_exit_ctx& ctx);
  absl::Status TestRunIo(const vkick_test_io_ctx& ctx);
  absl::Status TestRunMsi(const vkick_test_msi_ctx& ctx);
  // For tests: the fd of a map by its name in bpf/host_probes.bpf.c
  // ("notify_counts", ...), or -1.
  int MapFdForTest(absl::string_view name) const;
  // For tests and the batch-vs-walk figure: whether ReadCounters batches
  // (false before the first read), and making it walk keys from now on.
  bool reads_batched() const { return reader_->batched(); }
  void ReadByKeyWalkForTest() { reader_->ForceKeyWalk(); }

 private:
  using NotifyMap = MapOps<vkick_notify_key, vkick_notify_target>;
  // Tracked processes' tgids in vmm_tgids (the guest-write programs' filter).
  absl::Status SetVmmBit(uint32_t tgid, bool on);
  // tracked[tgid] = vm_id, nothing else (a frontend is not a VMM).
  absl::Status InsertTracked(uint32_t tgid, uint32_t vm_id);

  explicit HostProbes(host_probes* skel) : skel_(skel) {}
  static absl::StatusOr<std::unique_ptr<HostProbes>> Load(const Options& options,
                                                          KvmTracepoints kvm);
  absl::Status SizeMaps(const ProbeCapacity& capacity);
  absl::Status ChooseKvmPrograms(KvmTracepoints mode);
  absl::Status Attach(const Options& options);
  struct Link {
    bpf_link* link;
    bpf_program* prog;
  };
  absl::Status AttachOne(bpf_program* prog, std::vector<Link>* links);
  // Pinning (probe_pins.h): before the load, the maps' pin paths (every pin
  // discarded first if one does not fit); after it, the kvm links kept or
  // replaced, and the tables re-learned from the reused maps.
  absl::Status PinMaps();
  absl::Status AttachPinned(bpf_program* prog);
  absl::Status UnpinStrayLinks(const std::set<std::string>& wanted);
  std::set<uint32_t> MapIds() const;
  absl::Status Relearn();
  // Frontends are not adopted (their vm_id is the --vhost-user pseudo-VM's,
  // given anew at each start): their tracking and counts are dropped.
  absl::Status ForgetFrontends(const std::set<uint32_t>& tgids, const std::set<uint32_t>& vms);
  // UntrackProcess for many processes ({tgid -> vm_id}), each hash walked
  // once for all of them (a walk of a full counter map is tens of ms).
  absl::Status UntrackProcesses(const std::map<uint32_t, uint32_t>& vm_of_tgid);
  // Deletes the VMs' keys of the counter hashes (exits, notify_counts,
  // unmatched, interrupts): one walk each; errors added to *status.
  void DropVmCounters(const std::set<uint32_t>& vm_ids, absl::Status* status);
  // Deletes the processes' keys of kick_fds and vhost_sock: one walk each.
  void DropSockets(const std::set<uint32_t>& tgids, absl::Status* status);
  static absl::StatusOr<std::unique_ptr<HostProbes>> LoadAnyFlavour(const Options& options);
  absl::Status ReadErrors(ProbeErrors* errors);
  absl::Status TestRun(int prog_fd, const void* ctx, size_t size, absl::string_view what);

  host_probes* skel_;
  std::vector<Link> links_;          // the kvm groups, for the probes' life
  std::vector<Link> syscall_links_;  // the kick syscall group, while attached
  std::vector<bpf_program*> kvm_progs_;   // the flavour chosen for each kvm tracepoint
  std::unique_ptr<NotifyMap> notify_map_;
  std::unique_ptr<CounterSlotOps> slots_;
  std::unique_ptr<NotifyTargetTable> notify_;
  std::unique_ptr<MapReader> reader_;  // remembers whether the kernel batches
  std::string btf_refused_;  // auto mode fell back to classic: the tp_btf load's error
  PinPaths pins_;             // dir empty: nothing pinned
  bool maps_reused_ = false;  // pinned maps of a previous vkickd are ours now
  std::string pin_state_;
  AdoptedVms adopted_;
};

}  // namespace vkick
