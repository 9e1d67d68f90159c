// vkick-agent end to end on real parts: qemu-storage-daemon + vkick-blk +
// vkick-agent (real BPF on the USDT probes) + a fake vkickd using protocol/.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "guest-policy/core/control_block.h"
#include "gtest/gtest.h"
#include "tests/unit/protocol/test_messages.h"
#include "nlohmann/json.hpp"
#include "protocol/codec.h"

namespace vkick {
namespace {

using Json = nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<Json> JsonLines(const std::string& path) {
  std::vector<Json> out;
  std::istringstream in(Slurp(path));
  std::string line;
  while (std::getline(in, line)) {
    Json j = Json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}

bool Executable(const std::string& p) { return access(p.c_str(), X_OK) == 0; }

std::string Which(const std::string& name) {
  for (const char* d : {"/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin"}) {
    std::string p = std::string(d) + "/" + name;
    if (Executable(p)) return p;
  }
  return "";
}

// A child process started by this test; killed by its pid only.
class Child {
 public:
  Child(std::vector<std::string> argv, const std::string& out, const std::string& err) {
    pid_ = fork();
    if (pid_ == 0) {
      int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(o, 1);
      dup2(e, 2);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // Waits up to `timeout`; returns the exit status or -1 on timeout.
  int Wait(milliseconds timeout) {
    if (exited_) return status_;
    const auto end = steady_clock::now() + timeout;
    while (steady_clock::now() < end) {
      int st;
      pid_t r = waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        return status_;
      }
      std::this_thread::sleep_for(milliseconds(20));
    }
    return -1;
  }
  int Stop(milliseconds timeout = milliseconds(5000)) {
    if (!exited_) kill(pid_, SIGTERM);
    return Wait(timeout);
  }
  pid_t pid() const { return pid_; }
  bool alive() {
    Wait(milliseconds(0));
    return !exited_;
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = -1;
};

// The test's vkickd: a unix listener speaking the protocol via protocol/.
class FakeHost {
 public:
  explicit FakeHost(std::string path) : path_(std::move(path)) { Listen(); }
  ~FakeHost() {
    CloseConn();
    if (lfd_ >= 0) close(lfd_);
  }
  void Listen() {
    unlink(path_.c_str());
    lfd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path_.c_str());
    EXPECT_EQ(bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(lfd_, 4), 0);
  }
  // vkickd "dies": listener and connection gone.
  void Shutdown() {
    CloseConn();
    close(lfd_);
    lfd_ = -1;
    unlink(path_.c_str());
  }
  bool Accept(milliseconds timeout) {
    CloseConn();
    pollfd p{lfd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(timeout.count())) != 1) return false;
    fd_ = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
    dec_ = proto::StreamDecoder();
    pending_.clear();
    return fd_ >= 0;
  }
  void CloseConn() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  // Next decoded message, or nullopt on timeout / EOF.
  std::optional<proto::Message> Next(milliseconds timeout) {
    const auto end = steady_clock::now() + timeout;
    while (pending_.empty()) {
      const auto left = std::chrono::duration_cast<milliseconds>(end - steady_clock::now()).count();
      if (left <= 0 || fd_ < 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left)) != 1) return std::nullopt;
      uint8_t buf[65536];
      ssize_t n = read(fd_, buf, sizeof(buf));
      if (n <= 0) {
        CloseConn();
        return std::nullopt;
      }
      dec_.Feed(std::span<const uint8_t>(buf, static_cast<size_t>(n)), [&](proto::DecodeResult&& r) {
        EXPECT_EQ(r.error, proto::Rejection::kNone) << "agent sent an invalid frame: "
                                                    << proto::RejectionName(r.error);
        if (r.message) pending_.push_back(std::move(*r.message));
      });
    }
    proto::Message m = std::move(pending_.front());
    pending_.erase(pending_.begin());
    return m;
  }
  template <typename T>
  std::optional<T> NextOf(milliseconds timeout) {
    const auto end = steady_clock::now() + timeout;
    while (steady_clock::now() < end) {
      auto m = Next(std::chrono::duration_cast<milliseconds>(end - steady_clock::now()));
      if (!m) return std::nullopt;
      if (auto* t = std::get_if<T>(&*m)) return *t;
    }
    return std::nullopt;
  }
  void Send(const proto::Message& m) {
    proto::EncodeResult r = proto::Encode(m);
    ASSERT_EQ(r.error, proto::Rejection::kNone);
    ASSERT_EQ(write(fd_, r.bytes.data(), r.bytes.size()), static_cast<ssize_t>(r.bytes.size()));
  }
  bool connected() const { return fd_ >= 0; }

