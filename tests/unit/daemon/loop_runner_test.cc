// The loop runner with a fake daemon world: discovered queues get policies,
// the host's counts drive the rates, admin changes persist and are restored
// by a new runner (a vkickd restart), a gone VM's queues go, an unwritable
// state dir refuses the change instead of losing it silently.
#include "tests/unit/temp_dir.h"
#include "controller/daemon/loop_runner.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <utility>
#include <vector>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "protocol/codec.h"
#include "tests/unit/daemon/fakes.h"

namespace vkick {
namespace {

using testing::Eventually;
using testing::FakeProbeBackend;
using testing::FakeWorld;
using testing::LogCapture;
using testing::QmpMode;
using testing::TwoDiskVm;

struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-runner") {}
};

DaemonOptions Fast(std::vector<std::string> paths, LogCapture& log) {
  DaemonOptions o;
  o.qmp_paths = std::move(paths);
  o.refresh_interval = absl::Milliseconds(10);
  o.min_backoff = absl::Milliseconds(5);
  o.max_backoff = absl::Milliseconds(20);
  o.event_slice = absl::Milliseconds(5);
  o.log = log.Sink();
  return o;
}

LoopRunnerOptions RunnerOptions(const std::string& state, LogCapture& log) {
  LoopRunnerOptions o;
  o.state_dir = state;
  o.state_dir_required = true;
  o.log = log.Sink();
  return o;
}

AdminRequest Set(PolicyScope scope, PolicySpec spec) { return AdminPolicySet{scope, spec}; }

const QueueView* Find(const LoopSnapshot& s, const QueueKey& k) {
  for (const auto& q : s.queues)
    if (q.key == k) return &q;
  return nullptr;
}

TEST(LoopRunnerTest, PoliciesForDiscoveredQueuesPersistAndRestore) {
  TempDir dir;
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm1.qmp", QmpMode::kLive, TwoDiskVm("vm1", 1000));
  Daemon d(Fast({"/vm1.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 1; }));
  uint32_t vm_id = (*d.Tick()).vms[0].vm_id;

  {
    LoopRunner r(RunnerOptions(dir.path(), log), d);
    ASSERT_TRUE(r.Init().ok());
    CounterSnapshot c;
    c.notifications = {{vm_id, 1, 0, 100}};
    probes.set_counters(c);
    r.StepOnce();
    LoopSnapshot s = r.Snapshot();
    ASSERT_EQ(s.queues.size(), 3u);  // disk0 q0, q1, disk1 q0
    const QueueView* q0 = Find(s, {"vm1", "disk0", 0});
    ASSERT_NE(q0, nullptr);
    EXPECT_EQ(q0->spec.mode, proto::KickMode::kImmediate);
    EXPECT_FALSE(q0->agent_connected);
    EXPECT_EQ(s.loop_duration.histogram.sample_count, 1u);

    std::string reply = r.HandleAdmin(
        Set({"vm1", "disk0", -1}, {proto::KickMode::kStatic, 4, 20'000}));
    EXPECT_THAT(reply, ::testing::HasSubstr("\"ok\":true"));
    // An entry alone does not pin the default (the flag stays in charge).
    EXPECT_NE(access((dir.path() + "/" + kDefaultPolicyFile).c_str(), F_OK), 0);
    reply = r.HandleAdmin(Set({}, {proto::KickMode::kAdaptive, 1, 0}));  // --all
    EXPECT_THAT(reply, ::testing::HasSubstr("\"ok\":true"));
    // --all cleared the device entry; set it again on top of the new default.
    r.HandleAdmin(Set({"vm1", "disk0", 1}, {proto::KickMode::kStatic, 4, 20'000}));
    EXPECT_THAT(r.HandleAdmin(AdminPolicyClear{{"vm1", "nope", -1}}),
                ::testing::HasSubstr("\"ok\":false"));
    c.notifications = {{vm_id, 1, 0, 600}};
    probes.set_counters(c);
    r.StepOnce();
    s = r.Snapshot();
    EXPECT_EQ(Find(s, {"vm1", "disk0", 0})->spec.mode, proto::KickMode::kAdaptive);
    EXPECT_EQ(Find(s, {"vm1", "disk0", 0})->source, PolicySource::kDefault);
    EXPECT_EQ(Find(s, {"vm1", "disk0", 1})->b, 4u);
    EXPECT_EQ(Find(s, {"vm1", "disk0", 1})->source, PolicySource::kQueue);
    EXPECT_GT(Find(s, {"vm1", "disk0", 0})->notifications_per_s, 0);
  }
  // "vkickd restarted": a new runner on the same state dir.
  LoopRunner r2(RunnerOptions(dir.path(), log), d);
  ASSERT_TRUE(r2.Init().ok());
  EXPECT_EQ(r2.Table().default_policy().mode, proto::KickMode::kAdaptive);
  r2.StepOnce();
  LoopSnapshot s = r2.Snapshot();
  EXPECT_EQ(Find(s, {"vm1", "disk0", 1})->spec, (PolicySpec{proto::KickMode::kStatic, 4, 20'000}));
  EXPECT_EQ(Find(s, {"vm1", "disk1", 0})->spec.mode, proto::KickMode::kAdaptive);
  EXPECT_EQ(log.Count("restored 1 policy entries"), 1);

  // The VM goes away: its queues leave the loop (the metrics keep its final
  // counts for the retention).
  world.Set("/vm1.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] {
    auto s = d.Tick();
    return s->vms.size() == 1 && s->vms[0].departed;
  }));
  r2.StepOnce();
  EXPECT_TRUE(r2.Snapshot().queues.empty());
  d.Stop();
}

// A VM live-migrated to another QEMU process keeps its queues: the same keys
// (no "vm1/pidN"), its policy, its generation, its host total continuing;
// while the source is stopped at the end of the migration they are held.
TEST(LoopRunnerTest, AMigratedVmKeepsItsQueuesPolicyAndGeneration) {
  TempDir dir;
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  auto guest = [](uint32_t pid, RunState st) {
    VmInfo vm = TwoDiskVm("vm1", pid);
    vm.uuid = "6c1e9d8a-1f0b-4e5c-9a1d-0000000000aa";
    vm.run_state = st;
    return vm;
  };
  world.Set("/src.qmp", QmpMode::kLive, guest(1000, RunState::kRunning));
  Daemon d(Fast({"/src.qmp", "/dst.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 1; }));
  const uint32_t src = d.Tick()->vms[0].vm_id;
  LoopRunner r(RunnerOptions(dir.path(), log), d);
  ASSERT_TRUE(r.Init().ok());
  r.HandleAdmin(Set({"vm1", "", -1}, {proto::KickMode::kStatic, 4, 20'000}));
  auto counts = [](std::vector<NotificationCount> n) {
    CounterSnapshot c;
    c.notifications = std::move(n);
    return c;
  };
  probes.set_counters(counts({{src, 1, 0, 100}}));
  r.StepOnce();
  const QueueView before = *Find(r.Snapshot(), {"vm1", "disk0", 0});
  ASSERT_EQ(before.spec.mode, proto::KickMode::kStatic);
  EXPECT_EQ(before.vm_state, "running");

  world.Set("/dst.qmp", QmpMode::kLive, guest(2000, RunState::kInMigrate));
  ASSERT_TRUE(Eventually([&] { return log.Count("migrating in") == 1; }));
  world.Update("/src.qmp", guest(1000, RunState::kPostMigrate));
  world.PushEvent("/src.qmp");
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.at(0).info.run_state == RunState::kPostMigrate; }));
  r.StepOnce();
  LoopSnapshot s = r.Snapshot();
  ASSERT_EQ(s.queues.size(), 3u) << "the held destination adds no queues";
  EXPECT_TRUE(Find(s, {"vm1", "disk0", 0})->frozen);
  EXPECT_EQ(Find(s, {"vm1", "disk0", 0})->vm_state, "postmigrate");

  world.Update("/dst.qmp", guest(2000, RunState::kRunning));
  world.PushEvent("/dst.qmp");
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.at(0).info.pid == 2000; }));
  uint32_t dst = 0;
  for (const auto& [vm_id, tgid] : probes.tracked()) {
    if (tgid == 2000) dst = vm_id;
  }
  probes.set_counters(counts({{src, 1, 0, 100}, {dst, 1, 0, 50}}));
  r.StepOnce();
  s = r.Snapshot();
  ASSERT_EQ(s.queues.size(), 3u);
  const QueueView* q = Find(s, {"vm1", "disk0", 0});
  ASSERT_NE(q, nullptr) << "same key: no vm1/pid2000";
  EXPECT_FALSE(q->frozen);
  EXPECT_EQ(q->vm_state, "running");
  EXPECT_EQ(q->spec, (PolicySpec{proto::KickMode::kStatic, 4, 20'000}));
  EXPECT_EQ(q->source, PolicySource::kVm);
  EXPECT_EQ(q->generation, before.generation) << "the policy did not change";
  const std::set<QueueKey> k0 = {{"vm1", "disk0", 0}};
  EXPECT_EQ(r.HostTotalsNow(k0).at({"vm1", "disk0", 0}), 150u) << "100 + 50, continuing";
  d.Stop();
}

TEST(LoopRunnerTest, UnwritableStateDirRefusesTheChange) {
  TempDir dir;
  LogCapture log;
  FakeWorld world;
  Daemon d(Fast({}, log), nullptr, world.Factory());
  LoopRunner r(RunnerOptions(dir.path() + "/state", log), d);
  ASSERT_TRUE(r.Init().ok());
  // The state dir disappears under vkickd and a regular file takes its
  // place: no write can succeed there, root or not.
  std::system(("rm -rf " + dir.path() + "/state").c_str());
  std::ofstream(dir.path() + "/state") << "not a dir";
  std::string reply = r.HandleAdmin(Set({"vm1", "", -1}, {proto::KickMode::kEventIdx, 1, 0}));
  EXPECT_THAT(reply, ::testing::HasSubstr("not applied"));
  EXPECT_TRUE(r.Table().entries().empty());
  EXPECT_EQ(r.Snapshot().state_save_errors, 1u);
}

// A policy change's log line names who made it (the admin socket's SO_PEERCRED).
TEST(LoopRunnerTest, PolicyChangeLogNamesTheCaller) {
  TempDir dir;
  LogCapture log;
  FakeWorld world;
  Daemon d(Fast({}, log), nullptr, world.Factory());
  LoopRunner r(RunnerOptions(dir.path(), log), d);
  ASSERT_TRUE(r.Init().ok());
  AdminPeer peer{1000, 1000, 4242};
  EXPECT_THAT(r.HandleAdmin(Set({"vm1", "", -1}, {proto::KickMode::kEventIdx, 1, 0}), peer),
              ::testing::HasSubstr("\"ok\":true"));
  EXPECT_THAT(r.HandleAdmin(AdminPolicyClear{{"vm1", "", -1}}, peer),
              ::testing::HasSubstr("\"ok\":true"));
  EXPECT_EQ(log.Count("admin: policy set", "by uid 1000 pid 4242"), 1);
  EXPECT_EQ(log.Count("admin: policy cleared", "by uid 1000 pid 4242"), 1);
}

TEST(LoopRunnerTest, CorruptStateFilesAreMovedAsideAndCounted) {
  TempDir dir;
  LogCapture log;
  FakeWorld world;
  std::ofstream(dir.path() + "/" + kDefaultPolicyFile) << "static:0,0\n";
  std::ofstream(dir.path() + "/policies.v1") << "garbage\n";
  Daemon d(Fast({}, log), nullptr, world.Factory());
  LoopRunner r(RunnerOptions(dir.path(), log), d);
  ASSERT_TRUE(r.Init().ok()) << "a corrupt state file does not stop vkickd";
  EXPECT_EQ(r.Snapshot().state_load_errors, 2u);
  EXPECT_EQ(r.Table().default_policy().mode, proto::KickMode::kImmediate) << "--default-policy";
  struct stat st;
  EXPECT_NE(stat((dir.path() + "/" + kDefaultPolicyFile).c_str(), &st), 0);
  EXPECT_EQ(stat((dir.path() + "/" + kDefaultPolicyFile + ".corrupt").c_str(), &st), 0);
  EXPECT_EQ(stat((dir.path() + "/policies.v1.corrupt").c_str(), &st), 0);
  EXPECT_EQ(log.Count("default-policy.v1", "moved to"), 1);
}

TEST(LoopRunnerTest, RequiredStateDirMustBeUsableAndDefaultOneMayNot) {
  TempDir dir;
  LogCapture log;
  FakeWorld world;
  Daemon d(Fast({}, log), nullptr, world.Factory());
  std::string file = dir.path() + "/file";
  std::ofstream(file) << "x";
  LoopRunnerOptions o = RunnerOptions(file + "/state", log);  // under a regular file
  LoopRunner r(o, d);
  EXPECT_FALSE(r.Init().ok());
  o.state_dir_required = false;
  LoopRunner r2(o, d);
  EXPECT_TRUE(r2.Init().ok());
  EXPECT_EQ(log.Count("state dir unusable"), 1);
}

TEST(LoopRunnerTest, VhostUserDeclarations) {
  EXPECT_TRUE(ParseVhostUserDecl("blk0=/run/blk0.sock").ok());
  EXPECT_EQ(ParseVhostUserDecl("blk0=/a=b")->socket_path, "/a=b");
  EXPECT_FALSE(ParseVhostUserDecl("blk0").ok());
  EXPECT_FALSE(ParseVhostUserDecl("=/x").ok());
  EXPECT_FALSE(ParseVhostUserDecl("a b=/x").ok());
  EXPECT_FALSE(ParseVhostUserDecl("waytoolongforaserial123=/x").ok());
  LoopRunnerOptions o;
  o.vhost_user = {{"blk0", "/a"}, {"blk1", "/b"}};
  auto devs = VhostUserChannelDevices(o);
  ASSERT_EQ(devs.size(), 2u);
  EXPECT_EQ(devs[1].known.serial, "blk1");
  EXPECT_EQ(devs[1].vm, "vhost-user");
  EXPECT_EQ(devs[1].device, "blk1");
}

// --vhost-user drivers: vkickd declares each socket path to the probes,
// adopts a frontend already connected, and publishes one pseudo-VM whose
// queues exist from the start; the loop believes the host count of a queue
// only while a live frontend has a kick fd bound for it.
TEST(LoopRunnerTest, VhostUserFrontendsAreHostCountedWhileBound) {
  TempDir dir;
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  DaemonOptions o = Fast({}, log);
  o.vhost_user_vm = "host";
  o.vhost_user = {{"disk0", "/run/disk0.sock"}, {"disk1", "/run/disk1.sock"}};
  o.find_connected = [](const std::string& path)
      -> absl::StatusOr<std::vector<std::pair<uint32_t, int32_t>>> {
    if (path == "/run/disk1.sock") return std::vector<std::pair<uint32_t, int32_t>>{{4242, 7}};
    return std::vector<std::pair<uint32_t, int32_t>>{};
  };
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  auto paths = probes.vhost_paths();
  ASSERT_EQ(paths.size(), 2u);
  EXPECT_EQ(paths[0].path, "/run/disk0.sock");
  EXPECT_EQ(paths[0].device_id, 0);
  EXPECT_EQ(paths[1].device_id, 1);
  const uint32_t vm_id = paths[0].vm_id;
  EXPECT_EQ(paths[1].vm_id, vm_id);
  auto fe = probes.frontends();
  ASSERT_EQ(fe.size(), 1u);
  EXPECT_EQ(fe[0].tgid, 4242u);
  EXPECT_EQ(fe[0].fd, 7);
  EXPECT_EQ(fe[0].device_id, 1);

  DaemonSnapshot snap = (*d.Tick());
  EXPECT_GE(probes.sweeps(), 1);
  ASSERT_EQ(snap.vms.size(), 1u);
  EXPECT_TRUE(snap.vms[0].vhost_user_frontends);
  EXPECT_EQ(snap.vms[0].info.name, "host");
  ASSERT_EQ(snap.vms[0].info.devices.size(), 2u);
  EXPECT_EQ(snap.vms[0].info.devices[0].num_queues, 1);  // queue 0 from the start

  LoopRunnerOptions ro = RunnerOptions(dir.path(), log);
  ro.vhost_user_vm = "host";
  ro.interval = absl::Milliseconds(100);
  ro.vhost_user_kicks_counted = true;  // --vhost_user_kicks
  LoopRunner r(ro, d);
  ASSERT_TRUE(r.Init().ok());
  // Counts but no live binding (e.g. the adopted pid 4242 announced its
  // kick fds before vkickd ran): not believed.
  CounterSnapshot c;
  c.notifications = {{vm_id, 0, 0, 100}};
  c.frontends = {{4242, vm_id, 1}};
  probes.set_counters(c);
  r.StepOnce();
  c.notifications = {{vm_id, 0, 0, 5000}};
  probes.set_counters(c);
  absl::SleepFor(absl::Milliseconds(20));
  r.StepOnce();
  LoopSnapshot s = r.Snapshot();
  ASSERT_NE(Find(s, {"host", "disk0", 0}), nullptr);
  ASSERT_NE(Find(s, {"host", "disk1", 0}), nullptr);
  EXPECT_EQ(Find(s, {"host", "disk0", 0})->notifications_per_s, 0);
  // A live frontend (tgid 99) bound queues 0 and 1 of disk0: queue 1
  // appears, and the host rate is believed.
  c.frontends = {{99, vm_id, 0}};
  c.kick_fds = {{99, 20, 5, 0, 0}, {99, 21, 5, 0, 1}, {12345, 22, 5, 1, 0} /* not live */};
  c.notifications = {{vm_id, 0, 0, 6000}};
  probes.set_counters(c);
  r.StepOnce();
  c.notifications = {{vm_id, 0, 0, 9000}};
  probes.set_counters(c);
  absl::SleepFor(absl::Milliseconds(20));
  r.StepOnce();
  s = r.Snapshot();
  ASSERT_NE(Find(s, {"host", "disk0", 1}), nullptr);
  EXPECT_GT(Find(s, {"host", "disk0", 0})->notifications_per_s, 0);
  EXPECT_EQ(Find(s, {"host", "disk1", 0})->notifications_per_s, 0);
  snap = (*d.Tick());
  EXPECT_EQ(snap.vms[0].info.devices[0].num_queues, 2);
  EXPECT_EQ(snap.vms[0].bound_queues,
            (std::set<std::pair<uint16_t, uint16_t>>{{0, 0}, {0, 1}}));
  d.Stop();
}

int UnixSocket(const std::string& path, bool listen_on) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  const bool ok = listen_on ? bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                                  listen(fd, 4) == 0
                            : connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  if (!ok) {
    close(fd);
    return -1;
  }
  return fd;
}

std::vector<uint8_t> Enc(const proto::Message& m) { return proto::Encode(m).bytes; }

// Issue 12, item 4: an agent announced 64 queues for a one-queue
// --vhost-user device; after it left they stayed in the status and the
// metrics, lease "active", forever. Such a device's queue count is not
// known (capped at the protocol's 64), so the queues only an agent
// announced go when its lease runs out; the device's discovered queue stays,
// its lease expired.
TEST(LoopRunnerTest, QueuesOnlyAGoneAgentAnnouncedExpireWithItsLease) {
  TempDir dir;
  FakeWorld world;
  LogCapture log;
  DaemonOptions o = Fast({}, log);
  o.vhost_user = {{"blk0", "/run/blk0.sock"}};
  Daemon d(o, nullptr, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  LoopRunnerOptions ro = RunnerOptions(dir.path(), log);
  ro.vhost_user = {{"blk0", "/run/blk0.sock"}};
  ro.loop.lease_ns = 300'000'000;
  LoopRunner r(ro, d);
  ASSERT_TRUE(r.Init().ok());
  AgentServerOptions ao;
  ao.socket_path = dir.path() + "/agent.sock";
  ao.vm = ro.vhost_user_vm;
  ao.devices = VhostUserChannelDevices(ro);
  auto srv = AgentServer::Start(ao);
  ASSERT_TRUE(srv.ok()) << srv.status();
  r.SetAgentServer(srv->get());

  proto::Hello h;
  h.agent_id = "phantoms";
  proto::GuestDevice g;
  g.serial = "blk0";
  g.num_queues = 64;
  h.devices = {g};
  proto::Sample smp{1, {}};
  for (uint16_t q : {0, 63}) {
    proto::QueueSample qs;
    qs.ref = {0, q};
    qs.interval_ns = 1'000'000'000;
    qs.requests = qs.kicks = qs.completed = 10;
    qs.depth_hist[0] = qs.latency_hist[5] = 10;
    qs.mean_depth_milli = 1000;
    qs.max_depth = 1;
    qs.lease = proto::LeaseState::kActive;
    qs.applied_generation = 1;
    smp.queues.push_back(qs);
  }
  int fd = UnixSocket(ao.socket_path, false);
  ASSERT_GE(fd, 0);
  for (const auto& b : {Enc(h), Enc(smp)})
    ASSERT_EQ(write(fd, b.data(), b.size()), static_cast<ssize_t>(b.size()));
  ASSERT_TRUE(Eventually([&] {
    r.StepOnce();
    return r.Snapshot().queues.size() == 64;
  }));
  const QueueView* phantom = Find(r.Snapshot(), {"vhost-user", "blk0", 63});
  ASSERT_NE(phantom, nullptr);
  EXPECT_TRUE(phantom->agent_connected);

  close(fd);
  ASSERT_TRUE(Eventually([&] { return (*srv)->Stats().connected == 0; }));
  r.StepOnce();
  absl::SleepFor(absl::Milliseconds(350));  // past the lease
  r.StepOnce();
  LoopSnapshot s = r.Snapshot();
  EXPECT_EQ(s.queues.size(), 1u);
  EXPECT_EQ(Find(s, {"vhost-user", "blk0", 63}), nullptr);
  const QueueView* q0 = Find(s, {"vhost-user", "blk0", 0});
  ASSERT_NE(q0, nullptr);
  EXPECT_EQ(q0->guest_lease, proto::LeaseState::kExpired);
  (*srv)->Stop();
  d.Stop();
}

// Issue 12, item 1: the runner logged "connected" for a VM channel the
// agent server then refused (closed at once).
TEST(LoopRunnerTest, ARefusedVmChannelIsNotLoggedAsConnected) {
  TempDir dir;
  FakeWorld world;
  LogCapture log;
  world.Set("/vm1.qmp", QmpMode::kLive, TwoDiskVm("vm1", 1000));
  Daemon d(Fast({"/vm1.qmp"}, log), nullptr, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 1; }));
  const std::string chardev = dir.path() + "/vm1.agent";
  int qemu = UnixSocket(chardev, true);  // QEMU's chardev (server=on)
  ASSERT_GE(qemu, 0);
  AgentPortRegistry ports;
  ports.Set("/vm1.qmp", chardev);
  auto srv = AgentServer::Start(AgentServerOptions{});
  ASSERT_TRUE(srv.ok()) << srv.status();
  (*srv)->Stop();  // refuses every connection from now on
  LoopRunner r(RunnerOptions(dir.path() + "/state", log), d);
  ASSERT_TRUE(r.Init().ok());
  r.SetAgentServer(srv->get(), /*listening=*/false);
  r.SetAgentPorts(&ports);
  r.StepOnce();
  EXPECT_EQ(log.Count("virtio-serial", "connected for VM"), 0);
  EXPECT_EQ(log.Count("virtio-serial", "refused"), 1);
  close(qemu);
  d.Stop();
}

}  // namespace
}  // namespace vkick
