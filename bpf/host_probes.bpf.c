// SPDX-License-Identifier: GPL-2.0
/* vkick host probes: what a VM's virtqueues cost the host, counted per VM,
 * vCPU, device and queue. Tracepoints only (kprobes/fentry are unavailable on
 * the target hosts and tracepoints are the stable interface anyway).
 *
 * Every counting path is a static __always_inline function taking the tgid
 * explicitly, shared by thin handlers (tgid from bpf_get_current_pid_tgid())
 * and a SEC("syscall") test program (tgid from a context struct passed
 * through BPF_PROG_TEST_RUN). That is how the kvm_exit path, whose
 * tracepoint never fires on a paravirtual KVM host, is still run in the
 * kernel by the tests. See docs/probes.md.
 *
 * The kvm handlers exist twice: a BTF raw tracepoint (SEC("tp_btf/...")),
 * called directly with the tracepoint's arguments, and the classic
 * tracepoint, which first builds the whole trace record in a perf buffer and
 * runs under the global bpf_prog_active guard. HostProbes loads the tp_btf
 * twin where the kernel's BTF has the tracepoint and the classic one
 * otherwise (bpf_program__set_autoload on the other). Both only unpack their
 * arguments and call the same counting function.
 *
 * Hot-path rules: per-CPU counters, bounded preallocated maps, no locks, no
 * loops; every failed insert or read is counted in `errors`. The kvm
 * programs first test the tgid's bit in vmm_tgids (an inlined array load:
 * all an untracked process pays); a tracked process's guest write is then
 * one hash lookup ({tgid, space, addr} in `notify`) and an increment of the
 * per-CPU array slot the target names (bench/probe_cost/RESULTS.md).
 */
#include "vmlinux.h"

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "bpf/host_probes.h"
#define VKICK_ERR_SLOTS VKICK_ERR_COUNT
#include "bpf/vkick_common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* ---- maps written by userspace ------------------------------------------ */

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_TRACKED);
  __type(key, __u32);   /* tgid */
  __type(value, __u32); /* vm_id */
} tracked SEC(".maps");

/* {tgid, space, addr} -> the target and its counter slots (NotifyTargetTable
 * keeps it: slots allocated and zeroed before a key points to them, freed
 * only after no key does and an RCU grace period). */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_NOTIFY_TARGETS);
  __type(key, struct vkick_notify_key);
  __type(value, struct vkick_notify_target);
} notify SEC(".maps");

/* One bit per tgid vkickd tracked (TrackProcess): the kvm programs'
 * filter, an array load the verifier inlines (maybe_vmm). A clear bit means
 * not tracked; a set one only "look it up" (a stale one costs the hash
 * lookups, nothing else). Written by vkickd only. */
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, VKICK_TGID_WORDS);
  __type(key, __u32);
  __type(value, __u64);
} vmm_tgids SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_VHOST_SOCKS);
  __type(key, struct vkick_sock_key);
  __type(value, struct vkick_sock_value);
} vhost_sock SEC(".maps");

/* Declared vhost-user socket paths (vkickd's --vhost-user): a process that
 * connect()s to one is tracked as that device's frontend. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_VHOST_PATHS);
  __type(key, struct vkick_path_key);
  __type(value, struct vkick_frontend_value);
} vhost_paths SEC(".maps");

/* ---- maps written by the programs --------------------------------------- */

/* Processes tracked because they connected to a declared path (or adopted
 * by vkickd): dropped from `tracked` when they exit. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_FRONTENDS);
  __type(key, __u32); /* tgid */
  __type(value, struct vkick_frontend_value);
} frontends SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, VKICK_MAX_KICK_FDS);
  __type(key, struct vkick_sock_key); /* {tgid, kick fd} */
  __type(value, struct vkick_kick_value);
} kick_fds SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
  __uint(max_entries, VKICK_MAX_EXIT_KEYS);
  __type(key, struct vkick_exit_key);
  __type(value, __u64);
} exit_counts SEC(".maps");

/* Per-queue counters of guest writes, at the slot the matched notify target
 * names: an array lookup the verifier inlines and an increment, where a
 * per-CPU hash costs a hashed lookup (and an insert at the first count). */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, VKICK_MAX_QUEUE_SLOTS);
  __type(key, __u32);
  __type(value, __u64);
} queue_counts SEC(".maps");

