#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iterator>
#include <set>
#include <thread>

#include "tests/unit/temp_dir.h"
#include "controller/channel/agent_server.h"
#include "controller/channel/agent_session.h"
#include "gtest/gtest.h"
#include "protocol/codec.h"

namespace vkick {
namespace {

constexpr int64_t kMs = 1'000'000;

std::vector<ChannelDevice> Devices() {
  ChannelDevice a;
  a.known.serial = "blk0";
  a.known.num_queues = 2;
  a.vm = "vhost-user";
  a.device = "blk0";
  ChannelDevice b = a;
  b.known.serial = "blk1";
  b.known.num_queues = 1;
  b.device = "blk1";
  return {a, b};
}

proto::Hello MakeHello() {
  proto::Hello h;
  h.agent_id = "agent-1";
  proto::GuestDevice d;
  d.serial = "blk0";
  d.num_queues = 4;  // more than the host declared: extra queues unmapped
  proto::GuestDevice x;
  x.serial = "evil";  // matches nothing: ignored, never a label
  x.pci_devfn = 1;    // host-process devices: distinct fake PCI coordinates
  x.num_queues = 2;
  h.devices = {d, x};
  return h;
}

proto::QueueSample Qs(uint16_t dev, uint16_t q) {
  proto::QueueSample s;
  s.ref = {dev, q};
  s.interval_ns = 1'000'000'000;
  s.requests = 10;
  s.kicks = 10;
  s.completed = 10;
  s.depth_hist[0] = 10;
  s.latency_hist[5] = 10;
  s.mean_depth_milli = 1000;
  s.max_depth = 1;
  return s;
}

std::vector<uint8_t> Enc(const proto::Message& m) {
  auto r = proto::Encode(m);
  EXPECT_EQ(r.error, proto::Rejection::kNone);
  return r.bytes;
}

// Two samples before the loop takes them are added up, not replaced: the
// host's notification count between two steps covers both.
TEST(AgentSessionTest, SamplesNotYetTakenAreMerged) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(MakeHello()), kMs));
  proto::QueueSample a = Qs(0, 1), b = Qs(0, 1);
  b.requests = 30;
  b.kicks = 3;
  b.completed = 30;
  b.depth_hist[0] = 0;
  b.depth_hist[2] = 30;
  b.latency_hist[5] = 30;
  b.mean_depth_milli = 5000;
  b.max_depth = 8;
  b.applied_mode = proto::KickMode::kStatic;
  b.applied_batch = 8;
  b.applied_defer_ns = 50'000;
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{1, {a}}), 2 * kMs));
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{2, {b}}), 1002 * kMs));
  auto samples = s.TakeSamples();
  ASSERT_EQ(samples.size(), 1u);
  const proto::QueueSample& m = samples.begin()->second;
  EXPECT_EQ(m.interval_ns, 2'000'000'000u);
  EXPECT_EQ(m.requests, 40u);
  EXPECT_EQ(m.kicks, 13u);
  EXPECT_EQ(m.completed, 40u);
  EXPECT_EQ(m.depth_hist[0], 10u);
  EXPECT_EQ(m.depth_hist[2], 30u);
  EXPECT_EQ(m.latency_hist[5], 40u);
  EXPECT_EQ(m.mean_depth_milli, (1000u * 10 + 5000u * 30) / 40);
  EXPECT_EQ(m.max_depth, 8);
  EXPECT_EQ(m.applied_mode, proto::KickMode::kStatic);
  EXPECT_EQ(m.applied_batch, 8);
  EXPECT_TRUE(s.TakeSamples().empty());
}

