// Unit tests of the SQLSTATE -> Status mapping in libs/pg.
#include <gtest/gtest.h>

#include <pqxx/except>

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

}  // namespace
}  // namespace medgate::pg
