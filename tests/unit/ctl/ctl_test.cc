#include "controller/ctl/ctl.h"

#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

absl::StatusOr<CtlCommand> P(const std::string& s) {
  return ParseCtlArgs(absl::StrSplit(s, ' ', absl::SkipEmpty()));
}

TEST(CtlTest, ParsesCommands) {
  auto st = P("--socket=/tmp/a.sock status --json");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->socket, "/tmp/a.sock");
  EXPECT_TRUE(st->json_output);
  EXPECT_EQ(st->request.dump(), R"({"cmd":"status"})");

  auto set = P("policy set --vm vm1 --device d0 --queue 1 static --batch 8 --defer-us 50");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->request["cmd"], "policy-set");
  EXPECT_EQ(set->request["scope"]["queue"], 1);
  EXPECT_EQ(set->request["spec"]["batch"], 8);
  EXPECT_EQ(set->request["spec"]["defer_us"], 50.0);

  auto all = P("policy set --all adaptive");
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->request["scope"].empty());

  auto clr = P("policy clear --vm=vm1");
  ASSERT_TRUE(clr.ok());
  EXPECT_EQ(clr->request["cmd"], "policy-clear");
  EXPECT_TRUE(P("--help")->help);
  EXPECT_EQ(P("status")->socket, kDefaultAdminSocket);
}

TEST(CtlTest, RejectsBadArguments) {
  for (const char* bad : {"", "frobnicate", "status extra", "policy", "policy set adaptive",
                          "policy set --vm v static", "policy set --vm v static --batch 8",
                          "policy set --vm v immediate --batch 2", "policy set --vm v warp",
                          "policy set --all --vm v adaptive", "policy set --device d adaptive",
                          "policy set --vm v --queue 1 adaptive", "policy clear",
                          "policy set --vm v static --batch 500 --defer-us 5",
                          "policy set --vm v static --batch 4 --defer-us 0",
                          "policy set --vm v static --batch x --defer-us 5", "status --bogus",
                          "policy set --vm v --json adaptive"}) {
    EXPECT_FALSE(P(bad).ok()) << bad;
  }
}

TEST(CtlTest, StatusTable) {
  auto j = nlohmann::json::parse(R"({"ok":true,"queues":[
    {"vm":"vhost-user","device":"blk0","queue":0,"mode":"adaptive","source":"vm","batch":16,
     "defer_us":120.0,"generation":5,"acked_generation":5,"agent":true,"has_sample":true,
     "lease":"active","notifications_per_s":6250,"requests_per_s":100000,
     "notifications_per_request":0.0625,"mean_depth":31.5},
    {"vm":"vm1","device":"disk0","queue":1,"mode":"immediate","source":"default","batch":1,
     "defer_us":0,"generation":2,"acked_generation":0,"agent":false,"has_sample":false,
     "lease":"none","notifications_per_s":0}]})");
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
  EXPECT_NE(FormatStatusTable(nlohmann::json::parse(R"({"ok":true,"queues":[]})"))
                .find("no queues"),
            std::string::npos);
}

}  // namespace
}  // namespace vkick
