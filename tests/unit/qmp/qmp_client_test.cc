// QmpClient against a scripted QMP server on a real unix socket (a thread in
// this process): handshake, replies, events, and every failure mode.
#include "controller/qmp/qmp_client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

std::string Testdata(const std::string& name) {
  std::ifstream in(std::string(VKICK_QMP_TESTDATA) + "/" + name);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// The server side of one connection.
class Peer {
 public:
  explicit Peer(int fd) : fd_(fd) {}
  void Send(const std::string& text) {
    std::string s = text + "\r\n";
    (void)!::send(fd_, s.data(), s.size(), MSG_NOSIGNAL);
  }
  void SendRaw(const std::string& s) { (void)!::send(fd_, s.data(), s.size(), MSG_NOSIGNAL); }
  // Reads one request line; null json on EOF.
  json Read() {
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return json::parse(line);
      }
      char c[4096];
      ssize_t n = ::recv(fd_, c, sizeof(c), 0);
      if (n <= 0) return json();
      buf_.append(c, static_cast<size_t>(n));
    }
  }
  // Reads a request and replies `ret` with its id.
  json Reply(const json& ret) {
    json req = Read();
    json r = {{"return", ret}};
    if (req.contains("id")) r["id"] = req["id"];
    Send(r.dump());
    return req;
  }
  void Handshake() {
    Send(Testdata("greeting.json"));
    json req = Reply(json::object());
    EXPECT_EQ(req["execute"], "qmp_capabilities");
  }

 private:
  int fd_;
  std::string buf_;
};

class QmpClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-qmpclient-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/qmp.sock";
  }
  void TearDown() override {
    if (conn_ >= 0) ::shutdown(conn_, SHUT_RDWR);
    if (server_.joinable()) server_.join();
    if (conn_ >= 0) ::close(conn_);
    if (listener_ >= 0) ::close(listener_);
    std::filesystem::remove_all(dir_);
  }

  // Listens on path_ and runs `script` on the first connection in a thread.
  void Serve(std::function<void(Peer&)> script) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
    ASSERT_EQ(::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ASSERT_EQ(::listen(listener_, 4), 0);
    server_ = std::thread([this, script] {
      conn_ = ::accept(listener_, nullptr, nullptr);
      if (conn_ < 0) return;
      Peer peer(conn_);
      script(peer);
    });
  }

  absl::StatusOr<std::unique_ptr<QmpClient>> Connect(QmpClientOptions o = {}) {
    return QmpClient::Connect(path_, absl::Seconds(2), o);
  }

  std::string dir_, path_;
  int listener_ = -1;
  int conn_ = -1;
  std::thread server_;
};

