/* Types shared by bpf/vkick_agent.bpf.c and the C++ side (agent/usdt_probes).
 *
 * vkick-agent counts what vkick-blk's USDT probes (provider "vkick":
 * submit(q, depth), kick(q, batch, why), complete(q, depth, lat_ns)) report,
 * per (process, queue). The single definition of every map key/value and
 * bound: the BPF object and userspace include this same file. Only
 * fixed-width __uN types, explicit padding, no pointers.
 *
 * Included from BPF (after vmlinux.h) and from C++ (<linux/types.h>).
 */
#ifndef VKICK_BPF_VKICK_AGENT_H_
#define VKICK_BPF_VKICK_AGENT_H_

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Bounds. queue_stats is a preallocated hash; an insert into the full map is
 * counted (VKICK_AGENT_ERR_MAP_FULL), never silently lost. */
#define VKICK_AGENT_MAX_KEYS 1024 /* (tgid, queue) pairs */
#define VKICK_AGENT_MAX_QUEUE 64  /* queue index bound (protocol kMaxQueuesPerDevice) */

/* Histogram bounds: exactly protocol/messages.h (checked by static_asserts
 * in agent/usdt_probes.cc and by the unit tests).
 * Depth: bucket 0 = 1 (and 0); bucket i (1..8) = [2^i, 2^(i+1)); 9 = >= 512.
 * Latency: bucket 0 = < 1 us; bucket i (1..14) = [2^(i-1), 2^i) us;
 * bucket 15 = >= 16.384 ms. */
#define VKICK_AGENT_DEPTH_BUCKETS 10
#define VKICK_AGENT_LATENCY_BUCKETS 16
/* kick `why` values (guest-policy/core/kick_scheduler.h KickWhy); values at
 * or above VKICK_AGENT_WHY_SLOTS - 1 land in the last ("other") slot. */
#define VKICK_AGENT_WHY_SLOTS 8
#define VKICK_AGENT_WHY_TIMER 3

/* Indices of the per-CPU errors array. */
enum vkick_agent_error {
  VKICK_AGENT_ERR_MAP_FULL = 0,  /* queue_stats insert failed: event lost, counted */
  VKICK_AGENT_ERR_BAD_QUEUE = 1, /* queue argument >= VKICK_AGENT_MAX_QUEUE */
  VKICK_AGENT_ERR_COUNT = 2,
};

struct vkick_agent_key {
  __u32 tgid;
  __u16 queue;
  __u16 pad;
};

/* Per-CPU value; userspace sums the counters over CPUs. */
struct vkick_agent_counters {
  __u64 requests;     /* submit probes */
  __u64 kicks;        /* kick probes (notify writes performed) */
  __u64 completions;  /* complete probes */
  __u64 depth_sum;    /* sum of depth over submits */
  __u64 latency_sum_ns;
  __u64 kicks_by_why[VKICK_AGENT_WHY_SLOTS];
  __u64 depth_hist[VKICK_AGENT_DEPTH_BUCKETS];
  __u64 latency_hist[VKICK_AGENT_LATENCY_BUCKETS];
  /* Max depth of the current epoch on this CPU: when max_epoch differs from
   * the global `epoch`, the first submit of the new epoch resets it. The
   * agent bumps `epoch` at each interval, so the interval's maximum needs no
   * userspace write into the map (no race with the counters). */
  __u32 max_depth;
  __u32 max_epoch;
};

/* Context of the SEC("syscall") test program run through BPF_PROG_TEST_RUN:
 * the same inline counting code as the USDT handlers, with the tgid and the
 * probe arguments from here instead of the current task and its registers. */
enum vkick_agent_test_op {
  VKICK_AGENT_TEST_SUBMIT = 0,   /* queue, a = depth */
  VKICK_AGENT_TEST_KICK = 1,     /* queue, a = batch, b = why */
  VKICK_AGENT_TEST_COMPLETE = 2, /* queue, a = depth, b = latency ns */
  VKICK_AGENT_TEST_BUCKETS = 3,  /* a = depth, b = latency ns; returns
                                    depth_bucket | latency_bucket << 8 */
};

struct vkick_agent_test_ctx {
  __u32 op;
  __u32 tgid;
  __s64 queue;
  __s64 a;
  __s64 b;
};

#endif /* VKICK_BPF_VKICK_AGENT_H_ */
