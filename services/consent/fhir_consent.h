// A patient's consent as FHIR R4 Consent resources in JSON, for the patient's export (GDPR
// art. 20).
#ifndef MEDGATE_SERVICES_CONSENT_FHIR_CONSENT_H_
#define MEDGATE_SERVICES_CONSENT_FHIR_CONSENT_H_

#include <string>

#include "services/consent/consent_core.h"

namespace medgate::consent {

// Identifier system of the exported consents (their consent ids, stable across versions).
inline constexpr char kFhirConsentSystem[] = "urn:medgate:consent";
// The evidence of consent the grant named (a signed form's reference, an app event id).
inline constexpr char kFhirConsentEvidenceSystem[] = "urn:medgate:consent-evidence";
// The purpose consented to, by its name in medgate's API (CARE, REMOTE_MONITORING,
// RECORD_SHARING, RESEARCH, GEOLOCATION), and the data categories a consent is narrowed to.
inline constexpr char kFhirPurposeSystem[] = "urn:medgate:fhir:purpose";
inline constexpr char kFhirDataCategorySystem[] = "urn:medgate:fhir:data-category";
// Who recorded the version (valueUri, a SPIFFE id), and why a revoked one was (valueString).
inline constexpr char kFhirRecordedByUrl[] = "urn:medgate:fhir:recorded-by";
inline constexpr char kFhirRevocationReasonUrl[] = "urn:medgate:fhir:revocation-reason";

// One version of `consent` as a Consent resource, one line of JSON without its newline:
// meta.versionId and lastUpdated (recorded), identifier the consent id, status active for a
// granted version and inactive for a revoked one (and for the latest version when its period
// ended by `now`: the consent has expired), scope patient-privacy, category LOINC 59284-0 (patient consent), patient by
// identifier, dateTime (recorded), sourceReference the evidence, policyRule OPTIN, and provision
// permit with its period, the actor it is narrowed to (if any), the purpose and the categories.
// `version` is an element of consent.history (the latest is its last, unless the history
// continues on the next page), or consent.current when the history is empty.
std::string FhirConsentJson(const ConsentInfo& consent, const VersionInfo& version,
                            absl::Time now);

}  // namespace medgate::consent

#endif  // MEDGATE_SERVICES_CONSENT_FHIR_CONSENT_H_
