// Pinned probes (HostProbes::Options::pin_dir, vkickd --pin-dir) against
// the real kernel: the maps and the kvm links outlive the object (a vkickd
// killed), the next object on the same pin dir re-learns the VMs and the
// counts continue exactly, with the same links (nothing attached twice);
// pins that do not fit are discarded whole; rm -r of the pin dir detaches
// everything. Counting runs through BPF_PROG_TEST_RUN of the SEC("syscall")
// twins, which update the same maps the tracepoint programs do.
#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <dirent.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "controller/probes/host_probes.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bpf/bpf_test_util.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using testing::kFakeTgid2;
using testing::RunIo;
using Space = NotifyTarget::Space;

// A pin dir of its own under /sys/fs/bpf, removed at the end.
class TempPinDir {
 public:
  TempPinDir() {
    static int n = 0;
    path_ = absl::StrCat("/sys/fs/bpf/vkick-pin-test-", getpid(), "-", n++);
  }
  ~TempPinDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Ids of every link on the host whose program uses map `map_id`: ours,
// whoever attached them.
std::set<uint32_t> LinksUsingMap(uint32_t map_id) {
  std::set<uint32_t> out;
  uint32_t id = 0;
  while (bpf_link_get_next_id(id, &id) == 0) {
    int lfd = bpf_link_get_fd_by_id(id);
    if (lfd < 0) continue;
    bpf_link_info li{};
    uint32_t len = sizeof(li);
    const bool ok = bpf_obj_get_info_by_fd(lfd, &li, &len) == 0;
    close(lfd);
    if (!ok) continue;
    int pfd = bpf_prog_get_fd_by_id(li.prog_id);
    if (pfd < 0) continue;
    uint32_t maps[64];
    bpf_prog_info pi{};
    pi.nr_map_ids = 64;
    pi.map_ids = reinterpret_cast<uintptr_t>(maps);
    len = sizeof(pi);
    if (bpf_obj_get_info_by_fd(pfd, &pi, &len) == 0) {
      for (uint32_t i = 0; i < std::min<uint32_t>(pi.nr_map_ids, 64); ++i) {
        if (maps[i] == map_id) out.insert(id);
      }
    }
    close(pfd);
  }
  return out;
}

uint32_t IdOfFd(int fd) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  EXPECT_EQ(bpf_obj_get_info_by_fd(fd, &info, &len), 0);
  return info.id;
}

bool LinkExists(uint32_t id) {
  int fd = bpf_link_get_fd_by_id(id);
  if (fd >= 0) close(fd);
  return fd >= 0;
}

