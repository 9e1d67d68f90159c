#include "controller/channel/agent_server.h"

#include <algorithm>

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/unix_listener.h"

namespace vkick {
namespace {

int64_t MonoNs() { return static_cast<int64_t>(MonotonicNowNs()); }

}  // namespace

absl::StatusOr<std::unique_ptr<AgentServer>> AgentServer::Start(AgentServerOptions options) {
  std::unique_ptr<AgentServer> s(new AgentServer(std::move(options)));
  if (!s->options_.socket_path.empty()) {
    UnixListenOptions lo;
    lo.mode = static_cast<mode_t>(s->options_.socket_mode);
    lo.backlog = 16;
    lo.flag = "--agent-socket";
    absl::StatusOr<UniqueFd> fd = ListenUnix(s->options_.socket_path, lo);
    if (!fd.ok()) return fd.status();
    s->listen_fd_ = fd->Release();
    absl::MutexLock l(&s->mu_);
    s->stats_[s->options_.vm].vm = s->options_.vm;
  }
  AgentServer* raw = s.get();
  s->accept_thread_ = std::thread([raw] { raw->AcceptLoop(); });
  return s;
}

AgentServer::~AgentServer() { Stop(); }

void AgentServer::Stop() {
  if (stop_.exchange(true)) return;
  if (accept_thread_.joinable()) accept_thread_.join();
  Reap(/*all=*/true);
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    unlink(options_.socket_path.c_str());
    listen_fd_ = -1;
  }
}

