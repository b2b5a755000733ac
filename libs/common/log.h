// Structured JSON-lines logging: the only way medgate code writes logs.
// Never log health values, names, patient references or key material.
#ifndef MEDGATE_LIBS_COMMON_LOG_H_
#define MEDGATE_LIBS_COMMON_LOG_H_

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <string_view>
#include <variant>

#include "absl/time/time.h"

namespace medgate::log {

enum class Level { kDebug, kInfo, kWarning, kError };

// A field value: strings are JSON-escaped, numbers and booleans written as such.
using Value = std::variant<absl::string_view, int64_t, double, bool>;

struct Field {
  Field(absl::string_view k, absl::string_view v) : key(k), value(v) {}
  Field(absl::string_view k, const std::string& v) : key(k), value(absl::string_view(v)) {}
  Field(absl::string_view k, const char* v) : key(k), value(absl::string_view(v)) {}
  Field(absl::string_view k, int v) : key(k), value(static_cast<int64_t>(v)) {}
  Field(absl::string_view k, int64_t v) : key(k), value(v) {}
  Field(absl::string_view k, uint64_t v) : key(k), value(static_cast<int64_t>(v)) {}
  Field(absl::string_view k, double v) : key(k), value(v) {}
  Field(absl::string_view k, bool v) : key(k), value(v) {}
  absl::string_view key;
  Value value;
};

// Formats one log line (without the trailing newline); exposed for tests.
std::string FormatLine(Level level, absl::string_view event, std::initializer_list<Field> fields);

// Writes one JSON line to stderr: {"ts":...,"level":...,"event":...,fields...}.
void Write(Level level, absl::string_view event, std::initializer_list<Field> fields);

// Lines below this level are dropped (default kInfo; MEDGATE_LOG_LEVEL=debug|info|warning|error).
void SetMinLevel(Level level);

inline void Debug(absl::string_view event, std::initializer_list<Field> fields = {}) {
  Write(Level::kDebug, event, fields);
}
inline void Info(absl::string_view event, std::initializer_list<Field> fields = {}) {
  Write(Level::kInfo, event, fields);
}
inline void Warning(absl::string_view event, std::initializer_list<Field> fields = {}) {
  Write(Level::kWarning, event, fields);
}
inline void Error(absl::string_view event, std::initializer_list<Field> fields = {}) {
  Write(Level::kError, event, fields);
}

// Lets at most one line through per interval, for a failure every request may hit (a database
// or service down): the first is written at once, the next after the interval, with the count of
// those held back meanwhile.
class Throttle {
 public:
  explicit Throttle(absl::Duration interval) : interval_(interval) {}
  // Whether to write a line at `now`; if so, `held_back` is how many were not written since the
  // last one that was.
  bool Allow(absl::Time now, uint64_t& held_back);

 private:
  const absl::Duration interval_;
  std::mutex mu_;
  absl::Time next_ = absl::InfinitePast();
  uint64_t held_back_ = 0;
};

// Sends protobuf's own messages through Write, as "protobuf" events, instead of its plain-text
// lines on stderr: a request whose string field is not UTF-8 makes it log one. Its errors are
// warnings here, as a client causes them. Process-wide (ConfigureProcess calls it).
void RouteProtobufLogs();

// Appends `text` to `out` as a JSON string literal (with quotes).
void AppendJsonString(std::string& out, absl::string_view text);

}  // namespace medgate::log

#endif  // MEDGATE_LIBS_COMMON_LOG_H_
