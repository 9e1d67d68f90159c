// errno -> absl::Status, once for all of vkick: the code follows the errno
// (absl::ErrnoToStatusCode: EPERM -> PermissionDenied, ENOENT -> NotFound,
// ...) and the message says what failed, why, and the errno number.
#pragma once

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace vkick {

// `err` may be negative (libbpf's -errno convention). `permission_hint` is
// appended to EPERM/EACCES messages (e.g. which capabilities are needed).
absl::Status ErrnoStatus(int err, absl::string_view what, absl::string_view permission_hint = "");

}  // namespace vkick
