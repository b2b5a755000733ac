// Pieces of FHIR R4 JSON that the patient exports (vitals as Observations, records as
// DocumentReferences) write alike.
#ifndef MEDGATE_LIBS_COMMON_FHIR_JSON_H_
#define MEDGATE_LIBS_COMMON_FHIR_JSON_H_

#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace medgate::fhir {

// The patient is named by its pseudonym under this identifier system (no Patient resource is
// exported: medgate holds no name, birth date or other identity of a patient).
inline constexpr char kPatientSystem[] = "urn:medgate:patient";
// SPIFFE ids (devices, practitioners) are URIs.
inline constexpr char kUriSystem[] = "urn:ietf:rfc:3986";

// `text` as a JSON string, quotes included.
std::string String(absl::string_view text);
// The shortest decimal without an exponent that reads back as `value` (a JSON number: finite
// values only). Exponents are valid JSON and FHIR, but not every reader of an export takes them.
std::string Number(double value);
// A FHIR instant in UTC, to the microsecond (trailing zeros of the fraction dropped), its year in
// four digits (years 1 to 9999, as protobuf timestamps have them).
std::string Instant(absl::Time t);
// A reference of type `type` ("Patient", "Device", "Practitioner") by identifier.
std::string ReferenceByIdentifier(absl::string_view type, absl::string_view system,
                                  absl::string_view value);

}  // namespace medgate::fhir

#endif  // MEDGATE_LIBS_COMMON_FHIR_JSON_H_
