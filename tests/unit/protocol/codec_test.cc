// Encoder/decoder of the channel protocol: round trips, every rejection
// reason, chunking at every byte boundary, and random garbage.
#include "protocol/codec.h"

#include <gtest/gtest.h>

#include <random>
#include <variant>

#include "tests/unit/protocol/test_messages.h"

namespace vkick::proto {
namespace {

using testing::AllValidMessages;
using testing::Frame;
using testing::MakeHello;
using testing::MakePolicy;
using testing::MakeQueueSample;
using testing::MakeSample;

// Feeds `bytes` in the given chunk sizes (cycled) and collects everything.
std::vector<DecodeResult> DecodeAll(const std::vector<uint8_t>& bytes,
                                    std::vector<size_t> chunks = {}, bool finish = true) {
  StreamDecoder dec;
  std::vector<DecodeResult> out;
  auto sink = [&](DecodeResult&& r) { out.push_back(std::move(r)); };
  if (chunks.empty()) chunks = {bytes.size()};
  size_t i = 0, c = 0;
  while (i < bytes.size()) {
    const size_t n = std::min(std::max<size_t>(chunks[c++ % chunks.size()], 1), bytes.size() - i);
    dec.Feed(std::span(bytes).subspan(i, n), sink);
    EXPECT_LE(dec.buffered(), kMaxFrame);
    i += n;
  }
  if (finish) dec.Finish(sink);
  return out;
}

Rejection DecodeOne(const std::vector<uint8_t>& bytes) {
  auto out = DecodeAll(bytes);
  if (out.empty()) return Rejection::kCount;  // nothing at all: a test bug
  return out.front().error;
}

void PutU16(std::vector<uint8_t>& b, size_t at, uint16_t v) {
  b[at] = v & 0xff;
  b[at + 1] = v >> 8;
}
void PutU32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = (v >> (8 * i)) & 0xff;
}

TEST(ProtocolCodec, RoundTripsEveryMessageType) {
  for (const Message& m : AllValidMessages()) {
    SCOPED_TRACE(static_cast<int>(TypeOf(m)));
    const auto enc = Encode(m);
    ASSERT_EQ(enc.error, Rejection::kNone);
    ASSERT_GE(enc.bytes.size(), kHeaderSize);
    EXPECT_LE(enc.bytes.size(), kHeaderSize + MaxPayload(static_cast<uint16_t>(TypeOf(m))));
    auto out = DecodeAll(enc.bytes);
    ASSERT_EQ(out.size(), 1u);
    ASSERT_EQ(out[0].error, Rejection::kNone) << RejectionName(out[0].error);
    EXPECT_TRUE(*out[0].message == m);
  }
}

// Round trip of one message through the encoder and the decoder.
Message RoundTrip(const Message& m) {
  const auto enc = Encode(m);
  EXPECT_EQ(enc.error, Rejection::kNone) << RejectionName(enc.error);
  auto out = DecodeAll(enc.bytes);
  EXPECT_EQ(out.size(), 1u);
  if (out.empty() || out[0].error != Rejection::kNone) {
    ADD_FAILURE() << "decode: " << (out.empty() ? "nothing" : RejectionName(out[0].error));
    return Ack{.generation = 0};
  }
  return *out[0].message;
}

TEST(ProtocolCodec, SampleAsksAndSuppressedRoundTrip) {
  Sample s = MakeSample();
  s.queues[0].asks = 600;
  s.queues[0].suppressed = 599;
  s.queues[0].applied_mode = KickMode::kEventIdx;
  s.queues[0].applied_batch = 8;
  s.queues[0].applied_defer_ns = 50'000;
  ASSERT_EQ(Validate(s), Rejection::kNone);
  const Message back = RoundTrip(s);
  ASSERT_TRUE(std::holds_alternative<Sample>(back));
  const Sample& got = std::get<Sample>(back);
  ASSERT_EQ(got.queues.size(), 2u);
  EXPECT_EQ(got.queues[0].asks, 600u);
  EXPECT_EQ(got.queues[0].suppressed, 599u);
  EXPECT_EQ(got.queues[0].applied_mode, KickMode::kEventIdx);
  EXPECT_EQ(got, s);
  // asks and suppressed are distinct wire fields (not swapped, not aliased).
  s.queues[0].asks = 1000;
  s.queues[0].suppressed = 1;
  EXPECT_EQ(std::get<Sample>(RoundTrip(s)), s);
}

TEST(ProtocolCodec, EveryDriverKindRoundTripsWithItsName) {
  const std::vector<std::pair<DriverKind, std::string_view>> kinds = {
      {DriverKind::kVkickBlk, "vkick-blk"}, {DriverKind::kKernel, "kernel"},
      {DriverKind::kVkickVirtioBlk, "vkick-virtio-blk"}};
  ASSERT_EQ(kinds.size(), kMaxDriverKind + 1u);
  for (const auto& [kind, name] : kinds) {
    Hello h = MakeHello();
    h.devices[1].driver = kind;
    EXPECT_EQ(std::get<Hello>(RoundTrip(h)), h) << name;
    EXPECT_EQ(DriverKindName(kind), name);
  }
  // Only the stock virtio_blk is observe-only: the module's disks are steered.
  EXPECT_FALSE(IsObserveOnly(DriverKind::kVkickBlk));
  EXPECT_TRUE(IsObserveOnly(DriverKind::kKernel));
  EXPECT_FALSE(IsObserveOnly(DriverKind::kVkickVirtioBlk));
}

TEST(ProtocolCodec, AsksAndSuppressedMayBeAtTheirBounds) {
  auto v = [](uint64_t asks, uint64_t suppressed) {
    Sample s = MakeSample();
    s.queues[0].asks = asks;
    s.queues[0].suppressed = suppressed;
    return Validate(s);
  };
  const uint64_t n = MakeSample().queues[0].requests;
  EXPECT_EQ(v(0, 0), Rejection::kNone);
  EXPECT_EQ(v(n, n), Rejection::kNone) << "every request asked and declined (polling, B = 1)";
  EXPECT_EQ(v(n, 0), Rejection::kNone);
  EXPECT_EQ(v(n + 1, 0), Rejection::kFieldOutOfRange);
  EXPECT_EQ(v(5, 6), Rejection::kFieldOutOfRange);
  EXPECT_EQ(v(0, 1), Rejection::kFieldOutOfRange);
}

QueuePolicy EventIdxPolicy(uint16_t batch, uint32_t defer_ns) {
  return {.ref = {0, 0}, .mode = KickMode::kEventIdx, .batch = batch, .defer_ns = defer_ns,
          .lease_ns = 5'000'000'000, .generation = 3};
}

TEST(ProtocolCodec, EventIdxPolicyWithABatchRoundTrips) {
  const Policy p{.queues = {EventIdxPolicy(8, 50'000)}};
  ASSERT_EQ(Validate(p), Rejection::kNone) << "v3: event-idx may batch";
  const Message back = RoundTrip(p);
  ASSERT_TRUE(std::holds_alternative<Policy>(back));
  const QueuePolicy& q = std::get<Policy>(back).queues.at(0);
  EXPECT_EQ(q.mode, KickMode::kEventIdx);
  EXPECT_EQ(q.batch, 8);
  EXPECT_EQ(q.defer_ns, 50'000u);
  EXPECT_EQ(std::get<Policy>(back), p);
}

TEST(ProtocolCodec, EventIdxPolicyBounds) {
  auto v = [](uint16_t b, uint32_t t) { return Validate(Policy{.queues = {EventIdxPolicy(b, t)}}); };
  EXPECT_EQ(v(1, 0), Rejection::kNone) << "plain event-idx";
  EXPECT_EQ(v(8, kMinDeferNs), Rejection::kNone);
  EXPECT_EQ(v(kMaxBatch, kMaxDeferNs), Rejection::kNone);
  EXPECT_EQ(v(8, kMinDeferNs - 1), Rejection::kFieldOutOfRange) << "a batch without a timer could strand";
  EXPECT_EQ(v(8, 0), Rejection::kFieldOutOfRange);
  EXPECT_EQ(v(8, kMaxDeferNs + 1), Rejection::kFieldOutOfRange);
  EXPECT_EQ(v(0, 0), Rejection::kFieldOutOfRange);
  EXPECT_EQ(v(kMaxBatch + 1, 50'000), Rejection::kFieldOutOfRange);
  // Immediate still admits only B = 1, T = 0.
  QueuePolicy imm = EventIdxPolicy(8, 50'000);
  imm.mode = KickMode::kImmediate;
  EXPECT_EQ(Validate(Policy{.queues = {imm}}), Rejection::kFieldOutOfRange);
  // On the wire too: an event-idx batch with T below the minimum is refused
  // by the decoder, not only the encoder.
  auto b = Frame(Policy{.queues = {EventIdxPolicy(8, 50'000)}});
  ASSERT_EQ(DecodeOne(b), Rejection::kNone);
  // Policy payload: count u16, reserved u16, then ref (2 + 2), mode u8,
  // reserved u8, batch u16, defer_ns u32.
  PutU32(b, kHeaderSize + 4 + 4 + 1 + 1 + 2, kMinDeferNs - 1);
  EXPECT_EQ(DecodeOne(b), Rejection::kFieldOutOfRange);
}

TEST(ProtocolCodec, HeaderLayoutIsLittleEndianVkck) {
  const auto b = Frame(Ack{.generation = 0x0102030405060708});
  ASSERT_EQ(b.size(), kHeaderSize + 8);
  EXPECT_EQ(std::string(b.begin(), b.begin() + 4), "VKCK");
  EXPECT_EQ(b[4], 3);  // version (v3)
  EXPECT_EQ(b[6], static_cast<uint8_t>(MsgType::kAck));
  EXPECT_EQ(b[8], 8);  // length
  EXPECT_EQ(b[12], 0x08);
  EXPECT_EQ(b[19], 0x01);
}

TEST(ProtocolCodec, LargestSampleIsExactlyMaxFrame) {
  Sample s;
  s.seq = 42;
  for (uint16_t i = 0; i < kMaxQueues; ++i)
    s.queues.push_back(MakeQueueSample(static_cast<uint16_t>(i / kMaxQueuesPerDevice),
                                       static_cast<uint16_t>(i % kMaxQueuesPerDevice)));
  const auto enc = Encode(s);
  ASSERT_EQ(enc.error, Rejection::kNone);
  EXPECT_EQ(enc.bytes.size(), kMaxFrame);
  auto out = DecodeAll(enc.bytes);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].error, Rejection::kNone);
  EXPECT_TRUE(std::get<Sample>(*out[0].message) == s);
}

TEST(ProtocolCodec, EncoderRefusesInvalidMessages) {
  Policy p = MakePolicy();
  p.queues[0].defer_ns = 0;  // batch 16 without a timer would strand requests
  EXPECT_EQ(Encode(p).error, Rejection::kFieldOutOfRange);
  EXPECT_TRUE(Encode(p).bytes.empty());
  Hello h = MakeHello();
  h.agent_id = "has space";
  EXPECT_EQ(Encode(h).error, Rejection::kBadString);
}

// ---- framing rejections -------------------------------------------------------

TEST(ProtocolCodec, BadMagicIsFatalAtFirstWrongByte) {
  StreamDecoder dec;
  std::vector<Rejection> got;
  auto sink = [&](DecodeResult&& r) { got.push_back(r.error); };
  const std::vector<uint8_t> http = {'G', 'E', 'T', ' '};
  dec.Feed(std::span(http).first(1), sink);
  ASSERT_EQ(got, std::vector<Rejection>{Rejection::kBadMagic});
  EXPECT_TRUE(dec.failed());
  EXPECT_TRUE(IsFatal(Rejection::kBadMagic));
  // Everything after is ignored, even a valid frame.
  dec.Feed(Frame(Ack{.generation = 1}), sink);
  dec.Finish(sink);
  EXPECT_EQ(got.size(), 1u);
  EXPECT_EQ(dec.buffered(), 0u);
}

TEST(ProtocolCodec, BadVersionIsFatal) {
  auto b = Frame(Ack{.generation = 1});
  PutU16(b, 4, kVersion + 1);
  EXPECT_EQ(DecodeOne(b), Rejection::kBadVersion);
  PutU16(b, 4, 1);  // v1 (hello devices without `driver`): not half-parsed
  EXPECT_EQ(DecodeOne(b), Rejection::kBadVersion);
  EXPECT_TRUE(IsFatal(Rejection::kBadVersion));
}

TEST(ProtocolCodec, OversizedLengthIsFatalBeforeBuffering) {
  auto b = Frame(Ack{.generation = 1});
  PutU32(b, 8, 9);  // an ack is exactly 8 bytes
  b.resize(kHeaderSize);  // the payload never arrives: rejected on the header alone
  EXPECT_EQ(DecodeOne(b), Rejection::kOversized);
  auto s = Frame(MakeSample());
  PutU32(s, 8, 0xffffffff);
  s.resize(kHeaderSize);
  EXPECT_EQ(DecodeOne(s), Rejection::kOversized);
  // Unknown type with an absurd length: also framing loss.
  PutU16(s, 6, 99);
  EXPECT_EQ(DecodeOne(s), Rejection::kOversized);
}

TEST(ProtocolCodec, BadTypeIsSkippedAndStreamStaysInSync) {
  std::vector<uint8_t> b = {'V', 'K', 'C', 'K', kVersion, 0, 77, 0, 5, 0, 0, 0, 1, 2, 3, 4, 5};
  const auto ack = Frame(Ack{.generation = 3});
  b.insert(b.end(), ack.begin(), ack.end());
  for (size_t chunk : {size_t{1}, size_t{3}, b.size()}) {
    auto out = DecodeAll(b, {chunk});
    ASSERT_EQ(out.size(), 2u);
    EXPECT_EQ(out[0].error, Rejection::kBadType);
    ASSERT_EQ(out[1].error, Rejection::kNone);
    EXPECT_EQ(std::get<Ack>(*out[1].message).generation, 3u);
  }
  EXPECT_FALSE(IsFatal(Rejection::kBadType));
}

TEST(ProtocolCodec, TruncatedPayloadAndTruncatedStream) {
  // The length says 4 bytes but an ack needs 8.
  auto b = Frame(Ack{.generation = 1});
  PutU32(b, 8, 4);
  b.resize(kHeaderSize + 4);
  EXPECT_EQ(DecodeOne(b), Rejection::kTruncated);
  // A sample whose queue count claims more entries than the payload holds.
  auto s = Frame(MakeSample());
  s[kHeaderSize + 8] = 3;  // count 2 -> 3
  EXPECT_EQ(DecodeOne(s), Rejection::kTruncated);
  // The stream ends mid-frame, in the header and in the payload.
  const auto h = Frame(MakeHello());
  for (size_t cut : {size_t{5}, kHeaderSize, h.size() - 1}) {
    auto out = DecodeAll(std::vector<uint8_t>(h.begin(), h.begin() + cut));
    ASSERT_EQ(out.size(), 1u) << cut;
    EXPECT_EQ(out[0].error, Rejection::kTruncated);
  }
  // A clean end of stream is not a rejection.
  EXPECT_TRUE(DecodeAll(h).size() == 1 && DecodeAll(h)[0].error == Rejection::kNone);
}

TEST(ProtocolCodec, TrailingBytes) {
  // Fixed-size types cannot carry extra bytes (that is kOversized); a
  // variable-size one can, up to its maximum.
  auto b = Frame(MakeHello());
  b.push_back(0);
  PutU32(b, 8, static_cast<uint32_t>(b.size() - kHeaderSize));
  EXPECT_EQ(DecodeOne(b), Rejection::kTrailingBytes);
  auto bye = Frame(Bye{});
  bye.push_back(0);
  PutU32(bye, 8, 3);
  EXPECT_EQ(DecodeOne(bye), Rejection::kOversized);
}

// ---- field rejections ------------------------------------------------------------

TEST(ProtocolCodec, FieldOutOfRange) {
  auto bad = [](auto mutate) {
    Sample s = MakeSample();
    mutate(s.queues[0]);
    return Validate(s);
  };
  EXPECT_EQ(bad([](QueueSample& q) { q.interval_ns = 0; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.interval_ns = kMaxIntervalNs + 1; }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.timer_kicks = q.kicks + 1; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.asks = q.requests + 1; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.suppressed = q.asks + 1; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.kicks = q.interval_ns; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.ref.queue_index = kMaxQueuesPerDevice; }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.applied_mode = static_cast<KickMode>(4); }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.applied_batch = 0; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(bad([](QueueSample& q) { q.applied_defer_ns = kMaxDeferNs + 1; }),
            Rejection::kFieldOutOfRange);

  auto badp = [](auto mutate) {
    Policy p = MakePolicy();
    mutate(p.queues[0]);
    return Validate(p);
  };
  EXPECT_EQ(badp([](QueuePolicy& q) { q.batch = kMaxBatch + 1; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.defer_ns = kMaxDeferNs + 1; }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.defer_ns = kMinDeferNs - 1; }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.lease_ns = 0; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.lease_ns = kMaxLeaseNs + 1; }),
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.generation = 0; }), Rejection::kFieldOutOfRange);
  EXPECT_EQ(badp([](QueuePolicy& q) { q.mode = KickMode::kImmediate; }),  // with batch 16
            Rejection::kFieldOutOfRange);
  EXPECT_EQ(Validate(Policy{}), Rejection::kFieldOutOfRange);
  EXPECT_EQ(Validate(Ack{.generation = 0}), Rejection::kFieldOutOfRange);
  EXPECT_EQ(Validate(Bye{.reason = static_cast<ByeReason>(3)}), Rejection::kFieldOutOfRange);
  EXPECT_EQ(Validate(Error{.code = static_cast<ErrorCode>(6)}), Rejection::kFieldOutOfRange);

  Hello h = MakeHello();
  h.devices[0].num_queues = 0;
  EXPECT_EQ(Validate(h), Rejection::kFieldOutOfRange);
  h = MakeHello();
  h.devices[1].queue_size = kMaxQueueSize + 1;
  EXPECT_EQ(Validate(h), Rejection::kFieldOutOfRange);
  h = MakeHello();
  h.devices[1].driver = static_cast<DriverKind>(kMaxDriverKind + 1);
  EXPECT_EQ(Validate(h), Rejection::kFieldOutOfRange);
  {
    // The driver byte and its reserved neighbour, on the wire: device 0 is
    // the last 2 bytes of its entry (ids, serial "disk0", queues, size).
    auto hb = Frame(MakeHello());
    const size_t dev0 = kHeaderSize + 1 + 13 + 1 + 37 + 2;
    const size_t driver_at = dev0 + 2 + 1 + 1 + 1 + 5 + 2 + 2;
    ASSERT_EQ(hb[driver_at], 0);
    hb[driver_at] = 7;
    EXPECT_EQ(DecodeOne(hb), Rejection::kFieldOutOfRange);
    hb[driver_at] = 1;
    EXPECT_EQ(DecodeOne(hb), Rejection::kNone);
    // vkick_virtio_blk (2) is the last kind; the value after it is refused.
    hb[driver_at] = 2;
    EXPECT_EQ(DecodeOne(hb), Rejection::kNone);
    hb[driver_at] = kMaxDriverKind + 1;
    EXPECT_EQ(DecodeOne(hb), Rejection::kFieldOutOfRange);
    hb[driver_at] = 1;
    hb[driver_at + 1] = 1;  // reserved
    EXPECT_EQ(DecodeOne(hb), Rejection::kFieldOutOfRange);
  }

  // On the wire: the decoder applies the same rules, and also checks the
  // reserved fields.
  auto b = Frame(MakePolicy());
  b[kHeaderSize + 4 + 4] = 9;  // first entry's mode byte
  EXPECT_EQ(DecodeOne(b), Rejection::kFieldOutOfRange);
  b = Frame(MakePolicy());
  b[kHeaderSize + 2] = 1;  // reserved
  EXPECT_EQ(DecodeOne(b), Rejection::kFieldOutOfRange);
  b = Frame(MakeSample());
  b[kHeaderSize + 12 + 278] = 1;  // first entry's reserved u16
  EXPECT_EQ(DecodeOne(b), Rejection::kFieldOutOfRange);
}

TEST(ProtocolCodec, BadString) {
  Hello h = MakeHello();
  h.agent_id = "";
  EXPECT_EQ(Validate(h), Rejection::kBadString);
  h.agent_id = std::string(kMaxAgentIdLen + 1, 'a');
  EXPECT_EQ(Validate(h), Rejection::kBadString);
  h = MakeHello();
  h.kernel = std::string("6.1\n", 4);
  EXPECT_EQ(Validate(h), Rejection::kBadString);
  h = MakeHello();
  h.devices[0].serial = "a b";
  EXPECT_EQ(Validate(h), Rejection::kBadString);
  EXPECT_EQ(Validate(Error{.text = std::string(kMaxErrorTextLen + 1, 'x')}),
            Rejection::kBadString);
  // On the wire: a string length above its bound is rejected before copying.
  auto b = Frame(MakeHello());
  b[kHeaderSize] = kMaxAgentIdLen + 1;
  EXPECT_EQ(DecodeOne(b), Rejection::kBadString);
  b = Frame(MakeHello());
  b[kHeaderSize + 1] = 0x7f;  // DEL inside the agent id
  EXPECT_EQ(DecodeOne(b), Rejection::kBadString);
}

TEST(ProtocolCodec, TooManyQueues) {
  Hello h = MakeHello();
  h.devices[0].num_queues = 40;
  h.devices[1].num_queues = 40;  // 80 > kMaxQueues
  EXPECT_EQ(Validate(h), Rejection::kTooManyQueues);
  h = MakeHello();
  h.devices.resize(kMaxDevices + 1);
  EXPECT_EQ(Validate(h), Rejection::kTooManyQueues);
  // On the wire the count is checked before anything is allocated.
  auto b = Frame(MakeSample());
  PutU16(b, kHeaderSize + 8, kMaxQueues + 1);
  EXPECT_EQ(DecodeOne(b), Rejection::kTooManyQueues);
  b = Frame(MakePolicy());
  PutU16(b, kHeaderSize, 0xffff);
  EXPECT_EQ(DecodeOne(b), Rejection::kTooManyQueues);
}

TEST(ProtocolCodec, DuplicateQueue) {
  Sample s = MakeSample();
  s.queues[1] = s.queues[0];
  EXPECT_EQ(Validate(s), Rejection::kDuplicateQueue);
  Policy p = MakePolicy();
  p.queues[2].ref = p.queues[0].ref;
  EXPECT_EQ(Validate(p), Rejection::kDuplicateQueue);
  Hello h = MakeHello();
  h.devices[1].pci_bus = h.devices[0].pci_bus;
  h.devices[1].pci_devfn = h.devices[0].pci_devfn;
  EXPECT_EQ(Validate(h), Rejection::kDuplicateQueue);
  h = MakeHello();
  h.devices[1].serial = h.devices[0].serial;
  EXPECT_EQ(Validate(h), Rejection::kDuplicateQueue);
}

TEST(ProtocolCodec, Inconsistent) {
  auto bad = [](auto mutate) {
    Sample s = MakeSample();
    mutate(s.queues[0]);
    return Validate(s);
  };
  EXPECT_EQ(bad([](QueueSample& q) { q.depth_hist[0] += 1; }), Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) { q.latency_hist[3] += 1; }), Rejection::kInconsistent);
  // Saturating sums: buckets that wrap around to the right total do not pass.
  EXPECT_EQ(bad([](QueueSample& q) {
              q.depth_hist[0] = UINT64_MAX;
              q.depth_hist[1] = q.requests + 1;
            }),
            Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) { q.mean_depth_milli = q.max_depth * 1000 + 1; }),
            Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) { q.mean_depth_milli = 999; }), Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) {
              q.max_depth = 8;  // but the histogram saw depth 32
              q.mean_depth_milli = 8000;
            }),
            Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) { q.lease = LeaseState::kNone; }), Rejection::kInconsistent);
  EXPECT_EQ(bad([](QueueSample& q) {
              q.requests = 0;
              q.asks = q.suppressed = 0;
              q.depth_hist = {};
            }),
            Rejection::kInconsistent);  // max/mean depth without requests
}

