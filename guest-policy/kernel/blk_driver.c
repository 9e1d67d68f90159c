// SPDX-License-Identifier: GPL-2.0
/*
 * vkick_virtio_blk: a blk-mq virtio-blk driver whose kick is a policy per
 * hardware queue (docs/kernel-driver.md).
 *
 * It is a disk driver first: one hardware queue per virtqueue, indirect
 * descriptors and EVENT_IDX through the virtio core, MSI-X vectors spread by
 * blk_mq_virtio_map_queues, flush (FUA emulated by the block layer's flush
 * machinery: virtio-blk has no FUA bit), discard and write-zeroes when
 * offered, read-only devices, capacity changes.
 *
 * The kick: where the stock driver notifies at the end of every blk-mq batch
 * (bd->last), this one asks vk_on_submit() (kick_policy.h) and may defer the
 * notification to a per-queue hrtimer, the "taskqueue" kick of the seeds.
 * Nothing strands a request: the timer fires T (<= 1 ms) after the first
 * unnotified request; a full ring or tag set, commit_rqs, a policy change,
 * freeze and unbind all notify at once.
 */
#include <linux/blk-mq-virtio.h>
#include <linux/blkdev.h>
#include <linux/hdreg.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <uapi/linux/virtio_ring.h>

#include "driver.h"

#define VKBLK_INLINE_SG_CNT 2
#define VKBLK_MAX_DISCARD_SEGMENTS 256

static char *default_policy = "event-idx";
module_param(default_policy, charp, 0444);
MODULE_PARM_DESC(default_policy,
		 "policy of new queues: immediate|event-idx|static:B,T|event-idx:B,T|adaptive (T in us)");

static char *claim = "";
module_param(claim, charp, 0444);
MODULE_PARM_DESC(claim,
		 "comma-separated PCI functions (0000:00:05.0) or virtio devices (virtio3) this driver binds when offered; empty: any");

static unsigned int num_request_queues;
module_param(num_request_queues, uint, 0444);
MODULE_PARM_DESC(num_request_queues, "at most this many hardware queues (0: one per CPU, at most the device's)");

static int major;
static DEFINE_IDA(vkblk_index_ida);
static struct vk_policy default_op;

/* The per-request data blk-mq allocates behind every struct request. */
struct vkblk_req {
	struct virtio_blk_outhdr out_hdr;
	u8 status;
	u64 submit_ns;
	struct sg_table sg_table;
	struct scatterlist sg[];
};

static blk_status_t vkblk_result(u8 status)
{
	switch (status) {
	case VIRTIO_BLK_S_OK: return BLK_STS_OK;
	case VIRTIO_BLK_S_UNSUPP: return BLK_STS_NOTSUPP;
	default: return BLK_STS_IOERR;
	}
}

/* ---- the kick ---------------------------------------------------------------- */

/*
 * Carries out `d` with q->lock held. Returns true when the caller must
 * notify the device after dropping the lock (the MMIO write is the VM exit:
 * nobody should wait on the lock meanwhile). Counts the decision.
 */
static bool vkq_apply(struct vkq *q, const struct vk_policy *p, struct vk_decision d)
{
	bool notify;

	switch (d.action) {
	case VK_ARM:
		q->timer_armed = true;
		hrtimer_start(&q->timer, ns_to_ktime(p->defer_ns), HRTIMER_MODE_REL_SOFT);
		return false;
	case VK_KICK:
		virtqueue_kick_prepare(q->vq);  /* publishes avail idx, resets num_added */
		notify = true;
		break;
	case VK_ASK:
		q->stats.asks++;
		notify = virtqueue_kick_prepare(q->vq);
		if (!notify)
			q->stats.suppressed++;
		break;
	default:
		return false;
	}
	q->pending = 0;
	if (q->timer_armed && hrtimer_try_to_cancel(&q->timer) >= 0)
		q->timer_armed = false;
	if (notify) {
		q->stats.kicks++;
		q->stats.kicks_by_why[d.why < VK_WHY_SLOTS ? d.why : VK_WHY_SLOTS - 1]++;
	}
	return notify;
}

void vkq_flush(struct vkq *q, u8 why)
{
	unsigned long flags;
	struct vk_policy p;
	bool notify;

	spin_lock_irqsave(&q->lock, flags);
	p = vk_effective(&q->op, &q->steer, ktime_get_ns(), q->vblk->draining);
	notify = vkq_apply(q, &p, vk_on_flush(&p, q->pending, why));
	spin_unlock_irqrestore(&q->lock, flags);
	if (notify)
		virtqueue_notify(q->vq);
}

