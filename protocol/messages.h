// The guest <-> host channel protocol (docs/protocol.md): constants, message
// structs and the closed set of rejection reasons.
//
// Dependency-free on purpose (std only): the same sources are compiled into
// vkickd (g++), the static guest agent, and the clang libFuzzer target
// (tests/fuzz/run.sh), which must not need an Abseil built with clang.
// Errors are therefore a small enum (Rejection), not absl::Status; the enum
// doubles as the bounded `reason` label of the rejection counters.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace vkick::proto {

// ---- framing ---------------------------------------------------------------
// Header, little-endian: magic "VKCK" (4 bytes), version u16, type u16,
// payload length u32. 12 bytes, then `length` payload bytes.
inline constexpr std::array<uint8_t, 4> kMagic = {'V', 'K', 'C', 'K'};
// v2: hello devices carry `driver` (v1 had none; a v1 frame is bad_version).
// v3: samples carry `asks` and `suppressed` (event-idx decisions); policies
// may batch under event-idx (mode event-idx with B > 1).
inline constexpr uint16_t kVersion = 3;
inline constexpr size_t kHeaderSize = 12;

enum class MsgType : uint16_t {
  kHello = 1,   // guest -> host, first message, exactly once
  kSample = 2,  // guest -> host, once per interval
  kPolicy = 3,  // host -> guest
  kAck = 4,     // guest -> host: a policy generation is applied
  kError = 5,   // either way
  kBye = 6,     // either way: orderly close
};

// ---- bounds (every one is checked by Validate) -----------------------------
inline constexpr size_t kMaxAgentIdLen = 64;
inline constexpr size_t kMaxKernelLen = 128;
inline constexpr size_t kMaxSerialLen = 20;       // VIRTIO_BLK_ID_BYTES
inline constexpr size_t kMaxErrorTextLen = 200;
inline constexpr uint16_t kMaxDevices = 16;       // per hello
inline constexpr uint16_t kMaxQueuesPerDevice = 64;
inline constexpr uint16_t kMaxQueues = 64;        // per hello / sample / policy
inline constexpr uint16_t kMaxQueueSize = 32768;  // virtio's maximum ring size
inline constexpr uint16_t kMaxBatch = 256;
inline constexpr uint32_t kMinDeferNs = 1'000;        // batch > 1 needs a timer
inline constexpr uint32_t kMaxDeferNs = 1'000'000;    // a deferred kick waits <= 1 ms
inline constexpr uint64_t kMinLeaseNs = 10'000'000;   // 10 ms
inline constexpr uint64_t kMaxLeaseNs = 60'000'000'000;  // 60 s
inline constexpr uint64_t kMinIntervalNs = 1'000'000;         // 1 ms
inline constexpr uint64_t kMaxIntervalNs = 60'000'000'000;    // 60 s
// Counters are bounded by the interval: at most one event per 10 ns per queue
// (100 M/s), far above any real virtqueue, far below u64 overflow in sums.
inline constexpr uint64_t kMinNsPerEvent = 10;

// Depth histogram: bucket i counts submissions that found d requests
// outstanding in the driver (kicked or not, the new one included, so d >= 1):
// bucket 0: d = 1; bucket i in 1..8: 2^i <= d < 2^(i+1); bucket 9: d >= 512.
inline constexpr size_t kDepthBuckets = 10;
// Latency histogram (submit -> completion seen by the driver): bucket 0:
// < 1 us; bucket i in 1..14: [2^(i-1), 2^i) us; bucket 15: >= 16.384 ms.
inline constexpr size_t kLatencyBuckets = 16;

size_t DepthBucket(uint32_t depth);
size_t LatencyBucket(uint64_t latency_ns);
// Upper bound (exclusive) of a latency bucket in ns; for the open last
// bucket, twice its lower bound (a nominal value for percentiles).
uint64_t LatencyBucketUpperNs(size_t bucket);
// The q-quantile (0 < q <= 1) of a latency histogram as the upper bound of the
// bucket that holds it: conservative (never under-reports). 0 when empty.
uint64_t LatencyQuantileNs(const std::array<uint64_t, kLatencyBuckets>& hist, double q);

