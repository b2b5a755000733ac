// Wiring of the sharing service.
#include "services/sharing/sharing_server.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/identity/credentials.h"
#include "libs/pg/database_roles.h"
#include "libs/routing_client/routing_client.h"
#include "services/sharing/sql.h"

namespace medgate::sharing {

absl::StatusOr<SharingSettings> ParseSharingSettings(const MedgateConfig& config) {
  if (!config.root.Has("sharing")) {
    return absl::InvalidArgumentError(
        "config key 'sharing': missing (the key-encryption key is required)");
  }
  ASSIGN_OR_RETURN(ConfigNode node, config.root.Child("sharing"));
  RETURN_IF_ERROR(node.OnlyKeys({"kek_file", "kek_env", "tenant_quota_bytes", "tenant_quotas",
                                 "upload_idle_timeout_seconds", "upload_min_bytes_per_second",
                                 "download_idle_timeout_seconds", "download_min_bytes_per_second",
                                 "max_uploads_per_tenant", "max_downloads_per_tenant",
                                 "retention_sweep_seconds", "previous_kek_files",
                                 "kek_rewrap", "kek_rewrap_seconds",
                                 "patient_erasure_timeout_seconds", "audit_anchor_seconds"}));
  SharingSettings settings;
  ASSIGN_OR_RETURN(settings.kek_file, node.String("kek_file", ""));
  ASSIGN_OR_RETURN(settings.kek_env, node.String("kek_env", ""));
  if (settings.kek_file.empty() == settings.kek_env.empty()) {
    return absl::InvalidArgumentError(
        "config key 'sharing': exactly one of kek_file and kek_env is required");
  }
  if (node.Has("previous_kek_files")) {
    ASSIGN_OR_RETURN(settings.previous_kek_files, node.Strings("previous_kek_files", true));
    if (settings.previous_kek_files.size() > 8) {
      return absl::InvalidArgumentError(
          "config key 'sharing.previous_kek_files': at most 8 (retire a KEK once the sweep has "
          "rewrapped its keys)");
    }
  }
  ASSIGN_OR_RETURN(settings.kek_rewrap, node.Bool("kek_rewrap", false));
  if (settings.kek_rewrap && settings.previous_kek_files.empty()) {
    return absl::InvalidArgumentError(
        "config key 'sharing.kek_rewrap': rewraps the keys of sharing.previous_kek_files, which "
        "names none");
  }
  ASSIGN_OR_RETURN(int64_t rewrap, node.Int("kek_rewrap_seconds", 1, 86400, 60));
  settings.kek_rewrap_interval = absl::Seconds(rewrap);
  constexpr int64_t kMaxQuota = int64_t{1} << 50;
  ASSIGN_OR_RETURN(settings.tenant_quota_bytes, node.Int("tenant_quota_bytes", 0, kMaxQuota,
                                                                  kDefaultTenantQuotaBytes));
  if (node.Has("tenant_quotas")) {
    ASSIGN_OR_RETURN(ConfigNode quotas, node.Child("tenant_quotas"));
    for (const std::string& tenant : quotas.Keys()) {
      ASSIGN_OR_RETURN(settings.tenant_quotas[tenant], quotas.Int(tenant, 0, kMaxQuota));
    }
  }
  ASSIGN_OR_RETURN(int64_t idle, node.Int("upload_idle_timeout_seconds", 1, 3600, 30));
  settings.upload_idle_timeout = absl::Seconds(idle);
  ASSIGN_OR_RETURN(int64_t per_tenant, node.Int("max_uploads_per_tenant", 1, 10000, 4));
  settings.max_uploads_per_tenant = static_cast<int>(per_tenant);
  ASSIGN_OR_RETURN(int64_t downloads, node.Int("max_downloads_per_tenant", 1, 10000, 8));
  settings.max_downloads_per_tenant = static_cast<int>(downloads);
  ASSIGN_OR_RETURN(settings.upload_min_bytes_per_second,
                   node.Int("upload_min_bytes_per_second", 1, int64_t{1} << 30, 16 * 1024));
  ASSIGN_OR_RETURN(int64_t download_idle, node.Int("download_idle_timeout_seconds", 1, 3600, 30));
  settings.download_idle_timeout = absl::Seconds(download_idle);
  ASSIGN_OR_RETURN(settings.download_min_bytes_per_second,
                   node.Int("download_min_bytes_per_second", 1, int64_t{1} << 30, 16 * 1024));
  ASSIGN_OR_RETURN(int64_t erasure, node.Int("patient_erasure_timeout_seconds", 1, 3600, 120));
  settings.patient_erasure_timeout = absl::Seconds(erasure);
  ASSIGN_OR_RETURN(int64_t sweep, node.Int("retention_sweep_seconds", 1, 86400, 60));
  settings.retention_sweep_interval = absl::Seconds(sweep);
  ASSIGN_OR_RETURN(int64_t anchors, node.Int("audit_anchor_seconds", 0, 86400, 300));
  settings.audit_anchor_interval = absl::Seconds(anchors);
  ASSIGN_OR_RETURN(settings.consent_cache, consent::ParseConsentCacheOptions(config));
  return settings;
}

absl::StatusOr<std::unique_ptr<SharingServer>> SharingServer::Create(const MedgateConfig& config,
                                                                     SharingServerOptions options) {
  if (config.regions.empty()) return absl::InvalidArgumentError("config key 'regions': missing");
  if (!config.control_db) {
    return absl::InvalidArgumentError(
        "config key 'control_db': missing (sharing reads tenant territories and serves the "
        "control audit log)");
  }
  ASSIGN_OR_RETURN(const ServiceEndpoint* self, config.Service("sharing"));
  // A chunk message carries up to 1 MiB of content plus framing.
  constexpr int kMinMessageBytes = (1 << 20) + 4096;
  if (config.limits.max_message_bytes < kMinMessageBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("config key 'limits.max_message_bytes': sharing needs at least ",
                     kMinMessageBytes, " for 1 MiB chunks, got ", config.limits.max_message_bytes));
  }
  ASSIGN_OR_RETURN(const ServiceEndpoint* routing, config.Service("routing"));
  ASSIGN_OR_RETURN(SharingSettings settings, ParseSharingSettings(config));
  absl::StatusOr<std::unique_ptr<crypto::KeyEncryptionKey>> kek =
      settings.kek_file.empty() ? crypto::LoadKeyEncryptionKeyEnv(settings.kek_env)
                                : crypto::LoadKeyEncryptionKeyFile(settings.kek_file);
  if (!kek.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config key 'sharing.", settings.kek_file.empty() ? "kek_env" : "kek_file",
                     "': ", kek.status().message()));
  }
  std::vector<std::unique_ptr<crypto::KeyEncryptionKey>> previous_keks;
  std::vector<crypto::KeyEncryptionKey*> previous;
  for (size_t i = 0; i < settings.previous_kek_files.size(); ++i) {
    absl::StatusOr<std::unique_ptr<crypto::KeyEncryptionKey>> loaded =
        crypto::LoadKeyEncryptionKeyFile(settings.previous_kek_files[i]);
    if (!loaded.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("config key 'sharing.previous_kek_files[", i,
                                                     "]': ", loaded.status().message()));
    }
    if ((*loaded)->id() == (*kek)->id()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config key 'sharing.previous_kek_files[", i, "]': this is the current KEK (",
          (*kek)->id(), "), not a previous one"));
    }
    previous.push_back(loaded->get());
    previous_keks.push_back(*std::move(loaded));
  }
  ASSIGN_OR_RETURN(MedgateConfig own, pg::ConfigAs(config, pg::kSharingRole));
  ASSIGN_OR_RETURN(std::unique_ptr<KeyVault> vault,
                   KeyVault::Create(own.regions, **kek, std::move(previous), settings.kek_rewrap));
  if (options.check_kek_at_start) {
    for (const RegionConfig& region : own.regions) {
      absl::Status checked = vault->CheckKek(region.id);
      if (checked.code() == absl::StatusCode::kFailedPrecondition) return checked;
      // A vault down now is checked before the first key written to it (KeyVault::Put).
      if (!checked.ok()) {
        log::Warning("kek_check_deferred",
                     {{"region", region.id}, {"error", checked.message()}});
      }
    }
  }
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                   MakeServiceChannel(*routing, self->tls));
  return std::unique_ptr<SharingServer>(
      new SharingServer(std::move(own), std::move(settings), *std::move(kek),
                        std::move(previous_keks), std::move(vault), std::move(channel),
                        std::move(options)));
}

