#include "guest-policy/transport/virtio_pci.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <regex>

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {
constexpr uint8_t kPciCapVndr = 0x09;
constexpr uint8_t kStatusAck = 1, kStatusDriver = 2, kStatusDriverOk = 4, kStatusFeaturesOk = 8,
                  kStatusNeedsReset = 0x40, kStatusFailed = 0x80;
// 4.1.4.3 struct virtio_pci_common_cfg offsets.
enum : uint32_t {
  kDevFeatSel = 0, kDevFeat = 4, kDrvFeatSel = 8, kDrvFeat = 12, kNumQueues = 18, kDevStatus = 20,
  kQueueSel = 22, kQueueSize = 24, kQueueMsix = 26, kQueueEnable = 28, kQueueNotifyOff = 30,
  kQueueDesc = 32, kQueueDriver = 40, kQueueDevice = 48,
};

// PCI command register (config offset 4): memory space, bus master, INTx disable.
constexpr uint16_t kPciCmdMemory = 0x2, kPciCmdMaster = 0x4, kPciCmdIntxDisable = 0x400;

// uio_pci_generic has no irqcontrol: its handler masks INTx (command register
// bit 10) on each interrupt, and user space unmasks it by clearing that bit
// through the config file (what DPDK's igb_uio-less path does too).
bool SetIntxMasked(int config_fd, bool masked) {
  uint16_t cmd = 0;
  if (pread(config_fd, &cmd, 2, 4) != 2) return false;
  const uint16_t want = masked ? (cmd | kPciCmdIntxDisable) : (cmd & ~kPciCmdIntxDisable);
  if (want == cmd) return true;
  return pwrite(config_fd, &want, 2, 4) == 2;
}

uint32_t Le32(std::span<const uint8_t> b, size_t off) {
  uint32_t v;
  std::memcpy(&v, b.data() + off, 4);
  return v;
}
}  // namespace

absl::StatusOr<VirtioPciLayout> ParseVirtioPciCaps(std::span<const uint8_t> cfg) {
  if (cfg.size() < 64) return absl::InvalidArgumentError("PCI config space dump shorter than 64 bytes");
  VirtioPciLayout l;
  std::memcpy(&l.vendor_id, cfg.data(), 2);
  std::memcpy(&l.device_id, cfg.data() + 2, 2);
  if (l.vendor_id != 0x1af4) return absl::NotFoundError(absl::StrCat("vendor 0x", absl::Hex(l.vendor_id), " is not virtio"));
  uint16_t status;
  std::memcpy(&status, cfg.data() + 6, 2);
  if (!(status & 0x10)) return absl::NotFoundError("device has no capability list");
  bool seen[6] = {};
  uint8_t ptr = cfg[0x34] & 0xfc;
  for (int hops = 0; ptr != 0; ++hops) {
    if (hops > 48) return absl::DataLossError("PCI capability list loops");
    if (ptr < 0x40 || static_cast<size_t>(ptr) + 16 > cfg.size()) {
      return absl::DataLossError(absl::StrCat("PCI capability at 0x", absl::Hex(ptr), " out of range"));
    }
    const uint8_t vndr = cfg[ptr], next = cfg[ptr + 1], len = cfg[ptr + 2];
    if (vndr == kPciCapVndr && len >= 16) {
      const uint8_t type = cfg[ptr + 3];
      VirtioPciCap c{cfg[ptr + 4], Le32(cfg, ptr + 8), Le32(cfg, ptr + 12)};
      if (c.bar <= 5 && type >= 1 && type <= 4 && !seen[type]) {
        seen[type] = true;
        switch (static_cast<VirtioPciCapType>(type)) {
          case VirtioPciCapType::kCommon: l.common = c; break;
          case VirtioPciCapType::kNotify:
            if (len < 20 || static_cast<size_t>(ptr) + 20 > cfg.size()) {
              return absl::DataLossError("notify capability without notify_off_multiplier");
            }
            l.notify = c;
            l.notify_off_multiplier = Le32(cfg, ptr + 16);
            break;
          case VirtioPciCapType::kIsr: l.isr = c; break;
          case VirtioPciCapType::kDevice: l.device = c; break;
          default: break;
        }
      }
    }
    ptr = next & 0xfc;
  }
  if (!seen[1] || !seen[2] || !seen[4]) {
    return absl::NotFoundError("not a modern virtio-pci device (common/notify/device capability missing; "
                               "QEMU: disable-legacy=on or a 1.0 device)");
  }
  if (l.common.length < 56) return absl::DataLossError("common config capability too small");
  return l;
}

