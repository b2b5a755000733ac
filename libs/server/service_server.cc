// The one way every medgate service builds and runs its gRPC server.
#include "libs/server/service_server.h"

#include <algorithm>
#include <csignal>
#include <pthread.h>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/resource_quota.h>

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/identity/credentials.h"
#include "libs/server/request_parse_errors.h"

namespace medgate {

ServiceServer::ServiceServer(const MedgateConfig& config, std::string service_name)
    : config_(config), service_name_(std::move(service_name)) {
  // An endpoint that is not configured fails Start; its checks then have no CRLs to read.
  absl::StatusOr<const ServiceEndpoint*> endpoint = config_.Service(service_name_);
  peer_certificates_ = MakePeerCertificates(endpoint.ok() ? (*endpoint)->tls : TlsConfig{});
  health_ = std::make_unique<HealthService>(config_.trust_domain,
                                            config_.limits.max_health_watches_per_caller,
                                            config_.limits.max_health_watches);
}

ServiceServer::~ServiceServer() { Shutdown(); }

void ServiceServer::AddService(grpc::Service* service) { services_.push_back(service); }

void ServiceServer::SetHealthProbe(std::function<absl::Status()> probe, absl::Duration interval) {
  probe_ = std::move(probe);
  probe_interval_ = interval;
}

absl::Status ServiceServer::Start() {
  absl::StatusOr<const ServiceEndpoint*> endpoint = config_.Service(service_name_);
  if (!endpoint.ok()) return endpoint.status();
  if (absl::Status s = CheckServerIdentity(**endpoint, config_.trust_domain); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("services.", service_name_, ": ", s.message()));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      MakeServerCredentials((*endpoint)->tls, config_.trust_domain, peer_certificates_);
  if (!creds.ok()) return creds.status();

  // gRPC's own health service bounds no Watch streams: this server serves its own.
  grpc::EnableDefaultHealthCheckService(false);
  if (config_.dev_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  const ServerLimits& limits = config_.limits;
  grpc::ServerBuilder builder;
  builder.AddListeningPort((*endpoint)->listen, *creds, &port_);
  builder.SetMaxReceiveMessageSize(max_receive_bytes_ > 0
                                       ? std::min(max_receive_bytes_, limits.max_message_bytes)
                                       : limits.max_message_bytes);
  builder.SetMaxSendMessageSize(limits.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams);
  // One bound on handler threads for every connection together (streams are bounded per
  // connection only).
  grpc::ResourceQuota quota(absl::StrCat("medgate-", service_name_));
  quota.SetMaxThreads(limits.max_threads);
  builder.SetResourceQuota(quota);
  // A bounded connection age makes long-lived clients reconnect, so rotated certificates reach them.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, limits.max_connection_age_seconds * 1000);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             limits.max_connection_age_grace_seconds * 1000);
  if (!bdp_probe_) builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  // Clients' keepalive pings (devices': every 60 s on an idle stream) are not abuse: gRPC's
  // default would count pings under 5 minutes apart and close the connection after two.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 30'000);
  // A client that vanished without closing its connection (a device behind a NAT that dropped
  // it) would keep its streams, and what they hold, for good: a ping after 5 minutes of silence,
  // unanswered for 20 s, closes the connection.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 5 * 60'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20'000);
  // A connection that has not finished its TLS handshake (no certificate shown yet) is closed
  // after 10 s, not gRPC's 120 s: anyone who reaches the port could otherwise hold descriptors
  // and handshakers by opening connections that say nothing.
  builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, kHandshakeTimeoutMs);
  // A request that does not parse is INVALID_ARGUMENT saying so, not gRPC's empty INTERNAL.
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<RequestParseErrorsFactory>());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.RegisterService(health_.get());
  for (grpc::Service* service : services_) builder.RegisterService(service);
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on '", (*endpoint)->listen,
                                               "' for service ", service_name_));
  }
  bool healthy = true;
  if (probe_) {
    // Not serving until the first probe has answered: it may take the databases' connect
    // timeouts (the health service starts NOT_SERVING).
    healthy = probe_().ok();
  }
  SetServing(healthy);
  if (probe_) health_thread_ = std::thread([this] { HealthLoop(); });
  log::Info("server_started", {{"service", service_name_}, {"port", port_},
                               {"serving", healthy}});
  return absl::OkStatus();
}

void ServiceServer::SetServing(bool serving) {
  if (!server_) return;
  health_->SetServing(serving);
}

void ServiceServer::HealthLoop() {
  bool last = true;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, absl::ToChronoMilliseconds(probe_interval_), [this] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    absl::Status status = probe_();
    lock.lock();
    if (stopping_) break;
    if (status.ok() != last) {
      log::Warning("health_changed", {{"service", service_name_}, {"serving", status.ok()},
                                      {"reason", status.message()}});
      last = status.ok();
    }
    SetServing(status.ok());
  }
}

void ServiceServer::Shutdown() {
  if (shut_down_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (server_) {
    // NOT_SERVING and draining at once, without waiting for a health probe that may be in a
    // database call: after Shutdown the health service takes no more changes, and its watches
    // end once told, rather than hold the drain.
    health_->Shutdown();
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(config_.limits.drain_seconds));
    server_->Wait();
  }
  if (health_thread_.joinable()) health_thread_.join();
  if (server_) log::Info("server_stopped", {{"service", service_name_}});
}

void ServiceServer::BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

void ServiceServer::WaitForTerminationSignal(absl::string_view binary) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int signal = 0;
  sigwait(&set, &signal);
  log::Info("draining", {{"service", binary}, {"signal", signal}});
}

void ServiceServer::RunUntilSignal() {
  WaitForTerminationSignal(service_name_);
  Shutdown();
}

}  // namespace medgate
