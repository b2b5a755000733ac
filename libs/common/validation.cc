// Validation of request fields.
#include "libs/common/validation.h"

#include <algorithm>
#include <string>
#include <vector>

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

// RFC 6838 restricted-name-chars after the first, which is a letter or digit.
bool IsRestrictedNameChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         absl::string_view("!#$&-^_.+").find(c) != absl::string_view::npos;
}

// RFC 9110 tchar.
bool IsTokenChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         absl::string_view("!#$%&'*+-.^_`|~").find(c) != absl::string_view::npos;
}

// Reads a media type left to right; the first thing it cannot read is the error.
class MediaTypeReader {
 public:
  explicit MediaTypeReader(absl::string_view text) : text_(text) {}

  // An empty string when `text` is a media type, otherwise what is wrong.
  std::string Read() {
    if (std::string e = RestrictedName("type"); !e.empty()) return e;
    if (!Take('/')) return Expected("'/' after the type");
    if (std::string e = RestrictedName("subtype"); !e.empty()) return e;
    std::vector<std::string> names;  // lower case: parameter names are case-insensitive
    while (at_ < text_.size()) {
      Take(' ');
      if (!Take(';')) return Expected("';' before a parameter");
      Take(' ');
      const size_t name_at = at_;
      if (Count(IsTokenChar) == 0) return Expected("a parameter name");
      std::string name = absl::AsciiStrToLower(text_.substr(name_at, at_ - name_at));
      if (std::find(names.begin(), names.end(), name) != names.end()) {
        return absl::StrCat("the parameter '", name, "' at byte ", name_at, " is given twice");
      }
      names.push_back(std::move(name));
      if (!Take('=')) return Expected("'=' after the parameter name");
      if (Peek() == '"') {
        if (std::string e = QuotedString(); !e.empty()) return e;
      } else if (Count(IsTokenChar) == 0) {
        return Expected("a parameter value (a token or a quoted string)");
      }
    }
    return "";
  }

 private:
  char Peek() const { return at_ < text_.size() ? text_[at_] : '\0'; }
  bool Take(char c) {
    if (Peek() != c) return false;  // Peek() is never c past the end
    ++at_;
    return true;
  }
  size_t Count(bool (*accepts)(char)) {
    const size_t start = at_;
    while (at_ < text_.size() && accepts(text_[at_])) ++at_;
    return at_ - start;
  }
  std::string Expected(absl::string_view what) const {
    return absl::StrCat("expected ", what, " at byte ", at_);
  }
  std::string RestrictedName(absl::string_view what) {
    const size_t start = at_;
    if (!absl::ascii_isalnum(static_cast<unsigned char>(Peek()))) {
      return Expected(absl::StrCat("the ", what, ", starting with a letter or digit"));
    }
    ++at_;
    Count(IsRestrictedNameChar);
    if (at_ - start > 127) {
      return absl::StrCat("the ", what, " at byte ", start, " is longer than 127 characters");
    }
    return "";
  }
  std::string QuotedString() {
    const size_t start = at_++;
    while (at_ < text_.size()) {
      const char c = text_[at_++];
      if (c == '"') return "";
      if (c == '\\') {
        if (at_ >= text_.size()) break;
        ++at_;
      }
    }
    return absl::StrCat("the quoted string at byte ", start, " is not closed");
  }

  absl::string_view text_;
  size_t at_ = 0;
};

}  // namespace

absl::Status ValidateMediaType(absl::string_view value, absl::string_view field,
                               size_t max_bytes) {
  if (absl::Status s = ValidateText(value, field, max_bytes); !s.ok()) return s;
  std::string error;
  for (size_t i = 0; i < value.size() && error.empty(); ++i) {
    if (static_cast<unsigned char>(value[i]) >= 0x80) {
      error = absl::StrCat("a byte past ASCII at byte ", i);
    } else if (value[i] == ' ' && (i == 0 || i + 1 == value.size() || value[i + 1] == ' ')) {
      error = absl::StrCat(i == 0 || i + 1 == value.size() ? "a space at either end"
                                                           : "two spaces in a row",
                           " at byte ", i);
    }
  }
  if (error.empty()) error = MediaTypeReader(value).Read();
  if (error.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": not a media type such as application/pdf or text/plain; charset=utf-8 (", error,
      ")"));
}

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
