// The record-sharing logic over plain values: encrypted chunked uploads into the patient's home
// shard, grants, audited downloads, archive and erasure by crypto-shredding.
#ifndef MEDGATE_SERVICES_SHARING_SHARING_CORE_H_
#define MEDGATE_SERVICES_SHARING_SHARING_CORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/bounded_counts.h"
#include "libs/common/monotonic_clock.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/crypto/key_encryption_key.h"
#include "libs/identity/principal.h"
#include "libs/server/rpc_util.h"
#include "libs/pg/shard_set.h"
#include "services/sharing/key_vault.h"
#include "services/sharing/patient_directory.h"
#include "services/sharing/patient_key_cache.h"
#include "services/sharing/spare_threads.h"

namespace medgate::sharing {

using ::medgate::CallContext;  // who asks, for the audit entry (libs/server/rpc_util.h)

enum class RecordKind { kUnspecified = 0, kDocument = 1, kImaging = 2, kReport = 3 };

// The data category of a record of `kind` that a consent may be narrowed to ("document",
// "imaging", "report"; consent::DataCategories()); "" for kUnspecified.
absl::string_view DataCategoryOf(RecordKind kind);
enum class RecordState { kActive, kArchived };

struct GrantInfo {
  std::string grant_id;
  std::string record_id;
  std::string grantee;
  std::string grantee_tenant;
  std::string granted_by;
  absl::Time created_at;
  absl::Time expires_at;
  std::optional<absl::Time> revoked_at;
};

struct RecordInfo {
  std::string record_id;
  std::string tenant_id;
  std::string patient_id;
  RecordKind kind = RecordKind::kUnspecified;
  std::string content_type;
  std::string file_name;
  uint64_t size_bytes = 0;
  std::string sha256;  // 32 raw bytes
  uint32_t chunk_count = 0;
  std::string owner;
  absl::Time created_at;
  RecordState state = RecordState::kActive;
  std::optional<absl::Time> retain_until;
  std::vector<GrantInfo> grants;  // those visible to the caller
  // content_type, file_name and sha256 as stored, sealed under the record's key, until the core
  // opens them into the fields above (records written before sealing have them in clear).
  std::optional<std::string> sealed_content_type;
  std::optional<std::string> sealed_file_name;
  std::optional<std::string> sealed_sha256;
  // Listings only: why its key or metadata could not be opened (then content_type, file_name and
  // sha256 are empty); empty when they were.
  std::string damaged;
};

struct UploadHeader {
  std::string patient_id;
  RecordKind kind = RecordKind::kUnspecified;
  std::string content_type;
  std::string file_name;
  uint64_t size_bytes = 0;
  std::string sha256;  // 32 raw bytes
  // The client's request id ("" if it gave none). A record the same practitioner stored with it
  // answers the upload (a retry) when the header is the same, and refuses it otherwise, or once
  // that record is erased.
  std::string request_id;
};

struct UploadResult {
  std::string record_id;
  uint64_t size_bytes = 0;
  std::string sha256;
};

// One upload in progress, in one transaction of the home shard: chunks are encrypted and inserted
// as they arrive (at most one storage chunk is held in memory), and the record becomes visible
// only when Finish() verified size and hash and committed. Destroying an unfinished upload rolls
// everything back. Not thread-safe.
class Upload {
 public:
  virtual ~Upload() = default;
  // The next piece of content as the client sent it (1 byte to 1 MiB). The piece that completes
  // the declared size must stay valid until the upload is destroyed (it may still be hashed
  // while Finish() prepares to store the record); the others only until Write returns.
  virtual absl::Status Write(absl::string_view data) = 0;
  virtual absl::StatusOr<UploadResult> Finish() = 0;
  // Set when the header's request id names a record already stored with the same header: the
  // upload is answered with it and stores nothing (the content need not be read).
  virtual std::optional<UploadResult> AlreadyStored() const { return std::nullopt; }
};

// One authorized, already audited download: authenticated plaintext chunk by chunk.
class Download {
 public:
  virtual ~Download() = default;
  virtual const RecordInfo& record() const = 0;
  // Sets `chunk` to the next plaintext chunk and returns true, or returns false at the end.
  // A chunk that does not authenticate is DATA_LOSS naming the record; nothing of it is returned.
  virtual absl::StatusOr<bool> Next(std::string* chunk) = 0;
};

enum class ListScope { kUnspecified, kMine, kSharedWithMe, kPatient };

struct ListQuery {
  ListScope scope = ListScope::kUnspecified;
  std::string patient_id;
  RecordKind kind = RecordKind::kUnspecified;
  bool include_archived = false;
  int page_size = 100;  // already bounded by the adapter
  std::string page_token;
};

struct ListResult {
  std::vector<RecordInfo> records;
  std::string next_page_token;
};

// One call's page of a patient export: its records' ids, newest first.
struct ExportListing {
  std::vector<std::string> record_ids;
  std::string next_page_token;  // empty when no record is left
};

struct PatientErasure {
  uint64_t erased_count = 0;
  absl::Time erased_at;
};

// How long an upload's request id answers its retries (and refuses them once its record is
// erased): a retry comes within minutes.
inline constexpr absl::Duration kRecordRequestRetention = absl::Hours(24 * 30);

struct SweepResult {
  int erased_records = 0;
  // Archived records past their retention end whose erasure failed this time (they are tried
  // again once the sweep has been through the region's others), and the first failure.
  int failed_records = 0;
  absl::Status first_failure;
  std::vector<std::string> failed_record_ids;  // at most the first 10
  int64_t purged_chunks = 0;
  int64_t forgotten_request_ids = 0;  // upload request ids older than kRecordRequestRetention
  int sealed_metadata = 0;  // records written before metadata was sealed, sealed now
  int destroyed_keys = 0;   // patient keys deleted from the key vaults (retired, or never used)
  int moved_keys = 0;       // patient keys moved from a shard (written before the vault) to its vault
  int unmovable_keys = 0;   // such keys left in the shard: of a KEK not given, or damaged
  bool more = false;  // some region had a full batch: sweep again
  // The first step that failed, in any region (a region down, a vault refusing): the sweep went
  // on with that region's other steps and with the other regions, whose figures are above.
  absl::Status first_error;
};

// A page of ListRecords ends early, with a next_page_token, once its records and grants come to
// about this many bytes (SharingOptions), so that a page fits a client's default 4 MiB limit.
inline constexpr size_t kMaxListPageBytes = size_t{2} << 20;

// Bytes of live records a tenant may keep, in all its regions together, unless configured
// otherwise: a bound even where ops set none.
inline constexpr int64_t kDefaultTenantQuotaBytes = int64_t{1} << 40;  // 1 TiB

// A tenant's quota as an upload in one region is checked against it: exactly for the region's
// own records (under the tenant's usage lock in its shard), and for the tenant's other regions as
// the last fold read them (SharingCore::FoldTenantUsage, every 10 s).
struct QuotaLimit {
  int64_t quota = 0;      // the tenant's, in all regions; 0: no limit
  int64_t elsewhere = 0;  // bytes of the tenant's records in its other regions
  // What the region's shard may hold for the tenant (none: no limit; at most 0 when the other
  // regions already hold the quota), which the record's statement checks under the usage lock.
  std::optional<int64_t> room_here() const {
    if (quota <= 0) return std::nullopt;
    return quota - elsewhere;
  }
};

// A multi-chunk upload's transaction, for an upload idle timeout of `idle_timeout`: how long the
// shard lets it sit idle (the timeout and a grace, so that the service, which ends the stream
// after the timeout, tells the client first), and how often its writer keeps it alive while
// content still arrives, slower than a storage chunk per bound (a turn shorter than the grace:
// content may arrive up to the timeout after the writer's last statement).
absl::Duration UploadTransactionIdleBound(absl::Duration idle_timeout);
absl::Duration UploadKeepaliveTurn(absl::Duration idle_timeout);

struct SharingOptions {
  // Bytes of live records a tenant may keep in all its regions together; 0 means no limit.
  int64_t default_tenant_quota_bytes = kDefaultTenantQuotaBytes;
  std::map<std::string, int64_t> tenant_quota_bytes;  // per-tenant overrides
  // Longest wait for an upload's next message before the upload ends (DEADLINE_EXCEEDED; the
  // shard drops a transaction left idle a little later still).
  absl::Duration upload_idle_timeout = absl::Seconds(30);
  // Once the service has waited upload_idle_timeout in all for an upload's messages, the upload
  // must have come at least this fast over that waiting, or it ends (DEADLINE_EXCEEDED): a client
  // trickling bytes cannot hold its connection and transaction for good.
  int64_t upload_min_bytes_per_second = 16 * 1024;
  // Longest wait for a download's client to take its next chunk before the download ends
  // (DEADLINE_EXCEEDED); and, once the service has waited that long in all, the lowest rate it
  // may have been taken at over that waiting.
  absl::Duration download_idle_timeout = absl::Seconds(30);
  int64_t download_min_bytes_per_second = 16 * 1024;
  // Uploads one tenant may have in progress to one region at once: the region's upload
  // connections are shared by every tenant, and one tenant must not take them all.
  int max_uploads_per_tenant = 4;
  // Downloads one tenant's identities may have running from one region at once: each holds a
  // thread of the service and reads ahead of its client.
  int max_downloads_per_tenant = 8;
  // Unwrapped patient keys kept for uploads: at most this many, each at most this long.
  size_t patient_key_cache_entries = 4096;
  absl::Duration patient_key_cache_max_age = absl::Minutes(1);
  // A key the vault holds that no shard row names this long after it was written (by the vault's
  // clock) belongs to a transaction that did not commit (one that did names it within its
  // statement timeouts): the sweep deletes it.
  absl::Duration unused_vault_key_grace = absl::Hours(1);
  // How long each statement of a patient's erasure may take (sharing.
  // patient_erasure_timeout_seconds), in place of the shard's statement_timeout_ms: it deletes
  // and audits every record of the patient in one transaction, 50,000 records in about 5 s on a
  // 2-core host, and must not fail every time for a patient with many.
  absl::Duration patient_erasure_timeout = absl::Seconds(120);
  // The identity the retention sweep acts as in the audit log.
  std::string service_identity;
  std::string trust_domain;
  // A ListRecords page ends early once its records come to about this many bytes.
  size_t max_list_page_bytes = kMaxListPageBytes;
  // The grants a ListRecords call reads from one region at most: a page ends early at the first
  // record whose grants would pass it. 0: as many as max_list_page_bytes could show (a grant
  // weighs at least 64 bytes), and one record's.
  size_t max_listed_grants = 0;
  // Time source for grants, expiry and retention (tests move it forward).
  std::function<absl::Time()> clock = absl::Now;
  // Times how long unwrapped patient keys stay cached: monotonic, so that a host clock stepped
  // back does not keep them in memory longer (tests move it forward with `clock`).
  std::function<absl::Time()> key_cache_clock = MonotonicNow;
};

// Limits from the API.
inline constexpr uint64_t kMaxRecordBytes = uint64_t{256} << 20;
inline constexpr size_t kMaxNameBytes = 255;
inline constexpr size_t kMaxReasonBytes = 512;
inline constexpr size_t kMinBreakGlassReasonBytes = 16;
inline constexpr size_t kMaxBreakGlassReasonBytes = 1024;
inline constexpr absl::Duration kMaxGrantDuration = absl::Hours(24 * 365);
inline constexpr absl::Duration kMaxRetention = absl::Hours(24 * 365 * 100);
// Active grants one record may have at once: sharing with one more grantee is refused beyond it
// (extending a grantee's grant is not).
inline constexpr int64_t kMaxActiveGrantsPerRecord = 100;

class SharingCore {
 public:
  // Uploads or downloads in progress, by (tenant, region).
  using TransferCounts = BoundedCounts<std::pair<std::string, std::string>>;

