#include "exporters/metrics_table.h"

#include <cstdlib>

namespace vkick {

using prometheus::MetricType;

absl::Span<const MetricSpec> MetricTable() {
  static const auto* const kTable = new std::vector<MetricSpec>{
      {Metric::kBuildInfo, "vkick_build_info", MetricType::Gauge, {"version"},
       "vkickd build information; always 1."},
      {Metric::kProbesAttached, "vkick_probes_attached", MetricType::Gauge, {},
       "1 when the eBPF host probes are attached and readable, 0 with --no-probes or when "
       "reading them failed."},
      {Metric::kProbeKickFdBindings, "vkick_probe_kick_fd_bindings", MetricType::Gauge, {},
       "vhost-user kick eventfds the probes have bound to a virtqueue (learned from "
       "SET_VRING_KICK)."},
      {Metric::kProbeErrors, "vkick_probe_errors_total", MetricType::Counter, {"reason"},
       "Probe failures by reason: map_full, read_user_failed, bad_vhost_msg, bad_queue (in BPF); "
       "control (a map update from vkickd failed), read_counters (a scrape could not read "
       "the maps)."},
      {Metric::kProbeMapFull, "vkick_probe_map_full_total", MetricType::Counter, {"map"},
       "VMs a full probe map refused, by map (tracked, notify): such a VM is not counted "
       "(vkick_vm_probed 0) and is tried again only when a VM leaves. Size the maps with "
       "--max-vms and --max-queues-per-vm."},
      {Metric::kProbeKickSyscallsAttached, "vkick_probe_kick_syscalls_attached",
       MetricType::Gauge, {},
       "1 while the kick syscall programs (--vhost-user-kicks) are attached: only while a TCG "
       "VM with a vhost-user device or a --vhost-user frontend needs them, since every syscall "
       "on the host is traced meanwhile."},
      {Metric::kQmpConnected, "vkick_qmp_connected", MetricType::Gauge, {"qmp"},
       "1 while a VM is attached through this --qmp socket, else 0."},
      {Metric::kQmpErrors, "vkick_qmp_errors_total", MetricType::Counter, {"qmp", "reason"},
       "QMP failures per --qmp socket by reason: connect (socket missing or refused), "
       "timeout (no answer in time), protocol (garbage reply), gone (connection closed "
       "under an attached VM)."},
      {Metric::kDiscoveryDuration, "vkick_discovery_duration_seconds", MetricType::Histogram,
       {}, "Duration of one QMP discovery refresh of one VM, successful or not."},
      {Metric::kVmInfo, "vkick_vm_info", MetricType::Gauge, {"vm", "pid"},
       "1 per attached VM; vm is its QEMU -name (else \"pid\" and the process id), pid its QEMU process id."},
      {Metric::kVmProbed, "vkick_vm_probed", MetricType::Gauge, {"vm"},
       "1 when the host probes count the VM (tracked, every notify address installed); 0 when "
       "they do not: a full probe map left it out (vkick_probe_map_full_total), or --no-probes."},
      {Metric::kVmRunning, "vkick_vm_running", MetricType::Gauge, {"vm"},
       "1 while the VM's guest runs; 0 while it is paused, suspended, migrating or shut down "
       "(vkickctl status names the state), or departed. While 0 the control loop holds its "
       "queues' policy and lease."},
      {Metric::kVirtqueueNotifications, "vkick_virtqueue_notifications_total",
       MetricType::Counter, {"vm", "device", "queue"},
       "Guest to host notifications (kicks) per virtqueue; every discovered queue is "
       "present from discovery on. device/queue \"unknown\" sums kicks for ids discovery "
       "does not know."},
      {Metric::kVmUnmatchedIoWrites, "vkick_vm_unmatched_io_writes_total",
       MetricType::Counter, {"vm", "space"},
       "Guest MMIO or PIO writes (space \"mmio\" or \"pio\") that exited to the host and matched no "
       "discovered notify address."},
      {Metric::kVmExits, "vkick_vm_exits_total", MetricType::Counter, {"vm", "vcpu", "reason"},
       "VM exits per vCPU index and decoded exit reason (kvm:kvm_exit; VMX and SVM hosts)."},
      {Metric::kVmInterrupts, "vkick_vm_interrupts_total", MetricType::Counter, {"vm"},
       "MSI interrupts injected into the VM (kvm:kvm_msi_set_irq), all vectors summed."},
      {Metric::kVmInterruptVectors, "vkick_vm_interrupt_vectors", MetricType::Gauge, {"vm"},
       "Distinct MSI (address, data) vectors the probes have seen for the VM; vectors are "
       "guest-programmed, so they are counted, not used as labels."},
      {Metric::kControlLoopDuration, "vkick_control_loop_duration_seconds",
       MetricType::Histogram, {},
       "Duration of one control loop step (gather counters and samples, compute, send)."},
      {Metric::kQueuePolicyInfo, "vkick_queue_policy_info", MetricType::Gauge,
       {"vm", "device", "queue", "mode", "source"},
       "1 per queue: its kick policy mode (immediate, event-idx, static, adaptive) and which "
       "entry it came from (queue, device, vm, default); mode \"observe\", source \"none\" for a "
       "disk the guest kernel's own virtio_blk drives (measured, never sent a policy)."},
      {Metric::kQueueBatchThreshold, "vkick_queue_batch_threshold", MetricType::Gauge,
       {"vm", "device", "queue"},
       "Batching threshold B in force for the queue (requests per kick; 1 = kick every "
       "request). Not for observe-only queues."},
      {Metric::kQueueDeferBound, "vkick_queue_defer_bound_seconds", MetricType::Gauge,
       {"vm", "device", "queue"},
       "Deferral bound T in force for the queue: the longest a request waits for its kick "
       "(0 with B = 1)."},
      {Metric::kQueuePolicyAcked, "vkick_queue_policy_acked", MetricType::Gauge,
       {"vm", "device", "queue"},
       "1 when the queue's agent acknowledged the policy generation now in force, else 0."},
      {Metric::kQueueLeaseState, "vkick_queue_lease_state", MetricType::Gauge,
       {"vm", "device", "queue", "state"},
       "Lease state of the queue as its agent last reported it, or, once no agent reports on "
       "it, expired when the lease vkickd last sent has run out: 1 for the current state "
       "(none, active, expired), 0 for the others."},
      {Metric::kQueueLeaseExpired, "vkick_queue_lease_expired_total", MetricType::Counter,
       {"vm", "device", "queue"},
       "Times the queue's lease expired (the driver fell back to its default): reported by "
       "the agent, or run out with no agent reporting on the queue."},
      {Metric::kPolicySwitches, "vkick_policy_switches_total", MetricType::Counter,
       {"vm", "device", "queue"}, "Changes of the queue's policy mode."},
      {Metric::kAgentConnected, "vkick_agent_connected", MetricType::Gauge, {"vm"},
       "Agents connected (past hello) on the VM's channel."},
      {Metric::kAgentMessagesRejected, "vkick_agent_messages_rejected_total",
       MetricType::Counter, {"vm", "reason"},
       "Agent messages rejected by the host, by reason (the protocol's closed set)."},
      {Metric::kAgentConnectionsDropped, "vkick_agent_connections_dropped_total",
       MetricType::Counter, {"vm"},
       "Agent connections vkickd closed: fatal framing, repeated rejections, or an agent "
       "not reading its policies."},
      {Metric::kAgentConnectionsRefused, "vkick_agent_connections_refused_total",
       MetricType::Counter, {"reason"},
       "Agent channel connections refused, or closed before they reported on anything, by "
       "reason: host_limit (--agent-socket's connection cap), peer_limit (that uid's cap of "
       "connections yet to say hello), hello_timeout (no hello naming a device it owns in "
       "time), vm_channel_limit (VM channels over their cap)."},
      {Metric::kAdminRequestsRefused, "vkick_admin_requests_refused_total",
       MetricType::Counter, {"reason"},
       "Admin socket clients turned away, by reason: peer_credentials (the SO_PEERCRED "
       "check), busy (16 clients already connected), deadline (no complete request line "
       "within 5 s)."},
      {Metric::kPolicySaveErrors, "vkick_policy_save_errors_total", MetricType::Counter, {},
       "Policy changes refused because the state directory could not be written."},
      {Metric::kPolicyStateLoadErrors, "vkick_policy_state_load_errors_total",
       MetricType::Counter, {},
       "State files (policies.v1, default-policy.v1) that did not parse at start: moved "
       "aside to <file>.corrupt, the defaults used instead."},
      {Metric::kVirtqueueDepth, "vkick_virtqueue_depth", MetricType::Histogram,
       {"vm", "device", "queue"},
       "Requests outstanding in the guest driver when a request is submitted (the new one "
       "included), from the agent's samples."},
      {Metric::kVirtqueueRequestLatency, "vkick_virtqueue_request_latency_seconds",
       MetricType::Histogram, {"vm", "device", "queue"},
       "Request latency, submit to completion seen by the guest driver, from the agent's "
       "samples; the sum is estimated from bucket midpoints."},
      {Metric::kVirtqueueRequests, "vkick_virtqueue_requests_total", MetricType::Counter,
       {"vm", "device", "queue"}, "Requests the guest driver submitted (agent samples)."},
      {Metric::kVirtqueueGuestKicks, "vkick_virtqueue_guest_kicks_total", MetricType::Counter,
       {"vm", "device", "queue"},
       "Notify writes the guest driver reports it performed (agent samples; compare with "
       "the host-counted vkick_virtqueue_notifications_total)."},
      {Metric::kVirtqueueGuestTimerKicks, "vkick_virtqueue_guest_timer_kicks_total",
       MetricType::Counter, {"vm", "device", "queue"},
       "Of the guest's kicks, those fired by the deferral bound T because a batch did not "
       "fill in time (agent samples)."},
  };
  return *kTable;
}

const MetricSpec& Spec(Metric id) {
  for (const MetricSpec& s : MetricTable()) {
    if (s.id == id) return s;
  }
  std::abort();  // every enumerator has a row (tested)
}

const char* MetricTypeName(prometheus::MetricType type) {
  switch (type) {
    case MetricType::Counter:
      return "counter";
    case MetricType::Gauge:
      return "gauge";
    case MetricType::Summary:
      return "summary";
    case MetricType::Untyped:
      return "untyped";
    case MetricType::Histogram:
      return "histogram";
  }
  return "untyped";
}

}  // namespace vkick
