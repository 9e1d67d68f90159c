// The channel to vkickd: a unix socket (vhost-user drivers on the host) or a
// virtio-serial port inside a VM, found by its name in sysfs. Thin I/O; the
// framing is protocol/codec.h.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "protocol/codec.h"

namespace vkick::agent {

// /sys/class/virtio-ports/vportNpM/name == name -> "/dev/vportNpM".
// kNotFound when no port carries that name (no virtio-serial, or QEMU was
// started without `-device virtserialport,name=...`).
absl::StatusOr<std::string> FindVirtioPort(const std::string& name,
                                           const std::string& sysfs_root = "/sys/class/virtio-ports",
                                           const std::string& dev_root = "/dev");

// One connected byte stream, non-blocking. Outgoing frames are queued and
// flushed as the peer reads; at most kMaxQueuedBytes are queued (a peer that
// stops reading gets the connection dropped, the agent never grows memory).
class Connection {
 public:
  static constexpr size_t kMaxQueuedBytes = 8 * proto::kMaxFrame;

  static absl::StatusOr<Connection> ConnectUnix(const std::string& path);
  static absl::StatusOr<Connection> OpenPort(const std::string& dev_path);

  Connection(Connection&& o) noexcept;
  Connection& operator=(Connection&& o) noexcept;
  Connection(const Connection&) = delete;
  ~Connection();

  int fd() const { return fd_; }
  bool wants_write() const { return !out_.empty(); }

  // Queues one encoded frame and tries to flush.
  absl::Status Send(const std::vector<uint8_t>& frame);
  absl::Status Flush();
  // Reads what is available into the decoder. kUnavailable on EOF/error
  // (the peer went away), kDataLoss on a fatal framing error.
  absl::Status Receive(const proto::StreamDecoder::Sink& sink);

 private:
  Connection(int fd, bool is_socket) : fd_(fd), is_socket_(is_socket) {}
  int fd_ = -1;
  bool is_socket_ = true;
  std::vector<uint8_t> out_;
  proto::StreamDecoder decoder_;
};

}  // namespace vkick::agent