  // `shards` and `upload_shards` must have been created with sql::ShardStatements(); uploads hold
  // a connection for their whole duration, so they get pools of their own.
  SharingCore(const pg::ShardSet& shards, const pg::ShardSet& upload_shards,
              PatientDirectory& directory, consent::ConsentCache& consent,
              KeyVault& vault, SharingOptions options);

  absl::StatusOr<std::unique_ptr<Upload>> StartUpload(const CallContext& ctx,
                                                      const UploadHeader& header);
  // Uploads of `tenant` to `region` started and not yet ended.
  int UploadsInProgress(const std::string& tenant, const std::string& region) const {
    return uploads_in_progress_.count({tenant, region});
  }
  absl::StatusOr<GrantInfo> ShareRecord(const CallContext& ctx, const std::string& record_id,
                                        const std::string& grantee, absl::Time expires_at);
  // By grant id, or by (record_id, grantee) when grant_id is empty.
  absl::StatusOr<GrantInfo> RevokeShare(const CallContext& ctx, const std::string& grant_id,
                                        const std::string& record_id, const std::string& grantee);
  absl::StatusOr<ListResult> ListRecords(const CallContext& ctx, const ListQuery& query);
  absl::StatusOr<std::unique_ptr<Download>> OpenDownload(const CallContext& ctx,
                                                         const std::string& record_id,
                                                         const std::string& break_glass_reason);
  // A patient export (GDPR art. 20), by an app of the patient's tenant for the patient's request
  // (NOT_FOUND for a patient its tenant does not have): the ids of the patient's records, newest
  // first after `page_token`, at most `limit`, the listing audited in the home shard
  // ("EXPORT_LISTED: count=N" and `reason`).
  absl::StatusOr<ExportListing> ListForExport(const CallContext& ctx,
                                              const std::string& patient_id,
                                              const std::string& reason, int limit,
                                              const std::string& page_token);
  // One record of that listing, opened and audited as OpenDownload does ("EXPORTED: bytes=N" and
  // `reason`); NOT_FOUND once erased, or when it is not the patient's.
  absl::StatusOr<std::unique_ptr<Download>> OpenExport(const CallContext& ctx,
                                                       const std::string& patient_id,
                                                       const std::string& record_id,
                                                       const std::string& reason);
  absl::StatusOr<RecordInfo> ArchiveRecord(const CallContext& ctx, const std::string& record_id,
                                           absl::Time retain_until);
  absl::StatusOr<absl::Time> EraseRecord(const CallContext& ctx, const std::string& record_id,
                                         const std::string& reason);
  absl::StatusOr<PatientErasure> ErasePatientRecords(const CallContext& ctx,
                                                     const std::string& patient_id,
                                                     const std::string& reason);
  // Erases archived records past their retention end, purges ciphertext left by erasures, seals
  // the metadata of records written before it was sealed, destroys in the key vaults the keys
  // erasures retired (when that did not happen with the erasure) and keys no shard uses, and moves
  // patient keys written before the vaults into them: at most `batch` of each per region.
  // Expired archives are taken in (retain_until, record_id) order from where the previous call
  // stopped, so that records whose erasure keeps failing (reported in the result, not an error)
  // do not hold back the others; past the last one, the next call starts again from the first.
  // A step that fails is reported in the result (first_error), not as the call's error: the
  // work done elsewhere, and whether more is left, are still told.
  absl::StatusOr<SweepResult> SweepRetention(int batch = 100);
  // How many patient keys the region's shard still holds (from before the vault) that `kek_id`
  // does not wrap: a KEK rotation is not done while any is left.
  absl::StatusOr<int64_t> PatientKeysInShardNotUnder(const std::string& region,
                                                     const std::string& kek_id);
  // Folds the records' size changes that the shards' triggers appended into the tenants' usage
  // counts (shard migration 0021), in every region: the quota's read sums only the changes since.
  // Each region's counts, read in the same transaction, are what an upload elsewhere counts
  // against the tenant's quota (a region that fails keeps its last counts). How many changes were
  // folded.
  absl::StatusOr<int64_t> FoldTenantUsage();
  // Drops (and wipes) the cached patient keys past their max age, used or not since.
  size_t DropExpiredPatientKeys() { return patient_keys_.DropExpired(KeyCacheNow()); }

