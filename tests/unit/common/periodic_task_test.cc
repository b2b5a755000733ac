// Unit tests of PeriodicTask.
#include "libs/common/periodic_task.h"

#include <gtest/gtest.h>

#include <atomic>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace medgate {
namespace {

// Passes run one after another with the wait each returns; Stop() ends an hour's wait at once and
// a pass in progress sees stopping().
TEST(PeriodicTaskTest, RunsPassAfterPassUntilStopped) {
  std::atomic<int> passes{0};
  absl::Notification third_started;
  absl::Notification stop_seen;
  PeriodicTask task(absl::ZeroDuration(), [&](PeriodicTask& self) {
    if (++passes == 3) {
      third_started.Notify();
      while (!self.stopping()) absl::SleepFor(absl::Milliseconds(1));
      stop_seen.Notify();
      return absl::Hours(1);
    }
    return absl::ZeroDuration();
  });
  third_started.WaitForNotification();
  task.Stop();
  EXPECT_TRUE(stop_seen.HasBeenNotified());
  EXPECT_EQ(passes.load(), 3);
  task.Stop();  // again: nothing more happens
  EXPECT_EQ(passes.load(), 3);
}

// A first delay of an hour: stopped before it ends, the task never runs its pass.
TEST(PeriodicTaskTest, StoppedDuringTheFirstDelayRunsNothing) {
  std::atomic<int> passes{0};
  {
    PeriodicTask task(absl::Hours(1), [&](PeriodicTask&) {
      ++passes;
      return absl::Hours(1);
    });
  }
  EXPECT_EQ(passes.load(), 0);
}

}  // namespace
}  // namespace medgate
