// The one table of every metric vkickd exports: name, type, help, labels.
// The collector builds its families from it, and a unit test checks
// docs/metrics.md against it, so code and docs cannot drift.
#pragma once

#include <string>
#include <vector>

#include "absl/types/span.h"
#include "prometheus/metric_type.h"

namespace vkick {

enum class Metric {
  kBuildInfo,
  kProbesAttached,
  kProbeKickFdBindings,
  kProbeErrors,
  kProbeMapFull,
  kProbeKickSyscallsAttached,
  kQmpConnected,
  kQmpErrors,
  kDiscoveryDuration,
  kVmInfo,
  kVmProbed,
  kVmRunning,
  kVirtqueueNotifications,
  kVmUnmatchedIoWrites,
  kVmExits,
  kVmInterrupts,
  kVmInterruptVectors,
  // The control loop and the agent channel (controller/loop, channel, admin).
  kControlLoopDuration,
  kQueuePolicyInfo,
  kQueueBatchThreshold,
  kQueueDeferBound,
  kQueuePolicyAcked,
  kQueueLeaseState,
  kQueueLeaseExpired,
  kPolicySwitches,
  kAgentConnected,
  kAgentMessagesRejected,
  kAgentConnectionsDropped,
  kAgentConnectionsRefused,
  kAdminRequestsRefused,
  kPolicySaveErrors,
  kPolicyStateLoadErrors,
  // Guest samples (from the agent; validated, labelled by the host).
  kVirtqueueDepth,
  kVirtqueueRequestLatency,
  kVirtqueueRequests,
  kVirtqueueGuestKicks,
  kVirtqueueGuestTimerKicks,
};

struct MetricSpec {
  Metric id;
  std::string name;
  prometheus::MetricType type;
  std::vector<std::string> labels;  // in exposition order
  std::string help;
};

// Every metric, in exposition order.
absl::Span<const MetricSpec> MetricTable();
const MetricSpec& Spec(Metric id);
// "counter", "gauge", "histogram", ... as in the text format's # TYPE line.
const char* MetricTypeName(prometheus::MetricType type);

// Label value used when a counter refers to an id discovery does not know (a
// device_id of 0xffff, a queue index beyond num_queues, a vCPU index beyond
// the discovered vCPUs). Never a value taken from the counter itself.
inline constexpr char kUnknownLabel[] = "unknown";

}  // namespace vkick
