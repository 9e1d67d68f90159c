// The exporter: turns one DaemonSnapshot (registry of attached VMs, QMP state,
// probe counters read at scrape time) into Prometheus metric families.
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

#include "controller/daemon/daemon.h"
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

// The Collectable registered with the HTTP server: renders the daemon's
// latest snapshot (Daemon::Latest) and the loop's on every Collect().
class VkickCollector : public prometheus::Collectable {
 public:
  VkickCollector(Daemon& daemon, ExitReasonNamer namer, std::string version,
                 std::function<LoopSnapshot()> loop = nullptr)
      : daemon_(daemon),
        namer_(std::move(namer)),
        version_(std::move(version)),
        loop_(std::move(loop)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Daemon& daemon_;
  const ExitReasonNamer namer_;
  const std::string version_;
  const std::function<LoopSnapshot()> loop_;
};

}  // namespace vkick
