// Unit tests of the per-tenant sample quota (a token bucket).
#include <gtest/gtest.h>

#include "services/ingest/ingest_core.h"

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

}  // namespace
}  // namespace medgate::ingest
