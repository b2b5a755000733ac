// Records as FHIR R4 DocumentReferences.
#include "services/sharing/fhir_document_reference.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "libs/common/fhir_json.h"

namespace medgate::sharing {
namespace {

const char* KindCode(RecordKind kind) {
  switch (kind) {
    case RecordKind::kDocument:
      return "document";
    case RecordKind::kImaging:
      return "imaging";
    case RecordKind::kReport:
      return "report";
    case RecordKind::kUnspecified:
      break;
  }
  return "unspecified";  // not stored: every upload names its kind
}

}  // namespace

std::string ExportedContentPath(const std::string& record_id) {
  return absl::StrCat("content/", record_id);
}

std::string FhirDocumentReferenceJson(const RecordInfo& record) {
  using fhir::String;
  std::string json = absl::StrCat(
      "{\"resourceType\":\"DocumentReference\",\"identifier\":[{\"system\":\"", kFhirRecordSystem,
      "\",\"value\":", String(record.record_id),
      "}],\"status\":\"current\",\"docStatus\":\"final\",\"category\":[{\"coding\":[{\"system\":\"",
      kFhirRecordKindSystem, "\",\"code\":\"", KindCode(record.kind),
      "\"}]}],\"subject\":",
      fhir::ReferenceByIdentifier("Patient", fhir::kPatientSystem, record.patient_id),
      ",\"date\":\"", fhir::Instant(record.created_at), "\",\"author\":[",
      fhir::ReferenceByIdentifier("Practitioner", fhir::kUriSystem, record.owner),
      "],\"content\":[{\"attachment\":{\"contentType\":", String(record.content_type),
      ",\"url\":", String(ExportedContentPath(record.record_id)),
      ",\"size\":", record.size_bytes, ",\"title\":", String(record.file_name),
      ",\"creation\":\"", fhir::Instant(record.created_at), "\"}}],\"extension\":[{\"url\":\"",
      kFhirContentSha256Url, "\",\"valueBase64Binary\":\"", absl::Base64Escape(record.sha256),
      "\"}");
  if (record.state == RecordState::kArchived && record.retain_until) {
    absl::StrAppend(&json, ",{\"url\":\"", kFhirRetainUntilUrl, "\",\"valueInstant\":\"",
                    fhir::Instant(*record.retain_until), "\"}");
  }
  json += "]}";
  return json;
}

}  // namespace medgate::sharing
