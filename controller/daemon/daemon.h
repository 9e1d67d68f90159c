// The core of vkickd: one attachment per QMP socket, each keeping the probe
// maps in step with what discovery finds; and the one reader of the probes,
// whose snapshot (Tick) everything else renders.
//
// No flags, no globals: vkickd's main() builds the options, the probe backend
// (or none, with --no-probes) and the discovery factory; tests inject fakes.
//
// Threads and locks:
//   * the attachments run on an AttachmentScheduler: one thread waits for
//     every VM's QMP socket and refresh timer, a few workers do the blocking
//     QMP exchanges (each bounded by the QMP deadline);
//   * `backend_mu_` serialises every call into the ProbeBackend (workers
//     program the maps, Tick() reads them), since HostProbes makes no
//     thread-safety promise;
//   * `registry_mu_` guards the VM registry and the QMP state/error counters;
//   * `syscall_mu_` serialises attaching/detaching the kick syscall programs;
//   * `attach_mu_` guards the set of attachments (--qmp-dir adds and drops).
//   Lock order: attach_mu_, syscall_mu_, backend_mu_, registry_mu_,
//   latest_mu_ (Tick() nests backend_mu_ and registry_mu_, so a snapshot
//   holds counters and registry from the same moment).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "controller/daemon/attachment_scheduler.h"
#include "controller/daemon/log.h"
#include "controller/model/daemon_snapshot.h"
#include "controller/discovery/vm_model.h"
#include "controller/probes/probe_backend.h"
#include "prometheus/client_metric.h"
#include "prometheus/histogram.h"

namespace vkick {

// Maps a discovery/connect error to a reason. `connected` tells whether the
// error came from an established connection (kUnavailable then means "gone")
// or from connecting (kUnavailable/kNotFound mean "connect").
QmpErrorReason ClassifyQmpError(const absl::Status& status, bool connected);

// Whether the probes need the kick syscall programs for this VM: a vhost-user
// device, kicked by QEMU's write() to its eventfd, unless KVM runs the VM
// (then the guest's write is an ioeventfd the kvm programs count).
bool NeedsKickSyscalls(const VmInfo& info);

// A host-process vhost-user driver (--vhost-user=ID=SOCKET_PATH): its
// frontend is tracked from its connect() to `socket_path` (docs/probes.md).
struct VhostUserFrontendDecl {
  std::string id;           // the `device` label
  std::string socket_path;  // canonical absolute path (main() realpath()s it)
};

// Processes connected to a unix socket path right now: (pid, that
// connection's fd in the pid). Used once at start, for frontends connected
// before vkickd ran. Real one: FindConnectedFrontends (wiring.h).
using ConnectedFinder =
    std::function<absl::StatusOr<std::vector<std::pair<uint32_t, int32_t>>>(const std::string&)>;

// Where --qmp-dir's sockets come from: a directory watcher (QmpDirWatcher
// in vkickd; a fake in tests). fd() is readable when Drain() has news.
class QmpPathSource {
 public:
  virtual ~QmpPathSource() = default;
  struct Change {
    bool added = false;  // else removed
    std::string path;
  };
  virtual int fd() const = 0;
  virtual absl::StatusOr<std::vector<Change>> Drain() = 0;
  virtual std::string Describe() const = 0;  // for the log: "directory /run/vkick/qmp"
};

struct DaemonOptions {
  std::vector<std::string> qmp_paths;
  // --qmp-dir: every socket it reports is a VM too, dropped when it goes.
  // Owned by the daemon; may be null.
  std::shared_ptr<QmpPathSource> qmp_dir;
  // The host-process vhost-user drivers, one pseudo-VM named vhost_user_vm
  // whose devices are these ids (device_id = index).
  std::string vhost_user_vm = "vhost-user";
  std::vector<VhostUserFrontendDecl> vhost_user;
  ConnectedFinder find_connected;  // may be null
  // --vhost-user-kicks: attach the probes' kick syscall programs while
  // something needs them (NeedsKickSyscalls, or any --vhost-user), detach
  // them when nothing does (they slow every syscall on the host).
  bool kick_syscalls = false;
  // Full re-read of a VM over QMP, besides the ones QMP events trigger.
  // While a device's BARs are unassigned (a booting guest), refreshes come
  // sooner: from 1 s, doubling up to this.
  absl::Duration refresh_interval = absl::Seconds(10);
  // A VM that went away stays in snapshots (and on /metrics) with its final
  // counts this long, so the kicks since the last scrape are not lost:
  // longer than two scrape intervals.
  absl::Duration departed_retention = absl::Seconds(60);
  // Threads doing QMP exchanges for all VMs (a hung VM holds one for at
  // most the QMP deadline).
  int discovery_workers = 4;
  // Reconnect backoff when a QMP socket is missing or misbehaves: doubles
  // from min to max, reset once attached.
  absl::Duration min_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  // A discovery without an event fd is polled for events this often.
  absl::Duration event_slice = absl::Milliseconds(200);
  LogSink log = LogToStderr;
};

// Creates (connects) the discovery for one QMP socket path.
using DiscoveryFactory =
    std::function<absl::StatusOr<std::unique_ptr<VmDiscovery>>(const std::string& qmp_path)>;

// Bucket bounds of vkick_discovery_duration_seconds: a QMP refresh is a few
// round trips on a local socket (ms), a slow one approaches the timeout (s).
const std::vector<double>& DiscoveryDurationBuckets();

class Daemon {
 public:
  // `probes` may be null (--no-probes); it must outlive the daemon.
  Daemon(DaemonOptions options, ProbeBackend* probes, DiscoveryFactory factory);
  ~Daemon();  // Stop()s
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Starts discovery: every --qmp path, then --qmp-dir's. Call once.
  absl::Status Start();
  // Stops discovery, untracks every VM. Idempotent.
  void Stop();

