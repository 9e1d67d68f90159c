// The agent loop without root: a fake CounterSource, a registry in a temp dir
// naming this test process as the driver, and the test as vkickd on a unix
// socket (protocol/ codec). Covers hello, samples from counter deltas, policy
// -> control block + ack, unknown queues -> error, wrong-direction frames
// ignored, bye from the host -> reconnect, clean stop -> bye(shutdown).
#include "agent/agent.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/unit/agent/vkick_stats_text.h"
#include "tests/unit/protocol/test_messages.h"
#include "protocol/codec.h"

namespace vkick::agent {
namespace {

using std::chrono::milliseconds;

class FakeCounters : public CounterSource {
 public:
  absl::Status Track(const TrackedDriver& d) override {
    std::lock_guard<std::mutex> l(mu_);
    tracked_.push_back(d.pid);
    return absl::OkStatus();
  }
  void Untrack(int32_t) override {}
  absl::StatusOr<CounterSnapshot> Read() override {
    std::lock_guard<std::mutex> l(mu_);
    return snap_;
  }
  // Adds n submits at depth d and n kicks to (pid, q).
  void Add(int32_t pid, uint16_t q, uint64_t n, uint32_t d) {
    std::lock_guard<std::mutex> l(mu_);
    QueueTotals& t = snap_.queues[{pid, q}];
    t.requests += n;
    t.kicks += n;
    t.kicks_by_why[0] += n;
    t.depth_sum += n * d;
    t.depth_hist[proto::DepthBucket(d)] += n;
    t.interval_max_depth = d;
  }
  std::vector<int32_t> tracked() {
    std::lock_guard<std::mutex> l(mu_);
    return tracked_;
  }

 private:
  std::mutex mu_;
  CounterSnapshot snap_;
  std::vector<int32_t> tracked_;
};

// Kernel virtio_blk disks' counters, set by the test.
class FakeDisks : public DiskCounterSource {
 public:
  absl::Status Watch(uint32_t kdev) override {
    std::lock_guard<std::mutex> l(mu_);
    watched_.insert(kdev);
    return absl::OkStatus();
  }
  void Unwatch(uint32_t kdev) override {
    std::lock_guard<std::mutex> l(mu_);
    watched_.erase(kdev);
    snap_.disks.erase(kdev);
    unwatched_.push_back(kdev);
  }
  absl::StatusOr<DiskSnapshot> Read() override {
    std::lock_guard<std::mutex> l(mu_);
    return snap_;
  }
  // n requests issued at depth d and completed after lat_ns each.
  void Add(uint32_t kdev, uint64_t n, uint32_t d, uint64_t lat_ns) {
    std::lock_guard<std::mutex> l(mu_);
    QueueTotals& t = snap_.disks[kdev];
    t.requests += n;
    t.depth_sum += n * d;
    t.depth_hist[proto::DepthBucket(d)] += n;
    t.interval_max_depth = d;
    t.completions += n;
    t.latency_sum_ns += n * lat_ns;
    t.latency_hist[proto::LatencyBucket(lat_ns)] += n;
  }
  std::set<uint32_t> watched() {
    std::lock_guard<std::mutex> l(mu_);
    return watched_;
  }
  std::vector<uint32_t> unwatched() {
    std::lock_guard<std::mutex> l(mu_);
    return unwatched_;
  }

