// Unit tests of the SQLSTATE -> Status mapping in libs/pg.
#include <gtest/gtest.h>

#include <pqxx/except>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"

namespace medgate::pg {
namespace {

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

TEST(PgStatusTest, KeepsOnlyThePrimaryMessage) {
  absl::Status s = StatusFromSqlState(
      "23505", "ERROR:  duplicate key value violates unique constraint \"x\"\nDETAIL:  Key (ref)=(secret)");
  EXPECT_EQ(s.message(), "database error 23505: duplicate key value violates unique constraint \"x\"");
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
