// The scheduler every QMP attachment runs on: due times, readable fds, one
// run per task at a time, removal while running, few threads for many tasks.
#include "controller/daemon/attachment_scheduler.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/unit/daemon/fakes.h"

namespace vkick {
namespace {

using testing::Eventually;
using testing::ThreadCount;

// Runs every `period` (or only when its fd is readable), counting runs and
// catching overlapping ones.
class CountingTask : public ScheduledTask {
 public:
  explicit CountingTask(absl::Duration period, int fd = -1, absl::Duration hold = {})
      : period_(period), fd_(fd), hold_(hold) {}
  Next Run(bool readable) override {
    if (active_.fetch_add(1) != 0) overlapped_ = true;
    ++runs_;
    if (readable) {
      ++readable_runs_;
      uint64_t v;
      (void)!read(fd_, &v, sizeof v);
    }
    if (hold_ > absl::ZeroDuration()) absl::SleepFor(hold_);
    active_.fetch_sub(1);
    return {period_ == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + period_,
            fd_};
  }
  std::atomic<int> runs_{0}, readable_runs_{0}, active_{0};
  std::atomic<bool> overlapped_{false};

 private:
  const absl::Duration period_;
  const int fd_;
  const absl::Duration hold_;
};

TEST(AttachmentSchedulerTest, RunsAtOnceThenAtEachDueTime) {
  auto s = AttachmentScheduler::Create(2);
  ASSERT_TRUE(s.ok()) << s.status();
  CountingTask t(absl::Milliseconds(20));
  (*s)->Add(1, &t);
  (*s)->Start();
  ASSERT_TRUE(Eventually([&] { return t.runs_ >= 1; }, absl::Milliseconds(500)))
      << "a new task runs at once";
  absl::SleepFor(absl::Milliseconds(300));
  (*s)->Stop();
  // 300 ms at one run per 20 ms: about 15, never a busy loop.
  EXPECT_GE(t.runs_, 5);
  EXPECT_LE(t.runs_, 20);
}

TEST(AttachmentSchedulerTest, AReadableFdWakesATaskWithoutADueTime) {
  auto s = AttachmentScheduler::Create(1);
  ASSERT_TRUE(s.ok());
  const int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  CountingTask t(absl::InfiniteDuration(), efd);
  (*s)->Add(7, &t);
  (*s)->Start();
  ASSERT_TRUE(Eventually([&] { return t.runs_ == 1; }));
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(t.runs_, 1) << "nothing due, nothing readable: not run";
  for (int i = 1; i <= 3; ++i) {
    const uint64_t one = 1;
    ASSERT_EQ(write(efd, &one, sizeof one), 8);
    ASSERT_TRUE(Eventually([&] { return t.readable_runs_ == i; })) << i;
  }
  (*s)->Stop();
  close(efd);
}

TEST(AttachmentSchedulerTest, ManyTasksFewThreadsNoTaskRunsTwiceAtOnce) {
  const int before = ThreadCount();
  auto s = AttachmentScheduler::Create(3);
  ASSERT_TRUE(s.ok());
  std::vector<std::unique_ptr<CountingTask>> tasks;
  for (int i = 0; i < 500; ++i) {
    tasks.push_back(std::make_unique<CountingTask>(absl::Milliseconds(1), -1,
                                                   absl::Microseconds(100)));
    (*s)->Add(i, tasks.back().get());
  }
  (*s)->Start();
  EXPECT_EQ(ThreadCount() - before, 4) << "3 workers and the loop, for 500 tasks";
  ASSERT_TRUE(Eventually([&] {
    for (const auto& t : tasks)
      if (t->runs_ < 2) return false;
    return true;
  }, absl::Seconds(20)));
  (*s)->Stop();
  for (const auto& t : tasks) EXPECT_FALSE(t->overlapped_);
}

TEST(AttachmentSchedulerTest, RemoveWaitsForARunningTaskAndItNeverRunsAgain) {
  auto s = AttachmentScheduler::Create(2);
  ASSERT_TRUE(s.ok());
  CountingTask slow(absl::Milliseconds(1), -1, absl::Milliseconds(100));
  (*s)->Add(1, &slow);
  (*s)->Start();
  ASSERT_TRUE(Eventually([&] { return slow.active_ == 1; }));
  (*s)->Remove(1);
  EXPECT_EQ(slow.active_, 0) << "Remove returned while the task ran";
  const int runs = slow.runs_;
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(slow.runs_, runs);
  (*s)->Stop();
}

TEST(AttachmentSchedulerTest, AHungTaskHoldsOneWorkerOnly) {
  auto s = AttachmentScheduler::Create(2);
  ASSERT_TRUE(s.ok());
  CountingTask hung(absl::Milliseconds(1), -1, absl::Milliseconds(500));
  CountingTask quick(absl::Milliseconds(5));
  (*s)->Add(1, &hung);
  (*s)->Add(2, &quick);
  (*s)->Start();
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_GE(quick.runs_, 10) << "served by the other worker meanwhile";
  (*s)->Stop();
}

}  // namespace
}  // namespace vkick