// The host total is stamped when a sample arrives; a sample merged later is
// re-stamped (its window ends at its latest part); stamps go with the
// samples they belong to.
TEST(AgentSessionTest, HostTotalsStampedOnArrivalFollowTheirSamples) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(MakeHello()), kMs));
  EXPECT_FALSE(s.has_unstamped());
  const QueueKey k0{"vhost-user", "blk0", 0}, k1{"vhost-user", "blk0", 1};
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{1, {Qs(0, 0), Qs(0, 1)}}), 2 * kMs));
  ASSERT_TRUE(s.has_unstamped());
  s.StampHost({{k0, 100}});  // queue 1 not host-counted: no stamp
  EXPECT_FALSE(s.has_unstamped());
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{2, {Qs(0, 0)}}), 1002 * kMs));
  s.StampHost({{k0, 250}, {k1, 7}});  // queue 0 merged: re-stamped; queue 1 had no new part
  auto samples = s.TakeSamples();
  auto stamps = s.TakeHostStamps();
  EXPECT_EQ(samples.size(), 2u);
  EXPECT_EQ(stamps, (std::map<QueueKey, uint64_t>{{k0, 250}}));
  EXPECT_TRUE(s.TakeHostStamps().empty());  // consumed
  // A sample taken before it was stamped carries no stamp, even if stamped later.
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{3, {Qs(0, 0)}}), 2002 * kMs));
  EXPECT_EQ(s.TakeSamples().size(), 1u);
  s.StampHost({{k0, 400}});
  EXPECT_TRUE(s.TakeHostStamps().empty());
  EXPECT_TRUE(s.TakeSamples().empty());
  EXPECT_TRUE(s.TakeHostStamps().empty());
}

// A disk the guest kernel's own virtio_blk drives (hello driver = kernel)
// is observed: its samples are taken, a policy for it is never encoded.
// blk0 (2 queues), the device nothing maps, then blk1 driven by `driver`.
proto::Hello HelloWithDisk(proto::DriverKind driver) {
  proto::Hello h = MakeHello();
  h.devices[0].num_queues = 2;
  proto::GuestDevice k;
  k.serial = "blk1";
  k.pci_devfn = 2;
  k.num_queues = 1;
  k.driver = driver;
  h.devices.push_back(k);
  return h;
}

PolicyOut StaticPolicy(const QueueKey& key) {
  PolicyOut p;
  p.key = key;
  p.mode = proto::KickMode::kStatic;
  p.batch = 8;
  p.defer_ns = 50'000;
  p.lease_ns = 1'000'000'000;
  p.generation = 3;
  return p;
}

TEST(AgentSessionTest, KernelDriverDevicesAreObservedOnlyAndNeverSentAPolicy) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(HelloWithDisk(proto::DriverKind::kKernel)), kMs));
  const QueueKey kq{"vhost-user", "blk1", 0}, vq{"vhost-user", "blk0", 0};
  EXPECT_EQ(s.ObservedOnly(), (std::set<QueueKey>{kq}));
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{1, {Qs(2, 0)}}), 2 * kMs));
  EXPECT_TRUE(s.TakeSamples().count(kq));
  EXPECT_TRUE(s.EncodePolicies({StaticPolicy(kq)}).empty());
  EXPECT_FALSE(s.EncodePolicies({StaticPolicy(vq)}).empty());
}

// A disk of the vkick_virtio_blk module is steered like vkick-blk: never
// observe-only, its policies are encoded, and its driver is known.
TEST(AgentSessionTest, VkickVirtioBlkDevicesAreSentPolicies) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(HelloWithDisk(proto::DriverKind::kVkickVirtioBlk)), kMs));
  const QueueKey kq{"vhost-user", "blk1", 0}, vq{"vhost-user", "blk0", 0};
  EXPECT_TRUE(s.ObservedOnly().empty());
  EXPECT_EQ(s.Drivers().at(kq), proto::DriverKind::kVkickVirtioBlk);
  EXPECT_EQ(s.Drivers().at(vq), proto::DriverKind::kVkickBlk);
  EXPECT_FALSE(s.EncodePolicies({StaticPolicy(kq)}).empty());
  // A bye ends the announcement: nothing is known about the queues' drivers.
  ASSERT_TRUE(s.Feed(Enc(proto::Bye{}), 2 * kMs));
  EXPECT_TRUE(s.Drivers().empty());
}

