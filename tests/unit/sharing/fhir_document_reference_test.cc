// Unit tests of records as FHIR R4 DocumentReferences.
#include "services/sharing/fhir_document_reference.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <string>

#include "absl/time/time.h"

namespace medgate::sharing {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

RecordInfo Letter() {
  RecordInfo r;
  r.record_id = "fr-1.r0123";
  r.tenant_id = "acme";
  r.patient_id = "pt_3b0c";
  r.kind = RecordKind::kDocument;
  r.content_type = "application/pdf";
  r.file_name = "lettre \"urgente\"\\\n\xc3\xa9t\xc3\xa9.pdf";  // quote, backslash, newline, UTF-8
  r.size_bytes = 123456;
  r.sha256 = std::string(32, '\xab');
  r.owner = "spiffe://medgate.test/tenant/acme/practitioner/p-1";
  r.created_at = absl::FromUnixMicros(1'800'000'000'123'450);
  return r;
}

Struct Parse(const std::string& json) {
  Struct s;
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(json, &s).ok()) << json;
  return s;
}

const Struct& Object(const Struct& s, const std::string& name) {
  return s.fields().at(name).struct_value();
}
const Struct& First(const Struct& s, const std::string& name) {
  return s.fields().at(name).list_value().values(0).struct_value();
}
std::string Text(const Struct& s, const std::string& name) {
  return s.fields().at(name).string_value();
}

TEST(FhirDocumentReferenceTest, ARecordIsOneLineOfItsMetadata) {
  const std::string json = FhirDocumentReferenceJson(Letter());
  EXPECT_EQ(json.find('\n'), std::string::npos);  // one NDJSON line
  const Struct d = Parse(json);
  EXPECT_EQ(Text(d, "resourceType"), "DocumentReference");
  EXPECT_EQ(Text(d, "status"), "current");
  EXPECT_EQ(Text(d, "docStatus"), "final");
  EXPECT_EQ(Text(First(d, "identifier"), "system"), kFhirRecordSystem);
  EXPECT_EQ(Text(First(d, "identifier"), "value"), "fr-1.r0123");
  const Struct& kind = First(First(d, "category"), "coding");
  EXPECT_EQ(Text(kind, "system"), kFhirRecordKindSystem);
  EXPECT_EQ(Text(kind, "code"), "document");
  EXPECT_EQ(Text(Object(d, "subject"), "type"), "Patient");
  EXPECT_EQ(Text(Object(Object(d, "subject"), "identifier"), "system"), "urn:medgate:patient");
  EXPECT_EQ(Text(Object(Object(d, "subject"), "identifier"), "value"), "pt_3b0c");
  EXPECT_EQ(Text(First(d, "author"), "type"), "Practitioner");
  EXPECT_EQ(Text(Object(First(d, "author"), "identifier"), "value"),
            "spiffe://medgate.test/tenant/acme/practitioner/p-1");
  EXPECT_EQ(Text(d, "date"), "2027-01-15T08:00:00.12345Z");
  const Struct& attachment = Object(First(d, "content"), "attachment");
  EXPECT_EQ(Text(attachment, "contentType"), "application/pdf");
  EXPECT_EQ(Text(attachment, "title"), Letter().file_name);  // escaped, and read back whole
  EXPECT_EQ(attachment.fields().at("size").number_value(), 123456);
  EXPECT_EQ(Text(attachment, "url"), "content/fr-1.r0123");
  EXPECT_EQ(Text(attachment, "creation"), "2027-01-15T08:00:00.12345Z");
  ASSERT_EQ(d.fields().at("extension").list_value().values_size(), 1);
  EXPECT_EQ(Text(First(d, "extension"), "url"), kFhirContentSha256Url);
  EXPECT_EQ(Text(First(d, "extension"), "valueBase64Binary"),
            "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=");
}

TEST(FhirDocumentReferenceTest, KindsAndAnArchivedRecordsRetentionEnd) {
  RecordInfo scan = Letter();
  scan.kind = RecordKind::kImaging;
  EXPECT_EQ(Text(First(First(Parse(FhirDocumentReferenceJson(scan)), "category"), "coding"),
                 "code"),
            "imaging");
  RecordInfo report = Letter();
  report.kind = RecordKind::kReport;
  report.state = RecordState::kArchived;
  report.retain_until = absl::FromUnixSeconds(2'000'000'000);
  const Struct d = Parse(FhirDocumentReferenceJson(report));
  EXPECT_EQ(Text(First(First(d, "category"), "coding"), "code"), "report");
  const auto& extensions = d.fields().at("extension").list_value().values();
  ASSERT_EQ(extensions.size(), 2);
  EXPECT_EQ(Text(extensions[1].struct_value(), "url"), kFhirRetainUntilUrl);
  EXPECT_EQ(Text(extensions[1].struct_value(), "valueInstant"), "2033-05-18T03:33:20Z");
}

}  // namespace
}  // namespace medgate::sharing