static enum hrtimer_restart vkq_timer_fn(struct hrtimer *t)
{
	struct vkq *q = container_of(t, struct vkq, timer);
	unsigned long flags;
	struct vk_policy p;
	bool notify;

	spin_lock_irqsave(&q->lock, flags);
	q->timer_armed = false;
	p = vk_effective(&q->op, &q->steer, ktime_get_ns(), q->vblk->draining);
	notify = vkq_apply(q, &p, vk_on_flush(&p, q->pending, VK_WHY_TIMER));
	spin_unlock_irqrestore(&q->lock, flags);
	if (notify)
		virtqueue_notify(q->vq);
	return HRTIMER_NORESTART;
}

/* ---- requests ---------------------------------------------------------------- */

static int vkblk_setup_discard_wz(struct request *req, bool unmap)
{
	unsigned short segments = blk_rq_nr_discard_segments(req);
	unsigned short n = 0;
	struct virtio_blk_discard_write_zeroes *range;
	struct bio *bio;
	u32 flags = unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;

	range = kmalloc_array(segments, sizeof(*range), GFP_ATOMIC);
	if (!range)
		return -ENOMEM;
	/* A single range when the block layer did not merge discards (write zeroes). */
	if (queue_max_discard_segments(req->q) == 1) {
		range[0].flags = cpu_to_le32(flags);
		range[0].num_sectors = cpu_to_le32(blk_rq_sectors(req));
		range[0].sector = cpu_to_le64(blk_rq_pos(req));
		n = 1;
	} else {
		__rq_for_each_bio(bio, req) {
			range[n].flags = cpu_to_le32(flags);
			range[n].num_sectors = cpu_to_le32(bio->bi_iter.bi_size >> SECTOR_SHIFT);
			range[n].sector = cpu_to_le64(bio->bi_iter.bi_sector);
			n++;
		}
	}
	WARN_ON_ONCE(n != segments);
	req->special_vec.bv_page = virt_to_page(range);
	req->special_vec.bv_offset = offset_in_page(range);
	req->special_vec.bv_len = sizeof(*range) * segments;
	req->rq_flags |= RQF_SPECIAL_PAYLOAD;
	return 0;
}

static blk_status_t vkblk_setup_cmd(struct virtio_device *vdev, struct request *req,
				    struct vkblk_req *vbr)
{
	bool unmap = false;
	u32 type;

	switch (req_op(req)) {
	case REQ_OP_READ: type = VIRTIO_BLK_T_IN; break;
	case REQ_OP_WRITE: type = VIRTIO_BLK_T_OUT; break;
	case REQ_OP_FLUSH: type = VIRTIO_BLK_T_FLUSH; break;
	case REQ_OP_DISCARD: type = VIRTIO_BLK_T_DISCARD; break;
	case REQ_OP_WRITE_ZEROES:
		type = VIRTIO_BLK_T_WRITE_ZEROES;
		unmap = !(req->cmd_flags & REQ_NOUNMAP);
		break;
	case REQ_OP_DRV_IN: type = VIRTIO_BLK_T_GET_ID; break;
	default:
		return BLK_STS_NOTSUPP;
	}
	vbr->out_hdr.type = cpu_to_virtio32(vdev, type);
	vbr->out_hdr.ioprio = cpu_to_virtio32(vdev, req_get_ioprio(req));
	vbr->out_hdr.sector = cpu_to_virtio64(vdev,
		(type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_OUT) ? blk_rq_pos(req) : 0);
	if (type == VIRTIO_BLK_T_DISCARD || type == VIRTIO_BLK_T_WRITE_ZEROES) {
		if (vkblk_setup_discard_wz(req, unmap))
			return BLK_STS_RESOURCE;
	}
	return BLK_STS_OK;
}

static int vkblk_map_data(struct request *req, struct vkblk_req *vbr)
{
	if (!blk_rq_nr_phys_segments(req))
		return 0;
	vbr->sg_table.sgl = vbr->sg;
	if (sg_alloc_table_chained(&vbr->sg_table, blk_rq_nr_phys_segments(req),
				   vbr->sg_table.sgl, VKBLK_INLINE_SG_CNT))
		return -ENOMEM;
	return blk_rq_map_sg(req->q, req, vbr->sg_table.sgl);
}

static void vkblk_unmap_data(struct request *req, struct vkblk_req *vbr)
{
	if (blk_rq_nr_phys_segments(req))
		sg_free_table_chained(&vbr->sg_table, VKBLK_INLINE_SG_CNT);
}

