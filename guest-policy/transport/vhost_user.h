// A vhost-user frontend for a vhost-user-blk backend (qemu-storage-daemon
// --export type=vhost-user-blk), following QEMU docs/interop/vhost-user.rst.
// This process plays QEMU's role: it owns the memory (one memfd region), the
// vrings, and the kick/call eventfds; the backend maps the memfd.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "guest-policy/transport/dma_memory.h"
#include "guest-policy/transport/transport.h"

namespace vkick {

struct VhostUserOptions {
  std::string socket_path;
  uint16_t num_queues = 1;
  bool event_idx = true;   // negotiate VIRTIO_F_EVENT_IDX if offered
  bool indirect = true;    // negotiate VIRTIO_F_INDIRECT_DESC if offered
  bool interrupts = false; // completions by waiting on the call eventfds
  int timeout_ms = 5000;   // per message round trip
};

class VhostUserBlk final : public BlkTransport {
 public:
  // Connects and negotiates (features, protocol features, queue count,
  // config). Clear errors for a missing socket or a backend that refuses.
  static absl::StatusOr<std::unique_ptr<VhostUserBlk>> Connect(const VhostUserOptions& o);
  ~VhostUserBlk() override;

  uint64_t features() const override { return features_; }
  const BlkConfig& config() const override { return config_; }
  uint16_t max_queues() const override { return max_queues_; }
  absl::StatusOr<uint8_t*> AllocateDma(size_t bytes) override;
  const DmaSpace* dma() const override { return &dma_; }
  absl::Status StartQueue(uint16_t q, const QueueAddresses& a) override;
  absl::Status Activate() override { return absl::OkStatus(); }
  bool Notify(uint16_t q) override;
  int interrupt_fd(uint16_t q) const override {
    return opts_.interrupts && q < call_fds_.size() ? call_fds_[q] : -1;
  }
  void AckInterrupt(uint16_t q) override;
  int hangup_fd() const override { return sock_; }
  absl::Status Health() override;

  uint64_t protocol_features() const { return protocol_features_; }
  int kick_fd(uint16_t q) const { return q < kick_fds_.size() ? kick_fds_[q] : -1; }

 private:
  explicit VhostUserBlk(const VhostUserOptions& o) : opts_(o) {}
  absl::Status Handshake();
  // Sends one message with at most one fd (SCM_RIGHTS), the standard way.
  absl::Status Send(const std::vector<uint8_t>& msg, int fd = -1);
  absl::StatusOr<std::vector<uint8_t>> Receive(uint32_t request, uint32_t min, uint32_t max);
  // Send + wait for the REPLY_ACK when it was negotiated.
  absl::Status SendAcked(uint32_t request, std::vector<uint8_t> msg, int fd = -1);
  absl::StatusOr<uint64_t> GetU64(uint32_t request);

  VhostUserOptions opts_;
  int sock_ = -1;
  uint64_t features_ = 0;
  uint64_t protocol_features_ = 0;
  uint16_t max_queues_ = 1;
  BlkConfig config_;
  std::optional<MemfdMemory> mem_;
  IdentityDma dma_;
  std::vector<int> kick_fds_;
  std::vector<int> call_fds_;
  bool dead_ = false;
};

}  // namespace vkick
