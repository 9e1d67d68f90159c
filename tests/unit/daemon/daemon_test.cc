// The daemon core against fakes: attachment, refresh, VM gone, QMP errors.
#include "controller/daemon/daemon.h"

#include <memory>
#include <string>

#include "exporters/vkick_collector.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"
#include "tests/unit/daemon/fakes.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::Eventually;
using testing::FakeProbeBackend;
using testing::FakeWorld;
using testing::LogCapture;
using testing::QmpMode;
using testing::TwoDiskVm;

DaemonOptions FastOptions(std::vector<std::string> paths, LogCapture& log) {
  DaemonOptions o;
  o.qmp_paths = std::move(paths);
  o.refresh_interval = absl::Milliseconds(10);
  o.min_backoff = absl::Milliseconds(5);
  o.max_backoff = absl::Milliseconds(20);
  o.event_slice = absl::Milliseconds(5);
  o.departed_retention = absl::ZeroDuration();  // DepartedVmKeepsItsFinalCounts sets it
  o.log = log.Sink();
  return o;
}

std::string Exposition(Daemon& d) {
  return prometheus::TextSerializer().Serialize(BuildMetricFamilies(
      (*d.Tick()), [](uint32_t, uint32_t r) { return absl::StrCat("r", r); }, "test"));
}

TEST(ClassifyQmpErrorTest, MapsStatusCodesToReasons) {
  EXPECT_EQ(ClassifyQmpError(absl::UnavailableError(""), false), QmpErrorReason::kConnect);
  EXPECT_EQ(ClassifyQmpError(absl::NotFoundError(""), false), QmpErrorReason::kConnect);
  EXPECT_EQ(ClassifyQmpError(absl::UnavailableError(""), true), QmpErrorReason::kGone);
  EXPECT_EQ(ClassifyQmpError(absl::DeadlineExceededError(""), true), QmpErrorReason::kTimeout);
  EXPECT_EQ(ClassifyQmpError(absl::DeadlineExceededError(""), false), QmpErrorReason::kTimeout);
  EXPECT_EQ(ClassifyQmpError(absl::DataLossError(""), true), QmpErrorReason::kProtocol);
  EXPECT_EQ(ClassifyQmpError(absl::InvalidArgumentError(""), false), QmpErrorReason::kProtocol);
}

TEST(DaemonTest, AttachesTracksAndProgramsTargetsOnce) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm1.qmp", QmpMode::kLive, TwoDiskVm("vm1", 1000));
  Daemon d(FastOptions({"/vm1.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());

  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 1; }));
  auto [vm_id, pid] = *probes.tracked().begin();
  EXPECT_EQ(pid, 1000u);
  ASSERT_TRUE(Eventually([&] { return probes.targets().count(vm_id) == 1; }));
  EXPECT_EQ(probes.targets()[vm_id].size(), 3u);

  // Many refreshes later the unchanged map was not rewritten.
  int r0 = world.refreshes("/vm1.qmp");
  ASSERT_TRUE(Eventually([&] { return world.refreshes("/vm1.qmp") >= r0 + 5; }));
  EXPECT_EQ(probes.set_targets_calls(), 1);
  EXPECT_EQ(probes.track_calls(), 1);

  DaemonSnapshot s = (*d.Tick());
  ASSERT_EQ(s.vms.size(), 1u);
  EXPECT_EQ(s.vms[0].vm_id, vm_id);
  EXPECT_EQ(s.vms[0].info.name, "vm1");
  EXPECT_EQ(s.vms[0].info.qmp_path, "/vm1.qmp");
  ASSERT_EQ(s.qmp.size(), 1u);
  EXPECT_TRUE(s.qmp[0].connected);
  EXPECT_GE(s.discovery_duration.histogram.sample_count, 5u);
  EXPECT_EQ(log.Count("/vm1.qmp", "attached VM 'vm1' pid 1000"), 1);

  // Every discovered queue has its series, at 0.
  std::string text = Exposition(d);
  EXPECT_THAT(text, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"vm1\",device=\"disk0\",queue=\"1\"} 0"));
  EXPECT_THAT(text, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"vm1\",device=\"disk1\",queue=\"0\"} 0"));
  d.Stop();
  EXPECT_TRUE(probes.tracked().empty()) << "Stop() untracks";
}

