// Host-side guard: rate limit, rejection counting, drop decision, queue
// mapping onto discovered devices only.
#include "protocol/guard.h"

#include <gtest/gtest.h>

#include <set>

#include "tests/unit/protocol/test_messages.h"

namespace vkick::proto {
namespace {

using testing::MakeHello;
using testing::MakeQueueSample;
using testing::MakeSample;
using Verdict = ConnectionGuard::Verdict;

constexpr int64_t kSec = 1'000'000'000;

DecodeResult Ok(Message m) {
  DecodeResult r;
  r.message = std::move(m);
  return r;
}
DecodeResult Bad(Rejection e) {
  DecodeResult r;
  r.error = e;
  return r;
}

// What discovery found: disk0 at 00:04.0 with 2 queues, and a vhost-user
// device at 01:02.1 with only 2 of the 4 queues the guest claims.
std::vector<KnownDevice> Known() {
  return {{.device_id = 10, .pci_address = "0000:00:04.0", .serial = "", .num_queues = 2},
          {.device_id = 11, .pci_address = "0000:01:02.1", .serial = "", .num_queues = 2}};
}

TEST(TokenBucket, BurstThenRate) {
  TokenBucket b(10, 5, 0);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(b.TryTake(0));
  EXPECT_FALSE(b.TryTake(0));
  EXPECT_FALSE(b.TryTake(kSec / 10 - 1));  // not quite one token yet
  EXPECT_TRUE(b.TryTake(kSec / 10));
  EXPECT_FALSE(b.TryTake(kSec / 10));
  // A long idle refills to the burst, not beyond (and does not overflow).
  int taken = 0;
  for (int i = 0; i < 100; ++i) taken += b.TryTake(1'000'000 * kSec);
  EXPECT_EQ(taken, 5);
  // A clock stepping back adds nothing.
  EXPECT_FALSE(b.TryTake(0));
}

TEST(RejectionWindow, KWithinWindowDrops) {
  RejectionWindow w(3, 10 * kSec);
  EXPECT_FALSE(w.Record(0));
  EXPECT_FALSE(w.Record(1 * kSec));
  EXPECT_TRUE(w.Record(2 * kSec));
  RejectionWindow slow(3, 10 * kSec);
  EXPECT_FALSE(slow.Record(0));
  EXPECT_FALSE(slow.Record(6 * kSec));
  EXPECT_FALSE(slow.Record(12 * kSec));  // the first left the window
  EXPECT_FALSE(slow.Record(24 * kSec));
}

TEST(ConnectionGuard, MapsGuestQueuesOnlyOntoDiscoveredQueues) {
  ConnectionGuard g({}, Known(), 0);
  Hello h = MakeHello();  // devices 00:04.0 (2 queues) and 01:02.1 (4 queues)
  h.devices.push_back({.pci_domain = 0, .pci_bus = 0, .pci_devfn = 9 << 3, .serial = "ghost",
                       .num_queues = 1, .queue_size = 128});
  ASSERT_EQ(g.Admit(Ok(h), 0), Verdict::kAccept);
  EXPECT_EQ(g.unmapped_devices(), 1u);
  EXPECT_EQ(g.mapped_queues(), 4u);
  EXPECT_EQ(g.Resolve({0, 1}), (HostQueue{10, 1}));
  EXPECT_EQ(g.Resolve({1, 1}), (HostQueue{11, 1}));
  EXPECT_FALSE(g.Resolve({1, 2}));  // the guest sees 4 queues, discovery found 2
  EXPECT_FALSE(g.Resolve({2, 0}));  // a device discovery never found
  EXPECT_FALSE(g.Resolve({3, 0}));  // not in the hello at all
  EXPECT_EQ(g.total_rejections(), 0u);
}

TEST(ConnectionGuard, SerialMatchesWhenPciDoesNotAndCannotAlias) {
  std::vector<KnownDevice> known = {
      {.device_id = 5, .pci_address = "0000:00:07.0", .serial = "disk0", .num_queues = 1}};
  ConnectionGuard g({}, known, 0);
  Hello h;
  h.agent_id = "a";
  // Device 0 matches by PCI address; device 1 claims the same serial to alias it.
  h.devices.push_back({.pci_bus = 0, .pci_devfn = 7 << 3, .serial = "", .num_queues = 1});
  h.devices.push_back({.pci_bus = 3, .pci_devfn = 0, .serial = "disk0", .num_queues = 1});
  ASSERT_EQ(g.Admit(Ok(h), 0), Verdict::kAccept);
  EXPECT_EQ(g.Resolve({0, 0}), (HostQueue{5, 0}));
  EXPECT_FALSE(g.Resolve({1, 0}));

  ConnectionGuard by_serial({}, known, 0);
  Hello h2;
  h2.agent_id = "a";
  h2.devices.push_back({.pci_bus = 3, .pci_devfn = 0, .serial = "disk0", .num_queues = 1});
  ASSERT_EQ(by_serial.Admit(Ok(h2), 0), Verdict::kAccept);
  EXPECT_EQ(by_serial.Resolve({0, 0}), (HostQueue{5, 0}));
}

TEST(ConnectionGuard, OrderAndDirectionRules) {
  ConnectionGuard g({}, Known(), 0);
  EXPECT_EQ(g.Admit(Ok(MakeSample()), 0), Verdict::kReject);  // before hello
  EXPECT_EQ(g.Admit(Ok(Ack{.generation = 1}), 0), Verdict::kReject);
  EXPECT_EQ(g.rejections(Rejection::kUnexpectedType), 2u);
  ASSERT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kAccept);
  EXPECT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kReject);      // a second hello
  EXPECT_EQ(g.Admit(Ok(testing::MakePolicy()), 0), Verdict::kReject);  // host -> guest only
  EXPECT_EQ(g.rejections(Rejection::kUnexpectedType), 4u);
  EXPECT_EQ(g.Admit(Ok(Ack{.generation = 1}), 0), Verdict::kAccept);
  EXPECT_EQ(g.Admit(Ok(Bye{}), 0), Verdict::kAccept);
}