  struct Health {
    bool ok = false;
    std::string reason;  // "ok", or what is wrong
  };
  // From the latest snapshot: healthy when running, the probes attached (or
  // disabled by flag) and read without error by a Tick() at most `max_age`
  // ago. Reads nothing itself.
  Health CheckHealth(absl::Duration max_age) const;

  // The one reader: sweeps exited frontends, reads the probe counters once,
  // copies the registry, publishes the result as Latest() and returns it.
  // The control loop calls it every tick; nothing else reads the maps whole.
  std::shared_ptr<const DaemonSnapshot> Tick();
  // The last Tick()'s snapshot (an empty one before the first). Reads nothing,
  // changes nothing: what /metrics and the admin socket render.
  std::shared_ptr<const DaemonSnapshot> Latest() const;

  // The notification totals of `queues` only, now, for stamping an agent's
  // sample when it arrives; nullopt without probes or on a read error
  // (counted like a Tick's). Takes backend_mu_ only.
  std::optional<std::map<ProbeQueueId, uint64_t>> NotificationTotals(
      absl::Span<const ProbeQueueId> queues);

  // QMP attachment runs so far (the scale benchmark's sanity check).
  uint64_t discovery_runs() const { return scheduler_ ? scheduler_->runs() : 0; }

 private:
  class Attachment;

  class DirTask;

  void Log(absl::string_view line) const { options_.log(line); }
  // Adds an attachment for `path` (no-op if one exists) / drops it.
  // `arrived`: its socket just appeared (--qmp-dir).
  void AddPath(const std::string& path, bool arrived) ABSL_LOCKS_EXCLUDED(attach_mu_);
  void RemovePath(const std::string& path) ABSL_LOCKS_EXCLUDED(attach_mu_);
  // Probe-control helpers: run `call` under backend_mu_, count failures.
  absl::Status ProbeCall(const std::function<absl::Status(ProbeBackend&)>& call);
  uint32_t NextVmId() { return next_vm_id_.fetch_add(1); }
  // The vm_id for the VM whose process is `pid`: its adopted one (the probes
  // kept counting it across our restart), else a new one.
  uint32_t ClaimVmId(uint32_t pid) ABSL_LOCKS_EXCLUDED(adopt_mu_);
  // Adopted VMs no attachment claimed within the grace: dropped (their
  // counts freed).
  void DropUnclaimed() ABSL_LOCKS_EXCLUDED(adopt_mu_, backend_mu_);
  // A clean stop with pinned probes leaves the VMs tracked for the next
  // vkickd to adopt: a restart loses no count.
  bool KeepTrackedOnStop() const {
    return !running_ && probes_ != nullptr && probes_->keeps_counts_across_restart();
  }

  // Room in the probe maps: moves whenever a VM gave keys back (untracked,
  // fewer targets). A VM a full map refused waits for it to move.
  uint64_t RoomEpoch() const { return room_epoch_.load(); }
  void FreedRoom() { room_epoch_.fetch_add(1); }
  // A full `map` refused `who`: counted; logged once until a VM fits again.
  void CountMapFull(ProbeMap map, absl::string_view who, const absl::Status& status);
  void RoomFound(ProbeMap map);
  // `who` (an attachment index, or kVhostUserNeed) needs the kick syscall
  // programs or not any more; attaches or detaches them on a change.
  void NeedKickSyscalls(size_t who, bool need, absl::string_view why);
  static constexpr size_t kVhostUserNeed = ~size_t{0};

