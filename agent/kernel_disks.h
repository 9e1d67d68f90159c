// Discovery of the guest kernel's virtio block disks: those of the stock
// virtio_blk (observe only, see docs/agent.md "Kernel virtio_blk disks:
// observe only") and those of the vkick_virtio_blk module (steered through
// sysfs, docs/kernel-driver.md): which /sys/block entries they drive, at
// which PCI function, with which dev_t, serial, request queue size and, for
// the module, how many hardware queues.
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
  // kKernel (stock virtio_blk: one queue for the whole disk, the block
  // tracepoints cannot tell its hardware queues apart) or kVkickVirtioBlk
  // (vkick/queues: 1..kMaxQueuesPerDevice, one stats/steer pair each).
  proto::DriverKind driver = proto::DriverKind::kKernel;
  uint16_t num_queues = 1;
  friend bool operator==(const KernelDisk&, const KernelDisk&) = default;
};

struct KernelDiskScan {
  std::vector<KernelDisk> disks;       // natural name order (vda .. vdz, vdaa ..)
  std::vector<std::string> skipped;    // "<name>: <reason>": virtio_blk disks that cannot be announced
  friend bool operator==(const KernelDiskScan&, const KernelDiskScan&) = default;
};

// Scans <sysfs_root>/block/*: a disk counts when its `device` link resolves to
// a directory named virtioN whose `driver` link resolves to .../virtio_blk
// (only when `stock_virtio_blk`: they are observed with eBPF, which the agent
// may not have) or .../vkick_virtio_blk, and whose parent directory is a PCI
// function (DDDD:BB:SS.F). Non-virtio disks (loop, sd, nvme) are ignored
// silently; disks without a PCI parent (virtio-mmio), without a readable
// `dev`, or (module) without a readable vkick/queues in 1..64 are skipped
// with a reason. At most proto::kMaxDevices disks (no hello could carry more).
//
// `known`: the previous scan's disks. One still at the same name, dev_t and
// PCI function keeps its serial without reading `serial` again: for
// virtio_blk that read is a real request to the device (VIRTIO_BLK_T_GET_ID,
// a notify and a VM exit), so a rescan every 100 ms must not repeat it.
KernelDiskScan DiscoverKernelDisks(const std::string& sysfs_root = "/sys", const std::vector<KernelDisk>& known = {},
                                   bool stock_virtio_blk = true);

// The protocol's serial rules: <= 20 bytes, printable, no space. A trailing
// newline (sysfs) is dropped; anything else not allowed yields "".
std::string SanitizeSerial(absl::string_view raw);

// The hello device: its PCI function, serial, num_queues, queue_size and
// driver (kernel: one queue per disk; vkick-virtio-blk: its hardware queues).
proto::GuestDevice ToGuestDevice(const KernelDisk& d);

// The kernel's dev_t of the disk ((major << 20) | minor, as the block
// tracepoints report it).
uint32_t KernelDevOf(const KernelDisk& d);

}  // namespace vkick::agent
