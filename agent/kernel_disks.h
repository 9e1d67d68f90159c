// Discovery of the guest kernel's own virtio_blk disks (observe only, see
// docs/agent.md "Kernel virtio_blk disks: observe only"): which /sys/block
// entries are driven by virtio_blk, at which PCI function, with which dev_t,
// serial and request queue size.
//
// Reads a sysfs tree whose root is an argument, so it is unit-tested on a
// fake tree built in a temp dir (tests/unit/agent/kernel_disks_test.cc).
// A PCI function bound to another driver (uio_pci_generic, vfio-pci: a
// vkick-blk device) has no /sys/block entry, so it never shows up here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "protocol/messages.h"

namespace vkick::agent {

inline constexpr size_t kMaxBlockEntriesPerScan = 1024;  // /sys/block entries examined (bounded cost)

struct KernelDisk {
  std::string name;      // "vda"
  std::string pci;       // "0000:00:05.0": the PCI function above virtioN
  uint32_t major = 0;
  uint32_t minor = 0;
  std::string serial;    // sanitised (SanitizeSerial), may be empty
  uint16_t queue_size = 256;  // queue/nr_requests, clamped to 1..kMaxQueueSize
  friend bool operator==(const KernelDisk&, const KernelDisk&) = default;
};

struct KernelDiskScan {
  std::vector<KernelDisk> disks;       // natural name order (vda .. vdz, vdaa ..)
  std::vector<std::string> skipped;    // "<name>: <reason>": virtio_blk disks that cannot be announced
  friend bool operator==(const KernelDiskScan&, const KernelDiskScan&) = default;
};

// Scans <sysfs_root>/block/*: a disk counts when its `device` link resolves to
// a directory named virtioN whose `driver` link resolves to .../virtio_blk,
// and whose parent directory is a PCI function (DDDD:BB:SS.F). Non-virtio
// disks (loop, sd, nvme) are ignored silently; virtio_blk disks without a
// PCI parent (virtio-mmio) or without a readable `dev` are skipped with a
// reason. At most proto::kMaxDevices disks (no hello could carry more).
//
// `known`: the previous scan's disks. One still at the same name, dev_t and
// PCI function keeps its serial without reading `serial` again: for
// virtio_blk that read is a real request to the device (VIRTIO_BLK_T_GET_ID,
// a notify and a VM exit), so a rescan every 100 ms must not repeat it.
KernelDiskScan DiscoverKernelDisks(const std::string& sysfs_root = "/sys", const std::vector<KernelDisk>& known = {});

// The protocol's serial rules: <= 20 bytes, printable, no space. A trailing
// newline (sysfs) is dropped; anything else not allowed yields "".
std::string SanitizeSerial(absl::string_view raw);

// The hello device: its PCI function, serial, one queue (per disk, not per
// hardware queue), queue_size, driver = kernel.
proto::GuestDevice ToGuestDevice(const KernelDisk& d);

// The kernel's dev_t of the disk ((major << 20) | minor, as the block
// tracepoints report it).
uint32_t KernelDevOf(const KernelDisk& d);

}  // namespace vkick::agent
