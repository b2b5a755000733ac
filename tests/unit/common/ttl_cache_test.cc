// Tests TtlCache: expiry at the given time, LRU eviction at capacity, replacement, erasure and
// the refresh point.
#include "libs/common/ttl_cache.h"

#include <optional>
#include <string>
#include <utility>

#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace medgate {
namespace {

using ::testing::Eq;
using ::testing::Optional;

class TtlCacheTest : public ::testing::Test {
 protected:
  const absl::Time t0_ = absl::FromUnixSeconds(1700000000);
  TtlCache<std::string, int> cache_{3};
};

TEST_F(TtlCacheTest, MissingKeyIsAbsent) {
  EXPECT_EQ(cache_.Get("a", t0_), std::nullopt);
  EXPECT_EQ(cache_.size(), 0u);
}

TEST_F(TtlCacheTest, EntryLivesUntilItsTtl) {
  cache_.Put("a", 1, absl::Seconds(10), t0_);
  EXPECT_THAT(cache_.Get("a", t0_), Optional(Eq(1)));
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(10) - absl::Nanoseconds(1)), Optional(Eq(1)));
  EXPECT_EQ(cache_.Get("a", t0_ + absl::Seconds(10)), std::nullopt);
  EXPECT_EQ(cache_.size(), 0u);  // the expired entry was dropped by the lookup
}

// EraseExpired drops every expired entry, wherever recent use put it, and keeps the others
// reachable.
TEST_F(TtlCacheTest, EraseExpiredDropsOnlyExpiredEntries) {
  cache_.Put("old", 1, absl::Seconds(5), t0_);
  cache_.Put("new", 2, absl::Seconds(60), t0_);
  cache_.Put("used", 3, absl::Seconds(5), t0_);
  EXPECT_THAT(cache_.Get("used", t0_ + absl::Seconds(1)), Optional(Eq(3)));  // most recent now
  EXPECT_EQ(cache_.EraseExpired(t0_ + absl::Seconds(4)), 0u);
  EXPECT_EQ(cache_.EraseExpired(t0_ + absl::Seconds(5)), 2u);
  EXPECT_EQ(cache_.size(), 1u);
  EXPECT_THAT(cache_.Get("new", t0_ + absl::Seconds(6)), Optional(Eq(2)));
  cache_.Put("again", 4, absl::Seconds(5), t0_ + absl::Seconds(6));
  EXPECT_THAT(cache_.Get("again", t0_ + absl::Seconds(7)), Optional(Eq(4)));
}

TEST_F(TtlCacheTest, EntriesExpireIndependently) {
  cache_.Put("short", 1, absl::Seconds(1), t0_);
  cache_.Put("long", 2, absl::Seconds(60), t0_);
  const absl::Time later = t0_ + absl::Seconds(30);
  EXPECT_EQ(cache_.Get("short", later), std::nullopt);
  EXPECT_THAT(cache_.Get("long", later), Optional(Eq(2)));
}

TEST_F(TtlCacheTest, PutReplacesValueAndExpiry) {
  cache_.Put("a", 1, absl::Seconds(1), t0_);
  cache_.Put("a", 2, absl::Seconds(10), t0_);
  EXPECT_EQ(cache_.size(), 1u);
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(5)), Optional(Eq(2)));
}

TEST_F(TtlCacheTest, NonPositiveTtlStoresNothingAndDropsThePreviousValue) {
  cache_.Put("a", 1, absl::Seconds(10), t0_);
  cache_.Put("a", 2, absl::ZeroDuration(), t0_);
  EXPECT_EQ(cache_.Get("a", t0_), std::nullopt);
  cache_.Put("b", 3, -absl::Seconds(1), t0_);
  EXPECT_EQ(cache_.size(), 0u);
}

TEST_F(TtlCacheTest, InfiniteTtlNeverExpires) {
  cache_.Put("a", 1, absl::InfiniteDuration(), t0_);
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Hours(24 * 365 * 100)), Optional(Eq(1)));
}

TEST_F(TtlCacheTest, EvictsLeastRecentlyUsedAtCapacity) {
  cache_.Put("a", 1, absl::Hours(1), t0_);
  cache_.Put("b", 2, absl::Hours(1), t0_);
  cache_.Put("c", 3, absl::Hours(1), t0_);
  ASSERT_THAT(cache_.Get("a", t0_), Optional(Eq(1)));  // "b" is now the least recently used

  cache_.Put("d", 4, absl::Hours(1), t0_);
  EXPECT_EQ(cache_.size(), 3u);
  EXPECT_EQ(cache_.Get("b", t0_), std::nullopt);
  EXPECT_THAT(cache_.Get("a", t0_), Optional(Eq(1)));
  EXPECT_THAT(cache_.Get("c", t0_), Optional(Eq(3)));
  EXPECT_THAT(cache_.Get("d", t0_), Optional(Eq(4)));
}

TEST_F(TtlCacheTest, PutOfAnExistingKeyAtCapacityEvictsNothing) {
  cache_.Put("a", 1, absl::Hours(1), t0_);
  cache_.Put("b", 2, absl::Hours(1), t0_);
  cache_.Put("c", 3, absl::Hours(1), t0_);
  cache_.Put("a", 10, absl::Hours(1), t0_);  // also makes "a" the most recently used
  EXPECT_EQ(cache_.size(), 3u);

  cache_.Put("d", 4, absl::Hours(1), t0_);  // evicts "b", the oldest untouched entry
  EXPECT_EQ(cache_.Get("b", t0_), std::nullopt);
  EXPECT_THAT(cache_.Get("a", t0_), Optional(Eq(10)));
  EXPECT_THAT(cache_.Get("c", t0_), Optional(Eq(3)));
}

