#include "controller/discovery/unix_socket_fd.h"

#include <dirent.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/unique_fd.h"

namespace vkick {
namespace {

// Bounds what a host with very many sockets can make us hold.
constexpr size_t kMaxSockets = 1 << 20;
constexpr int kTcpEstablished = 1;  // TCP_ESTABLISHED: connected unix stream sockets

}  // namespace

absl::StatusOr<int> MatchUnixSocketFd(const std::map<int, uint32_t>& fd_to_inode,
                                      const std::map<uint32_t, UnixSocketInfo>& sockets,
                                      absl::string_view path) {
  if (path.empty()) return absl::InvalidArgumentError("empty socket path");
  for (const auto& [fd, inode] : fd_to_inode) {  // std::map: ascending fds
    auto self = sockets.find(inode);
    if (self == sockets.end() || self->second.peer == 0) continue;
    if (self->second.name == path) return fd;  // accepted by us, as the server
    auto peer = sockets.find(self->second.peer);
    if (peer != sockets.end() && peer->second.name == path) return fd;  // we connected
  }
  return absl::NotFoundError(absl::StrCat("no socket connected to ", path));
}

absl::StatusOr<std::map<int, uint32_t>> ListSocketFds(pid_t pid) {
  std::string dir = absl::StrCat("/proc/", pid, "/fd");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("opendir ", dir));
  std::map<int, uint32_t> out;
  while (struct dirent* e = ::readdir(d)) {
    int fd;
    if (!absl::SimpleAtoi(e->d_name, &fd)) continue;
    char target[64];
    std::string link = absl::StrCat(dir, "/", e->d_name);
    ssize_t n = ::readlink(link.c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;  // closed meanwhile
    absl::string_view t(target, static_cast<size_t>(n));
    if (!absl::ConsumePrefix(&t, "socket:[") || !absl::ConsumeSuffix(&t, "]")) continue;
    uint32_t inode;
    if (absl::SimpleAtoi(t, &inode)) out[fd] = inode;
  }
  ::closedir(d);
  return out;
}

absl::StatusOr<std::map<uint32_t, UnixSocketInfo>> DumpUnixSockets() {
  UniqueFd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!nl.valid()) return absl::ErrnoToStatus(errno, "socket(NETLINK_SOCK_DIAG)");
  // A receive timeout so a misbehaving kernel cannot hang discovery.
  struct timeval tv = {2, 0};
  ::setsockopt(nl.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

  struct {
    struct nlmsghdr nlh;
    struct unix_diag_req req;
  } request = {};
  request.nlh.nlmsg_len = sizeof(request);
  request.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  request.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  request.nlh.nlmsg_seq = 1;
  request.req.sdiag_family = AF_UNIX;
  request.req.udiag_states = 1u << kTcpEstablished;
  request.req.udiag_show = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER;
  struct sockaddr_nl kernel = {};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl.get(), &request, sizeof(request), 0, reinterpret_cast<sockaddr*>(&kernel),
               sizeof(kernel)) < 0) {
    return absl::ErrnoToStatus(errno, "sock_diag request");
  }

  std::map<uint32_t, UnixSocketInfo> out;
  alignas(struct nlmsghdr) char buf[32768];
  for (;;) {
    ssize_t n = ::recv(nl.get(), buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, "sock_diag recv");
    }
    if (n == 0) return absl::UnavailableError("sock_diag: unexpected end of dump");
    int len = static_cast<int>(n);
    for (struct nlmsghdr* h = reinterpret_cast<struct nlmsghdr*>(buf); NLMSG_OK(h, len);
         h = NLMSG_NEXT(h, len)) {
      if (h->nlmsg_type == NLMSG_DONE) return out;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const auto* err = static_cast<const struct nlmsgerr*>(NLMSG_DATA(h));
        return absl::ErrnoToStatus(-err->error, "sock_diag");
      }
      if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct unix_diag_msg))) continue;
      const auto* msg = static_cast<const struct unix_diag_msg*>(NLMSG_DATA(h));
      UnixSocketInfo info;
      int attr_len = static_cast<int>(h->nlmsg_len - NLMSG_LENGTH(sizeof(*msg)));
      for (const struct rtattr* a = reinterpret_cast<const struct rtattr*>(msg + 1);
           RTA_OK(a, attr_len); a = RTA_NEXT(a, attr_len)) {
        const char* data = static_cast<const char*>(RTA_DATA(a));
        size_t data_len = RTA_PAYLOAD(a);
        if (a->rta_type == UNIX_DIAG_NAME) {
          // Not NUL-terminated; filesystem names may carry trailing NULs.
          std::string name(data, data_len);
          if (!name.empty() && name[0] != '\0') name = name.c_str();
          info.name = std::move(name);
        } else if (a->rta_type == UNIX_DIAG_PEER && data_len >= sizeof(uint32_t)) {
          std::memcpy(&info.peer, data, sizeof(uint32_t));
        }
      }
      if (out.size() >= kMaxSockets) {
        return absl::ResourceExhaustedError("sock_diag: too many unix sockets");
      }
      out[msg->udiag_ino] = std::move(info);
    }
  }
}

absl::StatusOr<int> FindUnixSocketFd(pid_t pid, absl::string_view path) {
  absl::StatusOr<std::map<int, uint32_t>> fds = ListSocketFds(pid);
  if (!fds.ok()) return fds.status();
  absl::StatusOr<std::map<uint32_t, UnixSocketInfo>> sockets = DumpUnixSockets();
  if (!sockets.ok()) return sockets.status();
  absl::StatusOr<int> fd = MatchUnixSocketFd(*fds, *sockets, path);
  if (!fd.ok()) {
    return absl::NotFoundError(absl::StrCat("pid ", pid, ": ", fd.status().message()));
  }
  return fd;
}

}  // namespace vkick
