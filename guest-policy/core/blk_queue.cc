#include "guest-policy/core/blk_queue.h"

#include <sys/sdt.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

// USDT probes, provider "vkick" (see docs/kick-policies.md): single no-op
// instructions until a tracer attaches. The agent's default observer reads
// the stats block instead (a uprobe is a trap per request); `vkick-agent
// --observe=usdt` and ad-hoc tracing still use them.
#define VKICK_PROBE_SUBMIT(q, depth) DTRACE_PROBE2(vkick, submit, q, depth)
#define VKICK_PROBE_KICK(q, batch, why) DTRACE_PROBE3(vkick, kick, q, batch, why)
#define VKICK_PROBE_COMPLETE(q, depth, lat) DTRACE_PROBE3(vkick, complete, q, depth, lat)

namespace vkick {
namespace {
constexpr size_t kPage = 4096;
constexpr uint16_t kMaxSegments = 4;  // header, data, status (+1 spare)
size_t Up(size_t v) { return VringLayout::AlignUp(v, kPage); }

struct Offsets {
  size_t ring, indirect, meta, data, stride, total;
};
Offsets Layout(const BlkQueueOptions& o) {
  Offsets f;
  f.ring = 0;
  f.indirect = Up(VringLayout::For(o.queue_size).total_bytes);
  f.meta = f.indirect + Up(static_cast<size_t>(o.queue_size) * kMaxSegments * sizeof(VringDesc));
  f.data = f.meta + Up(static_cast<size_t>(o.slots) * 64);
  f.stride = Up(o.max_io_bytes);
  f.total = f.data + f.stride * o.slots;
  return f;
}
}  // namespace

size_t BlkQueue::MemoryBytes(const BlkQueueOptions& o) { return Layout(o).total; }

absl::StatusOr<std::unique_ptr<BlkQueue>> BlkQueue::Create(const BlkQueueOptions& o, uint8_t* mem,
                                                           const DmaSpace* dma, Notifier* notifier,
                                                           const Clock* clock, const BlkConfig& cfg) {
  if (o.slots == 0 || o.slots > o.queue_size) {
    return absl::InvalidArgumentError(absl::StrCat("queue depth ", o.slots, " must be 1..queue size ", o.queue_size));
  }
  if (o.max_io_bytes == 0 || o.max_io_bytes % kSectorSize != 0) {
    return absl::InvalidArgumentError(absl::StrCat("I/O size ", o.max_io_bytes, " is not a multiple of 512"));
  }
  if (o.policy.mode == KickMode::kStatic && (o.policy.batch < 1 || o.policy.batch > o.queue_size ||
                                            o.policy.defer_ns > kMaxDeferNs)) {
    return absl::InvalidArgumentError("static policy out of range");
  }
  if (reinterpret_cast<uintptr_t>(mem) % kPage != 0) return absl::InvalidArgumentError("memory not page aligned");
  Offsets f = Layout(o);
  VirtqueueConfig vc{o.queue_size, o.event_idx, o.indirect, kMaxSegments};
  VirtqueueMemory vm{mem + f.ring, dma->Iova(mem + f.ring), reinterpret_cast<VringDesc*>(mem + f.indirect),
                     dma->Iova(mem + f.indirect)};
  auto vq = Virtqueue::Create(vc, vm);
  if (!vq.ok()) return vq.status();
  return std::unique_ptr<BlkQueue>(new BlkQueue(o, *std::move(vq), reinterpret_cast<SlotMeta*>(mem + f.meta),
                                                mem + f.data, f.stride, dma, notifier, clock, cfg));
}

BlkQueue::BlkQueue(const BlkQueueOptions& o, Virtqueue vq, SlotMeta* meta, uint8_t* data, size_t stride,
                   const DmaSpace* dma, Notifier* n, const Clock* c, const BlkConfig& cfg)
    : opts_(o),
      vq_(std::move(vq)),
      sched_(o.policy.mode == KickMode::kAdaptive ? KickPolicy{} : o.policy),
      meta_(meta),
      data_(data),
      data_stride_(stride),
      dma_(dma),
      notifier_(n),
      clock_(c),
      cfg_(cfg),
      submit_ns_(o.slots),
      sector_(o.slots),
      op_(o.slots),
      busy_(o.slots, false),
      shared_(o.shared_stats != nullptr ? o.shared_stats : &own_shared_) {
  if (o.policy.mode == KickMode::kAdaptive) adaptive_.emplace(o.control, o.index, o.queue_size);
  std::atomic_ref<uint64_t>(shared_->depth_limit).store(o.slots, std::memory_order_relaxed);
}

void BlkQueue::Kick(KickWhy why) {
  const uint32_t batch = sched_.pending();
  if (!notifier_->Notify(opts_.index)) ++stats_.notify_failures;
  vq_.MarkNotified();
  sched_.Kicked();
  ++stats_.kicks;
  ++stats_.kicks_by_why[static_cast<size_t>(why)];
  StatsAdd(shared_->kicks, 1);
  StatsAdd(shared_->kicks_by_why[std::min<size_t>(static_cast<size_t>(why), kStatsWhySlots - 1)], 1);
  VKICK_PROBE_KICK(opts_.index, batch, static_cast<int>(why));
}

void BlkQueue::CountSubmit(uint32_t depth) {
  ++stats_.requests;
  StatsAdd(shared_->requests, 1);
  StatsAdd(shared_->depth_sum, depth);
  StatsAdd(shared_->depth_hist[StatsDepthBucket(depth)], 1);
  VKICK_PROBE_SUBMIT(opts_.index, depth);
}

void BlkQueue::CountCompletion(uint64_t latency_ns) {
  ++stats_.completions;
  StatsAdd(shared_->completions, 1);
  StatsAdd(shared_->latency_sum_ns, latency_ns);
  StatsAdd(shared_->latency_hist[StatsLatencyBucket(latency_ns)], 1);
  VKICK_PROBE_COMPLETE(opts_.index, vq_.in_flight(), latency_ns);
}

void BlkQueue::Apply(KickScheduler::Decision d) {
  switch (d.action) {
    case KickScheduler::Action::kNone:
      return;
    case KickScheduler::Action::kKick:
      Kick(d.why);
      return;
    case KickScheduler::Action::kAskDevice:
      ++stats_.asks;
      StatsAdd(shared_->asks, 1);
      if (vq_.NeedsNotify()) {
        Kick(d.why);
      } else {
        ++stats_.suppressed;
        StatsAdd(shared_->suppressed, 1);
        sched_.Suppressed();
      }
      return;
  }
}

void BlkQueue::SetPolicy(const KickPolicy& p) {
  if (p.mode == KickMode::kAdaptive) {
    if (!adaptive_) adaptive_.emplace(opts_.control, opts_.index, opts_.queue_size);
    RefreshAdaptive(clock_->NowNs());
    return;
  }
  adaptive_.reset();
  SwitchTo(p);
}

void BlkQueue::SetControl(const ControlBlock* cb) {
  opts_.control = cb;
  if (!adaptive_) return;
  adaptive_->set_block(cb);
  RefreshAdaptive(clock_->NowNs());
}

void BlkQueue::SwitchTo(const KickPolicy& p) {
  const KickPolicy before = sched_.policy();
  const KickScheduler::Decision d = sched_.SetPolicy(p);
  if (!(sched_.policy() == before)) ++stats_.policy_changes;
  Apply(d);
}

void BlkQueue::RefreshAdaptive(uint64_t now) {
  if (adaptive_) SwitchTo(adaptive_->Effective(now));
}

absl::Status BlkQueue::Submit(uint32_t slot, BlkOp op, uint64_t sector, uint32_t len) {
  if (slot >= opts_.slots) return absl::InvalidArgumentError(absl::StrCat("slot ", slot, " out of range"));
  if (busy_[slot]) return absl::FailedPreconditionError(absl::StrCat("slot ", slot, " is in flight"));
  if (len > opts_.max_io_bytes) return absl::InvalidArgumentError("request larger than the slot buffer");
  if (!vq_.CanAdd(op == BlkOp::kFlush ? 2 : 3)) {
    Apply(sched_.OnRingFull());
    return absl::ResourceExhaustedError("virtqueue full");
  }
  SlotMeta& m = meta_[slot];
  m.status = 0xff;  // a device that never writes the status cannot look like success
  BlkRequestBuffers b{&m.hdr, dma_->Iova(&m.hdr), 0, len, dma_->Iova(&m.status)};
  if (op == BlkOp::kGetId) {
    b.data_iova = dma_->Iova(m.id);
    b.data_len = kVirtioBlkIdBytes;
  } else {
    b.data_iova = dma_->Iova(data(slot));
  }
  auto segs = EncodeBlkRequest(op, sector, b, cfg_);
  if (!segs.ok()) return segs.status();
  const uint64_t now = clock_->NowNs();
  // Adaptive: pick up a new (B, T) before deciding about this request.
  RefreshAdaptive(now);
  absl::Status st = vq_.Add(*segs, slot);
  if (!st.ok()) return st;
  busy_[slot] = true;
  submit_ns_[slot] = now;
  sector_[slot] = sector;
  op_[slot] = op;
  CountSubmit(vq_.in_flight());
  Apply(sched_.OnSubmit(now));
  return absl::OkStatus();
}

int BlkQueue::Poll(const CompletionFn& fn) {
  const uint64_t now = clock_->NowNs();
  RefreshAdaptive(now);
  Apply(sched_.OnPoll(now));
  return vq_.PollUsed([&](uint64_t token, uint32_t) {
    const uint32_t slot = static_cast<uint32_t>(token);
    BlkCompletion c;
    c.slot = slot;
    c.op = op_[slot];
    c.sector = sector_[slot];
    c.status = BlkStatusToStatus(meta_[slot].status);
    const uint64_t done = clock_->NowNs();
    c.latency_ns = done - submit_ns_[slot];
    busy_[slot] = false;
    if (!c.status.ok()) ++stats_.errors;
    CountCompletion(c.latency_ns);
    fn(c);
  });
}

void BlkQueue::FailAll(const absl::Status& why, const CompletionFn& fn) {
  sched_.Kicked();  // nothing is pending on a dead ring
  const uint64_t now = clock_->NowNs();
  vq_.Reset([&](uint64_t token, uint32_t) {
    const uint32_t slot = static_cast<uint32_t>(token);
    BlkCompletion c{slot, op_[slot], sector_[slot], why, now - submit_ns_[slot]};
    busy_[slot] = false;
    ++stats_.errors;
    CountCompletion(c.latency_ns);
    fn(c);
  });
}


}  // namespace vkick
