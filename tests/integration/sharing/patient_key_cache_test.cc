// The bounded cache of unwrapped patient keys: age and entry bounds, forgetting.
#include "services/sharing/patient_key_cache.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace medgate::sharing {
namespace {

PatientKey Key(const std::string& id) { return PatientKey{id, crypto::SecretKey::Random()}; }

TEST(PatientKeyCacheTest, KeysExpireAfterTheirMaxAge) {
  PatientKeyCache cache(10, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  cache.Put("pt_1", Key("k1"), t0, cache.generation());
  ASSERT_TRUE(cache.Get("pt_1", t0 + absl::Seconds(59)).has_value());
  EXPECT_EQ(cache.Get("pt_1", t0 + absl::Seconds(59))->key_id, "k1");
  // Using a key does not extend its life.
  cache.Put("pt_1", Key("k1"), t0 + absl::Seconds(30), cache.generation());
  EXPECT_FALSE(cache.Get("pt_1", t0 + absl::Seconds(60)).has_value());
  EXPECT_EQ(cache.size(), 0u);
}

// An expired key leaves memory even if its patient is never asked for again: DropExpired (which
// the server calls every 10 s) drops it, and only it.
TEST(PatientKeyCacheTest, ExpiredKeysAreDroppedWithoutBeingAskedFor) {
  PatientKeyCache cache(10, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  cache.Put("pt_1", Key("k1"), t0, cache.generation());
  cache.Put("pt_2", Key("k2"), t0 + absl::Seconds(30), cache.generation());
  EXPECT_EQ(cache.DropExpired(t0 + absl::Seconds(59)), 0u);
  EXPECT_EQ(cache.DropExpired(t0 + absl::Seconds(61)), 1u);
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_TRUE(cache.Get("pt_2", t0 + absl::Seconds(62)).has_value());
  EXPECT_EQ(cache.DropExpired(t0 + absl::Seconds(91)), 1u);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(PatientKeyCacheTest, ANewKeyReplacesTheOldOne) {
  PatientKeyCache cache(10, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  cache.Put("pt_1", Key("k1"), t0, cache.generation());
  cache.Put("pt_1", Key("k2"), t0 + absl::Seconds(1), cache.generation());
  EXPECT_EQ(cache.Get("pt_1", t0 + absl::Seconds(2))->key_id, "k2");
  cache.Forget("pt_1");
  EXPECT_FALSE(cache.Get("pt_1", t0 + absl::Seconds(2)).has_value());
}

TEST(PatientKeyCacheTest, HoldsAtMostMaxEntriesDroppingTheOldestFirst) {
  PatientKeyCache cache(3, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  for (int i = 0; i < 5; ++i) {
    cache.Put(absl::StrCat("pt_", i), Key(absl::StrCat("k", i)), t0 + absl::Seconds(i),
              cache.generation());
    EXPECT_LE(cache.size(), 3u);
  }
  const absl::Time now = t0 + absl::Seconds(5);
  EXPECT_FALSE(cache.Get("pt_0", now).has_value());
  EXPECT_FALSE(cache.Get("pt_1", now).has_value());
  for (int i = 2; i < 5; ++i) EXPECT_TRUE(cache.Get(absl::StrCat("pt_", i), now).has_value()) << i;
  PatientKeyCache none(0, absl::Seconds(60));
  none.Put("pt_1", Key("k1"), t0, none.generation());
  EXPECT_FALSE(none.Get("pt_1", t0).has_value());
}

// A key read before an erasure's Forget is not cached after it: the erasure may have retired it.
TEST(PatientKeyCacheTest, AKeyReadBeforeAForgetIsNotCachedAfterIt) {
  PatientKeyCache cache(10, absl::Seconds(60));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  const uint64_t read_at = cache.generation();
  cache.Forget("pt_1");
  cache.Put("pt_1", Key("retired"), t0, read_at);
  EXPECT_FALSE(cache.Get("pt_1", t0).has_value());
  cache.Put("pt_1", Key("current"), t0, cache.generation());
  ASSERT_TRUE(cache.Get("pt_1", t0).has_value());
  EXPECT_EQ(cache.Get("pt_1", t0)->key_id, "current");
}

}  // namespace
}  // namespace medgate::sharing
