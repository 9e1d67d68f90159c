// Exact counts through real KVM: vkick-kvm-harness runs a real-mode guest
// doing known numbers of MMIO and PIO notifies while HostProbes (attached to
// the real kvm tracepoints) tracks the harness's pid from this process. The
// probes must report exactly those numbers, per queue, and count writes to
// unregistered addresses as unmatched for the VM.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "controller/probes/host_probes.h"
#include "tests/kvm_harness/harness_run.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace vkick {
namespace {

using testing::HarnessRun;
using testing::RunHarness;

constexpr uint32_t kVmId = 21;
constexpr uint64_t kMmioAddr = 0xd0000;
constexpr uint16_t kPioPort = 0xc050;

class HarnessProbesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: the host probes need CAP_BPF/CAP_PERFMON";
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not available";
    HostProbesOptions o;
    o.attach_vhost_user = false;  // not exercised here
    auto p = HostProbes::Create(o);
    if (!p.ok() && absl::IsPermissionDenied(p.status())) GTEST_SKIP() << p.status();
    ASSERT_TRUE(p.ok()) << p.status();
    probes_ = *std::move(p);
  }

  absl::Status Track(pid_t pid) {
    return testing::TrackHarness(*probes_, pid, kVmId, kMmioAddr, kPioPort);
  }

  // {device, queue} -> count, and {space} -> unmatched, for kVmId.
  void Read(std::map<std::pair<uint16_t, uint16_t>, uint64_t>* matched,
            std::map<NotifyTarget::Space, uint64_t>* unmatched) {
    auto c = probes_->ReadCounters();
    ASSERT_TRUE(c.ok()) << c.status();
    for (const NotificationCount& n : c->notifications) {
      if (n.vm_id == kVmId) (*matched)[{n.device_id, n.queue}] = n.count;
    }
    for (const UnmatchedCount& u : c->unmatched_writes) {
      if (u.vm_id == kVmId) (*unmatched)[u.space] = u.count;
    }
    EXPECT_EQ(c->errors.map_full, 0u);
  }

  std::unique_ptr<HostProbes> probes_;
};

using Matched = std::map<std::pair<uint16_t, uint16_t>, uint64_t>;
using Unmatched = std::map<NotifyTarget::Space, uint64_t>;

TEST_F(HarnessProbesTest, CountsIoeventfdNotifiesExactlyPerQueue) {
  // 3000 modern-style MMIO notifies (queue 0 of device 1) and 1000 legacy
  // PIO notifies with value 2 (queue 2 of device 2), ioeventfds registered.
  HarnessRun r = RunHarness({"--mmio-writes=3000", "--pio-writes=1000", "--pio-value=2"},
                     [&](pid_t pid) { return Track(pid); });
  ASSERT_TRUE(WIFEXITED(r.wait_status) && WEXITSTATUS(r.wait_status) == 0) << r.wait_status;
  ASSERT_TRUE(r.summary.is_object());
  // KVM absorbed every write in the kernel: the eventfds were signalled and
  // the harness saw no MMIO/IO exit.
  EXPECT_EQ(r.summary["ioeventfd_signals"]["mmio"], 3000);
  EXPECT_EQ(r.summary["ioeventfd_signals"]["pio"], 1000);
  EXPECT_FALSE(r.summary["exits"].contains("mmio"));
  EXPECT_FALSE(r.summary["exits"].contains("io"));

  Matched matched;
  Unmatched unmatched;
  Read(&matched, &unmatched);
  EXPECT_EQ(matched, (Matched{{{1, 0}, 3000}, {{2, 2}, 1000}}));
  EXPECT_TRUE(unmatched.empty());
}

TEST_F(HarnessProbesTest, CountsUserspaceExitNotifiesToo) {
  // Without ioeventfds every write exits to the harness (like a VMM without
  // ioeventfd support): the probes still count each write once.
  HarnessRun r = RunHarness(
      {"--mmio-writes=700", "--pio-writes=300", "--pio-value=5", "--ioeventfd=false"},
      [&](pid_t pid) { return Track(pid); });
  ASSERT_TRUE(WIFEXITED(r.wait_status) && WEXITSTATUS(r.wait_status) == 0) << r.wait_status;
  EXPECT_EQ(r.summary["exits"]["mmio"], 700);
  EXPECT_EQ(r.summary["exits"]["io"], 300);
  Matched matched;
  Unmatched unmatched;
  Read(&matched, &unmatched);
  EXPECT_EQ(matched, (Matched{{{1, 0}, 700}, {{2, 5}, 300}}));
  EXPECT_TRUE(unmatched.empty());
}

TEST_F(HarnessProbesTest, CountsUnmatchedWritesPerVmAndSeparatesProcesses) {
  // A second process of the same VM writes to addresses that are no notify
  // target: counted per VM and space, not dropped; the first run's counts
  // are unaffected; --repeat multiplies exactly.
  HarnessRun a = RunHarness({"--mmio-writes=400", "--pio-writes=100", "--pio-value=1", "--repeat=3"},
                     [&](pid_t pid) { return Track(pid); });
  HarnessRun b = RunHarness({"--mmio-writes=250", "--pio-writes=50", "--mmio-addr=0xe0000",
                      "--pio-port=0xc060"},
                     [&](pid_t pid) { return probes_->TrackProcess(pid, kVmId); });
  ASSERT_TRUE(WIFEXITED(a.wait_status) && WEXITSTATUS(a.wait_status) == 0) << a.wait_status;
  ASSERT_TRUE(WIFEXITED(b.wait_status) && WEXITSTATUS(b.wait_status) == 0) << b.wait_status;
  Matched matched;
  Unmatched unmatched;
  Read(&matched, &unmatched);
  EXPECT_EQ(matched, (Matched{{{1, 0}, 1200}, {{2, 1}, 300}}));
  EXPECT_EQ(unmatched, (Unmatched{{NotifyTarget::Space::kMmio, 250},
                                  {NotifyTarget::Space::kPio, 50}}));
}

}  // namespace
}  // namespace vkick
