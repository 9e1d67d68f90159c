#include "guest-policy/transport/dma_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::StatusOr<MemfdMemory> MemfdMemory::Create(size_t bytes, const std::string& name) {
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, "memfd_create");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int e = errno;
    close(fd);
    return absl::ErrnoToStatus(e, absl::StrCat("ftruncate memfd to ", bytes));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    return absl::ErrnoToStatus(e, "mmap memfd");
  }
  return MemfdMemory(fd, static_cast<uint8_t*>(p), bytes);
}

MemfdMemory::MemfdMemory(MemfdMemory&& o) noexcept : fd_(o.fd_), data_(o.data_), size_(o.size_) {
  o.fd_ = -1;
  o.data_ = nullptr;
}
MemfdMemory& MemfdMemory::operator=(MemfdMemory&& o) noexcept {
  if (this != &o) {
    this->~MemfdMemory();
    new (this) MemfdMemory(std::move(o));
  }
  return *this;
}
MemfdMemory::~MemfdMemory() {
  if (data_) munmap(data_, size_);
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<uint64_t> PagemapEntryToPhys(uint64_t entry, uint64_t vaddr, uint64_t page_size) {
  if (!(entry & (1ull << 63))) return absl::FailedPreconditionError("page not present (not locked or populated?)");
  const uint64_t pfn = entry & ((1ull << 55) - 1);
  if (pfn == 0) return absl::PermissionDeniedError("pagemap hides PFNs: need CAP_SYS_ADMIN (run as root)");
  // PFNs are in units of the base page (4 KiB) even for hugepages.
  (void)page_size;
  return pfn * 4096 + (vaddr % 4096);
}

uint64_t PhysTable::Iova(const void* p) const {
  const uint64_t va = reinterpret_cast<uint64_t>(p);
  const uint64_t off = va - base_;
  const uint64_t page = off / page_;
  if (va < base_ || page >= phys_.size()) return 0;  // never handed to a device: callers stay inside
  return phys_[page] + off % page_;
}

absl::StatusOr<HugepageMemory> HugepageMemory::Create(size_t bytes) {
  bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE,
                 -1, 0);
  if (p == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat("mmap ", bytes, " bytes of 2 MiB hugepages (reserve them in "
                                                   "/proc/sys/vm/nr_hugepages)"));
  }
  if (mlock(p, bytes) != 0) {
    int e = errno;
    munmap(p, bytes);
    return absl::ErrnoToStatus(e, "mlock hugepages");
  }
  std::memset(p, 0, bytes);
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    munmap(p, bytes);
    return absl::ErrnoToStatus(e, "open /proc/self/pagemap");
  }
  std::vector<uint64_t> phys;
  for (size_t off = 0; off < bytes; off += kHugePage) {
    const uint64_t va = reinterpret_cast<uint64_t>(p) + off;
    uint64_t entry = 0;
    if (pread(fd, &entry, 8, static_cast<off_t>(PagemapOffset(va, 4096))) != 8) {
      int e = errno;
      close(fd);
      munmap(p, bytes);
      return absl::ErrnoToStatus(e, "read /proc/self/pagemap");
    }
    auto pa = PagemapEntryToPhys(entry, va, kHugePage);
    if (!pa.ok()) {
      close(fd);
      munmap(p, bytes);
      return pa.status();
    }
    phys.push_back(*pa);
  }
  close(fd);
  return HugepageMemory(static_cast<uint8_t*>(p), bytes,
                        PhysTable(reinterpret_cast<uint64_t>(p), kHugePage, std::move(phys)));
}

HugepageMemory::HugepageMemory(HugepageMemory&& o) noexcept
    : data_(o.data_), size_(o.size_), table_(std::move(o.table_)) {
  o.data_ = nullptr;
}
HugepageMemory::~HugepageMemory() {
  if (data_) munmap(data_, size_);
}

}  // namespace vkick
