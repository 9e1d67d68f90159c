// The probes' in-kernel counting logic, run for real through
// BPF_PROG_TEST_RUN of the SEC("syscall") programs, which share their inline
// counting functions with the tracepoint handlers. No tracepoint is attached:
// nothing on the host can disturb the counts.
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <numeric>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bpf/host_probes.h"
#include "controller/probes/host_probes.h"
#include "controller/probes/map_read.h"
#include "controller/probes/probe_capacity.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bpf/bpf_test_util.h"

namespace vkick {

// Value equality for the snapshot structs, for gmock matchers.
bool operator==(const ExitCount& a, const ExitCount& b) {
  return a.vm_id == b.vm_id && a.vcpu == b.vcpu && a.isa == b.isa && a.reason == b.reason &&
         a.count == b.count;
}
bool operator==(const NotificationCount& a, const NotificationCount& b) {
  return a.vm_id == b.vm_id && a.device_id == b.device_id && a.queue == b.queue &&
         a.count == b.count;
}
bool operator==(const UnmatchedCount& a, const UnmatchedCount& b) {
  return a.vm_id == b.vm_id && a.space == b.space && a.count == b.count;
}
bool operator==(const InterruptCount& a, const InterruptCount& b) {
  return a.vm_id == b.vm_id && a.msi_address == b.msi_address && a.msi_data == b.msi_data &&
         a.count == b.count;
}
void PrintTo(const ExitCount& e, std::ostream* os) {
  *os << "{vm " << e.vm_id << " vcpu " << e.vcpu << " isa " << e.isa << " reason " << e.reason
      << ": " << e.count << "}";
}
void PrintTo(const NotificationCount& n, std::ostream* os) {
  *os << "{vm " << n.vm_id << " dev " << n.device_id << " q " << n.queue << ": " << n.count
      << "}";
}
void PrintTo(const UnmatchedCount& u, std::ostream* os) {
  *os << "{vm " << u.vm_id << " space " << int(u.space) << ": " << u.count << "}";
}

namespace {

using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::Pair;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
using ::testing::UnorderedElementsAreArray;
using testing::kFakeTgid1;
using testing::kFakeTgid2;
using testing::kFakeTgid3;
using testing::NothingAttached;
using testing::RunIo;
using Space = NotifyTarget::Space;

void RunExit(HostProbes& p, uint32_t tgid, uint32_t vcpu, uint32_t isa, uint32_t reason,
             int times) {
  for (int i = 0; i < times; ++i) {
    ASSERT_TRUE(p.TestRunExit({tgid, vcpu, isa, reason}).ok());
  }
}


TEST(HostProbesBpfTest, CountsExitsPerVmVcpuIsaReason) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 7).ok());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid3, 8).ok());
  RunExit(*p, kFakeTgid1, 0, 1, 48, 3);      // VMX EPT_VIOLATION on vCPU 0
  RunExit(*p, kFakeTgid1, 1, 1, 48, 1);      // ... on vCPU 1
  RunExit(*p, kFakeTgid1, 0, 2, 0x400, 2);   // SVM npf
  RunExit(*p, kFakeTgid3, 0, 1, 30, 4);      // other VM
  RunExit(*p, kFakeTgid2, 0, 1, 48, 5);      // untracked: ignored

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->exits, UnorderedElementsAre(ExitCount{7, 0, 1, 48, 3}, ExitCount{7, 1, 1, 48, 1},
                                             ExitCount{7, 0, 2, 0x400, 2},
                                             ExitCount{8, 0, 1, 30, 4}));
  EXPECT_EQ(c->errors.map_full, 0u);
}

TEST(HostProbesBpfTest, MatchesNotifiesPerQueueAndCountsTheRestPerVm) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 3).ok());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid3, 4).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0xfe003000, 1, 0), NotifyTarget::Mmio(0xfe003004, 1, 1),
                                  NotifyTarget::LegacyPio(0xc050, 2)};
  ASSERT_TRUE(p->SetNotifyTargets(3, targets).ok());

  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003000, 0, 4);   // modern q0 (value ignored)
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003004, 77, 2);  // modern q1
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 0, 1);        // legacy: value 0 = q0
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 2, 3);        // legacy: value 2 = q2
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe004000, 0, 5);   // unmatched MMIO
  RunIo(*p, kFakeTgid1, Space::kPio, 0x70, 0, 2);          // unmatched PIO
  RunIo(*p, kFakeTgid1, Space::kPio, 0xfe003000, 0, 1);    // right addr, wrong space
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, VKICK_MAX_QUEUE, 1);  // bad queue: unmatched
  RunIo(*p, kFakeTgid3, Space::kMmio, 0xfe003000, 0, 6);   // VM 4 has no targets
  RunIo(*p, kFakeTgid2, Space::kMmio, 0xfe003000, 0, 10);  // untracked: ignored

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications,
              UnorderedElementsAre(NotificationCount{3, 1, 0, 4}, NotificationCount{3, 1, 1, 2},
                                   NotificationCount{3, 2, 0, 1}, NotificationCount{3, 2, 2, 3}));
  EXPECT_THAT(c->unmatched_writes,
              UnorderedElementsAre(UnmatchedCount{3, Space::kMmio, 5},
                                   UnmatchedCount{3, Space::kPio, 2 + 1 + 1},
                                   UnmatchedCount{4, Space::kMmio, 6}));
  EXPECT_EQ(c->errors.bad_queue, 1u);
  EXPECT_EQ(c->errors.map_full, 0u);
}

