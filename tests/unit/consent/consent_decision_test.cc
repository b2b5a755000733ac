// The access decision as a pure function: default deny, actor narrowing, periods, revocation.
#include "libs/consent_client/consent_decision.h"

#include <vector>

#include <gtest/gtest.h>

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

TEST_F(DecideTest, DeniesWithNoConsentByDefault) {
  AccessDecision d = Decide({}, Purpose::kCare, kPractitioner, kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kNoConsent);
  EXPECT_EQ(d.consent_id, "");
  EXPECT_EQ(d.consent_version, 0);
  // A consent for another purpose does not count.
  std::vector<ConsentRecord> other = {Granted("c1", Purpose::kResearch)};
  EXPECT_EQ(Decide(other, Purpose::kCare, kPractitioner, kNow).reason, AccessReason::kNoConsent);
}

TEST_F(DecideTest, TenantWideConsentCoversEveryIdentityOfTheTenant) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kRemoteMonitoring)};
  for (const char* actor : {kPractitioner, kApp, kDevice, ""}) {
    AccessDecision d = Decide(consents, Purpose::kRemoteMonitoring, actor, kNow);
    EXPECT_TRUE(d.permit) << actor;
    EXPECT_EQ(d.reason, AccessReason::kPermitted) << actor;
    EXPECT_EQ(d.consent_id, "c1");
    EXPECT_EQ(d.consent_version, 1);
    EXPECT_EQ(d.valid_until, absl::InfiniteFuture());
  }
}

TEST_F(DecideTest, OtherTenantsActorIsNotCovered) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kCare)};
  AccessDecision d = Decide(consents, Purpose::kCare, kGlobexPractitioner, kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kActorNotCovered);
  // Nor are identities that are not a tenant's practitioner, app or device.
  for (const char* actor :
       {"spiffe://medgate.test/service/ingest", "spiffe://medgate.test/ops/alice",
        "not a spiffe id", "spiffe://medgate.test/tenant/acme/robot/x"}) {
    EXPECT_EQ(Decide(consents, Purpose::kCare, actor, kNow).reason, AccessReason::kActorNotCovered)
        << actor;
  }
}

TEST_F(DecideTest, NarrowedConsentCoversOnlyItsActor) {
  std::vector<ConsentRecord> consents = {Granted("c1", Purpose::kResearch, kPractitioner)};
  EXPECT_TRUE(Decide(consents, Purpose::kResearch, kPractitioner, kNow).permit);
  for (const char* actor : {kOtherPractitioner, kApp, kDevice, "", kGlobexPractitioner}) {
    AccessDecision d = Decide(consents, Purpose::kResearch, actor, kNow);
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
  EXPECT_EQ(Decide(consents, Purpose::kCare, kPractitioner, kNow).consent_id, "narrow");
  EXPECT_EQ(Decide(consents, Purpose::kCare, kApp, kNow).consent_id, "wide");

  // The narrowed one revoked: the tenant-wide one still permits.
  consents[1].revoked = true;
  AccessDecision d = Decide(consents, Purpose::kCare, kPractitioner, kNow);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.consent_id, "wide");

  // Both denying: the most specific one explains why.
  consents[0].valid_until = kNow - absl::Minutes(1);
  d = Decide(consents, Purpose::kCare, kPractitioner, kNow);
  EXPECT_FALSE(d.permit);
  EXPECT_EQ(d.reason, AccessReason::kRevoked);
  EXPECT_EQ(d.consent_id, "narrow");
  EXPECT_EQ(d.consent_version, 3);
  d = Decide(consents, Purpose::kCare, kApp, kNow);
  EXPECT_EQ(d.reason, AccessReason::kExpired);
  EXPECT_EQ(d.consent_id, "wide");
}

TEST_F(DecideTest, RevokedConsentDeniesCitingTheRevokedVersion) {
  ConsentRecord r = Granted("c1", Purpose::kGeolocation);
  r.version = 2;
  r.revoked = true;
  AccessDecision d = Decide({r}, Purpose::kGeolocation, kDevice, kNow);
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
  AccessDecision d = Decide({r}, Purpose::kCare, kApp, kNow);
  EXPECT_EQ(d.reason, AccessReason::kNotYetValid);
  EXPECT_EQ(d.valid_until, r.valid_from);
  d = Decide({r}, Purpose::kCare, kApp, r.valid_from);
  EXPECT_TRUE(d.permit);
  EXPECT_EQ(d.valid_until, r.valid_until);
  EXPECT_TRUE(Decide({r}, Purpose::kCare, kApp, r.valid_until - absl::Microseconds(1)).permit);
  d = Decide({r}, Purpose::kCare, kApp, r.valid_until);
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
  AccessDecision d = Decide({wide, narrowed}, Purpose::kCare, kPractitioner, kNow);
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

}  // namespace
}  // namespace medgate::consent
