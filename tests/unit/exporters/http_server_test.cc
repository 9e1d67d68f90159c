// The HTTP endpoint on loopback: /metrics, /healthz, 404, bad --listen.
#include "exporters/http_server.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "tests/unit/exporters/http_get.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;
using testing::HttpGet;

TEST(ParseListenAddressTest, AcceptsHostPortAndExplainsErrors) {
  auto a = ParseListenAddress("127.0.0.1:9470");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 9470);
  EXPECT_TRUE(ParseListenAddress("0.0.0.0:0").ok());
  for (const char* bad : {"9470", "localhost:9470", "127.0.0.1:", "127.0.0.1:99999",
                          "127.0.0.1:94x0", "127.0.0.1:-1", ":9470", "1.2.3:80"}) {
    auto r = ParseListenAddress(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("--listen=")) << bad;
  }
}

// One server for the suite: civetweb's mg_stop() takes up to its 2 s poll
// quantum, so a server per test would cost seconds.
class HttpServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    registry_ = new std::shared_ptr<prometheus::Registry>(std::make_shared<prometheus::Registry>());
    prometheus::BuildCounter().Name("vkick_test_total").Help("t").Register(**registry_)
        .Add({{"a", "b"}}).Increment(3);
    auto s = MetricsHttpServer::Start("127.0.0.1:0", {*registry_}, [] {
      return healthy_ ? HealthResult{true, "ok"} : HealthResult{false, "probes detached"};
    });
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
    ASSERT_GT(server_->port(), 0) << "port 0 must resolve to the bound port";
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete registry_;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    healthy_ = true;
  }
  static inline std::shared_ptr<prometheus::Registry>* registry_ = nullptr;
  static inline std::atomic<bool> healthy_{true};
  static inline MetricsHttpServer* server_ = nullptr;
};

TEST_F(HttpServerTest, ServesMetricsInTextFormat) {
  auto r = HttpGet(server_->port(), "/metrics");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->code, 200);
  EXPECT_THAT(r->headers, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(r->body, HasSubstr("# TYPE vkick_test_total counter\nvkick_test_total{a=\"b\"} 3\n"));
  EXPECT_EQ(server_->url(), absl::StrCat("http://127.0.0.1:", server_->port()));
}

TEST_F(HttpServerTest, HealthzReflectsHealth) {
  auto r = HttpGet(server_->port(), "/healthz");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->code, 200);
  EXPECT_EQ(r->body, "ok\n");
  healthy_ = false;
  r = HttpGet(server_->port(), "/healthz");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->code, 503);
  EXPECT_EQ(r->body, "probes detached\n");
}

TEST_F(HttpServerTest, EverythingElseIs404) {
  for (const char* path : {"/", "/nope", "/metrics/x", "/healthzz", "/metricsfoo", "/index.html"}) {
    auto r = HttpGet(server_->port(), path);
    ASSERT_TRUE(r.ok()) << path << ": " << r.status();
    EXPECT_EQ(r->code, 404) << path;
  }
  auto r = HttpGet(server_->port(), "/metrics", "POST");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->code, 404);
}

TEST(HttpServerStartTest, BadListenIsAClearError) {
  auto bad = MetricsHttpServer::Start("127.0.0.1:http", {}, [] { return HealthResult{}; });
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("--listen=127.0.0.1:http"));

  // A port already taken by someone else.
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  std::string listen = absl::StrCat("127.0.0.1:", ntohs(a.sin_port));
  auto busy = MetricsHttpServer::Start(listen, {}, [] { return HealthResult{}; });
  ::close(fd);
  ASSERT_FALSE(busy.ok());
  EXPECT_THAT(busy.status().message(), HasSubstr("cannot listen on " + listen));
}

}  // namespace
}  // namespace vkick