// Over virtio-serial the agent re-announces on the same stream: bye, then a
// hello whose device list differs. The queues of the old announcement are
// no longer reported on, and the new one maps afresh.
TEST(AgentSessionTest, ByeThenHelloOnTheSameStreamRemaps) {
  AgentSession s({}, Devices(), 0);
  proto::Hello h = MakeHello();
  h.devices.resize(1);  // blk0 (2 host queues)
  ASSERT_TRUE(s.Feed(Enc(h), kMs));
  EXPECT_EQ(s.Queues().size(), 2u);
  EXPECT_EQ(s.announcements(), 1u);
  proto::GuestDevice k;
  k.serial = "blk1";
  k.pci_devfn = 2;
  k.num_queues = 1;
  k.driver = proto::DriverKind::kKernel;
  std::vector<uint8_t> bytes = Enc(proto::Bye{});
  std::vector<uint8_t> hello2 = Enc(proto::Hello{.agent_id = "agent-1", .kernel = "", .devices = {k}});
  bytes.insert(bytes.end(), hello2.begin(), hello2.end());  // one read() may carry both
  ASSERT_TRUE(s.Feed(bytes, 2 * kMs));
  EXPECT_EQ(s.announcements(), 2u);
  const QueueKey kq{"vhost-user", "blk1", 0};
  EXPECT_EQ(s.Queues(), (std::vector<QueueKey>{kq}));
  EXPECT_EQ(s.ObservedOnly(), (std::set<QueueKey>{kq}));
  // (0, 0) is now the kernel disk: its sample lands on blk1, not blk0.
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{1, {Qs(0, 0)}}), 3 * kMs));
  auto samples = s.TakeSamples();
  EXPECT_EQ(samples.size(), 1u);
  EXPECT_TRUE(samples.count(kq));
}

TEST(AgentSessionTest, MapsOnlyDeclaredQueuesByHostLabels) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(MakeHello()), kMs));
  ASSERT_TRUE(s.hello_seen());
  auto qs = s.Queues();
  ASSERT_EQ(qs.size(), 2u);  // blk0 queues 0,1 only
  EXPECT_EQ(qs[0], (QueueKey{"vhost-user", "blk0", 0}));
  EXPECT_EQ(qs[1], (QueueKey{"vhost-user", "blk0", 1}));

  proto::Sample smp{1, {Qs(0, 1), Qs(0, 3), Qs(1, 0)}};
  ASSERT_TRUE(s.Feed(Enc(smp), 2 * kMs));
  auto samples = s.TakeSamples();
  ASSERT_EQ(samples.size(), 1u);
  EXPECT_TRUE(samples.count(QueueKey{"vhost-user", "blk0", 1}));
  EXPECT_EQ(s.unmapped_samples(), 2u);
  EXPECT_TRUE(s.TakeSamples().empty());  // consumed

  ASSERT_TRUE(s.Feed(Enc(proto::Ack{7}), 3 * kMs));
  EXPECT_EQ(s.TakeAcks(), std::vector<uint64_t>{7});

  PolicyOut p{QueueKey{"vhost-user", "blk0", 1}, proto::KickMode::kStatic, 8, 20'000,
              5'000'000'000, 9};
  PolicyOut other{QueueKey{"vhost-user", "blk1", 0}, proto::KickMode::kImmediate, 1, 0,
                  5'000'000'000, 9};
  auto frame = s.EncodePolicies({p, other});
  ASSERT_FALSE(frame.empty());
  proto::StreamDecoder dec;
  int n = 0;
  dec.Feed(frame, [&](proto::DecodeResult&& r) {
    ASSERT_TRUE(r.message);
    auto& pol = std::get<proto::Policy>(*r.message);
    ASSERT_EQ(pol.queues.size(), 1u);  // blk1 is not this agent's
    EXPECT_EQ(pol.queues[0].ref, (proto::QueueRef{0, 1}));
    EXPECT_EQ(pol.queues[0].batch, 8);
    ++n;
  });
  EXPECT_EQ(n, 1);
  EXPECT_TRUE(s.EncodePolicies({other}).empty());
}

TEST(AgentSessionTest, HostileInputCountedAndDropped) {
  AgentSession s({}, Devices(), 0);
  // Sample before hello: unexpected_type, counted, not fatal.
  ASSERT_TRUE(s.Feed(Enc(proto::Sample{1, {}}), kMs));
  auto r = s.TakeRejections();
  EXPECT_EQ(r[static_cast<size_t>(proto::Rejection::kUnexpectedType)], 1u);
  // Garbage: bad magic is fatal.
  std::vector<uint8_t> junk(64, 0x41);
  EXPECT_FALSE(s.Feed(junk, 2 * kMs));
  r = s.TakeRejections();
  EXPECT_EQ(r[static_cast<size_t>(proto::Rejection::kBadMagic)], 1u);
  EXPECT_FALSE(s.Feed(Enc(MakeHello()), 3 * kMs));  // stays dropped
}

TEST(AgentSessionTest, FloodIsRateLimitedThenDropped) {
  AgentSession s({}, Devices(), 0);
  ASSERT_TRUE(s.Feed(Enc(MakeHello()), kMs));
  bool alive = true;
  for (uint64_t i = 1; i <= 200 && alive; ++i)
    alive = s.Feed(Enc(proto::Sample{i, {Qs(0, 0)}}), kMs);
  EXPECT_FALSE(alive);
  auto r = s.TakeRejections();
  EXPECT_GT(r[static_cast<size_t>(proto::Rejection::kRateLimited)], 0u);
}

struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-channel") {}
};