// A restart with pinned probes: the VM whose QMP reports an adopted pid
// gets that pid's old vm_id (its counters continue); a new VM never gets an
// adopted id; an adopted pid no VM claims within the grace (two refresh
// intervals) is dropped; a clean stop leaves the VMs tracked.
TEST(DaemonTest, AdoptedVmIdsGoToTheirPidUnclaimedOnesAreDroppedAfterTheGrace) {
  FakeWorld world;
  FakeProbeBackend probes;
  probes.set_adopted({{{1000, 5}, {2000, 7}}, 9});
  probes.set_keeps_counts(true);
  LogCapture log;
  world.Set("/a.qmp", QmpMode::kLive, TwoDiskVm("a", 1000));
  world.Set("/b.qmp", QmpMode::kLive, TwoDiskVm("b", 3000));
  Daemon d(FastOptions({"/a.qmp", "/b.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 2; }));
  std::map<uint32_t, uint32_t> tracked = probes.tracked();  // vm_id -> pid
  EXPECT_EQ(tracked[5], 1000u) << "the adopted pid keeps its vm_id";
  ASSERT_EQ(tracked.count(7), 0u);
  EXPECT_EQ(tracked.rbegin()->first, 9u) << "the new VM's id is above every adopted one";
  EXPECT_EQ(tracked.rbegin()->second, 3000u);

  ASSERT_TRUE(Eventually([&] {
    d.Tick();
    return !probes.untracked().empty();
  }));
  EXPECT_EQ(probes.untracked(), (std::vector<std::pair<uint32_t, uint32_t>>{{2000, 7}}));
  EXPECT_EQ(log.Count("pid 2000 (vm_id 7, adopted", "claimed by no VM"), 1);
  d.Tick();
  EXPECT_EQ(probes.untracked().size(), 1u) << "dropped once";

  d.Stop();
  EXPECT_EQ(probes.tracked().size(), 2u) << "pinned: a clean stop keeps the VMs for the next start";
  EXPECT_EQ(probes.untracked().size(), 1u);
}

TEST(DaemonTest, AnAdoptedPidIsKeptThroughTheGrace) {
  FakeWorld world;
  FakeProbeBackend probes;
  probes.set_adopted({{{2000, 3}}, 4});
  LogCapture log;
  world.Set("/b.qmp", QmpMode::kLive, TwoDiskVm("b", 3000));
  DaemonOptions o = FastOptions({"/b.qmp"}, log);
  o.refresh_interval = absl::Hours(1);  // grace: 2 h
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 1; }));
  EXPECT_EQ(probes.tracked().begin()->first, 4u);
  for (int i = 0; i < 5; ++i) d.Tick();
  EXPECT_TRUE(probes.untracked().empty()) << "within the grace its VM may still show up";
  d.Stop();
  EXPECT_TRUE(probes.tracked().empty()) << "not pinned: a clean stop untracks";
}

TEST(DaemonTest, RefreshAppliesChangedTargetsAndEventsTriggerRefresh) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("vm", 42, 0xfe000000));
  DaemonOptions o = FastOptions({"/vm.qmp"}, log);
  o.refresh_interval = absl::Hours(1);  // only events refresh in this test
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return probes.set_targets_calls() == 1; }));

  // The firmware moves BAR4; the VM reports it on the next refresh, which
  // a QMP event triggers long before the periodic one.
  world.Update("/vm.qmp", TwoDiskVm("vm", 42, 0xfd000000));
  world.PushEvent("/vm.qmp");
  ASSERT_TRUE(Eventually([&] { return probes.set_targets_calls() == 2; }));
  auto t = probes.targets().begin()->second;
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(t[0].addr, 0xfd003000u);
  EXPECT_EQ(log.Count("/vm.qmp", "notify targets changed"), 1);
  EXPECT_EQ(probes.track_calls(), 1) << "same VM, tracked once";
}

TEST(DaemonTest, VmGoneUntracksAndDropsSeriesThenReattachesOnRestart) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("vmgone", 7));
  Daemon d(FastOptions({"/vm.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 1; }));
  uint32_t old_id = probes.tracked().begin()->first;
  ASSERT_THAT(Exposition(d), HasSubstr("vm=\"vmgone\""));

  world.Set("/vm.qmp", QmpMode::kMissing);  // QEMU quit: connection closed, socket gone
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.empty(); }));
  ASSERT_TRUE(Eventually([&] { return probes.tracked().empty(); }));
  ASSERT_EQ(probes.untracked().size(), 1u);
  EXPECT_EQ(probes.untracked()[0], std::make_pair(7u, old_id));
  std::string text = Exposition(d);
  EXPECT_THAT(text, Not(HasSubstr("vmgone")));
  EXPECT_THAT(text, HasSubstr("vkick_qmp_connected{qmp=\"/vm.qmp\"} 0"));
  EXPECT_EQ((*d.Tick()).qmp[0].errors[static_cast<int>(QmpErrorReason::kGone)], 1u);
  EXPECT_EQ(log.Count("/vm.qmp", "detached VM 'vmgone'"), 1);

  // The VM is started again on the same path: a new process, a new vm_id.
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("vmgone", 8));
  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 1; }));
  EXPECT_NE(probes.tracked().begin()->first, old_id);
  EXPECT_EQ(probes.tracked().begin()->second, 8u);
  EXPECT_THAT(Exposition(d), HasSubstr("vkick_vm_info{vm=\"vmgone\",pid=\"8\"} 1"));
}

