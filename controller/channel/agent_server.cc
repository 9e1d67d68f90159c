#include "controller/channel/agent_server.h"

#include <algorithm>
#include <climits>

#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/errno_status.h"
#include "common/unix_listener.h"

namespace vkick {
namespace {

int64_t MonoNs() { return static_cast<int64_t>(MonotonicNowNs()); }

// epoll data of the wake eventfd and of the listener; connection ids count
// up from 1 and never reach them.
constexpr uint64_t kWakeTag = ~uint64_t{0};
constexpr uint64_t kListenTag = ~uint64_t{0} - 1;

bool Watch(int ep, int fd, uint64_t tag) {
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;
  ev.data.u64 = tag;
  return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AgentServer>> AgentServer::Start(AgentServerOptions options) {
  std::unique_ptr<AgentServer> s(new AgentServer(std::move(options)));
  s->epoll_.Reset(epoll_create1(EPOLL_CLOEXEC));
  if (!s->epoll_.valid()) return ErrnoStatus(errno, "epoll_create1");
  s->wake_.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->wake_.valid()) return ErrnoStatus(errno, "eventfd");
  if (!Watch(s->epoll_.get(), s->wake_.get(), kWakeTag)) {
    return ErrnoStatus(errno, "epoll_ctl(eventfd)");
  }
  if (!s->options_.socket_path.empty()) {
    UnixListenOptions lo;
    lo.mode = static_cast<mode_t>(s->options_.socket_mode);
    lo.backlog = 16;
    lo.flag = "--agent-socket";
    absl::StatusOr<UniqueFd> fd = ListenUnix(s->options_.socket_path, lo);
    if (!fd.ok()) return fd.status();
    s->listen_fd_ = fd->Release();
    if (!Watch(s->epoll_.get(), s->listen_fd_, kListenTag)) {
      return ErrnoStatus(errno, "epoll_ctl(--agent-socket)");
    }
    absl::MutexLock l(&s->mu_);
    s->stats_[s->options_.vm].vm = s->options_.vm;
  }
  AgentServer* raw = s.get();
  s->loop_thread_ = std::thread([raw] { raw->Loop(); });
  return s;
}

AgentServer::~AgentServer() { Stop(); }

void AgentServer::Stop() {
  if (stop_.exchange(true)) return;
  Wake();
  if (loop_thread_.joinable()) loop_thread_.join();
  CloseAll();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    unlink(options_.socket_path.c_str());
    listen_fd_ = -1;
  }
}

void AgentServer::Wake() {
  const uint64_t one = 1;
  // Best effort: a full counter (never in practice) still wakes the loop.
  (void)!write(wake_.get(), &one, sizeof one);
}

void AgentServer::Loop() {
  epoll_event evs[64];
  while (!stop_) {
    const int n = epoll_wait(epoll_.get(), evs, 64, ExpireHellos(MonoNs()));
    for (int i = 0; i < n && !stop_; ++i) {
      const uint64_t tag = evs[i].data.u64;
      if (tag == kWakeTag) {
        uint64_t count;
        (void)!read(wake_.get(), &count, sizeof count);
      } else if (tag == kListenTag) {
        Accept();
      } else {
        OnReadable(tag);
      }
    }
    CloseKicked();
  }
}

void AgentServer::Accept() {
  // One per readiness: the listener is level-triggered, so a backlog brings
  // the loop straight back, between other connections' reads.
  int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) return;
  ucred cr{};
  socklen_t len = sizeof cr;
  const bool known = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0;
  absl::MutexLock l(&mu_);
  // A peer that cannot be told apart cannot be limited: refused.
  std::optional<AgentRefusal> why = known ? HostRefusal(cr.uid) : AgentRefusal::kPeerLimit;
  if (why) {
    close(fd);
    NoteRefusal(*why, known ? absl::StrCat("uid ", cr.uid, ", pid ", cr.pid) : "no SO_PEERCRED");
    return;
  }
  Conn* c = StartConn(fd, options_.vm, options_.devices, "", cr);
  if (c != nullptr) SetDeadline(c, MonoNs() + absl::ToInt64Nanoseconds(options_.hello_timeout));
}
std::optional<AgentRefusal> AgentServer::HostRefusal(uid_t uid) const {
  size_t open = 0, pending = 0;
  for (const auto& [id, c] : conns_) {
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

AgentServer::Conn* AgentServer::StartConn(int fd, std::string vm,
                                          std::vector<ChannelDevice> devices, std::string tag,
                                          std::optional<ucred> peer) {
  // Non-blocking: the one thread serving every connection must never wait
  // on one of them (a spurious readiness would stall the rest).
  const int flags = fcntl(fd, F_GETFL);
  const uint64_t id = next_conn_id_++;
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 || !Watch(epoll_.get(), fd, id)) {
    const int err = errno;
    Log(absl::StrCat("agent channel ", tag.empty() ? options_.socket_path : tag,
                     ": cannot serve the connection (errno ", err, ")"));
    close(fd);
    return nullptr;
  }
  AgentChannelStats& st = stats_[vm];
  st.vm = vm;
  ++st.connections_total;
  auto c = std::make_unique<Conn>();
  c->fd = fd;
  c->id = id;
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
  conns_[id] = std::move(c);
  return raw;
}

absl::Status AgentServer::AddConnection(int fd, std::string vm, std::vector<ChannelDevice> devices,
                                        std::string tag) {
  absl::MutexLock l(&mu_);
  if (stop_) {
    close(fd);
    return absl::UnavailableError("vkickd is stopping");
  }
  size_t open = 0;
  for (const auto& [id, c] : conns_)
    if (!c->done && !c->peer) ++open;
  if (open >= options_.max_vm_channels) {
    close(fd);
    ++refused_[static_cast<size_t>(AgentRefusal::kVmChannelLimit)];  // the caller logs it
    return absl::ResourceExhaustedError(
        absl::StrCat(open, " VM channels are open, the most this vkickd serves"));
  }
  if (StartConn(fd, std::move(vm), std::move(devices), std::move(tag), std::nullopt) == nullptr) {
    return absl::InternalError("cannot add the connection to the agent server's epoll set");
  }
  return absl::OkStatus();
}

std::set<std::string> AgentServer::LiveTags() const {
  std::set<std::string> out;
  absl::MutexLock l(&mu_);
  for (const auto& [id, c] : conns_)
    if (!c->done && !c->tag.empty()) out.insert(c->tag);
  return out;
}

void AgentServer::CloseTags(const std::set<std::string>& tags) {
  bool kicked = false;
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, c] : conns_) {
      if (c->done || c->tag.empty() || tags.count(c->tag) == 0) continue;
      // As a failed Send() does: the server's thread closes it.
      shutdown(c->fd, SHUT_RDWR);
      c->done = true;
      kicked_.push_back(id);
      kicked = true;
    }
  }
  if (kicked) Wake();
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

