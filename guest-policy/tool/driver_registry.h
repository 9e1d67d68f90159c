// The driver registry: how the guest agent finds running vkick-blk drivers
// and their control blocks (contract in docs/kick-policies.md).
//
//   $VKICK_RUN_DIR/drivers/<pid>.json   (VKICK_RUN_DIR default /run/vkick)
//   {"pid":int, "transport":"vhost-user"|"pci", "socket":"...", "pci":"...",
//    "serial":"<=20 printable chars", "queues":int, "queue_size":int,
//    "control_block":"/dev/shm/vkick/control-<pid>",
//    "stats_block":"/dev/shm/vkick/stats-<pid>"}   (absent: no stats block)
//
// Written atomically (tmp file + rename, so a reader never sees half a file)
// and removed on exit, also on error exits and on SIGINT/SIGTERM/SIGHUP. A
// SIGKILLed driver leaves its file behind: readers treat a file whose pid is
// not alive as stale.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "guest-policy/core/stats_block.h"

namespace vkick {

struct DriverInfo {
  int pid = 0;
  std::string transport;  // "vhost-user" | "pci"
  std::string socket;
  std::string pci;
  std::string serial;
  uint32_t queues = 0;
  uint32_t queue_size = 0;
  std::string control_block;
  std::string stats_block;  // empty: the driver keeps no stats block
};

// Pure helpers (unit-tested).
std::string DriverInfoJson(const DriverInfo& d);
// Printable ASCII only (0x20..0x7e), stops at the first NUL (GET_ID pads with
// NULs), at most 20 characters: the serial is a label the agent may export.
std::string SanitizeSerial(absl::string_view raw);
// The protocol's serial (docs/protocol.md): 0..20 characters of
// [A-Za-z0-9._:-] (no space: it is matched against --vhost-user IDs and may
// become a label).
bool IsProtocolSerial(absl::string_view serial);
// vhost-user default serial: the socket's basename without its extension,
// any character outside [A-Za-z0-9._:-] replaced by '_', at most 20.
std::string SerialFromSocketPath(absl::string_view path);
// $VKICK_RUN_DIR, else /run/vkick; a non-empty `flag` wins over both.
std::string ResolveRunDir(absl::string_view flag);
std::string DefaultControlBlockPath(int pid);  // /dev/shm/vkick/control-<pid>
// stats-<pid> in the directory of `control_path` (the agent accepts both
// blocks only inside its control directory).
std::string StatsBlockPathBeside(absl::string_view control_path, int pid);

// The driver's stats block (guest-policy/core/stats_block.h): created, sized
// and mapped shared by the driver, which alone writes it; removed with the
// object (and by DriverRegistration's signal handler when it names it).
class StatsFile {
 public:
  static absl::StatusOr<StatsFile> Create(const std::string& path, uint16_t num_queues);
  StatsFile(StatsFile&& o) noexcept : path_(std::move(o.path_)), block_(o.block_) { o.block_ = nullptr; }
  StatsFile& operator=(StatsFile&&) = delete;
  ~StatsFile();
  StatsBlock* block() const { return block_; }
  const std::string& path() const { return path_; }

 private:
  StatsFile(std::string path, StatsBlock* b) : path_(std::move(path)), block_(b) {}
  std::string path_;
  StatsBlock* block_ = nullptr;
};

// The registration of this process; the file goes away with the object.
class DriverRegistration {
 public:
  // Creates <run_dir>/drivers (0755) if needed and writes <pid>.json.
  static absl::StatusOr<DriverRegistration> Create(const std::string& run_dir, const DriverInfo& d);
  DriverRegistration(DriverRegistration&& o) noexcept : path_(std::move(o.path_)) { o.path_.clear(); }
  DriverRegistration& operator=(DriverRegistration&&) = delete;
  ~DriverRegistration();
  const std::string& path() const { return path_; }

 private:
  explicit DriverRegistration(std::string p) : path_(std::move(p)) {}
  std::string path_;
};

}  // namespace vkick
