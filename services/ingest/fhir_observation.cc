// Stored vital samples as FHIR R4 Observations.
#include "services/ingest/fhir_observation.h"

#include "absl/strings/str_cat.h"
#include "libs/common/fhir_json.h"

namespace medgate::ingest {
namespace {

using fhir::Number;
using fhir::String;

std::string Quantity(double value, absl::string_view ucum) {
  return absl::StrCat("{\"value\":", Number(value), ",\"unit\":", String(ucum),
                      ",\"system\":\"http://unitsofmeasure.org\",\"code\":", String(ucum), "}");
}

}  // namespace

std::string FhirObservationJson(const StoredSample& stored, absl::string_view patient_id) {
  const Sample& s = stored.sample;
  const VitalKind* kind = FindVital(s.loinc);
  const bool laboratory = kind != nullptr && kind->category == "blood-glucose";
  std::string json = absl::StrCat(
      "{\"resourceType\":\"Observation\",\"identifier\":[{\"system\":\"", kFhirSampleSystem,
      "\",\"value\":", String(absl::StrCat(stored.device_spiffe_id, "#", s.seq)),
      "}],\"status\":\"final\",\"category\":[{\"coding\":[{\"system\":"
      "\"http://terminology.hl7.org/CodeSystem/observation-category\",\"code\":",
      laboratory ? "\"laboratory\",\"display\":\"Laboratory\"" : "\"vital-signs\",\"display\":\"Vital Signs\"",
      "}]}],\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":", String(s.loinc),
      "}");
  // Pulse oximetry is a kind of oxygen saturation: FHIR's vital-signs profile finds it by 2708-6.
  if (s.loinc == "59408-5") json += ",{\"system\":\"http://loinc.org\",\"code\":\"2708-6\"}";
  json += "]";
  if (kind != nullptr) absl::StrAppend(&json, ",\"text\":", String(kind->name));
  absl::StrAppend(&json, "},\"subject\":",
                  fhir::ReferenceByIdentifier("Patient", fhir::kPatientSystem, patient_id));
  if (s.measured_at) {
    absl::StrAppend(&json, ",\"effectiveDateTime\":\"", fhir::Instant(*s.measured_at), "\"");
  }
  absl::StrAppend(&json, ",\"issued\":\"", fhir::Instant(stored.received_at),
                  "\",\"valueQuantity\":", Quantity(s.value, s.ucum),
                  ",\"device\":",
                  fhir::ReferenceByIdentifier("Device", fhir::kUriSystem, stored.device_spiffe_id));
  if (s.location) {
    absl::StrAppend(&json, ",\"extension\":[{\"url\":\"", kFhirLocationUrl,
                    "\",\"extension\":[{\"url\":\"latitude\",\"valueDecimal\":",
                    Number(s.location->latitude),
                    "},{\"url\":\"longitude\",\"valueDecimal\":",
                    Number(s.location->longitude), "}");
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
