// QmpVmDiscovery against a fake QMP server replaying real QEMU 7.2 replies
// (testdata/): device mapping (ids, anonymous devices behind a bridge,
// vhost-user), fallbacks, caching, garbage and events. No QEMU needed.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <set>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "controller/discovery/qmp_vm_discovery.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/qmp/fake_qmp_server.h"

namespace vkick {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using testing::FakeQmpServer;
using testing::FakeReply;

json Captured(const std::string& name) {
  std::ifstream in(std::string(VKICK_QMP_TESTDATA) + "/" + name);
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

FakeReply Return(json v) { return FakeReply{.reply = {{"return", std::move(v)}}}; }
FakeReply NoProperty(const std::string& p) {
  return FakeReply{.reply = {{"error", {{"class", "GenericError"},
                                        {"desc", absl::StrCat("Property '", p, "' not found")}}}}};
}

// qom-get answers for the VM capture_qmp.py started.
std::map<std::pair<std::string, std::string>, json> CapturedQom() {
  const std::string l = "/machine/peripheral/legacy0", m = "/machine/peripheral/modern0",
                    a = "/machine/peripheral-anon/device[0]", v = "/machine/peripheral/vublk0";
  std::map<std::pair<std::string, std::string>, json> q = {
      {{l, "type"}, "virtio-blk-pci"},       {{l, "disable-legacy"}, "off"},
      {{l, "disable-modern"}, true},         {{l, "page-per-vq"}, false},
      {{l, "num-queues"}, 2},                {{m, "type"}, "virtio-blk-pci"},
      {{m, "disable-legacy"}, "on"},         {{m, "disable-modern"}, false},
      {{m, "page-per-vq"}, true},            {{m, "num-queues"}, 3},
      // The anonymous device behind bridge br0: no num-queues anywhere, so
      // x-query-virtio-status decides.
      {{a, "type"}, "virtio-blk-pci"},       {{a, "addr"}, 24},
      {{a, "parent_bus"}, "/machine/peripheral/br0/br0"},
      {{a, "disable-legacy"}, "off"},        {{a, "disable-modern"}, false},
      {{v, "type"}, "vhost-user-blk-pci"},   {{v, "disable-legacy"}, "off"},
      {{v, "disable-modern"}, false},        {{v, "chardev"}, "vu0"},
      {{v + "/virtio-backend", "num-queues"}, 2},
      {{"/chardevs/vu0", "addr"}, Captured("qom-get-chardev-vu0-addr.json")["return"]},
  };
  return q;
}

class FakeDiscoveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-fakeqmp-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/qmp.sock";
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Serve(FakeQmpServer::Handler h) {
    server_ = std::make_unique<FakeQmpServer>(path_, std::move(h));
    ASSERT_TRUE(server_->ok());
  }
  // The captured VM; `override` may replace any command's answer.
  void ServeCapturedVm(std::function<std::optional<FakeReply>(const std::string&, const json&)>
                           override = nullptr) {
    auto qom = CapturedQom();
    Serve([qom, override](const std::string& cmd, const json& args) -> FakeReply {
      if (override) {
        if (std::optional<FakeReply> r = override(cmd, args)) return *r;
      }
      if (cmd == "query-name") return Return(Captured("query-name.json")["return"]);
      if (cmd == "query-cpus-fast") return Return(Captured("query-cpus-fast.json")["return"]);
      if (cmd == "query-pci") return Return(Captured("query-pci.json")["return"]);
      if (cmd == "x-query-virtio") return Return(Captured("x-query-virtio.json")["return"]);
      if (cmd == "query-chardev") return Return(Captured("query-chardev.json")["return"]);
      if (cmd == "x-query-virtio-status") {
        return Return(Captured("x-query-virtio-status-legacy0.json")["return"]);
      }
      if (cmd == "qom-get") {
        auto it = qom.find({args["path"], args["property"]});
        if (it != qom.end()) return Return(it->second);
        return NoProperty(args["property"]);
      }
      return FakeReply{.reply = {{"error", {{"class", "CommandNotFound"}, {"desc", cmd}}}}};
    });
  }
  std::unique_ptr<QmpVmDiscovery> Connect(absl::Duration timeout = absl::Seconds(2)) {
    absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> d = QmpVmDiscovery::Connect(path_, timeout);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }

  std::string dir_, path_;
  std::unique_ptr<FakeQmpServer> server_;
};

const VirtioDeviceInfo* Find(const VmInfo& vm, const std::string& label) {
  for (const VirtioDeviceInfo& d : vm.devices) {
    if (d.label == label) return &d;
  }
  return nullptr;
}

TEST_F(FakeDiscoveryTest, CapturedVmMapsEveryVirtioDevice) {
  ServeCapturedVm();
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->name, "capture-vm");
  EXPECT_EQ(vm->pid, static_cast<uint32_t>(::getpid()));
  EXPECT_EQ(vm->qmp_path, path_);
  EXPECT_EQ(vm->vcpu_tids.size(), 2u);
  ASSERT_EQ(vm->devices.size(), 4u) << "legacy0, modern0, the anonymous one, vublk0";

