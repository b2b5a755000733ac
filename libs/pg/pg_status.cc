// Mapping of libpqxx exceptions and SQLSTATE codes to absl::Status.
#include "libs/pg/pg_status.h"

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <pqxx/except>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "libs/common/log.h"

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

struct Meaning {
  absl::StatusCode code;
  absl::string_view text;  // what the SQLSTATE means, in the words a client may read
};

Meaning MeaningOf(absl::string_view sqlstate) {
  using Code = absl::StatusCode;
  if (sqlstate == "23505") return {Code::kAlreadyExists, "a unique key is already taken"};
  // Class 40, transaction rollback (serialization failure, deadlock, the rest): the transaction
  // can be retried as a whole. 40003, a statement whose completion is unknown, cannot be: whether
  // it took effect has to be read back. 55P03, a lock not taken within lock_timeout (or NOWAIT):
  // the caller chose not to wait; retried at once, the transaction would wait again, each time.
  if (sqlstate == "40003") return {Code::kUnavailable, "the statement's outcome is unknown"};
  if (sqlstate == "55P03") {
    return {Code::kUnavailable, "a lock was not taken within the lock timeout"};
  }
  if (sqlstate == "40001") {
    return {Code::kAborted, "a conflict with a concurrent transaction (serialization failure)"};
  }
  if (sqlstate == "40P01") return {Code::kAborted, "a deadlock with a concurrent transaction"};
  if (absl::StartsWith(sqlstate, "40")) return {Code::kAborted, "the transaction was rolled back"};
  if (sqlstate == "57014") {
    return {Code::kDeadlineExceeded, "the statement was cancelled (statement timeout)"};
  }
  if (sqlstate == "P0001") return {Code::kFailedPrecondition, "refused by a rule in the database"};
  if (sqlstate == "23503") {
    return {Code::kFailedPrecondition, "a row it refers to does not exist (foreign key)"};
  }
  if (sqlstate == "23514") return {Code::kInvalidArgument, "a check constraint refused the row"};
  if (sqlstate == "23502") return {Code::kInvalidArgument, "a required value is missing"};
  if (absl::StartsWith(sqlstate, "22")) {
    return {Code::kInvalidArgument, "a value the database cannot take"};
  }
  // The server going away or refusing work for now: a connection lost, a shutdown, a server
  // still starting, a session ended for idling, or writes refused by a server that is (after a
  // failover, still) a read-only standby.
  if (absl::StartsWith(sqlstate, "08")) {
    return {Code::kUnavailable, "the connection to the database failed"};
  }
  if (sqlstate == "57P01" || sqlstate == "57P02") {
    return {Code::kUnavailable, "the database is shutting down"};
  }
  if (sqlstate == "57P03") return {Code::kUnavailable, "the database cannot take connections now"};
  if (sqlstate == "57P05" || sqlstate == "25P03") {
    return {Code::kUnavailable, "the database ended an idle session"};
  }
  if (sqlstate == "25006") {
    return {Code::kUnavailable, "the database takes no writes (a read-only standby)"};
  }
  if (absl::StartsWith(sqlstate, "53")) {
    return {Code::kResourceExhausted, "the database is out of resources"};
  }
  if (absl::StartsWith(sqlstate, "23")) {
    return {Code::kInternal, "an integrity constraint refused the change"};
  }
  if (sqlstate == "42501") return {Code::kInternal, "permission denied in the database"};
  if (absl::StartsWith(sqlstate, "42")) {
    return {Code::kInternal, "a statement that does not match the database's schema"};
  }
  return {Code::kInternal, "an internal database error"};
}

// A fault someone has to look into, whose server text the log keeps; the others (a taken key, a
// conflict, a timeout, an unavailable server) are answers a caller acts on, not faults.
bool LogsServerText(absl::StatusCode code) {
  return code == absl::StatusCode::kInternal || code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kInvalidArgument ||
         code == absl::StatusCode::kResourceExhausted;
}

constexpr absl::string_view kLogged = " (the service's log has the database's message)";

