// The one place where libpqxx exceptions become absl::Status.
#ifndef MEDGATE_LIBS_PG_PG_STATUS_H_
#define MEDGATE_LIBS_PG_PG_STATUS_H_

#include <exception>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"

namespace medgate::pg {

// unique violation -> ALREADY_EXISTS; serialization failure or deadlock -> ABORTED;
// broken connection, server shutting down or an unknown commit outcome -> UNAVAILABLE;
// statement timeout -> DEADLINE_EXCEEDED; out of resources -> RESOURCE_EXHAUSTED;
// a RAISE from our own triggers -> FAILED_PRECONDITION; anything else -> INTERNAL.
//
// The message is what a client of a service may read: the SQLSTATE and what it means, never the
// server's own text, which names tables, constraints, functions and hosts and may quote values.
// Where the status is a fault to look into (INTERNAL, FAILED_PRECONDITION, INVALID_ARGUMENT,
// RESOURCE_EXHAUSTED, a client library error, a lost connection), the server's first line is
// logged instead ("database_error", at most one line a second for each SQLSTATE), and the message
// says so.
absl::Status StatusFromException(const std::exception& e);

// The same mapping from a SQLSTATE code and message, for tests and non-exception paths.
absl::Status StatusFromSqlState(absl::string_view sqlstate, absl::string_view message);

// The same codes with the server's first line in the message ("database error 42P01: relation
// ... does not exist"), for the operator's tools (medgate-migrate), whose messages are read by
// the person running them, not by a service's clients. Nothing is logged.
absl::Status StatusWithServerText(const std::exception& e);

// The first line of a libpq or server message, without its "ERROR:  " prefix: what follows it (a
// statement's LINE and text, DETAIL, CONTEXT) may quote what the statement carried.
absl::string_view FirstLine(absl::string_view text);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_PG_STATUS_H_
