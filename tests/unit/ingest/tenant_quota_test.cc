// Unit tests of the per-tenant sample quota (a token bucket) and of its configuration.
#include <gtest/gtest.h>

#include "services/ingest/ingest_core.h"
#include "services/ingest/ingest_server.h"

namespace medgate::ingest {
namespace {

TEST(TenantQuotaTest, AllowsTheBurstThenTheRatePerTenant) {
  TenantQuota quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 150, t0), absl::ZeroDuration());
  // 50 tokens left: 100 more must wait half a second at 100/s.
  EXPECT_EQ(quota.TryTake("acme", 100, t0), absl::Milliseconds(500));
  // Another tenant has its own bucket.
  EXPECT_EQ(quota.TryTake("globex", 200, t0), absl::ZeroDuration());
  // After 0.5 s the bucket has refilled enough.
  EXPECT_EQ(quota.TryTake("acme", 100, t0 + absl::Milliseconds(500)), absl::ZeroDuration());
  // Refill never exceeds the burst.
  EXPECT_EQ(quota.TryTake("acme", 201, t0 + absl::Hours(1)), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 200, t0 + absl::Hours(1)), absl::ZeroDuration());
}

// Threads charge with times read a little apart: an earlier time than the last one adds no
// tokens and takes none away.
TEST(TenantQuotaTest, AnEarlierTimeNeitherRefillsNorDrainsTheBucket) {
  TenantQuota quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("acme", 50, t0 + absl::Seconds(1)), absl::ZeroDuration());  // 50 left
  // Half a second earlier than the last charge: still 50 tokens, neither 0 nor 100.
  EXPECT_EQ(quota.TryTake("acme", 51, t0 + absl::Milliseconds(500)), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 50, t0 + absl::Milliseconds(500)), absl::ZeroDuration());
  // Time moves on from the latest charge, not from the earlier one.
  EXPECT_EQ(quota.TryTake("acme", 100, t0 + absl::Seconds(2)), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("acme", 1, t0 + absl::Seconds(2)), absl::Milliseconds(10));
}

// Samples charged and then not stored are given back, so their resend is not refused for them.
TEST(TenantQuotaTest, ARefundRestoresExactlyWhatWasTaken) {
  TenantQuota quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
  quota.Refund("acme", 150);
  // 150 tokens back, not one more: 151 waits for one token at 100/s.
  EXPECT_EQ(quota.TryTake("acme", 151, t0), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 150, t0), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("acme", 1, t0), absl::Milliseconds(10));
  // A refund adds to the refill: 100 back plus half a second at 100/s.
  quota.Refund("acme", 100);
  EXPECT_EQ(quota.TryTake("acme", 151, t0 + absl::Milliseconds(500)), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 150, t0 + absl::Milliseconds(500)), absl::ZeroDuration());
}

TEST(TenantQuotaTest, ARefundNeverGoesBeyondTheBurst) {
  TenantQuota quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 50, t0), absl::ZeroDuration());
  quota.Refund("acme", 100);  // 150 + 100: the burst, 200
  EXPECT_EQ(quota.TryTake("acme", 201, t0), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("acme", 1, t0), absl::Milliseconds(10));
  // A refund to a tenant that took nothing yet leaves its bucket at the burst.
  quota.Refund("globex", 100);
  EXPECT_EQ(quota.TryTake("globex", 201, t0), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("globex", 200, t0), absl::ZeroDuration());
}

TEST(TenantQuotaTest, ARefundGoesToItsTenantOnly) {
  TenantQuota quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("globex", 200, t0), absl::ZeroDuration());
  quota.Refund("acme", 200);
  EXPECT_EQ(quota.TryTake("globex", 1, t0), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
}

// A burst smaller than the largest batch would refuse such a batch forever: the configuration
// says so instead of the devices finding out.
TEST(TenantQuotaTest, TheBurstMustHoldTheLargestBatch) {
  auto settings = [](const std::string& yaml) {
    MedgateConfig config;
    absl::StatusOr<ConfigNode> node = ConfigNode::Parse(yaml);
    EXPECT_TRUE(node.ok()) << node.status();
    if (node.ok()) config.root = *node;
    return ParseIngestSettings(config);
  };
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
  auto settings = [](const std::string& yaml) {
    MedgateConfig config;
    config.limits.max_concurrent_streams = 250;
    absl::StatusOr<ConfigNode> node = ConfigNode::Parse(yaml);
    EXPECT_TRUE(node.ok()) << node.status();
    if (node.ok()) config.root = *node;
    return ParseIngestSettings(config);
  };
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

}  // namespace
}  // namespace medgate::ingest
