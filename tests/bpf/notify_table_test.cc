// The notify map's and counter slots' control plane (NotifyTargetTable)
// against a fake map with the kernel's capacity behaviour and a fake counter
// array: what each VM owns, what a Set costs in map operations (never a
// walk), all or nothing when full, keys per tracked process, slots handed
// out, kept, given back and reused only zeroed and after a wait, and the map
// sizes that follow from the capacity flags. Unit: no root, no kernel.
#include "controller/probes/notify_table.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
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
  // Keys of VM `vm` (by the vm_id in their value).
  size_t Of(uint32_t vm) const {
    size_t n = 0;
    for (const auto& [k, v] : entries) n += v.vm_id == vm;
    return n;
  }
  size_t OfPid(uint32_t tgid) const {
    size_t n = 0;
    for (const auto& [k, v] : entries) n += std::get<0>(k) == tgid;
    return n;
  }
  const vkick_notify_target* At(uint32_t tgid, uint8_t space, uint64_t addr) const {
    auto it = entries.find({tgid, space, addr});
    return it == entries.end() ? nullptr : &it->second;
  }
  void ResetCounts() { updates = deletes = 0; }

  std::map<std::tuple<uint32_t, uint8_t, uint64_t>, vkick_notify_target> entries;
  int updates = 0, deletes = 0;

 private:
  static std::tuple<uint32_t, uint8_t, uint64_t> Key(const vkick_notify_key& k) {
    // The kernel compares keys bytewise: the padding must be zero.
    static const uint8_t zero[3] = {};
    EXPECT_EQ(std::memcmp(k.pad, zero, sizeof(zero)), 0);
    return {k.tgid, k.space, k.addr};
  }
  const size_t capacity_;
};

// The counter array: one count per slot (the CPUs already summed), and
// what a program would do with it. `waits` counts grace periods; a slot
// freed is "dirty" until the next one: zeroing or reading it before that is
// a test failure.
class FakeSlots : public CounterSlotOps {
 public:
  explicit FakeSlots(uint32_t n) : counts(n, 0) {}
  absl::Status Zero(uint32_t slot) override {
    EXPECT_LT(slot, counts.size());
    ++zeroes;
    counts.at(slot) = 0;
    return absl::OkStatus();
  }
  absl::StatusOr<uint64_t> Sum(uint32_t slot) override {
    EXPECT_GT(waits, 0) << "a slot's count is final only after a wait";
    return counts.at(slot);
  }
  absl::Status WaitForPrograms() override {
    ++waits;
    return absl::OkStatus();
  }
  // A guest write the program matches with `map`'s key: +1 at the slot the
  // target names for `value` (legacy) or its queue; false if it would go to
  // the hash instead.
  bool Write(const FakeNotifyMap& map, uint32_t tgid, uint64_t addr, uint64_t value = 0,
             uint8_t space = 0) {
    const vkick_notify_target* t = map.At(tgid, space, addr);
    if (t == nullptr) return false;
    const uint64_t idx = t->value_is_queue ? value : 0;
    if (idx >= VKICK_TARGET_SLOTS || t->slots[idx] >= counts.size()) return false;
    ++counts[t->slots[idx]];
    return true;
  }

  std::vector<uint64_t> counts;
  int zeroes = 0, waits = 0;
};

std::vector<NotifyTarget> Queues(uint64_t base, int n, uint16_t device = 1, int first = 0) {
  std::vector<NotifyTarget> out;
  for (int q = first; q < first + n; ++q) {
    out.push_back(NotifyTarget::Mmio(base + 4 * q, device, static_cast<uint16_t>(q)));
  }
  return out;
}


// The VMM process of VM `vm` in these tests.
constexpr uint32_t Pid(uint32_t vm) { return 100000 + vm; }

