// libs/pg against a real PostgreSQL server: transactions, error mapping, bounds, reconnection.
#include <poll.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <future>
#include <iterator>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/pool.h"
#include "libs/pg/shard_set.h"
#include "libs/pg/sql_array.h"
#include "libs/pg/statement_watch.h"
#include "tests/support/fuzz.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/pg_fault_proxy.h"
#include "tests/support/poll.h"

namespace medgate::pg {
namespace {

using ::testing::HasSubstr;
using test_support::PgCluster;

class PoolTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start("pool");
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();
    Pool pool(Options());
    ASSERT_TRUE(pool.Transact([](pqxx::work& txn) {
      txn.exec0("CREATE TABLE items (id integer PRIMARY KEY, label text NOT NULL)");
      return absl::OkStatus();
    }).ok());
  }
  static void TearDownTestSuite() { delete cluster_; }

  void SetUp() override {
    if (!cluster_->running()) {
      ASSERT_TRUE(cluster_->StartAgain().ok());
    }
    Pool pool(Options());
    ASSERT_TRUE(pool.Transact([](pqxx::work& txn) {
      txn.exec0("TRUNCATE items");
      return absl::OkStatus();
    }).ok());
  }

  static PoolOptions Options() {
    PoolOptions options;
    options.name = "pool-test";
    options.conninfo = cluster_->ConnectionString();
    options.size = 2;
    options.max_waiters = 4;
    options.acquire_timeout = absl::Milliseconds(300);
    options.statements = {{"insert_item", "INSERT INTO items (id, label) VALUES ($1, $2)"},
                          {"count_items", "SELECT count(*) FROM items"}};
    return options;
  }

  static int64_t Count(Pool& pool) {
    absl::StatusOr<int64_t> n = pool.TransactValue<int64_t>(
        [](pqxx::work& txn) -> absl::StatusOr<int64_t> {
          return txn.exec_prepared1("count_items")[0].as<int64_t>();
        });
    EXPECT_TRUE(n.ok()) << n.status();
    return n.value_or(-1);
  }

  static absl::Status Insert(Pool& pool, int id, const std::string& label) {
    return pool.Transact([&](pqxx::work& txn) {
      txn.exec_prepared0("insert_item", id, label);
      return absl::OkStatus();
    });
  }

  static PgCluster* cluster_;
};

PgCluster* PoolTest::cluster_ = nullptr;

TEST_F(PoolTest, CommitsOnOkAndRollsBackOnError) {
  Pool pool(Options());
  ASSERT_TRUE(Insert(pool, 1, "one").ok());
  absl::Status refused = pool.Transact([](pqxx::work& txn) {
    txn.exec_prepared0("insert_item", 2, "two");
    return absl::FailedPreconditionError("caller changed its mind");
  });
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Count(pool), 1);
}

TEST_F(PoolTest, MapsServerErrorsToStatus) {
  Pool pool(Options());
  ASSERT_TRUE(Insert(pool, 1, "one").ok());
  absl::Status dup = Insert(pool, 1, "again");
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists) << dup;
  EXPECT_THAT(std::string(dup.message()), HasSubstr("23505"));
  // Row values (the DETAIL line) never reach the message.
  EXPECT_THAT(std::string(dup.message()), ::testing::Not(HasSubstr("(1)")));
  PoolOptions options = Options();
  options.statement_timeout = absl::Milliseconds(50);
  Pool short_pool(options);
  absl::Status timeout = short_pool.Transact([](pqxx::work& txn) {
    txn.exec0("SELECT pg_sleep(2)");
    return absl::OkStatus();
  });
  EXPECT_EQ(timeout.code(), absl::StatusCode::kDeadlineExceeded) << timeout;
  EXPECT_EQ(Count(pool), 1);
}

