#include "controller/discovery/qmp_dir_watcher.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/errno_status.h"

namespace vkick {
namespace {

// Entries coming and going, and the directory itself going away.
// IN_Q_OVERFLOW, IN_IGNORED and IN_UNMOUNT are delivered without asking.
// IN_ONLYDIR: fail if DIR was replaced by a non-directory since Open()'s stat.
constexpr uint32_t kWatchMask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO |
                                IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR;
constexpr uint32_t kGoneMask = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED;
// Bounds one Drain(): 16 reads of 64 KiB hold more than a default kernel
// queue (16384 events). Whatever is left keeps the fd readable for the next.
constexpr int kMaxReadsPerDrain = 16;
constexpr size_t kReadBufferBytes = 64 * 1024;

// inotify's limits are per user, host-wide: name the knob to raise.
absl::Status InotifyError(int err, absl::string_view what) {
  absl::Status s = ErrnoStatus(err, what);
  const char* knob = err == EMFILE   ? "fs.inotify.max_user_instances"
                     : err == ENOSPC ? "fs.inotify.max_user_watches"
                                     : nullptr;
  if (knob == nullptr) return s;
  return absl::Status(s.code(), absl::StrCat(s.message(), "; raise the sysctl ", knob));
}

// The inode of the unix socket at `path` itself (a link is not followed).
std::optional<uint64_t> SocketInode(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return std::nullopt;
  return static_cast<uint64_t>(st.st_ino);
}

absl::StatusOr<SocketSet> ScanSockets(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus(errno, absl::StrCat("QMP socket directory ", dir));
  SocketSet out;
  errno = 0;
  while (struct dirent* e = readdir(d)) {
    // d_type spares a stat per other file; some file systems say DT_UNKNOWN.
    struct stat st;
    if ((e->d_type == DT_SOCK || e->d_type == DT_UNKNOWN) &&
        fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode))
      out[e->d_name] = static_cast<uint64_t>(st.st_ino);
    errno = 0;
  }
  int err = errno;  // readdir() returns nullptr at the end and on errors
  closedir(d);
  if (err != 0) return ErrnoStatus(err, absl::StrCat("readdir ", dir));
  return out;
}

}  // namespace

SocketSetDiff DiffSocketSets(const SocketSet& known, const SocketSet& scanned,
                             size_t max_tracked) {
  SocketSetDiff d;
  for (const auto& [name, inode] : known) {
    auto it = scanned.find(name);
    if (it == scanned.end() || it->second != inode) d.removed.push_back(name);
  }
  size_t tracked = known.size() - d.removed.size();
  for (const auto& [name, inode] : scanned) {
    auto it = known.find(name);
    if (it != known.end() && it->second == inode) continue;  // kept
    if (tracked < max_tracked) {
      d.added.push_back(name);
      ++tracked;
    } else {
      d.ignored.push_back(name);
    }
  }
  return d;
}

absl::StatusOr<std::unique_ptr<QmpDirWatcher>> QmpDirWatcher::Open(std::string dir,
                                                                  size_t max_sockets) {
  if (max_sockets == 0)
    return absl::InvalidArgumentError("QMP socket directory: the socket bound must be >= 1");
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();  // DIR/name, not DIR//name
  if (dir.empty()) return absl::InvalidArgumentError("QMP socket directory: empty path");
  struct stat st;
  if (stat(dir.c_str(), &st) != 0)
    return ErrnoStatus(errno, absl::StrCat("QMP socket directory ", dir));
  if (!S_ISDIR(st.st_mode))
    return absl::FailedPreconditionError(
        absl::StrCat("QMP socket directory ", dir, " is not a directory"));
  UniqueFd fd(inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!fd.valid()) return InotifyError(errno, "inotify_init1");
  if (inotify_add_watch(fd.get(), dir.c_str(), kWatchMask) < 0)
    return InotifyError(errno, absl::StrCat("inotify_add_watch ", dir));
  return std::unique_ptr<QmpDirWatcher>(
      new QmpDirWatcher(std::move(dir), std::move(fd), max_sockets));
}

