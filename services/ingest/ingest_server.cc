// Wiring of the ingest service.
#include "services/ingest/ingest_server.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/identity/credentials.h"
#include "libs/pg/database_roles.h"
#include "libs/routing_client/reassign_window.h"
#include "services/ingest/sql.h"

namespace medgate::ingest {

absl::StatusOr<IngestSettings> ParseIngestSettings(const MedgateConfig& config) {
  IngestSettings s;
  // Each stream has at most one batch with the workers: by default four times as many batches as
  // one connection may carry streams.
  const int64_t default_waiting = int64_t{4} * config.limits.max_concurrent_streams;
  s.max_waiting_batches = static_cast<size_t>(default_waiting);
  RETURN_IF_ERROR(CheckDeviceReassignWindow(config));
  ASSIGN_OR_RETURN(int64_t device_ttl, DeviceCacheTtlSeconds(config));
  s.device_cache_ttl = absl::Seconds(device_ttl);
  if (!config.root.Has("ingest")) return s;
  ASSIGN_OR_RETURN(ConfigNode node, config.root.Child("ingest"));
  RETURN_IF_ERROR(node.OnlyKeys({"tenant_samples_per_second", "tenant_burst", "max_sample_age_hours",
                                 "max_queued_batches", "max_rows_per_transaction", "linger_ms",
                                 "worker_threads", "max_waiting_batches", "writers_per_region",
                                 "device_cache_ttl_seconds", "enqueue_wait_ms",
                                 "stats_interval_ms", "partition_check_minutes",
                                 "max_queued_rows", "max_streams_per_device", "instances",
                                 "max_reads_per_tenant", "read_idle_timeout_seconds",
                                 "read_min_bytes_per_second",
                                 "partition_lock_timeout_ms", "max_batch_wait_ms"}));
  ASSIGN_OR_RETURN(int64_t rate, node.Int("tenant_samples_per_second", 1, 10000000, 50000));
  // A burst below the largest batch would refuse such a batch forever, however long it waits.
  ASSIGN_OR_RETURN(int64_t burst, node.Int("tenant_burst", static_cast<int64_t>(kMaxSamplesPerBatch),
                                           100000000, 100000));
  ASSIGN_OR_RETURN(int64_t age, node.Int("max_sample_age_hours", 1, 24 * 365, 24 * 30));
  ASSIGN_OR_RETURN(int64_t queued, node.Int("max_queued_batches", 1, 1000000, 4096));
  ASSIGN_OR_RETURN(int64_t queued_rows, node.Int("max_queued_rows", 1, 100000000, 200000));
  ASSIGN_OR_RETURN(int64_t rows, node.Int("max_rows_per_transaction", 1, 1000000, 20000));
  ASSIGN_OR_RETURN(int64_t linger, node.Int("linger_ms", 0, 1000, 2));
  ASSIGN_OR_RETURN(int64_t workers, node.Int("worker_threads", 1, 256, 8));
  ASSIGN_OR_RETURN(int64_t waiting,
                   node.Int("max_waiting_batches", 1, 10000000, default_waiting));
  ASSIGN_OR_RETURN(int64_t lanes, node.Int("writers_per_region", 1, 64, 4));
  ASSIGN_OR_RETURN(int64_t enqueue_wait, node.Int("enqueue_wait_ms", 1, 600000, 10000));
  ASSIGN_OR_RETURN(int64_t batch_wait, node.Int("max_batch_wait_ms", 100, 600000, 10000));
  ASSIGN_OR_RETURN(int64_t stats_interval, node.Int("stats_interval_ms", 100, 3600000, 10000));
  ASSIGN_OR_RETURN(int64_t partition_check, node.Int("partition_check_minutes", 1, 24 * 60, 60));
  ASSIGN_OR_RETURN(int64_t device_streams, node.Int("max_streams_per_device", 1, 1000, 4));
  ASSIGN_OR_RETURN(int64_t reads_per_tenant, node.Int("max_reads_per_tenant", 1, 10000, 16));
  ASSIGN_OR_RETURN(int64_t read_idle, node.Int("read_idle_timeout_seconds", 1, 3600, 30));
  ASSIGN_OR_RETURN(int64_t read_rate,
                   node.Int("read_min_bytes_per_second", 1, int64_t{1} << 30, 16 * 1024));
  ASSIGN_OR_RETURN(int64_t partition_lock, node.Int("partition_lock_timeout_ms", 100, 60000, 1000));
  // The tenant quota is the deployment's: each of the instances that share a tenant's streams
  // (the load balancer spreads its devices' connections over them) enforces its share. Its burst
  // still lets the largest batch through.
  ASSIGN_OR_RETURN(int64_t instances, node.Int("instances", 1, 1000, 1));
  s.instances = static_cast<int>(instances);
  s.core.tenant_samples_per_second = static_cast<double>(rate) / static_cast<double>(instances);
  s.core.tenant_burst = std::max(static_cast<double>(burst) / static_cast<double>(instances),
                                 static_cast<double>(kMaxSamplesPerBatch));
  s.core.validation.max_age = absl::Hours(age);
  s.writer.max_queued_requests = static_cast<size_t>(queued);
  s.writer.max_queued_rows = static_cast<size_t>(queued_rows);
  s.writer.max_rows_per_transaction = static_cast<size_t>(rows);
  s.writer.linger = absl::Milliseconds(linger);
  s.worker_threads = static_cast<int>(workers);
  s.max_waiting_batches = static_cast<size_t>(waiting);
  s.writers_per_region = static_cast<int>(lanes);
  s.core.enqueue_wait = absl::Milliseconds(enqueue_wait);
  s.writer.max_batch_wait = absl::Milliseconds(batch_wait);
  s.writer.stats_interval = absl::Milliseconds(stats_interval);
  s.partition_check = absl::Minutes(partition_check);
  s.max_streams_per_device = static_cast<int>(device_streams);
  s.reads.max_per_tenant = static_cast<int>(reads_per_tenant);
  s.reads.idle_timeout = absl::Seconds(read_idle);
  s.reads.min_bytes_per_second = read_rate;
  s.partition_lock_timeout = absl::Milliseconds(partition_lock);
  return s;
}

absl::StatusOr<std::unique_ptr<IngestServer>> IngestServer::Create(const MedgateConfig& given) {
  if (given.regions.empty()) return absl::InvalidArgumentError("config key 'regions': missing");
  RETURN_IF_ERROR(given.Service("ingest").status());
  RETURN_IF_ERROR(given.Service("routing").status());
  ASSIGN_OR_RETURN(IngestSettings settings, ParseIngestSettings(given));
  ASSIGN_OR_RETURN(MedgateConfig own, pg::ConfigAs(given, pg::kIngestRole));
  std::unique_ptr<IngestServer> server(new IngestServer(std::move(own), std::move(settings)));
  const MedgateConfig& config = server->config_;
  const ServiceEndpoint* self = *config.Service("ingest");
  const ServiceEndpoint* routing = *config.Service("routing");
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel, MakeServiceChannel(*routing, self->tls));
  RoutingClientOptions routing_options;
  routing_options.device_ttl = server->settings_.device_cache_ttl;
  // A device streaming at least once per TTL keeps its answer fresh in the background instead of
  // holding a batch for a routing round trip every TTL.
  routing_options.refresh_ahead = true;
  server->routing_ = NewRoutingClient(channel, routing_options);
  server->tenant_gate_ =
      NewRoutingTenantGate(std::move(channel), TenantGateOptions::FromLimits(config.limits));
  // Bounded as the consent service's own cache is (consent.cache.*).
  ASSIGN_OR_RETURN(consent::ConsentCacheOptions consent_options,
                   consent::ParseConsentCacheOptions(config));
  server->consent_ = consent::NewConsentCache(config.regions, consent_options);
  std::map<std::string, std::vector<VitalsWriter*>> writers;
  for (const std::string& region : server->shards_->RegionIds()) {
    for (int lane = 0; lane < server->settings_.writers_per_region; ++lane) {
      auto writer = std::make_unique<VitalsWriter>(region, config.FindRegion(region)->db,
                                                   server->settings_.writer);
      writers[region].push_back(writer.get());
      server->writers_.push_back(std::move(writer));
    }
  }
  IngestOptions core = server->settings_.core;
  const int workers = server->settings_.worker_threads;
  core.max_waiting_per_region = std::max(1, workers / 2);
  core.max_waiting = std::max(1, workers - std::max(1, workers / 4));
  server->core_ = std::make_unique<IngestCore>(*server->routing_, *server->consent_,
                                               std::move(writers), core);
  server->executor_ = std::make_unique<StreamExecutor>(server->settings_.worker_threads,
                                                       server->settings_.max_waiting_batches);
  server->service_ = std::make_unique<IngestService>(*server->core_, *server->routing_,
                                                     *server->consent_, *server->shards_,
                                                     config.trust_domain, *server->executor_,
                                                     server->settings_.writer.stats_interval,
                                                     server->tenant_gate_.get(),
                                                     server->server_->peer_certificates(),
                                                     server->settings_.max_streams_per_device,
                                                     server->settings_.reads);
  return server;
}

