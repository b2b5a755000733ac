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

absl::StatusOr<IngestSettings> Parse(const std::string& yaml, int max_concurrent_streams = 1000) {
  MedgateConfig config;
  config.limits.max_concurrent_streams = max_concurrent_streams;
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
      "  max_streams_per_device: 6\n"
      "  max_reads_per_tenant: 3\n"
      "  read_idle_timeout_seconds: 45\n"
      "  read_min_bytes_per_second: 2048\n"

      "  partition_lock_timeout_ms: 2500\n"
      "  max_batch_wait_ms: 4000\n");
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
  EXPECT_EQ(s->reads.max_per_tenant, 3);
  EXPECT_EQ(s->reads.idle_timeout, absl::Seconds(45));
  EXPECT_EQ(s->reads.min_bytes_per_second, 2048);
  EXPECT_EQ(s->partition_lock_timeout, absl::Milliseconds(2500));
  EXPECT_EQ(s->writer.max_batch_wait, absl::Seconds(4));
}

TEST(IngestSettingsTest, DefaultsWithoutTheSectionAndWithoutTheirKeys) {
  for (const std::string yaml : {"other: {}\n", "ingest: {linger_ms: 2}\n"}) {
    SCOPED_TRACE(yaml);
    absl::StatusOr<IngestSettings> s = Parse(yaml);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->writers_per_region, 4);
    EXPECT_EQ(s->worker_threads, 8);
    EXPECT_EQ(s->max_streams_per_device, 4);
    EXPECT_EQ(s->writer.max_rows_per_transaction, 20000u);
    EXPECT_EQ(s->partition_check, absl::Minutes(60));
    EXPECT_EQ(s->reads.max_per_tenant, 16);
    EXPECT_EQ(s->reads.idle_timeout, absl::Seconds(30));
    EXPECT_EQ(s->reads.min_bytes_per_second, 16 * 1024);
    EXPECT_EQ(s->partition_lock_timeout, absl::Seconds(1));
    EXPECT_EQ(s->writer.max_batch_wait, absl::Seconds(10));
  }
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
      {"max_reads_per_tenant", "0"},      {"read_idle_timeout_seconds", "0"},
      {"read_idle_timeout_seconds", "3601"}, {"partition_lock_timeout_ms", "99"},
      {"read_min_bytes_per_second", "0"}, {"read_min_bytes_per_second", "1073741825"},
      {"max_batch_wait_ms", "99"},        {"max_batch_wait_ms", "600001"},
  };
  for (const auto& [key, value] : bad) {
    absl::StatusOr<IngestSettings> s = Parse(absl::StrCat("ingest: {", key, ": ", value, "}\n"));
    ASSERT_FALSE(s.ok()) << key << "=" << value;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(s.status().message().find(absl::StrCat("ingest.", key)), std::string::npos)
        << s.status();
  }
}

// A burst smaller than the largest batch would refuse such a batch forever: the configuration
// says so instead of the devices finding out.
TEST(IngestSettingsTest, TheBurstMustHoldTheLargestBatch) {
  auto settings = [](const std::string& yaml) { return Parse(yaml); };
  absl::StatusOr<IngestSettings> small = settings("ingest: {tenant_burst: 999}\n");
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("tenant_burst"), std::string::npos) << small.status();
  absl::StatusOr<IngestSettings> enough =
      settings("ingest: {tenant_burst: 1000, stats_interval_ms: 1000}\n");
  ASSERT_TRUE(enough.ok()) << enough.status();
  EXPECT_EQ(enough->core.tenant_burst, 1000.0);
  EXPECT_EQ(enough->writer.stats_interval, absl::Seconds(1));
}

// The bound on batches waiting for a worker thread: four per stream a connection may carry unless
// set, and at least one.
TEST(IngestSettingsTest, MaxWaitingBatchesDefaultsFromTheStreamLimitAndIsAtLeastOne) {
  auto settings = [](const std::string& yaml) { return Parse(yaml, /*max_concurrent_streams=*/250); };
  absl::StatusOr<IngestSettings> none = settings("other: {}\n");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->max_waiting_batches, 1000u);
  absl::StatusOr<IngestSettings> unset = settings("ingest: {linger_ms: 0}\n");
  ASSERT_TRUE(unset.ok()) << unset.status();
  EXPECT_EQ(unset->max_waiting_batches, 1000u);
  absl::StatusOr<IngestSettings> set = settings("ingest: {max_waiting_batches: 7}\n");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->max_waiting_batches, 7u);
  absl::StatusOr<IngestSettings> zero = settings("ingest: {max_waiting_batches: 0}\n");
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find("max_waiting_batches"), std::string::npos) << zero.status();
}

TEST(IngestSettingsTest, AnUnknownKeyIsRefused) {
  absl::StatusOr<IngestSettings> s = Parse("ingest: {writers: 2}\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("writers"), std::string::npos) << s.status();
}

}  // namespace
}  // namespace medgate::ingest
