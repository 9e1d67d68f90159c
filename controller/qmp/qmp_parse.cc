#include "controller/qmp/qmp_parse.h"

#include <limits>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace vkick {
namespace {

using json = nlohmann::json;

constexpr absl::string_view kErrorClassPayload = "vkick.qmp/error-class";

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("unexpected QMP reply: ", what));
}

// nlohmann's parser recurses per nesting level; a hostile "[[[[..." of a few
// MiB would exhaust the stack. Bound the depth before parsing.
bool DepthWithin(absl::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) return false;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return true;
}

const json* Member(const json& obj, absl::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(std::string(key));
  return it == obj.end() ? nullptr : &*it;
}

absl::StatusOr<const json*> Required(const json& obj, absl::string_view key,
                                     absl::string_view where) {
  const json* m = Member(obj, key);
  if (m == nullptr) return Bad(absl::StrCat(where, ": missing \"", key, "\""));
  return m;
}

// Integers: QEMU emits int64 or uint64; never accept floats or strings.
absl::StatusOr<int64_t> ToInt(const json& v, absl::string_view where) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Bad(absl::StrCat(where, ": integer out of range"));
    }
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  return Bad(absl::StrCat(where, ": expected an integer, got ", v.type_name()));
}

absl::StatusOr<int64_t> IntMember(const json& obj, absl::string_view key, absl::string_view where,
                                  int64_t min, int64_t max) {
  absl::StatusOr<const json*> m = Required(obj, key, where);
  if (!m.ok()) return m.status();
  absl::StatusOr<int64_t> v = ToInt(**m, absl::StrCat(where, ".", key));
  if (!v.ok()) return v.status();
  if (*v < min || *v > max) {
    return Bad(absl::StrCat(where, ".", key, " = ", *v, " out of range [", min, ", ", max, "]"));
  }
  return *v;
}

absl::StatusOr<std::string> StringMember(const json& obj, absl::string_view key,
                                         absl::string_view where) {
  absl::StatusOr<const json*> m = Required(obj, key, where);
  if (!m.ok()) return m.status();
  if (!(*m)->is_string()) {
    return Bad(absl::StrCat(where, ".", key, ": expected a string, got ", (*m)->type_name()));
  }
  return (*m)->get<std::string>();
}

absl::StatusOr<PciBar> ParseRegion(const json& r, absl::string_view where) {
  if (!r.is_object()) return Bad(absl::StrCat(where, ": region is not an object"));
  PciBar bar;
  absl::StatusOr<int64_t> index = IntMember(r, "bar", where, 0, 6);
  if (!index.ok()) return index.status();
  bar.index = static_cast<int>(*index);
  absl::StatusOr<std::string> type = StringMember(r, "type", where);
  if (!type.ok()) return type.status();
  if (*type == "io") {
    bar.io = true;
  } else if (*type != "memory") {
    return Bad(absl::StrCat(where, ": region type \"", *type, "\""));
  }
  absl::StatusOr<const json*> size = Required(r, "size", where);
  if (!size.ok()) return size.status();
  if (!(*size)->is_number_unsigned() && !(*size)->is_number_integer()) {
    return Bad(absl::StrCat(where, ".size: expected an integer"));
  }
  if ((*size)->is_number_integer() && !(*size)->is_number_unsigned() &&
      (*size)->get<int64_t>() < 0) {
    return Bad(absl::StrCat(where, ".size is negative"));
  }
  bar.size = (*size)->get<uint64_t>();
  // QEMU's pci_bar_address() yields PCI_BAR_UNMAPPED (all ones), which the
  // QAPI int64 "address" prints as -1. A missing address is also unmapped.
  const json* addr = Member(r, "address");
  if (addr != nullptr) {
    if (addr->is_number_unsigned()) {
      uint64_t a = addr->get<uint64_t>();
      bar.address = a;
      bar.assigned = a != 0 && a != std::numeric_limits<uint64_t>::max();
    } else if (addr->is_number_integer()) {
      int64_t a = addr->get<int64_t>();
      if (a < -1) return Bad(absl::StrCat(where, ".address = ", a));
      bar.address = a < 0 ? 0 : static_cast<uint64_t>(a);
      bar.assigned = a > 0;
    } else {
      return Bad(absl::StrCat(where, ".address: expected an integer, got ", addr->type_name()));
    }
  }
  if (!bar.assigned) bar.address = 0;
  return bar;
}

