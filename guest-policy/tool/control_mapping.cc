#include "guest-policy/tool/control_mapping.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::StatusOr<ControlMapping> ControlMapping::Open(const std::string& path) {
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open control block ", path));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::ErrnoToStatus(errno, "fstat control block");
  }
  if (st.st_size == 0 && ftruncate(fd, sizeof(ControlBlock)) != 0) {
    close(fd);
    return absl::ErrnoToStatus(errno, "size control block");
  } else if (st.st_size != 0 && static_cast<size_t>(st.st_size) < sizeof(ControlBlock)) {
    close(fd);
    // Mapping past EOF would SIGBUS on access: refuse instead.
    return absl::InvalidArgumentError(absl::StrCat("control block ", path, " is ", st.st_size, " bytes, want ",
                                                   sizeof(ControlBlock)));
  }
  void* p = mmap(nullptr, sizeof(ControlBlock), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap control block");
  return ControlMapping(static_cast<const ControlBlock*>(p));
}

ControlMapping::~ControlMapping() {
  if (block_) munmap(const_cast<ControlBlock*>(block_), sizeof(ControlBlock));
}

}  // namespace vkick
