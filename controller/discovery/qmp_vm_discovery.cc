#include "controller/discovery/qmp_vm_discovery.h"

#include <algorithm>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "controller/discovery/unix_socket_fd.h"
#include "controller/qmp/qmp_parse.h"

namespace vkick {
namespace {

using json = nlohmann::json;

constexpr absl::string_view kPeripheral = "/machine/peripheral/";
constexpr absl::string_view kBackendSuffix = "/virtio-backend";
constexpr int kMaxEventsPerWait = 256;

// A string member of a QMP reply, "" when absent or not a string (the
// lifecycle fields are best effort: unknown rather than a failed refresh).
std::string StringMemberOr(const json& j, const char* key) {
  if (!j.is_object()) return "";
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) return "";
  // Bounded: a state or uuid name is short; a peer's long string is garbage.
  std::string v = it->get<std::string>();
  return v.size() <= 64 ? v : "";
}

std::string Dirname(absl::string_view path) {
  size_t slash = path.rfind('/');
  if (slash == absl::string_view::npos || slash == 0) return "/";
  return std::string(path.substr(0, slash));
}

}  // namespace

bool IsDiscoveryEvent(absl::string_view name) {
  // RESET: firmware re-assigns BARs. DEVICE_DELETED/DEVICE_ADDED (8.x):
  // device set changes. WAKEUP: firmware ran again after S3. RESUME: a VM
  // resumed after migration or `cont` (first BAR assignment follows).
  // STOP, SUSPEND, MIGRATION (with the `events` capability): the run state
  // changed (vm_lifecycle.h), re-read it.
  return name == "RESET" || name == "DEVICE_DELETED" || name == "DEVICE_ADDED" ||
         name == "WAKEUP" || name == "RESUME" || name == "STOP" || name == "SUSPEND" ||
         name == "MIGRATION";
}

absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> QmpVmDiscovery::Connect(std::string path,
                                                                         absl::Duration timeout) {
  QmpClientOptions options;
  options.default_command_timeout = timeout;
  absl::StatusOr<std::unique_ptr<QmpClient>> client = QmpClient::Connect(path, timeout, options);
  if (!client.ok()) return client.status();
  return std::unique_ptr<QmpVmDiscovery>(new QmpVmDiscovery(std::move(path), std::move(*client)));
}

absl::StatusOr<std::optional<json>> QmpVmDiscovery::TryQomGet(const std::string& path,
                                                              const std::string& property) {
  absl::StatusOr<json> r = client_->Execute("qom-get", {{"path", path}, {"property", property}});
  if (r.ok()) return std::optional<json>(std::move(*r));
  if (QmpErrorClass(r.status()).has_value()) return std::optional<json>();
  return r.status();
}

absl::StatusOr<uint16_t> QmpVmDiscovery::LoadNumQueues(const std::string& qom_path) {
  // virtio-blk-pci aliases num-queues on the proxy; other types keep it on
  // the backend; devices without the property (virtio-net...) report their
  // queue count in x-query-virtio-status.
  for (const std::string& p : {qom_path, qom_path + std::string(kBackendSuffix)}) {
    absl::StatusOr<std::optional<json>> v = TryQomGet(p, "num-queues");
    if (!v.ok()) return v.status();
    if (v->has_value()) {
      absl::StatusOr<uint64_t> n = ParseQomUint(**v, kVirtioQueueMax);
      if (!n.ok()) return n.status();
      return static_cast<uint16_t>(*n);
    }
  }
  absl::StatusOr<json> st = client_->Execute(
      "x-query-virtio-status", {{"path", qom_path + std::string(kBackendSuffix)}});
  if (st.ok()) return ParseVirtioStatusNumVqs(*st);
  if (QmpErrorClass(st.status()).has_value()) return uint16_t{0};  // unknown
  return st.status();
}

absl::StatusOr<std::string> QmpVmDiscovery::ResolveSocketPath(const std::string& chardev,
                                                              const json* chardevs) {
  if (chardevs != nullptr) {
    absl::StatusOr<std::vector<ChardevInfo>> list = ParseQueryChardev(*chardevs);
    if (!list.ok()) return list.status();
    for (const ChardevInfo& c : *list) {
      if (c.label != chardev) continue;
      std::string p = UnixPathFromChardevFilename(c.filename);
      if (!p.empty()) return p;
    }
  }
  // A connected client chardev prints as "unix:" (QEMU formats the local,
  // unbound address); its "addr" property has the path it connected to.
  absl::StatusOr<std::optional<json>> addr = TryQomGet("/chardevs/" + chardev, "addr");
  if (!addr.ok()) return addr.status();
  if (!addr->has_value()) return std::string();
  return ParseSocketAddressPath(**addr);
}

