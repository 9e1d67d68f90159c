// The admin protocol (docs/control.md, "Admin socket"): one JSON request per
// line, one JSON reply per line.
//
//   {"cmd":"status"}
//   {"cmd":"policy-set","scope":{"vm":V,"device":D,"queue":Q},
//    "spec":{"mode":"static","batch":8,"defer_us":50}}
//   {"cmd":"policy-set","scope":{},"spec":{"mode":"adaptive"}}   (all queues)
//   {"cmd":"policy-clear","scope":{"vm":V}}
//   reply: {"ok":true,...} or {"ok":false,"error":"..."}
//
// Pure: parsing, validation, the authorization rule and the status JSON.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "controller/control/policy.h"
#include "controller/loop/control_loop.h"
#include "nlohmann/json.hpp"

namespace vkick {

inline constexpr size_t kMaxAdminLine = 64 * 1024;

struct AdminStatus {};
struct AdminPolicySet {
  PolicyScope scope;  // all empty: every queue (replaces the default, clears entries)
  PolicySpec spec;
};
struct AdminPolicyClear {
  PolicyScope scope;
};
using AdminRequest = std::variant<AdminStatus, AdminPolicySet, AdminPolicyClear>;

// Who sent a request: the connection's SO_PEERCRED (for the log of changes).
struct AdminPeer {
  uint32_t uid = 0;
  uint32_t gid = 0;
  int32_t pid = 0;  // 0: not from the socket (in-process callers, tests)
};

absl::StatusOr<AdminRequest> ParseAdminRequest(absl::string_view line);
// The JSON of a spec ({"mode":..,"batch":..,"defer_us":..}) and back.
nlohmann::json SpecToJson(const PolicySpec& s);
absl::StatusOr<PolicySpec> SpecFromJson(const nlohmann::json& j);

// uid 0 may always; the daemon's own uid may (an unprivileged test daemon);
// a member (primary or supplementary group) of the admin group may.
bool AdminAuthorized(uint32_t peer_uid, uint32_t peer_gid, const std::vector<uint32_t>& groups,
                     uint32_t daemon_uid, std::optional<uint32_t> admin_gid);
// The "Groups:" line of /proc/<pid>/status.
std::vector<uint32_t> ParseProcGroups(absl::string_view proc_status);

struct AgentView {
  std::string vm;
  uint32_t connected = 0;
};
// {"ok":true,"queues":[...],"agents":[...],"default":{...}}
nlohmann::json StatusJson(const std::vector<QueueView>& queues,
                          const std::vector<AgentView>& agents, const PolicySpec& default_policy,
                          int64_t now_ns);
std::string ErrorReply(absl::string_view message);

}  // namespace vkick
