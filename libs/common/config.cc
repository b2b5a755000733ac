// YAML configuration loading and validation.
#include "absl/strings/string_view.h"
#include "libs/common/config.h"

#include <libpq-fe.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"

namespace medgate {
namespace {

absl::Status KeyError(const std::string& key, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("config key '", key, "': ", problem));
}

// A configuration is a few levels of maps and lists; these bound what reading one may cost (an
// alias may name a list that holds it, or lists of lists of one list).
constexpr int kMaxConfigDepth = 32;
constexpr int kMaxConfigValues = 100'000;

// Every key of every map is a single value (a key that is a list or a map can name no setting,
// and reading one as a name would throw), given once (a second `regions:` would otherwise be
// ignored without a word); no deeper than kMaxConfigDepth, no more than kMaxConfigValues values.
absl::Status CheckShape(const YAML::Node& node, const std::string& path, int depth, int& budget) {
  if (--budget < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: more than ", kMaxConfigValues, " values"));
  }
  if (depth > kMaxConfigDepth) {
    return KeyError(path, absl::StrCat("nested more than ", kMaxConfigDepth, " levels"));
  }
  if (node.IsMap()) {
    std::set<std::string> seen;
    for (const auto& kv : node) {
      if (!kv.first.IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "config: line ", kv.first.Mark().line + 1, ": a key must be a single value, not a ",
            kv.first.IsSequence() ? "list" : kv.first.IsMap() ? "map" : "null",
            path.empty() ? "" : absl::StrCat(" (in '", path, "')")));
      }
      const std::string key_path =
          path.empty() ? kv.first.Scalar() : absl::StrCat(path, ".", kv.first.Scalar());
      if (!seen.insert(kv.first.Scalar()).second) {
        return KeyError(key_path, absl::StrCat("given twice (line ", kv.first.Mark().line + 1,
                                               ")"));
      }
      RETURN_IF_ERROR(CheckShape(kv.second, key_path, depth + 1, budget));
    }
  } else if (node.IsSequence()) {
    for (size_t i = 0; i < node.size(); ++i) {
      RETURN_IF_ERROR(CheckShape(node[i], absl::StrCat(path, "[", i, "]"), depth + 1, budget));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ConfigNode> ConfigNode::Parse(absl::string_view yaml_text) {
  try {
    YAML::Node node = YAML::Load(std::string(yaml_text));
    if (!node.IsMap()) return absl::InvalidArgumentError("config: the document must be a map");
    int budget = kMaxConfigValues;
    RETURN_IF_ERROR(CheckShape(node, "", 0, budget));
    return ConfigNode(node, "");
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: not valid YAML: ", e.what()));
  }
}

absl::StatusOr<ConfigNode> ConfigNode::LoadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("config file '", path, "' cannot be read"));
  // Read up to one byte past the bound: a larger file (or /dev/zero) is refused, not read whole.
  std::string text(kMaxConfigFileBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad()) return absl::NotFoundError(absl::StrCat("config file '", path, "' cannot be read"));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > kMaxConfigFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("config file '", path, "': over ",
                                                   kMaxConfigFileBytes, " bytes"));
  }
  return Parse(text);
}

std::string ConfigNode::KeyPath(absl::string_view key) const {
  return path_.empty() ? std::string(key) : absl::StrCat(path_, ".", key);
}

bool ConfigNode::Has(absl::string_view key) const {
  return node_.IsMap() && node_[std::string(key)].IsDefined() && !node_[std::string(key)].IsNull();
}

absl::StatusOr<ConfigNode> ConfigNode::Child(absl::string_view key) const {
  if (!Has(key)) return KeyError(KeyPath(key), "missing");
  YAML::Node child = node_[std::string(key)];
  if (!child.IsMap()) return KeyError(KeyPath(key), "expected a map");
  return ConfigNode(child, KeyPath(key));
}

absl::StatusOr<std::vector<ConfigNode>> ConfigNode::Sequence(absl::string_view key,
                                                             bool required) const {
  std::vector<ConfigNode> out;
  if (!Has(key)) {
    if (required) return KeyError(KeyPath(key), "missing");
    return out;
  }
  YAML::Node seq = node_[std::string(key)];
  if (!seq.IsSequence()) return KeyError(KeyPath(key), "expected a list");
  for (size_t i = 0; i < seq.size(); ++i) {
    out.push_back(ConfigNode(seq[i], absl::StrCat(KeyPath(key), "[", i, "]")));
  }
  return out;
}

std::vector<std::string> ConfigNode::Keys() const {
  std::vector<std::string> keys;
  if (!node_.IsMap()) return keys;
  for (const auto& kv : node_) keys.push_back(kv.first.as<std::string>());
  return keys;
}

