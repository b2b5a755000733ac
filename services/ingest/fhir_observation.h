// A stored vital sample as a FHIR R4 Observation in JSON, for a patient's export (GDPR art. 20).
#ifndef MEDGATE_SERVICES_INGEST_FHIR_OBSERVATION_H_
#define MEDGATE_SERVICES_INGEST_FHIR_OBSERVATION_H_

#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "services/ingest/vitals_catalogue.h"

namespace medgate::ingest {

// Identifier system of the exported samples: a sample is named by its device's SPIFFE id and seq,
// which are unique in storage (the patient by its pseudonym, fhir::kPatientSystem).
inline constexpr char kFhirSampleSystem[] = "urn:medgate:vital-sample";
// Where the sample was measured: an extension of ours (FHIR R4 has no element for it, and its
// geolocation extension is for addresses), with sub-extensions latitude and longitude
// (valueDecimal, WGS 84 degrees) and, when known, accuracy (valueQuantity in m: the radius of the
// 68% confidence circle).
inline constexpr char kFhirLocationUrl[] = "urn:medgate:fhir:measured-at-location";

// One stored sample of the patient `patient_id`, sent by the device `device_spiffe_id`.
struct StoredSample {
  std::string device_spiffe_id;
  Sample sample;  // measured_at set; location set when it is exported
  absl::Time received_at;
};

// The Observation, one line of JSON without its newline: status final, category vital-signs
// (laboratory for blood glucose), code as LOINC with the catalogue's name as text (pulse
// oximetry, 59408-5, with the oxygen saturation code 2708-6 beside it), valueQuantity in UCUM,
// effectiveDateTime (measured) and issued (committed) in UTC to the microsecond, subject
// (Patient) and device (Device) by identifier, and a location as the extension kFhirLocationUrl.
// Numbers are written in the shortest decimal form, without an exponent, that reads back as the
// same double. `sample.sample` must be of
// the catalogue, with a finite value (every stored sample is).
std::string FhirObservationJson(const StoredSample& sample, absl::string_view patient_id);

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_FHIR_OBSERVATION_H_
