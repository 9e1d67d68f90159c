// The probes' in-kernel counting logic, run for real through
// BPF_PROG_TEST_RUN of the SEC("syscall") programs, which share their inline
// counting functions with the tracepoint handlers. No tracepoint is attached:
// nothing on the host can disturb the counts.
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bpf/host_probes.h"
#include "controller/probes/host_probes.h"
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
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
using ::testing::UnorderedElementsAreArray;
using testing::kFakeTgid1;
using testing::kFakeTgid2;
using testing::kFakeTgid3;
using testing::NothingAttached;
using Space = NotifyTarget::Space;

void RunExit(HostProbes& p, uint32_t tgid, uint32_t vcpu, uint32_t isa, uint32_t reason,
             int times) {
  for (int i = 0; i < times; ++i) {
    ASSERT_TRUE(p.TestRunExit({tgid, vcpu, isa, reason}).ok());
  }
}

void RunIo(HostProbes& p, uint32_t tgid, Space space, uint64_t addr, uint64_t val, int times) {
  vkick_test_io_ctx ctx{};
  ctx.tgid = tgid;
  ctx.space = static_cast<uint32_t>(space);
  ctx.addr = addr;
  ctx.val = val;
  for (int i = 0; i < times; ++i) {
    absl::Status s = p.TestRunIo(ctx);
    ASSERT_TRUE(s.ok()) << s;
  }
}

NotifyTarget Mmio(uint64_t addr, uint16_t device, uint16_t queue) {
  NotifyTarget t;
  t.space = Space::kMmio;
  t.addr = addr;
  t.device_id = device;
  t.queue = queue;
  return t;
}

NotifyTarget LegacyPio(uint16_t port, uint16_t device) {
  NotifyTarget t;
  t.space = Space::kPio;
  t.addr = port;
  t.device_id = device;
  t.value_is_queue = true;
  return t;
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
  const NotifyTarget targets[] = {Mmio(0xfe003000, 1, 0), Mmio(0xfe003004, 1, 1),
                                  LegacyPio(0xc050, 2)};
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
  const NotifyTarget old_targets[] = {Mmio(0x1000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(1, old_targets).ok());
  ASSERT_TRUE(p->SetNotifyTargets(2, old_targets).ok());
  // The guest moved the BAR: VM 1's target is now 0x2000.
  const NotifyTarget new_targets[] = {Mmio(0x2000, 1, 0)};
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
  const NotifyTarget targets[] = {Mmio(0x1000, 1, 0)};
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
  const NotifyTarget targets[] = {Mmio(0x1000, 1, 0)};
  ASSERT_TRUE(p->SetNotifyTargets(1, targets).ok());
  RunIo(*p, kFakeTgid1, Space::kMmio, 0x1000, 0, 3);

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->errors.map_full, 3u);
  EXPECT_EQ(c->notifications.size(), size_t{sizes.notify_counts});
  EXPECT_TRUE(std::none_of(c->notifications.begin(), c->notifications.end(),
                           [](const NotificationCount& n) { return n.vm_id == 1; }));

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
    const NotifyTarget t[] = {Mmio(vm << 12, 1, 0), Mmio((vm << 12) + 4, 1, 1)};
    ASSERT_TRUE(p->SetNotifyTargets(vm, t).ok()) << vm;
  }
  const NotifyTarget big[] = {Mmio(0x100000, 1, 0), Mmio(0x100004, 1, 1), Mmio(0x100008, 1, 2)};
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
  const NotifyTarget t[] = {LegacyPio(0xc050, 2)};
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

}  // namespace
}  // namespace vkick