  const VirtioDeviceInfo* legacy = Find(*vm, "legacy0");
  ASSERT_NE(legacy, nullptr);
  ASSERT_EQ(legacy->notify_targets.size(), 1u);
  EXPECT_EQ(legacy->notify_targets[0].addr, 0xd010u);
  EXPECT_TRUE(legacy->notify_targets[0].value_is_queue);

  const VirtioDeviceInfo* modern = Find(*vm, "modern0");
  ASSERT_NE(modern, nullptr);
  ASSERT_EQ(modern->notify_targets.size(), 3u);
  EXPECT_EQ(modern->notify_targets[2].addr, 0xfd800000u + 0x3000 + 2 * 0x1000);  // page-per-vq

  const VirtioDeviceInfo* anon = Find(*vm, "0000:01:03.0");
  ASSERT_NE(anon, nullptr);
  EXPECT_EQ(anon->qom_path, "/machine/peripheral-anon/device[0]")
      << "matched by devfn 24 on the bus behind br0 (secondary bus 1)";
  EXPECT_EQ(anon->num_queues, 2) << "from x-query-virtio-status num-vqs";
  ASSERT_EQ(anon->notify_targets.size(), 3u);
  EXPECT_EQ(anon->notify_targets[0].addr, 0xc010u);
  EXPECT_EQ(anon->notify_targets[1].addr, 0xfe003000u);

  const VirtioDeviceInfo* vu = Find(*vm, "vublk0");
  ASSERT_NE(vu, nullptr);
  EXPECT_TRUE(vu->vhost_user);
  EXPECT_EQ(vu->type, "vhost-user-blk-pci");
  EXPECT_EQ(vu->chardev, "vu0");
  EXPECT_THAT(vu->socket_path, HasSubstr("/vhost.sock")) << "query-chardev says \"unix:\": addr";
  EXPECT_EQ(vu->socket_fd, -1) << "nothing in this process is connected to that path";
  EXPECT_EQ(vu->num_queues, 2) << "from <path>/virtio-backend";

  std::set<uint16_t> ids;
  for (const VirtioDeviceInfo& d : vm->devices) ids.insert(d.device_id);
  EXPECT_EQ(ids.size(), 4u);

  // A second refresh re-reads the BARs but not the static properties (nor
  // the name, fixed for the process).
  size_t before = server_->commands().size();
  absl::StatusOr<VmInfo> again = disc->Refresh();
  ASSERT_TRUE(again.ok()) << again.status();
  std::vector<std::string> cmds = server_->commands();
  std::vector<std::string> second(cmds.begin() + before, cmds.end());
  EXPECT_THAT(second, ::testing::ElementsAre("query-cpus-fast", "query-pci", "query-status",
                                             "query-migrate", "x-query-virtio"));
  for (const VirtioDeviceInfo& d : again->devices) {
    EXPECT_EQ(d.device_id, Find(*vm, d.label)->device_id) << d.label;
  }
}

