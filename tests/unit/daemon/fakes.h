// Fakes for the daemon core and exporter tests: a ProbeBackend that records
// every call, and a scripted "world" of QMP sockets whose VmDiscovery
// connections behave like a live, missing, hung, garbled or vanished QEMU.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "controller/daemon/daemon.h"
#include "controller/discovery/vm_model.h"
#include "controller/probes/probe_backend.h"

namespace vkick::testing {

class FakeProbeBackend : public ProbeBackend {
 public:
  // What a restarted vkickd's pinned probes would report (set before the
  // daemon starts).
  AdoptedVms adopted_vms() const override { return adopted_; }
  bool keeps_counts_across_restart() const override { return keeps_counts_; }
  void set_adopted(AdoptedVms a) { adopted_ = std::move(a); }
  void set_keeps_counts(bool k) { keeps_counts_ = k; }
  absl::Status TrackProcess(uint32_t tgid, uint32_t vm_id) override {
    absl::MutexLock l(&mu_);
    ++track_calls_;
    if (fail_track_) return absl::PermissionDeniedError("fake: track refused");
    if (!tracked_.count(vm_id) && tracked_.size() >= tracked_capacity_) {
      return absl::ResourceExhaustedError("fake: tracked map full");
    }
    tracked_[vm_id] = tgid;
    return absl::OkStatus();
  }
  absl::Status UntrackProcess(uint32_t tgid, uint32_t vm_id) override {
    absl::MutexLock l(&mu_);
    tracked_.erase(vm_id);
    targets_.erase(vm_id);
    untracked_.push_back({tgid, vm_id});
    return absl::OkStatus();
  }
  // All or nothing within `target_capacity_`, like NotifyTargetTable.
  absl::Status SetNotifyTargets(uint32_t vm_id, absl::Span<const NotifyTarget> t) override {
    absl::MutexLock l(&mu_);
    ++set_targets_calls_;
    targets_.erase(vm_id);
    size_t others = 0;
    for (const auto& [vm, ts] : targets_) others += ts.size();
    if (others + t.size() > target_capacity_) {
      return absl::ResourceExhaustedError("fake: notify map full");
    }
    targets_[vm_id] = std::vector<NotifyTarget>(t.begin(), t.end());
    return absl::OkStatus();
  }
  absl::Status SetVhostUserSocket(uint32_t tgid, int32_t fd, uint16_t device_id) override {
    absl::MutexLock l(&mu_);
    vhost_sockets_.push_back({tgid, fd, device_id});
    return absl::OkStatus();
  }
  absl::Status SetVhostUserPath(absl::string_view path, uint32_t vm_id,
                                uint16_t device_id) override {
    absl::MutexLock l(&mu_);
    vhost_paths_.push_back({std::string(path), vm_id, device_id});
    return absl::OkStatus();
  }
  absl::Status TrackFrontend(uint32_t tgid, int32_t fd, uint32_t vm_id,
                             uint16_t device_id) override {
    absl::MutexLock l(&mu_);
    frontends_.push_back({tgid, fd, vm_id, device_id});
    return absl::OkStatus();
  }
  absl::Status SweepExitedFrontends() override {
    absl::MutexLock l(&mu_);
    ++sweeps_;
    return absl::OkStatus();
  }
  absl::Status SetKickSyscalls(bool attached) override {
    absl::MutexLock l(&mu_);
    if (attached != kick_syscalls_) ++kick_syscall_switches_;
    kick_syscalls_ = attached;
    return absl::OkStatus();
  }
  absl::StatusOr<CounterSnapshot> ReadCounters() override {
    absl::MutexLock l(&mu_);
    ++read_calls_;
    if (fail_read_) return absl::InternalError("fake: maps unreadable");
    return counters_;
  }

  struct VhostSocket {
    uint32_t tgid;
    int32_t fd;
    uint16_t device_id;
  };

  struct VhostPath {
    std::string path;
    uint32_t vm_id;
    uint16_t device_id;
  };
  struct Frontend {
    uint32_t tgid;
    int32_t fd;
    uint32_t vm_id;
    uint16_t device_id;
  };

  // Accessors (copies, taken under the lock).
  std::vector<VhostPath> vhost_paths() { absl::MutexLock l(&mu_); return vhost_paths_; }
  std::vector<Frontend> frontends() { absl::MutexLock l(&mu_); return frontends_; }
  int sweeps() { absl::MutexLock l(&mu_); return sweeps_; }
  int read_calls() { absl::MutexLock l(&mu_); return read_calls_; }
  std::map<uint32_t, uint32_t> tracked() { absl::MutexLock l(&mu_); return tracked_; }
  std::map<uint32_t, std::vector<NotifyTarget>> targets() {
    absl::MutexLock l(&mu_);
    return targets_;
  }
  std::vector<std::pair<uint32_t, uint32_t>> untracked() {
    absl::MutexLock l(&mu_);
    return untracked_;
  }
  std::vector<VhostSocket> vhost_sockets() { absl::MutexLock l(&mu_); return vhost_sockets_; }
  int set_targets_calls() { absl::MutexLock l(&mu_); return set_targets_calls_; }
  int track_calls() { absl::MutexLock l(&mu_); return track_calls_; }
  void set_counters(CounterSnapshot c) { absl::MutexLock l(&mu_); counters_ = std::move(c); }
  void set_fail_read(bool f) { absl::MutexLock l(&mu_); fail_read_ = f; }
  void set_fail_track(bool f) { absl::MutexLock l(&mu_); fail_track_ = f; }
  void set_target_capacity(size_t n) { absl::MutexLock l(&mu_); target_capacity_ = n; }
  void set_tracked_capacity(size_t n) { absl::MutexLock l(&mu_); tracked_capacity_ = n; }
  bool kick_syscalls() { absl::MutexLock l(&mu_); return kick_syscalls_; }
  int kick_syscall_switches() { absl::MutexLock l(&mu_); return kick_syscall_switches_; }

