#include "controller/daemon/daemon.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace vkick {

QmpErrorReason ClassifyQmpError(const absl::Status& status, bool connected) {
  switch (status.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      return QmpErrorReason::kTimeout;
    case absl::StatusCode::kUnavailable:
      // Connecting: nobody listens. Connected: the peer closed (VM quit).
      return connected ? QmpErrorReason::kGone : QmpErrorReason::kConnect;
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kPermissionDenied:
      return connected ? QmpErrorReason::kProtocol : QmpErrorReason::kConnect;
    default:
      // kDataLoss, kInvalidArgument, kInternal...: the peer spoke garbage.
      return QmpErrorReason::kProtocol;
  }
}

bool NeedsKickSyscalls(const VmInfo& info) {
  if (info.kvm.value_or(false)) return false;  // unknown: counted rather than missed
  return std::any_of(info.devices.begin(), info.devices.end(),
                     [](const VirtioDeviceInfo& d) { return d.vhost_user; });
}

const std::vector<double>& DiscoveryDurationBuckets() {
  static const auto* const kBuckets = new std::vector<double>{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
  return *kBuckets;
}

namespace {

bool SameTargets(const std::vector<NotifyTarget>& a, const std::vector<NotifyTarget>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                    [](const NotifyTarget& x, const NotifyTarget& y) {
                      return x.space == y.space && x.addr == y.addr &&
                             x.device_id == y.device_id && x.queue == y.queue &&
                             x.value_is_queue == y.value_is_queue;
                    });
}

size_t CountQueues(const VmInfo& info) {
  size_t n = 0;
  for (const auto& d : info.devices) n += d.num_queues;
  return n;
}

// The counters of one VM: what a departed VM keeps for its retention.
CounterSnapshot CountersOf(const CounterSnapshot& all, uint32_t vm_id) {
  CounterSnapshot out;
  auto mine = [vm_id](const auto& c) { return c.vm_id == vm_id; };
  std::copy_if(all.exits.begin(), all.exits.end(), std::back_inserter(out.exits), mine);
  std::copy_if(all.notifications.begin(), all.notifications.end(),
               std::back_inserter(out.notifications), mine);
  std::copy_if(all.unmatched_writes.begin(), all.unmatched_writes.end(),
               std::back_inserter(out.unmatched_writes), mine);
  std::copy_if(all.interrupts.begin(), all.interrupts.end(), std::back_inserter(out.interrupts),
               mine);
  return out;
}

void AppendCounters(CounterSnapshot& into, const CounterSnapshot& from) {
  into.exits.insert(into.exits.end(), from.exits.begin(), from.exits.end());
  into.notifications.insert(into.notifications.end(), from.notifications.begin(),
                            from.notifications.end());
  into.unmatched_writes.insert(into.unmatched_writes.end(), from.unmatched_writes.begin(),
                               from.unmatched_writes.end());
  into.interrupts.insert(into.interrupts.end(), from.interrupts.begin(), from.interrupts.end());
}

// Whether a device's notify addresses are still unknown (its BARs are not
// assigned yet: firmware or the guest will assign them soon).
bool AwaitingBars(const VmInfo& info) {
  return std::any_of(info.devices.begin(), info.devices.end(), [](const VirtioDeviceInfo& d) {
    return d.num_queues > 0 && d.notify_targets.empty();
  });
}

// A socket that appeared in --qmp-dir is retried this often, uncounted,
// for this long while QEMU does not accept on it yet.
constexpr absl::Duration kArrivalRetry = absl::Milliseconds(20);
constexpr absl::Duration kArrivalGrace = absl::Seconds(2);

// Events drained per run: a VM flooding events is refreshed, not served
// forever (the rest stays readable for its next run).
constexpr int kMaxEventReadsPerRun = 8;

}  // namespace

// One QMP path: connect, refresh, keep the probe maps in step, reconnect.
// Runs on the scheduler's workers, one run at a time; shared state goes
// through the Daemon's locked methods.
class Daemon::Attachment : public ScheduledTask {
 public:
  // `arrived`: the socket just appeared (--qmp-dir), so QEMU may not be
  // listening on it yet.
  Attachment(Daemon& daemon, size_t index, std::string path, bool arrived)
      : d_(daemon), index_(index), path_(std::move(path)),
        backoff_(daemon.options_.min_backoff),
        quiet_until_(arrived ? absl::Now() + kArrivalGrace : absl::InfinitePast()) {}

  const std::string& path() const { return path_; }
  size_t index() const { return index_; }

  Next Run(bool readable) override {
    if (disc_ == nullptr) {
      auto disc = d_.factory_(path_);
      if (!disc.ok()) {
        // QEMU creates its socket a moment before it listens: a refusal
        // right after the socket appeared is no error yet.
        if (absl::Now() < quiet_until_ &&
            ClassifyQmpError(disc.status(), false) == QmpErrorReason::kConnect) {
          return {absl::Now() + kArrivalRetry, -1};
        }
        return Retry(disc.status(), /*connected=*/false);
      }
      disc_ = *std::move(disc);
      refresh_due_ = absl::InfinitePast();
    }
    // Without an event fd the run is also the poll (event_slice).
    if (readable || disc_->event_fd() < 0) {
      if (absl::Status s = DrainEvents(); !s.ok()) return Retry(s, /*connected=*/true);
    }
    if (absl::Now() >= refresh_due_) {
      if (absl::Status s = RefreshNow(); !s.ok()) return Retry(s, /*connected=*/true);
      // Events that came while the refresh ran wait in the client's buffer,
      // where the socket's readiness does not show them.
      if (absl::Status s = DrainEvents(); !s.ok()) return Retry(s, /*connected=*/true);
    }
    Next next{refresh_due_, disc_->event_fd()};
    if (next.fd < 0) next.due = std::min(next.due, absl::Now() + d_.options_.event_slice);
    return next;
  }

