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
  if (!config.root.Has("consent")) return settings;
  ASSIGN_OR_RETURN(ConfigNode consent, config.root.Child("consent"));
  RETURN_IF_ERROR(consent.OnlyKeys({"cache"}));
  if (!consent.Has("cache")) return settings;
  ASSIGN_OR_RETURN(ConfigNode cache, consent.Child("cache"));
  RETURN_IF_ERROR(cache.OnlyKeys(
      {"max_patients", "max_mib", "max_staleness_ms", "fail_closed_after_ms", "load_timeout_ms"}));
  ConsentCacheOptions& o = settings.cache;
  ASSIGN_OR_RETURN(int64_t max_patients,
                   cache.Int("max_patients", 1, 100000000, static_cast<int64_t>(o.max_patients)));
  ASSIGN_OR_RETURN(int64_t max_mib,
                   cache.Int("max_mib", 1, 1 << 20, static_cast<int64_t>(o.max_bytes >> 20)));
  ASSIGN_OR_RETURN(int64_t staleness, cache.Int("max_staleness_ms", 100, 86400000,
                                                absl::ToInt64Milliseconds(o.max_staleness)));
  // At most a second, the bound on how long a cache may miss a revocation (DOMAIN.md); at least
  // 250 ms, so that the feed's heartbeat fits several times into it.
  ASSIGN_OR_RETURN(int64_t fail_closed, cache.Int("fail_closed_after_ms", 250, 1000,
                                                  absl::ToInt64Milliseconds(o.fail_closed_after)));
  ASSIGN_OR_RETURN(int64_t load_timeout, cache.Int("load_timeout_ms", 10, 60000,
                                                   absl::ToInt64Milliseconds(o.load_timeout)));
  o.max_patients = static_cast<size_t>(max_patients);
  o.max_bytes = static_cast<size_t>(max_mib) << 20;
  o.max_staleness = absl::Milliseconds(staleness);
  o.fail_closed_after = absl::Milliseconds(fail_closed);
  o.load_timeout = absl::Milliseconds(load_timeout);
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
  tenant_gate_ = NewRoutingTenantGate(std::move(routing_channel));
  cache_ = NewConsentCache(config_.regions, settings.cache);
  core_ = std::make_unique<ConsentCore>(*routing_, *shards_, *cache_, config_.trust_domain);
  service_ = std::make_unique<ConsentService>(*core_, config_.trust_domain, tenant_gate_.get());
  server_ = std::make_unique<ServiceServer>(config_, "consent");
}

absl::Status ConsentServer::Start() {
  server_->AddService(service_.get());
  // Serving while any shard answers: one region down must not take the others' patients with it.
  server_->SetHealthProbe([this] { return shards_->PingAny(); }, absl::Seconds(2));
  return server_->Start();
}

}  // namespace medgate::consent
