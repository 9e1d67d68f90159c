#include "controller/discovery/virtio_pci_layout.h"

#include "absl/strings/str_cat.h"

namespace vkick {

absl::StatusOr<VirtioPciLayout> ComputeVirtioPciLayout(const PciDevice& dev,
                                                       const VirtioPciProps& props,
                                                       uint16_t device_id) {
  if (dev.vendor_id != kVirtioPciVendor) {
    return absl::InvalidArgumentError(
        absl::StrCat(dev.Address(), " is not a virtio device (vendor ", dev.vendor_id, ")"));
  }
  if (props.num_queues > kVirtioQueueMax) {
    return absl::InvalidArgumentError(absl::StrCat(dev.Address(), ": ", props.num_queues,
                                                   " queues exceed VIRTIO_QUEUE_MAX"));
  }
  const PciBar* io_bar = dev.FindBar(kLegacyIoBar);
  const PciBar* mem_bar = dev.FindBar(kModernMemBar);
  VirtioPciLayout out;
  // The properties are authoritative; without them, infer from the BARs the
  // interface needs (modern-only devices have no I/O BAR 0, legacy-only ones
  // no BAR 4).
  out.legacy = props.disable_legacy.has_value() ? !*props.disable_legacy
                                                : (io_bar != nullptr && io_bar->io);
  out.modern = props.disable_modern.has_value() ? !*props.disable_modern
                                                : (mem_bar != nullptr && !mem_bar->io);

  if (out.legacy && io_bar != nullptr && io_bar->io && io_bar->assigned) {
    if (io_bar->size < kLegacyQueueNotifyOffset + 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(dev.Address(), ": legacy I/O BAR of ", io_bar->size, " bytes is too small"));
    }
    out.targets.push_back(NotifyTarget{.space = NotifyTarget::Space::kPio,
                                       .addr = io_bar->address + kLegacyQueueNotifyOffset,
                                       .device_id = device_id,
                                       .queue = 0,
                                       .value_is_queue = true});
  }
  if (out.modern && mem_bar != nullptr && !mem_bar->io && mem_bar->assigned &&
      props.num_queues > 0) {
    const uint64_t mult =
        props.page_per_vq.value_or(false) ? kPagePerVqNotifyMultiplier : kNotifyMultiplier;
    const uint64_t end = kModernNotifyOffset + mult * props.num_queues;
    if (end > mem_bar->size) {
      return absl::InvalidArgumentError(absl::StrCat(
          dev.Address(), ": notify area of ", props.num_queues, " queues (multiplier ", mult,
          ") ends at ", end, ", beyond the ", mem_bar->size, "-byte BAR 4"));
    }
    for (uint16_t q = 0; q < props.num_queues; ++q) {
      out.targets.push_back(NotifyTarget{.space = NotifyTarget::Space::kMmio,
                                         .addr = mem_bar->address + kModernNotifyOffset + mult * q,
                                         .device_id = device_id,
                                         .queue = q,
                                         .value_is_queue = false});
    }
  }
  if (out.modern && props.modern_pio_notify.value_or(false)) {
    const PciBar* pio = dev.FindBar(kModernIoBar);
    if (pio != nullptr && pio->io && pio->assigned) {
      out.targets.push_back(NotifyTarget{.space = NotifyTarget::Space::kPio,
                                         .addr = pio->address,
                                         .device_id = device_id,
                                         .queue = 0,
                                         .value_is_queue = true});
    }
  }
  return out;
}

}  // namespace vkick
