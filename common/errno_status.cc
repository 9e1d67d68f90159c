#include "common/errno_status.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::Status ErrnoStatus(int err, absl::string_view what, absl::string_view permission_hint) {
  err = err < 0 ? -err : err;
  std::string msg = absl::StrCat(what, ": ", std::strerror(err), " (errno ", err, ")");
  if ((err == EPERM || err == EACCES) && !permission_hint.empty()) absl::StrAppend(&msg, "; ", permission_hint);
  return absl::Status(absl::ErrnoToStatusCode(err), msg);
}

}  // namespace vkick
