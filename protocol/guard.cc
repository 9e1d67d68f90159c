#include "protocol/guard.h"

#include <algorithm>
#include <cstdio>

namespace vkick::proto {
namespace {
constexpr uint64_t kNano = 1'000'000'000;
}  // namespace

TokenBucket::TokenBucket(uint32_t rate_per_s, uint32_t burst, int64_t now_ns)
    : rate_per_s_(rate_per_s),
      capacity_(uint64_t{std::max<uint32_t>(burst, 1)} * kNano),
      tokens_(capacity_),
      last_ns_(now_ns) {}

void TokenBucket::Refill(int64_t now_ns) {
  if (now_ns <= last_ns_) return;  // a clock that stands still or steps back adds nothing
  // Cap the elapsed time before multiplying: no overflow after a long idle.
  const uint64_t full_after_ns =
      rate_per_s_ ? capacity_ / rate_per_s_ + 1 : UINT64_MAX;
  const uint64_t elapsed = std::min<uint64_t>(static_cast<uint64_t>(now_ns - last_ns_),
                                              full_after_ns);
  tokens_ = std::min(capacity_, tokens_ + elapsed * rate_per_s_);
  last_ns_ = now_ns;
}

bool TokenBucket::TryTake(int64_t now_ns) {
  Refill(now_ns);
  if (tokens_ < kNano) return false;
  tokens_ -= kNano;
  return true;
}

RejectionWindow::RejectionWindow(uint32_t k, int64_t window_ns)
    : ring_(std::max<uint32_t>(k, 1)), window_ns_(window_ns) {}

bool RejectionWindow::Record(int64_t now_ns) {
  ring_[next_] = now_ns;
  next_ = (next_ + 1) % ring_.size();
  filled_ = std::min(filled_ + 1, ring_.size());
  if (filled_ < ring_.size()) return false;
  const int64_t oldest = ring_[next_];  // the K-th most recent
  return now_ns - oldest < window_ns_;
}

std::string FormatPciAddress(uint16_t domain, uint8_t bus, uint8_t devfn) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.%x", domain, bus, devfn >> 3, devfn & 7);
  return buf;
}

ConnectionGuard::ConnectionGuard(GuardConfig config, std::vector<KnownDevice> known,
                                 int64_t now_ns)
    : config_(config),
      known_(std::move(known)),
      bucket_(config.frames_per_s, config.burst, now_ns),
      window_(config.max_rejections, config.rejection_window_ns) {}

uint64_t ConnectionGuard::total_rejections() const {
  uint64_t t = 0;
  for (uint64_t c : counts_) t += c;
  return t;
}

ConnectionGuard::Verdict ConnectionGuard::Reject(Rejection r, int64_t now_ns) {
  ++counts_[static_cast<size_t>(r)];
  if (IsFatal(r) || window_.Record(now_ns)) {
    dropped_ = true;
    return Verdict::kDrop;
  }
  return Verdict::kReject;
}

ConnectionGuard::Verdict ConnectionGuard::Admit(const DecodeResult& frame, int64_t now_ns) {
  if (dropped_) return Verdict::kDrop;
  // Framing loss drops at once, even when the bucket is empty.
  if (IsFatal(frame.error)) return Reject(frame.error, now_ns);
  // Every frame costs a token, rejected ones too: a flood of garbage is a
  // flood.
  if (!bucket_.TryTake(now_ns)) return Reject(Rejection::kRateLimited, now_ns);
  if (frame.error != Rejection::kNone) return Reject(frame.error, now_ns);
  if (!frame.message) return Reject(Rejection::kTruncated, now_ns);  // not produced by the decoder
  const Message& m = *frame.message;
  switch (TypeOf(m)) {
    case MsgType::kHello:
      return OnHello(std::get<Hello>(m), now_ns);
    case MsgType::kSample:
      return OnSample(std::get<Sample>(m), now_ns);
    case MsgType::kAck:
      return hello_seen_ ? Verdict::kAccept : Reject(Rejection::kUnexpectedType, now_ns);
    case MsgType::kError:
      return Verdict::kAccept;
    case MsgType::kBye:
      // The announcement ends (see announcements()): the mapping and the
      // sample sequence go with it; the budgets stay.
      hello_seen_ = false;
      bindings_.clear();
      last_seq_.reset();
      unmapped_devices_ = 0;
      return Verdict::kAccept;
    case MsgType::kPolicy:  // host -> guest only
      break;
  }
  return Reject(Rejection::kUnexpectedType, now_ns);
}

