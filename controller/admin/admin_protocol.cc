#include "controller/admin/admin_protocol.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace vkick {

using nlohmann::json;

namespace {

absl::StatusOr<PolicyScope> ScopeFromJson(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("scope must be an object");
  PolicyScope s;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "vm" && it->is_string()) {
      s.vm = it->get<std::string>();
    } else if (it.key() == "device" && it->is_string()) {
      s.device = it->get<std::string>();
    } else if (it.key() == "queue" && it->is_number_integer()) {
      int64_t q = it->get<int64_t>();
      if (q < 0 || q >= proto::kMaxQueuesPerDevice)
        return absl::InvalidArgumentError("queue out of range");
      s.queue = static_cast<int32_t>(q);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("bad scope field '", it.key(), "'"));
    }
  }
  if (absl::Status st = ValidatePolicyScope(s); !st.ok()) return st;
  return s;
}

}  // namespace

json SpecToJson(const PolicySpec& s) {
  return json{{"mode", std::string(proto::KickModeName(s.mode))},
              {"batch", s.batch},
              {"defer_us", s.defer_ns / 1000.0}};
}

absl::StatusOr<PolicySpec> SpecFromJson(const json& j) {
  if (!j.is_object() || !j.contains("mode") || !j["mode"].is_string())
    return absl::InvalidArgumentError("spec needs a mode");
  std::string mode = j["mode"].get<std::string>();
  PolicySpec s;
  if (mode == "immediate") {
    s.mode = proto::KickMode::kImmediate;
  } else if (mode == "event-idx") {
    s.mode = proto::KickMode::kEventIdx;
  } else if (mode == "static") {
    s.mode = proto::KickMode::kStatic;
  } else if (mode == "adaptive") {
    s.mode = proto::KickMode::kAdaptive;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown mode '", mode, "'"));
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "mode") continue;
    if (it.key() == "batch" && it->is_number_integer()) {
      int64_t b = it->get<int64_t>();
      if (b < 1 || b > proto::kMaxBatch) return absl::InvalidArgumentError("batch out of range");
      s.batch = static_cast<uint32_t>(b);
    } else if (it.key() == "defer_us" && it->is_number()) {
      double us = it->get<double>();
      if (!(us >= 0 && us <= proto::kMaxDeferNs / 1000.0))
        return absl::InvalidArgumentError("defer_us out of range");
      s.defer_ns = static_cast<uint64_t>(us * 1000 + 0.5);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("bad spec field '", it.key(), "'"));
    }
  }
  if ((s.mode == proto::KickMode::kImmediate || s.mode == proto::KickMode::kEventIdx) &&
      (s.batch != 1 || s.defer_ns != 0))
    return absl::InvalidArgumentError(absl::StrCat(mode, " takes no --batch/--defer-us"));
  if (s.mode == proto::KickMode::kStatic && !j.contains("batch"))
    return absl::InvalidArgumentError("static needs a batch and a defer bound");
  if (absl::Status st = ValidatePolicySpec(s); !st.ok()) return st;
  return s;
}

absl::StatusOr<AdminRequest> ParseAdminRequest(absl::string_view line) {
  if (line.size() > kMaxAdminLine) return absl::InvalidArgumentError("request too long");
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("not a JSON object");
  if (!j.contains("cmd") || !j["cmd"].is_string()) return absl::InvalidArgumentError("no cmd");
  std::string cmd = j["cmd"].get<std::string>();
  if (cmd == "status") return AdminStatus{};
  if (cmd == "policy-set" || cmd == "policy-clear") {
    if (!j.contains("scope")) return absl::InvalidArgumentError("no scope");
    absl::StatusOr<PolicyScope> scope = ScopeFromJson(j["scope"]);
    if (!scope.ok()) return scope.status();
    if (cmd == "policy-clear") {
      if (*scope == PolicyScope{})
        return absl::InvalidArgumentError("policy-clear needs a vm, device or queue");
      return AdminPolicyClear{*scope};
    }
    if (!j.contains("spec")) return absl::InvalidArgumentError("no spec");
    absl::StatusOr<PolicySpec> spec = SpecFromJson(j["spec"]);
    if (!spec.ok()) return spec.status();
    return AdminPolicySet{*scope, *spec};
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown cmd '", cmd, "'"));
}

bool AdminAuthorized(uint32_t peer_uid, uint32_t peer_gid, const std::vector<uint32_t>& groups,
                     uint32_t daemon_uid, std::optional<uint32_t> admin_gid) {
  if (peer_uid == 0 || peer_uid == daemon_uid) return true;
  if (!admin_gid) return false;
  if (peer_gid == *admin_gid) return true;
  for (uint32_t g : groups)
    if (g == *admin_gid) return true;
  return false;
}

std::vector<uint32_t> ParseProcGroups(absl::string_view proc_status) {
  std::vector<uint32_t> out;
  for (absl::string_view line : absl::StrSplit(proc_status, '\n')) {
    if (!absl::ConsumePrefix(&line, "Groups:")) continue;
    for (absl::string_view f : absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty())) {
      uint32_t g;
      if (absl::SimpleAtoi(f, &g)) out.push_back(g);
    }
  }
  return out;
}

json StatusJson(const std::vector<QueueView>& queues, const std::vector<AgentView>& agents,
                const PolicySpec& default_policy, int64_t) {
  json q = json::array();
  for (const QueueView& v : queues) {
    const std::string lease(proto::LeaseStateName(v.guest_lease));
    q.push_back(json{{"vm", v.key.vm},
                     {"device", v.key.device},
                     {"queue", v.key.queue},
                     // An observe-only queue has no policy: "observe".
                     {"mode", v.observe_only ? std::string("observe")
                                             : std::string(proto::KickModeName(v.spec.mode))},
                     {"driver", std::string(proto::DriverKindName(v.driver))},
                     {"source", PolicySourceName(v.source)},
                     {"batch", v.b},
                     {"defer_us", v.t_ns / 1000.0},
                     {"generation", v.generation},
                     {"acked_generation", v.acked_generation},
                     {"agent", v.agent_connected},
                     {"has_sample", v.has_sample},
                     {"lease", lease},
                     {"applied_mode", std::string(proto::KickModeName(v.applied_mode))},
                     {"applied_batch", v.applied_batch},
                     {"notifications_per_s", v.notifications_per_s},
                     {"requests_per_s", v.requests_per_s},
                     {"notifications_per_request", v.notifications_per_request},
                     {"mean_depth", v.mean_depth},
                     {"action", v.last_action},
                     // The VM's run state; a frozen queue's policy and lease are held.
                     {"state", v.vm_state.empty() ? std::string("running") : v.vm_state},
                     {"frozen", v.frozen}});
  }
  json a = json::array();
  for (const AgentView& av : agents) a.push_back(json{{"vm", av.vm}, {"connected", av.connected}});
  return json{{"ok", true}, {"queues", q}, {"agents", a}, {"default", SpecToJson(default_policy)}};
}

std::string ErrorReply(absl::string_view message) {
  return json{{"ok", false}, {"error", std::string(message)}}.dump();
}

}  // namespace vkick
