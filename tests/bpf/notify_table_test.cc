// The notify map's control plane (NotifyTargetTable) against a fake map with
// the kernel's capacity behaviour: what each VM owns, what a Set costs in
// map operations (never a walk), all or nothing when full, and the map
// sizes that follow from the capacity flags. Unit: no root, no kernel.
#include "controller/probes/notify_table.h"

#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "controller/probes/probe_capacity.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

using Space = NotifyTarget::Space;

// A hash map of bounded size: Update of a new key beyond `capacity` is
// E2BIG (kResourceExhausted), like a preallocated BPF hash.
class FakeNotifyMap : public MapOps<vkick_notify_key, vkick_notify_target> {
 public:
  explicit FakeNotifyMap(size_t capacity) : capacity_(capacity) {}
  absl::Status Update(const vkick_notify_key& k, const vkick_notify_target& v) override {
    ++updates;
    auto key = Key(k);
    if (!entries.count(key) && entries.size() >= capacity_) {
      return absl::ResourceExhaustedError("fake: map full (E2BIG)");
    }
    entries[key] = v;
    return absl::OkStatus();
  }
  absl::Status Delete(const vkick_notify_key& k) override {
    ++deletes;
    return entries.erase(Key(k)) ? absl::OkStatus() : absl::NotFoundError("fake: no such key");
  }
  size_t Of(uint32_t vm) const {
    size_t n = 0;
    for (const auto& [k, v] : entries) n += std::get<0>(k) == vm;
    return n;
  }
  void ResetCounts() { updates = deletes = 0; }

  std::map<std::tuple<uint32_t, uint8_t, uint64_t>, vkick_notify_target> entries;
  int updates = 0, deletes = 0;

 private:
  static std::tuple<uint32_t, uint8_t, uint64_t> Key(const vkick_notify_key& k) {
    // The kernel compares keys bytewise: the padding must be zero.
    static const uint8_t zero[3] = {};
    EXPECT_EQ(std::memcmp(k.pad, zero, sizeof(zero)), 0);
    return {k.vm_id, k.space, k.addr};
  }
  const size_t capacity_;
};

std::vector<NotifyTarget> Queues(uint64_t base, int n, uint16_t device = 1) {
  std::vector<NotifyTarget> out;
  for (int q = 0; q < n; ++q) {
    NotifyTarget t;
    t.space = Space::kMmio;
    t.addr = base + 4 * q;
    t.device_id = device;
    t.queue = static_cast<uint16_t>(q);
    out.push_back(t);
  }
  return out;
}

TEST(NotifyTargetTableTest, ASetCostsOnlyTheKeysThatChanged) {
  FakeNotifyMap map(64);
  NotifyTargetTable table(&map, 64);
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  EXPECT_EQ(map.updates, 3);
  EXPECT_EQ(map.Of(1), 3u);

  map.ResetCounts();
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  EXPECT_EQ(map.updates + map.deletes, 0) << "unchanged: no syscall at all";

  map.ResetCounts();
  std::vector<NotifyTarget> moved = Queues(0x1000, 3);
  moved[2].addr = 0x9000;  // one queue's notify address moved
  moved[0].queue = 7;      // another one relabelled
  ASSERT_TRUE(table.Set(1, moved).ok());
  EXPECT_EQ(map.deletes, 1);
  EXPECT_EQ(map.updates, 2);
  EXPECT_EQ(map.Of(1), 3u);
  EXPECT_EQ(table.size(), 3u);
}

TEST(NotifyTargetTableTest, TouchesOnlyItsOwnVmsKeysNeverWalks) {
  FakeNotifyMap map(1 << 16);
  NotifyTargetTable table(&map, 1 << 16);
  // A fleet: 4096 VMs x 8 queues.
  for (uint32_t vm = 1; vm <= 4096; ++vm) ASSERT_TRUE(table.Set(vm, Queues(vm << 16, 8)).ok());
  EXPECT_EQ(table.size(), 4096u * 8);
  map.ResetCounts();
  ASSERT_TRUE(table.Set(77, Queues(0x5000, 8)).ok());  // every address moved
  EXPECT_EQ(map.deletes, 8);
  EXPECT_EQ(map.updates, 8);
  map.ResetCounts();
  ASSERT_TRUE(table.Drop(78).ok());
  EXPECT_EQ(map.deletes, 8) << "its own keys, not a walk of 32768";
  EXPECT_EQ(map.Of(78), 0u);
  EXPECT_EQ(map.Of(79), 8u);
  EXPECT_EQ(table.size(), 4095u * 8);
}