TEST(HostProbesBpfTest, SetNotifyTargetsReplacesTheVmsTargetsOnly) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 1).ok());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid3, 2).ok());
  const NotifyTarget old_targets[] = {NotifyTarget::Mmio(0x1000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(1, old_targets).ok());
  ASSERT_TRUE(p->SetNotifyTargets(2, old_targets).ok());
  // The guest moved the BAR: VM 1's target is now 0x2000.
  const NotifyTarget new_targets[] = {NotifyTarget::Mmio(0x2000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(1, new_targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x1000, 0, 2);  // stale: unmatched
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x2000, 0, 3);
  RunIo(*p, kFakeTgid3, Space::kMmio, 0x1000, 0, 4);  // VM 2 untouched

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications,
              UnorderedElementsAre(NotificationCount{1, 1, 0, 3}, NotificationCount{2, 1, 0, 4}));
  EXPECT_THAT(c->unmatched_writes, UnorderedElementsAre(UnmatchedCount{1, Space::kMmio, 2}));
}

TEST(HostProbesBpfTest, CountsMsisOfTrackedProcesses) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 5).ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(p->TestRunMsi({kFakeTgid1, 0, 0xfee00000, 0x4021}).ok());
  }
  ASSERT_TRUE(p->TestRunMsi({kFakeTgid1, 0, 0xfee01000, 0x4022}).ok());
  ASSERT_TRUE(p->TestRunMsi({kFakeTgid2, 0, 0xfee00000, 0x4021}).ok());  // untracked
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->interrupts, UnorderedElementsAre(InterruptCount{5, 0xfee00000, 0x4021, 3},
                                                  InterruptCount{5, 0xfee01000, 0x4022, 1}));
}

TEST(HostProbesBpfTest, UntrackStopsCountingAndDropsTheVmsCounters) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 1).ok());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid3, 2).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0x1000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(1, targets).ok());
  ASSERT_TRUE(p->SetNotifyTargets(2, targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x1000, 0, 2);
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x3000, 0, 1);
  RunExit(*p, kFakeTgid1, 0, 1, 12, 1);
  RunIo(*p, kFakeTgid3, Space::kMmio, 0x1000, 0, 3);

  ASSERT_TRUE(p->UntrackProcess(kFakeTgid1, 1).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x1000, 0, 5);  // no longer counted
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, UnorderedElementsAre(NotificationCount{2, 1, 0, 3}));
  EXPECT_THAT(c->unmatched_writes, IsEmpty());
  EXPECT_THAT(c->exits, IsEmpty());
  // Idempotent.
  EXPECT_TRUE(p->UntrackProcess(kFakeTgid1, 1).ok());
}

uint32_t MaxEntries(HostProbes& p, const char* map) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  EXPECT_EQ(bpf_obj_get_info_by_fd(p.MapFdForTest(map), &info, &len), 0) << map;
  return info.max_entries;
}

TEST(HostProbesBpfTest, MapFullIsCountedNotSilent) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  const ProbeMapSizes sizes = MapSizesFor(testing::kTestCapacity);
  // Fill notify_counts to its bound with another VM's keys, from userspace.
  const int fd = p->MapFdForTest("notify_counts");
  ASSERT_GE(fd, 0);
  const int cpus = libbpf_num_possible_cpus();
  std::vector<uint64_t> zeros(cpus, 0);
  for (uint32_t i = 0; i < sizes.notify_counts; ++i) {
    vkick_queue_key k{};
    k.vm_id = 99;
    k.device_id = static_cast<uint16_t>(i >> 10);
    k.queue = static_cast<uint16_t>(i & 1023);
    ASSERT_EQ(bpf_map_update_elem(fd, &k, zeros.data(), BPF_NOEXIST), 0) << "entry " << i;
  }
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 1).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0x1000, 1, 0), NotifyTarget::LegacyPio(0xc050, 2)};
  ASSERT_TRUE(p->SetNotifyTargets(1, targets).ok());
  // What counts in the hash: a legacy value beyond the target's slots.
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, VKICK_TARGET_SLOTS, 3);
  // What counts in a slot does not need the hash's room.
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x1000, 0, 2);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 1);

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->errors.map_full, 3u);
  EXPECT_EQ(c->notifications.size(), size_t{sizes.notify_counts} + 2);
  std::vector<NotificationCount> vm1;
  std::copy_if(c->notifications.begin(), c->notifications.end(), std::back_inserter(vm1),
               [](const NotificationCount& n) { return n.vm_id == 1; });
  EXPECT_THAT(vm1, UnorderedElementsAre(NotificationCount{1, 1, 0, 2}, NotificationCount{1, 2, 1, 1}));

  // The bounded tracked map refuses one process more with a clear status.
  for (uint32_t i = 0; i < sizes.tracked - 1; ++i) {
    ASSERT_TRUE(p->TrackProcess(0x7e000000 + i, 2).ok()) << i;
  }
  absl::Status s = p->TrackProcess(0x7d000000, 2);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
}