void AgentServer::AcceptLoop() {
  while (!stop_) {
    if (listen_fd_ < 0) {  // VM channels only: just reap
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      Reap(/*all=*/false);
      continue;
    }
    pollfd p{listen_fd_, POLLIN, 0};
    int n = poll(&p, 1, 200);
    Reap(/*all=*/false);
    if (n <= 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    ucred cr{};
    socklen_t len = sizeof cr;
    const bool known = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0;
    absl::MutexLock l(&mu_);
    // A peer that cannot be told apart cannot be limited: refused.
    std::optional<AgentRefusal> why = known ? HostRefusal(cr.uid) : AgentRefusal::kPeerLimit;
    if (why) {
      close(fd);
      NoteRefusal(*why, known ? absl::StrCat("uid ", cr.uid, ", pid ", cr.pid) : "no SO_PEERCRED");
      continue;
    }
    StartConn(fd, options_.vm, options_.devices, "", cr);
  }
}

std::optional<AgentRefusal> AgentServer::HostRefusal(uid_t uid) const {
  size_t open = 0, pending = 0;
  for (const auto& c : conns_) {
    if (c->done || !c->peer) continue;
    ++open;
    if (c->peer->uid == uid && !c->reports) ++pending;
  }
  if (open >= options_.max_connections) return AgentRefusal::kHostLimit;
  if (pending >= options_.max_pending_per_uid) return AgentRefusal::kPeerLimit;
  return std::nullopt;
}

void AgentServer::NoteRefusal(AgentRefusal why, const std::string& detail) {
  const size_t i = static_cast<size_t>(why);
  ++refused_[i];
  // A peer retrying in a loop must not flood the log: one line per reason a
  // minute, with the count since the last one.
  const int64_t now = MonoNs();
  if (refused_logged_[i] != 0 && now - refusal_log_ns_[i] < 60'000'000'000) return;
  Log(absl::StrCat("agent channel ", options_.socket_path, ": connection refused (",
                   std::string(AgentRefusalName(why)), ", ", detail, "); ",
                   refused_[i] - refused_logged_[i], " such since the last line"));
  refused_logged_[i] = refused_[i];
  refusal_log_ns_[i] = now;
}

void AgentServer::StartConn(int fd, std::string vm, std::vector<ChannelDevice> devices,
                            std::string tag, std::optional<ucred> peer) {
  AgentChannelStats& st = stats_[vm];
  st.vm = vm;
  ++st.connections_total;
  auto c = std::make_unique<Conn>();
  c->fd = fd;
  c->id = next_conn_id_++;
  c->vm = std::move(vm);
  c->tag = std::move(tag);
  c->peer = peer;
  // Ownership is by process on the host (its connections share it), by the
  // channel itself for a VM.
  c->owner = peer ? absl::StrCat("pid ", peer->pid) : absl::StrCat("VM channel #", c->id);
  Conn* raw = c.get();
  c->session = std::make_unique<AgentSession>(
      options_.guard, std::move(devices), MonoNs(),
      [this, raw](const ChannelDevice& d) { return Claim(raw, d); });
  c->thread = std::thread([this, raw] { ReadLoop(raw); });
  conns_.push_back(std::move(c));
}

absl::Status AgentServer::AddConnection(int fd, std::string vm, std::vector<ChannelDevice> devices,
                                        std::string tag) {
  absl::MutexLock l(&mu_);
  if (stop_) {
    close(fd);
    return absl::UnavailableError("vkickd is stopping");
  }
  size_t open = 0;
  for (const auto& c : conns_)
    if (!c->done && !c->peer) ++open;
  if (open >= options_.max_vm_channels) {
    close(fd);
    ++refused_[static_cast<size_t>(AgentRefusal::kVmChannelLimit)];  // the caller logs it
    return absl::ResourceExhaustedError(
        absl::StrCat(open, " VM channels are open, the most this vkickd serves"));
  }
  StartConn(fd, std::move(vm), std::move(devices), std::move(tag), std::nullopt);
  return absl::OkStatus();
}

std::set<std::string> AgentServer::LiveTags() const {
  std::set<std::string> out;
  absl::MutexLock l(&mu_);
  for (const auto& c : conns_)
    if (!c->done && !c->tag.empty()) out.insert(c->tag);
  return out;
}

bool AgentServer::Claim(Conn* c, const ChannelDevice& d) {
  std::string owner;
  {
    absl::MutexLock l(&owners_mu_);
    Owner& o = owners_[{d.vm, d.device}];
    if (o.conns.empty() || o.who == c->owner) {
      o.who = c->owner;
      o.conns.insert(c->id);
      o.last_refused.clear();
      return true;
    }
    if (o.last_refused == c->owner) return false;  // logged already
    o.last_refused = c->owner;
    owner = o.who;
  }
  Log(absl::StrCat("agent channel ", Name(*c), ": ", c->owner, " announced device '", d.device,
                   "' (vm ", d.vm, "), which ", owner, " owns: rejected (device_owned)"));
  return false;
}

void AgentServer::Release(const Conn& c) {
  absl::MutexLock l(&owners_mu_);
  for (auto it = owners_.begin(); it != owners_.end();) {
    it->second.conns.erase(c.id);
    it = it->second.conns.empty() ? owners_.erase(it) : std::next(it);
  }
}

bool AgentServer::Feed(Conn* c, const uint8_t* buf, ssize_t n, bool& dropped) {
  bool keep;
  std::array<uint64_t, proto::kRejectionCount> rej;
  {
    absl::MutexLock l(&c->mu);
    if (n <= 0) {
      c->session->Finish(MonoNs());
      keep = false;
    } else {
      keep = c->session->Feed(std::span<const uint8_t>(buf, static_cast<size_t>(n)), MonoNs());
      dropped = !keep;
      if (keep && options_.host_totals && c->session->has_unstamped())
        c->session->StampHost(options_.host_totals(c->session->unstamped()));
    }
    c->reports = c->session->reports();
    rej = c->session->TakeRejections();
  }
  absl::MutexLock l(&mu_);
  AgentChannelStats& st = stats_[c->vm];
  for (size_t i = 0; i < rej.size(); ++i) st.rejected[i] += rej[i];
  if (dropped) ++st.dropped_total;
  return keep;
}

void AgentServer::ReadLoop(Conn* c) {
  uint8_t buf[4096];
  bool hello = false;
  bool dropped = false;
  // Since when it has reported on nothing (connected, or said bye).
  int64_t idle_since = MonoNs();
  const int64_t deadline_ns = absl::ToInt64Nanoseconds(options_.hello_timeout);
  while (!stop_) {
    // Only --agent-socket connections: a VM channel is one per VM, and its
    // guest's agent may start long after vkickd connected.
    if (c->peer && !c->reports && MonoNs() - idle_since >= deadline_ns) {
      absl::MutexLock l(&mu_);
      NoteRefusal(AgentRefusal::kHelloTimeout,
                  absl::StrCat("uid ", c->peer->uid, ", pid ", c->peer->pid,
                               ": no hello naming a device it owns within ",
                               absl::FormatDuration(options_.hello_timeout)));
      break;
    }
    pollfd p{c->fd, POLLIN, 0};
    int n = poll(&p, 1, 200);
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    ssize_t r = read(c->fd, buf, sizeof buf);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    const bool reported = c->reports;
    const bool keep = Feed(c, buf, r, dropped);
    if (reported && !c->reports) idle_since = MonoNs();  // a bye: it must announce again
    bool now_hello;
    {
      absl::MutexLock l(&c->mu);
      now_hello = c->session->hello_seen();
    }
    if (now_hello && !hello) {
      hello = true;
      Log(absl::StrCat("agent channel ", Name(*c), ": hello accepted (vm ", c->vm, ")"));
      if (options_.on_hello) options_.on_hello();
    }
    if (!keep) break;
  }
  if (dropped) Log(absl::StrCat("agent channel ", Name(*c), ": connection dropped by the guard (vm ",
                                c->vm, ")"));
  Release(*c);
  shutdown(c->fd, SHUT_RDWR);
  c->done = true;
}

void AgentServer::Reap(bool all) {
  std::vector<std::unique_ptr<Conn>> dead;
  {
    absl::MutexLock l(&mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (all || (*it)->done) {
        dead.push_back(std::move(*it));
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& c : dead) {
    if (c->thread.joinable()) c->thread.join();  // `stop_` or done: returns promptly
    close(c->fd);
  }
}

AgentServer::Collected AgentServer::Collect() {
  Collected out;
  absl::MutexLock l(&mu_);
  for (auto& c : conns_) {
    if (c->done) continue;
    absl::MutexLock cl(&c->mu);
    if (!c->session->hello_seen()) continue;
    std::vector<QueueKey> qs = c->session->Queues();
    for (auto& [k, s] : c->session->TakeSamples()) out.samples[k] = s;
    for (auto& [k, h] : c->session->TakeHostStamps()) out.host_at_sample[k] = h;
    for (uint64_t g : c->session->TakeAcks())
      for (const QueueKey& k : qs) out.acks.emplace_back(k, g);
    out.connected_queues.insert(qs.begin(), qs.end());
    // A connection's announcements are told apart too (virtio-serial: one
    // stream, a new hello after each bye).
    const uint64_t announcement = (c->id << 20) | (c->session->announcements() & 0xfffff);
    for (const QueueKey& k : qs) {
      uint64_t& id = out.connection_of[k];
      id = std::max(id, announcement);  // two live connections naming one queue: the newer
    }
    const std::set<QueueKey> obs = c->session->ObservedOnly();
    out.observed_only.insert(obs.begin(), obs.end());
    for (const auto& [k, driver] : c->session->Drivers()) out.driver_of[k] = driver;
  }
  return out;
}

void AgentServer::Send(const std::vector<PolicyOut>& policies) {
  absl::MutexLock l(&mu_);
  for (auto& c : conns_) {
    if (c->done) continue;
    std::vector<uint8_t> frame;
    {
      absl::MutexLock cl(&c->mu);
      if (!c->session->hello_seen()) continue;
      frame = c->session->EncodePolicies(policies);
    }
    if (frame.empty()) continue;
    ssize_t w = send(c->fd, frame.data(), frame.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w != static_cast<ssize_t>(frame.size())) {
      // Not read by the agent (or closed): drop rather than queue.
      ++stats_[c->vm].dropped_total;
      shutdown(c->fd, SHUT_RDWR);
    }
  }
}

std::vector<AgentChannelStats> AgentServer::AllStats() const {
  absl::MutexLock l(&mu_);
  std::map<std::string, AgentChannelStats> all = stats_;
  for (auto& [vm, st] : all) st.connected = 0;
  for (const auto& c : conns_) {
    if (c->done) continue;
    absl::MutexLock cl(&c->mu);
    if (c->session->hello_seen()) ++all[c->vm].connected;
  }
  std::vector<AgentChannelStats> out;
  for (auto& [vm, st] : all) out.push_back(st);
  return out;
}

std::array<uint64_t, kAgentRefusalCount> AgentServer::Refused() const {
  absl::MutexLock l(&mu_);
  return refused_;
}

AgentChannelStats AgentServer::Stats() const {
  for (AgentChannelStats& s : AllStats())
    if (s.vm == options_.vm) return s;
  AgentChannelStats s;
  s.vm = options_.vm;
  return s;
}

}  // namespace vkick
