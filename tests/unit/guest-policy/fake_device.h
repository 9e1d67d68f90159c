// A device side of a split virtqueue for tests, in the same address space
// (iova == VA). It behaves like libvhost-user: it consumes every available
// entry when it runs, sets avail_event to its last_avail_idx (EVENT_IDX), and
// writes the status byte of virtio-blk requests.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "guest-policy/core/virtio_ring.h"

namespace vkick::testing {

struct SeenRequest {
  uint16_t head;
  std::vector<VringDesc> descs;  // flattened (indirect expanded)
  bool was_indirect;
};

class FakeDevice {
 public:
  FakeDevice(uint8_t* ring, uint16_t size, bool event_idx)
      : layout_(VringLayout::For(size)), ring_(ring), size_(size), event_idx_(event_idx) {}

  // Takes every available entry; returns how many. Completes them at once
  // unless `defer_complete`, then Complete() must be called.
  int Consume(bool defer_complete = false, uint8_t status = 0) {
    uint16_t avail_idx = __atomic_load_n(AvailIdx(), __ATOMIC_ACQUIRE);
    int n = 0;
    while (last_avail_ != avail_idx) {
      uint16_t head = AvailRing()[last_avail_ % size_];
      ++last_avail_;
      SeenRequest r{head, {}, false};
      const VringDesc* d = Desc();
      uint16_t i = head;
      for (int guard = 0; guard < size_; ++guard) {
        VringDesc cur = d[i];
        if (cur.flags & kVringDescFIndirect) {
          r.was_indirect = true;
          const VringDesc* t = reinterpret_cast<const VringDesc*>(cur.addr);
          size_t count = cur.len / sizeof(VringDesc);
          for (size_t k = 0; k < count; ++k) {
            r.descs.push_back(t[k]);
            if (!(t[k].flags & kVringDescFNext)) break;
          }
          break;
        }
        r.descs.push_back(cur);
        if (!(cur.flags & kVringDescFNext)) break;
        i = cur.next;
      }
      seen.push_back(r);
      pending_.push_back(r);
      ++n;
    }
    if (event_idx_) {
      // A polling device never wants a notification: it publishes an
      // avail_event half the index space ahead, which no driver with at most
      // a ring's worth outstanding can cross before the device looks again.
      __atomic_store_n(AvailEvent(), polling_ ? static_cast<uint16_t>(last_avail_ + 0x8000) : last_avail_,
                       __ATOMIC_RELAXED);
      std::atomic_thread_fence(std::memory_order_seq_cst);
    }
    if (!defer_complete) Complete(pending_.size(), status);
    return n;
  }

  // Completes up to n consumed requests (oldest first), writing the status
  // byte (last writable descriptor of length 1) and a used entry.
  int Complete(size_t n, uint8_t status = 0) {
    int done = 0;
    while (n-- > 0 && !pending_.empty()) {
      SeenRequest r = pending_.front();
      pending_.erase(pending_.begin());
      uint32_t written = 0;
      for (const VringDesc& d : r.descs) {
        if (d.flags & kVringDescFWrite) {
          written += d.len;
          if (d.len == 1) *reinterpret_cast<uint8_t*>(d.addr) = status;
        }
      }
      VringUsedElem* ring = UsedRing();
      ring[used_idx_ % size_] = {r.head, written};
      ++used_idx_;
      std::atomic_thread_fence(std::memory_order_release);
      __atomic_store_n(UsedIdx(), used_idx_, __ATOMIC_RELAXED);
      ++done;
    }
    return done;
  }

  // Writes a bogus used entry (for exactly-once tests).
  void InjectUsed(uint32_t id) {
    UsedRing()[used_idx_ % size_] = {id, 0};
    ++used_idx_;
    __atomic_store_n(UsedIdx(), used_idx_, __ATOMIC_RELEASE);
  }

  void SetNoNotify(bool on) { *UsedFlags() = on ? kVringUsedFNoNotify : 0; }
  // A device that polls the ring (QEMU's AIO polling, an SPDK reactor): it
  // declines every notification (avail_event out of reach with EVENT_IDX,
  // VRING_USED_F_NO_NOTIFY without) and finds requests by calling Consume().
  void SetPolling(bool on) {
    polling_ = on;
    if (event_idx_) {
      __atomic_store_n(AvailEvent(), on ? static_cast<uint16_t>(last_avail_ + 0x8000) : last_avail_,
                       __ATOMIC_RELAXED);
    } else {
      SetNoNotify(on);
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  uint16_t UsedEvent() const { return *reinterpret_cast<uint16_t*>(ring_ + layout_.avail_offset + 4 + 2 * size_); }
  uint16_t AvailFlags() const { return *reinterpret_cast<uint16_t*>(ring_ + layout_.avail_offset); }
  size_t outstanding() const { return pending_.size(); }
  uint16_t last_avail() const { return last_avail_; }

  std::vector<SeenRequest> seen;

 private:
  VringDesc* Desc() { return reinterpret_cast<VringDesc*>(ring_ + layout_.desc_offset); }
  uint16_t* AvailIdx() { return reinterpret_cast<uint16_t*>(ring_ + layout_.avail_offset + 2); }
  uint16_t* AvailRing() { return reinterpret_cast<uint16_t*>(ring_ + layout_.avail_offset + 4); }
  uint16_t* UsedFlags() { return reinterpret_cast<uint16_t*>(ring_ + layout_.used_offset); }
  uint16_t* UsedIdx() { return reinterpret_cast<uint16_t*>(ring_ + layout_.used_offset + 2); }
  VringUsedElem* UsedRing() { return reinterpret_cast<VringUsedElem*>(ring_ + layout_.used_offset + 4); }
  uint16_t* AvailEvent() { return reinterpret_cast<uint16_t*>(ring_ + layout_.used_offset + 4 + 8 * size_); }

  VringLayout layout_;
  uint8_t* ring_;
  uint16_t size_;
  bool event_idx_;
  bool polling_ = false;
  uint16_t last_avail_ = 0;
  uint16_t used_idx_ = 0;
  std::vector<SeenRequest> pending_;
};

// Aligned, zeroed memory for a ring (+ indirect tables) in a test.
struct TestRingMemory {
  explicit TestRingMemory(uint16_t size, uint16_t max_segs = 4)
      : layout(VringLayout::For(size)),
        ring(static_cast<uint8_t*>(std::aligned_alloc(4096, layout.total_bytes))),
        indirect(static_cast<VringDesc*>(std::aligned_alloc(4096, VringLayout::AlignUp(size * max_segs * 16, 4096)))) {
    std::memset(ring, 0, layout.total_bytes);
  }
  ~TestRingMemory() { std::free(ring); std::free(indirect); }
  TestRingMemory(const TestRingMemory&) = delete;
  TestRingMemory& operator=(const TestRingMemory&) = delete;
  VringLayout layout;
  uint8_t* ring;
  VringDesc* indirect;
};

}  // namespace vkick::testing
