// The one way vkick servers (agent channel, admin socket) listen on a unix
// socket path, so they agree on the rules:
//   * another process listening on the path: refused (kAlreadyExists);
//   * a socket file nobody listens on (a killed daemon's): replaced;
//   * any other file at the path: refused (kFailedPrecondition);
//   * the socket file never has a looser mode than asked, not even between
//     bind() and chmod(): it is created owner-only, given to the group, then
//     opened up to `mode`.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"

namespace vkick {

struct UnixListenOptions {
  mode_t mode = 0600;          // the socket file's final permission bits
  std::optional<gid_t> group;  // chgrp the socket file to this group (before `mode` applies)
  int backlog = 16;
  // mkdir the parent directory (0755) first; an existing one is left alone.
  bool create_parent_dir = false;
  // Names the path in a bad-path error, e.g. "--agent-socket".
  std::string flag;
  // Appended to a chgrp refused with EPERM/EACCES: how to fix it.
  std::string group_hint;
};

// A listening AF_UNIX stream socket bound to `path` (non-blocking,
// close-on-exec). Errors: kInvalidArgument for an empty or too long path,
// kFailedPrecondition / kAlreadyExists as above, else the errno's code
// (ErrnoStatus; the message names the step and the path). On error nothing
// is left at `path` by this call. The caller unlinks `path` when it is done.
absl::StatusOr<UniqueFd> ListenUnix(const std::string& path, const UnixListenOptions& options);

}  // namespace vkick
