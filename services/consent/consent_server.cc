// Wiring of the consent service.
#include "services/consent/consent_server.h"

#include "absl/strings/str_cat.h"
#include "libs/common/status_macros.h"
#include "libs/pg/database_roles.h"
#include "libs/identity/credentials.h"
#include "services/consent/sql.h"

namespace medgate::consent {

absl::StatusOr<ConsentSettings> ParseConsentSettings(const MedgateConfig& config) {
  ConsentSettings settings;
  ASSIGN_OR_RETURN(settings.cache, ParseConsentCacheOptions(config));
  return settings;
}

absl::StatusOr<std::unique_ptr<ConsentServer>> ConsentServer::Create(const MedgateConfig& config) {
  if (config.regions.empty()) return absl::InvalidArgumentError("config key 'regions': missing");
  for (size_t i = 0; i < config.regions.size(); ++i) {
    if (absl::Status s = ValidateRegionId(config.regions[i].id); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config key 'regions[", i, "].id': ", s.message()));
    }
  }
  ASSIGN_OR_RETURN(const ServiceEndpoint* self, config.Service("consent"));
  ASSIGN_OR_RETURN(const ServiceEndpoint* routing, config.Service("routing"));
  ASSIGN_OR_RETURN(ConsentSettings settings, ParseConsentSettings(config));
  // Routing is called with this service's own certificate.
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeServiceChannel(*routing, self->tls);
  if (!channel.ok()) {
    return absl::Status(channel.status().code(),
                        absl::StrCat("services.routing.address: ", channel.status().message()));
  }
  ASSIGN_OR_RETURN(MedgateConfig own, pg::ConfigAs(config, pg::kConsentRole));
  return std::unique_ptr<ConsentServer>(
      new ConsentServer(std::move(own), std::move(settings), *std::move(channel)));
}

ConsentServer::ConsentServer(MedgateConfig config, ConsentSettings settings,
                             std::shared_ptr<grpc::Channel> routing_channel)
    : config_(std::move(config)) {
  shards_ = std::make_unique<pg::ShardSet>(config_.regions, sql::Statements());
  routing_ = NewRoutingClient(routing_channel);
  tenant_gate_ = NewRoutingTenantGate(std::move(routing_channel),
                                      TenantGateOptions::FromLimits(config_.limits));
  cache_ = NewConsentCache(config_.regions, settings.cache);
  core_ = std::make_unique<ConsentCore>(*routing_, *shards_, *cache_, config_.trust_domain);
  service_ = std::make_unique<ConsentService>(*core_, config_.trust_domain, tenant_gate_.get(),
                                              ConfiguredServiceIdentities(config_));
  server_ = std::make_unique<ServiceServer>(config_, "consent");
}

absl::Status ConsentServer::Start() {
  server_->AddService(service_.get());
  // Serving while any shard answers: one region down must not take the others' patients with it.
  server_->SetHealthProbe([this] { return shards_->PingAny(); }, absl::Seconds(2));
  return server_->Start();
}

}  // namespace medgate::consent