absl::StatusOr<QmpVmDiscovery::StaticProps> QmpVmDiscovery::LoadStaticProps(
    const std::string& qom_path, std::optional<json>& chardevs) {
  StaticProps sp;
  absl::StatusOr<std::optional<json>> type = TryQomGet(qom_path, "type");
  if (!type.ok()) return type.status();
  if (type->has_value()) {
    absl::StatusOr<std::string> t = ParseQomString(**type);
    if (!t.ok()) return t.status();
    sp.type = std::move(*t);
  }
  struct BoolProp {
    const char* name;
    std::optional<bool>* field;
  };
  for (BoolProp b : {BoolProp{"disable-legacy", &sp.props.disable_legacy},
                     BoolProp{"disable-modern", &sp.props.disable_modern},
                     BoolProp{"page-per-vq", &sp.props.page_per_vq},
                     BoolProp{"modern-pio-notify", &sp.props.modern_pio_notify}}) {
    absl::StatusOr<std::optional<json>> v = TryQomGet(qom_path, b.name);
    if (!v.ok()) return v.status();
    if (!v->has_value()) continue;
    absl::StatusOr<std::optional<bool>> parsed = ParseQomBool(**v);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(qom_path, " ", b.name, ": ", parsed.status().message()));
    }
    *b.field = *parsed;
  }
  absl::StatusOr<uint16_t> nq = LoadNumQueues(qom_path);
  if (!nq.ok()) return nq.status();
  sp.props.num_queues = *nq;
  if (absl::StartsWith(sp.type, "vhost-user-")) {
    absl::StatusOr<std::optional<json>> cd = TryQomGet(qom_path, "chardev");
    if (!cd.ok()) return cd.status();
    if (cd->has_value()) {
      absl::StatusOr<std::string> name = ParseQomString(**cd);
      if (!name.ok()) return name.status();
      sp.chardev = std::move(*name);
      if (!sp.chardev.empty()) {
        if (!chardevs.has_value()) {  // one query-chardev per refresh, only if needed
          absl::StatusOr<json> list = client_->Execute("query-chardev");
          if (!list.ok()) return list.status();
          chardevs = std::move(*list);
        }
        absl::StatusOr<std::string> sock = ResolveSocketPath(sp.chardev, &*chardevs);
        if (!sock.ok()) return sock.status();
        sp.socket_path = std::move(*sock);
      }
    }
  }
  return sp;
}

absl::StatusOr<uint16_t> QmpVmDiscovery::DeviceIdFor(const std::string& label) {
  auto it = device_ids_.find(label);
  if (it != device_ids_.end()) return it->second;
  if (next_device_id_ >= kUnknownDevice) {
    return absl::ResourceExhaustedError("VM has used up its device ids");
  }
  uint16_t id = next_device_id_++;
  device_ids_.emplace(label, id);
  return id;
}

