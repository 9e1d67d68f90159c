// vkickd as a process (label "integration"): --no-probes on a free loopback
// port, /healthz, 404, a real scrape through promtool, clean SIGTERM, and the
// start-up errors an operator sees.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <sys/stat.h>

#include <filesystem>
#include <string>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/daemon/vkickd_process.h"
#include "tests/unit/exporters/http_get.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;
using testing::HttpGet;
using testing::VkickdProcess;

std::string UniquePath(const char* what) {
  return absl::StrCat("/tmp/vkick-it-", ::getpid(), "-", what);
}

TEST(VkickdIntegrationTest, NoProbesServesHealthzAnd404AndStopsCleanly) {
  VkickdProcess vk;
  ASSERT_TRUE(vk.Start(VKICKD_BINARY, {"--no-probes", "--listen=127.0.0.1:0"}).ok());
  auto port = vk.WaitForListening();
  ASSERT_TRUE(port.ok()) << port.status();

  auto h = HttpGet(*port, "/healthz");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->code, 200);
  EXPECT_EQ(h->body, "ok\n");
  auto nope = HttpGet(*port, "/nope");
  ASSERT_TRUE(nope.ok()) << nope.status();
  EXPECT_EQ(nope->code, 404);
  auto m = HttpGet(*port, "/metrics");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->code, 200);
  EXPECT_THAT(m->body, HasSubstr("vkick_probes_attached 0\n"));
  EXPECT_THAT(m->body, HasSubstr("vkick_build_info{version=\""));

  vk.Signal(SIGTERM);
  auto st = vk.Wait();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << vk.log();
  EXPECT_THAT(vk.log(), HasSubstr("received SIGTERM, shutting down"));
  // Every log line is timestamped.
  EXPECT_THAT(vk.log(), ::testing::ContainsRegex("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+"));
}

TEST(VkickdIntegrationTest, RealScrapePassesPromtool) {
  // A socket that is missing, and one that accepts and speaks garbage: both
  // must be visible as counted QMP errors, in an exposition promtool accepts.
  const std::string missing = UniquePath("missing.qmp");
  const std::string garbage = UniquePath("garbage.qmp");
  int lfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(lfd, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", garbage.c_str());
  ::unlink(garbage.c_str());
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  ASSERT_EQ(::listen(lfd, 8), 0);
  struct Cleanup {
    int fd;
    std::string path;
    ~Cleanup() {
      ::shutdown(fd, SHUT_RDWR);
      ::close(fd);
      ::unlink(path.c_str());
    }
  } cleanup{lfd, garbage};
  std::thread garbler([lfd] {
    for (;;) {
      int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) return;  // listening socket shut down
      const char kNoise[] = "this is not QMP\n{\"broken\": \n";
      ssize_t unused = ::write(c, kNoise, sizeof(kNoise) - 1);
      (void)unused;
      ::close(c);
    }
  });
  struct Joiner {
    std::thread& t;
    int fd;
    ~Joiner() {
      ::shutdown(fd, SHUT_RDWR);
      t.join();
    }
  } joiner{garbler, lfd};

  VkickdProcess vk;
  ASSERT_TRUE(vk.Start(VKICKD_BINARY, {"--no-probes", "--listen=127.0.0.1:0",
                                       "--refresh-interval=100ms", "--control-interval=100ms",
                                       "--qmp=" + missing,
                                       "--qmp", garbage})
                  .ok());
  auto port = vk.WaitForListening();
  ASSERT_TRUE(port.ok()) << port.status();
  // A few connect attempts, and a control step (which /metrics renders) since.
  absl::SleepFor(absl::Milliseconds(500));
  auto m = HttpGet(*port, "/metrics");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->code, 200);
  EXPECT_THAT(m->body, HasSubstr(absl::StrCat("vkick_qmp_connected{qmp=\"", garbage, "\"} 0")));
  EXPECT_THAT(m->body, ::testing::ContainsRegex(absl::StrCat(
                           "vkick_qmp_errors_total\\{qmp=\"", missing,
                           "\",reason=\"connect\"\\} [1-9]")));
  EXPECT_TRUE(vk.WaitForLog(absl::StrCat("qmp ", missing, ": connect error"))) << vk.log();

  auto pt = testing::PromtoolCheckMetrics(m->body);
  if (pt.status().code() == absl::StatusCode::kNotFound) GTEST_SKIP() << pt.status().message();
  ASSERT_TRUE(pt.ok()) << pt.status();
  EXPECT_EQ(pt->exit_code, 0) << pt->output << "\n--- scrape:\n" << m->body;
  EXPECT_EQ(pt->output, "") << "promtool lint findings";
  ASSERT_GT(m->body.size(), 1000u) << "promtool passes an empty file: make sure it was not";
}

TEST(VkickdIntegrationTest, BadListenIsAClearStartupError) {
  for (const char* listen : {"--listen=nonsense", "--listen=127.0.0.1:70000",
                             "--listen=localhost:9470"}) {
    VkickdProcess vk;
    ASSERT_TRUE(vk.Start(VKICKD_BINARY, {"--no-probes", listen}).ok());
    auto st = vk.Wait();
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) != 0) << listen;
    EXPECT_THAT(vk.log(), HasSubstr(listen)) << "names the bad flag";
  }
}

TEST(VkickdIntegrationTest, WithoutRootProbesFailWithAHint) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to drop to uid nobody for this check";
  // uid nobody must reach the binary: the build tree may sit under a 0700
  // directory (a mktemp -d clone), so run a copy from a 0755 one.
  char dir[] = "/tmp/vkickd-nobody-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  ASSERT_EQ(::chmod(dir, 0755), 0);
  const std::string bin = absl::StrCat(dir, "/vkickd");
  std::error_code ec;
  std::filesystem::copy_file(VKICKD_BINARY, bin, ec);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(::chmod(bin.c_str(), 0755), 0);
  struct Cleanup {
    std::string dir, bin;
    ~Cleanup() {
      ::unlink(bin.c_str());
      ::rmdir(dir.c_str());
    }
  } cleanup{dir, bin};
  VkickdProcess vk;
  ASSERT_TRUE(vk.Start(bin, {"--listen=127.0.0.1:0"}, /*run_as=*/65534).ok());
  auto st = vk.Wait();
  ASSERT_TRUE(st.ok()) << st.status();
  ASSERT_TRUE(WIFEXITED(*st));
  ASSERT_NE(WEXITSTATUS(*st), 126) << "could not drop privileges";
  EXPECT_EQ(WEXITSTATUS(*st), 1) << vk.log();
  EXPECT_THAT(vk.log(), HasSubstr("not running as root"));
  EXPECT_THAT(vk.log(), HasSubstr("--no-probes"));
}

}  // namespace
}  // namespace vkick
