// Validation of request fields, with messages that name the field: the one copy every service uses.
#ifndef MEDGATE_LIBS_COMMON_VALIDATION_H_
#define MEDGATE_LIBS_COMMON_VALIDATION_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace medgate {

// 1..max_bytes of [A-Za-z0-9._-]; INVALID_ARGUMENT naming `field` otherwise.
absl::Status ValidateIdentifier(absl::string_view value, absl::string_view field,
                                size_t max_bytes);

// 1..max_bytes of text without control characters; INVALID_ARGUMENT naming `field` otherwise.
absl::Status ValidateText(absl::string_view value, absl::string_view field, size_t max_bytes);

// A media type (RFC 6838 section 4.2 names, RFC 9110 section 8.3.1 parameters), such as
// "application/pdf" or "text/plain; charset=utf-8": TYPE/SUBTYPE of 1..127 of [A-Za-z0-9] then
// [A-Za-z0-9!#$&^_.+-] each, then parameters ";NAME=VALUE" (NAME a token, VALUE a token or a
// quoted string; each name once, whatever its case), with at most one space on either side of
// each ';'. ASCII only, 1..max_bytes,
// no two spaces in a row and none at either end, so that the value is also a FHIR `code`.
// INVALID_ARGUMENT naming `field`, what is wrong and its byte offset otherwise.
absl::Status ValidateMediaType(absl::string_view value, absl::string_view field,
                               size_t max_bytes);

// OK when the entries of the list `field` are distinct; otherwise INVALID_ARGUMENT naming the
// first repeat and the entry it repeats: "FIELD[i]: WHAT'x' is already listed at FIELD[j]"
// (`what` says what the entries are, e.g. "region ", or nothing).
absl::Status ValidateDistinct(const std::vector<std::string>& values, absl::string_view field,
                              absl::string_view what = "");

// Whether `text` is well-formed UTF-8 (no overlong forms, surrogates or code points past
// U+10FFFF), as every proto3 string must be.
bool IsValidUtf8(absl::string_view text);

// At most `max_bytes` of `text` (UTF-8), cut before a character rather than inside one: a
// proto3 string field holding half a character fails to parse at the receiver.
std::string TruncateUtf8(absl::string_view text, size_t max_bytes);

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_VALIDATION_H_
