// Asks a server's standard gRPC health service (grpc.health.v1.Health/Check, the empty service
// name) how it is, as a load balancer or an orchestrator's probe would.
#ifndef MEDGATE_TESTS_SUPPORT_HEALTH_CHECK_H_
#define MEDGATE_TESTS_SUPPORT_HEALTH_CHECK_H_

#include <memory>
#include <string>

#include <grpcpp/channel.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/server/health_check.h"
#include "tests/support/pg_cluster.h"

namespace medgate::test_support {

using ::medgate::CheckHealth;
using ::medgate::Health;
using ::medgate::HealthName;

// Asks until the answer is `want`: OK then, DEADLINE_EXCEEDED naming the last answer (or the
// call's error) once `deadline` has passed.
absl::Status WaitForHealth(const std::shared_ptr<grpc::Channel>& channel, Health want,
                           absl::Time deadline);

// A service that serves while any region's shard answers: stops every region's shard of
// `clusters`, expects NOT_SERVING, starts `first` again and expects SERVING while the others are
// still down. Every shard is running again when it returns, whatever it found.
absl::Status ExpectServingWhileAnyRegionAnswers(const std::shared_ptr<grpc::Channel>& channel,
                                                PgClusterSet& clusters, const std::string& first,
                                                absl::Time deadline);

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_HEALTH_CHECK_H_