static void vkblk_cleanup_cmd(struct request *req)
{
	if (req->rq_flags & RQF_SPECIAL_PAYLOAD)
		kfree(bvec_virt(&req->special_vec));
}

static int vkblk_add_req(struct virtqueue *vq, struct vkblk_req *vbr, int nents, bool write)
{
	struct scatterlist hdr, status, *sgs[3];
	unsigned int num_out = 0, num_in = 0;

	sg_init_one(&hdr, &vbr->out_hdr, sizeof(vbr->out_hdr));
	sgs[num_out++] = &hdr;
	if (nents) {
		if (write)
			sgs[num_out++] = vbr->sg_table.sgl;
		else
			sgs[num_out + num_in++] = vbr->sg_table.sgl;
	}
	sg_init_one(&status, &vbr->status, sizeof(vbr->status));
	sgs[num_out + num_in++] = &status;
	return virtqueue_add_sgs(vq, sgs, num_out, num_in, vbr, GFP_ATOMIC);
}

/* Counts an accepted request; q->lock held. */
static void vkq_count_submit(struct vkq *q, struct vkblk_req *vbr)
{
	u32 depth = ++q->stats.inflight;

	q->pending++;
	q->stats.requests++;
	q->stats.depth_sum += depth;
	q->stats.depth_hist[vk_depth_bucket(depth)]++;
	vbr->submit_ns = ktime_get_ns();
}

/* No request can arrive before a completion: every tag or descriptor is used. */
static bool vkq_full(const struct vkq *q)
{
	return q->vq->num_free == 0 || q->stats.inflight >= q->vblk->tag_set.queue_depth;
}

static blk_status_t vkblk_queue_rq(struct blk_mq_hw_ctx *hctx, const struct blk_mq_queue_data *bd)
{
	struct vkblk *vblk = hctx->queue->queuedata;
	struct vkq *q = &vblk->vqs[hctx->queue_num];
	struct request *req = bd->rq;
	struct vkblk_req *vbr = blk_mq_rq_to_pdu(req);
	unsigned long flags;
	struct vk_policy p;
	blk_status_t st;
	bool notify;
	int nents, err;

	st = vkblk_setup_cmd(vblk->vdev, req, vbr);
	if (unlikely(st))
		return st;
	nents = vkblk_map_data(req, vbr);
	if (unlikely(nents < 0)) {
		vkblk_cleanup_cmd(req);
		return BLK_STS_RESOURCE;
	}
	blk_mq_start_request(req);

	spin_lock_irqsave(&q->lock, flags);
	err = vkblk_add_req(q->vq, vbr, nents, req_op(req) != REQ_OP_READ && req_op(req) != REQ_OP_DRV_IN);
	if (unlikely(err)) {
		/* Whatever is queued must reach the device, or nothing completes. */
		p = vk_effective(&q->op, &q->steer, ktime_get_ns(), vblk->draining);
		notify = vkq_apply(q, &p, vk_on_flush(&p, q->pending, VK_WHY_RING_FULL));
		if (err == -ENOSPC)
			blk_mq_stop_hw_queue(hctx);
		spin_unlock_irqrestore(&q->lock, flags);
		if (notify)
			virtqueue_notify(q->vq);
		vkblk_unmap_data(req, vbr);
		vkblk_cleanup_cmd(req);
		return (err == -ENOSPC || err == -ENOMEM) ? BLK_STS_DEV_RESOURCE : BLK_STS_IOERR;
	}
	vkq_count_submit(q, vbr);
	p = vk_effective(&q->op, &q->steer, vbr->submit_ns, vblk->draining);
	notify = vkq_apply(q, &p, vk_on_submit(&p, q->pending, bd->last, vkq_full(q), q->timer_armed));
	spin_unlock_irqrestore(&q->lock, flags);
	if (notify)
		virtqueue_notify(q->vq);
	return BLK_STS_OK;
}

/* blk-mq stopped a batch before bd->last: what it queued must be notified. */
static void vkblk_commit_rqs(struct blk_mq_hw_ctx *hctx)
{
	struct vkblk *vblk = hctx->queue->queuedata;

	vkq_flush(&vblk->vqs[hctx->queue_num], VK_WHY_FLUSH);
}

static void vkblk_request_done(struct request *req)
{
	struct vkblk_req *vbr = blk_mq_rq_to_pdu(req);

	vkblk_unmap_data(req, vbr);
	vkblk_cleanup_cmd(req);
	blk_mq_end_request(req, vkblk_result(vbr->status));
}

