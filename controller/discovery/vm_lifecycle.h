// A VM's lifecycle as QMP reports it: its run state (query-status, refined
// by query-migrate) and its identity across QEMU processes (name + uuid),
// and how a VM that moved to another QEMU process (live migration, or save
// to a file and restore) carries its host counts over. Pure logic, no I/O:
// discovery fills VmInfo::run_state and ::uuid, the daemon decides with
// these functions, the control loop freezes what IsFrozen says.
#pragma once

#include <string>

#include "absl/strings/string_view.h"
#include "controller/probes/probe_backend.h"

namespace vkick {

struct VmInfo;

enum class RunState {
  kUnknown,    // QEMU did not say (an old QEMU, a fake): treated as running
  kRunning,
  kMigrating,  // running, but an outgoing migration is in progress
  kPaused,     // stopped by `stop`, -S, an I/O error, a debugger, a watchdog...
  kSuspended,  // the guest is in S3 (SUSPEND until WAKEUP)
  kInMigrate,  // an incoming QEMU waiting for (or loading) the state
  kPostMigrate,  // the source after the migration completed (or a save to a file)
  kShutdown,   // the guest shut down, QEMU still runs (-no-shutdown)
};

// "running", "migrating", "paused", "suspended", "inmigrate", "postmigrate",
// "shutdown", "unknown": the `state` vkickctl status shows.
const char* RunStateName(RunState s);

// From query-status' "status" and query-migrate's "status" ("" when not
// asked or none). Unknown status strings are paused: QEMU adds stopped
// states (colo, guest-panicked...), and a VM QEMU does not call "running"
// runs no vCPU.
RunState RunStateFrom(absl::string_view qemu_status, absl::string_view migration_status);

// The guest runs no vCPU (or is being moved): the control loop holds its
// queues as they are and their agent lease does not run out.
inline bool IsFrozen(RunState s) {
  return s != RunState::kRunning && s != RunState::kUnknown;
}

// A state that turns into another by itself soon (discovery re-reads it
// sooner than the periodic refresh).
inline bool InTransition(RunState s) {
  return s == RunState::kMigrating || s == RunState::kInMigrate;
}

// The nil uuid QEMU reports without -uuid.
inline constexpr char kNilUuid[] = "00000000-0000-0000-0000-000000000000";

// Whether `a` and `b` are the same guest in two QEMU processes: the same
// -name and the same -uuid (both nil counts as the same: the name decides;
// docs/operations.md says to give migrating VMs a -uuid).
bool SameGuest(const VmInfo& a, const VmInfo& b);

// The counts of `from` (a VM's final counts, vm_id from_vm_id, devices as
// in `from_info`) renamed for `to` (vm_id to_vm_id, devices as in
// `to_info`): device ids are matched by label, since each QEMU process's
// discovery numbers its own devices. Counts of a device `to` lacks are
// dropped (the exporter would show them nowhere). What a migrated VM's own
// counts are added to.
CounterSnapshot CarryCounters(const CounterSnapshot& from, const VmInfo& from_info,
                              const VmInfo& to_info, uint32_t to_vm_id);

}  // namespace vkick
