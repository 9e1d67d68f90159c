// The admin unix socket: mode 0600, or 0660 and chgrp'ed to --admin-group.
// Every connection's SO_PEERCRED is checked (AdminAuthorized); a refused
// peer gets one error line and is closed, and is counted. Clients are
// served concurrently, each on its own thread, so a slow one cannot lock
// vkickctl out; there are at most max_clients at once (one more is told
// "busy" and closed), and each request line must arrive within
// line_deadline of the connection (or of the previous reply), however the
// bytes trickle in.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "controller/admin/admin_protocol.h"

namespace vkick {

struct AdminServerOptions {
  std::string socket_path;
  std::optional<uint32_t> admin_gid;  // --admin-group resolved
  // Answers one request line (already authorized) with one reply line.
  // Called from several client threads at once: must be thread-safe.
  std::function<std::string(const AdminRequest&, const AdminPeer&)> handler;
  std::function<void(const std::string&)> log;
  int max_clients = 16;
  absl::Duration line_deadline = absl::Seconds(5);
};

class AdminServer {
 public:
  static absl::StatusOr<std::unique_ptr<AdminServer>> Start(AdminServerOptions options);
  ~AdminServer();
  void Stop();
  uint64_t refused() const { return refused_; }  // SO_PEERCRED not authorized
  uint64_t requests() const { return requests_; }
  uint64_t bad_requests() const { return bad_requests_; }
  // Closed because a request line was not complete by its deadline.
  uint64_t deadline_closed() const { return deadline_closed_; }
  // Turned away at accept: max_clients were already connected.
  uint64_t busy_refused() const { return busy_refused_; }

 private:
  struct Client {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  explicit AdminServer(AdminServerOptions o) : options_(std::move(o)) {}
  void Loop();
  void Admit(int fd);
  void Reap();
  void Serve(int fd);
  bool Authorize(int fd, AdminPeer& peer);
  void Answer(int fd, const std::string& line, const AdminPeer& peer);
  void WriteLine(int fd, const std::string& s);

  const AdminServerOptions options_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> refused_{0}, requests_{0}, bad_requests_{0};
  std::atomic<uint64_t> deadline_closed_{0}, busy_refused_{0};
  std::thread thread_;
  std::list<Client> clients_;  // the accept thread's (Stop's once it is joined)
};

// --admin-group=NAME -> gid.
absl::StatusOr<uint32_t> LookupGroup(const std::string& name);

}  // namespace vkick
