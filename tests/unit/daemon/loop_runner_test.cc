// The loop runner with a fake daemon world: discovered queues get policies,
// the host's counts drive the rates, admin changes persist and are restored
// by a new runner (a vkickd restart), a gone VM's queues go, an unwritable
// state dir refuses the change instead of losing it silently.
#include "controller/daemon/loop_runner.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/daemon/fakes.h"

namespace vkick {
namespace {

using testing::Eventually;
using testing::FakeProbeBackend;
using testing::FakeWorld;
using testing::LogCapture;
using testing::QmpMode;
using testing::TwoDiskVm;

class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/vkick-runner-XXXXXX";
    path_ = mkdtemp(t);
  }
  ~TempDir() { std::system(("rm -rf " + path_).c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
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
  d.Start();
  ASSERT_TRUE(Eventually([&] { return d.Scrape().vms.size() == 1; }));
  uint32_t vm_id = d.Scrape().vms[0].vm_id;

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

  // The VM goes away: its queues leave the loop (and the metrics).
  world.Set("/vm1.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return d.Scrape().vms.empty(); }));
  r2.StepOnce();
  EXPECT_TRUE(r2.Snapshot().queues.empty());
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

}  // namespace
}  // namespace vkick
