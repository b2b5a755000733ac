// The RecordSharing gRPC adapter.
#include "services/sharing/sharing_service.h"

#include <grpc/grpc.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "libs/common/grpc_status.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/server/rpc_util.h"
#include "libs/server/transfer_pace.h"
#include "services/sharing/fhir_document_reference.h"

namespace medgate::sharing {
namespace {

using K = PrincipalKind;

// An export reads every record of a patient: it counts as this many calls against its tenant's
// call rate.
constexpr double kExportCalls = 10;
// Records per ExportPatientRecords call: by default, and at most.
constexpr int kDefaultExportRecords = 20;
constexpr int kMaxExportRecords = 100;

void ToProto(const GrantInfo& g, v1::ShareGrant* out) {
  out->set_grant_id(g.grant_id);
  out->set_record_id(g.record_id);
  out->set_grantee(g.grantee);
  out->set_granted_by(g.granted_by);
  *out->mutable_created_at() = ToProtoTimestamp(g.created_at);
  *out->mutable_expires_at() = ToProtoTimestamp(g.expires_at);
  if (g.revoked_at) *out->mutable_revoked_at() = ToProtoTimestamp(*g.revoked_at);
}

void ToProto(const RecordInfo& r, v1::Record* out) {
  out->set_record_id(r.record_id);
  out->set_patient_id(r.patient_id);
  out->set_kind(static_cast<v1::RecordKind>(r.kind));
  out->set_content_type(r.content_type);
  out->set_file_name(r.file_name);
  out->set_damaged(r.damaged);
  out->set_size_bytes(r.size_bytes);
  out->set_sha256(r.sha256);
  out->set_owner(r.owner);
  *out->mutable_created_at() = ToProtoTimestamp(r.created_at);
  out->set_state(r.state == RecordState::kArchived ? v1::RECORD_STATE_ARCHIVED
                                                   : v1::RECORD_STATE_ACTIVE);
  if (r.retain_until) *out->mutable_retain_until() = ToProtoTimestamp(*r.retain_until);
  for (const GrantInfo& g : r.grants) ToProto(g, out->add_grants());
}

// A server stream that sends health data: each message blocks until the transport takes it, so a
// slow reader slows the transfer. A client that takes nothing for
// sharing.download_idle_timeout_seconds, or takes it under download_min_bytes_per_second, is not
// let keep the thread and the download place the call holds. Only the time spent waiting for the
// client counts: the service's own (the shard, opening chunks) does not.
template <typename Message>
class PacedWriter {
 public:
  // `certificate` (the call's) is checked again before each chunk.
  PacedWriter(SharingCore& core, StallWatch& watch, grpc::ServerContext& context,
              grpc::ServerWriter<Message>* writer, const char* method,
              const PeerCertificates::CallCheck& certificate)
      : writer_(writer),
        method_(method),
        certificate_(certificate),
        stall_(watch, context),
        pace_(stall_, "download", core.download_idle_timeout(),
              core.download_min_bytes_per_second(), "sharing.download_min_bytes_per_second",
              "download again") {}

