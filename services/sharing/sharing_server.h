// Wiring of the sharing service: key-encryption key, pools, routing and consent clients, cores,
// the RecordSharing and Audit gRPC services and their servers, and the retention sweep, from the
// configuration. main.cc and the integration tests start the service the same way.
#ifndef MEDGATE_SERVICES_SHARING_SHARING_SERVER_H_
#define MEDGATE_SERVICES_SHARING_SHARING_SERVER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/common/periodic_task.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/crypto/key_encryption_key.h"
#include "libs/pg/pool.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/tenant_gate.h"
#include "libs/server/service_server.h"
#include "services/sharing/audit_core.h"
#include "services/sharing/audit_service.h"
#include "services/sharing/routing_directory.h"
#include "services/sharing/sharing_core.h"
#include "services/sharing/sharing_service.h"

namespace medgate::sharing {

// How often the server folds the shards' record size changes into the tenants' usage counts, and
// reads each region's counts, which uploads in the tenant's other regions count against its quota
// (SharingCore::FoldTenantUsage; also once as the server starts, before it serves).
inline constexpr absl::Duration kUsageFoldInterval = absl::Seconds(10);

// The sharing section of the configuration:
//   sharing:
//     kek_file: /run/secrets/kek        # the key-encryption key, 64 hex digits; or
//     kek_env: MEDGATE_SHARING_KEK      # the environment variable holding it (exactly one)
//     previous_kek_files: [/run/secrets/old-kek]  # a rotation's other KEKs (at most 8): they
//                                       # only unwrap the keys they wrap
//     kek_rewrap: false                 # rewrap those keys under kek_file's KEK, as they are read
//                                       # and by a sweep (README, "Rotating the KEK")
//     kek_rewrap_seconds: 60            # how often that sweep runs
//     tenant_quota_bytes: 10737418240   # bytes of records per tenant, in all its regions
//                                       # (default 1 TiB; 0: no limit, which must be asked for)
//     tenant_quotas: {acme: 1073741824} # per-tenant overrides
//     upload_idle_timeout_seconds: 30   # longest pause between two chunks of an upload
//     upload_min_bytes_per_second: 16384  # an upload's lowest average rate past that pause
//     download_idle_timeout_seconds: 30   # longest wait for a download's client to take a chunk
//     download_min_bytes_per_second: 16384  # a download's lowest average rate past that wait
//     max_uploads_per_tenant: 4         # uploads in progress per tenant and region
//     max_downloads_per_tenant: 8       # downloads in progress per tenant and region
//     retention_sweep_seconds: 60       # how often the retention and key sweep runs
//     audit_anchor_seconds: 300         # how often every audit log's head is recorded in the
//                                       # others (AuditCore::RecordAnchors); 0: never
// Each region also needs its key vault (regions[].keys_db, libs/common/config.h).
struct SharingSettings {
  std::string kek_file;
  std::string kek_env;
  std::vector<std::string> previous_kek_files;
  bool kek_rewrap = false;
  absl::Duration kek_rewrap_interval = absl::Seconds(60);
  int64_t tenant_quota_bytes = kDefaultTenantQuotaBytes;
  std::map<std::string, int64_t> tenant_quotas;
  absl::Duration upload_idle_timeout = absl::Seconds(30);
  int64_t upload_min_bytes_per_second = 16 * 1024;
  absl::Duration download_idle_timeout = absl::Seconds(30);
  int64_t download_min_bytes_per_second = 16 * 1024;
  int max_uploads_per_tenant = 4;
  int max_downloads_per_tenant = 8;
  absl::Duration retention_sweep_interval = absl::Seconds(60);
  absl::Duration audit_anchor_interval = absl::Seconds(300);  // zero: no anchors recorded
  absl::Duration patient_erasure_timeout = absl::Seconds(120);  // SharingOptions'
  // The consent cache's bounds, as the consent service's own (consent.cache.*).
  consent::ConsentCacheOptions consent_cache;
};

// How long a key the vault holds may go unnamed by any shard before the sweep deletes it: 1 h,
// or 20 statement timeouts of the slowest shard or vault if longer, so that no transaction that
// could still name the key is running.
absl::Duration UnusedVaultKeyGrace(const MedgateConfig& config);

absl::StatusOr<SharingSettings> ParseSharingSettings(const MedgateConfig& config);

struct SharingServerOptions {
  // Time source of the cores (grants, expiry, retention); tests move it forward.
  std::function<absl::Time()> clock = absl::Now;
  // SharingOptions::key_cache_clock; tests move it forward with `clock`.
  std::function<absl::Time()> key_cache_clock = MonotonicNow;
  // SharingOptions::max_list_page_bytes; tests make it small.
  size_t max_list_page_bytes = kMaxListPageBytes;
  // SharingOptions::max_listed_grants; tests make it small.
  size_t max_listed_grants = 0;
  // AuditCore's max_scanned_per_page; tests make it small.
  int64_t audit_scanned_per_page = kMaxAuditScannedPerPage;
  // AuditCore's report_statement_timeout; tests make it small.
  absl::Duration audit_report_statement_timeout = kReportStatementTimeout;
  // Whether Create asks each region's key vault whether a KEK it is not given (current or
  // previous) wraps any key (KeyVault::CheckKek), and refuses to start then; tests turn it off to
  // act as if no vault answered at start.
  bool check_kek_at_start = true;
};

class SharingServer {
 public:
  // Validates the configuration (regions, control_db, services.sharing, services.routing, the
  // sharing section), loads the key-encryption key and checks it against the key vaults that
  // answer (FAILED_PRECONDITION when one holds keys of another KEK); connects lazily otherwise.
  static absl::StatusOr<std::unique_ptr<SharingServer>> Create(const MedgateConfig& config,
                                                               SharingServerOptions options = {});
  ~SharingServer();

