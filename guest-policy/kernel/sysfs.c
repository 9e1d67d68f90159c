// SPDX-License-Identifier: GPL-2.0
/*
 * /sys/block/<disk>/vkick: the queues' policies, the agent's steering and the
 * counters (docs/kernel-driver.md). Every write is parsed by kick_policy.h; a
 * bad one is counted and returns -EINVAL with nothing changed.
 *
 * Lifetime: the kobjects are small wrappers that point at the queues. The
 * driver removes them before it frees the queues (unbind, freeze), and
 * kobject_del() waits until no show/store runs, so a callback never sees a
 * freed queue; the wrappers themselves go with their last reference.
 */
#include <linux/kobject.h>
#include <linux/slab.h>
#include <linux/sysfs.h>

#include "driver.h"

struct vkq_kobj {
	struct kobject kobj;
	struct vkq *q;
};

struct vkdir_kobj {
	struct kobject kobj;
	struct vkblk *vblk;
};

static struct vkq *to_q(struct kobject *k)
{
	return container_of(k, struct vkq_kobj, kobj)->q;
}

static int emit_policy(char *buf, const struct vk_policy *p)
{
	if (vk_batches(p))
		return sysfs_emit(buf, "%s:%u,%u\n", vk_mode_name(p->mode), p->batch, p->defer_ns / 1000);
	return sysfs_emit(buf, "%s\n", vk_mode_name(p->mode));
}

static void count_rejected(struct vkq *q)
{
	unsigned long flags;

	spin_lock_irqsave(&q->lock, flags);
	q->stats.rejected_writes++;
	spin_unlock_irqrestore(&q->lock, flags);
}

static ssize_t policy_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	struct vkq *q = to_q(k);
	unsigned long flags;
	struct vk_policy p;

	spin_lock_irqsave(&q->lock, flags);
	p = q->op;
	spin_unlock_irqrestore(&q->lock, flags);
	return emit_policy(buf, &p);
}

static ssize_t policy_store(struct kobject *k, struct kobj_attribute *a, const char *buf, size_t len)
{
	struct vkq *q = to_q(k);
	unsigned long flags;
	struct vk_policy p;

	if (vk_parse_policy(buf, len, &p)) {
		count_rejected(q);
		return -EINVAL;
	}
	spin_lock_irqsave(&q->lock, flags);
	q->op = p;
	spin_unlock_irqrestore(&q->lock, flags);
	/* What the old policy held back goes now, the new one's way. */
	vkq_flush(q, VK_WHY_POLICY_CHANGE);
	return len;
}

static ssize_t steer_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	struct vkq *q = to_q(k);
	u64 now = ktime_get_ns(), left_ms = 0;
	unsigned long flags;
	struct vk_steer st;

	spin_lock_irqsave(&q->lock, flags);
	if (q->steer.state == VK_LEASE_ACTIVE && now >= q->steer.expiry_ns)
		q->steer.state = VK_LEASE_EXPIRED;
	st = q->steer;
	spin_unlock_irqrestore(&q->lock, flags);
	if (st.state == VK_LEASE_ACTIVE)
		left_ms = div_u64(st.expiry_ns - now, NSEC_PER_MSEC);
	return sysfs_emit(buf, "%llu %s %u %u %llu %s\n", st.generation, vk_mode_name(st.policy.mode),
			  st.policy.batch, st.policy.defer_ns, left_ms, vk_lease_name(st.state));
}

static ssize_t steer_store(struct kobject *k, struct kobj_attribute *a, const char *buf, size_t len)
{
	struct vkq *q = to_q(k);
	struct vk_steer_write w;
	unsigned long flags;

	if (vk_parse_steer(buf, len, &w)) {
		count_rejected(q);
		return -EINVAL;
	}
	spin_lock_irqsave(&q->lock, flags);
	q->steer.generation = w.generation;
	q->steer.policy = w.policy;
	q->steer.expiry_ns = ktime_get_ns() + (u64)w.lease_ms * NSEC_PER_MSEC;
	q->steer.state = VK_LEASE_ACTIVE;
	spin_unlock_irqrestore(&q->lock, flags);
	vkq_flush(q, VK_WHY_POLICY_CHANGE);
	return len;
}

static ssize_t effective_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	struct vkq *q = to_q(k);
	unsigned long flags;
	struct vk_policy p;

	spin_lock_irqsave(&q->lock, flags);
	p = vk_effective(&q->op, &q->steer, ktime_get_ns(), READ_ONCE(q->vblk->draining));
	spin_unlock_irqrestore(&q->lock, flags);
	return sysfs_emit(buf, "%s %u %u\n", vk_mode_name(p.mode), p.batch, p.defer_ns);
}

