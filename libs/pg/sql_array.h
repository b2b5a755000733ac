// Passing and reading PostgreSQL text[] values as parameters (libpqxx 6.4 has no array params).
#ifndef MEDGATE_LIBS_PG_SQL_ARRAY_H_
#define MEDGATE_LIBS_PG_SQL_ARRAY_H_

#include <string>
#include <vector>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace medgate::pg {

// A text[] literal ({"a","b"}) with every element quoted and escaped, for a $n::text[] parameter.
std::string TextArrayLiteral(absl::Span<const std::string> values);

// The elements of a one-dimensional array in PostgreSQL's text form (`{a,"b c",NULL}`, after
// its bounds when they are not the default: `[0:1]={a,b}`), NULL elements skipped.
// INVALID_ARGUMENT saying where when `text` is not one (a multidimensional array is not).
absl::StatusOr<std::vector<std::string>> ParseArrayText(absl::string_view text);

// The elements of a text[] column (NULL elements are skipped; a NULL array is empty). Throws
// pqxx::conversion_error when the field is not a one-dimensional array.
std::vector<std::string> ParseTextArray(const pqxx::field& field);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_SQL_ARRAY_H_
