// The services' PostgreSQL roles; see database_roles.h.
#include "libs/pg/database_roles.h"

#include <libpq-fe.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "libs/common/status_macros.h"

namespace medgate::pg {
namespace {

// A keyword/value value, always quoted: backslashes and single quotes escaped.
std::string Quoted(absl::string_view value) {
  std::string out = "'";
  for (char c : value) {
    if (c == '\\' || c == '\'') out += '\\';
    out += c;
  }
  out += '\'';
  return out;
}

absl::Status Rewrite(DbConfig& db, absl::string_view role, absl::string_view key) {
  absl::StatusOr<std::string> conninfo = ConninfoAs(db.conninfo, role);
  if (!conninfo.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config key '", key, ".conninfo': ", conninfo.status().message()));
  }
  db.conninfo = *std::move(conninfo);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ConninfoAs(const std::string& conninfo, absl::string_view role) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (options == nullptr) {
    // libpq's message may quote the string, password included.
    PQfreemem(error);
    return absl::InvalidArgumentError("not a libpq connection string (keyword=value or URI)");
  }
  std::string out;
  for (const PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val == nullptr || absl::string_view(o->keyword) == "user") continue;
    absl::StrAppend(&out, o->keyword, "=", Quoted(o->val), " ");
  }
  PQconninfoFree(options);
  absl::StrAppend(&out, "user=", Quoted(role));
  return out;
}

absl::StatusOr<MedgateConfig> ConfigAs(const MedgateConfig& config, absl::string_view role) {
  MedgateConfig out = config;
  if (out.control_db) RETURN_IF_ERROR(Rewrite(*out.control_db, role, "control_db"));
  for (size_t i = 0; i < out.regions.size(); ++i) {
    RegionConfig& region = out.regions[i];
    const std::string key = absl::StrCat("regions[", i, "]");
    RETURN_IF_ERROR(Rewrite(region.db, role, key + ".db"));
    if (region.keys_db) RETURN_IF_ERROR(Rewrite(*region.keys_db, role, key + ".keys_db"));
  }
  return out;
}

}  // namespace medgate::pg
