// Small sysfs attributes, read and written the way sysfs serves them: each
// is one read() (or one write()) of less than a page. Paths are arguments, so
// the callers are unit-tested on fake trees of regular files.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace vkick::agent {

// One read() of at most `max` bytes into *out; false when the file cannot be
// opened or read, or holds more than `max` bytes (a value cut short must not
// parse as a smaller one).
bool ReadSysfsFile(const std::string& path, size_t max, std::string* out);

// One write() of `text` to an existing attribute (never created, no symlink
// followed at the last component). The kernel's refusal (EINVAL: the value
// does not parse or is out of range) comes back as the error.
absl::Status WriteSysfsFile(const std::string& path, absl::string_view text);

}  // namespace vkick::agent
