// SPDX-License-Identifier: GPL-2.0
/* vkick-agent: observe-only per-disk depth and latency of the guest kernel's
 * own virtio_blk, from the block raw tracepoints.
 *
 * block_rq_issue fires when blk-mq hands a request to the driver
 * (blk_mq_start_request, inside virtio_queue_rq), block_rq_complete when the
 * driver ends it (blk_update_request / blk_complete_request), usually in the
 * device's interrupt. BTF-typed raw tracepoints, SEC("tp_btf/..."), with the
 * struct request itself as argument (TP_PROTO of include/trace/events/block.h:
 * (struct request *rq) and (struct request *rq, blk_status_t error,
 * unsigned int nr_bytes), the same in 6.1 and 6.18), read with CO-RE.
 *
 * Why not the classic SEC("tracepoint/block/...") programs used before: a
 * perf-event tracepoint program runs under the global per-CPU
 * bpf_prog_active guard, so a completion interrupting the issue program on
 * the same CPU was silently skipped (1-vCPU guest: 16 384 requests issued,
 * 16 296 completions seen), leaking its start and +1 in flight forever. Raw
 * tracepoints only guard each program against itself (prog->active): the
 * complete program runs while the issue program is interrupted. Anything
 * still missed heals: a stale start is replaced at the struct's next issue
 * (ERR_STALE_START), an old one expired by userspace (ERR_EXPIRED_START).
 * Attached by agent/block_observer.cc.
 *
 * Only disks in `disks` (filled by userspace) are counted. Hot-path rules as
 * in vkick_agent.bpf.c: per-CPU counters, bounded preallocated maps, no
 * locks, no loops; every failed insert or unmatched event is counted in
 * `errors`. See docs/agent.md, "Kernel virtio_blk disks: observe only".
 */
#include "vmlinux.h"

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "bpf/vkick_blockobs.h"
#define VKICK_ERR_SLOTS VKICK_BLOCKOBS_ERR_COUNT
#include "bpf/vkick_common.bpf.h"
#include "bpf/vkick_hist.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Interval epoch for max_depth (written by userspace through the mmaped .bss). */
volatile __u32 epoch = 0;

/* Each watched disk's requests issued and not completed, by slot. In .bss,
 * not in the `disks` value, so that userspace can correct it with a real
 * atomic on the skeleton's mmap (BlockObserver::Sweep gives back the count of
 * expired starts with __atomic_compare_exchange): every writer, BPF or
 * userspace, is an atomic read-modify-write of the same word, so no update is
 * lost. Reset by userspace (Watch) before the disk enters the filter. */
__s64 inflight[VKICK_BLOCKOBS_MAX_DISKS] = {};

/* The filter: dev -> {slot}. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_DISKS);
  __type(key, __u32);
  __type(value, struct vkick_blockobs_disk);
} disks SEC(".maps");

/* Each request in flight on a watched disk: struct request pointer ->
 * {issue time, identity, dev}. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_STARTS);
  __type(key, __u64);
  __type(value, struct vkick_blockobs_start);
} starts SEC(".maps");

/* Counters per slot (an array: a watched disk always has its entry). */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, VKICK_BLOCKOBS_MAX_DISKS);
  __type(key, __u32);
  __type(value, struct vkick_blockobs_counters);
} disk_stats SEC(".maps");

static __always_inline __u32 depth_bucket(__u64 depth) {
  return vkick_depth_bucket(depth, VKICK_BLOCKOBS_DEPTH_BUCKETS);
}

static __always_inline __u32 latency_bucket(__u64 ns) {
  return vkick_latency_bucket(ns, VKICK_BLOCKOBS_LATENCY_BUCKETS);
}

static __always_inline struct vkick_blockobs_counters* slot_counters(__u32 slot) {
  return bpf_map_lookup_elem(&disk_stats, &slot);
}

/* The watched disk `dev`'s slot, or -1 (not watched, or a bad slot: counted). */
static __always_inline __s64 disk_slot(__u32 dev) {
  struct vkick_blockobs_disk* d = bpf_map_lookup_elem(&disks, &dev);
  if (!d) return -1; /* not a watched disk: the common case */
  __u32 slot = d->slot;
  if (slot >= VKICK_BLOCKOBS_MAX_DISKS) {
    count_error(VKICK_BLOCKOBS_ERR_BAD_SLOT);
    return -1;
  }
  return slot;
}

/* One request of `dev` no longer in flight. Every start deleted was one
 * increment at issue, so this cannot go below 0 unless userspace reset the
 * disk meanwhile (Unwatch + Watch) or its sweep raced: undone and counted. */
static __always_inline void release_inflight(__u32 dev) {
  __s64 s = disk_slot(dev);
  if (s < 0 || s >= VKICK_BLOCKOBS_MAX_DISKS) return;
  __s64 before = __sync_fetch_and_add(&inflight[s], -1);
  if (before <= 0) {
    __sync_fetch_and_add(&inflight[s], 1);
    count_error(VKICK_BLOCKOBS_ERR_UNDERFLOW);
  }
}

/* A request of watched disk `dev` (slot `s`, from disk_slot()) handed to the
 * driver. Returns the depth counted, 0 if not. */
