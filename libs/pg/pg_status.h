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
// Messages carry the SQLSTATE and the server's primary message only (never DETAIL, which may
// contain row values).
absl::Status StatusFromException(const std::exception& e);

// The first line of a libpq or server message, without its "ERROR:  " prefix: what follows it (a
// statement's LINE and text, DETAIL, CONTEXT) may quote what the statement carried.
absl::string_view FirstLine(absl::string_view text);

// The same mapping from a SQLSTATE code and message, for tests and non-exception paths.
absl::Status StatusFromSqlState(absl::string_view sqlstate, absl::string_view message);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_PG_STATUS_H_