TEST(HostProbesBpfTest, MapsAreSizedFromTheCapacityAndAFullNotifyMapRefusesAWholeVm) {
  HostProbesOptions o = NothingAttached();
  o.capacity = {16, 2, 1};
  VKICK_PROBES_OR_SKIP(p, o);
  const ProbeMapSizes z = MapSizesFor(o.capacity);
  EXPECT_EQ(MaxEntries(*p, "tracked"), z.tracked);
  EXPECT_EQ(MaxEntries(*p, "notify"), 32u);
  EXPECT_EQ(MaxEntries(*p, "notify_counts"), z.notify_counts);
  EXPECT_EQ(MaxEntries(*p, "exit_counts"), z.exit_counts);
  EXPECT_EQ(MaxEntries(*p, "irq_counts"), z.irq_counts);
  EXPECT_EQ(MaxEntries(*p, "kick_fds"), z.kick_fds);

  // 15 VMs x 2 targets fit; a VM with 3 does not, and has none installed.
  for (uint32_t vm = 1; vm <= 15; ++vm) {
    const NotifyTarget t[] = {NotifyTarget::Mmio(vm << 12, 1, 0), NotifyTarget::Mmio((vm << 12) + 4, 1, 1)};
    ASSERT_TRUE(p->SetNotifyTargets(vm, t).ok()) << vm;
  }
  const NotifyTarget big[] = {NotifyTarget::Mmio(0x100000, 1, 0), NotifyTarget::Mmio(0x100004, 1, 1), NotifyTarget::Mmio(0x100008, 1, 2)};
  absl::Status s = p->SetNotifyTargets(16, big);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 16).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x100000, 0, 2);
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, IsEmpty()) << "left out: nothing counted as a queue";
  EXPECT_THAT(c->unmatched_writes, UnorderedElementsAre(UnmatchedCount{16, Space::kMmio, 2}));
  // A VM leaves: room for the 3 (2 freed + 2 left).
  ASSERT_TRUE(p->UntrackProcess(kFakeTgid3, 1).ok());
  EXPECT_TRUE(p->SetNotifyTargets(16, big).ok());
  EXPECT_EQ(p->notify_targets().size(), 14u * 2 + 3);
}

// Counter slots are reused: a slot of an untracked VM starts at 0 for its
// next owner, and counts stay exact through untrack and re-track. One VM's
// room: a legacy-only device takes all four slots, so every re-track reuses
// them (after the wait for running programs, zeroed).
TEST(HostProbesBpfTest, UntrackAndRetrackCountExactlyAndAReusedSlotStartsAtZero) {
  HostProbesOptions o = NothingAttached();
  o.capacity = {1, 3, 1};
  VKICK_PROBES_OR_SKIP(p, o);
  ASSERT_EQ(MapSizesFor(o.capacity).queue_counts, uint32_t{VKICK_TARGET_SLOTS});
  const NotifyTarget legacy[] = {NotifyTarget::LegacyPio(0xc050, 2)};

  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 1).ok());
  ASSERT_TRUE(p->SetNotifyTargets(1, legacy).ok());
  EXPECT_EQ(p->notify_targets().slots_used(), size_t{VKICK_TARGET_SLOTS});
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 5);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 3, 2);
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications,
              UnorderedElementsAre(NotificationCount{1, 2, 1, 5}, NotificationCount{1, 2, 3, 2}));

  ASSERT_TRUE(p->UntrackProcess(kFakeTgid1, 1).ok());
  EXPECT_EQ(p->notify_targets().slots_used(), 0u);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 4);  // no longer counted
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, IsEmpty()) << "an untracked VM's counters are dropped";

  // The process comes back as VM 2 (vkickd's new vm_id): the same slots.
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 2).ok());
  ASSERT_TRUE(p->SetNotifyTargets(2, legacy).ok());
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 3);
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, UnorderedElementsAre(NotificationCount{2, 2, 1, 3}))
      << "reused slots start at 0: nothing of VM 1's 5 and 2";
  const ProbeQueueId asked[] = {{2, 2, 1}, {2, 2, 3}, {1, 2, 1}};
  auto t = p->ReadNotificationTotals(asked);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, ElementsAre(Pair(ProbeQueueId{1, 2, 1}, 0u), Pair(ProbeQueueId{2, 2, 1}, 3u),
                              Pair(ProbeQueueId{2, 2, 3}, 0u)));

  // And under the same vm_id again, targets set before the process is
  // tracked (either order works).
  ASSERT_TRUE(p->UntrackProcess(kFakeTgid1, 2).ok());
  ASSERT_TRUE(p->SetNotifyTargets(2, legacy).ok());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 2).ok());
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 0, 1);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 2);
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications,
              UnorderedElementsAre(NotificationCount{2, 2, 0, 1}, NotificationCount{2, 2, 1, 2}));
  EXPECT_EQ(c->errors.map_full, 0u);
}