  void StartVhostUser();
  // Registers the VM's current state. A VM migrating in (inmigrate) is held
  // out of the registry; a VM that arrived by migration takes over its
  // predecessor (TakeOver). See docs/operations.md, "VM lifecycle".
  void PublishVm(size_t attachment, const AttachedVm& vm);
  // Whether `vm` (not yet published) came by migration from a VM in the
  // registry or the departed list: it was held while incoming, or that VM
  // is postmigrate (the destination was first seen after it completed).
  bool HasPredecessor(size_t attachment, const AttachedVm& vm) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu_);
  // The predecessor leaves (a live one is not published again while its
  // QEMU lives; a departed one is dropped) and its final counts, read in
  // `now`, become the base `vm`'s own counts are added to (carried_).
  // Returns the line to log (after the lock), "" when there was none.
  std::string TakeOver(size_t attachment, const AttachedVm& vm,
                       const std::optional<CounterSnapshot>& now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu_);
  // Takes the VM out of the registry; it stays in snapshots, with the
  // counts it had (read here when `tracked`), for departed_retention.
  void RetireVm(size_t attachment, bool tracked);
  void AddDeparted(DaemonSnapshot& snap) ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu_);
  void SetConnected(size_t attachment, bool connected);
  void CountQmpError(size_t attachment, QmpErrorReason reason);
  // The --vhost-user pseudo-VM with the queues and bindings the probes know.
  AttachedVm VhostUserVm(const std::optional<CounterSnapshot>& counters) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu_);
  void ObserveDiscovery(absl::Duration d) {
    discovery_duration_.Observe(absl::ToDoubleSeconds(d));
  }

  const DaemonOptions options_;
  ProbeBackend* const probes_;
  const DiscoveryFactory factory_;
  std::atomic<uint32_t> next_vm_id_{1};
  // pid -> vm_id the probes adopted (ProbeBackend::adopted_vms), until an
  // attachment claims it or adopt_until_ passes.
  absl::Mutex adopt_mu_ ABSL_ACQUIRED_BEFORE(backend_mu_);
  std::map<uint32_t, uint32_t> adopted_ ABSL_GUARDED_BY(adopt_mu_);
  absl::Time adopt_until_ ABSL_GUARDED_BY(adopt_mu_) = absl::InfinitePast();
  // prometheus::Histogram is internally synchronised.
  prometheus::Histogram discovery_duration_;

  std::atomic<uint64_t> room_epoch_{0};

  absl::Mutex attach_mu_ ABSL_ACQUIRED_BEFORE(syscall_mu_);
  // By attachment index: --qmp paths first, then --qmp-dir arrivals (an
  // index is never reused, so a late report of a dropped one is harmless).
  std::map<size_t, std::unique_ptr<Attachment>> attachments_ ABSL_GUARDED_BY(attach_mu_);
  std::map<std::string, size_t> index_of_ ABSL_GUARDED_BY(attach_mu_);
  size_t next_index_ ABSL_GUARDED_BY(attach_mu_) = 0;
  bool stopped_ ABSL_GUARDED_BY(attach_mu_) = false;
  std::unique_ptr<AttachmentScheduler> scheduler_;  // set by Start()
  std::unique_ptr<DirTask> dir_task_;

  absl::Mutex syscall_mu_ ABSL_ACQUIRED_BEFORE(backend_mu_);
  std::set<size_t> syscall_needs_ ABSL_GUARDED_BY(syscall_mu_);
  std::string syscall_error_ ABSL_GUARDED_BY(syscall_mu_);  // last failure logged
  std::atomic<bool> kick_syscalls_attached_{false};

  absl::Mutex backend_mu_ ABSL_ACQUIRED_BEFORE(registry_mu_);

  mutable absl::Mutex registry_mu_ ABSL_ACQUIRED_BEFORE(latest_mu_);
  std::map<size_t, AttachedVm> vms_ ABSL_GUARDED_BY(registry_mu_);
  std::optional<AttachedVm> vhost_vm_ ABSL_GUARDED_BY(registry_mu_);
  struct DepartedVm {
    AttachedVm vm;
    CounterSnapshot counters;  // its final counts
    absl::Time until;
  };
  std::vector<DepartedVm> departed_ ABSL_GUARDED_BY(registry_mu_);
  // Migration (PublishVm): incoming VMs held out of the registry, by
  // attachment; attachments that were held (their VM came by migration);
  // attachments whose VM a destination took over -> that VM's pid (not
  // published again while it lives); the counts a migrated VM's own are
  // added to, by its vm_id (a live VM's only: moved to departed_ with it).
  std::map<size_t, AttachedVm> held_ ABSL_GUARDED_BY(registry_mu_);
  std::set<size_t> was_held_ ABSL_GUARDED_BY(registry_mu_);
  std::map<size_t, uint32_t> superseded_ ABSL_GUARDED_BY(registry_mu_);
  std::map<uint32_t, CounterSnapshot> carried_ ABSL_GUARDED_BY(registry_mu_);
  std::map<size_t, QmpAttachmentStatus> qmp_status_ ABSL_GUARDED_BY(registry_mu_);
  DaemonProbeErrors probe_errors_ ABSL_GUARDED_BY(registry_mu_);
  uint64_t map_full_[kNumProbeMaps] ABSL_GUARDED_BY(registry_mu_) = {};
  bool map_full_logged_[kNumProbeMaps] ABSL_GUARDED_BY(registry_mu_) = {};

  mutable absl::Mutex latest_mu_;
  std::shared_ptr<const DaemonSnapshot> latest_ ABSL_GUARDED_BY(latest_mu_);
  std::atomic<bool> running_{false};
};

}  // namespace vkick
