// Passing and reading PostgreSQL text[] values as parameters (libpqxx 6.4 has no array params).
#ifndef MEDGATE_LIBS_PG_SQL_ARRAY_H_
#define MEDGATE_LIBS_PG_SQL_ARRAY_H_

#include <string>
#include <vector>

#include <pqxx/pqxx>

#include "absl/types/span.h"

namespace medgate::pg {

// A text[] literal ({"a","b"}) with every element quoted and escaped, for a $n::text[] parameter.
std::string TextArrayLiteral(absl::Span<const std::string> values);

// The elements of a text[] column (NULL elements are skipped; a NULL array is empty).
std::vector<std::string> ParseTextArray(const pqxx::field& field);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_SQL_ARRAY_H_
