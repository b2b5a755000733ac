// The access decision as a pure function: default deny, actor narrowing, periods, revocation.
#include "libs/consent_client/consent_decision.h"

#include <algorithm>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/support/fuzz.h"

namespace medgate::consent {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1700000000);
constexpr char kPractitioner[] = "spiffe://medgate.test/tenant/acme/practitioner/p-1";
constexpr char kOtherPractitioner[] = "spiffe://medgate.test/tenant/acme/practitioner/p-2";
constexpr char kApp[] = "spiffe://medgate.test/tenant/acme/app/backend";
constexpr char kDevice[] = "spiffe://medgate.test/tenant/acme/device/dev-1";
constexpr char kGlobexPractitioner[] = "spiffe://medgate.test/tenant/globex/practitioner/p-1";

ConsentRecord Granted(std::string id, Purpose purpose, std::string actor = "") {
  ConsentRecord r;
  r.consent_id = std::move(id);
  r.tenant_id = "acme";
  r.purpose = purpose;
  r.actor = std::move(actor);
  r.version = 1;
  r.valid_from = kNow - absl::Hours(1);
  return r;
}

class DecideTest : public ::testing::Test {};

TEST_F(DecideTest, ANarrowedConsentPermitsOnlyItsCategories) {
  ConsentRecord monitoring = Granted("m", Purpose::kRemoteMonitoring);
  monitoring.categories = {"blood-glucose", "heart-rate"};
  const std::vector<ConsentRecord> consents = {monitoring};
  for (const char* category : {"heart-rate", "blood-glucose"}) {
    AccessDecision d = Decide(consents, Purpose::kRemoteMonitoring, kDevice, category, kNow);
    EXPECT_TRUE(d.permit) << category;
    EXPECT_EQ(d.consent_id, "m");
  }
  for (const char* category : {"oxygen-saturation", ""}) {
    AccessDecision d = Decide(consents, Purpose::kRemoteMonitoring, kDevice, category, kNow);
    EXPECT_FALSE(d.permit) << category;
    EXPECT_EQ(d.reason, AccessReason::kCategoryNotCovered) << category;
    EXPECT_EQ(d.consent_id, "m");  // the deny cites the consent that is narrowed
  }
  // A revoked narrowed consent is refused as revoked, whatever the category.
  ConsentRecord revoked = monitoring;
  revoked.revoked = true;
  EXPECT_EQ(Decide({revoked}, Purpose::kRemoteMonitoring, kDevice, "oxygen-saturation", kNow).reason,
            AccessReason::kRevoked);
  // Not narrowed: every category, and uses of none in particular.
  const ConsentRecord wide = Granted("w", Purpose::kRemoteMonitoring);
  EXPECT_TRUE(Decide({wide}, Purpose::kRemoteMonitoring, kDevice, "oxygen-saturation", kNow).permit);
  EXPECT_TRUE(Decide({wide}, Purpose::kRemoteMonitoring, kDevice, "", kNow).permit);
}

TEST_F(DecideTest, AnActorsNarrowedConsentFallsBackToTheTenantsForOtherCategories) {
  ConsentRecord mine = Granted("mine", Purpose::kCare, kPractitioner);
  mine.categories = {"imaging"};
  ConsentRecord tenant = Granted("tenant", Purpose::kCare);
  tenant.categories = {"document"};
  const std::vector<ConsentRecord> consents = {mine, tenant};
  EXPECT_EQ(Decide(consents, Purpose::kCare, kPractitioner, "imaging", kNow).consent_id, "mine");
  AccessDecision d = Decide(consents, Purpose::kCare, kPractitioner, "document", kNow);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.consent_id, "tenant");
  d = Decide(consents, Purpose::kCare, kPractitioner, "report", kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kCategoryNotCovered);
  EXPECT_EQ(d.consent_id, "mine");  // the most specific
}

TEST_F(DecideTest, GrantsNameKnownCategoriesOnce) {
  auto sorted = ValidateCategories({"heart-rate", "blood-glucose"}, "categories");
  ASSERT_TRUE(sorted.ok()) << sorted.status();
  EXPECT_EQ(*sorted, (std::vector<std::string>{"blood-glucose", "heart-rate"}));
  EXPECT_TRUE(ValidateCategories({}, "categories").ok());
  auto unknown = ValidateCategories({"heart-rate", "mood"}, "categories");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("'mood' is not a data category"), std::string::npos)
      << unknown.status();
  auto twice = ValidateCategories({"imaging", "report", "imaging"}, "categories");
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(twice.status().message().find("'imaging' is given twice"), std::string::npos)
      << twice.status();
  EXPECT_EQ(DataCategories().size(), 10u);
  EXPECT_EQ(std::vector<absl::string_view>(RecordCategories().begin(), RecordCategories().end()),
            (std::vector<absl::string_view>{"document", "imaging", "report"}));
  for (absl::string_view c : DataCategories()) EXPECT_TRUE(IsDataCategory(c)) << c;
  EXPECT_FALSE(IsDataCategory(""));
}

