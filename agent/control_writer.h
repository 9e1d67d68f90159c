// Writes one driver's control block (guest-policy/core/control_block.h): the
// file vkick-blk --policy=adaptive maps read-only. The agent owns it: creates
// it (in place, never replaced, so a driver that already mapped it keeps
// seeing updates), initialises the header and publishes entries under the
// seqlock (WriteControlEntries).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "guest-policy/core/control_block.h"

namespace vkick::agent {

class ControlWriter {
 public:
  // Opens or creates `path` (no symlink followed, regular file only) and
  // maps it read-write. A file without a valid header is initialised.
  static absl::StatusOr<std::unique_ptr<ControlWriter>> Open(const std::string& path, uint64_t writer_pid);
  ~ControlWriter();
  ControlWriter(const ControlWriter&) = delete;
  ControlWriter& operator=(const ControlWriter&) = delete;

  void Write(const std::vector<ControlEntry>& entries);
  const std::string& path() const { return path_; }
  const ControlBlock* block() const { return cb_; }

 private:
  ControlWriter(std::string path, ControlBlock* cb) : path_(std::move(path)), cb_(cb) {}
  std::string path_;
  ControlBlock* cb_;
};

}  // namespace vkick::agent
