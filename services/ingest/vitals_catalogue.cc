// The vitals catalogue and per-sample validation.
#include "services/ingest/vitals_catalogue.h"

#include <array>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "libs/common/validation.h"

namespace medgate::ingest {
namespace {

constexpr std::array<VitalKind, 10> kCatalogue = {{
    {"8867-4", "/min", 20, 300, "heart rate", "heart-rate"},
    {"2708-6", "%", 50, 100, "oxygen saturation", "oxygen-saturation"},
    {"59408-5", "%", 50, 100, "oxygen saturation by pulse oximetry", "oxygen-saturation"},
    {"8480-6", "mm[Hg]", 50, 260, "systolic blood pressure", "blood-pressure"},
    {"8462-4", "mm[Hg]", 20, 160, "diastolic blood pressure", "blood-pressure"},
    {"8310-5", "Cel", 30, 45, "body temperature", "body-temperature"},
    {"9279-1", "/min", 4, 70, "respiratory rate", "respiratory-rate"},
    {"29463-7", "kg", 0.3, 400, "body weight", "body-weight"},
    {"2339-0", "mg/dL", 10, 1000, "blood glucose (mass)", "blood-glucose"},
    {"15074-8", "mmol/L", 0.5, 55, "blood glucose (moles)", "blood-glucose"},
}};

}  // namespace

absl::Span<const VitalKind> VitalCatalogue() { return kCatalogue; }

const VitalKind* FindVital(absl::string_view loinc) {
  for (const VitalKind& kind : kCatalogue) {
    if (kind.loinc == loinc) return &kind;
  }
  return nullptr;
}

Verdict ValidateSample(const Sample& s, uint64_t previous_seq, absl::Time now,
                       const ValidationPolicy& policy) {
  if (s.seq == 0 || s.seq <= previous_seq) {
    return {Reject::kInvalidSeq,
            absl::StrCat("seq must be positive and increase within a batch (after ", previous_seq, ")")};
  }
  // Storage keeps seq as a signed 64-bit integer.
  if (s.seq > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return {Reject::kInvalidSeq, absl::StrCat("seq must be at most ",
                                              std::numeric_limits<int64_t>::max(), ", got ", s.seq)};
  }
  const VitalKind* kind = FindVital(s.loinc);
  if (kind == nullptr) {
    return {Reject::kUnknownCode,
            absl::StrCat("LOINC code '", TruncateUtf8(s.loinc, 16),
                         "' is not in the vitals catalogue")};
  }
  if (s.ucum != kind->ucum) {
    return {Reject::kWrongUnit, absl::StrCat(kind->name, " (", kind->loinc, ") is measured in '",
                                             kind->ucum, "'")};
  }
  if (!std::isfinite(s.value)) return {Reject::kNotFinite, "value is NaN or infinite"};
  if (s.value < kind->min || s.value > kind->max) {
    return {Reject::kOutOfRange, absl::StrCat(kind->name, " must be within ", kind->min, "..",
                                              kind->max, " ", kind->ucum)};
  }
  if (s.measured_at_malformed) {
    return {Reject::kMissingTime,
            "measured_at is not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"};
  }
  if (!s.measured_at) return {Reject::kMissingTime, "measured_at is required"};
  if (*s.measured_at > now + policy.max_future) {
    return {Reject::kTimeInFuture, absl::StrCat("measured_at is more than ",
                                                absl::FormatDuration(policy.max_future),
                                                " ahead of the server's clock")};
  }
  if (*s.measured_at < now - policy.max_age) {
    return {Reject::kTimeTooOld, absl::StrCat("measured_at is older than ",
                                              absl::FormatDuration(policy.max_age))};
  }
  if (s.location) {
    const Location& l = *s.location;
    if (!std::isfinite(l.latitude) || !std::isfinite(l.longitude) || l.latitude < -90 ||
        l.latitude > 90 || l.longitude < -180 || l.longitude > 180 || !std::isfinite(l.accuracy_m) || l.accuracy_m < 0) {
      return {Reject::kInvalidLocation, "location out of range"};
    }
  }
  return {Reject::kNone, "", kind};
}

}  // namespace medgate::ingest
