// The consent core's pure helpers: field validation, grant periods, consent ids, page tokens.
#include "services/consent/consent_core.h"
#include "services/consent/consent_server.h"
#include "libs/common/config.h"
#include "libs/common/validation.h"

#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace medgate::consent {
namespace {

using ::testing::HasSubstr;

const absl::Time kNow = absl::FromUnixSeconds(1700000000);

void ExpectInvalid(const absl::Status& status, const std::string& field) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(field));
}

class ConsentCoreHelpersTest : public ::testing::Test {};

TEST_F(ConsentCoreHelpersTest, PurposeMustBeKnown) {
  EXPECT_EQ(*ValidatePurpose(2, "purpose"), Purpose::kRemoteMonitoring);
  ExpectInvalid(ValidatePurpose(0, "purpose").status(), "purpose: required");
  ExpectInvalid(ValidatePurpose(99, "key.purpose").status(), "key.purpose: unknown purpose 99");
  ExpectInvalid(ValidatePurpose(-1, "purpose").status(), "purpose");
}

TEST_F(ConsentCoreHelpersTest, IdsAndTextsAreBounded) {
  EXPECT_TRUE(ValidateIdentifier("pt_0123abcd", "patient_id", kMaxIdBytes).ok());
  ExpectInvalid(ValidateIdentifier("", "patient_id", kMaxIdBytes), "patient_id: must not be empty");
  ExpectInvalid(ValidateIdentifier(std::string(65, 'a'), "patient_id", kMaxIdBytes),
                "patient_id: at most 64");
  ExpectInvalid(ValidateIdentifier("pt 1", "patient_id", kMaxIdBytes), "patient_id");
  ExpectInvalid(ValidateIdentifier("pt/1", "consent_id", kMaxIdBytes), "consent_id");
  EXPECT_TRUE(ValidateText("signed form #42 (scan)", "evidence_ref", kMaxTextBytes).ok());
  ExpectInvalid(ValidateText("", "evidence_ref", kMaxTextBytes), "evidence_ref: must not be empty");
  ExpectInvalid(ValidateText(std::string(513, 'e'), "evidence_ref", kMaxTextBytes),
                "evidence_ref: at most 512");
  ExpectInvalid(ValidateText("a\nb", "reason", kMaxTextBytes), "reason: control");
}

TEST_F(ConsentCoreHelpersTest, GrantPeriodDefaultsToNowAndEndsAfterItsStart) {
  auto open = ValidateGrantPeriod({}, kNow);
  ASSERT_TRUE(open.ok());
  EXPECT_EQ(open->first, kNow);
  EXPECT_FALSE(open->second.has_value());

  auto bounded = ValidateGrantPeriod({kNow + absl::Hours(1), kNow + absl::Hours(2)}, kNow);
  ASSERT_TRUE(bounded.ok());
  EXPECT_EQ(bounded->first, kNow + absl::Hours(1));
  EXPECT_EQ(*bounded->second, kNow + absl::Hours(2));

  // Stored with microsecond precision.
  auto truncated = ValidateGrantPeriod({kNow + absl::Nanoseconds(1999), std::nullopt}, kNow);
  ASSERT_TRUE(truncated.ok());
  EXPECT_EQ(truncated->first, kNow + absl::Microseconds(1));

  ExpectInvalid(ValidateGrantPeriod({kNow + absl::Hours(2), kNow + absl::Hours(1)}, kNow).status(),
                "period: end_at must be after start_at");
  ExpectInvalid(ValidateGrantPeriod({kNow + absl::Hours(1), kNow + absl::Hours(1)}, kNow).status(),
                "period: end_at must be after start_at");
  // An end already past is Grant's to refuse (a retry of a grant recorded before it is not).
  auto past = ValidateGrantPeriod({std::nullopt, kNow - absl::Seconds(1)}, kNow);
  ASSERT_TRUE(past.ok()) << past.status();
  EXPECT_EQ(past->first, kNow);
  EXPECT_EQ(*past->second, kNow - absl::Seconds(1));
}

// Routing's answers about the request keep their code; routing refusing the consent service is
// its deployment's fault (INTERNAL, not a retry forever); the rest is worth a retry.
TEST_F(ConsentCoreHelpersTest, APatientLookUpThatFailsKeepsWhatRoutingSaidAboutTheRequest) {
  const std::vector<std::pair<absl::StatusCode, absl::StatusCode>> cases = {
      {absl::StatusCode::kInvalidArgument, absl::StatusCode::kInvalidArgument},
      {absl::StatusCode::kNotFound, absl::StatusCode::kNotFound},
      {absl::StatusCode::kOutOfRange, absl::StatusCode::kOutOfRange},
      {absl::StatusCode::kFailedPrecondition, absl::StatusCode::kFailedPrecondition},
      {absl::StatusCode::kResourceExhausted, absl::StatusCode::kResourceExhausted},
      {absl::StatusCode::kPermissionDenied, absl::StatusCode::kInternal},
      {absl::StatusCode::kUnauthenticated, absl::StatusCode::kInternal},
      {absl::StatusCode::kUnavailable, absl::StatusCode::kUnavailable},
      {absl::StatusCode::kDeadlineExceeded, absl::StatusCode::kUnavailable},
      {absl::StatusCode::kInternal, absl::StatusCode::kUnavailable},
      {absl::StatusCode::kUnknown, absl::StatusCode::kUnavailable},
  };
  for (const auto& [routing, answered] : cases) {
    const absl::Status status =
        PatientLookupError(absl::Status(routing, "routing ResolvePatients: what it said"));
    EXPECT_EQ(status.code(), answered) << absl::StatusCodeToString(routing);
    EXPECT_EQ(status.message(),
              "cannot resolve the patient's home region: routing ResolvePatients: what it said");
  }
}

