/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The deferred kick's pure logic: what a hardware queue does with a request
 * (kick, ask the device, arm the deferral timer, nothing), which policy is in
 * force (the operator's, or the agent's under a lease), the sysfs syntax of
 * both, and the protocol's histogram buckets.
 *
 * No locks, no allocation, no kernel calls: the module calls it under the
 * queue's lock, and tests/unit/kmod compiles the same header in user space,
 * so every decision and every parse is unit-tested and fuzzed without a VM.
 */
#ifndef VKICK_KMOD_KICK_POLICY_H
#define VKICK_KMOD_KICK_POLICY_H

#ifdef __KERNEL__
#include <linux/errno.h>
#include <linux/types.h>
#else
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#endif

/* Numbering shared with protocol/messages.h KickMode. */
enum vk_mode { VK_IMMEDIATE = 0, VK_EVENT_IDX = 1, VK_STATIC = 2, VK_ADAPTIVE = 3 };

/* Why a notification was made: the agent's KickWhy slots (stats kicks_by_why). */
enum vk_why {
	VK_WHY_IMMEDIATE = 0,
	VK_WHY_EVENT_IDX = 1,
	VK_WHY_BATCH_FULL = 2,
	VK_WHY_TIMER = 3,
	VK_WHY_POLICY_CHANGE = 4,
	VK_WHY_RING_FULL = 5,
	VK_WHY_FLUSH = 6, /* commit_rqs, freeze, unbind */
	VK_WHY_SLOTS = 8,
};

enum vk_lease { VK_LEASE_NONE = 0, VK_LEASE_ACTIVE = 1, VK_LEASE_EXPIRED = 2 };

#define VK_MAX_BATCH 256u
#define VK_MAX_DEFER_NS 1000000u  /* a deferred kick waits <= 1 ms */
#define VK_MIN_DEFER_NS 1000u     /* a batch > 1 needs a timer of >= 1 us */
#define VK_MIN_LEASE_MS 10u
#define VK_MAX_LEASE_MS 60000u
#define VK_DEPTH_BUCKETS 10       /* protocol/messages.h kDepthBuckets */
#define VK_LATENCY_BUCKETS 16     /* protocol/messages.h kLatencyBuckets */

struct vk_policy {
	u8 mode;       /* enum vk_mode */
	u16 batch;     /* B: 1..VK_MAX_BATCH; 1 = no batching */
	u32 defer_ns;  /* T: 0 (batch 1) or VK_MIN_DEFER_NS..VK_MAX_DEFER_NS */
};

/* The agent's values for an adaptive queue. */
struct vk_steer {
	u64 generation;
	struct vk_policy policy;  /* never VK_ADAPTIVE */
	u64 expiry_ns;            /* monotonic */
	u8 state;                 /* enum vk_lease */
};

static inline struct vk_policy vk_immediate(void)
{
	struct vk_policy p = { (u8)VK_IMMEDIATE, 1, 0 };
	return p;
}

/*
 * The policy in force at `now`. An adaptive queue follows the agent while
 * its lease runs and runs immediate otherwise (never steered, or expired:
 * the state records it). `draining` (unbind, freeze) forces immediate so
 * nothing waits for a timer while the device goes away.
 */
static inline struct vk_policy vk_effective(const struct vk_policy *op, struct vk_steer *st,
					     u64 now, bool draining)
{
	if (draining)
		return vk_immediate();
	if (op->mode != VK_ADAPTIVE)
		return *op;
	if (st->state == VK_LEASE_ACTIVE && now < st->expiry_ns)
		return st->policy;
	if (st->state == VK_LEASE_ACTIVE)
		st->state = VK_LEASE_EXPIRED;
	return vk_immediate();
}

enum vk_action {
	VK_NONE = 0,  /* nothing now */
	VK_ARM,       /* start the deferral timer (T) */
	VK_KICK,      /* notify the device, unconditionally */
	VK_ASK,       /* notify only if the device asks (virtqueue_kick_prepare) */
};

struct vk_decision {
	u8 action;  /* enum vk_action */
	u8 why;     /* enum vk_why, for VK_KICK / VK_ASK */
};

/* How a batch closes under `p`: event-idx asks the device, the rest kick. */
static inline struct vk_decision vk_close(const struct vk_policy *p, u8 why)
{
	struct vk_decision d = { (u8)(p->mode == VK_EVENT_IDX ? VK_ASK : VK_KICK), why };
	return d;
}

