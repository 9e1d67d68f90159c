#include "common/unix_listener.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"

namespace vkick {
namespace {

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path, const std::string& flag) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  // sun_path keeps its terminating NUL: one byte less than its size.
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return absl::InvalidArgumentError(absl::StrCat(flag, flag.empty() ? "" : ": ",
                                                   "bad unix socket path '", path,
                                                   "' (empty, or longer than ",
                                                   sizeof addr.sun_path - 1, " bytes)"));
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// A socket file left by a killed process is removed so we can bind again; a
// live listener (a second vkickd) or a non-socket file is never touched.
absl::Status ClearStalePath(const std::string& path, const sockaddr_un& addr) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();  // nothing there
  if (!S_ISSOCK(st.st_mode))
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a socket"));
  UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  bool live = probe.valid() &&
              connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  if (live) return absl::AlreadyExistsError(absl::StrCat(path, ": another vkickd listens"));
  unlink(path.c_str());  // if this fails, bind() says why (EADDRINUSE)
  return absl::OkStatus();
}

// bind() creates the file with 0777 & ~umask; under umask 0177 it starts as
// 0600, so nobody else can connect before SetPermissions(). umask is
// per-process: a file another thread creates meanwhile is only stricter.
absl::Status BindOwnerOnly(int fd, const std::string& path, const sockaddr_un& addr) {
  mode_t old = umask(0177);
  int rc = bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int err = errno;
  umask(old);
  if (rc != 0) return ErrnoStatus(err, absl::StrCat("bind ", path));
  return absl::OkStatus();
}

// Group first, mode second: the group bits open up only once the group is right.
absl::Status SetPermissions(const std::string& path, const UnixListenOptions& o) {
  if (o.group && chown(path.c_str(), static_cast<uid_t>(-1), *o.group) != 0)
    return ErrnoStatus(errno, absl::StrCat("chgrp ", path, " to gid ", *o.group), o.group_hint);
  if (chmod(path.c_str(), o.mode) != 0) return ErrnoStatus(errno, absl::StrCat("chmod ", path));
  return absl::OkStatus();
}

// Everything after bind(): on failure the file is removed again.
absl::Status FinishListener(int fd, const std::string& path, const UnixListenOptions& o) {
  absl::Status s = SetPermissions(path, o);
  if (s.ok() && listen(fd, o.backlog) != 0) s = ErrnoStatus(errno, absl::StrCat("listen ", path));
  if (!s.ok()) unlink(path.c_str());
  return s;
}

}  // namespace

absl::StatusOr<UniqueFd> ListenUnix(const std::string& path, const UnixListenOptions& options) {
  absl::StatusOr<sockaddr_un> addr = UnixAddress(path, options.flag);
  if (!addr.ok()) return addr.status();
  if (options.create_parent_dir) {
    // Errors are left to bind(), which then names the missing directory.
    if (size_t slash = path.rfind('/'); slash != std::string::npos && slash > 0)
      mkdir(path.substr(0, slash).c_str(), 0755);
  }
  if (absl::Status s = ClearStalePath(path, *addr); !s.ok()) return s;
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("socket for ", path));
  if (absl::Status s = BindOwnerOnly(fd.get(), path, *addr); !s.ok()) return s;
  if (absl::Status s = FinishListener(fd.get(), path, options); !s.ok()) return s;
  return fd;
}

}  // namespace vkick