absl::Status ParsePciBus(const json& devices, int depth, std::vector<PciDevice>& out) {
  if (depth > 16) return Bad("query-pci: bridges nested deeper than 16");
  if (!devices.is_array()) return Bad("query-pci: \"devices\" is not an array");
  for (const json& d : devices) {
    if (!d.is_object()) return Bad("query-pci: device is not an object");
    if (out.size() >= kMaxPciDevices) {
      return Bad(absl::StrCat("query-pci: more than ", kMaxPciDevices, " devices"));
    }
    PciDevice dev;
    absl::StatusOr<int64_t> bus = IntMember(d, "bus", "query-pci device", 0, 255);
    if (!bus.ok()) return bus.status();
    absl::StatusOr<int64_t> slot = IntMember(d, "slot", "query-pci device", 0, 31);
    if (!slot.ok()) return slot.status();
    absl::StatusOr<int64_t> fn = IntMember(d, "function", "query-pci device", 0, 7);
    if (!fn.ok()) return fn.status();
    dev.bus = static_cast<int>(*bus);
    dev.slot = static_cast<int>(*slot);
    dev.function = static_cast<int>(*fn);
    std::string where = absl::StrCat("query-pci device ", dev.Address());
    absl::StatusOr<const json*> id = Required(d, "id", where);
    if (!id.ok()) return id.status();
    absl::StatusOr<int64_t> vendor = IntMember(**id, "vendor", where, 0, 0xffff);
    if (!vendor.ok()) return vendor.status();
    absl::StatusOr<int64_t> device = IntMember(**id, "device", where, 0, 0xffff);
    if (!device.ok()) return device.status();
    dev.vendor_id = static_cast<uint16_t>(*vendor);
    dev.device_id = static_cast<uint16_t>(*device);
    absl::StatusOr<std::string> qdev_id = StringMember(d, "qdev_id", where);
    if (!qdev_id.ok()) return qdev_id.status();
    dev.qdev_id = std::move(*qdev_id);
    absl::StatusOr<const json*> regions = Required(d, "regions", where);
    if (!regions.ok()) return regions.status();
    if (!(*regions)->is_array()) return Bad(absl::StrCat(where, ": regions is not an array"));
    for (const json& r : **regions) {
      absl::StatusOr<PciBar> bar = ParseRegion(r, where);
      if (!bar.ok()) return bar.status();
      dev.bars.push_back(*bar);
    }
    const json* bridge = Member(d, "pci_bridge");
    const json* child_devices = nullptr;
    if (bridge != nullptr) {
      absl::StatusOr<const json*> bbus = Required(*bridge, "bus", where + " pci_bridge");
      if (!bbus.ok()) return bbus.status();
      absl::StatusOr<int64_t> secondary =
          IntMember(**bbus, "secondary", where + " pci_bridge.bus", 0, 255);
      if (!secondary.ok()) return secondary.status();
      dev.secondary_bus = static_cast<int>(*secondary);
      // QEMU lists the devices behind a bridge only once the firmware has
      // given it a secondary bus number.
      child_devices = Member(*bridge, "devices");
    }
    out.push_back(std::move(dev));
    if (child_devices != nullptr) {
      absl::Status st = ParsePciBus(*child_devices, depth + 1, out);
      if (!st.ok()) return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<json> ParseQmpMessage(absl::string_view text, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return absl::DataLossError(
        absl::StrCat("QMP message of ", text.size(), " bytes exceeds the limit of ", max_bytes));
  }
  if (!DepthWithin(text, kMaxQmpJsonDepth)) {
    return absl::DataLossError(
        absl::StrCat("QMP message nested deeper than ", kMaxQmpJsonDepth, " levels"));
  }
  json msg = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (msg.is_discarded()) {
    return absl::DataLossError(absl::StrCat("QMP message is not valid JSON: \"",
                                            text.substr(0, 80), text.size() > 80 ? "..." : "",
                                            "\""));
  }
  if (!msg.is_object()) {
    return absl::DataLossError(
        absl::StrCat("QMP message is a JSON ", msg.type_name(), ", not an object"));
  }
  return msg;
}

absl::StatusOr<QmpGreeting> ParseGreeting(const json& msg) {
  const json* qmp = Member(msg, "QMP");
  if (qmp == nullptr || !qmp->is_object()) return Bad("greeting without a \"QMP\" object");
  absl::StatusOr<const json*> version = Required(*qmp, "version", "greeting");
  if (!version.ok()) return version.status();
  absl::StatusOr<const json*> qemu = Required(**version, "qemu", "greeting.version");
  if (!qemu.ok()) return qemu.status();
  QmpGreeting g;
  for (auto [key, field] : {std::pair{"major", &g.major}, std::pair{"minor", &g.minor},
                            std::pair{"micro", &g.micro}}) {
    absl::StatusOr<int64_t> v = IntMember(**qemu, key, "greeting.version.qemu", 0, 1 << 20);
    if (!v.ok()) return v.status();
    *field = static_cast<int>(*v);
  }
  if (const json* pkg = Member(**version, "package"); pkg != nullptr && pkg->is_string()) {
    g.package = pkg->get<std::string>();
  }
  absl::StatusOr<const json*> caps = Required(*qmp, "capabilities", "greeting");
  if (!caps.ok()) return caps.status();
  if (!(*caps)->is_array()) return Bad("greeting.capabilities is not an array");
  for (const json& c : **caps) {
    if (!c.is_string()) return Bad("greeting.capabilities holds a non-string");
    g.capabilities.push_back(c.get<std::string>());
  }
  return g;
}

absl::StatusOr<QmpMessageKind> ClassifyQmpMessage(const json& msg) {
  if (Member(msg, "return") != nullptr) return QmpMessageKind::kReturn;
  if (Member(msg, "error") != nullptr) return QmpMessageKind::kError;
  if (Member(msg, "event") != nullptr) return QmpMessageKind::kEvent;
  if (Member(msg, "QMP") != nullptr) return QmpMessageKind::kGreeting;
  return Bad("message is neither a reply, an event nor a greeting");
}

absl::StatusOr<QmpEvent> ParseEvent(const json& msg) {
  absl::StatusOr<std::string> name = StringMember(msg, "event", "event");
  if (!name.ok()) return name.status();
  QmpEvent ev;
  ev.name = std::move(*name);
  if (const json* data = Member(msg, "data"); data != nullptr) ev.data = *data;
  if (const json* ts = Member(msg, "timestamp"); ts != nullptr && ts->is_object()) {
    const json* s = Member(*ts, "seconds");
    const json* us = Member(*ts, "microseconds");
    if (s != nullptr && us != nullptr && s->is_number_integer() && us->is_number_integer()) {
      ev.timestamp = absl::FromUnixSeconds(s->get<int64_t>()) +
                     absl::Microseconds(us->get<int64_t>());
    }
  }
  return ev;
}

absl::Status QmpErrorToStatus(const json& error_member, absl::string_view command) {
  std::string cls = "GenericError";
  std::string desc = "(no description)";
  if (const json* c = Member(error_member, "class"); c != nullptr && c->is_string()) {
    cls = c->get<std::string>();
  }
  if (const json* d = Member(error_member, "desc"); d != nullptr && d->is_string()) {
    desc = d->get<std::string>();
  }
  std::string msg = absl::StrCat("QMP ", command, " failed: ", cls, ": ", desc);
  absl::Status st;
  if (cls == "DeviceNotFound") {
    st = absl::NotFoundError(msg);
  } else if (cls == "CommandNotFound") {
    st = absl::UnimplementedError(msg);
  } else {
    st = absl::FailedPreconditionError(msg);
  }
  st.SetPayload(kErrorClassPayload, absl::Cord(cls));
  return st;
}

std::optional<std::string> QmpErrorClass(const absl::Status& status) {
  auto p = status.GetPayload(kErrorClassPayload);
  if (!p.has_value()) return std::nullopt;
  return std::string(*p);
}

absl::StatusOr<std::string> ParseQueryName(const json& ret) {
  if (!ret.is_object()) return Bad("query-name: not an object");
  const json* name = Member(ret, "name");
  if (name == nullptr) return std::string();
  if (!name->is_string()) return Bad("query-name: name is not a string");
  return name->get<std::string>();
}

absl::StatusOr<std::vector<uint32_t>> ParseQueryCpusFast(const json& ret) {
  if (!ret.is_array()) return Bad("query-cpus-fast: not an array");
  // KVM caps vCPUs at a few thousand; bound what a peer can make us allocate.
  constexpr int64_t kMaxCpus = 8192;
  std::vector<uint32_t> tids;
  std::vector<bool> seen;
  for (const json& cpu : ret) {
    absl::StatusOr<int64_t> index = IntMember(cpu, "cpu-index", "query-cpus-fast", 0, kMaxCpus - 1);
    if (!index.ok()) return index.status();
    absl::StatusOr<int64_t> tid =
        IntMember(cpu, "thread-id", "query-cpus-fast", 0, std::numeric_limits<int32_t>::max());
    if (!tid.ok()) return tid.status();
    size_t i = static_cast<size_t>(*index);
    if (i >= tids.size()) {
      tids.resize(i + 1, 0);
      seen.resize(i + 1, false);
    }
    if (seen[i]) return Bad(absl::StrCat("query-cpus-fast: cpu-index ", i, " twice"));
    seen[i] = true;
    tids[i] = static_cast<uint32_t>(*tid);
  }
  return tids;
}

std::string PciDevice::Address() const {
  return absl::StrFormat("0000:%02x:%02x.%x", bus, slot, function);
}

const PciBar* PciDevice::FindBar(int index) const {
  for (const PciBar& b : bars) {
    if (b.index == index) return &b;
  }
  return nullptr;
}

absl::StatusOr<std::vector<PciDevice>> ParseQueryPci(const json& ret) {
  if (!ret.is_array()) return Bad("query-pci: not an array");
  std::vector<PciDevice> out;
  for (const json& bus : ret) {
    if (!bus.is_object()) return Bad("query-pci: bus is not an object");
    absl::StatusOr<const json*> devices = Required(bus, "devices", "query-pci bus");
    if (!devices.ok()) return devices.status();
    absl::Status st = ParsePciBus(**devices, 0, out);
    if (!st.ok()) return st;
  }
  return out;
}

absl::StatusOr<std::vector<ChardevInfo>> ParseQueryChardev(const json& ret) {
  if (!ret.is_array()) return Bad("query-chardev: not an array");
  std::vector<ChardevInfo> out;
  for (const json& c : ret) {
    ChardevInfo info;
    absl::StatusOr<std::string> label = StringMember(c, "label", "query-chardev");
    if (!label.ok()) return label.status();
    absl::StatusOr<std::string> filename = StringMember(c, "filename", "query-chardev");
    if (!filename.ok()) return filename.status();
    info.label = std::move(*label);
    info.filename = std::move(*filename);
    if (const json* fo = Member(c, "frontend-open"); fo != nullptr) {
      if (!fo->is_boolean()) return Bad("query-chardev: frontend-open is not a bool");
      info.frontend_open = fo->get<bool>();
    }
    out.push_back(std::move(info));
  }
  return out;
}

std::string UnixPathFromChardevFilename(absl::string_view filename) {
  if (!absl::StartsWith(filename, "unix:")) return "";
  absl::string_view rest = filename.substr(5);
  // Options follow the path after a comma (",server=on"). A path with a comma
  // in it is ambiguous here; callers fall back to the chardev's addr property.
  size_t comma = rest.find(',');
  if (comma != absl::string_view::npos) rest = rest.substr(0, comma);
  return std::string(rest);
}

absl::StatusOr<std::vector<VirtioPath>> ParseXQueryVirtio(const json& ret) {
  if (!ret.is_array()) return Bad("x-query-virtio: not an array");
  std::vector<VirtioPath> out;
  for (const json& v : ret) {
    absl::StatusOr<std::string> name = StringMember(v, "name", "x-query-virtio");
    if (!name.ok()) return name.status();
    absl::StatusOr<std::string> path = StringMember(v, "path", "x-query-virtio");
    if (!path.ok()) return path.status();
    out.push_back({std::move(*name), std::move(*path)});
  }
  return out;
}

absl::StatusOr<uint16_t> ParseVirtioStatusNumVqs(const json& ret) {
  // VIRTIO_QUEUE_MAX is 1024 in QEMU 7.2.
  absl::StatusOr<int64_t> n = IntMember(ret, "num-vqs", "x-query-virtio-status", 0, 1024);
  if (!n.ok()) return n.status();
  return static_cast<uint16_t>(*n);
}

absl::StatusOr<std::optional<bool>> ParseQomBool(const json& ret) {
  if (ret.is_boolean()) return std::optional<bool>(ret.get<bool>());
  if (ret.is_string()) {
    const std::string& s = ret.get_ref<const std::string&>();
    if (s == "on") return std::optional<bool>(true);
    if (s == "off") return std::optional<bool>(false);
    if (s == "auto") return std::optional<bool>();
    return Bad(absl::StrCat("qom-get: \"", s, "\" is not on/off/auto"));
  }
  return Bad(absl::StrCat("qom-get: expected a bool, got ", ret.type_name()));
}

absl::StatusOr<uint64_t> ParseQomUint(const json& ret, uint64_t max) {
  if (!ret.is_number_unsigned() && !(ret.is_number_integer() && ret.get<int64_t>() >= 0)) {
    return Bad(absl::StrCat("qom-get: expected an unsigned integer, got ", ret.dump().substr(0, 40)));
  }
  uint64_t v = ret.get<uint64_t>();
  if (v > max) return Bad(absl::StrCat("qom-get: ", v, " exceeds ", max));
  return v;
}

absl::StatusOr<int64_t> ParseQomInt(const json& ret) { return ToInt(ret, "qom-get"); }

absl::StatusOr<std::string> ParseQomString(const json& ret) {
  if (!ret.is_string()) return Bad(absl::StrCat("qom-get: expected a string, got ", ret.type_name()));
  return ret.get<std::string>();
}

absl::StatusOr<std::string> ParseSocketAddressPath(const json& ret) {
  absl::StatusOr<std::string> type = StringMember(ret, "type", "chardev addr");
  if (!type.ok()) return type.status();
  if (*type != "unix") return std::string();
  if (const json* abstract = Member(ret, "abstract"); abstract != nullptr &&
                                                       abstract->is_boolean() &&
                                                       abstract->get<bool>()) {
    return std::string();  // abstract sockets have no filesystem path
  }
  return StringMember(ret, "path", "chardev addr");
}

}  // namespace vkick
