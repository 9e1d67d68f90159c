#include "guest-policy/tool/workload.h"

#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "guest-policy/core/blk_queue.h"
#include "guest-policy/core/clock.h"
#include "guest-policy/core/load_model.h"
#include "guest-policy/tool/control_mapping.h"

namespace vkick {
namespace {

constexpr uint64_t kMs = 1'000'000;
constexpr uint64_t kDrainTimeoutNs = 5'000 * kMs;  // a request not back after 5 s is lost

double CpuSeconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// What one pass of a queue's loop does.
struct Phase {
  BlkOp op = BlkOp::kRead;
  bool random = true;
  bool verify_pattern = false;  // reads check, writes fill, the verify pattern
  uint64_t end_ns = 0;          // time-bounded when list_count == 0
  uint64_t list_count = 0, list_stride = 1;  // block list (verify): queue i does i + k*stride
  uint64_t pattern_seed = 1;    // verify: each pass writes a new pattern, so a read
                                // of a previous pass's (stale) data is a mismatch
};

struct QueueCtx {
  uint16_t index = 0;
  std::unique_ptr<BlkQueue> q;
  LatencyRecorder lat;
  BlkQueueStats base;  // the queue's counters when the measured part began
  uint64_t errors = 0, mismatches = 0, zero_mismatches = 0, lost = 0;
  uint64_t control_maps = 0, control_unmaps = 0;
  bool control_mapped = false;
  // Lives as long as the queue: the BlkQueue reads the block it maps (also
  // between phases, in SyncOp on the main thread, when no Loop runs).
  std::optional<ControlWatcher> watcher;
  uint64_t verify_reads = 0;
  std::string first_error;
  std::vector<uint64_t> slot_block, slot_arrival;
  bool fatal = false;
};

class Runner {
 public:
  Runner(BlkTransport& t, const WorkloadOptions& o) : t_(t), o_(o) {}

  absl::Status Setup() {
    const BlkConfig& cfg = t_.config();
    total_blocks_ = cfg.capacity_sectors * kSectorSize / o_.bs;
    if (total_blocks_ == 0) return absl::FailedPreconditionError("device smaller than one block");
    if (o_.qd > o_.queue_size) {
      return absl::InvalidArgumentError(absl::StrCat("--qd ", o_.qd, " > --queue_size ", o_.queue_size));
    }
    BlkQueueOptions qo;
    qo.queue_size = o_.queue_size;
    qo.event_idx = t_.features() & kVirtioFRingEventIdx;
    qo.indirect = t_.features() & kVirtioFRingIndirectDesc;
    qo.slots = o_.qd;
    qo.max_io_bytes = o_.bs;
    qo.policy = o_.policy;
    qo.control = nullptr;  // adaptive: mapped by each queue's ControlWatcher
    const size_t per_queue = BlkQueue::MemoryBytes(qo);
    auto mem = t_.AllocateDma(per_queue * o_.queues);
    if (!mem.ok()) return mem.status();
    for (uint16_t i = 0; i < o_.queues; ++i) {
      auto c = std::make_unique<QueueCtx>();
      c->index = i;
      qo.index = i;
      qo.shared_stats = o_.stats != nullptr && i < kStatsBlockMaxQueues ? &o_.stats->queues[i] : nullptr;
      auto q = BlkQueue::Create(qo, *mem + per_queue * i, t_.dma(), &t_, &clock_, cfg);
      if (!q.ok()) return q.status();
      c->q = *std::move(q);
      const Virtqueue& vq = c->q->virtqueue();
      absl::Status st = t_.StartQueue(i, {o_.queue_size, vq.desc_iova(), vq.avail_iova(), vq.used_iova()});
      if (!st.ok()) return st;
      c->slot_block.assign(o_.qd, 0);
      c->slot_arrival.assign(o_.qd, 0);
      queues_.push_back(std::move(c));
    }
    return t_.Activate();
  }