 private:
  std::mutex mu_;
  DiskSnapshot snap_;
  std::set<uint32_t> watched_;
  std::vector<uint32_t> unwatched_;
};

uint64_t Now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1'000'000'000ull + ts.tv_nsec;
}

class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-agent-unit-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_EQ(system(("mkdir -p " + dir_ + "/run/drivers " + dir_ + "/ctl").c_str()), 0);
    pid_ = getpid();
    std::ofstream(absl::StrCat(dir_, "/run/drivers/", pid_, ".json"))
        << absl::StrCat(R"({"pid":)", pid_,
                        R"(,"transport":"pci","socket":"","pci":"0000:00:05.0","serial":"d0","queues":2,)",
                        R"("queue_size":128,"control_block":")", dir_, R"(/ctl/control-test"})");
    // Listen.
    lfd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path, sizeof(a.sun_path), "%s/host.sock", dir_.c_str());
    ASSERT_EQ(bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ASSERT_EQ(listen(lfd_, 4), 0);

    AgentOptions o;
    o.connect_path = dir_ + "/host.sock";
    o.interval_ns = 50'000'000;
    o.run_dir = dir_ + "/run";
    o.control_dir = dir_ + "/ctl";
    o.agent_id = "unit";
    o.kernel = "6.18";
    o.json = true;
    o.registry_poll_ns = 20'000'000;
    o.reconnect_min_ns = 20'000'000;
    o.sysfs_root = dir_ + "/sys";
    opts_ = o;
    agent_ = std::make_unique<Agent>(o, &counters_, Now, &out_);
  }
  void Start() {
    thread_ = std::thread([this] { rc_ = agent_->Run(&stop_, nullptr); });
  }
  void TearDown() override {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) close(fd_);
    if (lfd_ >= 0) close(lfd_);
    system(("rm -rf " + dir_).c_str());
  }
  bool Accept() {
    if (fd_ >= 0) close(fd_);
    pollfd p{lfd_, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) return false;
    fd_ = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
    dec_ = proto::StreamDecoder();
    pending_.clear();
    return fd_ >= 0;
  }
  template <typename T>
  std::optional<T> NextOf(int timeout_ms = 3000) {
    const uint64_t end = Now() + uint64_t(timeout_ms) * 1'000'000;
    while (Now() < end) {
      while (!pending_.empty()) {
        proto::Message m = std::move(pending_.front());
        pending_.erase(pending_.begin());
        if (auto* t = std::get_if<T>(&m)) return *t;
        skipped_.push_back(std::move(m));
      }
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) != 1) continue;
      uint8_t buf[65536];
      ssize_t n = read(fd_, buf, sizeof(buf));
      if (n <= 0) return std::nullopt;
      dec_.Feed(std::span<const uint8_t>(buf, size_t(n)), [&](proto::DecodeResult&& r) {
        EXPECT_EQ(r.error, proto::Rejection::kNone);
        if (r.message) pending_.push_back(std::move(*r.message));
      });
    }
    return std::nullopt;
  }
  void Send(const proto::Message& m) {
    auto r = proto::Encode(m);
    ASSERT_EQ(r.error, proto::Rejection::kNone);
    ASSERT_EQ(write(fd_, r.bytes.data(), r.bytes.size()), ssize_t(r.bytes.size()));
  }

  // Waits (at most `tries` samples) for a sample whose queue `ref`
  // satisfies `want`: that queue, the whole sample in *whole.
  std::optional<proto::QueueSample> QueueWhere(proto::QueueRef ref, bool (*want)(const proto::QueueSample&),
                                               std::optional<proto::Sample>* whole, int tries = 10) {
    for (int i = 0; i < tries; ++i) {
      *whole = NextOf<proto::Sample>();
      if (!whole->has_value()) return std::nullopt;
      for (const proto::QueueSample& x : (*whole)->queues)
        if (x.ref == ref && want(x)) return x;
    }
    return std::nullopt;
  }
  static bool HasRequests(const proto::QueueSample& x) { return x.requests > 0; }

  std::string dir_;
  int32_t pid_ = 0;
  int lfd_ = -1, fd_ = -1;
  proto::StreamDecoder dec_;
  std::vector<proto::Message> pending_;
  std::vector<proto::Message> skipped_;  // messages NextOf<T> passed over
  // A kernel virtio_blk disk in the fake sysfs at dir_/sys (kernel_disks.h's layout).
  void AddKernelDisk(const std::string& name, const std::string& pci, int virtio, const std::string& dev,
                     const std::string& serial, const std::string& driver = "virtio_blk") {
    const std::string vdev = absl::StrCat(dir_, "/sys/devices/pci0000:00/", pci, "/virtio", virtio);
    const std::string disk = absl::StrCat(vdev, "/block/", name);
    ASSERT_EQ(system(("mkdir -p " + disk + "/queue " + dir_ + "/sys/block " + dir_ + "/sys/bus/virtio/drivers/" +
                      driver).c_str()),
              0);
    ASSERT_EQ(symlink((dir_ + "/sys/bus/virtio/drivers/" + driver).c_str(), (vdev + "/driver").c_str()), 0);
    ASSERT_EQ(symlink(absl::StrCat("../../../virtio", virtio).c_str(), (disk + "/device").c_str()), 0);
    std::ofstream(disk + "/dev") << dev << "\n";
    std::ofstream(disk + "/serial") << serial << "\n";
    std::ofstream(disk + "/queue/nr_requests") << "256\n";
    ASSERT_EQ(symlink(disk.c_str(), (dir_ + "/sys/block/" + name).c_str()), 0);
  }
  // A vkick_virtio_blk disk: the kernel disk, vkick/queues, and per queue a
  // stats file (`stats`) and a steer file.
  void AddVkickDisk(const std::string& name, const std::string& pci, int virtio, const std::string& dev,
                    const std::string& serial, uint16_t queues, const VkickQueueStats& stats) {
    AddKernelDisk(name, pci, virtio, dev, serial, "vkick_virtio_blk");
    std::ofstream(absl::StrCat(dir_, "/sys/block/", name, "/queue/nr_requests")) << "128\n";
    ASSERT_EQ(system(absl::StrCat("mkdir -p ", dir_, "/sys/block/", name, "/vkick").c_str()), 0);
    std::ofstream(absl::StrCat(dir_, "/sys/block/", name, "/vkick/queues")) << queues << "\n";
    for (uint16_t q = 0; q < queues; ++q) {
      ASSERT_EQ(system(("mkdir -p " + VkickQueueDir(opts_.sysfs_root, name, q)).c_str()), 0);
      SetVkickStats(name, q, stats);
      std::ofstream(VkickQueueDir(opts_.sysfs_root, name, q) + "/steer") << "0 immediate 1 0 0 none\n";
    }
  }
  void SetVkickStats(const std::string& name, uint16_t q, const VkickQueueStats& stats) {
    // Replaced whole (rename), as a reader of sysfs never sees half a file.
    const std::string path = VkickQueueDir(opts_.sysfs_root, name, q) + "/stats";
    std::ofstream(path + ".tmp") << testing::VkickStatsText(stats);
    ASSERT_EQ(rename((path + ".tmp").c_str(), path.c_str()), 0);
  }
  std::string ReadSteer(const std::string& name, uint16_t q) {
    std::ifstream f(VkickQueueDir(opts_.sysfs_root, name, q) + "/steer");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  void UseDisks() { agent_ = std::make_unique<Agent>(opts_, &counters_, Now, &out_, &disks_); }

  AgentOptions opts_;
  FakeCounters counters_;
  FakeDisks disks_;
  std::ostringstream out_;
  std::unique_ptr<Agent> agent_;
  std::thread thread_;
  volatile bool stop_ = false;
  int rc_ = -1;
};

