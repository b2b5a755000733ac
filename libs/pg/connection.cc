// A libpqxx connection with its libpq handle, and statements read in binary format.
#include "libs/pg/connection.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"

namespace medgate::pg {

// The base keeps a reference to the policy, constructed after it, as pqxx::connection does.
Connection::Connection(const std::string& conninfo) : connection_base(policy_), policy_(conninfo) {
  init();
}

Connection::~Connection() noexcept { close(); }

bool Connection::ClosedByServer() {
  PGconn* conn = policy_.native();
  if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) return true;
  // A session the server ends sends its last message, then closes: one read takes the message,
  // the next finds the end. Reads that would block leave a live connection as it was.
  for (int read = 0; read < 2; ++read) {
    if (PQconsumeInput(conn) == 0) return true;
  }
  return PQstatus(conn) != CONNECTION_OK;
}

int BinaryResult::rows() const { return PQntuples(result_.get()); }

bool BinaryResult::is_null(int row, int column) const {
  return PQgetisnull(result_.get(), row, column) != 0;
}

absl::string_view BinaryResult::bytes(int row, int column) const {
  return absl::string_view(PQgetvalue(result_.get(), row, column),
                           static_cast<size_t>(PQgetlength(result_.get(), row, column)));
}

bool BinaryResult::boolean(int row, int column) const {
  const absl::string_view b = bytes(row, column);
  return b.size() == 1 && b[0] == 1;
}

namespace {

absl::Status Unreachable(PGconn* conn) {
  return absl::UnavailableError(
      absl::StrCat("database unreachable: ", conn == nullptr ? "not connected" : PQerrorMessage(conn)));
}

// The status of a failed statement: its SQLSTATE's, or UNAVAILABLE when the connection is gone.
absl::Status Failure(PGconn* conn, const PGresult* result) {
  if (PQstatus(conn) != CONNECTION_OK) return Unreachable(conn);
  const char* sqlstate = result == nullptr ? nullptr : PQresultErrorField(result, PG_DIAG_SQLSTATE);
  const char* message =
      result == nullptr ? nullptr : PQresultErrorField(result, PG_DIAG_MESSAGE_PRIMARY);
  if (sqlstate == nullptr) return Unreachable(conn);  // libpq's own failure: no answer read
  return StatusFromSqlState(sqlstate, message == nullptr ? "" : message);
}

}  // namespace

absl::StatusOr<BinaryResult> BinaryQuery::Run(Connection& connection,
                                              const std::vector<std::string>& parameters) const {
  PGconn* conn = connection.policy_.native();
  if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) return Unreachable(conn);
  if (PQtransactionStatus(conn) != PQTRANS_IDLE) {
    return absl::FailedPreconditionError(
        "a binary-format statement runs outside transactions; its connection is in one");
  }
  std::vector<const char*> values;
  values.reserve(parameters.size());
  for (const std::string& p : parameters) values.push_back(p.c_str());
  BinaryResult result(PQexecParams(conn, sql_, static_cast<int>(values.size()), nullptr,
                                   values.data(), nullptr, nullptr, /*resultFormat=*/1));
  if (result.result_ == nullptr || PQresultStatus(result.result_.get()) != PGRES_TUPLES_OK) {
    return Failure(conn, result.result_.get());
  }
  return result;
}

}  // namespace medgate::pg
