#include "guest-policy/transport/dma_memory.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
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

namespace {

// Physical address of each 2 MiB page of [p, p + pages * 2 MiB).
absl::StatusOr<std::vector<uint64_t>> PhysOfPages(const uint8_t* p, size_t pages) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, "open /proc/self/pagemap");
  std::vector<uint64_t> phys;
  for (size_t i = 0; i < pages; ++i) {
    const uint64_t va = reinterpret_cast<uint64_t>(p) + i * HugepageMemory::kHugePage;
    uint64_t entry = 0;
    if (pread(fd, &entry, 8, static_cast<off_t>(PagemapOffset(va, 4096))) != 8) {
      int e = errno;
      close(fd);
      return absl::ErrnoToStatus(e, "read /proc/self/pagemap");
    }
    auto pa = PagemapEntryToPhys(entry, va, HugepageMemory::kHugePage);
    if (!pa.ok()) {
      close(fd);
      return pa.status();
    }
    phys.push_back(*pa);
  }
  close(fd);
  return phys;
}

size_t FreeHugepages() {
  FILE* f = std::fopen("/proc/meminfo", "re");
  if (f == nullptr) return 0;
  char line[256];
  size_t n = 0;
  while (std::fgets(line, sizeof(line), f)) {
    if (std::sscanf(line, "HugePages_Free: %zu", &n) == 1) break;
  }
  std::fclose(f);
  return n;
}

}  // namespace

// The device sees guest-physical addresses and a buffer is one address plus a
// length, so the memory must be physically contiguous, not only page by page:
// a buffer or ring that crosses a 2 MiB boundary into a page that is not the
// physical successor would send the device's DMA elsewhere (seen: 1 MiB
// verify I/O hung the backend). Hugepages come from the pool in no particular
// order, so: take a hugetlb memfd with spare pages, find a run of physically
// consecutive pages, map exactly that run (in physical order) at one 2 MiB
// aligned virtual range, and give the rest back to the pool.
absl::StatusOr<HugepageMemory> HugepageMemory::Create(size_t bytes) {
  const size_t pages = (bytes + kHugePage - 1) / kHugePage;
  bytes = pages * kHugePage;
  const size_t free_pages = FreeHugepages();
  const size_t total = std::max(pages, std::min(free_pages, pages * 4 + 4));
  int fd = memfd_create("vkick-dma", MFD_CLOEXEC | MFD_HUGETLB | (21u << 26)  /* MFD_HUGE_2MB */);
  if (fd < 0) return absl::ErrnoToStatus(errno, "memfd_create(MFD_HUGETLB)");
  auto fail = [&](int e, const std::string& what) {
    close(fd);
    return absl::ErrnoToStatus(e, what);
  };
  if (ftruncate(fd, static_cast<off_t>(total * kHugePage)) != 0) return fail(errno, "ftruncate hugetlb memfd");
  void* probe = mmap(nullptr, total * kHugePage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (probe == MAP_FAILED) {
    return fail(errno, absl::StrCat("mmap ", total, " x 2 MiB hugepages (", free_pages,
                                    " free; reserve them in /proc/sys/vm/nr_hugepages)"));
  }
  auto all = PhysOfPages(static_cast<uint8_t*>(probe), total);
  munmap(probe, total * kHugePage);
  if (!all.ok()) {
    close(fd);
    return all.status();
  }
  // A run of `pages` file pages whose physical addresses are consecutive.
  std::vector<size_t> order(total);
  for (size_t i = 0; i < total; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return (*all)[a] < (*all)[b]; });
  size_t best = 0, run = 1;
  bool found = pages == 1;
  for (size_t k = 1; k < total && !found; ++k) {
    run = (*all)[order[k]] == (*all)[order[k - 1]] + kHugePage ? run + 1 : 1;
    if (run == pages) {
      best = k + 1 - pages;
      found = true;
    }
  }
  if (!found) {
    close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("no ", pages, " physically contiguous 2 MiB hugepages among ",
                                                     total, " (reserve more, earlier after boot)"));
  }
  // A 2 MiB aligned virtual range, then the run's pages in physical order.
  void* res = mmap(nullptr, bytes + kHugePage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (res == MAP_FAILED) return fail(errno, "reserve virtual range");
  const uint64_t r = reinterpret_cast<uint64_t>(res);
  const uint64_t base = (r + kHugePage - 1) / kHugePage * kHugePage;
  if (base > r) munmap(res, base - r);
  if (base + bytes < r + bytes + kHugePage) {
    munmap(reinterpret_cast<void*>(base + bytes), r + bytes + kHugePage - (base + bytes));
  }
  uint8_t* p = reinterpret_cast<uint8_t*>(base);
  for (size_t j = 0; j < pages; ++j) {
    void* m = mmap(p + j * kHugePage, kHugePage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd,
                   static_cast<off_t>(order[best + j] * kHugePage));
    if (m == MAP_FAILED) {
      int e = errno;
      munmap(p, bytes);
      return fail(e, "map hugepage run");
    }
  }
  // Give the pages outside the run back to the pool (the mappings keep the file).
  for (size_t i = 0; i < total; ++i) {
    bool used = false;
    for (size_t j = 0; j < pages && !used; ++j) used = order[best + j] == i;
    if (!used) {
      (void)fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(i * kHugePage),
                      static_cast<off_t>(kHugePage));
    }
  }
  close(fd);
  if (mlock(p, bytes) != 0) {
    int e = errno;
    munmap(p, bytes);
    return absl::ErrnoToStatus(e, "mlock hugepages");
  }
  std::memset(p, 0, bytes);
  auto phys = PhysOfPages(p, pages);
  if (!phys.ok()) {
    munmap(p, bytes);
    return phys.status();
  }
  for (size_t j = 1; j < pages; ++j) {
    if ((*phys)[j] != (*phys)[0] + j * kHugePage) {
      munmap(p, bytes);
      return absl::InternalError("hugepage run is not physically contiguous after mapping");
    }
  }
  return HugepageMemory(p, bytes, PhysTable(base, kHugePage, *std::move(phys)));
}

HugepageMemory::HugepageMemory(HugepageMemory&& o) noexcept
    : data_(o.data_), size_(o.size_), table_(std::move(o.table_)) {
  o.data_ = nullptr;
}
HugepageMemory::~HugepageMemory() {
  if (data_) munmap(data_, size_);
}

}  // namespace vkick