  // `bytes`: the content `message` carries, which the pace counts.
  grpc::Status Write(const Message& message, size_t bytes) {
    stall_.Blocked();
    const bool written = writer_->Write(message);
    stall_.Unblocked();
    if (!written) {
      if (stall_.fired()) {
        log::Warning("download_idle_timeout", {{"method", method_}});
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "download stalled");
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    pace_.Moved(bytes);
    return grpc::Status::OK;
  }
  // Sends `download`'s chunks, each in `message` as `data` (a field of it), asking before each
  // whether the client keeps the pace: a transfer whose last chunk was taken has ended well.
  grpc::Status SendContent(Download& download, Message& message, std::string* data) {
    while (true) {
      absl::StatusOr<bool> more = download.Next(data);
      if (!more.ok()) return ToGrpcStatus(more.status());
      if (!*more) return grpc::Status::OK;
      if (grpc::Status slow = pace_.Check(); !slow.ok()) return slow;
      // The caller's certificate may have expired, or been revoked, since the call began.
      if (absl::Status good = certificate_.Check(); !good.ok()) return ToGrpcStatus(good);
      if (grpc::Status s = Write(message, data->size()); !s.ok()) return s;
    }
  }

 private:
  grpc::ServerWriter<Message>* const writer_;
  const char* const method_;
  const PeerCertificates::CallCheck& certificate_;
  StallWatch::Call stall_;
  TransferPace pace_;
};

absl::StatusOr<RecordKind> KindOf(v1::RecordKind kind, absl::string_view field, bool required) {
  switch (kind) {
    case v1::RECORD_KIND_DOCUMENT:
      return RecordKind::kDocument;
    case v1::RECORD_KIND_IMAGING:
      return RecordKind::kImaging;
    case v1::RECORD_KIND_REPORT:
      return RecordKind::kReport;
    case v1::RECORD_KIND_UNSPECIFIED:
      if (!required) return RecordKind::kUnspecified;
      return absl::InvalidArgumentError(absl::StrCat(field, ": required"));
    default:
      return absl::InvalidArgumentError(absl::StrCat(field, ": unknown kind"));
  }
}

}  // namespace

SharingService::SharingService(SharingCore& core, std::string trust_domain,
                               TenantGate* tenant_gate, std::shared_ptr<PeerCertificates> peers)
    : core_(core),
      peers_(std::move(peers)),
      max_awaiting_header_(core.max_uploads_per_tenant() *
                           static_cast<int>(std::max<size_t>(1, core.region_count()))),
      upload_watch_(core.upload_idle_timeout(),
                    absl::StrCat("the upload sent nothing for ",
                                 absl::FormatDuration(core.upload_idle_timeout()),
                                 " (sharing.upload_idle_timeout_seconds); nothing was stored, "
                                 "upload again")),
      download_watch_(core.download_idle_timeout(),
                      absl::StrCat("the download took nothing for ",
                                   absl::FormatDuration(core.download_idle_timeout()),
                                   " (sharing.download_idle_timeout_seconds); download again")),
      policy_(std::move(trust_domain), {{"UploadRecord", {K::kPractitioner}},
                                        {"ShareRecord", {K::kPractitioner}},
                                        {"RevokeShare", {K::kPractitioner}},
                                        {"ListRecords", {K::kPractitioner}},
                                        {"DownloadRecord", {K::kPractitioner, K::kOps}},
                                        {"ArchiveRecord", {K::kPractitioner}},
                                        {"EraseRecord", {K::kPractitioner, K::kApp}},
                                        {"ErasePatientRecords", {K::kApp}},
                                        {"ExportPatientRecords", {K::kApp}, kExportCalls}}) {
  policy_.set_tenant_gate(tenant_gate);
}

absl::StatusOr<CallContext> SharingService::Begin(grpc::ServerContext* context,
                                                  absl::string_view method,
                                                  const std::string& request_id) {
  return BeginCall(policy_, *context, method, request_id);
}

grpc::Status SharingService::UploadRecord(grpc::ServerContext* context,
                                          grpc::ServerReader<v1::UploadRecordRequest>* reader,
                                          v1::UploadRecordResponse* response) {
  absl::StatusOr<Principal> principal = policy_.Authorize(*context, "UploadRecord");
  if (!principal.ok()) return ToGrpcStatus(principal.status());
  StallWatch::Call idle(upload_watch_, *context);
  TransferPace pace(idle, "upload", core_.upload_idle_timeout(),
                    core_.upload_min_bytes_per_second(), "sharing.upload_min_bytes_per_second",
                    "nothing was stored");
  auto read = [&](v1::UploadRecordRequest* next) {
    idle.Blocked();
    const bool got = reader->Read(next);
    idle.Unblocked();
    return got;
  };
  auto ended = [&] {
    if (idle.fired()) {
      log::Warning("upload_idle_timeout", {{"method", "UploadRecord"}});
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "upload idle; nothing was stored");
    }
    return grpc::Status(grpc::StatusCode::CANCELLED, "upload cancelled; nothing was stored");
  };
  const PeerCertificates::CallCheck certificate = peers_->ForCall(*context);
  auto still_good = [&] {
    absl::Status good = certificate.Check();
    if (good.ok()) return grpc::Status::OK;
    return ToGrpcStatus(
        absl::Status(good.code(), absl::StrCat(good.message(), "; nothing was stored")));
  };
  std::unique_ptr<BoundedCounts<std::string>::Slot> awaiting =
      awaiting_header_.TryTake(principal->tenant, max_awaiting_header_);
  if (awaiting == nullptr) {
    return ToGrpcStatus(absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", principal->tenant, "' already has ", max_awaiting_header_,
        " uploads waiting for their header (sharing.max_uploads_per_tenant in each region); send "
        "each upload's header first, and retry when one has sent it")));
  }
  v1::UploadRecordRequest message;
  if (!read(&message)) {
    if (context->IsCancelled()) return ended();
    // gRPC reads a message that does not parse as the end of the stream.
    return ToGrpcStatus(absl::InvalidArgumentError(
        "the first message must be the header: the stream ended before it, or it did not parse "
        "as an UploadRecordRequest (every string field, file_name among them, must be valid "
        "UTF-8); nothing was stored"));
  }
  awaiting.reset();
  if (!message.has_header()) {
    return ToGrpcStatus(absl::InvalidArgumentError("the first message must be the header"));
  }
  const v1::UploadRecordHeader& in = message.header();
  // Authorized when the call began: asking the tenant gate again would count the call twice.
  absl::StatusOr<CallContext> ctx = BeginCall(*principal, *context, in.request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<RecordKind> kind = KindOf(in.kind(), "header.kind", true);
  if (!kind.ok()) return ToGrpcStatus(kind.status());
  UploadHeader header;
  header.patient_id = in.patient_id();
  header.kind = *kind;
  header.content_type = in.content_type();
  header.file_name = in.file_name();
  header.size_bytes = in.size_bytes();
  header.sha256 = in.sha256();
  header.request_id = in.request_id();
  // Chunks are read into two messages in turn: the piece last written stays as it is while the
  // next read (which ends the stream) is waited for, as the upload may still be hashing it.
  // Declared before the upload, which is destroyed first.
  v1::UploadRecordRequest chunks[2];
  absl::StatusOr<std::unique_ptr<Upload>> upload = core_.StartUpload(*ctx, header);
  if (!upload.ok()) return ToGrpcStatus(upload.status());
  if (std::optional<UploadResult> earlier = (*upload)->AlreadyStored()) {
    // A retry of an upload already stored: answered now, its content not read.
    response->set_record_id(earlier->record_id);
    response->set_size_bytes(earlier->size_bytes);
    response->set_sha256(earlier->sha256);
    return grpc::Status::OK;
  }
  for (int turn = 0; read(&chunks[turn]); turn ^= 1) {
    const v1::UploadRecordRequest& next = chunks[turn];
    if (!next.has_chunk()) {
      return ToGrpcStatus(absl::InvalidArgumentError(
          "after the header every message must be a chunk; nothing was stored"));
    }
    pace.Moved(next.chunk().data().size());
    if (grpc::Status slow = pace.Check(); !slow.ok()) return slow;
    // The caller's certificate may have expired, or been revoked, since the upload began.
    if (grpc::Status good = still_good(); !good.ok()) return good;
    if (absl::Status s = (*upload)->Write(next.chunk().data()); !s.ok()) {
      return ToGrpcStatus(s);
    }
  }
  if (context->IsCancelled()) return ended();
  // Once more before anything is stored: the certificate may have ended since the last chunk.
  if (grpc::Status good = still_good(); !good.ok()) return good;
  absl::StatusOr<UploadResult> result = (*upload)->Finish();
  if (!result.ok()) return ToGrpcStatus(result.status());
  response->set_record_id(result->record_id);
  response->set_size_bytes(result->size_bytes);
  response->set_sha256(result->sha256);
  return grpc::Status::OK;
}

