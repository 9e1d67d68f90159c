// The real parts vkickd runs with: the eBPF host probes, QMP discovery and
// the exit-reason names. Kept out of main.cc so main stays flags + lifetime,
// and out of the daemon core so its tests link fakes only.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "controller/daemon/agent_port.h"
#include "controller/daemon/daemon.h"
#include "controller/probes/probe_backend.h"
#include "exporters/vkick_collector.h"

namespace vkick {

// Loads and attaches the host probes (needs CAP_BPF + CAP_PERFMON, tracefs).
// The host probes; `vhost_user_kicks` also attaches the syscall tracepoints
// that count kicks made by write() (--vhost_user_kicks: a cost on every
// syscall of the host while attached).
absl::StatusOr<std::unique_ptr<ProbeBackend>> CreateHostProbes(bool vhost_user_kicks);

// Connects to a QEMU QMP socket; every QMP exchange bounded by `timeout`.
// With `agent_ports`, each VM's virtio-serial agent port is looked up too
// (agent_port.h).
DiscoveryFactory QmpDiscoveryFactory(absl::Duration timeout,
                                     AgentPortRegistry* agent_ports = nullptr);

// The canonical absolute form of a --vhost-user socket path, as a frontend's
// connect() names it: realpath() of the path, or of its directory when the
// socket does not exist yet (the backend may start after vkickd).
absl::StatusOr<std::string> CanonicalSocketPath(const std::string& path);

// Processes connected to unix socket `path` now (sock_diag + /proc/*/fd):
// (pid, fd of that connection). The listening side is not included.
absl::StatusOr<std::vector<std::pair<uint32_t, int32_t>>> FindConnectedFrontends(
    const std::string& path);

// Decodes kvm_exit (isa, reason) into the bounded set of reason names.
ExitReasonNamer ExitReasonNames();

}  // namespace vkick
