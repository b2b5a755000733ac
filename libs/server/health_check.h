// Asks a server's standard gRPC health service (grpc.health.v1.Health/Check, the empty service
// name) how it is, as a load balancer or an orchestrator's probe would.
#ifndef MEDGATE_LIBS_SERVER_HEALTH_CHECK_H_
#define MEDGATE_LIBS_SERVER_HEALTH_CHECK_H_

#include <memory>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace medgate {

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class Health { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };

// "SERVING", "NOT_SERVING", ...
absl::string_view HealthName(Health health);

// The server's answer; the call's error when it gives none within `timeout`.
absl::StatusOr<Health> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                   absl::Duration timeout = absl::Seconds(5));

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_HEALTH_CHECK_H_
