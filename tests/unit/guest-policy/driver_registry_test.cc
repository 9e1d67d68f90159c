// vkick-blk's side of the agent contract: the driver registry file and the
// control block watcher (docs/kick-policies.md). Real files in a temp dir.
#include "tests/unit/temp_dir.h"
#include "guest-policy/tool/driver_registry.h"

#include <stdlib.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "guest-policy/tool/control_mapping.h"
#include "nlohmann/json.hpp"

namespace vkick {
namespace {

// A fresh directory, removed with everything in it when the test ends.
struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-registry-test") {}
};

std::string Slurp(const std::string& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(DriverRegistry, SerialIsPrintableAndBounded) {
  EXPECT_EQ(SanitizeSerial("disk0"), "disk0");
  EXPECT_EQ(SanitizeSerial(std::string("ab\0cd", 5)), "ab") << "GET_ID pads with NULs";
  EXPECT_EQ(SanitizeSerial("a\nb\x7f" "c\xff"), "abc");
  EXPECT_EQ(SanitizeSerial(std::string(40, 'x')), std::string(20, 'x'));
  EXPECT_EQ(SerialFromSocketPath("/run/vu/disk-a.sock"), "disk-a");
  EXPECT_EQ(SerialFromSocketPath("vu"), "vu");
  EXPECT_EQ(SerialFromSocketPath("/x/.hidden"), ".hidden");
  EXPECT_EQ(SerialFromSocketPath("/x/a.b.sock"), "a.b");
  EXPECT_EQ(SerialFromSocketPath("/x/my disk+1.sock"), "my_disk_1");
  EXPECT_EQ(SerialFromSocketPath("/x/a\tb:c.sock"), "a_b:c");
  EXPECT_TRUE(IsProtocolSerial("abc-123"));
  EXPECT_TRUE(IsProtocolSerial(""));
  EXPECT_TRUE(IsProtocolSerial("a.b_c:d-E9"));
  EXPECT_FALSE(IsProtocolSerial("has space"));
  EXPECT_FALSE(IsProtocolSerial("x/y"));
  EXPECT_FALSE(IsProtocolSerial(std::string(21, 'x')));
  EXPECT_EQ(SerialFromSocketPath("/x/" + std::string(30, 'q') + ".sock"), std::string(20, 'q'));
}

TEST(DriverRegistry, RunDirFromFlagThenEnvThenDefault) {
  unsetenv("VKICK_RUN_DIR");
  EXPECT_EQ(ResolveRunDir(""), "/run/vkick");
  setenv("VKICK_RUN_DIR", "/tmp/r", 1);
  EXPECT_EQ(ResolveRunDir(""), "/tmp/r");
  EXPECT_EQ(ResolveRunDir("/flag"), "/flag");
  unsetenv("VKICK_RUN_DIR");
  EXPECT_EQ(DefaultControlBlockPath(42), "/dev/shm/vkick/control-42");
}

TEST(DriverRegistry, WritesTheDocumentedJsonAndRemovesItWithTheObject) {
  TempDir tmp;
  const std::string dir = tmp.path() + "/nested/run";  // created on demand
  DriverInfo d{1234, "pci", "", "0000:00:04.0", "serial-x", 2, 256, "/dev/shm/vkick/control-1234", ""};
  std::string path;
  {
    auto reg = DriverRegistration::Create(dir, d);
    ASSERT_TRUE(reg.ok()) << reg.status();
    path = reg->path();
    EXPECT_EQ(path, dir + "/drivers/1234.json");
    auto j = nlohmann::json::parse(Slurp(path));
    EXPECT_EQ(j, nlohmann::json::parse(R"({"pid":1234,"transport":"pci","socket":"","pci":"0000:00:04.0",
      "serial":"serial-x","queues":2,"queue_size":256,"control_block":"/dev/shm/vkick/control-1234"})"));
    EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir + "/drivers"),
                            std::filesystem::directory_iterator()),
              1)
        << "no tmp file left behind";
    DriverRegistration moved = *std::move(reg);  // moved-from must not unlink
    EXPECT_TRUE(std::filesystem::exists(path));
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(DriverRegistry, UnwritableRunDirIsAnError) {
  auto reg = DriverRegistration::Create("/proc/vkick-cannot-exist", DriverInfo{1, "vhost-user"});
  EXPECT_FALSE(reg.ok());
}

TEST(DriverRegistry, JsonNamesTheStatsBlockOnlyWhenThereIsOne) {
  DriverInfo d{1234, "pci", "", "0000:00:04.0", "serial-x", 2, 256, "/dev/shm/vkick/control-1234", ""};
  auto j = nlohmann::json::parse(DriverInfoJson(d));
  EXPECT_FALSE(j.contains("stats_block")) << "an empty path is omitted, not written as \"\"";
  d.stats_block = "/dev/shm/vkick/stats-1234";
  j = nlohmann::json::parse(DriverInfoJson(d));
  ASSERT_TRUE(j.contains("stats_block"));
  EXPECT_EQ(j["stats_block"], "/dev/shm/vkick/stats-1234");
  EXPECT_EQ(j["control_block"], "/dev/shm/vkick/control-1234");
}

TEST(DriverRegistry, StatsBlockGoesBesideTheControlBlock) {
  EXPECT_EQ(StatsBlockPathBeside("/dev/shm/vkick/control-42", 42), "/dev/shm/vkick/stats-42");
  EXPECT_EQ(StatsBlockPathBeside("/run/x/ctl", 7), "/run/x/stats-7");
  EXPECT_EQ(StatsBlockPathBeside(DefaultControlBlockPath(9), 9), "/dev/shm/vkick/stats-9");
}

std::string StatsPath(const TempDir& tmp) { return tmp.path() + "/shm/vkick/stats-" + std::to_string(getpid()); }

TEST(StatsFile, CreatesAValidBlockOfTheRightSize) {
  TempDir tmp;
  const std::string path = StatsPath(tmp);  // directories created on demand
  auto sf = StatsFile::Create(path, 3);
  ASSERT_TRUE(sf.ok()) << sf.status();
  EXPECT_EQ(sf->path(), path);
  ASSERT_NE(sf->block(), nullptr);
  EXPECT_EQ(std::filesystem::file_size(path), sizeof(StatsBlock));
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(path, &buf);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->num_queues, 3);
  EXPECT_EQ(v->writer_pid, static_cast<uint64_t>(getpid()));
  EXPECT_EQ(v->queues[0].requests, 0u);
}

