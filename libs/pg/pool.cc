// A bounded PostgreSQL connection pool over libpqxx 6.4.
#include "libs/pg/pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/pg/conninfo.h"
#include "libs/common/status_macros.h"
#include "libs/pg/pg_status.h"

namespace medgate::pg {

PoolOptions PoolOptions::FromConfig(std::string name, const DbConfig& db) {
  PoolOptions options;
  options.name = std::move(name);
  options.conninfo = WithConnectionDefaults(db.conninfo);
  options.size = db.pool_size;
  options.max_waiters = db.max_waiters;
  options.acquire_timeout = absl::Milliseconds(db.acquire_timeout_ms);
  options.statement_timeout = absl::Milliseconds(db.statement_timeout_ms);
  return options;
}

Lease::Lease(Lease&& other) noexcept
    : pool_(other.pool_), connection_(std::move(other.connection_)), broken_(other.broken_) {
  other.pool_ = nullptr;
}

Lease::~Lease() {
  if (pool_ != nullptr && connection_ != nullptr) pool_->Release(std::move(connection_), broken_);
}

Pool::Pool(PoolOptions options)
    : options_(std::move(options)),
      unanswered_limit_(
          options_.unanswered_limit.value_or(UnansweredLimit(options_.statement_timeout))),
      watch_([this] { return AcceptsConnections(options_.conninfo, kServerAnswersWithin); }) {}

Pool::~Pool() {
  std::lock_guard<std::mutex> lock(mu_);
  idle_.clear();
}

std::unique_ptr<StatementWatch::Scope> Pool::Watch(Connection& connection,
                                                   std::optional<absl::Duration> limit) {
  return std::make_unique<StatementWatch::Scope>(watch_, connection.sock(),
                                                 limit.value_or(unanswered_limit_),
                                                 StatementWatch::Scope::Limit::kSinceLastAnswer);
}

absl::Status Pool::NotAnswering(absl::Duration limit) {
  if (uint64_t held_back = 0; unreachable_log_.Allow(absl::Now(), held_back)) {
    log::Warning("database_not_answering",
                 {{"database", options_.name},
                  {"unanswered_ms", absl::ToInt64Milliseconds(limit)},
                  {"similar_failures_not_logged", held_back}});
  }
  return absl::UnavailableError(absl::StrCat("database '", options_.name,
                                             "' did not answer within ",
                                             absl::FormatDuration(limit)));
}

absl::StatusOr<std::unique_ptr<Connection>> Pool::Connect() {
  std::unique_ptr<StatementWatch::Scope> watch;
  try {
    // Opening it is bounded by connect_timeout; setting it up, by the watch.
    auto connection = std::make_unique<Connection>(options_.conninfo);
    watch = Watch(*connection);
    pqxx::nontransaction setup(*connection);
    setup.exec0(absl::StrCat("SET statement_timeout = ",
                             absl::ToInt64Milliseconds(options_.statement_timeout)));
    setup.exec0(absl::StrCat(
        "SET idle_in_transaction_session_timeout = ",
        absl::ToInt64Milliseconds(options_.idle_in_transaction_timeout.value_or(
            IdleInTransactionTimeout(options_.statement_timeout)))));
    setup.exec0("SET TIME ZONE 'UTC'");
    setup.commit();
    for (const Statement& s : options_.statements) connection->prepare(s.name, s.sql);
    if (watch->fired()) return NotAnswering(unanswered_limit_);
    return connection;
  } catch (const std::exception& e) {
    if (watch != nullptr && watch->fired()) return NotAnswering(unanswered_limit_);
    // Not reached, not logged in, or not set up for this service (a schema the statements do
    // not fit): to the caller, a database it cannot use now.
    return Unreachable(e.what());
  }
}

absl::Status Pool::Unreachable(absl::string_view detail) {
  detail = FirstLine(detail);
  if (uint64_t held_back = 0; unreachable_log_.Allow(absl::Now(), held_back)) {
    log::Warning("database_unreachable", {{"database", options_.name},
                                          {"error", detail},
                                          {"similar_failures_not_logged", held_back}});
  }
  return absl::UnavailableError(absl::StrCat("database '", options_.name, "' unreachable"));
}

absl::StatusOr<Lease> Pool::Acquire(std::optional<absl::Duration> timeout) {
  const auto deadline = std::chrono::steady_clock::now() +
                        absl::ToChronoMilliseconds(timeout.value_or(options_.acquire_timeout));
  std::unique_lock<std::mutex> lock(mu_);
  if (idle_.empty() && open_ >= options_.size) {
    if (timeout && *timeout <= absl::ZeroDuration()) {
      // Not waiting at all: not counted among the waiters either.
      return absl::ResourceExhaustedError(
          absl::StrCat("database '", options_.name, "' pool exhausted: no connection free"));
    }
    if (waiters_ >= options_.max_waiters) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "database '", options_.name, "' pool exhausted: ", waiters_, " callers already waiting"));
    }
    ++waiters_;
    bool ready = cv_.wait_until(lock, deadline,
                                [this] { return !idle_.empty() || open_ < options_.size; });
    --waiters_;
    if (!ready) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "database '", options_.name, "' pool exhausted: no connection within the acquire timeout"));
    }
  }
  while (!idle_.empty()) {
    std::unique_ptr<Connection> connection = std::move(idle_.back());
    idle_.pop_back();
    // One whose session the server ended while it sat idle is dropped here, rather than fail its
    // caller's first statement (a caller that does not retry would fail once per such connection).
    if (!connection->ClosedByServer()) return Lease(this, std::move(connection));
    --open_;
  }
  ++open_;
  lock.unlock();
  absl::StatusOr<std::unique_ptr<Connection>> connection = Connect();
  if (!connection.ok()) {
    lock.lock();
    --open_;
    cv_.notify_one();
    return connection.status();
  }
  return Lease(this, *std::move(connection));
}

