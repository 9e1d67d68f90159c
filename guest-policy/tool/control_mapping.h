// Maps the adaptive policy's control block file read-only, and follows it as
// the guest agent creates, replaces or removes it (docs/kick-policies.md).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "guest-policy/core/control_block.h"

namespace vkick {

class ControlMapping {
 public:
  // Maps an existing file read-only. NotFound when it does not exist (the
  // agent has not started yet): the driver never creates it, so the file's
  // owner is always the agent. A file shorter than the block is refused
  // (mapping past EOF would SIGBUS on access).
  static absl::StatusOr<ControlMapping> Open(const std::string& path);
  ControlMapping(ControlMapping&& o) noexcept : block_(o.block_), dev_(o.dev_), ino_(o.ino_) { o.block_ = nullptr; }
  ControlMapping& operator=(ControlMapping&& o) noexcept;
  ~ControlMapping();
  const ControlBlock* block() const { return block_; }
  dev_t dev() const { return dev_; }
  ino_t ino() const { return ino_; }

 private:
  ControlMapping(const ControlBlock* b, dev_t d, ino_t i) : block_(b), dev_(d), ino_(i) {}
  const ControlBlock* block_ = nullptr;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
};

// One queue thread's view of the control block path. Refresh() is called
// from the poller loop; at most every `retry_ns` it stats the path and
//   - maps the file when it appeared (an agent started after us takes over),
//   - remaps it when it was replaced (another inode: agent restarted, or
//     wrote a new file and renamed it over the old one),
//   - drops the mapping when the file is gone (agent stopped and cleaned up:
//     the driver falls back to immediate right away instead of waiting for
//     the lease).
// Per thread on purpose: a remap never pulls memory from under another
// queue's reader, so no locking is needed.
class ControlWatcher {
 public:
  ControlWatcher(std::string path, uint64_t retry_ns) : path_(std::move(path)), retry_ns_(retry_ns) {}
  // Returns the block to read now (nullptr: none, use the fallback) and sets
  // *changed when it differs from the previous call's.
  const ControlBlock* Refresh(uint64_t now_ns, bool* changed);
  uint64_t maps() const { return maps_; }      // successful (re)mappings
  uint64_t unmaps() const { return unmaps_; }  // mappings dropped (file gone/invalid)
  bool mapped() const { return mapping_.has_value(); }

 private:
  std::string path_;
  uint64_t retry_ns_;
  uint64_t last_check_ns_ = 0;
  bool checked_ = false;
  std::optional<ControlMapping> mapping_;
  uint64_t maps_ = 0, unmaps_ = 0;
};

}  // namespace vkick