TEST_F(DecideTest, DeniesWithNoConsentByDefault) {
  AccessDecision d = Decide({}, Purpose::kCare, kPractitioner, "", kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kNoConsent);
  EXPECT_EQ(d.consent_id, "");
  EXPECT_EQ(d.consent_version, 0);
  // A consent for another purpose does not count.
  std::vector<ConsentRecord> other = {Granted("c1", Purpose::kResearch)};
  EXPECT_EQ(Decide(other, Purpose::kCare, kPractitioner, "", kNow).reason, AccessReason::kNoConsent);
}

TEST_F(DecideTest, TenantWideConsentCoversEveryIdentityOfTheTenant) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kRemoteMonitoring)};
  for (const char* actor : {kPractitioner, kApp, kDevice}) {
    AccessDecision d = Decide(consents, Purpose::kRemoteMonitoring, actor, "", kNow);
    EXPECT_TRUE(d.permit) << actor;
    EXPECT_EQ(d.reason, AccessReason::kPermitted) << actor;
    EXPECT_EQ(d.consent_id, "c1");
    EXPECT_EQ(d.consent_version, 1);
    EXPECT_EQ(d.valid_until, absl::InfiniteFuture());
  }
}

TEST_F(DecideTest, OtherTenantsActorIsNotCovered) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kCare)};
  AccessDecision d = Decide(consents, Purpose::kCare, kGlobexPractitioner, "", kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kActorNotCovered);
  // Nor are identities that are not a tenant's practitioner, app or device.
  for (const char* actor :
       {"spiffe://medgate.test/service/ingest", "spiffe://medgate.test/ops/alice",
        "not a spiffe id", "spiffe://medgate.test/tenant/acme/robot/x", ""}) {
    EXPECT_EQ(Decide(consents, Purpose::kCare, actor, "", kNow).reason, AccessReason::kActorNotCovered)
        << actor;
  }
}

TEST_F(DecideTest, NarrowedConsentCoversOnlyItsActor) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kResearch, kPractitioner)};
  EXPECT_TRUE(Decide(consents, Purpose::kResearch, kPractitioner, "", kNow).permit);
  for (const char* actor : {kOtherPractitioner, kApp, kDevice, "", kGlobexPractitioner}) {
    AccessDecision d = Decide(consents, Purpose::kResearch, actor, "", kNow);
    EXPECT_FALSE(d.permit) << actor;
    EXPECT_EQ(d.reason, AccessReason::kActorNotCovered) << actor;
    EXPECT_EQ(d.consent_id, "") << actor;
  }
}

TEST_F(DecideTest, NarrowedConsentWinsAndTenantWideIsTheFallback) {
  ConsentRecord narrowed = Granted("narrow", Purpose::kCare, kPractitioner);
  narrowed.version = 3;
  ConsentRecord wide = Granted("wide", Purpose::kCare);
  std::vector<ConsentRecord> consents = {wide, narrowed};
  EXPECT_EQ(Decide(consents, Purpose::kCare, kPractitioner, "", kNow).consent_id, "narrow");
  EXPECT_EQ(Decide(consents, Purpose::kCare, kApp, "", kNow).consent_id, "wide");

  // The narrowed one revoked: the tenant-wide one still permits.
  consents[1].revoked = true;
  AccessDecision d = Decide(consents, Purpose::kCare, kPractitioner, "", kNow);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.consent_id, "wide");

  // Both denying: the most specific one explains why.
  consents[0].valid_until = kNow - absl::Minutes(1);
  d = Decide(consents, Purpose::kCare, kPractitioner, "", kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kRevoked);
  EXPECT_EQ(d.consent_id, "narrow");
  EXPECT_EQ(d.consent_version, 3);
  d = Decide(consents, Purpose::kCare, kApp, "", kNow);
  EXPECT_EQ(d.reason, AccessReason::kExpired);
  EXPECT_EQ(d.consent_id, "wide");
}

TEST_F(DecideTest, RevokedConsentDeniesCitingTheRevokedVersion) {
  ConsentRecord r = Granted("c1", Purpose::kGeolocation);
  r.version = 2;
  r.revoked = true;
  AccessDecision d = Decide({r}, Purpose::kGeolocation, kDevice, "", kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kRevoked);
  EXPECT_EQ(d.consent_id, "c1");
  EXPECT_EQ(d.consent_version, 2);
  EXPECT_EQ(d.valid_until, absl::InfiniteFuture());
}