int Connect(const std::string& path) {
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

template <typename F>
bool WaitFor(F f, int ms = 3000) {
  for (int i = 0; i < ms / 10; ++i) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return f();
}

// A host listener on a fresh temp dir for the "vhost-user" VM's Devices(),
// counting hellos. A test may change `o` before it calls Start().
class AgentServerHostTest : public ::testing::Test {
 protected:
  AgentServerHostTest() {
    o.socket_path = dir.path() + "/agent.sock";
    o.vm = "vhost-user";
    o.devices = Devices();
    o.on_hello = [this] { ++hellos; };
  }

  absl::Status Start() {
    srv = AgentServer::Start(o);
    return srv.status();
  }

  TempDir dir;
  AgentServerOptions o;
  std::atomic<int> hellos{0};
  absl::StatusOr<std::unique_ptr<AgentServer>> srv;
};

TEST_F(AgentServerHostTest, SocketRoundTripAndHostileClient) {
  ASSERT_TRUE(Start().ok()) << srv.status();
  struct stat st;
  ASSERT_EQ(stat(o.socket_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);

  int fd = Connect(o.socket_path);
  ASSERT_GE(fd, 0);
  auto h = Enc(MakeHello());
  ASSERT_EQ(write(fd, h.data(), h.size()), static_cast<ssize_t>(h.size()));
  ASSERT_TRUE(WaitFor([&] { return hellos == 1; }));
  auto smp = Enc(proto::Sample{1, {Qs(0, 0)}});
  ASSERT_EQ(write(fd, smp.data(), smp.size()), static_cast<ssize_t>(smp.size()));
  AgentServer::Collected c;
  ASSERT_TRUE(WaitFor([&] {
    auto got = (*srv)->Collect();
    if (got.samples.empty()) return false;
    c = got;
    return true;
  }));
  EXPECT_TRUE(c.samples.count(QueueKey{"vhost-user", "blk0", 0}));
  EXPECT_EQ(c.connected_queues.size(), 2u);
  EXPECT_EQ((*srv)->Stats().connected, 1u);

  (*srv)->Send({PolicyOut{QueueKey{"vhost-user", "blk0", 0}, proto::KickMode::kStatic, 4,
                          10'000, 5'000'000'000, 3}});
  uint8_t buf[256];
  ssize_t n = read(fd, buf, sizeof buf);
  ASSERT_GT(n, 0);
  proto::StreamDecoder dec;
  bool got_policy = false;
  dec.Feed(std::span<const uint8_t>(buf, n), [&](proto::DecodeResult&& r) {
    got_policy = r.message && std::holds_alternative<proto::Policy>(*r.message);
  });
  EXPECT_TRUE(got_policy);

  // A hostile second client: garbage -> bad_magic, dropped; the first stays.
  int bad = Connect(o.socket_path);
  ASSERT_GE(bad, 0);
  std::vector<uint8_t> junk(100, 0xff);
  ASSERT_EQ(write(bad, junk.data(), junk.size()), 100);
  EXPECT_EQ(read(bad, buf, sizeof buf), 0);  // closed by vkickd
  close(bad);
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Stats().dropped_total == 1; }));
  auto stats = (*srv)->Stats();
  EXPECT_EQ(stats.rejected[static_cast<size_t>(proto::Rejection::kBadMagic)], 1u);
  EXPECT_EQ(stats.connected, 1u);
  close(fd);
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Stats().connected == 0; }));
  (*srv)->Stop();
  EXPECT_NE(stat(o.socket_path.c_str(), &st), 0);  // removed
}

