// The vitals catalogue (LOINC code, UCUM unit, plausible range) and per-sample validation.
#ifndef MEDGATE_SERVICES_INGEST_VITALS_CATALOGUE_H_
#define MEDGATE_SERVICES_INGEST_VITALS_CATALOGUE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "absl/time/time.h"

namespace medgate::ingest {

struct VitalKind {
  absl::string_view loinc;
  absl::string_view ucum;
  double min;
  double max;
  absl::string_view name;
  // The data category a consent may be narrowed to (consent::DataCategories()).
  absl::string_view category;
};

// The catalogue of DOMAIN.md; nullptr for a code that is not in it.
const VitalKind* FindVital(absl::string_view loinc);
// Every entry of the catalogue.
absl::Span<const VitalKind> VitalCatalogue();

enum class Reject {
  kNone,
  kUnknownCode,
  kWrongUnit,
  kOutOfRange,
  kNotFinite,
  kTimeInFuture,
  kTimeTooOld,
  kNoConsent,
  kInvalidSeq,
  kMissingTime,
  kInvalidLocation,
  kBeforeAssignment,  // measured before the device's current assignment began
};

struct Location {
  double latitude = 0;
  double longitude = 0;
  double accuracy_m = 0;
};

// One sample as received, in plain values.
struct Sample {
  uint64_t seq = 0;
  std::string loinc;
  double value = 0;
  std::string ucum;
  std::optional<absl::Time> measured_at;  // unset when missing or not a valid Timestamp
  bool measured_at_malformed = false;      // it came, but not as a valid Timestamp
  std::optional<Location> location;
};

struct ValidationPolicy {
  absl::Duration max_future = absl::Minutes(5);
  absl::Duration max_age = absl::Hours(24 * 30);
};

struct Verdict {
  Reject reject = Reject::kNone;
  std::string detail;  // for the device developer; never contains the value's meaning
  // The sample's catalogue entry; set whenever reject is kNone.
  const VitalKind* kind = nullptr;
};

// Validates one sample against the catalogue, the clock and the previous seq of its batch.
Verdict ValidateSample(const Sample& sample, uint64_t previous_seq, absl::Time now,
                       const ValidationPolicy& policy);

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_VITALS_CATALOGUE_H_
