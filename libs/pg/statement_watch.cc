// Client-side statement deadlines: a socket shut down past its limit.
#include "libs/pg/statement_watch.h"

#include <fcntl.h>
#include <libpq-fe.h>
#include <poll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>
#include <optional>

namespace medgate::pg {

StatementWatch::StatementWatch(std::function<bool()> answers)
    : answers_(std::move(answers)), thread_([this] { Run(); }) {}

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
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(watch_.mu_);
    watch_.scopes_.insert(this);
    wake = !watch_.waiting_until_ || due_ < *watch_.waiting_until_;
  }
  // Only when the watcher waits for a later deadline, or for none: a scope after scope on one
  // connection (a writer's transactions) does not wake it each time.
  if (wake) watch_.cv_.notify_one();
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
    const bool asked_lately = last_asked_ && now - *last_asked_ < std::chrono::seconds(1);
    std::optional<std::chrono::steady_clock::time_point> next;
    bool ask = false;
    for (Scope* scope : scopes_) {
      if (scope->fired_) continue;
      if (scope->due_ <= now && scope->kind_ == Scope::Limit::kSinceLastAnswer) {
        std::optional<absl::Duration> quiet;
        if (scope->socket_ >= 0) quiet = SinceLastReceived(scope->socket_);
        if (quiet && *quiet < scope->limit_) {
          // The server answered within the limit: look again once the limit has passed since.
          scope->due_ = now + absl::ToChronoNanoseconds(scope->limit_ - *quiet);
        } else if (answers_ != nullptr && !asked_lately) {
          ask = true;  // decided below, once the server was asked
          continue;
        } else if (answers_ != nullptr && last_answered_) {
          // Quiet, but the server answers: its caller is busy, or it is on a statement.
          scope->due_ = now + absl::ToChronoNanoseconds(scope->limit_);
        }
      }
      if (scope->due_ <= now) {
        scope->fired_ = true;
        if (scope->socket_ >= 0) ::shutdown(scope->socket_, SHUT_RDWR);
      } else if (!next || scope->due_ < *next) {
        next = scope->due_;
      }
    }
    if (ask) {
      // Asked without the lock: scopes come and go meanwhile, and are looked at again after.
      lock.unlock();
      const bool answered = answers_();
      lock.lock();
      last_answered_ = answered;
      last_asked_ = std::chrono::steady_clock::now();
      continue;
    }
    waiting_until_ = next;
    if (next) {
      cv_.wait_until(lock, *next);
    } else {
      cv_.wait(lock);
    }
  }
}

bool AcceptsConnections(const std::string& conninfo, absl::Duration within) {
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoMilliseconds(within);
  PGconn* conn = PQconnectStart(conninfo.c_str());
  if (conn == nullptr) return false;
  bool answered = false;
  PostgresPollingStatusType polling = PGRES_POLLING_WRITING;
  while (PQstatus(conn) != CONNECTION_BAD) {
    if (polling == PGRES_POLLING_OK) {
      answered = true;
      break;
    }
    if (polling == PGRES_POLLING_FAILED) break;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd fd{PQsocket(conn), static_cast<short>(polling == PGRES_POLLING_READING ? POLLIN : POLLOUT), 0};
    if (::poll(&fd, 1, static_cast<int>(left.count())) <= 0) break;
    polling = PQconnectPoll(conn);
  }
  // Refused by the server itself (no slot left, say): it answers.
  if (!answered && std::strstr(PQerrorMessage(conn), "FATAL:") != nullptr) answered = true;
  PQfinish(conn);
  return answered;
}

}  // namespace medgate::pg
