#include "agent/registry.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "agent/channel.h"
#include "gtest/gtest.h"

namespace vkick::agent {
namespace {

constexpr char kDir[] = "/dev/shm/vkick";

std::string Good(int pid = 123) {
  return absl::StrCat(R"({"pid":)", pid,
                      R"(,"transport":"vhost-user","socket":"/tmp/x/vu.sock","pci":"","serial":"disk-1",)"
                      R"("queues":2,"queue_size":256,"control_block":"/dev/shm/vkick/control-)",
                      pid, R"("})");
}

TEST(Registry, ParsesAGoodEntry) {
  auto e = ParseDriverEntry(Good(), "123.json", kDir);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->pid, 123);
  EXPECT_EQ(e->transport, DriverEntry::Transport::kVhostUser);
  EXPECT_EQ(e->socket, "/tmp/x/vu.sock");
  EXPECT_EQ(e->serial, "disk-1");
  EXPECT_EQ(e->queues, 2);
  EXPECT_EQ(e->queue_size, 256);
  EXPECT_EQ(e->control_block, "/dev/shm/vkick/control-123");
  proto::GuestDevice d = ToGuestDevice(*e);
  EXPECT_EQ(d.pci_domain, 0);
  EXPECT_EQ(d.pci_bus, 0);
  EXPECT_EQ(d.pci_devfn, 0);
  EXPECT_EQ(d.serial, "disk-1");
  EXPECT_EQ(d.num_queues, 2);
}

TEST(Registry, SerialSpacesBecomeUnderscoresInHello) {
  auto e = ParseDriverEntry(
      R"({"pid":5,"transport":"vhost-user","serial":"my disk","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
      "5.json", kDir);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->serial, "my disk");
  EXPECT_EQ(ToGuestDevice(*e).serial, "my_disk");
}

TEST(Registry, PciEntryGivesItsAddress) {
  auto e = ParseDriverEntry(
      R"({"pid":7,"transport":"pci","socket":"","pci":"0000:00:04.0","serial":"","queues":4,"queue_size":128,)"
      R"("control_block":"/dev/shm/vkick/control-7"})",
      "7.json", kDir);
  ASSERT_TRUE(e.ok()) << e.status();
  proto::GuestDevice d = ToGuestDevice(*e);
  EXPECT_EQ(d.pci_bus, 0);
  EXPECT_EQ(d.pci_devfn, 4 << 3);
  uint16_t dom;
  uint8_t bus, devfn;
  ASSERT_TRUE(ParsePciAddress("0001:1a:1f.7", &dom, &bus, &devfn));
  EXPECT_EQ(dom, 1);
  EXPECT_EQ(bus, 0x1a);
  EXPECT_EQ(devfn, (0x1f << 3) | 7);
  EXPECT_FALSE(ParsePciAddress("0000:00:20.0", &dom, &bus, &devfn));  // slot > 31
  EXPECT_FALSE(ParsePciAddress("0000:00:04.8", &dom, &bus, &devfn));
  EXPECT_FALSE(ParsePciAddress("00:04.0", &dom, &bus, &devfn));
}