TEST(DaemonTest, QmpErrorsCountedPerReasonWhileOtherVmsWork) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/missing.qmp", QmpMode::kMissing);
  world.Set("/hung.qmp", QmpMode::kHung, TwoDiskVm("hung", 11));
  world.Set("/garbage.qmp", QmpMode::kGarbage, TwoDiskVm("garbage", 12));
  world.Set("/ok.qmp", QmpMode::kLive, TwoDiskVm("ok", 13));
  Daemon d(FastOptions({"/missing.qmp", "/hung.qmp", "/garbage.qmp", "/ok.qmp"}, log), &probes,
           world.Factory());
  ASSERT_TRUE(d.Start().ok());

  auto errors = [&](int i, QmpErrorReason r) {
    return (*d.Tick()).qmp[i].errors[static_cast<int>(r)];
  };
  ASSERT_TRUE(Eventually([&] {
    return errors(0, QmpErrorReason::kConnect) >= 3 && errors(1, QmpErrorReason::kTimeout) >= 3 &&
           errors(2, QmpErrorReason::kProtocol) >= 3;
  }));
  // Each path failed only for its own reason.
  EXPECT_EQ(errors(0, QmpErrorReason::kTimeout) + errors(0, QmpErrorReason::kProtocol), 0u);
  EXPECT_EQ(errors(1, QmpErrorReason::kConnect) + errors(1, QmpErrorReason::kProtocol), 0u);
  EXPECT_EQ(errors(2, QmpErrorReason::kConnect) + errors(2, QmpErrorReason::kTimeout), 0u);
  EXPECT_EQ(errors(3, QmpErrorReason::kConnect) + errors(3, QmpErrorReason::kTimeout) +
                errors(3, QmpErrorReason::kProtocol) + errors(3, QmpErrorReason::kGone),
            0u);

  // The healthy VM is attached; the broken ones are not.
  DaemonSnapshot s = (*d.Tick());
  ASSERT_EQ(s.vms.size(), 1u);
  EXPECT_EQ(s.vms[0].info.name, "ok");
  EXPECT_TRUE(s.qmp[3].connected);
  EXPECT_FALSE(s.qmp[0].connected);

  // One log line per state change, not one per retry.
  EXPECT_EQ(log.Count("qmp /missing.qmp: connect error"), 1);
  EXPECT_EQ(log.Count("qmp /hung.qmp: timeout error"), 1);
  EXPECT_EQ(log.Count("qmp /garbage.qmp: protocol error"), 1);

  std::string text = Exposition(d);
  EXPECT_THAT(text, HasSubstr("vkick_qmp_errors_total{qmp=\"/ok.qmp\",reason=\"gone\"} 0"));
  EXPECT_THAT(text, HasSubstr("vkick_qmp_errors_total{qmp=\"/hung.qmp\",reason=\"timeout\"} "));

  // The hung one recovers: attached, and a new state is logged once.
  world.Set("/hung.qmp", QmpMode::kLive, TwoDiskVm("hung", 11));
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 2; }));
  EXPECT_EQ(log.Count("qmp /hung.qmp: attached VM 'hung'"), 1);
}

