// SPDX-License-Identifier: GPL-2.0
/* vkick-agent: observe-only per-disk depth and latency of the guest kernel's
 * own virtio_blk, from the block tracepoints.
 *
 * block:block_rq_issue fires when blk-mq hands a request to the driver
 * (blk_mq_start_request, inside virtio_queue_rq), block:block_rq_complete
 * when the driver ends it. Classic SEC("tracepoint/...") programs reading the
 * record with CO-RE (struct trace_event_raw_block_rq{,_completion}): they
 * attach on any kernel with block tracepoints and BTF (this host's 6.18 and
 * Debian's 6.x), need no fentry/tp_btf (EPERM on this host), and the record
 * is the tracepoint's stable interface. Attached by agent/block_observer.cc.
 *
 * Only disks in `disks` (filled by userspace) are counted. Hot-path rules as
 * in vkick_agent.bpf.c: per-CPU counters, bounded preallocated maps, no
 * locks, no loops; every failed insert or unmatched event is counted in
 * `errors`. See docs/agent.md, "Kernel virtio_blk disks: observe only".
 */
#include "vmlinux.h"

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

#include "bpf/vkick_blockobs.h"
#include "bpf/vkick_hist.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Interval epoch for max_depth (written by userspace through the mmaped .bss). */
volatile __u32 epoch = 0;

/* The filter and each disk's in-flight count: dev -> {inflight, slot}. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_DISKS);
  __type(key, __u32);
  __type(value, struct vkick_blockobs_disk);
} disks SEC(".maps");

/* Issue time of each request in flight on a watched disk. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_STARTS);
  __type(key, struct vkick_blockobs_start_key);
  __type(value, __u64);
} starts SEC(".maps");

/* Counters per slot (an array: a watched disk always has its entry). */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_DISKS);
  __type(key, __u32);
  __type(value, struct vkick_blockobs_counters);
} disk_stats SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, VKICK_BLOCKOBS_ERR_COUNT);
  __type(key, __u32);
  __type(value, __u64);
} errors SEC(".maps");

static __always_inline void count_error(__u32 idx) {
  __u64* v = bpf_map_lookup_elem(&errors, &idx);
  if (v) *v += 1;
}

static __always_inline __u32 depth_bucket(__u64 depth) {
  return vkick_depth_bucket(depth, VKICK_BLOCKOBS_DEPTH_BUCKETS);
}

static __always_inline __u32 latency_bucket(__u64 ns) {
  return vkick_latency_bucket(ns, VKICK_BLOCKOBS_LATENCY_BUCKETS);
}

/* The start key of a request. block_rq_issue reports blk_rq_trace_sector()
 * (0 for a request without a position: driver-private ones such as
 * virtio_blk's GET_ID behind `serial`, and flushes), block_rq_complete the raw
 * blk_rq_pos() ((sector_t)-1 for those): the same mapping here pairs them. */
static __always_inline struct vkick_blockobs_start_key start_key(__u32 dev, __u64 sector) {
  struct vkick_blockobs_start_key key = {};
  key.dev = dev;
  key.sector = sector == ~0ULL ? 0 : sector;
  return key;
}

static __always_inline struct vkick_blockobs_counters* slot_counters(const struct vkick_blockobs_disk* d) {
  __u32 slot = d->slot;
  if (slot >= VKICK_BLOCKOBS_MAX_DISKS) {
    count_error(VKICK_BLOCKOBS_ERR_BAD_SLOT);
    return 0;
  }
  return bpf_map_lookup_elem(&disk_stats, &slot);
}

/* A request handed to the driver. Returns the depth counted, 0 if not. */
static __always_inline __u64 count_issue(__u32 dev, __u64 sector, __u64 now) {
  struct vkick_blockobs_disk* d = bpf_map_lookup_elem(&disks, &dev);
  if (!d) return 0; /* not a watched disk: the common case, leave at once */
  struct vkick_blockobs_start_key key = start_key(dev, sector);
  long err = bpf_map_update_elem(&starts, &key, &now, BPF_NOEXIST);
  if (err == -17 /* -EEXIST */) {
    /* The same (dev, sector) is already in flight: a request the driver
     * refused (ring full -> requeue) handed to it again. Restart its clock,
     * but it is not a new request and not one more in flight. */
    bpf_map_update_elem(&starts, &key, &now, BPF_EXIST);
    count_error(VKICK_BLOCKOBS_ERR_REISSUE);
    return 0;
  }
  if (err != 0) {
    /* `starts` is full: this request is still counted (depth) but its
     * completion will be a missing start; in-flight is not raised, so the
     * complete that finds no start cannot lower it either. */
    count_error(VKICK_BLOCKOBS_ERR_MAP_FULL);
  }
  __s64 before = err == 0 ? __sync_fetch_and_add(&d->inflight, 1) : d->inflight;
  __u64 depth = before < 0 ? 1 : (__u64)before + 1;
  struct vkick_blockobs_counters* c = slot_counters(d);
  if (!c) return 0;
  if (depth > 0xFFFFFFFFULL) depth = 0xFFFFFFFFULL;
  VKICK_RECORD_DEPTH(c, depth, epoch, VKICK_BLOCKOBS_DEPTH_BUCKETS);
  return depth;
}