ConnectionGuard::Verdict ConnectionGuard::OnHello(const Hello& h, int64_t now_ns) {
  // One hello per announcement: the queue map is fixed until a bye, so a
  // guest cannot grow host state by re-announcing (a new hello replaces it).
  if (hello_seen_) return Reject(Rejection::kUnexpectedType, now_ns);
  uint32_t queues = 0;
  for (const GuestDevice& d : h.devices) queues += d.num_queues;
  if (queues > config_.max_queues) return Reject(Rejection::kTooManyQueues, now_ns);

  hello_seen_ = true;
  ++announcements_;
  std::vector<bool> taken(known_.size(), false);
  bindings_.reserve(h.devices.size());
  for (const GuestDevice& d : h.devices) {
    Binding b;
    b.guest_queues = d.num_queues;
    const std::string pci = FormatPciAddress(d.pci_domain, d.pci_bus, d.pci_devfn);
    // PCI address first (the guest sees the same bus/slot/function the
    // firmware assigned and query-pci reports); the serial as a fallback.
    // A known device binds at most once, so two guest entries cannot alias it.
    for (int pass = 0; pass < 2 && !b.known_index; ++pass) {
      for (size_t k = 0; k < known_.size(); ++k) {
        if (taken[k]) continue;
        const bool match = pass == 0 ? known_[k].pci_address == pci
                                     : !d.serial.empty() && known_[k].serial == d.serial;
        if (match) {
          b.known_index = k;
          taken[k] = true;
          break;
        }
      }
    }
    if (!b.known_index) ++unmapped_devices_;
    bindings_.push_back(b);
  }
  return Verdict::kAccept;
}

ConnectionGuard::Verdict ConnectionGuard::OnSample(const Sample& s, int64_t now_ns) {
  if (!hello_seen_) return Reject(Rejection::kUnexpectedType, now_ns);
  if (last_seq_ && s.seq <= *last_seq_) return Reject(Rejection::kBadSequence, now_ns);
  for (const QueueSample& q : s.queues) {
    // Only queues the hello declared; unmapped-but-declared ones are fine
    // (the guest cannot know what discovery found) and Resolve() skips them.
    if (q.ref.device_index >= bindings_.size() ||
        q.ref.queue_index >= bindings_[q.ref.device_index].guest_queues)
      return Reject(Rejection::kUnknownQueue, now_ns);
  }
  last_seq_ = s.seq;
  return Verdict::kAccept;
}

std::optional<HostQueue> ConnectionGuard::Resolve(QueueRef ref) const {
  if (ref.device_index >= bindings_.size()) return std::nullopt;
  const Binding& b = bindings_[ref.device_index];
  if (!b.known_index || ref.queue_index >= b.guest_queues) return std::nullopt;
  const KnownDevice& k = known_[*b.known_index];
  if (ref.queue_index >= k.num_queues) return std::nullopt;
  return HostQueue{k.device_id, ref.queue_index};
}

size_t ConnectionGuard::mapped_queues() const {
  size_t n = 0;
  for (const Binding& b : bindings_)
    if (b.known_index) n += std::min(b.guest_queues, known_[*b.known_index].num_queues);
  return n;
}

std::string_view VerdictName(ConnectionGuard::Verdict v) {
  switch (v) {
    case ConnectionGuard::Verdict::kAccept: return "accept";
    case ConnectionGuard::Verdict::kReject: return "reject";
    case ConnectionGuard::Verdict::kDrop: return "drop";
  }
  return "unknown";
}

}  // namespace vkick::proto
