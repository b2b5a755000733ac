// The Audit gRPC adapter.
#include "services/sharing/audit_service.h"

#include "absl/strings/str_cat.h"
#include "libs/common/grpc_status.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/server/rpc_util.h"

namespace medgate::sharing {
namespace {

using K = PrincipalKind;

// A report reads every kind of the patient's data in the home shard and asks every other shard:
// it counts as this many calls against its tenant's call rate.
constexpr double kPatientDataReportCalls = 10;

v1::AuditAction ActionToProto(audit::Action a) {
  switch (a) {
    case audit::Action::kCreate:
      return v1::AUDIT_ACTION_CREATE;
    case audit::Action::kRead:
      return v1::AUDIT_ACTION_READ;
    case audit::Action::kUpdate:
      return v1::AUDIT_ACTION_UPDATE;
    case audit::Action::kDelete:
      return v1::AUDIT_ACTION_DELETE;
    case audit::Action::kExecute:
      return v1::AUDIT_ACTION_EXECUTE;
  }
  return v1::AUDIT_ACTION_UNSPECIFIED;
}

v1::ChainFault FaultToProto(ChainFault f) {
  switch (f) {
    case ChainFault::kNone:
      return v1::CHAIN_FAULT_UNSPECIFIED;
    case ChainFault::kHashMismatch:
      return v1::CHAIN_FAULT_HASH_MISMATCH;
    case ChainFault::kPrevHashMismatch:
      return v1::CHAIN_FAULT_PREV_HASH_MISMATCH;
    case ChainFault::kSeqGap:
      return v1::CHAIN_FAULT_SEQ_GAP;
    case ChainFault::kBadGenesis:
      return v1::CHAIN_FAULT_BAD_GENESIS;
    case ChainFault::kMalformed:
      return v1::CHAIN_FAULT_MALFORMED_ENTRY;
    case ChainFault::kAnchorMismatch:
      return v1::CHAIN_FAULT_ANCHOR_MISMATCH;
    case ChainFault::kPastHead:
      return v1::CHAIN_FAULT_PAST_HEAD;
  }
  return v1::CHAIN_FAULT_UNSPECIFIED;
}

void ToProto(const audit::StoredEntry& s, v1::AuditEntry* out) {
  const audit::Entry& e = s.entry;
  out->set_seq(static_cast<uint64_t>(s.seq));
  *out->mutable_recorded_at() = ToProtoTimestamp(absl::FromUnixMicros(s.at_us));
  out->set_actor(e.actor);
  out->set_tenant_id(e.tenant);
  out->set_action(ActionToProto(e.action));
  out->set_object_type(e.object_type);
  out->set_object_id(e.object_id);
  out->set_patient_id(e.patient_id);
  out->set_decision(e.decision == audit::Decision::kPermit ? v1::DECISION_PERMIT
                                                           : v1::DECISION_DENY);
  auto [code, detail] = SplitReason(e.reason);
  out->set_reason(code);
  out->set_reason_detail(detail);
  v1::Purpose purpose = v1::PURPOSE_UNSPECIFIED;
  if (!e.purpose.empty()) v1::Purpose_Parse(absl::StrCat("PURPOSE_", e.purpose), &purpose);
  out->set_purpose(purpose);
  out->set_consent_id(e.consent_id);
  out->set_consent_version(e.consent_version);
  out->set_request_id(e.request_id);
  out->set_origin_address(e.origin);
  out->set_prev_hash(s.prev_hash);
  out->set_hash(s.hash);
}

absl::StatusOr<AuditLogRef> LogOf(const v1::AuditLogRef& ref) {
  AuditLogRef log;
  switch (ref.log_case()) {
    case v1::AuditLogRef::kRegionId:
      if (ref.region_id().empty()) return absl::InvalidArgumentError("log.region_id: empty");
      log.region_id = ref.region_id();
      return log;
    case v1::AuditLogRef::kControl:
      if (!ref.control()) return absl::InvalidArgumentError("log.control: must be true when set");
      log.control = true;
      return log;
    default:
      return absl::InvalidArgumentError("log: region_id or control is required");
  }
}

}  // namespace

AuditService::AuditService(AuditCore& core, std::string trust_domain, TenantGate* tenant_gate)
    : core_(core),
      policy_(std::move(trust_domain),
              {{"QueryAudit", {K::kPractitioner, K::kApp, K::kOps}},
               {"VerifyChain", {K::kOps}},
               {"RebaseAnchor", {K::kOps}},
               {"PatientDataReport", {K::kPractitioner, K::kApp, K::kOps},
                kPatientDataReportCalls}}) {
  policy_.set_tenant_gate(tenant_gate);
}

absl::StatusOr<CallContext> AuditService::Begin(grpc::ServerContext* context,
                                                absl::string_view method,
                                                const std::string& request_id) {
  return BeginCall(policy_, *context, method, request_id);
}

grpc::Status AuditService::QueryAudit(grpc::ServerContext* context,
                                      const v1::QueryAuditRequest* request,
                                      v1::QueryAuditResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "QueryAudit");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  AuditQuery query;
  query.patient_id = request->patient_id();
  if (request->has_log()) {
    absl::StatusOr<AuditLogRef> log = LogOf(request->log());
    if (!log.ok()) return ToGrpcStatus(log.status());
    query.log = *log;
  }
  if (request->time_range().has_start_at()) {
    absl::StatusOr<absl::Time> start =
        TimeFromProto(request->time_range().start_at(), "time_range.start_at");
    if (!start.ok()) return ToGrpcStatus(start.status());
    query.start = *start;
  }
  if (request->time_range().has_end_at()) {
    absl::StatusOr<absl::Time> end =
        TimeFromProto(request->time_range().end_at(), "time_range.end_at");
    if (!end.ok()) return ToGrpcStatus(end.status());
    query.end = *end;
  }
  query.actor = request->actor();
  absl::StatusOr<int> page_size = PageSize(request->page_size(), 100, 1000);
  if (!page_size.ok()) return ToGrpcStatus(page_size.status());
  query.page_size = *page_size;
  query.page_token = request->page_token();
  absl::StatusOr<AuditPage> page = core_.Query(*ctx, query);
  if (!page.ok()) return ToGrpcStatus(page.status());
  for (const audit::StoredEntry& e : page->entries) ToProto(e, response->add_entries());
  response->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

grpc::Status AuditService::VerifyChain(grpc::ServerContext* context,
                                       const v1::VerifyChainRequest* request,
                                       v1::VerifyChainResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "VerifyChain");
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<AuditLogRef> log = LogOf(request->log());
  if (!log.ok()) return ToGrpcStatus(log.status());
  // A seq past int64's range turns negative here, and the core refuses it.
  const ChainAnchor anchor{static_cast<int64_t>(request->anchor_seq()), request->anchor_hash()};
  absl::StatusOr<ChainReport> report =
      core_.Verify(*ctx, *log, request->start_seq(), request->end_seq(), anchor,
                   [context] { return context->IsCancelled(); });
  if (!report.ok()) return ToGrpcStatus(report.status());
  response->set_ok(report->ok);
  response->set_entries_checked(static_cast<uint64_t>(report->entries_checked));
  response->set_first_bad_seq(static_cast<uint64_t>(report->first_bad_seq));
  response->set_fault(FaultToProto(report->fault));
  response->set_detail(report->detail);
  response->set_last_seq(static_cast<uint64_t>(report->last_seq));
  response->set_last_hash(report->last_hash);
  response->set_recorded_anchor_seq(static_cast<uint64_t>(report->recorded_anchor_seq));
  response->set_recorded_anchor_log(report->recorded_anchor_log);
  response->set_recorded_anchor_unavailable(
      TruncateUtf8(report->recorded_anchor_unavailable, 1024));
  return grpc::Status::OK;
}