  // Closes the connection and drops the VM. Only while no run is in
  // progress (Stop, RemovePath).
  void Close(absl::string_view why) {
    disc_.reset();
    Detach(why);
  }

 private:
  // Drops the VM: series first (the exporter stops showing it), then the
  // probe counters.
  void Detach(absl::string_view why) {
    if (!cur_) return;
    d_.RetireVm(index_, cur_->tracked);
    d_.SetConnected(index_, false);
    if (cur_->tracked && !d_.KeepTrackedOnStop()) {
      uint32_t pid = cur_->pid, vm_id = cur_->vm_id;
      absl::Status s =
          d_.ProbeCall([&](ProbeBackend& p) { return p.UntrackProcess(pid, vm_id); });
      ProbeFailure("UntrackProcess", s);
      if (s.ok()) d_.FreedRoom();  // its tracked entry and notify targets
    }
    if (cur_->needs_syscalls) d_.NeedKickSyscalls(index_, false, "");
    d_.Log(absl::StrFormat("qmp %s: detached VM '%s' pid %d vm_id %d: %s", path_, cur_->name,
                           cur_->pid, cur_->vm_id, why));
    cur_.reset();
  }

  // A VM a full probe map refused is tried again only once room appeared
  // (the daemon's room epoch moved), not at every refresh: a fleet larger
  // than the maps causes no retry storm under the lock every VM shares.
  struct RoomWait {
    bool waiting = false;
    uint64_t epoch = 0;  // the room epoch read before the refused call
    bool Ready(uint64_t now) const { return !waiting || now != epoch; }
  };

  // What the probes currently know about the attached VM.
  struct Current {
    uint32_t vm_id = 0;
    uint32_t pid = 0;
    std::string name;
    bool tracked = false;
    bool targets_set = false;
    std::vector<NotifyTarget> targets;
    std::set<std::pair<int32_t, uint16_t>> vhost_sockets;  // (socket_fd, device_id)
    RoomWait track_wait, notify_wait;
    bool needs_syscalls = false;
  };

  enum class State { kInit, kAttached, kFailing };

  // A discovery event asks for a refresh now, but at most one per
  // min_refresh_gap: a VM resetting in a loop costs a bounded rate.
  absl::Status DrainEvents() {
    for (int i = 0; i < kMaxEventReadsPerRun; ++i) {
      absl::StatusOr<bool> ev = disc_->WaitForEvent(absl::ZeroDuration());
      if (!ev.ok()) return ev.status();
      if (!*ev) return absl::OkStatus();
      refresh_due_ = std::min(refresh_due_, last_refresh_ + MinRefreshGap());
    }
    return absl::OkStatus();
  }

  absl::Duration MinRefreshGap() const {
    return std::min(d_.options_.refresh_interval, absl::Milliseconds(100));
  }

  absl::Status RefreshNow() {
    const absl::Time t0 = absl::Now();
    absl::StatusOr<VmInfo> info = disc_->Refresh();
    const absl::Time t1 = absl::Now();
    d_.ObserveDiscovery(t1 - t0);
    if (!info.ok()) return info.status();
    // A booting guest assigns its BARs within seconds: look again soon,
    // backing off to the periodic interval for a guest that never does.
    const absl::Duration every = d_.options_.refresh_interval;
    // So does a VM migrating in or out (it leaves that state by itself,
    // and the MIGRATION event is off unless the `events` capability is on).
    bars_backoff_ = AwaitingBars(*info) || InTransition(info->run_state)
                        ? std::min(every, bars_backoff_ == absl::ZeroDuration()
                                              ? absl::Seconds(1) : bars_backoff_ * 2)
                        : absl::ZeroDuration();
    last_refresh_ = t1;
    refresh_due_ = t1 + (bars_backoff_ > absl::ZeroDuration() ? bars_backoff_ : every);
    Apply(*std::move(info));
    backoff_ = d_.options_.min_backoff;
    return absl::OkStatus();
  }

  // Counts the failure, drops the connection and comes back after the
  // backoff (doubling to max_backoff, reset once a refresh succeeds).
  Next Retry(const absl::Status& status, bool connected) {
    Fail(status, connected);
    disc_.reset();
    Next next{absl::Now() + backoff_, -1};
    backoff_ = std::min(backoff_ * 2, d_.options_.max_backoff);
    return next;
  }

