#include "guest-policy/core/virtqueue.h"

#include <map>
#include <random>
#include <set>

#include "gtest/gtest.h"
#include "tests/unit/guest-policy/fake_device.h"

namespace vkick {
namespace {

using testing::FakeDevice;
using testing::TestRingMemory;

Virtqueue Make(TestRingMemory& m, uint16_t size, bool event_idx, bool indirect) {
  VirtqueueConfig cfg{size, event_idx, indirect, 4};
  VirtqueueMemory mem{m.ring, reinterpret_cast<uint64_t>(m.ring), m.indirect,
                      reinterpret_cast<uint64_t>(m.indirect)};
  auto vq = Virtqueue::Create(cfg, mem);
  EXPECT_TRUE(vq.ok()) << vq.status();
  return *std::move(vq);
}

std::vector<Segment> ThreeSegs(uint8_t* status) {
  static uint8_t hdr[16], data[512];
  return {{reinterpret_cast<uint64_t>(hdr), 16, false},
          {reinterpret_cast<uint64_t>(data), 512, true},
          {reinterpret_cast<uint64_t>(status), 1, true}};
}

TEST(VringNeedEvent, MatchesSpecFormula) {
  // Crossing the event index (old < ev+1 <= new) needs a notification.
  EXPECT_TRUE(VringNeedEvent(0, 1, 0));
  EXPECT_FALSE(VringNeedEvent(5, 3, 0));
  EXPECT_TRUE(VringNeedEvent(5, 6, 0));
  EXPECT_FALSE(VringNeedEvent(5, 7, 6));
  // Across the 16-bit wrap.
  EXPECT_TRUE(VringNeedEvent(0xffff, 0, 0xfffe));
  EXPECT_TRUE(VringNeedEvent(0xfffe, 2, 0xfff0));
  EXPECT_FALSE(VringNeedEvent(3, 2, 0xfff0));
}

TEST(Virtqueue, RejectsBadConfig) {
  TestRingMemory m(8);
  VirtqueueMemory mem{m.ring, reinterpret_cast<uint64_t>(m.ring), nullptr, 0};
  EXPECT_FALSE(Virtqueue::Create({6, false, false, 4}, mem).ok());
  EXPECT_FALSE(Virtqueue::Create({8, false, true, 4}, mem).ok());  // indirect w/o tables
  EXPECT_TRUE(Virtqueue::Create({8, false, false, 4}, mem).ok());
}

TEST(Virtqueue, ChainedDescriptorsReachDeviceAndCompleteOnce) {
  TestRingMemory m(8);
  Virtqueue vq = Make(m, 8, false, false);
  FakeDevice dev(m.ring, 8, false);
  uint8_t status = 0xff;
  auto segs = ThreeSegs(&status);
  ASSERT_TRUE(vq.Add(segs, 42).ok());
  EXPECT_EQ(vq.free_descriptors(), 5);
  EXPECT_TRUE(vq.NeedsNotify());
  EXPECT_FALSE(vq.NeedsNotify()) << "nothing new since the last decision";
  ASSERT_EQ(dev.Consume(false, 0), 1);
  ASSERT_EQ(dev.seen[0].descs.size(), 3u);
  EXPECT_FALSE(dev.seen[0].was_indirect);
  EXPECT_EQ(dev.seen[0].descs[0].flags, kVringDescFNext);
  EXPECT_EQ(dev.seen[0].descs[1].flags, kVringDescFNext | kVringDescFWrite);
  EXPECT_EQ(dev.seen[0].descs[2].flags, kVringDescFWrite);
  EXPECT_EQ(status, 0);
  std::vector<uint64_t> got;
  EXPECT_EQ(vq.PollUsed([&](uint64_t t, uint32_t len) { got.push_back(t); EXPECT_EQ(len, 513u); }), 1);
  EXPECT_EQ(got, std::vector<uint64_t>{42});
  EXPECT_EQ(vq.PollUsed([&](uint64_t, uint32_t) { ADD_FAILURE(); }), 0);
  EXPECT_EQ(vq.free_descriptors(), 8);
}

TEST(Virtqueue, IndirectUsesOneRingSlotPerRequest) {
  TestRingMemory m(8);
  Virtqueue vq = Make(m, 8, false, true);
  FakeDevice dev(m.ring, 8, false);
  uint8_t status[8];
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(vq.Add(ThreeSegs(&status[i]), i).ok()) << i;
  EXPECT_EQ(vq.free_descriptors(), 0);
  EXPECT_FALSE(vq.Add(ThreeSegs(&status[0]), 99).ok());
  dev.Consume();
  for (const auto& r : dev.seen) {
    EXPECT_TRUE(r.was_indirect);
    EXPECT_EQ(r.descs.size(), 3u);
  }
  EXPECT_EQ(vq.PollUsed([](uint64_t, uint32_t) {}), 8);
}

TEST(Virtqueue, WithoutIndirectRingFillsAtSizeOverSegments) {
  TestRingMemory m(8);
  Virtqueue vq = Make(m, 8, false, false);
  uint8_t s;
  EXPECT_TRUE(vq.Add(ThreeSegs(&s), 1).ok());
  EXPECT_TRUE(vq.Add(ThreeSegs(&s), 2).ok());
  EXPECT_FALSE(vq.CanAdd(3));
  EXPECT_EQ(vq.Add(ThreeSegs(&s), 3).code(), absl::StatusCode::kResourceExhausted);
}

// Many more requests than 2^16 through a small ring: the free-running 16-bit
// avail/used indices wrap; every token comes back exactly once, in any order.
TEST(Virtqueue, SixteenBitIndexWrapKeepsExactlyOnce) {
  for (bool indirect : {false, true}) {
    TestRingMemory m(16);
    Virtqueue vq = Make(m, 16, true, indirect);
    FakeDevice dev(m.ring, 16, true);
    uint8_t status[16];
    std::set<uint64_t> outstanding;
    uint64_t next = 0, completed = 0;
    std::mt19937 rng(7);
    while (completed < 70000 * 3 / (indirect ? 1 : 3)) {
      while (vq.CanAdd(3) && rng() % 4 != 0) {
        ASSERT_TRUE(vq.Add(ThreeSegs(&status[next % 16]), next).ok());
        outstanding.insert(next++);
      }
      dev.Consume(true);
      dev.Complete(rng() % 5);
      vq.PollUsed([&](uint64_t t, uint32_t) {
        ASSERT_EQ(outstanding.erase(t), 1u) << "token " << t << " completed twice or never issued";
        ++completed;
      });
    }
    EXPECT_GT(next, 65536u / (indirect ? 1 : 3));
    EXPECT_EQ(vq.bad_used_entries(), 0u);
  }
}

TEST(Virtqueue, EventIdxNotifiesOnlyWhenDeviceAsked) {
  TestRingMemory m(16);
  Virtqueue vq = Make(m, 16, true, true);
  FakeDevice dev(m.ring, 16, true);
  uint8_t s[16];
  ASSERT_TRUE(vq.Add(ThreeSegs(&s[0]), 0).ok());
  EXPECT_TRUE(vq.NeedsNotify());   // avail_event = 0: first entry crosses it
  ASSERT_TRUE(vq.Add(ThreeSegs(&s[1]), 1).ok());
  EXPECT_FALSE(vq.NeedsNotify());  // device has not consumed: it will see #1 too
  dev.Consume(true);               // avail_event := 2
  ASSERT_TRUE(vq.Add(ThreeSegs(&s[2]), 2).ok());
  EXPECT_TRUE(vq.NeedsNotify());
  // Without EVENT_IDX the device's NO_NOTIFY flag decides.
  TestRingMemory m2(16);
  Virtqueue vq2 = Make(m2, 16, false, true);
  FakeDevice dev2(m2.ring, 16, false);
  dev2.SetNoNotify(true);
  ASSERT_TRUE(vq2.Add(ThreeSegs(&s[0]), 0).ok());
  EXPECT_FALSE(vq2.NeedsNotify());
  dev2.SetNoNotify(false);
  ASSERT_TRUE(vq2.Add(ThreeSegs(&s[1]), 1).ok());
  EXPECT_TRUE(vq2.NeedsNotify());
}

TEST(Virtqueue, InterruptSuppressionFields) {
  TestRingMemory m(16);
  Virtqueue vq = Make(m, 16, true, true);
  FakeDevice dev(m.ring, 16, true);
  uint8_t s[2];
  EXPECT_EQ(dev.UsedEvent(), 0x8000);  // polling: device asked not to signal
  ASSERT_TRUE(vq.Add(ThreeSegs(&s[0]), 0).ok());
  EXPECT_FALSE(vq.EnableInterrupts());
  EXPECT_EQ(dev.UsedEvent(), 0);       // interrupt on the next completion
  dev.Consume();
  // A completion that landed before we slept is reported by Enable (no lost wake-up).
  vq.DisableInterrupts();
  EXPECT_TRUE(vq.EnableInterrupts());
  EXPECT_EQ(vq.PollUsed([](uint64_t, uint32_t) {}), 1);
  EXPECT_EQ(dev.UsedEvent(), 1);
  // Without EVENT_IDX: the avail flags word carries NO_INTERRUPT.
  TestRingMemory m2(16);
  Virtqueue vq2 = Make(m2, 16, false, true);
  FakeDevice dev2(m2.ring, 16, false);
  EXPECT_EQ(dev2.AvailFlags(), kVringAvailFNoInterrupt);
  vq2.EnableInterrupts();
  EXPECT_EQ(dev2.AvailFlags(), 0);
}

TEST(Virtqueue, BogusUsedIdsAreDroppedNotDoubleCompleted) {
  TestRingMemory m(8);
  Virtqueue vq = Make(m, 8, false, true);
  FakeDevice dev(m.ring, 8, false);
  uint8_t s;
  ASSERT_TRUE(vq.Add(ThreeSegs(&s), 5).ok());
  dev.Consume();
  dev.InjectUsed(0);    // same head again: already completed by then
  dev.InjectUsed(200);  // out of range
  int calls = 0;
  vq.PollUsed([&](uint64_t t, uint32_t) { ++calls; EXPECT_EQ(t, 5u); });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(vq.bad_used_entries(), 2u);
}

TEST(Virtqueue, ResetFailsEachOutstandingRequestOnce) {
  TestRingMemory m(8);
  Virtqueue vq = Make(m, 8, true, true);
  FakeDevice dev(m.ring, 8, true);
  uint8_t s[8];
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(vq.Add(ThreeSegs(&s[i]), 100 + i).ok());
  dev.Consume(true);
  dev.Complete(2);
  std::multiset<uint64_t> done, aborted;
  vq.PollUsed([&](uint64_t t, uint32_t) { done.insert(t); });
  vq.Reset([&](uint64_t t, uint32_t) { aborted.insert(t); });
  EXPECT_EQ(done, (std::multiset<uint64_t>{100, 101}));
  EXPECT_EQ(aborted, (std::multiset<uint64_t>{102, 103, 104, 105}));
  EXPECT_EQ(vq.in_flight(), 0u);
  EXPECT_EQ(vq.free_descriptors(), 8);
  EXPECT_EQ(vq.avail_idx(), 0);
  // Late used entries of the old incarnation would now be bogus ids: dropped.
  EXPECT_EQ(vq.PollUsed([&](uint64_t, uint32_t) { ADD_FAILURE(); }), 0);
}

}  // namespace
}  // namespace vkick
