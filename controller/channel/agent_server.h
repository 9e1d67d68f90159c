// The thin socket side of the agent channel. Host-process drivers
// (vhost-user frontends such as vkick-blk) have their agent connect to
// --agent-socket, a unix socket vkickd listens on (mode 0660); every such
// connection is matched against the --vhost-user declarations. Each
// connection gets an AgentSession; one thread serves the listener and every
// connection with epoll (a thread per connection cost 1000 threads at 1000
// VMs); the control loop collects samples/acks and sends policies through
// Collect()/Send().
//
// Bounded, and nothing a peer can hold: --agent-socket connections have
// their own cap (max_connections), of which one uid may hold at most
// max_pending_per_uid before it says hello, and a connection that has not
// said a hello naming a device it owns within hello_timeout is closed; VM
// channels have a separate cap, so host connections never crowd them out.
// Every refusal is counted by reason (Refused()). One owner per (vm,
// device): the process (SO_PEERCRED pid) or VM channel that announced it
// first, while connected; another's announcement of it is rejected
// (device_owned). A session buffers at most one frame; a policy that cannot
// be written at once (the agent does not read) drops the connection instead
// of queueing.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/socket.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"
#include "controller/channel/agent_session.h"
#include "controller/loop/loop_snapshot.h"

namespace vkick {

struct AgentServerOptions {
  std::string socket_path;  // --agent-socket; "" = no listener (VM channels only)
  uint32_t socket_mode = 0660;
  std::string vm;           // the `vm` label of connections on this socket
  std::vector<ChannelDevice> devices;
  proto::GuardConfig guard;
  // --agent-socket connections open at once (VM channels are not counted).
  size_t max_connections = 8;
  // Of those, per peer uid (SO_PEERCRED): the ones yet to say a hello naming
  // a device they own. One user's idle connections leave the rest free.
  size_t max_pending_per_uid = 4;
  // An --agent-socket connection that has not said such a hello within this
  // (since it connected, or since its bye) is closed: an agent announcing
  // nothing vkickd serves retries with its backoff.
  absl::Duration hello_timeout = absl::Seconds(2);
  // VM channels (AddConnection) open at once: one per VM, so vkickd sets it
  // to the VMs it can attach.
  size_t max_vm_channels = 64;
  std::function<void(const std::string&)> log;
  // Called (from the server's thread) when an agent's hello was accepted, so the
  // loop can send its policy at once instead of at the next interval.
  std::function<void()> on_hello;
  // Called (from the server's thread, with that connection's lock held) when
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
};

class AgentServer {
 public:
  static absl::StatusOr<std::unique_ptr<AgentServer>> Start(AgentServerOptions options);
  ~AgentServer();  // Stop()s
  void Stop();

  // A connection vkickd opened itself (a VM's virtio-serial chardev socket):
  // served like an accepted one, matched against `devices`, labelled `vm`.
  // `tag` names it (LiveTags) so the caller reconnects only when it is gone.
  // Not OK: refused (closed, counted), the message says why.
  absl::Status AddConnection(int fd, std::string vm, std::vector<ChannelDevice> devices,
                             std::string tag);
  // The tags of the connections still open, in one pass (a caller checking
  // a fleet of VMs asks once, not once per VM).
  std::set<std::string> LiveTags() const;
  // Closes the connections with these tags (on the server's thread, soon):
  // their devices are free to be announced by another connection then.
  void CloseTags(const std::set<std::string>& tags);

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
  // Connections refused (or closed before a hello) since start, by reason.
  std::array<uint64_t, kAgentRefusalCount> Refused() const;

 private:
  struct Conn {
    int fd = -1;
    std::string vm;
    std::string tag;
    uint64_t id = 0;                        // Collected::connection_of
    std::optional<ucred> peer;              // --agent-socket; none: a VM channel
    std::string owner;                      // "pid N", or the VM channel: owns what it claims
    std::atomic<bool> reports{false};       // AgentSession::reports()
    std::unique_ptr<AgentSession> session;  // guarded by mu
    absl::Mutex mu;
    std::atomic<bool> done{false};          // Send() failed: the loop closes it
    // The server's thread only:
    bool hello = false;                     // hello logged, on_hello called
    int64_t deadline_ns = 0;                // hello deadline (deadlines_); 0: none
  };
  // Who reports on a device, and the claimant last refused (logged once).
  struct Owner {
    std::string who;           // Conn::owner of the holders
    std::set<uint64_t> conns;  // its live connections reporting on the device
    std::string last_refused;
  };
  explicit AgentServer(AgentServerOptions options) : options_(std::move(options)) {}
  void Loop();
  void Wake();
  void Accept();
  void OnReadable(uint64_t id);
  // Feeds `n` bytes (0: the peer closed) under the connection's lock; false:
  // the connection ends. `dropped`: by the guard.
  bool Feed(Conn* c, const uint8_t* buf, ssize_t n, bool& dropped);
  void NoteHello(Conn* c);
  // Closes the --agent-socket connections past their hello deadline; the
  // epoll_wait timeout until the next deadline (-1: none).
  int ExpireHellos(int64_t now);
  void SetDeadline(Conn* c, int64_t ns);
  void CloseKicked();
  void Close(Conn* c, bool dropped);
  void CloseAll();
  Conn* Find(uint64_t id) const;
  // Registers `fd` with the loop; nullptr (fd closed) if it cannot.
  Conn* StartConn(int fd, std::string vm, std::vector<ChannelDevice> devices, std::string tag,
                  std::optional<ucred> peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Why a new --agent-socket connection from `uid` is refused, if it is.
  std::optional<AgentRefusal> HostRefusal(uid_t uid) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts a refusal; logs a line per reason at most once a minute.
  void NoteRefusal(AgentRefusal why, const std::string& detail) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Claim(Conn* c, const ChannelDevice& d);  // AgentSession's DeviceClaim
  void Release(const Conn& c);                  // its claims end with it
  std::string Name(const Conn& c) const {
    return c.tag.empty() ? options_.socket_path : c.tag;
  }
  void Log(const std::string& s) const {
    if (options_.log) options_.log(s);
  }

  const AgentServerOptions options_;
  int listen_fd_ = -1;
  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd: Stop() and Send()'s failures wake the loop
  std::atomic<bool> stop_{false};
  std::thread loop_thread_;
  // Pending hello deadlines (ns, connection id): the server's thread only.
  std::set<std::pair<int64_t, uint64_t>> deadlines_;
  uint64_t next_conn_id_ ABSL_GUARDED_BY(mu_) = 1;
  mutable absl::Mutex mu_;
  // By id. Only the server's thread erases (Stop() once it has ended), so it
  // may use a Conn* without mu_ held.
  std::map<uint64_t, std::unique_ptr<Conn>> conns_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> kicked_ ABSL_GUARDED_BY(mu_);  // Send() failed: to close
  std::map<std::string, AgentChannelStats> stats_ ABSL_GUARDED_BY(mu_);  // by vm
  std::array<uint64_t, kAgentRefusalCount> refused_ ABSL_GUARDED_BY(mu_){};
  std::array<uint64_t, kAgentRefusalCount> refused_logged_ ABSL_GUARDED_BY(mu_){};
  std::array<int64_t, kAgentRefusalCount> refusal_log_ns_ ABSL_GUARDED_BY(mu_){};
  // A leaf lock: taken by Claim under a connection's lock.
  absl::Mutex owners_mu_;
  std::map<std::pair<std::string, std::string>, Owner> owners_ ABSL_GUARDED_BY(owners_mu_);
};

}  // namespace vkick