TEST(StatsFile, WritesThroughTheBlockAreVisibleToAReader) {
  TempDir tmp;
  const std::string path = StatsPath(tmp);
  auto sf = StatsFile::Create(path, 2);
  ASSERT_TRUE(sf.ok()) << sf.status();
  StatsAdd(sf->block()->queues[1].requests, 17);
  StatsAdd(sf->block()->queues[1].asks, 5);
  sf->block()->queues[0].latency_hist[15] = 2;
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(path, &buf);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->queues[1].requests, 17u);
  EXPECT_EQ(v->queues[1].asks, 5u);
  EXPECT_EQ(v->queues[0].latency_hist[15], 2u);
}

TEST(StatsFile, RemovedWithTheObjectButNotByAMovedFromOne) {
  TempDir tmp;
  const std::string path = StatsPath(tmp);
  {
    auto sf = StatsFile::Create(path, 1);
    ASSERT_TRUE(sf.ok()) << sf.status();
    StatsFile moved = *std::move(sf);
    EXPECT_TRUE(std::filesystem::exists(path)) << "the moved-from object must not unlink";
    EXPECT_EQ(moved.path(), path);
    StatsAdd(moved.block()->queues[0].kicks, 1);  // still mapped
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(StatsFile, ALeftoverFileIsReplacedWithZeroCounters) {
  TempDir tmp;
  const std::string path = StatsPath(tmp);
  std::filesystem::create_directories(tmp.path() + "/shm/vkick");
  // A dead driver's block of our pid, with counters.
  StatsBlock old{};
  InitStatsBlock(&old, 1, static_cast<uint64_t>(getpid()));
  old.queues[0].requests = 999;
  old.queues[0].kicks = 5;
  {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(&old), sizeof(old));
  }
  auto sf = StatsFile::Create(path, 1);
  ASSERT_TRUE(sf.ok()) << sf.status();
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(path, &buf);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->queues[0].requests, 0u);
  EXPECT_EQ(v->queues[0].kicks, 0u);
  EXPECT_EQ(sf->block()->queues[0].requests, 0u);
}

TEST(StatsFile, ALeftoverSymlinkIsReplacedAndItsTargetUntouched) {
  TempDir tmp;
  const std::string path = StatsPath(tmp);
  std::filesystem::create_directories(tmp.path() + "/shm/vkick");
  const std::string victim = tmp.path() + "/victim";
  {
    std::ofstream f(victim);
    f << "precious";
  }
  ASSERT_EQ(symlink(victim.c_str(), path.c_str()), 0);
  auto sf = StatsFile::Create(path, 1);
  ASSERT_TRUE(sf.ok()) << sf.status();
  EXPECT_FALSE(std::filesystem::is_symlink(path));
  EXPECT_EQ(Slurp(victim), "precious");
  EXPECT_EQ(std::filesystem::file_size(path), sizeof(StatsBlock));
}