 private:
  absl::Mutex mu_;
  std::map<uint32_t, uint32_t> tracked_;  // vm_id -> tgid
  std::map<uint32_t, std::vector<NotifyTarget>> targets_;
  std::vector<std::pair<uint32_t, uint32_t>> untracked_;
  std::vector<VhostSocket> vhost_sockets_;
  std::vector<VhostPath> vhost_paths_;
  std::vector<Frontend> frontends_;
  int sweeps_ = 0;
  int read_calls_ = 0;
  int set_targets_calls_ = 0;
  int track_calls_ = 0;
  CounterSnapshot counters_;
  bool fail_read_ = false;
  bool fail_track_ = false;
  size_t target_capacity_ = ~size_t{0};
  size_t tracked_capacity_ = ~size_t{0};
  bool kick_syscalls_ = false;
  int kick_syscall_switches_ = 0;
  AdoptedVms adopted_;
  bool keeps_counts_ = false;
};

// How a fake QMP socket behaves right now.
enum class QmpMode {
  kMissing,  // no socket: connect fails (kUnavailable)
  kLive,     // answers with `info`
  kHung,     // connects, then every request times out (kDeadlineExceeded)
  kGarbage,  // connects, then replies do not parse (kDataLoss)
};

class FakeWorld {
 public:
  // Sets a socket's behaviour. Changing a live VM's pid (a restart) or
  // making it kMissing closes existing connections (they see kUnavailable).
  void Set(const std::string& path, QmpMode mode, VmInfo info = {}) {
    absl::MutexLock l(&mu_);
    Socket& s = sockets_[path];
    if (mode == QmpMode::kMissing || s.info.pid != info.pid) {
      ++s.generation;
      NotifyLocked(path);  // the connection closes: its socket is readable
    }
    s.mode = mode;
    s.info = std::move(info);
  }
  // Changes what the VM reports without closing connections (BARs moved).
  void Update(const std::string& path, VmInfo info) {
    absl::MutexLock l(&mu_);
    sockets_[path].info = std::move(info);
  }
  // Queues a QMP event (e.g. DEVICE_DELETED) on live connections.
  void PushEvent(const std::string& path) {
    absl::MutexLock l(&mu_);
    ++sockets_[path].events;
    NotifyLocked(path);
  }
  int refreshes(const std::string& path) {
    absl::MutexLock l(&mu_);
    return sockets_[path].refreshes;
  }

  DiscoveryFactory Factory() {
    return [this](const std::string& path) -> absl::StatusOr<std::unique_ptr<VmDiscovery>> {
      absl::MutexLock l(&mu_);
      Socket& s = sockets_[path];
      if (s.mode == QmpMode::kMissing) {
        return absl::UnavailableError("fake: connect: No such file or directory");
      }
      return std::unique_ptr<VmDiscovery>(new Conn(this, path, s.generation, s.events));
    };
  }

 private:
  struct Socket {
    QmpMode mode = QmpMode::kMissing;
    VmInfo info;
    int generation = 0;
    int events = 0;
    int refreshes = 0;
  };

  // Wakes the event fds of `path`'s connections, as a real QMP socket turns
  // readable when an event or EOF arrives.
  void NotifyLocked(const std::string& path) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto [b, e] = event_fds_.equal_range(path);
    for (auto it = b; it != e; ++it) {
      const uint64_t one = 1;
      (void)!write(it->second, &one, sizeof one);
    }
  }