grpc::Status SharingService::ShareRecord(grpc::ServerContext* context,
                                         const v1::ShareRecordRequest* request,
                                         v1::ShareRecordResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ShareRecord", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  if (!request->has_expires_at()) {
    return ToGrpcStatus(absl::InvalidArgumentError("expires_at: required"));
  }
  absl::StatusOr<absl::Time> expires_at = TimeFromProto(request->expires_at(), "expires_at");
  if (!expires_at.ok()) return ToGrpcStatus(expires_at.status());
  absl::StatusOr<GrantInfo> grant =
      core_.ShareRecord(*ctx, request->record_id(), request->grantee(), *expires_at);
  if (!grant.ok()) return ToGrpcStatus(grant.status());
  response->set_grant_id(grant->grant_id);
  *response->mutable_expires_at() = ToProtoTimestamp(grant->expires_at);
  return grpc::Status::OK;
}

grpc::Status SharingService::RevokeShare(grpc::ServerContext* context,
                                         const v1::RevokeShareRequest* request,
                                         v1::RevokeShareResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "RevokeShare", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<GrantInfo> grant;
  switch (request->target_case()) {
    case v1::RevokeShareRequest::kGrantId:
      // Set but empty is not "look the grant up by record and grantee".
      if (request->grant_id().empty()) {
        return ToGrpcStatus(absl::InvalidArgumentError("grant_id: must not be empty"));
      }
      grant = core_.RevokeShare(*ctx, request->grant_id(), "", "");
      break;
    case v1::RevokeShareRequest::kRecordGrantee:
      grant = core_.RevokeShare(*ctx, "", request->record_grantee().record_id(),
                                request->record_grantee().grantee());
      break;
    default:
      return ToGrpcStatus(absl::InvalidArgumentError("grant_id or record_grantee: required"));
  }
  if (!grant.ok()) return ToGrpcStatus(grant.status());
  response->set_grant_id(grant->grant_id);
  *response->mutable_revoked_at() = ToProtoTimestamp(*grant->revoked_at);
  return grpc::Status::OK;
}