  // One synchronous request (GET_ID, FLUSH) on queue 0, bounded in time.
  absl::Status SyncOp(BlkOp op, std::string* id_out) {
    QueueCtx& c = *queues_[0];
    absl::Status st = c.q->Submit(0, op, 0, op == BlkOp::kGetId ? kVirtioBlkIdBytes : 0);
    if (!st.ok()) return st;
    const uint64_t deadline = clock_.NowNs() + kDrainTimeoutNs;
    absl::Status result = absl::DeadlineExceededError("no completion");
    bool done = false;
    while (!done) {
      c.q->Poll([&](const BlkCompletion& comp) {
        done = true;
        result = comp.status;
      });
      if (done) break;
      absl::Status h = t_.Health();
      if (!h.ok() || clock_.NowNs() > deadline) {
        c.q->FailAll(h.ok() ? absl::DeadlineExceededError("request timed out") : h, [](const BlkCompletion&) {});
        return h.ok() ? absl::DeadlineExceededError(absl::StrCat("no completion for request type ", static_cast<int>(op),
                                                                 " within 5 s"))
                      : h;
      }
    }
    if (result.ok() && id_out != nullptr && op == BlkOp::kGetId) {
      id_out->assign(reinterpret_cast<const char*>(c.q->id_bytes(0)), kVirtioBlkIdBytes);
    }
    return result;
  }

  void RunPhase(const Phase& ph) {
    std::vector<std::thread> threads;
    for (auto& c : queues_) threads.emplace_back([this, &c, ph] { Loop(*c, ph); });
    for (auto& th : threads) th.join();
  }

  // The warm-up is over: counters and latencies from here on are the result.
  void StartMeasuring() {
    for (auto& c : queues_) {
      c->base = c->q->stats();
      c->lat = LatencyRecorder();
    }
  }

  WorkloadResult Collect(double elapsed, double cpu) {
    WorkloadResult r;
    LatencyRecorder all;
    for (auto& c : queues_) {
      const BlkQueueStats& s = c->q->stats();
      const BlkQueueStats& b = c->base;
      r.requests += s.requests - b.requests;
      r.completions += s.completions - b.completions;
      r.kicks += s.kicks - b.kicks;
      for (size_t i = 0; i < r.kicks_by_why.size(); ++i) r.kicks_by_why[i] += s.kicks_by_why[i] - b.kicks_by_why[i];
      r.asks += s.asks - b.asks;
      r.suppressed += s.suppressed - b.suppressed;
      r.errors += c->errors + c->mismatches;
      r.verify_mismatches += c->mismatches;
      r.lost += c->lost;
      if (r.first_error.empty()) r.first_error = c->first_error;
      r.transport_failed |= c->fatal;
      if (c->q->adaptive()) r.adaptive_fallbacks += c->q->adaptive()->fallbacks();
      r.policy_changes += s.policy_changes;
      r.control_maps += c->control_maps;
      r.control_unmaps += c->control_unmaps;
      r.zero_mismatches += c->zero_mismatches;
      r.verify_reads += c->verify_reads;
      if (c->index == 0) r.control_mapped = c->control_mapped;
      all.Merge(c->lat);
    }
    r.elapsed_s = elapsed;
    r.iops = elapsed > 0 ? r.completions / elapsed : 0;
    r.lat_p50_us = all.Percentile(50) / 1e3;
    r.lat_p99_us = all.Percentile(99) / 1e3;
    r.lat_p999_us = all.Percentile(99.9) / 1e3;
    r.kicks_per_request = r.requests ? static_cast<double>(r.kicks) / r.requests : 0;
    r.cpu_us_per_request = r.requests ? cpu * 1e6 / r.requests : 0;
    return r;
  }

  uint64_t total_blocks() const { return total_blocks_; }
  uint64_t Now() const { return clock_.NowNs(); }
  bool any_fatal() const {
    for (auto& c : queues_) if (c->fatal) return true;
    return false;
  }