AgentServer::Conn* AgentServer::Find(uint64_t id) const {
  absl::MutexLock l(&mu_);
  auto it = conns_.find(id);
  return it == conns_.end() ? nullptr : it->second.get();
}

void AgentServer::OnReadable(uint64_t id) {
  Conn* c = Find(id);
  if (c == nullptr) return;  // closed earlier in this batch
  // One read per readiness (level-triggered): a busy agent cannot starve
  // the others.
  uint8_t buf[4096];
  const ssize_t r = read(c->fd, buf, sizeof buf);
  if (r < 0 && (errno == EINTR || errno == EAGAIN)) return;
  const bool reported = c->reports;
  bool dropped = false;
  const bool keep = Feed(c, buf, r, dropped);
  // Only --agent-socket connections have a hello deadline: a VM channel is
  // one per VM, and its guest's agent may start long after vkickd connected.
  // A bye restarts it: the agent must announce again.
  if (c->peer && reported != c->reports) {
    SetDeadline(c, c->reports ? 0 : MonoNs() + absl::ToInt64Nanoseconds(options_.hello_timeout));
  }
  NoteHello(c);
  if (!keep) Close(c, dropped);
}

void AgentServer::NoteHello(Conn* c) {
  bool now_hello;
  {
    absl::MutexLock l(&c->mu);
    now_hello = c->session->hello_seen();
  }
  if (!now_hello || c->hello) return;
  c->hello = true;
  Log(absl::StrCat("agent channel ", Name(*c), ": hello accepted (vm ", c->vm, ")"));
  if (options_.on_hello) options_.on_hello();
}