TEST(DaemonTest, VhostUserSocketDeclaredOncePerDevice) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  VmInfo vm = TwoDiskVm("vu", 55);
  VirtioDeviceInfo vu;
  vu.label = "vhost0";
  vu.type = "vhost-user-blk-pci";
  vu.device_id = 3;
  vu.num_queues = 4;
  vu.vhost_user = true;
  vu.socket_fd = -1;  // not resolved yet
  vm.devices.push_back(vu);
  world.Set("/vu.qmp", QmpMode::kLive, vm);
  Daemon d(FastOptions({"/vu.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  int r0 = 0;
  ASSERT_TRUE(Eventually([&] { return (r0 = world.refreshes("/vu.qmp")) >= 3; }));
  EXPECT_TRUE(probes.vhost_sockets().empty()) << "no fd resolved, nothing to declare";

  vm.devices.back().socket_fd = 21;
  world.Update("/vu.qmp", vm);
  ASSERT_TRUE(Eventually([&] { return probes.vhost_sockets().size() == 1; }));
  ASSERT_TRUE(Eventually([&] { return world.refreshes("/vu.qmp") >= r0 + 10; }));
  ASSERT_EQ(probes.vhost_sockets().size(), 1u);
  EXPECT_EQ(probes.vhost_sockets()[0].tgid, 55u);
  EXPECT_EQ(probes.vhost_sockets()[0].fd, 21);
  EXPECT_EQ(probes.vhost_sockets()[0].device_id, 3);
}

TEST(DaemonTest, ProbeControlFailuresAreCountedAndRetried) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  probes.set_fail_track(true);
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("vm", 9));
  Daemon d(FastOptions({"/vm.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).probe_errors.control >= 3; }));
  EXPECT_EQ(log.Count("probe TrackProcess"), 1) << "logged once, counted every time";
  EXPECT_TRUE(probes.targets().empty()) << "no targets for an untracked VM";
  probes.set_fail_track(false);
  ASSERT_TRUE(Eventually([&] { return probes.targets().size() == 1; }));
}

TEST(DaemonTest, RunsWithoutProbesAndWithoutQmp) {
  LogCapture log;
  FakeWorld world;
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("np", 5));
  Daemon none(FastOptions({}, log), nullptr, world.Factory());
  EXPECT_FALSE(none.CheckHealth(absl::Seconds(5)).ok) << "not started";
  ASSERT_TRUE(none.Start().ok());
  EXPECT_TRUE(none.CheckHealth(absl::Seconds(5)).ok) << "no probes: nothing to read";
  DaemonSnapshot s = (*none.Tick());
  EXPECT_FALSE(s.probes_enabled);
  EXPECT_FALSE(s.counters.has_value());
  EXPECT_THAT(Exposition(none), HasSubstr("vkick_probes_attached 0"));
  none.Stop();
  EXPECT_FALSE(none.CheckHealth(absl::Seconds(5)).ok) << "stopped";

  Daemon noprobes(FastOptions({"/vm.qmp"}, log), nullptr, world.Factory());
  ASSERT_TRUE(noprobes.Start().ok());
  ASSERT_TRUE(Eventually([&] { return (*noprobes.Tick()).vms.size() == 1; }));
  EXPECT_THAT(Exposition(noprobes),
              HasSubstr("vkick_virtqueue_notifications_total{vm=\"np\",device=\"disk0\",queue=\"0\"} 0"));
}

TEST(DaemonTest, HealthAndScrapeReportUnreadableProbes) {
  LogCapture log;
  FakeWorld world;
  FakeProbeBackend probes;
  Daemon d(FastOptions({}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  EXPECT_FALSE(d.CheckHealth(absl::Seconds(5)).ok) << "no Tick() has read the probes yet";
  EXPECT_THAT(Exposition(d), HasSubstr("vkick_probes_attached 1"));
  EXPECT_TRUE(d.CheckHealth(absl::Seconds(5)).ok);
  absl::SleepFor(absl::Milliseconds(20));
  Daemon::Health stale = d.CheckHealth(absl::Milliseconds(10));
  EXPECT_FALSE(stale.ok) << "the loop stopped reading the probes";
  EXPECT_THAT(stale.reason, HasSubstr("last read"));
  probes.set_fail_read(true);
  EXPECT_TRUE(d.CheckHealth(absl::Seconds(5)).ok) << "health reads nothing itself";
  std::string text = Exposition(d);  // a Tick()
  Daemon::Health h = d.CheckHealth(absl::Seconds(5));
  EXPECT_FALSE(h.ok);
  EXPECT_THAT(h.reason, HasSubstr("maps unreadable"));
  EXPECT_THAT(text, HasSubstr("vkick_probes_attached 0"));
  EXPECT_THAT(text, HasSubstr("vkick_probe_errors_total{reason=\"read_counters\"} 1"));
}

// The VM a full map left out, and the one it let in (vm_ids from the fake).
struct Placed {
  std::string in_path, out_path, in_name, out_name;
  uint32_t in_vm_id = 0, out_vm_id = 0;
};

// Two VMs, room for one: whichever attachment thread came first is in.
Placed PlaceTwo(Daemon& d, FakeProbeBackend& probes) {
  Placed p;
  EXPECT_TRUE(Eventually([&] {
    DaemonSnapshot s = (*d.Tick());
    return s.vms.size() == 2 && (s.vms[0].probed != s.vms[1].probed);
  }));
  for (const AttachedVm& vm : (*d.Tick()).vms) {
    (vm.probed ? p.in_path : p.out_path) = vm.info.qmp_path;
    (vm.probed ? p.in_name : p.out_name) = vm.info.name;
    (vm.probed ? p.in_vm_id : p.out_vm_id) = vm.vm_id;
  }
  EXPECT_EQ(probes.targets().size(), 1u);
  EXPECT_EQ(probes.targets().count(p.in_vm_id), 1u);
  return p;
}

TEST(DaemonTest, AFullNotifyMapLeavesAVmOutMarkedCountedLoggedOnceRetriedOnRoom) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  probes.set_target_capacity(3);  // one TwoDiskVm (3 targets)
  world.Set("/a.qmp", QmpMode::kLive, TwoDiskVm("a", 100));
  world.Set("/b.qmp", QmpMode::kLive, TwoDiskVm("b", 200));
  Daemon d(FastOptions({"/a.qmp", "/b.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  Placed p = PlaceTwo(d, probes);

  // No retry storm: many refreshes later, still one refused attempt.
  const int calls = probes.set_targets_calls();
  for (const std::string& path : {p.in_path, p.out_path}) {
    const int r0 = world.refreshes(path);
    ASSERT_TRUE(Eventually([&] { return world.refreshes(path) >= r0 + 10; }));
  }
  EXPECT_EQ(probes.set_targets_calls(), calls);
  DaemonSnapshot s = (*d.Tick());
  EXPECT_EQ(s.map_full[static_cast<int>(ProbeMap::kNotify)], 1u);
  EXPECT_EQ(s.probe_errors.control, 0u) << "a full map is not a control error";
  for (const AttachedVm& vm : s.vms) {
    EXPECT_EQ(vm.map_full.has_value(), !vm.probed) << vm.info.name;
  }
  EXPECT_EQ(log.Count("probe map 'notify' is full", p.out_name), 1);
  std::string text = Exposition(d);
  EXPECT_THAT(text, HasSubstr(absl::StrCat("vkick_vm_probed{vm=\"", p.out_name, "\"} 0")));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("vkick_vm_probed{vm=\"", p.in_name, "\"} 1")));
  EXPECT_THAT(text, HasSubstr("vkick_probe_map_full_total{map=\"notify\"} 1"));
  EXPECT_THAT(text, HasSubstr("vkick_probe_map_full_total{map=\"tracked\"} 0"));

  // The VM that fit goes away: its room lets the other in, once.
  world.Set(p.in_path, QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return probes.targets().count(p.out_vm_id) == 1; }));
  ASSERT_TRUE(Eventually([&] {
    DaemonSnapshot t = (*d.Tick());
    return t.vms.size() == 1 && t.vms[0].probed && !t.vms[0].map_full;
  }));
  EXPECT_EQ((*d.Tick()).map_full[static_cast<int>(ProbeMap::kNotify)], 1u);
}

TEST(DaemonTest, AFullTrackedMapIsRetriedOnlyWhenRoomAppears) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  probes.set_tracked_capacity(1);
  world.Set("/a.qmp", QmpMode::kLive, TwoDiskVm("a", 100));
  world.Set("/b.qmp", QmpMode::kLive, TwoDiskVm("b", 200));
  Daemon d(FastOptions({"/a.qmp", "/b.qmp"}, log), &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  Placed p = PlaceTwo(d, probes);
  const int calls = probes.track_calls();
  const int r0 = world.refreshes(p.out_path);
  ASSERT_TRUE(Eventually([&] { return world.refreshes(p.out_path) >= r0 + 10; }));
  EXPECT_EQ(probes.track_calls(), calls);
  EXPECT_EQ((*d.Tick()).map_full[static_cast<int>(ProbeMap::kTracked)], 1u);
  EXPECT_EQ(log.Count("probe map 'tracked' is full"), 1);
  EXPECT_EQ(log.Count("probe TrackProcess"), 0) << "the daemon logs a full map, once";

  world.Set(p.in_path, QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return probes.targets().count(p.out_vm_id) == 1; }));
}

VmInfo VhostUserVm(std::string name, uint32_t pid, std::optional<bool> kvm) {
  VmInfo vm = TwoDiskVm(std::move(name), pid);
  VirtioDeviceInfo vu;
  vu.label = "vhost0";
  vu.type = "vhost-user-blk-pci";
  vu.device_id = 3;
  vu.num_queues = 2;
  vu.vhost_user = true;
  vm.devices.push_back(vu);
  vm.kvm = kvm;
  return vm;
}

