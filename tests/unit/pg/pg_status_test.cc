// Unit tests of the SQLSTATE -> Status mapping in libs/pg.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <pqxx/except>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"

namespace medgate::pg {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(PgStatusTest, MapsSqlStates) {
  EXPECT_EQ(StatusFromSqlState("23505", "dup").code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(StatusFromSqlState("40001", "ser").code(), absl::StatusCode::kAborted);
  EXPECT_EQ(StatusFromSqlState("40P01", "dl").code(), absl::StatusCode::kAborted);
  EXPECT_EQ(StatusFromSqlState("57014", "timeout").code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(StatusFromSqlState("08006", "gone").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromSqlState("57P01", "shutdown").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromSqlState("53300", "too many").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(StatusFromSqlState("P0001", "raise").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(StatusFromSqlState("22P02", "bad").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StatusFromSqlState("42P01", "no table").code(), absl::StatusCode::kInternal);
}

TEST(PgStatusTest, ARolledBackTransactionIsRetryableAndAnUnknownOutcomeIsNot) {
  // Class 40 as a whole: retry the transaction.
  EXPECT_EQ(StatusFromSqlState("40000", "rollback").code(), absl::StatusCode::kAborted);
  EXPECT_EQ(StatusFromSqlState("40002", "deferred").code(), absl::StatusCode::kAborted);
  // A lock not taken within the caller's lock_timeout: not retried by the pool, later perhaps.
  EXPECT_EQ(StatusFromSqlState("55P03", "lock").code(), absl::StatusCode::kUnavailable);
  // Whether the statement took effect is unknown: not a conflict to retry blindly.
  EXPECT_EQ(StatusFromSqlState("40003", "unknown").code(), absl::StatusCode::kUnavailable);
}

TEST(PgStatusTest, AServerThatCannotTakeWritesNowIsUnavailable) {
  EXPECT_EQ(StatusFromSqlState("25006", "read-only").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromSqlState("25P03", "idle in tx").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromSqlState("57P05", "idle session").code(), absl::StatusCode::kUnavailable);
}

// What a client reads is the SQLSTATE and what it means: the server's text names tables,
// constraints and functions, and its DETAIL may quote the row.
TEST(PgStatusTest, AClientReadsWhatTheSqlStateMeansNotTheServersText) {
  absl::Status s = StatusFromSqlState(
      "23505", "ERROR:  duplicate key value violates unique constraint \"x\"\nDETAIL:  Key (ref)=(secret)");
  EXPECT_EQ(s.message(), "database error 23505: a unique key is already taken");
  absl::Status conflict = StatusFromSqlState("40001", "could not serialize access on table_y");
  EXPECT_EQ(conflict.message(),
            "database error 40001: a conflict with a concurrent transaction (serialization failure)");
}

// A fault's server text goes to the log (first line only), and the client is told it is there;
// one line a second for each SQLSTATE, so that a flood of one does not hide another.
TEST(PgStatusTest, AFaultsServerTextIsLoggedOncePerSecondForEachSqlState) {
  ::testing::internal::CaptureStderr();
  absl::Status missing = StatusFromSqlState(
      "XX001", "ERROR:  could not read block 7 in file \"base/1/hidden_relation\"\nCONTEXT:  row (secret)");
  absl::Status again = StatusFromSqlState("XX001", "ERROR:  could not read block 8 in file \"other\"");
  absl::Status other = StatusFromSqlState("58030", "ERROR:  could not write to file \"pg_wal/x\"");
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(missing.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(missing.message(),
            "database error XX001: an internal database error (the service's log has the "
            "database's message)");
  EXPECT_EQ(again.message(), missing.message());
  EXPECT_THAT(logged, HasSubstr("\"event\":\"database_error\""));
  EXPECT_THAT(logged, HasSubstr("\"sqlstate\":\"XX001\""));
  EXPECT_THAT(logged, HasSubstr("could not read block 7 in file \\\"base/1/hidden_relation\\\""));
  EXPECT_THAT(logged, Not(HasSubstr("secret")));
  EXPECT_THAT(logged, Not(HasSubstr("block 8")));  // held back: the same SQLSTATE within a second
  EXPECT_THAT(logged, HasSubstr("could not write to file"));
}

// The operator's tools read the server's first line (never its DETAIL) in the message itself.
TEST(PgStatusTest, TheOperatorsToolsReadTheServersFirstLine) {
  absl::Status s = StatusWithServerText(pqxx::sql_error(
      "ERROR:  relation \"t\" does not exist\nLINE 1: SELECT * FROM t WHERE ref = 'secret'", "q",
      "42P01"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(s.message(), "database error 42P01: relation \"t\" does not exist");
  absl::Status gone = StatusWithServerText(pqxx::broken_connection("server closed the connection"));
  EXPECT_EQ(gone.message(), "database unreachable: server closed the connection");
}

// libpqxx 6.4 throws class 40 as its own types, which are not sql_errors and carry no SQLSTATE.
TEST(PgStatusTest, ARolledBackTransactionThrownAsItsTypeIsNamedByItsSqlState) {
  absl::Status conflict = StatusFromException(pqxx::serialization_failure("ERROR:  could not serialize"));
  EXPECT_EQ(conflict.code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(absl::StartsWith(conflict.message(), "database error 40001: ")) << conflict;
  absl::Status deadlock = StatusFromException(pqxx::deadlock_detected("ERROR:  deadlock detected"));
  EXPECT_EQ(deadlock.code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(absl::StartsWith(deadlock.message(), "database error 40P01: ")) << deadlock;
  absl::Status unknown = StatusFromException(pqxx::statement_completion_unknown("?"));
  EXPECT_EQ(unknown.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StartsWith(unknown.message(), "database error 40003: ")) << unknown;
}

// A lost connection's text names the server's host and port: logged, not returned.
TEST(PgStatusTest, ALostConnectionIsNotNamedToTheClient) {
  absl::Status gone = StatusFromException(
      pqxx::broken_connection("connection to server at \"10.9.8.7\", port 6543 failed"));
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(gone.message()), Not(HasSubstr("10.9.8.7")));
  absl::Status misuse = StatusFromException(pqxx::conversion_error("Could not convert 'abc'"));
  EXPECT_EQ(misuse.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(misuse.message()), Not(HasSubstr("abc")));
}

TEST(PgStatusTest, MapsExceptions) {
  EXPECT_EQ(StatusFromException(pqxx::unique_violation("dup", "q", "23505")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(StatusFromException(pqxx::broken_connection("gone")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromException(pqxx::in_doubt_error("?")).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StatusFromException(std::runtime_error("x")).code(), absl::StatusCode::kInternal);
}

// libpqxx 6.4 throws some server errors as their own types without their SQLSTATE: the status
// names the code the type stands for; a SQLSTATE given with the exception is kept.
TEST(PgStatusTest, NamesTheSqlStateOfExceptionsThrownWithoutIt) {
  const struct {
    absl::Status status;
    const char* sqlstate;
  } cases[] = {
      {StatusFromException(pqxx::insufficient_privilege("ERROR:  permission denied for table t")),
       "42501"},
      {StatusFromException(pqxx::undefined_table("ERROR:  relation \"t\" does not exist")), "42P01"},
      {StatusFromException(pqxx::undefined_column("ERROR:  column c does not exist")), "42703"},
      {StatusFromException(pqxx::undefined_function("ERROR:  function f() does not exist")),
       "42883"},
      {StatusFromException(pqxx::syntax_error("ERROR:  syntax error")), "42601"},
      {StatusFromException(pqxx::disk_full("ERROR:  could not extend file")), "53100"},
      {StatusFromException(pqxx::out_of_memory("ERROR:  out of memory")), "53200"},
      {StatusFromException(pqxx::insufficient_resources("ERROR:  too many locks")), "53000"},
      {StatusFromException(pqxx::insufficient_privilege("ERROR:  denied", "q", "42501")), "42501"},
  };
  for (const auto& c : cases) {
    EXPECT_TRUE(absl::StartsWith(c.status.message(), absl::StrCat("database error ", c.sqlstate, ": ")))
        << c.status;
  }
  EXPECT_EQ(cases[0].status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(cases[5].status.code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace medgate::pg