  void Fail(const absl::Status& status, bool connected) {
    QmpErrorReason reason = ClassifyQmpError(status, connected);
    d_.CountQmpError(index_, reason);
    d_.SetConnected(index_, false);
    if (state_ != State::kFailing || reason_ != reason) {
      state_ = State::kFailing;
      reason_ = reason;
      d_.Log(absl::StrCat("qmp ", path_, ": ", QmpErrorReasonName(reason), " error: ",
                          status.ToString(), " (retrying with backoff up to ",
                          absl::FormatDuration(d_.options_.max_backoff), ")"));
    }
    // A socket that is gone or no longer accepts means the VM is gone. A
    // hung or garbled QMP keeps the VM attached (its process still runs and
    // the probes still count it) while we reconnect.
    if (reason == QmpErrorReason::kGone || reason == QmpErrorReason::kConnect) {
      Detach(absl::StrCat("qmp ", QmpErrorReasonName(reason)));
    }
  }

  void Apply(VmInfo info) {
    info.qmp_path = path_;
    if (cur_ && cur_->pid != info.pid) {
      Detach(absl::StrFormat("pid changed %d -> %d (VM restarted)", cur_->pid, info.pid));
    }
    bool fresh = !cur_.has_value();
    if (fresh) {
      cur_.emplace();
      cur_->vm_id = d_.ClaimVmId(info.pid);
      cur_->pid = info.pid;
    }
    cur_->name = info.name;

    EnsureTracked();
    std::vector<NotifyTarget> targets;
    for (const auto& dev : info.devices) {
      targets.insert(targets.end(), dev.notify_targets.begin(), dev.notify_targets.end());
    }
    EnsureTargets(std::move(targets), fresh, info.name);
    EnsureVhostSockets(info);
    // Before the VM is published: a test (or operator) that waits for it
    // may start its guest, whose first SET_VRING_KICK must be seen.
    SetNeedsSyscalls(cur_->tracked && NeedsKickSyscalls(info), info.name);

    if (fresh || state_ != State::kAttached) {
      d_.Log(absl::StrFormat(
          "qmp %s: attached VM '%s' pid %d as vm_id %d (%d virtio devices, %d queues, %d "
          "notify targets)",
          path_, info.name, info.pid, cur_->vm_id, info.devices.size(), CountQueues(info),
          cur_->targets.size()) +
          (cur_->track_wait.waiting || cur_->notify_wait.waiting
               ? "; not counted by the probes: a probe map is full (vkick_vm_probed 0)"
               : ""));
    }
    state_ = State::kAttached;
    d_.PublishVm(index_, Published(std::move(info)));
    d_.SetConnected(index_, true);
  }

  AttachedVm Published(VmInfo info) const {
    AttachedVm vm{cur_->vm_id, std::move(info)};
    vm.probed = d_.probes_ != nullptr && cur_->tracked && cur_->targets_set;
    if (cur_->track_wait.waiting) vm.map_full = ProbeMap::kTracked;
    if (cur_->notify_wait.waiting) vm.map_full = ProbeMap::kNotify;
    return vm;
  }

  void EnsureTracked() {
    if (cur_->tracked || !cur_->track_wait.Ready(d_.RoomEpoch())) return;
    const uint32_t pid = cur_->pid, vm_id = cur_->vm_id;
    const uint64_t epoch = d_.RoomEpoch();
    absl::Status s = d_.ProbeCall([&](ProbeBackend& p) { return p.TrackProcess(pid, vm_id); });
    cur_->tracked = s.ok();
    ProbeFailure("TrackProcess", s);
    Waited(ProbeMap::kTracked, s, epoch, &cur_->track_wait);
  }

  // Only on change: a refresh every second must not rewrite the map.
  void EnsureTargets(std::vector<NotifyTarget> targets, bool fresh, const std::string& name) {
    if (!cur_->tracked || !cur_->notify_wait.Ready(d_.RoomEpoch())) return;
    if (cur_->targets_set && SameTargets(targets, cur_->targets)) return;
    const uint32_t vm_id = cur_->vm_id;
    const uint64_t epoch = d_.RoomEpoch();
    const size_t had = cur_->targets.size();
    absl::Status s =
        d_.ProbeCall([&](ProbeBackend& p) { return p.SetNotifyTargets(vm_id, targets); });
    ProbeFailure("SetNotifyTargets", s);
    if (s.ok() && !fresh) {
      d_.Log(absl::StrFormat("qmp %s: VM '%s' notify targets changed (%d targets)", path_, name,
                             targets.size()));
    }
    // A refused set leaves none of the VM's targets installed (all or
    // nothing, NotifyTargetTable): what it had is room for the others.
    cur_->targets_set = s.ok();
    cur_->targets = s.ok() ? std::move(targets) : std::vector<NotifyTarget>{};
    if (cur_->targets.size() < had) d_.FreedRoom();
    Waited(ProbeMap::kNotify, s, epoch, &cur_->notify_wait);
  }

  void EnsureVhostSockets(const VmInfo& info) {
    if (!cur_->tracked) return;
    for (const auto& dev : info.devices) {
      if (!dev.vhost_user || dev.socket_fd < 0) continue;
      auto key = std::make_pair(dev.socket_fd, dev.device_id);
      if (cur_->vhost_sockets.count(key)) continue;
      uint32_t pid = cur_->pid;
      absl::Status s = d_.ProbeCall([&](ProbeBackend& p) {
        return p.SetVhostUserSocket(pid, dev.socket_fd, dev.device_id);
      });
      ProbeFailure("SetVhostUserSocket", s);
      if (s.ok()) cur_->vhost_sockets.insert(key);
    }
  }

