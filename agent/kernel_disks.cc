#include "agent/kernel_disks.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/counter_source.h"
#include "agent/registry.h"

namespace vkick::agent {
namespace {

// Small sysfs attribute: at most `max` bytes; false when unreadable.
bool ReadSmall(const std::string& path, size_t max, std::string* out) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[256];
  const ssize_t n = read(fd, buf, std::min(sizeof(buf), max));
  close(fd);
  if (n < 0) return false;
  out->assign(buf, static_cast<size_t>(n));
  return true;
}

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

// Block device names sort naturally: vdz before vdaa.
bool NaturalLess(const std::string& a, const std::string& b) {
  return a.size() != b.size() ? a.size() < b.size() : a < b;
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
  g.num_queues = 1;
  g.queue_size = std::clamp<uint16_t>(d.queue_size, 1, proto::kMaxQueueSize);
  g.driver = proto::DriverKind::kKernel;
  return g;
}

KernelDiskScan DiscoverKernelDisks(const std::string& sysfs_root, const std::vector<KernelDisk>& known) {
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

  for (const std::string& name : names) {
    const std::string disk = absl::StrCat(block, "/", name);
    // device -> .../0000:00:05.0/virtio2 (a virtio device) for virtio_blk.
    const std::string dev_dir = RealPath(disk + "/device");
    if (dev_dir.empty() || !IsVirtioDeviceName(BaseName(dev_dir))) continue;
    if (BaseName(RealPath(dev_dir + "/driver")) != "virtio_blk") continue;
    const std::string pci = BaseName(DirName(dev_dir));
    uint16_t dom;
    uint8_t bus, devfn;
    if (!ParsePciAddress(pci, &dom, &bus, &devfn)) {
      scan.skipped.push_back(absl::StrCat(name, ": not on PCI (parent '", pci, "'): no PCI function to announce"));
      continue;
    }
    KernelDisk k;
    k.name = name;
    k.pci = pci;
    std::string text;
    std::vector<absl::string_view> mm;
    if (ReadSmall(disk + "/dev", 32, &text))
      mm = absl::StrSplit(absl::StripAsciiWhitespace(text), ':');
    if (mm.size() != 2 || !absl::SimpleAtoi(mm[0], &k.major) || !absl::SimpleAtoi(mm[1], &k.minor) ||
        k.major >= (1u << 12) || k.minor >= (1u << 20)) {
      scan.skipped.push_back(absl::StrCat(name, ": unreadable or malformed dev"));
      continue;
    }
    // A device without a serial (or whose read fails, EIO on old QEMU)
    // is announced without one; vkickd then binds it by PCI function.
    auto same = std::find_if(known.begin(), known.end(), [&](const KernelDisk& o) {
      return o.name == k.name && o.major == k.major && o.minor == k.minor && o.pci == k.pci;
    });
    if (same != known.end()) {
      k.serial = same->serial;
    } else if (ReadSmall(disk + "/serial", 64, &text)) {
      k.serial = SanitizeSerial(text);
    }
    uint64_t nr = 0;
    if (ReadSmall(disk + "/queue/nr_requests", 32, &text) &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &nr))
      k.queue_size = static_cast<uint16_t>(std::clamp<uint64_t>(nr, 1, proto::kMaxQueueSize));
    if (scan.disks.size() >= proto::kMaxDevices) {
      scan.skipped.push_back(absl::StrCat(name, ": more than ", proto::kMaxDevices, " virtio_blk disks"));
      continue;
    }
    scan.disks.push_back(std::move(k));
  }
  return scan;
}

}  // namespace vkick::agent