// A real-range tgid (below 2^22) goes through the vmm_tgids bitmap, which
// the fake tgids above it skip: its bit is set while tracked, and a process
// without one is ignored before any hash lookup (guest writes, exits, MSIs).
TEST(HostProbesBpfTest, TheTgidBitmapLetsTrackedProcessesThroughOnly) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  constexpr uint32_t kTgid = VKICK_TGID_BITS - 9;  // a real pid range, no process needed
  constexpr uint32_t kNeighbour = kTgid - 1;        // same bitmap word, not tracked
  const int bits_fd = p->MapFdForTest("vmm_tgids");
  ASSERT_GE(bits_fd, 0);
  auto bit = [&](uint32_t tgid) {
    const uint32_t word = tgid / 64;
    uint64_t bits = 0;
    EXPECT_EQ(bpf_map_lookup_elem(bits_fd, &word, &bits), 0);
    return (bits >> (tgid % 64)) & 1;
  };
  ASSERT_TRUE(p->TrackProcess(kTgid, 5).ok());
  EXPECT_EQ(bit(kTgid), 1u);
  EXPECT_EQ(bit(kNeighbour), 0u);
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0xfe000000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(5, targets).ok());
  RunIo(*p, kTgid, Space::kMmio, 0xfe000000, 0, 4);
  RunIo(*p, kTgid, Space::kMmio, 0xfe001000, 0, 1);  // unmatched, still the VM's
  RunIo(*p, kNeighbour, Space::kMmio, 0xfe000000, 0, 3);
  RunExit(*p, kTgid, 0, 1, 48, 2);
  RunExit(*p, kNeighbour, 0, 1, 48, 1);
  ASSERT_TRUE(p->TestRunMsi({kTgid, 0, 0xfee00000, 0x4021}).ok());
  ASSERT_TRUE(p->TestRunMsi({kNeighbour, 0, 0xfee00000, 0x4021}).ok());
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, UnorderedElementsAre(NotificationCount{5, 1, 0, 4}));
  EXPECT_THAT(c->unmatched_writes, UnorderedElementsAre(UnmatchedCount{5, Space::kMmio, 1}));
  EXPECT_THAT(c->exits, UnorderedElementsAre(ExitCount{5, 0, 1, 48, 2}));
  EXPECT_THAT(c->interrupts, UnorderedElementsAre(InterruptCount{5, 0xfee00000, 0x4021, 1}));

  ASSERT_TRUE(p->UntrackProcess(kTgid, 5).ok());
  EXPECT_EQ(bit(kTgid), 0u);
  RunIo(*p, kTgid, Space::kMmio, 0xfe000000, 0, 2);
  RunExit(*p, kTgid, 0, 1, 48, 1);
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, IsEmpty());
  EXPECT_THAT(c->unmatched_writes, IsEmpty());
  EXPECT_THAT(c->exits, IsEmpty());
}

TEST(HostProbesBpfTest, AFullSlotTableRefusesAWholeVm) {
  HostProbesOptions o = NothingAttached();
  o.capacity = {16, 2, 1};  // notify 32 keys, 48 counter slots
  VKICK_PROBES_OR_SKIP(p, o);
  EXPECT_EQ(MaxEntries(*p, "queue_counts"), 48u);
  // Legacy-only devices take VKICK_TARGET_SLOTS slots for one key each.
  for (uint32_t vm = 1; vm <= 48 / VKICK_TARGET_SLOTS; ++vm) {
    const NotifyTarget t[] = {NotifyTarget::LegacyPio(static_cast<uint16_t>(0xc000 + 0x40 * vm), 1)};
    ASSERT_TRUE(p->SetNotifyTargets(vm, t).ok()) << vm;
  }
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 13).ok());
  const NotifyTarget t13[] = {NotifyTarget::LegacyPio(0xd000, 1)};
  absl::Status s = p->SetNotifyTargets(13, t13);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("counter slots full"));
  EXPECT_EQ(p->notify_targets().owned(13), 0u);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xd000, 1, 2);
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, IsEmpty()) << "left out: nothing counted as a queue";
  EXPECT_THAT(c->unmatched_writes, UnorderedElementsAre(UnmatchedCount{13, Space::kPio, 2}));
  // A VM leaves: room.
  ASSERT_TRUE(p->UntrackProcess(kFakeTgid3, 1).ok());
  ASSERT_TRUE(p->SetNotifyTargets(13, t13).ok());
  RunIo(*p, kFakeTgid1, Space::kPio, 0xd000, 1, 2);
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, UnorderedElementsAre(NotificationCount{13, 1, 1, 2}));
}

