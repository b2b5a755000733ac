// text[] parameters and results for libpqxx 6.4.
#include "libs/pg/sql_array.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace medgate::pg {
namespace {

absl::Status Malformed(absl::string_view text, size_t pos, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("not a one-dimensional array: ", why, " at byte ", pos, " of ", text.size()));
}

}  // namespace

std::string TextArrayLiteral(absl::Span<const std::string> values) {
  std::string out = "{";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out.push_back(',');
    out.push_back('"');
    for (char c : values[i]) {
      if (c == '"' || c == '\\') out.push_back('\\');
      out.push_back(c);
    }
    out.push_back('"');
  }
  out.push_back('}');
  return out;
}

// What array_out writes: an element is quoted when it is empty, spells NULL, or holds a quote,
// backslash, brace, comma or white space, and in quotes a backslash escapes the byte after it; an
// unquoted NULL is a NULL element. libpqxx 6.4's array_parser is not used: it takes a single
// quote in an unquoted element for the start of a quoted one and reads past the end of the text.
absl::StatusOr<std::vector<std::string>> ParseArrayText(absl::string_view text) {
  size_t pos = 0;
  if (!text.empty() && text[0] == '[') {
    // Bounds other than the default ([1:n]), as in [0:1]={a,b}.
    const size_t equals = text.find('=');
    if (equals == absl::string_view::npos) return Malformed(text, 0, "bounds without '='");
    pos = equals + 1;
  }
  if (pos >= text.size() || text[pos] != '{') return Malformed(text, pos, "no '{'");
  ++pos;
  std::vector<std::string> out;
  if (pos < text.size() && text[pos] == '}') {
    ++pos;
  } else {
    while (true) {
      if (pos >= text.size()) return Malformed(text, pos, "no closing '}'");
      std::string element;
      bool quoted_or_escaped = false;
      if (text[pos] == '"') {
        quoted_or_escaped = true;
        for (++pos; pos < text.size() && text[pos] != '"'; ++pos) {
          if (text[pos] == '\\' && ++pos == text.size()) break;
          element.push_back(text[pos]);
        }
        if (pos >= text.size()) return Malformed(text, pos, "an unterminated quoted element");
        ++pos;
      } else {
        for (; pos < text.size() && text[pos] != ',' && text[pos] != '}'; ++pos) {
          const char c = text[pos];
          if (c == '{') return Malformed(text, pos, "a nested array");
          if (c == '"') return Malformed(text, pos, "a quote inside an unquoted element");
          if (c == '\\') {
            quoted_or_escaped = true;
            if (++pos == text.size()) break;
          }
          element.push_back(text[pos]);
        }
        if (element.empty() && !quoted_or_escaped) return Malformed(text, pos, "an empty element");
      }
      if (quoted_or_escaped || !absl::EqualsIgnoreCase(element, "NULL")) {
        out.push_back(std::move(element));
      }
      if (pos >= text.size()) return Malformed(text, pos, "no closing '}'");
      if (text[pos] == '}') {
        ++pos;
        break;
      }
      if (text[pos] != ',') return Malformed(text, pos, "no ',' after an element");
      ++pos;
    }
  }
  if (pos != text.size()) return Malformed(text, pos, "text after the closing '}'");
  return out;
}

std::vector<std::string> ParseTextArray(const pqxx::field& field) {
  if (field.is_null()) return {};
  absl::StatusOr<std::vector<std::string>> values =
      ParseArrayText(absl::string_view(field.c_str(), field.size()));
  if (!values.ok()) {
    throw pqxx::conversion_error(absl::StrCat("column ", field.name(), ": ",
                                              values.status().message()));
  }
  return *std::move(values);
}

}  // namespace medgate::pg