/* Counts a completion; q->lock held. */
static void vkq_count_done(struct vkq *q, struct vkblk_req *vbr, u64 now)
{
	u64 lat = now > vbr->submit_ns ? now - vbr->submit_ns : 0;

	q->stats.completions++;
	if (q->stats.inflight)
		q->stats.inflight--;
	q->stats.latency_sum_ns += lat;
	q->stats.latency_hist[vk_latency_bucket(lat)]++;
}

static void vkblk_done(struct virtqueue *vq)
{
	struct vkblk *vblk = vq->vdev->priv;
	struct vkq *q = &vblk->vqs[vq->index];
	struct vkblk_req *vbr;
	unsigned long flags;
	unsigned int len;
	bool completed = false;
	u64 now = ktime_get_ns();

	spin_lock_irqsave(&q->lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((vbr = virtqueue_get_buf(vq, &len)) != NULL) {
			struct request *req = blk_mq_rq_from_pdu(vbr);

			vkq_count_done(q, vbr, now);
			if (likely(!blk_should_fake_timeout(req->q)))
				blk_mq_complete_request(req);
			completed = true;
		}
		if (unlikely(virtqueue_is_broken(vq)))
			break;
	} while (!virtqueue_enable_cb(vq));
	spin_unlock_irqrestore(&q->lock, flags);
	/* A queue stopped on a full ring can go again. */
	if (completed)
		blk_mq_start_stopped_hw_queues(vblk->disk->queue, true);
}

static void vkblk_map_queues(struct blk_mq_tag_set *set)
{
	struct vkblk *vblk = set->driver_data;

	blk_mq_virtio_map_queues(&set->map[HCTX_TYPE_DEFAULT], vblk->vdev, 0);
}

static const struct blk_mq_ops vkblk_mq_ops = {
	.queue_rq = vkblk_queue_rq,
	.commit_rqs = vkblk_commit_rqs,
	.complete = vkblk_request_done,
	.map_queues = vkblk_map_queues,
};

/* ---- the disk ---------------------------------------------------------------- */

static int vkblk_getgeo(struct block_device *bd, struct hd_geometry *geo)
{
	struct vkblk *vblk = bd->bd_disk->private_data;
	int err = 0;

	mutex_lock(&vblk->vdev_mutex);
	if (!vblk->vdev) {
		err = -ENXIO;
	} else if (virtio_has_feature(vblk->vdev, VIRTIO_BLK_F_GEOMETRY)) {
		virtio_cread(vblk->vdev, struct virtio_blk_config, geometry.cylinders, &geo->cylinders);
		virtio_cread(vblk->vdev, struct virtio_blk_config, geometry.heads, &geo->heads);
		virtio_cread(vblk->vdev, struct virtio_blk_config, geometry.sectors, &geo->sectors);
	} else {
		geo->heads = 1 << 6;
		geo->sectors = 1 << 5;
		geo->cylinders = get_capacity(bd->bd_disk) >> 11;
	}
	mutex_unlock(&vblk->vdev_mutex);
	return err;
}

static void vkblk_free_disk(struct gendisk *disk)
{
	struct vkblk *vblk = disk->private_data;

	ida_free(&vkblk_index_ida, vblk->index);
	mutex_destroy(&vblk->vdev_mutex);
	kfree(vblk);
}

static const struct block_device_operations vkblk_fops = {
	.owner = THIS_MODULE,
	.getgeo = vkblk_getgeo,
	.free_disk = vkblk_free_disk,
};

/* The device's serial (VIRTIO_BLK_T_GET_ID): a real request, hence a kick. */
static int vkblk_get_id(struct gendisk *disk, char *id)
{
	struct request_queue *q = disk->queue;
	struct request *req;
	struct vkblk_req *vbr;
	int err;

	req = blk_mq_alloc_request(q, REQ_OP_DRV_IN, 0);
	if (IS_ERR(req))
		return PTR_ERR(req);
	err = blk_rq_map_kern(q, req, id, VIRTIO_BLK_ID_BYTES, GFP_KERNEL);
	if (!err) {
		vbr = blk_mq_rq_to_pdu(req);
		blk_execute_rq(req, false);
		err = blk_status_to_errno(vkblk_result(vbr->status));
	}
	blk_mq_free_request(req);
	return err;
}

