// The thin socket side of the agent channel. Host-process drivers
// (vhost-user frontends such as vkick-blk) have their agent connect to
// --agent-socket, a unix socket vkickd listens on (mode 0660); every such
// connection is matched against the --vhost-user declarations. Each
// connection gets one reader thread and an AgentSession; the control loop
// collects samples/acks and sends policies through Collect()/Send().
//
// Bounded: at most max_connections agents (more are closed and counted);
// a session buffers at most one frame; a policy that cannot be written at
// once (the agent does not read) drops the connection instead of queueing.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "controller/channel/agent_session.h"

namespace vkick {

struct AgentServerOptions {
  std::string socket_path;  // --agent-socket; "" = no listener (VM channels only)
  uint32_t socket_mode = 0660;
  std::string vm;           // the `vm` label of connections on this socket
  std::vector<ChannelDevice> devices;
  proto::GuardConfig guard;
  size_t max_connections = 8;
  std::function<void(const std::string&)> log;
  // Called (from a reader thread) when an agent's hello was accepted, so the
  // loop can send its policy at once instead of at the next interval.
  std::function<void()> on_hello;
  // Called (from a reader thread, with that connection's lock held) when
  // samples arrived: the host-counted notification totals of those queues
  // (only), right now; queues the probes do not cover are left out. Stamped
  // on the samples (Collected::host_at_sample). Must not call back into the
  // AgentServer.
  std::function<std::map<QueueKey, uint64_t>(const std::set<QueueKey>&)> host_totals;
};

struct AgentChannelStats {
  std::string vm;
  uint32_t connected = 0;  // agents past hello right now
  std::array<uint64_t, proto::kRejectionCount> rejected{};
  uint64_t connections_total = 0;
  uint64_t dropped_total = 0;   // closed by the guard or a failed send
  uint64_t refused_total = 0;   // over max_connections
};

class AgentServer {
 public:
  static absl::StatusOr<std::unique_ptr<AgentServer>> Start(AgentServerOptions options);
  ~AgentServer();  // Stop()s
  void Stop();

  // A connection vkickd opened itself (a VM's virtio-serial chardev socket):
  // served like an accepted one, matched against `devices`, labelled `vm`.
  // `tag` names it (LiveTags) so the caller reconnects only when it is gone.
  void AddConnection(int fd, std::string vm, std::vector<ChannelDevice> devices,
                     std::string tag);
  // The tags of the connections still open, in one pass (a caller checking
  // a fleet of VMs asks once, not once per VM).
  std::set<std::string> LiveTags() const;

  struct Collected {
    std::map<QueueKey, proto::QueueSample> samples;
    std::vector<std::pair<QueueKey, uint64_t>> acks;
    std::set<QueueKey> connected_queues;  // reported on by a live agent
    std::set<QueueKey> observed_only;     // of those, run by the guest kernel's virtio_blk
    std::map<QueueKey, proto::DriverKind> driver_of;  // who drives each connected queue
    // The announcement (connection id, and hello count on it: never reused)
    // reporting on each connected queue. An agent re-announces (bye, hello)
    // when its driver set changes, so a new value means the queue may have a
    // new driver.
    std::map<QueueKey, uint64_t> connection_of;
    // The host's notification total when a sample's latest part arrived
    // (only for samples that were stamped: see AgentServerOptions::host_totals).
    std::map<QueueKey, uint64_t> host_at_sample;
  };
  Collected Collect();
  void Send(const std::vector<PolicyOut>& policies);
  AgentChannelStats Stats() const;  // the listener's vm (options.vm)
  std::vector<AgentChannelStats> AllStats() const;  // every vm seen, sorted

 private:
  struct Conn {
    int fd = -1;
    std::string vm;
    std::string tag;
    uint64_t id = 0;                        // Collected::connection_of
    std::unique_ptr<AgentSession> session;  // guarded by mu
    absl::Mutex mu;
    std::atomic<bool> done{false};
    std::thread thread;
  };
  explicit AgentServer(AgentServerOptions options) : options_(std::move(options)) {}
  void AcceptLoop();
  void ReadLoop(Conn* c);
  void Reap(bool all);
  void StartConn(int fd, std::string vm, std::vector<ChannelDevice> devices, std::string tag)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(const std::string& s) const {
    if (options_.log) options_.log(s);
  }

  const AgentServerOptions options_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  uint64_t next_conn_id_ ABSL_GUARDED_BY(mu_) = 1;
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Conn>> conns_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, AgentChannelStats> stats_ ABSL_GUARDED_BY(mu_);  // by vm
};

}  // namespace vkick
