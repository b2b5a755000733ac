// Connection settings every medgate connection to PostgreSQL has; see conninfo.h.
#include "libs/pg/conninfo.h"

#include <algorithm>

#include <libpq-fe.h>

#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace medgate::pg {

std::string WithConnectionDefaults(const std::string& conninfo) {
  static const std::pair<const char*, const char*> kDefaults[] = {
      {"connect_timeout", "10"}, {"keepalives", "1"},        {"keepalives_idle", "30"},
      {"keepalives_interval", "10"}, {"keepalives_count", "3"}, {"tcp_user_timeout", "60000"},
  };
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (options == nullptr) {
    PQfreemem(error);
    return conninfo;
  }
  std::set<std::string> given;
  for (const PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val != nullptr) given.insert(o->keyword);
  }
  PQconninfoFree(options);
  const bool uri =
      absl::StartsWith(conninfo, "postgresql://") || absl::StartsWith(conninfo, "postgres://");
  std::string out = conninfo;
  for (const auto& [key, value] : kDefaults) {
    if (given.count(key) > 0) continue;
    if (uri) {
      absl::StrAppend(&out, absl::StrContains(out, '?') ? "&" : "?", key, "=", value);
    } else {
      absl::StrAppend(&out, out.empty() ? "" : " ", key, "=", value);
    }
  }
  return out;
}

absl::Duration IdleInTransactionTimeout(absl::Duration statement_timeout) {
  return std::max(absl::Minutes(1), 4 * statement_timeout);
}

absl::Duration UnansweredLimit(absl::Duration statement_timeout) {
  return statement_timeout + absl::Seconds(5);
}

}  // namespace medgate::pg
