/* The protocol's histogram bucketing (protocol/messages.h DepthBucket and
 * LatencyBucket), for BPF programs: one copy, shared by vkick_agent.bpf.c
 * (vkick-blk's USDT probes) and vkick_blockobs.bpf.c (the kernel's block
 * tracepoints). The including program passes its bucket counts, which its
 * shared-types header defines and the C++ side static_asserts against the
 * protocol; both programs' BPF_PROG_TEST_RUN fixtures check the edges.
 * BPF-only (static inline, no maps). */
#ifndef VKICK_BPF_VKICK_HIST_BPF_H_
#define VKICK_BPF_VKICK_HIST_BPF_H_

/* floor(log2(v)) for v >= 1, branch-only (no loops). */
static __always_inline __u32 vkick_log2_u64(__u64 v) {
  __u32 r = 0, shift;
  shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
  shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
  shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
  shift = (v > 0xF) << 2; v >>= shift; r |= shift;
  shift = (v > 0x3) << 1; v >>= shift; r |= shift;
  r |= (v >> 1);
  return r;
}

/* DepthBucket(): 0 = depth 1 (and 0); i (1..n-2) = [2^i, 2^(i+1)); n-1 = the rest. */
static __always_inline __u32 vkick_depth_bucket(__u64 depth, __u32 nbuckets) {
  if (depth <= 1) return 0;
  __u32 b = vkick_log2_u64(depth);
  return b < nbuckets - 1 ? b : nbuckets - 1;
}

/* LatencyBucket(): us = ns / 1000; 0 -> 0; else bit_width(us), capped at n-1. */
static __always_inline __u32 vkick_latency_bucket(__u64 ns, __u32 nbuckets) {
  __u64 us = ns / 1000;
  if (us == 0) return 0;
  __u32 b = vkick_log2_u64(us) + 1;
  return b < nbuckets - 1 ? b : nbuckets - 1;
}

/* One submission seen at `depth` (already clamped to u32) by a counters
 * struct `c` with the fields requests, depth_sum, max_depth, max_epoch and
 * depth_hist[nbuckets] (both programs' per-CPU values): counts it, keeps the
 * interval's maximum (reset at the first event of a new `epoch`: the agent
 * bumps it when it reads, so no userspace write races the counters) and
 * buckets it. A macro because the two structs are distinct types. */
#define VKICK_RECORD_DEPTH(c, depth, epoch_now, nbuckets)          \
  do {                                                             \
    (c)->requests += 1;                                            \
    (c)->depth_sum += (depth);                                     \
    if ((c)->max_epoch != (epoch_now)) {                           \
      (c)->max_epoch = (epoch_now);                                \
      (c)->max_depth = (__u32)(depth);                             \
    } else if ((__u32)(depth) > (c)->max_depth) {                  \
      (c)->max_depth = (__u32)(depth);                             \
    }                                                              \
    __u32 vkick_b_ = vkick_depth_bucket((depth), (nbuckets));      \
    barrier_var(vkick_b_); /* bound check next to the access */    \
    if (vkick_b_ < (nbuckets)) (c)->depth_hist[vkick_b_] += 1;     \
  } while (0)

#endif /* VKICK_BPF_VKICK_HIST_BPF_H_ */
