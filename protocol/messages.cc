#include "protocol/messages.h"

#include <bit>
#include <cmath>

namespace vkick::proto {

size_t DepthBucket(uint32_t depth) {
  if (depth <= 1) return 0;
  const size_t b = static_cast<size_t>(std::bit_width(depth)) - 1;  // floor(log2)
  return b < kDepthBuckets - 1 ? b : kDepthBuckets - 1;
}

size_t LatencyBucket(uint64_t latency_ns) {
  const uint64_t us = latency_ns / 1000;
  if (us == 0) return 0;
  const size_t b = static_cast<size_t>(std::bit_width(us));  // us in [2^(b-1), 2^b)
  return b < kLatencyBuckets - 1 ? b : kLatencyBuckets - 1;
}

uint64_t LatencyBucketUpperNs(size_t bucket) {
  if (bucket >= kLatencyBuckets - 1) return (uint64_t{1} << kLatencyBuckets) * 1000;
  return (uint64_t{1} << bucket) * 1000;
}

uint64_t LatencyQuantileNs(const std::array<uint64_t, kLatencyBuckets>& hist, double q) {
  uint64_t total = 0;
  for (uint64_t c : hist) total += c;
  if (total == 0) return 0;
  // Rank of the quantile, 1-based: the smallest bucket whose cumulative count
  // reaches it.
  double rank = std::ceil(q * static_cast<double>(total));
  if (rank < 1) rank = 1;
  uint64_t cum = 0;
  for (size_t i = 0; i < kLatencyBuckets; ++i) {
    cum += hist[i];
    if (static_cast<double>(cum) >= rank) return LatencyBucketUpperNs(i);
  }
  return LatencyBucketUpperNs(kLatencyBuckets - 1);
}

std::string_view LeaseStateName(LeaseState s) {
  switch (s) {
    case LeaseState::kNone: return "none";
    case LeaseState::kActive: return "active";
    case LeaseState::kExpired: return "expired";
  }
  return "?";
}

std::string_view KickModeName(KickMode m) {
  switch (m) {
    case KickMode::kImmediate: return "immediate";
    case KickMode::kEventIdx: return "event-idx";
    case KickMode::kStatic: return "static";
    case KickMode::kAdaptive: return "adaptive";
  }
  return "unknown";
}

MsgType TypeOf(const Message& m) {
  return static_cast<MsgType>(m.index() + 1);  // variant order == type numbers
}
static_assert(std::variant_size_v<Message> == 6);

std::string_view DriverKindName(DriverKind k) {
  switch (k) {
    case DriverKind::kVkickBlk: return "vkick-blk";
    case DriverKind::kKernel: return "kernel";
    case DriverKind::kVkickVirtioBlk: return "vkick-virtio-blk";
  }
  return "unknown";
}

std::string_view RejectionName(Rejection r) {
  switch (r) {
    case Rejection::kNone: return "none";
    case Rejection::kBadMagic: return "bad_magic";
    case Rejection::kBadVersion: return "bad_version";
    case Rejection::kOversized: return "oversized";
    case Rejection::kBadType: return "bad_type";
    case Rejection::kTruncated: return "truncated";
    case Rejection::kTrailingBytes: return "trailing_bytes";
    case Rejection::kFieldOutOfRange: return "field_out_of_range";
    case Rejection::kBadString: return "bad_string";
    case Rejection::kTooManyQueues: return "too_many_queues";
    case Rejection::kDuplicateQueue: return "duplicate_queue";
    case Rejection::kInconsistent: return "inconsistent";
    case Rejection::kRateLimited: return "rate_limited";
    case Rejection::kUnexpectedType: return "unexpected_type";
    case Rejection::kUnknownQueue: return "unknown_queue";
    case Rejection::kBadSequence: return "bad_sequence";
    case Rejection::kDeviceOwned: return "device_owned";
    case Rejection::kCount: break;
  }
  return "unknown";
}

bool IsFatal(Rejection r) {
  return r == Rejection::kBadMagic || r == Rejection::kBadVersion || r == Rejection::kOversized;
}

size_t MaxPayload(uint16_t type) {
  switch (static_cast<MsgType>(type)) {
    case MsgType::kHello: return kHelloMaxPayload;
    case MsgType::kSample: return kSampleMaxPayload;
    case MsgType::kPolicy: return kPolicyMaxPayload;
    case MsgType::kAck: return kAckPayload;
    case MsgType::kError: return kErrorMaxPayload;
    case MsgType::kBye: return kByePayload;
  }
  return 0;
}

}  // namespace vkick::proto
