#include "controller/admin/admin_server.h"

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/unix_listener.h"

namespace vkick {

absl::StatusOr<uint32_t> LookupGroup(const std::string& name) {
  group g;
  group* out = nullptr;
  char buf[16384];
  if (getgrnam_r(name.c_str(), &g, buf, sizeof buf, &out) != 0 || out == nullptr)
    return absl::NotFoundError(absl::StrCat("--admin-group: no group '", name, "'"));
  return static_cast<uint32_t>(out->gr_gid);
}

absl::StatusOr<std::unique_ptr<AdminServer>> AdminServer::Start(AdminServerOptions options) {
  UnixListenOptions lo;
  // 0600 is root (or vkickd's user) only; with --admin-group, its members too.
  lo.mode = options.admin_gid ? 0660 : 0600;
  if (options.admin_gid) lo.group = static_cast<gid_t>(*options.admin_gid);
  lo.backlog = 8;
  // The directory (/run/vkick by default): create it, root-only traversal
  // is not required (the socket's own mode guards it).
  lo.create_parent_dir = true;
  lo.flag = "--admin-socket";
  lo.group_hint = "--admin-group: vkickd must be a member of that group (or have CAP_CHOWN)";
  absl::StatusOr<UniqueFd> fd = ListenUnix(options.socket_path, lo);
  if (!fd.ok()) return fd.status();
  std::unique_ptr<AdminServer> s(new AdminServer(std::move(options)));
  s->listen_fd_ = fd->Release();
  AdminServer* raw = s.get();
  s->thread_ = std::thread([raw] { raw->Loop(); });
  return s;
}

AdminServer::~AdminServer() { Stop(); }

void AdminServer::Stop() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    unlink(options_.socket_path.c_str());
    listen_fd_ = -1;
  }
}

void AdminServer::Loop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    Serve(fd);
    close(fd);
  }
}

namespace {

void WriteLine(int fd, const std::string& s) {
  std::string line = s + "\n";
  size_t off = 0;
  while (off < line.size()) {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 2000) <= 0) return;
    ssize_t w = send(fd, line.data() + off, line.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w <= 0 && errno != EAGAIN) return;
    if (w > 0) off += static_cast<size_t>(w);
  }
}

std::vector<uint32_t> PeerGroups(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseProcGroups(ss.str());
}

}  // namespace

void AdminServer::Serve(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      !AdminAuthorized(cred.uid, cred.gid, PeerGroups(cred.pid), geteuid(), options_.admin_gid)) {
    ++refused_;
    if (options_.log)
      options_.log(absl::StrCat("admin socket: refused uid ", cred.uid, " pid ", cred.pid));
    WriteLine(fd, ErrorReply("permission denied: the admin socket is for root or the admin "
                             "group"));
    return;
  }
  std::string buf;
  char chunk[4096];
  while (!stop_) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 5000) <= 0) return;  // idle: close
    ssize_t r = read(fd, chunk, sizeof chunk);
    if (r <= 0) return;
    buf.append(chunk, static_cast<size_t>(r));
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      ++requests_;
      absl::StatusOr<AdminRequest> req = ParseAdminRequest(line);
      if (!req.ok()) {
        ++bad_requests_;
        WriteLine(fd, ErrorReply(req.status().message()));
      } else {
        WriteLine(fd, options_.handler(*req));
      }
    }
    if (buf.size() > kMaxAdminLine) {
      ++bad_requests_;
      WriteLine(fd, ErrorReply("request too long"));
      return;
    }
  }
}

}  // namespace vkick
