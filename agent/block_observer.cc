#include "agent/block_observer.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <time.h>

#include <cerrno>
#include <cstdarg>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "agent/bpf_read.h"
#include "common/clock.h"
#include "vkick_blockobs.skel.h"

namespace vkick::agent {
namespace {

static_assert(VKICK_BLOCKOBS_DEPTH_BUCKETS == proto::kDepthBuckets);
static_assert(VKICK_BLOCKOBS_LATENCY_BUCKETS == proto::kLatencyBuckets);
static_assert(VKICK_BLOCKOBS_MAX_DISKS >= proto::kMaxDevices, "every announceable disk needs a slot");
static_assert(sizeof(vkick_blockobs_counters) % 8 == 0);
static_assert(sizeof(vkick_blockobs_start) == 32);
static_assert(sizeof(vkick_blockobs_disk) == 8);

int QuietLibbpf(enum libbpf_print_level level, const char* fmt, va_list args) {
  if (level == LIBBPF_DEBUG) return 0;
  return vfprintf(stderr, fmt, args);
}

int SilentLibbpf(enum libbpf_print_level, const char*, va_list) { return 0; }

bool Expired(const vkick_blockobs_start& v, uint64_t now_ns) {
  return now_ns > v.issue_ns && now_ns - v.issue_ns >= VKICK_BLOCKOBS_START_EXPIRE_NS;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BlockObserver>> BlockObserver::Create(const Options& opts) {
  libbpf_set_print(QuietLibbpf);
  const int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return BpfErrnoStatus(-ncpu, "libbpf_num_possible_cpus");
  vkick_blockobs* skel = vkick_blockobs__open();
  if (skel == nullptr) return BpfErrnoStatus(errno, "opening the vkick_blockobs BPF object");
  if (int err = vkick_blockobs__load(skel); err != 0) {
    vkick_blockobs__destroy(skel);
    // libbpf: -ESRCH when the kernel's BTF has no btf_trace_block_rq_* (no
    // such tracepoint), -ENOENT without kernel BTF at all.
    if (err == -ESRCH) err = -ENOENT;
    return BpfErrnoStatus(err, "loading the vkick_blockobs BPF object (needs kernel BTF, the block_rq_issue/"
                               "block_rq_complete tracepoints and BPF atomics, >= 5.12)");
  }
  std::unique_ptr<BlockObserver> o(new BlockObserver(skel, ncpu, opts.clock ? opts.clock : MonotonicNowNs));
  for (uint32_t s = VKICK_BLOCKOBS_MAX_DISKS; s > 0; --s) o->free_slots_.push_back(s - 1);
  if (opts.attach) {
    if (absl::Status s = o->Attach(opts); !s.ok()) return s;
  }
  return o;
}

absl::Status BlockObserver::Attach(const Options&) {
  // BTF raw tracepoints: attached by BTF id through a BPF link, no tracefs.
  // libbpf's own lines would only repeat the one the caller logs.
  const libbpf_print_fn_t prev = libbpf_set_print(SilentLibbpf);
  const int rc = vkick_blockobs__attach(skel_);
  const int err = errno;
  libbpf_set_print(prev);
  if (rc != 0) return BpfErrnoStatus(err, "attaching tp_btf/block_rq_issue and tp_btf/block_rq_complete");
  return absl::OkStatus();
}

BlockObserver::~BlockObserver() { vkick_blockobs__destroy(skel_); }

void BlockObserver::ZeroSlot(uint32_t slot) {
  std::vector<vkick_blockobs_counters> zero(static_cast<size_t>(num_cpus_));
  std::memset(zero.data(), 0, zero.size() * sizeof(zero[0]));
  bpf_map_update_elem(bpf_map__fd(skel_->maps.disk_stats), &slot, zero.data(), BPF_ANY);
}

absl::Status BlockObserver::Watch(uint32_t kdev) {
  if (slots_.count(kdev)) return absl::OkStatus();
  if (free_slots_.empty())
    return absl::ResourceExhaustedError(absl::StrCat("more than ", VKICK_BLOCKOBS_MAX_DISKS, " disks watched"));
  const uint32_t slot = free_slots_.back();
  // Fresh counters before the disk enters the filter: the handlers start
  // counting into the slot as soon as the `disks` entry exists.
  ZeroSlot(slot);
  __atomic_store_n(&skel_->bss->inflight[slot], 0, __ATOMIC_RELEASE);
  vkick_blockobs_disk d{};
  d.slot = slot;
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.disks), &kdev, &d, BPF_ANY) != 0)
    return BpfErrnoStatus(errno, absl::StrCat("watching disk ", kdev >> 20, ":", kdev & 0xfffff));
  free_slots_.pop_back();
  slots_[kdev] = slot;
  return absl::OkStatus();
}

std::vector<uint64_t> BlockObserver::StartsWhere(
    const std::function<bool(const vkick_blockobs_start&)>& pick) const {
  const int fd = bpf_map__fd(skel_->maps.starts);
  std::vector<uint64_t> out;
  for (const uint64_t& key : MapKeys<uint64_t>(fd, 4 * VKICK_BLOCKOBS_MAX_STARTS)) {
    vkick_blockobs_start v{};
    if (bpf_map_lookup_elem(fd, &key, &v) == 0 && pick(v)) out.push_back(key);
  }
  return out;
}