void Pool::Release(std::unique_ptr<Connection> connection, bool broken) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken || !connection->is_open()) {
    connection.reset();
    --open_;
    // One broken connection usually means the server restarted: the idle ones are stale too.
    open_ -= static_cast<int>(idle_.size());
    idle_.clear();
  } else {
    idle_.push_back(std::move(connection));
  }
  cv_.notify_one();
}

absl::Status Pool::Transact(const std::function<absl::Status(pqxx::work&)>& fn,
                           std::optional<absl::Duration> statement_timeout) {
  const absl::Duration limit =
      statement_timeout ? std::max(unanswered_limit_, UnansweredLimit(*statement_timeout))
                        : unanswered_limit_;
  absl::Status status;
  bool reconnected = false;
  for (int attempt = 0; attempt <= options_.max_retries; ++attempt) {
    absl::StatusOr<Lease> lease = Acquire();
    if (!lease.ok()) return lease.status();
    // Declared after the lease: it stops watching before the connection goes back.
    std::unique_ptr<StatementWatch::Scope> watch = Watch(lease->connection(), limit);
    try {
      pqxx::work txn(lease->connection());
      if (statement_timeout) {
        // 0 would be no bound at all in PostgreSQL.
        txn.exec0(absl::StrCat(
            "SET LOCAL statement_timeout = ",
            std::max<int64_t>(1, absl::ToInt64Milliseconds(*statement_timeout))));
      }
      status = fn(txn);
      if (status.ok() && watch->fired()) {
        // Given up on before its COMMIT was sent: the server ends the transaction on finding
        // the socket shut, so nothing of it is committed.
        lease->MarkBroken();
        return NotAnswering(limit);
      }
      if (status.ok()) {
        txn.commit();
        if (watch->fired()) lease->MarkBroken();  // its socket is shut, whatever came before
        return status;
      }
      txn.abort();
      if (watch->fired()) {
        // What `fn` made of the broken connection is not the server's answer.
        lease->MarkBroken();
        return NotAnswering(limit);
      }
      if (status.code() != absl::StatusCode::kAborted) return status;
    } catch (const pqxx::in_doubt_error& e) {
      // The commit may or may not have happened: never retry, let the caller decide.
      lease->MarkBroken();
      return StatusFromException(e);
    } catch (const pqxx::broken_connection& e) {
      lease->MarkBroken();
      // A server that stopped answering is not asked again: the caller would wait as long again.
      if (watch->fired()) return NotAnswering(limit);
      // Nothing was committed. An idle connection may have gone stale (server restarted):
      // retry once on a fresh connection.
      status = Unreachable(e.what());
      if (reconnected) return status;
      reconnected = true;
    } catch (const std::exception& e) {
      if (watch->fired()) {
        lease->MarkBroken();
        return NotAnswering(limit);
      }
      status = StatusFromException(e);
      // UNAVAILABLE also answers a lock not taken in time (55P03) on a session that is fine:
      // only a session the server ended is dropped, with the idle ones (the server restarted).
      if (status.code() == absl::StatusCode::kUnavailable && lease->connection().ClosedByServer()) {
        lease->MarkBroken();
      }
      if (status.code() != absl::StatusCode::kAborted) return status;
    }
  }
  return status;
}