TEST_F(FakeDiscoveryTest, AcceleratorAskedOnceAndOnlyForAVmWithAVhostUserDevice) {
  ServeCapturedVm([](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd == "query-kvm") return Return({{"enabled", false}, {"present", true}});
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<VmInfo> vm = disc->Refresh();
    ASSERT_TRUE(vm.ok()) << vm.status();
    EXPECT_EQ(vm->kvm, std::optional<bool>(false)) << "TCG: its vhost-user kicks are write()s";
  }
  std::vector<std::string> cmds = server_->commands();
  EXPECT_EQ(std::count(cmds.begin(), cmds.end(), "query-kvm"), 1) << "the accelerator cannot change";
}

TEST_F(FakeDiscoveryTest, AcceleratorUnknownWhenQemuDoesNotSay) {
  ServeCapturedVm();  // query-kvm: CommandNotFound
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_FALSE(vm->kvm.has_value());
}

TEST_F(FakeDiscoveryTest, UnnamedVmIsNamedByPid) {
  ServeCapturedVm([](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd == "query-name") return Return(json::object());
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->name, absl::StrCat("pid", ::getpid()));
}

TEST_F(FakeDiscoveryTest, DeviceIdsSurviveADeviceGoingAway) {
  std::atomic<bool> without_modern{false};
  ServeCapturedVm([&](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd != "query-pci" || !without_modern) return std::nullopt;
    json pci = Captured("query-pci.json")["return"];
    json& devs = pci[0]["devices"];
    for (auto it = devs.begin(); it != devs.end(); ++it) {
      if ((*it)["qdev_id"] == "modern0") {
        devs.erase(it);
        break;
      }
    }
    return Return(pci);
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> first = disc->Refresh();
  ASSERT_TRUE(first.ok());
  without_modern = true;
  absl::StatusOr<VmInfo> second = disc->Refresh();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->devices.size(), 3u);
  EXPECT_EQ(Find(*second, "modern0"), nullptr);
  without_modern = false;
  absl::StatusOr<VmInfo> third = disc->Refresh();
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(Find(*third, "modern0")->device_id, Find(*first, "modern0")->device_id);
  EXPECT_EQ(Find(*third, "legacy0")->device_id, Find(*first, "legacy0")->device_id);
}

