/* Types shared by bpf/host_probes.bpf.c and the C++ side (controller/probes).
 *
 * The single definition of every map key/value, every bound and every
 * SEC("syscall") test-program context: the BPF object and userspace include
 * this same file, so there is no hand-mirrored struct to drift. Only
 * fixed-width __uN types, explicit padding, no pointers.
 *
 * Included from BPF (after vmlinux.h, which defines __u8..__u64) and from C++
 * (where <linux/types.h> defines them).
 */
#ifndef VKICK_BPF_HOST_PROBES_H_
#define VKICK_BPF_HOST_PROBES_H_

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Map bounds. Every map is bounded and preallocated; an insert into a full
 * map is counted (VKICK_ERR_MAP_FULL in BPF; vkick_probe_map_full_total for
 * vkickd's own inserts), never silently lost.
 *
 * The maps that grow with the fleet are sized from three capacities: VMs,
 * virtqueues per VM and vCPUs per VM (vkickd's --max-vms,
 * --max-queues-per-vm, --max-vcpus-per-vm; HostProbes sets max_entries from
 * them before the load). The formulas below are the only copy: the BPF
 * object's defaults and HostProbes both use them. */
#define VKICK_DEFAULT_MAX_VMS 4096
#define VKICK_DEFAULT_QUEUES_PER_VM 8
#define VKICK_DEFAULT_VCPUS_PER_VM 8
/* Exit reasons a vCPU shows in practice (external interrupt, HLT, EPT
 * misconfig/violation, MSR write, preemption timer, I/O, CPUID...): more
 * are counted as map_full, not lost silently. */
#define VKICK_EXIT_REASONS_PER_VCPU 8

#define VKICK_MAX_VHOST_PATHS 64 /* declared vhost-user socket path -> {vm, device} */
#define VKICK_MAX_FRONTENDS 256  /* tgid tracked from its connect() -> {vm, device} */

/* tgid -> vm_id: every VM's process, and the frontends tracked from their
 * connect(), which must never crowd out a VM. */
#define VKICK_SIZE_TRACKED(vms) ((vms) + VKICK_MAX_FRONTENDS)
/* {tgid, space, addr} -> {vm, device, queue, counter slots}: one notify
 * address per queue (of the VM's one VMM process). */
#define VKICK_SIZE_NOTIFY(vms, queues) ((vms) * (queues))
/* {vm, device, queue} counters in a hash: every queue, plus one
 * unknown-device or out-of-range-queue key per VM. What the guest-write path
 * counts here is only what has no slot (below); the vhost-user kick path
 * (write() to a kick eventfd) counts here always. */
#define VKICK_SIZE_NOTIFY_COUNTS(vms, queues) ((vms) * ((queues) + 1))
/* Counter slots of queue_counts (per-CPU array): one per {vm, device,
 * queue} of an installed notify target, allocated by vkickd; the same
 * room as notify_counts, so a legacy-only device's speculative slots
 * (VKICK_TARGET_SLOTS) have a spare per VM. */
#define VKICK_SIZE_QUEUE_SLOTS(vms, queues) ((vms) * ((queues) + 1))
/* {vm, vcpu, isa, reason} counters. */
#define VKICK_SIZE_EXIT_COUNTS(vms, vcpus) ((vms) * (vcpus) * VKICK_EXIT_REASONS_PER_VCPU)
/* {vm, space}: MMIO and PIO per VM. */
#define VKICK_SIZE_UNMATCHED(vms) ((vms) * 2)
/* {vm, MSI address, data}: a vector per queue, the config vector and a
 * spare per VM. */
#define VKICK_SIZE_IRQ_COUNTS(vms, queues) ((vms) * ((queues) + 2))
/* {tgid, socket fd} -> device and {tgid, kick fd} -> queue: a vhost-user
 * device has at least one queue, so queues bound both. */
#define VKICK_SIZE_VHOST_SOCKS(vms, queues) ((vms) * (queues))
#define VKICK_SIZE_KICK_FDS(vms, queues) ((vms) * (queues))

/* The defaults, for the BPF object's map definitions and the tests. */
#define VKICK_MAX_TRACKED VKICK_SIZE_TRACKED(VKICK_DEFAULT_MAX_VMS)
#define VKICK_MAX_NOTIFY_TARGETS VKICK_SIZE_NOTIFY(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)
#define VKICK_MAX_NOTIFY_KEYS \
  VKICK_SIZE_NOTIFY_COUNTS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)
#define VKICK_MAX_QUEUE_SLOTS \
  VKICK_SIZE_QUEUE_SLOTS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)
#define VKICK_MAX_EXIT_KEYS VKICK_SIZE_EXIT_COUNTS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_VCPUS_PER_VM)
#define VKICK_MAX_UNMATCHED_KEYS VKICK_SIZE_UNMATCHED(VKICK_DEFAULT_MAX_VMS)
#define VKICK_MAX_IRQ_KEYS VKICK_SIZE_IRQ_COUNTS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)
#define VKICK_MAX_VHOST_SOCKS \
  VKICK_SIZE_VHOST_SOCKS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)
#define VKICK_MAX_KICK_FDS VKICK_SIZE_KICK_FDS(VKICK_DEFAULT_MAX_VMS, VKICK_DEFAULT_QUEUES_PER_VM)

/* The kvm programs' filter (vmm_tgids): one bit per possible tgid, set for
 * the processes vkickd tracks (TrackProcess), so an untracked process's kvm
 * event costs an inlined array load, not a hash lookup. Linux pids
 * are below PID_MAX_LIMIT (2^22 on 64-bit); a tgid at or above it has no bit
 * and takes the hash path (the tests' fake tgids do). 512 KiB. */