TEST(NeedsKickSyscallsTest, OnlyAVhostUserDeviceKvmDoesNotRun) {
  EXPECT_FALSE(NeedsKickSyscalls(TwoDiskVm("plain", 1)));
  EXPECT_TRUE(NeedsKickSyscalls(VhostUserVm("tcg", 1, false)));
  EXPECT_TRUE(NeedsKickSyscalls(VhostUserVm("unknown", 1, std::nullopt)));
  EXPECT_FALSE(NeedsKickSyscalls(VhostUserVm("kvm", 1, true)));
}

TEST(DaemonTest, KickSyscallsAttachedOnlyWhileAVmNeedsThem) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/kvm.qmp", QmpMode::kLive, VhostUserVm("kvm", 100, true));
  DaemonOptions o = FastOptions({"/kvm.qmp", "/tcg.qmp"}, log);
  o.kick_syscalls = true;
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 1; }));
  const int r0 = world.refreshes("/kvm.qmp");
  ASSERT_TRUE(Eventually([&] { return world.refreshes("/kvm.qmp") >= r0 + 5; }));
  EXPECT_FALSE(probes.kick_syscalls()) << "KVM counts that VM's kicks (ioeventfd)";
  EXPECT_THAT(Exposition(d), HasSubstr("vkick_probe_kick_syscalls_attached 0"));

  world.Set("/tcg.qmp", QmpMode::kLive, VhostUserVm("tcg", 200, false));
  ASSERT_TRUE(Eventually([&] { return probes.kick_syscalls(); }));
  EXPECT_THAT(Exposition(d), HasSubstr("vkick_probe_kick_syscalls_attached 1"));
  EXPECT_EQ(log.Count("kick syscall probes attached", "VM 'tcg'"), 1);

  world.Set("/tcg.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return !probes.kick_syscalls(); }));
  EXPECT_EQ(log.Count("kick syscall probes detached"), 1);
  EXPECT_EQ(probes.kick_syscall_switches(), 2);
  d.Stop();
}

TEST(DaemonTest, KickSyscallsStayOffWithoutTheFlagAndOnForFrontends) {
  FakeWorld world;
  LogCapture log;
  world.Set("/tcg.qmp", QmpMode::kLive, VhostUserVm("tcg", 200, false));
  {
    FakeProbeBackend probes;
    Daemon d(FastOptions({"/tcg.qmp"}, log), &probes, world.Factory());  // no --vhost-user-kicks
    ASSERT_TRUE(d.Start().ok());
    ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 1; }));
    EXPECT_FALSE(probes.kick_syscalls());
    EXPECT_EQ(probes.kick_syscall_switches(), 0);
  }
  FakeProbeBackend probes;
  DaemonOptions o = FastOptions({"/tcg.qmp"}, log);
  o.kick_syscalls = true;
  o.vhost_user = {{"disk0", "/run/disk0.sock"}};
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  EXPECT_TRUE(probes.kick_syscalls()) << "a frontend may connect right after Start()";
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 2; }));
  world.Set("/tcg.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return (*d.Tick()).vms.size() == 1; }));
  EXPECT_TRUE(probes.kick_syscalls()) << "the frontends still need them";
  EXPECT_EQ(probes.kick_syscall_switches(), 1);
}

TEST(DaemonTest, QmpDirSocketsAreAttachedWhileTheyExist) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  auto dir = std::make_shared<testing::FakeQmpDir>();
  world.Set("/d/a.qmp", QmpMode::kLive, TwoDiskVm("a", 11));
  world.Set("/d/b.qmp", QmpMode::kLive, TwoDiskVm("b", 12));
  DaemonOptions o = FastOptions({"/static.qmp"}, log);
  o.qmp_dir = dir;
  dir->Add("/d/a.qmp");
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 1; })) << "there before start";
  dir->Add("/d/b.qmp");
  dir->Add("/d/a.qmp");  // a repeated arrival attaches once
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 2; }));
  EXPECT_EQ(probes.tracked().size(), 2u);
  EXPECT_EQ(d.Tick()->qmp.size(), 3u) << "--qmp first, then the directory's";
  EXPECT_EQ(d.Tick()->qmp[0].qmp_path, "/static.qmp");

  dir->Remove("/d/a.qmp");
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 1; }));
  EXPECT_EQ(d.Tick()->vms[0].info.name, "b");
  EXPECT_EQ(probes.tracked().size(), 1u) << "its VM untracked";
  std::string text = Exposition(d);
  EXPECT_THAT(text, Not(HasSubstr("/d/a.qmp"))) << "its series go with it";
  EXPECT_THAT(text, HasSubstr("vkick_qmp_connected{qmp=\"/d/b.qmp\"} 1"));
  EXPECT_EQ(log.Count("/d/a.qmp", "left --qmp-dir"), 1);
}

TEST(DaemonTest, ASocketThatJustAppearedMayRefuseForAMomentUncounted) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  auto dir = std::make_shared<testing::FakeQmpDir>();
  DaemonOptions o = FastOptions({}, log);
  o.qmp_dir = dir;
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  dir->Add("/d/slow.qmp");  // bound, not listening yet: connect refused
  absl::SleepFor(absl::Milliseconds(150));
  world.Set("/d/slow.qmp", QmpMode::kLive, TwoDiskVm("slow", 21));
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 1; }));
  auto snap = d.Tick();
  ASSERT_EQ(snap->qmp.size(), 1u);
  EXPECT_EQ(snap->qmp[0].errors[static_cast<int>(QmpErrorReason::kConnect)], 0u);
  EXPECT_EQ(log.Count("/d/slow.qmp", "connect error"), 0);

  dir->Add("/d/dead.qmp");  // a stale socket nobody will listen on
  ASSERT_TRUE(Eventually([&] {
    auto s = d.Tick();
    return s->qmp.size() == 2 && s->qmp[1].errors[static_cast<int>(QmpErrorReason::kConnect)] > 0;
  }, absl::Seconds(5))) << "counted once the grace is over";
}

