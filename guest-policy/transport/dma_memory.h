// DMA-able memory for the two transports.
//  - MemfdMemory: a shared memfd mapping (vhost-user: the fd goes to the
//    backend in SET_MEM_TABLE; device address = our virtual address).
//  - HugepageMemory: 2 MiB hugepages (hugetlb memfd), physically contiguous
//    as a whole, locked, with physical addresses from /proc/self/pagemap
//    (virtio-pci without an IOMMU: a buffer is one address plus a length).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "guest-policy/core/blk_queue.h"

namespace vkick {

class MemfdMemory {
 public:
  static absl::StatusOr<MemfdMemory> Create(size_t bytes, const std::string& name);
  MemfdMemory(MemfdMemory&& o) noexcept;
  MemfdMemory& operator=(MemfdMemory&& o) noexcept;
  ~MemfdMemory();
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  int fd() const { return fd_; }

 private:
  MemfdMemory(int fd, uint8_t* data, size_t size) : fd_(fd), data_(data), size_(size) {}
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// ---- pagemap translation (pure parts, unit-tested) --------------------------

// /proc/self/pagemap entry: bit 63 present, bits 0-54 PFN (0 without
// CAP_SYS_ADMIN: the kernel hides PFNs from unprivileged readers).
absl::StatusOr<uint64_t> PagemapEntryToPhys(uint64_t entry, uint64_t vaddr, uint64_t page_size);
// Offset of vaddr's entry in the pagemap file.
inline uint64_t PagemapOffset(uint64_t vaddr, uint64_t page_size) { return vaddr / page_size * 8; }

// A translation table from virtual pages to physical pages (hugepage-sized).
class PhysTable final : public DmaSpace {
 public:
  PhysTable(uint64_t base_va, uint64_t page_size, std::vector<uint64_t> page_phys)
      : base_(base_va), page_(page_size), phys_(std::move(page_phys)) {}
  uint64_t Iova(const void* p) const override;

 private:
  uint64_t base_;
  uint64_t page_;
  std::vector<uint64_t> phys_;
};

class HugepageMemory {
 public:
  static constexpr size_t kHugePage = 2u << 20;
  static absl::StatusOr<HugepageMemory> Create(size_t bytes);
  HugepageMemory(HugepageMemory&& o) noexcept;
  ~HugepageMemory();
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const DmaSpace* dma() const { return &table_; }

 private:
  HugepageMemory(uint8_t* d, size_t s, PhysTable t) : data_(d), size_(s), table_(std::move(t)) {}
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  PhysTable table_;
};

}  // namespace vkick
