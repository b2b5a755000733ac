// Unit tests of the vitals catalogue and sample validation.
#include <cmath>
#include <limits>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "libs/consent_client/consent_decision.h"
#include "services/ingest/vitals_catalogue.h"

namespace medgate::ingest {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1'800'000'000);

Sample Good() {
  Sample s;
  s.seq = 10;
  s.loinc = "8867-4";
  s.value = 72;
  s.ucum = "/min";
  s.measured_at = kNow - absl::Minutes(1);
  return s;
}

Reject Check(const Sample& s, uint64_t previous = 0) {
  return ValidateSample(s, previous, kNow, ValidationPolicy{}).reject;
}

TEST(VitalsCatalogueTest, EveryCatalogueEntryAcceptsItsRangeAndRefusesOutside) {
  for (const char* code : {"8867-4", "2708-6", "59408-5", "8480-6", "8462-4", "8310-5", "9279-1",
                           "29463-7", "2339-0", "15074-8"}) {
    const VitalKind* kind = FindVital(code);
    ASSERT_NE(kind, nullptr) << code;
    Sample s = Good();
    s.loinc = code;
    s.ucum = std::string(kind->ucum);
    for (double v : {kind->min, kind->max, (kind->min + kind->max) / 2}) {
      s.value = v;
      EXPECT_EQ(Check(s), Reject::kNone) << code << " " << v;
    }
    for (double v : {std::nextafter(kind->min, -1e9), std::nextafter(kind->max, 1e9)}) {
      s.value = v;
      EXPECT_EQ(Check(s), Reject::kOutOfRange) << code << " " << v;
    }
  }
}

TEST(VitalsCatalogueTest, EachRejectionHasItsReason) {
  Sample s = Good();
  s.loinc = "1234-5";
  EXPECT_EQ(Check(s), Reject::kUnknownCode);
  s = Good();
  s.ucum = "bpm";
  EXPECT_EQ(Check(s), Reject::kWrongUnit);
  s = Good();
  s.value = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(Check(s), Reject::kNotFinite);
  s.value = std::numeric_limits<double>::infinity();
  EXPECT_EQ(Check(s), Reject::kNotFinite);
  s = Good();
  s.measured_at = kNow + absl::Minutes(5) + absl::Seconds(1);
  EXPECT_EQ(Check(s), Reject::kTimeInFuture);
  s.measured_at = kNow + absl::Minutes(4);  // clock skew within tolerance
  EXPECT_EQ(Check(s), Reject::kNone);
  s.measured_at = kNow - absl::Hours(24 * 31);
  EXPECT_EQ(Check(s), Reject::kTimeTooOld);
  s.measured_at.reset();
  EXPECT_EQ(Check(s), Reject::kMissingTime);
  s = Good();
  s.measured_at_malformed = true;  // came with nanos out of range (the time read is set aside)
  EXPECT_EQ(Check(s), Reject::kMissingTime);
  s = Good();
  EXPECT_EQ(Check(s, 10), Reject::kInvalidSeq);  // not increasing
  s.seq = 0;
  EXPECT_EQ(Check(s), Reject::kInvalidSeq);
  s = Good();
  s.location = Location{91, 2, 5};
  EXPECT_EQ(Check(s), Reject::kInvalidLocation);
  s.location = Location{48.85, 2.35, std::numeric_limits<double>::infinity()};
  EXPECT_EQ(Check(s), Reject::kInvalidLocation);
  s.location = Location{48.85, 2.35, -1};
  EXPECT_EQ(Check(s), Reject::kInvalidLocation);
  s.location = Location{48.85, 2.35, 10};
  EXPECT_EQ(Check(s), Reject::kNone);
}

// Storage keeps seq as a signed 64-bit integer: a larger one is refused with its reason, never
// taken for a duplicate of a stored sample.
TEST(VitalsCatalogueTest, SeqBeyondTheStoredRangeIsRefused) {
  constexpr uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  Sample s = Good();
  s.seq = kMax;
  EXPECT_EQ(Check(s), Reject::kNone);
  s.seq = kMax + 1;
  Verdict verdict = ValidateSample(s, 0, kNow, {});
  EXPECT_EQ(verdict.reject, Reject::kInvalidSeq);
  EXPECT_EQ(verdict.detail, "seq must be at most 9223372036854775807, got 9223372036854775808");
  s.seq = std::numeric_limits<uint64_t>::max();
  EXPECT_EQ(Check(s, kMax), Reject::kInvalidSeq);
}

// Each code is of one data category a consent may be narrowed to, and every vitals category has
// codes: a REMOTE_MONITORING consent narrowed to a category always covers some measure.
TEST(VitalsCatalogueTest, EveryCodeIsOfADataCategory) {
  std::set<std::string> used;
  for (const VitalKind& kind : VitalCatalogue()) {
    EXPECT_TRUE(consent::IsDataCategory(kind.category)) << kind.loinc << " " << kind.category;
    used.emplace(kind.category);
  }
  EXPECT_EQ(FindVital("8480-6")->category, FindVital("8462-4")->category);
  EXPECT_EQ(FindVital("2339-0")->category, "blood-glucose");
  // An accepted sample's verdict carries its entry, whose category its consent is decided for.
  EXPECT_EQ(ValidateSample(Good(), 0, kNow, {}).kind, FindVital("8867-4"));
  EXPECT_EQ(used, (std::set<std::string>{"blood-glucose", "blood-pressure", "body-temperature",
                                         "body-weight", "heart-rate", "oxygen-saturation",
                                         "respiratory-rate"}));
}

TEST(VitalsCatalogueTest, DetailsNameTheExpectation) {
  Sample s = Good();
  s.ucum = "bpm";
  EXPECT_EQ(ValidateSample(s, 0, kNow, {}).detail, "heart rate (8867-4) is measured in '/min'");
  // The time bounds are the policy's, not fixed text.
  ValidationPolicy policy;
  policy.max_future = absl::Minutes(2);
  policy.max_age = absl::Hours(48);
  s = Good();
  s.measured_at = kNow + absl::Minutes(3);
  EXPECT_EQ(ValidateSample(s, 0, kNow, policy).detail,
            "measured_at is more than 2m ahead of the server's clock");
  s.measured_at = kNow - absl::Hours(49);
  EXPECT_EQ(ValidateSample(s, 0, kNow, policy).detail, "measured_at is older than 48h");
}

}  // namespace
}  // namespace medgate::ingest