static ssize_t serial_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct gendisk *disk = dev_to_disk(dev);
	int err;

	/* The id may fill all 20 bytes without a NUL; PAGE_SIZE leaves room for "\n". */
	BUILD_BUG_ON(PAGE_SIZE < VIRTIO_BLK_ID_BYTES + 1);
	err = vkblk_get_id(disk, buf);
	if (!err) {
		size_t len;

		buf[VIRTIO_BLK_ID_BYTES] = '\0';
		len = strlen(buf);
		return len + sysfs_emit_at(buf, len, "\n");
	}
	return err == -EIO ? sysfs_emit(buf, "\n") : err;  /* IOERR: no serial */
}
static DEVICE_ATTR_RO(serial);

static struct attribute *vkblk_disk_attrs[] = {
	&dev_attr_serial.attr,
	NULL,
};

static const struct attribute_group vkblk_disk_group = {
	.attrs = vkblk_disk_attrs,
};

const struct attribute_group *vkblk_disk_groups[] = {
	&vkblk_disk_group,
	NULL,
};

/* "vkd" + the index in letters as sd/vd name them: a..z, aa..zz, ... */
static void vkblk_name(char *buf, size_t len, int index)
{
	char letters[8];
	int n = 0;

	do {
		letters[n++] = 'a' + index % 26;
		index = index / 26 - 1;
	} while (index >= 0 && n < (int)sizeof(letters) - 1);
	snprintf(buf, len, "vkd");
	while (n > 0 && strlen(buf) + 1 < len)
		strncat(buf, &letters[--n], 1);
}

static void vkblk_update_capacity(struct vkblk *vblk, bool resize)
{
	u64 capacity;

	virtio_cread(vblk->vdev, struct virtio_blk_config, capacity, &capacity);
	if (resize)
		set_capacity_and_notify(vblk->disk, capacity);
	else
		set_capacity(vblk->disk, capacity);
	dev_info(&vblk->vdev->dev, "[%s] %llu 512-byte logical blocks\n", vblk->disk->disk_name,
		 (unsigned long long)capacity);
}

static void vkblk_config_changed_work(struct work_struct *work)
{
	struct vkblk *vblk = container_of(work, struct vkblk, config_work);

	vkblk_update_capacity(vblk, true);
}

static void vkblk_config_changed(struct virtio_device *vdev)
{
	struct vkblk *vblk = vdev->priv;

	queue_work(system_freezable_wq, &vblk->config_work);
}

static void vkq_init_policy(struct vkq *q)
{
	q->op = default_op;
	memset(&q->steer, 0, sizeof(q->steer));
	q->steer.policy = vk_immediate();
	q->pending = 0;
	q->timer_armed = false;
}

static int vkblk_init_vqs(struct vkblk *vblk)
{
	struct virtio_device *vdev = vblk->vdev;
	struct irq_affinity desc = { 0, };
	vq_callback_t **callbacks = NULL;
	struct virtqueue **vqs = NULL;
	const char **names = NULL;
	unsigned int i;
	u16 num_vqs;
	int err;

	err = virtio_cread_feature(vdev, VIRTIO_BLK_F_MQ, struct virtio_blk_config, num_queues, &num_vqs);
	if (err)
		num_vqs = 1;
	if (!err && !num_vqs) {
		dev_err(&vdev->dev, "MQ advertised but zero queues reported\n");
		return -EINVAL;
	}
	num_vqs = min_t(unsigned int, num_vqs, num_request_queues ?: nr_cpu_ids);
	num_vqs = min_t(unsigned int, num_vqs, nr_cpu_ids);

	vblk->vqs = kcalloc(num_vqs, sizeof(*vblk->vqs), GFP_KERNEL);
	names = kmalloc_array(num_vqs, sizeof(*names), GFP_KERNEL);
	callbacks = kmalloc_array(num_vqs, sizeof(*callbacks), GFP_KERNEL);
	vqs = kmalloc_array(num_vqs, sizeof(*vqs), GFP_KERNEL);
	if (!vblk->vqs || !names || !callbacks || !vqs) {
		err = -ENOMEM;
		goto out;
	}
	for (i = 0; i < num_vqs; i++) {
		struct vkq *q = &vblk->vqs[i];

		callbacks[i] = vkblk_done;
		snprintf(q->name, sizeof(q->name), "req.%u", i);
		names[i] = q->name;
		spin_lock_init(&q->lock);
		hrtimer_init(&q->timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_SOFT);
		q->timer.function = vkq_timer_fn;
		q->vblk = vblk;
		q->index = i;
		vkq_init_policy(q);
	}
	err = virtio_find_vqs(vdev, num_vqs, vqs, callbacks, names, &desc);
	if (err)
		goto out;
	for (i = 0; i < num_vqs; i++)
		vblk->vqs[i].vq = vqs[i];
	vblk->num_vqs = num_vqs;
out:
	kfree(vqs);
	kfree(callbacks);
	kfree(names);
	if (err) {
		kfree(vblk->vqs);
		vblk->vqs = NULL;
	}
	return err;
}

