// SPDX-License-Identifier: GPL-2.0
/* vkick-agent: per (process, queue) counters from vkick-blk's USDT probes.
 *
 * Three SEC("usdt") programs, attached by agent/usdt_probes.cc with
 * bpf_program__attach_usdt() to provider "vkick" of each vkick-blk binary
 * (per pid or for every process of the binary). Hot-path rules as in
 * host_probes.bpf.c: per-CPU values, a bounded preallocated map, no locks,
 * bounded loops only; every failed insert or argument read is counted in
 * `errors` (bpf/vkick_common.bpf.h). See docs/agent.md.
 */
#include "vmlinux.h"

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

#include "bpf/vkick_agent.h"
#define VKICK_ERR_SLOTS VKICK_AGENT_ERR_COUNT
#include "bpf/vkick_common.bpf.h"
#include "bpf/vkick_hist.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Interval epoch for max_depth (written by userspace through the mmaped .bss). */
volatile __u32 epoch = 0;

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
  __uint(max_entries, VKICK_AGENT_MAX_KEYS);
  __type(key, struct vkick_agent_key);
  __type(value, struct vkick_agent_counters);
} queue_stats SEC(".maps");

static const struct vkick_agent_counters zero_counters;

static __always_inline struct vkick_agent_counters* lookup_counters(__u32 tgid, long queue) {
  if (queue < 0 || queue >= VKICK_AGENT_MAX_QUEUE) {
    count_error(VKICK_AGENT_ERR_BAD_QUEUE);
    return 0;
  }
  struct vkick_agent_key key = {};
  key.tgid = tgid;
  key.queue = (__u16)queue;
  return vkick_lookup_or_init(&queue_stats, &key, &zero_counters, VKICK_AGENT_ERR_MAP_FULL);
}

static __always_inline __u32 depth_bucket(__u64 depth) {
  return vkick_depth_bucket(depth, VKICK_AGENT_DEPTH_BUCKETS);
}

static __always_inline __u32 latency_bucket(__u64 ns) {
  return vkick_latency_bucket(ns, VKICK_AGENT_LATENCY_BUCKETS);
}

static __always_inline void count_submit(__u32 tgid, long queue, long depth) {
  struct vkick_agent_counters* c = lookup_counters(tgid, queue);
  if (!c) return;
  __u64 d = depth < 0 ? 0 : (__u64)depth;
  if (d > 0xFFFFFFFFULL) d = 0xFFFFFFFFULL;
  VKICK_RECORD_DEPTH(c, d, epoch, VKICK_AGENT_DEPTH_BUCKETS);
}

static __always_inline void count_kick(__u32 tgid, long queue, long batch, long why) {
  struct vkick_agent_counters* c = lookup_counters(tgid, queue);
  if (!c) return;
  c->kicks += 1;
  __u32 w = (why < 0 || why >= VKICK_AGENT_WHY_SLOTS) ? VKICK_AGENT_WHY_SLOTS - 1 : (__u32)why;
  barrier_var(w);
  if (w >= VKICK_AGENT_WHY_SLOTS) return;
  c->kicks_by_why[w] += 1;
}

static __always_inline void count_complete(__u32 tgid, long queue, long depth, long lat_ns) {
  struct vkick_agent_counters* c = lookup_counters(tgid, queue);
  if (!c) return;
  __u64 lat = lat_ns < 0 ? 0 : (__u64)lat_ns;
  c->completions += 1;
  c->latency_sum_ns += lat;
  __u32 b = latency_bucket(lat);
  barrier_var(b);
  if (b >= VKICK_AGENT_LATENCY_BUCKETS) return;
  c->latency_hist[b] += 1;
}

/* vkick:submit(q, depth): depth = requests outstanding, the new one included. */
SEC("usdt")
int BPF_USDT(vkick_submit, long queue, long depth) {
  count_submit(current_tgid(), queue, depth);
  return 0;
}

/* vkick:kick(q, batch, why): a notify write was performed. */
SEC("usdt")
int BPF_USDT(vkick_kick, long queue, long batch, long why) {
  count_kick(current_tgid(), queue, batch, why);
  return 0;
}

/* vkick:complete(q, depth, lat_ns): a completion seen by the driver. */
SEC("usdt")
int BPF_USDT(vkick_complete, long queue, long depth, long lat_ns) {
  count_complete(current_tgid(), queue, depth, lat_ns);
  return 0;
}

/* Tests only (BPF_PROG_TEST_RUN): the same counting code, arguments from ctx. */
SEC("syscall")
int test_probe(struct vkick_agent_test_ctx* ctx) {
  switch (ctx->op) {
    case VKICK_AGENT_TEST_SUBMIT:
      count_submit(ctx->tgid, ctx->queue, ctx->a);
      return 0;
    case VKICK_AGENT_TEST_KICK:
      count_kick(ctx->tgid, ctx->queue, ctx->a, ctx->b);
      return 0;
    case VKICK_AGENT_TEST_COMPLETE:
      count_complete(ctx->tgid, ctx->queue, ctx->a, ctx->b);
      return 0;
    case VKICK_AGENT_TEST_BUCKETS: {
      __u64 d = ctx->a < 0 ? 0 : (__u64)ctx->a;
      __u64 l = ctx->b < 0 ? 0 : (__u64)ctx->b;
      return (int)(depth_bucket(d) | (latency_bucket(l) << 8));
    }
  }
  return -1;
}