static inline bool vk_batches(const struct vk_policy *p)
{
	return (p->mode == VK_STATIC || p->mode == VK_EVENT_IDX) && p->batch > 1;
}

/*
 * A request was just added to the ring. `pending`: requests not yet notified
 * or asked about, this one included (>= 1). `last`: blk-mq's bd->last (the
 * end of its batch). `full`: no further request can arrive before a
 * completion (ring or tag depth exhausted), so waiting for T would only add
 * latency. `timer_armed`: the deferral timer is pending.
 */
static inline struct vk_decision vk_on_submit(const struct vk_policy *p, u32 pending, bool last,
					      bool full, bool timer_armed)
{
	struct vk_decision none = { (u8)VK_NONE, 0 };
	struct vk_decision arm = { (u8)VK_ARM, 0 };

	if (full)
		return vk_close(p, (u8)VK_WHY_RING_FULL);
	if (!vk_batches(p)) {
		if (!last)
			return none;
		return vk_close(p, (u8)(p->mode == VK_EVENT_IDX ? VK_WHY_EVENT_IDX : VK_WHY_IMMEDIATE));
	}
	if (pending >= p->batch)
		return vk_close(p, (u8)VK_WHY_BATCH_FULL);
	return timer_armed ? none : arm;
}

/* The deferral timer fired, or a flush point (commit_rqs, policy change). */
static inline struct vk_decision vk_on_flush(const struct vk_policy *p, u32 pending, u8 why)
{
	struct vk_decision none = { (u8)VK_NONE, 0 };

	return pending ? vk_close(p, why) : none;
}

/* ---- protocol histogram buckets (protocol/messages.h) -------------------- */

static inline unsigned int vk_log2(u64 v)  /* floor(log2(v)), v >= 1 */
{
	unsigned int r = 0;

	while (v >>= 1)
		r++;
	return r;
}

/* bucket 0: d = 1; i in 1..8: 2^i <= d < 2^(i+1); 9: d >= 512 */
static inline unsigned int vk_depth_bucket(u32 depth)
{
	unsigned int b = depth ? vk_log2(depth) : 0;

	return b < VK_DEPTH_BUCKETS - 1 ? b : VK_DEPTH_BUCKETS - 1;
}

/* bucket 0: < 1 us; i in 1..14: [2^(i-1), 2^i) us; 15: >= 16.384 ms */
static inline unsigned int vk_latency_bucket(u64 ns)
{
	u64 us = ns / 1000;
	unsigned int b = us ? vk_log2(us) + 1 : 0;

	return b < VK_LATENCY_BUCKETS - 1 ? b : VK_LATENCY_BUCKETS - 1;
}

/* ---- sysfs syntax --------------------------------------------------------- */

/* A cursor over a write's bytes; sysfs buffers are not NUL-terminated. */
struct vk_text {
	const char *p;
	const char *end;
};

static inline bool vk_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

static inline void vk_skip_spaces(struct vk_text *t)
{
	while (t->p < t->end && vk_is_space(*t->p))
		t->p++;
}

/* Consumes `word` when the text continues with it. */
static inline bool vk_take(struct vk_text *t, const char *word)
{
	const char *p = t->p;

	for (; *word; word++, p++)
		if (p >= t->end || *p != *word)
			return false;
	t->p = p;
	return true;
}

/* A decimal u64 of at most 19 digits (no sign, no overflow possible). */
static inline bool vk_take_u64(struct vk_text *t, u64 *out)
{
	u64 v = 0;
	int n = 0;

	while (t->p < t->end && *t->p >= '0' && *t->p <= '9' && n < 19) {
		v = v * 10 + (u64)(*t->p - '0');
		t->p++;
		n++;
	}
	if (n == 0 || (t->p < t->end && *t->p >= '0' && *t->p <= '9'))
		return false;
	*out = v;
	return true;
}

/* The whole text was consumed (trailing whitespace allowed). */
static inline bool vk_done(struct vk_text *t)
{
	vk_skip_spaces(t);
	return t->p == t->end;
}

static inline bool vk_policy_valid(const struct vk_policy *p)
{
	if (p->mode > VK_ADAPTIVE || p->batch < 1 || p->batch > VK_MAX_BATCH)
		return false;
	if (p->defer_ns > VK_MAX_DEFER_NS)
		return false;
	/* A timer shorter than 1 us is none; a batch above 1 needs one. */
	if (p->defer_ns != 0 && p->defer_ns < VK_MIN_DEFER_NS)
		return false;
	return p->batch == 1 || p->defer_ns >= VK_MIN_DEFER_NS;
}

