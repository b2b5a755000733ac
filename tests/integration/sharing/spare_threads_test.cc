// Unit tests of SpareThreads: work goes to an idle thread or not at all, and a ticket holds its
// caller until the work has run.
#include "services/sharing/spare_threads.h"

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include <gtest/gtest.h>

namespace medgate::sharing {
namespace {

TEST(SpareThreadsTest, RunsTheTaskOnAnotherThreadAndWaitReturnsAfterIt) {
  SpareThreads spare(1);
  std::thread::id ran_on;
  int value = 0;
  SpareThreads::Ticket ticket;
  ASSERT_TRUE(spare.TryRun(
      [&] {
        ran_on = std::this_thread::get_id();
        value = 42;
      },
      ticket));
  EXPECT_TRUE(ticket.taken());
  ticket.Wait();
  EXPECT_FALSE(ticket.taken());
  EXPECT_EQ(value, 42);
  EXPECT_NE(ran_on, std::this_thread::get_id());
}

TEST(SpareThreadsTest, RefusesAtOnceWhenEveryThreadIsBusyAndTakesWorkAgainOnceIdle) {
  SpareThreads spare(1);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  SpareThreads::Ticket busy;
  ASSERT_TRUE(spare.TryRun([released] { released.wait(); }, busy));

  SpareThreads::Ticket refused;
  EXPECT_FALSE(spare.TryRun([] {}, refused));
  EXPECT_FALSE(refused.taken());
  refused.Wait();  // nothing to wait for

  release.set_value();
  busy.Wait();
  std::atomic<bool> ran{false};
  SpareThreads::Ticket again;
  ASSERT_TRUE(spare.TryRun([&] { ran = true; }, again));
  again.Wait();
  EXPECT_TRUE(ran.load());
}

TEST(SpareThreadsTest, ATicketHoldsOneTaskAtATime) {
  SpareThreads spare(2);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  SpareThreads::Ticket ticket;
  ASSERT_TRUE(spare.TryRun([released] { released.wait(); }, ticket));
  // The other thread is idle, but this ticket is taken.
  EXPECT_FALSE(spare.TryRun([] {}, ticket));
  SpareThreads::Ticket other;
  EXPECT_TRUE(spare.TryRun([] {}, other));
  release.set_value();
}

TEST(SpareThreadsTest, ATicketGoingOutOfScopeWaitsForItsTask) {
  SpareThreads spare(1);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> done{false};
  std::thread releaser;
  {
    SpareThreads::Ticket ticket;
    ASSERT_TRUE(spare.TryRun(
        [released, &done] {
          released.wait();
          done = true;
        },
        ticket));
    releaser = std::thread([&release] { release.set_value(); });
  }
  EXPECT_TRUE(done.load());
  releaser.join();
}

// A thread is idle again once its task has run, though its ticket has not been waited for yet
// (an upload waits for its last piece's hash only when it stores the record, seconds later).
TEST(SpareThreadsTest, AThreadIsIdleAgainOnceItsTaskEndsBeforeAnyWait) {
  SpareThreads spare(1);
  std::atomic<bool> ran{false};
  SpareThreads::Ticket first;
  ASSERT_TRUE(spare.TryRun([&] { ran = true; }, first));
  for (int i = 0; i < 5000 && spare.idle() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(spare.idle(), 1);
  EXPECT_TRUE(ran.load());
  SpareThreads::Ticket second;
  EXPECT_TRUE(spare.TryRun([] {}, second));
  second.Wait();
  EXPECT_TRUE(first.taken());  // not waited for yet
  first.Wait();
  EXPECT_FALSE(first.taken());
}

}  // namespace
}  // namespace medgate::sharing