#define VKICK_TGID_BITS (1u << 22)
#define VKICK_TGID_WORDS (VKICK_TGID_BITS / 64)

/* Counter slots a notify target carries: a modern target uses slots[0]
 * (its queue); a legacy one (value_is_queue) slots[v] for a written value
 * v < VKICK_TARGET_SLOTS. VKICK_NO_SLOT, a value beyond, or a slot outside
 * queue_counts: counted in the notify_counts hash instead (exact, the
 * slower path). */
#define VKICK_TARGET_SLOTS 4 /* a power of two: the program masks the index */
#define VKICK_NO_SLOT 0xffffffffu

/* Validation limits for what is read from a traced process. */
#define VKICK_MAX_FD (1 << 20)        /* fds at or above are rejected */
#define VKICK_MAX_QUEUE 1024          /* legacy PIO value read as a queue index */
#define VKICK_UNKNOWN_DEVICE 0xffff   /* kick fd whose socket has no device */

/* sockaddr_un: sun_family (2 bytes) + sun_path (108 bytes, NUL optional when
 * the path fills it). The path key holds up to 108 characters plus a NUL, all
 * bytes after the first NUL zero, so a key compares by value. */
#define VKICK_SUN_PATH_MAX 108
#define VKICK_PATH_KEY_SIZE 112
#define VKICK_AF_UNIX 1

/* Address spaces of guest writes (matches vkick::NotifyTarget::Space). */
#define VKICK_SPACE_MMIO 0
#define VKICK_SPACE_PIO 1

/* Tracepoint constants we filter on (include/trace/events/kvm.h). */
#define VKICK_KVM_TRACE_MMIO_WRITE 2
#define VKICK_KVM_PIO_OUT 1

/* vhost-user protocol (docs/interop/vhost-user.rst). */
#define VKICK_VHOST_USER_HDR_SIZE 12
#define VKICK_VHOST_USER_SET_VRING_KICK 12
#define VKICK_VHOST_USER_VRING_IDX_MASK 0xffULL
#define VKICK_VHOST_USER_VRING_NOFD_MASK (1ULL << 8)

/* Indices of the per-CPU errors array. */
enum vkick_error {
  VKICK_ERR_MAP_FULL = 0,       /* an insert into a bounded map failed */
  VKICK_ERR_READ_USER = 1,      /* bpf_probe_read_user of a vhost-user msg failed */
  VKICK_ERR_BAD_VHOST_MSG = 2,  /* a SET_VRING_KICK that did not validate */
  VKICK_ERR_BAD_QUEUE = 3,      /* legacy PIO value >= VKICK_MAX_QUEUE (counted unmatched too) */
  VKICK_ERR_COUNT = 4,
};

/* Keyed by the writing process, not the VM: a matched write is then one
 * hash lookup, without the tgid -> vm_id lookup in `tracked` first. vkickd
 * installs a VM's targets once per process tracked under it (one: its
 * VMM). */
struct vkick_notify_key {
  __u32 tgid;
  __u8 space; /* VKICK_SPACE_* */
  __u8 pad[3];
  __u64 addr; /* guest-physical address or I/O port */
};

struct vkick_notify_target {
  __u32 vm_id;     /* for the hash and unmatched keys: no `tracked` lookup */
  __u16 device_id;
  __u16 queue;
  __u8 value_is_queue; /* legacy: the written value is the queue index */
  __u8 pad[3];
  /* queue_counts indices (VKICK_TARGET_SLOTS above). */
  __u32 slots[VKICK_TARGET_SLOTS];
};

struct vkick_exit_key {
  __u32 vm_id;
  __u32 vcpu_id;
  __u32 isa;    /* 1 = VMX, 2 = SVM (tracepoint field) */
  __u32 reason; /* raw exit_reason */
};

struct vkick_queue_key {
  __u32 vm_id;
  __u16 device_id;
  __u16 queue;
};

struct vkick_unmatched_key {
  __u32 vm_id;
  __u32 space;
};

struct vkick_irq_key {
  __u32 vm_id;
  __u32 data;    /* MSI data (the tracepoint's u64, upper bits always zero) */
  __u64 address; /* MSI address */
};

struct vkick_sock_key {
  __u32 tgid;
  __s32 fd;
};

struct vkick_sock_value {
  __u16 device_id;
  __u16 pad;
};

struct vkick_kick_value {
  __s32 socket_fd;
  __u16 device_id; /* VKICK_UNKNOWN_DEVICE if the socket was not declared */
  __u16 queue;
};

/* A declared vhost-user socket path (vhost_paths map key): the canonical
 * absolute path, NUL-terminated, zero-padded. */
struct vkick_path_key {
  char path[VKICK_PATH_KEY_SIZE];
};

/* Who a process connecting to that path is: value of vhost_paths and of
 * frontends (tgid -> identity it was tracked under). */
struct vkick_frontend_value {
  __u32 vm_id;
  __u16 device_id;
  __u16 pad;
};

/* Contexts of the SEC("syscall") test programs, passed through
 * BPF_PROG_TEST_RUN. They carry the tgid explicitly (instead of
 * bpf_get_current_pid_tgid()) so tests can play any process. */
struct vkick_test_exit_ctx {
  __u32 tgid;
  __u32 vcpu_id;
  __u32 isa;
  __u32 reason;
};

struct vkick_test_io_ctx {
  __u32 tgid;
  __u32 space; /* VKICK_SPACE_* */
  __u64 addr;
  __u64 val;
};

struct vkick_test_msi_ctx {
  __u32 tgid;
  __u32 pad;
  __u64 address;
  __u64 data;
};

#endif /* VKICK_BPF_HOST_PROBES_H_ */