  // A full map: wait for room (counted and logged once by the daemon). A
  // VM that waited and now fits: the next full map is logged again.
  void Waited(ProbeMap map, const absl::Status& s, uint64_t epoch, RoomWait* wait) {
    if (absl::IsResourceExhausted(s)) {
      const bool first = !wait->waiting;
      *wait = RoomWait{true, epoch};
      if (first) d_.CountMapFull(map, absl::StrCat("qmp ", path_, ": VM '", cur_->name, "'"), s);
      return;
    }
    if (s.ok() && wait->waiting) d_.RoomFound(map);
    *wait = RoomWait{};
  }

  // Called at every refresh while needed (cheap when nothing changes), so
  // an attach that failed is tried again.
  void SetNeedsSyscalls(bool need, const std::string& name) {
    if (!need && !cur_->needs_syscalls) return;
    cur_->needs_syscalls = need;
    d_.NeedKickSyscalls(index_, need,
                        absl::StrCat("VM '", name, "' (qmp ", path_, ") kicks a vhost-user "
                                     "device by write() (not KVM)"));
  }

  // Logged once per change of error; a full map is the daemon's to log.
  void ProbeFailure(absl::string_view what, const absl::Status& s) {
    if (absl::IsResourceExhausted(s)) return;
    std::string msg = s.ok() ? "" : absl::StrCat(what, ": ", s.ToString());
    if (msg != last_probe_error_) {
      if (!s.ok()) d_.Log(absl::StrCat("qmp ", path_, ": probe ", msg));
      last_probe_error_ = std::move(msg);
    }
  }

  Daemon& d_;
  const size_t index_;
  const std::string path_;
  std::unique_ptr<VmDiscovery> disc_;  // null while not connected
  absl::Duration backoff_;
  absl::Time refresh_due_ = absl::InfinitePast();
  absl::Time last_refresh_ = absl::InfinitePast();
  const absl::Time quiet_until_;
  absl::Duration bars_backoff_ = absl::ZeroDuration();
  std::optional<Current> cur_;
  State state_ = State::kInit;
  QmpErrorReason reason_ = QmpErrorReason::kConnect;
  std::string last_probe_error_;
};

// The scheduler id of --qmp-dir's task; attachments use their index.
constexpr uint64_t kDirTaskId = uint64_t{1} << 62;

// --qmp-dir: a task like the attachments, woken by the watcher's fd.
class Daemon::DirTask : public ScheduledTask {
 public:
  explicit DirTask(Daemon& d) : d_(d) {}
  Next Run(bool) override {
    QmpPathSource& dir = *d_.options_.qmp_dir;
    absl::StatusOr<std::vector<QmpPathSource::Change>> changes = dir.Drain();
    if (!changes.ok()) return Failed(dir, changes.status());
    last_error_.clear();
    for (const QmpPathSource::Change& c : *changes) {
      if (c.added) {
        paths_.insert(c.path);
        d_.AddPath(c.path, /*arrived=*/true);
      } else {
        paths_.erase(c.path);
        d_.RemovePath(c.path);
      }
    }
    return {absl::InfiniteFuture(), dir.fd()};
  }

 private:
  // A directory that is gone takes its VMs with it; another error (a read
  // that failed) is retried and leaves them.
  Next Failed(const QmpPathSource& dir, const absl::Status& s) {
    const bool gone = absl::IsNotFound(s);
    if (s.ToString() != last_error_) {
      last_error_ = s.ToString();
      d_.Log(absl::StrCat("--qmp-dir: ", dir.Describe(), ": ", last_error_,
                          gone ? absl::StrCat("; dropping its ", paths_.size(),
                                              " VMs (restart vkickd once it is back)")
                               : " (retrying every second)"));
    }
    if (gone) {
      for (const std::string& p : std::exchange(paths_, {})) d_.RemovePath(p);
      return {absl::InfiniteFuture(), -1};
    }
    return {absl::Now() + absl::Seconds(1), -1};
  }

  Daemon& d_;
  std::string last_error_;
  std::set<std::string> paths_;  // attached because the directory has them
};

Daemon::Daemon(DaemonOptions options, ProbeBackend* probes, DiscoveryFactory factory)
    : options_(std::move(options)),
      probes_(probes),
      factory_(std::move(factory)),
      discovery_duration_(DiscoveryDurationBuckets()),
      latest_(std::make_shared<const DaemonSnapshot>()) {}

Daemon::~Daemon() { Stop(); }

