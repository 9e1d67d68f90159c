// QMP parsing against real QEMU 7.2 replies (testdata/, captured by
// testdata/capture_qmp.py) and against malformed ones.
#include "controller/qmp/qmp_parse.h"

#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ReadTestdata(const std::string& name) {
  std::ifstream in(std::string(VKICK_QMP_TESTDATA) + "/" + name);
  EXPECT_TRUE(in.good()) << "missing testdata " << name;
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s;
}

json Message(const std::string& name) {
  absl::StatusOr<json> m = ParseQmpMessage(ReadTestdata(name));
  EXPECT_TRUE(m.ok()) << name << ": " << m.status();
  return m.ok() ? *m : json();
}

json Return(const std::string& name) { return Message(name)["return"]; }

TEST(QmpMessage, RejectsGarbageTruncatedOversizedAndNonObjects) {
  EXPECT_EQ(ParseQmpMessage("not json").status().code(), absl::StatusCode::kDataLoss);
  std::string pci = ReadTestdata("query-pci.json");
  EXPECT_EQ(ParseQmpMessage(pci.substr(0, pci.size() / 2)).status().code(),
            absl::StatusCode::kDataLoss);  // truncated
  EXPECT_EQ(ParseQmpMessage(pci, /*max_bytes=*/1024).status().code(),
            absl::StatusCode::kDataLoss);  // oversized
  EXPECT_EQ(ParseQmpMessage("[1, 2]").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseQmpMessage("42").status().code(), absl::StatusCode::kDataLoss);
  // Deep nesting is refused before the recursive parser sees it.
  std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  absl::StatusOr<json> d = ParseQmpMessage(deep);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(d.status().message(), HasSubstr("nested"));
  // Brackets inside strings do not count as nesting.
  EXPECT_TRUE(ParseQmpMessage("{\"return\": \"" + std::string(1000, '[') + "\"}").ok());
}

TEST(QmpMessage, GreetingOfQemu72) {
  json g = Message("greeting.json");
  EXPECT_EQ(*ClassifyQmpMessage(g), QmpMessageKind::kGreeting);
  absl::StatusOr<QmpGreeting> greeting = ParseGreeting(g);
  ASSERT_TRUE(greeting.ok()) << greeting.status();
  EXPECT_EQ(greeting->major, 7);
  EXPECT_EQ(greeting->minor, 2);
  EXPECT_THAT(greeting->capabilities, ElementsAre("oob"));
  EXPECT_FALSE(ParseGreeting(json{{"QMP", {{"version", 7}}}}).ok());
  EXPECT_FALSE(ParseGreeting(json{{"return", {}}}).ok());
}

