// vkickd with the real eBPF host probes and no VM (label "bpf"): it starts,
// /healthz is ok, the probes are reported attached and the scrape is clean.
#include <unistd.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/daemon/vkickd_process.h"
#include "tests/unit/exporters/http_get.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;

TEST(VkickdBpfTest, RealProbesWithoutVmAreHealthy) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (CAP_BPF, CAP_PERFMON) to load the probes";
  testing::VkickdProcess vk;
  ASSERT_TRUE(vk.Start(VKICKD_BINARY, {"--listen=127.0.0.1:0"}).ok());
  auto port = vk.WaitForListening();
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_THAT(vk.log(), HasSubstr("(probes attached"));

  auto h = testing::HttpGet(*port, "/healthz");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->code, 200) << h->body;
  EXPECT_EQ(h->body, "ok\n");
  auto m = testing::HttpGet(*port, "/metrics");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(m->body, HasSubstr("vkick_probes_attached 1\n"));
  EXPECT_THAT(m->body, HasSubstr("vkick_probe_errors_total{reason=\"read_counters\"} 0\n"));
  auto pt = testing::PromtoolCheckMetrics(m->body);
  if (pt.ok()) {
    EXPECT_EQ(pt->exit_code, 0) << pt->output;
  }

  vk.Signal(SIGTERM);
  auto st = vk.Wait();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << vk.log();
}

}  // namespace
}  // namespace vkick
