// The Audit service's logic over plain values: who accessed a patient's data (from the home
// shard's audit log), whole-log reads and chain verification for ops.
#ifndef MEDGATE_SERVICES_SHARING_AUDIT_CORE_H_
#define MEDGATE_SERVICES_SHARING_AUDIT_CORE_H_

#include <cstdint>
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/audit/audit_log.h"
#include "libs/common/bounded_counts.h"
#include "libs/pg/pool.h"
#include "libs/pg/shard_set.h"
#include "services/sharing/patient_directory.h"
#include "services/sharing/sharing_core.h"

namespace medgate::sharing {

// One audit log: a region's shard, or the control database.
struct AuditLogRef {
  std::string region_id;
  bool control = false;
};

struct AuditQuery {
  std::string patient_id;
  std::optional<AuditLogRef> log;
  absl::Time start = absl::InfinitePast();
  absl::Time end = absl::InfiniteFuture();
  std::string actor;
  int page_size = 100;  // already bounded by the adapter
  std::string page_token;
};

struct AuditPage {
  std::vector<audit::StoredEntry> entries;
  std::string next_page_token;
};

// What a shard holds of one kind of a patient's data (Audit.PatientDataReport).
struct StoredCount {
  std::string kind;  // "vitals", "records", "share_grants", "consents", "audit_entries"
  int64_t count = 0;
  int64_t first_us = 0;  // unset (0) when count is 0
  int64_t last_us = 0;
};

// What a shard other than the patient's home holds of them.
struct RegionRows {
  std::string region_id;
  int64_t rows = 0;
  std::string unavailable;  // why the shard could not be asked; empty when it answered
};

// One identity's entries about the patient in the home shard's audit log.
struct Accessor {
  std::string actor;
  int64_t reads = 0;   // permitted reads
  int64_t writes = 0;  // permitted creations, updates, deletions, executions
  int64_t denied = 0;
  int64_t first_us = 0;
  int64_t last_us = 0;
};

struct PatientReport {
  PatientHome home;
  std::vector<StoredCount> stored;
  std::vector<RegionRows> other_regions;
  std::vector<Accessor> accessors;  // latest first
  int64_t accessors_left_out = 0;
  int64_t as_of_us = 0;
};

// Accessors one report lists at most.
inline constexpr int kMaxReportedAccessors = 100;
// Reports one tenant (or ops) runs at once: each holds a home shard connection while it counts.
inline constexpr int kMaxReportsPerTenant = 2;
// The bound on the report's statement in the home shard (years of a monitored patient's samples
// and audit entries take seconds to count).
inline constexpr absl::Duration kReportStatementTimeout = absl::Seconds(30);

enum class ChainFault {
  kNone, kHashMismatch, kPrevHashMismatch, kSeqGap, kBadGenesis, kMalformed, kAnchorMismatch,
  kPastHead
};

// An entry's hash kept outside the database from an earlier verification.
struct ChainAnchor {
  int64_t seq = 0;   // 0: no anchor
  std::string hash;  // 32 raw bytes
};

struct ChainReport {
  bool ok = true;
  int64_t entries_checked = 0;
  int64_t first_bad_seq = 0;
  ChainFault fault = ChainFault::kNone;
  std::string detail;
  int64_t last_seq = 0;
  std::string last_hash;  // 32 raw bytes; empty for an empty log
  // The latest anchor of the log recorded in another log (RecordAnchors) that the verification
  // checked: its seq (0 when none applied) and the log holding it; why none could be read.
  int64_t recorded_anchor_seq = 0;
  std::string recorded_anchor_log;
  std::string recorded_anchor_unavailable;
};

// Anchors: each audit log's chain head recorded as an entry of another log (object_type
// "audit_anchor", object_id the anchored log's name, reason AnchorReason()). Someone able to write
// one database can cut its log short, or rewrite it with its hashes recomputed, and the chain
// alone still verifies; the anchor in another database, which they cannot write, shows it.
inline constexpr char kAnchorObjectType[] = "audit_anchor";
// "ANCHOR: seq=N hash=HEX" (64 lower-case hex digits), followed by " REBASED: " and `rebased`
// when ops anchored the log anew (RebaseAnchor).
std::string AnchorReason(const ChainAnchor& anchor, absl::string_view rebased = "");
// The anchor an entry's reason records; nullopt for any other text.
std::optional<ChainAnchor> ParseAnchorReason(absl::string_view reason);

// What RebaseAnchor recorded.
struct RebasedAnchor {
  ChainAnchor anchor;
  std::vector<std::string> recorded_in;
  std::vector<std::string> unavailable;  // "log: why"
};

// The longest reason RebaseAnchor takes.
inline constexpr size_t kMaxRebaseReasonBytes = 500;

// What one round of RecordAnchors did, over every pair of logs it looked at.
struct AnchorRound {
  int recorded = 0;   // heads recorded
  int unchanged = 0;  // logs with nothing but anchors appended since their last anchor
  // Logs whose entry at their last recorded anchor is gone or has another hash: refused, not
  // anchored again (each refusal is an entry, decision deny, in the log holding the anchor).
  std::vector<std::string> mismatched;
  std::vector<std::string> failed;  // "log -> log: error", a database that did not answer
};

// The fault libs/audit found, as the Audit API names it (kNone when the walk verified).
ChainFault FaultOf(const audit::VerifyResult& result);

// A stored reason "CODE" or "CODE: detail" split in its machine-readable code and free text; a
// reason that does not start with an UPPER_SNAKE code is all detail.
std::pair<std::string, std::string> SplitReason(absl::string_view reason);

// Entries of a time range one QueryAudit page filtered by actor reads at most: about as many as
// an index range scan reads in a few milliseconds.
inline constexpr int64_t kMaxAuditScannedPerPage = 10000;

// Walks of one log that a server runs at once: each holds one of the log's database connections,
// and one snapshot, for as long as it reads (a whole-log walk reads every entry).
inline constexpr int kMaxChainWalksPerLog = 1;

class AuditCore {
 public:
  // `control` and `shards` must have been created with statements including
  // sql::AuditStatements().
  // `max_scanned_per_page`: how many entries of the time range one page filtered by actor may
  // read (kMaxAuditScannedPerPage; tests make it small). `report_statement_timeout`: the bound
  // on a data report's statement in the home shard (kReportStatementTimeout; tests make it
  // small; at least 1 ms).
  // `consent` decides whether a practitioner may read a patient's audit trail (MayReadTrail).
  AuditCore(pg::Pool& control, const pg::ShardSet& shards, PatientDirectory& directory,
            consent::ConsentCache& consent,
            int64_t max_scanned_per_page = kMaxAuditScannedPerPage,
            absl::Duration report_statement_timeout = kReportStatementTimeout);