// ---- chunking and garbage ---------------------------------------------------------

std::vector<uint8_t> StreamOfAll() {
  std::vector<uint8_t> all;
  for (const Message& m : AllValidMessages()) {
    auto b = Frame(m);
    all.insert(all.end(), b.begin(), b.end());
  }
  return all;
}

TEST(ProtocolCodec, SplitAtEveryByteBoundaryGivesTheSameMessages) {
  const auto all = StreamOfAll();
  const auto msgs = AllValidMessages();
  for (size_t cut = 0; cut <= all.size(); ++cut) {
    StreamDecoder dec;
    std::vector<DecodeResult> out;
    auto sink = [&](DecodeResult&& r) { out.push_back(std::move(r)); };
    dec.Feed(std::span(all).first(cut), sink);
    dec.Feed(std::span(all).subspan(cut), sink);
    dec.Finish(sink);
    ASSERT_EQ(out.size(), msgs.size()) << "cut at " << cut;
    for (size_t i = 0; i < msgs.size(); ++i) {
      ASSERT_EQ(out[i].error, Rejection::kNone) << "cut at " << cut;
      ASSERT_TRUE(*out[i].message == msgs[i]) << "cut at " << cut;
    }
  }
  // And one byte at a time, and odd chunk sizes.
  for (std::vector<size_t> chunks : {std::vector<size_t>{1}, {7, 1, 13}, {4096}}) {
    auto out = DecodeAll(all, chunks);
    ASSERT_EQ(out.size(), msgs.size());
    for (size_t i = 0; i < msgs.size(); ++i) EXPECT_TRUE(*out[i].message == msgs[i]);
  }
}

