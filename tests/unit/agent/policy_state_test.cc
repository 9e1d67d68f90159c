#include "agent/policy_state.h"

#include "gtest/gtest.h"

namespace vkick::agent {
namespace {

constexpr uint64_t kMs = 1'000'000;

proto::QueuePolicy Static(uint16_t dev, uint16_t q, uint16_t batch, uint32_t defer_ns, uint64_t lease_ns,
                          uint64_t gen) {
  proto::QueuePolicy p;
  p.ref = {dev, q};
  p.mode = proto::KickMode::kStatic;
  p.batch = batch;
  p.defer_ns = defer_ns;
  p.lease_ns = lease_ns;
  p.generation = gen;
  return p;
}

const std::vector<AnnouncedDriver> kHello = {{100, 2}, {200, 1}};

TEST(PolicyState, NoPolicyMeansNoLeaseAndImmediateEntries) {
  PolicyState s;
  AppliedState a = s.StateOf({100, 0}, 0, 5 * kMs);
  EXPECT_EQ(a.lease, proto::LeaseState::kNone);
  EXPECT_EQ(a.generation, 0u);
  auto entries = s.EntriesFor(100, 2);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].mode, static_cast<uint8_t>(ControlMode::kImmediate));
  EXPECT_EQ(entries[0].batch, 1);
  EXPECT_EQ(entries[0].lease_expiry_ns, 0u);
}