absl::Status Daemon::Start() {
  if (scheduler_ != nullptr) return absl::FailedPreconditionError("Daemon::Start called twice");
  absl::StatusOr<std::unique_ptr<AttachmentScheduler>> sched =
      AttachmentScheduler::Create(options_.discovery_workers);
  if (!sched.ok()) return sched.status();
  scheduler_ = *std::move(sched);
  if (probes_ != nullptr) {
    AdoptedVms a = probes_->adopted_vms();
    next_vm_id_ = std::max<uint32_t>(next_vm_id_, a.next_vm_id);
    absl::MutexLock l(&adopt_mu_);
    adopted_ = std::move(a.vm_of_pid);
    // Every attachment asks its VM at once and then every refresh_interval:
    // two intervals give each one a full retry (a QMP socket busy at our
    // start) before its VM's counts are dropped as nobody's.
    adopt_until_ = absl::Now() + 2 * options_.refresh_interval;
  }
  running_ = true;
  StartVhostUser();
  for (const std::string& p : options_.qmp_paths) AddPath(p, /*arrived=*/false);
  if (options_.qmp_dir != nullptr) {
    dir_task_ = std::make_unique<DirTask>(*this);
    scheduler_->Add(kDirTaskId, dir_task_.get());
  }
  scheduler_->Start();
  return absl::OkStatus();
}

void Daemon::AddPath(const std::string& path, bool arrived) {
  absl::MutexLock l(&attach_mu_);
  if (stopped_ || index_of_.count(path)) return;
  const size_t index = next_index_++;
  index_of_[path] = index;
  auto a = std::make_unique<Attachment>(*this, index, path, arrived);
  {
    absl::MutexLock r(&registry_mu_);
    QmpAttachmentStatus st;
    st.qmp_path = path;
    qmp_status_[index] = std::move(st);
  }
  scheduler_->Add(index, a.get());
  attachments_[index] = std::move(a);
}

void Daemon::RemovePath(const std::string& path) {
  std::unique_ptr<Attachment> a;
  {
    absl::MutexLock l(&attach_mu_);
    auto it = index_of_.find(path);
    if (stopped_ || it == index_of_.end()) return;
    const size_t index = it->second;
    index_of_.erase(it);
    a = std::move(attachments_[index]);
    attachments_.erase(index);
  }
  scheduler_->Remove(a->index());
  a->Close("its QMP socket left --qmp-dir");
  absl::MutexLock r(&registry_mu_);
  qmp_status_.erase(a->index());
}

void Daemon::StartVhostUser() {
  if (options_.vhost_user.empty()) return;
  // Attached before any path is declared: a frontend's first connect() and
  // SET_VRING_KICK come within milliseconds of its start.
  NeedKickSyscalls(kVhostUserNeed, true, "--vhost-user frontends are declared");
  AttachedVm vm;
  vm.vm_id = NextVmId();
  vm.vhost_user_frontends = true;
  vm.probed = probes_ != nullptr;
  vm.info.name = options_.vhost_user_vm;
  for (size_t i = 0; i < options_.vhost_user.size(); ++i) {
    const VhostUserFrontendDecl& d = options_.vhost_user[i];
    VirtioDeviceInfo dev;
    dev.label = d.id;
    dev.type = "vhost-user-frontend";
    dev.device_id = static_cast<uint16_t>(i);
    dev.num_queues = 1;  // grows with the queues the probes learn
    dev.vhost_user = true;
    dev.socket_path = d.socket_path;
    const uint32_t vm_id = vm.vm_id;
    const uint16_t device_id = dev.device_id;
    absl::Status s = ProbeCall(
        [&](ProbeBackend& p) { return p.SetVhostUserPath(d.socket_path, vm_id, device_id); });
    if (!s.ok()) {
      Log(absl::StrCat("--vhost-user=", d.id, ": frontends connecting to ", d.socket_path,
                       " will not be counted: ", s.ToString()));
    } else if (probes_ != nullptr) {
      Log(absl::StrCat("--vhost-user=", d.id, ": counting kicks of frontends connecting to ",
                       d.socket_path));
    }
    // A frontend already connected: its kick fds were announced before we
    // ran and cannot be learned; track it anyway, so it is counted from its
    // next SET_VRING_KICK (a reconnect) and dropped when it exits.
    if (s.ok() && probes_ != nullptr && options_.find_connected) {
      auto peers = options_.find_connected(d.socket_path);
      if (!peers.ok()) {
        Log(absl::StrCat("--vhost-user=", d.id, ": cannot list processes connected to ",
                         d.socket_path, ": ", peers.status().ToString()));
      } else {
        for (const auto& [pid, fd] : *peers) {
          absl::Status t = ProbeCall(
              [&](ProbeBackend& p) { return p.TrackFrontend(pid, fd, vm_id, device_id); });
          Log(absl::StrCat("--vhost-user=", d.id, ": pid ", pid, " was connected before vkickd ",
                           "started", t.ok() ? "" : absl::StrCat(" and cannot be tracked: ",
                                                                 t.ToString()),
                           t.ok() ? "; its kicks are counted from its next (re)connect" : ""));
        }
      }
    }
    vm.info.devices.push_back(std::move(dev));
  }
  absl::MutexLock l(&registry_mu_);
  vhost_vm_ = std::move(vm);
}

uint32_t Daemon::ClaimVmId(uint32_t pid) {
  {
    absl::MutexLock l(&adopt_mu_);
    if (auto it = adopted_.find(pid); it != adopted_.end()) {
      const uint32_t vm_id = it->second;
      adopted_.erase(it);
      return vm_id;
    }
  }
  return NextVmId();  // above every adopted id (Start)
}