absl::StatusOr<VmInfo> QmpVmDiscovery::Refresh() {
  VmInfo info;
  info.qmp_path = path_;
  info.pid = static_cast<uint32_t>(client_->peer_pid());

  // One round trip: the name (fixed for the process, asked once per
  // connection), the vCPUs and the PCI tree, pipelined.
  // The run state and the uuid ride along (lifecycle: vm_lifecycle.h).
  std::vector<QmpCommand> ask = {{"query-cpus-fast"}, {"query-pci"}, {"query-status"},
                                 {"query-migrate"}};
  const size_t name_at = ask.size();
  if (!name_) ask.push_back({"query-name"});
  const size_t uuid_at = ask.size();
  if (!uuid_) ask.push_back({"query-uuid"});
  std::vector<absl::StatusOr<json>> replies = client_->ExecuteAll(ask);
  for (size_t i = 0; i < replies.size(); ++i) {
    // QEMU refusing a lifecycle query (a peer that does not implement it)
    // leaves that part unknown; anything else fails the refresh.
    const bool lifecycle = i == 2 || i == 3 || i == uuid_at;
    if (!replies[i].ok() && !(lifecycle && QmpErrorClass(replies[i].status()).has_value())) {
      return replies[i].status();
    }
  }
  if (!name_) {
    absl::StatusOr<std::string> parsed_name = ParseQueryName(*replies[name_at]);
    if (!parsed_name.ok()) return parsed_name.status();
    name_ = parsed_name->empty() ? absl::StrCat("pid", info.pid) : *parsed_name;
  }
  info.name = *name_;
  if (!uuid_) {
    uuid_ = replies[uuid_at].ok() ? StringMemberOr(*replies[uuid_at], "UUID") : std::string();
  }
  info.uuid = *uuid_;
  info.run_state = RunStateFrom(
      replies[2].ok() ? StringMemberOr(*replies[2], "status") : std::string(),
      replies[3].ok() ? StringMemberOr(*replies[3], "status") : std::string());

  absl::StatusOr<std::vector<uint32_t>> tids = ParseQueryCpusFast(*replies[0]);
  if (!tids.ok()) return tids.status();
  info.vcpu_tids = std::move(*tids);

  absl::StatusOr<std::vector<PciDevice>> pci = ParseQueryPci(*replies[1]);
  if (!pci.ok()) return pci.status();

  bool any_virtio = false;
  bool any_anonymous = false;
  for (const PciDevice& d : *pci) {
    if (d.vendor_id != kVirtioPciVendor) continue;
    any_virtio = true;
    any_anonymous |= d.qdev_id.empty();
  }
  if (!any_virtio) {
    props_cache_.clear();
    return info;
  }

  // Anonymous proxies (no id=) have no path derivable from query-pci: take
  // them from x-query-virtio and match by PCI bus and devfn.
  std::vector<std::string> anon_paths;
  if (any_anonymous) {
    absl::StatusOr<json> xv = client_->Execute("x-query-virtio");
    if (xv.ok()) {
      absl::StatusOr<std::vector<VirtioPath>> paths = ParseXQueryVirtio(*xv);
      if (!paths.ok()) return paths.status();
      for (const VirtioPath& p : *paths) {
        absl::string_view proxy = p.path;
        if (!absl::ConsumeSuffix(&proxy, kBackendSuffix)) continue;
        if (absl::StartsWith(proxy, kPeripheral)) continue;
        anon_paths.emplace_back(proxy);
      }
    } else if (!QmpErrorClass(xv.status()).has_value()) {
      return xv.status();
    }
    for (const std::string& p : anon_paths) {
      if (anon_cache_.contains(p)) continue;
      AnonProxy a;
      absl::StatusOr<std::optional<json>> addr = TryQomGet(p, "addr");
      if (!addr.ok()) return addr.status();
      if (addr->has_value()) {
        absl::StatusOr<int64_t> devfn = ParseQomInt(**addr);
        if (!devfn.ok()) return devfn.status();
        a.devfn = static_cast<int>(*devfn);
      }
      absl::StatusOr<std::optional<json>> bus = TryQomGet(p, "parent_bus");
      if (!bus.ok()) return bus.status();
      if (bus->has_value()) {
        absl::StatusOr<std::string> b = ParseQomString(**bus);
        if (!b.ok()) return b.status();
        a.parent_bus = std::move(*b);
      }
      anon_cache_[p] = std::move(a);
    }
  }
  // The PCI bus number of a QOM bus path: a bridge's secondary bus (bridge
  // found by its qdev id), else the root bus 0; -1 when unknown.
  auto bus_number = [&](const std::string& bus_path) -> int {
    std::string owner = Dirname(bus_path);
    absl::string_view id = owner;
    if (!absl::ConsumePrefix(&id, kPeripheral)) {
      return absl::StartsWith(owner, "/machine/peripheral-anon/") ? -1 : 0;
    }
    for (const PciDevice& d : *pci) {
      if (d.qdev_id == id && d.secondary_bus.has_value()) return *d.secondary_bus;
    }
    return -1;
  };

  std::optional<json> chardevs;  // fetched once, only if a vhost-user device needs it
  std::set<std::string> present;
  for (const PciDevice& d : *pci) {
    if (d.vendor_id != kVirtioPciVendor) continue;
    VirtioDeviceInfo dev;
    dev.pci_address = d.Address();
    dev.label = d.qdev_id.empty() ? dev.pci_address : d.qdev_id;
    if (!d.qdev_id.empty()) {
      dev.qom_path = absl::StrCat(kPeripheral, d.qdev_id);
    } else {
      const int devfn = d.slot << 3 | d.function;
      std::vector<std::string> matches;
      for (const std::string& p : anon_paths) {
        const AnonProxy& a = anon_cache_[p];
        if (a.devfn == devfn && bus_number(a.parent_bus) == d.bus) matches.push_back(p);
      }
      if (matches.size() == 1) dev.qom_path = matches[0];
    }
    absl::StatusOr<uint16_t> id = DeviceIdFor(dev.label);
    if (!id.ok()) return id.status();
    dev.device_id = *id;

    VirtioPciProps props;
    if (!dev.qom_path.empty()) {
      present.insert(dev.qom_path);
      auto cached = props_cache_.find(dev.qom_path);
      if (cached == props_cache_.end()) {
        absl::StatusOr<StaticProps> loaded = LoadStaticProps(dev.qom_path, chardevs);
        if (!loaded.ok()) return loaded.status();
        cached = props_cache_.emplace(dev.qom_path, std::move(*loaded)).first;
      }
      const StaticProps& sp = cached->second;
      dev.type = sp.type;
      props = sp.props;
      dev.chardev = sp.chardev;
      dev.socket_path = sp.socket_path;
      dev.vhost_user = absl::StartsWith(sp.type, "vhost-user-");
    }
    dev.num_queues = props.num_queues;
    if (dev.vhost_user && !dev.socket_path.empty() && info.pid != 0) {
      // Best effort: the connection may be down (reconnecting backend) or
      // /proc unreadable; the device is still reported, without the fd.
      absl::StatusOr<int> fd = FindUnixSocketFd(static_cast<pid_t>(info.pid), dev.socket_path);
      if (fd.ok()) dev.socket_fd = *fd;
    }
    absl::StatusOr<VirtioPciLayout> layout = ComputeVirtioPciLayout(d, props, dev.device_id);
    if (!layout.ok()) return layout.status();
    dev.legacy = layout->legacy;
    dev.modern = layout->modern;
    dev.notify_targets = std::move(layout->targets);
    info.devices.push_back(std::move(dev));
  }
  // Forget devices that went away, so a new device at the same path is
  // asked afresh.
  std::erase_if(props_cache_, [&](const auto& kv) { return !present.contains(kv.first); });
  std::erase_if(anon_cache_, [&](const auto& kv) {
    return std::find(anon_paths.begin(), anon_paths.end(), kv.first) == anon_paths.end();
  });
  if (absl::Status s = LoadKvm(info); !s.ok()) return s;
  return info;
}

