// The exporter: turns one DaemonSnapshot (attached VMs, QMP state, probe
// counters, as the control loop's last tick read them) into Prometheus
// metric families. It reads nothing itself.
//
// Label values only ever come from discovery (VmInfo / VirtioDeviceInfo) or
// from fixed sets in this file. A counter whose ids discovery does not know
// is summed into an "unknown" bucket of a VM it belongs to, or dropped when
// its VM is not attached any more (UntrackProcess drops those counters
// anyway), so nothing a guest writes can create a label value.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "controller/model/daemon_snapshot.h"
#include "controller/loop/loop_snapshot.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace vkick {

// Decodes (isa, raw exit reason) into a reason label value. Its range must be
// a fixed, bounded set (vkickd uses the exit_reasons table).
using ExitReasonNamer = std::function<std::string(uint32_t isa, uint32_t reason)>;

// Pure: the whole exposition for one snapshot, in MetricTable() order.
// `loop` (may be null: no control loop) adds the policy, channel and guest
// sample families' series.
std::vector<prometheus::MetricFamily> BuildMetricFamilies(const DaemonSnapshot& snap,
                                                          const ExitReasonNamer& namer,
                                                          const std::string& version,
                                                          const LoopSnapshot* loop = nullptr);

// Where the collector gets what it renders (Daemon::Latest in vkickd).
using SnapshotSource = std::function<std::shared_ptr<const DaemonSnapshot>()>;

// The Collectable registered with the HTTP server: renders the latest
// snapshot and the loop's on every Collect().
class VkickCollector : public prometheus::Collectable {
 public:
  VkickCollector(SnapshotSource latest, ExitReasonNamer namer, std::string version,
                 std::function<LoopSnapshot()> loop = nullptr)
      : latest_(std::move(latest)),
        namer_(std::move(namer)),
        version_(std::move(version)),
        loop_(std::move(loop)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const SnapshotSource latest_;
  const ExitReasonNamer namer_;
  const std::string version_;
  const std::function<LoopSnapshot()> loop_;
};

}  // namespace vkick