TEST_F(DecideTest, PeriodIsHalfOpenAndChecked) {
  ConsentRecord r = Granted("c1", Purpose::kCare);
  r.valid_from = kNow + absl::Hours(1);
  r.valid_until = kNow + absl::Hours(2);
  AccessDecision d = Decide({r}, Purpose::kCare, kApp, "", kNow);
  EXPECT_EQ(d.reason, AccessReason::kNotYetValid);
  EXPECT_EQ(d.valid_until, r.valid_from);
  d = Decide({r}, Purpose::kCare, kApp, "", r.valid_from);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.valid_until, r.valid_until);
  EXPECT_TRUE(Decide({r}, Purpose::kCare, kApp, "", r.valid_until - absl::Microseconds(1)).permit);
  d = Decide({r}, Purpose::kCare, kApp, "", r.valid_until);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kExpired);
  EXPECT_EQ(d.consent_id, "c1");
  EXPECT_EQ(d.valid_until, absl::InfiniteFuture());
}

TEST_F(DecideTest, ValidUntilIsTheEarliestChangeOfAnyCoveringConsent) {
  ConsentRecord wide = Granted("wide", Purpose::kCare);
  wide.valid_until = kNow + absl::Hours(5);
  ConsentRecord narrowed = Granted("narrow", Purpose::kCare, kPractitioner);
  narrowed.valid_from = kNow + absl::Hours(2);
  AccessDecision d = Decide({wide, narrowed}, Purpose::kCare, kPractitioner, "", kNow);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.consent_id, "wide");
  EXPECT_EQ(d.valid_until, kNow + absl::Hours(2));
}

TEST_F(DecideTest, StatusAtFollowsTheLatestVersion) {
  ConsentRecord r = Granted("c1", Purpose::kCare);
  r.valid_until = kNow + absl::Seconds(1);
  EXPECT_EQ(StatusAt(r, kNow), ConsentStatus::kGranted);
  EXPECT_EQ(StatusAt(r, kNow + absl::Seconds(1)), ConsentStatus::kExpired);
  EXPECT_EQ(StatusAt(r, kNow - absl::Hours(2)), ConsentStatus::kNotYetValid);
  r.revoked = true;
  EXPECT_EQ(StatusAt(r, kNow), ConsentStatus::kRevoked);
}

TEST_F(DecideTest, TenantOfActorParsesTenantIdentitiesOnly) {
  EXPECT_EQ(TenantOfActor(kPractitioner), "acme");
  EXPECT_EQ(TenantOfActor(kDevice), "acme");
  EXPECT_EQ(TenantOfActor(kGlobexPractitioner), "globex");
  for (const char* actor :
       {"", "acme", "spiffe://medgate.test/service/ingest",
        "spiffe://medgate.test/tenant/acme/robot/x", "spiffe://medgate.test/tenant//app/x",
        "spiffe://medgate.test/tenant/acme/app/", "spiffe://medgate.test/tenant/acme/app/x/y",
        "https://x/tenant/a/app/b", "spiffe:///tenant/acme/app/x"}) {
    EXPECT_EQ(TenantOfActor(actor), "") << actor;
  }
}

TEST_F(DecideTest, PurposesRoundTripByNameAndNumber) {
  for (int n = 1; n <= 5; ++n) {
    std::optional<Purpose> p = PurposeFromNumber(n);
    ASSERT_TRUE(p.has_value()) << n;
    EXPECT_EQ(PurposeFromName(PurposeName(*p)), p);
  }
  EXPECT_EQ(PurposeName(Purpose::kRemoteMonitoring), "REMOTE_MONITORING");
  EXPECT_FALSE(PurposeFromNumber(0).has_value());
  EXPECT_FALSE(PurposeFromNumber(6).has_value());
  EXPECT_FALSE(PurposeFromName("COMMERCIAL").has_value());
  EXPECT_EQ(AccessReasonName(AccessReason::kActorNotCovered), "ACTOR_NOT_COVERED");
}