absl::Duration UnusedVaultKeyGrace(const MedgateConfig& config) {
  absl::Duration grace = absl::Hours(1);
  for (const RegionConfig& region : config.regions) {
    for (const DbConfig* db : {&region.db, region.keys_db ? &*region.keys_db : nullptr}) {
      if (db == nullptr) continue;
      grace = std::max(grace, absl::Milliseconds(int64_t{20} * db->statement_timeout_ms));
    }
  }
  return grace;
}

SharingServer::SharingServer(MedgateConfig config, SharingSettings settings,
                             std::unique_ptr<crypto::KeyEncryptionKey> kek,
                             std::vector<std::unique_ptr<crypto::KeyEncryptionKey>> previous_keks,
                             std::unique_ptr<KeyVault> vault,
                             std::shared_ptr<grpc::Channel> routing_channel,
                             SharingServerOptions options)
    : config_(std::move(config)),
      settings_(std::move(settings)),
      kek_(std::move(kek)),
      previous_keks_(std::move(previous_keks)),
      vault_(std::move(vault)) {
  pg::PoolOptions control = pg::PoolOptions::FromConfig("control", *config_.control_db);
  control.statements = sql::ControlStatements();
  control_ = std::make_unique<pg::Pool>(std::move(control));
  shards_ = std::make_unique<pg::ShardSet>(config_.regions, sql::ShardStatements());
  upload_shards_ = std::make_unique<pg::ShardSet>(config_.regions, sql::ShardStatements());
  RoutingDirectoryOptions directory_options;
  directory_options.clock = options.clock;
  tenant_gate_ = NewRoutingTenantGate(routing_channel, TenantGateOptions::FromLimits(config_.limits));
  directory_ = std::make_unique<RoutingDirectory>(NewRoutingClient(routing_channel),
                                                  routing_channel, *control_, directory_options);
  consent_ = consent::NewConsentCache(config_.regions, settings_.consent_cache);
  SharingOptions core_options;
  core_options.default_tenant_quota_bytes = settings_.tenant_quota_bytes;
  core_options.tenant_quota_bytes = settings_.tenant_quotas;
  core_options.upload_idle_timeout = settings_.upload_idle_timeout;
  core_options.upload_min_bytes_per_second = settings_.upload_min_bytes_per_second;
  core_options.download_idle_timeout = settings_.download_idle_timeout;
  core_options.download_min_bytes_per_second = settings_.download_min_bytes_per_second;
  core_options.max_uploads_per_tenant = settings_.max_uploads_per_tenant;
  core_options.max_downloads_per_tenant = settings_.max_downloads_per_tenant;
  core_options.unused_vault_key_grace = UnusedVaultKeyGrace(config_);
  core_options.patient_erasure_timeout = settings_.patient_erasure_timeout;
  // The identity its certificate carries (checked when the server starts).
  core_options.service_identity = (*config_.Service("sharing"))->identity;
  core_options.trust_domain = config_.trust_domain;
  core_options.clock = options.clock;
  core_options.key_cache_clock = options.key_cache_clock;
  core_options.max_list_page_bytes = options.max_list_page_bytes;
  core_options.max_listed_grants = options.max_listed_grants;
  core_ = std::make_unique<SharingCore>(*shards_, *upload_shards_, *directory_, *consent_, *vault_,
                                        std::move(core_options));
  audit_core_ = std::make_unique<AuditCore>(*control_, *shards_, *directory_, *consent_,
                                            options.audit_scanned_per_page,
                                            options.audit_report_statement_timeout);
  server_ = std::make_unique<ServiceServer>(config_, "sharing");
  service_ = std::make_unique<SharingService>(*core_, config_.trust_domain, tenant_gate_.get(),
                                              server_->peer_certificates());
  audit_service_ =
      std::make_unique<AuditService>(*audit_core_, config_.trust_domain, tenant_gate_.get());
  if (config_.Service("audit").ok()) {
    audit_only_service_ =
        std::make_unique<AuditService>(*audit_core_, config_.trust_domain, tenant_gate_.get());
    audit_server_ = std::make_unique<ServiceServer>(config_, "audit");
  }
}