TEST(NotifyTargetTableTest, ASetCostsOnlyTheKeysThatChanged) {
  FakeNotifyMap map(64);
  FakeSlots slots(128);
  NotifyTargetTable table(&map, 64, &slots, 128);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  EXPECT_EQ(map.updates, 3);
  EXPECT_EQ(map.Of(1), 3u);
  EXPECT_EQ(slots.zeroes, 3) << "a slot per queue, zeroed before a key points to it";

  map.ResetCounts();
  slots.zeroes = 0;
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  EXPECT_EQ(map.updates + map.deletes + slots.zeroes, 0) << "unchanged: no syscall at all";

  map.ResetCounts();
  std::vector<NotifyTarget> moved = Queues(0x1000, 3);
  moved[2].addr = 0x9000;  // one queue's notify address moved
  moved[0].queue = 7;      // another one relabelled
  ASSERT_TRUE(table.Set(1, moved).ok());
  EXPECT_EQ(map.deletes, 1);
  EXPECT_EQ(map.updates, 2);
  EXPECT_EQ(slots.zeroes, 1) << "queue 7 is new";
  EXPECT_EQ(map.Of(1), 3u);
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(slots.waits, 0) << "nothing was reused";
}

TEST(NotifyTargetTableTest, TouchesOnlyItsOwnVmsKeysNeverWalks) {
  FakeNotifyMap map(1 << 16);
  FakeSlots slots(4096 * 9);
  NotifyTargetTable table(&map, 1 << 16, &slots, 4096 * 9);
  // A fleet: 4096 VMs x 8 queues.
  for (uint32_t vm = 1; vm <= 4096; ++vm) {
    ASSERT_TRUE(table.Track(Pid(vm), vm).ok());
    ASSERT_TRUE(table.Set(vm, Queues(vm << 16, 8)).ok());
  }
  EXPECT_EQ(table.size(), 4096u * 8);
  EXPECT_EQ(table.slots_used(), 4096u * 8);
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
  EXPECT_EQ(table.slots_used(), 4095u * 8);
}

TEST(NotifyTargetTableTest, AVmThatDoesNotFitHasNoneInstalledAndCostsNoInsert) {
  FakeNotifyMap map(4);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 4, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Track(Pid(2), 2).ok());
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
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 4, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Track(Pid(2), 2).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 2)).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(table.Set(1, Queues(0x1000, 3))));
  EXPECT_EQ(map.Of(1), 0u) << "all or nothing: never half counted";
  EXPECT_EQ(table.size(), 2u);
  EXPECT_EQ(map.Of(2), 2u);
  EXPECT_EQ(table.slots_used(), 2u) << "its slots went back too";
}

TEST(NotifyTargetTableTest, ReplacingAFullSetDeletesBeforeInserting) {
  FakeNotifyMap map(3);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 3, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x8000, 3)).ok()) << "a full map still takes a new set";
  EXPECT_EQ(map.Of(1), 3u);
  EXPECT_EQ(map.entries.count({Pid(1), 0, 0x8000}), 1u);
}

TEST(NotifyTargetTableTest, AKernelRefusalLeavesTheVmOutAndTheCountRight) {
  FakeNotifyMap map(2);             // smaller than the table believes (another writer)
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 8, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Track(Pid(2), 2).ok());
  absl::Status s = table.Set(1, Queues(0x1000, 3));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_EQ(map.Of(1), 0u);
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.slots_used(), 0u);
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 2)).ok());
  EXPECT_EQ(table.size(), 2u);
}

TEST(NotifyTargetTableTest, AnUnknownSpaceChangesNothing) {
  FakeNotifyMap map(8);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 8, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  std::vector<NotifyTarget> bad = Queues(0x3000, 1);
  bad[0].space = static_cast<Space>(9);
  EXPECT_TRUE(absl::IsInvalidArgument(table.Set(1, bad)));
  EXPECT_EQ(map.Of(1), 2u);
}