// A statement read in binary format: a bytea's bytes exactly as stored (every byte value, zeros
// included, none hex-encoded), NULLs and booleans; server errors map as libpqxx's do, none runs
// inside a transaction, and a connection lost is UNAVAILABLE.
TEST_F(PoolTest, ABinaryQueryReadsBytesAsStoredAndMapsErrorsAsTheRest) {
  PoolOptions options = Options();
  options.size = 1;
  Pool pool(options);
  absl::StatusOr<Lease> lease = pool.Acquire();
  ASSERT_TRUE(lease.ok()) << lease.status();
  std::string blob;
  for (int i = 0; i < (1 << 20); ++i) blob.push_back(static_cast<char>((i * 7 + i / 256) & 0xff));
  {
    pqxx::work txn(lease->connection());
    txn.exec0("CREATE TEMP TABLE blobs (id integer PRIMARY KEY, b bytea)");
    txn.exec_params("INSERT INTO blobs VALUES (1, $1), (2, NULL)",
                    pqxx::binarystring(blob.data(), blob.size()));
    txn.commit();
  }
  constexpr BinaryQuery kBlob("SELECT b, b IS NULL, $2::bool FROM blobs WHERE id = $1");
  absl::StatusOr<BinaryResult> one = kBlob.Run(lease->connection(), {"1", "false"});
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->rows(), 1);
  EXPECT_FALSE(one->is_null(0, 0));
  EXPECT_TRUE(one->bytes(0, 0) == blob) << "read " << one->bytes(0, 0).size() << " bytes";
  EXPECT_FALSE(one->boolean(0, 1));
  EXPECT_FALSE(one->boolean(0, 2));
  absl::StatusOr<BinaryResult> two = kBlob.Run(lease->connection(), {"2", "true"});
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->rows(), 1);
  EXPECT_TRUE(two->is_null(0, 0));
  EXPECT_TRUE(two->boolean(0, 1));
  EXPECT_TRUE(two->boolean(0, 2));
  absl::StatusOr<BinaryResult> none = kBlob.Run(lease->connection(), {"3", "true"});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->rows(), 0);

  constexpr BinaryQuery kDivide("SELECT 1 / $1::integer");
  absl::StatusOr<BinaryResult> by_zero = kDivide.Run(lease->connection(), {"0"});
  EXPECT_EQ(by_zero.status().code(), absl::StatusCode::kInvalidArgument) << by_zero.status();
  EXPECT_THAT(std::string(by_zero.status().message()), HasSubstr("22012"));
  pqxx::nontransaction(lease->connection()).exec0("SET statement_timeout = 200");
  constexpr BinaryQuery kSleep("SELECT pg_sleep($1::float8)");
  absl::StatusOr<BinaryResult> slow = kSleep.Run(lease->connection(), {"2"});
  EXPECT_EQ(slow.status().code(), absl::StatusCode::kDeadlineExceeded) << slow.status();
  constexpr BinaryQuery kBroken("SELEC 1");
  EXPECT_EQ(kBroken.Run(lease->connection(), {}).status().code(), absl::StatusCode::kInternal);
  // The session is still good after its statements failed.
  ASSERT_TRUE(kDivide.Run(lease->connection(), {"1"}).ok());
  // Not inside a transaction: the statement would be part of it, unknown to libpqxx.
  {
    pqxx::work txn(lease->connection());
    txn.exec("SELECT 1");
    EXPECT_EQ(kDivide.Run(lease->connection(), {"1"}).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }

  // Its server process ends: UNAVAILABLE, and the lease is given back broken.
  int64_t pid = 0;
  {
    pqxx::nontransaction q(lease->connection());
    pid = q.exec1("SELECT pg_backend_pid()")[0].as<int64_t>();
  }
  {
    pqxx::connection admin(cluster_->ConnectionString());
    pqxx::nontransaction(admin).exec_params("SELECT pg_terminate_backend($1)", pid);
  }
  absl::StatusOr<BinaryResult> gone = kDivide.Run(lease->connection(), {"1"});
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kUnavailable) << gone.status();
  lease->MarkBroken();
  lease = absl::UnavailableError("given back");
  absl::StatusOr<Lease> next = pool.Acquire();
  ASSERT_TRUE(next.ok()) << next.status();
  absl::StatusOr<BinaryResult> again = kDivide.Run(next->connection(), {"1"});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->bytes(0, 0), std::string("\0\0\0\1", 4));  // int4 1, network byte order
}

// Ends every other session of the server, and waits until they are gone.
void EndOtherSessions(PgCluster& cluster) {
  pqxx::connection admin(cluster.ConnectionString());
  pqxx::nontransaction q(admin);
  q.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
         "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()");
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
    return q.exec1("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                   "AND pid <> pg_backend_pid()")[0]
               .as<int>() == 0;
  }));
}

// Waits until the server's close of `socket` has reached this end (its FIN).
bool ClosedByPeer(int socket) {
  pollfd p{socket, POLLRDHUP, 0};
  return ::poll(&p, 1, 10000) == 1 && (p.revents & (POLLRDHUP | POLLHUP)) != 0;
}

// A pooled connection whose session the server ended while it sat idle (a restart, a failover,
// a terminated backend) is not handed out: the caller's first statement runs, with no retry of
// its own, on a new connection.
TEST_F(PoolTest, AnIdleConnectionTheServerClosedIsNotHandedOut) {
  PoolOptions options = Options();
  options.size = 1;
  Pool pool(options);
  ASSERT_TRUE(Insert(pool, 1, "one").ok());
  {
    absl::StatusOr<Lease> held = pool.Acquire();
    ASSERT_TRUE(held.ok()) << held.status();
    EndOtherSessions(*cluster_);
    ASSERT_TRUE(ClosedByPeer(held->connection().sock()));
  }  // given back idle, its session ended
  absl::StatusOr<Lease> lease = pool.Acquire();
  ASSERT_TRUE(lease.ok()) << lease.status();
  try {
    pqxx::nontransaction q(lease->connection());
    EXPECT_EQ(q.exec1("SELECT count(*) FROM items")[0].as<int>(), 1);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the closed connection was handed out: " << e.what();
    lease->MarkBroken();
  }
}

// Pool::Read reads in binary on a pooled connection. A read whose session ends while it runs is
// run once more on a new connection; with the server down, UNAVAILABLE, and it reads again once
// the server is back.
TEST_F(PoolTest, APoolReadIsRunAgainOnceWhenItsSessionEnds) {
  PoolOptions options = Options();
  options.size = 1;
  Pool pool(options);
  constexpr BinaryQuery kSlowPid("SELECT pg_backend_pid(), pg_sleep(0.3)");
  std::atomic<int> ended{0};
  std::thread terminator([&] {
    pqxx::connection admin(cluster_->ConnectionString());
    pqxx::nontransaction q(admin);
    // The first read's backend, once it sleeps, and only that one.
    test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
      const pqxx::result r = q.exec(
          "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity WHERE wait_event = "
          "'PgSleep' AND pid <> pg_backend_pid()");
      if (r.empty()) return false;
      ended = r[0][1].as<int>();
      return true;
    });
  });
  absl::StatusOr<BinaryResult> read = pool.Read(kSlowPid, {});
  terminator.join();
  ASSERT_NE(ended.load(), 0) << "no read was seen sleeping";
  ASSERT_TRUE(read.ok()) << read.status();
  const absl::string_view pid = read->bytes(0, 0);  // int4, network byte order
  ASSERT_EQ(pid.size(), 4u);
  const int read_by = (static_cast<unsigned char>(pid[0]) << 24) |
                      (static_cast<unsigned char>(pid[1]) << 16) |
                      (static_cast<unsigned char>(pid[2]) << 8) | static_cast<unsigned char>(pid[3]);
  EXPECT_NE(read_by, ended.load());

  constexpr BinaryQuery kPid("SELECT pg_backend_pid()");
  ASSERT_TRUE(cluster_->Stop().ok());
  absl::StatusOr<BinaryResult> down = pool.Read(kPid, {});
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  ASSERT_TRUE(cluster_->StartAgain().ok());
  absl::StatusOr<BinaryResult> back = pool.Read(kPid, {});
  EXPECT_TRUE(back.ok()) << back.status();
}