/* Every pending kick fires now, and no timer is left to touch the queues. */
static void vkblk_drain_kicks(struct vkblk *vblk)
{
	unsigned int i;

	WRITE_ONCE(vblk->draining, true);
	for (i = 0; i < vblk->num_vqs; i++) {
		vkq_flush(&vblk->vqs[i], VK_WHY_FLUSH);
		hrtimer_cancel(&vblk->vqs[i].timer);
	}
}

static void vkblk_del_vqs(struct vkblk *vblk)
{
	vblk->vdev->config->del_vqs(vblk->vdev);
	kfree(vblk->vqs);
	vblk->vqs = NULL;
}

/* ---- the device's limits ------------------------------------------------------- */

static void vkblk_set_limits(struct vkblk *vblk)
{
	struct virtio_device *vdev = vblk->vdev;
	struct request_queue *q = vblk->disk->queue;
	u32 v, blk_size = 512, max_size;
	u8 physical_block_exp, alignment_offset;
	u16 min_io_size;
	u32 opt_io_size;

	/* Indirect descriptors let one request use many segments for one ring slot. */
	if (virtio_cread_feature(vdev, VIRTIO_BLK_F_SEG_MAX, struct virtio_blk_config, seg_max, &v) || !v)
		v = virtio_has_feature(vdev, VIRTIO_RING_F_INDIRECT_DESC) ? 128 : 1;
	if (!virtio_has_feature(vdev, VIRTIO_RING_F_INDIRECT_DESC))
		v = min_t(u32, v, virtqueue_get_vring_size(vblk->vqs[0].vq) - 2);
	blk_queue_max_segments(q, min_t(u32, v, USHRT_MAX));

	max_size = virtio_max_dma_size(vdev);
	blk_queue_max_hw_sectors(q, UINT_MAX);
	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_SIZE_MAX, struct virtio_blk_config, size_max, &v) && v)
		max_size = min(max_size, v);
	blk_queue_max_segment_size(q, max_size);

	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_BLK_SIZE, struct virtio_blk_config, blk_size, &blk_size) &&
	    blk_size >= 512 && blk_size <= PAGE_SIZE && is_power_of_2(blk_size))
		blk_queue_logical_block_size(q, blk_size);
	else
		blk_size = queue_logical_block_size(q);

	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_TOPOLOGY, struct virtio_blk_config,
				  physical_block_exp, &physical_block_exp) && physical_block_exp < 16)
		blk_queue_physical_block_size(q, blk_size * (1 << physical_block_exp));
	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_TOPOLOGY, struct virtio_blk_config,
				  alignment_offset, &alignment_offset) && alignment_offset)
		blk_queue_alignment_offset(q, blk_size * alignment_offset);
	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_TOPOLOGY, struct virtio_blk_config,
				  min_io_size, &min_io_size) && min_io_size)
		blk_queue_io_min(q, blk_size * min_io_size);
	if (!virtio_cread_feature(vdev, VIRTIO_BLK_F_TOPOLOGY, struct virtio_blk_config,
				  opt_io_size, &opt_io_size) && opt_io_size)
		blk_queue_io_opt(q, blk_size * opt_io_size);

	if (virtio_has_feature(vdev, VIRTIO_BLK_F_DISCARD)) {
		virtio_cread(vdev, struct virtio_blk_config, discard_sector_alignment, &v);
		q->limits.discard_granularity = v ? v << SECTOR_SHIFT : blk_size;
		virtio_cread(vdev, struct virtio_blk_config, max_discard_sectors, &v);
		blk_queue_max_discard_sectors(q, v ? v : UINT_MAX);
		virtio_cread(vdev, struct virtio_blk_config, max_discard_seg, &v);
		blk_queue_max_discard_segments(q, clamp_t(u32, v, 1, VKBLK_MAX_DISCARD_SEGMENTS));
	}
	if (virtio_has_feature(vdev, VIRTIO_BLK_F_WRITE_ZEROES)) {
		virtio_cread(vdev, struct virtio_blk_config, max_write_zeroes_sectors, &v);
		blk_queue_max_write_zeroes_sectors(q, v ? v : UINT_MAX);
	}
}