absl::StatusOr<YAML::Node> ConfigNode::Scalar(absl::string_view key) const {
  if (!Has(key)) return KeyError(KeyPath(key), "missing");
  YAML::Node v = node_[std::string(key)];
  if (!v.IsScalar()) return KeyError(KeyPath(key), "expected a single value");
  return v;
}

absl::StatusOr<std::string> ConfigNode::String(absl::string_view key) const {
  ASSIGN_OR_RETURN(YAML::Node v, Scalar(key));
  std::string s = v.Scalar();
  if (s.empty()) return KeyError(KeyPath(key), "must not be empty");
  return s;
}

absl::StatusOr<std::string> ConfigNode::String(absl::string_view key,
                                               absl::string_view fallback) const {
  if (!Has(key)) return std::string(fallback);
  return String(key);
}

absl::StatusOr<int64_t> ConfigNode::Int(absl::string_view key, int64_t min, int64_t max) const {
  ASSIGN_OR_RETURN(YAML::Node v, Scalar(key));
  int64_t value = 0;
  if (!absl::SimpleAtoi(v.Scalar(), &value)) {
    return KeyError(KeyPath(key), absl::StrCat("expected an integer, got '", v.Scalar(), "'"));
  }
  if (value < min || value > max) {
    return KeyError(KeyPath(key), absl::StrCat("must be between ", min, " and ", max, ", got ",
                                               value));
  }
  return value;
}

absl::StatusOr<int64_t> ConfigNode::Int(absl::string_view key, int64_t min, int64_t max,
                                        int64_t fallback) const {
  if (!Has(key)) return fallback;
  return Int(key, min, max);
}

absl::StatusOr<bool> ConfigNode::Bool(absl::string_view key, bool fallback) const {
  if (!Has(key)) return fallback;
  ASSIGN_OR_RETURN(YAML::Node v, Scalar(key));
  const std::string& s = v.Scalar();
  if (s == "true") return true;
  if (s == "false") return false;
  return KeyError(KeyPath(key), absl::StrCat("expected true or false, got '", s, "'"));
}

absl::StatusOr<std::vector<std::string>> ConfigNode::Strings(absl::string_view key,
                                                             bool required) const {
  std::vector<std::string> out;
  if (!Has(key)) {
    if (required) return KeyError(KeyPath(key), "missing");
    return out;
  }
  YAML::Node seq = node_[std::string(key)];
  if (!seq.IsSequence()) return KeyError(KeyPath(key), "expected a list of strings");
  for (size_t i = 0; i < seq.size(); ++i) {
    if (!seq[i].IsScalar() || seq[i].Scalar().empty()) {
      return KeyError(absl::StrCat(KeyPath(key), "[", i, "]"), "expected a non-empty string");
    }
    out.push_back(seq[i].Scalar());
  }
  return out;
}

