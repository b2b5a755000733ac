// Every statement the sharing service runs: on the shards (records, keys, grants, audit_log) and
// on the control database (tenant territories, its audit_log).
#ifndef MEDGATE_SERVICES_SHARING_SQL_H_
#define MEDGATE_SERVICES_SHARING_SQL_H_

#include <vector>

#include "libs/pg/pool.h"

namespace medgate::sharing::sql {

// Times travel as text in ('2024-05-01 10:00:00.000000+00') and as microseconds since the epoch
// out, so that no precision is lost either way.
#define MEDGATE_MICROS(col) "(extract(epoch from " col ") * 1000000)::bigint"

// Columns of a record, in this order (see RecordFromRow). content_type, file_name and sha256 are
// NULL where the sealed forms are set (migrations 0006, 0018).
#define MEDGATE_RECORD_COLUMNS                                                                  \
  "r.record_id, r.tenant_id, r.patient_id, r.kind, r.content_type, r.file_name, r.size_bytes, " \
  "r.sha256, r.chunk_count, r.owner, " MEDGATE_MICROS(                                          \
      "r.created_at") ", r.state, " MEDGATE_MICROS("r.retain_until") ", r.content_type_sealed, "  \
                      "r.file_name_sealed, r.sha256_sealed"

// After MEDGATE_RECORD_COLUMNS, what opens the record's key (see OpenRecordKey), from
// MEDGATE_RECORD_KEY_JOIN: the wrapped record key, and its patient key's id, where the patient key
// is ('vault', or the id of the KEK that wraps it for rows written before the vault) and its
// wrapped form (empty when in the vault).
#define MEDGATE_RECORD_KEY_COLUMNS ", rk.wrapped_key, pk.key_id, pk.wrapped_by, pk.wrapped_key"
#define MEDGATE_RECORD_KEY_JOIN                                                   \
  " LEFT JOIN record_keys rk ON rk.record_id = r.record_id "                    \
  "LEFT JOIN record_keys pk ON pk.key_id = rk.wrapped_by AND pk.record_id IS NULL"

// Columns of a grant, in this order (see GrantFromRow).
#define MEDGATE_GRANT_COLUMNS                                                            \
  "g.grant_id, g.record_id, g.grantee, g.grantee_tenant, g.granted_by, " MEDGATE_MICROS( \
      "g.created_at") ", " MEDGATE_MICROS("g.expires_at") ", " MEDGATE_MICROS("g.revoked_at")

// The shard's audit_append() (migrations/shard/0005, 0010) with the entry in 15 parameters from $19
// on, in the order audit::WithEntryParams (libs/audit) passes them.
#define MEDGATE_AUDIT_APPEND_FROM_19                                                              \
  "audit_append($19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29::bigint, $30, $31, " \
  "$32::bytea, $33::bytea)"

#define MEDGATE_AUDIT_COLUMNS                                                                 \
  "seq, at_us, actor, tenant, action, object_type, object_id, patient_id, decision, reason, " \
  "purpose, consent_id, consent_version, request_id, origin, prev_hash, hash"

// The page of an audit query from its `scanned` entries: those of the actor ACTOR ('' for any),
// at most LIMIT, each with the scan's count and last seq (columns 17 and 18).
#define MEDGATE_AUDIT_PAGE(ACTOR, LIMIT)                                                        \
  "page AS (SELECT " MEDGATE_AUDIT_COLUMNS " FROM scanned WHERE (" ACTOR " = '' OR actor = " \
  ACTOR ") ORDER BY at_us, seq LIMIT " LIMIT ") "                                              \
  "SELECT page.*, m.scanned, m.last_seq FROM (SELECT count(*) AS scanned, "                   \
  "(SELECT seq FROM scanned ORDER BY at_us DESC, seq DESC LIMIT 1) AS last_seq FROM scanned) m " \
  "LEFT JOIN page ON true ORDER BY page.at_us, page.seq"

// Filters shared by the record listings: $2 kind (0: any), $3 include archived, $4/$5 the
// (created_at, record_id) of the previous page's last record, $6 the row limit.
#define MEDGATE_LIST_FILTERS                                                               \
  " AND ($2::smallint = 0 OR r.kind = $2::smallint) AND ($3::bool OR r.state = 'active') " \
  "AND (r.created_at, r.record_id) < ($4::timestamptz, $5::text) "                         \
  "ORDER BY r.created_at DESC, r.record_id DESC LIMIT $6"

inline constexpr char kSelectRecord[] = "select_record";
inline constexpr char kSelectRecordByRequest[] = "select_record_by_request";
inline constexpr char kPurgeRecordRequests[] = "purge_record_requests";
inline constexpr char kSelectRecordForShare[] = "select_record_for_share";
inline constexpr char kSelectRecordForUpdate[] = "select_record_for_update";
inline constexpr char kSelectRecordWithKey[] = "select_record_with_key";
inline constexpr char kRecordRestsOnKey[] = "record_rests_on_key";
inline constexpr char kPatientKeyRowExists[] = "patient_key_row_exists";
inline constexpr char kKeepAlive[] = "keep_alive";
inline constexpr char kSelectPatientKey[] = "select_patient_key";
inline constexpr char kSetUploadIdleTimeout[] = "set_upload_idle_timeout";
inline constexpr char kInsertPatientKey[] = "insert_patient_key";
inline constexpr char kFinishUpload[] = "finish_upload";
inline constexpr char kInsertChunk[] = "insert_chunk";
inline constexpr char kLockTenantUsage[] = "lock_tenant_usage";
inline constexpr char kTenantUsage[] = "tenant_usage";
inline constexpr char kFoldTenantUsage[] = "fold_tenant_usage";
inline constexpr char kAllTenantsUsage[] = "all_tenants_usage";
// Read in binary format, not as libpqxx's statements are: a chunk's ciphertext (up to 1 MiB) as
// text would be hex, twice its size. Through the record: no row once it is erased (an erasure
// stops the downloads already running at their next chunk; its chunks are purged later), a NULL
// when the chunk is missing. Chunk $2 of record $1 (no row: the record is gone), and whether
// grantee $3 (empty: the download rests on no grant) still holds an active grant on it at $4 (a
// re-share after a revocation is a new grant). A stored chunk longer than $5 bytes (more than a
// sealed chunk can be: a row altered in the shard) is not read, only said to be (the third
// column; its length is known without reading it): the download holds at most a chunk's bytes.
inline constexpr pg::BinaryQuery kSelectChunk(
    "SELECT CASE WHEN octet_length(c.ciphertext) <= $5::int THEN c.ciphertext END, "
    "$3 = '' OR EXISTS (SELECT 1 FROM share_grants g "
    "WHERE g.record_id = $1 AND g.grantee = $3 AND g.revoked_at IS NULL "
    "AND g.expires_at > $4::timestamptz), coalesce(octet_length(c.ciphertext) > $5::int, false) "
    "FROM records r LEFT JOIN record_chunks c "
    "ON c.record_id = r.record_id AND c.chunk_index = $2 WHERE r.record_id = $1");
// kSelectChunk's checks alone, for a chunk fetched ahead, as it is handed over: the record $1
// (no row: erased) and the grant of grantee $2 at $3.
inline constexpr pg::BinaryQuery kChunkStillReadable(
    "SELECT $2 = '' OR EXISTS (SELECT 1 FROM share_grants g "
    "WHERE g.record_id = $1 AND g.grantee = $2 AND g.revoked_at IS NULL "
    "AND g.expires_at > $3::timestamptz) FROM records r WHERE r.record_id = $1");
inline constexpr char kSelectActiveGrants[] = "select_active_grants";
inline constexpr char kSelectLatestGrant[] = "select_latest_grant";
inline constexpr char kUpsertGrant[] = "upsert_grant";
inline constexpr char kTrimRevokedGrants[] = "trim_revoked_grants";
inline constexpr char kCountOtherActiveGrants[] = "count_other_active_grants";
inline constexpr char kSelectGrantForUpdate[] = "select_grant_for_update";
inline constexpr char kRevokeGrant[] = "revoke_grant";
inline constexpr char kSelectGrant[] = "select_grant";
inline constexpr char kRevokeSharedOnward[] = "revoke_shared_onward";
inline constexpr char kListOwned[] = "list_owned";
inline constexpr char kListShared[] = "list_shared";
inline constexpr char kListPatient[] = "list_patient";
inline constexpr char kListPatientForExport[] = "list_patient_for_export";
inline constexpr char kArchiveRecord[] = "archive_record";
inline constexpr char kDeleteRecordKey[] = "delete_record_key";
inline constexpr char kDeleteRecord[] = "delete_record";
inline constexpr char kLockPatientKey[] = "lock_patient_key";
inline constexpr char kLockPatientRecords[] = "lock_patient_records";
inline constexpr char kDeletePatientRecords[] = "delete_patient_records";
inline constexpr char kSelectRecordKeysUnder[] = "select_record_keys_under";
inline constexpr char kSelectRecordKeyWrapper[] = "select_record_key_wrapper";
inline constexpr char kRewrapRecordKeys[] = "rewrap_record_keys";
inline constexpr char kDeletePatientKeyRow[] = "delete_patient_key_row";
inline constexpr char kQueueKeyDestruction[] = "queue_key_destruction";
inline constexpr char kSelectKeyDestructions[] = "select_key_destructions";
inline constexpr char kDeleteKeyDestructions[] = "delete_key_destructions";
inline constexpr char kSelectPatientKeysInUse[] = "select_patient_keys_in_use";
inline constexpr char kSelectPatientKeysInShard[] = "select_patient_keys_in_shard";
inline constexpr char kMarkPatientKeyInVault[] = "mark_patient_key_in_vault";
inline constexpr char kCountPatientKeysInShardNotUnder[] = "count_patient_keys_in_shard_not_under";
inline constexpr char kSelectExpiredArchives[] = "select_expired_archives";
inline constexpr char kPurgeOrphanChunks[] = "purge_orphan_chunks";
inline constexpr char kDequeuePurgedRecords[] = "dequeue_purged_records";
inline constexpr char kSelectMetadataInClear[] = "select_metadata_in_clear";
inline constexpr char kSealMetadata[] = "seal_metadata";
inline constexpr char kSelectAuditForPatient[] = "select_audit_for_patient";
inline constexpr char kSelectAuditLog[] = "select_audit_log";
inline constexpr char kSelectAuditHash[] = "select_audit_hash";
inline constexpr char kSelectAuditClock[] = "select_audit_clock";
inline constexpr char kSelectAuditTime[] = "select_audit_time";
inline constexpr char kSelectAuditHead[] = "select_audit_head";
inline constexpr char kLockAnchorsOf[] = "lock_anchors_of";
inline constexpr char kSelectLastAnchor[] = "select_last_anchor";
inline constexpr char kSelectLastAnchorEntry[] = "select_last_anchor_entry";
inline constexpr char kSelectEntriesBesideAnchorsAfter[] = "select_entries_beside_anchors_after";
inline constexpr char kSelectTenantTerritories[] = "select_tenant_territories";
inline constexpr char kSelectPatientReport[] = "select_patient_report";
inline constexpr char kCountPatientRows[] = "count_patient_rows";

inline const std::vector<pg::Statement>& AuditStatements() {
  static const std::vector<pg::Statement> statements = {
      // In (at_us, seq) order from a lower bound ($2, $3), past which the index scan starts:
      // a range of a long history is found in the indexes of migrations shard 0022 / control
      // 0008, not read from the history's start. patient_id <> '' lets a generic plan use the
      // partial index.
      // An actor filter reads at most $7 / $6 entries of the range (the scan's bound): the
      // actor is not in the index, and a rare one must not make a page read a whole history.
      // Every row also says how many entries the scan read and the last of them (where the next
      // page goes on when the scan stopped at its bound); with no entry matching, one row of
      // NULL entry columns says it. One statement, so one snapshot: entries committed meanwhile
      // cannot move the scan's end past entries the page never read.
      {kSelectAuditForPatient,
       "WITH scanned AS MATERIALIZED (SELECT " MEDGATE_AUDIT_COLUMNS " FROM audit_log "
       "WHERE patient_id = $1 AND patient_id <> '' AND (at_us, seq) > ($2, $3) AND at_us < $4 "
       "ORDER BY at_us, seq LIMIT $7), " MEDGATE_AUDIT_PAGE("$5", "$6")},
      {kSelectAuditLog,
       "WITH scanned AS MATERIALIZED (SELECT " MEDGATE_AUDIT_COLUMNS " FROM audit_log "
       "WHERE (at_us, seq) > ($1, $2) AND at_us < $3 ORDER BY at_us, seq LIMIT $6), "
       MEDGATE_AUDIT_PAGE("$4", "$5")},
      {kSelectAuditHash, "SELECT hash FROM audit_log WHERE seq = $1"},
      // The database's clock as audit_append() reads it for an entry's time (at_us).
      {kSelectAuditClock, "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"},
      {kSelectAuditTime,
       "SELECT at_us FROM audit_log WHERE seq = $1 AND ($2 = '' OR patient_id = $2)"},
      // Anchors (AuditCore::RecordAnchors): another log's head recorded in this one. The head
      // as appends leave it; recorders of the same log's anchors in this database take turns.
      {kSelectAuditHead, "SELECT seq, hash FROM audit_head WHERE id"},
      {kLockAnchorsOf,
       "SELECT pg_advisory_xact_lock(hashtext('medgate.audit_anchor'), hashtext($1))"},
      // The latest anchor of log $1 recorded here (the partial index of migrations shard 0036 /
      // control 0015), refusals of one (decision 'deny') aside.
      {kSelectLastAnchor,
       "SELECT seq, reason FROM audit_log WHERE object_type = 'audit_anchor' AND object_id = $1 "
       "AND decision = 'permit' ORDER BY seq DESC LIMIT 1"},
      // The latest anchor entry of log $1 here, a refusal or not.
      {kSelectLastAnchorEntry,
       "SELECT decision, reason FROM audit_log WHERE object_type = 'audit_anchor' AND "
       "object_id = $1 ORDER BY seq DESC LIMIT 1"},
      // Whether anything but anchors was appended after entry $1: the log moved since.
      {kSelectEntriesBesideAnchorsAfter,
       "SELECT EXISTS (SELECT 1 FROM audit_log WHERE seq > $1 AND object_type <> 'audit_anchor')"},
  };
  return statements;
}

inline const std::vector<pg::Statement>& ShardStatements() {
  static const std::vector<pg::Statement> statements = [] {
    std::vector<pg::Statement> s = {
        {kSelectRecord, "SELECT " MEDGATE_RECORD_COLUMNS " FROM records r WHERE r.record_id = $1"},
        {kSelectRecordForShare,
         // Shares of one record take turns, so the bound on its active grants holds.
         "SELECT " MEDGATE_RECORD_COLUMNS " FROM records r WHERE r.record_id = $1 "
         "FOR NO KEY UPDATE"},
        {kSelectRecordForUpdate,
         "SELECT " MEDGATE_RECORD_COLUMNS " FROM records r WHERE r.record_id = $1 FOR UPDATE"},
        {kSelectRecordWithKey, "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
                               " FROM records r" MEDGATE_RECORD_KEY_JOIN " WHERE r.record_id = $1"},
        // The record owner $1 stored with request id $2 (shard migration 0023), to answer a retry:
        // no row when none, the record's columns NULL when it was erased since.
        {kSelectRecordByRequest, "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
                                 " FROM record_requests q LEFT JOIN records r "
                                 "ON r.record_id = q.record_id" MEDGATE_RECORD_KEY_JOIN
                                 " WHERE q.owner = $1 AND q.request_id = $2"},
        // Request ids given before $1, at most $2 of them.
        {kPurgeRecordRequests,
         "WITH old AS (SELECT owner, request_id FROM record_requests "
         "WHERE created_at < $1::timestamptz ORDER BY created_at LIMIT $2), "
         "gone AS (DELETE FROM record_requests q USING old "
         "WHERE q.owner = old.owner AND q.request_id = old.request_id RETURNING 1) "
         "SELECT count(*) FROM gone"},
        {kSelectPatientKey,
         "SELECT key_id, wrapped_by, wrapped_key FROM record_keys "
         "WHERE patient_id = $1 AND record_id IS NULL"},
        // Whether record $1's data key is still wrapped by patient key $2.
        {kRecordRestsOnKey, "SELECT 1 FROM record_keys WHERE record_id = $1 AND wrapped_by = $2"},
        // Bounds how long a multi-chunk upload's transaction may sit idle between two of its
        // statements ($1 ms; a chunk's insert, or a keepalive while content still arrives); it
        // ends with the transaction.
        {kSetUploadIdleTimeout,
         "SELECT set_config('idle_in_transaction_session_timeout', $1, true)"},
        // Resets the shard's idle-in-transaction timer of a multi-chunk upload still receiving.
        {kKeepAlive, "SELECT 1"},
        // The patient's key, created in the transaction of the upload that needs it first (a
        // concurrent first upload waits here for the other's commit, then reads its key). No row:
        // another transaction's key exists.
        {kInsertPatientKey,
         "INSERT INTO record_keys (key_id, patient_id, record_id, wrapped_by, wrapped_key, "
         "created_at) VALUES ($1, $2, NULL, $3, $4, $5::timestamptz) "
         "ON CONFLICT (patient_id) WHERE record_id IS NULL DO NOTHING RETURNING key_id"},
        // What makes an upload visible, in one statement: its last chunk, the record, its wrapped
        // key and the audit entry. Only while the patient key the record key is wrapped under
        // still exists (held with FOR KEY SHARE until commit, so an erasure waits for us or we
        // see it), and only when the tenant's quota has room for the record: with a quota, the
        // statement first takes the tenant's usage lock (held until commit) and reads its usage
        // (shard migration 0024). The record's insert reads the chunk's and the key's, so those
        // are written before the audit entry takes the chain's lock.
        // $1 record_id, $2 tenant_id, $3 patient_id, $4 kind, $5 content_type and $6 file_name
        // (both sealed), $7 size_bytes, $8 sha256 (sealed), $9 chunk_count, $10 owner, $11 created_at,
        // $12 record key id, $13 patient key id, $14 wrapped record key, $15 last chunk's index,
        // $16 its ciphertext, $17 the client's request id, $18 the bytes the tenant may hold in
        // this region (QuotaLimit::room_here; NULL: no limit; at most 0 when its other regions
        // hold its quota), $19.. the audit entry (ExecWithAudit in sharing_core.cc).
        // One row back: the usage read (NULL without a quota) and the audit entry's seq, NULL when
        // nothing was written (no room, or the patient key is gone).
        {kFinishUpload,
         "WITH usage AS (SELECT CASE WHEN $18::bigint IS NOT NULL THEN "
         "medgate_lock_tenant_usage($2) END AS used), "
         "patient_key AS (SELECT key_id FROM record_keys WHERE key_id = $13 "
         "AND patient_id = $3 AND record_id IS NULL "
         "AND ($18::bigint IS NULL OR (SELECT used FROM usage) + $7::bigint <= $18::bigint) "
         "FOR KEY SHARE), "
         "chunk AS (INSERT INTO record_chunks (record_id, chunk_index, ciphertext) "
         "SELECT $1, $15, $16 FROM patient_key RETURNING chunk_index), "
         "record_key AS (INSERT INTO record_keys (key_id, patient_id, record_id, wrapped_by, "
         "wrapped_key, created_at) SELECT $12, $3, $1, key_id, $14, $11::timestamptz "
         "FROM patient_key RETURNING key_id), "
         "record AS (INSERT INTO records (record_id, tenant_id, patient_id, kind, "
         "content_type_sealed, file_name_sealed, size_bytes, sha256_sealed, chunk_count, owner, "
         "created_at, state) "
         "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::timestamptz, 'active' "
         "FROM chunk, record_key RETURNING record_id), "
         // The client's request id, if any (shard migration 0023): one this practitioner already
         // gave is a unique violation, which answers the upload with the record stored then.
         // Read by the last line so that it runs before the audit append: a retry's statement
         // stops before it appends a create entry, and a second upload at once waits on the
         // first's request id.
         "request AS (INSERT INTO record_requests (owner, request_id, record_id, created_at) "
         "SELECT $10, $17, record_id, $11::timestamptz FROM record WHERE $17 <> '' "
         "RETURNING 1) "
         "SELECT (SELECT used FROM usage), (SELECT " MEDGATE_AUDIT_APPEND_FROM_19 " FROM record "
         "WHERE (SELECT count(*) FROM request) >= 0)"},
        {kInsertChunk,
         "INSERT INTO record_chunks (record_id, chunk_index, ciphertext) VALUES ($1, $2, $3)"},
        // Takes the tenant's usage lock until the transaction ends, then reads its usage in a
        // snapshot of its own (shard migration 0024).
        {kLockTenantUsage, "SELECT medgate_lock_tenant_usage($1)"},
        // The count the sweep folded (shard migration 0019) and the changes the records table's
        // triggers appended since (0021), read in one snapshot.
        {kTenantUsage,
         "SELECT coalesce((SELECT bytes FROM tenant_record_usage WHERE tenant_id = $1), 0) + "
         "coalesce((SELECT sum(bytes) FROM tenant_record_usage_changes WHERE tenant_id = $1), 0)"},
        {kFoldTenantUsage, "SELECT medgate_fold_record_usage()"},
        // Every tenant's usage in the shard, as kTenantUsage reads one's. Run right after the fold,
        // it reads a row a tenant and the changes of a few seconds at most.
        {kAllTenantsUsage,
         "SELECT tenant_id, sum(bytes)::int8 FROM ("
         "SELECT tenant_id, bytes FROM tenant_record_usage UNION ALL "
         "SELECT tenant_id, bytes FROM tenant_record_usage_changes) u GROUP BY tenant_id"},
        // The active grants of records $1, in their order: all of them for a record whose $2 is
        // true (the caller owns it), else only those to $4; at most $5.
        {kSelectActiveGrants,
         "SELECT " MEDGATE_GRANT_COLUMNS " FROM unnest($1::text[], $2::bool[]) "
         "WITH ORDINALITY AS r(record_id, all_grants, n) "
         "JOIN share_grants g ON g.record_id = r.record_id "
         "WHERE g.revoked_at IS NULL AND g.expires_at > $3::timestamptz "
         "AND (r.all_grants OR g.grantee = $4) ORDER BY r.n, g.created_at, g.grant_id LIMIT $5"},
        {kSelectLatestGrant, "SELECT " MEDGATE_GRANT_COLUMNS " FROM share_grants g "
                             "WHERE g.record_id = $1 AND g.grantee = $2 "
                             "ORDER BY (g.revoked_at IS NULL) DESC, g.created_at DESC LIMIT 1"},
        {kCountOtherActiveGrants,
         "SELECT count(*) FROM share_grants WHERE record_id = $1 AND revoked_at IS NULL "
         "AND expires_at > $2::timestamptz AND grantee <> $3"},
        {kUpsertGrant,
         "INSERT INTO share_grants AS g (grant_id, record_id, grantee, grantee_tenant, "
         "granted_by, created_at, expires_at) "
         "VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7::timestamptz) "
         "ON CONFLICT (record_id, grantee) WHERE revoked_at IS NULL DO UPDATE SET "
         "granted_by = EXCLUDED.granted_by, created_at = EXCLUDED.created_at, "
         "expires_at = GREATEST(g.expires_at, EXCLUDED.expires_at) RETURNING " MEDGATE_GRANT_COLUMNS},
        // Of record $1's revoked grants to grantee $2, all but the latest (shard migration 0029).
        {kTrimRevokedGrants, "SELECT medgate_trim_revoked_grants($1, $2)"},
        {kSelectGrantForUpdate,
         "SELECT " MEDGATE_GRANT_COLUMNS " FROM share_grants g WHERE g.grant_id = $1 FOR UPDATE"},
        {kRevokeGrant,
         "UPDATE share_grants g SET revoked_at = coalesce(g.revoked_at, $2::timestamptz) "
         "WHERE g.grant_id = $1 RETURNING " MEDGATE_GRANT_COLUMNS},
        {kSelectGrant, "SELECT " MEDGATE_GRANT_COLUMNS " FROM share_grants g WHERE g.grant_id = $1"},
        // The active grants of record $1 that grantee $2 made, those their grantees made, and so
        // on: revoked at $3 with $2's grant, which they rest on. (A grant the owner extended is
        // the owner's: granted_by names whoever last vouched for it.)
        {kRevokeSharedOnward,
         "WITH RECURSIVE onward(sharer) AS ("
         " SELECT $2::text"
         " UNION"
         " SELECT g.grantee FROM share_grants g JOIN onward o ON g.granted_by = o.sharer"
         " WHERE g.record_id = $1 AND g.revoked_at IS NULL AND g.expires_at > $3::timestamptz) "
         "UPDATE share_grants g SET revoked_at = $3::timestamptz "
         "WHERE g.record_id = $1 AND g.revoked_at IS NULL AND g.expires_at > $3::timestamptz "
         "AND g.granted_by IN (SELECT sharer FROM onward) RETURNING " MEDGATE_GRANT_COLUMNS},
        {kListOwned, "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
                     " FROM records r" MEDGATE_RECORD_KEY_JOIN
                     " WHERE r.owner = $1" MEDGATE_LIST_FILTERS},
        {kListShared, "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
                      " FROM records r JOIN share_grants g "
                      "ON g.record_id = r.record_id AND g.grantee = $1 AND g.revoked_at IS NULL "
                      "AND g.expires_at > $7::timestamptz" MEDGATE_RECORD_KEY_JOIN
                      " WHERE true" MEDGATE_LIST_FILTERS},
        {kListPatient,
         "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
         " FROM records r" MEDGATE_RECORD_KEY_JOIN " WHERE r.patient_id = $1 "
         "AND (r.owner = $7 OR EXISTS (SELECT 1 FROM share_grants g WHERE g.record_id = "
         "r.record_id AND g.grantee = $7 AND g.revoked_at IS NULL "
         "AND g.expires_at > $8::timestamptz))" MEDGATE_LIST_FILTERS},
        // A patient export's page: the ids of the patient $1's records older than ($2, $3), newest
        // first, at most $4 (records_patient's order).
        {kListPatientForExport,
         "SELECT record_id, " MEDGATE_MICROS("created_at") " FROM records WHERE patient_id = $1 "
         "AND (created_at, record_id) < ($2::timestamptz, $3::text) "
         "ORDER BY created_at DESC, record_id DESC LIMIT $4"},
        {kArchiveRecord,
         "UPDATE records SET state = 'archived', retain_until = $2::timestamptz "
         "WHERE record_id = $1"},
        {kDeleteRecordKey, "DELETE FROM record_keys WHERE record_id = $1"},
        {kDeleteRecord, "DELETE FROM records WHERE record_id = $1"},
        // An upload stores its record under the patient key FOR KEY SHARE: locking the key first
        // lets uploads finishing now commit before the erasure looks, and makes later ones wait
        // for it and then find no key.
        {kLockPatientKey,
         "SELECT key_id, wrapped_by, wrapped_key FROM record_keys WHERE patient_id = $1 "
         "AND record_id IS NULL FOR UPDATE"},
        // A patient erasure's first lock: the patient's records, in one order, before the key.
        // Erasing one record locks its row, then the key (ShredRecordKey); taken the other way
        // round, the two erasures would each hold what the other waits for.
        {kLockPatientRecords,
         "SELECT record_id FROM records WHERE patient_id = $1 ORDER BY record_id FOR UPDATE"},
        // Patient $3's record keys wrapped under patient key $1, but record $2's.
        {kSelectRecordKeysUnder,
         "SELECT record_id, wrapped_key FROM record_keys WHERE patient_id = $3 "
         "AND wrapped_by = $1 AND record_id IS NOT NULL AND record_id <> $2 ORDER BY record_id"},
        {kSelectRecordKeyWrapper, "SELECT wrapped_by FROM record_keys WHERE record_id = $1"},
        // Whether $1 is a patient key the shard still names (not one an erasure retired).
        {kPatientKeyRowExists,
         "SELECT 1 FROM record_keys WHERE key_id = $1 AND record_id IS NULL"},
        // Record keys $2 (ids) rewrapped as $3 (hex) under patient key $1, where patient key $4
        // still wraps them.
        {kRewrapRecordKeys,
         "UPDATE record_keys k SET wrapped_by = $1, wrapped_key = decode(n.w, 'hex') "
         "FROM unnest($2::text[], $3::text[]) AS n(id, w) "
         "WHERE k.record_id = n.id AND k.wrapped_by = $4"},
        {kDeletePatientKeyRow, "DELETE FROM record_keys WHERE key_id = $1 AND record_id IS NULL"},
        // Patient keys retired by an erasure, for the vault to delete once it has committed.
        {kQueueKeyDestruction,
         "INSERT INTO key_destructions (key_id, patient_id) VALUES ($1, $2) "
         "ON CONFLICT (key_id) DO NOTHING"},
        {kSelectKeyDestructions,
         "SELECT key_id FROM key_destructions ORDER BY requested_at, key_id LIMIT $1"},
        {kDeleteKeyDestructions, "DELETE FROM key_destructions WHERE key_id = ANY($1::text[])"},
        // Which of the patient keys $1 this shard uses.
        {kSelectPatientKeysInUse,
         "SELECT key_id FROM record_keys WHERE key_id = ANY($1::text[]) AND record_id IS NULL"},
        // Patient keys still held here, wrapped by the KEK (written before the vault).
        {kSelectPatientKeysInShard,
         "SELECT key_id, patient_id, wrapped_by, wrapped_key FROM record_keys "
         "WHERE record_id IS NULL AND wrapped_by <> 'vault' AND key_id > $2 ORDER BY key_id "
         "LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED"},
        // Patient keys the shard still holds (from before the vault) that KEK $1 does not wrap.
        {kCountPatientKeysInShardNotUnder,
         "SELECT count(*) FROM record_keys WHERE record_id IS NULL AND wrapped_by <> 'vault' "
         "AND wrapped_by <> $1"},
        {kMarkPatientKeyInVault,
         "UPDATE record_keys SET wrapped_by = 'vault', wrapped_key = ''::bytea "
         "WHERE key_id = $1 AND record_id IS NULL"},
        // Patient $1's records, record keys and patient keys, the patient keys queued for the
        // vault: ('record', record_id) and ('key', key_id) rows. Record keys and the patient key
        // are deleted apart, each through its partial index (0004, 0013): `patient_id = $1`
        // alone implies neither index's predicate, and read every record key of the shard.
        {kDeletePatientRecords,
         "WITH gone AS (DELETE FROM records WHERE patient_id = $1 RETURNING record_id), "
         "record_keys_gone AS (DELETE FROM record_keys WHERE patient_id = $1 "
         "AND record_id IS NOT NULL), "
         "patient_keys AS (DELETE FROM record_keys WHERE patient_id = $1 AND record_id IS NULL "
         "RETURNING key_id, patient_id), "
         "queued AS (INSERT INTO key_destructions (key_id, patient_id) SELECT key_id, patient_id "
         "FROM patient_keys ON CONFLICT (key_id) DO NOTHING RETURNING key_id) "
         "SELECT 'record', record_id FROM gone UNION ALL SELECT 'key', key_id FROM queued "
         "ORDER BY 1 DESC, 2"},
        // Past the sweep's last one, ($3, $4).
        {kSelectExpiredArchives,
         "SELECT record_id, " MEDGATE_MICROS("retain_until") ", patient_id FROM records "
         "WHERE state = 'archived' AND retain_until <= $1::timestamptz "
         "AND (retain_until, record_id) > ($3::timestamptz, $4) "
         "ORDER BY retain_until, record_id LIMIT $2"},
        // Records written before metadata was sealed, with what opens their key ($1 at most).
        {kSelectMetadataInClear,
         "SELECT " MEDGATE_RECORD_COLUMNS MEDGATE_RECORD_KEY_COLUMNS
         " FROM records r" MEDGATE_RECORD_KEY_JOIN
         " WHERE (r.file_name IS NOT NULL OR r.content_type IS NOT NULL OR r.sha256 IS NOT NULL) "
         "AND r.record_id > $2 "
         "ORDER BY r.record_id LIMIT $1 FOR UPDATE OF r SKIP LOCKED"},
        {kSealMetadata,
         "UPDATE records SET content_type = NULL, file_name = NULL, sha256 = NULL, "
         "content_type_sealed = $2, file_name_sealed = $3, sha256_sealed = $4 "
         "WHERE record_id = $1"},
        // At most $1 chunks of the erased records queued for the purge (shard migration 0020),
        // in key order (two instances' purges lock them in the same order): how many were
        // deleted.
        {kPurgeOrphanChunks,
         "WITH doomed AS (SELECT c.record_id, c.chunk_index FROM chunk_purge_queue q "
         "JOIN record_chunks c ON c.record_id = q.record_id "
         "ORDER BY c.record_id, c.chunk_index LIMIT $1), "
         "gone AS (DELETE FROM record_chunks c USING doomed d "
         "WHERE c.record_id = d.record_id AND c.chunk_index = d.chunk_index RETURNING 1) "
         "SELECT count(*) FROM gone"},
        // The queued records with no chunk left leave the queue.
        {kDequeuePurgedRecords,
         "DELETE FROM chunk_purge_queue q WHERE NOT EXISTS "
         "(SELECT 1 FROM record_chunks c WHERE c.record_id = q.record_id)"},
        // A patient's data report from its home shard, one statement so one snapshot: a row per
        // kind stored (kind, NULL, count, -, -, first, last, -, -, -, -), the snapshot's time
        // ('as_of', NULL, 0, -, -, time, -, ...), and the $2 latest actors of the patient's audit
        // entries ('accessor', actor, reads, writes, denied, first, last, actors in all, entries
        // in all, the first entry's time, the last's): the audit log, the longest history, is
        // read once. Each part is found by an index on patient_id; vitals, which this role may
        // not read, through medgate_vitals_summary (shard migration 0033).
        {kSelectPatientReport,
         "SELECT 'vitals', NULL::text, v.samples, NULL::bigint, NULL::bigint, v.first_us, "
         "v.last_us, NULL::bigint, NULL::numeric, NULL::bigint, NULL::bigint "
         "FROM medgate_vitals_summary($1) v "
         "UNION ALL SELECT 'records', NULL, count(*), NULL, NULL, min(" MEDGATE_MICROS(
             "created_at") "), max(" MEDGATE_MICROS("created_at") "), NULL, NULL, NULL, NULL "
         "FROM records WHERE patient_id = $1 "
         "UNION ALL SELECT 'share_grants', NULL, count(*), NULL, NULL, min(" MEDGATE_MICROS(
             "g.created_at") "), max(" MEDGATE_MICROS("g.created_at") "), NULL, NULL, NULL, NULL "
         "FROM share_grants g JOIN records r ON r.record_id = g.record_id "
         "WHERE r.patient_id = $1 AND g.revoked_at IS NULL AND g.expires_at > now() "
         "UNION ALL SELECT 'consents', NULL, count(*), NULL, NULL, min(" MEDGATE_MICROS(
             "created_at") "), max(" MEDGATE_MICROS("created_at") "), NULL, NULL, NULL, NULL "
         "FROM consents WHERE patient_id = $1 "
         "UNION ALL SELECT 'as_of', NULL, 0, NULL, NULL, " MEDGATE_MICROS(
             "statement_timestamp()") ", NULL, NULL, NULL, NULL, NULL "
         "UNION ALL (SELECT 'accessor', actor, "
         "count(*) FILTER (WHERE decision = 'permit' AND action = 'read'), "
         "count(*) FILTER (WHERE decision = 'permit' AND action <> 'read'), "
         "count(*) FILTER (WHERE decision = 'deny'), min(at_us), max(at_us), count(*) OVER (), "
         "sum(count(*)) OVER (), min(min(at_us)) OVER (), max(max(at_us)) OVER () "
         "FROM audit_log WHERE patient_id = $1 AND patient_id <> '' GROUP BY actor "
         "ORDER BY max(at_us) DESC, actor LIMIT $2)"},
        // What a shard that is not the patient's home holds of them: nothing, unless residency
        // was broken. key_destructions by shard migration 0034's index.
        {kCountPatientRows,
         "SELECT (SELECT samples FROM medgate_vitals_summary($1)) + "
         "(SELECT count(*) FROM records WHERE patient_id = $1) + "
         // Patient keys and record keys, each by its partial index.
         "(SELECT count(*) FROM record_keys WHERE patient_id = $1 AND record_id IS NULL) + "
         "(SELECT count(*) FROM record_keys WHERE patient_id = $1 AND record_id IS NOT NULL) + "
         "(SELECT count(*) FROM key_destructions WHERE patient_id = $1) + "
         "(SELECT count(*) FROM consents WHERE patient_id = $1) + "
         "(SELECT count(*) FROM audit_log WHERE patient_id = $1 AND patient_id <> '')"},
    };
    for (const pg::Statement& a : AuditStatements()) s.push_back(a);
    return s;
  }();
  return statements;
}

inline const std::vector<pg::Statement>& ControlStatements() {
  static const std::vector<pg::Statement> statements = [] {
    std::vector<pg::Statement> s = {
        {kSelectTenantTerritories, "SELECT territories, active FROM tenants WHERE tenant_id = $1"},
    };
    for (const pg::Statement& a : AuditStatements()) s.push_back(a);
    return s;
  }();
  return statements;
}

#undef MEDGATE_LIST_FILTERS
#undef MEDGATE_AUDIT_COLUMNS
#undef MEDGATE_AUDIT_APPEND_FROM_19
#undef MEDGATE_GRANT_COLUMNS
#undef MEDGATE_RECORD_KEY_JOIN
#undef MEDGATE_RECORD_KEY_COLUMNS
#undef MEDGATE_RECORD_COLUMNS
#undef MEDGATE_MICROS

}  // namespace medgate::sharing::sql

#endif  // MEDGATE_SERVICES_SHARING_SQL_H_