// A connection whose server process is gone is not used again without the session the pool set up
// (libpqxx can re-establish a connection by itself, which would lose a plain SET): the pool's
// statements keep their timeout, whether the process ends during a transaction or while idle.
// A session left inside a transaction (its client's host gone between two statements) is ended
// by the server after the idle-in-transaction timeout, releasing its locks; by default four
// statement timeouts, at least a minute.
TEST_F(PoolTest, ATransactionLeftIdleIsEndedByTheServerAndItsLocksReleased) {
  {
    Pool pool(Options());
    absl::StatusOr<std::string> setting = pool.TransactValue<std::string>(
        [](pqxx::work& txn) -> absl::StatusOr<std::string> {
          return std::string(txn.exec1("SHOW idle_in_transaction_session_timeout")[0].c_str());
        });
    ASSERT_TRUE(setting.ok()) << setting.status();
    EXPECT_EQ(*setting, "1min");
  }
  PoolOptions options = Options();
  options.idle_in_transaction_timeout = absl::Milliseconds(300);
  Pool pool(options);
  ASSERT_TRUE(pool.Transact([](pqxx::work& txn) {
    txn.exec0("INSERT INTO items (id, label) VALUES (1, 'held')");
    return absl::OkStatus();
  }).ok());
  // A transaction that locks the row and then waits (as an orphaned session would, forever).
  absl::StatusOr<Lease> lease = pool.Acquire();
  ASSERT_TRUE(lease.ok()) << lease.status();
  pqxx::work orphan(lease->connection());
  orphan.exec("SELECT * FROM items WHERE id = 1 FOR UPDATE");
  // Another session gets the lock once the server has ended the idle one.
  pqxx::connection other(cluster_->ConnectionString());
  pqxx::work txn(other);
  txn.exec0("SET LOCAL lock_timeout = '10s'");
  txn.exec0("UPDATE items SET label = 'taken' WHERE id = 1");
  txn.commit();
  EXPECT_THROW(orphan.exec("SELECT 1"), pqxx::broken_connection);
  lease->MarkBroken();
}

TEST_F(PoolTest, AConnectionReestablishedKeepsItsStatementTimeout) {
  PoolOptions options = Options();
  options.size = 1;
  options.statement_timeout = absl::Milliseconds(50);
  Pool pool(options);
  absl::Status lost = pool.Transact([&](pqxx::work& txn) {
    const int64_t pid = txn.exec1("SELECT pg_backend_pid()")[0].as<int64_t>();
    pqxx::connection admin(cluster_->ConnectionString());
    pqxx::nontransaction(admin).exec_params("SELECT pg_terminate_backend($1)", pid);
    try {
      txn.exec0("SELECT 1");
    } catch (const std::exception& e) {
      return pg::StatusFromException(e);  // as a caller that maps its errors does
    }
    return absl::OkStatus();
  });
  EXPECT_EQ(lost.code(), absl::StatusCode::kUnavailable) << lost;
  absl::StatusOr<std::string> settings = pool.TransactValue<std::string>(
      [](pqxx::work& txn) -> absl::StatusOr<std::string> {
        return std::string(txn.exec1("SHOW statement_timeout")[0].c_str());
      });
  ASSERT_TRUE(settings.ok()) << settings.status();
  EXPECT_EQ(*settings, "50ms");
  absl::Status timeout = pool.Transact([](pqxx::work& txn) {
    txn.exec0("SELECT pg_sleep(2)");
    return absl::OkStatus();
  });
  EXPECT_EQ(timeout.code(), absl::StatusCode::kDeadlineExceeded) << timeout;
  // The same for a connection whose server process ends while it is idle in the pool (a server
  // restart, an idle session timeout, a failover): the next transaction gets it back.
  absl::StatusOr<int64_t> pid = pool.TransactValue<int64_t>(
      [](pqxx::work& txn) -> absl::StatusOr<int64_t> {
        return txn.exec1("SELECT pg_backend_pid()")[0].as<int64_t>();
      });
  ASSERT_TRUE(pid.ok()) << pid.status();
  {
    pqxx::connection admin(cluster_->ConnectionString());
    pqxx::nontransaction(admin).exec_params("SELECT pg_terminate_backend($1)", *pid);
  }
  settings = pool.TransactValue<std::string>([](pqxx::work& txn) -> absl::StatusOr<std::string> {
    return std::string(txn.exec1("SHOW statement_timeout")[0].c_str());
  });
  ASSERT_TRUE(settings.ok()) << settings.status();
  EXPECT_EQ(*settings, "50ms");
}

