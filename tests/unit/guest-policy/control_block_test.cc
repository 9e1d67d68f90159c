#include "guest-policy/core/control_block.h"

#include <chrono>
#include <thread>

#include "gtest/gtest.h"
#include "guest-policy/core/kick_scheduler.h"

namespace vkick {
namespace {

ControlEntry Entry(ControlMode m, uint16_t b, uint32_t t, uint64_t lease) {
  ControlEntry e{};
  e.mode = static_cast<uint8_t>(m);
  e.batch = b;
  e.defer_ns = t;
  e.lease_expiry_ns = lease;
  return e;
}

TEST(ControlBlock, RoundTripAndPerQueueEntries) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  ControlEntry es[3] = {Entry(ControlMode::kStatic, 16, 40000, 99), Entry(ControlMode::kEventIdx, 4, 5000, 77),
                        Entry(ControlMode::kImmediate, 4, 5000, 77)};
  WriteControlEntries(&cb, es, 3);
  auto r0 = ReadControlBlock(&cb, 0, 256);
  ASSERT_TRUE(r0.snapshot.has_value());
  EXPECT_EQ(r0.snapshot->mode, ControlMode::kStatic);
  EXPECT_EQ(r0.snapshot->batch, 16u);
  EXPECT_EQ(r0.snapshot->defer_ns, 40000u);
  EXPECT_EQ(r0.snapshot->lease_expiry_ns, 99u);
  auto r1 = ReadControlBlock(&cb, 1, 256);
  ASSERT_TRUE(r1.snapshot.has_value());
  EXPECT_EQ(r1.snapshot->mode, ControlMode::kEventIdx);
  EXPECT_EQ(r1.snapshot->batch, 4u);  // event-idx batches too: a batch closes, then the device is asked
  EXPECT_EQ(r1.snapshot->defer_ns, 5000u);
  auto r2 = ReadControlBlock(&cb, 2, 256);
  ASSERT_TRUE(r2.snapshot.has_value());
  EXPECT_EQ(r2.snapshot->batch, 1u);  // forced for immediate
  EXPECT_EQ(r2.snapshot->defer_ns, 0u);
  auto r5 = ReadControlBlock(&cb, 5, 256);  // beyond num_entries: entry 0
  EXPECT_EQ(r5.snapshot->batch, 16u);
}

TEST(ControlBlock, ClampsBatchAndDefer) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  ControlEntry e = Entry(ControlMode::kStatic, 60000, 50'000'000, 5);
  WriteControlEntries(&cb, &e, 1);
  auto r = ReadControlBlock(&cb, 0, 128);
  ASSERT_TRUE(r.snapshot.has_value());
  EXPECT_EQ(r.snapshot->batch, 128u);
  EXPECT_EQ(r.snapshot->defer_ns, kControlMaxDeferNs);
  e.batch = 0;
  WriteControlEntries(&cb, &e, 1);
  EXPECT_EQ(ReadControlBlock(&cb, 0, 128).snapshot->batch, 1u);
}

TEST(ControlBlock, RejectsInvalidHeaders) {
  EXPECT_EQ(ReadControlBlock(nullptr, 0, 8).error, ControlReadError::kAbsent);
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  cb.magic = 0;
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBadMagic);
  InitControlBlock(&cb, 1);
  cb.version = 9;
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBadVersion);
  InitControlBlock(&cb, 1);
  cb.size = 10;
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBadSize);
  InitControlBlock(&cb, 1);
  cb.entries[0].mode = 9;
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBadEntry);
  InitControlBlock(&cb, 1);
  cb.num_entries = 17;
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBadEntry);
  InitControlBlock(&cb, 1);
  cb.seq = 1;  // a writer died mid-update: bounded retries, then "busy"
  EXPECT_EQ(ReadControlBlock(&cb, 0, 8).error, ControlReadError::kBusy);
}

// A writer flipping between two consistent entries while a reader reads:
// the reader never sees a mix (B of one, T of the other).
TEST(ControlBlock, SeqlockNeverYieldsTornEntries) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  ControlEntry a = Entry(ControlMode::kStatic, 8, 8000, 8), b = Entry(ControlMode::kStatic, 64, 64000, 64);
  WriteControlEntries(&cb, &a, 1);
  std::atomic<bool> stop{false};
  // The writer pauses now and then: without pauses, on a loaded 2-CPU host a
  // reader can lose every race (kBusy each time) and the torn-entry check
  // below would check nothing.
  std::thread writer([&] {
    for (int i = 0; !stop.load(); ++i) {
      WriteControlEntries(&cb, i % 2 ? &a : &b, 1);
      if (i % 64 == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  });
  int ok = 0;
  for (int i = 0; i < 200000; ++i) {
    auto r = ReadControlBlock(&cb, 0, 256);
    if (!r.snapshot) continue;
    ++ok;
    ASSERT_EQ(r.snapshot->defer_ns, r.snapshot->batch * 1000u);
    ASSERT_EQ(r.snapshot->lease_expiry_ns, r.snapshot->batch);
  }
  stop = true;
  writer.join();
  EXPECT_GT(ok, 0) << "no read ever succeeded: the torn-entry check checked nothing";
  EXPECT_TRUE(ReadControlBlock(&cb, 0, 256).snapshot.has_value()) << "quiescent block must read";
}

TEST(AdaptiveSource, FollowsLeaseAndFallsBackToImmediate) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  AdaptiveSource src(&cb, 0, 256);
  const uint64_t now = 1'000'000;
  // Header present but no lease yet (0): immediate.
  EXPECT_EQ(src.Effective(now).mode, KickMode::kImmediate);
  ControlEntry e = Entry(ControlMode::kStatic, 32, 20000, now + 500);
  WriteControlEntries(&cb, &e, 1);
  KickPolicy p = src.Effective(now);
  EXPECT_EQ(p, (KickPolicy{KickMode::kStatic, 32, 20000}));
  EXPECT_TRUE(src.leased());
  EXPECT_EQ(src.Effective(now + 500).mode, KickMode::kImmediate);  // lease expired
  EXPECT_EQ(src.fallbacks(), 1u);
  // Corrupted block: immediately immediate, not the old value.
  e.lease_expiry_ns = now + 10'000;
  WriteControlEntries(&cb, &e, 1);
  EXPECT_EQ(src.Effective(now).mode, KickMode::kStatic);
  cb.magic = 1;
  EXPECT_EQ(src.Effective(now).mode, KickMode::kImmediate);
  EXPECT_EQ(src.last_error(), ControlReadError::kBadMagic);
  AdaptiveSource none(nullptr, 0, 256);
  EXPECT_EQ(none.Effective(now).mode, KickMode::kImmediate);
}

}  // namespace
}  // namespace vkick
