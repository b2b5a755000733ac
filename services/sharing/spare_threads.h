// Threads that take a piece of a request's CPU work only when one of them is idle, so that a
// request can use a core nobody else is using (hashing a chunk while the caller encrypts it).
// The caller never queues behind other requests' work: when every thread is busy it does the
// work itself. Under load, when all cores are taken, nothing is gained and nothing is lost.
#ifndef MEDGATE_SERVICES_SHARING_SPARE_THREADS_H_
#define MEDGATE_SERVICES_SHARING_SPARE_THREADS_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace medgate::sharing {

class SpareThreads {
  struct Slot;
  // One task's end, shared by the thread that runs it and the ticket that waits for it.
  struct Completion {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
  };

 public:
  // A task handed to a spare thread. Wait() (or the destructor) returns once it has run: the
  // caller waits before anything the task uses goes away. The thread is idle again as soon as
  // the task ends, whether or not anyone has waited yet.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() { Wait(); }

    // Whether a spare thread took the task and nobody has waited for it yet (false: the caller
    // does it itself, or it is done and waited for).
    bool taken() const { return completion_ != nullptr; }

    void Wait() {
      if (completion_ == nullptr) return;
      {
        std::unique_lock<std::mutex> lock(completion_->mu);
        completion_->cv.wait(lock, [this] { return completion_->done; });
      }
      completion_ = nullptr;
    }

   private:
    friend class SpareThreads;
    std::shared_ptr<Completion> completion_;
  };

  explicit SpareThreads(int threads) {
    for (int i = 0; i < threads; ++i) {
      slots_.push_back(std::make_unique<Slot>());
      Slot* slot = slots_.back().get();
      slot->owner = this;
      idle_.push_back(slot);
      slot->thread = std::thread([slot] { slot->Loop(); });
    }
  }

  ~SpareThreads() {
    for (auto& slot : slots_) {
      {
        std::lock_guard<std::mutex> lock(slot->mu);
        slot->stopping = true;
      }
      slot->cv.notify_all();
      slot->thread.join();
    }
  }

  SpareThreads(const SpareThreads&) = delete;
  SpareThreads& operator=(const SpareThreads&) = delete;

  // Hands `task` to an idle thread and returns true; returns false at once when none is idle or
  // `ticket` already holds a task.
  bool TryRun(std::function<void()> task, Ticket& ticket) {
    if (ticket.completion_ != nullptr) return false;
    Slot* slot = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (idle_.empty()) return false;
      slot = idle_.back();
      idle_.pop_back();
    }
    auto completion = std::make_shared<Completion>();
    {
      std::lock_guard<std::mutex> lock(slot->mu);
      slot->task = std::move(task);
      slot->completion = completion;
    }
    slot->cv.notify_all();
    ticket.completion_ = std::move(completion);
    return true;
  }

  // Threads idle now (for tests).
  int idle() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(idle_.size());
  }

 private:
  // One thread and its mailbox: `task` is set while a task is to run or running.
  struct Slot {
    SpareThreads* owner = nullptr;
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()> task;
    std::shared_ptr<Completion> completion;
    bool stopping = false;
    std::thread thread;

    void Loop() {
      std::unique_lock<std::mutex> lock(mu);
      while (true) {
        cv.wait(lock, [this] { return stopping || task; });
        if (!task) return;  // stopping, with nothing handed over
        std::function<void()> run = std::move(task);
        std::shared_ptr<Completion> done = std::move(completion);
        task = nullptr;
        lock.unlock();
        run();
        run = nullptr;  // what the task captured goes before its end is told
        // Idle before the waiter hears of the end: a caller that waited may hand out work again
        // at once. `done` is this turn's own; a task handed over meanwhile waits for `lock`.
        owner->Release(this);
        {
          std::lock_guard<std::mutex> told(done->mu);
          done->done = true;
        }
        done->cv.notify_all();
        lock.lock();
      }
    }
  };

  void Release(Slot* slot) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(slot);
  }

  std::mutex mu_;
  std::vector<Slot*> idle_;  // guarded by mu_
  std::vector<std::unique_ptr<Slot>> slots_;
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_SPARE_THREADS_H_