TEST(StatsFile, QueueCountIsClampedIntoTheBlock) {
  TempDir tmp;
  auto sf = StatsFile::Create(tmp.path() + "/a", 40);
  ASSERT_TRUE(sf.ok()) << sf.status();
  EXPECT_EQ(sf->block()->num_queues, kStatsBlockMaxQueues);
  auto sf0 = StatsFile::Create(tmp.path() + "/b", 0);
  ASSERT_TRUE(sf0.ok()) << sf0.status();
  EXPECT_EQ(sf0->block()->num_queues, 1);
}

TEST(StatsFile, AnUncreatableDirectoryIsAnError) {
  EXPECT_FALSE(StatsFile::Create("/proc/vkick-cannot-exist/stats-1", 1).ok());
}

TEST(DriverRegistry, RegistrationWithAStatsBlockWritesItsPath) {
  TempDir tmp;
  DriverInfo d{4321, "vhost-user", "/tmp/vu.sock", "", "s", 1, 64, "/dev/shm/vkick/control-4321",
               "/dev/shm/vkick/stats-4321"};
  auto reg = DriverRegistration::Create(tmp.path(), d);
  ASSERT_TRUE(reg.ok()) << reg.status();
  auto j = nlohmann::json::parse(Slurp(reg->path()));
  EXPECT_EQ(j["stats_block"], "/dev/shm/vkick/stats-4321");
}

// Killed by a signal, the driver still removes its registry entry and its
// stats block (the handler only has the paths it was given).
TEST(DriverRegistry, AFatalSignalRemovesTheEntryAndTheStatsBlock) {
  TempDir tmp;
  const std::string stats = tmp.path() + "/shm/stats-child";
  const std::string run = tmp.path() + "/run";
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto sf = StatsFile::Create(stats, 1);
    if (!sf.ok()) _exit(2);
    DriverInfo d{static_cast<int>(getpid()), "vhost-user", "", "", "", 1, 64, "/dev/shm/vkick/control-x", stats};
    auto reg = DriverRegistration::Create(run, d);
    if (!reg.ok()) _exit(3);
    if (!std::filesystem::exists(stats) || !std::filesystem::exists(reg->path())) _exit(4);
    raise(SIGTERM);
    _exit(5);  // not reached
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit code " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
  EXPECT_FALSE(std::filesystem::exists(stats)) << "stats block left behind";
  EXPECT_FALSE(std::filesystem::exists(run + "/drivers/" + std::to_string(child) + ".json"));
}

void WriteBlock(const std::string& path, uint16_t batch) {
  ControlBlock cb;
  InitControlBlock(&cb, 1);
  ControlEntry e{};
  e.mode = static_cast<uint8_t>(ControlMode::kStatic);
  e.batch = batch;
  e.lease_expiry_ns = ~0ull;
  WriteControlEntries(&cb, &e, 1);
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(std::fwrite(&cb, sizeof(cb), 1, f), 1u);
  std::fclose(f);
  ASSERT_EQ(std::rename(tmp.c_str(), path.c_str()), 0);
}

TEST(ControlWatcher, FollowsAppearReplaceRemoveAtMostOncePerPeriod) {
  TempDir tmp;
  const std::string path = tmp.path() + "/control";
  ControlWatcher w(path, 100);
  bool changed = true;
  EXPECT_EQ(w.Refresh(1000, &changed), nullptr);
  EXPECT_FALSE(changed);
  WriteBlock(path, 8);
  EXPECT_EQ(w.Refresh(1050, &changed), nullptr) << "re-checked only once per period";
  const ControlBlock* cb = w.Refresh(1100, &changed);
  ASSERT_NE(cb, nullptr);
  EXPECT_TRUE(changed);
  EXPECT_EQ(ReadControlBlock(cb, 0, 256).snapshot->batch, 8u);
  EXPECT_EQ(w.Refresh(1300, &changed), cb);
  EXPECT_FALSE(changed) << "same inode: no remap";
  WriteBlock(path, 16);  // the agent renamed a new file over it
  cb = w.Refresh(1400, &changed);
  ASSERT_NE(cb, nullptr);
  EXPECT_TRUE(changed);
  EXPECT_EQ(ReadControlBlock(cb, 0, 256).snapshot->batch, 16u);
  ASSERT_EQ(unlink(path.c_str()), 0);
  EXPECT_EQ(w.Refresh(1500, &changed), nullptr);
  EXPECT_TRUE(changed);
  EXPECT_EQ(w.maps(), 2u);
  EXPECT_EQ(w.unmaps(), 1u);
  // A short file is refused (mapping it would SIGBUS), not mapped.
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fputs("short", f);
  std::fclose(f);
  EXPECT_EQ(w.Refresh(1600, &changed), nullptr);
  EXPECT_FALSE(ControlMapping::Open(path).ok());
  EXPECT_EQ(ControlMapping::Open(path + ".none").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vkick