void Daemon::DropUnclaimed() {
  std::map<uint32_t, uint32_t> unclaimed;
  {
    absl::MutexLock l(&adopt_mu_);
    if (adopted_.empty() || absl::Now() < adopt_until_) return;
    unclaimed.swap(adopted_);
  }
  for (const auto& [pid, vm_id] : unclaimed) {
    absl::Status s = ProbeCall([&](ProbeBackend& p) { return p.UntrackProcess(pid, vm_id); });
    Log(absl::StrFormat("pid %d (vm_id %d, adopted from the pinned maps) was claimed by no VM "
                        "within %s: its counts are dropped%s",
                        pid, vm_id, absl::FormatDuration(2 * options_.refresh_interval),
                        s.ok() ? "" : absl::StrCat(" (", s.ToString(), ")")));
    if (s.ok()) FreedRoom();
  }
}

void Daemon::Stop() {
  std::map<size_t, std::unique_ptr<Attachment>> attachments;
  {
    absl::MutexLock l(&attach_mu_);
    if (stopped_) return;
    stopped_ = true;
    attachments.swap(attachments_);
  }
  running_ = false;
  if (scheduler_ != nullptr) scheduler_->Stop();  // no run in progress after this
  for (auto& [index, a] : attachments) a->Close("vkickd stopping");
}

absl::Status Daemon::ProbeCall(const std::function<absl::Status(ProbeBackend&)>& call) {
  if (probes_ == nullptr) return absl::OkStatus();  // --no-probes
  absl::Status s;
  {
    absl::MutexLock l(&backend_mu_);
    s = call(*probes_);
  }
  if (!s.ok() && !absl::IsResourceExhausted(s)) {  // a full map has its own metric
    absl::MutexLock l(&registry_mu_);
    ++probe_errors_.control;
  }
  return s;
}

void Daemon::CountMapFull(ProbeMap map, absl::string_view who, const absl::Status& status) {
  const int m = static_cast<int>(map);
  {
    absl::MutexLock l(&registry_mu_);
    ++map_full_[m];
    if (map_full_logged_[m]) return;
    map_full_logged_[m] = true;
  }
  Log(absl::StrCat("probe map '", ProbeMapName(map), "' is full: ", who,
                   " is not counted by the probes (", status.message(),
                   "). VMs left out show vkick_vm_probed 0 and are tried again when a VM leaves; "
                   "raise --max-vms / --max-queues-per-vm. Not logged again until one fits."));
}

void Daemon::RoomFound(ProbeMap map) {
  absl::MutexLock l(&registry_mu_);
  map_full_logged_[static_cast<int>(map)] = false;
}

void Daemon::NeedKickSyscalls(size_t who, bool need, absl::string_view why) {
  if (!options_.kick_syscalls || probes_ == nullptr) return;
  absl::MutexLock l(&syscall_mu_);
  if (need) {
    syscall_needs_.insert(who);
  } else {
    syscall_needs_.erase(who);
  }
  const bool want = !syscall_needs_.empty();
  if (want == kick_syscalls_attached_.load()) return;
  absl::Status s = ProbeCall([&](ProbeBackend& p) { return p.SetKickSyscalls(want); });
  if (s.ok()) {
    kick_syscalls_attached_ = want;
    syscall_error_.clear();
    Log(want ? absl::StrCat("kick syscall probes attached (every syscall on the host is traced "
                            "while they are): ", why)
             : std::string("kick syscall probes detached: no VM or frontend needs them"));
  } else if (s.ToString() != syscall_error_) {  // retried at the next need, logged on change
    syscall_error_ = s.ToString();
    Log(absl::StrCat("cannot ", want ? "attach" : "detach", " the kick syscall probes: ",
                     syscall_error_));
  }
}

void Daemon::PublishVm(size_t attachment, const AttachedVm& vm) {
  {
    absl::ReleasableMutexLock l(&registry_mu_);
    if (auto s = superseded_.find(attachment); s != superseded_.end()) {
      if (s->second == vm.info.pid) return;  // its guest runs in another QEMU now
      superseded_.erase(s);
    }
    if (vm.info.run_state == RunState::kInMigrate) {
      // Not a VM of its own: the guest it receives still runs elsewhere (or
      // comes from a file). Its probes count under its own vm_id from now.
      const bool first = held_.count(attachment) == 0;
      held_[attachment] = vm;
      was_held_.insert(attachment);
      vms_.erase(attachment);
      l.Release();
      if (first) {
        Log(absl::StrFormat("VM '%s' pid %d is migrating in (inmigrate): held until it takes "
                            "over", vm.info.name, vm.info.pid));
      }
      return;
    }
    held_.erase(attachment);
    if (vms_.count(attachment) != 0) {
      vms_[attachment] = vm;
      return;
    }
    if (!HasPredecessor(attachment, vm)) {
      was_held_.erase(attachment);  // published: what it came from is settled
      vms_[attachment] = vm;
      return;
    }
  }
  // The predecessor's final counts, read with the lock order's backend_mu_
  // first; the registry is looked at again below.
  std::optional<CounterSnapshot> now;
  if (probes_ != nullptr) {
    absl::MutexLock b(&backend_mu_);
    if (absl::StatusOr<CounterSnapshot> c = probes_->ReadCounters(); c.ok()) now = *std::move(c);
  }
  std::string note;
  {
    absl::MutexLock l(&registry_mu_);
    if (vms_.count(attachment) == 0 && HasPredecessor(attachment, vm)) {
      note = TakeOver(attachment, vm, now);
    }
    was_held_.erase(attachment);  // published: what it came from is settled
    vms_[attachment] = vm;
  }
  if (!note.empty()) Log(note);
}