// A link's release is deferred to a work queue: wait for it, briefly.
bool LinksGone(const std::set<uint32_t>& ids) {
  for (int i = 0; i < 200; ++i) {
    bool any = false;
    for (uint32_t id : ids) any = any || LinkExists(id);
    if (!any) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

std::vector<std::string> PinnedNames(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') out.push_back(e->d_name);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

HostProbesOptions Pinned(const std::string& dir, KvmTracepoints kvm,
                         ProbeCapacity capacity = testing::kTestCapacity) {
  HostProbesOptions o;
  o.attach_vhost_user = false;  // never pinned; the kvm groups are
  o.kvm_tracepoints = kvm;
  o.capacity = capacity;
  o.pin_dir = dir;
  return o;
}

uint64_t ExitsOf(HostProbes& p, uint32_t vm_id) {
  absl::StatusOr<CounterSnapshot> c = p.ReadCounters();
  EXPECT_TRUE(c.ok()) << c.status();
  uint64_t n = 0;
  for (const ExitCount& e : c.ok() ? c->exits : std::vector<ExitCount>{}) {
    if (e.vm_id == vm_id) n += e.count;
  }
  return n;
}

// Our own pid plays the live VMM (kill(pid, 0) succeeds: adopted); a fake
// tgid beyond PID_MAX_LIMIT plays a VM whose QEMU exited while vkickd was
// down (dropped at start).
const std::vector<NotifyTarget> kVm1 = {NotifyTarget::Mmio(0x1000, 1, 0),
                                        NotifyTarget::Mmio(0x1004, 1, 1),
                                        NotifyTarget::LegacyPio(0xc000, 2)};

class PinTest : public ::testing::TestWithParam<KvmTracepoints> {};

TEST_P(PinTest, CountsContinueExactlyAfterADeathWithTheSameLinks) {
  TempPinDir dir;
  const uint32_t me = static_cast<uint32_t>(getpid());
  std::set<uint32_t> links_before;
  std::vector<std::string> attached;
  uint32_t bitmap_id = 0;
  {
    VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam()));
    EXPECT_THAT(p->pin_state(), HasSubstr("pinned new maps"));
    attached = p->attached_programs();
    ASSERT_EQ(attached.size(), 5u) << "kvm_exit, the three guest-write programs, kvm_msi_set_irq";
    EXPECT_EQ(PinnedNames(dir.path() + "/links"), [&] {
      std::vector<std::string> a = attached;
      std::sort(a.begin(), a.end());
      return a;
    }());
    ASSERT_TRUE(p->TrackProcess(me, 1).ok());
    ASSERT_TRUE(p->SetNotifyTargets(1, kVm1).ok());
    ASSERT_TRUE(p->TrackProcess(kFakeTgid2, 2).ok());
    ASSERT_TRUE(p->SetNotifyTargets(2, {NotifyTarget::Mmio(0x2000, 1, 0)}).ok());
    ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kMmio, 0x1004, 0, 300));
    ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kPio, 0xc000, 1, 30));
    ASSERT_NO_FATAL_FAILURE(RunIo(*p, kFakeTgid2, Space::kMmio, 0x2000, 0, 7));
    for (int i = 0; i < 11; ++i) ASSERT_TRUE(p->TestRunExit({me, 0, 1, 30}).ok());
    bitmap_id = IdOfFd(p->MapFdForTest("vmm_tgids"));
    links_before = LinksUsingMap(bitmap_id);
    EXPECT_EQ(links_before.size(), 5u);
  }  // destroyed without any untrack, like a vkickd killed: pins stay
  ASSERT_FALSE(links_before.empty());
  for (uint32_t id : links_before) EXPECT_TRUE(LinkExists(id)) << "pinned link " << id;

  // While "vkickd is down" nothing writes the maps from user space; the
  // next one finds them.
  VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam()));
  EXPECT_THAT(p->pin_state(), HasSubstr("reused the pinned maps"));
  EXPECT_THAT(p->pin_state(), HasSubstr("1 VM processes to adopt, 1 gone since"));
  EXPECT_EQ(IdOfFd(p->MapFdForTest("vmm_tgids")), bitmap_id);
  EXPECT_EQ(p->adopted_vms().vm_of_pid, (std::map<uint32_t, uint32_t>{{me, 1}}));
  EXPECT_EQ(p->adopted_vms().next_vm_id, 3u);
  EXPECT_EQ(LinksUsingMap(bitmap_id), links_before) << "the same links kept, none attached twice";
  EXPECT_EQ(p->attached_programs(), attached);

  // Counts as left, before the daemon even re-attaches the VM.
  auto totals = p->ReadNotificationTotals({{1, 1, 1}, {1, 2, 1}, {2, 1, 0}});
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(((*totals)[{1, 1, 1}]), 300u);
  EXPECT_EQ(((*totals)[{1, 2, 1}]), 30u);
  EXPECT_EQ(((*totals)[{2, 1, 0}]), 0u) << "vm 2's process is gone: dropped at start";
  EXPECT_EQ(ExitsOf(*p, 1), 11u);
  EXPECT_EQ(ExitsOf(*p, 2), 0u);

  // The daemon attaches the same process under the same vm_id: counting
  // continues in the same slots.
  ASSERT_TRUE(p->TrackProcess(me, 1).ok());
  ASSERT_TRUE(p->SetNotifyTargets(1, kVm1).ok());
  ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kMmio, 0x1004, 0, 200));
  ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kPio, 0xc000, 1, 20));
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(p->TestRunExit({me, 0, 1, 30}).ok());
  totals = p->ReadNotificationTotals({{1, 1, 1}, {1, 2, 1}});
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(((*totals)[{1, 1, 1}]), 500u);
  EXPECT_EQ(((*totals)[{1, 2, 1}]), 50u);
  EXPECT_EQ(ExitsOf(*p, 1), 15u);
  // A new VM gets a fresh, zeroed slot.
  ASSERT_TRUE(p->TrackProcess(kFakeTgid2, 3).ok());
  ASSERT_TRUE(p->SetNotifyTargets(3, {NotifyTarget::Mmio(0x3000, 1, 0)}).ok());
  totals = p->ReadNotificationTotals({{3, 1, 0}});
  ASSERT_TRUE(totals.ok());
  EXPECT_EQ(((*totals)[{3, 1, 0}]), 0u);
}

