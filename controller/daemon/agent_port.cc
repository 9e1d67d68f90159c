#include "controller/daemon/agent_port.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace vkick {

using nlohmann::json;

std::string AgentChardevPath(absl::string_view filename) {
  absl::ConsumePrefix(&filename, "disconnected:");
  if (!absl::ConsumePrefix(&filename, "unix:")) return "";
  size_t comma = filename.find(',');
  if (comma != absl::string_view::npos) filename = filename.substr(0, comma);
  return std::string(filename);
}

absl::StatusOr<std::string> FindAgentPortSocket(const QmpExec& exec,
                                                absl::string_view port_name) {
  std::string chardev;
  for (const char* container : {"/machine/peripheral", "/machine/peripheral-anon"}) {
    absl::StatusOr<json> list = exec("qom-list", json{{"path", container}});
    if (!list.ok()) return list.status();
    if (!list->is_array()) return absl::DataLossError("qom-list: not an array");
    for (const json& e : *list) {
      if (!e.is_object() || !e.contains("name") || !e.contains("type") ||
          !e["name"].is_string() || !e["type"].is_string() ||
          e["type"].get<std::string>() != "child<virtserialport>")
        continue;
      std::string path = absl::StrCat(container, "/", e["name"].get<std::string>());
      absl::StatusOr<json> name = exec("qom-get", json{{"path", path}, {"property", "name"}});
      if (!name.ok() || !name->is_string() || name->get<std::string>() != port_name) continue;
      absl::StatusOr<json> cd = exec("qom-get", json{{"path", path}, {"property", "chardev"}});
      if (!cd.ok()) return cd.status();
      if (!cd->is_string()) return absl::DataLossError("virtserialport chardev: not a string");
      chardev = cd->get<std::string>();
      break;
    }
    if (!chardev.empty()) break;
  }
  if (chardev.empty())
    return absl::NotFoundError(absl::StrCat("no virtserialport named ", port_name));
  absl::StatusOr<json> chardevs = exec("query-chardev", json::object());
  if (!chardevs.ok()) return chardevs.status();
  if (!chardevs->is_array()) return absl::DataLossError("query-chardev: not an array");
  for (const json& c : *chardevs) {
    if (!c.is_object() || c.value("label", "") != chardev) continue;
    std::string path = AgentChardevPath(c.value("filename", ""));
    if (path.empty())
      return absl::FailedPreconditionError(
          absl::StrCat("agent chardev ", chardev, " is not a unix socket server"));
    return path;
  }
  return absl::NotFoundError(absl::StrCat("chardev ", chardev, " not in query-chardev"));
}

absl::StatusOr<VmInfo> AgentPortDiscovery::Refresh() {
  absl::StatusOr<VmInfo> info = inner_->Refresh();
  if (!info.ok()) return info;
  // The port is configuration: looked for once per QEMU process and device
  // set, so a fleet of VMs without one costs no QMP traffic per refresh.
  std::string devices = absl::StrCat(info->pid);
  for (const VirtioDeviceInfo& d : info->devices) absl::StrAppend(&devices, " ", d.qom_path);
  if (devices != looked_for_) {
    // Best effort: a VM without the port (or a QMP hiccup here) still has
    // its probes and metrics. A transport error is looked at again.
    absl::StatusOr<std::string> p = FindAgentPortSocket(exec_, kAgentPortName);
    looked_for_ = p.ok() || absl::IsNotFound(p.status()) ? devices : "";
    registry_->Set(qmp_path_, p.ok() ? *p : "");
  }
  return info;
}

}  // namespace vkick