TEST_F(AgentTest, HelloSamplesPolicyAckAndReconnect) {
  Start();
  // The registry is scanned before the first connect: one device in hello.
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->agent_id, "unit");
  ASSERT_EQ(h->devices.size(), 1u);
  EXPECT_EQ(h->devices[0].pci_devfn, 5 << 3);
  EXPECT_EQ(h->devices[0].serial, "d0");
  EXPECT_EQ(h->devices[0].num_queues, 2);
  EXPECT_EQ(counters_.tracked(), std::vector<int32_t>{pid_});

  // Counter deltas become samples: 100 requests at depth 4 on queue 1.
  ASSERT_TRUE(NextOf<proto::Sample>().has_value());
  counters_.Add(pid_, 1, 100, 4);
  std::optional<proto::Sample> s;
  for (int i = 0; i < 10; ++i) {
    s = NextOf<proto::Sample>();
    ASSERT_TRUE(s.has_value());
    if (s->queues.size() == 2 && s->queues[1].requests > 0) break;
  }
  ASSERT_EQ(s->queues.size(), 2u);
  EXPECT_EQ(s->queues[1].requests, 100u);
  EXPECT_EQ(s->queues[1].depth_hist[2], 100u);
  EXPECT_EQ(s->queues[1].mean_depth_milli, 4000u);
  EXPECT_EQ(s->queues[1].max_depth, 4u);
  EXPECT_EQ(s->queues[0].requests, 0u);
  EXPECT_EQ(s->queues[1].lease, proto::LeaseState::kNone);
  auto next = NextOf<proto::Sample>();
  ASSERT_TRUE(next.has_value());
  EXPECT_GT(next->seq, s->seq);
  EXPECT_EQ(next->queues[1].requests, 0u);  // a delta, not the total

  // A policy naming a queue the hello did not declare: error, no ack.
  proto::QueuePolicy qp = proto::testing::StaticQueuePolicy({0, 5}, 16, 30'000, 10'000'000'000, 4);
  Send(proto::Policy{{qp}});
  auto err = NextOf<proto::Error>();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, proto::ErrorCode::kUnknownQueue);

  // A frame the host must not send: ignored, the agent carries on.
  Send(proto::Ack{1});

  // A valid policy on queue 1: control block written, ack 5.
  qp.ref = {0, 1};
  qp.generation = 5;
  const uint64_t before = Now();
  Send(proto::Policy{{qp}});
  auto ack = NextOf<proto::Ack>();
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->generation, 5u);
  {
    int cfd = open((dir_ + "/ctl/control-test").c_str(), O_RDONLY);
    ASSERT_GE(cfd, 0);
    void* m = mmap(nullptr, sizeof(ControlBlock), PROT_READ, MAP_SHARED, cfd, 0);
    close(cfd);
    ASSERT_NE(m, MAP_FAILED);
    auto* cb = static_cast<const ControlBlock*>(m);
    ControlReadResult r1 = ReadControlBlock(cb, 1, 128), r0 = ReadControlBlock(cb, 0, 128);
    ASSERT_TRUE(r1.snapshot && r0.snapshot);
    EXPECT_EQ(r1.snapshot->mode, ControlMode::kStatic);
    EXPECT_EQ(r1.snapshot->batch, 16u);
    EXPECT_EQ(r1.snapshot->defer_ns, 30'000u);
    EXPECT_GE(r1.snapshot->lease_expiry_ns, before + 10'000'000'000ull);
    EXPECT_LE(r1.snapshot->lease_expiry_ns, Now() + 10'000'000'000ull);
    EXPECT_EQ(r0.snapshot->mode, ControlMode::kImmediate);
    EXPECT_EQ(r0.snapshot->lease_expiry_ns, 0u);
    munmap(m, sizeof(ControlBlock));
  }
  s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->queues[1].lease, proto::LeaseState::kActive);
  EXPECT_EQ(s->queues[1].applied_generation, 5u);
  EXPECT_EQ(s->queues[1].applied_batch, 16);

  // The host says bye: the agent reconnects by itself with a new hello, and
  // the lease still holds.
  Send(proto::Bye{proto::ByeReason::kRestart});
  ASSERT_TRUE(Accept());
  auto h2 = NextOf<proto::Hello>();
  ASSERT_TRUE(h2.has_value());
  EXPECT_EQ(h2->devices, h->devices);
  s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->queues[1].lease, proto::LeaseState::kActive);

  // Stop: bye(shutdown), exit 0.
  stop_ = true;
  auto bye = NextOf<proto::Bye>();
  ASSERT_TRUE(bye.has_value());
  EXPECT_EQ(bye->reason, proto::ByeReason::kShutdown);
  thread_.join();
  EXPECT_EQ(rc_, 0);
  const std::string json = out_.str();
  EXPECT_NE(json.find("\"rejected_from_host\":1"), std::string::npos) << json.substr(json.size() > 600 ? json.size() - 600 : 0);
}