TEST(AgentServerTest, RefusesALiveSocketAndReplacesAStaleOne) {
  TempDir dir;
  AgentServerOptions o;
  o.socket_path = dir.path() + "/agent.sock";
  auto a = AgentServer::Start(o);
  ASSERT_TRUE(a.ok());
  auto b = AgentServer::Start(o);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kAlreadyExists);
  // Simulate a crash: a socket file nobody listens on.
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  (*a)->Stop();
  sockaddr_un s{};
  s.sun_family = AF_UNIX;
  strncpy(s.sun_path, o.socket_path.c_str(), sizeof s.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&s), sizeof s), 0);
  close(fd);
  auto c = AgentServer::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
}

TEST(AgentServerTest, OutgoingConnectionsPerVmWithoutListener) {
  AgentServerOptions o;  // no socket_path: VM channels only
  auto srv = AgentServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ChannelDevice d;
  d.known.pci_address = "0000:00:04.0";
  d.known.num_queues = 2;
  d.vm = "web";
  d.device = "disk0";
  ASSERT_TRUE((*srv)->AddConnection(sv[0], "web", {d}, "virtio-serial /x").ok());
  EXPECT_TRUE((*srv)->LiveTags().count("virtio-serial /x"));
  proto::Hello h;
  h.agent_id = "guest";
  proto::GuestDevice g;
  g.pci_bus = 0;
  g.pci_devfn = 4 << 3;  // 0000:00:04.0: bound by PCI address
  g.num_queues = 2;
  h.devices = {g};
  auto bytes = Enc(h);
  ASSERT_EQ(write(sv[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Collect().connected_queues.size() == 2; }));
  auto all = (*srv)->AllStats();
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].vm, "web");
  EXPECT_EQ(all[0].connected, 1u);
  std::vector<uint8_t> junk(16, 0);
  ASSERT_EQ(write(sv[1], junk.data(), junk.size()), 16);
  ASSERT_TRUE(WaitFor([&] { return !(*srv)->LiveTags().count("virtio-serial /x"); }));
  EXPECT_EQ((*srv)->AllStats()[0].rejected[static_cast<size_t>(proto::Rejection::kBadMagic)], 1u);
  close(sv[1]);
}


