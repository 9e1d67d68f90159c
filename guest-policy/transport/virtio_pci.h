// virtio-pci (modern, virtio 1.2 section 4.1) inside a Linux guest, through
// uio_pci_generic: config space from /sys/bus/pci/devices/ADDR/config, BARs
// mmapped from resourceN, DMA memory from hugepages with pagemap physical
// addresses (no IOMMU in that guest), INTx through /dev/uioN.
//
// The capability parsing and the notify address arithmetic are pure and
// unit-tested here; the end-to-end run in the TCG guest is a later issue.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "guest-policy/transport/dma_memory.h"
#include "guest-policy/transport/transport.h"

namespace vkick {

// 4.1.4 "Virtio Structure PCI Capabilities": cfg_type values.
enum class VirtioPciCapType : uint8_t { kCommon = 1, kNotify = 2, kIsr = 3, kDevice = 4, kPci = 5 };

struct VirtioPciCap {
  uint8_t bar = 0;
  uint32_t offset = 0;
  uint32_t length = 0;
};

struct VirtioPciLayout {
  VirtioPciCap common, notify, isr, device;
  uint32_t notify_off_multiplier = 0;
  uint16_t vendor_id = 0, device_id = 0;
};

// Walks the capability list of a config-space dump (>= 64 bytes, usually
// 256). Bounded: a looping or out-of-range list is an error. The first
// capability of each type wins (4.1.4: "the driver SHOULD use the first").
absl::StatusOr<VirtioPciLayout> ParseVirtioPciCaps(std::span<const uint8_t> config);

// 4.1.4.4: the queue's notify address = cap.offset + queue_notify_off * multiplier.
inline uint64_t NotifyOffset(const VirtioPciLayout& l, uint16_t queue_notify_off) {
  return static_cast<uint64_t>(l.notify.offset) + static_cast<uint64_t>(queue_notify_off) * l.notify_off_multiplier;
}

// "0000:00:04.0" style address check (no path tricks via --pci).
bool IsValidPciAddress(const std::string& addr);

class VirtioPciBlk final : public BlkTransport {
 public:
  struct Options {
    std::string pci_address;   // bound to uio_pci_generic
    uint16_t num_queues = 1;
    bool event_idx = true;
    bool indirect = true;
    bool interrupts = false;
  };
  static absl::StatusOr<std::unique_ptr<VirtioPciBlk>> Open(const Options& o);
  ~VirtioPciBlk() override;

  uint64_t features() const override { return features_; }
  const BlkConfig& config() const override { return config_; }
  uint16_t max_queues() const override { return max_queues_; }
  absl::StatusOr<uint8_t*> AllocateDma(size_t bytes) override;
  const DmaSpace* dma() const override { return mem_ ? mem_->dma() : nullptr; }
  absl::Status StartQueue(uint16_t q, const QueueAddresses& a) override;
  absl::Status Activate() override;
  bool Notify(uint16_t q) override;
  int interrupt_fd(uint16_t) const override { return opts_.interrupts ? uio_fd_ : -1; }
  void AckInterrupt(uint16_t q) override;
  int hangup_fd() const override { return -1; }
  absl::Status Health() override;

 private:
  explicit VirtioPciBlk(const Options& o) : opts_(o) {}
  absl::Status Init();
  volatile uint8_t* Bar(uint8_t bar, uint32_t off) const { return bars_[bar] + off; }
  template <typename T> T ReadCommon(uint32_t off) const;
  template <typename T> void WriteCommon(uint32_t off, T v) const;

  Options opts_;
  VirtioPciLayout layout_;
  std::vector<volatile uint8_t*> bars_ = std::vector<volatile uint8_t*>(6, nullptr);
  std::vector<size_t> bar_sizes_ = std::vector<size_t>(6, 0);
  std::vector<volatile uint16_t*> notify_;
  std::vector<uint64_t> notify_count_;  // MMIO notify writes per queue
  int uio_fd_ = -1;
  int config_fd_ = -1;
  uint64_t features_ = 0;
  uint16_t max_queues_ = 0;
  BlkConfig config_;
  std::optional<HugepageMemory> mem_;
};

}  // namespace vkick