// A lock not taken within lock_timeout is UNAVAILABLE (try again later), on a session that is
// fine: the pool keeps it and its idle connections, instead of reconnecting all of them as if
// the server had restarted.
TEST_F(PoolTest, ALockTimeoutKeepsThePoolsConnections) {
  Pool pool(Options());
  std::set<int> before;
  {
    absl::StatusOr<Lease> a = pool.Acquire();
    absl::StatusOr<Lease> b = pool.Acquire();
    ASSERT_TRUE(a.ok() && b.ok());
    before = {a->connection().backendpid(), b->connection().backendpid()};
  }
  ASSERT_EQ(pool.idle_count(), 2);
  pqxx::connection admin(cluster_->ConnectionString());
  pqxx::work holding(admin);
  holding.exec0("LOCK TABLE items IN ACCESS EXCLUSIVE MODE");
  absl::Status timed_out = pool.Transact([](pqxx::work& txn) {
    txn.exec0("SET LOCAL lock_timeout = '20ms'");
    txn.exec0("SELECT count(*) FROM items");
    return absl::OkStatus();
  });
  EXPECT_EQ(timed_out.code(), absl::StatusCode::kUnavailable) << timed_out;
  holding.abort();
  EXPECT_EQ(pool.idle_count(), 2);
  absl::StatusOr<Lease> a = pool.Acquire();
  absl::StatusOr<Lease> b = pool.Acquire();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((std::set<int>{a->connection().backendpid(), b->connection().backendpid()}), before);
}

// Pool::Read alike: a row lock not taken (55P03, UNAVAILABLE) is the server's answer on a live
// session, passed on as it is; the connection is not dropped, nor called unreachable.
TEST_F(PoolTest, AReadRefusedALockKeepsItsConnectionAndTheServersAnswer) {
  Pool pool(Options());
  ASSERT_TRUE(pool.Transact([](pqxx::work& txn) {
    txn.exec_prepared0("insert_item", 41, "locked");
    return absl::OkStatus();
  }).ok());
  int before = 0;
  {
    absl::StatusOr<Lease> lease = pool.Acquire();
    ASSERT_TRUE(lease.ok());
    before = lease->connection().backendpid();
  }
  pqxx::connection admin(cluster_->ConnectionString());
  pqxx::work holding(admin);
  holding.exec("SELECT 1 FROM items WHERE id = 41 FOR UPDATE");
  constexpr BinaryQuery kLockNow("SELECT id FROM items WHERE id = $1::integer FOR UPDATE NOWAIT");
  absl::StatusOr<BinaryResult> refused = pool.Read(kLockNow, {"41"});
  holding.abort();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("55P03"));
  EXPECT_EQ(pool.idle_count(), 1);
  absl::StatusOr<Lease> lease = pool.Acquire();
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(lease->connection().backendpid(), before);
}

