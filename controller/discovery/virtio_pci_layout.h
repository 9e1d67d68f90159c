// Where QEMU's virtio-pci devices take guest notifications: pure arithmetic
// from a device's BARs and its virtio-pci properties.
//
// QEMU's layout (qemu/qemu hw/virtio/virtio-pci.c, read at commit 00343e4b;
// the same offsets hold through 7.2: the brief measured kvm_mmio writes at
// BAR4 + 0x3000 + 4 * queue on this machine's QEMU 7.2, and
// qmp_discovery_live_test checks every rule below against QEMU 7.2's own
// memory map, `info mtree`):
//  * legacy: the I/O BAR 0 (`proxy->bar`) holds the legacy register block;
//    virtio_pci_ioeventfd_assign() registers every queue's ioeventfd at
//    legacy_addr = VIRTIO_PCI_QUEUE_NOTIFY (16) with the queue index as the
//    matched value: one port, value = queue.
//  * modern: virtio_pci_realize() sets modern_mem_bar_idx = 4 and
//    notify.offset = 0x3000; virtio_pci_queue_mem_mult() is 4, or
//    QEMU_VIRTIO_PCI_QUEUE_MEM_MULT (0x1000) with page-per-vq=on, and the
//    queue's ioeventfd sits at notify + mult * queue index.
//  * modern-pio-notify=on: notify_pio lives at offset 0 of the modern I/O
//    BAR (modern_io_bar_idx = 2), one port, value = queue.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "controller/probes/probe_backend.h"
#include "controller/qmp/qmp_parse.h"

namespace vkick {

inline constexpr uint16_t kVirtioPciVendor = 0x1af4;
inline constexpr uint64_t kLegacyQueueNotifyOffset = 16;  // VIRTIO_PCI_QUEUE_NOTIFY
inline constexpr int kLegacyIoBar = 0;
inline constexpr int kModernMemBar = 4;
inline constexpr int kModernIoBar = 2;
inline constexpr uint64_t kModernNotifyOffset = 0x3000;
inline constexpr uint64_t kNotifyMultiplier = 4;
inline constexpr uint64_t kPagePerVqNotifyMultiplier = 0x1000;
inline constexpr uint16_t kVirtioQueueMax = 1024;  // QEMU's VIRTIO_QUEUE_MAX

// What QEMU's properties say about the device; unset = unknown (qom-get not
// available), then the BARs decide.
struct VirtioPciProps {
  std::optional<bool> disable_legacy;
  std::optional<bool> disable_modern;
  std::optional<bool> page_per_vq;
  std::optional<bool> modern_pio_notify;
  uint16_t num_queues = 0;  // 0 = unknown: no per-queue modern targets
};

struct VirtioPciLayout {
  bool legacy = false;  // the device offers the legacy interface
  bool modern = false;  // the device offers the modern interface
  // Empty while the BARs the interfaces need are unassigned.
  std::vector<NotifyTarget> targets;
};

// Computes the notify targets of one virtio PCI device. kInvalidArgument if
// the inputs contradict each other (not a virtio device, queue count beyond
// VIRTIO_QUEUE_MAX, a notify area that does not fit in the BAR).
absl::StatusOr<VirtioPciLayout> ComputeVirtioPciLayout(const PciDevice& dev,
                                                       const VirtioPciProps& props,
                                                       uint16_t device_id);

}  // namespace vkick