void BlockObserver::Unwatch(uint32_t kdev) {
  auto it = slots_.find(kdev);
  if (it == slots_.end()) return;
  bpf_map_delete_elem(bpf_map__fd(skel_->maps.disks), &kdev);
  // The disk's requests still in flight: their starts would otherwise stay
  // until they expired (and, keyed by the struct request, be taken for a
  // stale start if a new Watch of the disk reused the struct).
  const int fd = bpf_map__fd(skel_->maps.starts);
  for (const uint64_t& d : StartsWhere([kdev](const vkick_blockobs_start& v) { return v.dev == kdev; }))
    bpf_map_delete_elem(fd, &d);
  free_slots_.push_back(it->second);
  slots_.erase(it);
}

// Design: only the one that deletes a start (the complete handler, the issue
// handler replacing a stale one, or this sweep) gives its +1 in flight back,
// so each start is given back exactly once. The count itself lives in .bss
// (`inflight[slot]`), which the skeleton mmaps: the BPF side changes it with
// atomic fetch-and-add, this side with a compare-and-swap on the same word,
// so no update of either side is lost. The sweep never takes it below 0 (an
// Unwatch + Watch reset the slot meanwhile): the shortfall is counted as an
// underflow.
//
// Race, accepted: a start expired here at the very moment its struct request
// is handed to the driver again (a new request on the same tag, or a requeue
// after 30 s) may take the new request's start with it; lookup-and-delete
// returns what was deleted, and a start that turned out fresh is put back,
// so the window is the two syscalls'. Worst case one missing_start and the
// in-flight count still balances (its complete then finds no start and does
// not give back).
uint64_t BlockObserver::Sweep(uint64_t now_ns) {
  const int fd = bpf_map__fd(skel_->maps.starts);
  const std::vector<uint64_t> old =
      StartsWhere([now_ns](const vkick_blockobs_start& v) { return Expired(v, now_ns); });
  if (old.empty()) return 0;

  std::map<uint32_t, int64_t> give_back;  // dev -> expired starts
  uint64_t expired = 0;
  for (const uint64_t& key : old) {
    vkick_blockobs_start v{};
    if (bpf_map_lookup_and_delete_elem(fd, &key, &v) != 0) continue;  // completed meanwhile
    if (!Expired(v, now_ns)) {
      // Reissued meanwhile: not ours to drop.
      bpf_map_update_elem(fd, &key, &v, BPF_NOEXIST);
      continue;
    }
    ++expired;
    ++give_back[v.dev];
  }
  for (const auto& [dev, n] : give_back) {
    auto it = slots_.find(dev);
    if (it == slots_.end()) continue;  // unwatched: its count went with it
    __s64* const p = &skel_->bss->inflight[it->second];
    __s64 cur = __atomic_load_n(p, __ATOMIC_ACQUIRE), want;
    do {
      want = cur > n ? cur - n : 0;
    } while (!__atomic_compare_exchange_n(p, &cur, want, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    sweep_underflow_ += static_cast<uint64_t>(n - (cur - want));
  }
  if (expired > 0) {
    // Userspace is the only writer of this index: a plain read-modify-write.
    const int efd = bpf_map__fd(skel_->maps.errors);
    const uint32_t idx = VKICK_BLOCKOBS_ERR_EXPIRED_START;
    std::vector<uint64_t> ev(static_cast<size_t>(num_cpus_));
    if (bpf_map_lookup_elem(efd, &idx, ev.data()) == 0) {
      ev[0] += expired;
      bpf_map_update_elem(efd, &idx, ev.data(), BPF_ANY);
    }
  }
  return expired;
}

uint64_t BlockObserver::ProgMisses() const {
  uint64_t misses = 0;
  for (const bpf_program* p : {skel_->progs.vkick_rq_issue, skel_->progs.vkick_rq_complete}) {
    bpf_prog_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(bpf_program__fd(p), &info, &len) == 0) misses += info.recursion_misses;
  }
  return misses;
}

absl::StatusOr<DiskSnapshot> BlockObserver::Read() {
  Sweep(clock_());
  DiskSnapshot snap;
  // Close the max-depth interval: issues from now on start a new maximum.
  const uint32_t closed = CloseDepthEpoch(&skel_->bss->epoch);

  const int fd = bpf_map__fd(skel_->maps.disk_stats);
  std::vector<vkick_blockobs_counters> vals(static_cast<size_t>(num_cpus_));
  for (const auto& [kdev, slot] : slots_) {
    if (bpf_map_lookup_elem(fd, &slot, vals.data()) != 0)
      return BpfErrnoStatus(errno, "reading disk_stats");
    QueueTotals t;
    for (const vkick_blockobs_counters& v : vals) AddCpuCounters(t, v, closed);
    snap.disks[kdev] = t;
  }
  uint64_t* const outs[VKICK_BLOCKOBS_ERR_COUNT] = {&snap.map_full, &snap.missing_start, &snap.underflow,
                                                    &snap.bad_slot,  &snap.reissue,       &snap.stale_start,
                                                    &snap.expired_start};
  SumPerCpuErrors(bpf_map__fd(skel_->maps.errors), num_cpus_, outs);
  snap.underflow += sweep_underflow_;
  snap.prog_misses = ProgMisses();
  return snap;
}

absl::StatusOr<int> BlockObserver::TestRun(const vkick_blockobs_test_ctx& ctx) {
  return RunTestProgram(skel_->progs.test_blockobs, ctx);
}

}  // namespace vkick::agent
