#include "controller/daemon/attachment_scheduler.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cerrno>

#include "absl/time/clock.h"
#include "common/errno_status.h"

namespace vkick {
namespace {

// epoll data of the wake eventfd; task ids are small counters.
constexpr uint64_t kWakeTag = ~uint64_t{0};
// The loop also wakes this often with nothing to do, so a lost wake-up
// (there should be none) costs at most this much delay.
constexpr absl::Duration kMaxWait = absl::Seconds(1);

int WaitMs(absl::Time due, absl::Time now) {
  absl::Duration d = std::clamp(due - now, absl::ZeroDuration(), kMaxWait);
  // Rounded up: waking a little early would spin until the due time.
  return static_cast<int>(absl::ToInt64Milliseconds(d + absl::Milliseconds(1) -
                                                    absl::Nanoseconds(1)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttachmentScheduler>> AttachmentScheduler::Create(int workers) {
  UniqueFd ep(epoll_create1(EPOLL_CLOEXEC));
  if (!ep.valid()) return ErrnoStatus(errno, "epoll_create1");
  UniqueFd wake(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) return ErrnoStatus(errno, "eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeTag;
  if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0) {
    return ErrnoStatus(errno, "epoll_ctl(eventfd)");
  }
  return std::unique_ptr<AttachmentScheduler>(
      new AttachmentScheduler(std::max(workers, 1), std::move(ep), std::move(wake)));
}

AttachmentScheduler::~AttachmentScheduler() { Stop(); }

void AttachmentScheduler::Start() {
  loop_ = std::thread([this] { LoopThread(); });
  for (int i = 0; i < workers_; ++i) pool_.emplace_back([this] { WorkerThread(); });
}

void AttachmentScheduler::Stop() {
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
  }
  Wake();
  if (loop_.joinable()) loop_.join();
  for (auto& t : pool_) t.join();
  pool_.clear();
}

uint64_t AttachmentScheduler::runs() const {
  absl::MutexLock l(&mu_);
  return runs_;
}

void AttachmentScheduler::Add(uint64_t id, ScheduledTask* task) {
  {
    absl::MutexLock l(&mu_);
    Entry& e = entries_[id];
    e = Entry{task};
    e.next.due = absl::InfinitePast();  // at once
    rearm_.insert(id);
  }
  Wake();
}

void AttachmentScheduler::Remove(uint64_t id) {
  absl::MutexLock l(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  e.removed = true;
  Disarm(id, e);
  if (e.queued) ready_.erase(std::find(ready_.begin(), ready_.end(), id));
  mu_.Await(absl::Condition(
      +[](Entry* e) { return !e->running; }, &e));
  rearm_.erase(id);
  entries_.erase(id);
}

void AttachmentScheduler::Wake() {
  const uint64_t one = 1;
  // Best effort: a full counter (never in practice) still wakes the loop.
  (void)!write(wake_.get(), &one, sizeof one);
}

void AttachmentScheduler::Arm(uint64_t id, Entry& e) {
  if (e.next.fd >= 0 && !e.in_epoll) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT;
    ev.data.u64 = id;
    // A failure (an fd the task already closed) leaves the due time to
    // bring the task back; it then reports its current fd.
    e.in_epoll = epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, e.next.fd, &ev) == 0;
  }
  if (!e.has_due && e.next.due != absl::InfiniteFuture()) {
    due_.emplace(e.next.due, id);
    e.has_due = true;
  }
}

void AttachmentScheduler::Disarm(uint64_t id, Entry& e) {
  if (e.in_epoll) {
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, e.next.fd, nullptr);
    e.in_epoll = false;
  }
  if (e.has_due) {
    due_.erase({e.next.due, id});
    e.has_due = false;
  }
}

void AttachmentScheduler::Dispatch(uint64_t id, Entry& e, bool readable) {
  if (e.running || e.queued || e.removed) return;
  Disarm(id, e);
  e.queued = true;
  e.readable = readable;
  ready_.push_back(id);
}

absl::Time AttachmentScheduler::DispatchDue(absl::Time now) {
  while (!due_.empty() && due_.begin()->first <= now) {
    const uint64_t id = due_.begin()->second;
    Dispatch(id, entries_[id], /*readable=*/false);
  }
  return due_.empty() ? absl::InfiniteFuture() : due_.begin()->first;
}

void AttachmentScheduler::LoopThread() {
  epoll_event evs[64];
  for (;;) {
    absl::Time next;
    int wait_ms;
    {
      absl::MutexLock l(&mu_);
      if (stopping_) return;
      for (uint64_t id : rearm_) {
        auto it = entries_.find(id);
        if (it != entries_.end() && !it->second.removed && !it->second.running) {
          Arm(id, it->second);
        }
      }
      rearm_.clear();
      const absl::Time now = absl::Now();
      next = DispatchDue(now);
      wait_ms = WaitMs(next, now);
      loop_deadline_ = now + absl::Milliseconds(wait_ms);
    }
    const int n = epoll_wait(epoll_.get(), evs, 64, wait_ms);
    absl::MutexLock l(&mu_);
    loop_deadline_ = absl::InfinitePast();  // awake: workers need not wake it
    for (int i = 0; i < n; ++i) {
      const uint64_t id = evs[i].data.u64;
      if (id == kWakeTag) {
        uint64_t count;
        (void)!read(wake_.get(), &count, sizeof count);
        continue;
      }
      auto it = entries_.find(id);
      if (it == entries_.end() || !it->second.in_epoll) continue;
      Dispatch(id, it->second, /*readable=*/true);
    }
  }
}

void AttachmentScheduler::WorkerThread() {
  for (;;) {
    uint64_t id;
    ScheduledTask* task;
    bool readable;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](AttachmentScheduler* s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return s->stopping_ || !s->ready_.empty();
          },
          this));
      if (stopping_) return;
      id = ready_.front();
      ready_.pop_front();
      Entry& e = entries_[id];
      e.queued = false;
      e.running = true;
      task = e.task;
      readable = e.readable;
    }
    ScheduledTask::Next next = task->Run(readable);
    bool wake;
    {
      absl::MutexLock l(&mu_);
      ++runs_;
      Entry& e = entries_[id];
      e.running = false;
      e.next = next;
      // Armed here (epoll_ctl is thread-safe): the loop is woken only when
      // it would otherwise sleep past the new due time, so a refresh costs
      // no loop wake-up of its own.
      if (!e.removed) Arm(id, e);
      wake = next.due < loop_deadline_;
    }
    if (wake) Wake();
  }
}

}  // namespace vkick
