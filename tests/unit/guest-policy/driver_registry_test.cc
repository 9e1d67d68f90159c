// vkick-blk's side of the agent contract: the driver registry file and the
// control block watcher (docs/kick-policies.md). Real files in a temp dir.
#include "guest-policy/tool/driver_registry.h"

#include <stdlib.h>
#include <sys/stat.h>
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
struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/vkick-registry-test-XXXXXX";
    const char* d = mkdtemp(tmpl);
    EXPECT_NE(d, nullptr);
    path = d ? d : "/tmp/vkick-registry-test-failed";
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string path;
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
  const std::string dir = tmp.path + "/nested/run";  // created on demand
  DriverInfo d{1234, "pci", "", "0000:00:04.0", "serial-x", 2, 256, "/dev/shm/vkick/control-1234"};
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
  const std::string path = tmp.path + "/control";
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
