// QmpVmDiscovery against a real QEMU 7.2 under TCG (no KVM needed): devices,
// queues, notify targets once SeaBIOS assigned the BARs, events, and a
// vhost-user device on qemu-storage-daemon with its socket fd resolved.
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "controller/discovery/qmp_vm_discovery.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace vkick {
namespace {

std::string FindInPath(const std::string& name) {
  const char* path = ::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    std::string cand = p.substr(start, end - start) + "/" + name;
    if (::access(cand.c_str(), X_OK) == 0) return cand;
    start = end + 1;
  }
  return "";
}

class LiveQemuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    qemu_ = FindInPath("qemu-system-x86_64");
    if (qemu_.empty()) GTEST_SKIP() << "qemu-system-x86_64 not installed";
    char tmpl[] = "/tmp/vkick-discovery-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    qmp_path_ = dir_ + "/qmp.sock";
  }
  void TearDown() override {
    // Only the processes this test started, by pid.
    for (pid_t pid : pids_) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  pid_t Spawn(const std::vector<std::string>& args) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_t pid = -1;
    EXPECT_EQ(::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ), 0);
    if (pid > 0) pids_.push_back(pid);
    return pid;
  }

  bool WaitForFile(const std::string& path, absl::Duration timeout) {
    absl::Time deadline = absl::Now() + timeout;
    struct stat st;
    while (absl::Now() < deadline) {
      if (::stat(path.c_str(), &st) == 0) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }

  std::unique_ptr<QmpVmDiscovery> ConnectDiscovery() {
    EXPECT_TRUE(WaitForFile(qmp_path_, absl::Seconds(10))) << "QEMU did not create its QMP socket";
    absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> d =
        QmpVmDiscovery::Connect(qmp_path_, absl::Seconds(5));
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }

  std::string qemu_, dir_, qmp_path_;
  std::vector<pid_t> pids_;
};

const VirtioDeviceInfo* Find(const VmInfo& vm, const std::string& label) {
  for (const VirtioDeviceInfo& d : vm.devices) {
    if (d.label == label) return &d;
  }
  return nullptr;
}

bool AllTargetsKnown(const VmInfo& vm) {
  for (const VirtioDeviceInfo& d : vm.devices) {
    if (d.notify_targets.empty()) return false;
  }
  return !vm.devices.empty();
}

