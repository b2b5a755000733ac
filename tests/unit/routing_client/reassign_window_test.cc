// Unit tests of the device reassignment window check across routing's and ingest's settings.
#include "libs/routing_client/reassign_window.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<MedgateConfig> Config(const std::string& services, const std::string& extra) {
  std::string yaml = absl::StrCat(
      "trust_domain: medgate.test\nca: /pki/ca.crt\n"
      "control_db:\n  conninfo: host=127.0.0.1 port=5432\n"
      "regions:\n  - id: fr-1\n    territories: [FR]\n    db: {conninfo: \"host=127.0.0.1\"}\n"
      "services:\n");
  for (const std::string name : {"routing", "ingest"}) {
    if (services.find(name) == std::string::npos) continue;
    absl::StrAppend(&yaml, "  ", name, ":\n    listen: 127.0.0.1:0\n    tls: {cert: /pki/s.crt, ",
                    "key: /pki/s.key}\n");
  }
  absl::StrAppend(&yaml, extra);
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(yaml);
  if (!root.ok()) return root.status();
  return ParseMedgateConfig(*root);
}

TEST(ReassignWindowTest, DefaultsKeepTheWaitAboveTheTtl) {
  absl::StatusOr<MedgateConfig> config = Config("routing ingest", "");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(*DeviceCacheTtlSeconds(*config), kDefaultDeviceCacheTtlSeconds);
  EXPECT_EQ(*DeviceReassignWaitSeconds(*config), kDefaultDeviceReassignWaitSeconds);
  EXPECT_GT(kDefaultDeviceReassignWaitSeconds, kDefaultDeviceCacheTtlSeconds);
  EXPECT_TRUE(CheckDeviceReassignWindow(*config).ok());
}

TEST(ReassignWindowTest, RefusesAWaitNotAboveTheTtl) {
  for (const std::string extra :
       {"routing: {device_reassign_wait_seconds: 30}\n",
        "ingest: {device_cache_ttl_seconds: 60}\n",
        "routing: {device_reassign_wait_seconds: 5}\ningest: {device_cache_ttl_seconds: 5}\n"}) {
    absl::StatusOr<MedgateConfig> config = Config("routing ingest", extra);
    ASSERT_TRUE(config.ok()) << config.status();
    absl::Status status = CheckDeviceReassignWindow(*config);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << extra;
    EXPECT_THAT(status.message(), HasSubstr("routing.device_reassign_wait_seconds")) << extra;
    EXPECT_THAT(status.message(), HasSubstr("ingest.device_cache_ttl_seconds")) << extra;
  }
  absl::StatusOr<MedgateConfig> fine =
      Config("routing ingest",
             "routing: {device_reassign_wait_seconds: 6}\ningest: {device_cache_ttl_seconds: 5}\n");
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_TRUE(CheckDeviceReassignWindow(*fine).ok());
}

// A file that runs only one of the two services says nothing about the other's setting.
TEST(ReassignWindowTest, ChecksOnlyAConfigRunningBothServices) {
  absl::StatusOr<MedgateConfig> config =
      Config("routing", "routing: {device_reassign_wait_seconds: 1}\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(CheckDeviceReassignWindow(*config).ok());
  EXPECT_EQ(*DeviceReassignWaitSeconds(*config), 1);
}

TEST(ReassignWindowTest, OutOfRangeSettingsNameTheKey) {
  absl::StatusOr<MedgateConfig> config =
      Config("routing ingest", "ingest: {device_cache_ttl_seconds: 0}\n");
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<int64_t> ttl = DeviceCacheTtlSeconds(*config);
  EXPECT_EQ(ttl.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ttl.status().message(), HasSubstr("device_cache_ttl_seconds"));
}

}  // namespace
}  // namespace medgate