TEST(QmpMessage, EventsAndErrors) {
  json reset = Message("event-RESET.json");
  EXPECT_EQ(*ClassifyQmpMessage(reset), QmpMessageKind::kEvent);
  absl::StatusOr<QmpEvent> ev = ParseEvent(reset);
  ASSERT_TRUE(ev.ok());
  EXPECT_EQ(ev->name, "RESET");
  EXPECT_TRUE(ev->data["reason"].is_string());  // "guest-reset" or "host-qmp-system-reset"
  EXPECT_GT(ev->timestamp, absl::FromUnixSeconds(1600000000));
  EXPECT_FALSE(ParseEvent(json{{"event", 3}}).ok());

  json missing = Message("error-qom-get-missing.json");
  EXPECT_EQ(*ClassifyQmpMessage(missing), QmpMessageKind::kError);
  absl::Status st = QmpErrorToStatus(missing["error"], "qom-get");
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(st.message(), HasSubstr("nosuch"));
  EXPECT_EQ(QmpErrorClass(st), "DeviceNotFound");
  absl::Status unknown =
      QmpErrorToStatus(Message("error-unknown-command.json")["error"], "no-such-command");
  EXPECT_EQ(unknown.code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(QmpErrorClass(unknown), "CommandNotFound");
  // A malformed error member is still an error, never OK.
  EXPECT_FALSE(QmpErrorToStatus(json(5), "x").ok());
  EXPECT_EQ(QmpErrorClass(absl::UnavailableError("gone")), std::nullopt);
  EXPECT_FALSE(ClassifyQmpMessage(json{{"hello", 1}}).ok());
}

TEST(QueryName, NamedAndUnnamed) {
  EXPECT_EQ(*ParseQueryName(Return("query-name.json")), "capture-vm");
  EXPECT_EQ(*ParseQueryName(Return("query-name-empty.json")), "");
  EXPECT_EQ(ParseQueryName(json{{"name", 5}}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ParseQueryName(json::array()).ok());
}

TEST(QueryCpusFast, ThreadIdPerCpuIndex) {
  absl::StatusOr<std::vector<uint32_t>> tids = ParseQueryCpusFast(Return("query-cpus-fast.json"));
  ASSERT_TRUE(tids.ok()) << tids.status();
  ASSERT_EQ(tids->size(), 2u);
  EXPECT_GT((*tids)[0], 0u);
  EXPECT_NE((*tids)[0], (*tids)[1]);
  // Out of order input still lands by cpu-index.
  json rev = json::array({{{"cpu-index", 1}, {"thread-id", 11}}, {{"cpu-index", 0}, {"thread-id", 10}}});
  EXPECT_THAT(*ParseQueryCpusFast(rev), ElementsAre(10u, 11u));
  EXPECT_FALSE(ParseQueryCpusFast(json::array({{{"cpu-index", 0}, {"thread-id", "12"}}})).ok());
  EXPECT_FALSE(ParseQueryCpusFast(json::array({{{"cpu-index", -1}, {"thread-id", 1}}})).ok());
  EXPECT_FALSE(ParseQueryCpusFast(json::array({{{"cpu-index", 1000000}, {"thread-id", 1}}})).ok());
  EXPECT_FALSE(ParseQueryCpusFast(json::array({{{"cpu-index", 0}, {"thread-id", 1}},
                                               {{"cpu-index", 0}, {"thread-id", 2}}}))
                   .ok());
  EXPECT_FALSE(ParseQueryCpusFast(json::object()).ok());
}

const PciDevice* FindByAddress(const std::vector<PciDevice>& devs, const std::string& addr) {
  for (const PciDevice& d : devs) {
    if (d.Address() == addr) return &d;
  }
  return nullptr;
}

TEST(QueryPci, AssignedBarsAndDevicesBehindABridge) {
  absl::StatusOr<std::vector<PciDevice>> devs = ParseQueryPci(Return("query-pci.json"));
  ASSERT_TRUE(devs.ok()) << devs.status();
  const PciDevice* legacy = FindByAddress(*devs, "0000:00:02.0");
  ASSERT_NE(legacy, nullptr);
  EXPECT_EQ(legacy->qdev_id, "legacy0");
  EXPECT_EQ(legacy->vendor_id, 0x1af4);
  EXPECT_EQ(legacy->device_id, 0x1001);
  const PciBar* bar0 = legacy->FindBar(0);
  ASSERT_NE(bar0, nullptr);
  EXPECT_TRUE(bar0->io);
  EXPECT_TRUE(bar0->assigned);
  EXPECT_EQ(bar0->address, 0xd000u);
  EXPECT_EQ(bar0->size, 128u);

  const PciDevice* modern = FindByAddress(*devs, "0000:00:03.0");
  ASSERT_NE(modern, nullptr);
  EXPECT_EQ(modern->device_id, 0x1042);
  const PciBar* bar4 = modern->FindBar(4);
  ASSERT_NE(bar4, nullptr);
  EXPECT_FALSE(bar4->io);
  EXPECT_EQ(bar4->address, 0xfd800000u);
  EXPECT_EQ(bar4->size, 8u << 20);  // page-per-vq=on: 0x3000 + 1024 pages, rounded up

  const PciDevice* bridge = FindByAddress(*devs, "0000:00:04.0");
  ASSERT_NE(bridge, nullptr);
  EXPECT_EQ(bridge->secondary_bus, 1);
  const PciDevice* behind = FindByAddress(*devs, "0000:01:03.0");
  ASSERT_NE(behind, nullptr) << "recursion through pci_bridge.devices";
  EXPECT_EQ(behind->qdev_id, "");
  EXPECT_EQ(behind->vendor_id, 0x1af4);
  EXPECT_TRUE(behind->FindBar(4)->assigned);
}

TEST(QueryPci, UnassignedBarsBeforeFirmware) {
  absl::StatusOr<std::vector<PciDevice>> devs = ParseQueryPci(Return("query-pci-unassigned.json"));
  ASSERT_TRUE(devs.ok()) << devs.status();
  const PciDevice* modern = FindByAddress(*devs, "0000:00:03.0");
  ASSERT_NE(modern, nullptr);
  for (const PciBar& b : modern->bars) {
    EXPECT_FALSE(b.assigned) << "BAR " << b.index;
    EXPECT_EQ(b.address, 0u);
  }
  // Behind an unnumbered bridge QEMU lists nothing yet.
  EXPECT_EQ(FindByAddress(*devs, "0000:01:03.0"), nullptr);
}

json OnePciDevice(json region) {
  return json::array({{{"bus", 0},
                       {"devices",
                        json::array({{{"bus", 0},
                                      {"slot", 2},
                                      {"function", 0},
                                      {"qdev_id", "d"},
                                      {"id", {{"vendor", 0x1af4}, {"device", 0x1001}}},
                                      {"regions", json::array({region})}}})}}});
}

TEST(QueryPci, MalformedRepliesAreClearErrors) {
  json ok_region = {{"bar", 0}, {"type", "io"}, {"address", 0xc000}, {"size", 128}};
  ASSERT_TRUE(ParseQueryPci(OnePciDevice(ok_region)).ok());

  json all_ones = ok_region;
  all_ones["address"] = 0xffffffffffffffffull;
  EXPECT_FALSE((*ParseQueryPci(OnePciDevice(all_ones)))[0].bars[0].assigned);
  json zero = ok_region;
  zero["address"] = 0;
  EXPECT_FALSE((*ParseQueryPci(OnePciDevice(zero)))[0].bars[0].assigned);
  json no_addr = ok_region;
  no_addr.erase("address");
  EXPECT_FALSE((*ParseQueryPci(OnePciDevice(no_addr)))[0].bars[0].assigned);

  struct Case {
    const char* what;
    json region;
  } cases[] = {
      {"address as string", {{"bar", 0}, {"type", "io"}, {"address", "0xc000"}, {"size", 128}}},
      {"float size", {{"bar", 0}, {"type", "io"}, {"address", 1}, {"size", 1.5}}},
      {"negative size", {{"bar", 0}, {"type", "io"}, {"address", 1}, {"size", -4}}},
      {"bar 9", {{"bar", 9}, {"type", "io"}, {"address", 1}, {"size", 4}}},
      {"unknown type", {{"bar", 0}, {"type", "dma"}, {"address", 1}, {"size", 4}}},
      {"missing type", {{"bar", 0}, {"address", 1}, {"size", 4}}},
      {"address -7", {{"bar", 0}, {"type", "io"}, {"address", -7}, {"size", 4}}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<PciDevice>> r = ParseQueryPci(OnePciDevice(c.region));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
  }
  json bad_slot = OnePciDevice(ok_region);
  bad_slot[0]["devices"][0]["slot"] = 40;
  EXPECT_FALSE(ParseQueryPci(bad_slot).ok());
  json no_id = OnePciDevice(ok_region);
  no_id[0]["devices"][0].erase("id");
  EXPECT_THAT(ParseQueryPci(no_id).status().message(), HasSubstr("\"id\""));
  json vendor_str = OnePciDevice(ok_region);
  vendor_str[0]["devices"][0]["id"]["vendor"] = "1af4";
  EXPECT_FALSE(ParseQueryPci(vendor_str).ok());
  EXPECT_FALSE(ParseQueryPci(json::object()).ok());
  EXPECT_FALSE(ParseQueryPci(json::array({1})).ok());

  // Bridges nested past the bound are refused, not recursed into forever.
  json dev = OnePciDevice(ok_region)[0]["devices"][0];
  json nested = dev;
  for (int i = 0; i < 40; ++i) {
    json b = dev;
    b["pci_bridge"] = {{"bus", {{"secondary", 1}}}, {"devices", json::array({nested})}};
    nested = b;
  }
  EXPECT_THAT(ParseQueryPci(json::array({{{"bus", 0}, {"devices", json::array({nested})}}}))
                  .status()
                  .message(),
              HasSubstr("nested"));
}

TEST(QueryChardev, FilenamesAndSocketPaths) {
  absl::StatusOr<std::vector<ChardevInfo>> cds = ParseQueryChardev(Return("query-chardev.json"));
  ASSERT_TRUE(cds.ok()) << cds.status();
  ASSERT_EQ(cds->size(), 2u);
  EXPECT_EQ((*cds)[0].label, "vu0");
  // A connected client chardev: QEMU prints no path (see the header).
  EXPECT_EQ(UnixPathFromChardevFilename((*cds)[0].filename), "");
  EXPECT_THAT(UnixPathFromChardevFilename((*cds)[1].filename), HasSubstr("/qmp.sock"));
  EXPECT_EQ(UnixPathFromChardevFilename("unix:/run/x.sock,server=on"), "/run/x.sock");
  EXPECT_EQ(UnixPathFromChardevFilename("pty:/dev/pts/3"), "");
  EXPECT_FALSE(ParseQueryChardev(json::array({{{"label", "a"}}})).ok());
  EXPECT_FALSE(
      ParseQueryChardev(json::array({{{"label", "a"}, {"filename", "x"}, {"frontend-open", 1}}}))
          .ok());

  absl::StatusOr<std::string> addr = ParseSocketAddressPath(Return("qom-get-chardev-vu0-addr.json"));
  ASSERT_TRUE(addr.ok()) << addr.status();
  EXPECT_THAT(*addr, HasSubstr("/vhost.sock"));
  EXPECT_EQ(*ParseSocketAddressPath(json{{"type", "inet"}, {"host", "h"}}), "");
  EXPECT_EQ(*ParseSocketAddressPath(json{{"type", "unix"}, {"path", "x"}, {"abstract", true}}), "");
  EXPECT_FALSE(ParseSocketAddressPath(json{{"type", "unix"}}).ok());
}

TEST(XQueryVirtio, PathsAndStatus) {
  absl::StatusOr<std::vector<VirtioPath>> v = ParseXQueryVirtio(Return("x-query-virtio.json"));
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->size(), 4u);
  bool saw_anon = false;
  for (const VirtioPath& p : *v) {
    EXPECT_EQ(p.name, "virtio-blk");
    saw_anon |= p.path == "/machine/peripheral-anon/device[0]/virtio-backend";
  }
  EXPECT_TRUE(saw_anon);
  EXPECT_FALSE(ParseXQueryVirtio(json::array({{{"name", "x"}}})).ok());

  EXPECT_EQ(*ParseVirtioStatusNumVqs(Return("x-query-virtio-status-legacy0.json")), 2);
  EXPECT_FALSE(ParseVirtioStatusNumVqs(json{{"num-vqs", 5000}}).ok());
  EXPECT_FALSE(ParseVirtioStatusNumVqs(json{{"num-vqs", "2"}}).ok());
}

TEST(QomGet, TypedValues) {
  // disable-legacy is OnOffAuto (a string), disable-modern and page-per-vq
  // are plain bools: both spellings come from the same device.
  EXPECT_EQ(*ParseQomBool(Return("qom-get-modern0-disable-legacy.json")), true);
  EXPECT_EQ(*ParseQomBool(Return("qom-get-legacy0-disable-legacy.json")), false);
  EXPECT_EQ(*ParseQomBool(Return("qom-get-modern0-disable-modern.json")), false);
  EXPECT_EQ(*ParseQomBool(Return("qom-get-modern0-page-per-vq.json")), true);
  EXPECT_EQ(*ParseQomBool(json("auto")), std::nullopt);
  EXPECT_FALSE(ParseQomBool(json("maybe")).ok());
  EXPECT_FALSE(ParseQomBool(json(1)).ok());

  EXPECT_EQ(*ParseQomUint(Return("qom-get-modern0-num-queues.json"), 1024), 3u);
  EXPECT_EQ(*ParseQomUint(Return("qom-get-vublk0-num-queues.json"), 1024), 2u);
  EXPECT_FALSE(ParseQomUint(json(65535), 1024).ok());
  EXPECT_FALSE(ParseQomUint(json(-1), 1024).ok());
  EXPECT_FALSE(ParseQomUint(json("3"), 1024).ok());
  EXPECT_FALSE(ParseQomUint(json(3.0), 1024).ok());

  EXPECT_EQ(*ParseQomString(Return("qom-get-vublk0-chardev.json")), "vu0");
  EXPECT_FALSE(ParseQomString(json::object()).ok());
  EXPECT_EQ(*ParseQomInt(json(24)), 24);
  EXPECT_FALSE(ParseQomInt(json(true)).ok());
}

}  // namespace
}  // namespace vkick

