// The real parts: HostProbes (libbpf skeleton), QmpVmDiscovery, exit-reason
// names. Compiled into vkickd only (the daemon core's tests use fakes).
#include "controller/daemon/wiring.h"

#include <string>
#include <utility>

#include "controller/discovery/qmp_vm_discovery.h"
#include "controller/qmp/qmp_client.h"
#include "controller/probes/exit_reasons.h"
#include "controller/probes/host_probes.h"

namespace vkick {

absl::StatusOr<std::unique_ptr<ProbeBackend>> CreateHostProbes() {
  absl::StatusOr<std::unique_ptr<HostProbes>> p = HostProbes::Create();
  if (!p.ok()) return p.status();
  return std::unique_ptr<ProbeBackend>(std::move(*p));
}

DiscoveryFactory QmpDiscoveryFactory(absl::Duration timeout, AgentPortRegistry* agent_ports) {
  return [timeout, agent_ports](
             const std::string& path) -> absl::StatusOr<std::unique_ptr<VmDiscovery>> {
    absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> d = QmpVmDiscovery::Connect(path, timeout);
    if (!d.ok()) return d.status();
    if (agent_ports == nullptr) return std::unique_ptr<VmDiscovery>(std::move(*d));
    QmpClient* client = &(*d)->client();  // owned by the discovery we wrap
    QmpExec exec = [client](absl::string_view cmd, const nlohmann::json& args) {
      return args.empty() ? client->Execute(cmd) : client->Execute(cmd, args);
    };
    return std::unique_ptr<VmDiscovery>(
        new AgentPortDiscovery(std::move(*d), std::move(exec), path, agent_ports));
  };
}

ExitReasonNamer ExitReasonNames() {
  return [](uint32_t isa, uint32_t reason) { return std::string(ExitReasonName(isa, reason)); };
}

}  // namespace vkick
