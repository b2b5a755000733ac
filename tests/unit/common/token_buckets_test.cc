// Unit tests of the token buckets by key (ingest's tenant sample quota and read rate, the tenant
// call rate of every service).
#include <gtest/gtest.h>

#include "libs/common/token_buckets.h"

namespace medgate {
namespace {

TEST(TokenBucketsTest, AllowsTheBurstThenTheRatePerTenant) {
  TokenBuckets quota(/*rate=*/100, /*burst=*/200);
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
TEST(TokenBucketsTest, AnEarlierTimeNeitherRefillsNorDrainsTheBucket) {
  TokenBuckets quota(/*rate=*/100, /*burst=*/200);
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
TEST(TokenBucketsTest, ARefundRestoresExactlyWhatWasTaken) {
  TokenBuckets quota(/*rate=*/100, /*burst=*/200);
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

TEST(TokenBucketsTest, ARefundNeverGoesBeyondTheBurst) {
  TokenBuckets quota(/*rate=*/100, /*burst=*/200);
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

TEST(TokenBucketsTest, ARefundGoesToItsTenantOnly) {
  TokenBuckets quota(/*rate=*/100, /*burst=*/200);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
  EXPECT_EQ(quota.TryTake("globex", 200, t0), absl::ZeroDuration());
  quota.Refund("acme", 200);
  EXPECT_EQ(quota.TryTake("globex", 1, t0), absl::Milliseconds(10));
  EXPECT_EQ(quota.TryTake("acme", 200, t0), absl::ZeroDuration());
}

}  // namespace
}  // namespace medgate
