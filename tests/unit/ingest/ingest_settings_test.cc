// ParseIngestSettings: every `ingest` key reaches the setting it names, and a value outside its
// range is refused with the key's path in the message.
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "libs/common/config.h"
#include "services/ingest/ingest_server.h"

namespace medgate::ingest {
namespace {

absl::StatusOr<IngestSettings> Parse(const std::string& yaml) {
  MedgateConfig config;
  absl::StatusOr<ConfigNode> node = ConfigNode::Parse(yaml);
  if (!node.ok()) return node.status();
  config.root = *node;
  return ParseIngestSettings(config);
}

TEST(IngestSettingsTest, EveryKeySetsItsSetting) {
  absl::StatusOr<IngestSettings> s = Parse(
      "ingest:\n"
      "  tenant_samples_per_second: 1234\n"
      "  tenant_burst: 5678\n"
      "  max_sample_age_hours: 48\n"
      "  max_queued_batches: 99\n"
      "  max_queued_rows: 4321\n"
      "  max_rows_per_transaction: 777\n"
      "  linger_ms: 5\n"
      "  worker_threads: 3\n"
      "  max_waiting_batches: 11\n"
      "  writers_per_region: 2\n"
      "  enqueue_wait_ms: 250\n"
      "  stats_interval_ms: 2000\n"
      "  partition_check_minutes: 15\n"
      "  max_streams_per_device: 6\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->core.tenant_samples_per_second, 1234.0);
  EXPECT_EQ(s->core.tenant_burst, 5678.0);
  EXPECT_EQ(s->core.validation.max_age, absl::Hours(48));
  EXPECT_EQ(s->writer.max_queued_requests, 99u);
  EXPECT_EQ(s->writer.max_queued_rows, 4321u);
  EXPECT_EQ(s->writer.max_rows_per_transaction, 777u);
  EXPECT_EQ(s->writer.linger, absl::Milliseconds(5));
  EXPECT_EQ(s->worker_threads, 3);
  EXPECT_EQ(s->max_waiting_batches, 11u);
  EXPECT_EQ(s->writers_per_region, 2);
  EXPECT_EQ(s->core.enqueue_wait, absl::Milliseconds(250));
  EXPECT_EQ(s->writer.stats_interval, absl::Seconds(2));
  EXPECT_EQ(s->partition_check, absl::Minutes(15));
  EXPECT_EQ(s->max_streams_per_device, 6);
}

TEST(IngestSettingsTest, DefaultsWithoutTheSection) {
  absl::StatusOr<IngestSettings> s = Parse("other: {}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  const IngestSettings defaults;
  EXPECT_EQ(s->writers_per_region, defaults.writers_per_region);
  EXPECT_EQ(s->max_streams_per_device, 4);
  EXPECT_EQ(s->writer.max_rows_per_transaction, 20000u);
  EXPECT_EQ(s->partition_check, absl::Minutes(60));
}

TEST(IngestSettingsTest, AValueOutOfRangeNamesItsKey) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"tenant_samples_per_second", "0"}, {"tenant_burst", "999"},
      {"max_sample_age_hours", "0"},      {"max_queued_batches", "0"},
      {"max_queued_rows", "0"},           {"max_rows_per_transaction", "0"},
      {"linger_ms", "1001"},              {"worker_threads", "0"},
      {"max_waiting_batches", "0"},       {"writers_per_region", "65"},
      {"enqueue_wait_ms", "0"},           {"stats_interval_ms", "99"},
      {"partition_check_minutes", "0"},   {"max_streams_per_device", "0"},
      {"max_streams_per_device", "1001"}, {"writers_per_region", "two"},
  };
  for (const auto& [key, value] : bad) {
    absl::StatusOr<IngestSettings> s = Parse(absl::StrCat("ingest: {", key, ": ", value, "}\n"));
    ASSERT_FALSE(s.ok()) << key << "=" << value;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(s.status().message().find(absl::StrCat("ingest.", key)), std::string::npos)
        << s.status();
  }
}

TEST(IngestSettingsTest, AnUnknownKeyIsRefused) {
  absl::StatusOr<IngestSettings> s = Parse("ingest: {writers: 2}\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("writers"), std::string::npos) << s.status();
}

}  // namespace
}  // namespace medgate::ingest