TEST_F(QmpClientTest, HandshakeCommandAndEventsInBetween) {
  Serve([](Peer& p) {
    p.Handshake();
    json req = p.Read();
    EXPECT_EQ(req["execute"], "query-name");
    p.Send(Testdata("event-RESET.json"));  // an event before the reply
    json r = json::parse(Testdata("query-name.json"));
    r["id"] = req["id"];
    p.Send(r.dump());
    p.Read();  // until the client goes away
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->greeting().major, 7);
  EXPECT_EQ((*c)->peer_pid(), ::getpid());  // SO_PEERCRED: the server is this process
  absl::StatusOr<json> name = (*c)->Execute("query-name");
  ASSERT_TRUE(name.ok()) << name.status();
  EXPECT_EQ((*name)["name"], "capture-vm");
  absl::StatusOr<std::optional<QmpEvent>> ev = (*c)->WaitForEvent(absl::ZeroDuration());
  ASSERT_TRUE(ev.ok());
  ASSERT_TRUE(ev->has_value());
  EXPECT_EQ((*ev)->name, "RESET");
  EXPECT_EQ((*c)->events_seen(), 1u);
}

TEST_F(QmpClientTest, ArgumentsAndErrorReplies) {
  Serve([](Peer& p) {
    p.Handshake();
    json req = p.Read();
    EXPECT_EQ(req["execute"], "qom-get");
    EXPECT_EQ(req["arguments"]["property"], "num-queues");
    json r = json::parse(Testdata("error-qom-get-missing.json"));
    r["id"] = req["id"];
    p.Send(r.dump());
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<json> r =
      (*c)->Execute("qom-get", {{"path", "/machine/peripheral/nosuch"}, {"property", "num-queues"}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(QmpErrorClass(r.status()), "DeviceNotFound");
}

TEST_F(QmpClientTest, ExecuteAllPipelinesInOneWriteAndKeepsEachReply) {
  Serve([](Peer& p) {
    p.Handshake();
    // All three requests arrive before any reply is sent (one round trip).
    json a = p.Read(), b = p.Read(), c = p.Read();
    EXPECT_EQ(a["execute"], "query-name");
    EXPECT_EQ(b["execute"], "qom-get");
    EXPECT_EQ(c["execute"], "query-kvm");
    p.Send(Testdata("event-RESET.json"));
    json ra = {{"return", {{"name", "vm"}}}, {"id", a["id"]}};
    json rb = json::parse(Testdata("error-qom-get-missing.json"));
    rb["id"] = b["id"];
    json rc = {{"return", {{"enabled", true}, {"present", true}}}, {"id", c["id"]}};
    // Out of order (QEMU never does this): each reply still finds its command.
    p.Send(rc.dump());
    p.Send(ra.dump());
    p.Send(rb.dump());
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<absl::StatusOr<json>> r = (*c)->ExecuteAll(
      {{"query-name"}, {"qom-get", {{"path", "/x"}, {"property", "y"}}}, {"query-kvm"}});
  ASSERT_EQ(r.size(), 3u);
  ASSERT_TRUE(r[0].ok()) << r[0].status();
  EXPECT_EQ((*r[0])["name"], "vm");
  EXPECT_EQ(QmpErrorClass(r[1].status()), "DeviceNotFound") << "an error reply is that command's";
  ASSERT_TRUE(r[2].ok()) << r[2].status();
  EXPECT_EQ((*r[2])["enabled"], true);
  EXPECT_EQ((*c)->events_seen(), 1u);
}

TEST_F(QmpClientTest, ExecuteAllAfterAHangReportsTheTimeoutForTheRest) {
  Serve([](Peer& p) {
    p.Handshake();
    p.Read();
    p.Read();  // neither answered
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<absl::StatusOr<json>> r =
      (*c)->ExecuteAll({{"query-name"}, {"query-pci"}}, absl::Milliseconds(100));
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(r[1].status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(QmpClientTest, GarbageIsDataLossAndPoisonsTheConnection) {
  Serve([](Peer& p) {
    p.Handshake();
    p.Read();
    p.Send("this is not QMP {");
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<json> r = (*c)->Execute("query-pci");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ((*c)->Execute("query-name").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(QmpClientTest, WrongShapedMessageIsDataLoss) {
  Serve([](Peer& p) {
    p.Handshake();
    p.Read();
    p.Send(R"({"hello": "world"})");
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->Execute("query-name").status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(QmpClientTest, OversizedReplyIsDataLoss) {
  Serve([](Peer& p) {
    p.Handshake();
    p.Read();
    p.SendRaw(std::string(64 * 1024, ' '));  // no newline, ever
    p.Read();
  });
  QmpClientOptions o;
  o.max_message_bytes = 4096;
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<json> r = (*c)->Execute("query-pci");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("exceeds"));
}

TEST_F(QmpClientTest, HangIsDeadlineExceededAndALateReplyIsSkipped) {
  Serve([](Peer& p) {
    p.Handshake();
    json first = p.Read();  // not answered in time
    json second = p.Read();
    p.Send(json{{"return", "late"}, {"id", first["id"]}}.dump());
    p.Send(json{{"return", "fresh"}, {"id", second["id"]}}.dump());
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  absl::Time start = absl::Now();
  absl::StatusOr<json> r = (*c)->Execute("query-pci", nullptr, absl::Milliseconds(200));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  absl::StatusOr<json> next = (*c)->Execute("query-name", nullptr, absl::Seconds(2));
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(*next, "fresh");
}

TEST_F(QmpClientTest, EofIsUnavailable) {
  Serve([](Peer& p) { p.Handshake(); });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  server_.join();
  ::close(conn_);
  conn_ = -1;
  absl::StatusOr<json> r = (*c)->Execute("query-name");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_EQ((*c)->WaitForEvent(absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(QmpClientTest, NoGreetingIsDeadlineExceeded) {
  Serve([](Peer& p) { p.Read(); });
  absl::StatusOr<std::unique_ptr<QmpClient>> c =
      QmpClient::Connect(path_, absl::Milliseconds(300));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(c.status().message(), HasSubstr("greeting"));
}

TEST_F(QmpClientTest, BadGreetingIsDataLoss) {
  Serve([](Peer& p) {
    p.Send(R"({"QMP": {"version": "seven"}})");
    p.Read();
  });
  EXPECT_EQ(Connect().status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(QmpClientTest, NobodyListeningIsUnavailable) {
  EXPECT_EQ(Connect().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(QmpClient::Connect("", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(QmpClientTest, WaitForEventTimesOutThenDelivers) {
  Serve([](Peer& p) {
    p.Handshake();
    json req = p.Read();  // "go"
    p.Send(json{{"return", json::object()}, {"id", req["id"]}}.dump());
    p.Send(Testdata("event-RESUME.json"));
    p.Read();
  });
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect();
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<std::optional<QmpEvent>> none = (*c)->WaitForEvent(absl::Milliseconds(50));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE((*c)->Execute("cont").ok());
  absl::StatusOr<std::optional<QmpEvent>> ev = (*c)->WaitForEvent(absl::Seconds(2));
  ASSERT_TRUE(ev.ok()) << ev.status();
  ASSERT_TRUE(ev->has_value());
  EXPECT_EQ((*ev)->name, "RESUME");
}

TEST_F(QmpClientTest, EventQueueIsBounded) {
  Serve([](Peer& p) {
    p.Handshake();
    json req = p.Read();
    for (int i = 0; i < 20; ++i) p.Send(Testdata("event-RESET.json"));
    p.Send(json{{"return", json::object()}, {"id", req["id"]}}.dump());
    p.Read();
  });
  QmpClientOptions o;
  o.max_queued_events = 5;
  absl::StatusOr<std::unique_ptr<QmpClient>> c = Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE((*c)->Execute("query-status").ok());
  EXPECT_EQ((*c)->dropped_events(), 15u);
  EXPECT_EQ((*c)->events_seen(), 20u);
  int n = 0;
  while ((*c)->PopEvent().has_value()) ++n;
  EXPECT_EQ(n, 5);
}

}  // namespace
}  // namespace vkick
