// Pure lifecycle logic (controller/discovery/vm_lifecycle.h): run states
// from QEMU's words, guest identity, counts carried across a migration.
#include "controller/discovery/vm_lifecycle.h"

#include <string>
#include <utility>
#include <vector>

#include "controller/discovery/vm_model.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

VmInfo Disks(std::vector<std::pair<std::string, uint16_t>> devices) {
  VmInfo vm;
  vm.name = "g";
  for (const auto& [label, id] : devices) {
    VirtioDeviceInfo d;
    d.label = label;
    d.device_id = id;
    vm.devices.push_back(d);
  }
  return vm;
}

TEST(VmLifecycleTest, RunStateFromQemuStatus) {
  EXPECT_EQ(RunStateFrom("running", ""), RunState::kRunning);
  EXPECT_EQ(RunStateFrom("running", "none"), RunState::kRunning);
  EXPECT_EQ(RunStateFrom("running", "completed"), RunState::kRunning);
  EXPECT_EQ(RunStateFrom("running", "active"), RunState::kMigrating);
  EXPECT_EQ(RunStateFrom("running", "setup"), RunState::kMigrating);
  EXPECT_EQ(RunStateFrom("finish-migrate", "device"), RunState::kMigrating);
  EXPECT_EQ(RunStateFrom("postmigrate", "completed"), RunState::kPostMigrate);
  EXPECT_EQ(RunStateFrom("inmigrate", ""), RunState::kInMigrate);
  EXPECT_EQ(RunStateFrom("paused", ""), RunState::kPaused);
  EXPECT_EQ(RunStateFrom("prelaunch", ""), RunState::kPaused);
  EXPECT_EQ(RunStateFrom("io-error", ""), RunState::kPaused);
  EXPECT_EQ(RunStateFrom("suspended", ""), RunState::kSuspended);
  EXPECT_EQ(RunStateFrom("shutdown", ""), RunState::kShutdown);
  EXPECT_EQ(RunStateFrom("guest-panicked", ""), RunState::kPaused) << "an unknown stopped state";
  EXPECT_EQ(RunStateFrom("", ""), RunState::kUnknown);
  EXPECT_FALSE(IsFrozen(RunState::kUnknown));
  EXPECT_FALSE(IsFrozen(RunState::kRunning));
  for (RunState s : {RunState::kMigrating, RunState::kPaused, RunState::kSuspended,
                     RunState::kInMigrate, RunState::kPostMigrate, RunState::kShutdown}) {
    EXPECT_TRUE(IsFrozen(s)) << RunStateName(s);
  }
}

TEST(VmLifecycleTest, SameGuestIsNameAndUuid) {
  VmInfo a, b;
  a.name = b.name = "g";
  EXPECT_TRUE(SameGuest(a, b)) << "no -uuid on either: the name decides";
  a.uuid = kNilUuid;
  EXPECT_TRUE(SameGuest(a, b)) << "nil and none are the same";
  a.uuid = "6c1e9d8a-1f0b-4e5c-9a1d-0000000000aa";
  EXPECT_FALSE(SameGuest(a, b));
  b.uuid = a.uuid;
  EXPECT_TRUE(SameGuest(a, b));
  b.name = "h";
  EXPECT_FALSE(SameGuest(a, b));
}

TEST(VmLifecycleTest, CarriedCountsAreRenamedByDeviceLabel) {
  VmInfo from = Disks({{"disk0", 1}, {"disk1", 2}});
  VmInfo to = Disks({{"disk0", 9}});  // numbered its own way, no disk1 there
  CounterSnapshot c;
  c.notifications = {{4, 1, 0, 10}, {4, 1, 1, 11}, {4, 2, 0, 12}};
  c.exits = {{4, 0, 1, 30, 5}};
  c.interrupts = {{4, 0xfee00000, 33, 6}};
  c.unmatched_writes = {{4, NotifyTarget::Space::kMmio, 7}};
  CounterSnapshot out = CarryCounters(c, from, to, 8);
  ASSERT_EQ(out.notifications.size(), 2u) << "disk1's counts have nowhere to go";
  EXPECT_EQ(out.notifications[0].vm_id, 8u);
  EXPECT_EQ(out.notifications[0].device_id, 9u);
  EXPECT_EQ(out.notifications[1].count, 11u);
  ASSERT_EQ(out.exits.size(), 1u);
  EXPECT_EQ(out.exits[0].vm_id, 8u);
  EXPECT_EQ(out.interrupts.at(0).vm_id, 8u);
  EXPECT_EQ(out.unmatched_writes.at(0).count, 7u);
}

}  // namespace
}  // namespace vkick
