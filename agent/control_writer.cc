#include "agent/control_writer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"

namespace vkick::agent {

absl::StatusOr<std::unique_ptr<ControlWriter>> ControlWriter::Open(const std::string& path, uint64_t writer_pid) {
  const std::string dir = path.substr(0, path.rfind('/'));
  if (!dir.empty()) mkdir(dir.c_str(), 0755);  // the control dir only; its parent must exist
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open control block ", path));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat("control block ", path, " is not a regular file"));
  }
  if (static_cast<size_t>(st.st_size) < sizeof(ControlBlock) && ftruncate(fd, sizeof(ControlBlock)) != 0) {
    const int err = errno;
    close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("size control block ", path));
  }
  void* p = mmap(nullptr, sizeof(ControlBlock), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("mmap control block ", path));
  auto* cb = static_cast<ControlBlock*>(p);
  if (cb->magic != kControlBlockMagic || cb->version != kControlBlockVersion || cb->size != sizeof(ControlBlock) ||
      (cb->seq & 1) != 0) {
    InitControlBlock(cb, writer_pid);
  } else {
    cb->writer_pid = writer_pid;
  }
  return std::unique_ptr<ControlWriter>(new ControlWriter(path, cb));
}

ControlWriter::~ControlWriter() { munmap(cb_, sizeof(ControlBlock)); }

void ControlWriter::Write(const std::vector<ControlEntry>& entries) {
  if (entries.empty()) return;
  WriteControlEntries(cb_, entries.data(),
                      static_cast<uint16_t>(std::min<size_t>(entries.size(), kControlBlockMaxQueues)));
}

}  // namespace vkick::agent
