// Maps the adaptive policy's control block file read-only (docs/kick-policies.md).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "guest-policy/core/control_block.h"

namespace vkick {

class ControlMapping {
 public:
  // Creates the file zero-filled (= invalid, so: immediate) if it does not
  // exist, so an agent that starts later writes into the very inode we map.
  static absl::StatusOr<ControlMapping> Open(const std::string& path);
  ControlMapping(ControlMapping&& o) noexcept : block_(o.block_) { o.block_ = nullptr; }
  ControlMapping& operator=(ControlMapping&&) = delete;
  ~ControlMapping();
  const ControlBlock* block() const { return block_; }

 private:
  explicit ControlMapping(const ControlBlock* b) : block_(b) {}
  const ControlBlock* block_ = nullptr;
};

}  // namespace vkick