TEST(NotifyTargetTableTest, KeysArePerProcessAndAVmWithoutOneHoldsItsRoom) {
  FakeNotifyMap map(8);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 8, &slots, 64);
  // Targets first (the order does not matter): room held, nothing written.
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 3)).ok());
  EXPECT_EQ(map.updates, 0);
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(table.slots_used(), 3u);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  EXPECT_EQ(map.OfPid(Pid(1)), 3u);
  EXPECT_EQ(table.size(), 3u) << "the room it held";
  EXPECT_EQ(map.At(Pid(1), 0, 0x1004)->vm_id, 1u);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok()) << "idempotent";
  EXPECT_EQ(map.updates, 3);

  // A second process of the VM: its own keys, the same slots.
  ASSERT_TRUE(table.Track(Pid(50), 1).ok());
  EXPECT_EQ(map.OfPid(Pid(50)), 3u);
  EXPECT_EQ(table.size(), 6u);
  EXPECT_EQ(map.At(Pid(50), 0, 0x1000)->slots[0], map.At(Pid(1), 0, 0x1000)->slots[0]);
  // A third does not fit: nothing of it installed.
  absl::Status s = table.Track(Pid(51), 1);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_EQ(map.OfPid(Pid(51)), 0u);
  EXPECT_EQ(table.size(), 6u);

  // A process moved to another VM takes its keys along.
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 1)).ok());
  ASSERT_TRUE(table.Track(Pid(50), 2).ok());
  EXPECT_EQ(map.OfPid(Pid(50)), 1u);
  EXPECT_EQ(map.At(Pid(50), 0, 0x2000)->vm_id, 2u);
  ASSERT_TRUE(table.Untrack(Pid(1)).ok());
  EXPECT_EQ(map.OfPid(Pid(1)), 0u);
  EXPECT_EQ(table.size(), 3u + 1u) << "VM 1 still holds the room for its targets";
  EXPECT_EQ(map.entries.size(), 1u);
}

TEST(NotifyTargetTableTest, ModernQueuesGetASlotEachLegacyTargetsShareThem) {
  FakeNotifyMap map(64);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 64, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  // Device 1 transitional (modern q0..q5 + legacy port), device 2 legacy only.
  std::vector<NotifyTarget> t = Queues(0x1000, 6, 1);
  t.push_back(NotifyTarget::LegacyPio(0xc000, 1));
  t.push_back(NotifyTarget::LegacyPio(0xc040, 2));
  ASSERT_TRUE(table.Set(1, t).ok());
  EXPECT_EQ(table.slots_used(), 6u + VKICK_TARGET_SLOTS);
  std::set<uint32_t> distinct;
  for (uint16_t q = 0; q < 6; ++q) distinct.insert(*table.SlotOf({1, 1, q}));
  for (uint16_t q = 0; q < VKICK_TARGET_SLOTS; ++q) distinct.insert(*table.SlotOf({1, 2, q}));
  EXPECT_EQ(distinct.size(), 6u + VKICK_TARGET_SLOTS);
  EXPECT_FALSE(table.SlotOf({1, 2, VKICK_TARGET_SLOTS}).has_value());

  const vkick_notify_target* modern = map.At(Pid(1), 0, 0x1008);
  EXPECT_EQ(modern->slots[0], *table.SlotOf({1, 1, 2}));
  EXPECT_EQ(modern->slots[1], VKICK_NO_SLOT);
  const vkick_notify_target* legacy = map.At(Pid(1), 1, 0xc000);
  for (uint16_t q = 0; q < VKICK_TARGET_SLOTS; ++q) {
    EXPECT_EQ(legacy->slots[q], *table.SlotOf({1, 1, q})) << "the modern queue's slot";
  }
  // A write either way counts in the queue's one slot.
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  ASSERT_TRUE(slots.Write(map, Pid(1), 0xc000, /*value=*/1, /*space=*/1));
  EXPECT_EQ(slots.counts[*table.SlotOf({1, 1, 1})], 2u);
  // Legacy values beyond the slots go to the hash (the program's fallback).
  EXPECT_FALSE(slots.Write(map, Pid(1), 0xc000, 5, 1));
  ASSERT_TRUE(slots.Write(map, Pid(1), 0xc040, 3, 1));
  EXPECT_EQ(slots.counts[*table.SlotOf({1, 2, 3})], 1u);
  for (uint32_t s = 0; s < table.slot_bound(); ++s) {
    EXPECT_TRUE(table.SlotOwner(s).has_value()) << "handed out lowest first: " << s;
  }
}

TEST(NotifyTargetTableTest, AQueueNoLongerNamedKeepsItsSlotAndCount) {
  FakeNotifyMap map(64);
  FakeSlots slots(64);
  NotifyTargetTable table(&map, 64, &slots, 64);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  const uint32_t q1 = *table.SlotOf({1, 1, 1});
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  // The guest's BARs are briefly unassigned: no targets.
  ASSERT_TRUE(table.Set(1, {}).ok());
  EXPECT_EQ(map.Of(1), 0u);
  EXPECT_EQ(table.SlotOf({1, 1, 1}), q1) << "kept: a counter must not go back to 0";
  EXPECT_EQ(table.SlotOwner(q1), (ProbeQueueId{1, 1, 1}));
  // Back at another address: the same slot, the count goes on.
  ASSERT_TRUE(table.Set(1, Queues(0x7000, 2)).ok());
  EXPECT_EQ(map.At(Pid(1), 0, 0x7004)->slots[0], q1);
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x7004));
  EXPECT_EQ(slots.counts[q1], 6u);
  EXPECT_EQ(slots.zeroes, 2) << "no new slot";
  EXPECT_EQ(slots.waits, 0);
}