  // Plaintext and ciphertext bytes that uploads and downloads hold right now, and the most ever.
  int64_t buffered_bytes() const { return buffered_.load(); }
  int64_t peak_buffered_bytes() const { return peak_buffered_.load(); }

  absl::Time Now() const { return options_.clock(); }
  // The time of the patient key cache (SharingOptions::key_cache_clock).
  absl::Time KeyCacheNow() const { return options_.key_cache_clock(); }
  absl::Duration upload_idle_timeout() const { return options_.upload_idle_timeout; }
  int max_uploads_per_tenant() const { return options_.max_uploads_per_tenant; }
  size_t region_count() const { return shards_.RegionIds().size(); }
  int64_t upload_min_bytes_per_second() const { return options_.upload_min_bytes_per_second; }
  absl::Duration download_idle_timeout() const { return options_.download_idle_timeout; }
  int64_t download_min_bytes_per_second() const { return options_.download_min_bytes_per_second; }

  // For uploads and downloads in progress: accounts bytes they hold, checks the tenant's quota,
  // and hashes beside encrypting when a core is idle.
  void AddBuffered(int64_t delta);
  SpareThreads& spare_threads() { return spare_threads_; }
  // The tenant's quota for an upload in `region`.
  QuotaLimit LimitIn(const std::string& tenant, const std::string& region) const;
  // The patient key a shard row names (`wrapped_by` and `wrapped` as the row has them): from the
  // cache, the region's key vault, or the row itself for keys written before the vault. When the
  // vault no longer holds it: ABORTED if the caller read the row without locking it (an erasure
  // retired the key meanwhile: retry), DATA_LOSS if it holds the row's lock (the vault lost it).
  absl::StatusOr<PatientKey> OpenPatientKey(absl::string_view region, const std::string& patient_id,
                                            const std::string& key_id,
                                            absl::string_view wrapped_by,
                                            absl::string_view wrapped, bool row_locked = false);
  // A new patient key, stored in the region's key vault (committed there) before it is returned.
  absl::StatusOr<PatientKey> NewPatientKey(absl::string_view region, const std::string& patient_id);
  // RESOURCE_EXHAUSTED, naming the bytes used here and elsewhere, unless `adding` bytes to the
  // `used` of `region` fit `limit`.
  absl::Status CheckQuota(const std::string& tenant, const std::string& region, int64_t used,
                          uint64_t adding, const QuotaLimit& limit) const;
  // The CARE decision that lets `ctx`'s practitioner add a record for `home`'s patient, asked
  // when the upload starts and again before it commits. A refusal is audited in the patient's
  // home shard (UNAVAILABLE if it cannot be) and returned as PERMISSION_DENIED.
  absl::StatusOr<consent::AccessDecision> PermitUpload(const CallContext& ctx,
                                                       const PatientHome& home, RecordKind kind);

