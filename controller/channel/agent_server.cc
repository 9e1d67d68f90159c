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
    absl::MutexLock l(&mu_);
    StartConn(fd, options_.vm, options_.devices, "");
  }
}

void AgentServer::StartConn(int fd, std::string vm, std::vector<ChannelDevice> devices,
                            std::string tag) {
  AgentChannelStats& st = stats_[vm];
  st.vm = vm;
  if (conns_.size() >= options_.max_connections) {
    ++st.refused_total;
    close(fd);
    return;
  }
  ++st.connections_total;
  auto c = std::make_unique<Conn>();
  c->fd = fd;
  c->id = next_conn_id_++;
  c->vm = std::move(vm);
  c->tag = std::move(tag);
  c->session = std::make_unique<AgentSession>(options_.guard, std::move(devices), MonoNs());
  Conn* raw = c.get();
  c->thread = std::thread([this, raw] { ReadLoop(raw); });
  conns_.push_back(std::move(c));
}

void AgentServer::AddConnection(int fd, std::string vm, std::vector<ChannelDevice> devices,
                                std::string tag) {
  absl::MutexLock l(&mu_);
  if (stop_) {
    close(fd);
    return;
  }
  StartConn(fd, std::move(vm), std::move(devices), std::move(tag));
}

std::set<std::string> AgentServer::LiveTags() const {
  std::set<std::string> out;
  absl::MutexLock l(&mu_);
  for (const auto& c : conns_)
    if (!c->done && !c->tag.empty()) out.insert(c->tag);
  return out;
}

void AgentServer::ReadLoop(Conn* c) {
  uint8_t buf[4096];
  bool hello = false;
  bool dropped = false;
  while (!stop_) {
    pollfd p{c->fd, POLLIN, 0};
    int n = poll(&p, 1, 200);
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    ssize_t r = read(c->fd, buf, sizeof buf);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    bool keep;
    bool now_hello;
    std::array<uint64_t, proto::kRejectionCount> rej;
    {
      absl::MutexLock l(&c->mu);
      if (r <= 0) {
        c->session->Finish(MonoNs());
        keep = false;
      } else {
        keep = c->session->Feed(std::span<const uint8_t>(buf, static_cast<size_t>(r)), MonoNs());
        dropped = !keep;
        if (keep && options_.host_totals && c->session->has_unstamped())
          c->session->StampHost(options_.host_totals(c->session->unstamped()));
      }
      now_hello = c->session->hello_seen();
      rej = c->session->TakeRejections();
    }
    {
      absl::MutexLock l(&mu_);
      AgentChannelStats& st = stats_[c->vm];
      for (size_t i = 0; i < rej.size(); ++i) st.rejected[i] += rej[i];
      if (dropped) ++st.dropped_total;
    }
    if (now_hello && !hello) {
      hello = true;
      Log(absl::StrCat("agent channel ", c->tag.empty() ? options_.socket_path : c->tag,
                       ": hello accepted (vm ", c->vm, ")"));
      if (options_.on_hello) options_.on_hello();
    }
    if (!keep) break;
  }
  if (dropped) Log(absl::StrCat("agent channel ", c->tag.empty() ? options_.socket_path : c->tag,
                                ": connection dropped by the guard (vm ", c->vm, ")"));
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

AgentChannelStats AgentServer::Stats() const {
  for (AgentChannelStats& s : AllStats())
    if (s.vm == options_.vm) return s;
  AgentChannelStats s;
  s.vm = options_.vm;
  return s;
}

}  // namespace vkick
