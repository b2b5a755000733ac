// Mapping of libpqxx exceptions and SQLSTATE codes to absl::Status.
#include "libs/pg/pg_status.h"

#include <string>

#include <pqxx/except>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace medgate::pg {
namespace {

// libpqxx 6.4 throws some errors as their own types without their SQLSTATE: the code their type
// stands for, so that the status still names it.
std::string SqlStateOf(const pqxx::sql_error& e) {
  if (!e.sqlstate().empty()) return e.sqlstate();
  if (dynamic_cast<const pqxx::insufficient_privilege*>(&e) != nullptr) return "42501";
  if (dynamic_cast<const pqxx::disk_full*>(&e) != nullptr) return "53100";
  if (dynamic_cast<const pqxx::out_of_memory*>(&e) != nullptr) return "53200";
  if (dynamic_cast<const pqxx::insufficient_resources*>(&e) != nullptr) return "53000";
  if (dynamic_cast<const pqxx::undefined_table*>(&e) != nullptr) return "42P01";
  if (dynamic_cast<const pqxx::undefined_column*>(&e) != nullptr) return "42703";
  if (dynamic_cast<const pqxx::undefined_function*>(&e) != nullptr) return "42883";
  if (dynamic_cast<const pqxx::syntax_error*>(&e) != nullptr) return "42601";
  return "";
}

}  // namespace

absl::string_view FirstLine(absl::string_view text) {
  text = absl::StripPrefix(text, "ERROR:  ");
  size_t nl = text.find('\n');
  return nl == absl::string_view::npos ? text : text.substr(0, nl);
}

absl::Status StatusFromSqlState(absl::string_view sqlstate, absl::string_view message) {
  std::string text = absl::StrCat("database error ", sqlstate, ": ", FirstLine(message));
  if (sqlstate == "23505") return absl::AlreadyExistsError(text);
  // Class 40, transaction rollback (serialization failure, deadlock, the rest): the transaction
  // can be retried as a whole. 40003, a statement whose completion is unknown, cannot be: whether
  // it took effect has to be read back. 55P03, a lock not taken within lock_timeout (or NOWAIT):
  // the caller chose not to wait; retried at once, the transaction would wait again, each time.
  if (sqlstate == "40003" || sqlstate == "55P03") return absl::UnavailableError(text);
  if (absl::StartsWith(sqlstate, "40")) return absl::AbortedError(text);
  if (sqlstate == "57014") return absl::DeadlineExceededError(text);
  if (sqlstate == "P0001") return absl::FailedPreconditionError(text);
  if (sqlstate == "23503") return absl::FailedPreconditionError(text);
  if (absl::StartsWith(sqlstate, "22") || sqlstate == "23514" || sqlstate == "23502") {
    return absl::InvalidArgumentError(text);
  }
  // The server going away or refusing work for now: a connection lost, a shutdown, a server
  // still starting, a session ended for idling, or writes refused by a server that is (after a
  // failover, still) a read-only standby.
  if (absl::StartsWith(sqlstate, "08") || sqlstate == "57P01" || sqlstate == "57P02" ||
      sqlstate == "57P03" || sqlstate == "57P05" || sqlstate == "25P03" || sqlstate == "25006") {
    return absl::UnavailableError(text);
  }
  if (absl::StartsWith(sqlstate, "53")) return absl::ResourceExhaustedError(text);
  return absl::InternalError(text);
}

absl::Status StatusFromException(const std::exception& e) {
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    return StatusFromSqlState(SqlStateOf(*sql), sql->what());
  }
  if (dynamic_cast<const pqxx::broken_connection*>(&e) != nullptr) {
    return absl::UnavailableError(absl::StrCat("database unreachable: ", FirstLine(e.what())));
  }
  if (dynamic_cast<const pqxx::in_doubt_error*>(&e) != nullptr) {
    return absl::UnavailableError("database commit outcome unknown (connection lost during commit)");
  }
  if (dynamic_cast<const pqxx::serialization_failure*>(&e) != nullptr ||
      dynamic_cast<const pqxx::deadlock_detected*>(&e) != nullptr) {
    return absl::AbortedError(absl::StrCat("database conflict: ", FirstLine(e.what())));
  }
  if (dynamic_cast<const pqxx::statement_completion_unknown*>(&e) != nullptr) {
    return absl::UnavailableError("database statement outcome unknown");
  }
  return absl::InternalError(absl::StrCat("database client error: ", FirstLine(e.what())));
}

}  // namespace medgate::pg
