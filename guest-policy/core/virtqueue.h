// The driver side of one split virtqueue (virtio 1.2, section 2.7), over ring
// memory that the caller allocated and shares with the device. Pure logic: no
// system calls; notifying the device is the caller's job (it asks NeedsNotify).
//
// Single-threaded by design: one poller thread owns a queue (submit, poll,
// deferred kicks), like SPDK/DPDK. The barriers below order this thread's
// accesses against the device, which runs in another process or on the host.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "guest-policy/core/virtio_ring.h"

namespace vkick {

struct VirtqueueConfig {
  uint16_t size = 256;       // power of two
  bool event_idx = false;    // VIRTIO_F_EVENT_IDX negotiated
  bool indirect = false;     // VIRTIO_F_INDIRECT_DESC negotiated and wanted
  uint16_t max_segments = 4; // per request (size of each indirect table)
};

// Where the ring lives: driver-visible pointers and device-visible addresses.
struct VirtqueueMemory {
  uint8_t* ring = nullptr;   // VringLayout::For(size).total_bytes, zeroed
  uint64_t ring_iova = 0;
  // Only with indirect: size * max_segments descriptors, 16-byte aligned.
  VringDesc* indirect = nullptr;
  uint64_t indirect_iova = 0;
};

struct Segment {
  uint64_t iova = 0;
  uint32_t len = 0;
  bool device_writes = false;
};

class Virtqueue {
 public:
  // token, bytes written by the device (used.len)
  using CompletionFn = std::function<void(uint64_t token, uint32_t len)>;

  static absl::StatusOr<Virtqueue> Create(const VirtqueueConfig& cfg, const VirtqueueMemory& mem);

  // Places the buffer in the descriptor table and publishes it in the avail
  // ring (avail->idx is advanced now; whether to notify is decided later).
  absl::Status Add(std::span<const Segment> segs, uint64_t token);

  // After publishing: does the device need a notification? With EVENT_IDX,
  // vring_need_event(avail_event, new, old) where old is avail->idx at the
  // previous decision; without it, !(used->flags & VRING_USED_F_NO_NOTIFY).
  // Either way this ends a "decision window" (the next call compares against
  // the idx seen now).
  bool NeedsNotify();
  // The caller notified the device for everything published so far.
  void MarkNotified();

  // Consumes used entries; each token is reported exactly once. Entries with
  // an id that is not outstanding (a device bug) are counted and dropped.
  int PollUsed(const CompletionFn& fn, int max = 1 << 30);
  bool HasUsed() const;

  // Used-buffer notifications ("interrupts"). Enable returns true if used
  // entries arrived meanwhile (caller must poll again before sleeping).
  bool EnableInterrupts();
  void DisableInterrupts();

  // Device reset: every outstanding token is reported once (the caller fails
  // it), and the ring is reinitialised as after Create.
  void Reset(const CompletionFn& aborted);

  uint16_t size() const { return cfg_.size; }
  uint16_t free_descriptors() const { return num_free_; }
  uint32_t in_flight() const { return in_flight_; }
  uint16_t avail_idx() const { return avail_idx_; }
  uint64_t bad_used_entries() const { return bad_used_; }
  const VringLayout& layout() const { return layout_; }
  uint64_t desc_iova() const { return ring_iova_ + layout_.desc_offset; }
  uint64_t avail_iova() const { return ring_iova_ + layout_.avail_offset; }
  uint64_t used_iova() const { return ring_iova_ + layout_.used_offset; }
  // True if a request of n segments can be added now.
  bool CanAdd(size_t n) const;

 private:
  Virtqueue(const VirtqueueConfig& cfg, const VirtqueueMemory& mem);
  void InitRing();
  uint16_t* avail_idx_ptr() { return reinterpret_cast<uint16_t*>(avail_ + 2); }
  uint16_t* avail_ring() { return reinterpret_cast<uint16_t*>(avail_ + 4); }
  uint16_t* used_event_ptr() { return reinterpret_cast<uint16_t*>(avail_ + 4 + 2 * cfg_.size); }
  uint16_t* used_flags_ptr() const { return reinterpret_cast<uint16_t*>(used_); }
  uint16_t* used_idx_ptr() const { return reinterpret_cast<uint16_t*>(used_ + 2); }
  VringUsedElem* used_ring() const { return reinterpret_cast<VringUsedElem*>(used_ + 4); }
  uint16_t* avail_event_ptr() const { return reinterpret_cast<uint16_t*>(used_ + 4 + 8 * cfg_.size); }
  void FreeChain(uint16_t head);

  VirtqueueConfig cfg_;
  VringLayout layout_;
  uint8_t* ring_;
  uint64_t ring_iova_;
  VringDesc* desc_;
  uint8_t* avail_;
  uint8_t* used_;
  VringDesc* indirect_;
  uint64_t indirect_iova_;

  // Driver-private state: never trust device-writable memory for it.
  std::vector<uint16_t> next_free_;
  std::vector<uint16_t> chain_len_;  // 0 = not outstanding
  std::vector<uint64_t> token_;
  uint16_t free_head_ = 0;
  uint16_t num_free_ = 0;
  uint32_t in_flight_ = 0;
  uint16_t avail_idx_ = 0;        // shadow of avail->idx
  uint16_t last_decided_idx_ = 0; // avail->idx at the last notify decision
  uint16_t last_used_idx_ = 0;
  bool interrupts_on_ = false;
  uint64_t bad_used_ = 0;
};

}  // namespace vkick