grpc::Status SharingService::ListRecords(grpc::ServerContext* context,
                                         const v1::ListRecordsRequest* request,
                                         v1::ListRecordsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ListRecords", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  ListQuery query;
  switch (request->scope()) {
    case v1::RECORD_SCOPE_MINE:
      query.scope = ListScope::kMine;
      break;
    case v1::RECORD_SCOPE_SHARED_WITH_ME:
      query.scope = ListScope::kSharedWithMe;
      break;
    case v1::RECORD_SCOPE_PATIENT:
      query.scope = ListScope::kPatient;
      break;
    default:
      return ToGrpcStatus(absl::InvalidArgumentError("scope: required"));
  }
  absl::StatusOr<RecordKind> kind = KindOf(request->kind(), "kind", false);
  if (!kind.ok()) return ToGrpcStatus(kind.status());
  query.kind = *kind;
  query.patient_id = request->patient_id();
  query.include_archived = request->include_archived();
  absl::StatusOr<int> page_size = PageSize(request->page_size(), 100, 1000);
  if (!page_size.ok()) return ToGrpcStatus(page_size.status());
  query.page_size = *page_size;
  query.page_token = request->page_token();
  absl::StatusOr<ListResult> result = core_.ListRecords(*ctx, query);
  if (!result.ok()) return ToGrpcStatus(result.status());
  for (const RecordInfo& r : result->records) ToProto(r, response->add_records());
  response->set_next_page_token(result->next_page_token);
  return grpc::Status::OK;
}

grpc::Status SharingService::DownloadRecord(
    grpc::ServerContext* context, const v1::DownloadRecordRequest* request,
    grpc::ServerWriter<v1::DownloadRecordResponse>* writer) {
  absl::StatusOr<CallContext> ctx = Begin(context, "DownloadRecord", "");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<std::unique_ptr<Download>> download =
      core_.OpenDownload(*ctx, request->record_id(), request->break_glass_reason());
  if (!download.ok()) return ToGrpcStatus(download.status());
  const PeerCertificates::CallCheck certificate = peers_->ForCall(*context);
  PacedWriter<v1::DownloadRecordResponse> out(core_, download_watch_, *context, writer,
                                              "DownloadRecord", certificate);
  v1::DownloadRecordResponse message;
  ToProto((*download)->record(), message.mutable_header());
  if (grpc::Status s = out.Write(message, 0); !s.ok()) return s;
  message.Clear();
  return out.SendContent(**download, message, message.mutable_chunk()->mutable_data());
}