static int emit_array(char *buf, int at, const char *key, const u64 *v, int n)
{
	int i;

	at += sysfs_emit_at(buf, at, "%s", key);
	for (i = 0; i < n; i++)
		at += sysfs_emit_at(buf, at, " %llu", v[i]);
	return at + sysfs_emit_at(buf, at, "\n");
}

static ssize_t stats_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	struct vkq *q = to_q(k);
	struct vkq_stats s;
	unsigned long flags;
	int at;

	spin_lock_irqsave(&q->lock, flags);
	s = q->stats;
	spin_unlock_irqrestore(&q->lock, flags);
	at = sysfs_emit(buf, "requests %llu\ncompletions %llu\nkicks %llu\ntimer_kicks %llu\n"
			"asks %llu\nsuppressed %llu\ndepth_sum %llu\nlatency_sum_ns %llu\n",
			s.requests, s.completions, s.kicks, s.kicks_by_why[VK_WHY_TIMER], s.asks,
			s.suppressed, s.depth_sum, s.latency_sum_ns);
	at = emit_array(buf, at, "kicks_by_why", s.kicks_by_why, VK_WHY_SLOTS);
	at = emit_array(buf, at, "depth_hist", s.depth_hist, VK_DEPTH_BUCKETS);
	at = emit_array(buf, at, "latency_hist", s.latency_hist, VK_LATENCY_BUCKETS);
	return at + sysfs_emit_at(buf, at, "depth_limit %u\ninflight %u\nrejected_writes %llu\n",
				  q->vblk->tag_set.queue_depth, s.inflight, s.rejected_writes);
}

static struct kobj_attribute policy_attr = __ATTR_RW(policy);
static struct kobj_attribute steer_attr = __ATTR_RW(steer);
static struct kobj_attribute effective_attr = __ATTR_RO(effective);
static struct kobj_attribute stats_attr = __ATTR_RO(stats);

static struct attribute *vkq_attrs[] = {
	&policy_attr.attr, &steer_attr.attr, &effective_attr.attr, &stats_attr.attr, NULL,
};
ATTRIBUTE_GROUPS(vkq);

static void vkq_kobj_release(struct kobject *k)
{
	kfree(container_of(k, struct vkq_kobj, kobj));
}

static struct kobj_type vkq_ktype = {
	.release = vkq_kobj_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = vkq_groups,
};

static ssize_t queues_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%u\n", container_of(k, struct vkdir_kobj, kobj)->vblk->num_vqs);
}

static struct kobj_attribute queues_attr = __ATTR_RO(queues);

static struct attribute *vkdir_attrs[] = { &queues_attr.attr, NULL };
ATTRIBUTE_GROUPS(vkdir);

static void vkdir_kobj_release(struct kobject *k)
{
	kfree(container_of(k, struct vkdir_kobj, kobj));
}

static struct kobj_type vkdir_ktype = {
	.release = vkdir_kobj_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = vkdir_groups,
};

static int add_queue(struct vkblk *vblk, unsigned int i)
{
	struct vkq_kobj *qk = kzalloc(sizeof(*qk), GFP_KERNEL);
	int err;

	if (!qk)
		return -ENOMEM;
	qk->q = &vblk->vqs[i];
	err = kobject_init_and_add(&qk->kobj, &vkq_ktype, vblk->kdir, "q%u", i);
	if (err) {
		kobject_put(&qk->kobj);
		return err;
	}
	vblk->vqs[i].kobj = &qk->kobj;
	return 0;
}

int vkblk_sysfs_add(struct vkblk *vblk)
{
	struct vkdir_kobj *dk = kzalloc(sizeof(*dk), GFP_KERNEL);
	unsigned int i;
	int err;

	if (!dk)
		return -ENOMEM;
	dk->vblk = vblk;
	err = kobject_init_and_add(&dk->kobj, &vkdir_ktype, &disk_to_dev(vblk->disk)->kobj, "vkick");
	if (err) {
		kobject_put(&dk->kobj);
		return err;
	}
	vblk->kdir = &dk->kobj;
	for (i = 0; i < vblk->num_vqs; i++) {
		err = add_queue(vblk, i);
		if (err) {
			vkblk_sysfs_remove(vblk);
			return err;
		}
	}
	return 0;
}

void vkblk_sysfs_remove(struct vkblk *vblk)
{
	unsigned int i;

	for (i = 0; vblk->vqs && i < vblk->num_vqs; i++) {
		if (!vblk->vqs[i].kobj)
			continue;
		kobject_del(vblk->vqs[i].kobj);
		kobject_put(vblk->vqs[i].kobj);
		vblk->vqs[i].kobj = NULL;
	}
	if (vblk->kdir) {
		kobject_del(vblk->kdir);
		kobject_put(vblk->kdir);
		vblk->kdir = NULL;
	}
}
