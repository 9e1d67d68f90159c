// vkickctl's pure part: the command line -> one admin request (JSON line),
// and an admin status reply -> the operator's table.
//
//   vkickctl [--socket=PATH] status [--json]
//   vkickctl [--socket=PATH] policy set [--vm V] [--device D] [--queue Q] [--all]
//            adaptive|immediate|event-idx|static [--batch N --defer-us T]
//   vkickctl [--socket=PATH] policy clear [--vm V] [--device D] [--queue Q]
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace vkick {

inline constexpr char kDefaultAdminSocket[] = "/run/vkick/admin.sock";

struct CtlCommand {
  std::string socket = kDefaultAdminSocket;
  bool help = false;
  bool json_output = false;   // status --json
  bool is_status = false;
  nlohmann::json request;     // the admin request to send
};

// kInvalidArgument with a message for the user on bad arguments.
absl::StatusOr<CtlCommand> ParseCtlArgs(const std::vector<std::string>& args);
std::string CtlUsage();

// The status table (one line per queue, aligned columns).
std::string FormatStatusTable(const nlohmann::json& status);

}  // namespace vkick
