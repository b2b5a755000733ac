// Small conversions every gRPC adapter needs: timestamps, request ids, page sizes.
#ifndef MEDGATE_LIBS_SERVER_RPC_UTIL_H_
#define MEDGATE_LIBS_SERVER_RPC_UTIL_H_

#include <string>

#include <google/protobuf/timestamp.pb.h>
#include <grpcpp/server_context.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/audit/audit_log.h"
#include "libs/identity/authz.h"
#include "libs/identity/principal.h"

namespace medgate {

// Whether `ts` is a Timestamp proto3 allows: years 1 to 9999, nanos 0 to 999,999,999.
bool IsValidTimestamp(const google::protobuf::Timestamp& ts);

google::protobuf::Timestamp ToProtoTimestamp(absl::Time t);
absl::Time FromProtoTimestamp(const google::protobuf::Timestamp& ts);
// A request's timestamp field: INVALID_ARGUMENT naming `field` outside the range a Timestamp may
// hold (years 1 to 9999, nanos 0 to 999,999,999), so no later arithmetic or SQL overflows.
absl::StatusOr<absl::Time> TimeFromProto(const google::protobuf::Timestamp& ts,
                                         absl::string_view field);

// A server-side request id ("srv-" + 24 hex digits) for callers that sent none.
std::string NewRequestId();

inline constexpr size_t kMaxRequestIdBytes = 64;

// Who asks, for the audit entry: the authorized caller, its request id and its address.
struct CallContext {
  Principal principal;
  std::string request_id;
  std::string origin;
};

// Authorizes the call with `policy` and builds its context. A request id is at most 64 bytes
// of printable ASCII (INVALID_ARGUMENT otherwise); an empty one is replaced by NewRequestId().
absl::StatusOr<CallContext> BeginCall(const RpcPolicy& policy,
                                      const grpc::ServerContextBase& context,
                                      absl::string_view method, const std::string& request_id);
// The same for a call whose caller was authorized at its start (`principal`, from
// policy.Authorize), once its request id is known: the tenant gate, which counts the tenant's
// calls, is asked once per call.
absl::StatusOr<CallContext> BeginCall(Principal principal, const grpc::ServerContextBase& context,
                                      const std::string& request_id);

// A permitted action of the caller, for the audit chain.
audit::Entry AuditEntryFor(const CallContext& ctx, audit::Action action,
                           absl::string_view object_type, absl::string_view object_id,
                           absl::string_view tenant, absl::string_view patient_id,
                           absl::string_view reason);

// 0 means `fallback`; larger than `max` is clamped; negative is INVALID_ARGUMENT.
absl::StatusOr<int> PageSize(int requested, int fallback, int max);

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_RPC_UTIL_H_