// Untrack then track again (as vkickd does for a restarted VM, under a new
// vm_id): the slots are reused, zeroed, only after a wait; the new owner
// starts at 0 and the old owner's counts are gone.
TEST(NotifyTargetTableTest, AReusedSlotStartsAtZeroAfterAWait) {
  FakeNotifyMap map(64);
  FakeSlots slots(2);
  NotifyTargetTable table(&map, 64, &slots, 2);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(slots.Write(map, Pid(1), 0x1000));
  ASSERT_TRUE(table.Untrack(Pid(1)).ok());
  ASSERT_TRUE(table.Drop(1).ok());
  EXPECT_EQ(table.slots_used(), 0u);
  EXPECT_FALSE(table.SlotOwner(0).has_value()) << "an untracked VM's counts are dropped";
  EXPECT_FALSE(table.SlotOwner(1).has_value());
  EXPECT_EQ(slots.waits, 0) << "a Drop does not wait";

  ASSERT_TRUE(table.Track(Pid(1), 2).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x1000, 2)).ok());
  EXPECT_EQ(slots.waits, 1) << "reused only after the programs that saw VM 1's keys finished";
  EXPECT_EQ(slots.counts[*table.SlotOf({2, 1, 0})], 0u);
  EXPECT_EQ(slots.counts[*table.SlotOf({2, 1, 1})], 0u);
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1000));
  EXPECT_EQ(slots.counts[*table.SlotOf({2, 1, 0})], 1u);
  EXPECT_EQ(table.SlotOwner(*table.SlotOf({2, 1, 0})), (ProbeQueueId{2, 1, 0}));
}

TEST(NotifyTargetTableTest, ShortOfSlotsAVmGivesBackItsOldQueuesCountsCarried) {
  FakeNotifyMap map(64);
  FakeSlots slots(3);
  NotifyTargetTable table(&map, 64, &slots, 3);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(slots.Write(map, Pid(1), 0x1000));
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  // The device is replaced by one with two other queues: 2 new slots, 1 free.
  ASSERT_TRUE(table.Set(1, Queues(0x2000, 2, 1, /*first=*/2)).ok());
  EXPECT_EQ(slots.waits, 1);
  EXPECT_FALSE(table.SlotOf({1, 1, 0}).has_value());
  EXPECT_EQ(table.Carried({1, 1, 0}), 4u) << "given back, its count kept";
  EXPECT_EQ(table.Carried({1, 1, 1}), 1u);
  EXPECT_EQ(table.slots_used(), 2u);
  std::map<ProbeQueueId, uint64_t> carried;
  table.ForEachCarried([&](const ProbeQueueId& q, uint64_t n) { carried[q] = n; });
  EXPECT_EQ(carried.size(), 2u);
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x200c));
  EXPECT_EQ(slots.counts[*table.SlotOf({1, 1, 3})], 1u) << "a reused slot starts at 0";
  ASSERT_TRUE(table.Drop(1).ok());
  EXPECT_EQ(table.Carried({1, 1, 0}), 0u) << "untracked: dropped";
}