// One line a second for each SQLSTATE: a flood of one error does not hide another. The keys come
// from servers, so they are bounded: past 256 of them, the rest share one.
void LogServerText(absl::string_view key, absl::string_view text) {
  static std::mutex* mu = new std::mutex();
  static auto* throttles = new std::map<std::string, std::unique_ptr<log::Throttle>, std::less<>>();
  constexpr size_t kMaxKeys = 256;
  log::Throttle* throttle = nullptr;
  {
    std::lock_guard<std::mutex> lock(*mu);
    auto it = throttles->find(key);
    if (it == throttles->end()) {
      std::string k = throttles->size() < kMaxKeys ? std::string(key) : std::string("other");
      it = throttles->find(k);
      if (it == throttles->end()) {
        it = throttles->emplace(k, std::make_unique<log::Throttle>(absl::Seconds(1))).first;
      }
    }
    throttle = it->second.get();  // never erased
  }
  if (uint64_t held_back = 0; throttle->Allow(absl::Now(), held_back)) {
    log::Warning("database_error", {{"sqlstate", key},
                                    {"error", FirstLine(text)},
                                    {"similar_failures_not_logged", held_back}});
  }
}

absl::Status FromSqlState(absl::string_view sqlstate, absl::string_view message,
                          bool with_server_text) {
  const Meaning meaning = MeaningOf(sqlstate);
  const absl::string_view shown = sqlstate.empty() ? "(no SQLSTATE)" : sqlstate;
  if (with_server_text) {
    return absl::Status(meaning.code, absl::StrCat("database error ", shown, ": ", FirstLine(message)));
  }
  if (!LogsServerText(meaning.code)) {
    return absl::Status(meaning.code, absl::StrCat("database error ", shown, ": ", meaning.text));
  }
  LogServerText(shown, message);
  return absl::Status(meaning.code,
                      absl::StrCat("database error ", shown, ": ", meaning.text, kLogged));
}

absl::Status FromException(const std::exception& e, bool with_server_text) {
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    return FromSqlState(SqlStateOf(*sql), sql->what(), with_server_text);
  }
  if (dynamic_cast<const pqxx::in_doubt_error*>(&e) != nullptr) {
    return absl::UnavailableError("database commit outcome unknown (connection lost during commit)");
  }
  // libpqxx 6.4 throws class 40 as transaction_rollback types, without their SQLSTATE.
  if (dynamic_cast<const pqxx::transaction_rollback*>(&e) != nullptr) {
    absl::string_view sqlstate = "40000";
    if (dynamic_cast<const pqxx::serialization_failure*>(&e) != nullptr) sqlstate = "40001";
    if (dynamic_cast<const pqxx::deadlock_detected*>(&e) != nullptr) sqlstate = "40P01";
    if (dynamic_cast<const pqxx::statement_completion_unknown*>(&e) != nullptr) sqlstate = "40003";
    return FromSqlState(sqlstate, e.what(), with_server_text);
  }
  if (dynamic_cast<const pqxx::broken_connection*>(&e) != nullptr) {
    if (with_server_text) {
      return absl::UnavailableError(absl::StrCat("database unreachable: ", FirstLine(e.what())));
    }
    LogServerText("connection", e.what());
    return absl::UnavailableError(absl::StrCat("database unreachable", kLogged));
  }
  // libpqxx's own errors (a conversion, a misuse): a fault of the service, not of the request.
  if (with_server_text) {
    return absl::InternalError(absl::StrCat("database client error: ", FirstLine(e.what())));
  }
  LogServerText("client", e.what());
  return absl::InternalError(absl::StrCat("database client error", kLogged));
}

}  // namespace

absl::string_view FirstLine(absl::string_view text) {
  text = absl::StripPrefix(text, "ERROR:  ");
  size_t nl = text.find('\n');
  return nl == absl::string_view::npos ? text : text.substr(0, nl);
}

absl::Status StatusFromSqlState(absl::string_view sqlstate, absl::string_view message) {
  return FromSqlState(sqlstate, message, /*with_server_text=*/false);
}

absl::Status StatusFromException(const std::exception& e) {
  return FromException(e, /*with_server_text=*/false);
}

absl::Status StatusWithServerText(const std::exception& e) {
  return FromException(e, /*with_server_text=*/true);
}

}  // namespace medgate::pg