static bool vkblk_writeback(struct virtio_device *vdev)
{
	u8 writeback;

	if (virtio_cread_feature(vdev, VIRTIO_BLK_F_CONFIG_WCE, struct virtio_blk_config, wce, &writeback))
		writeback = virtio_has_feature(vdev, VIRTIO_BLK_F_FLUSH);
	return writeback;
}

/* ---- binding ------------------------------------------------------------------ */

/* The `claim` parameter: empty, or the device's PCI function or virtio name is listed. */
static bool vkblk_claimed(struct virtio_device *vdev)
{
	const char *names[2] = { dev_name(&vdev->dev), vdev->dev.parent ? dev_name(vdev->dev.parent) : "" };
	const char *p = claim;
	int i;

	if (!p || !*p)
		return true;
	while (*p) {
		size_t len = strcspn(p, ",");

		for (i = 0; i < 2; i++)
			if (len && strlen(names[i]) == len && !strncmp(p, names[i], len))
				return true;
		p += len;
		if (*p == ',')
			p++;
	}
	return false;
}

static int vkblk_alloc_disk(struct vkblk *vblk)
{
	struct blk_mq_tag_set *set = &vblk->tag_set;
	unsigned int depth = virtqueue_get_vring_size(vblk->vqs[0].vq);
	int err;

	/* Without indirect descriptors a request takes up to 3 ring slots. */
	if (!virtio_has_feature(vblk->vdev, VIRTIO_RING_F_INDIRECT_DESC))
		depth /= 2;
	memset(set, 0, sizeof(*set));
	set->ops = &vkblk_mq_ops;
	set->queue_depth = depth;
	set->numa_node = NUMA_NO_NODE;
	set->flags = BLK_MQ_F_SHOULD_MERGE;
	set->cmd_size = sizeof(struct vkblk_req) + sizeof(struct scatterlist) * VKBLK_INLINE_SG_CNT;
	set->driver_data = vblk;
	set->nr_hw_queues = vblk->num_vqs;
	err = blk_mq_alloc_tag_set(set);
	if (err)
		return err;
	vblk->disk = blk_mq_alloc_disk(set, vblk);
	if (IS_ERR(vblk->disk)) {
		err = PTR_ERR(vblk->disk);
		blk_mq_free_tag_set(set);
		return err;
	}
	return 0;
}

static int vkblk_probe(struct virtio_device *vdev)
{
	struct vkblk *vblk;
	int err, index;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config access disabled\n");
		return -EINVAL;
	}
	if (!vkblk_claimed(vdev))
		return -ENODEV;
	index = ida_alloc_range(&vkblk_index_ida, 0, (1 << MINORBITS) / 16 - 1, GFP_KERNEL);
	if (index < 0)
		return index;
	vdev->priv = vblk = kzalloc(sizeof(*vblk), GFP_KERNEL);
	if (!vblk) {
		ida_free(&vkblk_index_ida, index);
		return -ENOMEM;
	}
	mutex_init(&vblk->vdev_mutex);
	vblk->vdev = vdev;
	vblk->index = index;
	INIT_WORK(&vblk->config_work, vkblk_config_changed_work);

	err = vkblk_init_vqs(vblk);
	if (err)
		goto out_free;
	err = vkblk_alloc_disk(vblk);
	if (err)
		goto out_vqs;
	vblk->disk->major = major;
	vblk->disk->first_minor = index * 16;
	vblk->disk->minors = 16;
	vblk->disk->private_data = vblk;
	vblk->disk->fops = &vkblk_fops;
	vkblk_name(vblk->disk->disk_name, DISK_NAME_LEN, index);

	blk_queue_write_cache(vblk->disk->queue, vkblk_writeback(vdev), false);
	if (virtio_has_feature(vdev, VIRTIO_BLK_F_RO))
		set_disk_ro(vblk->disk, 1);
	vkblk_set_limits(vblk);
	virtio_device_ready(vdev);
	vkblk_update_capacity(vblk, false);

	err = device_add_disk(&vdev->dev, vblk->disk, vkblk_disk_groups);
	if (err)
		goto out_cleanup_disk;
	err = vkblk_sysfs_add(vblk);
	if (err)
		dev_warn(&vdev->dev, "no vkick sysfs interface (%d): queues keep their default policy\n", err);
	dev_info(&vdev->dev, "[%s] %u queue(s), depth %u, event-idx %s, indirect %s\n",
		 vblk->disk->disk_name, vblk->num_vqs, vblk->tag_set.queue_depth,
		 virtio_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX) ? "on" : "off",
		 virtio_has_feature(vdev, VIRTIO_RING_F_INDIRECT_DESC) ? "on" : "off");
	return 0;

