#include "controller/daemon/loop_runner.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/clock.h"

namespace vkick {
namespace {

int64_t MonoNs() { return static_cast<int64_t>(MonotonicNowNs()); }

uint64_t WallMicros() { return static_cast<uint64_t>(absl::ToUnixMicros(absl::Now())); }

absl::Status MkdirP(const std::string& dir) {
  std::string cur;
  for (absl::string_view part : absl::StrSplit(dir, '/', absl::SkipEmpty())) {
    cur = absl::StrCat(cur, "/", part);
    if (mkdir(cur.c_str(), 0700) != 0 && errno != EEXIST)
      return absl::PermissionDeniedError(absl::StrCat("mkdir ", cur, ": ", strerror(errno)));
  }
  if (access(dir.c_str(), W_OK | X_OK) != 0)
    return absl::PermissionDeniedError(absl::StrCat(dir, ": ", strerror(errno)));
  return absl::OkStatus();
}

// Atomic small-file write (tmp, fsync, rename).
absl::Status WriteFileAtomic(const std::string& path, const std::string& data) {
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrCat(tmp, ": ", strerror(errno)));
  bool ok = write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()) &&
            fsync(fd) == 0;
  close(fd);
  if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
    unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("writing ", path, ": ", strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<VhostUserDecl> ParseVhostUserDecl(absl::string_view flag) {
  std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(flag, absl::MaxSplits('=', 1));
  VhostUserDecl d{std::string(kv.first), std::string(kv.second)};
  // The id is a label value and the serial the agent reports (<= 20 bytes).
  if (d.id.empty() || d.id.size() > proto::kMaxSerialLen)
    return absl::InvalidArgumentError(
        absl::StrCat("--vhost-user=", flag, ": ID must be 1..20 characters"));
  for (char c : d.id) {
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'))
      return absl::InvalidArgumentError(
          absl::StrCat("--vhost-user=", flag, ": ID may use [A-Za-z0-9._-] only"));
  }
  if (d.socket_path.empty())
    return absl::InvalidArgumentError(absl::StrCat("--vhost-user=", flag, ": want ID=SOCKET_PATH"));
  return d;
}

std::vector<ChannelDevice> VhostUserChannelDevices(const LoopRunnerOptions& o) {
  std::vector<ChannelDevice> out;
  for (const VhostUserDecl& d : o.vhost_user) {
    ChannelDevice c;
    c.known.serial = d.id;
    c.known.num_queues = proto::kMaxQueuesPerDevice;  // the agent's count bounds it
    c.vm = o.vhost_user_vm;
    c.device = d.id;
    out.push_back(std::move(c));
  }
  return out;
}

const std::vector<double>& LoopDurationBuckets() {
  static const auto* const kB = new std::vector<double>{0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                        0.005,  0.01,    0.025,  0.05,  0.1,
                                                        0.25,   0.5,     1};
  return *kB;
}

LoopRunner::LoopRunner(LoopRunnerOptions options, Daemon& daemon)
    : options_(std::move(options)),
      daemon_(daemon),
      duration_(LoopDurationBuckets()),
      table_(options_.default_policy),
      loop_(options_.loop, WallMicros()) {}

LoopRunner::~LoopRunner() { Stop(); }

absl::Status LoopRunner::Init() {
  absl::MutexLock l(&mu_);
  if (options_.state_dir.empty()) return absl::OkStatus();
  if (absl::Status s = MkdirP(options_.state_dir); !s.ok()) {
    if (options_.state_dir_required) return s;
    Log(absl::StrCat("state dir unusable, policy changes will not survive a restart: ",
                     s.ToString()));
    return absl::OkStatus();
  }
  persist_ = true;
  PolicySpec def = options_.default_policy;
  const std::string def_path = absl::StrCat(options_.state_dir, "/", kDefaultPolicyFile);
  std::ifstream in(def_path);
  if (in) {
    std::stringstream ss;
    ss << in.rdbuf();
    absl::StatusOr<PolicySpec> p = ParsePolicySpec(absl::StripAsciiWhitespace(ss.str()));
    if (p.ok()) {
      def = *p;
      Log(absl::StrCat("restored default policy ", FormatPolicySpec(def), " from ", def_path));
    } else {
      // Kept for the operator, out of the way of the next --all.
      const std::string aside = absl::StrCat(def_path, ".corrupt");
      ::rename(def_path.c_str(), aside.c_str());
      ++load_errors_;
      Log(absl::StrCat("ignoring ", def_path, ": ", p.status().ToString(), " (moved to ", aside,
                       "; using --default-policy)"));
    }
  }
  PolicyStore store(options_.state_dir);
  PolicyStore::Loaded loaded = store.Load(def);
  if (!loaded.status.ok()) {
    ++load_errors_;
    Log(absl::StrCat("policy state: ", loaded.status.ToString()));
  }
  table_ = std::move(loaded.table);
  if (!table_.entries().empty())
    Log(absl::StrCat("restored ", table_.entries().size(), " policy entries from ", store.path()));
  return absl::OkStatus();
}

absl::Status LoopRunner::Persist(const PolicyTable& t, bool all) {
  if (!persist_) return absl::OkStatus();
  PolicyStore store(options_.state_dir);
  if (absl::Status s = store.Save(t); !s.ok()) return s;
  // Only an explicit --all pins the default; otherwise the flag stays in
  // charge (a later --default-policy change takes effect).
  if (!all) return absl::OkStatus();
  return WriteFileAtomic(absl::StrCat(options_.state_dir, "/", kDefaultPolicyFile),
                         FormatPolicySpec(t.default_policy()) + "\n");
}

void LoopRunner::Start() {
  // The first step runs here, so that once Start() returns the probes have
  // been read and /healthz and /metrics have a snapshot to render.
  StepOnce();
  thread_ = std::thread([this] {
    absl::Time next = absl::Now() + options_.interval;
    // Wake-ups (hellos, admin changes) are coalesced and at most one step
    // per min_gap runs early, so reconnecting agents cannot spin the loop.
    const absl::Duration min_gap = std::min(options_.interval / 4, absl::Milliseconds(100));
    absl::Time last = absl::InfinitePast();
    while (true) {
      {
        absl::MutexLock l(&wake_mu_);
        auto cond = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(wake_mu_) { return wake_ || stop_; };
        wake_mu_.AwaitWithDeadline(absl::Condition(&cond), next);
        if (stop_) return;
        if (wake_ && absl::Now() < last + min_gap) {
          auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(wake_mu_) { return stop_; };
          if (wake_mu_.AwaitWithDeadline(absl::Condition(&stop), last + min_gap)) return;
        }
        wake_ = false;
      }
      last = absl::Now();
      StepOnce();
      absl::Time now = absl::Now();
      if (now >= next) next = now + options_.interval;
    }
  });
}

void LoopRunner::Stop() {
  {
    absl::MutexLock l(&wake_mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void LoopRunner::Wake() {
  absl::MutexLock l(&wake_mu_);
  wake_ = true;
}

void LoopRunner::StepOnce() {
  const absl::Time t0 = absl::Now();
  const std::shared_ptr<const DaemonSnapshot> latest = daemon_.Tick();
  const DaemonSnapshot& snap = *latest;
  AgentServer::Collected col;
  std::set<std::string> live_tags;
  if (server_ != nullptr) {
    col = server_->Collect();
    if (ports_ != nullptr) live_tags = server_->LiveTags();
  }

  const std::map<ProbeQueueId, uint64_t> host =
      snap.counters ? NotificationTotals(*snap.counters) : std::map<ProbeQueueId, uint64_t>{};
  std::vector<QueueInput> inputs;
  std::map<QueueKey, ProbeQueueId> counted_ids;
  std::set<std::string> names;
  std::set<std::string> vm_tags;  // the agent channels of the VMs here now
  for (const AttachedVm& vm : snap.vms) {
    if (vm.departed) continue;  // only on /metrics, for its final counts
    // The exporter's naming (a repeated -name is told apart by pid).
    std::string name = vm.info.name;
    if (!names.insert(name).second) {
      name = absl::StrCat(vm.info.name, "/pid", vm.info.pid);
      names.insert(name);
    }
    ConnectVmAgent(vm, name, live_tags);
    if (ports_ != nullptr) vm_tags.insert(VmAgentTag(ports_->Get(vm.info.qmp_path)));
    for (const VirtioDeviceInfo& d : vm.info.devices) {
      for (uint16_t q = 0; q < d.num_queues && q < proto::kMaxQueuesPerDevice; ++q) {
        QueueInput in;
        in.key = {name, d.label, q};
        in.frozen = IsFrozen(vm.info.run_state);
        in.vm_state = RunStateName(vm.info.run_state);
        // A --vhost-user frontend's queue is host-counted only while a live
        // frontend has a kick fd bound for it (one connected before vkickd
        // started is not, until it reconnects): otherwise the driver's own
        // kick count is believed.
        const bool counted = (!d.vhost_user || options_.vhost_user_kicks_counted) &&
                             (!vm.vhost_user_frontends || vm.bound_queues.count({d.device_id, q}) > 0);
        if (snap.counters && counted) {
          auto it = host.find({vm.vm_id, d.device_id, q});
          in.host_notifications_total = it == host.end() ? 0 : it->second;
          counted_ids[in.key] = {vm.vm_id, d.device_id, q};
        }
        inputs.push_back(std::move(in));
      }
    }
  }
  CloseStaleVmChannels(live_tags, vm_tags);
  const int64_t now = MonoNs();
  {
    absl::MutexLock l(&mu_);
    AddAnnouncedVhostQueues(col.connected_queues, now, inputs);
  }
  {
    absl::MutexLock l(&ids_mu_);
    counted_ids_ = std::move(counted_ids);
  }
  for (QueueInput& in : inputs) {
    in.agent_connected = col.connected_queues.count(in.key) > 0;
    in.observe_only = col.observed_only.count(in.key) > 0;
    if (auto it = col.driver_of.find(in.key); it != col.driver_of.end()) in.driver = it->second;
    if (auto it = col.connection_of.find(in.key); it != col.connection_of.end())
      in.agent_connection = it->second;
    if (auto it = col.samples.find(in.key); it != col.samples.end()) in.sample = it->second;
    // Stamped on arrival, and still host-counted now.
    if (auto it = col.host_at_sample.find(in.key);
        in.sample && in.host_notifications_total && it != col.host_at_sample.end())
      in.host_notifications_at_sample = it->second;
  }
  std::vector<PolicyOut> out;
  {
    absl::MutexLock l(&mu_);
    out = loop_.Step(table_, inputs, now);
    for (const auto& [k, g] : col.acks) loop_.OnAck(k, g);
    views_ = loop_.View();
  }
  if (server_ != nullptr && !out.empty()) server_->Send(out);
  duration_.Observe(absl::ToDoubleSeconds(absl::Now() - t0));
}

void LoopRunner::AddAnnouncedVhostQueues(const std::set<QueueKey>& connected, int64_t now_ns,
                                         std::vector<QueueInput>& inputs) {
  std::set<QueueKey> have;
  for (const QueueInput& in : inputs) have.insert(in.key);
  for (const QueueKey& k : connected)
    if (k.vm == options_.vhost_user_vm) vhost_seen_[k] = now_ns;
  // Such a device's queue count is not known (an agent may announce 64 for
  // one): a queue no live agent reports on goes when the lease last sent
  // for it has run out, so phantoms leave the status and the metrics.
  const int64_t lease = static_cast<int64_t>(options_.loop.lease_ns);
  for (auto it = vhost_seen_.begin(); it != vhost_seen_.end();) {
    if (now_ns - it->second >= lease) {
      it = vhost_seen_.erase(it);
      continue;
    }
    if (!have.count(it->first)) {  // else the probes' pseudo-VM has it
      QueueInput in;
      in.key = it->first;  // no probe counts it: the guest's kicks are believed
      inputs.push_back(std::move(in));
    }
    ++it;
  }
}

std::map<QueueKey, uint64_t> LoopRunner::HostTotalsNow(const std::set<QueueKey>& queues) {
  std::vector<std::pair<QueueKey, ProbeQueueId>> ids;
  {
    absl::MutexLock l(&ids_mu_);
    for (const QueueKey& k : queues) {
      if (auto it = counted_ids_.find(k); it != counted_ids_.end()) ids.emplace_back(k, it->second);
    }
  }
  std::map<QueueKey, uint64_t> out;
  if (ids.empty()) return out;
  std::vector<ProbeQueueId> probe_ids;
  for (const auto& [key, id] : ids) probe_ids.push_back(id);
  auto totals = daemon_.NotificationTotals(probe_ids);
  if (!totals) return out;
  for (const auto& [key, id] : ids) {
    auto it = totals->find(id);
    out[key] = it == totals->end() ? 0 : it->second;
  }
  return out;
}

void LoopRunner::ConnectVmAgent(const AttachedVm& vm, const std::string& name,
                                const std::set<std::string>& live_tags) {
  if (ports_ == nullptr || server_ == nullptr) return;
  const std::string path = ports_->Get(vm.info.qmp_path);
  if (path.empty()) return;
  const std::string tag = VmAgentTag(path);
  if (live_tags.count(tag)) return;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string err;
  int fd = -1;
  if (path.size() >= sizeof addr.sun_path) {
    err = "path too long";
  } else {
    std::memcpy(addr.sun_path, path.data(), path.size());
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      err = strerror(errno);
      if (fd >= 0) close(fd);
      fd = -1;
    }
  }
  if (fd < 0) {
    if (port_errors_[tag] != err) Log(absl::StrCat("agent channel ", tag, ": connect: ", err));
    port_errors_[tag] = err;
    return;
  }
  // The guest's devices are matched against what discovery found for this
  // VM: by PCI address (the guest sees the firmware's bus/slot/function).
  std::vector<ChannelDevice> devices;
  for (const VirtioDeviceInfo& d : vm.info.devices) {
    ChannelDevice c;
    c.known.pci_address = d.pci_address;
    c.known.num_queues = static_cast<uint16_t>(std::min<uint32_t>(d.num_queues, proto::kMaxQueuesPerDevice));
    c.vm = name;
    c.device = d.label;
    devices.push_back(std::move(c));
    if (devices.size() >= proto::kMaxDevices * 4) break;  // bounded
  }
  // Logged once per change, as a failed connect is: refused again every step.
  if (absl::Status s = server_->AddConnection(fd, name, std::move(devices), tag); !s.ok()) {
    const std::string why = absl::StrCat("refused: ", s.message());
    if (port_errors_[tag] != why) Log(absl::StrCat("agent channel ", tag, ": ", why));
    port_errors_[tag] = why;
    return;
  }
  port_errors_.erase(tag);
  Log(absl::StrCat("agent channel ", tag, ": connected for VM '", name, "'"));
}

void LoopRunner::CloseStaleVmChannels(const std::set<std::string>& live_tags,
                                      const std::set<std::string>& vm_tags) {
  if (server_ == nullptr) return;
  // A VM channel whose VM left the snapshot while its QEMU still runs: a
  // migration source whose guest runs in the destination now. Its agent
  // owns the guest's devices while connected, so the destination's channel
  // (the same agent, reconnected) could not announce them: closed.
  std::set<std::string> stale;
  for (const std::string& tag : live_tags) {
    if (absl::StartsWith(tag, kVmAgentTagPrefix) && vm_tags.count(tag) == 0) stale.insert(tag);
  }
  if (stale.empty()) return;
  for (const std::string& tag : stale) {
    Log(absl::StrCat("agent channel ", tag, ": closed, its VM is no longer here (migrated)"));
  }
  server_->CloseTags(stale);
}

std::string LoopRunner::HandleAdmin(const AdminRequest& req, const AdminPeer& peer) {
  using nlohmann::json;
  auto dump = [](const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); };
  if (std::holds_alternative<AdminStatus>(req)) {
    LoopSnapshot s = Snapshot();
    std::vector<AgentView> agents;
    for (const auto& a : s.agents) agents.push_back({a.vm, a.connected});
    json j = StatusJson(s.queues, agents, Table().default_policy(), MonoNs());
    j["interval_s"] = absl::ToDoubleSeconds(options_.interval);
    j["lease_s"] = options_.loop.lease_ns / 1e9;
    return dump(j);
  }
  std::string what;
  bool all = false;
  {
    absl::MutexLock l(&mu_);
    PolicyTable next = table_;
    if (const auto* set = std::get_if<AdminPolicySet>(&req)) {
      if (absl::Status s = next.Set(set->scope, set->spec); !s.ok())
        return ErrorReply(s.message());
      what = absl::StrCat("set ", FormatPolicySpec(set->spec));
      all = set->scope == PolicyScope{};
    } else {
      const auto& clr = std::get<AdminPolicyClear>(req);
      if (!next.Clear(clr.scope)) return ErrorReply("no such policy entry");
      what = "cleared";
    }
    if (absl::Status s = Persist(next, all); !s.ok()) {
      ++save_errors_;
      return ErrorReply(absl::StrCat("not applied: cannot persist the policy: ", s.message()));
    }
    table_ = std::move(next);
  }
  Log(absl::StrCat("admin: policy ", what, " by uid ", peer.uid, " pid ", peer.pid));
  Wake();  // takes effect now, not at the next interval
  return dump(json{{"ok", true}, {"message", absl::StrCat("policy ", what)}});
}

LoopSnapshot LoopRunner::Snapshot() const {
  LoopSnapshot s;
  if (server_ != nullptr) {
    // Channel series only for VMs that are here now (and the listener's).
    std::set<std::string> vms;
    {
      absl::MutexLock l(&mu_);
      for (const QueueView& v : views_) vms.insert(v.key.vm);
    }
    for (const AgentChannelStats& st : server_->AllStats()) {
      if (!vms.count(st.vm) && (st.vm != options_.vhost_user_vm || !has_listener_)) continue;
      AgentChannelSnapshot a;
      a.vm = st.vm;
      a.connected = st.connected;
      a.rejected = st.rejected;
      a.dropped = st.dropped_total;
      s.agents.push_back(a);
    }
  }
  s.loop_duration = duration_.Collect();
  if (admin_refused_) s.admin_refused = admin_refused_();
  if (server_ != nullptr) s.agent_refused = server_->Refused();
  absl::MutexLock l(&mu_);
  s.queues = views_;
  s.state_save_errors = save_errors_;
  s.state_load_errors = load_errors_;
  return s;
}

PolicyTable LoopRunner::Table() const {
  absl::MutexLock l(&mu_);
  return table_;
}

}  // namespace vkick
