// Host-side guard for one guest connection (docs/protocol.md, "The host's
// guard"). The guest is hostile: the guard rate-limits frames, counts every
// rejection by reason, decides when to drop the connection, and maps the
// guest's queue addresses onto queues discovery found, never the other way.
// Pure: time is an argument (ns on any monotonic clock), no I/O.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "protocol/codec.h"
#include "protocol/messages.h"

namespace vkick::proto {

// Token bucket over nano-tokens (integer math: no drift, no float rounding).
class TokenBucket {
 public:
  // rate_per_s tokens per second, at most `burst` stored; starts full.
  TokenBucket(uint32_t rate_per_s, uint32_t burst, int64_t now_ns);
  bool TryTake(int64_t now_ns);

 private:
  void Refill(int64_t now_ns);
  uint64_t rate_per_s_;
  uint64_t capacity_;  // burst x 1e9
  uint64_t tokens_;    // nano-tokens
  int64_t last_ns_;
};

// "K rejections within W" over a ring of the last K rejection times.
class RejectionWindow {
 public:
  RejectionWindow(uint32_t k, int64_t window_ns);
  // Records one rejection; true when it is the K-th within the window.
  bool Record(int64_t now_ns);

 private:
  std::vector<int64_t> ring_;
  size_t next_ = 0;
  size_t filled_ = 0;
  int64_t window_ns_;
};

// A device discovery found (the daemon converts its VirtioDeviceInfo).
struct KnownDevice {
  uint16_t device_id = 0;
  std::string pci_address;  // "0000:00:04.0", as QMP query-pci gives it
  std::string serial;       // virtio-blk serial property, "" when unset/unknown
  uint16_t num_queues = 0;
};

// A queue as the host names it: label values come from discovery's device.
struct HostQueue {
  uint16_t device_id = 0;
  uint16_t queue = 0;
  friend bool operator==(const HostQueue&, const HostQueue&) = default;
};

struct GuardConfig {
  uint32_t frames_per_s = 20;   // an agent sends ~1 sample/s plus acks
  uint32_t burst = 40;
  uint32_t max_rejections = 10;           // K ...
  int64_t rejection_window_ns = 60'000'000'000;  // ... within W: drop
  uint32_t max_queues = kMaxQueues;       // distinct queues one guest may report
};

// "0000:00:04.0" from the guest's PCI coordinates (the query-pci format).
std::string FormatPciAddress(uint16_t domain, uint8_t bus, uint8_t devfn);

class ConnectionGuard {
 public:
  enum class Verdict : uint8_t { kAccept, kReject, kDrop };

  ConnectionGuard(GuardConfig config, std::vector<KnownDevice> known, int64_t now_ns);

  // Every frame the StreamDecoder yields, message or rejection, goes through
  // here in order. kAccept: act on the message. kReject: ignore it (counted).
  // kDrop: close the connection (and every later call says kDrop).
  Verdict Admit(const DecodeResult& frame, int64_t now_ns);

  // After an accepted hello: the host queue a guest ref maps onto, or nullopt
  // when the guest's device/queue matches nothing discovery found (its data is
  // then ignored, never labelled).
  std::optional<HostQueue> Resolve(QueueRef ref) const;

  uint64_t rejections(Rejection r) const { return counts_[static_cast<size_t>(r)]; }
  uint64_t total_rejections() const;
  bool dropped() const { return dropped_; }
  bool hello_seen() const { return hello_seen_; }
  // Announcements (hellos) accepted so far. A bye ends one: the next frame
  // must be a new hello, whose device list replaces the old mapping. A
  // virtio-serial port is one host stream for the VM's life: the agent's
  // close/reopen of the port to re-announce (driver set changed) does not
  // close it. Rate limit and rejection window carry over, so bye + hello
  // cannot launder a flood.
  uint64_t announcements() const { return announcements_; }
  size_t mapped_queues() const;
  // Devices from the hello that matched nothing discovery found.
  uint32_t unmapped_devices() const { return unmapped_devices_; }

 private:
  Verdict Reject(Rejection r, int64_t now_ns);
  Verdict OnHello(const Hello& h, int64_t now_ns);
  Verdict OnSample(const Sample& s, int64_t now_ns);

  GuardConfig config_;
  std::vector<KnownDevice> known_;
  TokenBucket bucket_;
  RejectionWindow window_;
  std::array<uint64_t, kRejectionCount> counts_{};
  bool dropped_ = false;
  bool hello_seen_ = false;
  uint64_t announcements_ = 0;
  std::optional<uint64_t> last_seq_;
  // Per hello device: its queue count and the known device it maps onto.
  struct Binding {
    uint16_t guest_queues = 0;
    std::optional<size_t> known_index;
  };
  std::vector<Binding> bindings_;
  uint32_t unmapped_devices_ = 0;
};

std::string_view VerdictName(ConnectionGuard::Verdict v);

}  // namespace vkick::proto
