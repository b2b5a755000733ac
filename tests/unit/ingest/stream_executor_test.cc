// Unit tests of the bounded executor that runs the ingest streams' work that may block.
#include "services/ingest/stream_executor.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

namespace medgate::ingest {
namespace {

// A gate the test opens: tasks that wait on it hold the executor's threads.
class Gate {
 public:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
  }
  void WaitForWaiters(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return waiting_ >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int waiting_ = 0;
  bool open_ = false;
};

TEST(StreamExecutorTest, RefusesWorkBeyondItsQueueBoundAndRunsWhatItAccepted) {
  Gate gate;
  std::atomic<int> ran{0};
  {
    StreamExecutor executor(/*threads=*/1, /*max_queue=*/2);
    ASSERT_TRUE(executor.Post([&] { gate.Wait(); ++ran; }));
    gate.WaitForWaiters(1);  // the only thread is busy
    EXPECT_EQ(executor.running(), 1u);
    EXPECT_EQ(executor.waiting(), 0u);
    EXPECT_TRUE(executor.Post([&] { ++ran; }));
    EXPECT_TRUE(executor.Post([&] { ++ran; }));
    EXPECT_EQ(executor.waiting(), 2u);
    // The queue holds two: the next is refused (the stream answers RESOURCE_EXHAUSTED).
    EXPECT_FALSE(executor.Post([&] { ++ran; }));
    EXPECT_EQ(executor.waiting(), 2u);
    EXPECT_EQ(executor.accepted(), 3u);  // the refused one is not counted
    gate.Open();
  }  // the destructor runs what was accepted, then joins
  EXPECT_EQ(ran.load(), 3);
}

TEST(StreamExecutorTest, AcceptsAgainOnceItsQueueDrains) {
  Gate gate;
  std::atomic<int> ran{0};
  StreamExecutor executor(/*threads=*/1, /*max_queue=*/1);
  ASSERT_TRUE(executor.Post([&] { gate.Wait(); }));
  gate.WaitForWaiters(1);
  EXPECT_TRUE(executor.Post([&] { ++ran; }));
  EXPECT_FALSE(executor.Post([&] { ++ran; }));
  gate.Open();
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  // Posted once there is room again; it runs after the accepted one (one thread, FIFO).
  while (!executor.Post([&] {
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_all();
  })) {
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  EXPECT_EQ(ran.load(), 1);
}

}  // namespace
}  // namespace medgate::ingest
