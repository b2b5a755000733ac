// The one mapping between absl::Status and grpc::Status (their codes are the same numbers).
#ifndef MEDGATE_LIBS_COMMON_GRPC_STATUS_H_
#define MEDGATE_LIBS_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace medgate {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_GRPC_STATUS_H_
