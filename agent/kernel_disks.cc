#include "agent/kernel_disks.h"

#include <dirent.h>
#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/counter_source.h"
#include "agent/registry.h"
#include "agent/sysfs_file.h"

namespace vkick::agent {
namespace {

std::string RealPath(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) == nullptr) return "";
  return buf;
}

std::string BaseName(absl::string_view path) {
  const size_t slash = path.rfind('/');
  return std::string(slash == absl::string_view::npos ? path : path.substr(slash + 1));
}

std::string DirName(absl::string_view path) {
  const size_t slash = path.rfind('/');
  return slash == absl::string_view::npos ? "" : std::string(path.substr(0, slash));
}

bool IsVirtioDeviceName(absl::string_view s) {
  if (!absl::ConsumePrefix(&s, "virtio") || s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The driver bound to the virtio device `dev_dir`, when it is one of ours.
std::optional<proto::DriverKind> DriverOf(const std::string& dev_dir, bool stock_virtio_blk) {
  const std::string driver = BaseName(RealPath(dev_dir + "/driver"));
  if (driver == "vkick_virtio_blk") return proto::DriverKind::kVkickVirtioBlk;
  if (driver == "virtio_blk" && stock_virtio_blk) return proto::DriverKind::kKernel;
  return std::nullopt;
}

// The module's hardware queue count (vkick/queues), 1..kMaxQueuesPerDevice.
bool ReadVkickQueues(const std::string& disk, uint16_t* out) {
  std::string text;
  uint32_t n = 0;
  if (!ReadSysfsFile(disk + "/vkick/queues", 32, &text) || !absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &n) ||
      n < 1 || n > proto::kMaxQueuesPerDevice)
    return false;
  *out = static_cast<uint16_t>(n);
  return true;
}

bool ReadDev(const std::string& disk, KernelDisk* k) {
  std::string text;
  std::vector<absl::string_view> mm;
  if (ReadSysfsFile(disk + "/dev", 32, &text)) mm = absl::StrSplit(absl::StripAsciiWhitespace(text), ':');
  return mm.size() == 2 && absl::SimpleAtoi(mm[0], &k->major) && absl::SimpleAtoi(mm[1], &k->minor) &&
         k->major < (1u << 12) && k->minor < (1u << 20);
}

// The serial (read once per disk: see DiscoverKernelDisks) and nr_requests.
void ReadSerialAndQueueSize(const std::string& disk, const std::vector<KernelDisk>& known, KernelDisk* k) {
  auto same = std::find_if(known.begin(), known.end(), [&](const KernelDisk& o) {
    return o.name == k->name && o.major == k->major && o.minor == k->minor && o.pci == k->pci;
  });
  std::string text;
  // A device without a serial (or whose read fails, EIO on old QEMU)
  // is announced without one; vkickd then binds it by PCI function.
  if (same != known.end()) {
    k->serial = same->serial;
  } else if (ReadSysfsFile(disk + "/serial", 64, &text)) {
    k->serial = SanitizeSerial(text);
  }
  uint64_t nr = 0;
  if (ReadSysfsFile(disk + "/queue/nr_requests", 32, &text) && absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &nr))
    k->queue_size = static_cast<uint16_t>(std::clamp<uint64_t>(nr, 1, proto::kMaxQueueSize));
}

// Block device names sort naturally: vdz before vdaa.
bool NaturalLess(const std::string& a, const std::string& b) {
  return a.size() != b.size() ? a.size() < b.size() : a < b;
}

// One /sys/block entry: appended to scan->disks when it is a disk of ours
// that can be announced, to scan->skipped with the reason when it cannot.
void DiscoverOne(const std::string& block, const std::string& name, const std::vector<KernelDisk>& known,
                 bool stock_virtio_blk, KernelDiskScan* scan) {
  const std::string disk = absl::StrCat(block, "/", name);
  // device -> .../0000:00:05.0/virtio2 (a virtio device) for both drivers.
  const std::string dev_dir = RealPath(disk + "/device");
  if (dev_dir.empty() || !IsVirtioDeviceName(BaseName(dev_dir))) return;
  const std::optional<proto::DriverKind> driver = DriverOf(dev_dir, stock_virtio_blk);
  if (!driver) return;
  KernelDisk k;
  k.name = name;
  k.pci = BaseName(DirName(dev_dir));
  k.driver = *driver;
  uint16_t dom;
  uint8_t bus, devfn;
  if (!ParsePciAddress(k.pci, &dom, &bus, &devfn)) {
    scan->skipped.push_back(absl::StrCat(name, ": not on PCI (parent '", k.pci, "'): no PCI function to announce"));
    return;
  }
  if (!ReadDev(disk, &k)) {
    scan->skipped.push_back(absl::StrCat(name, ": unreadable or malformed dev"));
    return;
  }
  if (k.driver == proto::DriverKind::kVkickVirtioBlk && !ReadVkickQueues(disk, &k.num_queues)) {
    scan->skipped.push_back(absl::StrCat(name, ": unreadable vkick/queues, or not in 1..", proto::kMaxQueuesPerDevice));
    return;
  }
  ReadSerialAndQueueSize(disk, known, &k);
  if (scan->disks.size() >= proto::kMaxDevices) {
    scan->skipped.push_back(absl::StrCat(name, ": more than ", proto::kMaxDevices, " virtio disks"));
    return;
  }
  scan->disks.push_back(std::move(k));
}

}  // namespace

std::string SanitizeSerial(absl::string_view raw) {
  while (!raw.empty() && (raw.back() == '\n' || raw.back() == '\0')) raw.remove_suffix(1);
  if (raw.size() > proto::kMaxSerialLen) return "";
  for (unsigned char c : raw)
    if (c <= 0x20 || c > 0x7e) return "";
  return std::string(raw);
}

uint32_t KernelDevOf(const KernelDisk& d) { return KernelDev(d.major, d.minor); }

proto::GuestDevice ToGuestDevice(const KernelDisk& d) {
  proto::GuestDevice g;
  ParsePciAddress(d.pci, &g.pci_domain, &g.pci_bus, &g.pci_devfn);
  g.serial = d.serial;
  g.num_queues = std::clamp<uint16_t>(d.num_queues, 1, proto::kMaxQueuesPerDevice);
  g.queue_size = std::clamp<uint16_t>(d.queue_size, 1, proto::kMaxQueueSize);
  g.driver = d.driver;
  return g;
}

KernelDiskScan DiscoverKernelDisks(const std::string& sysfs_root, const std::vector<KernelDisk>& known,
                                   bool stock_virtio_blk) {
  KernelDiskScan scan;
  const std::string block = absl::StrCat(sysfs_root, "/block");
  DIR* dir = opendir(block.c_str());
  if (dir == nullptr) return scan;
  std::vector<std::string> names;
  while (dirent* e = readdir(dir)) {
    const std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    names.push_back(n);
    if (names.size() >= kMaxBlockEntriesPerScan) break;
  }
  closedir(dir);
  std::sort(names.begin(), names.end(), NaturalLess);
  for (const std::string& name : names) DiscoverOne(block, name, known, stock_virtio_blk, &scan);
  return scan;
}

}  // namespace vkick::agent