TEST(DaemonTest, NoThreadPerVm) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  std::vector<std::string> paths;
  for (uint32_t i = 0; i < 300; ++i) {
    paths.push_back(absl::StrCat("/vm", i, ".qmp"));
    world.Set(paths.back(), QmpMode::kLive, TwoDiskVm(absl::StrCat("vm", i), 1000 + i));
  }
  DaemonOptions o = FastOptions(paths, log);
  o.refresh_interval = absl::Seconds(10);
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 300; }));
  EXPECT_LE(testing::ThreadCount(), 1 + 1 + o.discovery_workers)
      << "main, the loop and the workers";
  // Quiet VMs are not re-read before their interval: one refresh each.
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(world.refreshes("/vm7.qmp"), 1);
}

TEST(DaemonTest, AVmWithoutBarsIsReadAgainSoonAndBacksOff) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  VmInfo booting = TwoDiskVm("boot", 5);
  for (auto& dev : booting.devices) dev.notify_targets.clear();
  world.Set("/vm.qmp", QmpMode::kLive, booting);
  DaemonOptions o = FastOptions({"/vm.qmp"}, log);
  o.refresh_interval = absl::Hours(1);
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  // At 0 s, 1 s, 3 s: the firmware assigns BARs within seconds.
  ASSERT_TRUE(Eventually([&] { return world.refreshes("/vm.qmp") >= 2; }, absl::Seconds(3)));
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_EQ(world.refreshes("/vm.qmp"), 2) << "backing off, not polling";
  world.Update("/vm.qmp", TwoDiskVm("boot", 5));
  ASSERT_TRUE(Eventually([&] { return !probes.targets().empty(); }, absl::Seconds(4)));
}

TEST(DaemonTest, OnlyTickReadsTheProbes) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("vm", 5));
  DaemonOptions o = FastOptions({"/vm.qmp"}, log);
  o.vhost_user = {{"disk9", "/run/disk9.sock"}};
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  EXPECT_EQ(d.Latest()->vms.size(), 0u) << "nothing read before the first tick";
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.size() == 2; }));
  const int reads = probes.read_calls(), sweeps = probes.sweeps();
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(d.Latest()->vms.size(), 2u);
    EXPECT_TRUE(d.CheckHealth(absl::Seconds(5)).ok);
  }
  const auto rendered = prometheus::TextSerializer().Serialize(
      VkickCollector([&d] { return d.Latest(); },
                     [](uint32_t, uint32_t r) { return absl::StrCat("r", r); }, "test")
          .Collect());
  EXPECT_THAT(rendered, HasSubstr("vm=\"vm\""));
  EXPECT_EQ(probes.read_calls(), reads) << "rendering read the maps";
  EXPECT_EQ(probes.sweeps(), sweeps) << "rendering changed probe state";
  d.Tick();
  EXPECT_EQ(probes.read_calls(), reads + 1);
}

TEST(DaemonTest, ADepartedVmKeepsItsFinalCountsForTheRetention) {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  world.Set("/vm.qmp", QmpMode::kLive, TwoDiskVm("gone", 31));
  DaemonOptions o = FastOptions({"/vm.qmp"}, log);
  o.departed_retention = absl::Milliseconds(400);
  Daemon d(o, &probes, world.Factory());
  ASSERT_TRUE(d.Start().ok());
  ASSERT_TRUE(Eventually([&] { return probes.tracked().size() == 1; }));
  const uint32_t vm_id = probes.tracked().begin()->first;
  CounterSnapshot c;
  c.notifications.push_back({vm_id, 1, 1, 1234});  // disk0 queue 1
  probes.set_counters(c);
  const std::string series =
      "vkick_virtqueue_notifications_total{vm=\"gone\",device=\"disk0\",queue=\"1\"} 1234";
  ASSERT_THAT(Exposition(d), HasSubstr(series));

  world.Set("/vm.qmp", QmpMode::kMissing);  // QEMU exits: untracked, its counters dropped
  ASSERT_TRUE(Eventually([&] { return probes.tracked().empty(); }));
  probes.set_counters({});
  auto snap = d.Tick();
  ASSERT_EQ(snap->vms.size(), 1u);
  EXPECT_TRUE(snap->vms[0].departed);
  EXPECT_THAT(Exposition(d), HasSubstr(series)) << "the kicks since the last scrape are kept";
  ASSERT_TRUE(Eventually([&] { return d.Tick()->vms.empty(); }));
  EXPECT_THAT(Exposition(d), Not(HasSubstr("vm=\"gone\"")));
}

// ---- VM lifecycle: run state, migration (docs/operations.md "VM lifecycle")