TEST(ProtocolCodec, RandomGarbageNeverCrashesAndStaysBounded) {
  std::mt19937_64 rng(12345);
  for (int iter = 0; iter < 2000; ++iter) {
    std::vector<uint8_t> b(rng() % 4096);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    if (iter % 2) {  // often start with a valid header so the payload paths run
      auto f = Frame(AllValidMessages()[rng() % 6]);
      b.insert(b.begin(), f.begin(), f.begin() + kHeaderSize);
    }
    auto out = DecodeAll(b, {1 + rng() % 300});
    // At most one fatal rejection, and it is the last thing reported.
    for (size_t i = 0; i < out.size(); ++i)
      if (IsFatal(out[i].error)) {
        EXPECT_EQ(i, out.size() - 1);
      }
  }
}

TEST(ProtocolCodec, MutatedValidFramesDecodeToValidMessagesOrRejections) {
  std::mt19937_64 rng(777);
  const auto msgs = AllValidMessages();
  int accepted = 0, rejected = 0;
  for (int iter = 0; iter < 5000; ++iter) {
    auto b = Frame(msgs[iter % msgs.size()]);
    const int flips = 1 + rng() % 3;
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    auto out = DecodeAll(b);
    ASSERT_FALSE(out.empty());
    if (out[0].error == Rejection::kNone) {
      ++accepted;
      // Whatever decodes is valid and re-encodes to the very same bytes.
      ASSERT_EQ(Validate(*out[0].message), Rejection::kNone);
      EXPECT_EQ(Encode(*out[0].message).bytes, b);
    } else {
      ++rejected;
      EXPECT_FALSE(out[0].message.has_value());
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(accepted, 0);  // e.g. flips inside counters or strings
}

TEST(ProtocolHistograms, BucketBounds) {
  EXPECT_EQ(DepthBucket(0), 0u);
  EXPECT_EQ(DepthBucket(1), 0u);
  EXPECT_EQ(DepthBucket(2), 1u);
  EXPECT_EQ(DepthBucket(3), 1u);
  EXPECT_EQ(DepthBucket(32), 5u);
  EXPECT_EQ(DepthBucket(511), 8u);
  EXPECT_EQ(DepthBucket(512), 9u);
  EXPECT_EQ(DepthBucket(32768), 9u);
  EXPECT_EQ(LatencyBucket(999), 0u);
  EXPECT_EQ(LatencyBucket(1000), 1u);
  EXPECT_EQ(LatencyBucket(1999), 1u);
  EXPECT_EQ(LatencyBucket(100'000), 7u);  // [64, 128) us
  EXPECT_EQ(LatencyBucket(16'383'999), 14u);
  EXPECT_EQ(LatencyBucket(16'384'000), 15u);
  EXPECT_EQ(LatencyBucket(UINT64_MAX), 15u);
  EXPECT_EQ(LatencyBucketUpperNs(7), 128'000u);
}

TEST(ProtocolHistograms, QuantilesAreConservativeBucketUpperBounds) {
  std::array<uint64_t, kLatencyBuckets> h{};
  EXPECT_EQ(LatencyQuantileNs(h, 0.5), 0u);
  h[LatencyBucket(100'000)] = 98;    // 98 requests ~100 us
  h[LatencyBucket(5'000'000)] = 2;   // 2 requests ~5 ms
  EXPECT_EQ(LatencyQuantileNs(h, 0.5), 128'000u);
  EXPECT_EQ(LatencyQuantileNs(h, 0.98), 128'000u);
  EXPECT_EQ(LatencyQuantileNs(h, 0.99), 8'192'000u);
}

}  // namespace
}  // namespace vkick::proto
