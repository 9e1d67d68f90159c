#include "agent/sysfs_file.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"

namespace vkick::agent {

bool ReadSysfsFile(const std::string& path, size_t max, std::string* out) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::string buf(max + 1, '\0');  // one byte more: tells a longer file apart
  const ssize_t n = read(fd, buf.data(), buf.size());
  close(fd);
  if (n < 0 || static_cast<size_t>(n) > max) return false;
  buf.resize(static_cast<size_t>(n));
  *out = std::move(buf);
  return true;
}

absl::Status WriteSysfsFile(const std::string& path, absl::string_view text) {
  // O_TRUNC: sysfs ignores it; a regular file (a test's fake tree) then holds
  // exactly the last value written.
  const int fd = open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
  const ssize_t n = write(fd, text.data(), text.size());
  const int err = errno;
  close(fd);
  if (n < 0) return absl::ErrnoToStatus(err, absl::StrCat("write ", path));
  if (static_cast<size_t>(n) != text.size()) return absl::DataLossError(absl::StrCat("short write to ", path));
  return absl::OkStatus();
}

}  // namespace vkick::agent
