// The VM side of the agent channel: QEMU has
//   -chardev socket,id=vkickagent0,path=P,server=on,wait=off
//   -device virtio-serial-pci -device virtserialport,chardev=vkickagent0,name=org.vkick.agent.0
// and vkickd connects to P as a client (docs/control.md, "The agent
// channel"). AgentPortDiscovery wraps a VM's QMP discovery: after each
// refresh it looks for the virtserialport named org.vkick.agent.0 (qom-list
// of /machine/peripheral and /machine/peripheral-anon, its `name` and
// `chardev` properties, query-chardev for the path) and records the path in
// an AgentPortRegistry keyed by the QMP path, where the loop runner finds it.
// The VM's identity comes from discovery, never from the guest.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "controller/discovery/vm_model.h"
#include "nlohmann/json.hpp"

namespace vkick {

class QmpClient;

inline constexpr char kAgentPortName[] = "org.vkick.agent.0";

class AgentPortRegistry {
 public:
  void Set(const std::string& qmp_path, std::string socket_path) {
    absl::MutexLock l(&mu_);
    if (socket_path.empty()) {
      ports_.erase(qmp_path);
    } else {
      ports_[qmp_path] = std::move(socket_path);
    }
  }
  std::string Get(const std::string& qmp_path) const {
    absl::MutexLock l(&mu_);
    auto it = ports_.find(qmp_path);
    return it == ports_.end() ? "" : it->second;
  }

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> ports_ ABSL_GUARDED_BY(mu_);
};

// "disconnected:unix:/p,server=on" / "unix:/p,server=on" -> "/p" ("" if none).
std::string AgentChardevPath(absl::string_view filename);

// Runs the QMP queries; kNotFound when the VM has no such port.
using QmpExec = std::function<absl::StatusOr<nlohmann::json>(absl::string_view command,
                                                              const nlohmann::json& args)>;
absl::StatusOr<std::string> FindAgentPortSocket(const QmpExec& exec, absl::string_view port_name);

// Decorates a VM's discovery (owned) with the agent port lookup.
class AgentPortDiscovery : public VmDiscovery {
 public:
  AgentPortDiscovery(std::unique_ptr<VmDiscovery> inner, QmpExec exec, std::string qmp_path,
                     AgentPortRegistry* registry)
      : inner_(std::move(inner)),
        exec_(std::move(exec)),
        qmp_path_(std::move(qmp_path)),
        registry_(registry) {}
  absl::StatusOr<VmInfo> Refresh() override;
  absl::StatusOr<bool> WaitForEvent(absl::Duration timeout) override {
    return inner_->WaitForEvent(timeout);
  }
  int event_fd() const override { return inner_->event_fd(); }

 private:
  std::unique_ptr<VmDiscovery> inner_;
  QmpExec exec_;
  std::string qmp_path_;
  AgentPortRegistry* registry_;
  std::string looked_for_;  // the pid and device set the registry's entry is for
};

}  // namespace vkick
