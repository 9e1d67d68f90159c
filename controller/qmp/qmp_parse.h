// Pure QMP parsing: JSON text and QMP replies → validated structs. No
// sockets here, so every function is unit-tested against real QEMU replies
// (tests/unit/qmp/testdata) and against malformed ones.
//
// Error convention (the daemon classifies on it, see vm_model.h):
//   kDataLoss        the bytes are not a QMP message (bad JSON, oversized,
//                    not an object): the stream cannot be trusted any more.
//   kInvalidArgument well-formed JSON whose shape is not what QEMU sends
//                    (missing member, wrong type, out-of-range number).
//   QMP "error" replies become a status carrying the QMP error class as a
//   payload (QmpErrorClass()), so callers can tell "QEMU said no" (e.g. a
//   property that this device type lacks) from a broken transport.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace vkick {

// Largest single QMP message we accept. query-pci of a VM with hundreds of
// devices is tens of KiB; 4 MiB leaves headroom while bounding memory.
inline constexpr size_t kDefaultMaxQmpMessageBytes = 4 << 20;
// JSON nesting bound (pci bridges nest query-pci output).
inline constexpr int kMaxQmpJsonDepth = 64;

// Parses one QMP message (one line of text, without the terminator). It must
// be a JSON object of at most `max_bytes`.
absl::StatusOr<nlohmann::json> ParseQmpMessage(absl::string_view text,
                                               size_t max_bytes = kDefaultMaxQmpMessageBytes);

struct QmpGreeting {
  int major = 0;
  int minor = 0;
  int micro = 0;
  std::string package;
  std::vector<std::string> capabilities;
};
absl::StatusOr<QmpGreeting> ParseGreeting(const nlohmann::json& msg);

struct QmpEvent {
  std::string name;
  nlohmann::json data;  // null when the event has none
  absl::Time timestamp = absl::InfinitePast();
};

enum class QmpMessageKind { kReturn, kError, kEvent, kGreeting };
// What a message is; kInvalidArgument if it is none of those.
absl::StatusOr<QmpMessageKind> ClassifyQmpMessage(const nlohmann::json& msg);
absl::StatusOr<QmpEvent> ParseEvent(const nlohmann::json& msg);

// {"error": {"class": C, "desc": D}} → a non-OK status (never OK): kNotFound
// for DeviceNotFound, kUnimplemented for CommandNotFound, else
// kFailedPrecondition; the class is attached as payload.
absl::Status QmpErrorToStatus(const nlohmann::json& error_member, absl::string_view command);
// The QMP error class if `status` came from a QMP error reply.
std::optional<std::string> QmpErrorClass(const absl::Status& status);

// ---- command replies (the "return" member) ----

// query-name: "" when the VM has no -name.
absl::StatusOr<std::string> ParseQueryName(const nlohmann::json& ret);

// query-cpus-fast: vCPU thread ids, index = cpu-index.
absl::StatusOr<std::vector<uint32_t>> ParseQueryCpusFast(const nlohmann::json& ret);

struct PciBar {
  int index = 0;          // BAR number 0..5 (6 = expansion ROM)
  bool io = false;        // "io" vs "memory"
  uint64_t address = 0;   // meaningful only when assigned
  uint64_t size = 0;
  bool assigned = false;  // QEMU reports -1 until the firmware/guest maps it
};

struct PciDevice {
  int bus = 0;
  int slot = 0;
  int function = 0;
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  std::string qdev_id;  // "" when the device was created without id=
  std::vector<PciBar> bars;
  // For PCI bridges: the secondary bus number (0 until firmware numbers it).
  std::optional<int> secondary_bus;

  std::string Address() const;  // "0000:BB:DD.F"
  const PciBar* FindBar(int index) const;
};

// query-pci, flattened: every device on every bus, recursing through
// bridges (pci_bridge.devices). Bounded: at most kMaxPciDevices.
inline constexpr size_t kMaxPciDevices = 4096;
absl::StatusOr<std::vector<PciDevice>> ParseQueryPci(const nlohmann::json& ret);

struct ChardevInfo {
  std::string label;
  std::string filename;  // "unix:/path,server=on", "pty:/dev/pts/3", ...
  bool frontend_open = false;
};
absl::StatusOr<std::vector<ChardevInfo>> ParseQueryChardev(const nlohmann::json& ret);
// The socket path of a "unix:PATH[,opts]" chardev filename; "" when the
// filename names no path (QEMU prints "unix:" for a connected client socket
// because it formats the local, unbound, address).
std::string UnixPathFromChardevFilename(absl::string_view filename);

struct VirtioPath {
  std::string name;  // "virtio-blk"
  std::string path;  // "/machine/peripheral/disk0/virtio-backend"
};
// x-query-virtio.
absl::StatusOr<std::vector<VirtioPath>> ParseXQueryVirtio(const nlohmann::json& ret);
// x-query-virtio-status: num-vqs.
absl::StatusOr<uint16_t> ParseVirtioStatusNumVqs(const nlohmann::json& ret);

// qom-get results. Booleans: QOM bool properties are JSON booleans, but
// OnOffAuto ones (disable-legacy) are "on"/"off"/"auto": "auto" → nullopt
// (only possible before realize; QEMU resolves it then).
absl::StatusOr<std::optional<bool>> ParseQomBool(const nlohmann::json& ret);
absl::StatusOr<uint64_t> ParseQomUint(const nlohmann::json& ret, uint64_t max);
absl::StatusOr<int64_t> ParseQomInt(const nlohmann::json& ret);
absl::StatusOr<std::string> ParseQomString(const nlohmann::json& ret);
// qom-get /chardevs/ID addr → the unix socket path ("" if not a unix socket).
absl::StatusOr<std::string> ParseSocketAddressPath(const nlohmann::json& ret);

}  // namespace vkick
