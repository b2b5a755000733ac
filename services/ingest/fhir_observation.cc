// Stored vital samples as FHIR R4 Observations.
#include "services/ingest/fhir_observation.h"

#include <charconv>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"

namespace medgate::ingest {
namespace {

// The shortest decimal without an exponent that reads back as `value` (a JSON number: finite
// values only). Exponents are valid JSON and FHIR, but not every reader of an export takes them.
std::string JsonNumber(double value) {
  // The longest such decimal, of the smallest subnormal, has 326 characters; the largest finite
  // double has 309 digits.
  char buffer[512];
  std::to_chars_result written =
      std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::fixed);
  if (written.ec != std::errc()) {
    written = std::to_chars(buffer, buffer + sizeof(buffer), value);  // not reached
  }
  return std::string(buffer, written.ptr);
}

std::string JsonString(absl::string_view text) {
  std::string out;
  log::AppendJsonString(out, text);
  return out;
}

std::string FhirInstant(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E*SZ", t, absl::UTCTimeZone());
}

std::string Quantity(double value, absl::string_view ucum) {
  return absl::StrCat("{\"value\":", JsonNumber(value), ",\"unit\":", JsonString(ucum),
                      ",\"system\":\"http://unitsofmeasure.org\",\"code\":", JsonString(ucum),
                      "}");
}

}  // namespace

std::string FhirObservationJson(const StoredSample& stored, absl::string_view patient_id) {
  const Sample& s = stored.sample;
  const VitalKind* kind = FindVital(s.loinc);
  const bool laboratory = kind != nullptr && kind->category == "blood-glucose";
  std::string json = absl::StrCat(
      "{\"resourceType\":\"Observation\",\"identifier\":[{\"system\":\"", kFhirSampleSystem,
      "\",\"value\":", JsonString(absl::StrCat(stored.device_spiffe_id, "#", s.seq)),
      "}],\"status\":\"final\",\"category\":[{\"coding\":[{\"system\":"
      "\"http://terminology.hl7.org/CodeSystem/observation-category\",\"code\":",
      laboratory ? "\"laboratory\",\"display\":\"Laboratory\"" : "\"vital-signs\",\"display\":\"Vital Signs\"",
      "}]}],\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":", JsonString(s.loinc),
      "}");
  // Pulse oximetry is a kind of oxygen saturation: FHIR's vital-signs profile finds it by 2708-6.
  if (s.loinc == "59408-5") json += ",{\"system\":\"http://loinc.org\",\"code\":\"2708-6\"}";
  json += "]";
  if (kind != nullptr) absl::StrAppend(&json, ",\"text\":", JsonString(kind->name));
  absl::StrAppend(&json, "},\"subject\":{\"type\":\"Patient\",\"identifier\":{\"system\":\"", kFhirPatientSystem,
                  "\",\"value\":", JsonString(patient_id), "}}");
  if (s.measured_at) {
    absl::StrAppend(&json, ",\"effectiveDateTime\":\"", FhirInstant(*s.measured_at), "\"");
  }
  absl::StrAppend(&json, ",\"issued\":\"", FhirInstant(stored.received_at),
                  "\",\"valueQuantity\":", Quantity(s.value, s.ucum),
                  ",\"device\":{\"type\":\"Device\",\"identifier\":{\"system\":\"urn:ietf:rfc:3986\",\"value\":",
                  JsonString(stored.device_spiffe_id), "}}");
  if (s.location) {
    absl::StrAppend(&json, ",\"extension\":[{\"url\":\"", kFhirLocationUrl,
                    "\",\"extension\":[{\"url\":\"latitude\",\"valueDecimal\":",
                    JsonNumber(s.location->latitude),
                    "},{\"url\":\"longitude\",\"valueDecimal\":",
                    JsonNumber(s.location->longitude), "}");
    if (s.location->accuracy_m > 0) {
      absl::StrAppend(&json, ",{\"url\":\"accuracy\",\"valueQuantity\":",
                      Quantity(s.location->accuracy_m, "m"), "}");
    }
    json += "]}]";
  }
  json += "}";
  return json;
}

}  // namespace medgate::ingest