namespace vkick {
namespace {

// Every parser on every captured reply (mostly the wrong one) and on every
// truncation of every capture: a clear status or a value, never a crash or
// an exception escaping.
TEST(QmpParseRobustness, EveryParserOnEveryReplyAndTruncation) {
  const char* files[] = {"greeting.json", "qmp_capabilities.json", "query-name.json",
                         "query-name-empty.json", "query-cpus-fast.json", "query-pci.json",
                         "query-pci-unassigned.json", "query-chardev.json", "x-query-virtio.json",
                         "x-query-virtio-status-legacy0.json", "qom-get-modern0-num-queues.json",
                         "qom-get-modern0-disable-legacy.json", "qom-get-vublk0-chardev.json",
                         "qom-get-chardev-vu0-addr.json", "event-RESET.json",
                         "error-qom-get-missing.json"};
  int errors = 0;
  for (const char* f : files) {
    std::string text = ReadTestdata(f);
    for (size_t n = 0; n < text.size(); n += 7) {
      absl::StatusOr<nlohmann::json> m = ParseQmpMessage(text.substr(0, n));
      EXPECT_TRUE(!m.ok() ? m.status().code() == absl::StatusCode::kDataLoss : true) << f << " @" << n;
    }
    nlohmann::json msg = Message(f);
    std::vector<nlohmann::json> values = {msg};
    if (msg.contains("return")) values.push_back(msg["return"]);
    for (const nlohmann::json& v : values) {
      errors += !ParseGreeting(v).ok();
      errors += !ParseEvent(v).ok();
      errors += !ParseQueryName(v).ok();
      errors += !ParseQueryCpusFast(v).ok();
      errors += !ParseQueryPci(v).ok();
      errors += !ParseQueryChardev(v).ok();
      errors += !ParseXQueryVirtio(v).ok();
      errors += !ParseVirtioStatusNumVqs(v).ok();
      errors += !ParseQomBool(v).ok();
      errors += !ParseQomUint(v, 1024).ok();
      errors += !ParseQomInt(v).ok();
      errors += !ParseQomString(v).ok();
      errors += !ParseSocketAddressPath(v).ok();
      errors += !ClassifyQmpMessage(v).ok();
    }
  }
  EXPECT_GT(errors, 100);  // mismatches were rejected, not accepted
}

}  // namespace
}  // namespace vkick