TEST(NotifyTargetTableTest, AVmShortOfSlotsHasNoneAndItsRoomGoesToOthers) {
  FakeNotifyMap map(64);
  FakeSlots slots(4);
  NotifyTargetTable table(&map, 64, &slots, 4);
  ASSERT_TRUE(table.Track(Pid(1), 1).ok());
  ASSERT_TRUE(table.Track(Pid(2), 2).ok());
  ASSERT_TRUE(table.Set(1, Queues(0x1000, 2)).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 1)).ok());
  ASSERT_TRUE(slots.Write(map, Pid(2), 0x2000));
  map.ResetCounts();
  slots.zeroes = 0;
  // VM 2 grows to 3 queues: 2 new slots, 1 free.
  absl::Status s = table.Set(2, Queues(0x2000, 3));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_NE(s.message().find("counter slots full"), absl::string_view::npos) << s;
  EXPECT_EQ(map.Of(2), 0u) << "none installed";
  EXPECT_EQ(map.updates, 0);
  EXPECT_EQ(slots.zeroes, 0);
  EXPECT_EQ(table.slots_used(), 2u) << "its slot went back";
  EXPECT_EQ(table.Carried({2, 1, 0}), 1u) << "with its count";
  EXPECT_EQ(map.Of(1), 2u);
  // VM 1 leaves: VM 2 fits.
  ASSERT_TRUE(table.Drop(1).ok());
  ASSERT_TRUE(table.Set(2, Queues(0x2000, 3)).ok());
  EXPECT_EQ(map.Of(2), 3u);
}

// A restarted vkickd: a new table over the same (pinned) map and counters.
std::vector<NotifyTargetTable::Entry> EntriesOf(const FakeNotifyMap& map) {
  std::vector<NotifyTargetTable::Entry> out;
  for (const auto& [k, v] : map.entries) {
    NotifyTargetTable::Entry e{};
    e.key.tgid = std::get<0>(k);
    e.key.space = std::get<1>(k);
    e.key.addr = std::get<2>(k);
    e.target = v;
    out.push_back(e);
  }
  return out;
}

TEST(NotifyTargetTableTest, AdoptedFromThePinnedMapAVmKeepsItsSlotsAndCounts) {
  FakeNotifyMap map(64);
  FakeSlots slots(64);
  std::vector<NotifyTarget> legacy = {NotifyTarget::LegacyPio(0xc000, 2)};
  std::vector<NotifyTarget> vm1 = Queues(0x1000, 3);
  vm1.insert(vm1.end(), legacy.begin(), legacy.end());
  {
    NotifyTargetTable before(&map, 64, &slots, 64);
    ASSERT_TRUE(before.Track(Pid(1), 1).ok());
    ASSERT_TRUE(before.Set(1, vm1).ok());
    ASSERT_TRUE(before.Track(Pid(2), 2).ok());
    ASSERT_TRUE(before.Set(2, Queues(0x2000, 2)).ok());
    ASSERT_TRUE(before.Drop(2).ok());  // vm 2 left: its slots are free
    ASSERT_TRUE(before.Track(Pid(3), 3).ok());
    ASSERT_TRUE(before.Set(3, Queues(0x3000, 1)).ok());
  }  // vkickd dies: the map and the counts stay
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  ASSERT_TRUE(slots.Write(map, Pid(1), 0xc000, /*value=*/3, /*space=*/1));
  ASSERT_TRUE(slots.Write(map, Pid(3), 0x3000));
  const std::vector<uint64_t> counted = slots.counts;

  NotifyTargetTable after(&map, 64, &slots, 64);
  ASSERT_TRUE(after.Adopt(EntriesOf(map)).ok());
  EXPECT_EQ(after.processes(), (std::map<uint32_t, uint32_t>{{Pid(1), 1}, {Pid(3), 3}}));
  EXPECT_EQ(after.owned(1), 4u);
  EXPECT_EQ(after.size(), 5u);
  EXPECT_EQ(after.slots_used(), 3u + 4u + 1u) << "3 modern queues, 4 legacy ones, vm 3's";
  std::optional<uint32_t> q1 = after.SlotOf({1, 1, 1});
  ASSERT_TRUE(q1.has_value());
  EXPECT_EQ(after.SlotOwner(*q1), (ProbeQueueId{1, 1, 1}));
  EXPECT_EQ(slots.counts[*q1], 2u);
  std::optional<uint32_t> legacy3 = after.SlotOf({1, 2, 3});
  ASSERT_TRUE(legacy3.has_value());
  EXPECT_EQ(slots.counts[*legacy3], 1u);

  // The daemon attaches the same QEMU again under the same vm_id: no
  // syscall, nothing zeroed, the counts continue.
  map.ResetCounts();
  slots.zeroes = 0;
  ASSERT_TRUE(after.Track(Pid(1), 1).ok());
  ASSERT_TRUE(after.Set(1, vm1).ok());
  EXPECT_EQ(map.updates + map.deletes + slots.zeroes, 0);
  EXPECT_EQ(slots.counts, counted);
  ASSERT_TRUE(slots.Write(map, Pid(1), 0x1004));
  EXPECT_EQ(slots.counts[*q1], 3u);

  // A new VM gets vm 2's old slots, zeroed; never an adopted one.
  ASSERT_TRUE(after.Track(Pid(4), 4).ok());
  ASSERT_TRUE(after.Set(4, Queues(0x4000, 2)).ok());
  EXPECT_EQ(slots.zeroes, 2);
  for (uint16_t q = 0; q < 2; ++q) {
    std::optional<uint32_t> s4 = after.SlotOf({4, 1, q});
    ASSERT_TRUE(s4.has_value());
    EXPECT_EQ(slots.counts[*s4], 0u);
    EXPECT_EQ(after.SlotOwner(*s4), (ProbeQueueId{4, 1, q}));
  }
  EXPECT_EQ(slots.counts[*q1], 3u);

  // An adopted VM nobody claims is dropped like any other: keys and slots.
  ASSERT_TRUE(after.Untrack(Pid(3)).ok());
  ASSERT_TRUE(after.Drop(3).ok());
  EXPECT_EQ(map.Of(3), 0u);
  EXPECT_EQ(after.slots_used(), 3u + 4u + 2u);
}

