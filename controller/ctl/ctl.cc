#include "controller/ctl/ctl.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "controller/admin/admin_protocol.h"

namespace vkick {

using nlohmann::json;

std::string CtlUsage() {
  return "shows vkickd's loop and switches queue policies live.\n"
         "  vkickctl [--socket=PATH] status [--json]\n"
         "  vkickctl [--socket=PATH] policy set [--vm V] [--device D] [--queue Q] [--all]\n"
         "           adaptive | immediate | event-idx | static --batch N --defer-us T\n"
         "  vkickctl [--socket=PATH] policy clear [--vm V] [--device D] [--queue Q]\n"
         "\n"
         "Talks to vkickd's admin socket (default /run/vkick/admin.sock; root or the\n"
         "--admin-group of vkickd). A policy applies to the most specific scope:\n"
         "queue > device > vm > all (--all replaces the default and clears the rest).\n"
         "Exit codes: 0 ok, 1 vkickd refused the request, 2 usage or connection error.\n";
}

absl::StatusOr<CtlCommand> BuildCtlCommand(const std::vector<std::string>& pos, const CtlOptions& o) {
  CtlCommand c;
  c.socket = o.socket;
  c.json_output = o.json;
  const std::string &vm = o.vm, &device = o.device;
  const bool all = o.all, have_queue = o.queue.has_value();
  const bool have_batch = o.batch.has_value(), have_defer = o.defer_us.has_value();
  if (pos.empty()) return absl::InvalidArgumentError("no command (status or policy)");
  if (pos[0] == "status") {
    if (pos.size() != 1) return absl::InvalidArgumentError("status takes no arguments");
    c.is_status = true;
    c.request = json{{"cmd", "status"}};
    return c;
  }
  if (pos[0] != "policy" || pos.size() < 2)
    return absl::InvalidArgumentError("expected 'status', 'policy set' or 'policy clear'");
  if (c.json_output) return absl::InvalidArgumentError("--json is for status");
  json scope = json::object();
  if (!vm.empty()) scope["vm"] = vm;
  if (!device.empty()) scope["device"] = device;
  if (have_queue) {
    if (*o.queue < 0) return absl::InvalidArgumentError("bad --queue");
    scope["queue"] = *o.queue;
  }
  if (all && !scope.empty())
    return absl::InvalidArgumentError("--all excludes --vm/--device/--queue");
  if (!device.empty() && vm.empty()) return absl::InvalidArgumentError("--device needs --vm");
  if (have_queue && device.empty()) return absl::InvalidArgumentError("--queue needs --device");
  if (pos[1] == "clear") {
    if (pos.size() != 2) return absl::InvalidArgumentError("policy clear takes no mode");
    if (scope.empty()) return absl::InvalidArgumentError("policy clear needs --vm");
    if (have_batch || have_defer) return absl::InvalidArgumentError("clear takes no --batch");
    c.request = json{{"cmd", "policy-clear"}, {"scope", scope}};
  } else if (pos[1] == "set") {
    if (pos.size() != 3) return absl::InvalidArgumentError("policy set needs one mode");
    if (!all && scope.empty())
      return absl::InvalidArgumentError("policy set needs --vm (and --device/--queue) or --all");
    const std::string& mode = pos[2];
    if (mode != "adaptive" && mode != "immediate" && mode != "event-idx" && mode != "static")
      return absl::InvalidArgumentError(absl::StrCat("unknown mode '", mode, "'"));
    json spec{{"mode", mode}};
    if (mode == "static" && (!have_batch || !have_defer))
      return absl::InvalidArgumentError("static needs --batch N and --defer-us T");
    if ((mode == "immediate" || mode == "event-idx") && (have_batch || have_defer))
      return absl::InvalidArgumentError(absl::StrCat(mode, " takes no --batch/--defer-us"));
    if (have_batch) spec["batch"] = *o.batch;
    if (have_defer) spec["defer_us"] = *o.defer_us;
    // Validate here too, so a bad value is exit 2 with the same message.
    if (auto s = SpecFromJson(spec); !s.ok()) return s.status();
    c.request = json{{"cmd", "policy-set"}, {"scope", scope}, {"spec", spec}};
  } else {
    return absl::InvalidArgumentError("expected 'policy set' or 'policy clear'");
  }
  return c;
}

namespace {

std::string Num(const json& j, const char* key, int decimals) {
  if (!j.contains(key) || !j[key].is_number()) return "-";
  char buf[64];
  snprintf(buf, sizeof buf, "%.*f", decimals, j[key].get<double>());
  return buf;
}

std::string Str(const json& j, const char* key) {
  if (!j.contains(key)) return "-";
  if (j[key].is_string()) return j[key].get<std::string>();
  return j[key].dump();
}

}  // namespace

std::string FormatStatusTable(const json& status) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"VM", "DEVICE", "QUEUE", "POLICY", "B", "T(us)", "NOTIF/S", "REQ/S",
                  "NOTIF/REQ", "DEPTH", "AGENT", "LEASE", "STATE"});
  if (status.contains("queues") && status["queues"].is_array()) {
    for (const json& q : status["queues"]) {
      std::string policy = Str(q, "mode");
      // "observe": the guest kernel's driver, measured only (no policy, no source).
      if (policy != "observe" && q.contains("source") && q["source"] != "default")
        policy += "(" + Str(q, "source") + ")";
      bool agent = q.value("agent", false);
      std::string lease = Str(q, "lease");
      if (agent && q.value("generation", 0) != 0 &&
          q.value("acked_generation", 0) != q.value("generation", 0))
        lease += ",pending";
      rows.push_back({Str(q, "vm"), Str(q, "device"), Str(q, "queue"), policy, Str(q, "batch"),
                      Num(q, "defer_us", 0), Num(q, "notifications_per_s", 0),
                      q.value("has_sample", false) ? Num(q, "requests_per_s", 0) : "-",
                      q.value("has_sample", false) ? Num(q, "notifications_per_request", 3)
                                                   : "-",
                      q.value("has_sample", false) ? Num(q, "mean_depth", 1) : "-",
                      agent ? "up" : "down", lease,
                      // The VM's run state: "paused", "migrating"... hold the law.
                      q.contains("state") ? Str(q, "state") : "-"});
    }
  }
  std::vector<size_t> w(rows[0].size(), 0);
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) w[i] = std::max(w[i], r[i].size());
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(w[i] - r[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  if (rows.size() == 1) out += "(no queues: no VM attached and no --vhost-user declared)\n";
  return out;
}

}  // namespace vkick
