#include "agent/agent.h"

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace vkick::agent {
namespace {

std::string ReadExe(const std::string& proc_root, int32_t pid) {
  const std::string link = absl::StrCat(proc_root, "/", pid, "/exe");
  char buf[4096];
  ssize_t n = readlink(link.c_str(), buf, sizeof(buf) - 1);
  if (n <= 0) return link;
  std::string path(buf, static_cast<size_t>(n));
  // A replaced binary reads "... (deleted)": the magic link still resolves.
  if (path.size() > 10 && path.compare(path.size() - 10, 10, " (deleted)") == 0) return link;
  return path;
}

}  // namespace

void Log(const std::string& msg) {
  char ts[32];
  std::time_t t = std::time(nullptr);
  std::tm tm;
  gmtime_r(&t, &tm);
  std::strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::fprintf(stderr, "%s vkick-agent: %s\n", ts, msg.c_str());
}

Agent::Agent(AgentOptions opts, CounterSource* probes, Clock clock, std::ostream* out, DiskCounterSource* disks)
    : opts_(std::move(opts)),
      probes_(probes),
      clock_(std::move(clock)),
      out_(out),
      disks_(disks),
      vkick_stats_(opts_.sysfs_root) {}

bool Agent::RescanKernelDisks() {
  std::vector<KernelDisk> known;
  for (const auto& [kdev, k] : kernel_disks_) known.push_back(k.disk);
  // Stock virtio_blk disks need the block observer; the module's only sysfs.
  KernelDiskScan scan = DiscoverKernelDisks(opts_.sysfs_root, known, disks_ != nullptr);
  if (scan.skipped != kernel_disks_skipped_) {
    for (const std::string& why : scan.skipped) Log(absl::StrCat("kernel disk ", why, " (not observed)"));
    kernel_disks_skipped_ = scan.skipped;
  }
  std::map<uint32_t, KernelDisk> found;
  for (KernelDisk& k : scan.disks) found.emplace(KernelDevOf(k), std::move(k));
  bool changed = false;
  for (auto it = kernel_disks_.begin(); it != kernel_disks_.end();) {
    // A disk rebound to the other driver is another disk: observed or
    // steered the other way from now on.
    auto f = found.find(it->first);
    if (f != found.end() && f->second.driver == it->second.disk.driver) {
      ++it;
      continue;
    }
    Log(absl::StrCat("kernel disk ", it->second.disk.name, " went away"));
    it = ForgetKernelDisk(it);
    changed = true;
  }
  for (auto it = watch_failed_.begin(); it != watch_failed_.end();)
    it = found.count(*it) ? std::next(it) : watch_failed_.erase(it);
  for (auto& [kdev, k] : found) {
    auto it = kernel_disks_.find(kdev);
    if (it == kernel_disks_.end()) {
      changed |= AddKernelDisk(kdev, k);
    } else if (!(it->second.disk == k)) {
      // nr_requests or the serial can change under a running disk: the
      // hello must say what the host will see.
      it->second.disk = k;
      changed = true;
    }
  }
  return changed;
}

bool Agent::AddKernelDisk(uint32_t kdev, const KernelDisk& k) {
  KernelDiskState st;
  st.disk = k;
  const std::string what = absl::StrCat("kernel disk ", k.name, " (", k.major, ":", k.minor, ") at pci ", k.pci,
                                        " serial '", k.serial, "' nr_requests ", k.queue_size);
  if (k.driver == proto::DriverKind::kVkickVirtioBlk) {
    // Its counters run since the disk was bound: its first interval starts now.
    st.prev = vkick_stats_.Read(k);
    Log(absl::StrCat(what, ": steering (vkick_virtio_blk, ", k.num_queues, " queue(s), sysfs stats and steer)"));
  } else {
    if (absl::Status s = disks_->Watch(kdev); !s.ok()) {
      if (watch_failed_.insert(kdev).second)
        Log(absl::StrCat("kernel disk ", k.name, ": cannot observe: ", s.message()));
      return false;
    }
    watch_failed_.erase(kdev);
    Log(absl::StrCat(what, ": observing (virtio_blk, block tracepoints, no policy)"));
  }
  kernel_disks_.emplace(kdev, std::move(st));
  return true;
}

std::map<uint32_t, Agent::KernelDiskState>::iterator Agent::ForgetKernelDisk(
    std::map<uint32_t, KernelDiskState>::iterator it) {
  const uint32_t kdev = it->first;
  if (it->second.disk.driver == proto::DriverKind::kVkickVirtioBlk) {
    vkick_stats_.Forget(kdev);
    policy_.Forget({0, kdev});
  } else if (disks_ != nullptr) {
    disks_->Unwatch(kdev);
  }
  return kernel_disks_.erase(it);
}

bool Agent::RescanRegistry() {
  const uint64_t now = clock_();
  bool added = false;
  RegistryScan scan = ScanRegistry(absl::StrCat(opts_.run_dir, "/drivers"), opts_.control_dir, opts_.proc_root);
  if (scan.rejected != registry_rejected_) {
    if (!scan.rejected_files.empty())
      Log(absl::StrCat("registry: ignoring ", absl::StrJoin(scan.rejected_files, ", "), " (control blocks must be in ",
                       opts_.control_dir, ")"));
    registry_rejected_ = scan.rejected;
  }
  std::set<int32_t> live;
  for (DriverEntry& e : scan.drivers) {
    live.insert(e.pid);
    auto it = drivers_.find(e.pid);
    if (it != drivers_.end()) {
      if (!it->second.control) {  // retry a control block that could not be opened
        auto cw = ControlWriter::Open(e.control_block, static_cast<uint64_t>(getpid()));
        if (cw.ok()) {
          it->second.control = *std::move(cw);
          WriteControl(e.pid, now);
          Log(absl::StrCat("driver pid ", e.pid, ": control block ", e.control_block, " opened"));
        }
      }
      continue;
    }
    // A pid whose probes could not be attached (not a vkick-blk binary, gone
    // meanwhile) is retried every 5 s, and logged once.
    auto f = attach_failed_until_.find(e.pid);
    if (f != attach_failed_until_.end() && now < f->second) continue;
    const std::string exe = ReadExe(opts_.proc_root, e.pid);
    if (absl::Status s = probes_->Track({e.pid, exe, e.stats_block}); !s.ok()) {
      if (f == attach_failed_until_.end())
        Log(absl::StrCat("driver pid ", e.pid, ": cannot attach probes: ", s.message(), " (retrying every 5 s)"));
      attach_failed_until_[e.pid] = now + 5'000'000'000ull;
      continue;
    }
    attach_failed_until_.erase(e.pid);
    auto cw = ControlWriter::Open(e.control_block, static_cast<uint64_t>(getpid()));
    if (!cw.ok()) Log(absl::StrCat("driver pid ", e.pid, ": ", cw.status().message(), " (policies cannot apply)"));
    Driver d;
    d.entry = e;
    if (cw.ok()) d.control = *std::move(cw);
    Log(absl::StrCat("driver pid ", e.pid, " registered: ",
                     e.transport == DriverEntry::Transport::kPci ? "pci " + e.pci : "vhost-user " + e.socket,
                     " serial '", e.serial, "' queues ", e.queues, " size ", e.queue_size, " control ",
                     e.control_block, " exe ", exe));
    drivers_.emplace(e.pid, std::move(d));
    WriteControl(e.pid, now);
    added = true;
  }
  for (auto it = attach_failed_until_.begin(); it != attach_failed_until_.end();)
    it = live.count(it->first) ? std::next(it) : attach_failed_until_.erase(it);
  for (auto& [pid, d] : drivers_) {
    if (!d.gone && !live.count(pid)) {
      d.gone = true;
      Log(absl::StrCat("driver pid ", pid, " went away (registry entry removed or process dead)"));
    }
  }
  return added;
}

void Agent::WriteControl(int32_t pid, uint64_t now) {
  auto it = drivers_.find(pid);
  if (it == drivers_.end() || !it->second.control) return;
  it->second.control->Write(policy_.EntriesFor(pid, it->second.entry.queues));
}

std::vector<Agent::Announcement> Agent::Announceable(bool log) const {
  std::vector<Announcement> out;
  size_t queues = 0;
  std::set<std::string> serials;
  std::set<uint32_t> pcis;
  std::set<uint32_t> real_pcis;
  auto pci_of = [](const proto::GuestDevice& dev) {
    return (uint32_t{dev.pci_domain} << 16) | (uint32_t{dev.pci_bus} << 8) | dev.pci_devfn;
  };
  // vhost-user drivers have no PCI function; the protocol rejects two
  // devices at one, so each gets a distinct fake one: domain 0xffff (not a
  // domain Linux gives a real device here), bus 0, devfn 0, 1, ... skipping
  // any a real PCI driver or an observed kernel disk uses. vkickd binds them
  // by serial (docs/protocol.md, "How the host maps queues").
  for (const auto& [pid, d] : drivers_) {
    if (d.gone || d.entry.transport != DriverEntry::Transport::kPci) continue;
    real_pcis.insert(pci_of(ToGuestDevice(d.entry)));
  }
  for (const auto& [kdev, k] : kernel_disks_) real_pcis.insert(pci_of(ToGuestDevice(k.disk)));
  std::set<uint32_t> used;  // announced so far (real and fake)
  uint32_t next_fake = uint32_t{kFakePciDomain} << 16;
  for (const auto& [pid, d] : drivers_) {
    if (d.gone) continue;
    proto::GuestDevice dev = ToGuestDevice(d.entry);
    if (d.entry.transport != DriverEntry::Transport::kPci) {
      while (real_pcis.count(next_fake) || used.count(next_fake)) ++next_fake;
      dev.pci_domain = static_cast<uint16_t>(next_fake >> 16);
      dev.pci_bus = static_cast<uint8_t>(next_fake >> 8);
      dev.pci_devfn = static_cast<uint8_t>(next_fake);
    }
    const uint32_t pci = pci_of(dev);
    const bool is_pci = d.entry.transport == DriverEntry::Transport::kPci;
    if (out.size() >= proto::kMaxDevices || queues + dev.num_queues > proto::kMaxQueues ||
        (!dev.serial.empty() && serials.count(dev.serial)) || (is_pci && pcis.count(pci))) {
      if (log) Log(absl::StrCat("hello: driver pid ", pid, " not announced (over the protocol's bounds or duplicate)"));
      continue;
    }
    if (!dev.serial.empty()) serials.insert(dev.serial);
    if (is_pci) pcis.insert(pci);
    used.insert(pci);
    queues += dev.num_queues;
    out.push_back({AnnouncedDriver{pid, dev.num_queues}, std::move(dev)});
  }
  // Kernel disks after the drivers, vkick_virtio_blk's before stock
  // virtio_blk's: the devices the host can police come first when the
  // bounds leave no room for all.
  for (const bool observe_only : {false, true}) {
    for (const auto& [kdev, k] : kernel_disks_) {
      if (proto::IsObserveOnly(k.disk.driver) != observe_only) continue;
      proto::GuestDevice dev = ToGuestDevice(k.disk);
      const uint32_t pci = pci_of(dev);
      if (out.size() >= proto::kMaxDevices || queues + dev.num_queues > proto::kMaxQueues ||
          (!dev.serial.empty() && serials.count(dev.serial)) || used.count(pci)) {
        if (log)
          Log(absl::StrCat("hello: kernel disk ", k.disk.name,
                           " not announced (over the protocol's bounds or duplicate)"));
        continue;
      }
      if (!dev.serial.empty()) serials.insert(dev.serial);
      used.insert(pci);
      queues += dev.num_queues;
      out.push_back({AnnouncedDriver{0, dev.num_queues, dev.driver, kdev}, std::move(dev)});
    }
  }
  return out;
}

bool Agent::HelloIsStale() const {
  const std::vector<Announcement> want = Announceable(false);
  if (want.size() != announced_.size()) return true;
  for (size_t i = 0; i < want.size(); ++i)
    if (!(want[i].who == announced_[i]) || !(want[i].dev == announced_devices_[i])) return true;
  return false;
}

void Agent::Send(const proto::Message& m) {
  if (!conn_) return;
  proto::EncodeResult r = proto::Encode(m);
  if (r.error != proto::Rejection::kNone) {
    Log(absl::StrCat("internal: refusing to send an invalid message (", std::string(proto::RejectionName(r.error)), ")"));
    return;
  }
  // Never drop the connection from here (we may be inside its Receive()):
  // the loop drops it after the current step.
  if (absl::Status s = conn_->Send(r.bytes); !s.ok() && pending_drop_.empty()) pending_drop_ = std::string(s.message());
}

void Agent::SendHello() {
  proto::Hello h;
  h.agent_id = opts_.agent_id;
  h.kernel = opts_.kernel;
  announced_.clear();
  announced_devices_.clear();
  for (Announcement& a : Announceable(true)) {
    announced_.push_back(a.who);
    announced_devices_.push_back(a.dev);
    h.devices.push_back(std::move(a.dev));
  }
  Send(h);
  if (conn_ && !last_disconnect_quiet_)
    Log(absl::StrCat("hello sent: agent '", h.agent_id, "', ", h.devices.size(), " device(s)"));
}

void Agent::TryConnect(uint64_t now) {
  absl::StatusOr<Connection> c = absl::UnavailableError("no channel");
  std::string where;
  if (!opts_.connect_path.empty()) {
    where = opts_.connect_path;
    c = Connection::ConnectUnix(opts_.connect_path);
  } else {
    auto port = FindVirtioPort(opts_.port_name, opts_.sysfs_ports, opts_.dev_root);
    if (port.ok()) {
      where = *port;
      c = Connection::OpenPort(*port);
    } else {
      c = port.status();
    }
  }
  if (!c.ok()) {
    backoff_ns_ = backoff_ns_ == 0 ? opts_.reconnect_min_ns : std::min(backoff_ns_ * 2, opts_.reconnect_max_ns);
    next_connect_ns_ = now + backoff_ns_;
    const std::string err(c.status().message());
    if (err != last_connect_error_) {
      Log(absl::StrCat("channel: ", err, "; retrying with backoff (up to ", opts_.reconnect_max_ns / 1000000,
                       " ms)"));
      last_connect_error_ = err;
    }
    return;
  }
  conn_.emplace(*std::move(c));
  conn_heard_ = false;
  last_connect_error_.clear();
  ++connects_;
  if (!last_disconnect_quiet_) Log(absl::StrCat("channel: connected to ", where));
  SendHello();
}

void Agent::Disconnect(uint64_t now, const std::string& why, bool fast_retry) {
  pending_drop_.clear();
  if (!conn_) return;
  conn_.reset();
  announced_.clear();
  announced_devices_.clear();
  ++disconnects_;
  // A channel that closes before the host said anything (a virtio-serial
  // port whose host side is not open reads EOF at once) backs off like a
  // failed connect, and is logged once, not every retry.
  const bool quiet = !conn_heard_ && why == last_disconnect_reason_;
  last_disconnect_quiet_ = quiet;
  if (!quiet)
    Log(absl::StrCat("channel: disconnected: ", why, "; keeping the current policies until their leases end"));
  last_disconnect_reason_ = why;
  if (fast_retry) {
    backoff_ns_ = 0;
  } else if (conn_heard_) {
    backoff_ns_ = opts_.reconnect_min_ns;
  } else {
    backoff_ns_ = backoff_ns_ == 0 ? opts_.reconnect_min_ns : std::min(backoff_ns_ * 2, opts_.reconnect_max_ns);
  }
  conn_heard_ = false;
  next_connect_ns_ = now + backoff_ns_;
}

std::string Agent::NameOf(const AnnouncedDriver& who) const {
  auto k = kernel_disks_.find(who.kdev);
  if (!who.disk() || k == kernel_disks_.end()) return absl::StrCat("pid ", who.pid);
  return k->second.disk.name;
}

bool Agent::HasControlBlock(int32_t pid) const {
  auto d = drivers_.find(pid);
  return d != drivers_.end() && d->second.control != nullptr;
}

bool Agent::Steer(uint32_t kdev, const proto::QueuePolicy& q) {
  auto it = kernel_disks_.find(kdev);
  if (it == kernel_disks_.end()) return false;  // went away since the hello
  const absl::Status s = WriteSteer(opts_.sysfs_root, it->second.disk.name, q);
  if (s.ok()) return true;
  ++steer_errors_;
  if (!std::exchange(it->second.steer_error_logged, true))
    Log(absl::StrCat("kernel disk ", it->second.disk.name, ": steer: ", s.message(),
                     " (policies for it are not applied; logged once)"));
  return false;
}

Agent::PolicySplit Agent::SplitPolicy(const proto::Policy& p) {
  PolicySplit out;
  for (const proto::QueuePolicy& q : p.queues) {
    if (q.ref.device_index >= announced_.size() || q.ref.queue_index >= announced_[q.ref.device_index].queues) {
      out.applicable.queues.push_back(q);  // PolicyState counts it unknown
      continue;
    }
    const AnnouncedDriver& who = announced_[q.ref.device_index];
    // A stock virtio_blk disk is observed only: nothing there would read a
    // policy. Ignored, counted.
    if (proto::IsObserveOnly(who.driver)) {
      ++out.observe_only;
      continue;
    }
    // A vkick_virtio_blk queue is steered now (its lease starts at the
    // write); a vkick-blk queue after Apply, through its control block. A
    // queue that cannot be written is not applied (not recorded, not acked).
    const bool writable = who.disk() ? Steer(who.kdev, q) : HasControlBlock(who.pid);
    if (!writable) {
      out.unwritten.push_back(who.disk() ? absl::StrCat(NameOf(who), " q", q.ref.queue_index) : NameOf(who));
      continue;
    }
    out.applicable.queues.push_back(q);
  }
  return out;
}

void Agent::OnPolicy(const proto::Policy& p) {
  ++policies_;
  const uint64_t now = clock_();  // the lease starts when it is applied
  PolicySplit split = SplitPolicy(p);
  const proto::Policy& applicable = split.applicable;
  // Renewals (same policy, same generation, lease still running) are the
  // steady state: logged only when something changes.
  std::vector<bool> news;
  for (const proto::QueuePolicy& q : applicable.queues) {
    bool changed = true;
    if (q.ref.device_index < announced_.size()) {
      const AppliedState a = policy_.StateOf(announced_[q.ref.device_index].target(), q.ref.queue_index, now);
      changed = a.lease != proto::LeaseState::kActive || a.generation != q.generation || a.mode != q.mode ||
                a.batch != q.batch || a.defer_ns != q.defer_ns;
    }
    news.push_back(changed);
  }
  if (split.observe_only > 0) {
    kernel_policy_ignored_ += split.observe_only;
    proto::Error e;
    e.code = proto::ErrorCode::kUnsupported;
    e.text = absl::StrCat(split.observe_only, " queue(s) of observe-only kernel virtio_blk disks: not applied");
    Log(absl::StrCat("policy gen ", p.queues.front().generation, ": ", e.text));
    Send(e);
  }
  PolicyState::ApplyResult res = policy_.Apply(applicable, announced_, now);
  for (int32_t pid : res.changed_pids) WriteControl(pid, now);
  for (size_t i = 0; i < applicable.queues.size(); ++i) {
    const proto::QueuePolicy& q = applicable.queues[i];
    if (news[i] && q.ref.device_index < announced_.size()) {
      Log(absl::StrCat("policy gen ", q.generation, ": ", NameOf(announced_[q.ref.device_index]), " queue ",
                       q.ref.queue_index, " ", std::string(proto::KickModeName(q.mode)), " B=", q.batch,
                       " T=", q.defer_ns, "ns lease ", q.lease_ns / 1000000, " ms"));
    }
  }
  if (res.unknown_queues > 0 || res.unsupported_queues > 0 || !split.unwritten.empty()) {
    unknown_queue_refs_ += res.unknown_queues + res.unsupported_queues;
    proto::Error e;
    e.code = res.unknown_queues > 0       ? proto::ErrorCode::kUnknownQueue
             : res.unsupported_queues > 0 ? proto::ErrorCode::kUnsupported
                                          : proto::ErrorCode::kInternal;
    e.text = absl::StrCat(res.unknown_queues, " unknown queue(s), ", res.unsupported_queues,
                          " queue(s) beyond the control block's 16 entries, ", split.unwritten.size(),
                          " queue(s) without a control block or whose steer write failed (",
                          absl::StrJoin(split.unwritten, ","), ")");
    if (e.text.size() > proto::kMaxErrorTextLen) e.text.resize(proto::kMaxErrorTextLen);
    Log(absl::StrCat("policy not applied: ", e.text));
    Send(e);
  }
  if (res.ack_generation > 0) {
    Send(proto::Ack{res.ack_generation});
    ++acks_;
  }
}

void Agent::OnMessage(proto::DecodeResult&& r, uint64_t now) {
  conn_heard_ = true;
  if (r.error != proto::Rejection::kNone) {
    ++rejected_from_host_;
    Log(absl::StrCat("channel: rejected a frame from the host: ", std::string(proto::RejectionName(r.error))));
    return;
  }
  proto::Message& m = *r.message;
  if (auto* p = std::get_if<proto::Policy>(&m)) {
    OnPolicy(*p);
  } else if (auto* e = std::get_if<proto::Error>(&m)) {
    Log(absl::StrCat("host error ", static_cast<int>(e->code), ": ", e->text));
  } else if (auto* b = std::get_if<proto::Bye>(&m)) {
    pending_drop_ = absl::StrCat("host said bye (reason ", static_cast<int>(b->reason), ")");
  } else {
    ++rejected_from_host_;
    Log(absl::StrCat("channel: unexpected message type ", static_cast<int>(proto::TypeOf(m)), " from the host"));
  }
}

DiskSnapshot Agent::ReadStockDisks() {
  if (disks_ == nullptr) return {};
  absl::StatusOr<DiskSnapshot> dsnap = disks_->Read();
  if (!dsnap.ok()) {
    Log(absl::StrCat("reading kernel disk counters: ", dsnap.status().message()));
    return {};
  }
  // Lost starts, underflows and bad slots mean wrong numbers: logged when
  // they change. Missing starts also happen in normal operation (requests in
  // flight when a disk is first watched): --json only. Stale/expired starts
  // and program misses are completions (or issues) the handlers never saw:
  // logged too.
  if (dsnap->map_full != disk_errors_.map_full || dsnap->underflow != disk_errors_.underflow ||
      dsnap->bad_slot != disk_errors_.bad_slot || dsnap->stale_start != disk_errors_.stale_start ||
      dsnap->expired_start != disk_errors_.expired_start || dsnap->prog_misses != disk_errors_.prog_misses)
    Log(absl::StrCat("kernel disk probe errors: map_full=", dsnap->map_full, " underflow=", dsnap->underflow,
                     " bad_slot=", dsnap->bad_slot, " missing_start=", dsnap->missing_start,
                     " stale_start=", dsnap->stale_start, " expired_start=", dsnap->expired_start,
                     " prog_misses=", dsnap->prog_misses));
  disk_errors_ = *dsnap;
  disk_errors_.disks.clear();  // the error counters only
  return *std::move(dsnap);
}

void Agent::Tick(uint64_t now) {
  absl::StatusOr<CounterSnapshot> snap = probes_->Read();
  if (!snap.ok()) {
    Log(absl::StrCat("reading probe counters: ", snap.status().message()));
    snap = CounterSnapshot{};
  }
  const uint64_t interval = now - last_read_ns_;
  last_read_ns_ = now;
  if (snap->map_full != map_full_ || snap->bad_queue != bad_queue_ || snap->unreadable != unreadable_) {
    Log(absl::StrCat("probe errors: map_full=", snap->map_full, " bad_queue=", snap->bad_queue,
                     " stats_unreadable=", snap->unreadable));
    map_full_ = snap->map_full;
    bad_queue_ = snap->bad_queue;
    unreadable_ = snap->unreadable;
  }
  std::map<int32_t, int> device_index;
  std::map<uint32_t, int> disk_index;
  for (size_t i = 0; i < announced_.size(); ++i) {
    if (announced_[i].disk()) {
      disk_index[announced_[i].kdev] = static_cast<int>(i);
    } else {
      device_index[announced_[i].pid] = static_cast<int>(i);
    }
  }
  auto queue_json = [](uint16_t q, const proto::QueueSample& s, const QueueTotals& cur) {
    return nlohmann::json{{"queue", q},
                          {"interval_ns", s.interval_ns},
                          {"requests", s.requests},
                          {"kicks", s.kicks},
                          {"timer_kicks", s.timer_kicks},
                          {"completed", s.completed},
                          {"mean_depth", s.mean_depth_milli / 1000.0},
                          {"max_depth", s.max_depth},
                          {"depth_hist", s.depth_hist},
                          {"latency_hist", s.latency_hist},
                          {"lease", proto::LeaseStateName(s.lease)},
                          {"mode", std::string(proto::KickModeName(s.applied_mode))},
                          {"batch", s.applied_batch},
                          {"defer_ns", s.applied_defer_ns},
                          {"generation", s.applied_generation},
                          {"total_requests", cur.requests},
                          {"total_kicks", cur.kicks},
                          {"total_completed", cur.completions}};
  };

  proto::Sample sample;
  sample.seq = ++seq_;
  // One queue of this interval (a vkick-blk queue or a kernel disk): the
  // delta from its previous cumulative read (`found`: this read's, if it has
  // one), the sample built from it (sent when the hello announced the queue),
  // and its --json entry (null without --json).
  auto add_queue = [&](QueueTotals& prev, const QueueTotals* found, int device_index, uint16_t q,
                       const AppliedState& applied) {
    QueueTotals cur = found != nullptr ? *found : prev;
    if (found == nullptr) cur.interval_max_depth = 0;
    const QueueTotals delta = Delta(prev, cur);
    prev = cur;
    const proto::QueueRef ref{static_cast<uint16_t>(device_index >= 0 ? device_index : 0), q};
    BuiltSample b = BuildQueueSample(ref, delta, interval, applied);
    if (!b.ok) ++skipped_queues_;
    if (device_index >= 0 && b.ok) sample.queues.push_back(b.sample);
    return opts_.json ? queue_json(q, b.sample, cur) : nlohmann::json();
  };
  nlohmann::json jdrivers = nlohmann::json::array();
  for (auto& [pid, d] : drivers_) {
    auto di = device_index.find(pid);
    nlohmann::json jq = nlohmann::json::array();
    for (uint16_t q = 0; q < d.entry.queues; ++q) {
      auto it = snap->queues.find({pid, q});
      nlohmann::json j = add_queue(d.prev[q], it != snap->queues.end() ? &it->second : nullptr,
                                   di != device_index.end() ? di->second : -1, q,
                                   policy_.StateOf({pid, 0}, q, now));
      if (opts_.json) jq.push_back(std::move(j));
    }
    if (opts_.json)
      jdrivers.push_back({{"pid", pid},
                          {"device_index", di != device_index.end() ? di->second : -1},
                          {"gone", d.gone},
                          {"queues", jq}});
  }
  // Kernel disks, built by the same pure code. Stock virtio_blk: one queue
  // (queue 0 = the whole disk), kicks 0 (the guest cannot see the kernel
  // driver's notify writes; the host counts them), the driver's own applied
  // state (no lease, immediate, batch 1: no policy is ever recorded for it).
  // vkick_virtio_blk: every hardware queue from its stats file, with the
  // lease the agent gave it.
  const DiskSnapshot dsnap = ReadStockDisks();
  nlohmann::json jdisks = nlohmann::json::array();
  for (auto& [kdev, k] : kernel_disks_) {
    std::map<uint16_t, QueueTotals> found;
    if (k.disk.driver == proto::DriverKind::kVkickVirtioBlk) {
      found = vkick_stats_.Read(k.disk);
      if (found.size() < k.disk.num_queues && !std::exchange(k.stats_error_logged, true))
        Log(absl::StrCat("kernel disk ", k.disk.name, ": a queue's vkick stats unreadable or malformed (logged once)"));
    } else if (auto it = dsnap.disks.find(kdev); it != dsnap.disks.end()) {
      found[0] = it->second;
    }
    auto di = disk_index.find(kdev);
    nlohmann::json jq = nlohmann::json::array();
    for (uint16_t q = 0; q < k.disk.num_queues; ++q) {
      auto it = found.find(q);
      nlohmann::json j = add_queue(k.prev[q], it != found.end() ? &it->second : nullptr,
                                   di != disk_index.end() ? di->second : -1, q, policy_.StateOf({0, kdev}, q, now));
      if (opts_.json) jq.push_back(std::move(j));
    }
    if (opts_.json)
      jdisks.push_back({{"name", k.disk.name},
                        {"driver", std::string(proto::DriverKindName(k.disk.driver))},
                        {"dev", absl::StrCat(k.disk.major, ":", k.disk.minor)},
                        {"pci", k.disk.pci},
                        {"serial", k.disk.serial},
                        {"device_index", di != disk_index.end() ? di->second : -1},
                        {"queues", std::move(jq)}});
  }
  if (conn_ && !announced_.empty()) {
    Send(sample);
    if (conn_) ++samples_sent_;
  }
  if (opts_.json && out_) {
    nlohmann::json j = {{"type", "interval"},
                        {"seq", sample.seq},
                        {"connected", conn_.has_value()},
                        {"drivers", jdrivers},
                        {"kernel_disks", jdisks},
                        {"errors",
                         {{"map_full", map_full_},
                          {"bad_queue", bad_queue_},
                          {"stats_unreadable", unreadable_},
                          {"skipped_queues", skipped_queues_},
                          {"kernel_disks",
                           {{"observed", disks_ != nullptr},
                            {"map_full", disk_errors_.map_full},
                            {"missing_start", disk_errors_.missing_start},
                            {"underflow", disk_errors_.underflow},
                            {"bad_slot", disk_errors_.bad_slot},
                            {"reissue", disk_errors_.reissue},
                            {"stale_start", disk_errors_.stale_start},
                            {"expired_start", disk_errors_.expired_start},
                            {"prog_misses", disk_errors_.prog_misses}}},
                          {"vkick_disks",
                           {{"stats_unreadable", vkick_stats_.unreadable()}, {"steer_errors", steer_errors_}}}}},
                        {"registry_rejected", registry_rejected_},
                        {"channel",
                         {{"connects", connects_},
                          {"disconnects", disconnects_},
                          {"policies", policies_},
                          {"acks", acks_},
                          {"samples_sent", samples_sent_},
                          {"rejected_from_host", rejected_from_host_},
                          {"unknown_queue_refs", unknown_queue_refs_},
                          {"kernel_policy_ignored", kernel_policy_ignored_}}}};
    *out_ << j.dump() << std::endl;
  }
  // Counters of processes that are neither registered nor alive (a
  // --driver_binary process that never registered, or exited before the
  // agent saw it): dropped, so the bounded map never fills with the dead.
  std::set<int32_t> stale;
  for (const auto& [key, t] : snap->queues) {
    if (drivers_.count(key.first) || stale.count(key.first)) continue;
    struct stat st;
    if (stat(absl::StrCat(opts_.proc_root, "/", key.first).c_str(), &st) != 0) stale.insert(key.first);
  }
  for (int32_t pid : stale) probes_->Untrack(pid);
  // Drivers that went away: their last interval was just reported.
  for (auto it = drivers_.begin(); it != drivers_.end();) {
    if (!it->second.gone) {
      ++it;
      continue;
    }
    const int32_t pid = it->first;
    if (opts_.json && out_) {
      nlohmann::json jq = nlohmann::json::array();
      for (const auto& [q, t] : it->second.prev)
        jq.push_back({{"queue", q},
                      {"requests", t.requests},
                      {"kicks", t.kicks},
                      {"timer_kicks", t.kicks_by_why[kWhyTimer]},
                      {"completed", t.completions}});
      *out_ << nlohmann::json({{"type", "driver_exit"}, {"pid", pid}, {"queues", jq}}).dump() << std::endl;
    }
    probes_->Untrack(pid);
    policy_.Forget({pid, 0});
    if (it->second.control) unlink(it->second.control->path().c_str());
    it = drivers_.erase(it);
  }
  if (!pending_drop_.empty()) return;
  if (conn_ && HelloIsStale()) {
    Log("driver set changed: re-announcing (bye + reconnect)");
    Send(proto::Bye{proto::ByeReason::kRestart});
    if (conn_) (void)conn_->Flush();
    Disconnect(now, "re-announce", true);
  }
}

int Agent::Run(volatile const bool* stop, const sigset_t* run_mask) {
  const bool channel = !opts_.connect_path.empty() || !opts_.port_name.empty();
  uint64_t now = clock_();
  last_read_ns_ = now;
  uint64_t next_tick = now + opts_.interval_ns;
  uint64_t next_scan = now;
  next_connect_ns_ = now;
  int intervals = 0;
  while (!*stop) {
    now = clock_();
    if (now >= next_scan) {
      // A new driver is announced at once (a gone one after its last sample,
      // at the next tick).
      const bool added = RescanRegistry();
      const bool disks_changed = RescanKernelDisks();
      if ((added || disks_changed) && conn_ && HelloIsStale()) {
        Log("device set changed: re-announcing (bye + reconnect)");
        Send(proto::Bye{proto::ByeReason::kRestart});
        if (conn_) (void)conn_->Flush();
        Disconnect(now, "re-announce", true);
      }
      next_scan = now + opts_.registry_poll_ns;
    }
    if (channel && !conn_ && now >= next_connect_ns_) TryConnect(now);
    if (!pending_drop_.empty()) Disconnect(now, pending_drop_, false);
    if (now >= next_tick) {
      Tick(now);
      next_tick += opts_.interval_ns;
      if (next_tick <= now) next_tick = now + opts_.interval_ns;
        if (opts_.max_intervals > 0 && ++intervals >= opts_.max_intervals) break;
    }
    if (!pending_drop_.empty()) Disconnect(now, pending_drop_, false);
    uint64_t wake = std::min(next_tick, next_scan);
    if (channel && !conn_) wake = std::min(wake, next_connect_ns_);
    const uint64_t wait = wake > now ? wake - now : 0;
    timespec ts{static_cast<time_t>(wait / 1'000'000'000), static_cast<long>(wait % 1'000'000'000)};
    pollfd pfd{-1, 0, 0};
    if (conn_) {
      pfd.fd = conn_->fd();
      pfd.events = POLLIN | (conn_->wants_write() ? POLLOUT : 0);
    }
    int n = ppoll(&pfd, conn_ ? 1 : 0, &ts, run_mask);
    if (n <= 0 || !conn_) continue;
    now = clock_();
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
      absl::Status s = conn_->Receive([&](proto::DecodeResult&& r) { OnMessage(std::move(r), now); });
      if (!s.ok() && conn_) Disconnect(now, std::string(s.message()), false);
    }
    if (!pending_drop_.empty()) Disconnect(now, pending_drop_, false);
    if (conn_ && (pfd.revents & POLLOUT)) {
      if (absl::Status s = conn_->Flush(); !s.ok()) Disconnect(now, std::string(s.message()), false);
    }
  }
  if (conn_) {
    Send(proto::Bye{proto::ByeReason::kShutdown});
    if (conn_) (void)conn_->Flush();
    conn_.reset();
  }
  Log(absl::StrCat("exiting: ", drivers_.size(), " driver(s) tracked, ", policies_, " policies, ", acks_, " acks"));
  return 0;
}

}  // namespace vkick::agent