SharingServer::~SharingServer() { Shutdown(); }

absl::Status SharingServer::Probe() {
  if (absl::Status control = control_->Ping(); !control.ok()) {
    return absl::UnavailableError(absl::StrCat("control database: ", control.message()));
  }
  return shards_->PingAny();
}

absl::Status SharingServer::Start() {
  // Uploads count what each tenant stores in its other regions from the first one on. A region
  // that cannot be read now counts as nothing until a later fold reads it.
  if (absl::StatusOr<int64_t> folded = core_->FoldTenantUsage(); !folded.ok()) {
    log::Warning("usage_fold_failed", {{"error", folded.status().message()}});
  }
  server_->AddService(service_.get());
  server_->AddService(audit_service_.get());
  server_->SetHealthProbe([this] { return Probe(); }, absl::Seconds(2));
  RETURN_IF_ERROR(server_->Start());
  if (audit_server_) {
    audit_server_->AddService(audit_only_service_.get());
    audit_server_->SetHealthProbe([this] { return Probe(); }, absl::Seconds(2));
    RETURN_IF_ERROR(audit_server_->Start());
  }
  sweeper_ = std::make_unique<PeriodicTask>(settings_.retention_sweep_interval,
                                            [this](PeriodicTask& task) { return Sweep(task); });
  if (vault_->rewrapping()) {
    rewrapper_ = std::make_unique<PeriodicTask>(
        settings_.kek_rewrap_interval, [this](PeriodicTask& task) { return RewrapKeys(task); });
  }
  // Whatever the retention sweep's interval, so that a quota check never sums more than a few
  // seconds of a tenant's changes, and counts what the tenant stores in its other regions as of
  // at most that long ago. The same turn drops cached patient keys past their age, so that a key
  // another process erased leaves this one's memory even when nothing here asks.
  usage_folder_ = std::make_unique<PeriodicTask>(kUsageFoldInterval, [this](PeriodicTask&) {
    core_->DropExpiredPatientKeys();
    if (absl::StatusOr<int64_t> folded = core_->FoldTenantUsage(); !folded.ok()) {
      log::Warning("usage_fold_failed", {{"error", folded.status().message()}});
    }
    return kUsageFoldInterval;
  });
  if (settings_.audit_anchor_interval > absl::ZeroDuration()) {
    anchorer_ = std::make_unique<PeriodicTask>(settings_.audit_anchor_interval,
                                               [this](PeriodicTask&) { return RecordAnchors(); });
  } else {
    log::Warning("audit_anchors_off",
                 {{"detail", "sharing.audit_anchor_seconds is 0: no audit log's head is recorded "
                             "in the others, and VerifyChain checks only the anchors ops keep"}});
  }
  log::Info("sharing_started", {{"kek_id", kek_->id()}});
  return absl::OkStatus();
}

