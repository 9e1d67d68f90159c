// Which fd of a process is its connection to a given unix socket path: used
// to find QEMU's vhost-user socket fd, so the probes can attribute the
// SET_VRING_KICK messages QEMU sends over it.
//
// How: /proc/<pid>/fd gives the process's socket inodes; NETLINK_SOCK_DIAG
// (unix_diag, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER) gives each unix socket's
// bound name and its peer's inode. A socket accepted by a server reports the
// listening socket's path as its own name, so:
//   * process is the client (QEMU's usual vhost-user role): its socket's
//     peer is named `path`;
//   * process is the server (chardev server=on): its accepted socket itself
//     is named `path` and has a peer.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace vkick {

struct UnixSocketInfo {
  std::string name;   // bound path ("" if unbound; abstract names start with '\0')
  uint32_t peer = 0;  // peer's inode, 0 if none
};

// Pure matching: the lowest fd whose socket is connected to `path`.
// kNotFound if none.
absl::StatusOr<int> MatchUnixSocketFd(const std::map<int, uint32_t>& fd_to_inode,
                                      const std::map<uint32_t, UnixSocketInfo>& sockets,
                                      absl::string_view path);

// fd → socket inode for every socket fd of `pid` (/proc/<pid>/fd).
absl::StatusOr<std::map<int, uint32_t>> ListSocketFds(pid_t pid);
// Every connected unix socket on the host (sock_diag dump).
absl::StatusOr<std::map<uint32_t, UnixSocketInfo>> DumpUnixSockets();

// The two above, combined.
absl::StatusOr<int> FindUnixSocketFd(pid_t pid, absl::string_view path);

}  // namespace vkick
