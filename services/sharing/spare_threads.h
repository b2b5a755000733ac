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

 public:
  // A task handed to a spare thread. Wait() (or the destructor) returns once it has run: the
  // caller waits before anything the task uses goes away.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() { Wait(); }

    // Whether a spare thread took the task (false: the caller does it itself).
    bool taken() const { return slot_ != nullptr; }

    void Wait() {
      if (slot_ == nullptr) return;
      {
        std::unique_lock<std::mutex> lock(slot_->mu);
        slot_->cv.wait(lock, [this] { return !slot_->task; });
      }
      owner_->Release(slot_);
      slot_ = nullptr;
    }

   private:
    friend class SpareThreads;
    SpareThreads* owner_ = nullptr;
    Slot* slot_ = nullptr;
  };

  explicit SpareThreads(int threads) {
    for (int i = 0; i < threads; ++i) {
      slots_.push_back(std::make_unique<Slot>());
      Slot* slot = slots_.back().get();
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
    if (ticket.slot_ != nullptr) return false;
    Slot* slot = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (idle_.empty()) return false;
      slot = idle_.back();
      idle_.pop_back();
    }
    {
      std::lock_guard<std::mutex> lock(slot->mu);
      slot->task = std::move(task);
    }
    slot->cv.notify_all();
    ticket.owner_ = this;
    ticket.slot_ = slot;
    return true;
  }

 private:
  // One thread and its mailbox: `task` is set while a task is to run or running.
  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()> task;
    bool stopping = false;
    std::thread thread;

    void Loop() {
      std::unique_lock<std::mutex> lock(mu);
      while (true) {
        cv.wait(lock, [this] { return stopping || task; });
        if (!task) return;  // stopping, with nothing handed over
        lock.unlock();
        task();
        lock.lock();
        task = nullptr;
        cv.notify_all();
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