  // The record the caller stored with the header's request id, if any, on `connection` (the
  // header's patient's home shard): its result when its header was the same (the answer audited
  // as a read, under the upload's CARE decision `care`), ALREADY_EXISTS when not (a request id
  // names one upload).
  absl::StatusOr<std::optional<UploadResult>> StoredByRequest(pqxx::connection_base& connection,
                                                              const CallContext& ctx,
                                                              const UploadHeader& header,
                                                              const consent::AccessDecision& care);

 private:
  // The home of a patient of the caller's tenant: NOT_FOUND alike for an unknown patient and
  // another tenant's.
  absl::StatusOr<PatientHome> HomeOfCallersPatient(const CallContext& ctx,
                                                   const std::string& patient_id);
  // What an export reads a record for (OpenExport).
  struct ExportOf {
    const std::string& patient_id;
    const std::string& reason;
  };
  // OpenDownload, or OpenExport when `export_of` is set.
  absl::StatusOr<std::unique_ptr<Download>> OpenRecord(const CallContext& ctx,
                                                       const std::string& record_id,
                                                       const std::string& break_glass_reason,
                                                       const ExportOf* export_of);
  // Appends a read entry per patient of `listed` to its home shard's chain.
  absl::Status AuditListing(const CallContext& ctx, ListScope scope,
                            const std::vector<RecordInfo>& listed);
  absl::StatusOr<pg::Pool*> ShardOf(const std::string& object_id, absl::string_view what) const;
  // The data key of `record` from the MEDGATE_RECORD_KEY_COLUMNS that follow its
  // MEDGATE_RECORD_COLUMNS in `row` (its wrapped form and its patient key's id, KEK id and
  // wrapped form); DATA_LOSS naming the record when they are missing or do not open. `txn` is
  // the transaction `row` was read in: what the shard names now is asked there.
  absl::StatusOr<crypto::SecretKey> OpenRecordKey(pqxx::transaction_base& txn,
                                                  const RecordInfo& record, const pqxx::row& row);
  // The record's sealed metadata, opened with OpenRecordKey when there is any.
  absl::Status OpenMetadata(pqxx::transaction_base& txn, RecordInfo& record, const pqxx::row& row);
  // Seals the metadata of one page (at most `batch`) of records written before it was sealed,
  // after record id `after`: how many were selected and sealed, and the last id selected.
  struct SealPage {
    int selected = 0;
    int sealed = 0;
    std::string last_record_id;
  };
  absl::StatusOr<SealPage> SealMetadataInClear(pg::Pool& pool, int batch, const std::string& after);
  absl::Status CheckReadTerritory(const RecordInfo& record, absl::string_view reader_tenant);
  // In an erasure's transaction: deletes `record`'s key, and retires the patient key it was
  // wrapped under (queued for destruction and added to `retired`), rewrapping the patient's
  // other record keys under a new patient key.
  absl::Status ShredRecordKey(pqxx::work& txn, const std::string& region, const RecordInfo& record,
                              std::vector<std::string>& retired);
  // The same for several records of the patient `patient_id` (their rows locked, in record id
  // order), with one new patient key for the patient's other records, not one per record.
  absl::Status ShredRecordKeys(pqxx::work& txn, const std::string& region,
                               const std::string& patient_id,
                               const std::vector<std::string>& record_ids,
                               std::vector<std::string>& retired);
  // After a record's erasure transaction (`committed` or not): the patient's cached key is
  // forgotten, the retired keys destroyed (when committed), and the cache forgotten again.
  void AfterRecordErasure(pg::Pool& shard, const std::string& region,
                          const std::string& patient_id, const std::vector<std::string>& retired,
                          bool committed);
  // After the erasure committed: deletes the retired keys from the vault, then their queue rows
  // (what fails stays queued for the sweep).
  void DestroyRetiredKeys(pg::Pool& shard, const std::string& region,
                          const std::vector<std::string>& key_ids);
  // The sweep's key work in one region (see SweepRetention).
  absl::Status SweepKeys(pg::Pool& shard, const std::string& region, int batch,
                         SweepResult& result);
  // Whether a listing may show `record` (of `region`) to `caller`: as DownloadRecord would let
  // them read it. The owner needs CARE; a grantee an active grant whose sharer's RECORD_SHARING
  // still permits, and for another tenant, a territory the patient's residency rule allows.
  absl::StatusOr<bool> MayRead(const std::string& region, const RecordInfo& record,
                               const std::string& caller, absl::Time now);

  const pg::ShardSet& shards_;
  const pg::ShardSet& upload_shards_;
  PatientDirectory& directory_;
  consent::ConsentCache& consent_;
  KeyVault& vault_;
  const SharingOptions options_;
  PatientKeyCache patient_keys_;
  SpareThreads spare_threads_;
  std::atomic<int64_t> buffered_{0};
  // Uploads and downloads in progress, by tenant and region (from their start to their end).
  TransferCounts uploads_in_progress_;
  TransferCounts downloads_in_progress_;
  std::atomic<int64_t> peak_buffered_{0};
  // Per region, per tenant, the bytes of records the last fold read (FoldTenantUsage): at most
  // the regions times the tenants with records.
  mutable std::mutex usage_mu_;
  std::map<std::string, std::map<std::string, int64_t>> usage_by_region_;
  // One fold at a time, so that an older read never replaces a newer one.
  std::mutex fold_mu_;
  // Per region, the (retain_until, record_id) of the last expired archive the sweep took.
  std::mutex retention_mu_;
  std::map<std::string, std::pair<absl::Time, std::string>> retention_after_;
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_SHARING_CORE_H_