/* The same counts keyed {vm, device, queue}, for what has no slot: kicks by
 * write() to a vhost-user kick eventfd (learned by the programs, no slot
 * vkickd could have allocated), a legacy queue value beyond the target's
 * slots. ReadCounters adds the two. */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
  __uint(max_entries, VKICK_MAX_NOTIFY_KEYS);
  __type(key, struct vkick_queue_key);
  __type(value, __u64);
} notify_counts SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
  __uint(max_entries, VKICK_MAX_UNMATCHED_KEYS);
  __type(key, struct vkick_unmatched_key);
  __type(value, __u64);
} unmatched_counts SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
  __uint(max_entries, VKICK_MAX_IRQ_KEYS);
  __type(key, struct vkick_irq_key);
  __type(value, __u64);
} irq_counts SEC(".maps");

/* ---- helpers -------------------------------------------------------------- */

/* Returns the vm_id of `tgid`, or -1 when it is not tracked. The common case
 * for every event of every other process on the host: one hash lookup. */
static __always_inline long lookup_vm(__u32 tgid) {
  __u32* vm = bpf_map_lookup_elem(&tracked, &tgid);
  return vm ? (long)*vm : -1;
}

/* Whether `tgid` may be a process vkickd tracks: its bit in vmm_tgids, or
 * a tgid beyond the bitmap (no real process; the tests'). The array lookup
 * is inlined by the verifier (bounds check, address computation): for every
 * untracked process on the host this is the whole cost of a kvm event.
 * Processes tracked by the connect program (vhost-user frontends) have no
 * bit: they are no VMMs, they make no guest writes, exits or MSIs. */
static __always_inline int maybe_vmm(__u32 tgid) {
  __u32 word = tgid / 64;
  __u64* bits = bpf_map_lookup_elem(&vmm_tgids, &word);
  return !bits || ((*bits >> (tgid & 63)) & 1);
}

/* Increment a per-CPU counter, inserting it if absent (a full map counts
 * map_full: the event is lost, the loss is not). */
static __always_inline void bump(void* map, const void* key) {
  static const __u64 zero = 0;
  __u64* v = vkick_lookup_or_init(map, key, &zero, VKICK_ERR_MAP_FULL);
  if (v) *v += 1;
}

/* ---- exits ---------------------------------------------------------------- */

static __always_inline void count_exit(__u32 tgid, __u32 vcpu_id, __u32 isa, __u32 reason) {
  if (!maybe_vmm(tgid)) return;
  long vm = lookup_vm(tgid);
  if (vm < 0) return;
  struct vkick_exit_key key = {
      .vm_id = (__u32)vm, .vcpu_id = vcpu_id, .isa = isa, .reason = reason};
  bump(&exit_counts, &key);
}

/* Classic only: kvm_exit's arguments are (vcpu, isa); the reason is computed
 * inside the tracepoint by a vendor callback (vmx/svm get_exit_info) into the
 * record, so a raw tracepoint would have to read vcpu_vmx/vcpu_svm
 * internals, which this kernel's BTF does not even describe (bcc's raw
 * kvmexit broke on exactly that). Use the tracepoint's format fields. */
SEC("tracepoint/kvm/kvm_exit")
int tp_kvm_exit(struct trace_event_raw_kvm_exit* ctx) {
  count_exit(current_tgid(), ctx->vcpu_id, ctx->isa, ctx->exit_reason);
  return 0;
}

SEC("syscall")
int test_exit(struct vkick_test_exit_ctx* ctx) {
  count_exit(ctx->tgid, ctx->vcpu_id, ctx->isa, ctx->reason);
  return 0;
}

/* ---- notifications (guest writes) ---------------------------------------- */

/* The written value: in the record (classic tracepoint, test program) or
 * behind the raw tracepoint's kernel pointer, `len` bytes. Only a legacy
 * target needs it, so a raw tracepoint's value is read only then. */
struct guest_val {
  __u64 val;
  const void* ptr; /* tp_btf: the tracepoint's data pointer; NULL: use val */
  __u32 len;       /* bytes at ptr, 1..8 */
};

/* The raw tracepoint's `void *` is untyped kernel memory: cast to "read-only
 * untrusted memory" (btf_id 0, kernels >= 6.14 or so), its loads are
 * PROBE_MEM loads, as cheap as a normal load (a fault reads 0), where
 * bpf_probe_read_kernel() was a helper call, ~40 ns per legacy notify here.
 * A kernel that refuses the cast fails the tp_btf load and HostProbes falls
 * back to the classic programs (auto mode). */
extern void* bpf_rdonly_cast(const void* obj, __u32 btf_id) __ksym;