void AgentServer::SetDeadline(Conn* c, int64_t ns) {
  if (c->deadline_ns != 0) deadlines_.erase({c->deadline_ns, c->id});
  c->deadline_ns = ns;
  if (ns != 0) deadlines_.emplace(ns, c->id);
}

int AgentServer::ExpireHellos(int64_t now) {
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    Conn* c = Find(deadlines_.begin()->second);
    if (c == nullptr) {  // cannot happen (Close clears it): do not spin on it
      deadlines_.erase(deadlines_.begin());
      continue;
    }
    {
      absl::MutexLock l(&mu_);
      NoteRefusal(AgentRefusal::kHelloTimeout,
                  absl::StrCat("uid ", c->peer->uid, ", pid ", c->peer->pid,
                               ": no hello naming a device it owns within ",
                               absl::FormatDuration(options_.hello_timeout)));
    }
    Close(c, /*dropped=*/false);
  }
  if (deadlines_.empty()) return -1;  // nothing is due: sleep until an event
  // Rounded up: waking a little early would spin until the deadline.
  const int64_t ms = (deadlines_.begin()->first - now + 999'999) / 1'000'000;
  return static_cast<int>(std::min<int64_t>(ms, INT_MAX));
}

void AgentServer::CloseKicked() {
  std::vector<uint64_t> ids;
  {
    absl::MutexLock l(&mu_);
    ids.swap(kicked_);
  }
  for (uint64_t id : ids) {
    Conn* c = Find(id);
    if (c == nullptr) continue;  // its EOF (Send shut it down) closed it already
    bool dropped = false;
    Feed(c, nullptr, 0, dropped);  // as if the peer had closed
    Close(c, /*dropped=*/false);
  }
}

void AgentServer::Close(Conn* c, bool dropped) {
  if (dropped) Log(absl::StrCat("agent channel ", Name(*c), ": connection dropped by the guard (vm ",
                                c->vm, ")"));
  c->done = true;
  Release(*c);
  SetDeadline(c, 0);
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c->fd, nullptr);
  std::unique_ptr<Conn> gone;
  {
    absl::MutexLock l(&mu_);  // Send() writes under it: it no longer sees the fd
    auto it = conns_.find(c->id);
    gone = std::move(it->second);
    conns_.erase(it);
  }
  close(gone->fd);
}

void AgentServer::CloseAll() {
  std::map<uint64_t, std::unique_ptr<Conn>> all;
  {
    absl::MutexLock l(&mu_);
    all.swap(conns_);
  }
  for (auto& [id, c] : all) {
    Release(*c);
    close(c->fd);
  }
}

AgentServer::Collected AgentServer::Collect() {
  Collected out;
  absl::MutexLock l(&mu_);
  for (auto& [cid, c] : conns_) {
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
  bool kicked = false;
  {
    absl::MutexLock l(&mu_);
    for (auto& [id, c] : conns_) {
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
        // Not read by the agent (or closed): drop rather than queue. The
        // loop owns the connection's end, so it is told to close it.
        ++stats_[c->vm].dropped_total;
        shutdown(c->fd, SHUT_RDWR);
        c->done = true;
        kicked_.push_back(id);
        kicked = true;
      }
    }
  }
  if (kicked) Wake();
}

std::vector<AgentChannelStats> AgentServer::AllStats() const {
  absl::MutexLock l(&mu_);
  std::map<std::string, AgentChannelStats> all = stats_;
  for (auto& [vm, st] : all) st.connected = 0;
  for (const auto& [id, c] : conns_) {
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
