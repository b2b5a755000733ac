// Wiring of the routing service.
#include "services/routing/routing_server.h"

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/pg/database_roles.h"
#include "libs/routing_client/reassign_window.h"
#include "services/routing/sql.h"

namespace medgate::routing {

absl::StatusOr<RoutingSettings> ParseRoutingSettings(const MedgateConfig& config) {
  RoutingSettings settings;
  RETURN_IF_ERROR(CheckDeviceReassignWindow(config));
  ASSIGN_OR_RETURN(int64_t wait, DeviceReassignWaitSeconds(config));
  settings.device_reassign_wait = absl::Seconds(wait);
  if (!config.root.Has("routing")) return settings;
  ASSIGN_OR_RETURN(ConfigNode routing, config.root.Child("routing"));
  RETURN_IF_ERROR(routing.OnlyKeys({"seed_rules", "device_reassign_wait_seconds"}));
  ASSIGN_OR_RETURN(std::vector<ConfigNode> rules, routing.Sequence("seed_rules", false));
  for (const ConfigNode& node : rules) {
    RETURN_IF_ERROR(node.OnlyKeys({"territory", "regions", "readable_from"}));
    RuleInfo rule;
    ASSIGN_OR_RETURN(rule.territory, node.String("territory"));
    ASSIGN_OR_RETURN(rule.region_ids, node.Strings("regions", true));
    ASSIGN_OR_RETURN(rule.readable_from, node.Strings("readable_from", false));
    settings.seed_rules.push_back(std::move(rule));
  }
  return settings;
}

absl::StatusOr<std::unique_ptr<RoutingServer>> RoutingServer::Create(const MedgateConfig& config) {
  if (!config.control_db) {
    return absl::InvalidArgumentError("config key 'control_db': missing (routing owns it)");
  }
  if (config.regions.empty()) return absl::InvalidArgumentError("config key 'regions': missing");
  RETURN_IF_ERROR(config.Service("routing").status());
  ASSIGN_OR_RETURN(RoutingSettings settings, ParseRoutingSettings(config));
  ASSIGN_OR_RETURN(MedgateConfig own, pg::ConfigAs(config, pg::kRoutingRole));
  return std::unique_ptr<RoutingServer>(new RoutingServer(std::move(own), std::move(settings)));
}

RoutingServer::RoutingServer(MedgateConfig config, RoutingSettings settings)
    : config_(std::move(config)), settings_(std::move(settings)) {
  pg::PoolOptions options = pg::PoolOptions::FromConfig("control", *config_.control_db);
  options.statements = sql::Statements();
  control_ = std::make_unique<pg::Pool>(std::move(options));
  shards_ = std::make_unique<pg::ShardSet>(config_.regions, std::vector<pg::Statement>{});
  std::vector<residency::Region> regions;
  for (const RegionConfig& r : config_.regions) {
    residency::Region region;
    region.id = r.id;
    region.territories.insert(r.territories.begin(), r.territories.end());
    regions.push_back(std::move(region));
  }
  core_ = std::make_unique<RoutingCore>(*control_, *shards_, std::move(regions),
                                        settings_.device_reassign_wait);
  service_ = std::make_unique<RoutingService>(*core_, config_.trust_domain,
                                              TenantGateOptions::FromLimits(config_.limits),
                                              ConfiguredServiceIdentities(config_));
  server_ = std::make_unique<ServiceServer>(config_, "routing");
}

absl::Status RoutingServer::SeedIfNeeded() {
  if (seeded_ || settings_.seed_rules.empty()) return absl::OkStatus();
  CallContext ctx;
  ctx.principal.kind = PrincipalKind::kService;
  // The identity its certificate carries (checked when the server starts); Create checked that
  // the service is configured.
  ctx.principal.spiffe_id = (*config_.Service("routing"))->identity;
  ctx.principal.name = ctx.principal.spiffe_id.substr(ctx.principal.spiffe_id.rfind('/') + 1);
  ctx.request_id = "seed-rules";
  ctx.origin = "config";
  absl::Status status = core_->SeedRules(ctx, settings_.seed_rules);
  if (status.ok()) seeded_ = true;
  return status;
}

absl::Status RoutingServer::Start() {
  // A seed rule that is invalid for the configured regions is a configuration error.
  absl::Status seeded = SeedIfNeeded();
  if (!seeded.ok() && seeded.code() != absl::StatusCode::kUnavailable &&
      seeded.code() != absl::StatusCode::kResourceExhausted) {
    return absl::Status(seeded.code(), absl::StrCat("routing.seed_rules: ", seeded.message()));
  }
  server_->AddService(service_.get());
  server_->SetHealthProbe(
      [this]() -> absl::Status {
        core_->RefreshRegionHealth();
        RETURN_IF_ERROR(control_->Ping());
        return SeedIfNeeded();
      },
      absl::Seconds(2));
  return server_->Start();
}

}  // namespace medgate::routing
