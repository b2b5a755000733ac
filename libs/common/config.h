// YAML configuration, validated at start-up: every error names the offending key.
#ifndef MEDGATE_LIBS_COMMON_CONFIG_H_
#define MEDGATE_LIBS_COMMON_CONFIG_H_

#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace medgate {

// The largest configuration file read (the most values a configuration may hold, 100,000, fit
// in far less).
inline constexpr size_t kMaxConfigFileBytes = 8 << 20;

// A node of a YAML document that knows its dotted path, so errors can name the key.
class ConfigNode {
 public:
  ConfigNode() = default;
  static absl::StatusOr<ConfigNode> Parse(absl::string_view yaml_text);
  // The file at `path`, parsed; one over kMaxConfigFileBytes is refused without being read whole.
  static absl::StatusOr<ConfigNode> LoadFile(const std::string& path);

  const std::string& path() const { return path_; }
  // The dotted path of `key` under this node, as errors name it.
  std::string KeyPath(absl::string_view key) const;
  bool Has(absl::string_view key) const;
  // A map child; NOT_FOUND-style INVALID_ARGUMENT when missing and required.
  absl::StatusOr<ConfigNode> Child(absl::string_view key) const;
  // Elements of a sequence child (empty when the key is absent and not required).
  absl::StatusOr<std::vector<ConfigNode>> Sequence(absl::string_view key, bool required) const;
  // Keys of a map child in document order.
  std::vector<std::string> Keys() const;

  absl::StatusOr<std::string> String(absl::string_view key) const;
  absl::StatusOr<std::string> String(absl::string_view key, absl::string_view fallback) const;
  absl::StatusOr<int64_t> Int(absl::string_view key, int64_t min, int64_t max) const;
  absl::StatusOr<int64_t> Int(absl::string_view key, int64_t min, int64_t max,
                              int64_t fallback) const;
  absl::StatusOr<bool> Bool(absl::string_view key, bool fallback) const;
  absl::StatusOr<std::vector<std::string>> Strings(absl::string_view key, bool required) const;

  // Refuses keys outside `allowed`, so a misspelt key is an error rather than ignored.
  absl::Status OnlyKeys(std::initializer_list<absl::string_view> allowed) const;

 private:
  ConfigNode(YAML::Node node, std::string path) : node_(std::move(node)), path_(std::move(path)) {}
  absl::StatusOr<YAML::Node> Scalar(absl::string_view key) const;

  YAML::Node node_;
  std::string path_;
};

struct TlsConfig {
  std::string cert_path;
  std::string key_path;
  std::string ca_path;
  int refresh_seconds = 60;
  // A directory of the CA's certificate revocation lists in OpenSSL's hashed form
  // ("<issuer hash>.r0", .r1, ...); empty for none. A peer whose certificate one revokes is
  // refused in the handshake, and, on a connection opened before, at its next call
  // (PeerCertificates).
  std::string crl_dir{};
};

struct DbConfig {
  std::string conninfo;  // libpq keyword/value string; holds credentials, never logged.
  int pool_size = 8;
  int max_waiters = 64;
  int acquire_timeout_ms = 2000;
  int statement_timeout_ms = 5000;
};

// A region id is embedded in the ids of what the region stores ("<region>.r<32 hex>" for records
// and grants, at most 64 bytes; "cn_<region>_<24 hex>" for consents), which are split at their
// first '.': 1 to 30 bytes of lowercase letters, digits and '-', as the Helm chart's regions.
inline constexpr size_t kMaxConfiguredRegionIdBytes = 30;

struct RegionConfig {
  std::string id;
  std::vector<std::string> territories;
  DbConfig db;  // the region's shard
  // The region's key vault: a database apart from the shard, holding the patients' data keys
  // (wrapped by the KEK), so that the shard's backups hold no key that opens its records and an
  // erasure destroys the key everywhere it is kept long-term. The sharing service needs it; the
  // other services do not use it.
  std::optional<DbConfig> keys_db;
};

struct ServerLimits {
  int max_message_bytes = 4 << 20;
  int max_concurrent_streams = 1000;  // per connection
  // Threads gRPC may run for one server, for all its connections together (handlers of unary and
  // streaming calls, and its pollers): a call that would need one more is refused with
  // RESOURCE_EXHAUSTED. Callback-API streams (device ingest) take no thread of their own.
  int max_threads = 256;
  int max_connection_age_seconds = 3600;
  int max_connection_age_grace_seconds = 30;
  int drain_seconds = 20;
  // Calls one tenant's practitioners and apps may start a second on one instance of a service,
  // after a burst: one more is RESOURCE_EXHAUSTED (the tenant gate's). Services and ops are not
  // counted; neither are device streams, which learn their tenant's state from routing's device
  // answer instead (ingest's sample quota and per-device stream bound apply to them).
  int tenant_calls_per_second = 1000;
  int tenant_call_burst = 2000;
  // Health Watch streams (grpc.health.v1.Health/Watch) one caller identity may hold open on one
  // server, and the server in all: one more is RESOURCE_EXHAUSTED.
  int max_health_watches_per_caller = 8;
  int max_health_watches = 1024;
};

// One service's endpoint and identity in the cluster configuration.
struct ServiceEndpoint {
  std::string listen;  // host:port this service binds (port 0 picks a free one)
  std::string address;  // host:port clients dial (defaults to listen)
  TlsConfig tls;  // this service's own certificate (server and client)
  // The SPIFFE id this service's certificate carries, which its clients require of the server they
  // reach (default spiffe://TRUST_DOMAIN/service/NAME).
  std::string identity;
};

// The cluster configuration file shared by every medgate binary.
struct MedgateConfig {
  std::string trust_domain;
  std::string ca_path;
  std::string crl_dir;  // see TlsConfig::crl_dir
  bool dev_reflection = false;
  ServerLimits limits;
  std::optional<DbConfig> control_db;
  std::vector<RegionConfig> regions;
  std::map<std::string, ServiceEndpoint> services;
  ConfigNode root;  // for service-specific sections

  const RegionConfig* FindRegion(absl::string_view id) const;
  absl::StatusOr<const ServiceEndpoint*> Service(absl::string_view name) const;
};

absl::StatusOr<MedgateConfig> ParseMedgateConfig(const ConfigNode& root);

// Loads and validates the configuration; on error prints the reason (naming the key) and exits 2.
MedgateConfig LoadConfigOrExit(const std::string& path);

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_CONFIG_H_
