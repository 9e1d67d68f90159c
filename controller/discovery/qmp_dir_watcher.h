// --qmp-dir: watches one directory for QMP sockets with inotify. Every unix
// socket in it is one VM's QMP monitor: a socket appearing is a VM to attach,
// a socket going away is a VM to drop. The caller owns the poll/epoll loop
// and the QMP connections; this only says what changed.
//
// What counts: entries that are unix sockets themselves (lstat S_ISSOCK).
// Symbolic links are ignored, even to sockets: QEMU (libvirt's
// <qemu:commandline>, a KubeVirt hook sidecar, a plain -chardev) creates a
// real socket, and following links would let anyone who may create entries
// here point vkickd at any socket it can reach (libvirt's own monitor, which
// must not get a second client, or an unrelated daemon). inotify would not
// see a link's target go away either.
//
// A socket file outlives a QEMU that was killed (a clean exit removes it):
// it stays "added" until it is removed, and connecting to it is refused.
// A socket appears at bind(), a moment before QEMU listen()s: connect() right
// after kAdded may be refused; retry for a moment (seen with QEMU 7.2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/unique_fd.h"

namespace vkick {

// name -> inode of each unix socket in a directory. The inode tells a socket
// from a new one at the same name (a restarted QEMU).
using SocketSet = std::map<std::string, uint64_t>;

struct SocketSetDiff {
  std::vector<std::string> removed;  // gone, or replaced by another inode (sorted)
  std::vector<std::string> added;    // new or replaced, within the bound (sorted)
  std::vector<std::string> ignored;  // new but over the bound (sorted)
};

// Pure: what turns `known` (tracked now) into `scanned` (in the directory
// now), tracking at most `max_tracked`. Names that stay are kept first; new
// ones are added in name order while there is room. A replaced socket is
// removed and added again, so the caller reconnects.
SocketSetDiff DiffSocketSets(const SocketSet& known, const SocketSet& scanned,
                             size_t max_tracked);

class QmpDirWatcher {
 public:
  // Why 4096: vkickd's probe maps hold 4096 VMs by default (--max-vms) and
  // each tracked VM costs the daemon a QMP connection; more is a broken or
  // hostile directory, not a host.
  static constexpr size_t kDefaultMaxSockets = 4096;

  struct Change {
    enum Kind { kAdded, kRemoved };
    Kind kind;
    std::string path;  // DIR + "/" + name
    bool operator==(const Change&) const = default;
  };

  // Errors: kInvalidArgument max_sockets 0; the errno's code (kNotFound,
  // kPermissionDenied, ...) when DIR cannot be stat()ed or watched;
  // kFailedPrecondition when DIR is not a directory.
  static absl::StatusOr<std::unique_ptr<QmpDirWatcher>> Open(
      std::string dir, size_t max_sockets = kDefaultMaxSockets);

  // The inotify fd (non-blocking, close-on-exec): readable when Drain() has
  // something to read.
  int fd() const { return inotify_.get(); }
  const std::string& dir() const { return dir_; }

  // What changed since the last call, in the order to apply it (a replaced
  // socket: kRemoved, then kAdded). The first call reports every socket
  // already there as kAdded, sorted. Never blocks. kNotFound once DIR was
  // removed, moved or unmounted (and from then on): drop all its VMs. Other
  // errors (a failed scan) change nothing; the next call tries again.
  absl::StatusOr<std::vector<Change>> Drain();

  size_t tracked() const { return known_.size(); }
  // Sockets present but not tracked because of the bound. They are picked
  // up, in name order, as tracked ones go away.
  size_t ignored() const { return ignored_.size(); }
  // Times the kernel's event queue overflowed (each answered by a rescan).
  uint64_t overflows() const { return overflows_; }

 private:
  struct Event {
    uint32_t mask;
    std::string name;
  };

  QmpDirWatcher(std::string dir, UniqueFd inotify, size_t max_sockets)
      : dir_(std::move(dir)), inotify_(std::move(inotify)), max_(max_sockets) {}
  std::string PathOf(const std::string& name) const;
  absl::StatusOr<std::vector<Event>> ReadEvents();
  absl::Status Rescan(std::vector<Change>* out);
  void OnEvent(const Event& e, std::vector<Change>* out);
  void Forget(const std::string& name, std::vector<Change>* out);
  void Refresh(const std::string& name, std::vector<Change>* out);
  void Apply(const SocketSetDiff& d, const SocketSet& scanned, std::vector<Change>* out);

  std::string dir_;
  UniqueFd inotify_;
  size_t max_;
  // The next Drain() rescans: at first, after an overflow, after a failed scan.
  bool need_rescan_ = true;
  absl::Status gone_;  // sticky: DIR was removed/moved/unmounted
  SocketSet known_;
  // Names only, so their memory is small; the directory is writable only by
  // whoever may start VMs here.
  std::set<std::string> ignored_;
  uint64_t overflows_ = 0;
};

}  // namespace vkick