IngestServer::IngestServer(MedgateConfig config, IngestSettings settings)
    : config_(std::move(config)), settings_(std::move(settings)) {
  shards_ = std::make_unique<pg::ShardSet>(config_.regions, sql::Statements());
  server_ = std::make_unique<ServiceServer>(config_, "ingest");
  // Device streams carry small batches and acks: a BDP probe would cost more than each message.
  server_->DisableBdpProbe();
  server_->LimitReceivedMessages(static_cast<int>(kMaxBatchMessageBytes));
}

IngestServer::~IngestServer() {
  if (partition_keeper_) partition_keeper_->Stop();
  // Stop accepting streams first, then the writers (which answer what they still hold).
  server_->Shutdown();
  writers_.clear();
}

void IngestServer::Shutdown() {
  if (partition_keeper_) partition_keeper_->Stop();
  server_->Shutdown();
}

absl::Duration IngestServer::MakePartitions() {
  bool all = true;
  for (const std::string& region : shards_->RegionIds()) {
    absl::Status made = [&]() -> absl::Status {
      ASSIGN_OR_RETURN(pg::Pool * pool, shards_->Get(region));
      const int64_t lock_timeout_ms = absl::ToInt64Milliseconds(settings_.partition_lock_timeout);
      return pool->Transact([&](pqxx::work& txn) {
        // Making a partition takes an ACCESS EXCLUSIVE lock on vitals: while it waits for one
        // (behind a long read), every write and read of the region queues behind it. It gives up
        // after ingest.partition_lock_timeout_ms instead (UNAVAILABLE, which the pool does not
        // retry), and the next pass (within a minute) tries again; the month it makes is a year
        // ahead.
        txn.exec0(absl::StrCat("SET LOCAL lock_timeout = ", lock_timeout_ms));
        txn.exec_prepared(sql::kEnsurePartitions);
        return absl::OkStatus();
      });
    }();
    if (!made.ok()) {
      all = false;
      log::Warning("vitals_partitions_not_made",
                   {{"region", region},
                    {"error", made.message()},
                    {"lock_timeout_ms", absl::ToInt64Milliseconds(settings_.partition_lock_timeout)}});
    }
  }
  if (all) partition_passes_.fetch_add(1);
  // A pass that missed a region comes again within a minute.
  return all ? settings_.partition_check : std::min(settings_.partition_check, absl::Minutes(1));
}

absl::Status IngestServer::Start() {
  server_->AddService(service_.get());
  // Serving while any shard answers: a region down gets retryable acks for its own batches, and
  // must not take the other regions' devices with it.
  server_->SetHealthProbe([this] { return shards_->PingAny(); }, absl::Seconds(2));
  RETURN_IF_ERROR(server_->Start());
  partition_keeper_ =
      std::make_unique<PeriodicTask>(absl::ZeroDuration(), [this](PeriodicTask&) { return MakePartitions(); });
  return absl::OkStatus();
}

}  // namespace medgate::ingest