/* Sizes 1, 2, 4, 8 are exact (a PIO is 1, 2 or 4 bytes); an odd-sized MMIO
 * write (3, 5-7 bytes, which no virtio driver makes) keeps its low
 * power-of-two bytes. Little-endian: a short write is the low bytes. */
static __always_inline __u64 load_guest_val(const struct guest_val* v) {
  if (!v->ptr) return v->val;
  const void* p = bpf_rdonly_cast(v->ptr, 0);
  if (v->len >= 8) return *(const __u64*)p;
  if (v->len >= 4) return *(const __u32*)p;
  if (v->len >= 2) return *(const __u16*)p;
  return v->len == 1 ? *(const __u8*)p : 0;
}

static __always_inline void count_unmatched(__u32 vm_id, __u32 space) {
  struct vkick_unmatched_key uk = {.vm_id = vm_id, .space = space};
  bump(&unmatched_counts, &uk);
}

/* A tracked process's guest write: one hash lookup ({tgid, space, addr},
 * no tgid -> vm_id lookup first) and, matched, an inlined per-CPU array
 * increment at the target's slot. Unmatched writes (rare: not a notify
 * address) pay the `tracked` lookup for their vm_id. */
static __always_inline void count_guest_write(__u32 tgid, __u32 space, __u64 addr,
                                              const struct guest_val* gv) {
  if (!maybe_vmm(tgid)) return;
  struct vkick_notify_key nk = {.tgid = tgid, .space = (__u8)space, .addr = addr};
  struct vkick_notify_target* t = bpf_map_lookup_elem(&notify, &nk);
  if (!t) {
    long vm = lookup_vm(tgid);
    if (vm >= 0) count_unmatched((__u32)vm, space);
    return;
  }
  __u16 queue = t->queue;
  __u32 idx = 0;
  if (t->value_is_queue) {
    /* Legacy virtio-pci: one port per device, the value is the queue. */
    __u64 val = load_guest_val(gv);
    if (val >= VKICK_MAX_QUEUE) {
      count_error(VKICK_ERR_BAD_QUEUE);
      count_unmatched(t->vm_id, space);
      return;
    }
    queue = (__u16)val;
    idx = (__u32)val;
  }
  if (idx < VKICK_TARGET_SLOTS) {
    /* The mask (a power of two) is for the verifier: clang turns the test
     * into `(idx & ~3) == 0` on a copy of idx, which bounds nothing, and
     * would drop the mask as redundant without the barrier. VKICK_NO_SLOT
     * is beyond the array: NULL, like any bad index. */
    barrier_var(idx);
    __u32 slot = t->slots[idx & (VKICK_TARGET_SLOTS - 1)];
    __u64* c = bpf_map_lookup_elem(&queue_counts, &slot);
    if (c) {
      *c += 1; /* per-CPU slot: no atomic needed */
      return;
    }
  }
  struct vkick_queue_key qk = {.vm_id = t->vm_id, .device_id = t->device_id, .queue = queue};
  bump(&notify_counts, &qk);
}

/* kvm_mmio(type, len, gpa, val): the record keeps min(len, 8) bytes of *val. */
static __always_inline void on_kvm_mmio(__u32 type, __u64 gpa, const struct guest_val* v) {
  if (type != VKICK_KVM_TRACE_MMIO_WRITE) return;
  count_guest_write(current_tgid(), VKICK_SPACE_MMIO, gpa, v);
}

SEC("tp_btf/kvm_mmio")
int BPF_PROG(btf_kvm_mmio, int type, int len, __u64 gpa, void* val) {
  struct guest_val v = {.ptr = val, .len = (__u32)len};
  on_kvm_mmio((__u32)type, gpa, &v);
  return 0;
}

SEC("tracepoint/kvm/kvm_mmio")
int tp_kvm_mmio(struct trace_event_raw_kvm_mmio* ctx) {
  struct guest_val v = {.val = ctx->val};
  on_kvm_mmio(ctx->type, ctx->gpa, &v);
  return 0;
}

/* An ioeventfd write completed on the fast path (VMX EPT misconfig, recent
 * SVM NPF): it emits only kvm_fast_mmio, never kvm_mmio, so no double count.
 * The value is not traced; fast-MMIO ioeventfds have no datamatch anyway. */
static __always_inline void on_kvm_fast_mmio(__u64 gpa) {
  struct guest_val v = {};
  count_guest_write(current_tgid(), VKICK_SPACE_MMIO, gpa, &v);
}