bool IsValidPciAddress(const std::string& a) {
  static const std::regex re("^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\\.[0-7]$");
  return std::regex_match(a, re);
}

template <typename T>
T VirtioPciBlk::ReadCommon(uint32_t off) const {
  return *reinterpret_cast<volatile T*>(Bar(layout_.common.bar, layout_.common.offset + off));
}
template <typename T>
void VirtioPciBlk::WriteCommon(uint32_t off, T v) const {
  *reinterpret_cast<volatile T*>(Bar(layout_.common.bar, layout_.common.offset + off)) = v;
}

absl::StatusOr<std::unique_ptr<VirtioPciBlk>> VirtioPciBlk::Open(const Options& o) {
  if (!IsValidPciAddress(o.pci_address)) {
    return absl::InvalidArgumentError(absl::StrCat("bad PCI address '", o.pci_address, "' (want 0000:00:04.0)"));
  }
  std::unique_ptr<VirtioPciBlk> d(new VirtioPciBlk(o));
  absl::Status st = d->Init();
  if (!st.ok()) return st;
  return d;
}

VirtioPciBlk::~VirtioPciBlk() {
  // The transport's own doorbell count per queue (every MMIO notify write):
  // what a host-side counter must see. One line on stderr, parsed by
  // tests/vm/test_vm_e2e.py.
  if (!notify_count_.empty()) {
    std::string line = "vkick-blk: pci-notifies";
    for (size_t q = 0; q < notify_count_.size(); ++q) absl::StrAppend(&line, " q", q, "=", notify_count_[q]);
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  if (bars_[layout_.common.bar] != nullptr) WriteCommon<uint8_t>(kDevStatus, 0);  // reset: device stops DMA
  for (int i = 0; i < 6; ++i) if (bars_[i]) munmap(const_cast<uint8_t*>(bars_[i]), bar_sizes_[i]);
  if (uio_fd_ >= 0) close(uio_fd_);
  if (config_fd_ >= 0) close(config_fd_);
}

absl::Status VirtioPciBlk::Init() {
  const std::string dev = "/sys/bus/pci/devices/" + opts_.pci_address;
  config_fd_ = open((dev + "/config").c_str(), O_RDWR | O_CLOEXEC);
  if (config_fd_ < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", dev, "/config"));
  uint8_t cfg[256] = {};
  ssize_t n = pread(config_fd_, cfg, sizeof(cfg), 0);
  if (n < 64) return absl::ErrnoToStatus(errno, "read PCI config space");
  auto l = ParseVirtioPciCaps({cfg, static_cast<size_t>(n)});
  if (!l.ok()) return l.status();
  layout_ = *l;
  // PCI command register, before the device starts:
  //  - bus mastering on: uio_pci_generic enables the device but not bus
  //    mastering, and clears it when the previous user closed /dev/uioN;
  //    without it QEMU (like real hardware) drops the device's DMA;
  //  - INTx enabled (bit 10 clear): uio_pci_generic's handler leaves INTx
  //    masked after an interrupt. QEMU's virtio-pci reports a device with
  //    INTx disabled and no MSI-X as having no guest notifiers, so at
  //    DRIVER_OK vhost-user gets SET_VRING_CALL without an fd for each queue,
  //    and qemu-storage-daemon 7.2's libvhost-user then panics on its first
  //    completion ("vu_panic: Error writing eventfd: Bad file descriptor"):
  //    the second driver session in a boot hung that way.
  uint16_t cmd = 0;
  if (pread(config_fd_, &cmd, 2, 4) != 2) return absl::ErrnoToStatus(errno, "read PCI command register");
  const uint16_t want_cmd =
      static_cast<uint16_t>((cmd | kPciCmdMemory | kPciCmdMaster) & ~kPciCmdIntxDisable);
  if (want_cmd != cmd && pwrite(config_fd_, &want_cmd, 2, 4) != 2) {
    return absl::ErrnoToStatus(errno, "set the PCI command register (bus master, INTx)");
  }
  // uio: /sys/bus/pci/devices/ADDR/uio/uioN
  DIR* dir = opendir((dev + "/uio").c_str());
  if (dir == nullptr) return absl::FailedPreconditionError(absl::StrCat(opts_.pci_address, " is not bound to uio_pci_generic"));
  std::string uio;
  while (dirent* e = readdir(dir)) if (std::strncmp(e->d_name, "uio", 3) == 0) uio = e->d_name;
  closedir(dir);
  if (uio.empty()) return absl::FailedPreconditionError("no uio device");
  // Non-blocking: with several queues, several pollers may wake on one
  // interrupt; only one gets the count, the others must not block in read().
  uio_fd_ = open(("/dev/" + uio).c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (uio_fd_ < 0) return absl::ErrnoToStatus(errno, "open /dev/" + uio);
  for (const VirtioPciCap* c : {&layout_.common, &layout_.notify, &layout_.isr, &layout_.device}) {
    if (bars_[c->bar] != nullptr || c->length == 0) continue;
    const std::string path = absl::StrCat(dev, "/resource", c->bar);
    int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return absl::ErrnoToStatus(errno, "open " + path);
    struct stat sb;
    fstat(fd, &sb);
    void* p = mmap(nullptr, sb.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return absl::ErrnoToStatus(errno, "mmap " + path);
    bars_[c->bar] = static_cast<volatile uint8_t*>(p);
    bar_sizes_[c->bar] = sb.st_size;
  }
  // 3.1.1 "Driver Requirements: Device Initialization".
  WriteCommon<uint8_t>(kDevStatus, 0);
  while (ReadCommon<uint8_t>(kDevStatus) != 0) usleep(100);
  WriteCommon<uint8_t>(kDevStatus, kStatusAck);
  WriteCommon<uint8_t>(kDevStatus, kStatusAck | kStatusDriver);
  uint64_t offered = 0;
  for (uint32_t sel = 0; sel < 2; ++sel) {
    WriteCommon<uint32_t>(kDevFeatSel, sel);
    offered |= static_cast<uint64_t>(ReadCommon<uint32_t>(kDevFeat)) << (32 * sel);
  }
  if (!(offered & kVirtioFVersion1)) return absl::FailedPreconditionError("device does not offer VIRTIO_F_VERSION_1");
  uint64_t want = kVirtioFVersion1 | kVirtioBlkFFlush | kVirtioBlkFSegMax | kVirtioBlkFSizeMax | kVirtioBlkFBlkSize |
                  kVirtioBlkFMq | kVirtioBlkFRo;
  if (opts_.event_idx) want |= kVirtioFRingEventIdx;
  if (opts_.indirect) want |= kVirtioFRingIndirectDesc;
  features_ = offered & want;
  for (uint32_t sel = 0; sel < 2; ++sel) {
    WriteCommon<uint32_t>(kDrvFeatSel, sel);
    WriteCommon<uint32_t>(kDrvFeat, static_cast<uint32_t>(features_ >> (32 * sel)));
  }
  WriteCommon<uint8_t>(kDevStatus, kStatusAck | kStatusDriver | kStatusFeaturesOk);
  if (!(ReadCommon<uint8_t>(kDevStatus) & kStatusFeaturesOk)) {
    return absl::FailedPreconditionError("device refused the feature set (FEATURES_OK not kept)");
  }
  uint8_t raw[kBlkConfigBytes];
  for (size_t i = 0; i < sizeof(raw); ++i) raw[i] = *Bar(layout_.device.bar, layout_.device.offset + i);
  auto c = ParseBlkConfig(raw, features_);
  if (!c.ok()) return c.status();
  config_ = *c;
  max_queues_ = ReadCommon<uint16_t>(kNumQueues);
  if (opts_.num_queues > max_queues_) {
    return absl::InvalidArgumentError(absl::StrCat(opts_.num_queues, " queues requested, device has ", max_queues_));
  }
  notify_.assign(opts_.num_queues, nullptr);
  notify_count_.assign(opts_.num_queues, 0);
  return absl::OkStatus();
}

absl::StatusOr<uint8_t*> VirtioPciBlk::AllocateDma(size_t bytes) {
  if (mem_) return absl::FailedPreconditionError("DMA memory already allocated");
  auto m = HugepageMemory::Create(bytes);
  if (!m.ok()) return m.status();
  mem_.emplace(*std::move(m));
  return mem_->data();
}

absl::Status VirtioPciBlk::StartQueue(uint16_t q, const QueueAddresses& a) {
  WriteCommon<uint16_t>(kQueueSel, q);
  const uint16_t max = ReadCommon<uint16_t>(kQueueSize);
  if (a.size > max) return absl::InvalidArgumentError(absl::StrCat("queue size ", a.size, " > device max ", max));
  WriteCommon<uint16_t>(kQueueSize, a.size);
  WriteCommon<uint16_t>(kQueueMsix, 0xffff);  // INTx through uio: no MSI-X vector
  WriteCommon<uint64_t>(kQueueDesc, a.desc_iova);
  WriteCommon<uint64_t>(kQueueDriver, a.avail_iova);
  WriteCommon<uint64_t>(kQueueDevice, a.used_iova);
  const uint16_t off = ReadCommon<uint16_t>(kQueueNotifyOff);
  const uint64_t addr = NotifyOffset(layout_, off);
  if (addr + 2 > bar_sizes_[layout_.notify.bar]) return absl::DataLossError("notify address beyond its BAR");
  notify_[q] = reinterpret_cast<volatile uint16_t*>(Bar(layout_.notify.bar, static_cast<uint32_t>(addr)));
  WriteCommon<uint16_t>(kQueueEnable, 1);
  return absl::OkStatus();
}

absl::Status VirtioPciBlk::Activate() {
  WriteCommon<uint8_t>(kDevStatus, kStatusAck | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk);
  if (opts_.interrupts) {
    if (layout_.isr.length) (void)*Bar(layout_.isr.bar, layout_.isr.offset);  // drop a stale level
    if (!SetIntxMasked(config_fd_, false)) return absl::ErrnoToStatus(errno, "unmask INTx (PCI command register)");
  }
  // Polling: INTx stays enabled at DRIVER_OK (see Init); the device may raise
  // it once, uio_pci_generic then masks it, which is harmless.
  return Health();
}

bool VirtioPciBlk::Notify(uint16_t q) {
  // 4.1.5.2 "Available Buffer Notifications": write the queue index to its
  // notify address. In a VM this MMIO write is the VM exit being counted.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  *notify_[q] = q;
  ++notify_count_[q];  // per queue, so only queue q's poller thread touches it
  return true;
}

void VirtioPciBlk::AckInterrupt(uint16_t) {
  uint32_t count;
  (void)!read(uio_fd_, &count, 4);  // consume the event (non-blocking)
  // 4.1.4.5: reading the ISR status clears it and de-asserts INTx; then
  // unmask (uio_pci_generic masked it in its handler). A completion that
  // raced in between re-asserts the level and interrupts again.
  if (layout_.isr.length) (void)*Bar(layout_.isr.bar, layout_.isr.offset);
  (void)SetIntxMasked(config_fd_, false);
}

absl::Status VirtioPciBlk::Health() {
  const uint8_t s = ReadCommon<uint8_t>(kDevStatus);
  if (s & (kStatusNeedsReset | kStatusFailed)) return absl::UnavailableError("virtio-pci device needs reset");
  return absl::OkStatus();
}

}  // namespace vkick