// True once vkickd closed its end of `fd` (EOF readable), without blocking.
bool ClosedByServer(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  char c;
  return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

// Another process on this host (its own SO_PEERCRED pid; with `uid` != 0 a
// member of the socket's group: root's gid is kept): connects `n` times to
// `path`, writes `bytes` on each connection, reports how many connected, then
// holds them until killed. Everything is prepared before fork(): the child
// only makes system calls (the parent has threads).
class Peer {
 public:
  Peer(const std::string& path, int n, std::vector<uint8_t> bytes, uid_t uid = 0) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    int p[2];
    if (pipe(p) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(p[0]);
      if (uid != 0 && setresuid(uid, uid, uid) != 0) _exit(1);
      uint8_t ok = 0;
      for (int i = 0; i < n; ++i) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) continue;
        ++ok;  // vkickd may refuse it at once: the send's result says nothing
        (void)!send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      }
      if (write(p[1], &ok, 1) != 1) _exit(1);
      for (;;) pause();
    }
    close(p[1]);
    uint8_t ok = 0;
    if (pid_ > 0 && read(p[0], &ok, 1) == 1) connected_ = ok;
    close(p[0]);
  }
  ~Peer() { Kill(); }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  int connected() const { return connected_; }

 private:
  pid_t pid_ = -1;
  int connected_ = 0;
};

std::vector<uint8_t> Cat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Issue 12, item 1: nine idle connections of another user (one byte each,
// never a hello) held every slot; a real agent got no policy. One user's
// connections that have not said hello are capped, so the agent's gets in
// at once (well before any deadline).
TEST_F(AgentServerHostTest, IdleConnectionsOfAnotherUserLeaveARealAgentItsSlot) {
  ASSERT_EQ(chmod(dir.path().c_str(), 0750), 0);  // the socket's group reaches it
  ASSERT_TRUE(Start().ok()) << srv.status();
  Peer idle(o.socket_path, 9, {'V'}, /*uid=*/65534);
  ASSERT_EQ(idle.connected(), 9);
  const size_t peer_limit = static_cast<size_t>(AgentRefusal::kPeerLimit);
  ASSERT_TRUE(WaitFor([&] {
    return (*srv)->Stats().connections_total + (*srv)->Refused()[peer_limit] == 9;
  }));
  EXPECT_EQ((*srv)->Refused()[peer_limit], 5u);  // 4 pending per uid
  int fd = Connect(o.socket_path);
  ASSERT_GE(fd, 0);
  auto h = Enc(MakeHello());
  ASSERT_EQ(write(fd, h.data(), h.size()), static_cast<ssize_t>(h.size()));
  EXPECT_TRUE(WaitFor([&] { return hellos == 1; }, 1000));
  EXPECT_FALSE(ClosedByServer(fd));
  close(fd);
}

// Issue 12, item 1: the same user's idle connections are closed at the
// hello deadline (2 s by default), so they hold nothing for long.
TEST_F(AgentServerHostTest, ConnectionsWithoutAHelloAreClosedAtTheDeadline) {
  ASSERT_TRUE(Start().ok()) << srv.status();
  std::vector<int> idle;
  for (int i = 0; i < 9; ++i) {
    int fd = Connect(o.socket_path);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, "V", 1), 1);
    idle.push_back(fd);
  }
  EXPECT_TRUE(WaitFor([&] {
    for (int fd : idle)
      if (!ClosedByServer(fd)) return false;
    return true;
  }, 4000));
  int fd = Connect(o.socket_path);
  ASSERT_GE(fd, 0);
  auto h = Enc(MakeHello());
  ASSERT_EQ(write(fd, h.data(), h.size()), static_cast<ssize_t>(h.size()));
  EXPECT_TRUE(WaitFor([&] { return hellos == 1; }, 1000));
  auto refused = (*srv)->Refused();
  EXPECT_EQ(refused[static_cast<size_t>(AgentRefusal::kPeerLimit)], 5u);
  EXPECT_EQ(refused[static_cast<size_t>(AgentRefusal::kHelloTimeout)], 4u);
  EXPECT_EQ(refused[static_cast<size_t>(AgentRefusal::kHostLimit)], 0u);
  for (int i : idle) close(i);
  close(fd);
}

