// What vkick-blk needs from a virtio transport: feature negotiation, the
// device config, DMA-able memory, queue start-up, the doorbell (Notifier) and
// the used-buffer notification fd. Implemented by VhostUserBlk (a vhost-user
// frontend over a unix socket) and VirtioPciBlk (uio_pci_generic in a guest).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "guest-policy/core/blk_queue.h"
#include "guest-policy/core/blk_request.h"

namespace vkick {

struct QueueAddresses {
  uint16_t size = 0;
  uint64_t desc_iova = 0;
  uint64_t avail_iova = 0;
  uint64_t used_iova = 0;
};

class BlkTransport : public Notifier {
 public:
  ~BlkTransport() override = default;

  virtual uint64_t features() const = 0;       // negotiated device features
  virtual const BlkConfig& config() const = 0;
  virtual uint16_t max_queues() const = 0;

  // Allocates (once) `bytes` of zeroed memory the device can reach.
  virtual absl::StatusOr<uint8_t*> AllocateDma(size_t bytes) = 0;
  virtual const DmaSpace* dma() const = 0;

  virtual absl::Status StartQueue(uint16_t q, const QueueAddresses& a) = 0;
  // After all queues: DRIVER_OK (PCI); nothing to do for vhost-user.
  virtual absl::Status Activate() = 0;

  // fd that becomes readable when queue q has a used-buffer notification (-1
  // if the transport cannot interrupt); AckInterrupt consumes it.
  virtual int interrupt_fd(uint16_t q) const = 0;
  virtual void AckInterrupt(uint16_t q) = 0;

  // fd that reports POLLHUP/POLLRDHUP/POLLIN when the backend went away (-1:
  // none). Health() checks it without blocking.
  virtual int hangup_fd() const = 0;
  virtual absl::Status Health() = 0;
};

}  // namespace vkick
