#include "agent/block_observer.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "agent/bpf_read.h"
#include "vkick_blockobs.skel.h"

namespace vkick::agent {
namespace {

static_assert(VKICK_BLOCKOBS_DEPTH_BUCKETS == proto::kDepthBuckets);
static_assert(VKICK_BLOCKOBS_LATENCY_BUCKETS == proto::kLatencyBuckets);
static_assert(VKICK_BLOCKOBS_MAX_DISKS >= proto::kMaxDevices, "every announceable disk needs a slot");
static_assert(sizeof(vkick_blockobs_counters) % 8 == 0);
static_assert(sizeof(vkick_blockobs_start_key) == 16);
static_assert(sizeof(vkick_blockobs_disk) == 16);

constexpr uint32_t kTracefsMagic = 0x74726163;  // TRACEFS_MAGIC


int QuietLibbpf(enum libbpf_print_level level, const char* fmt, va_list args) {
  if (level == LIBBPF_DEBUG) return 0;
  return vfprintf(stderr, fmt, args);
}

int SilentLibbpf(enum libbpf_print_level, const char*, va_list) { return 0; }

bool IsTracefs(const std::string& path) {
  struct statfs fs;
  return statfs(path.c_str(), &fs) == 0 && static_cast<uint32_t>(fs.f_type) == kTracefsMagic;
}

// libbpf looks a tracepoint's id up under /sys/kernel/tracing, then
// /sys/kernel/debug/tracing: either one mounted is enough.
bool TracefsMounted() {
  return IsTracefs("/sys/kernel/tracing") || access("/sys/kernel/debug/tracing/events", F_OK) == 0;
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
    return BpfErrnoStatus(err, "loading the vkick_blockobs BPF object (needs kernel BTF and BPF atomics, >= 5.12)");
  }
  std::unique_ptr<BlockObserver> o(new BlockObserver(skel, ncpu));
  for (uint32_t s = VKICK_BLOCKOBS_MAX_DISKS; s > 0; --s) o->free_slots_.push_back(s - 1);
  if (opts.attach) {
    if (absl::Status s = o->Attach(opts); !s.ok()) return s;
  }
  return o;
}

absl::Status BlockObserver::Attach(const Options& opts) {
  // libbpf resolves a tracepoint's id through tracefs: a minimal guest init
  // may not have mounted it. Mount it first (once, logged) rather than let
  // the attach fail.
  std::string mount_error;
  if (!opts.tracefs_mount.empty() && !TracefsMounted()) {
    if (mount("tracefs", opts.tracefs_mount.c_str(), "tracefs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) == 0) {
      if (opts.log) opts.log(absl::StrCat("tracefs was not mounted: mounted it at ", opts.tracefs_mount));
    } else {
      mount_error = absl::StrCat("; tracefs is not mounted and mounting it at ", opts.tracefs_mount,
                                 " failed: ", std::strerror(errno));
    }
  }
  // libbpf's own lines would only repeat the one the caller logs.
  const libbpf_print_fn_t prev = libbpf_set_print(SilentLibbpf);
  const int rc = vkick_blockobs__attach(skel_);
  const int err = errno;
  libbpf_set_print(prev);
  if (rc != 0) {
    absl::Status s = BpfErrnoStatus(err, "attaching block:block_rq_issue/block_rq_complete");
    return absl::Status(s.code(), absl::StrCat(s.message(), mount_error));
  }
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
  vkick_blockobs_disk d{};
  d.slot = slot;
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.disks), &kdev, &d, BPF_ANY) != 0)
    return BpfErrnoStatus(errno, absl::StrCat("watching disk ", kdev >> 20, ":", kdev & 0xfffff));
  free_slots_.pop_back();
  slots_[kdev] = slot;
  return absl::OkStatus();
}

void BlockObserver::Unwatch(uint32_t kdev) {
  auto it = slots_.find(kdev);
  if (it == slots_.end()) return;
  bpf_map_delete_elem(bpf_map__fd(skel_->maps.disks), &kdev);
  // The disk's requests still in flight: their starts would otherwise stay
  // until a new Watch of the same disk matched them.
  const int fd = bpf_map__fd(skel_->maps.starts);
  std::vector<vkick_blockobs_start_key> doomed;
  vkick_blockobs_start_key k{}, next{};
  const vkick_blockobs_start_key* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, &next) == 0) {
    if (next.dev == kdev) doomed.push_back(next);
    k = next;
    prev = &k;
  }
  for (const vkick_blockobs_start_key& d : doomed) bpf_map_delete_elem(fd, &d);
  free_slots_.push_back(it->second);
  slots_.erase(it);
}

absl::StatusOr<DiskSnapshot> BlockObserver::Read() {
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
                                                    &snap.bad_slot, &snap.reissue};
  SumPerCpuErrors(bpf_map__fd(skel_->maps.errors), num_cpus_, outs);
  return snap;
}

absl::StatusOr<int> BlockObserver::TestRun(const vkick_blockobs_test_ctx& ctx) {
  vkick_blockobs_test_ctx copy = ctx;
  LIBBPF_OPTS(bpf_test_run_opts, opts, .ctx_in = &copy, .ctx_size_in = static_cast<__u32>(sizeof(copy)));
  if (bpf_prog_test_run_opts(bpf_program__fd(skel_->progs.test_blockobs), &opts) != 0)
    return BpfErrnoStatus(errno, "BPF_PROG_TEST_RUN of test_blockobs");
  return static_cast<int>(opts.retval);
}

}  // namespace vkick::agent