// A transitional device's queue 5 has a slot (its modern address) but a
// legacy write of 5 is beyond the legacy target's slots: the hash. One
// queue, one entry, the sum; the totals agree.
TEST(HostProbesBpfTest, AQueueCountedInItsSlotAndInTheHashIsOneEntry) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 3).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0xfe003014, 1, 5), NotifyTarget::LegacyPio(0xc050, 1)};
  ASSERT_TRUE(p->SetNotifyTargets(3, targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003014, 0, 4);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 5, 3);
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, ElementsAre(NotificationCount{3, 1, 5, 7}));
  const ProbeQueueId asked[] = {{3, 1, 5}};
  auto t = p->ReadNotificationTotals(asked);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, ElementsAre(Pair(ProbeQueueId{3, 1, 5}, 7u)));
}

// The kvm programs each tracepoint gets: the BTF raw tracepoint where the
// running kernel's BTF has it (auto), else, or when forced, the classic one.
std::vector<std::string> KvmPrograms(bool btf) {
  const char* p = btf ? "btf_" : "tp_";
  std::vector<std::string> names = {"tp_kvm_exit"};  // classic in both: the reason is no argument
  for (const char* tp : {"kvm_mmio", "kvm_fast_mmio", "kvm_pio", "kvm_msi_set_irq"}) {
    names.push_back(absl::StrCat(p, tp));
  }
  return names;
}

const std::vector<std::string> kSyscallPrograms = {"tp_sys_enter_sendmsg", "tp_sys_enter_write",
                                                   "tp_sys_enter_connect", "tp_sched_process_exit"};

bool KernelBtfHasKvmTracepoints() {
  btf* b = btf__load_vmlinux_btf();
  if (b == nullptr) return false;
  bool all = true;
  for (const char* tp : {"kvm_mmio", "kvm_fast_mmio", "kvm_pio", "kvm_msi_set_irq"}) {
    all &= btf__find_by_name_kind(b, absl::StrCat("btf_trace_", tp).c_str(), BTF_KIND_TYPEDEF) > 0;
  }
  btf__free(b);
  return all;
}

TEST(HostProbesBpfTest, AutoAttachesTheTpBtfKvmProgramsWhereTheBtfHasThem) {
  HostProbesOptions o;
  o.attach_vhost_user = false;
  o.capacity = testing::kTestCapacity;
  VKICK_PROBES_OR_SKIP(p, o);
  const bool btf = KernelBtfHasKvmTracepoints();
  EXPECT_THAT(p->attached_programs(), UnorderedElementsAreArray(KvmPrograms(btf)));
  EXPECT_EQ(p->kvm_flavour(), btf ? "tp_btf" : "classic");
  if (!btf) GTEST_SKIP() << "this kernel's BTF has no kvm raw tracepoints: classic checked only";
}

TEST(HostProbesBpfTest, ForcedClassicAttachesTheTracepointFallbackAndCountsTheSame) {
  HostProbesOptions o;
  o.attach_vhost_user = false;
  o.kvm_tracepoints = KvmTracepoints::kClassic;
  o.capacity = testing::kTestCapacity;
  VKICK_PROBES_OR_SKIP(p, o);
  EXPECT_THAT(p->attached_programs(), UnorderedElementsAreArray(KvmPrograms(false)));
  EXPECT_EQ(p->kvm_flavour(), "classic");
  // The shared counting code runs the same under either flavour.
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 3).ok());
  const NotifyTarget t[] = {NotifyTarget::LegacyPio(0xc050, 2)};
  ASSERT_TRUE(p->SetNotifyTargets(3, t).ok());
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 2);
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->notifications, UnorderedElementsAre(NotificationCount{3, 2, 1, 2}));
}

TEST(HostProbesBpfTest, ForcedTpBtfLoadsOrSaysWhichBtfIsMissing) {
  HostProbesOptions o = NothingAttached();
  o.kvm_tracepoints = KvmTracepoints::kBtf;
  if (geteuid() != 0) GTEST_SKIP() << "not root";
  auto p = HostProbes::Create(o);
  if (KernelBtfHasKvmTracepoints()) {
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ((*p)->kvm_flavour(), "tp_btf");
  } else {
    EXPECT_TRUE(absl::IsNotFound(p.status())) << p.status();
    EXPECT_THAT(std::string(p.status().message()), HasSubstr("btf_trace_kvm_"));
  }
}