/* "B,T" with T in microseconds and an optional "us". */
static inline bool vk_take_batch_defer(struct vk_text *t, struct vk_policy *p)
{
	u64 b, us;

	if (!vk_take_u64(t, &b) || !vk_take(t, ",") || !vk_take_u64(t, &us))
		return false;
	vk_take(t, "us");
	if (b > VK_MAX_BATCH || us > VK_MAX_DEFER_NS / 1000)
		return false;
	p->batch = (u16)b;
	p->defer_ns = (u32)(us * 1000);
	return true;
}

/*
 * The operator's `policy` file: immediate | event-idx | static:B,T |
 * event-idx:B,T | adaptive. 0 or -EINVAL (then *out is untouched).
 */
static inline int vk_parse_policy(const char *buf, size_t len, struct vk_policy *out)
{
	struct vk_text t = { buf, buf + len };
	struct vk_policy p = { (u8)VK_IMMEDIATE, 1, 0 };

	vk_skip_spaces(&t);
	if (vk_take(&t, "immediate")) {
		p.mode = VK_IMMEDIATE;
	} else if (vk_take(&t, "adaptive")) {
		p.mode = VK_ADAPTIVE;
	} else if (vk_take(&t, "static:")) {
		p.mode = VK_STATIC;
		if (!vk_take_batch_defer(&t, &p))
			return -EINVAL;
	} else if (vk_take(&t, "event-idx")) {
		p.mode = VK_EVENT_IDX;
		if (vk_take(&t, ":") && !vk_take_batch_defer(&t, &p))
			return -EINVAL;
	} else {
		return -EINVAL;
	}
	if (!vk_done(&t) || !vk_policy_valid(&p))
		return -EINVAL;
	*out = p;
	return 0;
}

static inline const char *vk_mode_name(u8 mode)
{
	switch (mode) {
	case VK_IMMEDIATE: return "immediate";
	case VK_EVENT_IDX: return "event-idx";
	case VK_STATIC: return "static";
	case VK_ADAPTIVE: return "adaptive";
	default: return "?";
	}
}

static inline const char *vk_lease_name(u8 state)
{
	switch (state) {
	case VK_LEASE_NONE: return "none";
	case VK_LEASE_ACTIVE: return "active";
	case VK_LEASE_EXPIRED: return "expired";
	default: return "?";
	}
}

/* The agent's `steer` write. */
struct vk_steer_write {
	u64 generation;
	struct vk_policy policy;
	u32 lease_ms;
};

/*
 * "<generation> <mode> <batch> <defer_ns> <lease_ms>", mode immediate |
 * event-idx | static. 0 or -EINVAL (then *out is untouched).
 */
static inline int vk_parse_steer(const char *buf, size_t len, struct vk_steer_write *out)
{
	struct vk_text t = { buf, buf + len };
	struct vk_steer_write w;
	u64 batch, defer_ns, lease_ms;

	vk_skip_spaces(&t);
	if (!vk_take_u64(&t, &w.generation) || w.generation == 0)
		return -EINVAL;
	vk_skip_spaces(&t);
	if (vk_take(&t, "immediate "))
		w.policy.mode = VK_IMMEDIATE;
	else if (vk_take(&t, "event-idx "))
		w.policy.mode = VK_EVENT_IDX;
	else if (vk_take(&t, "static "))
		w.policy.mode = VK_STATIC;
	else
		return -EINVAL;
	vk_skip_spaces(&t);
	if (!vk_take_u64(&t, &batch))
		return -EINVAL;
	vk_skip_spaces(&t);
	if (!vk_take_u64(&t, &defer_ns))
		return -EINVAL;
	vk_skip_spaces(&t);
	if (!vk_take_u64(&t, &lease_ms) || !vk_done(&t))
		return -EINVAL;
	if (batch < 1 || batch > VK_MAX_BATCH || defer_ns > VK_MAX_DEFER_NS)
		return -EINVAL;
	if (lease_ms < VK_MIN_LEASE_MS || lease_ms > VK_MAX_LEASE_MS)
		return -EINVAL;
	w.policy.batch = (u16)batch;
	w.policy.defer_ns = (u32)defer_ns;
	w.lease_ms = (u32)lease_ms;
	if (!vk_policy_valid(&w.policy))
		return -EINVAL;
	*out = w;
	return 0;
}

#endif /* VKICK_KMOD_KICK_POLICY_H */