TEST_F(AgentTest, PolicyWithoutAControlBlockIsNotAcked) {
  // The control block path is a directory: it cannot be opened.
  ASSERT_EQ(mkdir((dir_ + "/ctl/control-test").c_str(), 0755), 0);
  Start();
  ASSERT_TRUE(Accept());
  ASSERT_TRUE(NextOf<proto::Hello>().has_value());
  proto::QueuePolicy qp = proto::testing::StaticQueuePolicy({0, 0}, 4, 10'000, 1'000'000'000, 1);
  Send(proto::Policy{{qp}});
  auto err = NextOf<proto::Error>();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, proto::ErrorCode::kInternal);
  // Not recorded either: the samples keep saying "no lease", and no ack came.
  auto s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->queues[0].lease, proto::LeaseState::kNone);
  ASSERT_TRUE(NextOf<proto::Sample>().has_value());
  for (const proto::Message& m : skipped_) EXPECT_FALSE(std::holds_alternative<proto::Ack>(m));
  for (const proto::Message& m : pending_) EXPECT_FALSE(std::holds_alternative<proto::Ack>(m));
}

TEST_F(AgentTest, DuplicateSerialIsNotAnnouncedAndDoesNotLoop) {
  // A second live driver (our parent process) claiming the same serial.
  const int32_t other = getppid();
  std::ofstream(absl::StrCat(dir_, "/run/drivers/", other, ".json"))
      << absl::StrCat(R"({"pid":)", other,
                      R"(,"transport":"vhost-user","serial":"d0","queues":1,"queue_size":128,"control_block":")",
                      dir_, R"(/ctl/control-other"})");
  Start();
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  ASSERT_EQ(h->devices.size(), 1u);  // the lower pid wins, the duplicate is left out
  // Several intervals later the connection is still the first one: no
  // re-announce loop (a Bye would come before these samples).
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(NextOf<proto::Sample>().has_value());
  pollfd p{lfd_, POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 0), 0) << "the agent reconnected";
}