TEST_F(ConsentCoreHelpersTest, ConsentIdsCarryTheirRegion) {
  for (const char* region : {"fr-1", "eu_west_1", "a"}) {
    std::string id = NewConsentId(region);
    EXPECT_LE(id.size(), kMaxIdBytes);
    EXPECT_TRUE(ValidateIdentifier(id, "consent_id", kMaxIdBytes).ok()) << id;
    EXPECT_EQ(RegionOfConsentId(id), region);
    EXPECT_NE(NewConsentId(region), id);
  }
  std::string longest = NewConsentId(std::string(kMaxRegionIdBytes, 'r'));
  EXPECT_EQ(longest.size(), kMaxIdBytes);
  EXPECT_TRUE(ValidateRegionId(std::string(kMaxRegionIdBytes, 'r')).ok());
  EXPECT_FALSE(ValidateRegionId(std::string(kMaxRegionIdBytes + 1, 'r')).ok());
  EXPECT_FALSE(ValidateRegionId("fr 1").ok());
  for (const char* bad :
       {"", "cn_", "cn_fr-1_", "xx_fr-1_0123456789abcdef01234567", "cn__0123456789abcdef01234567",
        "cn_fr-1-0123456789abcdef01234567", "cn_fr-1_0123456789abcdef0123456z", "cn_fr-1_0123"}) {
    EXPECT_FALSE(RegionOfConsentId(bad).has_value()) << bad;
  }
}

TEST_F(ConsentCoreHelpersTest, PageTokensRoundTripAndForgeriesAreRefused) {
  std::string token = EncodePageToken({Purpose::kResearch, "spiffe://td/tenant/a/app/x", 0});
  auto decoded = DecodePageToken(token);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->purpose, Purpose::kResearch);
  EXPECT_EQ(decoded->actor, "spiffe://td/tenant/a/app/x");
  EXPECT_EQ(decoded->after_version, 0);
  auto empty_actor = DecodePageToken(EncodePageToken({Purpose::kCare, "", 0}));
  ASSERT_TRUE(empty_actor.ok());
  EXPECT_EQ(empty_actor->actor, "");
  // Within a consent's history: the version listed last, and the actor's own dots and slashes.
  auto within = DecodePageToken(EncodePageToken({Purpose::kCare, "spiffe://td.eu/a.b/c", 1234}));
  ASSERT_TRUE(within.ok()) << within.status();
  EXPECT_EQ(within->purpose, Purpose::kCare);
  EXPECT_EQ(within->actor, "spiffe://td.eu/a.b/c");
  EXPECT_EQ(within->after_version, 1234);
  // Not base64, purpose 999, no purpose; "1./x", "1.0/x", "1.-3/x", "1.z/x" and
  // "1.9223372036854775808/x" (versions that are not one); "1.5" (no actor's place).
  for (const char* bad : {"***", "OTk5L3g", "eA", "MS4veA", "MS4wL3g", "MS4tMy94", "MS56L3g",
                          "MS45MjIzMzcyMDM2ODU0Nzc1ODA4L3g", "MS41"}) {
    ExpectInvalid(DecodePageToken(bad).status(), "page_token");
  }
}

absl::StatusOr<ConsentSettings> ParseSettings(const std::string& yaml) {
  MedgateConfig config;
  absl::StatusOr<ConfigNode> node = ConfigNode::Parse(yaml);
  if (!node.ok()) return node.status();
  config.root = *node;
  return ParseConsentSettings(config);
}

// A cache may miss a revocation for at most a second (DOMAIN.md): fail_closed_after, which bounds
// that when the change feed dies without a word, cannot be set longer.
TEST(ConsentSettingsTest, FailClosedAfterIsAtMostASecond) {
  absl::StatusOr<ConsentSettings> ok =
      ParseSettings("consent:\n  cache: {fail_closed_after_ms: 600}\n");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->cache.fail_closed_after, absl::Milliseconds(600));
  absl::StatusOr<ConsentSettings> defaults = ParseSettings("consent: {}\n");
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->cache.fail_closed_after, absl::Seconds(1));
  absl::StatusOr<ConsentSettings> too_long =
      ParseSettings("consent:\n  cache: {fail_closed_after_ms: 5000}\n");
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("fail_closed_after_ms"), absl::string_view::npos)
      << too_long.status();
}

}  // namespace
}  // namespace medgate::consent
