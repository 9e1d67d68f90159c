#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <thread>

#include "controller/admin/admin_protocol.h"
#include "controller/admin/admin_server.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

TEST(AdminProtocolTest, ParsesRequests) {
  auto s = ParseAdminRequest(R"({"cmd":"status"})");
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(std::holds_alternative<AdminStatus>(*s));

  auto p = ParseAdminRequest(
      R"({"cmd":"policy-set","scope":{"vm":"vm1","device":"d0","queue":1},)"
      R"("spec":{"mode":"static","batch":8,"defer_us":50}})");
  ASSERT_TRUE(p.ok()) << p.status();
  auto& set = std::get<AdminPolicySet>(*p);
  EXPECT_EQ(set.scope, (PolicyScope{"vm1", "d0", 1}));
  EXPECT_EQ(set.spec, (PolicySpec{proto::KickMode::kStatic, 8, 50'000}));

  auto all = ParseAdminRequest(R"({"cmd":"policy-set","scope":{},"spec":{"mode":"adaptive"}})");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(std::get<AdminPolicySet>(*all).scope, PolicyScope{});

  auto clr = ParseAdminRequest(R"({"cmd":"policy-clear","scope":{"vm":"vm1"}})");
  ASSERT_TRUE(clr.ok());
  EXPECT_EQ(std::get<AdminPolicyClear>(*clr).scope, (PolicyScope{"vm1", "", -1}));
}

TEST(AdminProtocolTest, RejectsBadRequests) {
  const char* bad[] = {
      "",
      "not json",
      "[]",
      R"({"cmd":"reboot"})",
      R"({"cmd":"policy-set","scope":{"vm":"v"}})",
      R"({"cmd":"policy-set","scope":{"device":"d"},"spec":{"mode":"immediate"}})",
      R"({"cmd":"policy-set","scope":{"vm":"v","device":"d","queue":64},"spec":{"mode":"immediate"}})",
      R"({"cmd":"policy-set","scope":{"vm":"v"},"spec":{"mode":"static","batch":8}})",  // no T
      R"({"cmd":"policy-set","scope":{"vm":"v"},"spec":{"mode":"static","batch":300,"defer_us":5}})",
      R"({"cmd":"policy-set","scope":{"vm":"v"},"spec":{"mode":"static","batch":4,"defer_us":5000}})",
      R"({"cmd":"policy-set","scope":{"vm":"v"},"spec":{"mode":"immediate","batch":4}})",
      R"({"cmd":"policy-set","scope":{"vm":"v"},"spec":{"mode":"warp"}})",
      R"({"cmd":"policy-set","scope":{"vm":"v","x":1},"spec":{"mode":"immediate"}})",
      R"({"cmd":"policy-set","scope":{"vm":"a b"},"spec":{"mode":"immediate"}})",
      R"({"cmd":"policy-clear","scope":{}})",
  };
  for (const char* b : bad) EXPECT_FALSE(ParseAdminRequest(b).ok()) << b;
  EXPECT_FALSE(ParseAdminRequest(std::string(kMaxAdminLine + 1, ' ')).ok());
}

TEST(AdminProtocolTest, Authorization) {
  EXPECT_TRUE(AdminAuthorized(0, 0, {}, 0, std::nullopt));
  EXPECT_FALSE(AdminAuthorized(1000, 1000, {1000, 27}, 0, std::nullopt));
  EXPECT_TRUE(AdminAuthorized(1000, 1000, {1000, 27}, 0, 27u));  // supplementary
  EXPECT_TRUE(AdminAuthorized(1000, 27, {}, 0, 27u));            // primary
  EXPECT_FALSE(AdminAuthorized(1000, 1000, {1000}, 0, 27u));
  EXPECT_TRUE(AdminAuthorized(1000, 1000, {}, 1000, std::nullopt));  // the daemon's own uid
  EXPECT_EQ(ParseProcGroups("Name:\tx\nGroups:\t4 24 27 \nNSpgid:\t1\n"),
            (std::vector<uint32_t>{4, 24, 27}));
  EXPECT_TRUE(ParseProcGroups("Groups:\t\n").empty());
}

TEST(AdminProtocolTest, StatusJson) {
  QueueView v;
  v.key = {"vm1", "d0", 2};
  v.spec = {proto::KickMode::kStatic, 8, 50'000};
  v.b = 8;
  v.t_ns = 50'000;
  v.agent_connected = true;
  auto j = StatusJson({v}, {{"vm1", 1}}, {}, 0);
  EXPECT_EQ(j["queues"][0]["mode"], "static");
  EXPECT_EQ(j["queues"][0]["driver"], "vkick-blk");
  EXPECT_EQ(j["queues"][0]["batch"], 8);
  EXPECT_EQ(j["queues"][0]["defer_us"], 50.0);
  EXPECT_EQ(j["agents"][0]["connected"], 1);
  EXPECT_EQ(j["default"]["mode"], "immediate");
  EXPECT_EQ(j["queues"][0]["state"], "running") << "no VM state: a --vhost-user queue";
  EXPECT_EQ(j["queues"][0]["frozen"], false);
  v.vm_state = "suspended";
  v.frozen = true;
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["state"], "suspended");
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["frozen"], true);
  v.vm_state.clear();
  v.frozen = false;
  // The driver the agent announced, steered or observed.
  v.driver = proto::DriverKind::kVkickVirtioBlk;
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["driver"], "vkick-virtio-blk");
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["mode"], "static");
  v.driver = proto::DriverKind::kKernel;
  v.observe_only = true;
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["driver"], "kernel");
  EXPECT_EQ(StatusJson({v}, {}, {}, 0)["queues"][0]["mode"], "observe");
}