TEST(HostProbesBpfTest, KickSyscallProgramsAttachAndDetachAtRuntime) {
  HostProbesOptions o;
  o.attach_vhost_user = false;
  o.capacity = testing::kTestCapacity;
  VKICK_PROBES_OR_SKIP(p, o);
  EXPECT_FALSE(p->kick_syscalls_attached());
  EXPECT_THAT(p->attached_programs(), Not(Contains("tp_sys_enter_write")));
  ASSERT_TRUE(p->SetKickSyscalls(true).ok());
  ASSERT_TRUE(p->SetKickSyscalls(true).ok()) << "idempotent";
  std::vector<std::string> want = KvmPrograms(p->kvm_flavour() == "tp_btf");
  want.insert(want.end(), kSyscallPrograms.begin(), kSyscallPrograms.end());
  EXPECT_THAT(p->attached_programs(), UnorderedElementsAreArray(want));
  ASSERT_TRUE(p->SetKickSyscalls(false).ok());
  EXPECT_FALSE(p->kick_syscalls_attached());
  EXPECT_THAT(p->attached_programs(), UnorderedElementsAreArray(KvmPrograms(p->kvm_flavour() == "tp_btf")));
}

// --- Batched reads (map_read.h) ---------------------------------------------

// The reference the batched reads are checked against: get_next_key and one
// lookup per key, the per-CPU u64 slots summed here.
template <typename Key>
std::vector<std::pair<Key, uint64_t>> WalkPerCpu(int fd) {
  std::vector<uint64_t> slots(libbpf_num_possible_cpus());
  std::vector<std::pair<Key, uint64_t>> out;
  Key cur{}, next{};
  const Key* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, &next) == 0) {
    EXPECT_EQ(bpf_map_lookup_elem(fd, &next, slots.data()), 0);
    out.push_back({next, std::accumulate(slots.begin(), slots.end(), uint64_t{0})});
    cur = next;
    prev = &cur;
  }
  EXPECT_EQ(errno, ENOENT);
  return out;
}

// Stores `key` with value base + cpu on each possible CPU: the sum checks
// that every CPU's slot is read.
template <typename Key>
void PutPerCpu(int fd, const Key& key, uint64_t base) {
  std::vector<uint64_t> slots(libbpf_num_possible_cpus());
  std::iota(slots.begin(), slots.end(), base);
  ASSERT_EQ(bpf_map_update_elem(fd, &key, slots.data(), BPF_ANY), 0);
}
uint64_t PerCpuSumOf(uint64_t base) {
  const uint64_t n = libbpf_num_possible_cpus();
  return n * base + n * (n - 1) / 2;
}

// Every field, for comparing snapshots whatever the maps' order.
auto Fields(const ExitCount& e) {
  return std::make_tuple(e.vm_id, e.vcpu, e.isa, e.reason, e.count);
}
auto Fields(const NotificationCount& n) {
  return std::make_tuple(n.vm_id, n.device_id, n.queue, n.count);
}
auto Fields(const UnmatchedCount& u) { return std::make_tuple(u.vm_id, int(u.space), u.count); }
auto Fields(const InterruptCount& i) {
  return std::make_tuple(i.vm_id, i.msi_address, i.msi_data, i.count);
}
auto Fields(const KickFdBinding& k) {
  return std::make_tuple(k.tgid, k.kick_fd, k.socket_fd, k.device_id, k.queue);
}
auto Fields(const FrontendInfo& f) { return std::make_tuple(f.tgid, f.vm_id, f.device_id); }
template <typename T>
auto SortedFields(const std::vector<T>& v) {
  std::vector<decltype(Fields(v.front()))> out;
  for (const T& x : v) out.push_back(Fields(x));
  std::sort(out.begin(), out.end());
  return out;
}

void ExpectSameSnapshot(const CounterSnapshot& a, const CounterSnapshot& b) {
  EXPECT_EQ(SortedFields(a.exits), SortedFields(b.exits));
  EXPECT_EQ(SortedFields(a.notifications), SortedFields(b.notifications));
  EXPECT_EQ(SortedFields(a.unmatched_writes), SortedFields(b.unmatched_writes));
  EXPECT_EQ(SortedFields(a.interrupts), SortedFields(b.interrupts));
  EXPECT_EQ(SortedFields(a.kick_fds), SortedFields(b.kick_fds));
  EXPECT_EQ(SortedFields(a.frontends), SortedFields(b.frontends));
  EXPECT_EQ(a.errors.map_full, b.errors.map_full);
  EXPECT_EQ(a.errors.bad_queue, b.errors.bad_queue);
}

// `notify_keys` queue counters and `exit_keys` exit counters written from
// userspace (distinct values per CPU), for VMs 1000.. and 5000..
void FillCounters(HostProbes& p, uint32_t notify_keys, uint32_t exit_keys) {
  const int nfd = p.MapFdForTest("notify_counts");
  for (uint32_t i = 0; i < notify_keys; ++i) {
    vkick_queue_key k{};
    k.vm_id = 1000 + i / 8;
    k.device_id = 1;
    k.queue = static_cast<uint16_t>(i % 8);
    PutPerCpu(nfd, k, 10 * i + 1);
  }
  const int efd = p.MapFdForTest("exit_counts");
  for (uint32_t i = 0; i < exit_keys; ++i) {
    vkick_exit_key k{5000 + i / 32, (i / 8) % 4, 1, i % 8};
    PutPerCpu(efd, k, 7 * i + 3);
  }
}