// ---- messages ---------------------------------------------------------------
// A virtio device as the guest sees it. The host never uses anything here as
// a label: it only *matches* it against what discovery found (guard.h).
// Who drives a device in the guest. vkick-blk's queues and those of the
// vkick_virtio_blk kernel module (docs/kernel-driver.md) follow the host's
// policies; the kernel's own virtio_blk is only observed (depth and latency
// from block tracepoints): the host never sends it a policy. A new kind is a
// new value, not a new version: the decoder checks the value, so only a
// hello naming it is refused by an older host (docs/protocol.md).
enum class DriverKind : uint8_t { kVkickBlk = 0, kKernel = 1, kVkickVirtioBlk = 2 };
inline constexpr uint8_t kMaxDriverKind = 2;
std::string_view DriverKindName(DriverKind k);  // "vkick-blk", "kernel", "vkick-virtio-blk"
// The host sends no policy to a device of this kind (only kKernel).
constexpr bool IsObserveOnly(DriverKind k) { return k == DriverKind::kKernel; }

struct GuestDevice {
  uint16_t pci_domain = 0;
  uint8_t pci_bus = 0;
  uint8_t pci_devfn = 0;       // (slot << 3) | function
  std::string serial;          // virtio-blk serial, may be empty
  uint16_t num_queues = 1;     // 1..kMaxQueuesPerDevice
  uint16_t queue_size = 256;   // 1..kMaxQueueSize
  DriverKind driver = DriverKind::kVkickBlk;
  friend bool operator==(const GuestDevice&, const GuestDevice&) = default;
};

struct Hello {
  std::string agent_id;  // 1..64 bytes of [A-Za-z0-9._:-]
  std::string kernel;    // 0..128 printable ASCII bytes (uname -r)
  std::vector<GuestDevice> devices;  // sum of num_queues <= kMaxQueues
  friend bool operator==(const Hello&, const Hello&) = default;
};

// Queues are addressed as (index into the hello's device list, queue index).
struct QueueRef {
  uint16_t device_index = 0;
  uint16_t queue_index = 0;
  friend bool operator==(const QueueRef&, const QueueRef&) = default;
};

enum class KickMode : uint8_t { kImmediate = 0, kEventIdx = 1, kStatic = 2, kAdaptive = 3 };
inline constexpr uint8_t kMaxKickMode = 3;
std::string_view KickModeName(KickMode m);  // "immediate", "event-idx", ...

enum class LeaseState : uint8_t {
  kNone = 0,     // no policy received yet: the driver's own default
  kActive = 1,   // the policy `generation` applies and its lease runs
  kExpired = 2,  // the lease ran out: fell back to the default
};
inline constexpr uint8_t kMaxLeaseState = 2;
std::string_view LeaseStateName(LeaseState s);  // "none", "active", "expired"

struct QueueSample {
  QueueRef ref;
  uint64_t interval_ns = 0;   // kMinIntervalNs..kMaxIntervalNs
  uint64_t requests = 0;      // submitted in the interval
  uint64_t kicks = 0;         // notify writes actually performed
  uint64_t timer_kicks = 0;   // of those, kicks fired by the deferral timer T
  uint64_t completed = 0;
  // Event-idx decisions put to the device (a batch closed, or a request under
  // plain event-idx), and of those the ones where it wanted no kick: a
  // device that polls suppresses most, one that sleeps few.
  uint64_t asks = 0;        // <= requests
  uint64_t suppressed = 0;  // <= asks
  std::array<uint64_t, kDepthBuckets> depth_hist{};    // sums to requests
  std::array<uint64_t, kLatencyBuckets> latency_hist{};  // sums to completed
  uint32_t mean_depth_milli = 0;  // mean depth x 1000; 0 iff requests == 0
  uint16_t max_depth = 0;         // <= kMaxQueueSize
  LeaseState lease = LeaseState::kNone;
  KickMode applied_mode = KickMode::kImmediate;
  uint16_t applied_batch = 1;
  uint32_t applied_defer_ns = 0;
  uint64_t applied_generation = 0;  // 0 iff lease == kNone
  friend bool operator==(const QueueSample&, const QueueSample&) = default;
};

struct Sample {
  uint64_t seq = 0;  // strictly increasing per connection (guard checks)
  std::vector<QueueSample> queues;  // 0..kMaxQueues, no duplicate refs
  friend bool operator==(const Sample&, const Sample&) = default;
};

struct QueuePolicy {
  QueueRef ref;
  KickMode mode = KickMode::kImmediate;
  uint16_t batch = 1;        // immediate: 1; static, event-idx: 1..kMaxBatch
  uint32_t defer_ns = 0;     // batch 1: 0; batch > 1: kMinDeferNs..kMaxDeferNs
  uint64_t lease_ns = 0;     // kMinLeaseNs..kMaxLeaseNs
  uint64_t generation = 0;   // >= 1, increases with every change
  friend bool operator==(const QueuePolicy&, const QueuePolicy&) = default;
};

