#include "guest-policy/core/virtqueue.h"

#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {

// The device is another CPU (another process, or the host behind a VM exit),
// coherent with us: SMP barriers suffice, as Linux's weak_barriers=true for
// virtio-pci and vhost-user. x86 compiles release/acquire fences to nothing
// but a compiler barrier, and the full fence to a locked instruction.
inline void WriteBarrier() { std::atomic_thread_fence(std::memory_order_release); }
inline void ReadBarrier() { std::atomic_thread_fence(std::memory_order_acquire); }
inline void FullBarrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline uint16_t LoadShared(const uint16_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline void StoreShared(uint16_t* p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

}  // namespace

absl::StatusOr<Virtqueue> Virtqueue::Create(const VirtqueueConfig& cfg, const VirtqueueMemory& mem) {
  if (!IsValidQueueSize(cfg.size)) {
    return absl::InvalidArgumentError(absl::StrCat("queue size ", cfg.size, " is not a power of two in 1..32768"));
  }
  if (mem.ring == nullptr) return absl::InvalidArgumentError("no ring memory");
  if (reinterpret_cast<uintptr_t>(mem.ring) % 16 != 0 || mem.ring_iova % 16 != 0) {
    return absl::InvalidArgumentError("ring memory must be 16-byte aligned");
  }
  if (cfg.max_segments == 0) return absl::InvalidArgumentError("max_segments must be >= 1");
  if (cfg.indirect && mem.indirect == nullptr) {
    return absl::InvalidArgumentError("indirect descriptors need indirect table memory");
  }
  return Virtqueue(cfg, mem);
}

Virtqueue::Virtqueue(const VirtqueueConfig& cfg, const VirtqueueMemory& mem)
    : cfg_(cfg),
      layout_(VringLayout::For(cfg.size)),
      ring_(mem.ring),
      ring_iova_(mem.ring_iova),
      desc_(reinterpret_cast<VringDesc*>(mem.ring + layout_.desc_offset)),
      avail_(mem.ring + layout_.avail_offset),
      used_(mem.ring + layout_.used_offset),
      indirect_(mem.indirect),
      indirect_iova_(mem.indirect_iova),
      next_free_(cfg.size),
      chain_len_(cfg.size, 0),
      token_(cfg.size, 0) {
  InitRing();
}

void Virtqueue::InitRing() {
  std::memset(ring_, 0, layout_.total_bytes);
  for (uint16_t i = 0; i < cfg_.size; ++i) {
    next_free_[i] = static_cast<uint16_t>((i + 1) % cfg_.size);
    chain_len_[i] = 0;
  }
  free_head_ = 0;
  num_free_ = cfg_.size;
  in_flight_ = 0;
  avail_idx_ = last_decided_idx_ = last_used_idx_ = 0;
  interrupts_on_ = false;
  DisableInterrupts();
}

bool Virtqueue::CanAdd(size_t n) const {
  if (n == 0) return false;
  if (cfg_.indirect && n > 1) return n <= cfg_.max_segments && num_free_ >= 1;
  return n <= num_free_;
}

absl::Status Virtqueue::Add(std::span<const Segment> segs, uint64_t token) {
  const size_t n = segs.size();
  if (n == 0) return absl::InvalidArgumentError("empty request");
  const bool use_indirect = cfg_.indirect && n > 1;
  if (use_indirect && n > cfg_.max_segments) {
    return absl::InvalidArgumentError(absl::StrCat(n, " segments > max ", cfg_.max_segments));
  }
  const uint16_t ring_descs = use_indirect ? 1 : static_cast<uint16_t>(n);
  if (ring_descs > num_free_) return absl::ResourceExhaustedError("virtqueue full");

  const uint16_t head = free_head_;
  if (use_indirect) {
    // 2.7.5.3 "Indirect Descriptors": one ring slot per request, however many
    // segments; the table is driver-owned memory reserved for this head.
    VringDesc* table = indirect_ + static_cast<size_t>(head) * cfg_.max_segments;
    for (size_t i = 0; i < n; ++i) {
      table[i].addr = segs[i].iova;
      table[i].len = segs[i].len;
      table[i].flags = static_cast<uint16_t>((segs[i].device_writes ? kVringDescFWrite : 0) |
                                             (i + 1 < n ? kVringDescFNext : 0));
      table[i].next = static_cast<uint16_t>(i + 1 < n ? i + 1 : 0);
    }
    desc_[head].addr = indirect_iova_ + static_cast<uint64_t>(head) * cfg_.max_segments * sizeof(VringDesc);
    desc_[head].len = static_cast<uint32_t>(n * sizeof(VringDesc));
    // 2.7.5.3.1: the driver MUST NOT set VIRTQ_DESC_F_INDIRECT together with NEXT.
    desc_[head].flags = kVringDescFIndirect;
    desc_[head].next = 0;
    free_head_ = next_free_[head];
  } else {
    uint16_t idx = head;
    for (size_t i = 0; i < n; ++i) {
      desc_[idx].addr = segs[i].iova;
      desc_[idx].len = segs[i].len;
      const bool last = i + 1 == n;
      desc_[idx].flags = static_cast<uint16_t>((segs[i].device_writes ? kVringDescFWrite : 0) |
                                               (last ? 0 : kVringDescFNext));
      desc_[idx].next = last ? 0 : next_free_[idx];
      if (last) free_head_ = next_free_[idx];
      idx = next_free_[idx];
    }
  }
  num_free_ = static_cast<uint16_t>(num_free_ - ring_descs);
  chain_len_[head] = ring_descs;
  token_[head] = token;
  ++in_flight_;

  // 2.7.13.2 "Updating The Available Ring": place the head, then
  // 2.7.13.3 "Updating idx": "The driver MUST perform a suitable memory
  // barrier before the idx update, to ensure the device sees the most
  // up-to-date copy" (of the descriptors and the ring entry).
  avail_ring()[avail_idx_ & (cfg_.size - 1)] = head;
  ++avail_idx_;  // free-running 16-bit index: wraps at 65536, not at size
  WriteBarrier();
  StoreShared(avail_idx_ptr(), avail_idx_);
  return absl::OkStatus();
}

bool Virtqueue::NeedsNotify() {
  // 2.7.13.4 "Notifying The Device": "The driver MUST perform a suitable
  // memory barrier before reading flags or avail_event, to avoid missing a
  // notification." A store (idx) followed by a load (avail_event) needs the
  // full fence: the classic lost-kick race (Linux a72caae21803).
  FullBarrier();
  const uint16_t old_idx = last_decided_idx_;
  const uint16_t new_idx = avail_idx_;
  last_decided_idx_ = new_idx;
  if (old_idx == new_idx) return false;  // nothing new since the last decision
  if (cfg_.event_idx) {
    return VringNeedEvent(LoadShared(avail_event_ptr()), new_idx, old_idx);
  }
  return (LoadShared(used_flags_ptr()) & kVringUsedFNoNotify) == 0;
}

void Virtqueue::MarkNotified() { last_decided_idx_ = avail_idx_; }

bool Virtqueue::HasUsed() const {
  return LoadShared(used_idx_ptr()) != last_used_idx_;
}

void Virtqueue::FreeChain(uint16_t head) {
  uint16_t n = chain_len_[head];
  // The chain was linked through next_free_ order at Add time (the private
  // copy, not desc[].next which the device could have scribbled on).
  uint16_t last = head;
  for (uint16_t i = 1; i < n; ++i) last = next_free_[last];
  next_free_[last] = free_head_;
  free_head_ = head;
  num_free_ = static_cast<uint16_t>(num_free_ + n);
  chain_len_[head] = 0;
  --in_flight_;
}

int Virtqueue::PollUsed(const CompletionFn& fn, int max) {
  int done = 0;
  // 2.7.14 "Receiving Used Buffers From The Device": read used->idx, then a
  // read barrier before the ring entries and the buffers the device wrote
  // (Linux virtqueue_get_buf_ctx_split: virtio_rmb after more_used()).
  const uint16_t used_idx = LoadShared(used_idx_ptr());
  ReadBarrier();
  while (last_used_idx_ != used_idx && done < max) {
    const VringUsedElem e = used_ring()[last_used_idx_ & (cfg_.size - 1)];
    ++last_used_idx_;
    if (e.id >= cfg_.size || chain_len_[e.id] == 0) {
      ++bad_used_;  // not outstanding: never report a token twice
      continue;
    }
    const uint64_t token = token_[e.id];
    FreeChain(static_cast<uint16_t>(e.id));
    ++done;
    fn(token, e.len);
  }
  if (!interrupts_on_ && cfg_.event_idx) {
    // Keep used_event half a ring-index space away so the device does not
    // signal while we poll (2.7.7 "Used Buffer Notification Suppression").
    StoreShared(used_event_ptr(), static_cast<uint16_t>(last_used_idx_ + 0x8000));
  } else if (interrupts_on_ && cfg_.event_idx) {
    StoreShared(used_event_ptr(), last_used_idx_);
  }
  return done;
}

bool Virtqueue::EnableInterrupts() {
  interrupts_on_ = true;
  if (cfg_.event_idx) {
    // 2.7.7.1: with EVENT_IDX the device notifies when used->idx passes
    // used_event: ask for the very next completion.
    StoreShared(used_event_ptr(), last_used_idx_);
  } else {
    StoreShared(reinterpret_cast<uint16_t*>(avail_), 0);  // clear NO_INTERRUPT
  }
  // Store (used_event / flags) then load (used->idx): full barrier, or a
  // completion that raced with the store would never interrupt us (2.7.7.1
  // and Linux virtqueue_poll()).
  FullBarrier();
  return HasUsed();
}

void Virtqueue::DisableInterrupts() {
  interrupts_on_ = false;
  if (cfg_.event_idx) {
    StoreShared(used_event_ptr(), static_cast<uint16_t>(last_used_idx_ + 0x8000));
  } else {
    StoreShared(reinterpret_cast<uint16_t*>(avail_), kVringAvailFNoInterrupt);
  }
}

void Virtqueue::Reset(const CompletionFn& aborted) {
  std::vector<uint64_t> outstanding;
  for (uint16_t i = 0; i < cfg_.size; ++i) {
    if (chain_len_[i] != 0) outstanding.push_back(token_[i]);
  }
  InitRing();
  for (uint64_t t : outstanding) aborted(t, 0);
}

}  // namespace vkick