static __always_inline __u64 count_issue(__s64 s, __u32 dev, __u64 rq, __u64 sector, __u64 alloc_ns,
                                         __u64 now) {
  if (s < 0 || s >= VKICK_BLOCKOBS_MAX_DISKS) return 0;
  struct vkick_blockobs_start v = {};
  v.issue_ns = now;
  v.sector = sector;
  v.alloc_ns = alloc_ns;
  v.dev = dev;
  long err = bpf_map_update_elem(&starts, &rq, &v, BPF_NOEXIST);
  if (err == -VKICK_EEXIST) {
    struct vkick_blockobs_start* old = bpf_map_lookup_elem(&starts, &rq);
    if (old) {
      if (old->dev == dev && old->sector == sector && old->alloc_ns == alloc_ns) {
        /* The same request is already in flight: one the driver refused
         * (ring full -> requeue) handed to it again. Restart its clock, but
         * it is not a new request and not one more in flight. (BPF_EXIST:
         * never write into an element a racing delete may have freed.) */
        if (bpf_map_update_elem(&starts, &rq, &v, BPF_EXIST) == 0) {
          count_error(VKICK_BLOCKOBS_ERR_REISSUE);
          return 0;
        }
        /* Gone meanwhile (userspace expired it and gave its in-flight
         * back): counted below as the new request it now is. */
      } else {
        /* An earlier request on this struct whose completion was never
         * seen: drop it (only the deleter gives its in-flight back) and
         * count this one as new. */
        __u32 old_dev = old->dev;
        if (bpf_map_delete_elem(&starts, &rq) == 0) {
          release_inflight(old_dev);
          count_error(VKICK_BLOCKOBS_ERR_STALE_START);
        }
      }
    }
    err = bpf_map_update_elem(&starts, &rq, &v, BPF_NOEXIST);
  }
  if (err != 0) {
    /* `starts` is full (or its bucket busy under a nested handler): this
     * request is still counted (depth) but its completion will be a missing
     * start; in-flight is not raised, so the complete that finds no start
     * cannot lower it either. */
    count_error(VKICK_BLOCKOBS_ERR_MAP_FULL);
  }
  __s64 before = err == 0 ? __sync_fetch_and_add(&inflight[s], 1) : inflight[s];
  __u64 depth = before < 0 ? 1 : (__u64)before + 1;
  struct vkick_blockobs_counters* c = slot_counters((__u32)s);
  if (!c) return 0;
  if (depth > 0xFFFFFFFFULL) depth = 0xFFFFFFFFULL;
  VKICK_RECORD_DEPTH(c, depth, epoch, VKICK_BLOCKOBS_DEPTH_BUCKETS);
  return depth;
}

/* The driver ended a request. Returns 1 if counted. */
static __always_inline int count_complete(__u32 dev, __u64 rq, __u64 now) {
  __s64 s = disk_slot(dev);
  if (s < 0) return 0;
  struct vkick_blockobs_start* startp = bpf_map_lookup_elem(&starts, &rq);
  if (!startp) {
    count_error(VKICK_BLOCKOBS_ERR_MISSING_START);
    return 0;
  }
  __u64 start = startp->issue_ns;
  __u32 start_dev = startp->dev;
  /* Only the CPU (or userspace sweep) whose delete succeeds owns the start:
   * it is matched once even if a complete and an expiry race for it. */
  if (bpf_map_delete_elem(&starts, &rq) != 0) {
    count_error(VKICK_BLOCKOBS_ERR_MISSING_START);
    return 0;
  }
  release_inflight(start_dev); /* the disk whose in-flight the start held: `dev` */
  struct vkick_blockobs_counters* c = slot_counters((__u32)s);
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

/* The kernel's dev_t of the request's disk as the tracepoints report it,
 * (major << 20) | first_minor of rq->q->disk (disk_devt()); 0 without a disk
 * (then never in `disks`). */
static __always_inline __u32 rq_dev(struct request* rq) {
  struct gendisk* disk = BPF_CORE_READ(rq, q, disk);
  if (!disk) return 0;
  __u32 major = (__u32)BPF_CORE_READ(disk, major);
  __u32 minor = (__u32)BPF_CORE_READ(disk, first_minor);
  return (major << 20) | (minor & 0xFFFFF);
}

/* The filter first (one lookup): reading the request's identity is for
 * watched disks only. */
SEC("tp_btf/block_rq_issue")
int BPF_PROG(vkick_rq_issue, struct request* rq) {
  __u32 dev = rq_dev(rq);
  if (!dev) return 0;
  __s64 s = disk_slot(dev);
  if (s < 0) return 0;
  count_issue(s, dev, (__u64)rq, BPF_CORE_READ(rq, __sector), BPF_CORE_READ(rq, start_time_ns),
              bpf_ktime_get_ns());
  return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(vkick_rq_complete, struct request* rq, blk_status_t error, unsigned int nr_bytes) {
  __u32 dev = rq_dev(rq);
  if (!dev) return 0;
  count_complete(dev, (__u64)rq, bpf_ktime_get_ns());
  return 0;
}

/* Tests only (BPF_PROG_TEST_RUN): the same counting code, arguments from ctx. */
SEC("syscall")
int test_blockobs(struct vkick_blockobs_test_ctx* ctx) {
  switch (ctx->op) {
    case VKICK_BLOCKOBS_TEST_ISSUE:
      return (int)count_issue(disk_slot(ctx->dev), ctx->dev, ctx->rq, ctx->sector, ctx->alloc_ns, ctx->now_ns);
    case VKICK_BLOCKOBS_TEST_COMPLETE:
      return count_complete(ctx->dev, ctx->rq, ctx->now_ns);
    case VKICK_BLOCKOBS_TEST_BUCKETS: {
      __u64 dd = ctx->a < 0 ? 0 : (__u64)ctx->a;
      __u64 l = ctx->b < 0 ? 0 : (__u64)ctx->b;
      return (int)(depth_bucket(dd) | (latency_bucket(l) << 8));
    }
    case VKICK_BLOCKOBS_TEST_INFLIGHT: {
      __s64 s = disk_slot(ctx->dev);
      if (s < 0 || s >= VKICK_BLOCKOBS_MAX_DISKS) return -1;
      return (int)inflight[s];
    }
  }
  return -1;
}
