/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vkick_virtio_blk: shared types of the driver (blk_driver.c) and its
 * sysfs interface (sysfs.c). docs/kernel-driver.md is the user's guide.
 */
#ifndef VKICK_KMOD_DRIVER_H
#define VKICK_KMOD_DRIVER_H

#include <linux/blk-mq.h>
#include <linux/hrtimer.h>
#include <linux/kobject.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/virtio.h>
#include <linux/workqueue.h>

#include "kick_policy.h"

/* Counters of one hardware queue; written under vkq.lock only. */
struct vkq_stats {
	u64 requests;
	u64 completions;
	u64 kicks;
	u64 asks;
	u64 suppressed;
	u64 depth_sum;
	u64 latency_sum_ns;
	u64 kicks_by_why[VK_WHY_SLOTS];
	u64 depth_hist[VK_DEPTH_BUCKETS];
	u64 latency_hist[VK_LATENCY_BUCKETS];
	u64 rejected_writes;
	u32 inflight;
};

struct vkblk;

/* One hardware queue = one virtqueue, with its kick policy and deferral timer. */
struct vkq {
	spinlock_t lock;      /* the ring, the policy, the counters */
	struct virtqueue *vq;
	struct vkblk *vblk;
	unsigned int index;
	char name[16];

	struct vk_policy op;    /* the operator's (sysfs `policy`) */
	struct vk_steer steer;  /* the agent's (sysfs `steer`), for adaptive */
	u32 pending;            /* requests added since the last kick or ask */
	bool timer_armed;
	struct hrtimer timer;   /* the deferred kick: fires T after the first pending */

	struct vkq_stats stats;
	struct kobject *kobj;   /* /sys/block/<disk>/vkick/q<N> */
} ____cacheline_aligned_in_smp;

struct vkblk {
	struct virtio_device *vdev;
	struct gendisk *disk;
	struct blk_mq_tag_set tag_set;
	struct work_struct config_work;
	struct mutex vdev_mutex;  /* vdev is NULL once removed (open/getgeo) */
	int index;                /* name: vkd<letters(index)> */
	unsigned int num_vqs;
	struct vkq *vqs;
	bool draining;            /* unbind/freeze: every queue runs immediate */
	struct kobject *kdir;     /* /sys/block/<disk>/vkick */
};

/* blk_driver.c: a flush point of queue q (policy change, drain). */
void vkq_flush(struct vkq *q, u8 why);

/* sysfs.c */
int vkblk_sysfs_add(struct vkblk *vblk);
void vkblk_sysfs_remove(struct vkblk *vblk);
extern const struct attribute_group *vkblk_disk_groups[];

#endif /* VKICK_KMOD_DRIVER_H */
