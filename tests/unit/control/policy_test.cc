// Policy model (scopes, resolution, spec syntax) and PolicyStore persistence.
#include "tests/unit/temp_dir.h"
#include "controller/control/policy.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

namespace vkick {
namespace {

namespace fs = std::filesystem;

PolicySpec Static(uint32_t b, uint64_t us) { return {KickMode::kStatic, b, us * 1000}; }

struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-policy") {}
};

std::string ReadFile(const std::string& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(PolicySpec, ParseAndFormat) {
  EXPECT_EQ(*ParsePolicySpec("immediate"), PolicySpec{});
  EXPECT_EQ(ParsePolicySpec("event-idx")->mode, KickMode::kEventIdx);
  EXPECT_EQ(ParsePolicySpec("adaptive")->mode, KickMode::kAdaptive);
  EXPECT_EQ(*ParsePolicySpec("static:8,50"), Static(8, 50));
  EXPECT_EQ(*ParsePolicySpec("static:8,50us"), Static(8, 50));
  EXPECT_EQ(*ParsePolicySpec("static:8:50"), Static(8, 50));  // the older spelling, in old state files
  EXPECT_EQ(FormatPolicySpec(Static(8, 50)), "static:8,50");
  EXPECT_EQ(FormatPolicySpec({KickMode::kEventIdx}), "event-idx");
  for (const char* bad : {"", "static", "static:8", "static:0:50", "static:300:50",
                          "static:8:0", "static:8:1001", "static:-1:5", "fast", "static:8:50:1",
                          "static:1:99999999999999999999"})
    EXPECT_FALSE(ParsePolicySpec(bad).ok()) << bad;
  EXPECT_TRUE(ParsePolicySpec("static:1:0").ok());  // B = 1 needs no timer
}

TEST(PolicyTable, MostSpecificScopeWins) {
  PolicyTable t(*ParsePolicySpec("adaptive"));
  ASSERT_TRUE(t.Set({"vm1", "", -1}, Static(4, 100)).ok());
  ASSERT_TRUE(t.Set({"vm1", "disk0", -1}, {KickMode::kEventIdx}).ok());
  ASSERT_TRUE(t.Set({"vm1", "disk0", 1}, Static(16, 200)).ok());
  EXPECT_EQ(t.Resolve("vm1", "disk0", 1), Static(16, 200));
  EXPECT_EQ(t.Resolve("vm1", "disk0", 0).mode, KickMode::kEventIdx);
  EXPECT_EQ(t.Resolve("vm1", "disk1", 0), Static(4, 100));
  EXPECT_EQ(t.Resolve("vm2", "disk0", 1).mode, KickMode::kAdaptive);
  EXPECT_TRUE(t.Clear({"vm1", "disk0", 1}));
  EXPECT_FALSE(t.Clear({"vm1", "disk0", 1}));
  EXPECT_EQ(t.Resolve("vm1", "disk0", 1).mode, KickMode::kEventIdx);
  // "all" replaces the default and every entry.
  ASSERT_TRUE(t.Set({}, {KickMode::kImmediate}).ok());
  EXPECT_TRUE(t.entries().empty());
  EXPECT_EQ(t.Resolve("vm1", "disk0", 0).mode, KickMode::kImmediate);
}

TEST(PolicyTable, RejectsBadScopesAndSpecs) {
  PolicyTable t;
  EXPECT_FALSE(t.Set({"vm 1", "", -1}, {}).ok());       // whitespace would break the file
  EXPECT_FALSE(t.Set({"vm1\n", "", -1}, {}).ok());
  EXPECT_FALSE(t.Set({"*", "", -1}, {}).ok());          // the file's wildcard
  EXPECT_FALSE(t.Set({"", "disk0", -1}, {}).ok());      // a device needs its VM
  EXPECT_FALSE(t.Set({"vm1", "", 3}, {}).ok());         // a queue needs its device
  EXPECT_FALSE(t.Set({"vm1", "d", 64}, {}).ok());
  EXPECT_FALSE(t.Set({"vm1", "", -1}, {KickMode::kStatic, 8, 0}).ok());
  EXPECT_FALSE(t.Set({"vm1", "", -1}, {KickMode::kImmediate, 4, 0}).ok());
  EXPECT_FALSE(t.Set({std::string(200, 'v'), "", -1}, {}).ok());
  for (int i = 0; i < static_cast<int>(PolicyTable::kMaxEntries); ++i)
    ASSERT_TRUE(t.Set({"vm" + std::to_string(i), "", -1}, {}).ok());
  EXPECT_EQ(t.Set({"one-more", "", -1}, {}).code(), absl::StatusCode::kResourceExhausted);
}

TEST(PolicyStore, SurvivesARestart) {
  TempDir dir;
  PolicyTable t(*ParsePolicySpec("adaptive"));
  ASSERT_TRUE(t.Set({"vm1", "", -1}, Static(4, 100)).ok());
  ASSERT_TRUE(t.Set({"vm1", "disk0", 1}, {KickMode::kEventIdx}).ok());
  ASSERT_TRUE(t.Set({"vm2", "0000:00:04.0", -1}, {KickMode::kImmediate}).ok());
  ASSERT_TRUE(PolicyStore(dir.path()).Save(t).ok());
  // "Restart": a new store and the same default flag.
  PolicyStore::Loaded l = PolicyStore(dir.path()).Load(*ParsePolicySpec("adaptive"));
  ASSERT_TRUE(l.status.ok()) << l.status;
  EXPECT_EQ(l.table, t);
  // No temporary file is left behind, and the file is private.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) ++files, (void)e;
  EXPECT_EQ(files, 1);
  struct stat st;
  ASSERT_EQ(::stat(PolicyStore(dir.path()).path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(PolicyStore, MissingFileIsAFirstStart) {
  TempDir dir;
  PolicyStore::Loaded l = PolicyStore(dir.path()).Load({KickMode::kEventIdx});
  EXPECT_TRUE(l.status.ok());
  EXPECT_TRUE(l.table.entries().empty());
  EXPECT_EQ(l.table.default_policy().mode, KickMode::kEventIdx);
}

TEST(PolicyStore, CorruptFileGivesAClearErrorAndDefaults) {
  const std::string good = "# vkick policies v1\npolicy\tvm1\t*\t*\tstatic:4:100\n";
  ASSERT_TRUE([&] {
    PolicyTable t;
    return ParsePolicies(good, t).ok() && t.entries().size() == 1;
  }());
  const std::vector<std::string> corrupt = {
      "",
      "garbage",
      "# vkick policies v1\npolicy\tvm1\t*\t*\tstatic:4:100",        // cut mid-line
      "# vkick policies v1\npolicy\tvm1\t*\t*\tstatic:0:100\n",       // bad spec
      "# vkick policies v1\npolicy\tvm1\t*\tx\tadaptive\n",           // bad queue
      "# vkick policies v1\npolicy\t*\t*\t*\tadaptive\n",             // "all"
      "# vkick policies v1\npolicy\tvm1\t*\t*\tadaptive\npolicy\tvm1\t*\t*\timmediate\n",
      "# vkick policies v1\npolicy\tvm1\t*\t*\n",
      "# vkick policies v1\npolicy\t*\tdisk\t*\tadaptive\n",          // device without VM
      std::string("# vkick policies v1\npolicy\tv\0m\t*\t*\tadaptive\n", 47),
      "# vkick policies v2\n",
  };
  for (const std::string& content : corrupt) {
    TempDir dir;
    PolicyStore store(dir.path());
    { std::ofstream(store.path(), std::ios::binary) << content; }
    PolicyStore::Loaded l = store.Load({KickMode::kAdaptive});
    EXPECT_EQ(l.status.code(), absl::StatusCode::kDataLoss) << content;
    EXPECT_NE(l.status.message().find("policies.v1"), std::string::npos) << l.status;
    EXPECT_TRUE(l.table.entries().empty());
    EXPECT_EQ(l.table.default_policy().mode, KickMode::kAdaptive);
    // Kept aside for the operator; the next save starts clean.
    EXPECT_EQ(ReadFile(store.path() + ".corrupt"), content);
    EXPECT_FALSE(fs::exists(store.path()));
    ASSERT_TRUE(store.Save(l.table).ok());
    EXPECT_TRUE(store.Load({}).status.ok());
  }
}

TEST(PolicyStore, RandomBytesNeverCrash) {
  TempDir dir;
  PolicyStore store(dir.path());
  std::mt19937_64 rng(9);
  const std::string base = SerializePolicies([] {
    PolicyTable t;
    (void)t.Set({"vm1", "disk0", 2}, Static(8, 50));
    return t;
  }());
  for (int i = 0; i < 300; ++i) {
    std::string s = base;
    for (int f = 0; f < 3; ++f) s[rng() % s.size()] = static_cast<char>(rng());
    { std::ofstream(store.path(), std::ios::binary) << s; }
    PolicyStore::Loaded l = store.Load({});
    EXPECT_TRUE(l.status.ok() || l.status.code() == absl::StatusCode::kDataLoss);
    fs::remove(store.path() + ".corrupt");
  }
}

TEST(PolicyStore, SaveFailsCleanlyOnAMissingDirectory) {
  PolicyStore store("/nonexistent/vkick-state");
  absl::Status s = store.Save(PolicyTable{});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("/nonexistent/vkick-state"), std::string::npos);
}

}  // namespace
}  // namespace vkick
