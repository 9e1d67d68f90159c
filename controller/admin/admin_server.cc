#include "controller/admin/admin_server.h"

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

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
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string path = options.socket_path;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return absl::InvalidArgumentError(absl::StrCat("--admin-socket: bad path '", path, "'"));
  std::memcpy(addr.sun_path, path.data(), path.size());
  // The directory (/run/vkick by default): create it, root-only traversal
  // is not required (the socket's own mode guards it).
  if (size_t slash = path.rfind('/'); slash != std::string::npos && slash > 0) {
    mkdir(path.substr(0, slash).c_str(), 0755);
  }
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a socket"));
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool live = probe >= 0 && connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    if (probe >= 0) close(probe);
    if (live) return absl::AlreadyExistsError(absl::StrCat(path, ": another vkickd listens"));
    unlink(path.c_str());
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
  // Create it with no access for anyone but us, then open it up.
  mode_t old = umask(0177);
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  umask(old);
  if (rc != 0) {
    std::string e = strerror(errno);
    close(fd);
    return absl::UnavailableError(absl::StrCat("bind ", path, ": ", e));
  }
  if (options.admin_gid) {
    if (chown(path.c_str(), static_cast<uid_t>(-1), *options.admin_gid) != 0 ||
        chmod(path.c_str(), 0660) != 0) {
      std::string e = strerror(errno);
      close(fd);
      unlink(path.c_str());
      return absl::PermissionDeniedError(
          absl::StrCat("--admin-group: cannot give ", path, " to the group: ", e));
    }
  } else {
    chmod(path.c_str(), 0600);
  }
  if (listen(fd, 8) != 0) {
    std::string e = strerror(errno);
    close(fd);
    unlink(path.c_str());
    return absl::UnavailableError(absl::StrCat("listen ", path, ": ", e));
  }
  std::unique_ptr<AdminServer> s(new AdminServer(std::move(options)));
  s->listen_fd_ = fd;
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