  // Serves RecordSharing and Audit on services.sharing, and Audit alone on services.audit when
  // that endpoint is configured; starts the retention sweep.
  absl::Status Start();
  void Shutdown();
  void RunUntilSignal();
  int port() const { return server_->port(); }
  int audit_port() const { return audit_server_ ? audit_server_->port() : 0; }
  SharingCore& core() { return *core_; }
  AuditCore& audit_core() { return *audit_core_; }
  consent::ConsentCache& consent_cache() { return *consent_; }

 private:
  SharingServer(MedgateConfig config, SharingSettings settings,
                std::unique_ptr<crypto::KeyEncryptionKey> kek,
                std::vector<std::unique_ptr<crypto::KeyEncryptionKey>> previous_keks,
                std::unique_ptr<KeyVault> vault, std::shared_ptr<grpc::Channel> routing_channel,
                SharingServerOptions options);
  // Rewraps the keys previous KEKs wrap, batch after batch; the wait before the next pass.
  absl::Duration RewrapKeys(PeriodicTask& task);
  // One round of audit anchors (AuditCore::RecordAnchors); the wait before the next.
  absl::Duration RecordAnchors();
  // One retention sweep, batch after batch while there is more; the wait before the next.
  absl::Duration Sweep(PeriodicTask& task);
  // The health probe of both servers: the control database answers (tenants' territories, the
  // control audit log) and any region's shard does. One region down fails only the calls about
  // its own patients, and must not take the other regions' out of service with it.
  absl::Status Probe();

  const MedgateConfig config_;  // connecting as the sharing database role
  const SharingSettings settings_;
  std::unique_ptr<crypto::KeyEncryptionKey> kek_;
  std::vector<std::unique_ptr<crypto::KeyEncryptionKey>> previous_keks_;
  std::unique_ptr<KeyVault> vault_;  // uses kek_ and previous_keks_
  std::unique_ptr<pg::Pool> control_;
  std::unique_ptr<pg::ShardSet> shards_;
  std::unique_ptr<pg::ShardSet> upload_shards_;
  std::unique_ptr<TenantGate> tenant_gate_;
  std::unique_ptr<RoutingDirectory> directory_;
  std::unique_ptr<consent::ConsentCache> consent_;
  std::unique_ptr<SharingCore> core_;
  std::unique_ptr<AuditCore> audit_core_;
  std::unique_ptr<SharingService> service_;
  std::unique_ptr<AuditService> audit_service_;
  std::unique_ptr<AuditService> audit_only_service_;
  std::unique_ptr<ServiceServer> server_;
  std::unique_ptr<ServiceServer> audit_server_;

  std::unique_ptr<PeriodicTask> sweeper_;  // every retention_sweep_interval once started
  std::unique_ptr<PeriodicTask> usage_folder_;  // every kUsageFoldInterval once started
  std::unique_ptr<PeriodicTask> rewrapper_;  // every kek_rewrap_interval, with kek_rewrap
  std::unique_ptr<PeriodicTask> anchorer_;  // every audit_anchor_interval unless zero
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_SHARING_SERVER_H_