TEST(ConnectionGuard, SampleSequenceAndDeclaredQueues) {
  ConnectionGuard g({}, Known(), 0);
  ASSERT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kAccept);
  EXPECT_EQ(g.Admit(Ok(MakeSample(5)), 0), Verdict::kAccept);
  EXPECT_EQ(g.Admit(Ok(MakeSample(5)), 0), Verdict::kReject);  // replay
  EXPECT_EQ(g.Admit(Ok(MakeSample(4)), 0), Verdict::kReject);
  EXPECT_EQ(g.rejections(Rejection::kBadSequence), 2u);
  Sample s = MakeSample(6);
  s.queues.push_back(MakeQueueSample(0, 2));  // device 0 declared 2 queues
  EXPECT_EQ(g.Admit(Ok(s), 0), Verdict::kReject);
  s.queues.back() = MakeQueueSample(2, 0);  // no third device in the hello
  EXPECT_EQ(g.Admit(Ok(s), 0), Verdict::kReject);
  EXPECT_EQ(g.rejections(Rejection::kUnknownQueue), 2u);
  // A rejected sample does not advance the sequence.
  EXPECT_EQ(g.Admit(Ok(MakeSample(6)), 0), Verdict::kAccept);
}

// A bye ends the announcement: the next hello remaps (the agent's driver set
// changed; over virtio-serial it is the same stream), the sample sequence
// restarts; budgets and rejection counts carry over.
TEST(ConnectionGuard, ByeEndsTheAnnouncementAndANewHelloRemaps) {
  ConnectionGuard g({.burst = 10}, Known(), 0);
  ASSERT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kAccept);
  EXPECT_EQ(g.announcements(), 1u);
  EXPECT_EQ(g.Admit(Ok(MakeSample(9)), 0), Verdict::kAccept);
  ASSERT_TRUE(g.Resolve({0, 1}).has_value());
  EXPECT_EQ(g.Admit(Ok(Bye{}), 0), Verdict::kAccept);
  EXPECT_FALSE(g.hello_seen());
  EXPECT_FALSE(g.Resolve({0, 1}).has_value()) << "the old mapping is gone";
  EXPECT_EQ(g.Admit(Ok(MakeSample(10)), 0), Verdict::kReject);  // between announcements
  EXPECT_EQ(g.rejections(Rejection::kUnexpectedType), 1u);
  // The new hello: only the second device (01:02.1), now at index 0.
  Hello h = MakeHello();
  h.devices.erase(h.devices.begin());
  ASSERT_EQ(g.Admit(Ok(h), 0), Verdict::kAccept);
  EXPECT_EQ(g.announcements(), 2u);
  auto q = g.Resolve({0, 1});
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->device_id, 11);
  EXPECT_FALSE(g.Resolve({1, 0}).has_value());
  EXPECT_EQ(g.Admit(Ok(MakeSample(1)), 0), Verdict::kReject)  // queue (0,0)+(1,x) of the old layout
      << "MakeSample names device 1, which this hello did not declare";
  Sample s;
  s.seq = 1;  // the sequence restarted with the announcement
  s.queues.push_back(MakeQueueSample(0, 0));
  EXPECT_EQ(g.Admit(Ok(s), 0), Verdict::kAccept);
  // Budgets carry over: the bucket (burst 10) is spent by now.
  int rate_limited = 0;
  for (int i = 0; i < 10; ++i)
    if (g.Admit(Ok(Bye{}), 0) == Verdict::kReject) ++rate_limited;
  EXPECT_GT(rate_limited, 0);
  EXPECT_GT(g.rejections(Rejection::kRateLimited), 0u);
}