int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Like vkickctl: gives up on a reply after `timeout_s`.
std::string Roundtrip(const std::string& path, const std::string& req, int timeout_s = 10) {
  int fd = ConnectUnix(path);
  if (fd < 0) return "connect failed";
  timeval tv{timeout_s, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string line = req + "\n";
  send(fd, line.data(), line.size(), MSG_NOSIGNAL);  // may be refused and closed first
  std::string out;
  char c;
  while (read(fd, &c, 1) == 1 && c != '\n') out += c;
  close(fd);
  return out;
}

TEST(AdminServerTest, ServesAndRefusesOtherUids) {
  char t[] = "/tmp/vkick-admin-XXXXXX";
  std::string dir = mkdtemp(t);
  chmod(dir.c_str(), 0755);
  AdminServerOptions o;
  o.socket_path = dir + "/admin.sock";
  std::atomic<int> calls{0};  // bumped on a client thread
  o.handler = [&](const AdminRequest& r, const AdminPeer&) {
    ++calls;
    return std::string(std::holds_alternative<AdminStatus>(r) ? R"({"ok":true})" : "{}");
  };
  auto srv = AdminServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  struct stat st;
  ASSERT_EQ(stat(o.socket_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(Roundtrip(o.socket_path, R"({"cmd":"status"})"), R"({"ok":true})");
  EXPECT_NE(Roundtrip(o.socket_path, "garbage").find("\"ok\":false"), std::string::npos);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ((*srv)->bad_requests(), 1u);

  if (geteuid() != 0) {
    (*srv)->Stop();
    system(("rm -rf " + dir).c_str());
    GTEST_SKIP() << "not root: cannot switch to another uid to test the refusal";
  }
  // 0600 owned by root keeps others out at connect(); open the mode up so
  // the SO_PEERCRED check itself is what refuses.
  chmod(o.socket_path.c_str(), 0666);
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 ||
        setresuid(65534, 65534, 65534) != 0)
      _exit(3);
    std::string r = Roundtrip(o.socket_path, R"({"cmd":"status"})");
    _exit(r.find("permission denied") != std::string::npos ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "uid 65534 was not refused (child exit " << WEXITSTATUS(status) << ")";
  EXPECT_EQ((*srv)->refused(), 1u);
  EXPECT_EQ(calls, 1);
  (*srv)->Stop();
  system(("rm -rf " + dir).c_str());
}

TEST(AdminServerTest, AdminGroupMembersAreServed) {
  if (geteuid() != 0) GTEST_SKIP() << "not root: cannot chown the socket or switch uid";
  char t[] = "/tmp/vkick-admin-XXXXXX";
  std::string dir = mkdtemp(t);
  chmod(dir.c_str(), 0755);
  AdminServerOptions o;
  o.socket_path = dir + "/admin.sock";
  o.admin_gid = 4242;  // any gid: the child below joins it
  o.handler = [](const AdminRequest&, const AdminPeer&) { return std::string(R"({"ok":true})"); };
  auto srv = AdminServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  struct stat st;
  ASSERT_EQ(stat(o.socket_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_gid, 4242u);
  auto run_as = [&](gid_t gid, const std::vector<gid_t>& groups) {
    pid_t pid = fork();
    if (pid == 0) {
      if (setgroups(groups.size(), groups.data()) != 0 || setresgid(gid, gid, gid) != 0 ||
          setresuid(23456, 23456, 23456) != 0)
        _exit(3);
      std::string r = Roundtrip(o.socket_path, R"({"cmd":"status"})");
      _exit(r == R"({"ok":true})" ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  EXPECT_EQ(run_as(4242, {}), 0) << "primary group member refused";
  EXPECT_EQ(run_as(23456, {4242}), 0) << "supplementary group member refused";
  EXPECT_EQ((*srv)->refused(), 0u);
  (*srv)->Stop();
  system(("rm -rf " + dir).c_str());
}

using Clock = std::chrono::steady_clock;
double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// An authorized client that sends one byte of a request every 300 ms and
// never a newline; notes when vkickd closes it.
class Trickler {
 public:
  explicit Trickler(const std::string& path) : fd_(ConnectUnix(path)), start_(Clock::now()) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Trickler() {
    stop_ = true;
    thread_.join();
    if (fd_ >= 0) close(fd_);
  }
  bool connected() const { return fd_ >= 0; }
  // Seconds from connect to vkickd's close; < 0 while it is open.
  double closed_after_s() const { return closed_after_s_; }

 private:
  // Waits 300 ms for vkickd; false once it has closed the connection.
  bool StillOpen() {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 300) <= 0) return true;
    char buf[512];
    return read(fd_, buf, sizeof buf) > 0;  // its error line, then EOF
  }
  void Run() {
    const std::string req = R"({"cmd":"status"})";
    for (size_t i = 0; fd_ >= 0 && !stop_; ++i) {
      if (send(fd_, &req[i % req.size()], 1, MSG_NOSIGNAL) != 1 || !StillOpen()) {
        closed_after_s_ = SecondsSince(start_);
        return;
      }
    }
  }

  const int fd_;
  const Clock::time_point start_;
  std::atomic<bool> stop_{false};
  std::atomic<double> closed_after_s_{-1};
  std::thread thread_;
};

struct TestSocketDir {
  TestSocketDir() {
    char t[] = "/tmp/vkick-admin-XXXXXX";
    dir = mkdtemp(t);
    chmod(dir.c_str(), 0755);
  }
  ~TestSocketDir() { system(("rm -rf " + dir).c_str()); }
  std::string path() const { return dir + "/admin.sock"; }
  std::string dir;
};

// One slow admin client must not lock vkickctl out (it was served one client
// at a time), and its request line has a total deadline (5 s) however often
// it sends a byte.
TEST(AdminServerTest, TricklingClientNeitherBlocksOthersNorStays) {
  TestSocketDir d;
  AdminServerOptions o;
  o.socket_path = d.path();
  std::atomic<int32_t> peer_pid{0};
  std::atomic<uint32_t> peer_uid{~0u};
  o.handler = [&](const AdminRequest&, const AdminPeer& p) {
    peer_pid = p.pid;
    peer_uid = p.uid;
    return std::string(R"({"ok":true})");
  };
  auto srv = AdminServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  Trickler slow(o.socket_path);
  ASSERT_TRUE(slow.connected());
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // it is being served

  Clock::time_point t0 = Clock::now();
  EXPECT_EQ(Roundtrip(o.socket_path, R"({"cmd":"status"})", /*timeout_s=*/3), R"({"ok":true})");
  double reply_s = SecondsSince(t0);
  EXPECT_LT(reply_s, 1.0);

  while (slow.closed_after_s() < 0 && SecondsSince(t0) < 9)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::cout << "[ FIGURE   ] status reply beside a trickling client: " << reply_s
            << " s; trickler closed after " << slow.closed_after_s() << " s\n";
  EXPECT_GE(slow.closed_after_s(), 0) << "still open 9 s after it connected";
  EXPECT_GT(slow.closed_after_s(), 4.5) << "closed before its deadline";
  EXPECT_LT(slow.closed_after_s(), 6.5) << "not closed at its 5 s deadline";
  EXPECT_EQ((*srv)->deadline_closed(), 1u);
  EXPECT_EQ((*srv)->requests(), 1u);
  // The handler learns who asked (for the log of policy changes).
  EXPECT_EQ(peer_pid, getpid());
  EXPECT_EQ(peer_uid, geteuid());
}

// Beyond max_clients a client is told "busy" at once and counted; a slot
// frees when a client leaves.
TEST(AdminServerTest, ClientsBeyondTheBoundAreTurnedAway) {
  TestSocketDir d;
  AdminServerOptions o;
  o.socket_path = d.path();
  o.max_clients = 2;
  o.handler = [](const AdminRequest&, const AdminPeer&) { return std::string(R"({"ok":true})"); };
  auto srv = AdminServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  int idle1 = ConnectUnix(o.socket_path), idle2 = ConnectUnix(o.socket_path);
  ASSERT_GE(idle1, 0);
  ASSERT_GE(idle2, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // both admitted

  Clock::time_point t0 = Clock::now();
  std::string busy = Roundtrip(o.socket_path, R"({"cmd":"status"})", /*timeout_s=*/3);
  EXPECT_LT(SecondsSince(t0), 1.0);
  EXPECT_NE(busy.find("busy"), std::string::npos) << busy;
  EXPECT_EQ((*srv)->busy_refused(), 1u);

  close(idle1);
  std::string ok;
  for (int i = 0; i < 20 && ok != R"({"ok":true})"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ok = Roundtrip(o.socket_path, R"({"cmd":"status"})", /*timeout_s=*/3);
  }
  EXPECT_EQ(ok, R"({"ok":true})") << "the slot idle1 left was not freed";
  close(idle2);
  (*srv)->Stop();
  EXPECT_EQ((*srv)->deadline_closed(), 0u);
}

}  // namespace
}  // namespace vkick