TEST(NotifyTargetTableTest, AdoptRefusesContradictoryEntriesAndStaysEmpty) {
  FakeNotifyMap map(64);
  FakeSlots slots(16);
  NotifyTargetTable before(&map, 64, &slots, 16);
  ASSERT_TRUE(before.Track(Pid(1), 1).ok());
  ASSERT_TRUE(before.Set(1, Queues(0x1000, 2)).ok());
  ASSERT_TRUE(before.Track(Pid(2), 2).ok());
  ASSERT_TRUE(before.Set(2, Queues(0x2000, 2)).ok());
  const std::vector<NotifyTargetTable::Entry> good = EntriesOf(map);

  auto adopt = [&](std::vector<NotifyTargetTable::Entry> e, uint32_t slot_capacity = 16) {
    NotifyTargetTable t(&map, 64, &slots, slot_capacity);
    absl::Status s = t.Adopt(e);
    if (!s.ok()) {
      EXPECT_EQ(t.size(), 0u);
      EXPECT_EQ(t.slots_used(), 0u);
      EXPECT_TRUE(t.processes().empty());
    }
    return s;
  };
  EXPECT_TRUE(adopt(good).ok());
  std::vector<NotifyTargetTable::Entry> shared = good;
  shared.back().target.slots[0] = shared.front().target.slots[0];  // two queues, one slot
  EXPECT_TRUE(absl::IsDataLoss(adopt(shared)));
  std::vector<NotifyTargetTable::Entry> two_vms = good;
  two_vms.back().key.tgid = Pid(1);  // a process under vm 1 and vm 2
  EXPECT_TRUE(absl::IsDataLoss(adopt(two_vms)));
  EXPECT_TRUE(absl::IsDataLoss(adopt(good, /*slot_capacity=*/2))) << "a slot beyond the array";
  NotifyTargetTable used(&map, 64, &slots, 16);
  ASSERT_TRUE(used.Track(Pid(9), 9).ok());
  ASSERT_TRUE(used.Set(9, Queues(0x9000, 1)).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(used.Adopt(good)));
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
  EXPECT_EQ(z.queue_counts, uint32_t{VKICK_MAX_QUEUE_SLOTS});
  EXPECT_EQ(z.queue_counts, 4096u * 9);
  EXPECT_EQ(z.exit_counts, uint32_t{VKICK_MAX_EXIT_KEYS});
  EXPECT_EQ(z.exit_counts, 4096u * 8 * VKICK_EXIT_REASONS_PER_VCPU);
  EXPECT_EQ(z.kick_fds, uint32_t{VKICK_MAX_KICK_FDS});

  const ProbeMapSizes small = MapSizesFor({16, 2, 1});
  EXPECT_EQ(small.tracked, 16u + VKICK_MAX_FRONTENDS);
  EXPECT_EQ(small.notify, 32u);
  EXPECT_EQ(small.queue_counts, 48u);
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