absl::StatusOr<BinaryResult> Pool::Read(const BinaryQuery& query,
                                        const std::vector<std::string>& parameters) {
  absl::Status status;
  for (int attempt = 0; attempt < 2; ++attempt) {
    ASSIGN_OR_RETURN(Lease lease, Acquire());
    std::unique_ptr<StatementWatch::Scope> watch = Watch(lease.connection());
    absl::StatusOr<BinaryResult> result = query.Run(lease.connection(), parameters);
    if (watch->fired()) {
      lease.MarkBroken();
      // Not run again: the caller would wait as long again.
      if (!result.ok()) return NotAnswering(unanswered_limit_);
    }
    watch.reset();
    if (result.ok() || result.status().code() != absl::StatusCode::kUnavailable) return result;
    // UNAVAILABLE also answers a lock not taken in time or a standby refusing: the session is
    // fine, and the answer is the server's. Only a session the server ended is dropped, and
    // tried once more on a fresh one.
    if (!lease.connection().ClosedByServer()) return result;
    lease.MarkBroken();
    status = result.status();
  }
  return Unreachable(status.message());
}

absl::Status Pool::Ping() {
  // Without waiting: a probe must not queue among the callers, nor take a connection one of them
  // waits for.
  absl::StatusOr<Lease> lease = Acquire(absl::ZeroDuration());
  if (!lease.ok()) {
    if (lease.status().code() != absl::StatusCode::kResourceExhausted) return lease.status();
    // Every connection is in use: the pool is busy, which says nothing about the server. A
    // connection of the probe's own, closed at once, asks the server itself (a busy service must
    // not report itself down, or every replica leaves the load balancer together).
    absl::StatusOr<std::unique_ptr<Connection>> own = Connect();
    if (!own.ok()) return own.status();
    std::unique_ptr<StatementWatch::Scope> watch = Watch(**own);
    try {
      pqxx::nontransaction txn(**own);
      txn.exec1("SELECT 1");
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return watch->fired() ? NotAnswering(unanswered_limit_) : StatusFromException(e);
    }
  }
  std::unique_ptr<StatementWatch::Scope> watch = Watch(lease->connection());
  try {
    pqxx::nontransaction txn(lease->connection());
    txn.exec1("SELECT 1");
    if (watch->fired()) lease->MarkBroken();
    return absl::OkStatus();
  } catch (const std::exception& e) {
    lease->MarkBroken();
    return watch->fired() ? NotAnswering(unanswered_limit_) : StatusFromException(e);
  }
}

int Pool::idle_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(idle_.size());
}

int Pool::waiter_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return waiters_;
}

int Pool::open_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return open_;
}

}  // namespace medgate::pg