namespace lifecycle {

constexpr char kUuid[] = "6c1e9d8a-1f0b-4e5c-9a1d-0000000000aa";

VmInfo Guest(uint32_t pid, RunState state, uint64_t bar = 0xfe000000) {
  VmInfo vm = TwoDiskVm("guest", pid, bar);
  vm.uuid = kUuid;
  vm.run_state = state;
  return vm;
}

// The destination's discovery numbers its devices its own way.
VmInfo Destination(uint32_t pid, RunState state) {
  VmInfo vm = Guest(pid, state, 0xfd000000);
  vm.devices[0].device_id = 7;  // disk0
  for (NotifyTarget& t : vm.devices[0].notify_targets) t.device_id = 7;
  return vm;
}

uint64_t Notifications(const DaemonSnapshot& s, uint32_t vm_id, uint16_t dev, uint16_t q) {
  uint64_t n = 0;
  if (!s.counters) return 0;
  for (const NotificationCount& c : s.counters->notifications) {
    if (c.vm_id == vm_id && c.device_id == dev && c.queue == q) n += c.count;
  }
  return n;
}

const AttachedVm* Live(const DaemonSnapshot& s, uint32_t pid) {
  for (const AttachedVm& vm : s.vms) {
    if (!vm.departed && vm.info.pid == pid) return &vm;
  }
  return nullptr;
}

struct Migration {
  FakeWorld world;
  FakeProbeBackend probes;
  LogCapture log;
  std::unique_ptr<Daemon> d;

  void Start(absl::Duration retention = absl::Seconds(60)) {
    DaemonOptions o = FastOptions({"/src.qmp", "/dst.qmp"}, log);
    o.departed_retention = retention;
    d = std::make_unique<Daemon>(o, &probes, world.Factory());
    ASSERT_TRUE(d->Start().ok());
  }
  uint32_t VmIdOf(uint32_t pid) {
    uint32_t id = 0;
    EXPECT_TRUE(Eventually([&] {
      for (const auto& [vm_id, tgid] : probes.tracked()) {
        if (tgid == pid) id = vm_id;
      }
      return id != 0;
    }));
    return id;
  }
  // Counts of disk0 queue 0 (device id `dev` in that QEMU) per vm_id.
  void Count(std::vector<std::tuple<uint32_t, uint16_t, uint64_t>> counts) {
    CounterSnapshot c;
    for (auto [vm_id, dev, n] : counts) c.notifications.push_back({vm_id, dev, 0, n});
    probes.set_counters(c);
  }
};

TEST(DaemonLifecycleTest, RunStateIsPublishedAndExported) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kRunning));
  m.Start();
  ASSERT_TRUE(Eventually([&] { return Live(*m.d->Tick(), 100) != nullptr; }));
  EXPECT_THAT(Exposition(*m.d), HasSubstr("vkick_vm_running{vm=\"guest\"} 1"));
  m.world.Update("/src.qmp", Guest(100, RunState::kPaused));
  m.world.PushEvent("/src.qmp");  // STOP
  ASSERT_TRUE(Eventually([&] {
    const AttachedVm* vm = Live(*m.d->Tick(), 100);
    return vm != nullptr && vm->info.run_state == RunState::kPaused;
  }));
  EXPECT_THAT(Exposition(*m.d), HasSubstr("vkick_vm_running{vm=\"guest\"} 0"));
}

TEST(DaemonLifecycleTest, ALiveMigratedVmTakesOverItsLabelAndContinuesItsCounts) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kRunning));
  m.Start();
  const uint32_t src = m.VmIdOf(100);
  m.Count({{src, 1, 300}});

  // The destination starts with -incoming: held, not a second VM.
  m.world.Set("/dst.qmp", QmpMode::kLive, Destination(200, RunState::kInMigrate));
  const uint32_t dst = m.VmIdOf(200);
  ASSERT_TRUE(Eventually([&] { return m.log.Count("migrating in (inmigrate)") == 1; }));
  auto snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u);
  EXPECT_EQ(snap->vms[0].info.pid, 100u);

  // Completed: the source is postmigrate, the destination runs.
  m.world.Update("/src.qmp", Guest(100, RunState::kPostMigrate));
  m.world.PushEvent("/src.qmp");
  m.world.Update("/dst.qmp", Destination(200, RunState::kRunning));
  m.world.PushEvent("/dst.qmp");
  ASSERT_TRUE(Eventually([&] { return Live(*m.d->Tick(), 200) != nullptr; }));
  m.Count({{src, 1, 300}, {dst, 7, 45}});
  snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u) << "the source left with its guest";
  EXPECT_EQ(snap->vms[0].info.pid, 200u);
  EXPECT_EQ(snap->vms[0].info.name, "guest");
  EXPECT_EQ(Notifications(*snap, dst, 7, 0), 345u) << "300 of the source + 45 of its own";
  const std::string series =
      "vkick_virtqueue_notifications_total{vm=\"guest\",device=\"disk0\",queue=\"0\"} 345";
  EXPECT_THAT(Exposition(*m.d), HasSubstr(series));
  const ProbeQueueId q{dst, 7, 0};
  auto totals = m.d->NotificationTotals({&q, 1});
  ASSERT_TRUE(totals.has_value());
  EXPECT_EQ((*totals)[q], 345u) << "sample stamps continue from the same base";
  EXPECT_EQ(m.log.Count("migrated: pid 200", "takes over from pid 100"), 1);

  // The source's QEMU refreshes on, then quits: never shown again, and
  // nothing counted twice (no departed copy of its 300).
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(m.d->Tick()->vms.size(), 1u);
  m.world.Set("/src.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return m.probes.tracked().count(src) == 0; }));
  snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u);
  EXPECT_THAT(Exposition(*m.d), HasSubstr(series));

  // And the destination departing keeps the carried counts in its final ones.
  m.world.Set("/dst.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return m.probes.tracked().empty(); }));
  m.Count({});  // untracked: the probes dropped its counts
  snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u);
  EXPECT_TRUE(snap->vms[0].departed);
  EXPECT_THAT(Exposition(*m.d), HasSubstr(series));
}

