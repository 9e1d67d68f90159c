// The real parts: HostProbes (libbpf skeleton), QmpVmDiscovery, exit-reason
// names. Compiled into vkickd only (the daemon core's tests use fakes).
#include "controller/daemon/wiring.h"

#include <string>
#include <utility>

#include "controller/discovery/qmp_vm_discovery.h"
#include "controller/probes/exit_reasons.h"
#include "controller/probes/host_probes.h"

namespace vkick {

absl::StatusOr<std::unique_ptr<ProbeBackend>> CreateHostProbes() {
  absl::StatusOr<std::unique_ptr<HostProbes>> p = HostProbes::Create();
  if (!p.ok()) return p.status();
  return std::unique_ptr<ProbeBackend>(std::move(*p));
}

DiscoveryFactory QmpDiscoveryFactory(absl::Duration timeout) {
  return [timeout](const std::string& path) -> absl::StatusOr<std::unique_ptr<VmDiscovery>> {
    absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> d = QmpVmDiscovery::Connect(path, timeout);
    if (!d.ok()) return d.status();
    return std::unique_ptr<VmDiscovery>(std::move(*d));
  };
}

ExitReasonNamer ExitReasonNames() {
  return [](uint32_t isa, uint32_t reason) { return std::string(ExitReasonName(isa, reason)); };
}

}  // namespace vkick