// Random consent sets (narrowed or tenant-wide, revoked or not, periods before, around or after
// now, for several purposes, of the patient's tenant), asked for a random actor (narrowed one,
// another of the tenant, another tenant's, a malformed id, the tenant as a whole) at a random
// time. A decision permits exactly when a consent covering the actor is granted and within its
// period then; and it holds unchanged at every time before its valid_until, which caches rely
// on to reuse it. Seeded (MEDGATE_FUZZ_SEED, MEDGATE_FUZZ_ROUNDS).
TEST_F(DecideTest, RandomConsentsPermitExactlyWhenCoveredAndHoldUntilValidUntil) {
  const char* const actors[] = {kPractitioner, kOtherPractitioner, kApp, kDevice,
                                kGlobexPractitioner, "", "spiffe://medgate.test/tenant/acme"};
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(3000);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    auto at = [&](int64_t hours) { return kNow + absl::Hours(hours); };
    std::vector<ConsentRecord> consents;
    // At most one consent per (purpose, actor), as the shard keeps them.
    for (Purpose p : {Purpose::kCare, Purpose::kRemoteMonitoring, Purpose::kResearch}) {
      for (const char* narrowed : {"", kPractitioner, kApp, kDevice}) {
        if (testing::Uniform(rng, 0, 2) != 0) continue;
        ConsentRecord r = Granted(absl::StrCat("c-", consents.size()), p, narrowed);
        r.version = static_cast<int64_t>(testing::Uniform(rng, 1, 5));
        r.revoked = testing::Uniform(rng, 0, 4) == 0;
        const uint64_t from = testing::Uniform(rng, 0, 3);
        r.valid_from = from == 0 ? absl::InfinitePast() : at(static_cast<int64_t>(from) * 10 - 20);
        const uint64_t until = testing::Uniform(rng, 0, 3);
        const int64_t length = static_cast<int64_t>(until) * 10;
        r.valid_until = until == 0                              ? absl::InfiniteFuture()
                        : r.valid_from == absl::InfinitePast() ? at(length - 15)
                                                               : r.valid_from + absl::Hours(length);
        // Narrowed to some of three categories half the time (empty: every category).
        if (testing::Uniform(rng, 0, 1) == 0) {
          for (const char* category : {"blood-glucose", "heart-rate", "imaging"}) {
            if (testing::Uniform(rng, 0, 1) == 0) r.categories.push_back(category);
          }
        }
        consents.push_back(r);
      }
    }
    const Purpose purpose = testing::Uniform(rng, 0, 1) == 0 ? Purpose::kCare
                                                             : Purpose::kRemoteMonitoring;
    const std::string actor = actors[testing::Uniform(rng, 0, 6)];
    const char* const categories[] = {"", "heart-rate", "blood-glucose", "imaging", "document"};
    const std::string category = categories[testing::Uniform(rng, 0, 4)];
    const absl::Time now = at(static_cast<int64_t>(testing::Uniform(rng, 0, 60)) - 30) +
                           absl::Minutes(static_cast<int64_t>(testing::Uniform(rng, 0, 59)));
    const AccessDecision d = Decide(consents, purpose, actor, category, now);

    bool covered_and_granted = false;
    bool granted_elsewhere = false;  // granted and covering the actor, but not the category
    for (const ConsentRecord& c : consents) {
      const bool covers =
          c.purpose == purpose &&
          (c.actor.empty() ? TenantOfActor(actor) == "acme" : c.actor == actor);
      const bool of_its_categories =
          c.categories.empty() ||
          (!category.empty() &&
           std::find(c.categories.begin(), c.categories.end(), category) != c.categories.end());
      if (covers && StatusAt(c, now) == ConsentStatus::kGranted) {
        if (of_its_categories) {
          covered_and_granted = true;
        } else {
          granted_elsewhere = true;
        }
      }
    }
    EXPECT_EQ(d.permit, covered_and_granted);
    // A deny whose most specific consent is granted is a deny for the category.
    if (!d.permit && d.reason == AccessReason::kCategoryNotCovered) {
      EXPECT_TRUE(granted_elsewhere);
    }
    EXPECT_EQ(d.permit, d.reason == AccessReason::kPermitted);
    EXPECT_GT(d.valid_until, now);
    // The same decision at any time before valid_until (checked at a few of them).
    for (int probe = 0; probe < 4; ++probe) {
      const absl::Time later =
          d.valid_until == absl::InfiniteFuture()
              ? now + absl::Hours(static_cast<int64_t>(testing::Uniform(rng, 0, 100)))
              : now + (d.valid_until - now) *
                          (static_cast<double>(testing::Uniform(rng, 0, 999)) / 1000);
      const AccessDecision again = Decide(consents, purpose, actor, category, later);
      EXPECT_EQ(again.permit, d.permit) << "at +" << (later - now);
      EXPECT_EQ(again.reason, d.reason) << "at +" << (later - now);
      EXPECT_EQ(again.consent_id, d.consent_id) << "at +" << (later - now);
    }
    if (HasFailure()) break;
  }
}

}  // namespace
}  // namespace medgate::consent
