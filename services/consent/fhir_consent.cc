// Consents as FHIR R4 Consent resources.
#include "services/consent/fhir_consent.h"

#include "absl/strings/str_cat.h"
#include "libs/common/fhir_json.h"
#include "libs/consent_client/consent_cache.h"

namespace medgate::consent {

std::string FhirConsentJson(const ConsentInfo& consent, const VersionInfo& version,
                            absl::Time now) {
  using fhir::String;
  // The history's last version (read in the same page as the consent's state, after it: a grant
  // committed between the two reads is the last there, not `current`), unless the history goes
  // on on the next page. Whether it has expired is its own period's: the consent's status was
  // read with `current`, which may be an earlier one.
  const bool latest = consent.history.empty() ? version.version == consent.current.version
                                              : !consent.continues &&
                                                    &version == &consent.history.back();
  const bool expired = version.valid_until.has_value() && *version.valid_until <= now;
  const bool active = version.state == VersionState::kGranted && !(latest && expired);
  std::string json = absl::StrCat(
      "{\"resourceType\":\"Consent\",\"meta\":{\"versionId\":\"", version.version,
      "\",\"lastUpdated\":\"", fhir::Instant(version.recorded_at),
      "\"},\"identifier\":[{\"system\":\"", kFhirConsentSystem,
      "\",\"value\":", String(consent.consent_id), "}],\"status\":\"",
      active ? "active" : "inactive",
      "\",\"scope\":{\"coding\":[{\"system\":"
      "\"http://terminology.hl7.org/CodeSystem/consentscope\",\"code\":\"patient-privacy\"}]},"
      "\"category\":[{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"59284-0\"}]}],"
      "\"patient\":",
      fhir::ReferenceByIdentifier("Patient", fhir::kPatientSystem, consent.patient_id),
      ",\"dateTime\":\"", fhir::Instant(version.recorded_at), "\"");
  if (!version.evidence_ref.empty()) {
    absl::StrAppend(&json, ",\"sourceReference\":{\"identifier\":{\"system\":\"",
                    kFhirConsentEvidenceSystem, "\",\"value\":", String(version.evidence_ref),
                    "}}");
  }
  absl::StrAppend(&json,
                  ",\"policyRule\":{\"coding\":[{\"system\":"
                  "\"http://terminology.hl7.org/CodeSystem/v3-ActCode\",\"code\":\"OPTIN\"}]},"
                  "\"provision\":{\"type\":\"permit\",\"period\":{\"start\":\"",
                  fhir::Instant(version.valid_from), "\"");
  if (version.valid_until) {
    absl::StrAppend(&json, ",\"end\":\"", fhir::Instant(*version.valid_until), "\"");
  }
  json += "}";
  if (!consent.actor.empty()) {
    absl::StrAppend(&json,
                    ",\"actor\":[{\"role\":{\"coding\":[{\"system\":"
                    "\"http://terminology.hl7.org/CodeSystem/v3-ParticipationType\",\"code\":"
                    "\"IRCP\"}]},\"reference\":{\"identifier\":{\"system\":\"",
                    fhir::kUriSystem, "\",\"value\":", String(consent.actor), "}}}]");
  }
  absl::StrAppend(&json, ",\"purpose\":[{\"system\":\"", kFhirPurposeSystem, "\",\"code\":",
                  String(PurposeName(consent.purpose)), "}]");
  if (!version.categories.empty()) {
    json += ",\"class\":[";
    for (size_t i = 0; i < version.categories.size(); ++i) {
      absl::StrAppend(&json, i == 0 ? "" : ",", "{\"system\":\"", kFhirDataCategorySystem,
                      "\",\"code\":", String(version.categories[i]), "}");
    }
    json += "]";
  }
  absl::StrAppend(&json, "},\"extension\":[{\"url\":\"", kFhirRecordedByUrl,
                  "\",\"valueUri\":", String(version.recorded_by), "}");
  if (version.state == VersionState::kRevoked && !version.reason.empty()) {
    absl::StrAppend(&json, ",{\"url\":\"", kFhirRevocationReasonUrl,
                    "\",\"valueString\":", String(version.reason), "}");
  }
  json += "]}";
  return json;
}

}  // namespace medgate::consent