TEST_F(TtlCacheTest, NeverHoldsMoreThanCapacity) {
  for (int i = 0; i < 100; ++i) {
    cache_.Put(std::to_string(i), i, absl::Hours(1), t0_);
    EXPECT_LE(cache_.size(), cache_.capacity());
  }
  EXPECT_THAT(cache_.Get("99", t0_), Optional(Eq(99)));
  EXPECT_EQ(cache_.Get("96", t0_), std::nullopt);
}

TEST_F(TtlCacheTest, ZeroCapacityStoresNothing) {
  TtlCache<std::string, int> cache(0);
  cache.Put("a", 1, absl::Hours(1), t0_);
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(cache.Get("a", t0_), std::nullopt);
}

TEST_F(TtlCacheTest, EraseRemovesOnlyThatKey) {
  cache_.Put("a", 1, absl::Hours(1), t0_);
  cache_.Put("b", 2, absl::Hours(1), t0_);
  EXPECT_TRUE(cache_.Erase("a"));
  EXPECT_FALSE(cache_.Erase("a"));
  EXPECT_FALSE(cache_.Erase("never"));
  EXPECT_EQ(cache_.Get("a", t0_), std::nullopt);
  EXPECT_THAT(cache_.Get("b", t0_), Optional(Eq(2)));
  EXPECT_EQ(cache_.size(), 1u);
}

TEST_F(TtlCacheTest, ErasedSlotIsReusedWithoutEvicting) {
  cache_.Put("a", 1, absl::Hours(1), t0_);
  cache_.Put("b", 2, absl::Hours(1), t0_);
  cache_.Put("c", 3, absl::Hours(1), t0_);
  cache_.Erase("b");
  cache_.Put("d", 4, absl::Hours(1), t0_);
  EXPECT_THAT(cache_.Get("a", t0_), Optional(Eq(1)));
  EXPECT_THAT(cache_.Get("c", t0_), Optional(Eq(3)));
  EXPECT_THAT(cache_.Get("d", t0_), Optional(Eq(4)));
}

TEST_F(TtlCacheTest, ClearEmptiesTheCache) {
  cache_.Put("a", 1, absl::Hours(1), t0_);
  cache_.Put("b", 2, absl::Hours(1), t0_);
  cache_.Clear();
  EXPECT_EQ(cache_.size(), 0u);
  EXPECT_EQ(cache_.Get("a", t0_), std::nullopt);
  cache_.Put("c", 3, absl::Hours(1), t0_);
  EXPECT_THAT(cache_.Get("c", t0_), Optional(Eq(3)));
}

TEST_F(TtlCacheTest, AHitFromTheRefreshPointOnIsReportedDueOnce) {
  cache_.Put("a", 1, absl::Seconds(10), t0_, /*refresh_after=*/absl::Seconds(5));
  bool due = true;
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(5) - absl::Nanoseconds(1), &due),
              Optional(Eq(1)));
  EXPECT_FALSE(due);
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(5), &due), Optional(Eq(1)));
  EXPECT_TRUE(due);
  // Reported once: the caller's refresh is already on its way.
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(6), &due), Optional(Eq(1)));
  EXPECT_FALSE(due);
  // The refresh point never keeps an entry past its expiry.
  EXPECT_EQ(cache_.Get("a", t0_ + absl::Seconds(10), &due), std::nullopt);
  EXPECT_FALSE(due);
}

TEST_F(TtlCacheTest, ARefreshedEntryHasANewRefreshPoint) {
  cache_.Put("a", 1, absl::Seconds(10), t0_, absl::Seconds(5));
  bool due = false;
  cache_.Get("a", t0_ + absl::Seconds(6), &due);
  ASSERT_TRUE(due);
  cache_.Put("a", 2, absl::Seconds(10), t0_ + absl::Seconds(6), absl::Seconds(5));
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(10), &due), Optional(Eq(2)));
  EXPECT_FALSE(due);
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(11), &due), Optional(Eq(2)));
  EXPECT_TRUE(due);
}

TEST_F(TtlCacheTest, WithoutARefreshPointNothingIsEverDue) {
  cache_.Put("a", 1, absl::Seconds(10), t0_);
  bool due = true;
  EXPECT_THAT(cache_.Get("a", t0_ + absl::Seconds(10) - absl::Nanoseconds(1), &due),
              Optional(Eq(1)));
  EXPECT_FALSE(due);
  EXPECT_EQ(cache_.Get("b", t0_, &due), std::nullopt);
  EXPECT_FALSE(due);
}

TEST_F(TtlCacheTest, PairKeysAreDistinctPerComponent) {
  TtlCache<std::pair<std::string, std::string>, int> cache(10);
  cache.Put({"tenant-a", "dev-1"}, 1, absl::Hours(1), t0_);
  cache.Put({"tenant-b", "dev-1"}, 2, absl::Hours(1), t0_);
  EXPECT_THAT(cache.Get({"tenant-a", "dev-1"}, t0_), Optional(Eq(1)));
  EXPECT_THAT(cache.Get({"tenant-b", "dev-1"}, t0_), Optional(Eq(2)));
  EXPECT_EQ(cache.Get({"tenant-c", "dev-1"}, t0_), std::nullopt);
}

}  // namespace
}  // namespace medgate