  // Practitioners and apps: entries about one patient of their tenant (practitioners under the
  // patient's CARE consent: MayReadTrail). Ops: about any patient, or a whole log. The query itself is audited in the log it read. A query by actor reads at
  // most max_scanned_per_page entries of the range a page, so its pages may be short or empty
  // and still carry a next_page_token.
  absl::StatusOr<AuditPage> Query(const CallContext& ctx, const AuditQuery& query);

  // Ops: recomputes a log's chain, whole (start_seq <= 1 and end_seq 0) or entries start_seq to
  // end_seq (0: to the last entry) from the stored hash of the entry before, and, given an
  // anchor, checks that its entry still has its hash; audited. A range checked against an anchor
  // must contain the anchor's entry and start at most one entry after it: entries between the
  // anchor and the range's start would be trusted unchecked. `cancelled` (the call's, say) stops
  // a long walk with CANCELLED. A walk of a log that kMaxChainWalksPerLog walks are reading
  // already is RESOURCE_EXHAUSTED.
  // Where a patient's data is and who saw it, for practitioners (under the patient's CARE
  // consent) and apps of the patient's tenant and ops (NOT_FOUND for another tenant's patient): the home shard's counts and accessors in
  // one snapshot, read in the transaction that audits the report there; every other region's
  // shard asked how many rows name the patient (a shard that does not answer is reported so, the
  // report goes on). At most kMaxReportsPerTenant of a tenant's at once (RESOURCE_EXHAUSTED).
  // `cancelled` (the call's) stops it before the home shard is read: CANCELLED, nothing audited.
  absl::StatusOr<PatientReport> Report(const CallContext& ctx, const std::string& patient_id,
                                       const std::function<bool()>& cancelled = nullptr);