TEST_F(PoolTest, RetriesAbortedTransactions) {
  Pool pool(Options());
  int attempts = 0;
  absl::Status status = pool.Transact([&](pqxx::work& txn) {
    ++attempts;
    if (attempts < 3) return absl::AbortedError("simulated conflict");
    txn.exec_prepared0("insert_item", 7, "seven");
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_EQ(attempts, 3);
  EXPECT_EQ(Count(pool), 1);
}

// A conflict the server reports (here a deadlock, SQLSTATE 40P01) is ABORTED and retried, as is a
// serialization failure. A right the service's role lacks is INTERNAL (the deployment's fault,
// not the caller's) naming SQLSTATE 42501, which libpqxx 6.4 does not give with its exception.
TEST_F(PoolTest, ARealDeadlockIsRetriedAndAMissingRightNamesItsSqlState) {
  Pool pool(Options());
  ASSERT_TRUE(Insert(pool, 1, "one").ok());
  ASSERT_TRUE(Insert(pool, 2, "two").ok());
  std::atomic<int> first_locks{0};
  std::atomic<int> attempts{0};
  std::atomic<bool> finished[2] = {false, false};
  // Each locks one row, waits until the other holds its own, then wants the other's. The
  // deadlock's victim runs again once the other has committed (so that it cannot deadlock again).
  auto cross = [&](int me, int mine, int theirs) {
    int my_attempts = 0;
    absl::Status status = pool.Transact([&, mine, theirs](pqxx::work& txn) {
      ++attempts;
      if (++my_attempts > 1) {
        while (!finished[1 - me].load()) std::this_thread::yield();
      }
      txn.exec_params0("UPDATE items SET label = label || '+' WHERE id = $1", mine);
      ++first_locks;
      while (first_locks.load() < 2) std::this_thread::yield();
      txn.exec_params0("UPDATE items SET label = label || '+' WHERE id = $1", theirs);
      return absl::OkStatus();
    });
    finished[me] = true;
    return status;
  };
  absl::Status a;
  std::thread other([&] { a = cross(0, 1, 2); });
  absl::Status b = cross(1, 2, 1);
  other.join();
  EXPECT_TRUE(a.ok()) << a;
  EXPECT_TRUE(b.ok()) << b;
  EXPECT_EQ(attempts.load(), 3);  // the deadlock's victim ran again

  ASSERT_TRUE(pool.Transact([](pqxx::work& txn) {
    txn.exec0("CREATE TABLE IF NOT EXISTS owners_only (id int)");
    txn.exec0("REVOKE ALL ON owners_only FROM PUBLIC");
    return absl::OkStatus();
  }).ok());
  PoolOptions options = Options();
  options.conninfo = cluster_->ConnectionString("medgate", "medgate_ingest");
  Pool other_role(options);
  absl::Status denied = other_role.Transact([](pqxx::work& txn) {
    txn.exec0("SELECT * FROM owners_only");
    return absl::OkStatus();
  });
  EXPECT_EQ(denied.code(), absl::StatusCode::kInternal) << denied;
  EXPECT_THAT(std::string(denied.message()), HasSubstr("42501"));
}

// A server the pool cannot reach, or cannot log in to, is named by the pool's name only: libpq's
// text (its address, port, user), which callers pass on to their clients, stays in the log.
TEST_F(PoolTest, AServerThatCannotBeUsedIsNamedWithoutItsAddressOrUser) {
  PoolOptions nowhere = Options();
  nowhere.conninfo = "host=127.0.0.1 port=1 dbname=medgate connect_timeout=2";
  PoolOptions no_such_user = Options();
  no_such_user.conninfo = cluster_->ConnectionString("medgate", "no_such_role");
  for (const PoolOptions& options : {nowhere, no_such_user}) {
    Pool pool(options);
    absl::StatusOr<Lease> lease = pool.Acquire();
    EXPECT_EQ(lease.status().code(), absl::StatusCode::kUnavailable) << lease.status();
    EXPECT_EQ(lease.status().message(), "database 'pool-test' unreachable");
    absl::Status transact = pool.Transact([](pqxx::work&) { return absl::OkStatus(); });
    EXPECT_EQ(transact.code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(transact.message(), "database 'pool-test' unreachable");
  }
}

// What the log keeps of a connection the pool could not make is the error's first line: libpq's
// further lines (here the second host it tried, and its hint) are not logged, as a failed
// statement's LINE and text, which may quote what it carried, would not be.
TEST_F(PoolTest, AFailedConnectionIsLoggedByItsFirstLineOnly) {
  PoolOptions options = Options();
  options.conninfo = "host=127.0.0.1,127.0.0.2 port=1,1 dbname=medgate connect_timeout=2";
  Pool pool(options);
  ::testing::internal::CaptureStderr();
  absl::StatusOr<Lease> lease = pool.Acquire();
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kUnavailable) << lease.status();
  EXPECT_THAT(logged, HasSubstr("database_unreachable"));
  EXPECT_THAT(logged, HasSubstr("127.0.0.1"));
  EXPECT_THAT(logged, ::testing::Not(HasSubstr("127.0.0.2")));
  EXPECT_THAT(logged, ::testing::Not(HasSubstr("Is the server running")));
}

TEST_F(PoolTest, BoundsWaitersAndAcquireTime) {
  PoolOptions options = Options();
  options.size = 1;
  options.max_waiters = 1;
  options.acquire_timeout = absl::Seconds(2);
  Pool pool(options);
  absl::StatusOr<Lease> held = pool.Acquire();
  ASSERT_TRUE(held.ok()) << held.status();

  // One waiter is allowed (and times out); another caller meanwhile is refused at once.
  absl::Status waited;
  std::thread waiter([&] { waited = pool.Acquire().status(); });
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (pool.waiter_count() < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  // EXPECT, not ASSERT: the waiter thread must still be joined.
  EXPECT_EQ(pool.waiter_count(), 1);
  absl::Status refused = pool.Acquire().status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("already waiting"));
  waiter.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(waited.message()), HasSubstr("acquire timeout"));
}

TEST_F(PoolTest, ReleasedConnectionWakesAWaiter) {
  PoolOptions options = Options();
  options.size = 1;
  options.acquire_timeout = absl::Seconds(10);
  Pool pool(options);
  std::optional<Lease> held;
  held.emplace(*pool.Acquire());
  absl::Status waited = absl::UnknownError("not run");
  std::thread waiter([&] { waited = pool.Acquire().status(); });
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (pool.waiter_count() < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  // EXPECT, not ASSERT: the waiter thread must still be joined.
  EXPECT_EQ(pool.waiter_count(), 1) << "the waiter never waited";
  held.reset();
  waiter.join();
  EXPECT_TRUE(waited.ok()) << waited;
  EXPECT_EQ(pool.open_count(), 1);
}

TEST_F(PoolTest, ServerDownIsUnavailableAndThePoolRecovers) {
  Pool pool(Options());
  ASSERT_TRUE(pool.Ping().ok());
  ASSERT_TRUE(cluster_->Stop().ok());
  absl::Status down = Insert(pool, 1, "one");
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable) << down;
  EXPECT_EQ(pool.Ping().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(cluster_->StartAgain().ok());
  // Stale idle connections are replaced; prepared statements exist on the new connection.
  absl::Status back = Insert(pool, 2, "two");
  EXPECT_TRUE(back.ok()) << back;
  EXPECT_EQ(Count(pool), 1);
}

// A pool whose every connection is in use is busy, not down: its probe asks the server on a
// connection of its own (which it closes), so a service under load stays in its load balancer.
// With the server stopped, the busy pool's probe fails.
TEST_F(PoolTest, ABusyPoolStillAnswersItsProbe) {
  PoolOptions options = Options();
  options.size = 1;
  options.acquire_timeout = absl::Milliseconds(100);
  Pool pool(options);
  absl::StatusOr<Lease> held = pool.Acquire();
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(pool.Acquire().status().code(), absl::StatusCode::kResourceExhausted);
  absl::Status busy = pool.Ping();
  EXPECT_TRUE(busy.ok()) << busy;
  EXPECT_EQ(pool.open_count(), 1);  // the probe's connection is not the pool's
  ASSERT_TRUE(cluster_->Stop().ok());
  EXPECT_EQ(pool.Ping().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(cluster_->StartAgain().ok());
}

// A server that stops answering (its processes frozen, as a paused host or hung storage leave it,
// its kernel still acknowledging what is sent) cannot end a statement by its statement_timeout:
// the pool gives up on it once it has sent nothing for unanswered_limit, drops the connection and
// answers UNAVAILABLE, for a transaction, a read and a probe alike, none of them asked again. What
// it gave up on was not committed, and the pool works again once the server answers.
TEST_F(PoolTest, AServerThatStopsAnsweringIsGivenUpOnAndThePoolRecovers) {
  PoolOptions options = Options();
  options.statement_timeout = absl::Seconds(1);
  options.unanswered_limit = absl::Seconds(2);
  options.size = 3;
  Pool pool(options);
  ASSERT_TRUE(Insert(pool, 1, "one").ok());
  constexpr BinaryQuery kOne("SELECT 1");
  ASSERT_TRUE(pool.Read(kOne, {}).ok());
  {
    // Three connections open and idle, one for each caller below: a new one would fail to
    // connect instead (connect_timeout), which is another path.
    absl::StatusOr<Lease> a = pool.Acquire();
    absl::StatusOr<Lease> b = pool.Acquire();
    absl::StatusOr<Lease> c = pool.Acquire();
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  }
  ASSERT_EQ(pool.idle_count(), 3);
  ASSERT_TRUE(cluster_->Signal(SIGSTOP).ok());
  absl::Cleanup resume = [] { (void)cluster_->Signal(SIGCONT); };  // also if an ASSERT fails
  // Each on a thread of its own, so that a wait that never ends fails the test, not hangs it.
  std::future<absl::Status> insert =
      std::async(std::launch::async, [&] { return Insert(pool, 2, "two"); });
  std::future<absl::Status> read =
      std::async(std::launch::async, [&] { return pool.Read(kOne, {}).status(); });
  std::future<absl::Status> ping = std::async(std::launch::async, [&] { return pool.Ping(); });
  bool returned = true;
  for (std::future<absl::Status>* f : {&insert, &read, &ping}) {
    returned = returned && f->wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  }
  ASSERT_TRUE(cluster_->Signal(SIGCONT).ok());
  ASSERT_TRUE(returned) << "a caller still waited on the frozen server after 60 s";
  for (std::future<absl::Status>* f : {&insert, &read, &ping}) {
    absl::Status status = f->get();
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
    EXPECT_THAT(status.message(), HasSubstr("database 'pool-test' did not answer within 2s"));
  }
  absl::Status back = Insert(pool, 3, "three");
  EXPECT_TRUE(back.ok()) << back;
  EXPECT_TRUE(pool.Ping().ok());
  // The insert given up on never reached its COMMIT (the server had not answered its BEGIN).
  EXPECT_EQ(Count(pool), 2);
}

// A transaction whose server stops answering while its caller is busy after its last statement
// is answered UNAVAILABLE, not "commit outcome unknown": its COMMIT was never sent, and nothing of
// it is stored.
TEST_F(PoolTest, ATransactionGivenUpBeforeItsCommitIsUnavailableAndStoresNothing) {
  PoolOptions options = Options();
  options.statement_timeout = absl::Seconds(1);
  options.unanswered_limit = absl::Seconds(1);
  Pool pool(options);
  bool shut = false;
  absl::Status given_up = pool.Transact([&](pqxx::work& txn) {
    txn.exec0("INSERT INTO items (id, label) VALUES (1, 'never committed')");
    if (!cluster_->Signal(SIGSTOP).ok()) return absl::InternalError("SIGSTOP failed");
    // Busy until the watch has shut the connection's socket (it then reads as at its end).
    const int socket = txn.conn().sock();
    shut = test_support::PollUntil(absl::Now() + absl::Seconds(60), [socket] {
      pollfd fd{socket, POLLIN, 0};
      return ::poll(&fd, 1, 0) > 0;
    });
    return absl::OkStatus();
  });
  ASSERT_TRUE(cluster_->Signal(SIGCONT).ok());
  ASSERT_TRUE(shut) << "the watch never gave the connection up";
  EXPECT_EQ(given_up.code(), absl::StatusCode::kUnavailable) << given_up;
  EXPECT_THAT(given_up.message(), HasSubstr("did not answer within 1s"));
  EXPECT_EQ(Count(pool), 0);
}

// A server that stops answering while a new connection of the pool is being set up (it let the
// connection in and authenticated it; the session settings that follow get no answer) is given up
// on as a statement would be: UNAVAILABLE, the connection not kept, the pool's count of open
// connections back where it was, and the pool usable once the server answers.
TEST_F(PoolTest, ANewConnectionWhoseSetUpGetsNoAnswerIsGivenUpOn) {
  absl::StatusOr<std::unique_ptr<test_support::PgFaultProxy>> proxy =
      test_support::PgFaultProxy::Start(cluster_->port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  PoolOptions options = Options();
  options.conninfo = (*proxy)->Via(options.conninfo);
  options.statement_timeout = absl::Seconds(1);
  options.unanswered_limit = absl::Seconds(2);
  Pool pool(options);
  ASSERT_EQ(pool.open_count(), 0);
  (*proxy)->FreezeAfterNextStartUp();
  absl::Cleanup thaw = [&] { (*proxy)->Thaw(); };  // also if an ASSERT fails
  // On a thread of its own, so that a wait that never ends fails the test, not hangs it.
  std::future<absl::Status> insert =
      std::async(std::launch::async, [&] { return Insert(pool, 1, "one"); });
  const bool returned = insert.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  (*proxy)->Thaw();
  ASSERT_TRUE(returned) << "the pool still waited on the connection's set-up after 60 s";
  absl::Status status = insert.get();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_THAT(status.message(), HasSubstr("database 'pool-test' did not answer within 2s"));
  EXPECT_EQ(pool.open_count(), 0);
  absl::Status back = Insert(pool, 2, "two");
  EXPECT_TRUE(back.ok()) << back;
  EXPECT_EQ(Count(pool), 1);
}

// A server answers if it completes a new connection or refuses it itself (a wrong password); one
// that is frozen, or nothing listening, does not.
TEST_F(PoolTest, AServerAnswersIfItCompletesOrRefusesANewConnection) {
  EXPECT_TRUE(AcceptsConnections(cluster_->ConnectionString(), kServerAnswersWithin));
  EXPECT_TRUE(AcceptsConnections(cluster_->ConnectionString() + " password=wrong",
                                 kServerAnswersWithin));
  EXPECT_FALSE(AcceptsConnections("host=127.0.0.1 port=1 dbname=x user=x", kServerAnswersWithin));
  ASSERT_TRUE(cluster_->Signal(SIGSTOP).ok());
  const bool frozen_answers = AcceptsConnections(cluster_->ConnectionString(), absl::Seconds(1));
  ASSERT_TRUE(cluster_->Signal(SIGCONT).ok());
  EXPECT_FALSE(frozen_answers);
}

// The limit counts from the server's last answer, not from the transaction's start, and a quiet
// connection is given up only if its server does not answer a new one either: a transaction whose
// statements are each answered in time may take longer than the limit in all.
TEST_F(PoolTest, ALongTransactionOnAServerThatAnswersIsNotCut) {
  PoolOptions options = Options();
  options.unanswered_limit = absl::Seconds(2);
  Pool pool(options);
  absl::Status long_one = pool.Transact([](pqxx::work& txn) {
    for (int i = 0; i < 6; ++i) txn.exec1("SELECT pg_sleep(0.5)");
    txn.exec0("INSERT INTO items (id, label) VALUES (1, 'after three seconds')");
    return absl::OkStatus();
  });
  EXPECT_TRUE(long_one.ok()) << long_one;
  EXPECT_EQ(Count(pool), 1);
  // Nor is a transaction whose caller is busy between two statements for longer than the limit
  // (another database's call, say): its server sends nothing meanwhile, but still answers.
  absl::Status busy_caller = pool.Transact([](pqxx::work& txn) {
    txn.exec1("SELECT 1");
    std::this_thread::sleep_for(std::chrono::seconds(4));
    txn.exec0("INSERT INTO items (id, label) VALUES (2, 'after a busy caller')");
    return absl::OkStatus();
  });
  EXPECT_TRUE(busy_caller.ok()) << busy_caller;
  EXPECT_EQ(Count(pool), 2);
}

// A transaction given a statement timeout of its own runs under it (SET LOCAL), and the pool
// waits for its server accordingly longer: a statement longer than the pool's statement timeout
// and its unanswered limit completes.
TEST_F(PoolTest, ATransactionsOwnStatementTimeoutWidensItsWait) {
  PoolOptions options = Options();
  options.statement_timeout = absl::Seconds(1);
  options.unanswered_limit = absl::Seconds(2);
  Pool pool(options);
  absl::StatusOr<std::string> shown = pool.TransactValue<std::string>(
      [](pqxx::work& txn) -> absl::StatusOr<std::string> {
        txn.exec1("SELECT pg_sleep(2.5)");
        return txn.exec1("SHOW statement_timeout")[0].as<std::string>();
      },
      absl::Seconds(4));
  ASSERT_TRUE(shown.ok()) << shown.status();
  EXPECT_EQ(*shown, "4s");
  // Without it, the pool's own statement timeout applies (the server ends the statement).
  absl::Status bounded = pool.Transact([](pqxx::work& txn) {
    txn.exec1("SELECT pg_sleep(2.5)");
    return absl::OkStatus();
  });
  EXPECT_EQ(bounded.code(), absl::StatusCode::kDeadlineExceeded) << bounded;
}

TEST_F(PoolTest, ShardSetResolvesConfiguredRegionsOnly) {
  RegionConfig fr;
  fr.id = "fr-1";
  fr.territories = {"FR"};
  fr.db.conninfo = cluster_->ConnectionString();
  ShardSet shards({fr}, {{"count_items", "SELECT count(*) FROM items"}});
  absl::StatusOr<Pool*> pool = shards.Get("fr-1");
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ((*pool)->name(), "fr-1");
  // A region routing knows but this service's configuration does not: a misconfiguration, which
  // a caller must not take for "no such patient" (an erasure would stop retrying).
  absl::StatusOr<Pool*> missing = shards.Get("us-1");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("'us-1' is not configured"), absl::string_view::npos);
  EXPECT_TRUE(shards.PingAny().ok());
  EXPECT_EQ(shards.RegionIds(), std::vector<std::string>{"fr-1"});
}

// One text[] element for the round trips below: any UTF-8 text, drawn to be mostly what a text[]
// literal must escape or quote (quotes, backslashes, braces, commas, white space, the word NULL).
std::string RandomArrayElement(std::mt19937_64& rng) {
  static const char* const kPieces[] = {
      "\"", "\\", "{", "}", ",", " ", "\t", "\n", "\r", "NULL", "null", "a", "Z", "0", "-", "_",
      ".", "'", "$1", "\\\"", "\"\"", "{}", "é", "日本", "😀", "\x7f", "\x01", "[1:2]", "=",
      "()"};
  std::string out;
  const uint64_t pieces = testing::Uniform(rng, 0, 6);
  for (uint64_t i = 0; i < pieces; ++i) {
    out += kPieces[testing::Uniform(rng, 0, std::size(kPieces) - 1)];
  }
  return out;
}

// A JSON string of `s` (UTF-8 passed as is), for building an array on the server by another path.
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
    } else {
      out.push_back(c);
    }
  }
  return out + "\"";
}

