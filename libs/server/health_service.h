// The standard gRPC health service (grpc.health.v1.Health), served by every medgate server in
// place of gRPC's own, whose Watch streams have no bound: any identity the server accepts could
// open as many as its connections carry, each held until the caller goes away.
#ifndef MEDGATE_LIBS_SERVER_HEALTH_SERVICE_H_
#define MEDGATE_LIBS_SERVER_HEALTH_SERVICE_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"

namespace medgate {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  // Watches open at once: at most `max_watches_per_caller` for one caller identity (the SPIFFE
  // id of its certificate, of `trust_domain`) and `max_watches` in all; one more is
  // RESOURCE_EXHAUSTED. Only service and ops identities may watch (a device's or a tenant's is
  // PERMISSION_DENIED); any may check. The server starts NOT_SERVING.
  HealthService(std::string trust_domain, int max_watches_per_caller, int max_watches);
  ~HealthService() override;

  HealthService(const HealthService&) = delete;
  HealthService& operator=(const HealthService&) = delete;

  // SERVING or NOT_SERVING; each open watch is told of a change. No effect after Shutdown.
  void SetServing(bool serving);
  // NOT_SERVING for good: each open watch is told so and ends UNAVAILABLE, so that a server's
  // drain does not wait for its watchers, and a new watch is refused UNAVAILABLE.
  void Shutdown();

  // Watches open now, in all and of one caller identity.
  int watches() const;
  int watches_of(const std::string& spiffe_id) const;

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class WatchReactor;
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;

  void Remove(WatchReactor* watch);

  const std::string trust_domain_;
  const int max_watches_per_caller_;
  const int max_watches_;

  mutable std::mutex mu_;
  Status status_ = grpc::health::v1::HealthCheckResponse::NOT_SERVING;
  uint64_t change_ = 0;  // counts the changes of status_, so that watches take them in order
  bool shut_down_ = false;
  std::set<WatchReactor*> watches_;
  std::map<std::string, int> watches_by_caller_;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_HEALTH_SERVICE_H_