TEST_F(LiveQemuTest, LegacyModernAndAnonymousVirtioBlk) {
  pid_t qemu = Spawn({qemu_, "-S", "-display", "none", "-accel", "tcg", "-nodefaults",
                      "-no-user-config", "-smp", "2", "-m", "128", "-name", "live-vm",
                      "-blockdev", "driver=null-co,node-name=nb0",
                      "-blockdev", "driver=null-co,node-name=nb1",
                      "-blockdev", "driver=null-co,node-name=nb2",
                      "-device", "virtio-blk-pci,id=legacy0,drive=nb0,disable-modern=on,num-queues=2",
                      "-device", "virtio-blk-pci,id=modern0,drive=nb1,disable-legacy=on,num-queues=3",
                      "-device", "virtio-blk-pci,drive=nb2,num-queues=2,page-per-vq=on,addr=0x7",
                      "-qmp", absl::StrCat("unix:", qmp_path_, ",server=on,wait=off")});
  ASSERT_GT(qemu, 0);
  std::unique_ptr<QmpVmDiscovery> disc = ConnectDiscovery();
  ASSERT_NE(disc, nullptr);

  // Before the firmware ran: devices and queues known, no BARs, no targets.
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->name, "live-vm");
  EXPECT_EQ(vm->pid, static_cast<uint32_t>(qemu));
  ASSERT_EQ(vm->vcpu_tids.size(), 2u);
  for (uint32_t tid : vm->vcpu_tids) {
    EXPECT_TRUE(std::filesystem::exists(absl::StrCat("/proc/", qemu, "/task/", tid)))
        << "vCPU tid " << tid << " is not a thread of QEMU";
  }
  ASSERT_EQ(vm->devices.size(), 3u);
  const VirtioDeviceInfo* legacy = Find(*vm, "legacy0");
  const VirtioDeviceInfo* modern = Find(*vm, "modern0");
  const VirtioDeviceInfo* anon = Find(*vm, "0000:00:07.0");
  ASSERT_NE(legacy, nullptr);
  ASSERT_NE(modern, nullptr);
  ASSERT_NE(anon, nullptr) << "a device without id= is labelled by its PCI address";
  EXPECT_EQ(legacy->type, "virtio-blk-pci");
  EXPECT_EQ(legacy->qom_path, "/machine/peripheral/legacy0");
  EXPECT_EQ(legacy->num_queues, 2);
  EXPECT_TRUE(legacy->legacy);
  EXPECT_FALSE(legacy->modern);
  EXPECT_EQ(modern->num_queues, 3);
  EXPECT_TRUE(modern->modern);
  EXPECT_FALSE(modern->legacy);
  EXPECT_THAT(anon->qom_path, ::testing::StartsWith("/machine/peripheral-anon/"));
  EXPECT_EQ(anon->num_queues, 2);
  EXPECT_TRUE(anon->legacy && anon->modern);  // transitional by default on PCI
  for (const VirtioDeviceInfo& d : vm->devices) EXPECT_TRUE(d.notify_targets.empty()) << d.label;
  const uint16_t legacy_id = legacy->device_id;
  const uint16_t modern_id = modern->device_id;
  EXPECT_NE(legacy_id, modern_id);

  // Let SeaBIOS assign the BARs, then poll (bounded).
  ASSERT_TRUE(disc->client().Execute("cont").ok());
  absl::Time deadline = absl::Now() + absl::Seconds(60);
  do {
    absl::SleepFor(absl::Milliseconds(200));
    vm = disc->Refresh();
    ASSERT_TRUE(vm.ok()) << vm.status();
  } while (!AllTargetsKnown(*vm) && absl::Now() < deadline);
  ASSERT_TRUE(AllTargetsKnown(*vm)) << "BARs not assigned within 60 s";
  for (const VirtioDeviceInfo& d : vm->devices) {
    std::cout << d.label << " " << d.qom_path << " " << d.type << " queues=" << d.num_queues
              << " id=" << d.device_id << ":";
    for (const NotifyTarget& t : d.notify_targets) {
      std::cout << absl::StrFormat(" %s:0x%x%s", t.space == NotifyTarget::Space::kPio ? "pio" : "mmio",
                                   t.addr, t.value_is_queue ? "(value=queue)" : absl::StrCat("/q", t.queue));
    }
    std::cout << "\n";
  }

  legacy = Find(*vm, "legacy0");
  modern = Find(*vm, "modern0");
  anon = Find(*vm, "0000:00:07.0");
  ASSERT_TRUE(legacy && modern && anon);
  EXPECT_EQ(legacy->device_id, legacy_id) << "device ids stay stable across refreshes";
  EXPECT_EQ(modern->device_id, modern_id);

  ASSERT_EQ(legacy->notify_targets.size(), 1u);
  const NotifyTarget& lt = legacy->notify_targets[0];
  EXPECT_EQ(lt.space, NotifyTarget::Space::kPio);
  EXPECT_TRUE(lt.value_is_queue);
  EXPECT_EQ(lt.addr % 128, 16u) << "BAR0 (128-byte aligned) + VIRTIO_PCI_QUEUE_NOTIFY";
  EXPECT_GE(lt.addr, 0x1000u);
  EXPECT_LT(lt.addr, 0x10000u);
  EXPECT_EQ(lt.device_id, legacy_id);

  ASSERT_EQ(modern->notify_targets.size(), 3u);
  const uint64_t base = modern->notify_targets[0].addr;
  EXPECT_EQ(base % 0x4000, 0x3000u) << "BAR4 (16 KiB aligned) + 0x3000";
  EXPECT_GE(base, 0x80000000u) << "PCI MMIO hole";
  for (uint16_t q = 0; q < 3; ++q) {
    EXPECT_EQ(modern->notify_targets[q].space, NotifyTarget::Space::kMmio);
    EXPECT_EQ(modern->notify_targets[q].addr, base + 4u * q);
    EXPECT_EQ(modern->notify_targets[q].queue, q);
    EXPECT_EQ(modern->notify_targets[q].device_id, modern_id);
  }
  // Transitional: one legacy port and a modern address per queue, a page
  // apart with page-per-vq=on.
  ASSERT_EQ(anon->notify_targets.size(), 3u);
  EXPECT_EQ(anon->notify_targets[2].addr - anon->notify_targets[1].addr, 0x1000u);

  // Cross-check against QEMU's own memory map: the modern notify address is
  // where QEMU placed its "virtio-pci-notify-*" region, the legacy port is
  // 16 bytes into a "virtio-pci" I/O region.
  absl::StatusOr<nlohmann::json> mtree = disc->client().Execute(
      "human-monitor-command", {{"command-line", "info mtree"}});
  ASSERT_TRUE(mtree.ok()) << mtree.status();
  ASSERT_TRUE(mtree->is_string());
  std::map<uint64_t, uint64_t> notify_regions;  // start → size
  std::set<uint64_t> legacy_starts;
  for (absl::string_view line : absl::StrSplit(mtree->get<std::string>(), '\n')) {
    line = absl::StripAsciiWhitespace(line);  // HMP text ends lines with \r\n
    uint64_t start = 0, end = 0;
    size_t dash = line.find('-');
    if (dash == absl::string_view::npos ||
        !absl::SimpleHexAtoi(line.substr(0, dash), &start) ||
        !absl::SimpleHexAtoi(line.substr(dash + 1, line.find(' ') - dash - 1), &end)) {
      continue;
    }
    if (absl::StrContains(line, "): virtio-pci-notify-") &&
        !absl::StrContains(line, "notify-pio")) {
      notify_regions[start] = end - start + 1;
    }
    if (absl::EndsWith(line, "): virtio-pci") && start < 0x10000) legacy_starts.insert(start);
  }
  // The region is multiplier × VIRTIO_QUEUE_MAX (1024) bytes long, which
  // confirms the multiplier too.
  ASSERT_TRUE(notify_regions.contains(modern->notify_targets[0].addr))
      << "QEMU's notify regions do not start at " << std::hex << modern->notify_targets[0].addr;
  EXPECT_EQ(notify_regions[modern->notify_targets[0].addr], 4u * 1024);
  ASSERT_TRUE(notify_regions.contains(anon->notify_targets[1].addr));
  EXPECT_EQ(notify_regions[anon->notify_targets[1].addr], 0x1000u * 1024);
  EXPECT_TRUE(legacy_starts.contains(lt.addr - 16))
      << "no legacy virtio-pci I/O region at " << std::hex << lt.addr - 16;

  // Events: a reset is a reason to refresh; a shutdown means the VM is gone.
  ASSERT_TRUE(disc->client().Execute("system_reset").ok());
  absl::StatusOr<bool> ev = disc->WaitForEvent(absl::Seconds(10));
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_TRUE(*ev);
  ASSERT_TRUE(disc->client().Execute("quit").ok());
  absl::Status gone;
  for (int i = 0; i < 50 && gone.ok(); ++i) {
    absl::StatusOr<bool> e = disc->WaitForEvent(absl::Milliseconds(200));
    if (!e.ok()) gone = e.status();
  }
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable) << gone;
  EXPECT_EQ(disc->Refresh().status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(LiveQemuTest, HungQemuIsDeadlineExceededThenRecovers) {
  pid_t qemu = Spawn({qemu_, "-S", "-display", "none", "-accel", "tcg", "-nodefaults",
                      "-no-user-config", "-m", "64",
                      "-qmp", absl::StrCat("unix:", qmp_path_, ",server=on,wait=off")});
  ASSERT_GT(qemu, 0);
  ASSERT_TRUE(WaitForFile(qmp_path_, absl::Seconds(10)));
  absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> disc =
      QmpVmDiscovery::Connect(qmp_path_, absl::Milliseconds(500));
  ASSERT_TRUE(disc.ok()) << disc.status();
  ASSERT_TRUE((*disc)->Refresh().ok());

  // A second client is not greeted while we hold the monitor.
  absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> second =
      QmpVmDiscovery::Connect(qmp_path_, absl::Milliseconds(300));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kDeadlineExceeded) << second.status();

  ASSERT_EQ(::kill(qemu, SIGSTOP), 0);
  absl::Time start = absl::Now();
  absl::StatusOr<VmInfo> hung = (*disc)->Refresh();
  ::kill(qemu, SIGCONT);
  EXPECT_EQ(hung.status().code(), absl::StatusCode::kDeadlineExceeded) << hung.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3)) << "bounded by the per-command deadline";
  // The late reply to the abandoned command is skipped; the next one works.
  absl::StatusOr<VmInfo> again = (*disc)->Refresh();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->pid, static_cast<uint32_t>(qemu));
}

