// Unit tests of consents as FHIR R4 Consent resources.
#include "services/consent/fhir_consent.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <string>

namespace medgate::consent {
namespace {

using google::protobuf::Struct;

Struct Parse(const std::string& json) {
  Struct s;
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(json, &s).ok()) << json;
  return s;
}

VersionInfo Version(int64_t number, VersionState state) {
  VersionInfo v;
  v.version = number;
  v.state = state;
  v.valid_from = absl::FromUnixSeconds(1'800'000'000);
  v.evidence_ref = "form \"17\"";
  v.recorded_by = "spiffe://medgate.test/tenant/acme/app/backend";
  v.recorded_at = absl::FromUnixMicros(1'800'000'000'000'001);
  return v;
}

ConsentInfo Care(ConsentStatus status) {
  ConsentInfo c;
  c.consent_id = "cn_fr-1_0123";
  c.patient_id = "pt_3b0c";
  c.purpose = Purpose::kCare;
  c.status = status;
  c.history = {Version(1, VersionState::kGranted), Version(2, VersionState::kGranted)};
  c.current = c.history.back();
  return c;
}

// When the exports below are made: after every fixture's versions were recorded.
const absl::Time kNow = absl::FromUnixSeconds(1'900'000'000);

std::string Status(const std::string& json) {
  return Parse(json).fields().at("status").string_value();
}

TEST(FhirConsentTest, AVersionIsOneLineWithItsPeriodPurposeAndEvidence) {
  const ConsentInfo care = Care(ConsentStatus::kGranted);
  const std::string json = FhirConsentJson(care, care.history[0], kNow);
  EXPECT_EQ(json.find('\n'), std::string::npos);
  const Struct c = Parse(json);
  EXPECT_EQ(c.fields().at("resourceType").string_value(), "Consent");
  EXPECT_EQ(c.fields().at("meta").struct_value().fields().at("versionId").string_value(), "1");
  EXPECT_EQ(c.fields().at("meta").struct_value().fields().at("lastUpdated").string_value(),
            "2027-01-15T08:00:00.000001Z");
  EXPECT_EQ(c.fields().at("dateTime").string_value(), "2027-01-15T08:00:00.000001Z");
  EXPECT_EQ(c.fields()
                .at("sourceReference")
                .struct_value()
                .fields()
                .at("identifier")
                .struct_value()
                .fields()
                .at("value")
                .string_value(),
            "form \"17\"");
  // What FHIR R4 requires of a Consent: scope, a category, and policy or policyRule.
  EXPECT_EQ(c.fields().at("scope").struct_value().fields().at("coding").list_value().values(0)
                .struct_value().fields().at("code").string_value(),
            "patient-privacy");
  EXPECT_EQ(c.fields().at("category").list_value().values(0).struct_value().fields().at("coding")
                .list_value().values(0).struct_value().fields().at("code").string_value(),
            "59284-0");
  EXPECT_EQ(c.fields().at("policyRule").struct_value().fields().at("coding").list_value()
                .values(0).struct_value().fields().at("code").string_value(),
            "OPTIN");
  const Struct& provision = c.fields().at("provision").struct_value();
  EXPECT_EQ(provision.fields().at("type").string_value(), "permit");
  EXPECT_EQ(provision.fields().at("period").struct_value().fields().at("start").string_value(),
            "2027-01-15T08:00:00Z");
  EXPECT_FALSE(provision.fields().at("period").struct_value().fields().contains("end"));
  EXPECT_FALSE(provision.fields().contains("actor"));  // every practitioner and app of the tenant
  EXPECT_FALSE(provision.fields().contains("class"));  // every category
  EXPECT_EQ(provision.fields()
                .at("purpose")
                .list_value()
                .values(0)
                .struct_value()
                .fields()
                .at("code")
                .string_value(),
            "CARE");
}

TEST(FhirConsentTest, TheLatestVersionOfAnExpiredConsentIsInactiveItsEarlierOnesActive) {
  ConsentInfo expired = Care(ConsentStatus::kExpired);
  expired.history[1].valid_until = kNow - absl::Hours(1);
  expired.current = expired.history[1];
  EXPECT_EQ(Status(FhirConsentJson(expired, expired.history[0], kNow)), "active");
  EXPECT_EQ(Status(FhirConsentJson(expired, expired.history[1], kNow)), "inactive");
  // At its period's end exactly, it has expired (periods are half-open).
  EXPECT_EQ(Status(FhirConsentJson(expired, expired.history[1], kNow - absl::Hours(1))),
            "inactive");
  EXPECT_EQ(Status(FhirConsentJson(expired, expired.history[1], kNow - absl::Hours(2))),
            "active");
  const ConsentInfo granted = Care(ConsentStatus::kGranted);
  EXPECT_EQ(Status(FhirConsentJson(granted, granted.history[1], kNow)), "active");
  ConsentInfo revoked = Care(ConsentStatus::kRevoked);
  revoked.history.push_back(Version(3, VersionState::kRevoked));
  revoked.history.back().reason = "moved";
  revoked.current = revoked.history.back();
  EXPECT_EQ(Status(FhirConsentJson(revoked, revoked.history[1], kNow)), "active");
  const std::string last = FhirConsentJson(revoked, revoked.history[2], kNow);
  EXPECT_EQ(Status(last), "inactive");
  EXPECT_NE(last.find("\"url\":\"urn:medgate:fhir:revocation-reason\",\"valueString\":\"moved\""),
            std::string::npos)
      << last;
}

// A grant committed between the read of a consent's state and of its history is the history's
// last version: that one, not `current`, is the latest, and whether it has expired is its own
// period's. A consent read as expired and granted again meanwhile is exported active: the
// expired version was the last one read as `current`, not the last in the history.
TEST(FhirConsentTest, TheLatestVersionIsTheHistorysLast) {
  ConsentInfo regranted = Care(ConsentStatus::kExpired);
  regranted.history[0].valid_until = kNow - absl::Hours(1);
  regranted.current = regranted.history[0];  // read, expired, before version 2 was granted
  EXPECT_EQ(Status(FhirConsentJson(regranted, regranted.history[0], kNow)), "active");
  EXPECT_EQ(Status(FhirConsentJson(regranted, regranted.history[1], kNow)), "active");
  // Granted again, for a period that has ended too: inactive.
  regranted.history[1].valid_until = kNow - absl::Minutes(1);
  EXPECT_EQ(Status(FhirConsentJson(regranted, regranted.history[1], kNow)), "inactive");
}

TEST(FhirConsentTest, YearsHaveFourDigits) {
  ConsentInfo care = Care(ConsentStatus::kGranted);
  care.history[0].valid_from = absl::FromCivil(absl::CivilSecond(1, 1, 1, 0, 0, 0),
                                               absl::UTCTimeZone());
  const std::string json = FhirConsentJson(care, care.history[0], kNow);
  EXPECT_NE(json.find("\"start\":\"0001-01-01T00:00:00Z\""), std::string::npos) << json;
}

}  // namespace
}  // namespace medgate::consent
