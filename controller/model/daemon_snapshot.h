// What vkickd knows at one moment: the attached VMs, the QMP state and the
// probe counters, as one immutable value. Daemon::Tick() (the one reader of
// the probes) produces it; the exporter, the control loop and /healthz only
// render it. Plain data, no behaviour: the bottom of the controller.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "controller/discovery/vm_model.h"
#include "controller/probes/probe_backend.h"
#include "prometheus/client_metric.h"

namespace vkick {

// Why a QMP attachment failed; the `reason` label of vkick_qmp_errors_total.
enum class QmpErrorReason {
  kConnect = 0,   // socket missing / refused (the VM is not there)
  kTimeout = 1,   // QMP did not answer in time (hung VM)
  kProtocol = 2,  // garbage or an unexpected reply
  kGone = 3,      // the connection closed under an attached VM
};
inline constexpr int kNumQmpErrorReasons = 4;
inline const char* QmpErrorReasonName(QmpErrorReason reason) {
  switch (reason) {
    case QmpErrorReason::kConnect:
      return "connect";
    case QmpErrorReason::kTimeout:
      return "timeout";
    case QmpErrorReason::kProtocol:
      return "protocol";
    case QmpErrorReason::kGone:
      return "gone";
  }
  return "protocol";
}

// Daemon-side probe errors added to the probe's own ProbeErrors; together the
// `reason` label values of vkick_probe_errors_total.
struct DaemonProbeErrors {
  uint64_t control = 0;        // Track/Untrack/SetNotifyTargets/... failed (not for room)
  uint64_t read_counters = 0;  // ReadCounters failed at a scrape
};

// The probe maps vkickd inserts VMs into; the `map` label of
// vkick_probe_map_full_total.
enum class ProbeMap { kTracked = 0, kNotify = 1 };
inline constexpr int kNumProbeMaps = 2;
inline const char* ProbeMapName(ProbeMap map) {
  return map == ProbeMap::kTracked ? "tracked" : "notify";
}

// Queues per --vhost-user device the exporter labels (the protocol's
// kMaxQueuesPerDevice).
inline constexpr uint16_t kMaxVhostUserQueues = 64;

struct AttachedVm {
  uint32_t vm_id = 0;
  VmInfo info;
  // The --vhost-user pseudo-VM (pid 0): its devices' queues are the ones
  // the probes learned (at least queue 0); `bound_queues` holds the
  // (device_id, queue) pairs a live frontend has a kick fd for, i.e. whose
  // host count is current.
  bool vhost_user_frontends = false;
  std::set<std::pair<uint16_t, uint16_t>> bound_queues;
  // The probes count the VM: tracked and every notify target installed
  // (vkick_vm_probed). Not, e.g., when a full probe map left it out; then
  // `map_full` names that map (it is retried when room appears).
  bool probed = false;
  std::optional<ProbeMap> map_full;
  // Gone (QEMU exited or its socket went): kept with its final counts for
  // the retention period, then dropped. The control loop ignores it.
  bool departed = false;
};

struct QmpAttachmentStatus {
  std::string qmp_path;
  bool connected = false;  // a VM is attached through this path right now
  uint64_t errors[kNumQmpErrorReasons] = {};
};

// Everything the exporter, the control loop and /healthz need, taken at one
// moment by the one probe reader (Daemon::Tick). Immutable once published.
struct DaemonSnapshot {
  absl::Time taken = absl::InfinitePast();  // InfinitePast: no Tick() yet
  std::vector<AttachedVm> vms;  // live ones by vm_id, then the departed ones
  std::vector<QmpAttachmentStatus> qmp;    // --qmp order, then --qmp-dir arrivals
  prometheus::ClientMetric discovery_duration;  // histogram, seconds
  bool probes_enabled = false;             // a ProbeBackend was given
  // Counters read in the same scrape; empty when probes are disabled or the
  // read failed (then probe_errors.read_counters was incremented).
  std::optional<CounterSnapshot> counters;
  std::string read_error;  // why `counters` is empty although probes are enabled
  DaemonProbeErrors probe_errors;
  uint64_t map_full[kNumProbeMaps] = {};  // VMs refused by a full map, by ProbeMap
  bool kick_syscalls_attached = false;
};

}  // namespace vkick