  class Conn : public VmDiscovery {
   public:
    // Called with w->mu_ held (from Factory()).
    Conn(FakeWorld* w, std::string path, int gen, int events)
        : w_(w), path_(std::move(path)), gen_(gen), seen_events_(events),
          efd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
      w_->event_fds_.emplace(path_, efd_);
    }
    ~Conn() override {
      absl::MutexLock l(&w_->mu_);
      auto [b, e] = w_->event_fds_.equal_range(path_);
      for (auto it = b; it != e; ++it) {
        if (it->second == efd_) {
          w_->event_fds_.erase(it);
          break;
        }
      }
      close(efd_);
    }
    int event_fd() const override { return efd_; }
    absl::StatusOr<VmInfo> Refresh() override {
      QmpMode mode;
      {
        absl::MutexLock l(&w_->mu_);
        Socket& s = w_->sockets_[path_];
        if (s.generation != gen_) return absl::UnavailableError("fake: connection closed");
        ++s.refreshes;
        mode = s.mode;
        if (mode == QmpMode::kLive) return s.info;
      }
      if (mode == QmpMode::kHung) {
        absl::SleepFor(absl::Milliseconds(5));  // the QMP client's deadline
        return absl::DeadlineExceededError("fake: qmp did not answer in time");
      }
      return absl::DataLossError("fake: reply is not JSON");
    }
    absl::StatusOr<bool> WaitForEvent(absl::Duration timeout) override {
      uint64_t ignored;
      (void)!read(efd_, &ignored, sizeof ignored);  // what it said is read below
      absl::Time deadline = absl::Now() + timeout;
      for (;;) {
        {
          absl::MutexLock l(&w_->mu_);
          Socket& s = w_->sockets_[path_];
          if (s.generation != gen_) return absl::UnavailableError("fake: connection closed");
          if (s.events != seen_events_) {
            seen_events_ = s.events;
            return true;
          }
        }
        if (absl::Now() >= deadline) return false;
        absl::SleepFor(std::min(absl::Milliseconds(2), deadline - absl::Now()));
      }
    }

   private:
    FakeWorld* const w_;
    const std::string path_;
    const int gen_;
    int seen_events_;
    const int efd_;
  };

  absl::Mutex mu_;
  std::map<std::string, Socket> sockets_ ABSL_GUARDED_BY(mu_);
  std::multimap<std::string, int> event_fds_ ABSL_GUARDED_BY(mu_);
};

// --qmp-dir's watcher: the test adds and removes paths; the fd wakes the
// daemon like inotify's.
class FakeQmpDir : public QmpPathSource {
 public:
  FakeQmpDir() : efd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~FakeQmpDir() override { close(efd_); }
  void Add(const std::string& path) { Push({true, path}); }
  void Remove(const std::string& path) { Push({false, path}); }
  int fd() const override { return efd_; }
  absl::StatusOr<std::vector<Change>> Drain() override {
    uint64_t ignored;
    (void)!read(efd_, &ignored, sizeof ignored);
    absl::MutexLock l(&mu_);
    return std::exchange(pending_, {});
  }
  std::string Describe() const override { return "fake directory"; }

 private:
  void Push(Change c) {
    absl::MutexLock l(&mu_);
    pending_.push_back(std::move(c));
    const uint64_t one = 1;
    (void)!write(efd_, &one, sizeof one);
  }
  const int efd_;
  absl::Mutex mu_;
  std::vector<Change> pending_ ABSL_GUARDED_BY(mu_);
};

// A VM with a modern virtio-blk (2 queues, MMIO) and a legacy one (PIO).
inline VmInfo TwoDiskVm(std::string name, uint32_t pid, uint64_t bar = 0xfe000000) {
  VmInfo vm;
  vm.name = std::move(name);
  vm.pid = pid;
  vm.vcpu_tids = {pid + 1, pid + 2};
  VirtioDeviceInfo modern;
  modern.label = "disk0";
  modern.type = "virtio-blk-pci";
  modern.device_id = 1;
  modern.num_queues = 2;
  modern.modern = true;
  for (uint16_t q = 0; q < 2; ++q) {
    modern.notify_targets.push_back(NotifyTarget::Mmio(bar + 0x3000 + 4 * q, 1, q));
  }
  VirtioDeviceInfo legacy;
  legacy.label = "disk1";
  legacy.type = "virtio-blk-pci";
  legacy.device_id = 2;
  legacy.num_queues = 1;
  legacy.legacy = true;
  legacy.notify_targets.push_back(NotifyTarget::LegacyPio(0xc040 + 16, 2));
  vm.devices = {modern, legacy};
  return vm;
}

// This process's threads now (/proc/self/status).
inline int ThreadCount() {
  int n = 0;
  FILE* f = fopen("/proc/self/status", "r");
  char buf[256];
  while (f != nullptr && fgets(buf, sizeof buf, f) != nullptr) {
    if (sscanf(buf, "Threads: %d", &n) == 1) break;
  }
  if (f != nullptr) fclose(f);
  return n;
}

// Polls `pred` until true or `timeout`; returns its last value.
template <typename Pred>
bool Eventually(Pred pred, absl::Duration timeout = absl::Seconds(5)) {
  absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return pred();
}

// Collects log lines for assertions.
class LogCapture {
 public:
  LogSink Sink() {
    return [this](absl::string_view line) {
      absl::MutexLock l(&mu_);
      lines_.emplace_back(line);
    };
  }
  std::vector<std::string> lines() {
    absl::MutexLock l(&mu_);
    return lines_;
  }
  int Count(absl::string_view a, absl::string_view b = "") {
    int n = 0;
    for (const auto& line : lines()) {
      if (line.find(std::string(a)) != std::string::npos &&
          line.find(std::string(b)) != std::string::npos) {
        ++n;
      }
    }
    return n;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> lines_;
};

}  // namespace vkick::testing
