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
       "Probe failures by reason: map_full, read_user_failed, bad_vhost_msg (in BPF); "
       "control (a map update from vkickd failed), read_counters (a scrape could not read "
       "the maps)."},
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
