// Small conversions every gRPC adapter needs: timestamps, request ids, page sizes.
#ifndef MEDGATE_LIBS_SERVER_RPC_UTIL_H_
#define MEDGATE_LIBS_SERVER_RPC_UTIL_H_

#include <string>

#include <google/protobuf/timestamp.pb.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace medgate {

google::protobuf::Timestamp ToProtoTimestamp(absl::Time t);
absl::Time FromProtoTimestamp(const google::protobuf::Timestamp& ts);

// A server-side request id ("srv-" + 24 hex digits) for callers that sent none.
std::string NewRequestId();

// 0 means `fallback`; larger than `max` is clamped; negative is INVALID_ARGUMENT.
absl::StatusOr<int> PageSize(int requested, int fallback, int max);

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_RPC_UTIL_H_
