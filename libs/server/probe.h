// `BINARY --config FILE --probe NAME[,NAME...]`: a pod's readiness probe, run next to the service;
// `--liveness NAME[,NAME...]`: its liveness probe.
#ifndef MEDGATE_LIBS_SERVER_PROBE_H_
#define MEDGATE_LIBS_SERVER_PROBE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/common/config.h"

namespace medgate {

// Where a probe reaches a server listening on `listen` from the same host: the loopback address
// for a wildcard one (0.0.0.0 -> 127.0.0.1, [::] -> localhost, which is tried on IPv6 and IPv4),
// the address itself otherwise.
// INVALID_ARGUMENT for port 0 (the port is only known to the running server) or no port.
absl::StatusOr<std::string> LocalAddressOf(absl::string_view listen);

// How long a probe waits for each server's answer (they are asked at once): an orchestrator's
// probe timeout must be longer. A liveness probe waits longer: a busy pod (its CPU throttled)
// must not be restarted for a slow answer.
inline constexpr absl::Duration kProbeDeadline = absl::Seconds(3);
inline constexpr absl::Duration kLivenessDeadline = absl::Seconds(7);

// What a probe asks of the servers.
enum class ProbeKind {
  // Every server SERVING: the pod may take calls (readiness).
  kReady,
  // Every server answering within kLivenessDeadline, NOT_SERVING included (its shards down)
  // (liveness). Only a server that gives no answer in time (DEADLINE_EXCEEDED) or cannot be
  // reached (UNAVAILABLE: a draining one too, briefly) fails it, so a database outage, which
  // restarting cannot mend, restarts nothing. gRPC answers the health check on its own threads, from the status
  // the service's health loop last set: this finds a server whose gRPC core, TLS or connections
  // are stuck, not handlers stuck in the service's own code (their calls' deadlines and the
  // services' bounds deal with those).
  kAlive,
};

// Asks each named service's server, on its own listening port and over mTLS with that service's
// own certificate, for its standard gRPC health. Prints "NAME: SERVING" (or the answer, or the
// error) per service on stdout. Returns 0 when every one passes `kind`, 1 otherwise, 2 when a name
// is not a service of the configuration or its listening address cannot be probed.
int ProbeServices(const MedgateConfig& config, absl::string_view names,
                  ProbeKind kind = ProbeKind::kReady);

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_PROBE_H_