absl::Status QmpVmDiscovery::LoadKvm(VmInfo& info) {
  const bool vhost_user = std::any_of(info.devices.begin(), info.devices.end(),
                                      [](const VirtioDeviceInfo& d) { return d.vhost_user; });
  if (!vhost_user) return absl::OkStatus();
  if (!kvm_asked_) {
    absl::StatusOr<json> r = client_->Execute("query-kvm");
    if (!r.ok() && !QmpErrorClass(r.status()).has_value()) return r.status();  // transport
    // An error reply leaves it unknown: the probes then count the device
    // the way that works under either accelerator.
    if (r.ok() && r->is_object() && r->contains("enabled") && (*r)["enabled"].is_boolean()) {
      kvm_ = (*r)["enabled"].get<bool>();
    }
    kvm_asked_ = true;
  }
  info.kvm = kvm_;
  return absl::OkStatus();
}

absl::StatusOr<bool> QmpVmDiscovery::WaitForEvent(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  // Bounded, so a VM flooding events cannot hold the caller; the rest stays
  // readable for the next call.
  for (int i = 0; i < kMaxEventsPerWait; ++i) {
    absl::StatusOr<std::optional<QmpEvent>> ev =
        client_->WaitForEvent(std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!ev.ok()) return ev.status();
    if (!ev->has_value()) return false;
    const std::string& name = (*ev)->name;
    if (name == "SHUTDOWN") {
      // QEMU exits after a SHUTDOWN unless it runs with -no-shutdown; then
      // it stays, in run state "shutdown", the same VM. A host's quit or
      // signal ends it for certain: gone now, not at the socket's close.
      const std::string why = (*ev)->data.is_object() ? StringMemberOr((*ev)->data, "reason") : "";
      if (why == "host-qmp-quit" || why == "host-signal") {
        return absl::UnavailableError(absl::StrCat("QMP ", path_, ": VM shut down (", why, ")"));
      }
      return true;
    }
    if (name == "DEVICE_DELETED") {
      // A device re-added under the same id may differ: ask again.
      props_cache_.clear();
      anon_cache_.clear();
    }
    if (IsDiscoveryEvent(name)) return true;
  }
  return false;
}

}  // namespace vkick