SEC("tp_btf/kvm_fast_mmio")
int BPF_PROG(btf_kvm_fast_mmio, __u64 gpa) {
  on_kvm_fast_mmio(gpa);
  return 0;
}

SEC("tracepoint/kvm/kvm_fast_mmio")
int tp_kvm_fast_mmio(struct trace_event_raw_kvm_fast_mmio* ctx) {
  on_kvm_fast_mmio(ctx->gpa);
  return 0;
}

/* kvm_pio(rw, port, size, count, data): the record keeps the first element,
 * 1, 2 or 4 bytes (a `rep outs` counts once with its first value). */
static __always_inline void on_kvm_pio(__u32 rw, __u32 port, const struct guest_val* v) {
  if (rw != VKICK_KVM_PIO_OUT) return;
  count_guest_write(current_tgid(), VKICK_SPACE_PIO, port, v);
}

SEC("tp_btf/kvm_pio")
int BPF_PROG(btf_kvm_pio, unsigned int rw, unsigned int port, unsigned int size,
             unsigned int count, const void* data) {
  struct guest_val v = {.ptr = data, .len = size == 1 ? 1 : size == 2 ? 2 : 4};
  on_kvm_pio(rw, port, &v);
  return 0;
}

SEC("tracepoint/kvm/kvm_pio")
int tp_kvm_pio(struct trace_event_raw_kvm_pio* ctx) {
  struct guest_val v = {.val = ctx->val};
  on_kvm_pio(ctx->rw, ctx->port, &v);
  return 0;
}

SEC("syscall")
int test_io(struct vkick_test_io_ctx* ctx) {
  struct guest_val v = {.val = ctx->val};
  count_guest_write(ctx->tgid, ctx->space, ctx->addr, &v);
  return 0;
}

/* ---- interrupts (host -> guest MSIs) -------------------------------------- */

/* Runs in the context of whoever signals the MSI: the VMM's own threads are
 * attributed; an irqfd signalled by another process (a vhost-user backend)
 * runs in that process and is not (docs/probes.md). */
static __always_inline void count_msi(__u32 tgid, __u64 address, __u64 data) {
  if (!maybe_vmm(tgid)) return;
  long vm = lookup_vm(tgid);
  if (vm < 0) return;
  struct vkick_irq_key key = {.vm_id = (__u32)vm, .data = (__u32)data, .address = address};
  bump(&irq_counts, &key);
}

SEC("tp_btf/kvm_msi_set_irq")
int BPF_PROG(btf_kvm_msi_set_irq, __u64 address, __u64 data) {
  count_msi(current_tgid(), address, data);
  return 0;
}

SEC("tracepoint/kvm/kvm_msi_set_irq")
int tp_kvm_msi_set_irq(struct trace_event_raw_kvm_msi_set_irq* ctx) {
  count_msi(current_tgid(), ctx->address, ctx->data);
  return 0;
}

SEC("syscall")
int test_msi(struct vkick_test_msi_ctx* ctx) {
  count_msi(ctx->tgid, ctx->address, ctx->data);
  return 0;
}

/* ---- vhost-user kicks ------------------------------------------------------ */

/* syscalls:sys_enter_* records: 8 bytes of common fields, the syscall nr,
 * then each argument widened to 8 bytes (see the tracefs format files). No
 * BTF type describes them, so this is the tracefs layout. */
struct sys_enter_ctx {
  __u64 common;
  __s32 syscall_nr;
  __u32 pad;
  __u64 args[6];
};

/* The frontend announces "queue q kicks via this eventfd" with a
 * VHOST_USER_SET_VRING_KICK message: a 12-byte header {request, flags,
 * size}, a u64 payload (bits 0-7 queue index, bit 8 NOFD) and the eventfd in
 * an SCM_RIGHTS control message. QEMU (and DPDK/SPDK-style frontends) send
 * header and payload in iov[0]. */
