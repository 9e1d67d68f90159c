#include "controller/discovery/vm_lifecycle.h"

#include <map>
#include <optional>

#include "controller/discovery/vm_model.h"

namespace vkick {

const char* RunStateName(RunState s) {
  switch (s) {
    case RunState::kUnknown: return "unknown";
    case RunState::kRunning: return "running";
    case RunState::kMigrating: return "migrating";
    case RunState::kPaused: return "paused";
    case RunState::kSuspended: return "suspended";
    case RunState::kInMigrate: return "inmigrate";
    case RunState::kPostMigrate: return "postmigrate";
    case RunState::kShutdown: return "shutdown";
  }
  return "unknown";
}

namespace {

// query-migrate's statuses of a migration still under way (QAPI
// MigrationStatus); "none", "completed", "failed", "cancelled" are not.
bool MigrationUnderWay(absl::string_view m) {
  return m == "setup" || m == "active" || m == "postcopy-active" || m == "postcopy-paused" ||
         m == "postcopy-recover" || m == "pre-switchover" || m == "device" ||
         m == "wait-unplug" || m == "cancelling" || m == "colo";
}

}  // namespace

RunState RunStateFrom(absl::string_view st, absl::string_view migration) {
  if (st.empty()) return RunState::kUnknown;
  if (st == "running") {
    return MigrationUnderWay(migration) ? RunState::kMigrating : RunState::kRunning;
  }
  if (st == "inmigrate") return RunState::kInMigrate;
  // finish-migrate: the source stopped for the last pass; the migration
  // is under way until it is postmigrate.
  if (st == "finish-migrate") return RunState::kMigrating;
  if (st == "postmigrate") return RunState::kPostMigrate;
  if (st == "suspended") return RunState::kSuspended;
  if (st == "shutdown") return RunState::kShutdown;
  return RunState::kPaused;  // paused, prelaunch, debug, io-error, save-vm, restore-vm, ...
}

bool SameGuest(const VmInfo& a, const VmInfo& b) {
  auto uuid = [](const std::string& u) { return u.empty() ? std::string(kNilUuid) : u; };
  return a.name == b.name && uuid(a.uuid) == uuid(b.uuid);
}

CounterSnapshot CarryCounters(const CounterSnapshot& from, const VmInfo& from_info,
                              const VmInfo& to_info, uint32_t to_vm_id) {
  std::map<std::string, uint16_t> to_ids;
  for (const VirtioDeviceInfo& d : to_info.devices) to_ids.emplace(d.label, d.device_id);
  std::map<uint16_t, uint16_t> id_map;  // from's device_id -> to's
  for (const VirtioDeviceInfo& d : from_info.devices) {
    if (auto it = to_ids.find(d.label); it != to_ids.end()) id_map.emplace(d.device_id, it->second);
  }
  CounterSnapshot out;
  for (NotificationCount n : from.notifications) {
    auto it = id_map.find(n.device_id);
    if (it == id_map.end()) continue;
    n.vm_id = to_vm_id;
    n.device_id = it->second;
    out.notifications.push_back(n);
  }
  for (ExitCount e : from.exits) {
    e.vm_id = to_vm_id;
    out.exits.push_back(e);
  }
  for (UnmatchedCount u : from.unmatched_writes) {
    u.vm_id = to_vm_id;
    out.unmatched_writes.push_back(u);
  }
  for (InterruptCount i : from.interrupts) {
    i.vm_id = to_vm_id;
    out.interrupts.push_back(i);
  }
  return out;
}

}  // namespace vkick
