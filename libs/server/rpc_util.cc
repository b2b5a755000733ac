// Small conversions every gRPC adapter needs.
#include "libs/server/rpc_util.h"

#include <openssl/rand.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace medgate {

google::protobuf::Timestamp ToProtoTimestamp(absl::Time t) {
  google::protobuf::Timestamp ts;
  timespec spec = absl::ToTimespec(t);
  ts.set_seconds(spec.tv_sec);
  ts.set_nanos(static_cast<int32_t>(spec.tv_nsec));
  return ts;
}

absl::Time FromProtoTimestamp(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

bool IsValidTimestamp(const google::protobuf::Timestamp& ts) {
  constexpr int64_t kMinSeconds = -62135596800;  // 0001-01-01T00:00:00Z
  constexpr int64_t kMaxSeconds = 253402300799;  // 9999-12-31T23:59:59Z
  return ts.seconds() >= kMinSeconds && ts.seconds() <= kMaxSeconds && ts.nanos() >= 0 &&
         ts.nanos() <= 999999999;
}

absl::StatusOr<absl::Time> TimeFromProto(const google::protobuf::Timestamp& ts,
                                         absl::string_view field) {
  if (!IsValidTimestamp(ts)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)"));
  }
  return FromProtoTimestamp(ts);
}

std::string NewRequestId() {
  unsigned char bytes[12];
  // As every other use of the CSPRNG here: without it, nothing is safe to go on with (and the
  // buffer would carry stack bytes into the audit log).
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) std::abort();
  return absl::StrCat("srv-", absl::BytesToHexString(absl::string_view(
                                  reinterpret_cast<const char*>(bytes), sizeof(bytes))));
}

absl::StatusOr<CallContext> BeginCall(const RpcPolicy& policy,
                                      const grpc::ServerContextBase& context,
                                      absl::string_view method, const std::string& request_id) {
  absl::StatusOr<Principal> principal = policy.Authorize(context, method);
  if (!principal.ok()) return principal.status();
  return BeginCall(*std::move(principal), context, request_id);
}

absl::StatusOr<CallContext> BeginCall(Principal principal, const grpc::ServerContextBase& context,
                                      const std::string& request_id) {
  if (request_id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: at most ", kMaxRequestIdBytes, " bytes"));
  }
  for (char c : request_id) {
    if (c < 0x20 || c > 0x7e) return absl::InvalidArgumentError("request_id: printable ASCII only");
  }
  CallContext ctx;
  ctx.principal = std::move(principal);
  ctx.request_id = request_id.empty() ? NewRequestId() : request_id;
  ctx.origin = context.peer().substr(0, 128);
  return ctx;
}

audit::Entry AuditEntryFor(const CallContext& ctx, audit::Action action,
                           absl::string_view object_type, absl::string_view object_id,
                           absl::string_view tenant, absl::string_view patient_id,
                           absl::string_view reason) {
  audit::Entry e;
  e.actor = ctx.principal.spiffe_id;
  e.tenant = std::string(tenant);
  e.action = action;
  e.object_type = std::string(object_type);
  e.object_id = std::string(object_id);
  e.patient_id = std::string(patient_id);
  e.decision = audit::Decision::kPermit;
  e.reason = std::string(reason);
  e.request_id = ctx.request_id;
  e.origin = ctx.origin;
  return e;
}

absl::StatusOr<int> PageSize(int requested, int fallback, int max) {
  if (requested < 0) return absl::InvalidArgumentError("page_size: must not be negative");
  if (requested == 0) return fallback;
  return std::min(requested, max);
}

}  // namespace medgate