TEST_P(PinTest, IncompatiblePinsAreDiscardedWholeAndCountingStartsFresh) {
  TempPinDir dir;
  const uint32_t me = static_cast<uint32_t>(getpid());
  std::set<uint32_t> old_links;
  {
    VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam()));
    ASSERT_TRUE(p->TrackProcess(me, 1).ok());
    ASSERT_TRUE(p->SetNotifyTargets(1, kVm1).ok());
    ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kMmio, 0x1004, 0, 9));
    old_links = LinksUsingMap(IdOfFd(p->MapFdForTest("vmm_tgids")));
  }
  ASSERT_EQ(old_links.size(), 5u);
  // Restarted with other capacity flags: the maps cannot be reused.
  const ProbeCapacity other{32, 8, 4};
  {
    VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam(), other));
    EXPECT_THAT(p->pin_state(), HasSubstr("discarded every pin"));
    EXPECT_THAT(p->pin_state(), HasSubstr("max_entries"));
    EXPECT_THAT(p->adopted_vms().vm_of_pid, IsEmpty());
    EXPECT_EQ(p->adopted_vms().next_vm_id, 1u);
    EXPECT_TRUE(LinksGone(old_links)) << "the old links (over the old maps) are detached";
    EXPECT_EQ(LinksUsingMap(IdOfFd(p->MapFdForTest("vmm_tgids"))).size(), 5u);
    auto totals = p->ReadNotificationTotals({{1, 1, 1}});
    ASSERT_TRUE(totals.ok());
    EXPECT_EQ(((*totals)[{1, 1, 1}]), 0u);
    ASSERT_TRUE(p->TrackProcess(me, 1).ok());
    ASSERT_TRUE(p->SetNotifyTargets(1, kVm1).ok());
    ASSERT_NO_FATAL_FAILURE(RunIo(*p, me, Space::kMmio, 0x1004, 0, 2));
  }
  // A pin set with one map missing (a crash while pinning, a hand-made
  // rm) is not half reused either.
  ASSERT_EQ(std::remove((dir.path() + "/maps/irq_counts").c_str()), 0);
  VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam(), other));
  EXPECT_THAT(p->pin_state(), HasSubstr("discarded every pin"));
  EXPECT_THAT(p->pin_state(), HasSubstr("maps are pinned"));
  EXPECT_THAT(p->adopted_vms().vm_of_pid, IsEmpty());
}

// An upgrade that changed a struct but not its size: sizes alone would
// let the pins be reused and the new code misread them. The BTF layout
// tells: here `tracked`'s value (a u32 vm_id) became a struct.
TEST(PinLayoutTest, AChangedLayoutOfTheSameSizeIsNotReused) {
  TempPinDir dir;
  const std::string tracked = dir.path() + "/maps/tracked";
  bpf_map_info old{};
  {
    VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), KvmTracepoints::kAuto));
    ASSERT_TRUE(p->TrackProcess(static_cast<uint32_t>(getpid()), 1).ok());
    uint32_t len = sizeof(old);
    ASSERT_EQ(bpf_obj_get_info_by_fd(p->MapFdForTest("tracked"), &old, &len), 0);
  }
  btf* b = btf__new_empty();
  ASSERT_NE(b, nullptr);
  const int u32 = btf__add_int(b, "unsigned int", 4, 0);
  const int other = btf__add_struct(b, "vkick_vm_ref", 4);
  ASSERT_EQ(btf__add_field(b, "generation", u32, 0, 0), 0);
  ASSERT_EQ(btf__load_into_kernel(b), 0);
  LIBBPF_OPTS(bpf_map_create_opts, o, .btf_fd = static_cast<__u32>(btf__fd(b)),
              .btf_key_type_id = static_cast<__u32>(u32),
              .btf_value_type_id = static_cast<__u32>(other), .map_flags = old.map_flags);
  const int fd = bpf_map_create(static_cast<bpf_map_type>(old.type), "tracked", old.key_size,
                                old.value_size, old.max_entries, &o);
  btf__free(b);
  ASSERT_GE(fd, 0) << strerror(errno);
  ASSERT_EQ(unlink(tracked.c_str()), 0);
  ASSERT_EQ(bpf_obj_pin(fd, tracked.c_str()), 0);
  close(fd);

  VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), KvmTracepoints::kAuto));
  EXPECT_THAT(p->pin_state(), HasSubstr("discarded every pin"));
  EXPECT_THAT(p->pin_state(), HasSubstr("map tracked: value layout changed"));
  EXPECT_THAT(p->adopted_vms().vm_of_pid, IsEmpty());
}

TEST_P(PinTest, RemovingThePinDirDetachesEverything) {
  TempPinDir dir;
  std::set<uint32_t> links;
  {
    VKICK_PROBES_OR_SKIP(p, Pinned(dir.path(), GetParam()));
    links = LinksUsingMap(IdOfFd(p->MapFdForTest("vmm_tgids")));
  }
  ASSERT_EQ(links.size(), 5u);
  for (uint32_t id : links) ASSERT_TRUE(LinkExists(id));
  std::error_code ec;
  std::filesystem::remove_all(dir.path(), ec);  // the documented `rm -r`
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_TRUE(LinksGone(links)) << "no pin, no fd: the links are detached and freed";
}

INSTANTIATE_TEST_SUITE_P(Flavours, PinTest,
                         ::testing::Values(KvmTracepoints::kAuto, KvmTracepoints::kClassic),
                         [](const ::testing::TestParamInfo<KvmTracepoints>& i) {
                           return std::string(i.param == KvmTracepoints::kAuto ? "auto"
                                                                               : "classic");
                         });

}  // namespace
}  // namespace vkick
