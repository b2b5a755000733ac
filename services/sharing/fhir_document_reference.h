// A record as a FHIR R4 DocumentReference in JSON, for a patient's export (GDPR art. 20).
#ifndef MEDGATE_SERVICES_SHARING_FHIR_DOCUMENT_REFERENCE_H_
#define MEDGATE_SERVICES_SHARING_FHIR_DOCUMENT_REFERENCE_H_

#include <string>

#include "services/sharing/sharing_core.h"

namespace medgate::sharing {

// Identifier system of the exported records (their record ids).
inline constexpr char kFhirRecordSystem[] = "urn:medgate:record";
// What a record is (document, imaging, report): a code system of ours, in category.
inline constexpr char kFhirRecordKindSystem[] = "urn:medgate:fhir:record-kind";
// The content's SHA-256 (valueBase64Binary, 32 bytes): FHIR R4's attachment hash is SHA-1.
inline constexpr char kFhirContentSha256Url[] = "urn:medgate:fhir:content-sha256";
// An archived record's retention end (valueInstant), after which it is erased.
inline constexpr char kFhirRetainUntilUrl[] = "urn:medgate:fhir:retain-until";

// Where an export's reader finds the record's content, beside its DocumentReference.ndjson.
std::string ExportedContentPath(const std::string& record_id);

// The DocumentReference, one line of JSON without its newline: identifier (the record id),
// status current, docStatus final, category the record's kind, subject (Patient) and author
// (Practitioner, the owner) by identifier, date (stored), and one content attachment with its
// content type, title (file name), size, creation and url ExportedContentPath(record_id); the
// content's SHA-256 and, when archived, its retention end as extensions. `record`'s metadata
// must have been opened (content_type, file_name, sha256 set).
std::string FhirDocumentReferenceJson(const RecordInfo& record);

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_FHIR_DOCUMENT_REFERENCE_H_