 private:
  std::string path_;
  int lfd_ = -1;
  int fd_ = -1;
  proto::StreamDecoder dec_;
  std::vector<proto::Message> pending_;
};

class AgentLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "not root: vkick-agent loads BPF (CAP_BPF + CAP_PERFMON)";
    qsd_bin_ = Which("qemu-storage-daemon");
    if (qsd_bin_.empty()) GTEST_SKIP() << "qemu-storage-daemon not installed (Debian qemu-system-common/qemu-utils)";
    char tmpl[] = "/tmp/vkick-agent-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    qsd_ = std::make_unique<Child>(
        std::vector<std::string>{qsd_bin_, "--blockdev",
                                 "driver=null-co,node-name=n0,size=1073741824", "--export",
                                 "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=" + dir_ +
                                     "/vu.sock,num-queues=2,writable=on"},
        dir_ + "/qsd.out", dir_ + "/qsd.err");
    for (int i = 0; i < 100 && access((dir_ + "/vu.sock").c_str(), F_OK) != 0; ++i)
      std::this_thread::sleep_for(milliseconds(20));
    ASSERT_EQ(access((dir_ + "/vu.sock").c_str(), F_OK), 0) << Slurp(dir_ + "/qsd.err");
  }
  void TearDown() override {
    if (HasFailure() && !dir_.empty()) {
      std::cerr << "--- agent stderr ---\n" << Slurp(dir_ + "/agent.err") << "--- blk stderr ---\n"
                << Slurp(dir_ + "/blk.err");
    }
    qsd_.reset();
    if (!dir_.empty() && !HasFailure()) std::system(("rm -rf " + dir_).c_str());
  }
  std::vector<std::string> AgentArgs(std::vector<std::string> extra) {
    // This test is about vkick-blk: the machine's own kernel virtio_blk
    // disks (this host is a VM with one) would add hello devices.
    std::vector<std::string> a = {VKICK_AGENT_BIN, "--run_dir=" + dir_ + "/run", "--control_dir=" + dir_ + "/ctl",
                                  "--agent_id=agent-test", "--observe_kernel_disks=false"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  std::vector<std::string> BlkArgs(std::vector<std::string> extra) {
    std::vector<std::string> a = {VKICK_BLK_BIN, "--socket=" + dir_ + "/vu.sock", "--rw=randread", "--qd=16",
                                  "--json", "--run_dir=" + dir_ + "/run", "--control=" + dir_ + "/ctl/control-blk"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  bool WaitForFile(const std::string& path, milliseconds timeout) {
    const auto end = steady_clock::now() + timeout;
    while (steady_clock::now() < end) {
      if (access(path.c_str(), F_OK) == 0) return true;
      std::this_thread::sleep_for(milliseconds(20));
    }
    return false;
  }
  // Waits until the agent has printed at least one interval line (BPF loaded).
  bool WaitAgentReady(const std::string& out, milliseconds timeout) {
    const auto end = steady_clock::now() + timeout;
    while (steady_clock::now() < end) {
      if (Slurp(out).find("\"interval\"") != std::string::npos) return true;
      std::this_thread::sleep_for(milliseconds(20));
    }
    return false;
  }

  std::string qsd_bin_;
  std::string dir_;
  std::unique_ptr<Child> qsd_;
};

// The agent's counts equal vkick-blk's own, exactly: requests, kicks and
// timer kicks summed over queues. The driver keeps them in its stats block
// from its start, and the agent's last read goes through the fd it kept
// after the driver removed the file. A second agent (the static build when
// there is one: what the VM image ships) reads the same block: never more.
TEST_F(AgentLoopTest, CountsEqualTheDriversOwn) {
  Child exact(AgentArgs({"--json", "--interval=300ms", std::string("--driver_binary=") + VKICK_BLK_BIN}),
              dir_ + "/agent.out", dir_ + "/agent.err");
  std::vector<std::string> perpid_args = AgentArgs({"--json", "--interval=300ms"});
#ifdef VKICK_AGENT_STATIC_BIN
  perpid_args[0] = VKICK_AGENT_STATIC_BIN;
#endif
  Child perpid(perpid_args, dir_ + "/agent2.out", dir_ + "/agent2.err");
  ASSERT_TRUE(WaitAgentReady(dir_ + "/agent.out", milliseconds(10000))) << Slurp(dir_ + "/agent.err");
  ASSERT_TRUE(WaitAgentReady(dir_ + "/agent2.out", milliseconds(10000))) << Slurp(dir_ + "/agent2.err");
  Child blk(BlkArgs({"--queues=2", "--runtime=1.5", "--policy=static:8,50us"}), dir_ + "/blk.out",
            dir_ + "/blk.err");
  ASSERT_EQ(blk.Wait(milliseconds(30000)), 0) << Slurp(dir_ + "/blk.err");
  Json b = Json::parse(Slurp(dir_ + "/blk.out"));
  // Both agents report the driver's exit within a few intervals.
  std::optional<Json> exit1, exit2;
  for (int i = 0; i < 100 && (!exit1 || !exit2); ++i) {
    std::this_thread::sleep_for(milliseconds(50));
    for (const Json& j : JsonLines(dir_ + "/agent.out"))
      if (j["type"] == "driver_exit") exit1 = j;
    for (const Json& j : JsonLines(dir_ + "/agent2.out"))
      if (j["type"] == "driver_exit") exit2 = j;
  }
  ASSERT_TRUE(exit1.has_value()) << Slurp(dir_ + "/agent.err");
  ASSERT_TRUE(exit2.has_value()) << Slurp(dir_ + "/agent2.err");
  EXPECT_EQ((*exit1)["pid"], blk.pid());
  uint64_t req = 0, kicks = 0, timer = 0, done = 0;
  for (const Json& q : (*exit1)["queues"]) {
    req += q["requests"].get<uint64_t>();
    kicks += q["kicks"].get<uint64_t>();
    timer += q["timer_kicks"].get<uint64_t>();
    done += q["completed"].get<uint64_t>();
  }
  EXPECT_GT(req, 1000u);
  EXPECT_EQ(req, b["requests"].get<uint64_t>());
  EXPECT_EQ(kicks, b["kicks"].get<uint64_t>());
  EXPECT_EQ(timer, b["kicks_by_why"]["timer"].get<uint64_t>());
  EXPECT_EQ(done, b["completions"].get<uint64_t>());
  uint64_t req2 = 0;
  for (const Json& q : (*exit2)["queues"]) req2 += q["requests"].get<uint64_t>();
  EXPECT_GT(req2, 0u) << "per-pid attachment from the registry counted nothing";
  EXPECT_LE(req2, req);

  // Every interval's per-queue sample is self-consistent; the per-interval
  // requests add up to the total; depth never exceeds the queue depth.
  uint64_t sum_req = 0;
  for (const Json& j : JsonLines(dir_ + "/agent.out")) {
    if (j["type"] != "interval") continue;
    for (const Json& d : j["drivers"]) {
      for (const Json& q : d["queues"]) {
        uint64_t h = 0;
        for (const Json& v : q["depth_hist"]) h += v.get<uint64_t>();
        EXPECT_EQ(h, q["requests"].get<uint64_t>());
        uint64_t l = 0;
        for (const Json& v : q["latency_hist"]) l += v.get<uint64_t>();
        EXPECT_EQ(l, q["completed"].get<uint64_t>());
        EXPECT_LE(q["max_depth"].get<uint64_t>(), 16u);
        EXPECT_LE(q["mean_depth"].get<double>(), 16.0);
        if (q["requests"].get<uint64_t>() > 0) {
          EXPECT_GE(q["mean_depth"].get<double>(), 1.0);
        }
        sum_req += q["requests"].get<uint64_t>();
      }
    }
  }
  EXPECT_EQ(sum_req, req);
  std::cout << "driver: " << b["requests"] << " requests, " << b["kicks"] << " kicks; agent (binary attach): " << req
            << " requests, " << kicks << " kicks; agent (per pid from registry): " << req2 << " requests\n";
  EXPECT_EQ(exact.Stop(), 0);
  EXPECT_EQ(perpid.Stop(), 0);
}

double KicksPerRequest(const proto::Sample& s) {
  uint64_t r = 0, k = 0;
  for (const auto& q : s.queues) {
    r += q.requests;
    k += q.kicks;
  }
  return r == 0 ? -1 : static_cast<double>(k) / static_cast<double>(r);
}

// The closed loop against a fake vkickd: hello, samples, a policy applied to
// the control block (vkick-blk adaptive switches: kicks/request drops), the
// ack, the lease running out (reported expired, the driver falls back), and
// a reconnect after the host restarts.
TEST_F(AgentLoopTest, PolicyLeaseAndReconnect) {
  FakeHost host(dir_ + "/vkickd.sock");
  Child agent(AgentArgs({"--connect=" + dir_ + "/vkickd.sock", "--json", "--interval=200ms",
                         std::string("--driver_binary=") + VKICK_BLK_BIN}),
              dir_ + "/agent.out", dir_ + "/agent.err");
  // First connection: no driver yet, an empty hello.
  ASSERT_TRUE(host.Accept(milliseconds(10000))) << Slurp(dir_ + "/agent.err");
  auto h0 = host.NextOf<proto::Hello>(milliseconds(5000));
  ASSERT_TRUE(h0.has_value());
  EXPECT_EQ(h0->agent_id, "agent-test");
  EXPECT_TRUE(h0->devices.empty());

  Child blk(BlkArgs({"--queues=1", "--runtime=7", "--policy=adaptive", "--serial=disk0"}), dir_ + "/blk.out",
            dir_ + "/blk.err");
  // The driver registered: the agent re-announces (bye + new hello).
  auto bye = host.NextOf<proto::Bye>(milliseconds(5000));
  ASSERT_TRUE(bye.has_value());
  EXPECT_EQ(bye->reason, proto::ByeReason::kRestart);
  ASSERT_TRUE(host.Accept(milliseconds(5000)));
  auto h1 = host.NextOf<proto::Hello>(milliseconds(5000));
  ASSERT_TRUE(h1.has_value());
  ASSERT_EQ(h1->devices.size(), 1u);
  EXPECT_EQ(h1->devices[0].serial, "disk0");
  EXPECT_EQ(h1->devices[0].num_queues, 1);
  EXPECT_EQ(h1->devices[0].pci_devfn, 0);

  // No policy yet: lease none, the driver runs immediate (a kick per request).
  std::optional<proto::Sample> s;
  for (int i = 0; i < 10; ++i) {
    s = host.NextOf<proto::Sample>(milliseconds(2000));
    ASSERT_TRUE(s.has_value());
    if (!s->queues.empty() && s->queues[0].requests > 100) break;
  }
  ASSERT_EQ(s->queues.size(), 1u);
  EXPECT_EQ(s->queues[0].lease, proto::LeaseState::kNone);
  const double kpr_immediate = KicksPerRequest(*s);
  EXPECT_GT(kpr_immediate, 0.9);

  // Policy: static B=8, T=50us, lease 1.5 s.
  proto::Policy p;
  proto::QueuePolicy qp = proto::testing::StaticQueuePolicy({0, 0}, 8, 50'000, 1'500'000'000, 1);
  p.queues = {qp};
  host.Send(p);
  auto ack = host.NextOf<proto::Ack>(milliseconds(2000));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->generation, 1u);

  // The control block the driver maps now says static(8, 50us) with a lease.
  {
    std::string path = Json::parse(Slurp(dir_ + "/run/drivers/" + std::to_string(blk.pid()) + ".json"))["control_block"];
    int fd = open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0) << path;
    void* m = mmap(nullptr, sizeof(ControlBlock), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    ASSERT_NE(m, MAP_FAILED);
    ControlReadResult r = ReadControlBlock(static_cast<const ControlBlock*>(m), 0, 256);
    munmap(m, sizeof(ControlBlock));
    ASSERT_TRUE(r.snapshot.has_value()) << ControlReadErrorName(r.error);
    EXPECT_EQ(r.snapshot->mode, ControlMode::kStatic);
    EXPECT_EQ(r.snapshot->batch, 8u);
    EXPECT_EQ(r.snapshot->defer_ns, 50'000u);
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const uint64_t now = ts.tv_sec * 1'000'000'000ull + ts.tv_nsec;
    EXPECT_GT(r.snapshot->lease_expiry_ns, now);
    EXPECT_LE(r.snapshot->lease_expiry_ns, now + 1'500'000'000ull);
  }

  // Samples under the lease: active, applied B=8, far fewer kicks.
  std::optional<proto::Sample> active;
  for (int i = 0; i < 6 && !active; ++i) {
    auto x = host.NextOf<proto::Sample>(milliseconds(2000));
    ASSERT_TRUE(x.has_value());
    if (x->queues.size() == 1 && x->queues[0].lease == proto::LeaseState::kActive &&
        x->queues[0].requests > 100 && i >= 1)
      active = x;
  }
  ASSERT_TRUE(active.has_value());
  EXPECT_EQ(active->queues[0].applied_mode, proto::KickMode::kStatic);
  EXPECT_EQ(active->queues[0].applied_batch, 8);
  EXPECT_EQ(active->queues[0].applied_generation, 1u);
  const double kpr_static = KicksPerRequest(*active);
  EXPECT_LT(kpr_static, 0.35) << "immediate " << kpr_immediate;

  // No renewal: the lease runs out, the agent reports expired, the driver
  // falls back to immediate on its own.
  std::optional<proto::Sample> expired;
  for (int i = 0; i < 15 && !expired; ++i) {
    auto x = host.NextOf<proto::Sample>(milliseconds(2000));
    ASSERT_TRUE(x.has_value());
    if (x->queues.size() == 1 && x->queues[0].lease == proto::LeaseState::kExpired) expired = x;
  }
  ASSERT_TRUE(expired.has_value());
  EXPECT_EQ(expired->queues[0].applied_generation, 1u);
  auto after = host.NextOf<proto::Sample>(milliseconds(2000));  // a whole interval after expiry
  ASSERT_TRUE(after.has_value());
  EXPECT_GT(KicksPerRequest(*after), 0.9);
  std::cout << "kicks/request: no policy " << kpr_immediate << ", static B=8 under lease " << kpr_static
            << ", after expiry " << KicksPerRequest(*after) << "\n";

  // vkickd restarts: the agent reconnects by itself and says hello again.
  host.Shutdown();
  std::this_thread::sleep_for(milliseconds(500));
  host.Listen();
  ASSERT_TRUE(host.Accept(milliseconds(6000))) << Slurp(dir_ + "/agent.err");
  auto h2 = host.NextOf<proto::Hello>(milliseconds(3000));
  ASSERT_TRUE(h2.has_value());
  EXPECT_EQ(h2->devices, h1->devices);
  qp.generation = 2;
  p.queues = {qp};
  host.Send(p);
  ack = host.NextOf<proto::Ack>(milliseconds(2000));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->generation, 2u);

  ASSERT_EQ(blk.Wait(milliseconds(30000)), 0) << Slurp(dir_ + "/blk.err");
  Json b = Json::parse(Slurp(dir_ + "/blk.out"));
  EXPECT_EQ(b["requests"], b["completions"]);
  EXPECT_EQ(b["errors"], 0);
  EXPECT_GE(b["adaptive_fallbacks"].get<int>(), 1);
  EXPECT_EQ(agent.Stop(), 0);
  // Three connections: empty hello, re-announce, after the host restart.
  const std::string log = Slurp(dir_ + "/agent.err");
  size_t connects = 0;
  for (size_t at = log.find("channel: connected"); at != std::string::npos; at = log.find("channel: connected", at + 1))
    ++connects;
  EXPECT_EQ(connects, 3u) << log;
}

}  // namespace
}  // namespace vkick
