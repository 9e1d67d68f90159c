// The controller's view of the host probes: a narrow interface so the daemon
// and exporter can be tested against a fake (no root, no kernel), while
// HostProbes (host_probes.h) implements it with the libbpf skeleton.
//
// Identifiers: the daemon assigns every attached VM (or vhost-user frontend
// process) a small `vm_id`, and every virtio device of that VM a `device_id`
// unique within the VM. The probes count by those ids; the daemon maps them
// back to label values ({vm, device, queue}) at scrape time, so label values
// can only ever come from discovery.
#pragma once

#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace vkick {

// Where a guest → host notification for one virtqueue lands.
struct NotifyTarget {
  enum class Space : uint8_t { kMmio = 0, kPio = 1 };
  Space space = Space::kMmio;
  uint64_t addr = 0;      // guest-physical address (MMIO) or I/O port (PIO)
  uint16_t device_id = 0;
  // For modern virtio-pci each queue has its own notify address and `queue`
  // names it. Legacy virtio-pci has one port per device and the written value
  // is the queue index: set value_is_queue and `queue` is ignored.
  uint16_t queue = 0;
  bool value_is_queue = false;

  // A modern queue's own notify address.
  static NotifyTarget Mmio(uint64_t addr, uint16_t device_id, uint16_t queue) {
    return {Space::kMmio, addr, device_id, queue, false};
  }
  // A legacy device's notify port (the value written is the queue).
  static NotifyTarget LegacyPio(uint64_t port, uint16_t device_id) {
    return {Space::kPio, port, device_id, 0, true};
  }
};

struct ExitCount {
  uint32_t vm_id;
  uint32_t vcpu;
  uint32_t isa;      // KVM_ISA_VMX = 1, KVM_ISA_SVM = 2 (the tracepoint's field)
  uint32_t reason;   // raw exit reason
  uint64_t count;
};

struct NotificationCount {
  uint32_t vm_id;
  uint16_t device_id;
  uint16_t queue;
  uint64_t count;
};

// A guest I/O write (MMIO or PIO) by a tracked VM that hit no known notify
// address: not dropped, counted per VM and address space.
struct UnmatchedCount {
  uint32_t vm_id;
  NotifyTarget::Space space;
  uint64_t count;
};

struct InterruptCount {
  uint32_t vm_id;
  uint64_t msi_address;
  uint32_t msi_data;
  uint64_t count;
};

// A kick eventfd learned from a vhost-user frontend's SET_VRING_KICK message.
struct KickFdBinding {
  uint32_t tgid;
  int32_t kick_fd;
  int32_t socket_fd;   // the vhost-user socket the message went over
  uint16_t device_id;  // from SetVhostUserSocket, or kUnknownDevice
  uint16_t queue;
};

inline constexpr uint16_t kUnknownDevice = 0xffff;

// A process tracked as a vhost-user frontend because it connect()ed to a
// declared socket path (SetVhostUserPath), or adopted (TrackFrontend).
struct FrontendInfo {
  uint32_t tgid;
  uint32_t vm_id;
  uint16_t device_id;
};

// Probe-side failures; exported as vkick_probe_errors_total{reason}.
struct ProbeErrors {
  uint64_t map_full = 0;          // an update into a bounded map failed
  uint64_t read_user_failed = 0;  // bpf_probe_read_user of a vhost-user msg failed
  uint64_t bad_vhost_msg = 0;     // a SET_VRING_KICK that did not parse
  uint64_t bad_queue = 0;         // legacy PIO notify value >= VKICK_MAX_QUEUE
                                  // (also counted as an unmatched write)
};

struct CounterSnapshot {
  std::vector<ExitCount> exits;
  std::vector<NotificationCount> notifications;  // matched, per queue
  std::vector<UnmatchedCount> unmatched_writes;
  std::vector<InterruptCount> interrupts;
  std::vector<KickFdBinding> kick_fds;
  std::vector<FrontendInfo> frontends;
  ProbeErrors errors;
};

// A queue as the probes name it: (vm_id, device_id, queue).
using ProbeQueueId = std::tuple<uint32_t, uint16_t, uint16_t>;

// The snapshot's notification counts summed per queue (a queue's count may
// come in several entries, e.g. one per notify address).
inline std::map<ProbeQueueId, uint64_t> NotificationTotals(const CounterSnapshot& c) {
  std::map<ProbeQueueId, uint64_t> out;
  for (const NotificationCount& n : c.notifications) out[{n.vm_id, n.device_id, n.queue}] += n.count;
  return out;
}

