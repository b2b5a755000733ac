// A fixed pool of threads for the work of streams that may block (routing look-ups, a full
// writer queue), so reactors themselves never block. Its queue is bounded.
#ifndef MEDGATE_SERVICES_INGEST_STREAM_EXECUTOR_H_
#define MEDGATE_SERVICES_INGEST_STREAM_EXECUTOR_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace medgate::ingest {

class StreamExecutor {
 public:
  StreamExecutor(int threads, size_t max_queue) : max_queue_(max_queue) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~StreamExecutor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Tasks posted and not yet taken by a thread.
  size_t waiting() {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.size();
  }

  // Tasks accepted since the executor started.
  uint64_t accepted() {
    std::lock_guard<std::mutex> lock(mu_);
    return accepted_;
  }

  // Tasks a thread is running.
  size_t running() {
    std::lock_guard<std::mutex> lock(mu_);
    return running_;
  }

  // False when the queue is full (the caller answers RESOURCE_EXHAUSTED).
  bool Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ || queue_.size() >= max_queue_) return false;
      queue_.push_back(std::move(task));
      ++accepted_;
    }
    cv_.notify_one();
    return true;
  }

 private:
  // One lock round per task: a thread counts its task done when it comes back for the next.
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      lock.unlock();
      task();
      task = nullptr;  // its captures go before the lock is taken again
      lock.lock();
      --running_;
    }
  }

  const size_t max_queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  size_t running_ = 0;
  uint64_t accepted_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_STREAM_EXECUTOR_H_
