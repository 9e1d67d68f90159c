// Finding a VM's virtio-serial agent port over QMP (agent_port.h), against
// replies captured from QEMU 7.2 (-device virtserialport,name=org.vkick.agent.0).
#include "controller/daemon/agent_port.h"

#include "gtest/gtest.h"

namespace vkick {
namespace {

using nlohmann::json;

struct FakeQmp {
  int calls = 0;
  bool with_port = true;
  QmpExec Exec() {
    return [this](absl::string_view cmd, const json& args) -> absl::StatusOr<json> {
      ++calls;
      if (cmd == "qom-list" && args["path"] == "/machine/peripheral")
        return json::parse(R"([{"name":"type","type":"string"},
          {"name":"disk0","type":"child<virtio-blk-pci>"},
          {"name":"vser0","type":"child<virtio-serial-pci>"}])");
      if (cmd == "qom-list" && args["path"] == "/machine/peripheral-anon")
        return with_port ? json::parse(R"([{"name":"type","type":"string"},
          {"name":"device[0]","type":"child<virtserialport>"},
          {"name":"device[1]","type":"child<virtserialport>"}])")
                         : json::parse(R"([{"name":"type","type":"string"}])");
      if (cmd == "qom-get" && args["path"] == "/machine/peripheral-anon/device[0]")
        return json(args["property"] == "name" ? "org.qemu.guest_agent.0" : "qga0");
      if (cmd == "qom-get" && args["path"] == "/machine/peripheral-anon/device[1]")
        return json(args["property"] == "name" ? "org.vkick.agent.0" : "vkickagent0");
      if (cmd == "query-chardev")
        return json::parse(R"([
          {"frontend-open":false,"filename":"disconnected:unix:/run/vm1/agent.sock,server=on","label":"vkickagent0"},
          {"frontend-open":true,"filename":"unix:/run/vm1/qmp.sock,server=on","label":"compat_monitor0"}])");
      return absl::NotFoundError("fake: unexpected command");
    };
  }
};

TEST(AgentPortTest, FindsThePortByNameAndItsSocketPath) {
  FakeQmp q;
  auto p = FindAgentPortSocket(q.Exec(), kAgentPortName);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "/run/vm1/agent.sock");
  q.with_port = false;
  EXPECT_EQ(FindAgentPortSocket(q.Exec(), kAgentPortName).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(AgentPortTest, ChardevPaths) {
  EXPECT_EQ(AgentChardevPath("unix:/a/b.sock,server=on"), "/a/b.sock");
  EXPECT_EQ(AgentChardevPath("disconnected:unix:/a/b.sock,server=on"), "/a/b.sock");
  EXPECT_EQ(AgentChardevPath("unix:"), "");
  EXPECT_EQ(AgentChardevPath("pty:/dev/pts/3"), "");
}

class FakeDiscovery : public VmDiscovery {
 public:
  uint32_t pid = 100;
  absl::StatusOr<VmInfo> Refresh() override {
    VmInfo i;
    i.pid = pid;
    return i;
  }
  absl::StatusOr<bool> WaitForEvent(absl::Duration) override { return false; }
};

TEST(AgentPortTest, DecoratorRecordsThePortOncePerProcess) {
  FakeQmp q;
  AgentPortRegistry reg;
  auto inner = std::make_unique<FakeDiscovery>();
  FakeDiscovery* raw = inner.get();
  AgentPortDiscovery d(std::move(inner), q.Exec(), "/vm1.qmp", &reg);
  ASSERT_TRUE(d.Refresh().ok());
  EXPECT_EQ(reg.Get("/vm1.qmp"), "/run/vm1/agent.sock");
  int calls = q.calls;
  ASSERT_TRUE(d.Refresh().ok());
  EXPECT_EQ(q.calls, calls) << "the port is static: not asked again";
  raw->pid = 101;  // QEMU restarted: ask again
  q.with_port = false;
  ASSERT_TRUE(d.Refresh().ok());
  EXPECT_EQ(reg.Get("/vm1.qmp"), "");
}

}  // namespace
}  // namespace vkick
