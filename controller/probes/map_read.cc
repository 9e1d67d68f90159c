#include "controller/probes/map_read.h"

#include <cerrno>

#include "common/errno_status.h"

namespace vkick {

absl::Status ProbeErrnoStatus(int err, absl::string_view what) {
  absl::Status s =
      ErrnoStatus(err, what, "the host probes need root (CAP_BPF + CAP_PERFMON)");
  // A full BPF hash map answers an insert with E2BIG: callers test for
  // kResourceExhausted to tell "no room" from a failure.
  if ((err < 0 ? -err : err) == E2BIG) return absl::ResourceExhaustedError(s.message());
  return s;
}

}  // namespace vkick
