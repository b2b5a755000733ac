// Stored vital samples as FHIR R4 Observations.
#include "services/ingest/fhir_observation.h"

#include <charconv>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace medgate::ingest {
namespace {

// The shortest decimal that reads back as `value` (a JSON number: finite values only).
std::string JsonNumber(double value) {
  char buffer[32];
  const std::to_chars_result written = std::to_chars(buffer, buffer + sizeof(buffer), value);
  if (written.ec != std::errc()) return "0";  // not reached: 32 bytes hold any double
  return std::string(buffer, written.ptr);
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

std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  out.reserve(text.size() + 2);
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;  // UTF-8 passes as it is (every stored string is valid UTF-8)
        }
    }
  }
  out += '"';
  return out;
}

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
      "}]");
  if (kind != nullptr) absl::StrAppend(&json, ",\"text\":", JsonString(kind->name));
  absl::StrAppend(&json, "},\"subject\":{\"identifier\":{\"system\":\"", kFhirPatientSystem,
                  "\",\"value\":", JsonString(patient_id), "}}");
  if (s.measured_at) {
    absl::StrAppend(&json, ",\"effectiveDateTime\":\"", FhirInstant(*s.measured_at), "\"");
  }
  absl::StrAppend(&json, ",\"issued\":\"", FhirInstant(stored.received_at),
                  "\",\"valueQuantity\":", Quantity(s.value, s.ucum),
                  ",\"device\":{\"identifier\":{\"system\":\"urn:ietf:rfc:3986\",\"value\":",
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
