// The admin unix socket: mode 0600, or 0660 and chgrp'ed to --admin-group.
// Every connection's SO_PEERCRED is checked (AdminAuthorized); a refused
// peer gets one error line and is closed, and is counted. One connection
// at a time, each bounded in line length and idle time: admin traffic is a
// human with vkickctl.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "controller/admin/admin_protocol.h"

namespace vkick {

struct AdminServerOptions {
  std::string socket_path;
  std::optional<uint32_t> admin_gid;  // --admin-group resolved
  // Answers one request line (already authorized) with one reply line.
  std::function<std::string(const AdminRequest&)> handler;
  std::function<void(const std::string&)> log;
};

class AdminServer {
 public:
  static absl::StatusOr<std::unique_ptr<AdminServer>> Start(AdminServerOptions options);
  ~AdminServer();
  void Stop();
  uint64_t refused() const { return refused_; }
  uint64_t requests() const { return requests_; }
  uint64_t bad_requests() const { return bad_requests_; }

 private:
  explicit AdminServer(AdminServerOptions o) : options_(std::move(o)) {}
  void Loop();
  void Serve(int fd);

  const AdminServerOptions options_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> refused_{0}, requests_{0}, bad_requests_{0};
  std::thread thread_;
};

// --admin-group=NAME -> gid.
absl::StatusOr<uint32_t> LookupGroup(const std::string& name);

}  // namespace vkick