TEST(NotifyTargetTableTest, AVmThatDoesNotFitHasNoneInstalledAndCostsNoInsert) {
  FakeNotifyMap map(4);
  NotifyTargetTable table(&map, 4);
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  map.ResetCounts();
  absl::Status s = table.Set(2, Queues(0x2000, 2));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_NE(s.message().find("1 of 4 free"), absl::string_view::npos) << s;
  EXPECT_EQ(map.updates, 0) << "decided from the table's own count";
  EXPECT_EQ(table.owned(2), 0u);
  EXPECT_EQ(map.Of(2), 0u);

  // Room appears: it fits now.
  ASSERT_TRUE(table.Drop(1).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 2)).ok());
  EXPECT_EQ(map.Of(2), 2u);
}

TEST(NotifyTargetTableTest, AVmThatGrowsBeyondTheRoomGivesItsOldKeysBack) {
  FakeNotifyMap map(4);
  NotifyTargetTable table(&map, 4);
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 2)).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(table.Set(1, Queues(0x1000, 3))));
  EXPECT_EQ(map.Of(1), 0u) << "all or nothing: never half counted";
  EXPECT_EQ(table.size(), 2u);
  EXPECT_EQ(map.Of(2), 2u);
}

TEST(NotifyTargetTableTest, ReplacingAFullSetDeletesBeforeInserting) {
  FakeNotifyMap map(3);
  NotifyTargetTable table(&map, 3);
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x8000, 3)).ok()) << "a full map still takes a new set";
  EXPECT_EQ(map.Of(1), 3u);
  EXPECT_EQ(map.entries.count({1, 0, 0x8000}), 1u);
}

TEST(NotifyTargetTableTest, AKernelRefusalLeavesTheVmOutAndTheCountRight) {
  FakeNotifyMap map(2);             // smaller than the table believes (another writer)
  NotifyTargetTable table(&map, 8);
  absl::Status s = table.Set(1, Queues(0x1000, 3));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_EQ(map.Of(1), 0u);
  EXPECT_EQ(table.size(), 0u);
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 2)).ok());
  EXPECT_EQ(table.size(), 2u);
}

TEST(NotifyTargetTableTest, AnUnknownSpaceChangesNothing) {
  FakeNotifyMap map(8);
  NotifyTargetTable table(&map, 8);
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  std::vector<NotifyTarget> bad = Queues(0x3000, 1);
  bad[0].space = static_cast<Space>(9);
  EXPECT_TRUE(absl::IsInvalidArgument(table.Set(1, bad)));
  EXPECT_EQ(map.Of(1), 2u);
}

TEST(ProbeCapacityTest, DefaultsAreTheHeadersAndSizesFollowTheFlags) {
  const ProbeCapacity def;
  EXPECT_EQ(def.max_vms, 4096u);
  EXPECT_EQ(def.queues_per_vm, 8u);
  EXPECT_EQ(def.vcpus_per_vm, 8u);
  const ProbeMapSizes z = MapSizesFor(def);
  EXPECT_EQ(z.tracked, uint32_t{VKICK_MAX_TRACKED});
  EXPECT_EQ(z.notify, uint32_t{VKICK_MAX_NOTIFY_TARGETS});
  EXPECT_EQ(z.notify, 4096u * 8);
  EXPECT_EQ(z.notify_counts, uint32_t{VKICK_MAX_NOTIFY_KEYS});
  EXPECT_EQ(z.exit_counts, uint32_t{VKICK_MAX_EXIT_KEYS});
  EXPECT_EQ(z.exit_counts, 4096u * 8 * VKICK_EXIT_REASONS_PER_VCPU);
  EXPECT_EQ(z.kick_fds, uint32_t{VKICK_MAX_KICK_FDS});

  const ProbeMapSizes small = MapSizesFor({16, 2, 1});
  EXPECT_EQ(small.tracked, 16u + VKICK_MAX_FRONTENDS);
  EXPECT_EQ(small.notify, 32u);
  EXPECT_EQ(small.exit_counts, 16u * VKICK_EXIT_REASONS_PER_VCPU);
}

TEST(ProbeCapacityTest, OutOfBoundsIsRefusedWithTheFlagsName) {
  EXPECT_TRUE(ValidateProbeCapacity({}).ok());
  absl::Status s = ValidateProbeCapacity({0, 8, 8});
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("--max-vms"), absl::string_view::npos) << s;
  EXPECT_NE(ValidateProbeCapacity({8, 2000, 8}).message().find("--max-queues-per-vm"),
            absl::string_view::npos);
  s = ValidateProbeCapacity({65536, 8, 4096});  // 2^31 exit keys
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("entries in one map"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace vkick