// TextArrayLiteral is how services pass lists of ids and codes to SQL, and ParseTextArray how they
// read them back: an element that split, merged or changed on the way would make a statement act
// on other ids. Random lists of awkward text go to the server as a literal and come back element
// by element exactly; lists the server builds itself (from JSON, not from our literal, with NULL
// elements among them) are read back exactly by ParseTextArray, without the NULLs.
TEST_F(PoolTest, RandomTextArraysRoundTripThroughTheServerExactly) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(300);
  Pool pool(Options());
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    std::vector<std::string> values(testing::Uniform(rng, 0, 8));
    for (std::string& v : values) v = RandomArrayElement(rng);
    // The server's array also has NULL elements (JSON nulls), which ParseTextArray skips.
    std::string json = "[";
    for (size_t i = 0; i <= values.size(); ++i) {
      while (testing::Uniform(rng, 0, 3) == 0) {
        absl::StrAppend(&json, json.size() > 1 ? "," : "", "null");
      }
      if (i < values.size()) {
        absl::StrAppend(&json, json.size() > 1 ? "," : "", JsonString(values[i]));
      }
    }
    json += "]";
    std::vector<std::string> sent;
    std::vector<std::string> built;
    ASSERT_TRUE(pool.Transact([&](pqxx::work& txn) {
      sent.clear();
      const pqxx::result elements = txn.exec_params(
          "SELECT v FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n",
          TextArrayLiteral(values));
      for (const pqxx::row& row : elements) sent.push_back(row[0].as<std::string>());
      built = ParseTextArray(txn.exec_params1(
          "SELECT ARRAY(SELECT jsonb_array_elements_text($1::jsonb))", json)[0]);
      return absl::OkStatus();
    }).ok());
    EXPECT_EQ(sent, values) << "literal: " << TextArrayLiteral(values);
    EXPECT_EQ(built, values) << "json: " << json;
  }
}

