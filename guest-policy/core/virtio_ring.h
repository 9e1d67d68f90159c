// Split-virtqueue memory layout and notification arithmetic (virtio 1.2,
// section 2.7 "Split Virtqueues"). Little-endian host assumed (x86-64, the
// only target): virtio 1.x rings are little-endian, so no byte swapping.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vkick {

// Feature bits (virtio 1.2, section 6 "Reserved Feature Bits").
inline constexpr uint64_t kVirtioFRingIndirectDesc = 1ull << 28;
inline constexpr uint64_t kVirtioFRingEventIdx = 1ull << 29;
inline constexpr uint64_t kVirtioFVersion1 = 1ull << 32;

// 2.7.5 "The Virtqueue Descriptor Table".
inline constexpr uint16_t kVringDescFNext = 1;
inline constexpr uint16_t kVringDescFWrite = 2;
inline constexpr uint16_t kVringDescFIndirect = 4;
// 2.7.6 / 2.7.8: flags of the avail and used rings (without EVENT_IDX).
inline constexpr uint16_t kVringAvailFNoInterrupt = 1;
inline constexpr uint16_t kVringUsedFNoNotify = 1;

struct VringDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VringDesc) == 16);

struct VringUsedElem {
  uint32_t id;
  uint32_t len;
};
static_assert(sizeof(VringUsedElem) == 8);

// 2.7.2 "Virtqueue alignment" / 2.7.4: the three parts and their sizes for a
// queue of `num` entries. Each part starts 4 KiB aligned here (stricter than
// the spec's 16/2/4) so that every part stays inside one page: that keeps the
// virtio-pci transport's physical addresses valid without a contiguity check.
struct VringLayout {
  uint16_t num = 0;
  size_t desc_offset = 0;
  size_t avail_offset = 0;
  size_t used_offset = 0;
  size_t total_bytes = 0;

  static constexpr size_t kAlign = 4096;
  static constexpr size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }
  static constexpr size_t DescBytes(uint16_t n) { return 16u * n; }
  // flags, idx, ring[n], used_event
  static constexpr size_t AvailBytes(uint16_t n) { return 6u + 2u * n; }
  // flags, idx, ring[n], avail_event
  static constexpr size_t UsedBytes(uint16_t n) { return 6u + 8u * n; }

  static constexpr VringLayout For(uint16_t n) {
    VringLayout l;
    l.num = n;
    l.desc_offset = 0;
    l.avail_offset = AlignUp(DescBytes(n), kAlign);
    l.used_offset = l.avail_offset + AlignUp(AvailBytes(n), kAlign);
    l.total_bytes = l.used_offset + AlignUp(UsedBytes(n), kAlign);
    return l;
  }
};

// 2.7.10 "Available Buffer Notification Suppression" / 2.7.7: with
// VIRTIO_F_EVENT_IDX the other side wants a notification iff the index moved
// past `event` while going from `old_idx` to `new_idx` (all mod 2^16).
constexpr bool VringNeedEvent(uint16_t event, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

// Queue sizes must be powers of two for split rings (2.7 "Split Virtqueues":
// "Queue Size ... MUST be a power of 2") and at most 32768.
constexpr bool IsValidQueueSize(uint32_t n) {
  return n >= 1 && n <= 32768 && (n & (n - 1)) == 0;
}

}  // namespace vkick
