// The cluster configuration after random edits of a complete one, as a hand or a template may
// make them: values replaced by other YAML (lists, maps, anchors and aliases, tags, numbers out of
// any range, nulls), keys misspelt or made lists, lines dropped, doubled or indented otherwise.
// Whatever the text, reading it (the cluster's keys, then each service's own) either works or
// fails with INVALID_ARGUMENT whose message names a key or a line ("config..."): never an
// exception out of the reader, which would end a binary without saying why.
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "libs/common/config.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/routing_client/reassign_window.h"
#include "services/consent/consent_server.h"
#include "services/ingest/ingest_server.h"
#include "services/routing/routing_server.h"
#include "services/sharing/sharing_server.h"
#include "tests/support/fuzz.h"

namespace medgate {
namespace {

// Every section and most keys a deployment sets.
constexpr char kFullConfig[] = R"(trust_domain: medgate.test
ca: /pki/ca.crt
dev_reflection: false
limits:
  max_message_bytes: 4194304
  max_concurrent_streams: 1000
  max_threads: 64
  drain_seconds: 5
  tenant_calls_per_second: 50
  tenant_call_burst: 100
control_db:
  conninfo: "host=127.0.0.1 port=5432"
  pool_size: 4
regions:
  - id: fr-1
    territories: [FR, BE]
    db: {conninfo: "host=127.0.0.1 port=5433", pool_size: 4, statement_timeout_ms: 5000}
    keys_db: {conninfo: "host=127.0.0.1 port=5433 dbname=medgate_keys"}
  - id: de-1
    territories: [DE]
    db: {conninfo: "host=127.0.0.1 port=5434"}
routing:
  device_reassign_wait_seconds: 60
  seed_rules:
    - {territory: FR, regions: [fr-1], readable_from: [FR, DE]}
    - {territory: DE, regions: [de-1], readable_from: [DE]}
consent:
  cache: {max_patients: 1000, max_mib: 16, max_staleness_ms: 500}
ingest:
  tenant_samples_per_second: 50000
  max_sample_age_hours: 720
  writers_per_region: 2
  linger_ms: 2
  device_cache_ttl_seconds: 30
sharing:
  kek_file: /etc/medgate/kek
  tenant_quotas: {acme: 5000, globex: 0}
  previous_kek_files: [/etc/medgate/kek-2025]
  upload_idle_timeout_seconds: 30
services:
  routing:
    listen: 127.0.0.1:7000
    tls: {cert: /pki/routing.crt, key: /pki/routing.key, refresh_seconds: 30}
  consent:
    listen: 127.0.0.1:7001
    tls: {cert: /pki/consent.crt, key: /pki/consent.key}
  sharing:
    listen: 127.0.0.1:7003
    address: sharing.medgate:7003
    tls: {cert: /pki/sharing.crt, key: /pki/sharing.key}
)";

// YAML that may stand where a value or a key stood.
const std::vector<std::string>& Replacements() {
  static const std::vector<std::string> kValues = {
      "", "~", "null", "[]", "{}", "[a, [b]]", "{a: {b: c}}", "&anchor x", "*anchor", "*nothing",
      "!!binary aGVsbG8=", "!!int 3", "!custom x", "? [a]", "? {a: 1}", "- a", "-", ":", "|",
      ">-\n  folded", "'single'", "\"dou\\\"ble\"", "\"\\u00e9\"", "0", "-1", "1e400", "0x10",
      "0o17", ".inf", ".nan", "99999999999999999999999", "-9223372036854775808", "true",
      "false", "yes", "FR", "fr-1", "a,b", "{conninfo: x}", "[FR, DE]", "&a [*a]", "\t",
      "# comment", "%YAML 1.2", "---", "...", "\x01", "\xc3\xa9", "\xff"};
  return kValues;
}

// `text` with one to four random edits.
std::string Edit(std::string text, std::mt19937_64& rng) {
  using testing::Uniform;
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  const auto pick = [&](const std::vector<std::string>& from) -> const std::string& {
    return from[Uniform(rng, 0, from.size() - 1)];
  };
  for (uint64_t edits = Uniform(rng, 1, 4); edits > 0; --edits) {
    if (lines.empty()) lines.push_back("");
    const size_t at = Uniform(rng, 0, lines.size() - 1);
    std::string& line = lines[at];
    const size_t colon = line.find(": ");
    switch (Uniform(rng, 0, 7)) {
      case 0:  // a value replaced
        if (colon != std::string::npos) line = line.substr(0, colon + 2) + pick(Replacements());
        break;
      case 1:  // a key replaced
        if (colon != std::string::npos) {
          const size_t indent = line.find_first_not_of(" -");
          line = line.substr(0, indent == std::string::npos ? 0 : indent) + pick(Replacements()) +
                 line.substr(colon);
        }
        break;
      case 2:  // a line dropped
        lines.erase(lines.begin() + static_cast<std::ptrdiff_t>(at));
        break;
      case 3:  // a line doubled (a key given twice, or a list item)
        lines.insert(lines.begin() + static_cast<std::ptrdiff_t>(at), line);
        break;
      case 4:  // indented otherwise
        line = Uniform(rng, 0, 1) == 0 ? "  " + line
                                       : line.substr(std::min<size_t>(2, line.size()));
        break;
      case 5:  // a line of its own
        lines.insert(lines.begin() + static_cast<std::ptrdiff_t>(at),
                     std::string(Uniform(rng, 0, 3) * 2, ' ') + pick(Replacements()));
        break;
      case 6: {  // a byte changed
        if (!line.empty()) line[Uniform(rng, 0, line.size() - 1)] = static_cast<char>(rng());
        break;
      }
      default:  // the rest of the file cut
        lines.resize(at);
        break;
    }
  }
  return absl::StrJoin(lines, "\n");
}

// Reads `text` as a binary does: the cluster's keys, then each service's; the first error.
absl::Status ReadAll(const std::string& text) {
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
  if (!root.ok()) return root.status();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  if (!config.ok()) return config.status();
  if (absl::Status s = routing::ParseRoutingSettings(*config).status(); !s.ok()) return s;
  if (absl::Status s = CheckDeviceReassignWindow(*config); !s.ok()) return s;
  if (absl::Status s = consent::ParseConsentSettings(*config).status(); !s.ok()) return s;
  if (absl::Status s = consent::ParseConsentCacheOptions(*config).status(); !s.ok()) return s;
  if (absl::Status s = ingest::ParseIngestSettings(*config).status(); !s.ok()) return s;
  if (absl::Status s = sharing::ParseSharingSettings(*config).status(); !s.ok()) return s;
  sharing::UnusedVaultKeyGrace(*config);
  return absl::OkStatus();
}

TEST(ConfigFuzzTest, TheFullConfigReads) {
  absl::Status read = ReadAll(kFullConfig);
  EXPECT_TRUE(read.ok()) << read;
}

TEST(ConfigFuzzTest, RandomEditsAreReadOrRefusedNamingAKeyOrLine) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(3000);
  int refused = 0;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const std::string text = Edit(kFullConfig, rng);
    absl::Status read;
    try {
      read = ReadAll(text);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw " << e.what() << "\n" << text;
      continue;
    }
    if (read.ok()) continue;
    ++refused;
    EXPECT_EQ(read.code(), absl::StatusCode::kInvalidArgument) << read << "\n" << text;
    // It says where: the key (config key '...'), or the line (config: line N, or the YAML
    // parser's "line N"), or that the whole document is not a map.
    const bool says_where = absl::StartsWith(read.message(), "config key '") ||
                            (absl::StartsWith(read.message(), "config: ") &&
                             absl::StrContains(read.message(), "line ")) ||
                            read.message() == "config: the document must be a map";
    EXPECT_TRUE(says_where) << read << "\n" << text;
  }
  // Most edits break something; the rest change a value within its range or a comment.
  EXPECT_GT(refused, rounds / 2);
}

}  // namespace
}  // namespace medgate