absl::Duration SharingServer::RecordAnchors() {
  const AnchorRound round = audit_core_->RecordAnchors(config_.Service("sharing").value()->identity);
  if (!round.mismatched.empty()) {
    log::Error("audit_anchors_refused",
               {{"logs", absl::StrJoin(round.mismatched, ",")},
                {"detail", "a log no longer has the entry its last anchor recorded, or another "
                           "hash there: cut short or rewritten (VerifyChain names the entry)"}});
  }
  if (!round.failed.empty()) {
    log::Warning("audit_anchors_failed", {{"error", absl::StrJoin(round.failed, "; ")}});
  }
  if (round.recorded > 0) log::Info("audit_anchors", {{"recorded", round.recorded}});
  return settings_.audit_anchor_interval;
}

absl::Duration SharingServer::Sweep(PeriodicTask& task) {
  // Batch after batch while there is more to do, so a large erasure is purged in one cycle.
  bool more = true;
  bool failure_logged = false;  // once a cycle: a region that stays down fails every batch
  while (more && !task.stopping()) {
    absl::StatusOr<SweepResult> swept = core_->SweepRetention();
    more = swept.ok() && swept->more;
    if (!swept.ok()) {
      log::Warning("retention_sweep_failed", {{"error", swept.status().message()}});
      continue;
    }
    if (!swept->first_error.ok() && !failure_logged) {
      // The other regions' work went on, and goes on while they have more.
      log::Warning("retention_sweep_failed", {{"error", swept->first_error.message()}});
      failure_logged = true;
    }
    if (swept->failed_records > 0) {
      // Tried again once the sweep has been through the region's other expired archives.
      log::Warning("retention_erasure_failed",
                   {{"records", swept->failed_records},
                    {"record_ids", absl::StrJoin(swept->failed_record_ids, ",")},
                    {"error", swept->first_failure.message()}});
    }
    if (swept->erased_records > 0 || swept->purged_chunks > 0 || swept->sealed_metadata > 0 ||
        swept->forgotten_request_ids > 0 || swept->moved_keys > 0 || swept->unmovable_keys > 0) {
      log::Info("retention_sweep", {{"erased_records", swept->erased_records},
                                    {"purged_chunks", swept->purged_chunks},
                                    {"sealed_metadata", swept->sealed_metadata},
                                    {"forgotten_request_ids", swept->forgotten_request_ids},
                                    {"moved_keys", swept->moved_keys},
                                    {"unmovable_keys", swept->unmovable_keys}});
    }
  }
  return settings_.retention_sweep_interval;
}