grpc::Status AuditService::RebaseAnchor(grpc::ServerContext* context,
                                        const v1::RebaseAnchorRequest* request,
                                        v1::RebaseAnchorResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "RebaseAnchor", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<AuditLogRef> log = LogOf(request->log());
  if (!log.ok()) return ToGrpcStatus(log.status());
  absl::StatusOr<RebasedAnchor> rebased = core_.RebaseAnchor(*ctx, *log, request->reason());
  if (!rebased.ok()) return ToGrpcStatus(rebased.status());
  response->set_anchor_seq(static_cast<uint64_t>(rebased->anchor.seq));
  response->set_anchor_hash(rebased->anchor.hash);
  for (const std::string& in : rebased->recorded_in) response->add_recorded_in(in);
  for (const std::string& why : rebased->unavailable) {
    response->add_unavailable(TruncateUtf8(why, 1024));
  }
  return grpc::Status::OK;
}

grpc::Status AuditService::PatientDataReport(grpc::ServerContext* context,
                                             const v1::PatientDataReportRequest* request,
                                             v1::PatientDataReportResponse* response) {
  absl::StatusOr<CallContext> ctx = Begin(context, "PatientDataReport", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  absl::StatusOr<PatientReport> report = core_.Report(
      *ctx, request->patient_id(), [context] { return context->IsCancelled(); });
  if (!report.ok()) return ToGrpcStatus(report.status());
  auto at = [](int64_t us) { return ToProtoTimestamp(absl::FromUnixMicros(us)); };
  response->set_patient_id(report->home.patient_id);
  response->set_tenant_id(report->home.tenant_id);
  response->set_territory(report->home.territory);
  response->set_home_region_id(report->home.region_id);
  for (const StoredCount& stored : report->stored) {
    v1::StoredData* out = response->add_stored();
    out->set_kind(stored.kind);
    out->set_count(static_cast<uint64_t>(stored.count));
    if (stored.count > 0) {
      *out->mutable_first_at() = at(stored.first_us);
      *out->mutable_last_at() = at(stored.last_us);
    }
  }
  const bool ops = ctx->principal.kind == PrincipalKind::kOps;
  uint64_t rows_elsewhere = 0;
  uint32_t unanswered = 0;
  for (const RegionRows& held : report->other_regions) {
    rows_elsewhere += static_cast<uint64_t>(held.rows);
    if (!held.unavailable.empty()) ++unanswered;
    if (!ops) continue;  // which regions there are, and which answer, is ops' to know
    v1::RegionHolding* out = response->add_other_regions();
    out->set_region_id(held.region_id);
    out->set_rows(static_cast<uint64_t>(held.rows));
    out->set_unavailable(held.unavailable);
  }
  response->set_other_regions_asked(static_cast<uint32_t>(report->other_regions.size()));
  response->set_other_regions_unanswered(unanswered);
  response->set_rows_elsewhere(rows_elsewhere);
  for (const Accessor& a : report->accessors) {
    v1::DataAccessor* out = response->add_accessors();
    out->set_actor(a.actor);
    out->set_reads(static_cast<uint64_t>(a.reads));
    out->set_writes(static_cast<uint64_t>(a.writes));
    out->set_denied(static_cast<uint64_t>(a.denied));
    *out->mutable_first_at() = at(a.first_us);
    *out->mutable_last_at() = at(a.last_us);
  }
  response->set_accessors_left_out(static_cast<uint64_t>(report->accessors_left_out));
  *response->mutable_as_of() = at(report->as_of_us);
  return grpc::Status::OK;
}

}  // namespace medgate::sharing