 private:
  void Loop(QueueCtx& c, const Phase& ph) {
    BlkQueue& q = *c.q;
    const bool closed = o_.rate <= 0 || ph.list_count > 0;
    OffsetGenerator offsets(total_blocks_, ph.random, o_.seed * 1000003 + c.index, c.index * (total_blocks_ / o_.queues));
    PoissonArrivals arrivals(o_.rate > 0 ? o_.rate : 1, o_.seed * 7919 + c.index);
    std::vector<uint32_t> free_slots;
    for (uint32_t s = o_.qd; s-- > 0;) if (!q.slot_busy(s)) free_slots.push_back(s);
    uint64_t listed = 0;
    uint64_t next_arrival = clock_.NowNs();
    const uint64_t loop_start_ns = next_arrival;
    uint64_t stop_ns = 0;
    uint64_t last_health = 0;
    const int call_fd = o_.interrupts ? t_.interrupt_fd(c.index) : -1;
    // The poller sleeps until the deferred kick's deadline at the latest; the
    // default 50 us timer slack would stretch T (e.g. 50 us) by up to 50 us.
    if (call_fd >= 0) prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    std::optional<ControlWatcher>& watcher = c.watcher;
    if (!watcher && q.adaptive() != nullptr && !o_.control_path.empty()) {
      watcher.emplace(o_.control_path, o_.control_retry_ns);
    }
    auto refresh_control = [&](uint64_t now) {
      if (!watcher) return;
      bool changed = false;
      const ControlBlock* cb = watcher->Refresh(now, &changed);
      if (changed) q.SetControl(cb);
      c.control_maps = watcher->maps();
      c.control_unmaps = watcher->unmaps();
      c.control_mapped = watcher->mapped();
    };

    auto on_complete = [&](const BlkCompletion& comp) {
      free_slots.push_back(comp.slot);
      uint64_t lat = comp.latency_ns;
      c.lat.Add(lat + c.slot_arrival[comp.slot]);
      if (!comp.status.ok()) {
        ++c.errors;
        if (c.first_error.empty()) c.first_error = comp.status.ToString();
        return;
      }
      if (ph.verify_pattern && comp.op == BlkOp::kRead) {
        ++c.verify_reads;
        auto bad = CheckPattern({q.data(comp.slot), o_.bs}, c.slot_block[comp.slot], ph.pattern_seed);
        if (bad) {
          ++c.mismatches;
          const uint8_t* d = q.data(comp.slot);
          if (std::all_of(d, d + o_.bs, [](uint8_t b) { return b == 0; })) ++c.zero_mismatches;
          if (c.first_error.empty()) {
            c.first_error = absl::StrCat("verify: block ", c.slot_block[comp.slot], " differs at byte ", *bad);
          }
        }
      }
    };

    while (true) {
      uint64_t now = clock_.NowNs();
      refresh_control(now);
      bool more = !c.fatal;
      if (ph.list_count > 0) more = more && listed < ph.list_count;
      else more = more && now < ph.end_ns;
      if (!more && stop_ns == 0) stop_ns = now;
      bool submitted = false;
      while (more && !free_slots.empty()) {
        if (closed && o_.depth_schedule &&
            q.in_flight() >= o_.depth_schedule->DepthAt(now - loop_start_ns)) {
          break;
        }
        uint64_t arrival_wait = 0;
        if (!closed) {
          if (next_arrival > now) break;
          arrival_wait = now - next_arrival;  // open loop: queueing before a slot freed up counts
          next_arrival += arrivals.NextGapNs();
        }
        const uint32_t slot = free_slots.back();
        uint64_t block;
        if (ph.list_count > 0) {
          if (listed >= ph.list_count) break;
          block = c.index + listed * ph.list_stride;  // queue i owns blocks i, i+Q, ...
          if (block >= total_blocks_) {
            listed = ph.list_count;
            break;
          }
          ++listed;
        } else {
          block = offsets.Next();
        }
        if (ph.verify_pattern && ph.op == BlkOp::kWrite) FillPattern({q.data(slot), o_.bs}, block, ph.pattern_seed);
        c.slot_block[slot] = block;
        c.slot_arrival[slot] = arrival_wait;
        absl::Status st = q.Submit(slot, ph.op, block * (o_.bs / kSectorSize), o_.bs);
        if (st.code() == absl::StatusCode::kResourceExhausted) break;  // ring full: poll first
        if (!st.ok()) {
          ++c.errors;
          if (c.first_error.empty()) c.first_error = st.ToString();
          c.fatal = true;
          break;
        }
        free_slots.pop_back();
        submitted = true;
        now = clock_.NowNs();
        if (ph.list_count == 0 && now >= ph.end_ns) break;
      }
      const int n = q.Poll(on_complete);
      if (stop_ns != 0 && q.in_flight() == 0) break;
      now = clock_.NowNs();
      if (now - last_health > kMs) {
        last_health = now;
        absl::Status h = t_.Health();
        if (!h.ok()) {
          if (c.first_error.empty()) c.first_error = h.ToString();
          q.FailAll(h, on_complete);
          c.fatal = true;
          break;
        }
        if (stop_ns != 0 && now - stop_ns > kDrainTimeoutNs) {
          c.lost += q.in_flight();
          if (c.first_error.empty()) c.first_error = absl::StrCat(q.in_flight(), " requests never completed");
          q.FailAll(absl::DeadlineExceededError("request lost"), on_complete);
          c.fatal = true;
          break;
        }
      }
      if (call_fd >= 0 && n == 0 && !submitted) {
        // Interrupt mode: sleep until a completion, the deferred kick's
        // deadline, the next arrival, or 10 ms (health check).
        uint64_t wake = now + 10 * kMs;  // also bounds the control block re-check
        if (auto d = q.NextDeadlineNs()) wake = std::min(wake, *d);
        if (more && !closed && !free_slots.empty()) wake = std::min(wake, next_arrival);
        if (more && ph.list_count == 0) wake = std::min(wake, ph.end_ns);
        if (wake > now && q.ArmInterrupt()) {
          pollfd fds[2] = {{call_fd, POLLIN, 0}, {t_.hangup_fd(), POLLIN | POLLRDHUP, 0}};
          const uint64_t dt = wake - now;
          timespec ts{static_cast<time_t>(dt / 1'000'000'000), static_cast<long>(dt % 1'000'000'000)};
          ppoll(fds, fds[1].fd >= 0 ? 2 : 1, &ts, nullptr);
          if (fds[0].revents & POLLIN) t_.AckInterrupt(c.index);
          if (fds[1].revents) last_health = 0;  // check health right away
        }
        q.DisarmInterrupt();
      }
    }
  }