TEST_F(FakeDiscoveryTest, WrongTypedRepliesAreInvalidArgument) {
  ServeCapturedVm([](const std::string& cmd, const json& args) -> std::optional<FakeReply> {
    if (cmd == "query-pci") return Return(json{{"oops", 1}});
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  EXPECT_EQ(vm.status().code(), absl::StatusCode::kInvalidArgument) << vm.status();
}

TEST_F(FakeDiscoveryTest, WrongTypedPropertyIsInvalidArgument) {
  ServeCapturedVm([](const std::string& cmd, const json& args) -> std::optional<FakeReply> {
    if (cmd == "qom-get" && args["property"] == "num-queues") return Return("three");
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  EXPECT_EQ(disc->Refresh().status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FakeDiscoveryTest, GarbageIsDataLoss) {
  ServeCapturedVm([](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd == "query-cpus-fast") return FakeReply{.raw = "\x01\x02 garbage {"};
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  EXPECT_EQ(disc->Refresh().status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(FakeDiscoveryTest, HangIsDeadlineExceeded) {
  ServeCapturedVm([](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd == "query-pci") return FakeReply{.hang = true};
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect(absl::Milliseconds(300));
  ASSERT_NE(disc, nullptr);
  EXPECT_EQ(disc->Refresh().status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(FakeDiscoveryTest, RunStateAndUuidFromQueryStatusMigrateAndUuid) {
  std::string status = "running", migration = "active";
  ServeCapturedVm([&](const std::string& cmd, const json&) -> std::optional<FakeReply> {
    if (cmd == "query-status") return Return({{"status", status}, {"running", status == "running"}});
    if (cmd == "query-migrate") return Return({{"status", migration}});
    if (cmd == "query-uuid") return Return({{"UUID", "5f0c1c2e-0000-4000-8000-00000000beef"}});
    return std::nullopt;
  });
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->run_state, RunState::kMigrating);
  EXPECT_EQ(vm->uuid, "5f0c1c2e-0000-4000-8000-00000000beef");
  status = "postmigrate";
  migration = "completed";
  vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->run_state, RunState::kPostMigrate);
  size_t uuids = 0;
  for (const std::string& c : server_->commands()) uuids += c == "query-uuid";
  EXPECT_EQ(uuids, 1u) << "fixed for the process: asked once";
}

TEST_F(FakeDiscoveryTest, RunStateUnknownWhenQemuRefusesTheQueries) {
  ServeCapturedVm();  // query-status/-migrate/-uuid: CommandNotFound
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<VmInfo> vm = disc->Refresh();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->run_state, RunState::kUnknown);
  EXPECT_EQ(vm->uuid, "");
}

TEST_F(FakeDiscoveryTest, EventsThatMatter) {
  ServeCapturedVm();
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  absl::StatusOr<bool> none = disc->WaitForEvent(absl::Milliseconds(50));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(*none);
  // POWERDOWN changes nothing discovery cares about; STOP (the run state) does.
  server_->SendEvent(R"({"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 0}})");
  absl::StatusOr<bool> other = disc->WaitForEvent(absl::Milliseconds(200));
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(*other);
  server_->SendEvent(R"({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}})");
  absl::StatusOr<bool> stop = disc->WaitForEvent(absl::Seconds(2));
  ASSERT_TRUE(stop.ok());
  EXPECT_TRUE(*stop);
  server_->SendEvent(R"({"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}})");
  absl::StatusOr<bool> reset = disc->WaitForEvent(absl::Seconds(2));
  ASSERT_TRUE(reset.ok());
  EXPECT_TRUE(*reset);
  server_->SendEvent(R"({"event": "DEVICE_DELETED", "data": {"device": "modern0", "path": "/machine/peripheral/modern0"}})");
  EXPECT_TRUE(*disc->WaitForEvent(absl::Seconds(2)));
  // A guest's poweroff: QEMU may stay (-no-shutdown), in state "shutdown".
  server_->SendEvent(R"({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}})");
  EXPECT_TRUE(*disc->WaitForEvent(absl::Seconds(2)));
  // `quit`: QEMU exits for certain.
  server_->SendEvent(R"({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})");
  EXPECT_EQ(disc->WaitForEvent(absl::Seconds(2)).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(FakeDiscoveryTest, PeerClosingIsUnavailable) {
  ServeCapturedVm();
  std::unique_ptr<QmpVmDiscovery> disc = Connect();
  ASSERT_NE(disc, nullptr);
  server_->Disconnect();
  EXPECT_EQ(disc->WaitForEvent(absl::Seconds(2)).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(disc->Refresh().status().code(), absl::StatusCode::kUnavailable);
}

TEST(IsDiscoveryEvent, Names) {
  EXPECT_TRUE(IsDiscoveryEvent("RESET"));
  EXPECT_TRUE(IsDiscoveryEvent("DEVICE_DELETED"));
  for (const char* e : {"STOP", "RESUME", "SUSPEND", "WAKEUP", "MIGRATION"}) {
    EXPECT_TRUE(IsDiscoveryEvent(e)) << e;
  }
  EXPECT_FALSE(IsDiscoveryEvent("MIGRATION_PASS"));
  EXPECT_FALSE(IsDiscoveryEvent("BLOCK_JOB_COMPLETED"));
}

}  // namespace
}  // namespace vkick