TEST(DaemonLifecycleTest, ARestoredVmContinuesFromTheSavedOnesFinalCounts) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kRunning));
  m.Start();
  const uint32_t src = m.VmIdOf(100);
  m.Count({{src, 1, 500}});
  // migrate "exec:cat > FILE": postmigrate, then the operator quits it.
  m.world.Update("/src.qmp", Guest(100, RunState::kPostMigrate));
  m.world.PushEvent("/src.qmp");
  ASSERT_TRUE(Eventually([&] {
    const AttachedVm* vm = Live(*m.d->Tick(), 100);
    return vm != nullptr && vm->info.run_state == RunState::kPostMigrate;
  }));
  m.world.Set("/src.qmp", QmpMode::kMissing);
  ASSERT_TRUE(Eventually([&] { return m.d->Tick()->vms.at(0).departed; }));
  m.Count({});  // its probe counts are gone with it; the departed copy has them

  // A new QEMU with -incoming "exec:cat FILE".
  m.world.Set("/dst.qmp", QmpMode::kLive, Destination(300, RunState::kInMigrate));
  const uint32_t dst = m.VmIdOf(300);
  ASSERT_TRUE(Eventually([&] { return m.log.Count("migrating in") == 1; }));
  EXPECT_TRUE(m.d->Tick()->vms.at(0).departed) << "held: not shown";
  m.world.Update("/dst.qmp", Destination(300, RunState::kRunning));
  m.world.PushEvent("/dst.qmp");
  ASSERT_TRUE(Eventually([&] { return Live(*m.d->Tick(), 300) != nullptr; }));
  m.Count({{dst, 7, 20}});
  auto snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u) << "the departed copy is now the base";
  EXPECT_FALSE(snap->vms[0].departed);
  EXPECT_EQ(Notifications(*snap, dst, 7, 0), 520u);
}

TEST(DaemonLifecycleTest, ADestinationSeenOnlyAfterTheMigrationStillTakesOver) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kPostMigrate));
  m.Start();
  const uint32_t src = m.VmIdOf(100);
  m.Count({{src, 1, 77}});
  ASSERT_TRUE(Eventually([&] { return Live(*m.d->Tick(), 100) != nullptr; }));
  m.world.Set("/dst.qmp", QmpMode::kLive, Destination(200, RunState::kRunning));
  const uint32_t dst = m.VmIdOf(200);
  ASSERT_TRUE(Eventually([&] { return Live(*m.d->Tick(), 200) != nullptr; }));
  auto snap = m.d->Tick();
  ASSERT_EQ(snap->vms.size(), 1u);
  EXPECT_EQ(Notifications(*snap, dst, 7, 0), 77u);
}

TEST(DaemonLifecycleTest, TwoRunningVmsWithOneIdentityAreNotAMigration) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kRunning));
  m.world.Set("/dst.qmp", QmpMode::kLive, Destination(200, RunState::kRunning));
  m.Start();
  const uint32_t a = m.VmIdOf(100), b = m.VmIdOf(200);
  m.Count({{a, 1, 10}, {b, 7, 20}});
  ASSERT_TRUE(Eventually([&] { return m.d->Tick()->vms.size() == 2; }));
  auto snap = m.d->Tick();
  EXPECT_EQ(Notifications(*snap, b, 7, 0), 20u) << "nothing carried";
  EXPECT_EQ(m.log.Count("migrated"), 0);
}

TEST(DaemonLifecycleTest, AnotherGuestIsNotTakenOver) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kPostMigrate));
  m.Start();
  const uint32_t src = m.VmIdOf(100);
  m.Count({{src, 1, 10}});
  VmInfo other = Destination(200, RunState::kInMigrate);
  other.uuid = "6c1e9d8a-1f0b-4e5c-9a1d-0000000000bb";  // same name, another -uuid
  m.world.Set("/dst.qmp", QmpMode::kLive, other);
  const uint32_t dst = m.VmIdOf(200);
  ASSERT_TRUE(Eventually([&] { return m.log.Count("migrating in") == 1; }));
  other.run_state = RunState::kRunning;
  m.world.Update("/dst.qmp", other);
  m.world.PushEvent("/dst.qmp");
  ASSERT_TRUE(Eventually([&] { return m.d->Tick()->vms.size() == 2; }));
  EXPECT_EQ(Notifications(*m.d->Tick(), dst, 7, 0), 0u);
  EXPECT_EQ(m.log.Count("migrated"), 0);
}

TEST(DaemonLifecycleTest, AFailedIncomingMigrationLeavesNoTrace) {
  Migration m;
  m.world.Set("/src.qmp", QmpMode::kLive, Guest(100, RunState::kMigrating));
  m.world.Set("/dst.qmp", QmpMode::kLive, Destination(200, RunState::kInMigrate));
  m.Start();
  m.VmIdOf(200);
  ASSERT_TRUE(Eventually([&] { return m.log.Count("migrating in") == 1; }));
  m.world.Set("/dst.qmp", QmpMode::kMissing);  // the incoming QEMU exits
  ASSERT_TRUE(Eventually([&] { return m.probes.tracked().size() == 1; }));
  m.world.Update("/src.qmp", Guest(100, RunState::kRunning));  // migration failed: runs on
  m.world.PushEvent("/src.qmp");
  ASSERT_TRUE(Eventually([&] {
    auto s = m.d->Tick();
    return s->vms.size() == 1 && s->vms[0].info.run_state == RunState::kRunning;
  }));
  EXPECT_EQ(m.log.Count("migrated"), 0);
}

}  // namespace lifecycle

}  // namespace
}  // namespace vkick
