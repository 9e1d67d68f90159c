// What the control loop publishes for the exporter and the admin socket:
// plain data, taken at one moment under the runner's lock.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "controller/loop/control_loop.h"
#include "prometheus/client_metric.h"
#include "protocol/messages.h"

namespace vkick {

struct AgentChannelSnapshot {
  std::string vm;          // the `vm` label (discovery's VM, or --vhost-user-vm)
  uint32_t connected = 0;  // agents past hello
  std::array<uint64_t, proto::kRejectionCount> rejected{};
  uint64_t dropped = 0;    // connections closed by the guard or a failed send
};

struct LoopSnapshot {
  std::vector<QueueView> queues;  // key order
  std::vector<AgentChannelSnapshot> agents;
  prometheus::ClientMetric loop_duration;  // histogram, seconds
  uint64_t admin_refused = 0;              // peers refused by SO_PEERCRED
  uint64_t state_save_errors = 0;          // policy changes not persisted
  uint64_t state_load_errors = 0;          // state files ignored (corrupt) at start
};

}  // namespace vkick
