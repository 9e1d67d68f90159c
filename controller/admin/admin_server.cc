#include "controller/admin/admin_server.h"

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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

namespace {

// Client threads wake at least this often to notice Stop().
constexpr absl::Duration kPollSlice = absl::Milliseconds(200);

int PollMs(absl::Duration left) {
  int64_t ms = absl::ToInt64Milliseconds(std::min(left, kPollSlice));
  return static_cast<int>(std::max<int64_t>(1, ms));
}

std::vector<uint32_t> PeerGroups(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseProcGroups(ss.str());
}

}  // namespace

void AdminServer::Stop() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  // The accept thread is gone: clients_ is ours. Each client sees stop_
  // within a poll slice.
  for (Client& c : clients_) c.thread.join();
  clients_.clear();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    unlink(options_.socket_path.c_str());
    listen_fd_ = -1;
  }
}

void AdminServer::Loop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    int n = poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(kPollSlice)));
    Reap();  // before Admit: finished clients free their slots
    if (n <= 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) Admit(fd);
  }
}

void AdminServer::Reap() {
  for (auto it = clients_.begin(); it != clients_.end();) {
    if (!it->done) {
      ++it;
      continue;
    }
    it->thread.join();
    it = clients_.erase(it);
  }
}

void AdminServer::Admit(int fd) {
  auto turn_away = [&] {
    ++busy_refused_;
    // One non-blocking try: the accept thread never waits on a peer.
    std::string line = ErrorReply("busy: too many admin clients, try again") + "\n";
    send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    close(fd);
  };
  if (clients_.size() >= static_cast<size_t>(std::max(1, options_.max_clients))) {
    turn_away();
    return;
  }
  Client& c = clients_.emplace_back();
  try {
    c.thread = std::thread([this, fd, &c] {
      Serve(fd);
      close(fd);
      c.done = true;
    });
  } catch (const std::system_error&) {  // no thread to be had: as if busy
    clients_.pop_back();
    turn_away();
  }
}

// The reply gets line_deadline in all: a peer that stops reading is cut.
void AdminServer::WriteLine(int fd, const std::string& s) {
  std::string line = s + "\n";
  const absl::Time deadline = absl::Now() + options_.line_deadline;
  size_t off = 0;
  while (off < line.size() && !stop_) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return;
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, PollMs(left)) <= 0) continue;
    ssize_t w = send(fd, line.data() + off, line.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0 && errno != EAGAIN && errno != EINTR) return;
    if (w > 0) off += static_cast<size_t>(w);
  }
}

bool AdminServer::Authorize(int fd, AdminPeer& peer) {
  ucred cred{};
  socklen_t len = sizeof cred;
  bool ok = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 &&
            AdminAuthorized(cred.uid, cred.gid, PeerGroups(cred.pid), geteuid(),
                            options_.admin_gid);
  peer = AdminPeer{cred.uid, cred.gid, cred.pid};
  if (ok) return true;
  ++refused_;
  if (options_.log)
    options_.log(absl::StrCat("admin socket: refused uid ", cred.uid, " pid ", cred.pid));
  WriteLine(fd, ErrorReply("permission denied: the admin socket is for root or the admin "
                           "group"));
  return false;
}

void AdminServer::Answer(int fd, const std::string& line, const AdminPeer& peer) {
  ++requests_;
  absl::StatusOr<AdminRequest> req = ParseAdminRequest(line);
  if (!req.ok()) {
    ++bad_requests_;
    WriteLine(fd, ErrorReply(req.status().message()));
    return;
  }
  WriteLine(fd, options_.handler(*req, peer));
}

// Each request line has line_deadline from the connection (or the previous
// reply) in total, so trickling bytes buys no time.
void AdminServer::Serve(int fd) {
  AdminPeer peer;
  if (!Authorize(fd, peer)) return;
  std::string buf;
  char chunk[4096];
  absl::Time deadline = absl::Now() + options_.line_deadline;
  while (!stop_) {
    for (size_t nl; (nl = buf.find('\n')) != std::string::npos;) {
      Answer(fd, buf.substr(0, nl), peer);
      buf.erase(0, nl + 1);
      deadline = absl::Now() + options_.line_deadline;
    }
    if (buf.size() > kMaxAdminLine) {
      ++bad_requests_;
      WriteLine(fd, ErrorReply("request too long"));
      return;
    }
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      ++deadline_closed_;
      WriteLine(fd, ErrorReply(absl::StrCat("no complete request line within ",
                                            absl::FormatDuration(options_.line_deadline))));
      return;
    }
    pollfd p{fd, POLLIN, 0};
    int n = poll(&p, 1, PollMs(left));
    if (n < 0 && errno != EINTR) return;
    if (n <= 0) continue;
    ssize_t r = read(fd, chunk, sizeof chunk);
    if (r <= 0) return;
    buf.append(chunk, static_cast<size_t>(r));
  }
}

}  // namespace vkick