absl::StatusOr<std::vector<QmpDirWatcher::Change>> QmpDirWatcher::Drain() {
  if (!gone_.ok()) return gone_;
  absl::StatusOr<std::vector<Event>> events = ReadEvents();
  if (!events.ok()) return events.status();
  for (const Event& e : *events) {
    if (e.mask & kGoneMask)
      return gone_ = absl::NotFoundError(absl::StrCat(
                 "QMP socket directory ", dir_,
                 " was removed, moved or unmounted: its VMs are no longer watched"));
    if (e.mask & IN_Q_OVERFLOW) {  // events were lost: only a scan knows
      ++overflows_;
      need_rescan_ = true;
    }
  }
  std::vector<Change> out;
  if (need_rescan_) {
    // The scan covers every event just read: they all happened before it.
    if (absl::Status s = Rescan(&out); !s.ok()) return s;
    return out;
  }
  for (const Event& e : *events) OnEvent(e, &out);
  // A tracked socket left while others wait beyond the bound: take them in.
  // A failed scan leaves need_rescan_ set, so the next Drain() retries it.
  if (!ignored_.empty() && known_.size() < max_) Rescan(&out).IgnoreError();
  return out;
}

std::string QmpDirWatcher::PathOf(const std::string& name) const {
  return dir_ == "/" ? "/" + name : absl::StrCat(dir_, "/", name);
}

absl::StatusOr<std::vector<QmpDirWatcher::Event>> QmpDirWatcher::ReadEvents() {
  std::vector<Event> events;
  alignas(struct inotify_event) char buf[kReadBufferBytes];
  for (int i = 0; i < kMaxReadsPerDrain; ++i) {
    ssize_t n = read(inotify_.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n < 0) return ErrnoStatus(errno, absl::StrCat("read inotify for ", dir_));
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      const auto* ev = reinterpret_cast<const struct inotify_event*>(buf + off);
      // name is NUL-padded to len; empty for events on DIR itself.
      events.push_back({ev->mask, ev->len > 0 ? std::string(ev->name) : std::string()});
      off += static_cast<ssize_t>(sizeof(struct inotify_event) + ev->len);
    }
  }
  return events;
}

absl::Status QmpDirWatcher::Rescan(std::vector<Change>* out) {
  absl::StatusOr<SocketSet> now = ScanSockets(dir_);
  need_rescan_ = !now.ok();
  if (!now.ok()) return now.status();
  ignored_.clear();  // the scan says which of them are still there
  Apply(DiffSocketSets(known_, *now, max_), *now, out);
  return absl::OkStatus();
}

void QmpDirWatcher::OnEvent(const Event& e, std::vector<Change>* out) {
  if (e.name.empty() || (e.mask & IN_ISDIR)) return;  // a directory is no QMP socket
  // The entry we knew is gone, even if a new socket took its name (and, on
  // some file systems, its inode number) before we looked.
  if (e.mask & (IN_DELETE | IN_MOVED_FROM)) Forget(e.name, out);
  Refresh(e.name, out);
}

void QmpDirWatcher::Forget(const std::string& name, std::vector<Change>* out) {
  ignored_.erase(name);
  if (known_.erase(name) > 0) out->push_back({Change::kRemoved, PathOf(name)});
}

// One name against the directory as it is now: the same diff as a full scan,
// with the room the other tracked sockets leave.
void QmpDirWatcher::Refresh(const std::string& name, std::vector<Change>* out) {
  SocketSet was, now;
  if (auto it = known_.find(name); it != known_.end()) was.insert(*it);
  if (std::optional<uint64_t> inode = SocketInode(PathOf(name))) now[name] = *inode;
  ignored_.erase(name);
  size_t others = known_.size() - was.size();
  Apply(DiffSocketSets(was, now, max_ > others ? max_ - others : 0), now, out);
}

void QmpDirWatcher::Apply(const SocketSetDiff& d, const SocketSet& scanned,
                          std::vector<Change>* out) {
  for (const std::string& name : d.removed) {
    known_.erase(name);
    out->push_back({Change::kRemoved, PathOf(name)});
  }
  for (const std::string& name : d.added) {
    known_[name] = scanned.at(name);
    out->push_back({Change::kAdded, PathOf(name)});
  }
  ignored_.insert(d.ignored.begin(), d.ignored.end());
}

}  // namespace vkick
