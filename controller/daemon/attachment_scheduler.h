// Runs the work of many QMP attachments on a few threads.
//
// A fleet of 1000 VMs must not cost 1000 threads waking every few hundred
// milliseconds: one loop thread waits (epoll) until some attachment's socket
// is readable (a QMP event, or the VM closing it) or its next refresh is due,
// and hands that attachment to a small pool of workers. The workers do the
// blocking QMP exchanges, each bounded by the QMP deadline, so a hung VM
// holds one worker for at most that long and never the loop.
//
// An attachment runs on at most one worker at a time, and its socket is in
// the epoll set only while it is idle: a worker may close and reopen the
// connection without the loop ever watching a stale descriptor.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/unique_fd.h"

namespace vkick {

// One attachment's work, as the scheduler sees it.
class ScheduledTask {
 public:
  virtual ~ScheduledTask() = default;
  struct Next {
    absl::Time due = absl::InfiniteFuture();  // run again then at the latest
    int fd = -1;                              // run again when readable (-1: none)
  };
  // Does whatever is due; `readable` says the task's fd woke it. Runs on a
  // worker thread, never concurrently with itself.
  virtual Next Run(bool readable) = 0;
};

class AttachmentScheduler {
 public:
  // `workers` threads run tasks; the loop thread only waits and dispatches.
  static absl::StatusOr<std::unique_ptr<AttachmentScheduler>> Create(int workers);
  ~AttachmentScheduler();  // Stop()s
  AttachmentScheduler(const AttachmentScheduler&) = delete;
  AttachmentScheduler& operator=(const AttachmentScheduler&) = delete;

  // Adds `task` (not owned; it must stay valid until Remove() returned) under
  // `id`, to run at once.
  void Add(uint64_t id, ScheduledTask* task);
  // Takes the task out; waits for a run in progress to finish. After it
  // returns the task is never run again. Not from the task's own Run().
  void Remove(uint64_t id);
  void Start();
  // Stops the loop and the workers (runs in progress finish first).
  void Stop();

  // Tasks run so far (tests, the scale benchmark's sanity checks).
  uint64_t runs() const;

 private:
  struct Entry {
    ScheduledTask* task;
    ScheduledTask::Next next;  // valid while idle
    bool running = false;
    bool removed = false;
    bool readable = false;  // the run queued was woken by the fd
    bool queued = false;    // in ready_ (waiting for a worker)
    bool in_epoll = false;
    bool has_due = false;  // in due_ under next.due
  };

  explicit AttachmentScheduler(int workers, UniqueFd epoll, UniqueFd wake)
      : workers_(workers), epoll_(std::move(epoll)), wake_(std::move(wake)) {}

  void LoopThread();
  void WorkerThread();
  void Wake();
  // Under mu_; from the loop thread, and Arm also from a worker after a run.
  void Arm(uint64_t id, Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Disarm(uint64_t id, Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Dispatch(uint64_t id, Entry& e, bool readable) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time DispatchDue(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int workers_;
  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd: new tasks, finished runs, Stop()

  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::set<std::pair<absl::Time, uint64_t>> due_ ABSL_GUARDED_BY(mu_);  // idle, by due time
  std::set<uint64_t> rearm_ ABSL_GUARDED_BY(mu_);  // new tasks to arm
  // When the loop's epoll_wait times out; InfinitePast while it is awake.
  absl::Time loop_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::deque<uint64_t> ready_ ABSL_GUARDED_BY(mu_);  // waiting for a worker
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t runs_ ABSL_GUARDED_BY(mu_) = 0;

  std::thread loop_;
  std::vector<std::thread> pool_;
};

}  // namespace vkick
