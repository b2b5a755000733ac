// Client-side statement deadlines: a socket shut down past its limit.
#include "libs/pg/statement_watch.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <optional>

namespace medgate::pg {

StatementWatch::StatementWatch() : thread_([this] { Run(); }) {}

StatementWatch::~StatementWatch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

StatementWatch::Scope::Scope(StatementWatch& watch, int socket, absl::Duration limit)
    : watch_(watch),
      socket_(socket < 0 ? -1 : ::fcntl(socket, F_DUPFD_CLOEXEC, 0)),
      // At most a day: a steady_clock time point this side of overflow.
      due_(std::chrono::steady_clock::now() +
           absl::ToChronoNanoseconds(std::min(limit, absl::Hours(24)))) {
  {
    std::lock_guard<std::mutex> lock(watch_.mu_);
    watch_.scopes_.insert(this);
  }
  // The watcher may be waiting for a later deadline, or for none.
  watch_.cv_.notify_one();
}

StatementWatch::Scope::~Scope() {
  {
    std::lock_guard<std::mutex> lock(watch_.mu_);
    watch_.scopes_.erase(this);
  }
  if (socket_ >= 0) ::close(socket_);  // the watcher no longer knows it
}

bool StatementWatch::Scope::fired() {
  std::lock_guard<std::mutex> lock(watch_.mu_);
  return fired_;
}

void StatementWatch::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const auto now = std::chrono::steady_clock::now();
    std::optional<std::chrono::steady_clock::time_point> next;
    for (Scope* scope : scopes_) {
      if (scope->fired_) continue;
      if (scope->due_ <= now) {
        scope->fired_ = true;
        if (scope->socket_ >= 0) ::shutdown(scope->socket_, SHUT_RDWR);
      } else if (!next || scope->due_ < *next) {
        next = scope->due_;
      }
    }
    if (next) {
      cv_.wait_until(lock, *next);
    } else {
      cv_.wait(lock);
    }
  }
}

}  // namespace medgate::pg
