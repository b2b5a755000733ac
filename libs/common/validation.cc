// Validation of request fields.
#include "libs/common/validation.h"

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
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

bool IsValidUtf8(absl::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char lead = byte(i);
    size_t length = 0;
    // The second byte's range, narrower after some leads (RFC 3629, section 4).
    unsigned char low = 0x80;
    unsigned char high = 0xBF;
    if (lead < 0x80) {
      length = 1;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;   // overlong
      if (lead == 0xED) high = 0x9F;  // surrogates
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;   // overlong
      if (lead == 0xF4) high = 0x8F;  // past U+10FFFF
    } else {
      return false;
    }
    if (text.size() - i < length) return false;
    for (size_t k = 1; k < length; ++k) {
      const unsigned char b = byte(i + k);
      if (k == 1 ? (b < low || b > high) : (b < 0x80 || b > 0xBF)) return false;
    }
    i += length;
  }
  return true;
}

std::string TruncateUtf8(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  size_t end = max_bytes;
  // text[end], the first byte left out, continues a character: that character is left out whole.
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return std::string(text.substr(0, end));
}

absl::Status ValidateDistinct(const std::vector<std::string>& values, absl::string_view field,
                              absl::string_view what) {
  absl::flat_hash_map<absl::string_view, size_t> first_index;
  for (size_t i = 0; i < values.size(); ++i) {
    const auto [it, inserted] = first_index.emplace(values[i], i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "]: ", what, "'",
                                                     absl::CEscape(values[i]),
                                                     "' is already listed at ", field, "[",
                                                     it->second, "]"));
    }
  }
  return absl::OkStatus();
}

}  // namespace medgate
