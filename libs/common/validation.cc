// Validation of request fields.
#include "libs/common/validation.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace medgate {
namespace {

absl::Status CheckLength(absl::string_view value, absl::string_view field, size_t max_bytes) {
  if (value.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": must not be empty"));
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": at most ", max_bytes, " bytes, got ", value.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateIdentifier(absl::string_view value, absl::string_view field,
                                size_t max_bytes) {
  if (absl::Status s = CheckLength(value, field, max_bytes); !s.ok()) return s;
  for (char c : value) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": only letters, digits, '.', '_' and '-' are allowed"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateText(absl::string_view value, absl::string_view field, size_t max_bytes) {
  if (absl::Status s = CheckLength(value, field, max_bytes); !s.ok()) return s;
  for (char c : value) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": control characters are not allowed"));
    }
  }
  return absl::OkStatus();
}

std::string TruncateUtf8(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  size_t end = max_bytes;
  // text[end], the first byte left out, continues a character: that character is left out whole.
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return std::string(text.substr(0, end));
}

}  // namespace medgate
