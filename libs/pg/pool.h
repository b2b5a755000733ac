// A bounded PostgreSQL connection pool: bounded waiters, acquire deadline, reconnect on broken
// connections, statements prepared per connection, transactions with retry on conflicts.
#ifndef MEDGATE_LIBS_PG_POOL_H_
#define MEDGATE_LIBS_PG_POOL_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <pqxx/pqxx>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/common/log.h"
#include "libs/pg/connection.h"
#include "libs/pg/statement_watch.h"

namespace medgate::pg {

// A named SQL statement, prepared on every connection of a pool.
struct Statement {
  const char* name;
  const char* sql;
};

struct PoolOptions {
  std::string name;      // for logs and errors, e.g. "control" or "fr-1"
  std::string conninfo;  // holds credentials: never logged
  int size = 8;
  int max_waiters = 64;
  absl::Duration acquire_timeout = absl::Seconds(2);
  absl::Duration statement_timeout = absl::Seconds(5);
  // Unset: IdleInTransactionTimeout(statement_timeout).
  std::optional<absl::Duration> idle_in_transaction_timeout;
  // A transaction, read or probe whose server has sent nothing for this long (and that has run
  // this long), and which does not complete a new connection either (AcceptsConnections), is
  // given up: its connection is shut down and dropped, and the caller answered UNAVAILABLE, not
  // retried. Unset: UnansweredLimit(statement_timeout).
  std::optional<absl::Duration> unanswered_limit;
  int max_retries = 3;  // transaction retries on ABORTED (serialization failure, deadlock)
  std::vector<Statement> statements;

  static PoolOptions FromConfig(std::string name, const DbConfig& db);
};

class Pool;

// A connection borrowed from a pool; returned on destruction (or dropped when marked broken).
class Lease {
 public:
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&&) = delete;
  ~Lease();

  Connection& connection() { return *connection_; }
  // The connection will be closed rather than reused (after a broken-connection error).
  void MarkBroken() { broken_ = true; }

 private:
  friend class Pool;
  Lease(Pool* pool, std::unique_ptr<Connection> connection)
      : pool_(pool), connection_(std::move(connection)) {}
  Pool* pool_;
  std::unique_ptr<Connection> connection_;
  bool broken_ = false;
};

class Pool {
 public:
  explicit Pool(PoolOptions options);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Waits at most the acquire timeout (or `timeout` when given). More waiters than max_waiters,
  // or no connection in time: RESOURCE_EXHAUSTED. Server unreachable: UNAVAILABLE.
  absl::StatusOr<Lease> Acquire(std::optional<absl::Duration> timeout = std::nullopt);

  // Runs `fn` in a READ COMMITTED transaction and commits when it returns OK; rolls back
  // otherwise. Retried up to max_retries on ABORTED. pqxx exceptions become Status here.
  // `statement_timeout`, when given, is this transaction's instead of the pool's (SET LOCAL), and
  // the wait for a server that does not answer grows with it.
  absl::Status Transact(const std::function<absl::Status(pqxx::work&)>& fn,
                        std::optional<absl::Duration> statement_timeout = std::nullopt);

  // Runs `query` on a pooled connection, outside any transaction. A read lost with its
  // connection (its session ended while it ran, or before the server's close reached Acquire) is
  // run once more on a new one, as Transact retries a transaction.
  absl::StatusOr<BinaryResult> Read(const BinaryQuery& query,
                                    const std::vector<std::string>& parameters);

  template <typename T>
  absl::StatusOr<T> TransactValue(const std::function<absl::StatusOr<T>(pqxx::work&)>& fn,
                                  std::optional<absl::Duration> statement_timeout = std::nullopt) {
    std::optional<T> result;
    absl::Status status = Transact(
        [&](pqxx::work& txn) -> absl::Status {
          absl::StatusOr<T> r = fn(txn);
          if (!r.ok()) return r.status();
          result = *std::move(r);
          return absl::OkStatus();
        },
        statement_timeout);
    if (!status.ok()) return status;
    return *std::move(result);
  }

  // A round trip to the server (health probes). When every connection is in use, on a connection
  // of its own, closed at once: a busy pool is not an unreachable server.
  absl::Status Ping();

  const std::string& name() const { return options_.name; }
  int idle_count();
  int open_count();
  int waiter_count();

 private:
  friend class Lease;
  void Release(std::unique_ptr<Connection> connection, bool broken);
  absl::StatusOr<std::unique_ptr<Connection>> Connect();
  // The status of a connection that could not be opened or was lost, from what libpq said
  // (`detail`): "database 'NAME' unreachable", without libpq's text, which names the server's
  // address, port, socket or user. The detail is logged, at most once a second.
  absl::Status Unreachable(absl::string_view detail);
  // The status of work given up on a server that did not answer within `limit`.
  absl::Status NotAnswering(absl::Duration limit);
  // The watch over `connection` while a caller waits on it, for `limit` (unanswered_limit_ when
  // not given).
  std::unique_ptr<StatementWatch::Scope> Watch(Connection& connection,
                                               std::optional<absl::Duration> limit = std::nullopt);

  const PoolOptions options_;
  const absl::Duration unanswered_limit_;
  StatementWatch watch_;
  log::Throttle unreachable_log_{absl::Seconds(1)};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Connection>> idle_;
  int open_ = 0;     // connections checked out or idle, plus ones being opened
  int waiters_ = 0;
};

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_POOL_H_
