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
#include "controller/discovery/qmp_dir_watcher.h"
#include "controller/probes/host_probes.h"
#include "controller/probes/probe_backend.h"
#include "controller/probes/probe_capacity.h"
#include "exporters/vkick_collector.h"

namespace vkick {

// Loads and attaches the host probes (needs CAP_BPF + CAP_PERFMON, tracefs),
// maps sized for `capacity`, kvm programs of flavour `kvm`. The kick syscall
// group is left detached: the daemon attaches it while something needs it
// (DaemonOptions::kick_syscalls). `*described` says what was loaded, for the
// start-up log.
absl::StatusOr<std::unique_ptr<ProbeBackend>> CreateHostProbes(const ProbeCapacity& capacity,
                                                               KvmTracepoints kvm,
                                                               const std::string& pin_dir,
                                                               std::string* described);

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

// The most sockets --qmp-dir attaches (more are ignored until some go).
inline constexpr size_t kMaxQmpDirSockets = QmpDirWatcher::kDefaultMaxSockets;

// --qmp-dir=DIR: an inotify watcher of DIR as the daemon's path source.
absl::StatusOr<std::shared_ptr<QmpPathSource>> OpenQmpDir(const std::string& dir);

// Decodes kvm_exit (isa, reason) into the bounded set of reason names.
ExitReasonNamer ExitReasonNames();

}  // namespace vkick
