// ParseSharingSettings: every `sharing` key reaches the setting it names, the key-encryption key
// has exactly one source, and a value outside its range is refused with the key's path.
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "libs/common/config.h"
#include "services/sharing/sharing_core.h"
#include "services/sharing/sharing_server.h"

namespace medgate::sharing {
namespace {

absl::StatusOr<SharingSettings> Parse(const std::string& yaml) {
  MedgateConfig config;
  absl::StatusOr<ConfigNode> node = ConfigNode::Parse(yaml);
  if (!node.ok()) return node.status();
  config.root = *node;
  return ParseSharingSettings(config);
}

TEST(SharingSettingsTest, EveryKeySetsItsSetting) {
  absl::StatusOr<SharingSettings> s = Parse(
      "sharing:\n"
      "  kek_file: /etc/medgate/kek\n"
      "  tenant_quota_bytes: 1000000\n"
      "  tenant_quotas: {acme: 5000, globex: 0}\n"
      "  upload_idle_timeout_seconds: 45\n"
      "  upload_min_bytes_per_second: 2048\n"
      "  download_idle_timeout_seconds: 50\n"
      "  download_min_bytes_per_second: 4096\n"
      "  max_uploads_per_tenant: 3\n"
      "  max_downloads_per_tenant: 5\n"
      "  retention_sweep_seconds: 120\n"
      "  previous_kek_files: [/etc/medgate/kek-2026, /etc/medgate/kek-2025]\n"
      "  kek_rewrap: true\n"
      "  kek_rewrap_seconds: 5\n"
      "  patient_erasure_timeout_seconds: 600\n"
      "  audit_anchor_seconds: 30\n"
      "consent:\n"
      "  cache: {max_patients: 7, max_mib: 3}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  // The consent cache's bounds are the consent service's keys.
  EXPECT_EQ(s->consent_cache.max_patients, 7u);
  EXPECT_EQ(s->consent_cache.max_bytes, size_t{3} << 20);
  EXPECT_EQ(s->kek_file, "/etc/medgate/kek");
  EXPECT_EQ(s->kek_env, "");
  EXPECT_EQ(s->tenant_quota_bytes, 1000000);
  ASSERT_EQ(s->tenant_quotas.size(), 2u);
  EXPECT_EQ(s->tenant_quotas.at("acme"), 5000);
  EXPECT_EQ(s->tenant_quotas.at("globex"), 0);
  EXPECT_EQ(s->upload_idle_timeout, absl::Seconds(45));
  EXPECT_EQ(s->upload_min_bytes_per_second, 2048);
  EXPECT_EQ(s->download_idle_timeout, absl::Seconds(50));
  EXPECT_EQ(s->download_min_bytes_per_second, 4096);
  EXPECT_EQ(s->max_uploads_per_tenant, 3);
  EXPECT_EQ(s->max_downloads_per_tenant, 5);
  EXPECT_EQ(s->retention_sweep_interval, absl::Seconds(120));
  EXPECT_EQ(s->previous_kek_files,
            (std::vector<std::string>{"/etc/medgate/kek-2026", "/etc/medgate/kek-2025"}));
  EXPECT_TRUE(s->kek_rewrap);
  EXPECT_EQ(s->kek_rewrap_interval, absl::Seconds(5));
  EXPECT_EQ(s->patient_erasure_timeout, absl::Seconds(600));
  EXPECT_EQ(s->audit_anchor_interval, absl::Seconds(30));
}

// Rewrapping names the KEKs it rewraps from: without previous ones it is a mistake, named.
TEST(SharingSettingsTest, RewrappingNeedsPreviousKeks) {
  absl::StatusOr<SharingSettings> s = Parse("sharing: {kek_env: K, kek_rewrap: true}\n");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("sharing.kek_rewrap"), std::string::npos) << s.status();
}

TEST(SharingSettingsTest, DefaultsBesideTheKeySource) {
  absl::StatusOr<SharingSettings> s = Parse("sharing: {kek_env: MEDGATE_KEK}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->kek_env, "MEDGATE_KEK");
  EXPECT_EQ(s->tenant_quota_bytes, int64_t{1} << 40);  // a bound even when none is set
  EXPECT_TRUE(s->tenant_quotas.empty());
  EXPECT_EQ(s->upload_idle_timeout, absl::Seconds(30));
  EXPECT_EQ(s->upload_min_bytes_per_second, 16 * 1024);
  EXPECT_EQ(s->download_idle_timeout, absl::Seconds(30));
  EXPECT_EQ(s->download_min_bytes_per_second, 16 * 1024);
  EXPECT_EQ(s->max_uploads_per_tenant, 4);
  EXPECT_EQ(s->max_downloads_per_tenant, 8);
  EXPECT_EQ(s->retention_sweep_interval, absl::Seconds(60));
  EXPECT_TRUE(s->previous_kek_files.empty());
  EXPECT_FALSE(s->kek_rewrap);
  EXPECT_EQ(s->kek_rewrap_interval, absl::Seconds(60));
  EXPECT_EQ(s->patient_erasure_timeout, absl::Seconds(120));
  EXPECT_EQ(s->audit_anchor_interval, absl::Seconds(300));
}

TEST(SharingSettingsTest, TheKeyEncryptionKeyNeedsExactlyOneSource) {
  for (const std::string& yaml : {std::string("other: {}\n"), std::string("sharing: {}\n"),
                                 std::string("sharing: {kek_file: /k, kek_env: K}\n")}) {
    absl::StatusOr<SharingSettings> s = Parse(yaml);
    ASSERT_FALSE(s.ok()) << yaml;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << yaml;
    EXPECT_NE(s.status().message().find("sharing"), std::string::npos) << s.status();
  }
}

TEST(SharingSettingsTest, AValueOutOfRangeNamesItsKey) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"tenant_quota_bytes", "-1"},          {"tenant_quotas", "{acme: -5}"},
      {"upload_idle_timeout_seconds", "0"},  {"upload_idle_timeout_seconds", "3601"},
      {"upload_min_bytes_per_second", "0"},  {"max_uploads_per_tenant", "0"},
      {"max_downloads_per_tenant", "0"},     {"max_downloads_per_tenant", "10001"},
      {"retention_sweep_seconds", "0"},      {"max_uploads_per_tenant", "many"},
      {"download_idle_timeout_seconds", "0"}, {"download_idle_timeout_seconds", "3601"},
      {"download_min_bytes_per_second", "0"},
      {"kek_rewrap_seconds", "0"},           {"previous_kek_files", "[a, b, c, d, e, f, g, h, i]"},
      {"patient_erasure_timeout_seconds", "0"}, {"patient_erasure_timeout_seconds", "3601"},
      {"audit_anchor_seconds", "-1"},        {"audit_anchor_seconds", "86401"},
  };
  for (const auto& [key, value] : bad) {
    absl::StatusOr<SharingSettings> s =
        Parse(absl::StrCat("sharing: {kek_env: K, ", key, ": ", value, "}\n"));
    ASSERT_FALSE(s.ok()) << key << "=" << value;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(s.status().message().find(absl::StrCat("sharing.", key)), std::string::npos)
        << s.status();
  }
}

TEST(SharingSettingsTest, AnUnknownKeyIsRefused) {
  absl::StatusOr<SharingSettings> s = Parse("sharing: {kek_env: K, max_downloads: 2}\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("max_downloads"), std::string::npos) << s.status();
}


// Content arriving as late as the idle timeout allows after the writer's last statement is kept
// alive before the shard's bound ends the session, whatever the timeout (the default 30 s, the
// tests' 1 s, the most the configuration allows).
TEST(SharingSettingsTest, AnUploadsKeepaliveComesBeforeTheShardsIdleBound) {
  for (absl::Duration idle : {absl::Seconds(1), absl::Seconds(30), absl::Seconds(3600)}) {
    const absl::Duration turn = UploadKeepaliveTurn(idle);
    EXPECT_GT(turn, absl::ZeroDuration()) << idle;
    EXPECT_LT(idle + turn, UploadTransactionIdleBound(idle)) << idle;
    EXPECT_GT(UploadTransactionIdleBound(idle), idle) << idle;
  }
}

}  // namespace
}  // namespace medgate::sharing