TEST_F(LiveQemuTest, VhostUserDeviceSocketFd) {
  std::string qsd = FindInPath("qemu-storage-daemon");
  if (qsd.empty()) GTEST_SKIP() << "qemu-storage-daemon not installed";
  std::string vu_path = dir_ + "/vhost.sock";
  ASSERT_GT(Spawn({qsd, "--blockdev", "driver=null-co,node-name=null0,size=67108864", "--export",
                   absl::StrCat("type=vhost-user-blk,id=exp0,node-name=null0,num-queues=2,"
                                "addr.type=unix,addr.path=",
                                vu_path)}),
            0);
  ASSERT_TRUE(WaitForFile(vu_path, absl::Seconds(10))) << "qemu-storage-daemon did not listen";
  pid_t qemu = Spawn({qemu_, "-S", "-display", "none", "-accel", "tcg", "-nodefaults",
                      "-no-user-config", "-m", "128",
                      "-object", "memory-backend-memfd,id=mem0,size=128M,share=on",
                      "-machine", "pc,memory-backend=mem0",
                      "-chardev", absl::StrCat("socket,id=vu0,path=", vu_path),
                      "-device", "vhost-user-blk-pci,id=vublk0,chardev=vu0,num-queues=2",
                      "-qmp", absl::StrCat("unix:", qmp_path_, ",server=on,wait=off")});
  ASSERT_GT(qemu, 0);
  std::unique_ptr<QmpVmDiscovery> disc = ConnectDiscovery();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->name, absl::StrCat("pid", qemu)) << "no -name: the pid names the VM";
  const VirtioDeviceInfo* vu = Find(*vm, "vublk0");
  ASSERT_NE(vu, nullptr);
  EXPECT_EQ(vu->type, "vhost-user-blk-pci");
  EXPECT_TRUE(vu->vhost_user);
  EXPECT_EQ(vu->num_queues, 2);
  EXPECT_EQ(vu->chardev, "vu0");
  EXPECT_EQ(vu->socket_path, vu_path);
  ASSERT_GE(vu->socket_fd, 0) << "QEMU's fd for the vhost-user connection";
  std::error_code ec;
  std::string target = std::filesystem::read_symlink(
      absl::StrCat("/proc/", qemu, "/fd/", vu->socket_fd), ec).string();
  EXPECT_THAT(target, ::testing::StartsWith("socket:["));
}

}  // namespace
}  // namespace vkick
