// The driver registry: vkick-blk writes $VKICK_RUN_DIR/drivers/<pid>.json on
// start (atomically) and removes it on exit. The agent reads it to know which
// processes to probe and which control block each one maps.
//
// Parsing is pure (ParseDriverEntry); ScanRegistry is the thin I/O part.
// Every entry is untrusted input: the agent runs as root and writes the
// control block an entry names, so the path must be a plain file name inside
// the agent's control directory (no symlink followed, see control_writer.h).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "protocol/messages.h"

namespace vkick::agent {

inline constexpr size_t kMaxRegistryFileBytes = 4096;
inline constexpr size_t kMaxRegisteredDrivers = proto::kMaxDevices;  // one hello device each
inline constexpr size_t kMaxRegistryFilesPerScan = 256;  // a flooded directory costs a bounded scan

struct DriverEntry {
  enum class Transport { kVhostUser, kPci };
  int32_t pid = 0;
  Transport transport = Transport::kVhostUser;
  std::string socket;         // vhost-user socket path, may be empty
  std::string pci;            // "0000:00:04.0" for pci
  std::string serial;         // <= 20 printable, no space
  uint16_t queues = 1;        // 1..kMaxQueuesPerDevice
  uint16_t queue_size = 256;  // 1..kMaxQueueSize
  std::string control_block;  // absolute path, directly inside the control dir
  std::string stats_block;    // the driver's counters: same rule; empty: none
  friend bool operator==(const DriverEntry&, const DriverEntry&) = default;
};

// Parses one registry file. `file_name` is the base name ("<pid>.json"): the
// pid inside must match it. `control_dir` is the only directory a control
// block may live in (absolute, no trailing slash).
absl::StatusOr<DriverEntry> ParseDriverEntry(absl::string_view json, absl::string_view file_name,
                                             absl::string_view control_dir);

// "DDDD:BB:SS.F" -> domain, bus, devfn. False when malformed.
bool ParsePciAddress(absl::string_view text, uint16_t* domain, uint8_t* bus, uint8_t* devfn);

// The hello device for a driver: pci transport -> its PCI address; vhost-user
// -> domain/bus/devfn 0 here, replaced by a distinct fake function when the
// agent builds the hello (Agent::Announceable, docs/protocol.md). Serial and queue geometry from
// the entry (queues clamped to the protocol bound).
proto::GuestDevice ToGuestDevice(const DriverEntry& e);

struct RegistryScan {
  std::vector<DriverEntry> drivers;           // sorted by pid, live processes only
  std::map<std::string, uint64_t> rejected;   // reason -> files ignored in this scan
  std::vector<std::string> rejected_files;    // "<name>: <reason>" (for the log)
};

// Reads the *.json files of `dir` (missing dir = empty registry; at most
// kMaxRegistryFilesPerScan per scan, in directory order). Files that
// are too big, malformed, name a dead pid, or beyond kMaxRegisteredDrivers
// are ignored and counted by reason. `proc_root` is "/proc" (tests override).
RegistryScan ScanRegistry(const std::string& dir, const std::string& control_dir,
                          const std::string& proc_root = "/proc");

}  // namespace vkick::agent