TEST(HostProbesBpfTest, BatchedReadCountersEqualsTheKeyWalkOverManyChunks) {
  HostProbesOptions o = NothingAttached();
  o.capacity = {128, 8, 4};  // notify_counts 1152, exit_counts 4096
  VKICK_PROBES_OR_SKIP(p, o);
  FillCounters(*p, 700, 1500);  // several 256-key chunks each
  // And counts made by the programs, in every map ReadCounters reads.
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 3).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0xfe003000, 1, 0), NotifyTarget::LegacyPio(0xc050, 2)};
  ASSERT_TRUE(p->SetNotifyTargets(3, targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003000, 0, 4);
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 1, 2);
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x5000, 0, 3);  // unmatched
  RunExit(*p, kFakeTgid1, 0, 1, 48, 5);
  ASSERT_TRUE(p->TestRunMsi({kFakeTgid1, 0, 0xfee00000, 0x4021}).ok());
  ASSERT_TRUE(p->TrackFrontend(kFakeTgid2, 9, 4, 1).ok());
  const vkick_sock_key kick{kFakeTgid2, 12};
  const vkick_kick_value kick_value{9, 1, 0};
  ASSERT_EQ(bpf_map_update_elem(p->MapFdForTest("kick_fds"), &kick, &kick_value, BPF_ANY), 0);

  auto batched = p->ReadCounters();
  ASSERT_TRUE(batched.ok()) << batched.status();
  ASSERT_TRUE(p->reads_batched()) << "this kernel has BPF_MAP_LOOKUP_BATCH (5.6+)";
  ASSERT_EQ(batched->notifications.size(), 702u);
  ASSERT_EQ(batched->exits.size(), 1501u);

  // The test's own walk of the hash, plus one lookup per counter slot in use
  // (owners as the notify table has them), summed per queue.
  std::map<ProbeQueueId, uint64_t> by_queue;
  for (const auto& [k, n] : WalkPerCpu<vkick_queue_key>(p->MapFdForTest("notify_counts"))) {
    by_queue[{k.vm_id, k.device_id, k.queue}] += n;
  }
  std::vector<uint64_t> slot(libbpf_num_possible_cpus());
  for (uint32_t i = 0; i < p->notify_targets().slot_bound(); ++i) {
    ASSERT_EQ(bpf_map_lookup_elem(p->MapFdForTest("queue_counts"), &i, slot.data()), 0);
    const uint64_t n = std::accumulate(slot.begin(), slot.end(), uint64_t{0});
    if (auto owner = p->notify_targets().SlotOwner(i); owner && n != 0) by_queue[*owner] += n;
  }
  std::vector<NotificationCount> notifications;
  for (const auto& [q, n] : by_queue) {
    notifications.push_back({std::get<0>(q), std::get<1>(q), std::get<2>(q), n});
  }
  std::vector<ExitCount> exits;
  for (const auto& [k, n] : WalkPerCpu<vkick_exit_key>(p->MapFdForTest("exit_counts"))) {
    exits.push_back({k.vm_id, k.vcpu_id, k.isa, k.reason, n});
  }
  EXPECT_EQ(SortedFields(batched->notifications), SortedFields(notifications));
  EXPECT_EQ(SortedFields(batched->exits), SortedFields(exits));
  EXPECT_THAT(batched->notifications, Contains(NotificationCount{1000, 1, 0, PerCpuSumOf(1)}));
  EXPECT_THAT(batched->notifications, Contains(NotificationCount{3, 2, 1, 2}));
  EXPECT_EQ(batched->kick_fds.size(), 1u);
  EXPECT_EQ(batched->frontends.size(), 1u);

  // ReadCounters' own fallback (kernels without batch ops) reads the same.
  p->ReadByKeyWalkForTest();
  auto walked = p->ReadCounters();
  ASSERT_TRUE(walked.ok()) << walked.status();
  EXPECT_FALSE(p->reads_batched());
  ExpectSameSnapshot(*batched, *walked);
}

