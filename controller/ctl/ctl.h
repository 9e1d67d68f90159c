// vkickctl's pure part: the command line -> one admin request (JSON line),
// and an admin status reply -> the operator's table.
//
//   vkickctl [--socket=PATH] status [--json]
//   vkickctl [--socket=PATH] policy set [--vm V] [--device D] [--queue Q] [--all]
//            adaptive|immediate|event-idx|static [--batch N --defer-us T]
//   vkickctl [--socket=PATH] policy clear [--vm V] [--device D] [--queue Q]
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace vkick {

inline constexpr char kDefaultAdminSocket[] = "/run/vkick/admin.sock";

// The command line's flags (main.cc's Abseil flags, or a test's values).
struct CtlOptions {
  std::string socket = kDefaultAdminSocket;
  bool json = false;
  bool all = false;
  std::string vm, device;
  std::optional<int> queue, batch;
  std::optional<double> defer_us;
};

struct CtlCommand {
  std::string socket = kDefaultAdminSocket;
  bool json_output = false;   // status --json
  bool is_status = false;
  nlohmann::json request;     // the admin request to send
};

// The command (`positional`: "status" | "policy set MODE" | "policy clear")
// and its flags -> the admin request; kInvalidArgument with a message for
// the user on a bad combination or value.
absl::StatusOr<CtlCommand> BuildCtlCommand(const std::vector<std::string>& positional, const CtlOptions& o);
std::string CtlUsage();

// The status table (one line per queue, aligned columns).
std::string FormatStatusTable(const nlohmann::json& status);

}  // namespace vkick
