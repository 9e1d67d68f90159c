#include "controller/ctl/ctl.h"

#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

absl::StatusOr<CtlCommand> P(const std::string& command, const CtlOptions& o = {}) {
  return BuildCtlCommand(absl::StrSplit(command, ' ', absl::SkipEmpty()), o);
}

TEST(CtlTest, BuildsRequests) {
  auto st = P("status", {.socket = "/tmp/a.sock", .json = true});
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->socket, "/tmp/a.sock");
  EXPECT_TRUE(st->json_output);
  EXPECT_EQ(st->request.dump(), R"({"cmd":"status"})");

  auto set = P("policy set static", {.vm = "vm1", .device = "d0", .queue = 1, .batch = 8, .defer_us = 50});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->request["cmd"], "policy-set");
  EXPECT_EQ(set->request["scope"]["queue"], 1);
  EXPECT_EQ(set->request["spec"]["batch"], 8);
  EXPECT_EQ(set->request["spec"]["defer_us"], 50.0);

  auto all = P("policy set adaptive", {.all = true});
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->request["scope"].empty());

  auto clr = P("policy clear", {.vm = "vm1"});
  ASSERT_TRUE(clr.ok());
  EXPECT_EQ(clr->request["cmd"], "policy-clear");
  EXPECT_EQ(P("status")->socket, kDefaultAdminSocket);
}

TEST(CtlTest, RejectsBadCombinationsAndValues) {
  const CtlOptions v{.vm = "v"};
  const std::vector<std::pair<std::string, CtlOptions>> bad = {
      {"", {}},
      {"frobnicate", {}},
      {"status extra", {}},
      {"policy", {}},
      {"policy set adaptive", {}},
      {"policy set static", v},
      {"policy set static", {.vm = "v", .batch = 8}},
      {"policy set immediate", {.vm = "v", .batch = 2}},
      {"policy set warp", v},
      {"policy set adaptive", {.all = true, .vm = "v"}},
      {"policy set adaptive", {.device = "d"}},
      {"policy set adaptive", {.vm = "v", .queue = 1}},
      {"policy set adaptive", {.vm = "v", .device = "d", .queue = -1}},
      {"policy clear", {}},
      {"policy set static", {.vm = "v", .batch = 500, .defer_us = 5}},
      {"policy set static", {.vm = "v", .batch = 4, .defer_us = 0}},
      {"policy set adaptive", {.json = true, .vm = "v"}},
  };
  for (const auto& [cmd, o] : bad) EXPECT_FALSE(P(cmd, o).ok()) << cmd;
}

TEST(CtlTest, StatusTable) {
  auto j = nlohmann::json::parse(R"({"ok":true,"queues":[
    {"vm":"vhost-user","device":"blk0","queue":0,"mode":"adaptive","source":"vm","batch":16,
     "defer_us":120.0,"generation":5,"acked_generation":5,"agent":true,"has_sample":true,
     "lease":"active","notifications_per_s":6250,"requests_per_s":100000,
     "notifications_per_request":0.0625,"mean_depth":31.5},
    {"vm":"vm1","device":"disk0","queue":1,"mode":"immediate","source":"default","batch":1,
     "defer_us":0,"generation":2,"acked_generation":0,"agent":false,"has_sample":false,
     "lease":"none","notifications_per_s":0,"state":"paused","frozen":true}]})");
  std::string t = FormatStatusTable(j);
  std::vector<std::string> lines = absl::StrSplit(t, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << t;
  EXPECT_EQ(lines[0].find("VM"), 0u);
  EXPECT_NE(lines[1].find("adaptive(vm)"), std::string::npos) << t;
  EXPECT_NE(lines[1].find("0.062"), std::string::npos) << t;
  EXPECT_NE(lines[1].find("31.5"), std::string::npos) << t;
  EXPECT_NE(lines[1].find(" up "), std::string::npos) << t;
  EXPECT_NE(lines[2].find("down"), std::string::npos) << t;
  // Columns align: every row puts POLICY at the same offset.
  EXPECT_EQ(lines[1].find("adaptive"), lines[0].find("POLICY"));
  EXPECT_EQ(lines[2].find("immediate"), lines[0].find("POLICY"));
  // The VM's run state (older vkickd: no "state", shown as "-").
  EXPECT_EQ(lines[2].find("paused"), lines[0].find("STATE")) << t;
  EXPECT_EQ(lines[1].rfind("-"), lines[0].find("STATE")) << t;
  EXPECT_NE(FormatStatusTable(nlohmann::json::parse(R"({"ok":true,"queues":[]})"))
                .find("no queues"),
            std::string::npos);
}

}  // namespace
}  // namespace vkick