TEST(ConnectionGuard, QueueCapRejectsHello) {
  ConnectionGuard g({.max_queues = 4}, Known(), 0);
  EXPECT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kReject);  // 2 + 4 queues > 4
  EXPECT_EQ(g.rejections(Rejection::kTooManyQueues), 1u);
  EXPECT_FALSE(g.hello_seen());
  Hello small = MakeHello();
  small.devices.pop_back();
  EXPECT_EQ(g.Admit(Ok(small), 0), Verdict::kAccept);
}

TEST(ConnectionGuard, FatalDecodeErrorDropsAtOnce) {
  ConnectionGuard g({}, Known(), 0);
  EXPECT_EQ(g.Admit(Bad(Rejection::kBadMagic), 0), Verdict::kDrop);
  EXPECT_TRUE(g.dropped());
  EXPECT_EQ(g.rejections(Rejection::kBadMagic), 1u);
  // Everything after a drop is a drop, and is not counted again.
  EXPECT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kDrop);
  EXPECT_EQ(g.total_rejections(), 1u);
}

TEST(ConnectionGuard, KRejectionsInWindowDrop) {
  ConnectionGuard g({.frames_per_s = 1000, .burst = 1000, .max_rejections = 3,
                     .rejection_window_ns = 10 * kSec},
                    Known(), 0);
  EXPECT_EQ(g.Admit(Bad(Rejection::kFieldOutOfRange), 0), Verdict::kReject);
  EXPECT_EQ(g.Admit(Bad(Rejection::kInconsistent), 1 * kSec), Verdict::kReject);
  EXPECT_EQ(g.Admit(Bad(Rejection::kBadType), 2 * kSec), Verdict::kDrop);
  EXPECT_EQ(g.rejections(Rejection::kFieldOutOfRange), 1u);
  EXPECT_EQ(g.rejections(Rejection::kInconsistent), 1u);
  EXPECT_EQ(g.rejections(Rejection::kBadType), 1u);

  // The same three rejections spread over more than the window: no drop.
  ConnectionGuard slow({.max_rejections = 3, .rejection_window_ns = 10 * kSec}, Known(), 0);
  for (int i = 0; i < 10; ++i)
    EXPECT_EQ(slow.Admit(Bad(Rejection::kTruncated), i * 6 * kSec), Verdict::kReject);
}

TEST(ConnectionGuard, FloodIsRateLimitedThenDropped) {
  ConnectionGuard g({.frames_per_s = 10, .burst = 20, .max_rejections = 10,
                     .rejection_window_ns = 60 * kSec},
                    Known(), 0);
  ASSERT_EQ(g.Admit(Ok(MakeHello()), 0), Verdict::kAccept);
  int accepted = 0;
  Verdict last = Verdict::kAccept;
  uint64_t seq = 1;
  for (int i = 0; i < 1000 && last != Verdict::kDrop; ++i) {
    last = g.Admit(Ok(MakeSample(seq)), 1000 * i);  // 1 us apart: a flood
    if (last == Verdict::kAccept) ++accepted, ++seq;
  }
  EXPECT_EQ(last, Verdict::kDrop);
  EXPECT_EQ(accepted, 19);  // the burst, minus the hello's token
  EXPECT_EQ(g.rejections(Rejection::kRateLimited), 10u);
}

TEST(ConnectionGuard, RejectionNamesAreDistinctLabels) {
  std::set<std::string_view> names;
  for (size_t i = 0; i < kRejectionCount; ++i)
    names.insert(RejectionName(static_cast<Rejection>(i)));
  EXPECT_EQ(names.size(), kRejectionCount);
  EXPECT_EQ(RejectionName(Rejection::kTooManyQueues), "too_many_queues");
  EXPECT_EQ(FormatPciAddress(0, 1, (2 << 3) | 1), "0000:01:02.1");
}

}  // namespace
}  // namespace vkick::proto