// Text cannot hold a NUL byte: a list with one is refused by the server, never read as a list
// of other elements.
TEST_F(PoolTest, ATextArrayWithANulByteIsRefusedNotSplit) {
  Pool pool(Options());
  for (const std::vector<std::string>& values :
       {std::vector<std::string>{std::string("a\0b", 3)},
        std::vector<std::string>{"x", std::string("\0\",\"y", 5)},
        std::vector<std::string>{std::string("z\0", 2), "w"}}) {
    const std::string literal = TextArrayLiteral(values);
    absl::StatusOr<int64_t> n = pool.TransactValue<int64_t>(
        [&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
          return txn.exec_params1("SELECT cardinality($1::text[])", literal)[0].as<int64_t>();
        });
    EXPECT_FALSE(n.ok()) << "read as " << *n << " elements: " << absl::CHexEscape(literal);
  }
}

// What the server sends for a column read as text[]: a NULL array is empty, an array with other
// bounds is read from its elements, and a field that is no one-dimensional array is a
// conversion_error naming the column, never a list read from part of it.
TEST_F(PoolTest, ParseTextArrayReadsWhatTheServerSendsOrThrows) {
  Pool pool(Options());
  std::vector<std::vector<std::string>> read;
  std::vector<std::string> refused;
  ASSERT_TRUE(pool.Transact([&](pqxx::work& txn) {
    read.clear();
    refused.clear();
    for (const char* query : {"SELECT NULL::text[]", "SELECT '[0:1]={a,b}'::text[]",
                              "SELECT ARRAY['x', NULL, 'y']"}) {
      read.push_back(ParseTextArray(txn.exec1(query)[0]));
    }
    for (const char* query : {"SELECT ARRAY[['a','b'],['c','d']] AS tags",
                              "SELECT 'no array'::text AS tags",
                              "SELECT '{\"unterminated'::text AS tags"}) {
      try {
        std::vector<std::string> got = ParseTextArray(txn.exec1(query)[0]);
        ADD_FAILURE() << query << " read as " << got.size() << " elements";
      } catch (const pqxx::conversion_error& e) {
        refused.push_back(e.what());
      }
    }
    return absl::OkStatus();
  }).ok());
  EXPECT_EQ(read, (std::vector<std::vector<std::string>>{{}, {"a", "b"}, {"x", "y"}}));
  ASSERT_EQ(refused.size(), 3u);
  for (const std::string& why : refused) EXPECT_THAT(why, HasSubstr("column tags: "));
}

