// A libpqxx connection with its libpq handle, and statements read in binary format.
#include "libs/pg/connection.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"

namespace medgate::pg {
namespace internal {

HandleKeepingConnect::handle HandleKeepingConnect::Keep(handle h) noexcept {
  if (h != handle_) prepared_.clear();  // a new session has none of the old one's statements
  handle_ = h;
  return h;
}

std::set<std::string>& HandleKeepingConnect::prepared() {
  const int pid = handle_ == nullptr ? 0 : PQbackendPID(handle_);
  if (pid != prepared_on_) {
    prepared_.clear();
    prepared_on_ = pid;
  }
  return prepared_;
}

HandleKeepingConnect::handle HandleKeepingConnect::do_startconnect(handle orig) {
  return Keep(connect_direct::do_startconnect(orig));
}

HandleKeepingConnect::handle HandleKeepingConnect::do_completeconnect(handle orig) {
  return Keep(connect_direct::do_completeconnect(orig));
}

HandleKeepingConnect::handle HandleKeepingConnect::do_dropconnect(handle orig) noexcept {
  return Keep(connect_direct::do_dropconnect(orig));
}

HandleKeepingConnect::handle HandleKeepingConnect::do_disconnect(handle orig) noexcept {
  return Keep(connect_direct::do_disconnect(orig));
}

}  // namespace internal

// The base keeps a reference to the policy, constructed after it, as pqxx::connection does.
Connection::Connection(const std::string& conninfo) : connection_base(policy_), policy_(conninfo) {
  init();
}

Connection::~Connection() noexcept { close(); }

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
        absl::StrCat("statement '", name_, "' runs outside transactions; its connection is in one"));
  }
  std::set<std::string>& prepared = connection.policy_.prepared();
  if (prepared.count(name_) == 0) {
    std::unique_ptr<PGresult, void (*)(PGresult*)> r(PQprepare(conn, name_, sql_, 0, nullptr),
                                                      PQclear);
    const char* sqlstate =
        r == nullptr ? nullptr : PQresultErrorField(r.get(), PG_DIAG_SQLSTATE);
    // 42P05: the session has it already (prepared before this process's record of it began).
    const bool there = sqlstate != nullptr && absl::string_view(sqlstate) == "42P05";
    if (!there && (r == nullptr || PQresultStatus(r.get()) != PGRES_COMMAND_OK)) {
      return Failure(conn, r.get());
    }
    prepared.insert(name_);
  }
  std::vector<const char*> values;
  values.reserve(parameters.size());
  for (const std::string& p : parameters) values.push_back(p.c_str());
  BinaryResult result(PQexecPrepared(conn, name_, static_cast<int>(values.size()), values.data(),
                                     nullptr, nullptr, /*resultFormat=*/1));
  if (result.result_ == nullptr || PQresultStatus(result.result_.get()) != PGRES_TUPLES_OK) {
    const char* sqlstate = result.result_ == nullptr
                               ? nullptr
                               : PQresultErrorField(result.result_.get(), PG_DIAG_SQLSTATE);
    // The session no longer has it (DEALLOCATE ALL, a pooler's new session): prepared again on
    // the next run.
    if (sqlstate != nullptr && absl::string_view(sqlstate) == "26000") prepared.erase(name_);
    return Failure(conn, result.result_.get());
  }
  return result;
}

}  // namespace medgate::pg
