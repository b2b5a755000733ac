// The one way every medgate service builds and runs its gRPC server: mTLS, health, limits, drain.
#ifndef MEDGATE_LIBS_SERVER_SERVICE_SERVER_H_
#define MEDGATE_LIBS_SERVER_SERVICE_SERVER_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/identity/peer_certificates.h"
#include "libs/server/health_service.h"

namespace medgate {

// How long a connection may take to finish its TLS handshake before the server closes it.
inline constexpr int kHandshakeTimeoutMs = 10'000;

class ServiceServer {
 public:
  // `service_name` selects services.<name> in the config: listen address and certificate.
  ServiceServer(const MedgateConfig& config, std::string service_name);
  ~ServiceServer();

  ServiceServer(const ServiceServer&) = delete;
  ServiceServer& operator=(const ServiceServer&) = delete;

  // Registers a service (sync or callback); call before Start. Not owned.
  void AddService(grpc::Service* service);

  // Polled every `interval`: while it fails, the health service answers NOT_SERVING.
  void SetHealthProbe(std::function<absl::Status()> probe, absl::Duration interval);

  // For a service whose streams carry small messages (ingest): no bandwidth-delay-product probe
  // (see ChannelOptions::bdp_probe in libs/identity/credentials.h). Call before Start.
  void DisableBdpProbe() { bdp_probe_ = false; }
  // For a service whose requests are small (ingest): messages received over `bytes` (and over
  // limits.max_message_bytes) end their call with RESOURCE_EXHAUSTED before they are parsed into
  // memory, where a message of many empty elements takes dozens of times its size. Call before
  // Start.
  void LimitReceivedMessages(int bytes) { max_receive_bytes_ = bytes; }

  // Builds the server, binds the listen address (port 0 picks a free port) over mTLS only.
  absl::Status Start();

  int port() const { return port_; }
  grpc::Server* server() { return server_.get(); }

  // The expiry and revocation checks the server applies to every call (from its endpoint's
  // crl_dir and CA), for a service to apply again on each message of a long stream. Never null.
  const std::shared_ptr<PeerCertificates>& peer_certificates() const { return peer_certificates_; }

  // The server's grpc.health.v1.Health service. Never null.
  const HealthService& health() const { return *health_; }

  // Forces the health status (the probe, if any, overrides it at its next run).
  void SetServing(bool serving);

  // Stops accepting calls, lets in-flight calls finish within the drain deadline, then cancels.
  void Shutdown();

  // Blocks until SIGTERM or SIGINT, then Shutdown(). BlockTerminationSignals() must have been
  // called at the start of main, before any thread was created.
  void RunUntilSignal();
  static void BlockTerminationSignals();
  // Blocks until SIGTERM or SIGINT (blocked by BlockTerminationSignals()) and logs that `binary`
  // drains. For a binary that runs several servers and drains them together.
  static void WaitForTerminationSignal(absl::string_view binary);

 private:
  void HealthLoop();

  const MedgateConfig& config_;
  const std::string service_name_;
  std::vector<grpc::Service*> services_;
  std::shared_ptr<PeerCertificates> peer_certificates_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool bdp_probe_ = true;
  int max_receive_bytes_ = 0;  // 0: limits.max_message_bytes

  std::function<absl::Status()> probe_;
  absl::Duration probe_interval_ = absl::Seconds(2);
  std::thread health_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::atomic<bool> shut_down_{false};
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_SERVICE_SERVER_H_