namespace {

// A VM that left by migration: the destination takes over without having
// been seen inmigrate (it completed between two refreshes).
bool LeftByMigration(const AttachedVm& vm) {
  return vm.info.run_state == RunState::kPostMigrate;
}

}  // namespace

bool Daemon::HasPredecessor(size_t attachment, const AttachedVm& vm) const {
  const bool held = was_held_.count(attachment) != 0;
  for (const auto& [index, other] : vms_) {
    if (index != attachment && SameGuest(other.info, vm.info) && (held || LeftByMigration(other)))
      return true;
  }
  return std::any_of(departed_.begin(), departed_.end(), [&](const DepartedVm& d) {
    return SameGuest(d.vm.info, vm.info) && (held || LeftByMigration(d.vm));
  });
}

std::string Daemon::TakeOver(size_t attachment, const AttachedVm& vm,
                             const std::optional<CounterSnapshot>& now) {
  const bool held = was_held_.count(attachment) != 0;
  auto from_here = [&](const AttachedVm& other) {
    return SameGuest(other.info, vm.info) && (held || LeftByMigration(other));
  };
  AttachedVm from;
  CounterSnapshot base;
  std::string unread;
  auto live = std::find_if(vms_.begin(), vms_.end(), [&](const auto& kv) {
    return kv.first != attachment && from_here(kv.second);
  });
  // The latest departed one: its final counts (carried ones included) are
  // kept by the retention code (RetireVm).
  auto gone = std::find_if(departed_.rbegin(), departed_.rend(),
                           [&](const DepartedVm& d) { return from_here(d.vm); });
  if (live != vms_.end()) {
    from = live->second;
    if (now) {
      base = CountersOf(*now, from.vm_id);
    } else if (probes_ != nullptr) {
      unread = "; probes unreadable at the takeover: its counts are not carried over";
    }
    if (auto c = carried_.find(from.vm_id); c != carried_.end()) {
      AppendCounters(base, c->second);
      carried_.erase(c);
    }
    superseded_[live->first] = from.info.pid;
    vms_.erase(live);
  } else if (gone != departed_.rend()) {
    from = gone->vm;
    base = gone->counters;
    departed_.erase(std::next(gone).base());
  } else {
    return "";
  }
  carried_[vm.vm_id] = CarryCounters(base, from.info, vm.info, vm.vm_id);
  uint64_t n = 0;
  for (const NotificationCount& c : carried_[vm.vm_id].notifications) n += c.count;
  return absl::StrFormat("VM '%s' migrated: pid %d (vm_id %d) takes over from pid %d (vm_id %d), "
                         "continuing from its %d notifications%s",
                         vm.info.name, vm.info.pid, vm.vm_id, from.info.pid, from.vm_id, n, unread);
}

void Daemon::RetireVm(size_t attachment, bool tracked) {
  // Its final counts, read before the probes drop them (UntrackProcess).
  std::optional<CounterSnapshot> last;
  const bool retain = running_ && options_.departed_retention > absl::ZeroDuration();
  if (retain && tracked && probes_ != nullptr) {
    absl::MutexLock b(&backend_mu_);
    if (absl::StatusOr<CounterSnapshot> c = probes_->ReadCounters(); c.ok()) {
      last = *std::move(c);
    }
  }
  absl::MutexLock l(&registry_mu_);
  held_.erase(attachment);
  was_held_.erase(attachment);
  auto it = vms_.find(attachment);
  if (it == vms_.end()) return;
  // What it carried from a migration is part of its final counts.
  std::optional<CounterSnapshot> carried;
  if (auto c = carried_.find(it->second.vm_id); c != carried_.end()) {
    carried = std::move(c->second);
    carried_.erase(c);
  }
  if (retain) {
    DepartedVm d{std::move(it->second), CounterSnapshot{},
                 absl::Now() + options_.departed_retention};
    d.vm.departed = true;
    if (last) d.counters = CountersOf(*last, d.vm.vm_id);
    if (carried) AppendCounters(d.counters, *carried);
    departed_.push_back(std::move(d));
  }
  vms_.erase(it);
}

void Daemon::SetConnected(size_t attachment, bool connected) {
  absl::MutexLock l(&registry_mu_);
  if (auto it = qmp_status_.find(attachment); it != qmp_status_.end()) {
    it->second.connected = connected;
  }
}

void Daemon::CountQmpError(size_t attachment, QmpErrorReason reason) {
  absl::MutexLock l(&registry_mu_);
  if (auto it = qmp_status_.find(attachment); it != qmp_status_.end()) {
    ++it->second.errors[static_cast<int>(reason)];
  }
}