grpc::Status SharingService::ExportPatientRecords(
    grpc::ServerContext* context, const v1::ExportPatientRecordsRequest* request,
    grpc::ServerWriter<v1::ExportPatientRecordsResponse>* writer) {
  absl::StatusOr<CallContext> ctx =
      Begin(context, "ExportPatientRecords", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<int> page_size = PageSize(request->page_size(), kDefaultExportRecords,
                                           kMaxExportRecords);
  if (!page_size.ok()) return ToGrpcStatus(page_size.status());
  absl::StatusOr<ExportListing> listing = core_.ListForExport(
      *ctx, request->patient_id(), request->reason(), *page_size, request->page_token());
  if (!listing.ok()) return ToGrpcStatus(listing.status());
  const PeerCertificates::CallCheck certificate = peers_->ForCall(*context);
  PacedWriter<v1::ExportPatientRecordsResponse> out(core_, download_watch_, *context, writer,
                                                    "ExportPatientRecords", certificate);
  v1::ExportPatientRecordsResponse message;
  uint32_t sent = 0;
  for (const std::string& record_id : listing->record_ids) {
    // Before each record is opened (and audited): the certificate may have ended since.
    if (absl::Status good = certificate.Check(); !good.ok()) return ToGrpcStatus(good);
    absl::StatusOr<std::unique_ptr<Download>> download =
        core_.OpenExport(*ctx, request->patient_id(), record_id, request->reason());
    // Erased since the listing: no longer the patient's data to export.
    if (download.status().code() == absl::StatusCode::kNotFound) continue;
    if (!download.ok()) return ToGrpcStatus(download.status());
    const RecordInfo& record = (*download)->record();
    message.Clear();
    v1::ExportedRecord* header = message.mutable_record();
    header->set_record_id(record.record_id);
    header->set_document_reference(absl::StrCat(FhirDocumentReferenceJson(record), "\n"));
    header->set_size_bytes(record.size_bytes);
    header->set_sha256(record.sha256);
    if (grpc::Status s = out.Write(message, 0); !s.ok()) return s;
    message.Clear();
    if (grpc::Status s = out.SendContent(**download, message, message.mutable_content()); !s.ok()) {
      return s;
    }
    ++sent;
  }
  message.Clear();
  message.mutable_page_end()->set_record_count(sent);
  message.mutable_page_end()->set_next_page_token(listing->next_page_token);
  return out.Write(message, 0);
}

grpc::Status SharingService::ArchiveRecord(grpc::ServerContext* context,
                                           const v1::ArchiveRecordRequest* request,
                                           v1::ArchiveRecordResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ArchiveRecord", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  if (!request->has_retain_until()) {
    return ToGrpcStatus(absl::InvalidArgumentError("retain_until: required"));
  }
  absl::StatusOr<absl::Time> retain_until = TimeFromProto(request->retain_until(), "retain_until");
  if (!retain_until.ok()) return ToGrpcStatus(retain_until.status());
  absl::StatusOr<RecordInfo> record =
      core_.ArchiveRecord(*ctx, request->record_id(), *retain_until);
  if (!record.ok()) return ToGrpcStatus(record.status());
  ToProto(*record, response->mutable_record());
  return grpc::Status::OK;
}

grpc::Status SharingService::EraseRecord(grpc::ServerContext* context,
                                         const v1::EraseRecordRequest* request,
                                         v1::EraseRecordResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "EraseRecord", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<absl::Time> erased =
      core_.EraseRecord(*ctx, request->record_id(), request->reason());
  if (!erased.ok()) return ToGrpcStatus(erased.status());
  response->set_record_id(request->record_id());
  *response->mutable_erased_at() = ToProtoTimestamp(*erased);
  return grpc::Status::OK;
}

grpc::Status SharingService::ErasePatientRecords(grpc::ServerContext* context,
                                                 const v1::ErasePatientRecordsRequest* request,
                                                 v1::ErasePatientRecordsResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "ErasePatientRecords", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<PatientErasure> erased =
      core_.ErasePatientRecords(*ctx, request->patient_id(), request->reason());
  if (!erased.ok()) return ToGrpcStatus(erased.status());
  response->set_erased_count(erased->erased_count);
  *response->mutable_erased_at() = ToProtoTimestamp(erased->erased_at);
  return grpc::Status::OK;
}

}  // namespace medgate::sharing