TEST(PolicyState, PolicyMapsToControlEntriesWithLease) {
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(0, 1, 16, 50'000, 2000 * kMs, 5), Static(1, 0, 8, 20'000, 100 * kMs, 6)};
  auto r = s.Apply(p, kHello, 1000 * kMs);
  EXPECT_EQ(r.ack_generation, 6u);
  EXPECT_EQ(r.changed_pids, (std::vector<int32_t>{100, 200}));
  EXPECT_EQ(r.unknown_queues, 0u);

  auto e100 = s.EntriesFor(100, 2);
  EXPECT_EQ(e100[0].mode, static_cast<uint8_t>(ControlMode::kImmediate));  // queue 0 untouched
  EXPECT_EQ(e100[1].mode, static_cast<uint8_t>(ControlMode::kStatic));
  EXPECT_EQ(e100[1].batch, 16);
  EXPECT_EQ(e100[1].defer_ns, 50'000u);
  EXPECT_EQ(e100[1].lease_expiry_ns, 3000 * kMs);  // now + lease

  // The driver-side reader accepts exactly what was written.
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  WriteControlEntries(&cb, e100.data(), static_cast<uint16_t>(e100.size()));
  ControlReadResult rr = ReadControlBlock(&cb, 1, 256);
  ASSERT_TRUE(rr.snapshot.has_value());
  EXPECT_EQ(rr.snapshot->mode, ControlMode::kStatic);
  EXPECT_EQ(rr.snapshot->batch, 16u);
  EXPECT_EQ(rr.snapshot->defer_ns, 50'000u);
  EXPECT_EQ(rr.snapshot->lease_expiry_ns, 3000 * kMs);
}

TEST(PolicyState, LeaseActiveThenExpiredOnAFakeClock) {
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(1, 0, 8, 20'000, 100 * kMs, 9)};
  s.Apply(p, kHello, 1000 * kMs);
  AppliedState a = s.StateOf({200, 0}, 0, 1099 * kMs);
  EXPECT_EQ(a.lease, proto::LeaseState::kActive);
  EXPECT_EQ(a.mode, proto::KickMode::kStatic);
  EXPECT_EQ(a.batch, 8);
  EXPECT_EQ(a.generation, 9u);
  a = s.StateOf({200, 0}, 0, 1100 * kMs);  // expiry instant: expired (driver: expiry > now)
  EXPECT_EQ(a.lease, proto::LeaseState::kExpired);
  EXPECT_EQ(a.mode, proto::KickMode::kImmediate);
  EXPECT_EQ(a.batch, 1);
  EXPECT_EQ(a.generation, 9u);  // protocol: generation != 0 unless lease none

  // Renewal: a new generation restarts the lease.
  p.queues[0].generation = 10;
  s.Apply(p, kHello, 1200 * kMs);
  EXPECT_EQ(s.StateOf({200, 0}, 0, 1250 * kMs).lease, proto::LeaseState::kActive);
  EXPECT_EQ(s.StateOf({200, 0}, 0, 1250 * kMs).generation, 10u);
  EXPECT_EQ(s.LatestExpiry(), 1300 * kMs);
}

TEST(PolicyState, UnknownAndUnsupportedQueuesAreNotApplied) {
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(0, 2, 8, 20'000, 100 * kMs, 1),   // device 0 has 2 queues
              Static(2, 0, 8, 20'000, 100 * kMs, 2)};  // no device 2
  auto r = s.Apply(p, kHello, 0);
  EXPECT_EQ(r.unknown_queues, 2u);
  EXPECT_EQ(r.ack_generation, 0u);
  EXPECT_TRUE(r.changed_pids.empty());

  const std::vector<AnnouncedDriver> big = {{300, 32}};
  p.queues = {Static(0, 20, 8, 20'000, 100 * kMs, 3)};  // control block has 16 entries
  r = s.Apply(p, big, 0);
  EXPECT_EQ(r.unsupported_queues, 1u);
  EXPECT_EQ(s.EntriesFor(300, 32).size(), kControlBlockMaxQueues);
}

TEST(PolicyState, ForgetDropsADriver) {
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(0, 0, 8, 20'000, 100 * kMs, 1)};
  s.Apply(p, kHello, 0);
  s.Forget({100, 0});
  EXPECT_EQ(s.StateOf({100, 0}, 0, 1).lease, proto::LeaseState::kNone);
}

TEST(PolicyState, KernelDisksAreNeverPoliced) {
  // Device 1 is a kernel virtio_blk disk (observe only): its queue is
  // counted, not applied, and acks nothing.
  std::vector<AnnouncedDriver> hello = {{100, 2}, {0, 1, proto::DriverKind::kKernel, (254u << 20) | 16}};
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(1, 0, 8, 20'000, 100 * kMs, 7)};
  auto r = s.Apply(p, hello, 0);
  EXPECT_EQ(r.observe_only_queues, 1u);
  EXPECT_EQ(r.unknown_queues, 0u);
  EXPECT_EQ(r.ack_generation, 0u);
  EXPECT_TRUE(r.changed_pids.empty());
  EXPECT_EQ(s.StateOf({0, (254u << 20) | 16}, 0, 1).lease, proto::LeaseState::kNone);
}

TEST(PolicyState, VkickVirtioBlkQueuesAreRecordedByDiskWithoutAControlBlock) {
  // Device 1 is a vkick_virtio_blk disk with 32 queues: steered through
  // sysfs (the caller writes steer), so queue 20 is no control block's
  // concern, and no control block is rewritten for it.
  const uint32_t kdev = (253u << 20) | 0;
  std::vector<AnnouncedDriver> hello = {{100, 2}, {0, 32, proto::DriverKind::kVkickVirtioBlk, kdev}};
  PolicyState s;
  proto::Policy p;
  p.queues = {Static(1, 20, 8, 20'000, 100 * kMs, 11)};
  auto r = s.Apply(p, hello, 1000 * kMs);
  EXPECT_EQ(r.ack_generation, 11u);
  EXPECT_EQ(r.unsupported_queues, 0u);
  EXPECT_EQ(r.observe_only_queues, 0u);
  EXPECT_TRUE(r.changed_pids.empty());
  AppliedState a = s.StateOf({0, kdev}, 20, 1050 * kMs);
  EXPECT_EQ(a.lease, proto::LeaseState::kActive);
  EXPECT_EQ(a.batch, 8);
  EXPECT_EQ(s.StateOf({0, kdev}, 20, 1100 * kMs).lease, proto::LeaseState::kExpired);
  EXPECT_EQ(s.StateOf({100, 0}, 20, 1050 * kMs).lease, proto::LeaseState::kNone);  // not the pid's
  s.Forget({0, kdev});
  EXPECT_EQ(s.StateOf({0, kdev}, 20, 1050 * kMs).lease, proto::LeaseState::kNone);
}

}  // namespace
}  // namespace vkick::agent