Daemon::Health Daemon::CheckHealth(absl::Duration max_age) const {
  if (!running_) return {false, "daemon not running"};
  std::shared_ptr<const DaemonSnapshot> snap = Latest();
  if (probes_ == nullptr) return {true, "ok"};  // disabled by --no-probes
  if (snap->taken == absl::InfinitePast()) return {false, "probes not read yet"};
  const absl::Duration age = absl::Now() - snap->taken;
  if (age > max_age) {
    return {false, absl::StrCat("probes last read ", absl::FormatDuration(age),
                                " ago (control loop stalled?)")};
  }
  if (!snap->counters) return {false, absl::StrCat("probes unreadable: ", snap->read_error)};
  return {true, "ok"};
}

std::optional<std::map<ProbeQueueId, uint64_t>> Daemon::NotificationTotals(
    absl::Span<const ProbeQueueId> queues) {
  if (probes_ == nullptr) return std::nullopt;
  absl::StatusOr<std::map<ProbeQueueId, uint64_t>> c;
  {
    absl::MutexLock b(&backend_mu_);
    c = probes_->ReadNotificationTotals(queues);
  }
  absl::MutexLock r(&registry_mu_);
  if (!c.ok()) {
    ++probe_errors_.read_counters;
    return std::nullopt;
  }
  // A migrated VM's totals continue from its predecessor's, as in Tick().
  for (const ProbeQueueId& q : queues) {
    auto base = carried_.find(std::get<0>(q));
    if (base == carried_.end()) continue;
    for (const NotificationCount& n : base->second.notifications) {
      if (n.device_id == std::get<1>(q) && n.queue == std::get<2>(q)) (*c)[q] += n.count;
    }
  }
  return *std::move(c);
}

std::shared_ptr<const DaemonSnapshot> Daemon::Latest() const {
  absl::MutexLock l(&latest_mu_);
  return latest_;
}

std::shared_ptr<const DaemonSnapshot> Daemon::Tick() {
  DropUnclaimed();
  auto snap = std::make_shared<DaemonSnapshot>();
  snap->probes_enabled = probes_ != nullptr;
  absl::MutexLock b(&backend_mu_);
  bool read_failed = false;
  if (probes_ != nullptr) {
    // Exited frontends' bindings go before the read, so `bound_queues` below
    // names live frontends only. A failure is counted as a control error.
    const bool swept = options_.vhost_user.empty() || probes_->SweepExitedFrontends().ok();
    absl::StatusOr<CounterSnapshot> c = probes_->ReadCounters();
    read_failed = !c.ok();
    if (c.ok()) {
      snap->counters = *std::move(c);
    } else {
      snap->read_error = c.status().ToString();
    }
    if (!swept) {
      absl::MutexLock r(&registry_mu_);
      ++probe_errors_.control;
    }
  }
  {
    absl::MutexLock r(&registry_mu_);
    if (read_failed) ++probe_errors_.read_counters;
    for (const auto& [index, vm] : vms_) snap->vms.push_back(vm);
    if (snap->counters) {
      for (const auto& [vm_id, base] : carried_) AppendCounters(*snap->counters, base);
    }
    if (vhost_vm_) snap->vms.push_back(VhostUserVm(snap->counters));
    std::sort(snap->vms.begin(), snap->vms.end(),
              [](const AttachedVm& a, const AttachedVm& b) { return a.vm_id < b.vm_id; });
    AddDeparted(*snap);  // after the live ones: a live VM keeps its name
    for (const auto& [index, st] : qmp_status_) snap->qmp.push_back(st);
    snap->probe_errors = probe_errors_;
    std::copy(std::begin(map_full_), std::end(map_full_), std::begin(snap->map_full));
  }
  snap->kick_syscalls_attached = kick_syscalls_attached_.load();
  snap->discovery_duration = discovery_duration_.Collect();
  snap->taken = absl::Now();
  absl::MutexLock l(&latest_mu_);
  latest_ = snap;
  return snap;
}

void Daemon::AddDeparted(DaemonSnapshot& snap) {
  const absl::Time now = absl::Now();
  std::erase_if(departed_, [&](const DepartedVm& d) { return d.until <= now; });
  for (const DepartedVm& d : departed_) {
    snap.vms.push_back(d.vm);
    if (snap.counters) AppendCounters(*snap.counters, d.counters);
  }
}

AttachedVm Daemon::VhostUserVm(const std::optional<CounterSnapshot>& counters) const {
  AttachedVm vm = *vhost_vm_;
  if (!counters) return vm;
  // Queues the probes learned (bounded by the protocol's queue limit;
  // beyond it the exporter's "unknown" queue bucket takes the counts).
  auto grow = [&](uint16_t device_id, uint16_t queue) {
    if (device_id >= vm.info.devices.size() || queue >= kMaxVhostUserQueues) return;
    uint16_t& n = vm.info.devices[device_id].num_queues;
    n = std::max<uint16_t>(n, queue + 1);
  };
  for (const NotificationCount& n : counters->notifications) {
    if (n.vm_id == vm.vm_id) grow(n.device_id, n.queue);
  }
  std::set<uint32_t> live;
  for (const FrontendInfo& f : counters->frontends) {
    if (f.vm_id == vm.vm_id) live.insert(f.tgid);
  }
  for (const KickFdBinding& k : counters->kick_fds) {
    if (!live.count(k.tgid) || k.device_id >= vm.info.devices.size()) continue;
    grow(k.device_id, k.queue);
    vm.bound_queues.emplace(k.device_id, k.queue);
  }
  return vm;
}

}  // namespace vkick