absl::Status ConfigNode::OnlyKeys(std::initializer_list<absl::string_view> allowed) const {
  for (const std::string& key : Keys()) {
    bool known = false;
    for (absl::string_view a : allowed) known = known || a == key;
    if (!known) {
      return KeyError(KeyPath(key), absl::StrCat("unknown key (expected one of: ",
                                                 absl::StrJoin(allowed, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

absl::StatusOr<DbConfig> ParseDb(const ConfigNode& node) {
  RETURN_IF_ERROR(node.OnlyKeys({"conninfo", "pool_size", "max_waiters", "acquire_timeout_ms",
                                 "statement_timeout_ms"}));
  DbConfig db;
  ASSIGN_OR_RETURN(db.conninfo, node.String("conninfo"));
  // Checked here, for every binary: libpq's own message for a string it cannot parse quotes it,
  // password included, and the connection attempt would report (and log) it.
  char* parse_error = nullptr;
  PQconninfoOption* options = PQconninfoParse(db.conninfo.c_str(), &parse_error);
  if (options == nullptr) {
    PQfreemem(parse_error);
    return KeyError(node.KeyPath("conninfo"),
                    "not a libpq connection string (keyword=value or URI); libpq's own message, "
                    "which quotes it, is not shown");
  }
  PQconninfoFree(options);
  ASSIGN_OR_RETURN(int64_t pool, node.Int("pool_size", 1, 256, 8));
  ASSIGN_OR_RETURN(int64_t waiters, node.Int("max_waiters", 0, 100000, 64));
  ASSIGN_OR_RETURN(int64_t acquire, node.Int("acquire_timeout_ms", 1, 600000, 2000));
  ASSIGN_OR_RETURN(int64_t stmt, node.Int("statement_timeout_ms", 1, 3600000, 5000));
  db.pool_size = static_cast<int>(pool);
  db.max_waiters = static_cast<int>(waiters);
  db.acquire_timeout_ms = static_cast<int>(acquire);
  db.statement_timeout_ms = static_cast<int>(stmt);
  return db;
}

absl::StatusOr<TlsConfig> ParseTls(const ConfigNode& node, const std::string& ca_path,
                                   const std::string& crl_dir) {
  RETURN_IF_ERROR(node.OnlyKeys({"cert", "key", "refresh_seconds"}));
  TlsConfig tls;
  ASSIGN_OR_RETURN(tls.cert_path, node.String("cert"));
  ASSIGN_OR_RETURN(tls.key_path, node.String("key"));
  ASSIGN_OR_RETURN(int64_t refresh, node.Int("refresh_seconds", 1, 86400, 60));
  tls.refresh_seconds = static_cast<int>(refresh);
  tls.ca_path = ca_path;
  tls.crl_dir = crl_dir;
  return tls;
}

}  // namespace

const RegionConfig* MedgateConfig::FindRegion(absl::string_view id) const {
  for (const RegionConfig& r : regions) {
    if (r.id == id) return &r;
  }
  return nullptr;
}

absl::StatusOr<const ServiceEndpoint*> MedgateConfig::Service(absl::string_view name) const {
  auto it = services.find(std::string(name));
  if (it == services.end()) {
    return KeyError(absl::StrCat("services.", name), "missing");
  }
  return &it->second;
}

absl::StatusOr<MedgateConfig> ParseMedgateConfig(const ConfigNode& root) {
  RETURN_IF_ERROR(root.OnlyKeys({"trust_domain", "ca", "crl_dir", "dev_reflection", "limits",
                                 "control_db", "regions", "services", "routing", "consent",
                                 "ingest", "sharing", "audit"}));
  MedgateConfig config;
  config.root = root;
  ASSIGN_OR_RETURN(config.trust_domain, root.String("trust_domain"));
  ASSIGN_OR_RETURN(config.ca_path, root.String("ca"));
  ASSIGN_OR_RETURN(config.crl_dir, root.String("crl_dir", ""));
  ASSIGN_OR_RETURN(config.dev_reflection, root.Bool("dev_reflection", false));

  if (root.Has("limits")) {
    ASSIGN_OR_RETURN(ConfigNode limits, root.Child("limits"));
    RETURN_IF_ERROR(limits.OnlyKeys({"max_message_bytes", "max_concurrent_streams", "max_threads",
                                     "max_connection_age_seconds",
                                     "max_connection_age_grace_seconds", "drain_seconds",
                                     "tenant_calls_per_second", "tenant_call_burst",
                                     "max_health_watches_per_caller", "max_health_watches"}));
    ServerLimits& l = config.limits;
    ASSIGN_OR_RETURN(int64_t msg, limits.Int("max_message_bytes", 1024, 64 << 20, l.max_message_bytes));
    ASSIGN_OR_RETURN(int64_t streams, limits.Int("max_concurrent_streams", 1, 100000, l.max_concurrent_streams));
    ASSIGN_OR_RETURN(int64_t threads, limits.Int("max_threads", 4, 100000, l.max_threads));
    ASSIGN_OR_RETURN(int64_t age, limits.Int("max_connection_age_seconds", 1, 7 * 86400, l.max_connection_age_seconds));
    ASSIGN_OR_RETURN(int64_t grace, limits.Int("max_connection_age_grace_seconds", 0, 86400, l.max_connection_age_grace_seconds));
    ASSIGN_OR_RETURN(int64_t drain, limits.Int("drain_seconds", 0, 3600, l.drain_seconds));
    ASSIGN_OR_RETURN(int64_t calls, limits.Int("tenant_calls_per_second", 1, 1000000,
                                               l.tenant_calls_per_second));
    ASSIGN_OR_RETURN(int64_t call_burst, limits.Int("tenant_call_burst", 1, 10000000,
                                                    l.tenant_call_burst));
    l.max_message_bytes = static_cast<int>(msg);
    l.max_concurrent_streams = static_cast<int>(streams);
    l.max_threads = static_cast<int>(threads);
    l.max_connection_age_seconds = static_cast<int>(age);
    l.max_connection_age_grace_seconds = static_cast<int>(grace);
    l.drain_seconds = static_cast<int>(drain);
    l.tenant_calls_per_second = static_cast<int>(calls);
    ASSIGN_OR_RETURN(int64_t watches_per_caller,
                     limits.Int("max_health_watches_per_caller", 1, 10000,
                                l.max_health_watches_per_caller));
    ASSIGN_OR_RETURN(int64_t watches, limits.Int("max_health_watches", 1, 1000000,
                                                 l.max_health_watches));
    l.tenant_call_burst = static_cast<int>(call_burst);
    l.max_health_watches_per_caller = static_cast<int>(watches_per_caller);
    l.max_health_watches = static_cast<int>(watches);
  }

  if (root.Has("control_db")) {
    ASSIGN_OR_RETURN(ConfigNode db, root.Child("control_db"));
    ASSIGN_OR_RETURN(config.control_db, ParseDb(db));
  }

  ASSIGN_OR_RETURN(std::vector<ConfigNode> regions, root.Sequence("regions", false));
  for (const ConfigNode& r : regions) {
    RETURN_IF_ERROR(r.OnlyKeys({"id", "territories", "db", "keys_db"}));
    RegionConfig region;
    ASSIGN_OR_RETURN(region.id, r.String("id"));
    if (region.id.empty() || region.id.size() > kMaxConfiguredRegionIdBytes ||
        !std::all_of(region.id.begin(), region.id.end(), [](char c) {
          return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
        })) {
      return KeyError(absl::StrCat(r.path(), ".id"),
                      absl::StrCat("'", region.id, "' is not a region id: 1 to ",
                                   kMaxConfiguredRegionIdBytes,
                                   " lowercase letters, digits or '-' (it is part of the ids of "
                                   "what the region stores)"));
    }
    if (config.FindRegion(region.id) != nullptr) {
      return KeyError(absl::StrCat(r.path(), ".id"), absl::StrCat("duplicate region '", region.id, "'"));
    }
    ASSIGN_OR_RETURN(region.territories, r.Strings("territories", true));
    for (size_t i = 0; i < region.territories.size(); ++i) {
      const std::string& t = region.territories[i];
      if (t.size() != 2 || t[0] < 'A' || t[0] > 'Z' || t[1] < 'A' || t[1] > 'Z') {
        return KeyError(absl::StrCat(r.path(), ".territories[", i, "]"),
                        absl::StrCat("'", t, "' is not an ISO 3166-1 alpha-2 code"));
      }
    }
    ASSIGN_OR_RETURN(ConfigNode db, r.Child("db"));
    ASSIGN_OR_RETURN(region.db, ParseDb(db));
    if (r.Has("keys_db")) {
      ASSIGN_OR_RETURN(ConfigNode keys_db, r.Child("keys_db"));
      ASSIGN_OR_RETURN(region.keys_db, ParseDb(keys_db));
    }
    config.regions.push_back(std::move(region));
  }

  if (root.Has("services")) {
    ASSIGN_OR_RETURN(ConfigNode services, root.Child("services"));
    for (const std::string& name : services.Keys()) {
      ASSIGN_OR_RETURN(ConfigNode s, services.Child(name));
      RETURN_IF_ERROR(s.OnlyKeys({"listen", "address", "tls", "identity"}));
      ServiceEndpoint endpoint;
      const std::string service_prefix = absl::StrCat("spiffe://", config.trust_domain, "/service/");
      ASSIGN_OR_RETURN(endpoint.identity,
                       s.String("identity", absl::StrCat(service_prefix, name)));
      // NAME as an identity's segments are (libs/identity/principal.cc): 1-128 of [A-Za-z0-9._-].
      if (!absl::StartsWith(endpoint.identity, service_prefix) ||
          !ValidateIdentifier(absl::string_view(endpoint.identity).substr(service_prefix.size()),
                              "identity", 128)
               .ok()) {
        return KeyError(absl::StrCat("services.", name, ".identity"),
                        absl::StrCat("'", endpoint.identity, "' is not a service identity of this "
                                     "trust domain (", service_prefix, "NAME)"));
      }
      ASSIGN_OR_RETURN(endpoint.listen, s.String("listen"));
      ASSIGN_OR_RETURN(endpoint.address, s.String("address", endpoint.listen));
      ASSIGN_OR_RETURN(ConfigNode tls, s.Child("tls"));
      ASSIGN_OR_RETURN(endpoint.tls, ParseTls(tls, config.ca_path, config.crl_dir));
      config.services.emplace(name, std::move(endpoint));
    }
  }
  return config;
}

MedgateConfig LoadConfigOrExit(const std::string& path) {
  absl::StatusOr<MedgateConfig> config = [&]() -> absl::StatusOr<MedgateConfig> {
    ASSIGN_OR_RETURN(ConfigNode root, ConfigNode::LoadFile(path));
    return ParseMedgateConfig(root);
  }();
  if (!config.ok()) {
    log::Error("config_invalid", {{"path", path}, {"error", config.status().message()}});
    std::exit(2);
  }
  return *std::move(config);
}

}  // namespace medgate