SEC("tracepoint/syscalls/sys_enter_sendmsg")
int tp_sys_enter_sendmsg(struct sys_enter_ctx* ctx) {
  __u32 tgid = current_tgid();
  if (lookup_vm(tgid) < 0) return 0;

  __s64 sock_fd = (__s64)ctx->args[0];
  const struct user_msghdr* umsg = (const struct user_msghdr*)ctx->args[1];
  struct user_msghdr msg;
  if (bpf_probe_read_user(&msg, sizeof(msg), umsg) != 0) {
    count_error(VKICK_ERR_READ_USER);
    return 0;
  }
  if (msg.msg_iovlen < 1 || msg.msg_iov == NULL) return 0; /* not vhost-user */
  struct iovec iov;
  if (bpf_probe_read_user(&iov, sizeof(iov), msg.msg_iov) != 0) {
    count_error(VKICK_ERR_READ_USER);
    return 0;
  }
  if (iov.iov_len < VKICK_VHOST_USER_HDR_SIZE) return 0; /* not vhost-user */
  struct {
    __u32 request;
    __u32 flags;
    __u32 size;
    __u64 payload; /* unaligned on the wire: read as bytes below */
  } __attribute__((packed)) m;
  if (bpf_probe_read_user(&m, VKICK_VHOST_USER_HDR_SIZE, iov.iov_base) != 0) {
    count_error(VKICK_ERR_READ_USER);
    return 0;
  }
  if (m.request != VKICK_VHOST_USER_SET_VRING_KICK) return 0; /* other messages */

  /* From here on the message claims to be SET_VRING_KICK: validate all. */
  if (m.size != 8 || iov.iov_len < VKICK_VHOST_USER_HDR_SIZE + 8 || sock_fd < 0 ||
      sock_fd >= VKICK_MAX_FD) {
    count_error(VKICK_ERR_BAD_VHOST_MSG);
    return 0;
  }
  if (bpf_probe_read_user(&m.payload, sizeof(m.payload),
                          (const char*)iov.iov_base + VKICK_VHOST_USER_HDR_SIZE) != 0) {
    count_error(VKICK_ERR_READ_USER);
    return 0;
  }
  if (m.payload & ~(VKICK_VHOST_USER_VRING_IDX_MASK | VKICK_VHOST_USER_VRING_NOFD_MASK)) {
    count_error(VKICK_ERR_BAD_VHOST_MSG); /* reserved bits set */
    return 0;
  }
  if (m.payload & VKICK_VHOST_USER_VRING_NOFD_MASK) return 0; /* polling: no kick fd */

  /* The fd: first cmsg, SOL_SOCKET/SCM_RIGHTS, data at msg_control + 16. */
  if (msg.msg_control == NULL || msg.msg_controllen < sizeof(struct cmsghdr) + sizeof(__s32)) {
    count_error(VKICK_ERR_BAD_VHOST_MSG);
    return 0;
  }
  struct {
    struct cmsghdr h;
    __s32 fd;
  } cm;
  if (bpf_probe_read_user(&cm, sizeof(cm), msg.msg_control) != 0) {
    count_error(VKICK_ERR_READ_USER);
    return 0;
  }
  if (cm.h.cmsg_level != 1 /* SOL_SOCKET */ || cm.h.cmsg_type != 1 /* SCM_RIGHTS */ ||
      cm.h.cmsg_len < sizeof(struct cmsghdr) + sizeof(__s32) || cm.fd < 0 ||
      cm.fd >= VKICK_MAX_FD) {
    count_error(VKICK_ERR_BAD_VHOST_MSG);
    return 0;
  }

  struct vkick_sock_key sk = {.tgid = tgid, .fd = (__s32)sock_fd};
  struct vkick_sock_value* dev = bpf_map_lookup_elem(&vhost_sock, &sk);
  struct vkick_kick_value kv = {
      .socket_fd = (__s32)sock_fd,
      .device_id = dev ? dev->device_id : VKICK_UNKNOWN_DEVICE,
      .queue = (__u16)(m.payload & VKICK_VHOST_USER_VRING_IDX_MASK),
  };
  struct vkick_sock_key kk = {.tgid = tgid, .fd = cm.fd};
  /* A later SET_VRING_KICK for the same fd number rebinds it (BPF_ANY). */
  if (bpf_map_update_elem(&kick_fds, &kk, &kv, BPF_ANY) != 0) count_error(VKICK_ERR_MAP_FULL);
  return 0;
}

/* A kick is an 8-byte write() to a bound kick eventfd by the frontend. */
SEC("tracepoint/syscalls/sys_enter_write")
int tp_sys_enter_write(struct sys_enter_ctx* ctx) {
  __u32 tgid = current_tgid();
  long vm = lookup_vm(tgid);
  if (vm < 0) return 0;
  __u64 fd = ctx->args[0];
  if (fd >= VKICK_MAX_FD || ctx->args[2] != 8) return 0;
  struct vkick_sock_key kk = {.tgid = tgid, .fd = (__s32)fd};
  struct vkick_kick_value* kv = bpf_map_lookup_elem(&kick_fds, &kk);
  if (!kv) return 0;
  struct vkick_queue_key qk = {.vm_id = (__u32)vm, .device_id = kv->device_id, .queue = kv->queue};
  bump(&notify_counts, &qk);
  return 0;
}