  BlkTransport& t_;
  WorkloadOptions o_;
  MonotonicClock clock_;
  uint64_t total_blocks_ = 0;
  std::vector<std::unique_ptr<QueueCtx>> queues_;
};

}  // namespace

absl::StatusOr<RwMode> ParseRwMode(absl::string_view s) {
  if (s == "randread") return RwMode::kRandRead;
  if (s == "randwrite") return RwMode::kRandWrite;
  if (s == "read") return RwMode::kRead;
  if (s == "write") return RwMode::kWrite;
  if (s == "verify") return RwMode::kVerify;
  return absl::InvalidArgumentError(absl::StrCat("--rw '", s, "': want randread|randwrite|read|write|verify"));
}

absl::StatusOr<WorkloadResult> RunWorkload(BlkTransport& t, const WorkloadOptions& o) {
  if (o.bs == 0 || o.bs % kSectorSize != 0) return absl::InvalidArgumentError("--bs must be a multiple of 512");
  if (o.qd == 0) return absl::InvalidArgumentError("--qd must be >= 1");
  Runner r(t, o);
  absl::Status st = r.Setup();
  if (!st.ok()) return st;
  {
    // GET_ID (the device's serial, for the driver registry) also proves the
    // queues work before the timed run. A backend may not implement it: only
    // a transport failure is fatal.
    std::string id;
    absl::Status gid = r.SyncOp(BlkOp::kGetId, &id);
    if (!gid.ok() && gid.code() != absl::StatusCode::kUnimplemented && gid.code() != absl::StatusCode::kDataLoss) {
      return gid;
    }
    if (o.on_ready) o.on_ready(id);
  }
  if (o.warmup_s > 0 && o.rw != RwMode::kVerify) {
    // Not measured: e.g. the adaptive loop finding its B. Drained at the end
    // like any phase, so the measured part starts with nothing in flight.
    Phase w;
    w.op = (o.rw == RwMode::kRandWrite || o.rw == RwMode::kWrite) ? BlkOp::kWrite : BlkOp::kRead;
    w.random = o.rw == RwMode::kRandRead || o.rw == RwMode::kRandWrite;
    w.end_ns = r.Now() + static_cast<uint64_t>(o.warmup_s * 1e9);
    r.RunPhase(w);
    r.StartMeasuring();
  }
  const double cpu0 = CpuSeconds();
  const uint64_t t0 = r.Now();
  uint64_t verify_passes_done = 0;
  if (o.rw == RwMode::kVerify) {
    const uint64_t blocks = std::min<uint64_t>(r.total_blocks(), o.verify_bytes / o.bs);
    auto phase = [&](BlkOp op) {
      Phase ph;
      ph.op = op;
      ph.verify_pattern = true;
      ph.random = false;
      // Queue i owns blocks i, i+Q, i+2Q, ...: each queue checks what it wrote.
      ph.list_stride = o.queues;
      ph.list_count = (blocks + o.queues - 1) / o.queues;
      return ph;
    };
    // One pass = write every block, flush, read every block back. With
    // verify_passes == 0 passes repeat until --runtime has elapsed (at least
    // one): a run whose length does not depend on the machine's speed.
    const uint64_t end_ns = t0 + static_cast<uint64_t>(o.runtime_s * 1e9);
    for (uint64_t pass = 0;; ++pass) {
      Phase w = phase(BlkOp::kWrite);
      w.pattern_seed = o.seed + pass;
      r.RunPhase(w);
      if (r.any_fatal()) break;
      absl::Status f = r.SyncOp(BlkOp::kFlush, nullptr);
      if (!f.ok() && f.code() != absl::StatusCode::kUnimplemented) return f;
      Phase rd = phase(BlkOp::kRead);
      rd.pattern_seed = w.pattern_seed;
      r.RunPhase(rd);
      if (r.any_fatal()) break;
      ++verify_passes_done;
      if (o.verify_passes != 0 ? verify_passes_done >= o.verify_passes : r.Now() >= end_ns) break;
    }
  } else {
    Phase ph;
    ph.op = (o.rw == RwMode::kRandWrite || o.rw == RwMode::kWrite) ? BlkOp::kWrite : BlkOp::kRead;
    ph.random = o.rw == RwMode::kRandRead || o.rw == RwMode::kRandWrite;
    ph.end_ns = t0 + static_cast<uint64_t>(o.runtime_s * 1e9);
    r.RunPhase(ph);
  }
  const double elapsed = (r.Now() - t0) / 1e9;
  WorkloadResult res = r.Collect(elapsed, CpuSeconds() - cpu0);
  res.verify_passes = verify_passes_done;
  if (res.verify_mismatches > 0 && (res.zero_mismatches == res.verify_mismatches ||
                                    res.verify_mismatches * 10 >= res.verify_reads * 9)) {
    // The classic mistake: a backend that discards writes. null-co reads
    // zeros with read-zeroes=on, else leaves the buffer as it was.
    res.first_error = absl::StrCat(
        "verify: ", res.verify_mismatches, " of ", res.verify_reads, " blocks read back wrong (",
        res.zero_mismatches, " as zeros): the backend discards writes (null-co?); verify needs a backend ",
        "that stores data, e.g. --blockdev driver=file,filename=IMG,node-name=n0");
  }
  return res;
}

}  // namespace vkick
