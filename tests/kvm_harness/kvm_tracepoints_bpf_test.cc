// The kvm programs of both flavours fired by real guest writes: the BTF raw
// tracepoints (what vkickd loads where the kernel's BTF has them) and the
// classic tracepoints (the fallback, forced here). vkick-kvm-harness does
// known numbers of MMIO and legacy PIO notifies; each flavour must count
// them exactly per queue, read the legacy PIO value (the queue) the same
// way, and count writes to other addresses as unmatched. Label bpf: root and
// /dev/kvm, skipped with the reason otherwise.
#include <unistd.h>

#include <map>
#include <ostream>
#include <memory>
#include <string>
#include <utility>

#include "controller/probes/host_probes.h"
#include "gtest/gtest.h"
#include "tests/kvm_harness/harness_run.h"

namespace vkick {

// Test names in CTest say the flavour, not the enum's bytes.
void PrintTo(KvmTracepoints k, std::ostream* os) { *os << KvmTracepointsName(k); }

namespace {

constexpr uint32_t kVmId = 31;
constexpr uint64_t kMmioAddr = 0xd0000;
constexpr uint16_t kPioPort = 0xc050;

using Matched = std::map<std::pair<uint16_t, uint16_t>, uint64_t>;

class KvmTracepointsBpfTest : public ::testing::TestWithParam<KvmTracepoints> {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: the host probes need CAP_BPF/CAP_PERFMON";
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not available";
    HostProbesOptions o;
    o.attach_vhost_user = false;
    o.kvm_tracepoints = GetParam();
    o.capacity = {64, 8, 4};
    auto p = HostProbes::Create(o);
    if (!p.ok() && absl::IsPermissionDenied(p.status())) GTEST_SKIP() << p.status();
    if (!p.ok() && absl::IsNotFound(p.status()) && GetParam() == KvmTracepoints::kBtf) {
      GTEST_SKIP() << "no kvm raw tracepoints in this kernel's BTF: " << p.status();
    }
    ASSERT_TRUE(p.ok()) << p.status();
    probes_ = *std::move(p);
  }

  absl::Status Track(pid_t pid) {
    return testing::TrackHarness(*probes_, pid, kVmId, kMmioAddr, kPioPort);
  }

  Matched Counted(uint64_t* unmatched) {
    Matched m;
    auto c = probes_->ReadCounters();
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return m;
    for (const NotificationCount& n : c->notifications) {
      if (n.vm_id == kVmId) m[{n.device_id, n.queue}] += n.count;
    }
    *unmatched = 0;
    for (const UnmatchedCount& u : c->unmatched_writes) {
      if (u.vm_id == kVmId) *unmatched += u.count;
    }
    EXPECT_EQ(c->errors.map_full + c->errors.bad_queue, 0u);
    return m;
  }

  std::unique_ptr<HostProbes> probes_;
};

TEST_P(KvmTracepointsBpfTest, LoadsTheFlavourAsked) {
  const std::string flavour = probes_->kvm_flavour();
  if (GetParam() == KvmTracepoints::kClassic) {
    EXPECT_EQ(flavour, "classic");
  } else {
    EXPECT_NE(flavour, "classic") << "this kernel's BTF has the kvm tracepoints";
  }
}

TEST_P(KvmTracepointsBpfTest, CountsIoeventfdAndExitingNotifiesExactly) {
  // Absorbed by ioeventfds (the production path), then exiting to the VMM.
  testing::HarnessRun a = testing::RunHarness(
      {"--mmio-writes=1500", "--pio-writes=700", "--pio-value=3"},
      [&](pid_t pid) { return Track(pid); });
  ASSERT_TRUE(WIFEXITED(a.wait_status) && WEXITSTATUS(a.wait_status) == 0) << a.wait_status;
  testing::HarnessRun b = testing::RunHarness(
      {"--mmio-writes=400", "--pio-writes=200", "--pio-value=5", "--ioeventfd=false"},
      [&](pid_t pid) { return Track(pid); });
  ASSERT_TRUE(WIFEXITED(b.wait_status) && WEXITSTATUS(b.wait_status) == 0) << b.wait_status;
  uint64_t unmatched = 0;
  EXPECT_EQ(Counted(&unmatched), (Matched{{{1, 0}, 1900}, {{2, 3}, 700}, {{2, 5}, 200}}));
  EXPECT_EQ(unmatched, 0u);
}

TEST_P(KvmTracepointsBpfTest, CountsWritesElsewhereAsUnmatched) {
  testing::HarnessRun r = testing::RunHarness(
      {"--mmio-writes=300", "--pio-writes=100", "--mmio-addr=0xe0000", "--pio-port=0xc060"},
      [&](pid_t pid) { return Track(pid); });
  ASSERT_TRUE(WIFEXITED(r.wait_status) && WEXITSTATUS(r.wait_status) == 0) << r.wait_status;
  uint64_t unmatched = 0;
  EXPECT_TRUE(Counted(&unmatched).empty());
  EXPECT_EQ(unmatched, 400u);
}

INSTANTIATE_TEST_SUITE_P(Flavours, KvmTracepointsBpfTest,
                         ::testing::Values(KvmTracepoints::kBtf, KvmTracepoints::kClassic),
                         [](const ::testing::TestParamInfo<KvmTracepoints>& i) {
                           return i.param == KvmTracepoints::kBtf ? "TpBtf" : "ClassicFallback";
                         });

}  // namespace
}  // namespace vkick
