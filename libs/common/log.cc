// Structured JSON-lines logging to stderr.
#include "absl/strings/string_view.h"
#include "libs/common/log.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include <google/protobuf/stubs/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace medgate::log {
namespace {

void ProtobufLog(google::protobuf::LogLevel level, const char* file, int line,
                 const std::string& message) {
  Level ours = Level::kWarning;
  if (level == google::protobuf::LOGLEVEL_INFO) ours = Level::kInfo;
  if (level == google::protobuf::LOGLEVEL_FATAL) ours = Level::kError;
  Write(ours, "protobuf", {{"message", message}, {"source", absl::StrCat(file, ":", line)}});
}

Level LevelFromEnv() {
  const char* env = std::getenv("MEDGATE_LOG_LEVEL");
  if (env == nullptr) return Level::kInfo;
  absl::string_view v(env);
  if (v == "debug") return Level::kDebug;
  if (v == "warning") return Level::kWarning;
  if (v == "error") return Level::kError;
  return Level::kInfo;
}

std::atomic<Level>& MinLevel() {
  static std::atomic<Level> level{LevelFromEnv()};
  return level;
}

absl::string_view LevelName(Level level) {
  switch (level) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarning: return "warning";
    case Level::kError: return "error";
  }
  return "info";
}

}  // namespace

void AppendJsonString(std::string& out, absl::string_view text) {
  out.push_back('"');
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

std::string FormatLine(Level level, absl::string_view event, std::initializer_list<Field> fields) {
  std::string line = "{\"ts\":";
  AppendJsonString(line, absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()));
  absl::StrAppend(&line, ",\"level\":\"", LevelName(level), "\",\"event\":");
  AppendJsonString(line, event);
  for (const Field& f : fields) {
    line.push_back(',');
    AppendJsonString(line, f.key);
    line.push_back(':');
    if (const auto* s = std::get_if<absl::string_view>(&f.value)) {
      AppendJsonString(line, *s);
    } else if (const auto* i = std::get_if<int64_t>(&f.value)) {
      absl::StrAppend(&line, *i);
    } else if (const auto* d = std::get_if<double>(&f.value)) {
      if (std::isfinite(*d)) {
        absl::StrAppend(&line, *d);
      } else {
        line += "null";
      }
    } else {
      line += std::get<bool>(f.value) ? "true" : "false";
    }
  }
  line.push_back('}');
  return line;
}

void SetMinLevel(Level level) { MinLevel().store(level); }

void Write(Level level, absl::string_view event, std::initializer_list<Field> fields) {
  if (level < MinLevel().load(std::memory_order_relaxed)) return;
  std::string line = FormatLine(level, event, fields);
  line.push_back('\n');
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

void RouteProtobufLogs() { google::protobuf::SetLogHandler(&ProtobufLog); }

bool Throttle::Allow(absl::Time now, uint64_t& held_back) {
  std::lock_guard<std::mutex> lock(mu_);
  if (now < next_) {
    ++held_back_;
    return false;
  }
  next_ = now + interval_;
  held_back = held_back_;
  held_back_ = 0;
  return true;
}

}  // namespace medgate::log