TEST(Registry, RejectsMalformedEntries) {
  struct Case {
    std::string json, file, reason;
  } cases[] = {
      {"not json", "123.json", "not_json"},
      {"[1,2]", "123.json", "not_json"},
      {Good(), "124.json", "pid_mismatch"},
      {R"({"pid":-1})", "-1.json", "bad_pid"},
      {R"({"pid":"123"})", "123.json", "bad_pid"},
      {R"({"pid":123,"transport":"tcp"})", "123.json", "bad_transport"},
      {R"({"pid":123,"transport":"pci","pci":"zz","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_pci"},
      {R"({"pid":123,"transport":"vhost-user","serial":"tab\there","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_serial"},
      {R"({"pid":123,"transport":"vhost-user","serial":"123456789012345678901","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_serial"},
      {R"({"pid":123,"transport":"vhost-user","queues":0,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_queues"},
      {R"({"pid":123,"transport":"vhost-user","queues":65,"queue_size":8,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_queues"},
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":40000,"control_block":"/dev/shm/vkick/c"})",
       "123.json", "bad_queue_size"},
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8})", "123.json", "bad_control_block"},
      // The agent (root) writes the control block: never outside its directory.
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,"control_block":"/etc/passwd"})",
       "123.json", "control_block_outside_dir"},
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/../x"})",
       "123.json", "control_block_outside_dir"},
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,"control_block":"/dev/shm/vkick/a/b"})",
       "123.json", "control_block_outside_dir"},
      {R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,"control_block":"/dev/shm/vkickX/c"})",
       "123.json", "control_block_outside_dir"},
      {std::string(5000, ' '), "123.json", "too_big"},
  };
  for (const Case& c : cases) {
    auto e = ParseDriverEntry(c.json, c.file, kDir);
    ASSERT_FALSE(e.ok()) << c.json;
    EXPECT_EQ(e.status().message(), c.reason) << c.json;
  }
}

std::string WithStats(const std::string& stats_json_value) {
  return absl::StrCat(R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,)"
                      R"("control_block":"/dev/shm/vkick/control-123","stats_block":)",
                      stats_json_value, "}");
}

TEST(Registry, StatsBlockInsideTheControlDirIsParsed) {
  auto e = ParseDriverEntry(WithStats(R"("/dev/shm/vkick/stats-123")"), "123.json", kDir);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->stats_block, "/dev/shm/vkick/stats-123");
  EXPECT_EQ(e->control_block, "/dev/shm/vkick/control-123");
}

TEST(Registry, AbsentOrEmptyStatsBlockIsAcceptedAsNone) {
  auto e = ParseDriverEntry(Good(), "123.json", kDir);  // an older driver: no key
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->stats_block.empty());
  e = ParseDriverEntry(WithStats(R"("")"), "123.json", kDir);  // vkick-blk --stats_block=
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->stats_block.empty());
}

TEST(Registry, StatsBlockOutsideTheControlDirIsRejected) {
  // The agent (root) opens it: never a path a driver could aim anywhere.
  for (const char* path : {"/etc/passwd", "/dev/shm/vkick/../x", "/dev/shm/vkick/a/b", "/dev/shm/vkick/",
                           "/dev/shm/vkick/..", "/dev/shm/vkick/.", "/dev/shm/vkickX/stats", "/dev/shm/vkick",
                           "dev/shm/vkick/stats", "stats-123"}) {
    auto e = ParseDriverEntry(WithStats(absl::StrCat("\"", path, "\"")), "123.json", kDir);
    ASSERT_FALSE(e.ok()) << path;
    EXPECT_EQ(e.status().message(), "stats_block_outside_dir") << path;
  }
  const std::string long_name = absl::StrCat("\"/dev/shm/vkick/", std::string(256, 'n'), "\"");
  auto e = ParseDriverEntry(WithStats(long_name), "123.json", kDir);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().message(), "stats_block_outside_dir");
}

TEST(Registry, StatsBlockOfTheWrongTypeIsRejected) {
  for (const char* v : {"42", "null", "[\"/dev/shm/vkick/s\"]", "{}", "true"}) {
    auto e = ParseDriverEntry(WithStats(v), "123.json", kDir);
    ASSERT_FALSE(e.ok()) << v;
    EXPECT_EQ(e.status().message(), "bad_stats_block") << v;
  }
}

TEST(Registry, StatsBlockDirIsTheConfiguredControlDir) {
  auto e = ParseDriverEntry(WithStats(R"("/run/other/stats-123")"), "123.json", "/run/other");
  // The control block is checked first, against the same directory.
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().message(), "control_block_outside_dir");
  e = ParseDriverEntry(
      R"({"pid":123,"transport":"vhost-user","queues":1,"queue_size":8,"control_block":"/run/other/c",)"
      R"("stats_block":"/run/other/stats-123"})",
      "123.json", "/run/other");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->stats_block, "/run/other/stats-123");
}

class ScanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-agent-registry-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    ASSERT_EQ(mkdir((root_ + "/drivers").c_str(), 0755), 0);
    ASSERT_EQ(mkdir((root_ + "/proc").c_str(), 0755), 0);
  }
  void TearDown() override { std::system(("rm -rf " + root_).c_str()); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(root_ + "/drivers/" + name) << text;
  }
  void Alive(int pid) { mkdir(absl::StrCat(root_, "/proc/", pid).c_str(), 0755); }
  std::string root_;
};

TEST_F(ScanTest, LiveEntriesKeptOthersCounted) {
  Write("123.json", Good(123));
  Alive(123);
  Write("99.json", Good(99));
  Alive(99);
  Write("200.json", Good(200));  // pid 200 not alive
  Write("300.json", "{garbage");
  Write("301.json", Good(302));
  Write("notes.txt", "ignored: not *.json");
  symlink("/etc/passwd", (root_ + "/drivers/400.json").c_str());
  RegistryScan s = ScanRegistry(root_ + "/drivers", kDir, root_ + "/proc");
  ASSERT_EQ(s.drivers.size(), 2u);
  EXPECT_EQ(s.drivers[0].pid, 99);  // sorted by pid
  EXPECT_EQ(s.drivers[1].pid, 123);
  EXPECT_EQ(s.rejected["dead_pid"], 1u);
  EXPECT_EQ(s.rejected["not_json"], 1u);
  EXPECT_EQ(s.rejected["pid_mismatch"], 1u);
  EXPECT_EQ(s.rejected["unreadable"], 1u);  // symlink not followed
}

TEST_F(ScanTest, MissingDirIsEmpty) {
  RegistryScan s = ScanRegistry(root_ + "/nope", kDir, root_ + "/proc");
  EXPECT_TRUE(s.drivers.empty());
  EXPECT_TRUE(s.rejected.empty());
}

TEST_F(ScanTest, BoundedNumberOfDrivers) {
  for (int pid = 1000; pid < 1000 + 20; ++pid) {
    Write(absl::StrCat(pid, ".json"), Good(pid));
    Alive(pid);
  }
  RegistryScan s = ScanRegistry(root_ + "/drivers", kDir, root_ + "/proc");
  EXPECT_EQ(s.drivers.size(), kMaxRegisteredDrivers);
  EXPECT_EQ(s.rejected["too_many"], 20 - kMaxRegisteredDrivers);
}

TEST_F(ScanTest, FloodedDirectoryCostsABoundedScan) {
  for (int i = 0; i < 300; ++i) Write(absl::StrCat("junk", i, ".json"), "x");
  RegistryScan s = ScanRegistry(root_ + "/drivers", kDir, root_ + "/proc");
  EXPECT_TRUE(s.drivers.empty());
  EXPECT_EQ(s.rejected["not_json"], kMaxRegistryFilesPerScan);
  EXPECT_EQ(s.rejected["too_many"], 300 - kMaxRegistryFilesPerScan);
}

TEST_F(ScanTest, VirtioPortFoundByName) {
  const std::string sys = root_ + "/sys";
  mkdir(sys.c_str(), 0755);
  mkdir((sys + "/vport0p1").c_str(), 0755);
  mkdir((sys + "/vport0p2").c_str(), 0755);
  std::ofstream(sys + "/vport0p1/name") << "org.qemu.guest_agent.0\n";
  std::ofstream(sys + "/vport0p2/name") << "org.vkick.agent.0\n";
  auto p = FindVirtioPort("org.vkick.agent.0", sys, "/dev");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "/dev/vport0p2");
  EXPECT_EQ(FindVirtioPort("org.vkick.other", sys, "/dev").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(FindVirtioPort("x", root_ + "/none", "/dev").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vkick::agent