proto::Hello VmHello() {
  proto::Hello h;
  h.agent_id = "guest";
  proto::GuestDevice g;
  g.pci_devfn = 4 << 3;  // 0000:00:04.0
  g.num_queues = 2;
  h.devices = {g};
  return h;
}

ChannelDevice VmDisk(const std::string& vm) {
  ChannelDevice d;
  d.known.pci_address = "0000:00:04.0";
  d.known.num_queues = 2;
  d.vm = vm;
  d.device = "disk0";
  return d;
}

// Issue 12, item 1: VM channels (connections vkickd opens to a VM's
// chardev) shared the host listener's cap: a full listener refused them.
TEST_F(AgentServerHostTest, AFullHostListenerDoesNotRefuseVmChannels) {
  o.max_connections = 2;
  o.max_vm_channels = 1;
  ASSERT_TRUE(Start().ok()) << srv.status();
  int a = Connect(o.socket_path), b = Connect(o.socket_path);
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Stats().connections_total == 2; }));
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ASSERT_TRUE((*srv)->AddConnection(sv[0], "web", {VmDisk("web")}, "virtio-serial /web").ok());
  auto bytes = Enc(VmHello());
  ASSERT_EQ(send(sv[1], bytes.data(), bytes.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(bytes.size()));
  EXPECT_TRUE(WaitFor([&] { return (*srv)->Collect().connected_queues.size() == 2; }, 1000));
  // VM channels have their own cap (one per VM): a channel over it is refused.
  int sv2[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv2), 0);
  absl::Status s = (*srv)->AddConnection(sv2[0], "db", {VmDisk("db")}, "virtio-serial /db");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(ClosedByServer(sv2[1]));
  EXPECT_EQ((*srv)->Refused()[static_cast<size_t>(AgentRefusal::kVmChannelLimit)], 1u);
  close(sv2[1]);
  close(sv[1]);
  close(a);
  close(b);
}

// Issue 12, item 3: a second process announcing a registered device's
// serial took over its samples. The first process that registered a device
// owns it while connected; another's announcement of it is rejected (its
// samples never reach the loop) and, once the owner is gone, a new process
// may register it.
TEST_F(AgentServerHostTest, ASecondProcessCannotTakeOverARegisteredDevice) {
  ASSERT_TRUE(Start().ok()) << srv.status();
  int owner = Connect(o.socket_path);
  ASSERT_GE(owner, 0);
  auto h = Enc(MakeHello());
  ASSERT_EQ(write(owner, h.data(), h.size()), static_cast<ssize_t>(h.size()));
  ASSERT_TRUE(WaitFor([&] { return hellos == 1; }));

  proto::QueueSample forged = Qs(0, 0);
  forged.requests = forged.completed = forged.depth_hist[0] = forged.latency_hist[5] = 999;
  forged.kicks = 999;
  Peer thief(o.socket_path, 1, Cat(Enc(MakeHello()), Enc(proto::Sample{1, {forged}})));
  ASSERT_EQ(thief.connected(), 1);
  ASSERT_TRUE(WaitFor([&] { return hellos == 2; }));
  auto smp = Enc(proto::Sample{1, {Qs(0, 0)}});
  ASSERT_EQ(write(owner, smp.data(), smp.size()), static_cast<ssize_t>(smp.size()));
  const QueueKey q0{"vhost-user", "blk0", 0};
  std::vector<uint64_t> seen;  // requests of every blk0/0 sample taken
  ASSERT_TRUE(WaitFor([&] {
    auto c = (*srv)->Collect();
    if (auto it = c.samples.find(q0); it != c.samples.end()) seen.push_back(it->second.requests);
    return !seen.empty() && seen.back() == 10;
  }));
  for (uint64_t r : seen) EXPECT_NE(r, 999u) << "the second process's sample was taken";
  EXPECT_EQ((*srv)->Stats().rejected[static_cast<size_t>(proto::Rejection::kDeviceOwned)], 1u);

  // The owner leaves: the device is free for the next process.
  close(owner);
  thief.Kill();
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Stats().connected == 0; }));
  proto::QueueSample next = forged;
  next.requests = next.completed = next.depth_hist[0] = next.latency_hist[5] = next.kicks = 777;
  Peer successor(o.socket_path, 1, Cat(Enc(MakeHello()), Enc(proto::Sample{1, {next}})));
  EXPECT_TRUE(WaitFor([&] {
    auto c = (*srv)->Collect();
    auto it = c.samples.find(q0);
    return it != c.samples.end() && it->second.requests == 777;
  }));
}

