#include "guest-policy/transport/virtio_pci.h"

#include <cstring>

#include "gtest/gtest.h"

namespace vkick {
namespace {

// A config space like QEMU's virtio-blk-pci with disable-legacy=on: caps for
// common (BAR4+0), ISR (BAR4+0x1000), device (BAR4+0x2000), notify
// (BAR4+0x3000, multiplier 4), plus an unrelated MSI-X cap in the chain.
std::vector<uint8_t> QemuLikeConfig() {
  std::vector<uint8_t> c(256, 0);
  c[0] = 0xf4; c[1] = 0x1a;  // vendor 0x1af4
  c[2] = 0x42; c[3] = 0x10;  // device 0x1042 (modern blk)
  c[6] = 0x10;               // status: capability list
  c[0x34] = 0x98;
  auto cap = [&](uint8_t at, uint8_t next, uint8_t type, uint32_t off, uint32_t len, uint8_t caplen = 16) {
    c[at] = 0x09; c[at + 1] = next; c[at + 2] = caplen; c[at + 3] = type; c[at + 4] = 4;
    std::memcpy(&c[at + 8], &off, 4);
    std::memcpy(&c[at + 12], &len, 4);
  };
  c[0x98] = 0x11; c[0x99] = 0x84;  // MSI-X, then virtio caps
  cap(0x84, 0x70, 1, 0x0, 0x1000);
  cap(0x70, 0x60, 3, 0x1000, 0x1000);
  cap(0x60, 0x48, 4, 0x2000, 0x1000);
  cap(0x48, 0xa8, 2, 0x3000, 0x1000, 20);
  uint32_t mult = 4;
  std::memcpy(&c[0x48 + 16], &mult, 4);
  cap(0xa8, 0x00, 5, 0, 0);  // pci cfg access cap: ignored
  return c;
}

TEST(VirtioPciCaps, ParsesQemuLayout) {
  auto l = ParseVirtioPciCaps(QemuLikeConfig());
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->device_id, 0x1042);
  EXPECT_EQ(l->common.bar, 4);
  EXPECT_EQ(l->common.offset, 0u);
  EXPECT_EQ(l->notify.offset, 0x3000u);
  EXPECT_EQ(l->notify_off_multiplier, 4u);
  EXPECT_EQ(l->device.offset, 0x2000u);
  EXPECT_EQ(l->isr.offset, 0x1000u);
  // Matches the brief: queue 0 at BAR4+0x3000, queue 1 at +0x3004.
  EXPECT_EQ(NotifyOffset(*l, 0), 0x3000u);
  EXPECT_EQ(NotifyOffset(*l, 1), 0x3004u);
}

TEST(VirtioPciCaps, RejectsLoopsOutOfRangeAndLegacy) {
  auto c = QemuLikeConfig();
  c[0xa9] = 0x84;  // last cap points back into the chain
  EXPECT_EQ(ParseVirtioPciCaps(c).status().code(), absl::StatusCode::kDataLoss);
  c = QemuLikeConfig();
  c[0x61] = 0xfc;  // beyond the dump
  EXPECT_FALSE(ParseVirtioPciCaps(c).ok());
  c = QemuLikeConfig();
  c[0x4b] = 7;  // notify cap turned into an unknown type: not modern
  EXPECT_EQ(ParseVirtioPciCaps(c).status().code(), absl::StatusCode::kNotFound);
  c = QemuLikeConfig();
  c[0] = 0x86;
  EXPECT_FALSE(ParseVirtioPciCaps(c).ok());
  c = QemuLikeConfig();
  c[6] = 0;
  EXPECT_FALSE(ParseVirtioPciCaps(c).ok());
  EXPECT_FALSE(ParseVirtioPciCaps(std::span<const uint8_t>(c.data(), 32)).ok());
}

TEST(Pagemap, TranslatesPresentEntries) {
  const uint64_t present = 1ull << 63;
  auto pa = PagemapEntryToPhys(present | 0x12345, 0x7f0000001abc, 4096);
  ASSERT_TRUE(pa.ok());
  EXPECT_EQ(*pa, 0x12345ull * 4096 + 0xabc);
  EXPECT_EQ(PagemapEntryToPhys(0x12345, 0x1000, 4096).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(PagemapEntryToPhys(present, 0x1000, 4096).status().code(), absl::StatusCode::kPermissionDenied);
  // Flag bits 55-62 (soft-dirty, exclusive, ...) are not part of the PFN.
  EXPECT_EQ(*PagemapEntryToPhys(present | (1ull << 55) | (1ull << 61) | 7, 0, 4096), 7u * 4096);
  EXPECT_EQ(PagemapOffset(0x200000, 4096), 0x200u * 8);
}

TEST(Pagemap, PhysTableMapsEachHugepage) {
  const uint64_t base = 0x7f0000000000, huge = 2u << 20;
  PhysTable t(base, huge, {0x40000000, 0x10000000});
  EXPECT_EQ(t.Iova(reinterpret_cast<void*>(base + 0x10)), 0x40000010u);
  EXPECT_EQ(t.Iova(reinterpret_cast<void*>(base + huge + 0x20)), 0x10000020u);
  EXPECT_EQ(t.Iova(reinterpret_cast<void*>(base + 2 * huge)), 0u);
  EXPECT_EQ(t.Iova(reinterpret_cast<void*>(base - 1)), 0u);
}

TEST(PciAddress, OnlyCanonicalAddresses) {
  EXPECT_TRUE(IsValidPciAddress("0000:00:04.0"));
  EXPECT_FALSE(IsValidPciAddress("00:04.0"));
  EXPECT_FALSE(IsValidPciAddress("0000:00:04.0/../../x"));
  EXPECT_FALSE(IsValidPciAddress("0000:00:04.8"));
}

}  // namespace
}  // namespace vkick
