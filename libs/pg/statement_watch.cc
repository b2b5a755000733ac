// Client-side statement deadlines: a socket shut down past its limit.
#include "libs/pg/statement_watch.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
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

StatementWatch::Scope::Scope(StatementWatch& watch, int socket, absl::Duration limit, Limit kind)
    : watch_(watch),
      socket_(socket < 0 ? -1 : ::fcntl(socket, F_DUPFD_CLOEXEC, 0)),
      // At most a day: a steady_clock time point this side of overflow.
      limit_(std::clamp(limit, absl::ZeroDuration(), absl::Hours(24))),
      kind_(kind),
      due_(std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(limit_)) {
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

namespace {

// How long ago data last arrived on a TCP socket, or nothing for another kind of socket.
std::optional<absl::Duration> SinceLastReceived(int socket) {
  tcp_info info{};
  socklen_t size = sizeof(info);
  if (::getsockopt(socket, IPPROTO_TCP, TCP_INFO, &info, &size) != 0 ||
      size < offsetof(tcp_info, tcpi_last_data_recv) + sizeof(info.tcpi_last_data_recv)) {
    return std::nullopt;
  }
  return absl::Milliseconds(info.tcpi_last_data_recv);
}

}  // namespace

void StatementWatch::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const auto now = std::chrono::steady_clock::now();
    std::optional<std::chrono::steady_clock::time_point> next;
    for (Scope* scope : scopes_) {
      if (scope->fired_) continue;
      if (scope->due_ <= now && scope->kind_ == Scope::Limit::kSinceLastAnswer &&
          scope->socket_ >= 0) {
        // The server answered within the limit: look again once the limit has passed since.
        if (std::optional<absl::Duration> quiet = SinceLastReceived(scope->socket_);
            quiet && *quiet < scope->limit_) {
          scope->due_ = now + absl::ToChronoNanoseconds(scope->limit_ - *quiet);
        }
      }
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
