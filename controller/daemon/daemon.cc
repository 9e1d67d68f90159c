#include "controller/daemon/daemon.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace vkick {

const char* QmpErrorReasonName(QmpErrorReason reason) {
  switch (reason) {
    case QmpErrorReason::kConnect:
      return "connect";
    case QmpErrorReason::kTimeout:
      return "timeout";
    case QmpErrorReason::kProtocol:
      return "protocol";
    case QmpErrorReason::kGone:
      return "gone";
  }
  return "protocol";
}

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

const char* ProbeMapName(ProbeMap map) {
  return map == ProbeMap::kTracked ? "tracked" : "notify";
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

}  // namespace

// One --qmp path: connect, refresh, keep the probe maps in step, reconnect.
// All members are touched by the attachment's own thread only; shared state
// goes through the Daemon's locked methods.
class Daemon::Attachment {
 public:
  Attachment(Daemon& daemon, size_t index, std::string path)
      : d_(daemon), index_(index), path_(std::move(path)) {}

  void Start() { thread_ = std::thread([this] { Run(); }); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
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

  void Run() {
    absl::Duration backoff = d_.options_.min_backoff;
    while (!d_.Stopping()) {
      auto disc = d_.factory_(path_);
      if (!disc.ok()) {
        Fail(disc.status(), /*connected=*/false);
      } else {
        Serve(**disc, backoff);
      }
      if (d_.WaitForStop(backoff)) break;
      backoff = std::min(backoff * 2, d_.options_.max_backoff);
    }
    Detach("vkickd stopping");
  }

  // Refresh loop on one connection; returns when it failed or on Stop().
  void Serve(VmDiscovery& disc, absl::Duration& backoff) {
    while (!d_.Stopping()) {
      absl::Time t0 = absl::Now();
      absl::StatusOr<VmInfo> info = disc.Refresh();
      d_.ObserveDiscovery(absl::Now() - t0);
      if (!info.ok()) {
        Fail(info.status(), /*connected=*/true);
        return;
      }
      Apply(*std::move(info));
      backoff = d_.options_.min_backoff;

      // Until the next periodic refresh, or earlier on a QMP event.
      absl::Time next = absl::Now() + d_.options_.refresh_interval;
      while (!d_.Stopping()) {
        absl::Duration left = next - absl::Now();
        if (left <= absl::ZeroDuration()) break;
        absl::StatusOr<bool> ev = disc.WaitForEvent(std::min(left, d_.options_.event_slice));
        if (!ev.ok()) {
          Fail(ev.status(), /*connected=*/true);
          return;
        }
        if (*ev) break;
      }
    }
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
      cur_->vm_id = d_.NextVmId();
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

  // Drops the VM: series first (the exporter stops showing it), then the
  // probe counters.
  void Detach(absl::string_view why) {
    if (!cur_) return;
    d_.RemoveVm(index_);
    d_.SetConnected(index_, false);
    if (cur_->tracked) {
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

  Daemon& d_;
  const size_t index_;
  const std::string path_;
  std::thread thread_;
  std::optional<Current> cur_;
  State state_ = State::kInit;
  QmpErrorReason reason_ = QmpErrorReason::kConnect;
  std::string last_probe_error_;
};

Daemon::Daemon(DaemonOptions options, ProbeBackend* probes, DiscoveryFactory factory)
    : options_(std::move(options)),
      probes_(probes),
      factory_(std::move(factory)),
      discovery_duration_(DiscoveryDurationBuckets()) {
  vms_.resize(options_.qmp_paths.size());
  for (const auto& p : options_.qmp_paths) {
    QmpAttachmentStatus st;
    st.qmp_path = p;
    qmp_status_.push_back(std::move(st));
  }
}

Daemon::~Daemon() { Stop(); }

void Daemon::Start() {
  {
    absl::MutexLock l(&stop_mu_);
    if (started_) return;
    started_ = true;
  }
  StartVhostUser();
  for (size_t i = 0; i < options_.qmp_paths.size(); ++i) {
    attachments_.push_back(std::make_unique<Attachment>(*this, i, options_.qmp_paths[i]));
  }
  for (auto& a : attachments_) a->Start();
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

void Daemon::Stop() {
  {
    absl::MutexLock l(&stop_mu_);
    stopping_ = true;
  }
  for (auto& a : attachments_) a->Join();
  attachments_.clear();
}

bool Daemon::Stopping() {
  absl::MutexLock l(&stop_mu_);
  return stopping_;
}

bool Daemon::WaitForStop(absl::Duration d) {
  absl::MutexLock l(&stop_mu_);
  return stop_mu_.AwaitWithTimeout(absl::Condition(&stopping_), d);
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
  absl::MutexLock l(&registry_mu_);
  vms_[attachment] = vm;
}

void Daemon::RemoveVm(size_t attachment) {
  absl::MutexLock l(&registry_mu_);
  vms_[attachment].reset();
}

void Daemon::SetConnected(size_t attachment, bool connected) {
  absl::MutexLock l(&registry_mu_);
  qmp_status_[attachment].connected = connected;
}

void Daemon::CountQmpError(size_t attachment, QmpErrorReason reason) {
  absl::MutexLock l(&registry_mu_);
  ++qmp_status_[attachment].errors[static_cast<int>(reason)];
}

Daemon::Health Daemon::CheckHealth() {
  {
    absl::MutexLock l(&stop_mu_);
    if (!started_) return {false, "daemon not started"};
    if (stopping_) return {false, "daemon stopping"};
  }
  if (probes_ == nullptr) return {true, "ok"};  // disabled by --no-probes
  absl::Status s;
  {
    absl::MutexLock l(&backend_mu_);
    s = probes_->ReadCounters().status();
  }
  if (!s.ok()) return {false, absl::StrCat("probes unreadable: ", s.ToString())};
  return {true, "ok"};
}

std::optional<std::map<ProbeQueueId, uint64_t>> Daemon::NotificationTotals() {
  if (probes_ == nullptr) return std::nullopt;
  absl::StatusOr<CounterSnapshot> c;
  {
    absl::MutexLock b(&backend_mu_);
    c = probes_->ReadCounters();
  }
  if (!c.ok()) {
    absl::MutexLock r(&registry_mu_);
    ++probe_errors_.read_counters;
    return std::nullopt;
  }
  return vkick::NotificationTotals(*c);
}

DaemonSnapshot Daemon::Scrape() {
  DaemonSnapshot snap;
  snap.probes_enabled = probes_ != nullptr;
  absl::MutexLock b(&backend_mu_);
  bool read_failed = false;
  if (probes_ != nullptr) {
    // Exited frontends' bindings go before the read, so `bound_queues` below
    // names live frontends only. A failure is counted as a control error.
    if (!options_.vhost_user.empty() && !probes_->SweepExitedFrontends().ok()) {
      absl::MutexLock r(&registry_mu_);
      ++probe_errors_.control;
    }
    absl::StatusOr<CounterSnapshot> c = probes_->ReadCounters();
    if (c.ok()) {
      snap.counters = *std::move(c);
    } else {
      read_failed = true;
    }
  }
  absl::MutexLock r(&registry_mu_);
  if (read_failed) ++probe_errors_.read_counters;
  for (const auto& vm : vms_) {
    if (vm) snap.vms.push_back(*vm);
  }
  if (vhost_vm_) {
    AttachedVm vm = *vhost_vm_;
    if (snap.counters) {
      // Queues the probes learned (bounded by the protocol's queue limit;
      // beyond it the exporter's "unknown" queue bucket takes the counts).
      auto grow = [&](uint16_t device_id, uint16_t queue) {
        if (device_id >= vm.info.devices.size() || queue >= kMaxVhostUserQueues) return;
        uint16_t& n = vm.info.devices[device_id].num_queues;
        n = std::max<uint16_t>(n, queue + 1);
      };
      for (const NotificationCount& n : snap.counters->notifications) {
        if (n.vm_id == vm.vm_id) grow(n.device_id, n.queue);
      }
      std::set<uint32_t> live;
      for (const FrontendInfo& f : snap.counters->frontends) {
        if (f.vm_id == vm.vm_id) live.insert(f.tgid);
      }
      for (const KickFdBinding& k : snap.counters->kick_fds) {
        if (!live.count(k.tgid) || k.device_id >= vm.info.devices.size()) continue;
        grow(k.device_id, k.queue);
        vm.bound_queues.emplace(k.device_id, k.queue);
      }
    }
    snap.vms.push_back(std::move(vm));
  }
  std::sort(snap.vms.begin(), snap.vms.end(),
            [](const AttachedVm& a, const AttachedVm& b) { return a.vm_id < b.vm_id; });
  snap.qmp = qmp_status_;
  snap.probe_errors = probe_errors_;
  std::copy(std::begin(map_full_), std::end(map_full_), std::begin(snap.map_full));
  snap.kick_syscalls_attached = kick_syscalls_attached_.load();
  snap.discovery_duration = discovery_duration_.Collect();
  return snap;
}

}  // namespace vkick