struct Policy {
  std::vector<QueuePolicy> queues;  // 1..kMaxQueues, no duplicate refs
  friend bool operator==(const Policy&, const Policy&) = default;
};

struct Ack {
  uint64_t generation = 0;  // >= 1
  friend bool operator==(const Ack&, const Ack&) = default;
};

enum class ErrorCode : uint16_t {
  kUnspecified = 0,
  kProtocol = 1,        // the peer's message was rejected
  kUnsupported = 2,     // e.g. a mode the driver cannot do
  kUnknownQueue = 3,
  kRateLimited = 4,
  kInternal = 5,
};
inline constexpr uint16_t kMaxErrorCode = 5;

struct Error {
  ErrorCode code = ErrorCode::kUnspecified;
  std::string text;  // 0..kMaxErrorTextLen printable ASCII
  friend bool operator==(const Error&, const Error&) = default;
};

enum class ByeReason : uint16_t { kShutdown = 0, kRestart = 1, kDropped = 2 };
inline constexpr uint16_t kMaxByeReason = 2;

struct Bye {
  ByeReason reason = ByeReason::kShutdown;
  friend bool operator==(const Bye&, const Bye&) = default;
};

using Message = std::variant<Hello, Sample, Policy, Ack, Error, Bye>;
MsgType TypeOf(const Message& m);

// ---- rejections ---------------------------------------------------------------
// One closed set for the decoder, the validator and the host guard, so a
// rejection counter per reason is a fixed-size array and the `reason` label
// has a bounded set of values.
enum class Rejection : uint8_t {
  kNone = 0,
  // framing (fatal: the stream can no longer be framed; drop the connection)
  kBadMagic,
  kBadVersion,
  kOversized,        // length above the type's maximum payload
  // per message (the frame is skipped, the stream stays in sync)
  kBadType,          // unknown message type
  kTruncated,        // payload shorter than its fields, or stream ended mid-frame
  kTrailingBytes,    // payload longer than its fields
  kFieldOutOfRange,
  kBadString,        // length out of range or a disallowed byte
  kTooManyQueues,
  kDuplicateQueue,
  kInconsistent,     // histograms vs counters, depth vs mean, lease vs generation
  // host guard (guard.h)
  kRateLimited,
  kUnexpectedType,   // wrong direction or order (sample before hello, 2nd hello)
  kUnknownQueue,     // a queue outside the hello's declared devices/queues
  kBadSequence,      // sample seq not increasing
  // host channel (controller/channel): a hello naming a device another agent
  // owns (registered first and still connected). Host-side only, never on the
  // wire: adding it changes no frame.
  kDeviceOwned,
  kCount,            // not a reason: the number of reasons
};
inline constexpr size_t kRejectionCount = static_cast<size_t>(Rejection::kCount);
std::string_view RejectionName(Rejection r);  // "bad_magic", ... (metric label)
bool IsFatal(Rejection r);

// ---- sizes ---------------------------------------------------------------------
inline constexpr size_t kGuestDeviceMaxWire = 2 + 1 + 1 + 1 + kMaxSerialLen + 2 + 2 + 1 + 1;
inline constexpr size_t kHelloMaxPayload =
    1 + kMaxAgentIdLen + 1 + kMaxKernelLen + 2 + kMaxDevices * kGuestDeviceMaxWire;
inline constexpr size_t kQueueSampleWire =
    2 + 2 + 7 * 8 + kDepthBuckets * 8 + kLatencyBuckets * 8 + 4 + 2 + 1 + 1 + 2 + 2 + 4 + 8;
inline constexpr size_t kSampleMaxPayload = 8 + 2 + 2 + kMaxQueues * kQueueSampleWire;
inline constexpr size_t kQueuePolicyWire = 2 + 2 + 1 + 1 + 2 + 4 + 8 + 8;
inline constexpr size_t kPolicyMaxPayload = 2 + 2 + kMaxQueues * kQueuePolicyWire;
inline constexpr size_t kAckPayload = 8;
inline constexpr size_t kErrorMaxPayload = 2 + 1 + kMaxErrorTextLen;
inline constexpr size_t kByePayload = 2;
// The largest frame of any type; a decoder never buffers more than this.
inline constexpr size_t kMaxPayload = kSampleMaxPayload;
inline constexpr size_t kMaxFrame = kHeaderSize + kMaxPayload;
static_assert(kQueueSampleWire == 292);
static_assert(kMaxFrame == 18712, "update docs/protocol.md when the bounds change");

// The maximum payload for a known type; 0 for an unknown one.
size_t MaxPayload(uint16_t type);

}  // namespace vkick::proto