// Issue 12, item 3 (a check): a VM channel is matched only against its own
// VM's devices, so it cannot announce another VM's or a --vhost-user device.
TEST(AgentServerTest, AVmChannelMapsOnlyItsOwnVmsDevices) {
  AgentServerOptions o;
  auto srv = AgentServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ASSERT_TRUE((*srv)->AddConnection(sv[0], "web", {VmDisk("web")}, "virtio-serial /web").ok());
  proto::Hello h = MakeHello();  // serials blk0 and evil, no PCI match
  h.devices[0].pci_devfn = 5 << 3;  // another VM's disk at 0000:00:05.0
  auto bytes = Cat(Enc(h), Enc(proto::Sample{1, {Qs(0, 0)}}));
  ASSERT_EQ(write(sv[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ASSERT_TRUE(WaitFor([&] { return (*srv)->AllStats().at(0).connected == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto c = (*srv)->Collect();
  EXPECT_TRUE(c.connected_queues.empty());
  EXPECT_TRUE(c.samples.empty());
  close(sv[1]);
}

size_t ThreadsOfThisProcess() {
  namespace fs = std::filesystem;
  return static_cast<size_t>(
      std::distance(fs::directory_iterator("/proc/self/task"), fs::directory_iterator{}));
}

// At 1000 VMs a reader thread per connection cost 1000 threads and 200 ms
// polls: every connection is served by the server's one thread, each still
// its own session, and Stop() closes them all at once.
TEST(AgentServerTest, ManyVmChannelsShareOneThread) {
  const size_t before = ThreadsOfThisProcess();
  AgentServerOptions o;
  auto srv = AgentServer::Start(o);
  ASSERT_TRUE(srv.ok()) << srv.status();
  std::vector<int> peers;
  for (int i = 0; i < 20; ++i) {
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    const std::string vm = "vm" + std::to_string(i);
    ASSERT_TRUE((*srv)->AddConnection(sv[0], vm, {VmDisk(vm)}, "virtio-serial /" + vm).ok());
    auto bytes = Enc(VmHello());
    ASSERT_EQ(write(sv[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    peers.push_back(sv[1]);
  }
  ASSERT_TRUE(WaitFor([&] { return (*srv)->Collect().connected_queues.size() == 40; }));
  EXPECT_EQ(ThreadsOfThisProcess(), before + 1);
  EXPECT_EQ((*srv)->LiveTags().size(), 20u);
  (*srv)->Stop();
  for (int fd : peers) {
    EXPECT_TRUE(ClosedByServer(fd));
    close(fd);
  }
}

// Issue 12, item 4: only queues that exist can be announced. A VM disk's
// queue count is known from discovery: a hello claiming more maps only the
// real ones, and the excess is counted as unknown_queue.
TEST(AgentSessionTest, QueuesBeyondTheKnownCountAreRefusedAndCounted) {
  AgentSession s({}, {VmDisk("web")}, 0);
  proto::Hello h = VmHello();
  h.devices[0].num_queues = 64;
  ASSERT_TRUE(s.Feed(Enc(h), kMs));
  EXPECT_EQ(s.Queues().size(), 2u);
  EXPECT_EQ(s.TakeRejections()[static_cast<size_t>(proto::Rejection::kUnknownQueue)], 1u);
}

}  // namespace
}  // namespace vkick