// MapReader on its own maps: a chunk of 1 key makes every bucket holding
// two or more keys (hundreds, for 1000 keys in 1024 buckets) an ENOSPC that
// must be retried with a bigger buffer.
TEST(HostProbesBpfTest, MapReaderReadsEveryEntryWithAnyChunkSize) {
  if (geteuid() != 0) GTEST_SKIP() << "not root";
  const int cpus = libbpf_num_possible_cpus();
  const int percpu = bpf_map_create(BPF_MAP_TYPE_PERCPU_HASH, "t_percpu", 4, 8, 1024, nullptr);
  const int plain = bpf_map_create(BPF_MAP_TYPE_HASH, "t_plain", 4, 8, 1024, nullptr);
  ASSERT_GE(percpu, 0) << std::strerror(errno);
  ASSERT_GE(plain, 0) << std::strerror(errno);
  std::map<uint32_t, uint64_t> want_sums, want_plain;
  for (uint32_t k = 0; k < 1000; ++k) {
    PutPerCpu(percpu, k, 3 * k);
    want_sums[k] = PerCpuSumOf(3 * k);
    const uint64_t v = uint64_t{k} << 33 | k;
    ASSERT_EQ(bpf_map_update_elem(plain, &k, &v, BPF_ANY), 0);
    want_plain[k] = v;
  }
  for (uint32_t chunk : {1u, 3u, MapReader::kChunkKeys, 4096u}) {
    for (bool walk : {false, true}) {
      MapReader r(cpus, chunk);
      if (walk) r.ForceKeyWalk();
      std::map<uint32_t, uint64_t> sums, values;
      size_t calls = 0;
      auto into = [&calls](std::map<uint32_t, uint64_t>& m) {
        return [&](uint32_t k, uint64_t v) { ++calls, m[k] = v; };
      };
      absl::Status s = r.ForEach<uint32_t, uint64_t>(percpu, "t_percpu", kPerCpuSum, into(sums));
      ASSERT_TRUE(s.ok()) << s;
      s = r.ForEach<uint32_t, uint64_t>(plain, "t_plain", kPlainValues, into(values));
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(r.batched(), !walk);
      EXPECT_EQ(calls, 2000u) << "chunk " << chunk << ": each entry once";
      EXPECT_EQ(sums, want_sums) << "chunk " << chunk << " walk " << walk;
      EXPECT_EQ(values, want_plain) << "chunk " << chunk << " walk " << walk;
    }
  }
  close(percpu);
  close(plain);
}

TEST(HostProbesBpfTest, ReadNotificationTotalsReadsTheQueuesAskedOnly) {
  VKICK_PROBES_OR_SKIP(p, NothingAttached());
  ASSERT_TRUE(p->TrackProcess(kFakeTgid1, 3).ok());
  const NotifyTarget targets[] = {NotifyTarget::Mmio(0xfe003000, 1, 0), NotifyTarget::Mmio(0xfe003004, 1, 1),
                                  NotifyTarget::LegacyPio(0xc050, 2)};
  ASSERT_TRUE(p->SetNotifyTargets(3, targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003000, 0, 4);  // {3, 1, 0}
  RunIo(*p, kFakeTgid1, Space::kMmio, 0xfe003004, 0, 2);  // {3, 1, 1}: not asked
  RunIo(*p, kFakeTgid1, Space::kPio, 0xc050, 2, 3);       // {3, 2, 2}
  PutPerCpu(p->MapFdForTest("notify_counts"), vkick_queue_key{5, 1, 7}, 100);  // every CPU

  const ProbeQueueId asked[] = {{3, 1, 0}, {3, 2, 2}, {5, 1, 7}, {3, 9, 9}, {77, 0, 0}};
  auto t = p->ReadNotificationTotals(asked);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, ElementsAre(Pair(ProbeQueueId{3, 1, 0}, 4u), Pair(ProbeQueueId{3, 2, 2}, 3u),
                              Pair(ProbeQueueId{3, 9, 9}, 0u),
                              Pair(ProbeQueueId{5, 1, 7}, PerCpuSumOf(100)),
                              Pair(ProbeQueueId{77, 0, 0}, 0u)));
  // The default (ReadCounters + NotificationTotals) agrees.
  auto d = p->ProbeBackend::ReadNotificationTotals(asked);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, *t);
  auto none = p->ReadNotificationTotals({});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_THAT(*none, IsEmpty());
}

// Not a check but a figure (printed): ReadCounters over 16384 queue
// counters, batched against the key walk it replaces.
TEST(HostProbesBpfTest, ReadCountersBatchVsKeyWalkAt16384NotifyKeys) {
  HostProbesOptions o = NothingAttached();
  o.capacity = {2048, 8, 4};  // notify_counts 18432
  VKICK_PROBES_OR_SKIP(p, o);
  FillCounters(*p, 16384, 0);
  auto median_us = [&](int runs) {
    std::vector<double> us;
    for (int i = 0; i < runs; ++i) {
      using Clock = std::chrono::steady_clock;
      const Clock::time_point t0 = Clock::now();
      auto c = p->ReadCounters();
      us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      EXPECT_TRUE(c.ok() && c->notifications.size() == 16384u) << c.status();
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  const double batch = median_us(21);
  ASSERT_TRUE(p->reads_batched());
  p->ReadByKeyWalkForTest();
  const double walk = median_us(21);
  std::printf("ReadCounters, 16384 notify keys, %d CPUs: batch %.0f us, walk %.0f us, "
              "walk/batch %.1fx\n", libbpf_num_possible_cpus(), batch, walk, walk / batch);
  ::testing::Test::RecordProperty("batch_us", static_cast<int>(batch));
  ::testing::Test::RecordProperty("walk_us", static_cast<int>(walk));
}

}  // namespace
}  // namespace vkick