// What a backend found of a previous vkickd's state (pinned maps): the VM
// processes still counted, each with the vm_id it had, and the first vm_id
// no state uses. The daemon gives a VM whose pid is here its old vm_id (its
// counters continue) and never hands such an id to another VM.
struct AdoptedVms {
  std::map<uint32_t, uint32_t> vm_of_pid;  // tgid -> vm_id
  uint32_t next_vm_id = 1;
};

class ProbeBackend {
 public:
  virtual ~ProbeBackend() = default;
  // The adopted state, as found at creation (not updated afterwards).
  virtual AdoptedVms adopted_vms() const { return {}; }
  // Whether the counters outlive this process (pinned): then a clean stop
  // leaves the VMs tracked, for the next vkickd to adopt.
  virtual bool keeps_counts_across_restart() const { return false; }

  // Start counting events of process `tgid` (a QEMU, or any vhost-user
  // frontend) under `vm_id`. Idempotent.
  virtual absl::Status TrackProcess(uint32_t tgid, uint32_t vm_id) = 0;
  // Stop counting and drop every counter and binding of that VM.
  virtual absl::Status UntrackProcess(uint32_t tgid, uint32_t vm_id) = 0;

  // Replace the VM's notify address map with `targets` (an atomic swap from
  // the reader's point of view is not required: a notify racing a refresh may
  // count as unmatched, and that is visible).
  virtual absl::Status SetNotifyTargets(uint32_t vm_id,
                                        absl::Span<const NotifyTarget> targets) = 0;

  // Declare that socket fd `socket_fd` of process `tgid` is the vhost-user
  // connection of `device_id`; SET_VRING_KICK messages sent over it bind
  // kick fds to that device's queues.
  virtual absl::Status SetVhostUserSocket(uint32_t tgid, int32_t socket_fd,
                                          uint16_t device_id) = 0;

  // Declare a vhost-user socket path (canonical, absolute, <= 107 bytes): a
  // process that connect()s to exactly this path is tracked under `vm_id`
  // and that connection is `device_id`'s vhost-user socket, so its
  // SET_VRING_KICK messages and kick eventfd writes are counted per queue.
  // It is dropped when it exits. Backends without this return kUnimplemented.
  virtual absl::Status SetVhostUserPath(absl::string_view path, uint32_t vm_id,
                                        uint16_t device_id) {
    (void)path, (void)vm_id, (void)device_id;
    return absl::UnimplementedError("vhost-user socket paths are not supported by this backend");
  }
  // The same for a frontend that was connected before the path was declared
  // (found with sock_diag): track `tgid` as `device_id`'s frontend over
  // `socket_fd`. Kick fds it announced earlier cannot be learned.
  virtual absl::Status TrackFrontend(uint32_t tgid, int32_t socket_fd, uint32_t vm_id,
                                     uint16_t device_id) {
    (void)tgid, (void)socket_fd, (void)vm_id, (void)device_id;
    return absl::UnimplementedError("vhost-user frontends are not supported by this backend");
  }
  // Drop the socket and kick-fd bindings of frontends that exited (the
  // programs untrack them at exit; their bindings are swept here). Counters
  // stay. Cheap enough to call every control interval.
  virtual absl::Status SweepExitedFrontends() { return absl::OkStatus(); }

  // Attach or detach the programs that count kicks made by write() (syscall
  // tracepoints: vhost-user frontends, QEMU under TCG). While attached,
  // every syscall of every process on the host takes the kernel's tracing
  // path, so vkickd keeps them attached only while something needs them.
  // Idempotent.
  virtual absl::Status SetKickSyscalls(bool attached) {
    (void)attached;
    return absl::UnimplementedError("this backend has no kick syscall programs");
  }

  // Sum the per-CPU counters. Cheap enough to call at every scrape.
  virtual absl::StatusOr<CounterSnapshot> ReadCounters() = 0;

  // The notification totals (as NotificationTotals) of `queues` only: every
  // queue asked is in the result, 0 when nothing was counted for it; no
  // other queue is. For a control loop that needs a few queues per tick: a
  // backend may read just those. The default reads everything.
  virtual absl::StatusOr<std::map<ProbeQueueId, uint64_t>> ReadNotificationTotals(
      absl::Span<const ProbeQueueId> queues) {
    absl::StatusOr<CounterSnapshot> c = ReadCounters();
    if (!c.ok()) return c.status();
    const std::map<ProbeQueueId, uint64_t> all = NotificationTotals(*c);
    std::map<ProbeQueueId, uint64_t> out;
    for (const ProbeQueueId& q : queues) {
      auto it = all.find(q);
      out[q] = it == all.end() ? 0 : it->second;
    }
    return out;
  }
};

}  // namespace vkick
