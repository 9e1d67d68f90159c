#include "guest-policy/tool/control_mapping.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::StatusOr<ControlMapping> ControlMapping::Open(const std::string& path) {
  // O_RDONLY: the driver only reads; the agent owns the file.
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open control block ", path));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    close(fd);
    return absl::ErrnoToStatus(e, "fstat control block");
  }
  if (!S_ISREG(st.st_mode) || static_cast<size_t>(st.st_size) < sizeof(ControlBlock)) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat("control block ", path, " is ", st.st_size,
                                                      " bytes, want a regular file of ", sizeof(ControlBlock)));
  }
  void* p = mmap(nullptr, sizeof(ControlBlock), PROT_READ, MAP_SHARED, fd, 0);
  const int e = errno;
  close(fd);
  if (p == MAP_FAILED) return absl::ErrnoToStatus(e, "mmap control block");
  return ControlMapping(static_cast<const ControlBlock*>(p), st.st_dev, st.st_ino);
}

ControlMapping& ControlMapping::operator=(ControlMapping&& o) noexcept {
  if (this != &o) {
    if (block_) munmap(const_cast<ControlBlock*>(block_), sizeof(ControlBlock));
    block_ = o.block_;
    dev_ = o.dev_;
    ino_ = o.ino_;
    o.block_ = nullptr;
  }
  return *this;
}

ControlMapping::~ControlMapping() {
  if (block_) munmap(const_cast<ControlBlock*>(block_), sizeof(ControlBlock));
}

const ControlBlock* ControlWatcher::Refresh(uint64_t now_ns, bool* changed) {
  *changed = false;
  if (checked_ && now_ns - last_check_ns_ < retry_ns_) return mapping_ ? mapping_->block() : nullptr;
  checked_ = true;
  last_check_ns_ = now_ns;
  struct stat st;
  if (stat(path_.c_str(), &st) != 0 || !S_ISREG(st.st_mode) ||
      static_cast<size_t>(st.st_size) < sizeof(ControlBlock)) {
    if (mapping_) {
      mapping_.reset();
      ++unmaps_;
      *changed = true;
    }
    return nullptr;
  }
  if (mapping_ && mapping_->dev() == st.st_dev && mapping_->ino() == st.st_ino) return mapping_->block();
  auto m = ControlMapping::Open(path_);
  if (!m.ok()) {  // raced with a rename/unlink: try again next period
    if (mapping_) {
      mapping_.reset();
      ++unmaps_;
      *changed = true;
    }
    return nullptr;
  }
  mapping_.emplace(*std::move(m));
  ++maps_;
  *changed = true;
  return mapping_->block();
}

}  // namespace vkick
