/* Types shared by bpf/vkick_blockobs.bpf.c and the C++ side
 * (agent/block_observer).
 *
 * vkick-agent observes the guest kernel's own virtio_blk disks (observe
 * only: no policy is ever applied to them) from the block raw tracepoints
 * block_rq_issue (request handed to the driver) and block_rq_complete
 * (SEC("tp_btf/...")), per disk. The single definition of every map
 * key/value and bound: the BPF object and userspace include this same file.
 * Only fixed-width __uN types, explicit padding, no pointers.
 *
 * Included from BPF (after vmlinux.h) and from C++ (<linux/types.h>).
 */
#ifndef VKICK_BPF_VKICK_BLOCKOBS_H_
#define VKICK_BPF_VKICK_BLOCKOBS_H_

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Bounds. `disks` (the filter) and `disk_stats` are written by userspace
 * only, so they cannot fill from the BPF side; `starts` is a preallocated
 * hash filled by the issue handler: an insert into the full map is counted
 * (VKICK_BLOCKOBS_ERR_MAP_FULL), never silently lost, and entries whose
 * completion was never seen are dropped (ERR_STALE_START, ERR_EXPIRED_START)
 * so it cannot fill up with them. */
#define VKICK_BLOCKOBS_MAX_DISKS 64     /* watched disks (slots of disk_stats) */
#define VKICK_BLOCKOBS_MAX_STARTS 16384 /* requests in flight over all watched disks */

/* Histogram bounds: exactly protocol/messages.h and bpf/vkick_agent.h
 * (static_asserts in agent/block_observer.cc, BPF_PROG_TEST_RUN edges in
 * tests/agent/block_observer_bpf_test.cc).
 * Depth: bucket 0 = 1 (and 0); bucket i (1..8) = [2^i, 2^(i+1)); 9 = >= 512.
 * Latency: bucket 0 = < 1 us; bucket i (1..14) = [2^(i-1), 2^i) us;
 * bucket 15 = >= 16.384 ms. */
#define VKICK_BLOCKOBS_DEPTH_BUCKETS 10
#define VKICK_BLOCKOBS_LATENCY_BUCKETS 16

/* How old a `starts` entry may get before userspace (BlockObserver::Sweep,
 * at every Read) drops it as a request whose completion was never seen, and
 * gives its disk's in-flight count back. Completions are lost when a handler
 * does not run (a kernel whose raw tracepoints lack per-program recursion
 * protection, or a bucket lock busy under a nested handler: the delete fails)
 * and each such loss would otherwise pin one start and +1 in flight for the
 * agent's life. 30 s is far above any real request: blk-mq's own request
 * timeout (virtio_blk, SCSI) is 30 s, after which the driver either completes
 * or aborts the request -- both are completions. */
#define VKICK_BLOCKOBS_START_EXPIRE_NS (30ULL * 1000 * 1000 * 1000)

/* Indices of the per-CPU errors array. */
enum vkick_blockobs_error {
  VKICK_BLOCKOBS_ERR_MAP_FULL = 0,      /* `starts` insert failed (full, or its bucket busy): that
                                           request's latency is lost, its depth still counted */
  VKICK_BLOCKOBS_ERR_MISSING_START = 1, /* complete without a recorded issue (issued before the
                                           disk was watched, map full, or its start expired) */
  VKICK_BLOCKOBS_ERR_UNDERFLOW = 2,     /* in-flight would have gone below 0 (kept at 0) */
  VKICK_BLOCKOBS_ERR_BAD_SLOT = 3,      /* a `disks` entry with slot >= MAX_DISKS (userspace bug) */
  VKICK_BLOCKOBS_ERR_REISSUE = 4,       /* issue of a request already in flight: a requeued
                                           request handed to the driver again (not a new request) */
  VKICK_BLOCKOBS_ERR_STALE_START = 5,   /* issue found its struct request's start left by an
                                           EARLIER request (other sector or allocation time):
                                           that one's completion was never seen; replaced, its
                                           in-flight given back */
  VKICK_BLOCKOBS_ERR_EXPIRED_START = 6, /* starts older than VKICK_BLOCKOBS_START_EXPIRE_NS
                                           dropped by userspace's sweep (the only writer of this
                                           index: CPU 0's slot), in-flight given back */
  VKICK_BLOCKOBS_ERR_COUNT = 7,
};

/* `disks` key: the kernel's dev_t of the request's disk, (major << 20) |
 * first_minor of rq->q->disk (what the block tracepoints report as `dev`;
 * not glibc's st_rdev encoding). Value: */
struct vkick_blockobs_disk {
  __u32 slot; /* index into disk_stats and `inflight` (.bss), chosen by userspace */
  __u32 pad;
};

/* `starts` key: the struct request pointer (unique while the request is in
 * flight; blk-mq reuses the struct for later requests of the same tag).
 * Value: */
struct vkick_blockobs_start {
  __u64 issue_ns; /* last hand-over to the driver (bpf_ktime_get_ns, CLOCK_MONOTONIC) */
  __u64 sector;   /* rq->__sector and ...                                   */
  __u64 alloc_ns; /* ... rq->start_time_ns: which request this is, to tell a requeue of the
                     same request (both equal) from a later request reusing the struct */
  __u32 dev;      /* the `disks` key whose in-flight count this start holds */
  __u32 pad;
};

/* Per-CPU value of disk_stats[slot]; userspace sums the counters over CPUs. */
struct vkick_blockobs_counters {
  __u64 requests;    /* issues (re-issues of a request in flight not counted) */
  __u64 completions; /* completes that matched an issue */
  __u64 depth_sum;   /* sum of depth over issues */
  __u64 latency_sum_ns;
  __u64 depth_hist[VKICK_BLOCKOBS_DEPTH_BUCKETS];
  __u64 latency_hist[VKICK_BLOCKOBS_LATENCY_BUCKETS];
  /* Max depth of the current epoch on this CPU (the vkick_agent.h trick: the
   * first issue of a new global `epoch` restarts it; the agent bumps `epoch`
   * at each read, no userspace write into the map). */
  __u32 max_depth;
  __u32 max_epoch;
};

/* Context of the SEC("syscall") test program run through BPF_PROG_TEST_RUN:
 * the same inline counting code as the tp_btf handlers, with the device,
 * request id (any nonzero u64 standing for the struct request pointer), its
 * identity and the time from here instead of the struct request and the
 * clock. */
enum vkick_blockobs_test_op {
  VKICK_BLOCKOBS_TEST_ISSUE = 0,    /* dev, rq, sector, alloc_ns, now_ns; returns the depth
                                       counted (0: not counted) */
  VKICK_BLOCKOBS_TEST_COMPLETE = 1, /* dev, rq, now_ns; returns 1 if counted */
  VKICK_BLOCKOBS_TEST_BUCKETS = 2,  /* a = depth, b = latency ns; returns
                                       depth_bucket | latency_bucket << 8 */
  VKICK_BLOCKOBS_TEST_INFLIGHT = 3, /* dev; returns its in-flight count (-1: not watched) */
};

struct vkick_blockobs_test_ctx {
  __u32 op;
  __u32 dev;
  __u64 rq;
  __u64 sector;
  __u64 alloc_ns;
  __u64 now_ns;
  __s64 a;
  __s64 b;
};

#endif /* VKICK_BPF_VKICK_BLOCKOBS_H_ */