TEST_F(AgentTest, TwoVhostUserDriversGetDistinctFakePciFunctions) {
  // Besides the fixture's PCI driver, two live vhost-user drivers: our
  // parent process and a child of ours (killed at the end, by pid).
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    pause();
    _exit(0);
  }
  int i = 0;
  for (int32_t pid : {static_cast<int32_t>(getppid()), static_cast<int32_t>(child)}) {
    std::ofstream(absl::StrCat(dir_, "/run/drivers/", pid, ".json"))
        << absl::StrCat(R"({"pid":)", pid, R"(,"transport":"vhost-user","serial":"vu)", i,
                        R"(","queues":1,"queue_size":128,"control_block":")", dir_,
                        R"(/ctl/control-vu)", i, R"("})");
    ++i;
  }
  Start();
  const bool accepted = Accept();
  auto h = accepted ? NextOf<proto::Hello>() : std::nullopt;  // decoded by the protocol's rules
  std::optional<proto::Sample> sample = h ? NextOf<proto::Sample>() : std::nullopt;
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  ASSERT_TRUE(h.has_value());
  ASSERT_EQ(h->devices.size(), 3u);
  std::set<std::tuple<uint16_t, uint8_t, uint8_t>> fns;
  int fake = 0;
  for (const proto::GuestDevice& d : h->devices) {
    fns.emplace(d.pci_domain, d.pci_bus, d.pci_devfn);
    if (d.serial.rfind("vu", 0) == 0) {
      EXPECT_EQ(d.pci_domain, kFakePciDomain) << d.serial;
      ++fake;
    } else {
      EXPECT_NE(d.pci_domain, kFakePciDomain) << "a real PCI driver keeps its address";
    }
  }
  EXPECT_EQ(fake, 2);
  EXPECT_EQ(fns.size(), 3u) << "every device at its own PCI function";
  // The hello was accepted by the protocol: the agent went on to samples.
  EXPECT_TRUE(sample.has_value());
}