// A service is up while it can serve some region: one shard down does not make the set fail, all
// down does, naming each region's failure.
TEST_F(PoolTest, ShardSetAnswersWhileAnyShardDoes) {
  RegionConfig fr;
  fr.id = "fr-1";
  fr.territories = {"FR"};
  fr.db.conninfo = cluster_->ConnectionString();
  RegionConfig de;
  de.id = "de-1";
  de.territories = {"DE"};
  // Nothing listens on port 1 of loopback: refused at once.
  de.db.conninfo = "host=127.0.0.1 port=1 dbname=medgate user=medgate connect_timeout=2";
  ShardSet shards({fr, de}, {});
  absl::Status one_down = shards.PingAny();
  EXPECT_TRUE(one_down.ok()) << one_down;
  ASSERT_TRUE(cluster_->Stop().ok());
  absl::Status all_down = shards.PingAny();
  EXPECT_EQ(all_down.code(), absl::StatusCode::kUnavailable) << all_down;
  EXPECT_THAT(std::string(all_down.message()), HasSubstr("region de-1: "));
  EXPECT_THAT(std::string(all_down.message()), HasSubstr("region fr-1: "));
  ASSERT_TRUE(cluster_->StartAgain().ok());
  absl::Status back = shards.PingAny();
  EXPECT_TRUE(back.ok()) << back;
}

}  // namespace
}  // namespace medgate::pg
