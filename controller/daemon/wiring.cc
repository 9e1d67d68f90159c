// The real parts: HostProbes (libbpf skeleton), QmpVmDiscovery, exit-reason
// names. Compiled into vkickd only (the daemon core's tests use fakes).
#include "controller/daemon/wiring.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>

#include <cstring>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bpf/host_probes.h"
#include "controller/discovery/unix_socket_fd.h"

#include "controller/discovery/qmp_vm_discovery.h"
#include "controller/qmp/qmp_client.h"
#include "controller/probes/exit_reasons.h"
#include "controller/probes/host_probes.h"

namespace vkick {

absl::StatusOr<std::unique_ptr<ProbeBackend>> CreateHostProbes(const ProbeCapacity& capacity,
                                                               KvmTracepoints kvm,
                                                               const std::string& pin_dir,
                                                               std::string* described) {
  HostProbes::Options o;
  o.attach_vhost_user = false;
  o.kvm_tracepoints = kvm;
  o.capacity = capacity;
  o.pin_dir = pin_dir;
  absl::StatusOr<std::unique_ptr<HostProbes>> p = HostProbes::Create(o);
  if (!p.ok()) return p.status();
  *described = absl::StrCat("kvm tracepoints ", (*p)->kvm_flavour(), ", maps for ",
                            DescribeCapacity(capacity), "; ",
                            pin_dir.empty() ? "nothing pinned (--pin-dir=)" : (*p)->pin_state());
  return std::unique_ptr<ProbeBackend>(std::move(*p));
}

namespace {

class QmpDirSource : public QmpPathSource {
 public:
  explicit QmpDirSource(std::unique_ptr<QmpDirWatcher> w) : w_(std::move(w)) {}
  int fd() const override { return w_->fd(); }
  absl::StatusOr<std::vector<Change>> Drain() override {
    absl::StatusOr<std::vector<QmpDirWatcher::Change>> in = w_->Drain();
    if (!in.ok()) return in.status();
    std::vector<Change> out;
    for (QmpDirWatcher::Change& c : *in) {
      out.push_back({c.kind == QmpDirWatcher::Change::kAdded, std::move(c.path)});
    }
    return out;
  }
  std::string Describe() const override { return absl::StrCat("directory ", w_->dir()); }

 private:
  std::unique_ptr<QmpDirWatcher> w_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<QmpPathSource>> OpenQmpDir(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<QmpDirWatcher>> w = QmpDirWatcher::Open(dir, kMaxQmpDirSockets);
  if (!w.ok()) return w.status();
  return std::shared_ptr<QmpPathSource>(std::make_shared<QmpDirSource>(*std::move(w)));
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

absl::StatusOr<std::string> CanonicalSocketPath(const std::string& path) {
  if (path.empty() || path.back() == '/')
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a socket path"));
  std::string out;
  if (char* r = realpath(path.c_str(), nullptr)) {
    out = r;
    free(r);
  } else {
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    char* d = realpath(dir.c_str(), nullptr);
    if (d == nullptr) {
      return absl::NotFoundError(absl::StrCat("cannot resolve the directory of '", path,
                                              "': ", strerror(errno)));
    }
    out = absl::StrCat(d, std::string(d) == "/" ? "" : "/",
                       slash == std::string::npos ? path : path.substr(slash + 1));
    free(d);
  }
  if (out.size() >= VKICK_SUN_PATH_MAX)
    return absl::InvalidArgumentError(absl::StrCat("'", out, "' is longer than ",
                                                   VKICK_SUN_PATH_MAX - 1, " bytes"));
  return out;
}

absl::StatusOr<std::vector<std::pair<uint32_t, int32_t>>> FindConnectedFrontends(
    const std::string& path) {
  absl::StatusOr<std::map<uint32_t, UnixSocketInfo>> sockets = DumpUnixSockets();
  if (!sockets.ok()) return sockets.status();
  // Client ends: a socket (not itself named `path`: that is an accepted
  // server-side end) whose peer is named `path`.
  std::set<uint32_t> clients;
  for (const auto& [inode, info] : *sockets) {
    if (info.peer == 0 || info.name == path) continue;
    auto peer = sockets->find(info.peer);
    if (peer != sockets->end() && peer->second.name == path) clients.insert(inode);
  }
  std::vector<std::pair<uint32_t, int32_t>> out;
  if (clients.empty()) return out;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return absl::ErrnoToStatus(errno, "opendir /proc");
  while (struct dirent* e = readdir(proc)) {
    uint32_t pid;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    absl::StatusOr<std::map<int, uint32_t>> fds = ListSocketFds(static_cast<pid_t>(pid));
    if (!fds.ok()) continue;  // exited meanwhile, or a kernel thread
    for (const auto& [fd, inode] : *fds) {
      if (clients.count(inode)) out.emplace_back(pid, fd);
    }
    if (out.size() >= 64) break;  // bounded; one frontend per socket is the norm
  }
  closedir(proc);
  return out;
}

ExitReasonNamer ExitReasonNames() {
  return [](uint32_t isa, uint32_t reason) { return std::string(ExitReasonName(isa, reason)); };
}

}  // namespace vkick