/* ---- vhost-user frontends found by their connect() -------------------------- */

/* A frontend (vkick-blk, a DPDK/SPDK-style process) sends SET_VRING_KICK
 * within milliseconds of starting, before vkickd could discover it. So the
 * connect() to a declared vhost-user socket path is what starts tracking it:
 * the tgid under the path's vm_id, the connecting socket fd as that device's
 * vhost-user connection (vhost_sock). Its SET_VRING_KICK messages and kick
 * eventfd writes are then labelled exactly like QEMU's. */
static __always_inline void track_frontend(__u32 tgid, __s32 sock_fd,
                                           const struct vkick_frontend_value* id) {
  struct vkick_frontend_value fv = *id;
  long cur = lookup_vm(tgid);
  if (cur >= 0 && (__u32)cur != fv.vm_id) return; /* tracked as a VM (QEMU): keep that */
  if (cur < 0 && bpf_map_update_elem(&tracked, &tgid, &fv.vm_id, BPF_NOEXIST) != 0) {
    count_error(VKICK_ERR_MAP_FULL);
    return;
  }
  if (bpf_map_update_elem(&frontends, &tgid, &fv, BPF_ANY) != 0) {
    count_error(VKICK_ERR_MAP_FULL);
    /* Not droppable at exit without its frontends entry: do not track. */
    if (cur < 0) bpf_map_delete_elem(&tracked, &tgid);
    return;
  }
  struct vkick_sock_key sk = {.tgid = tgid, .fd = sock_fd};
  struct vkick_sock_value sv = {.device_id = fv.device_id};
  if (bpf_map_update_elem(&vhost_sock, &sk, &sv, BPF_ANY) != 0) count_error(VKICK_ERR_MAP_FULL);
}

SEC("tracepoint/syscalls/sys_enter_connect")
int tp_sys_enter_connect(struct sys_enter_ctx* ctx) {
  __u64 addrlen = ctx->args[2];
  /* <= 2: unnamed; > sizeof(sockaddr_un): connect() fails with EINVAL. */
  if (addrlen <= 2 || addrlen > 2 + VKICK_SUN_PATH_MAX) return 0;
  __s64 sock_fd = (__s64)ctx->args[0];
  if (sock_fd < 0 || sock_fd >= VKICK_MAX_FD) return 0;
  const char* uaddr = (const char*)ctx->args[1];
  __u16 family = 0;
  if (bpf_probe_read_user(&family, sizeof(family), uaddr) != 0) return 0; /* EFAULT anyway */
  if (family != VKICK_AF_UNIX) return 0;
  /* Up to addrlen - 2 path bytes plus the NUL the helper always writes; the
   * rest of the key stays zero, so it compares by value. A path that fills
   * sun_path without a NUL is read whole too. */
  struct vkick_path_key key = {};
  __u32 n = (__u32)addrlen - 2 + 1;
  if (n > VKICK_SUN_PATH_MAX + 1) return 0;
  long len = bpf_probe_read_user_str(key.path, n, uaddr + 2);
  if (len <= 1) return 0; /* abstract (leading NUL), empty or unreadable */
  struct vkick_frontend_value* id = bpf_map_lookup_elem(&vhost_paths, &key);
  if (!id) return 0;
  track_frontend(current_tgid(), (__s32)sock_fd, id);
  return 0;
}

/* A tracked frontend that exits is dropped from `tracked` at once (its pid
 * may be reused); vkickd sweeps its kick-fd and socket bindings
 * (HostProbes::SweepExitedFrontends). Its counters stay: they are the
 * device's, and the next frontend of the device continues them. */
SEC("tracepoint/sched/sched_process_exit")
int tp_sched_process_exit(struct trace_event_raw_sched_process_exit* ctx) {
  if (!ctx->group_dead) return 0; /* another thread of a live process */
  __u32 tgid = current_tgid();
  struct vkick_frontend_value* fv = bpf_map_lookup_elem(&frontends, &tgid);
  if (!fv) return 0;
  long cur = lookup_vm(tgid);
  if (cur >= 0 && (__u32)cur == fv->vm_id) bpf_map_delete_elem(&tracked, &tgid);
  bpf_map_delete_elem(&frontends, &tgid);
  return 0;
}
