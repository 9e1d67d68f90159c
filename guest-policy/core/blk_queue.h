// One virtio-blk request queue: virtqueue + request slots + kick scheduler.
// This is the "strategy()" path of the seed: Submit() publishes the request
// and asks the scheduler whether to kick now; Poll() is the poller/worker
// loop (the "taskqueue") that fires deferred kicks and reaps completions.
//
// Pure apart from the Notifier it is given (the transport's doorbell) and the
// USDT probes, which are single no-op instructions until a tracer attaches.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "guest-policy/core/blk_request.h"
#include "guest-policy/core/clock.h"
#include "guest-policy/core/control_block.h"
#include "guest-policy/core/kick_scheduler.h"
#include "guest-policy/core/stats_block.h"
#include "guest-policy/core/virtqueue.h"

namespace vkick {

// Device-visible address of driver memory (identity for vhost-user, where the
// memory table maps our VA; physical address for virtio-pci).
class DmaSpace {
 public:
  virtual ~DmaSpace() = default;
  virtual uint64_t Iova(const void* p) const = 0;
};
class IdentityDma final : public DmaSpace {
 public:
  uint64_t Iova(const void* p) const override { return reinterpret_cast<uint64_t>(p); }
};

// The doorbell of a queue: an eventfd write (vhost-user) or an MMIO write
// (virtio-pci). Returns false if the transport is gone.
class Notifier {
 public:
  virtual ~Notifier() = default;
  virtual bool Notify(uint16_t queue) = 0;
};

struct BlkQueueOptions {
  uint16_t index = 0;
  uint16_t queue_size = 256;
  bool event_idx = false;
  bool indirect = true;
  uint32_t slots = 32;             // requests in flight at most (<= queue_size)
  uint32_t max_io_bytes = 4096;    // per request data buffer
  KickPolicy policy;               // kAdaptive: read `control`
  const ControlBlock* control = nullptr;
  // Where the queue keeps the counters the agent reads (the driver's stats
  // block, stats_block.h); nullptr: a private copy nobody reads.
  StatsQueue* shared_stats = nullptr;
};

struct BlkCompletion {
  uint32_t slot = 0;
  BlkOp op = BlkOp::kRead;
  uint64_t sector = 0;
  absl::Status status;
  uint64_t latency_ns = 0;
};

struct BlkQueueStats {
  uint64_t requests = 0;
  uint64_t completions = 0;
  uint64_t errors = 0;
  uint64_t kicks = 0;
  std::array<uint64_t, 6> kicks_by_why{};  // indexed by KickWhy
  uint64_t asks = 0;        // event-idx: batches put to the device
  uint64_t suppressed = 0;  // of those, the device wanted no kick
  uint64_t notify_failures = 0;
  uint64_t policy_changes = 0;  // effective policy switched (live or adaptive)
};

class BlkQueue {
 public:
  using CompletionFn = std::function<void(const BlkCompletion&)>;

  // Bytes of DMA memory the queue needs (ring, indirect tables, slots).
  static size_t MemoryBytes(const BlkQueueOptions& o);

  // `mem` must be MemoryBytes() long, 4 KiB aligned, zeroed, and stay valid
  // (as must dma, notifier, clock) for the queue's lifetime.
  static absl::StatusOr<std::unique_ptr<BlkQueue>> Create(const BlkQueueOptions& o, uint8_t* mem,
                                                          const DmaSpace* dma, Notifier* notifier,
                                                          const Clock* clock, const BlkConfig& cfg);

  // The slot's data buffer (max_io_bytes). Write data before a write request.
  uint8_t* data(uint32_t slot) const { return data_ + static_cast<size_t>(slot) * data_stride_; }
  bool slot_busy(uint32_t slot) const { return busy_[slot]; }

  // Publishes a request in a free slot; may kick (policy). kResourceExhausted
  // if the ring is full (pending requests are kicked first so they drain).
  absl::Status Submit(uint32_t slot, BlkOp op, uint64_t sector, uint32_t len);

  // The poller loop's turn: adaptive refresh, deferred kick, completions.
  int Poll(const CompletionFn& fn);
  // When Poll must run next at the latest (a deferred kick is due).
  std::optional<uint64_t> NextDeadlineNs() const { return sched_.deadline_ns(); }

  // Interrupt mode: arm used-buffer notifications. False: completions are
  // already there, poll instead of sleeping.
  bool ArmInterrupt() { return !vq_.EnableInterrupts(); }
  void DisarmInterrupt() { vq_.DisableInterrupts(); }

  // Device reset / transport lost: every outstanding request completes once
  // with `why`, the ring is reinitialised.
  void FailAll(const absl::Status& why, const CompletionFn& fn);

  // Live switch (adaptive re-reads its control block at every Poll).
  void SetPolicy(const KickPolicy& p);
  // Adaptive: the control block was mapped, remapped or dropped (nullptr).
  // Re-evaluates at once, so a vanished block falls back without waiting.
  void SetControl(const ControlBlock* cb);

  // GET_ID's answer after a kGetId request in `slot` completed (20 bytes).
  const uint8_t* id_bytes(uint32_t slot) const { return meta_[slot].id; }

  uint32_t in_flight() const { return vq_.in_flight(); }
  const BlkQueueStats& stats() const { return stats_; }
  const KickScheduler& scheduler() const { return sched_; }
  const Virtqueue& virtqueue() const { return vq_; }
  uint16_t index() const { return opts_.index; }
  const AdaptiveSource* adaptive() const { return adaptive_ ? &*adaptive_ : nullptr; }

 private:
  struct SlotMeta {  // 64 bytes, device-visible
    VirtioBlkOutHdr hdr;
    uint8_t status;
    uint8_t pad[15];
    uint8_t id[32];
  };
  static_assert(sizeof(SlotMeta) == 64);

  BlkQueue(const BlkQueueOptions& o, Virtqueue vq, SlotMeta* meta, uint8_t* data, size_t stride,
           const DmaSpace* dma, Notifier* n, const Clock* c, const BlkConfig& cfg);
  void Apply(KickScheduler::Decision d);
  void Kick(KickWhy why);
  void CountSubmit(uint32_t depth);
  void CountCompletion(uint64_t latency_ns);
  void RefreshAdaptive(uint64_t now);
  void SwitchTo(const KickPolicy& p);

  BlkQueueOptions opts_;
  Virtqueue vq_;
  KickScheduler sched_;
  std::optional<AdaptiveSource> adaptive_;
  SlotMeta* meta_;
  uint8_t* data_;
  size_t data_stride_;
  const DmaSpace* dma_;
  Notifier* notifier_;
  const Clock* clock_;
  BlkConfig cfg_;
  std::vector<uint64_t> submit_ns_;
  std::vector<uint64_t> sector_;
  std::vector<BlkOp> op_;
  std::vector<bool> busy_;
  BlkQueueStats stats_;
  StatsQueue own_shared_{};  // shared_ when no stats block was given
  StatsQueue* shared_;
};

}  // namespace vkick
