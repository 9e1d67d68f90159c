// What the control loop publishes for the exporter and the admin socket:
// plain data, taken at one moment under the runner's lock.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "controller/loop/control_loop.h"
#include "prometheus/client_metric.h"
#include "protocol/messages.h"

namespace vkick {

// Why the agent channel refused a connection, or closed one before it
// reported on anything: the bounded `reason` label of
// vkick_agent_connections_refused_total.
enum class AgentRefusal : uint8_t {
  kHostLimit,       // --agent-socket: its connection cap is reached
  kPeerLimit,       // --agent-socket: that uid has its cap of connections yet to say hello
  kHelloTimeout,    // --agent-socket: no hello naming a device it owns within the deadline
  kVmChannelLimit,  // a VM channel over the cap (one per VM, bounded by --qmp / --qmp-dir)
  kCount,           // not a reason
};
inline constexpr size_t kAgentRefusalCount = static_cast<size_t>(AgentRefusal::kCount);
constexpr std::string_view AgentRefusalName(AgentRefusal r) {
  switch (r) {
    case AgentRefusal::kHostLimit: return "host_limit";
    case AgentRefusal::kPeerLimit: return "peer_limit";
    case AgentRefusal::kHelloTimeout: return "hello_timeout";
    case AgentRefusal::kVmChannelLimit: return "vm_channel_limit";
    case AgentRefusal::kCount: break;
  }
  return "unknown";
}

struct AgentChannelSnapshot {
  std::string vm;          // the `vm` label (discovery's VM, or --vhost-user-vm)
  uint32_t connected = 0;  // agents past hello
  std::array<uint64_t, proto::kRejectionCount> rejected{};
  uint64_t dropped = 0;    // connections closed by the guard or a failed send
};

// Why the admin socket turned a client away; the `reason` label of
// vkick_admin_requests_refused_total.
inline constexpr const char* kAdminRefusalNames[] = {"peer_credentials", "busy", "deadline"};

struct LoopSnapshot {
  std::vector<QueueView> queues;  // key order
  std::vector<AgentChannelSnapshot> agents;
  prometheus::ClientMetric loop_duration;  // histogram, seconds
  // Admin socket connections turned away, by why (AdminRefusalName).
  std::array<uint64_t, 3> admin_refused{};
  std::array<uint64_t, kAgentRefusalCount> agent_refused{};  // by AgentRefusal
  uint64_t state_save_errors = 0;          // policy changes not persisted
  uint64_t state_load_errors = 0;          // state files ignored (corrupt) at start
};

}  // namespace vkick
