#include "controller/probes/map_read.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::Status ProbeErrnoStatus(int err, absl::string_view what) {
  err = err < 0 ? -err : err;
  std::string msg = absl::StrCat(what, ": ", std::strerror(err), " (errno ", err, ")");
  switch (err) {
    case EPERM:
    case EACCES:
      return absl::PermissionDeniedError(
          absl::StrCat(msg, "; the host probes need root (CAP_BPF + CAP_PERFMON)"));
    case ENOENT:
      return absl::NotFoundError(msg);
    case E2BIG:
    case ENOMEM:
    case ENOSPC:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace vkick