  //
  // A whole-log walk, or a range from at most the entry after it to the end (or past it), is
  // also checked against the latest anchor of the log recorded in another log (RecordAnchors):
  // a shard's in the control log, the control log's in each shard (every shard's latest, the
  // highest reported). One that cannot be read is reported, and the walk goes on without it.
  absl::StatusOr<ChainReport> Verify(const CallContext& ctx, const AuditLogRef& log,
                                     uint64_t start_seq, uint64_t end_seq,
                                     const ChainAnchor& anchor = {},
                                     const std::function<bool()>& cancelled = nullptr);

  // Records the control log's head in each shard's log, then each shard's head in the control
  // log, as entries by `actor` (the service's identity): so a shard's anchor in the control log
  // also covers the control log's anchor in it. A log with nothing but anchors appended since
  // its last anchor is not anchored again, so idle logs stay as they are. Before recording a
  // head, checks that the log's entry at its last anchor still has the anchor's hash; if not, it
  // records a refusal (decision deny, reason ANCHOR_MISMATCH) instead, and keeps the old anchor
  // as the latest, for VerifyChain to report. A database that does not answer is skipped
  // (AnchorRound::failed); the others are anchored all the same.
  AnchorRound RecordAnchors(const std::string& actor);

  // Ops: records `log`'s current head as its anchor in the logs holding its anchors (the control
  // log for a shard's; every shard's for the control log's) without checking it against the last
  // one, once ops know why it no longer matches. `reason` (1 to kMaxRebaseReasonBytes of text) is
  // kept in each anchor entry, which audits the call. A holder that cannot be written is
  // reported; UNAVAILABLE when none could.
  absl::StatusOr<RebasedAnchor> RebaseAnchor(const CallContext& ctx, const AuditLogRef& log,
                                             const std::string& reason);

 private:
  struct RecordedAnchor {
    ChainAnchor anchor;
    std::string in_log;  // the log holding it
  };
  struct RecordedAnchors {
    std::vector<RecordedAnchor> anchors;  // the latest of each log holding one
    std::string unavailable;              // why a holder could not be read
  };
  // The logs holding `log`'s anchors: the control log for a shard's, every shard's for the
  // control log's (by name).
  std::vector<std::pair<std::string, pg::Pool*>> AnchorHolders(const AuditLogRef& log,
                                                               std::vector<std::string>* unavailable);
  // The latest anchor of `log` in each log holding its anchors.
  RecordedAnchors LatestRecordedAnchors(const AuditLogRef& log);
  enum class AnchorOutcome { kRecorded, kUnchanged, kMismatch };
  // Records the head of log `source` (named `source_name`) in log `dest`.
  absl::StatusOr<AnchorOutcome> RecordAnchor(pg::Pool& source, const std::string& source_name,
                                             pg::Pool& dest, const std::string& actor);

  absl::StatusOr<pg::Pool*> PoolOf(const AuditLogRef& log) const;
  // Where `patient_id` lives: NOT_FOUND for a patient of another tenant than the caller's (ops
  // excepted), or none.
  absl::StatusOr<PatientHome> HomeOf(const CallContext& ctx, const std::string& patient_id);
  // A patient's audit trail tells who treats them and which kinds of data they have: a
  // practitioner reads it for the patient's care, while the patient's CARE consent permits them
  // for every data category. Apps (the patient's own requests) and ops need none. A refusal is
  // PERMISSION_DENIED, audited in the home shard as a read of `object_type` `object_id`.
  absl::Status MayReadTrail(const CallContext& ctx, const PatientHome& home,
                            const std::string& patient_id, absl::string_view object_type,
                            const std::string& object_id);

  pg::Pool& control_;
  const pg::ShardSet& shards_;
  PatientDirectory& directory_;
  consent::ConsentCache& consent_;
  const int64_t max_scanned_;
  const absl::Duration report_statement_timeout_;
  BoundedCounts<std::string> walks_;    // by log name
  BoundedCounts<std::string> reports_;  // by the caller's tenant ("" for ops)
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_AUDIT_CORE_H_