/* The driver ended a request. Returns 1 if counted. */
static __always_inline int count_complete(__u32 dev, __u64 sector, __u64 now) {
  struct vkick_blockobs_disk* d = bpf_map_lookup_elem(&disks, &dev);
  if (!d) return 0;
  struct vkick_blockobs_start_key key = start_key(dev, sector);
  __u64* startp = bpf_map_lookup_elem(&starts, &key);
  if (!startp) {
    count_error(VKICK_BLOCKOBS_ERR_MISSING_START);
    return 0;
  }
  __u64 start = *startp;
  /* Only the CPU whose delete succeeds owns the completion: a start is
   * matched once even if two completes race for it. */
  if (bpf_map_delete_elem(&starts, &key) != 0) {
    count_error(VKICK_BLOCKOBS_ERR_MISSING_START);
    return 0;
  }
  /* Every deleted start was one increment at issue, so this cannot go below
   * 0 unless userspace reset the disk meanwhile (Unwatch + Watch): undone
   * and counted then. */
  __s64 before = __sync_fetch_and_add(&d->inflight, -1);
  if (before <= 0) {
    __sync_fetch_and_add(&d->inflight, 1);
    count_error(VKICK_BLOCKOBS_ERR_UNDERFLOW);
  }
  struct vkick_blockobs_counters* c = slot_counters(d);
  if (!c) return 0;
  __u64 lat = now > start ? now - start : 0;
  c->completions += 1;
  c->latency_sum_ns += lat;
  __u32 b = latency_bucket(lat);
  barrier_var(b);
  if (b >= VKICK_BLOCKOBS_LATENCY_BUCKETS) return 1;
  c->latency_hist[b] += 1;
  return 1;
}

/* block:block_rq_issue: the record's dev is (major << 20) | minor of the
 * request's disk (0 without one), sector its first sector. */
SEC("tracepoint/block/block_rq_issue")
int vkick_rq_issue(struct trace_event_raw_block_rq* ctx) {
  __u32 dev = BPF_CORE_READ(ctx, dev);
  __u64 sector = BPF_CORE_READ(ctx, sector);
  count_issue(dev, sector, bpf_ktime_get_ns());
  return 0;
}

SEC("tracepoint/block/block_rq_complete")
int vkick_rq_complete(struct trace_event_raw_block_rq_completion* ctx) {
  __u32 dev = BPF_CORE_READ(ctx, dev);
  __u64 sector = BPF_CORE_READ(ctx, sector);
  count_complete(dev, sector, bpf_ktime_get_ns());
  return 0;
}

/* Tests only (BPF_PROG_TEST_RUN): the same counting code, arguments from ctx. */
SEC("syscall")
int test_blockobs(struct vkick_blockobs_test_ctx* ctx) {
  switch (ctx->op) {
    case VKICK_BLOCKOBS_TEST_ISSUE:
      return (int)count_issue(ctx->dev, ctx->sector, ctx->now_ns);
    case VKICK_BLOCKOBS_TEST_COMPLETE:
      return count_complete(ctx->dev, ctx->sector, ctx->now_ns);
    case VKICK_BLOCKOBS_TEST_BUCKETS: {
      __u64 dd = ctx->a < 0 ? 0 : (__u64)ctx->a;
      __u64 l = ctx->b < 0 ? 0 : (__u64)ctx->b;
      return (int)(depth_bucket(dd) | (latency_bucket(l) << 8));
    }
    case VKICK_BLOCKOBS_TEST_INFLIGHT: {
      __u32 dev = ctx->dev;
      struct vkick_blockobs_disk* d = bpf_map_lookup_elem(&disks, &dev);
      return d ? (int)d->inflight : -1;
    }
  }
  return -1;
}