TEST_F(AgentTest, KernelDiskIsAnnouncedSampledAndNeverPoliced) {
  AddKernelDisk("vda", "0000:00:06.0", 2, "254:0", "kd0");
  const uint32_t kdev = KernelDev(254, 0);
  UseDisks();
  Start();
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  // The vkick-blk driver first, then the kernel disk: one queue, driver kernel.
  ASSERT_EQ(h->devices.size(), 2u);
  EXPECT_EQ(h->devices[0].driver, proto::DriverKind::kVkickBlk);
  const proto::GuestDevice& kd = h->devices[1];
  EXPECT_EQ(kd.driver, proto::DriverKind::kKernel);
  EXPECT_EQ(kd.pci_domain, 0);
  EXPECT_EQ(kd.pci_bus, 0);
  EXPECT_EQ(kd.pci_devfn, 6 << 3);
  EXPECT_EQ(kd.serial, "kd0");
  EXPECT_EQ(kd.num_queues, 1);
  EXPECT_EQ(kd.queue_size, 256);
  EXPECT_EQ(disks_.watched(), std::set<uint32_t>{kdev});

  // Issues and completions become queue 0 of device 1; no kicks (the host
  // counts the kernel driver's notifications). The test's decoder validates
  // every frame (proto::Validate).
  ASSERT_TRUE(NextOf<proto::Sample>().has_value());
  disks_.Add(kdev, 50, 3, 20'000);
  std::optional<proto::Sample> s;
  std::optional<proto::QueueSample> q = QueueWhere({1, 0}, HasRequests, &s);
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(s->queues.size(), 3u);  // 2 driver queues + the disk
  EXPECT_EQ(q->requests, 50u);
  EXPECT_EQ(q->completed, 50u);
  EXPECT_EQ(q->kicks, 0u);
  EXPECT_EQ(q->timer_kicks, 0u);
  EXPECT_EQ(q->depth_hist[1], 50u);
  EXPECT_EQ(q->latency_hist[proto::LatencyBucket(20'000)], 50u);
  EXPECT_EQ(q->max_depth, 3);
  EXPECT_EQ(q->mean_depth_milli, 3000u);
  EXPECT_EQ(q->lease, proto::LeaseState::kNone);
  EXPECT_EQ(q->applied_mode, proto::KickMode::kImmediate);
  EXPECT_EQ(q->applied_generation, 0u);

  // A policy naming the kernel disk: not applied, counted, error(unsupported), no ack.
  proto::QueuePolicy qp = proto::testing::StaticQueuePolicy({1, 0}, 8, 50'000, 1'000'000'000, 3);
  Send(proto::Policy{{qp}});
  auto err = NextOf<proto::Error>();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, proto::ErrorCode::kUnsupported);
  s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  for (const proto::QueueSample& x : s->queues) EXPECT_EQ(x.lease, proto::LeaseState::kNone);
  for (const proto::Message& m : skipped_) EXPECT_FALSE(std::holds_alternative<proto::Ack>(m));

  // The disk goes away: unwatched, re-announced without it.
  ASSERT_EQ(unlink((dir_ + "/sys/block/vda").c_str()), 0);
  auto bye = NextOf<proto::Bye>();
  ASSERT_TRUE(bye.has_value());
  EXPECT_EQ(bye->reason, proto::ByeReason::kRestart);
  ASSERT_TRUE(Accept());
  auto h2 = NextOf<proto::Hello>();
  ASSERT_TRUE(h2.has_value());
  ASSERT_EQ(h2->devices.size(), 1u);
  EXPECT_EQ(h2->devices[0].driver, proto::DriverKind::kVkickBlk);
  EXPECT_EQ(disks_.unwatched(), std::vector<uint32_t>{kdev});
  ASSERT_TRUE(NextOf<proto::Sample>().has_value());

  stop_ = true;
  thread_.join();
  const std::string json = out_.str();
  EXPECT_NE(json.find("\"kernel_policy_ignored\":1"), std::string::npos);
  EXPECT_NE(json.find("\"kernel_disks\":[{\"dev\":\"254:0\""), std::string::npos);
}

TEST_F(AgentTest, VkickVirtioBlkDiskIsAnnouncedSampledAndSteered) {
  // 1000 requests before the agent: counted since the disk was bound, not
  // this interval's.
  AddVkickDisk("vkda", "0000:00:07.0", 3, "253:0", "vk0", 2, testing::VkickRequests(1000, 2, 5'000));
  AddKernelDisk("vda", "0000:00:06.0", 2, "254:0", "kd0");
  UseDisks();
  Start();
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  // The vkick-blk driver, then the steerable disk, then the observed one.
  ASSERT_EQ(h->devices.size(), 3u);
  const proto::GuestDevice& vd = h->devices[1];
  EXPECT_EQ(vd.driver, proto::DriverKind::kVkickVirtioBlk);
  EXPECT_EQ(vd.pci_devfn, 7 << 3);
  EXPECT_EQ(vd.serial, "vk0");
  EXPECT_EQ(vd.num_queues, 2);
  EXPECT_EQ(vd.queue_size, 128);
  EXPECT_EQ(h->devices[2].driver, proto::DriverKind::kKernel);
  EXPECT_EQ(disks_.watched(), std::set<uint32_t>{KernelDev(254, 0)});  // not the module's disk

  // The stats files' changes become samples of (1, 0) and (1, 1), kicks included.
  auto s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  for (const proto::QueueSample& x : s->queues) EXPECT_EQ(x.requests, 0u) << "history reported as an interval";
  VkickQueueStats q1 = testing::VkickRequests(1000, 2, 5'000);
  q1.totals.requests += 50;
  q1.totals.kicks += 10;
  q1.totals.depth_sum += 50 * 3;
  q1.totals.depth_hist[1] += 50;
  SetVkickStats("vkda", 1, q1);
  std::optional<proto::QueueSample> q = QueueWhere({1, 1}, HasRequests, &s);
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(s->queues.size(), 2u + 2u + 1u);
  EXPECT_EQ(q->requests, 50u);
  EXPECT_EQ(q->kicks, 10u);
  EXPECT_EQ(q->max_depth, 3);
  EXPECT_EQ(q->lease, proto::LeaseState::kNone);

  // A policy for (1, 1): its steer file is written, acked, reported active.
  proto::QueuePolicy qp = proto::testing::StaticQueuePolicy({1, 1}, 8, 50'000, 2'000'000'000, 3);
  Send(proto::Policy{{qp}});
  auto ack = NextOf<proto::Ack>();
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->generation, 3u);
  EXPECT_EQ(ReadSteer("vkda", 1), "3 static 8 50000 2000\n");
  EXPECT_EQ(ReadSteer("vkda", 0), "0 immediate 1 0 0 none\n");
  q = QueueWhere({1, 1}, [](const proto::QueueSample& x) { return x.lease == proto::LeaseState::kActive; }, &s, 5);
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->applied_generation, 3u);
  EXPECT_EQ(q->applied_batch, 8);

  // A steer write that fails (the module refuses it, or the file is gone):
  // not applied, not acked, answered with an error, counted.
  ASSERT_EQ(unlink((VkickQueueDir(opts_.sysfs_root, "vkda", 0) + "/steer").c_str()), 0);
  qp.ref = {1, 0};
  qp.generation = 4;
  Send(proto::Policy{{qp}});
  auto err = NextOf<proto::Error>();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, proto::ErrorCode::kInternal);
  EXPECT_NE(err->text.find("vkda q0"), std::string::npos) << err->text;
  s = NextOf<proto::Sample>();
  ASSERT_TRUE(s.has_value());
  for (const proto::QueueSample& x : s->queues) {
    if (x.ref == proto::QueueRef{1, 0}) {
      EXPECT_EQ(x.lease, proto::LeaseState::kNone);
    }
  }
  for (const proto::Message& m : skipped_) {
    if (auto* a = std::get_if<proto::Ack>(&m)) {
      EXPECT_NE(a->generation, 4u);
    }
  }

  stop_ = true;
  thread_.join();
  const std::string json = out_.str();
  EXPECT_NE(json.find("\"driver\":\"vkick-virtio-blk\""), std::string::npos);
  EXPECT_NE(json.find("\"steer_errors\":1"), std::string::npos);
  EXPECT_NE(json.find("\"kernel_policy_ignored\":0"), std::string::npos);
}

TEST_F(AgentTest, VkickVirtioBlkDisksNeedNoBlockObserver) {
  // No DiskCounterSource (no eBPF): the module's disk is still announced,
  // the stock virtio_blk disk is not looked at.
  AddVkickDisk("vkda", "0000:00:07.0", 3, "253:0", "vk0", 1, VkickQueueStats{});
  AddKernelDisk("vda", "0000:00:06.0", 2, "254:0", "kd0");
  Start();
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  ASSERT_EQ(h->devices.size(), 2u);
  EXPECT_EQ(h->devices[1].driver, proto::DriverKind::kVkickVirtioBlk);
  ASSERT_TRUE(NextOf<proto::Sample>().has_value());
}

TEST_F(AgentTest, KernelDiskAtADriversPciFunctionIsNotAnnounced) {
  // Cannot happen on a real guest (a function bound to vkick-blk's uio has
  // no /sys/block entry), but two entries at one function would get the
  // whole hello refused.
  AddKernelDisk("vda", "0000:00:05.0", 2, "254:0", "other");
  UseDisks();
  Start();
  ASSERT_TRUE(Accept());
  auto h = NextOf<proto::Hello>();
  ASSERT_TRUE(h.has_value());
  ASSERT_EQ(h->devices.size(), 1u);
  EXPECT_EQ(h->devices[0].driver, proto::DriverKind::kVkickBlk);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(NextOf<proto::Sample>().has_value());
  pollfd p{lfd_, POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 0), 0) << "the agent reconnected";
}

}  // namespace
}  // namespace vkick::agent
