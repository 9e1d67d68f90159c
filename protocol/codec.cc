#include "protocol/codec.h"

#include <bitset>
#include <type_traits>

namespace vkick::proto {
namespace {

// ---- validation ---------------------------------------------------------------

bool IsIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == ':' || c == '-';
}
bool IsPrintable(char c) { return c >= 0x20 && c <= 0x7e; }

Rejection CheckString(const std::string& s, size_t min, size_t max, bool (*ok)(char)) {
  if (s.size() < min || s.size() > max) return Rejection::kBadString;
  for (char c : s)
    if (!ok(c)) return Rejection::kBadString;
  return Rejection::kNone;
}

// Detects a repeated (device_index, queue_index) among refs already range
// checked (device_index < kMaxDevices, queue_index < kMaxQueuesPerDevice).
class RefSet {
 public:
  bool Insert(QueueRef r) {
    const size_t bit = size_t{r.device_index} * kMaxQueuesPerDevice + r.queue_index;
    if (seen_.test(bit)) return false;
    seen_.set(bit);
    return true;
  }

 private:
  std::bitset<size_t{kMaxDevices} * kMaxQueuesPerDevice> seen_;
};

bool RefInRange(QueueRef r) {
  return r.device_index < kMaxDevices && r.queue_index < kMaxQueuesPerDevice;
}

Rejection ValidateHello(const Hello& h) {
  if (auto r = CheckString(h.agent_id, 1, kMaxAgentIdLen, IsIdChar); r != Rejection::kNone)
    return r;
  if (auto r = CheckString(h.kernel, 0, kMaxKernelLen, IsPrintable); r != Rejection::kNone)
    return r;
  if (h.devices.size() > kMaxDevices) return Rejection::kTooManyQueues;
  uint32_t total_queues = 0;
  for (size_t i = 0; i < h.devices.size(); ++i) {
    const GuestDevice& d = h.devices[i];
    if (auto r = CheckString(d.serial, 0, kMaxSerialLen,
                             [](char c) { return c > 0x20 && c <= 0x7e; });
        r != Rejection::kNone)
      return r;
    if (d.num_queues < 1 || d.num_queues > kMaxQueuesPerDevice) return Rejection::kFieldOutOfRange;
    if (d.queue_size < 1 || d.queue_size > kMaxQueueSize) return Rejection::kFieldOutOfRange;
    if (static_cast<uint8_t>(d.driver) > kMaxDriverKind) return Rejection::kFieldOutOfRange;
    total_queues += d.num_queues;
    // Two entries for one PCI function (or one serial) would let a guest
    // alias a host queue under two refs.
    for (size_t j = 0; j < i; ++j) {
      const GuestDevice& o = h.devices[j];
      if (o.pci_domain == d.pci_domain && o.pci_bus == d.pci_bus && o.pci_devfn == d.pci_devfn)
        return Rejection::kDuplicateQueue;
      if (!d.serial.empty() && o.serial == d.serial) return Rejection::kDuplicateQueue;
    }
  }
  if (total_queues > kMaxQueues) return Rejection::kTooManyQueues;
  return Rejection::kNone;
}

// Sum with saturation: histogram buckets are attacker-chosen u64s.
uint64_t SatSum(const auto& arr) {
  uint64_t s = 0;
  for (uint64_t v : arr) s = (v > UINT64_MAX - s) ? UINT64_MAX : s + v;
  return s;
}

Rejection ValidateQueueSample(const QueueSample& q) {
  if (!RefInRange(q.ref)) return Rejection::kFieldOutOfRange;
  if (q.interval_ns < kMinIntervalNs || q.interval_ns > kMaxIntervalNs)
    return Rejection::kFieldOutOfRange;
  const uint64_t max_events = q.interval_ns / kMinNsPerEvent;
  if (q.requests > max_events || q.kicks > max_events || q.completed > max_events)
    return Rejection::kFieldOutOfRange;
  if (q.timer_kicks > q.kicks) return Rejection::kFieldOutOfRange;
  if (q.asks > q.requests || q.suppressed > q.asks) return Rejection::kFieldOutOfRange;
  if (q.max_depth > kMaxQueueSize) return Rejection::kFieldOutOfRange;
  if (static_cast<uint8_t>(q.lease) > kMaxLeaseState) return Rejection::kFieldOutOfRange;
  if (static_cast<uint8_t>(q.applied_mode) > kMaxKickMode) return Rejection::kFieldOutOfRange;
  if (q.applied_batch < 1 || q.applied_batch > kMaxBatch) return Rejection::kFieldOutOfRange;
  if (q.applied_defer_ns > kMaxDeferNs) return Rejection::kFieldOutOfRange;

  if (SatSum(q.depth_hist) != q.requests) return Rejection::kInconsistent;
  if (SatSum(q.latency_hist) != q.completed) return Rejection::kInconsistent;
  if (q.requests == 0) {
    if (q.mean_depth_milli != 0 || q.max_depth != 0) return Rejection::kInconsistent;
  } else {
    if (q.max_depth == 0) return Rejection::kInconsistent;
    if (q.mean_depth_milli < 1000 || q.mean_depth_milli > uint32_t{q.max_depth} * 1000)
      return Rejection::kInconsistent;
    // No submission can have seen a depth above max_depth.
    for (size_t b = DepthBucket(q.max_depth) + 1; b < kDepthBuckets; ++b)
      if (q.depth_hist[b] != 0) return Rejection::kInconsistent;
  }
  if ((q.lease == LeaseState::kNone) != (q.applied_generation == 0))
    return Rejection::kInconsistent;
  return Rejection::kNone;
}

Rejection ValidateSample(const Sample& s) {
  if (s.queues.size() > kMaxQueues) return Rejection::kTooManyQueues;
  RefSet seen;
  for (const QueueSample& q : s.queues) {
    if (auto r = ValidateQueueSample(q); r != Rejection::kNone) return r;
    if (!seen.Insert(q.ref)) return Rejection::kDuplicateQueue;
  }
  return Rejection::kNone;
}

Rejection ValidateQueuePolicy(const QueuePolicy& p) {
  if (!RefInRange(p.ref)) return Rejection::kFieldOutOfRange;
  if (static_cast<uint8_t>(p.mode) > kMaxKickMode) return Rejection::kFieldOutOfRange;
  if (p.mode == KickMode::kImmediate) {
    if (p.batch != 1 || p.defer_ns != 0) return Rejection::kFieldOutOfRange;
  } else {
    if (p.batch < 1 || p.batch > kMaxBatch) return Rejection::kFieldOutOfRange;
    if (p.defer_ns > kMaxDeferNs) return Rejection::kFieldOutOfRange;
    // A batch above 1 without a timer could strand a partial batch forever.
    if (p.batch > 1 && p.defer_ns < kMinDeferNs) return Rejection::kFieldOutOfRange;
  }
  if (p.lease_ns < kMinLeaseNs || p.lease_ns > kMaxLeaseNs) return Rejection::kFieldOutOfRange;
  if (p.generation == 0) return Rejection::kFieldOutOfRange;
  return Rejection::kNone;
}

Rejection ValidatePolicy(const Policy& p) {
  if (p.queues.empty()) return Rejection::kFieldOutOfRange;
  if (p.queues.size() > kMaxQueues) return Rejection::kTooManyQueues;
  RefSet seen;
  for (const QueuePolicy& q : p.queues) {
    if (auto r = ValidateQueuePolicy(q); r != Rejection::kNone) return r;
    if (!seen.Insert(q.ref)) return Rejection::kDuplicateQueue;
  }
  return Rejection::kNone;
}

// ---- wire primitives ------------------------------------------------------------

class Writer {
 public:
  explicit Writer(std::vector<uint8_t>& out) : out_(out) {}
  template <typename T>
  void Put(T v) {
    static_assert(std::is_unsigned_v<T>);
    for (size_t i = 0; i < sizeof(T); ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  void PutStr8(const std::string& s) {
    Put<uint8_t>(static_cast<uint8_t>(s.size()));
    out_.insert(out_.end(), s.begin(), s.end());
  }

 private:
  std::vector<uint8_t>& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  template <typename T>
  T Get() {
    static_assert(std::is_unsigned_v<T>);
    if (in_.size() - pos_ < sizeof(T)) {
      short_ = true;
      pos_ = in_.size();
      return 0;
    }
    T v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(T{in_[pos_ + i]} << (8 * i));
    pos_ += sizeof(T);
    return v;
  }
  // A u8-length-prefixed string; a length above `max` is rejected before
  // anything is copied.
  bool GetStr8(std::string& s, size_t max) {
    const size_t n = Get<uint8_t>();
    if (short_) return true;
    if (n > max) return false;
    if (in_.size() - pos_ < n) {
      short_ = true;
      pos_ = in_.size();
      return true;
    }
    s.assign(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  bool short_read() const { return short_; }
  bool at_end() const { return pos_ == in_.size(); }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  bool short_ = false;
};

template <typename T>
uint8_t U8(T e) { return static_cast<uint8_t>(e); }

void EncodeBody(const Hello& h, Writer& w) {
  w.PutStr8(h.agent_id);
  w.PutStr8(h.kernel);
  w.Put<uint16_t>(static_cast<uint16_t>(h.devices.size()));
  for (const GuestDevice& d : h.devices) {
    w.Put<uint16_t>(d.pci_domain);
    w.Put<uint8_t>(d.pci_bus);
    w.Put<uint8_t>(d.pci_devfn);
    w.PutStr8(d.serial);
    w.Put<uint16_t>(d.num_queues);
    w.Put<uint16_t>(d.queue_size);
    w.Put<uint8_t>(U8(d.driver));
    w.Put<uint8_t>(0);  // reserved
  }
}

void EncodeBody(const Sample& s, Writer& w) {
  w.Put<uint64_t>(s.seq);
  w.Put<uint16_t>(static_cast<uint16_t>(s.queues.size()));
  w.Put<uint16_t>(0);  // reserved
  for (const QueueSample& q : s.queues) {
    w.Put<uint16_t>(q.ref.device_index);
    w.Put<uint16_t>(q.ref.queue_index);
    w.Put<uint64_t>(q.interval_ns);
    w.Put<uint64_t>(q.requests);
    w.Put<uint64_t>(q.kicks);
    w.Put<uint64_t>(q.timer_kicks);
    w.Put<uint64_t>(q.completed);
    w.Put<uint64_t>(q.asks);
    w.Put<uint64_t>(q.suppressed);
    for (uint64_t c : q.depth_hist) w.Put<uint64_t>(c);
    for (uint64_t c : q.latency_hist) w.Put<uint64_t>(c);
    w.Put<uint32_t>(q.mean_depth_milli);
    w.Put<uint16_t>(q.max_depth);
    w.Put<uint8_t>(U8(q.lease));
    w.Put<uint8_t>(U8(q.applied_mode));
    w.Put<uint16_t>(q.applied_batch);
    w.Put<uint16_t>(0);  // reserved
    w.Put<uint32_t>(q.applied_defer_ns);
    w.Put<uint64_t>(q.applied_generation);
  }
}

void EncodeBody(const Policy& p, Writer& w) {
  w.Put<uint16_t>(static_cast<uint16_t>(p.queues.size()));
  w.Put<uint16_t>(0);  // reserved
  for (const QueuePolicy& q : p.queues) {
    w.Put<uint16_t>(q.ref.device_index);
    w.Put<uint16_t>(q.ref.queue_index);
    w.Put<uint8_t>(U8(q.mode));
    w.Put<uint8_t>(0);  // reserved
    w.Put<uint16_t>(q.batch);
    w.Put<uint32_t>(q.defer_ns);
    w.Put<uint64_t>(q.lease_ns);
    w.Put<uint64_t>(q.generation);
  }
}

void EncodeBody(const Ack& a, Writer& w) { w.Put<uint64_t>(a.generation); }
void EncodeBody(const Error& e, Writer& w) {
  w.Put<uint16_t>(static_cast<uint16_t>(e.code));
  w.PutStr8(e.text);
}
void EncodeBody(const Bye& b, Writer& w) { w.Put<uint16_t>(static_cast<uint16_t>(b.reason)); }

// Each Decode* returns kNone with the message filled, or the first problem.
// Range and consistency checks are left to Validate, except counts and string
// lengths, which are checked before they size anything.
Rejection DecodeBody(Reader& r, Hello& h) {
  if (!r.GetStr8(h.agent_id, kMaxAgentIdLen)) return Rejection::kBadString;
  if (!r.GetStr8(h.kernel, kMaxKernelLen)) return Rejection::kBadString;
  const uint16_t n = r.Get<uint16_t>();
  if (r.short_read()) return Rejection::kTruncated;
  if (n > kMaxDevices) return Rejection::kTooManyQueues;
  h.devices.resize(n);
  for (GuestDevice& d : h.devices) {
    d.pci_domain = r.Get<uint16_t>();
    d.pci_bus = r.Get<uint8_t>();
    d.pci_devfn = r.Get<uint8_t>();
    if (!r.GetStr8(d.serial, kMaxSerialLen)) return Rejection::kBadString;
    d.num_queues = r.Get<uint16_t>();
    d.queue_size = r.Get<uint16_t>();
    d.driver = static_cast<DriverKind>(r.Get<uint8_t>());  // range: Validate
    const uint8_t reserved = r.Get<uint8_t>();
    if (r.short_read()) return Rejection::kTruncated;
    if (reserved != 0) return Rejection::kFieldOutOfRange;
  }
  return Rejection::kNone;
}

Rejection DecodeBody(Reader& r, Sample& s) {
  s.seq = r.Get<uint64_t>();
  const uint16_t n = r.Get<uint16_t>();
  const uint16_t reserved = r.Get<uint16_t>();
  if (r.short_read()) return Rejection::kTruncated;
  if (reserved != 0) return Rejection::kFieldOutOfRange;
  if (n > kMaxQueues) return Rejection::kTooManyQueues;
  s.queues.resize(n);
  for (QueueSample& q : s.queues) {
    q.ref.device_index = r.Get<uint16_t>();
    q.ref.queue_index = r.Get<uint16_t>();
    q.interval_ns = r.Get<uint64_t>();
    q.requests = r.Get<uint64_t>();
    q.kicks = r.Get<uint64_t>();
    q.timer_kicks = r.Get<uint64_t>();
    q.completed = r.Get<uint64_t>();
    q.asks = r.Get<uint64_t>();
    q.suppressed = r.Get<uint64_t>();
    for (uint64_t& c : q.depth_hist) c = r.Get<uint64_t>();
    for (uint64_t& c : q.latency_hist) c = r.Get<uint64_t>();
    q.mean_depth_milli = r.Get<uint32_t>();
    q.max_depth = r.Get<uint16_t>();
    q.lease = static_cast<LeaseState>(r.Get<uint8_t>());
    q.applied_mode = static_cast<KickMode>(r.Get<uint8_t>());
    q.applied_batch = r.Get<uint16_t>();
    const uint16_t qres = r.Get<uint16_t>();
    q.applied_defer_ns = r.Get<uint32_t>();
    q.applied_generation = r.Get<uint64_t>();
    if (r.short_read()) return Rejection::kTruncated;
    if (qres != 0) return Rejection::kFieldOutOfRange;
  }
  return Rejection::kNone;
}

Rejection DecodeBody(Reader& r, Policy& p) {
  const uint16_t n = r.Get<uint16_t>();
  const uint16_t reserved = r.Get<uint16_t>();
  if (r.short_read()) return Rejection::kTruncated;
  if (reserved != 0) return Rejection::kFieldOutOfRange;
  if (n > kMaxQueues) return Rejection::kTooManyQueues;
  p.queues.resize(n);
  for (QueuePolicy& q : p.queues) {
    q.ref.device_index = r.Get<uint16_t>();
    q.ref.queue_index = r.Get<uint16_t>();
    q.mode = static_cast<KickMode>(r.Get<uint8_t>());
    const uint8_t qres = r.Get<uint8_t>();
    q.batch = r.Get<uint16_t>();
    q.defer_ns = r.Get<uint32_t>();
    q.lease_ns = r.Get<uint64_t>();
    q.generation = r.Get<uint64_t>();
    if (r.short_read()) return Rejection::kTruncated;
    if (qres != 0) return Rejection::kFieldOutOfRange;
  }
  return Rejection::kNone;
}

Rejection DecodeBody(Reader& r, Ack& a) {
  a.generation = r.Get<uint64_t>();
  return r.short_read() ? Rejection::kTruncated : Rejection::kNone;
}
Rejection DecodeBody(Reader& r, Error& e) {
  e.code = static_cast<ErrorCode>(r.Get<uint16_t>());
  if (!r.GetStr8(e.text, kMaxErrorTextLen)) return Rejection::kBadString;
  return r.short_read() ? Rejection::kTruncated : Rejection::kNone;
}
Rejection DecodeBody(Reader& r, Bye& b) {
  b.reason = static_cast<ByeReason>(r.Get<uint16_t>());
  return r.short_read() ? Rejection::kTruncated : Rejection::kNone;
}

template <typename M>
DecodeResult DecodeAs(std::span<const uint8_t> payload) {
  Reader r(payload);
  M m;
  DecodeResult out;
  if (Rejection e = DecodeBody(r, m); e != Rejection::kNone) {
    out.error = e;
    return out;
  }
  if (!r.at_end()) {
    out.error = Rejection::kTrailingBytes;
    return out;
  }
  Message msg = std::move(m);
  if (Rejection e = Validate(msg); e != Rejection::kNone) {
    out.error = e;
    return out;
  }
  out.message = std::move(msg);
  return out;
}

}  // namespace

Rejection Validate(const Message& m) {
  return std::visit(
      [](const auto& v) -> Rejection {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, Hello>) {
          return ValidateHello(v);
        } else if constexpr (std::is_same_v<T, Sample>) {
          return ValidateSample(v);
        } else if constexpr (std::is_same_v<T, Policy>) {
          return ValidatePolicy(v);
        } else if constexpr (std::is_same_v<T, Ack>) {
          return v.generation == 0 ? Rejection::kFieldOutOfRange : Rejection::kNone;
        } else if constexpr (std::is_same_v<T, Error>) {
          if (static_cast<uint16_t>(v.code) > kMaxErrorCode) return Rejection::kFieldOutOfRange;
          return CheckString(v.text, 0, kMaxErrorTextLen, IsPrintable);
        } else {
          static_assert(std::is_same_v<T, Bye>);
          return static_cast<uint16_t>(v.reason) > kMaxByeReason ? Rejection::kFieldOutOfRange
                                                                 : Rejection::kNone;
        }
      },
      m);
}

EncodeResult Encode(const Message& m) {
  EncodeResult out;
  if (Rejection e = Validate(m); e != Rejection::kNone) {
    out.error = e;
    return out;
  }
  std::vector<uint8_t> payload;
  Writer pw(payload);
  std::visit([&](const auto& v) { EncodeBody(v, pw); }, m);
  const uint16_t type = static_cast<uint16_t>(TypeOf(m));
  if (payload.size() > MaxPayload(type)) {  // unreachable if the bounds are right
    out.error = Rejection::kOversized;
    return out;
  }
  out.bytes.reserve(kHeaderSize + payload.size());
  out.bytes.insert(out.bytes.end(), kMagic.begin(), kMagic.end());
  Writer hw(out.bytes);
  hw.Put<uint16_t>(kVersion);
  hw.Put<uint16_t>(type);
  hw.Put<uint32_t>(static_cast<uint32_t>(payload.size()));
  out.bytes.insert(out.bytes.end(), payload.begin(), payload.end());
  return out;
}

DecodeResult DecodePayload(MsgType type, std::span<const uint8_t> payload) {
  switch (type) {
    case MsgType::kHello: return DecodeAs<Hello>(payload);
    case MsgType::kSample: return DecodeAs<Sample>(payload);
    case MsgType::kPolicy: return DecodeAs<Policy>(payload);
    case MsgType::kAck: return DecodeAs<Ack>(payload);
    case MsgType::kError: return DecodeAs<Error>(payload);
    case MsgType::kBye: return DecodeAs<Bye>(payload);
  }
  DecodeResult out;
  out.error = Rejection::kBadType;
  return out;
}

// ---- StreamDecoder ------------------------------------------------------------------

void StreamDecoder::Fail(Rejection r, const Sink& sink) {
  state_ = State::kFailed;
  buf_.clear();
  buf_.shrink_to_fit();
  DecodeResult out;
  out.error = r;
  sink(std::move(out));
}

void StreamDecoder::OnHeader(const Sink& sink) {
  const auto u16 = [&](size_t at) { return static_cast<uint16_t>(buf_[at] | buf_[at + 1] << 8); };
  const uint16_t version = u16(4);
  const uint16_t type = u16(6);
  const uint32_t length = static_cast<uint32_t>(buf_[8]) | static_cast<uint32_t>(buf_[9]) << 8 |
                          static_cast<uint32_t>(buf_[10]) << 16 |
                          static_cast<uint32_t>(buf_[11]) << 24;
  buf_.clear();
  if (version != kVersion) return Fail(Rejection::kBadVersion, sink);
  const size_t max = MaxPayload(type);
  if (max == 0) {
    // An unknown type with a plausible length is skipped without buffering
    // it: the stream stays framed (a newer agent's extra message).
    if (length > kMaxPayload) return Fail(Rejection::kOversized, sink);
    DecodeResult out;
    out.error = Rejection::kBadType;
    sink(std::move(out));
    skip_left_ = length;
    state_ = skip_left_ ? State::kSkip : State::kHeader;
    return;
  }
  if (length > max) return Fail(Rejection::kOversized, sink);
  type_ = static_cast<MsgType>(type);
  length_ = length;
  state_ = State::kPayload;
  if (length_ == 0) {
    state_ = State::kHeader;
    sink(DecodePayload(type_, {}));
  }
}

void StreamDecoder::Feed(std::span<const uint8_t> data, const Sink& sink) {
  size_t i = 0;
  while (i < data.size() && state_ != State::kFailed) {
    switch (state_) {
      case State::kHeader: {
        const uint8_t b = data[i++];
        // Check the magic byte by byte: garbage is rejected at its first
        // byte, not after a whole header has been collected.
        if (buf_.size() < kMagic.size() && b != kMagic[buf_.size()])
          return Fail(Rejection::kBadMagic, sink);
        buf_.push_back(b);
        if (buf_.size() == kHeaderSize) OnHeader(sink);
        break;
      }
      case State::kPayload: {
        const size_t take = std::min(data.size() - i, size_t{length_} - buf_.size());
        buf_.insert(buf_.end(), data.begin() + i, data.begin() + i + take);
        i += take;
        if (buf_.size() == length_) {
          DecodeResult r = DecodePayload(type_, buf_);
          buf_.clear();
          state_ = State::kHeader;
          sink(std::move(r));
        }
        break;
      }
      case State::kSkip: {
        const size_t take = std::min(data.size() - i, size_t{skip_left_});
        i += take;
        skip_left_ -= static_cast<uint32_t>(take);
        if (skip_left_ == 0) state_ = State::kHeader;
        break;
      }
      case State::kFailed:
        break;
    }
  }
}

void StreamDecoder::Finish(const Sink& sink) {
  if (state_ == State::kFailed) return;
  const bool mid_frame = !buf_.empty() || state_ == State::kPayload || state_ == State::kSkip;
  buf_.clear();
  state_ = State::kHeader;
  if (mid_frame) {
    DecodeResult out;
    out.error = Rejection::kTruncated;
    sink(std::move(out));
  }
}

}  // namespace vkick::proto