out_cleanup_disk:
	/* A disk never added is released without free_disk: vblk is freed below. */
	virtio_reset_device(vdev);
	vkblk_drain_kicks(vblk);
	put_disk(vblk->disk);
	blk_mq_free_tag_set(&vblk->tag_set);
out_vqs:
	vkblk_del_vqs(vblk);
out_free:
	kfree(vblk);
	ida_free(&vkblk_index_ida, index);
	vdev->priv = NULL;
	return err;
}

static void vkblk_remove(struct virtio_device *vdev)
{
	struct vkblk *vblk = vdev->priv;

	flush_work(&vblk->config_work);
	vkblk_sysfs_remove(vblk);
	/* From here every queue runs immediate: del_gendisk's drain waits on no timer. */
	vkblk_drain_kicks(vblk);
	del_gendisk(vblk->disk);
	blk_mq_free_tag_set(&vblk->tag_set);

	mutex_lock(&vblk->vdev_mutex);
	virtio_reset_device(vdev);
	vkblk_drain_kicks(vblk);  /* nothing can be queued now; no timer survives */
	vblk->vdev = NULL;
	vdev->config->del_vqs(vdev);
	kfree(vblk->vqs);
	vblk->vqs = NULL;
	mutex_unlock(&vblk->vdev_mutex);
	put_disk(vblk->disk);
}

#ifdef CONFIG_PM_SLEEP
static int vkblk_freeze(struct virtio_device *vdev)
{
	struct vkblk *vblk = vdev->priv;

	/* Let what is in flight finish, with its kicks sent now, not after T. */
	blk_mq_freeze_queue(vblk->disk->queue);
	vkblk_sysfs_remove(vblk);  /* its queues are freed below */
	vkblk_drain_kicks(vblk);
	virtio_reset_device(vdev);
	flush_work(&vblk->config_work);
	blk_mq_quiesce_queue(vblk->disk->queue);
	vkblk_del_vqs(vblk);
	return 0;
}

static int vkblk_restore(struct virtio_device *vdev)
{
	struct vkblk *vblk = vdev->priv;
	int err;

	err = vkblk_init_vqs(vblk);  /* policies back to the default */
	if (err)
		return err;
	WRITE_ONCE(vblk->draining, false);
	virtio_device_ready(vdev);
	blk_mq_unquiesce_queue(vblk->disk->queue);
	blk_mq_unfreeze_queue(vblk->disk->queue);
	if (vkblk_sysfs_add(vblk))
		dev_warn(&vdev->dev, "no vkick sysfs interface after resume\n");
	return 0;
}
#endif

static const struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_BLOCK, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static unsigned int features[] = {
	VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
	VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE,
	VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
};

static struct virtio_driver vkblk_driver = {
	.feature_table = features,
	.feature_table_size = ARRAY_SIZE(features),
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = id_table,
	.probe = vkblk_probe,
	.remove = vkblk_remove,
	.config_changed = vkblk_config_changed,
#ifdef CONFIG_PM_SLEEP
	.freeze = vkblk_freeze,
	.restore = vkblk_restore,
#endif
};

static int __init vkblk_init(void)
{
	int err;

	if (vk_parse_policy(default_policy, strlen(default_policy), &default_op)) {
		pr_err("vkick_virtio_blk: bad default_policy \"%s\"\n", default_policy);
		return -EINVAL;
	}
	/* The block major's name: at most 15 characters (the kernel keeps 15 and
	 * unregister_blkdev compares them), so not the module's 16-character name. */
	major = register_blkdev(0, "vkd");
	if (major < 0)
		return major;
	err = register_virtio_driver(&vkblk_driver);
	if (err)
		unregister_blkdev(major, "vkd");
	return err;
}

static void __exit vkblk_exit(void)
{
	unregister_virtio_driver(&vkblk_driver);
	unregister_blkdev(major, "vkd");
	ida_destroy(&vkblk_index_ida);
}

module_init(vkblk_init);
module_exit(vkblk_exit);

/*
 * No MODULE_DEVICE_TABLE on purpose: udev must never autoload this driver
 * beside virtio_blk (either could win a disk at boot). An operator loads it
 * and moves the disks they choose (docs/kernel-driver.md).
 */
MODULE_DESCRIPTION("virtio-blk driver with an adaptive, deferred kick (vkick)");
MODULE_LICENSE("GPL");