absl::Duration SharingServer::RewrapKeys(PeriodicTask& task) {
  constexpr int kBatch = 500;
  const std::function<bool()> stopping = [&task] { return task.stopping(); };
  for (const RegionConfig& region : config_.regions) {
    // One walk over each other KEK's keys, by key id: a key that does not unwrap is counted and
    // passed, never walked again in this pass.
    int rewrapped = 0, damaged = 0;
    bool failed = false;
    for (const crypto::KeyEncryptionKey* from : vault_->others()) {
      std::string after;
      while (!task.stopping()) {
        absl::StatusOr<KeyVault::Rewrapped> done =
            vault_->RewrapSome(region.id, *from, after, kBatch, stopping);
        if (!done.ok()) {
          log::Warning("kek_rewrap_failed",
                       {{"region", region.id}, {"error", done.status().message()}});
          failed = true;
          break;
        }
        rewrapped += done->rewrapped;
        damaged += done->damaged;
        after = done->last_key_id;
        if (done->scanned < kBatch) break;
      }
      if (failed) break;
    }
    if (failed || task.stopping()) continue;
    // Where the region stands after the pass: the keys other KEKs still wrap (damaged ones, and
    // any a pod still on the previous configuration has written since). A rotation's last step
    // waits for 0 on a pass that began after every pod took the new configuration.
    // Keys the shard still holds from before the vault count too: they move in (rewrapped) with
    // the retention sweep.
    absl::StatusOr<int64_t> remaining = vault_->KeysOfOtherKeks(region.id);
    absl::StatusOr<int64_t> in_shard = core_->PatientKeysInShardNotUnder(region.id, kek_->id());
    if (!remaining.ok() || !in_shard.ok()) {
      log::Warning("kek_rewrap_failed",
                   {{"region", region.id},
                    {"error", (!remaining.ok() ? remaining.status() : in_shard.status()).message()}});
      continue;
    }
    log::Info("kek_rewrap", {{"region", region.id},
                             {"rewrapped", rewrapped},
                             {"damaged", damaged},
                             {"remaining", *remaining + *in_shard},
                             {"kek_id", kek_->id()}});
  }
  return settings_.kek_rewrap_interval;
}

void SharingServer::Shutdown() {
  // Both servers drain at once, and the retention sweep (which may be in a statement) stops
  // meanwhile: stopping takes one drain period (limits.drain_seconds), which is what an
  // orchestrator's grace period allows for.
  std::thread audit;
  if (audit_server_) audit = std::thread([this] { audit_server_->Shutdown(); });
  std::thread sweeper;
  if (sweeper_) sweeper = std::thread([this] { sweeper_->Stop(); });
  std::thread folder;
  if (usage_folder_) folder = std::thread([this] { usage_folder_->Stop(); });
  std::thread rewrapper;
  if (rewrapper_) rewrapper = std::thread([this] { rewrapper_->Stop(); });
  std::thread anchorer;
  if (anchorer_) anchorer = std::thread([this] { anchorer_->Stop(); });
  server_->Shutdown();
  if (audit.joinable()) audit.join();
  if (sweeper.joinable()) sweeper.join();
  if (folder.joinable()) folder.join();
  if (rewrapper.joinable()) rewrapper.join();
  if (anchorer.joinable()) anchorer.join();
}

void SharingServer::RunUntilSignal() {
  ServiceServer::WaitForTerminationSignal("sharing");
  Shutdown();
}

}  // namespace medgate::sharing
