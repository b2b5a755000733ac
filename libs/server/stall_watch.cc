// The stall watchdog of synchronous streaming handlers.
#include "libs/server/stall_watch.h"

#include <grpc/grpc.h>

#include <utility>

namespace medgate {

StallWatch::StallWatch(absl::Duration limit, std::string message)
    : limit_(absl::ToChronoMilliseconds(limit)),
      message_(std::move(message)),
      thread_([this] { Run(); }) {}

StallWatch::~StallWatch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

StallWatch::Call::Call(StallWatch& watch, grpc::ServerContext& context)
    : watch_(watch), context_(context) {
  std::lock_guard<std::mutex> lock(watch_.mu_);
  watch_.calls_.insert(this);
}

StallWatch::Call::~Call() {
  std::lock_guard<std::mutex> lock(watch_.mu_);
  watch_.calls_.erase(this);
}

void StallWatch::Call::Blocked() {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(watch_.mu_);
    blocked_since_ = Clock::now();
    std::swap(wake, watch_.waiting_for_a_block_);
  }
  if (wake) watch_.cv_.notify_one();
}

void StallWatch::Call::Unblocked() {
  std::lock_guard<std::mutex> lock(watch_.mu_);
  if (blocked_since_) blocked_in_all_ += absl::FromChrono(Clock::now() - *blocked_since_);
  blocked_since_.reset();
}

bool StallWatch::Call::fired() {
  std::lock_guard<std::mutex> lock(watch_.mu_);
  return fired_;
}

void StallWatch::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const Clock::time_point now = Clock::now();
    std::optional<Clock::time_point> next;
    for (Call* call : calls_) {
      if (!call->blocked_since_ || call->fired_) continue;
      const Clock::time_point due = *call->blocked_since_ + limit_;
      if (due <= now) {
        // Ends the blocked read or write; the client receives this status.
        call->fired_ = true;
        grpc_call_cancel_with_status(call->context_.c_call(), GRPC_STATUS_DEADLINE_EXCEEDED,
                                     message_.c_str(), nullptr);
      } else if (!next || due < *next) {
        next = due;
      }
    }
    if (next) {
      cv_.wait_until(lock, *next);
    } else {
      waiting_for_a_block_ = true;
      cv_.wait(lock);
      waiting_for_a_block_ = false;
    }
  }
}

}  // namespace medgate
