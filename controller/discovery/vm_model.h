// What discovery learns about one VM over QMP. Pure data: produced by
// VmDiscovery (QMP), consumed by the daemon (probe maps, labels) and tests.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "controller/discovery/vm_lifecycle.h"
#include "controller/probes/probe_backend.h"

namespace vkick {

struct VirtioDeviceInfo {
  // Label value for `device`: the qdev id (-device ...,id=X), else the PCI
  // address ("0000:00:04.0").
  std::string label;
  std::string qom_path;     // "/machine/peripheral/disk0"
  std::string pci_address;  // "0000:00:04.0"
  std::string type;         // QOM type: "virtio-blk-pci", "vhost-user-blk-pci", ...
  // Small id used by the probe maps; stable across refreshes for the same
  // label (discovery keeps the mapping).
  uint16_t device_id = 0;
  uint16_t num_queues = 0;
  bool legacy = false;      // legacy/transitional interface present (I/O BAR 0)
  bool modern = false;      // modern interface present (memory BAR)
  bool vhost_user = false;
  std::string chardev;       // vhost-user chardev id, when vhost_user
  std::string socket_path;   // its unix socket path, when known
  int32_t socket_fd = -1;    // QEMU's fd for that connection, when resolved
  // Empty until the firmware/guest has assigned the BARs; refresh re-reads.
  std::vector<NotifyTarget> notify_targets;
};

struct VmInfo {
  std::string qmp_path;
  std::string name;                 // -name, else "pid<N>"
  uint32_t pid = 0;                 // QEMU's pid (SO_PEERCRED on the QMP socket)
  std::vector<uint32_t> vcpu_tids;  // index = vCPU index
  std::vector<VirtioDeviceInfo> devices;
  // KVM runs the vCPUs (query-kvm "enabled"); false under TCG. Asked only for
  // a VM with a vhost-user device, the one case it decides anything (which
  // probes count its kicks); unknown otherwise, or when QEMU did not say.
  std::optional<bool> kvm;
  // query-uuid (-uuid; the nil uuid without it): with the name, tells the
  // same guest in another QEMU process (a migration destination) apart.
  std::string uuid;
  // query-status (and query-migrate): whether the guest runs
  // (vm_lifecycle.h). kUnknown when QEMU did not say.
  RunState run_state = RunState::kUnknown;
};

// One QMP connection to one VM. Implementations: QmpVmDiscovery (live QEMU)
// and fakes in tests.
class VmDiscovery {
 public:
  virtual ~VmDiscovery() = default;
  // Re-read everything (BARs move; guests reprogram them). Errors are
  // absl::Status: kUnavailable (socket gone: VM went away), kDeadlineExceeded
  // (QMP hung), kDataLoss/kInvalidArgument (garbage reply).
  virtual absl::StatusOr<VmInfo> Refresh() = 0;
  // Wait up to `timeout` for a QMP event that should trigger a refresh
  // (RESET, DEVICE_DELETED, ...). Returns true if one arrived. kUnavailable
  // when the VM has gone away.
  virtual absl::StatusOr<bool> WaitForEvent(absl::Duration timeout) = 0;
  // A descriptor that becomes readable when WaitForEvent has something to
  // read (the QMP socket), so one thread can wait for every VM at once; -1
  // when there is none (the caller then polls WaitForEvent).
  virtual int event_fd() const { return -1; }
};

}  // namespace vkick
