// The record-sharing logic: validation, authorization, encryption and audited changes in the
// patient's home shard.
#include "services/sharing/sharing_core.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <utility>

#include <openssl/crypto.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "libs/audit/audit_log.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/crypto/chunk_cipher.h"
#include "libs/crypto/sha256.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/sql_array.h"
#include "libs/residency/placement.h"
#include "services/sharing/sql.h"

namespace medgate::sharing {

absl::string_view DataCategoryOf(RecordKind kind) {
  switch (kind) {
    case RecordKind::kDocument: return "document";
    case RecordKind::kImaging: return "imaging";
    case RecordKind::kReport: return "report";
    case RecordKind::kUnspecified: return "";
  }
  return "";
}
namespace {

using crypto::SecretKey;

constexpr size_t kMaxIdBytes = 64;
constexpr absl::Duration kIdleTransactionGrace = absl::Seconds(10);
// Columns of MEDGATE_RECORD_COLUMNS (sql.h), where MEDGATE_RECORD_KEY_COLUMNS start.
constexpr int kRecordColumns = 16;
constexpr absl::string_view kRecordKeyLabel = "medgate-record-key-v1/";
constexpr absl::string_view kMetadataLabel = "medgate-record-metadata-v1/";

// --- values in and out of SQL ---------------------------------------------------------------

std::string PgTime(absl::Time t) {
  if (t == absl::InfiniteFuture()) return "infinity";
  return absl::FormatTime("%Y-%m-%d %H:%M:%E6S+00", t, absl::UTCTimeZone());
}

std::string Rfc3339(absl::Time t) {
  return absl::FormatTime(absl::RFC3339_sec, t, absl::UTCTimeZone());
}

absl::Time TimeOf(const pqxx::field& f) { return absl::FromUnixMicros(f.as<int64_t>()); }

std::optional<absl::Time> OptionalTimeOf(const pqxx::field& f) {
  if (f.is_null()) return std::nullopt;
  return TimeOf(f);
}

std::string BytesOf(const pqxx::field& f) { return pqxx::binarystring(f).str(); }

RecordInfo RecordFromRow(const pqxx::row& row) {
  RecordInfo r;
  r.record_id = row[0].c_str();
  r.tenant_id = row[1].c_str();
  r.patient_id = row[2].c_str();
  r.kind = static_cast<RecordKind>(row[3].as<int>());
  if (!row[4].is_null()) r.content_type = row[4].c_str();
  if (!row[5].is_null()) r.file_name = row[5].c_str();
  r.size_bytes = row[6].as<uint64_t>();
  if (!row[7].is_null()) r.sha256 = BytesOf(row[7]);
  r.chunk_count = row[8].as<uint32_t>();
  r.owner = row[9].c_str();
  r.created_at = TimeOf(row[10]);
  r.state = std::string_view(row[11].c_str()) == "archived" ? RecordState::kArchived
                                                            : RecordState::kActive;
  r.retain_until = OptionalTimeOf(row[12]);
  if (!row[13].is_null()) r.sealed_content_type = BytesOf(row[13]);
  if (!row[14].is_null()) r.sealed_file_name = BytesOf(row[14]);
  if (!row[15].is_null()) r.sealed_sha256 = BytesOf(row[15]);
  return r;
}

GrantInfo GrantFromRow(const pqxx::row& row) {
  GrantInfo g;
  g.grant_id = row[0].c_str();
  g.record_id = row[1].c_str();
  g.grantee = row[2].c_str();
  g.grantee_tenant = row[3].c_str();
  g.granted_by = row[4].c_str();
  g.created_at = TimeOf(row[5]);
  g.expires_at = TimeOf(row[6]);
  g.revoked_at = OptionalTimeOf(row[7]);
  return g;
}

std::optional<RecordInfo> SelectRecord(pqxx::work& txn, const char* statement,
                                       const std::string& record_id) {
  pqxx::result rows = txn.exec_prepared(statement, record_id);
  if (rows.empty()) return std::nullopt;
  return RecordFromRow(rows[0]);
}

std::optional<GrantInfo> LatestGrant(pqxx::work& txn, const std::string& record_id,
                                     const std::string& grantee) {
  pqxx::result rows = txn.exec_prepared(sql::kSelectLatestGrant, record_id, grantee);
  if (rows.empty()) return std::nullopt;
  return GrantFromRow(rows[0]);
}

bool IsActive(const GrantInfo& g, absl::Time now) { return !g.revoked_at && g.expires_at > now; }

// The grants of `records` a caller may see: all active ones for the owner, only the caller's own
// for a grantee. At most `max_grants` are read: when the records hold more, the records from the
// first whose grants were not all read on are dropped (at least one is kept), and the answer is
// true. A listing's page cannot show more grants than its bytes allow, so it ends there. (One
// record's grants, at most kMaxActiveGrantsPerRecord, are never cut.)
bool AttachGrants(pqxx::work& txn, std::vector<RecordInfo>& records, const std::string& caller,
                  absl::Time now, size_t max_grants = kMaxActiveGrantsPerRecord) {
  if (records.empty()) return false;
  std::vector<std::string> ids;
  std::vector<std::string> owned;  // "t" or "f", read as bool[]
  for (const RecordInfo& r : records) {
    ids.push_back(r.record_id);
    owned.push_back(r.owner == caller ? "t" : "f");
  }
  const pqxx::result rows =
      txn.exec_prepared(sql::kSelectActiveGrants, pg::TextArrayLiteral(ids),
                        pg::TextArrayLiteral(owned), PgTime(now), caller,
                        static_cast<int64_t>(max_grants) + 1);
  std::map<std::string, std::vector<GrantInfo>> by_record;
  for (const pqxx::row& row : rows) {
    GrantInfo g = GrantFromRow(row);
    by_record[g.record_id].push_back(std::move(g));
  }
  bool truncated = false;
  if (rows.size() > max_grants) {
    // The record of the row past the bound may not have all its grants read, nor those after it.
    const std::string first_partial = rows[max_grants][1].c_str();
    size_t keep = 0;
    while (keep < records.size() && records[keep].record_id != first_partial) ++keep;
    // One record holds at most kMaxActiveGrantsPerRecord active grants, fewer than the bound.
    records.resize(std::max<size_t>(keep, 1));
    truncated = true;
  }
  for (RecordInfo& r : records) r.grants = std::move(by_record[r.record_id]);
  return truncated;
}

// What a record and the grants shown with it weigh in a response, give or take field overheads.
size_t ApproximateBytes(const RecordInfo& r) {
  size_t bytes = 128 + r.record_id.size() + r.tenant_id.size() + r.patient_id.size() +
                 r.content_type.size() + r.file_name.size() + r.sha256.size() + r.owner.size();
  for (const GrantInfo& g : r.grants) {
    bytes += 64 + g.grant_id.size() + g.record_id.size() + g.grantee.size() + g.granted_by.size();
  }
  return bytes;
}

// --- ids and validation ---------------------------------------------------------------------

std::string NewId(absl::string_view region, absl::string_view tag) {
  return absl::StrCat(region, ".", tag, absl::BytesToHexString(crypto::RandomBytes(16)));
}

absl::Status RecordNotFound(absl::string_view record_id) {
  return absl::NotFoundError(absl::StrCat("record '", record_id, "' not found"));
}

// --- keys -------------------------------------------------------------------------------------

std::string RecordKeyAad(absl::string_view record_id) {
  return absl::StrCat(kRecordKeyLabel, record_id);
}

// The associated data of a sealed metadata field: a value moved to another record or to the
// other field does not open.
std::string MetadataAad(absl::string_view record_id, absl::string_view field) {
  return absl::StrCat(kMetadataLabel, field, "/", record_id);
}

// What of a record is stored sealed under its key besides its content. The SHA-256 too: in
// clear it would let a holder of a backup confirm a guessed document after the erasure.
struct SealedMetadata {
  std::string content_type;
  std::string file_name;
  std::string sha256;
};

absl::StatusOr<SealedMetadata> SealMetadata(const SecretKey& record_key,
                                            absl::string_view record_id,
                                            absl::string_view content_type,
                                            absl::string_view file_name,
                                            absl::string_view sha256) {
  SealedMetadata out;
  ASSIGN_OR_RETURN(out.content_type,
                   crypto::Seal(record_key, MetadataAad(record_id, "content_type"), content_type));
  ASSIGN_OR_RETURN(out.file_name,
                   crypto::Seal(record_key, MetadataAad(record_id, "file_name"), file_name));
  ASSIGN_OR_RETURN(out.sha256, crypto::Seal(record_key, MetadataAad(record_id, "sha256"), sha256));
  return out;
}

// Replaces the record's sealed metadata by its plaintext.
absl::Status OpenSealedMetadata(const SecretKey& record_key, RecordInfo& r) {
  for (auto [sealed, clear, field] :
       {std::tuple{&r.sealed_content_type, &r.content_type, "content_type"},
        std::tuple{&r.sealed_file_name, &r.file_name, "file_name"},
        std::tuple{&r.sealed_sha256, &r.sha256, "sha256"}}) {
    if (!sealed->has_value()) continue;
    absl::StatusOr<std::string> opened =
        crypto::Open(record_key, MetadataAad(r.record_id, field), **sealed);
    if (!opened.ok()) {
      return absl::DataLossError(
          absl::StrCat("record '", r.record_id, "': its ", field, " does not authenticate"));
    }
    *clear = *std::move(opened);
    sealed->reset();
  }
  return absl::OkStatus();
}

// Where a patient key row's key is when it is not in the row itself.
constexpr char kInVault[] = "vault";

// --- audit ------------------------------------------------------------------------------------

// AuditEntry.reason_detail's bound (audit.proto): what follows "CODE: " in a stored reason.
constexpr size_t kMaxReasonDetailBytes = 1024;

// The longest start of `text` of at most `max_bytes`, never ending inside a UTF-8 character (an
// API string must stay valid UTF-8).
absl::string_view Utf8Prefix(absl::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  return text.substr(0, end);
}

// "HEAD" then as much of `detail` as the stored reason's bound leaves (`head` ends with the
// separator, "CODE: ...; ").
std::string ReasonWithDetail(absl::string_view head, absl::string_view detail) {
  return absl::StrCat(head, Utf8Prefix(detail, kMaxReasonDetailBytes - head.size()));
}

// Runs `statement` with `args` and then the audit entry, as MEDGATE_AUDIT_APPEND_FROM_n (sql.h)
// takes it: the entry is chained by the shard in the same statement.
template <typename... Args>
pqxx::result ExecWithAudit(pqxx::transaction_base& txn, const char* statement,
                           const audit::Entry& e, const Args&... args) {
  return audit::WithEntryParams(
      e, [&](const auto&... params) { return txn.exec_prepared(statement, params...); }, args...);
}

void CiteConsent(audit::Entry& e, const consent::AccessDecision& d,
                 consent::Purpose purpose = consent::Purpose::kRecordSharing) {
  e.purpose = std::string(consent::PurposeName(purpose));
  e.consent_id = d.consent_id;
  e.consent_version = d.consent_version;
}

// The result of a transaction that may end in a refusal: a refusal's audit entry is committed,
// and its status returned to the caller afterwards.
template <typename T>
struct Outcome {
  std::optional<T> value;
  absl::Status denied;
};

template <typename T>
absl::StatusOr<Outcome<T>> Deny(pqxx::work& txn, audit::Entry entry, absl::Status status) {
  entry.decision = audit::Decision::kDeny;
  RETURN_IF_ERROR(audit::Append(txn, entry).status());
  Outcome<T> out;
  out.denied = std::move(status);
  return out;
}

// The outcome of a transaction that did what it was asked: `value`.
template <typename T>
Outcome<T> Done(T value) {
  Outcome<T> out;
  out.value = std::move(value);
  return out;
}

template <typename T>
absl::StatusOr<T> ResultOf(absl::StatusOr<Outcome<T>> outcome) {
  if (!outcome.ok()) return outcome.status();
  if (!outcome->denied.ok()) return outcome->denied;
  return *std::move(outcome->value);
}

absl::Status ConsentRefusal(const consent::AccessDecision& d, absl::string_view what,
                            consent::Purpose purpose = consent::Purpose::kRecordSharing) {
  return absl::PermissionDeniedError(
      absl::StrCat(what, ": the patient's ", consent::PurposeName(purpose),
                   " consent does not permit it (", consent::AccessReasonName(d.reason), ")"));
}

// --- page tokens: "<created_at micros>/<record_id>" -----------------------------------------

std::string PageToken(const RecordInfo& last) {
  return absl::WebSafeBase64Escape(
      absl::StrCat(absl::ToUnixMicros(last.created_at), "/", last.record_id));
}

absl::StatusOr<std::pair<absl::Time, std::string>> ParsePageToken(
    const std::string& token, absl::string_view method = "ListRecords") {
  if (token.empty()) return std::make_pair(absl::InfiniteFuture(), std::string());
  std::string decoded;
  int64_t micros = 0;
  if (absl::WebSafeBase64Unescape(token, &decoded)) {
    std::vector<std::string> parts = absl::StrSplit(decoded, absl::MaxSplits('/', 1));
    if (parts.size() == 2 && absl::SimpleAtoi(parts[0], &micros) &&
        ValidateIdentifier(parts[1], "page_token", kMaxIdBytes).ok()) {
      return std::make_pair(absl::FromUnixMicros(micros), parts[1]);
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("page_token: not a token from an earlier ", method, " response"));
}

// --- PgUpload ---------------------------------------------------------------------------------

// An upload of at most one storage chunk whose patient key is cached opens no transaction:
// Finish() checks the tenant's quota and stores the chunk, the record, its key and the audit
// entry in one statement, which commits on its own. A larger
// upload's chunks but the last are inserted in a transaction, opened while the first chunk is
// received and sealed, by a writer thread of the upload, so that receiving, hashing and
// encrypting the next chunk overlap with the database storing this one (at most one sealed chunk
// waits while another is being inserted); Finish() stores the last chunk with the record.
// Nothing is visible before Finish() commits.
// One upload's or download's place among its tenant's in a region; given back when destroyed.
using TransferSlot = SharingCore::TransferCounts::Slot;

// A place among at most `max` of `counts` for (tenant, region), or RESOURCE_EXHAUSTED saying which
// bound (`setting`) refused what (`what`, plural).
absl::StatusOr<std::unique_ptr<TransferSlot>> TakeTransferSlot(
    SharingCore::TransferCounts& counts, int max, const std::string& tenant,
    const std::string& region, absl::string_view what, absl::string_view setting) {
  std::unique_ptr<TransferSlot> slot = counts.TryTake({tenant, region}, max);
  if (slot == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant '", tenant, "' already has ", max,
                                                     " ", what, " in progress in region ", region,
                                                     " (sharing.", setting,
                                                     "); retry when one ends"));
  }
  return slot;
}

// An upload answered with the record an earlier one with its request id stored: whatever
// content follows is not stored again.
class AnsweredUpload final : public Upload {
 public:
  explicit AnsweredUpload(UploadResult result) : result_(std::move(result)) {}
  absl::Status Write(absl::string_view) override { return absl::OkStatus(); }
  absl::StatusOr<UploadResult> Finish() override { return result_; }
  std::optional<UploadResult> AlreadyStored() const override { return result_; }

 private:
  UploadResult result_;
};

class PgUpload final : public Upload {
 public:
  // `lease` is the upload's connection when it spans several chunks (taken at its start); a
  // one-chunk upload takes one from `upload_pool` only when it stores, so a slow client holds none.
  PgUpload(SharingCore& core, CallContext ctx, UploadHeader header, PatientHome home,
           consent::AccessDecision care, pg::Pool& upload_pool, std::optional<pg::Lease> lease,
           PatientKeyCache& keys, std::unique_ptr<TransferSlot> slot)
      : slot_(std::move(slot)),
        core_(core),
        ctx_(std::move(ctx)),
        care_(std::move(care)),
        header_(std::move(header)),
        home_(std::move(home)),
        keys_(keys),
        record_key_(SecretKey::Random()),
        record_id_(NewId(home_.region_id, "r")),
        upload_pool_(upload_pool),
        lease_(std::move(lease)) {}

  ~PgUpload() override {
    last_hash_.Wait();  // it reads the caller's last piece
    StopWriter(/*abort=*/true).IgnoreError();  // aborting: nothing is kept either way
    core_.AddBuffered(-static_cast<int64_t>(pending_.size() + last_.bytes.size()));
    // Destroying the transaction unfinished rolls it back: nothing of the upload remains.
    txn_.reset();
  }

  // A multi-chunk upload's transaction may sit idle at most `idle_timeout`, and a little longer
  // so that the adapter, which ends the stream after `idle_timeout`, tells the client first.
  // While content keeps arriving the writer keeps the transaction from idling out, however long
  // a storage chunk takes to fill (a client within the minimum rate may take minutes per MiB);
  // once nothing arrives, the shard ends the session after that bound.
  void Begin(absl::Duration idle_timeout) {
    if (header_.size_bytes > crypto::kMaxChunkBytes) {
      writer_ = std::thread([this, idle_timeout] {
        WriterLoop(UploadTransactionIdleBound(idle_timeout), UploadKeepaliveTurn(idle_timeout));
      });
    }
  }

  absl::Status Write(absl::string_view data) override {
    RETURN_IF_ERROR(failed_);
    if (data.empty()) return Fail(absl::InvalidArgumentError("chunk.data: must not be empty"));
    if (data.size() > crypto::kMaxChunkBytes) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "chunk.data: at most ", crypto::kMaxChunkBytes, " bytes per chunk, got ", data.size())));
    }
    if (received_ + data.size() > header_.size_bytes) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("more bytes than declared: header.size_bytes is ", header_.size_bytes,
                       ", received at least ", received_ + data.size())));
    }
    received_ += data.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      arrived_ = true;
    }
    // Storage chunks are exactly 1 MiB except the last, whatever sizes the client sends; a client
    // sending 1 MiB pieces is stored without copying them first. The chunk is hashed on a spare
    // core, when one is idle, while this thread encrypts it; otherwise after handing it to the
    // writer, so that hashing overlaps with the insert. The last piece's hash may go on while
    // Finish() takes a connection: it is checked before the record is written
    // (ContentAsDeclared).
    if (pending_.empty() &&
        (data.size() == crypto::kMaxChunkBytes || received_ == header_.size_bytes)) {
      SpareThreads::Ticket piece_hash;
      SpareThreads::Ticket& hashing = received_ == header_.size_bytes ? last_hash_ : piece_hash;
      core_.spare_threads().TryRun([this, data] { hasher_.Update(data); }, hashing);
      absl::Status stored = Store(data);
      if (!hashing.taken()) hasher_.Update(data);
      piece_hash.Wait();
      return stored;
    }
    hasher_.Update(data);
    pending_.append(data.data(), data.size());
    core_.AddBuffered(static_cast<int64_t>(data.size()));
    while (pending_.size() >= crypto::kMaxChunkBytes ||
           (received_ == header_.size_bytes && !pending_.empty())) {
      const size_t n = std::min(pending_.size(), crypto::kMaxChunkBytes);
      RETURN_IF_ERROR(Store(absl::string_view(pending_.data(), n)));
      pending_.erase(0, n);
      core_.AddBuffered(-static_cast<int64_t>(n));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<UploadResult> Finish() override {
    RETURN_IF_ERROR(failed_);
    if (received_ != header_.size_bytes) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("received ", received_, " bytes but header.size_bytes declared ",
                       header_.size_bytes, "; nothing was stored")));
    }
    // Every chunk but the last is in the transaction before anything else uses it.
    RETURN_IF_ERROR(Fail(StopWriter(/*abort=*/false)));
    // A consent revoked while the content arrived stops the record before it is stored; the
    // record's entry cites the decision it is stored under.
    // Its errors are not the upload connection's (Fail would take that one for broken).
    if (absl::StatusOr<consent::AccessDecision> care = core_.PermitUpload(ctx_, home_, header_.kind);
        care.ok()) {
      care_ = *std::move(care);
    } else {
      failed_ = absl::Status(care.status().code(),
                             absl::StrCat(care.status().message(), "; nothing was stored"));
      return failed_;
    }
    RETURN_IF_ERROR(Fail(Commit()));
    core_.AddBuffered(-static_cast<int64_t>(last_.bytes.size()));
    last_.bytes = std::string();
    failed_ = absl::FailedPreconditionError("the upload is finished");
    if (answered_) return *answered_;
    return UploadResult{record_id_, header_.size_bytes, header_.sha256};
  }

 private:
  struct Sealed {
    uint32_t index = 0;
    std::string bytes;
  };

  // Stores the last chunk, the record, its key and the audit entry, and commits.
  absl::Status Commit() {
    const absl::Time now = core_.Now();
    audit::Entry entry =
        AuditEntryFor(ctx_, audit::Action::kCreate, "record", record_id_, home_.tenant_id,
                      home_.patient_id,
                      absl::StrCat("PERMITTED: bytes=", header_.size_bytes, " chunks=",
                                   next_index_));
    CiteConsent(entry, care_, consent::Purpose::kCare);
    if (!lease_) {
      absl::StatusOr<pg::Lease> lease = upload_pool_.Acquire();
      if (!lease.ok()) {
        if (lease.status().code() != absl::StatusCode::kResourceExhausted) return lease.status();
        return absl::ResourceExhaustedError(
            absl::StrCat("too many uploads storing in region ", home_.region_id,
                         "; nothing was stored, upload again later"));
      }
      lease_.emplace(*std::move(lease));
    }
    try {
      const QuotaLimit limit = core_.LimitIn(home_.tenant_id, home_.region_id);
      // The last piece's hash has run meanwhile (on a spare core). Checked before anything of the
      // record is written: a mismatch creates no key and never holds the audit chain's head.
      RETURN_IF_ERROR(ContentAsDeclared());
      // Usually the patient's key is cached: then the one statement, which also checks the
      // tenant's quota under its lock, is the whole write (and, outside a transaction, the
      // commit).
      std::optional<PatientKey> key = keys_.Get(home_.patient_id, core_.KeyCacheNow());
      if (key) {
        absl::StatusOr<Written> written;
        if (txn_ != nullptr) {
          written = StoreRecord(*txn_, *key, now, entry, limit);
        } else {
          pqxx::nontransaction alone(lease_->connection());
          try {
            written = StoreRecord(alone, *key, now, entry, limit);
          } catch (const pqxx::broken_connection&) {
            return absl::UnavailableError(kOutcomeUnknown);
          }
        }
        RETURN_IF_ERROR(written.status());
        // A retry of an upload already stored is answered, not refused for the room its record
        // already takes.
        if (!written->no_room.ok()) return AnswerFromEarlier(written->no_room);
        if (written->stored) return txn_ != nullptr ? CommitTransaction() : absl::OkStatus();
        keys_.Forget(home_.patient_id);  // erased, or replaced after an erasure elsewhere
      }
      // Otherwise the key is read, or created for the patient's first record, in the record's
      // own transaction: a failed upload leaves no key row in the shard (a key it wrote to the
      // vault is deleted by the sweep). An erasure committed meanwhile may have replaced the key
      // (one record's) or removed it (all of them): then the next statement sees what is now.
      if (txn_ == nullptr) txn_ = std::make_unique<pqxx::work>(lease_->connection());
      if (limit.quota > 0) {
        // Before a key is created for a record the quota has no room for. The lock, taken here
        // for the rest of the transaction, serializes the tenant's commits in this region so
        // that concurrent uploads cannot overshoot the quota together.
        const int64_t used =
            txn_->exec_prepared1(sql::kLockTenantUsage, home_.tenant_id)[0].as<int64_t>();
        if (absl::Status room = core_.CheckQuota(home_.tenant_id, home_.region_id, used,
                                                 header_.size_bytes, limit);
            !room.ok()) {
          return AnswerFromEarlier(std::move(room));
        }
      }
      const uint64_t generation = keys_.generation();
      bool stored = false;
      std::optional<PatientKey> current;
      for (int attempt = 0; attempt < 2 && !stored; ++attempt) {
        ASSIGN_OR_RETURN(PatientKey key, ReadOrCreatePatientKey(*txn_, now));
        // The quota was checked above, under the lock this transaction holds.
        ASSIGN_OR_RETURN(Written written, StoreRecord(*txn_, key, now, entry, QuotaLimit{}));
        stored = written.stored;
        current.emplace(std::move(key));
      }
      if (!stored) {
        return absl::AbortedError(
            "the patient's key was replaced by erasures while this upload was being stored; "
            "nothing was stored, upload again");
      }
      RETURN_IF_ERROR(CommitTransaction());
      keys_.Put(home_.patient_id, *current, core_.KeyCacheNow(), generation);
      return absl::OkStatus();
    } catch (const pqxx::unique_violation& e) {
      // Only the request id's key can refuse the record's statement (its ids are new). Found no
      // more, it was forgotten meanwhile by the sweep (30 days old).
      if (header_.request_id.empty()) return pg::StatusFromException(e);
      return AnswerFromEarlier(absl::AbortedError(
          absl::StrCat("request_id '", header_.request_id,
                       "' was forgotten while this upload was being stored; nothing was stored, "
                       "upload again")));
    } catch (const std::exception& e) {
      return pg::StatusFromException(e);
    }
  }

  // This upload cannot be stored (`refusal`), but may be a retry of one already stored: the
  // record's statement met this practitioner's request id, a retry of a stored upload or of one
  // that committed while this one was being stored (the request id's insert waited for it), or
  // the quota has no room for a second copy. Then it stores nothing and is answered with that
  // record; otherwise `refusal` stands.
  absl::Status AnswerFromEarlier(absl::Status refusal) {
    txn_.reset();  // rolls back what this upload wrote
    ASSIGN_OR_RETURN(std::optional<UploadResult> earlier,
                     core_.StoredByRequest(lease_->connection(), ctx_, header_, care_));
    if (!earlier) return refusal;
    answered_ = *std::move(earlier);
    return absl::OkStatus();
  }

  // Whether the content received hashes to header.sha256 (once the last piece's hash is done).
  absl::Status ContentAsDeclared() {
    if (!content_hash_matches_) {
      last_hash_.Wait();
      content_hash_matches_ = hasher_.Finish() == header_.sha256;
    }
    if (*content_hash_matches_) return absl::OkStatus();
    return absl::InvalidArgumentError(
        "the SHA-256 of the received content does not match header.sha256; nothing was stored");
  }

  static constexpr char kOutcomeUnknown[] =
      "database connection lost while the record was being stored: it may or may not have been "
      "stored; upload again with the same request_id (a record it stored answers the retry), or "
      "list the patient's records first";

  absl::Status CommitTransaction() {
    try {
      txn_->commit();
    } catch (const pqxx::in_doubt_error&) {
      return absl::UnavailableError(kOutcomeUnknown);
    }
    return absl::OkStatus();
  }

  // What the record's statement did. Nothing is written when the tenant's quota has no room for
  // the record (`no_room` says so) or when the patient key it was given no longer exists.
  struct Written {
    bool stored = false;
    absl::Status no_room;
  };

  // `limit`: the tenant's quota, whose part for this region (limit.room_here()) the statement
  // checks under the tenant's usage lock.
  absl::StatusOr<Written> StoreRecord(pqxx::transaction_base& txn, const PatientKey& key,
                                      absl::Time now, const audit::Entry& entry,
                                      const QuotaLimit& limit) {
    const std::optional<int64_t> room = limit.room_here();
    ASSIGN_OR_RETURN(std::string wrapped_record_key,
                     crypto::Seal(key.key, RecordKeyAad(record_id_), record_key_.bytes()));
    ASSIGN_OR_RETURN(SealedMetadata metadata,
                     SealMetadata(record_key_, record_id_, header_.content_type,
                                  header_.file_name, header_.sha256));
    pqxx::result rows = ExecWithAudit(
        txn, sql::kFinishUpload, entry, record_id_, home_.tenant_id, home_.patient_id,
        static_cast<int>(header_.kind), pqxx::binarystring(metadata.content_type),
        pqxx::binarystring(metadata.file_name),
        static_cast<int64_t>(header_.size_bytes), pqxx::binarystring(metadata.sha256), next_index_,
        ctx_.principal.spiffe_id, PgTime(now), NewId(home_.region_id, "k"), key.key_id,
        pqxx::binarystring(wrapped_record_key), static_cast<int64_t>(last_.index),
        pqxx::binarystring(last_.bytes), header_.request_id, room);
    Written written;
    written.stored = !rows.empty() && !rows[0][1].is_null();
    if (!written.stored && room && !rows.empty() && !rows[0][0].is_null()) {
      written.no_room = core_.CheckQuota(home_.tenant_id, home_.region_id,
                                         rows[0][0].as<int64_t>(), header_.size_bytes, limit);
    }
    return written;
  }

  absl::StatusOr<PatientKey> ReadOrCreatePatientKey(pqxx::work& txn, absl::Time now) {
    pqxx::result rows = txn.exec_prepared(sql::kSelectPatientKey, home_.patient_id);
    if (rows.empty()) {
      // The key goes to the region's key vault first (committed there), then its row here: a
      // transaction that does not commit leaves a key the vault's sweep deletes.
      ASSIGN_OR_RETURN(PatientKey created,
                       core_.NewPatientKey(home_.region_id, home_.patient_id));
      if (!txn.exec_prepared(sql::kInsertPatientKey, created.key_id, home_.patient_id, kInVault,
                             pqxx::binarystring(std::string()), PgTime(now))
               .empty()) {
        return created;
      }
      // A concurrent upload created it first (and committed: the insert waited for it).
      rows = txn.exec_prepared(sql::kSelectPatientKey, home_.patient_id);
      if (rows.empty()) {
        return absl::AbortedError(
            "the patient's key was erased while this upload created it; nothing was stored, "
            "upload again");
      }
    }
    const std::string key_id = rows[0][0].c_str();
    absl::StatusOr<PatientKey> opened = core_.OpenPatientKey(
        home_.region_id, home_.patient_id, key_id, rows[0][1].c_str(), BytesOf(rows[0][2]));
    if (opened.status().code() == absl::StatusCode::kAborted) {
      // The vault does not hold the key the row named. An erasure that has since replaced it is
      // worth a retry; a key the vault lost is not, while the shard still names it.
      pqxx::result again = txn.exec_prepared(sql::kSelectPatientKey, home_.patient_id);
      if (!again.empty() && key_id == again[0][0].c_str()) {
        return absl::DataLossError(absl::StrCat(
            "the key vault of region ", home_.region_id, " does not hold patient key '", key_id,
            "', which the shard names: nothing was stored; no record can be added for this "
            "patient until ops restore the key or the patient's records are erased"));
      }
    }
    return opened;
  }

  // Seals the next storage chunk. The last one waits for Finish(); the others go to the writer,
  // waiting while one already waits.
  absl::Status Store(absl::string_view plaintext) {
    const bool last = stored_ + plaintext.size() == header_.size_bytes;
    ASSIGN_OR_RETURN(std::string sealed,
                     crypto::EncryptChunk(record_key_, record_id_, next_index_, last, plaintext));
    core_.AddBuffered(static_cast<int64_t>(sealed.size()));
    if (last) {
      last_ = Sealed{next_index_, std::move(sealed)};
    } else {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return queue_.empty() || !writer_status_.ok(); });
      if (!writer_status_.ok()) {
        core_.AddBuffered(-static_cast<int64_t>(sealed.size()));
        absl::Status status = writer_status_;
        lock.unlock();
        return Fail(status);
      }
      queue_.push_back(Sealed{next_index_, std::move(sealed)});
      lock.unlock();
      cv_.notify_all();
    }
    stored_ += plaintext.size();
    ++next_index_;
    return absl::OkStatus();
  }

  void WriterLoop(absl::Duration idle_bound, absl::Duration keepalive) {
    absl::Status status = Open(idle_bound);
    while (status.ok()) {
      std::optional<Sealed> chunk;
      bool keep_alive = false;
      {
        std::unique_lock<std::mutex> lock(mu_);
        const bool woken = cv_.wait_for(lock, absl::ToChronoNanoseconds(keepalive), [this] {
          return !queue_.empty() || closing_;
        });
        if (!woken) {
          // Content arrived since the last statement, but not yet a whole storage chunk.
          keep_alive = arrived_;
          arrived_ = false;
        } else {
          if (queue_.empty() || aborting_) break;
          chunk = std::move(queue_.front());
          queue_.pop_front();
          arrived_ = false;
        }
      }
      if (!chunk) {
        if (keep_alive) status = KeepAlive();
        continue;
      }
      cv_.notify_all();
      status = Insert(*std::move(chunk));
    }
    if (!status.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      writer_status_ = status;
    }
    cv_.notify_all();
  }

  absl::Status Open(absl::Duration idle_timeout) {
    try {
      txn_ = std::make_unique<pqxx::work>(lease_->connection());
      txn_->exec_prepared(sql::kSetUploadIdleTimeout,
                          std::to_string(absl::ToInt64Milliseconds(idle_timeout)));
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return pg::StatusFromException(e);
    }
  }

  // A statement that does nothing but reset the shard's idle-in-transaction timer.
  absl::Status KeepAlive() {
    try {
      txn_->exec_prepared(sql::kKeepAlive);
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return pg::StatusFromException(e);
    }
  }

  // Inserts one sealed chunk (counted as buffered by Store) and releases it.
  absl::Status Insert(Sealed chunk) {
    // libpq's copy of the parameter lives until the insert returns.
    const int64_t size = static_cast<int64_t>(chunk.bytes.size());
    core_.AddBuffered(size);
    absl::Status status;
    try {
      txn_->exec_prepared0(sql::kInsertChunk, record_id_, static_cast<int64_t>(chunk.index),
                           pqxx::binarystring(chunk.bytes));
    } catch (const std::exception& e) {
      status = pg::StatusFromException(e);
    }
    core_.AddBuffered(-2 * size);
    return status;
  }

  // Stops the writer: after the queued chunk is inserted, or at once when aborting. The status
  // of the inserts.
  absl::Status StopWriter(bool abort) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
      aborting_ = abort;
    }
    cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    for (const Sealed& left : queue_) core_.AddBuffered(-static_cast<int64_t>(left.bytes.size()));
    queue_.clear();
    return writer_status_;
  }

  absl::Status Fail(absl::Status status) {
    if (status.ok()) return status;
    if (status.code() == absl::StatusCode::kUnavailable && lease_) lease_->MarkBroken();
    if (failed_.ok()) failed_ = status;
    return status;
  }

  std::unique_ptr<TransferSlot> slot_;  // first: given back after everything else is let go
  SharingCore& core_;
  const CallContext ctx_;
  consent::AccessDecision care_;  // the CARE decision the upload is let in on, then stored under
  const UploadHeader header_;
  const PatientHome home_;
  PatientKeyCache& keys_;
  const SecretKey record_key_;
  const std::string record_id_;
  pg::Pool& upload_pool_;
  // Declared before txn_: the transaction ends before the connection returns.
  std::optional<pg::Lease> lease_;
  std::unique_ptr<pqxx::work> txn_;  // the writer's until it stops, then the caller's
  crypto::Sha256 hasher_;
  SpareThreads::Ticket last_hash_;  // the last piece's, while a spare thread hashes it
  std::optional<bool> content_hash_matches_;
  // Set when a concurrent upload with the same request id stored the record first.
  std::optional<UploadResult> answered_;
  std::string pending_;
  Sealed last_;  // the last chunk, sealed, for Finish()
  uint64_t received_ = 0;
  uint64_t stored_ = 0;
  uint32_t next_index_ = 0;
  absl::Status failed_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Sealed> queue_;  // at most one chunk
  bool closing_ = false;
  bool aborting_ = false;
  bool arrived_ = false;  // content received since the writer's last statement
  absl::Status writer_status_;
  std::thread writer_;
};

// --- PgDownload -------------------------------------------------------------------------------

// Chunks are read by a reader thread of the download, one ahead, so that fetching the next
// chunk from the database overlaps with authenticating and sending this one.
class PgDownload final : public Download {
 public:
  // `grantee` is the caller when it reads under a grant (empty for the owner and break-glass):
  // once it holds no active grant on the record (revoked, expired), the next chunk handed over
  // stops the download. So does `consent_holds` (if any) once it no longer answers OK: the
  // patient's consent the download rests on was withdrawn (or can no longer be checked).
  PgDownload(SharingCore& core, pg::Pool& pool, RecordInfo record, SecretKey key,
             std::string grantee, std::function<absl::Status()> consent_holds,
             std::unique_ptr<TransferSlot> slot)
      : slot_(std::move(slot)),
        core_(core),
        pool_(pool),
        record_(std::move(record)),
        key_(std::move(key)),
        grantee_(std::move(grantee)),
        consent_holds_(std::move(consent_holds)) {}

  ~PgDownload() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (reader_.joinable()) reader_.join();
    if (ahead_) core_.AddBuffered(-static_cast<int64_t>(ahead_->ok() ? (*ahead_)->size() : 0));
  }

  const RecordInfo& record() const override { return record_; }

  absl::StatusOr<bool> Next(std::string* chunk) override {
    absl::StatusOr<bool> next = ReadNext(chunk);
    // Stored content that does not read back is damage (or tampering) ops must hear of, whoever
    // asked: the caller only gets DATA_LOSS, and the download's audit entry says it was let in.
    if (next.status().code() == absl::StatusCode::kDataLoss) {
      log::Error("record_damaged", {{"record", record_.record_id},
                                    {"chunks_returned", static_cast<int64_t>(index_)},
                                    {"error", next.status().message()}});
    }
    return next;
  }

 private:
  absl::StatusOr<bool> ReadNext(std::string* chunk) {
    if (index_ == record_.chunk_count) {
      if (!verified_) {
        verified_ = true;
        if (hasher_.Finish() != record_.sha256) {
          return absl::DataLossError(
              absl::StrCat("record '", record_.record_id, "': content does not match its SHA-256"));
        }
        // The size the header announced (and the audit entry and the quota counted) is the
        // record row's: a row altered in the shard must not end a download as complete.
        if (delivered_ != record_.size_bytes) {
          return absl::DataLossError(absl::StrCat("record '", record_.record_id, "': content is ",
                                                  delivered_, " bytes, its record says ",
                                                  record_.size_bytes));
        }
      }
      return false;
    }
    absl::StatusOr<std::string> sealed;
    if (record_.chunk_count == 1) {
      sealed = Fetch(0);
    } else {
      if (!reader_.joinable()) reader_ = std::thread([this] { ReaderLoop(); });
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return ahead_.has_value(); });
      sealed = *std::move(ahead_);
      ahead_.reset();
      lock.unlock();
      cv_.notify_all();
      // Fetched ahead, perhaps while the client was still taking an earlier chunk: an erasure, a
      // revocation or a consent's withdrawal committed since then stops the download here, not a
      // chunk or two later. (The first chunk was fetched within this call, after the download was
      // let in.)
      if (sealed.ok() && index_ > 0) {
        absl::Status readable = StillReadable();
        if (readable.ok() && consent_holds_) readable = consent_holds_();
        if (!readable.ok()) {
          core_.AddBuffered(-static_cast<int64_t>(sealed->size()));
          return readable;
        }
      }
    }
    RETURN_IF_ERROR(sealed.status());
    const int64_t held = static_cast<int64_t>(sealed->size());
    core_.AddBuffered(held);  // the plaintext, while the sealed chunk is still held
    absl::StatusOr<std::string> plaintext = crypto::DecryptChunk(
        key_, record_.record_id, index_, index_ + 1 == record_.chunk_count, *sealed);
    core_.AddBuffered(-2 * held);
    if (!plaintext.ok()) {
      // DATA_LOSS: the chunk does not authenticate. Anything else (OpenSSL failing to set up) is
      // this process's trouble, not the record's, and is not reported as damage.
      return absl::Status(plaintext.status().code(),
                          absl::StrCat("record '", record_.record_id,
                                       plaintext.status().code() == absl::StatusCode::kDataLoss
                                           ? "' is damaged: "
                                           : "': chunk not decrypted: ",
                                       plaintext.status().message(), "; nothing of it was returned"));
    }
    delivered_ += plaintext->size();
    hasher_.Update(*plaintext);
    *chunk = *std::move(plaintext);
    ++index_;
    return true;
  }

  // One chunk's ciphertext, counted as buffered.
  absl::StatusOr<std::string> Fetch(uint32_t index) {
    ASSIGN_OR_RETURN(
        pg::BinaryResult rows,
        pool_.Read(sql::kSelectChunk,
                   {record_.record_id, absl::StrCat(index), grantee_, PgTime(core_.Now()),
                    absl::StrCat(crypto::kMaxChunkBytes + crypto::kSealOverheadBytes)}));
    RETURN_IF_ERROR(Readable(rows, 1));
    if (rows.boolean(0, 2)) {
      return absl::DataLossError(absl::StrCat("record '", record_.record_id, "': chunk ", index,
                                              " is stored larger than a sealed chunk can be; it "
                                              "was not read"));
    }
    if (rows.is_null(0, 0)) {
      return absl::DataLossError(
          absl::StrCat("record '", record_.record_id, "': chunk ", index, " is missing"));
    }
    std::string sealed(rows.bytes(0, 0));
    core_.AddBuffered(static_cast<int64_t>(sealed.size()));
    return sealed;
  }

  // Whether the record, and the grant the download rests on, still stand (kSelectChunk's and
  // kChunkStillReadable's answer: no row when the record is gone, `grant_column` false when the
  // grant no longer holds).
  absl::Status Readable(const pg::BinaryResult& rows, int grant_column) const {
    if (rows.rows() == 0) {
      return absl::AbortedError(
          absl::StrCat("record '", record_.record_id, "' was erased during the download"));
    }
    if (!rows.boolean(0, grant_column)) {
      return absl::PermissionDeniedError(
          absl::StrCat("your grant on record '", record_.record_id,
                       "' was revoked or expired during the download"));
    }
    return absl::OkStatus();
  }

  absl::Status StillReadable() {
    ASSIGN_OR_RETURN(pg::BinaryResult rows,
                     pool_.Read(sql::kChunkStillReadable,
                                {record_.record_id, grantee_, PgTime(core_.Now())}));
    return Readable(rows, 0);
  }

  void ReaderLoop() {
    for (uint32_t index = 0; index < record_.chunk_count; ++index) {
      absl::StatusOr<std::string> sealed = Fetch(index);
      const bool failed = !sealed.ok();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !ahead_.has_value() || stopping_; });
      if (stopping_) {
        if (sealed.ok()) core_.AddBuffered(-static_cast<int64_t>(sealed->size()));
        return;
      }
      ahead_ = std::move(sealed);
      lock.unlock();
      cv_.notify_all();
      if (failed) return;
    }
  }

  std::unique_ptr<TransferSlot> slot_;  // first: given back after everything else is let go
  SharingCore& core_;
  pg::Pool& pool_;
  const RecordInfo record_;
  const SecretKey key_;
  const std::string grantee_;
  const std::function<absl::Status()> consent_holds_;
  uint32_t index_ = 0;
  uint64_t delivered_ = 0;  // plaintext bytes handed out
  crypto::Sha256 hasher_;
  bool verified_ = false;

  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<absl::StatusOr<std::string>> ahead_;  // the next chunk, fetched
  bool stopping_ = false;
  std::thread reader_;
};

}  // namespace

absl::Duration UploadTransactionIdleBound(absl::Duration idle_timeout) {
  return idle_timeout + kIdleTransactionGrace;
}

absl::Duration UploadKeepaliveTurn(absl::Duration idle_timeout) {
  // Content may arrive up to the idle timeout after the last statement, and its keepalive goes
  // out at the end of the turn it arrived in: a turn shorter than the grace keeps the session.
  return std::min(UploadTransactionIdleBound(idle_timeout) / 3, kIdleTransactionGrace / 2);
}

// --- SharingCore ------------------------------------------------------------------------------

SharingCore::SharingCore(const pg::ShardSet& shards, const pg::ShardSet& upload_shards,
                         PatientDirectory& directory, consent::ConsentCache& consent,
                         KeyVault& vault, SharingOptions options)
    : shards_(shards),
      upload_shards_(upload_shards),
      directory_(directory),
      consent_(consent),
      vault_(vault),
      options_(std::move(options)),
      patient_keys_(options_.patient_key_cache_entries, options_.patient_key_cache_max_age),
      // A spare thread per core beyond the first: an upload's hashing can take one that is idle.
      spare_threads_(static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 2u, 9u)) -
                     1) {}

void SharingCore::AddBuffered(int64_t delta) {
  int64_t now = buffered_.fetch_add(delta) + delta;
  int64_t peak = peak_buffered_.load();
  while (now > peak && !peak_buffered_.compare_exchange_weak(peak, now)) {
  }
}

QuotaLimit SharingCore::LimitIn(const std::string& tenant, const std::string& region) const {
  QuotaLimit limit;
  auto it = options_.tenant_quota_bytes.find(tenant);
  limit.quota =
      it != options_.tenant_quota_bytes.end() ? it->second : options_.default_tenant_quota_bytes;
  if (limit.quota <= 0) return limit;
  std::lock_guard<std::mutex> lock(usage_mu_);
  for (const auto& [other, tenants] : usage_by_region_) {
    if (other == region) continue;
    if (auto used = tenants.find(tenant); used != tenants.end()) limit.elsewhere += used->second;
  }
  return limit;
}

absl::Status SharingCore::CheckQuota(const std::string& tenant, const std::string& region,
                                     int64_t used, uint64_t adding,
                                     const QuotaLimit& limit) const {
  if (limit.quota > 0 && used + limit.elsewhere + static_cast<int64_t>(adding) > limit.quota) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", tenant, "' stores ", used, " bytes of records in region ", region,
        limit.elsewhere > 0 ? absl::StrCat(" and ", limit.elsewhere, " in its other regions")
                            : std::string(),
        "; adding ", adding, " would exceed its limit of ", limit.quota, " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<pg::Pool*> SharingCore::ShardOf(const std::string& object_id,
                                               absl::string_view what) const {
  absl::string_view region = absl::string_view(object_id).substr(0, object_id.find('.'));
  absl::StatusOr<pg::Pool*> pool = shards_.Get(region);
  if (!pool.ok()) return absl::NotFoundError(absl::StrCat(what, " '", object_id, "' not found"));
  return pool;
}

absl::Status SharingCore::CheckReadTerritory(const RecordInfo& record,
                                             absl::string_view reader_tenant) {
  absl::StatusOr<PatientHome> home = directory_.Resolve(record.patient_id);
  if (!home.ok()) {
    if (home.status().code() != absl::StatusCode::kNotFound) return home.status();
    return absl::FailedPreconditionError("the patient's placement is unknown: reads are refused");
  }
  ASSIGN_OR_RETURN(residency::ResidencyRule rule, directory_.Rule(home->territory));
  ASSIGN_OR_RETURN(std::vector<std::string> territories,
                   directory_.TenantTerritories(std::string(reader_tenant)));
  if (territories.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("tenant '", reader_tenant, "' serves no territory: reads are refused"));
  }
  for (const std::string& t : territories) {
    if (!residency::MayReadFrom(rule, t)) {
      // The reader's own territories only: a grantee of another tenant is not told where the
      // patient lives.
      return absl::FailedPreconditionError(absl::StrCat(
          "the residency rule of the patient's territory does not permit reading its data from ",
          t, ", a territory tenant '", reader_tenant, "' serves"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SecretKey> SharingCore::OpenRecordKey(pqxx::transaction_base& txn,
                                                     const RecordInfo& record,
                                                     const pqxx::row& row) {
  const pqxx::field wrapped_record_key = row[kRecordColumns];
  const pqxx::field patient_key_id = row[kRecordColumns + 1];
  const pqxx::field patient_key_wrapped_by = row[kRecordColumns + 2];
  const pqxx::field patient_key_wrapped = row[kRecordColumns + 3];
  if (wrapped_record_key.is_null() || patient_key_id.is_null()) {
    return absl::DataLossError(
        absl::StrCat("record '", record.record_id, "': its data key is missing"));
  }
  absl::string_view record_id = record.record_id;
  const absl::string_view region = record_id.substr(0, record_id.find('.'));
  absl::StatusOr<PatientKey> patient_key =
      OpenPatientKey(region, record.patient_id, patient_key_id.c_str(),
                     patient_key_wrapped_by.c_str(), BytesOf(patient_key_wrapped));
  if (patient_key.status().code() == absl::StatusCode::kAborted) {
    // The vault does not hold the key the row named when it was read. An erasure that has since
    // replaced it is worth a retry; a key the vault lost (restored from an older backup) is not:
    // if the record still rests on that key, no retry will ever open it. Asked in the caller's
    // transaction (a new statement sees what has committed since): a second connection from the
    // same pool could wait for one that requests like this one all hold.
    const bool still_named =
        !txn.exec_prepared(sql::kRecordRestsOnKey, record.record_id, patient_key_id.c_str())
             .empty();
    if (still_named) {
      return absl::DataLossError(absl::StrCat(
          "record '", record.record_id, "': the key vault of region ", region,
          " does not hold patient key '", patient_key_id.c_str(),
          "', on which the record rests: the record cannot be opened"));
    }
  }
  if (!patient_key.ok()) {
    return absl::Status(patient_key.status().code(),
                        absl::StrCat("record '", record.record_id, "': ",
                                     patient_key.status().message()));
  }
  absl::StatusOr<std::string> record_key = crypto::Open(
      patient_key->key, RecordKeyAad(record.record_id), BytesOf(wrapped_record_key));
  if (record_key.status().code() == absl::StatusCode::kDataLoss) {
    return absl::DataLossError(
        absl::StrCat("record '", record.record_id, "': its wrapped data key is damaged"));
  }
  if (!record_key.ok()) {
    return absl::Status(record_key.status().code(),
                        absl::StrCat("record '", record.record_id, "': its data key not opened: ",
                                     record_key.status().message()));
  }
  absl::StatusOr<SecretKey> key = SecretKey::FromBytes(*record_key);
  OPENSSL_cleanse(record_key->data(), record_key->size());  // the SecretKey wipes its own copy
  return key;
}

absl::StatusOr<PatientKey> SharingCore::OpenPatientKey(absl::string_view region,
                                                       const std::string& patient_id,
                                                       const std::string& key_id,
                                                       absl::string_view wrapped_by,
                                                       absl::string_view wrapped,
                                                       bool row_locked) {
  const uint64_t generation = patient_keys_.generation();
  std::optional<PatientKey> cached = patient_keys_.Get(patient_id, KeyCacheNow());
  if (cached && cached->key_id == key_id) return *std::move(cached);
  absl::StatusOr<SecretKey> key;
  if (wrapped_by == kInVault) {
    key = vault_.Get(region, patient_id, key_id);
    if (key.status().code() == absl::StatusCode::kNotFound && row_locked) {
      return absl::DataLossError(absl::StrCat(
          "the key vault of region ", region, " does not hold patient key '", key_id,
          "', which the shard names: the patient's records cannot be opened"));
    }
    if (key.status().code() == absl::StatusCode::kNotFound) {
      // The row named it when this request read it: an erasure has since retired it (and
      // rewrapped the patient's other records under a new key).
      return absl::AbortedError(
          absl::StrCat("the patient's key was replaced by an erasure while this request ran; "
                       "retry (",
                       key.status().message(), ")"));
    }
  } else {
    // A key the shard held before the vault existed, wrapped by this KEK or a previous one.
    key = vault_.Unwrap(wrapped_by, wrapped, PatientKeyContext(patient_id, key_id));
  }
  if (!key.ok()) return key.status();
  PatientKey opened{key_id, *std::move(key)};
  patient_keys_.Put(patient_id, opened, KeyCacheNow(), generation);
  return opened;
}

absl::StatusOr<PatientKey> SharingCore::NewPatientKey(absl::string_view region,
                                                      const std::string& patient_id) {
  PatientKey key{NewId(region, "p"), SecretKey::Random()};
  RETURN_IF_ERROR(vault_.Put(region, patient_id, key.key_id, key.key));
  return key;
}

absl::Status SharingCore::ShredRecordKey(pqxx::work& txn, const std::string& region,
                                         const RecordInfo& record,
                                         std::vector<std::string>& retired) {
  return ShredRecordKeys(txn, region, record.patient_id, {record.record_id}, retired);
}

absl::Status SharingCore::ShredRecordKeys(pqxx::work& txn, const std::string& region,
                                          const std::string& patient_id,
                                          const std::vector<std::string>& record_ids,
                                          std::vector<std::string>& retired) {
  if (record_ids.empty()) return absl::OkStatus();
  const std::string erasure =
      record_ids.size() == 1
          ? absl::StrCat("the erasure of record '", record_ids[0], "'")
          : absl::StrCat("the erasure of ", record_ids.size(), " records of the patient (record '",
                         record_ids[0], "' and others)");
  // Uploads store under the patient key FOR KEY SHARE: they commit before this lock is granted
  // (and their records are rewrapped below), or wait for this erasure and find the key gone.
  // The key locked must be the one the records' keys are wrapped under: an erasure of another of
  // the patient's records that committed while this one waited for the lock has replaced it
  // (the lock then found no row), and the next statement sees the new one.
  pqxx::result locked;
  for (int attempt = 0;; ++attempt) {
    locked = txn.exec_prepared(sql::kLockPatientKey, patient_id);
    bool settled = true;
    bool any_under_locked = false;  // the locked key wraps one of the records' keys: it retires
    for (const std::string& id : record_ids) {
      const pqxx::result under = txn.exec_prepared(sql::kSelectRecordKeyWrapper, id);
      if (under.empty()) continue;  // the record has no key: nothing to retire for it
      if (!locked.empty() && std::string(locked[0][0].c_str()) == under[0][0].c_str()) {
        any_under_locked = true;
        continue;
      }
      // A record whose key rests on no patient key the shard still names was left under a
      // retired key by an erasure that could not open it (damaged), or its patient key row is
      // gone: it is unreadable already, and no retry changes that. Its key goes; no patient key
      // is retired for it. Only while nothing can move it meanwhile: this transaction holds the
      // patient's key (only its holder rewraps), or the patient has none (nothing to rewrap
      // under). Otherwise another erasure may just have rewrapped it and retired the key read:
      // the next turn sees the new one.
      if (txn.exec_prepared(sql::kPatientKeyRowExists, under[0][0].c_str()).empty() &&
          (!locked.empty() || txn.exec_prepared(sql::kSelectPatientKey, patient_id).empty())) {
        continue;
      }
      settled = false;
      break;
    }
    if (settled) {
      if (!any_under_locked) locked = pqxx::result();
      break;
    }
    if (attempt == 2) {
      return absl::AbortedError(
          "the patient's key was replaced by other erasures while this one waited; retry");
    }
  }
  for (const std::string& id : record_ids) txn.exec_prepared0(sql::kDeleteRecordKey, id);
  if (locked.empty()) return absl::OkStatus();
  const std::string old_id = locked[0][0].c_str();
  // Every other record key under the old patient key moves to a new one, once for all the
  // records erased here: the old key is then destroyed in the vault, and with it the erased
  // records' keys in the shard's backups. (Their own keys are deleted above, so the statement,
  // which leaves out one record, finds none of them.)
  const pqxx::result others =
      txn.exec_prepared(sql::kSelectRecordKeysUnder, old_id, record_ids[0], patient_id);
  txn.exec_prepared0(sql::kDeletePatientKeyRow, old_id);
  txn.exec_prepared0(sql::kQueueKeyDestruction, old_id, patient_id);
  retired.push_back(old_id);
  if (others.empty()) return absl::OkStatus();  // the next upload makes a new key
  absl::StatusOr<PatientKey> old_key =
      OpenPatientKey(region, patient_id, old_id, locked[0][1].c_str(), BytesOf(locked[0][2]),
                     /*row_locked=*/true);
  if (!old_key.ok()) {
    return absl::Status(old_key.status().code(),
                        absl::StrCat(old_key.status().message(), "; ", erasure, " was not done"));
  }
  ASSIGN_OR_RETURN(PatientKey new_key, NewPatientKey(region, patient_id));
  std::vector<std::string> ids;
  std::vector<std::string> rewrapped;
  for (const pqxx::row& row : others) {
    const std::string id = row[0].c_str();
    absl::StatusOr<std::string> key =
        crypto::Open(old_key->key, RecordKeyAad(id), BytesOf(row[1]));
    if (key.status().code() == absl::StatusCode::kDataLoss) {
      // Already unreadable: it stays under the retired key rather than block this erasure.
      log::Error("record_key_damaged", {{"record", id}, {"during_erasure_of", record_ids[0]}});
      continue;
    }
    // Any other failure is this process's (OpenSSL could not set up), not the record's: the
    // erasure is not done, rather than leave a readable record under a key about to be destroyed.
    if (!key.ok()) {
      return absl::Status(key.status().code(),
                          absl::StrCat("record '", id, "': its key not rewrapped (",
                                       key.status().message(), "); ", erasure, " was not done"));
    }
    absl::StatusOr<std::string> sealed = crypto::Seal(new_key.key, RecordKeyAad(id), *key);
    OPENSSL_cleanse(key->data(), key->size());
    if (!sealed.ok()) return sealed.status();
    ids.push_back(id);
    rewrapped.push_back(absl::BytesToHexString(*sealed));
  }
  if (ids.empty()) return absl::OkStatus();
  if (txn.exec_prepared(sql::kInsertPatientKey, new_key.key_id, patient_id, kInVault,
                        pqxx::binarystring(std::string()), PgTime(Now()))
          .empty()) {
    return absl::AbortedError("the patient's key changed during the erasure; retry");
  }
  const pqxx::result moved =
      txn.exec_prepared(sql::kRewrapRecordKeys, new_key.key_id, pg::TextArrayLiteral(ids),
                        pg::TextArrayLiteral(rewrapped), old_id);
  if (moved.affected_rows() != ids.size()) {
    return absl::AbortedError("the patient's record keys changed during the erasure; retry");
  }
  return absl::OkStatus();
}

void SharingCore::AfterRecordErasure(pg::Pool& shard, const std::string& region,
                                     const std::string& patient_id,
                                     const std::vector<std::string>& retired, bool committed) {
  if (!patient_id.empty()) patient_keys_.Forget(patient_id);
  if (committed) DestroyRetiredKeys(shard, region, retired);
  // Again once the retired key left the vault: a request that read it before it went may have
  // cached it after the first Forget (Put refuses only keys read before a Forget).
  if (!patient_id.empty()) patient_keys_.Forget(patient_id);
}

void SharingCore::DestroyRetiredKeys(pg::Pool& shard, const std::string& region,
                                     const std::vector<std::string>& key_ids) {
  if (key_ids.empty()) return;
  absl::Status status = vault_.Destroy(region, key_ids);
  if (status.ok()) {
    status = shard.Transact([&](pqxx::work& txn) {
      txn.exec_prepared0(sql::kDeleteKeyDestructions, pg::TextArrayLiteral(key_ids));
      return absl::OkStatus();
    });
  }
  if (!status.ok()) {
    // Still queued in the shard: the sweep retries.
    log::Warning("key_destruction_deferred",
                 {{"region", region}, {"keys", key_ids.size()}, {"error", status.message()}});
  }
}

absl::Status SharingCore::OpenMetadata(pqxx::transaction_base& txn, RecordInfo& record,
                                       const pqxx::row& row) {
  if (!record.sealed_content_type && !record.sealed_file_name && !record.sealed_sha256) {
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(SecretKey key, OpenRecordKey(txn, record, row));
  return OpenSealedMetadata(key, record);
}

absl::StatusOr<std::optional<UploadResult>> SharingCore::StoredByRequest(
    pqxx::connection_base& connection, const CallContext& ctx, const UploadHeader& header,
    const consent::AccessDecision& care) {
  if (header.request_id.empty()) return std::nullopt;
  try {
    RecordInfo record;
    {
      pqxx::nontransaction q(connection);
      const pqxx::result rows = q.exec_prepared(sql::kSelectRecordByRequest,
                                                ctx.principal.spiffe_id, header.request_id);
      if (rows.empty()) return std::nullopt;
      if (rows[0][0].is_null()) {
        // Its record was erased: a late retry must not store the erased document again.
        return absl::FailedPreconditionError(absl::StrCat(
            "request_id '", header.request_id, "' stored a record that has since been erased; a "
            "new upload needs a new request_id; nothing was stored"));
      }
      record = RecordFromRow(rows[0]);
      RETURN_IF_ERROR(OpenMetadata(q, record, rows[0]));
    }
    if (record.patient_id != header.patient_id || record.kind != header.kind ||
        record.content_type != header.content_type || record.file_name != header.file_name ||
        record.size_bytes != header.size_bytes || record.sha256 != header.sha256) {
      return absl::AlreadyExistsError(absl::StrCat(
          "request_id '", header.request_id, "' already named an upload with another header "
          "(patient, kind, content type, file name, size or SHA-256); a new upload needs a new "
          "request_id; nothing was stored"));
    }
    // The answer reads the stored record's metadata for its uploader: audited as a read.
    audit::Entry entry = AuditEntryFor(
        ctx, audit::Action::kRead, "record", record.record_id, record.tenant_id,
        record.patient_id,
        absl::StrCat("PERMITTED: upload retried with request_id ", header.request_id,
                     ", answered with the record stored; nothing stored again"));
    CiteConsent(entry, care, consent::Purpose::kCare);
    pqxx::work txn(connection);
    RETURN_IF_ERROR(audit::Append(txn, entry).status());
    txn.commit();
    return UploadResult{record.record_id, record.size_bytes, record.sha256};
  } catch (const pqxx::in_doubt_error&) {
    return absl::UnavailableError(
        "database connection lost while the answer to a retried upload was audited; retry");
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

absl::StatusOr<SharingCore::SealPage> SharingCore::SealMetadataInClear(pg::Pool& pool, int batch,
                                                                       const std::string& after) {
  return pool.TransactValue<SealPage>([&](pqxx::work& txn) -> absl::StatusOr<SealPage> {
    SealPage page;
    for (const pqxx::row& row : txn.exec_prepared(sql::kSelectMetadataInClear, batch, after)) {
      RecordInfo record = RecordFromRow(row);
      ++page.selected;
      page.last_record_id = record.record_id;
      // All three are sealed again together; one already sealed is opened first.
      absl::StatusOr<SealedMetadata> metadata =
          [&]() -> absl::StatusOr<SealedMetadata> {
        ASSIGN_OR_RETURN(SecretKey key, OpenRecordKey(txn, record, row));
        RETURN_IF_ERROR(OpenSealedMetadata(key, record));
        return SealMetadata(key, record.record_id, record.content_type, record.file_name,
                            record.sha256);
      }();
      if (!metadata.ok()) {
        // One damaged record must not keep the others in clear.
        log::Warning("metadata_seal_failed",
                     {{"record_id", record.record_id}, {"error", metadata.status().message()}});
        continue;
      }
      txn.exec_prepared0(sql::kSealMetadata, record.record_id,
                         pqxx::binarystring(metadata->content_type),
                         pqxx::binarystring(metadata->file_name),
                         pqxx::binarystring(metadata->sha256));
      ++page.sealed;
    }
    return page;
  });
}

absl::StatusOr<std::unique_ptr<Upload>> SharingCore::StartUpload(const CallContext& ctx,
                                                                 const UploadHeader& header) {
  RETURN_IF_ERROR(ValidateIdentifier(header.patient_id, "header.patient_id", kMaxIdBytes));
  if (header.kind == RecordKind::kUnspecified) {
    return absl::InvalidArgumentError("header.kind: required");
  }
  RETURN_IF_ERROR(
      ValidateMediaType(header.content_type, "header.content_type", kMaxNameBytes));
  RETURN_IF_ERROR(ValidateText(header.file_name, "header.file_name", kMaxNameBytes));
  if (header.file_name.find_first_of("/\\") != std::string::npos) {
    return absl::InvalidArgumentError("header.file_name: no '/' or backslash");
  }
  // Bidirectional controls reorder what is shown: "scan\u202Efdp.exe" shows as "scanexe.pdf".
  for (absl::string_view control :
       {"\u061C", "\u200E", "\u200F", "\u202A", "\u202B", "\u202C", "\u202D", "\u202E",
        "\u2066", "\u2067", "\u2068", "\u2069"}) {
    if (absl::StrContains(header.file_name, control)) {
      return absl::InvalidArgumentError(
          "header.file_name: no Unicode bidirectional control characters (U+061C, U+200E, "
          "U+200F, U+202A-U+202E, U+2066-U+2069), which can make a name show as another");
    }
  }
  if (header.size_bytes == 0 || header.size_bytes > kMaxRecordBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.size_bytes: 1 to ", kMaxRecordBytes, ", got ", header.size_bytes));
  }
  if (header.sha256.size() != crypto::kSha256Bytes) {
    return absl::InvalidArgumentError("header.sha256: exactly 32 bytes");
  }
  ASSIGN_OR_RETURN(const PatientHome home, HomeOfCallersPatient(ctx, header.patient_id));
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  ASSIGN_OR_RETURN(pg::Pool * upload_pool, upload_shards_.Get(home.region_id));

  ASSIGN_OR_RETURN(consent::AccessDecision care, PermitUpload(ctx, home, header.kind));

  // A tenant's uploads to a region are bounded: the region's upload connections are everyone's.
  ASSIGN_OR_RETURN(std::unique_ptr<TransferSlot> slot,
                   TakeTransferSlot(uploads_in_progress_, options_.max_uploads_per_tenant,
                                    home.tenant_id, home.region_id, "uploads",
                                    "max_uploads_per_tenant"));
  // An upload of several chunks writes them as they come, in a transaction of its own: it holds
  // a connection from its start. One of a single chunk needs one only to store it.
  std::optional<pg::Lease> lease;
  if (header.size_bytes > crypto::kMaxChunkBytes) {
    absl::StatusOr<pg::Lease> acquired = upload_pool->Acquire();
    if (!acquired.ok()) {
      if (acquired.status().code() != absl::StatusCode::kResourceExhausted) {
        return acquired.status();
      }
      return absl::ResourceExhaustedError(absl::StrCat(
          "too many uploads in progress to region ", home.region_id, "; retry later"));
    }
    lease.emplace(*std::move(acquired));
    // A retry of an upload already stored is answered before its megabytes are sent again. A
    // one-chunk upload's content comes with its header: its retry is answered when its record
    // meets the first one's request id (Commit), without a look-up for every upload. Two at once
    // both get past this, and the second to commit is answered the same way.
    ASSIGN_OR_RETURN(std::optional<UploadResult> earlier,
                     StoredByRequest(lease->connection(), ctx, header, care));
    if (earlier) return std::unique_ptr<Upload>(std::make_unique<AnsweredUpload>(*earlier));
    // Refuse early what the quota cannot take, before a client sends megabytes for nothing;
    // Finish() checks again under a lock (and is the only check of a one-chunk upload).
    if (const QuotaLimit limit = LimitIn(home.tenant_id, home.region_id); limit.quota > 0) {
      ASSIGN_OR_RETURN(int64_t used,
                       pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
                         return txn.exec_prepared1(sql::kTenantUsage, home.tenant_id)[0]
                             .as<int64_t>();
                       }));
      RETURN_IF_ERROR(CheckQuota(home.tenant_id, home.region_id, used, header.size_bytes, limit));
    }
  }
  auto upload = std::make_unique<PgUpload>(*this, ctx, header, home, std::move(care),
                                           *upload_pool, std::move(lease), patient_keys_,
                                           std::move(slot));
  upload->Begin(options_.upload_idle_timeout);
  return std::unique_ptr<Upload>(std::move(upload));
}

absl::StatusOr<consent::AccessDecision> SharingCore::PermitUpload(const CallContext& ctx,
                                                                  const PatientHome& home,
                                                                  RecordKind kind) {
  // A practitioner adds to a patient's record for the patient's care: CARE must permit them, for
  // a record of this kind.
  ASSIGN_OR_RETURN(consent::AccessDecision care,
                   consent_.Check(home.region_id, home.patient_id, consent::Purpose::kCare,
                                  ctx.principal.spiffe_id, DataCategoryOf(kind), Now()));
  if (care.permit) return care;
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  audit::Entry entry = AuditEntryFor(ctx, audit::Action::kCreate, "record", "", home.tenant_id,
                                     home.patient_id, consent::AccessReasonName(care.reason));
  CiteConsent(entry, care, consent::Purpose::kCare);
  entry.decision = audit::Decision::kDeny;
  // A refusal whose entry cannot be written fails with that error instead.
  RETURN_IF_ERROR(
      pool->Transact([&](pqxx::work& txn) { return audit::Append(txn, entry).status(); }));
  return ConsentRefusal(care, "uploading a record for this patient", consent::Purpose::kCare);
}

absl::StatusOr<GrantInfo> SharingCore::ShareRecord(const CallContext& ctx,
                                                   const std::string& record_id,
                                                   const std::string& grantee,
                                                   absl::Time expires_at) {
  RETURN_IF_ERROR(ValidateIdentifier(record_id, "record_id", kMaxIdBytes));
  absl::StatusOr<Principal> to = ParseSpiffeId(grantee, options_.trust_domain);
  if (!to.ok() || to->kind != PrincipalKind::kPractitioner) {
    return absl::InvalidArgumentError("grantee: must be the SPIFFE id of a practitioner");
  }
  if (grantee == ctx.principal.spiffe_id) {
    return absl::InvalidArgumentError("grantee: you cannot share a record with yourself");
  }
  const absl::Time now = Now();
  if (expires_at <= now) return absl::InvalidArgumentError("expires_at: must be in the future");
  if (expires_at > now + kMaxGrantDuration) {
    return absl::InvalidArgumentError("expires_at: at most 365 days ahead");
  }
  ASSIGN_OR_RETURN(pg::Pool * pool, ShardOf(record_id, "record"));
  const std::string region = record_id.substr(0, record_id.find('.'));
  return ResultOf(pool->TransactValue<Outcome<GrantInfo>>(
      [&](pqxx::work& txn) -> absl::StatusOr<Outcome<GrantInfo>> {
        // What may wait (a consent load, routing's directory) is asked before the record is
        // locked, so that shares of it do not queue behind the wait; the answers are used below,
        // in the same order of checks as ever. A record's patient and tenant never change.
        std::optional<RecordInfo> unlocked = SelectRecord(txn, sql::kSelectRecord, record_id);
        if (!unlocked) return RecordNotFound(record_id);
        // Who may share it: the owner, or a practitioner of the patient's tenant with an active
        // grant, not beyond it. Asked of the record as read, before anything is asked about the
        // patient (a caller of another tenant without a grant learns nothing of the record, not
        // even from how long the answer took), and again once it is locked.
        // A refusal to a caller the record is visible to is audited, as a download refused to
        // them would be; one of another tenant without a grant learns (and leaves) nothing.
        // The consent a grant rests on (its sharer's RECORD_SHARING), asked once per sharer.
        std::optional<std::pair<std::string, absl::StatusOr<consent::AccessDecision>>> basis;
        auto basis_of = [&](const GrantInfo& g, const RecordInfo& r) {
          if (!basis || basis->first != g.granted_by) {
            basis.emplace(g.granted_by,
                          consent_.Check(region, r.patient_id, consent::Purpose::kRecordSharing,
                                         g.granted_by, DataCategoryOf(r.kind), now));
          }
          return basis->second;
        };
        auto may_share = [&](const RecordInfo& r) -> absl::StatusOr<Outcome<GrantInfo>> {
          if (r.owner == ctx.principal.spiffe_id) return Outcome<GrantInfo>{};
          std::optional<GrantInfo> mine = LatestGrant(txn, record_id, ctx.principal.spiffe_id);
          const bool active = mine && IsActive(*mine, now);
          auto refuse = [&](absl::string_view reason, absl::string_view message) {
            audit::Entry entry = AuditEntryFor(ctx, audit::Action::kCreate, "share_grant",
                                               record_id, r.tenant_id, r.patient_id, "");
            entry.reason = absl::StrCat(reason, ": grantee=", grantee);
            return Deny<GrantInfo>(txn, entry, absl::PermissionDeniedError(message));
          };
          if (r.tenant_id != ctx.principal.tenant) {
            if (!active) return RecordNotFound(record_id);
            return refuse("SHARER_OF_ANOTHER_TENANT",
                          "only practitioners of the patient's tenant may share its records");
          }
          if (!active) {
            return refuse(
                "NOT_SHARED",
                "only the record's owner or a practitioner holding a grant on it may share it");
          }
          if (expires_at > mine->expires_at) {
            return absl::FailedPreconditionError(
                absl::StrCat("expires_at: a re-share cannot outlast your own grant (until ",
                             Rfc3339(mine->expires_at), ")"));
          }
          // A grant stands only while the consent it rests on does, for sharing it onward as for
          // reading under it: one whose sharer's consent was withdrawn passes nothing on.
          ASSIGN_OR_RETURN(const consent::AccessDecision rests_on, basis_of(*mine, r));
          if (!rests_on.permit) {
            audit::Entry entry = AuditEntryFor(ctx, audit::Action::kCreate, "share_grant",
                                               record_id, r.tenant_id, r.patient_id, "");
            CiteConsent(entry, rests_on);
            entry.reason = absl::StrCat(consent::AccessReasonName(rests_on.reason),
                                        ": grantee=", grantee, " grant=", mine->grant_id);
            return Deny<GrantInfo>(
                txn, entry, ConsentRefusal(rests_on, "sharing onward a record shared with you"));
          }
          return Outcome<GrantInfo>{};
        };
        if (absl::StatusOr<Outcome<GrantInfo>> refused = may_share(*unlocked);
            !refused.ok() || !refused->denied.ok()) {
          return refused;
        }
        const absl::StatusOr<consent::AccessDecision> consent =
            consent_.Check(region, unlocked->patient_id, consent::Purpose::kRecordSharing,
                           ctx.principal.spiffe_id, DataCategoryOf(unlocked->kind), now);
        const absl::Status territory = to->tenant != unlocked->tenant_id
                                           ? CheckReadTerritory(*unlocked, to->tenant)
                                           : absl::OkStatus();
        std::optional<RecordInfo> record = SelectRecord(txn, sql::kSelectRecordForShare, record_id);
        if (!record) return RecordNotFound(record_id);
        // The caller's grant may have ended meanwhile.
        if (absl::StatusOr<Outcome<GrantInfo>> refused = may_share(*record);
            !refused.ok() || !refused->denied.ok()) {
          return refused;
        }
        if (grantee == record->owner) {
          return absl::InvalidArgumentError("grantee: is the record's owner");
        }
        if (record->state == RecordState::kArchived) {
          return absl::FailedPreconditionError(absl::StrCat(
              "record '", record_id, "' is archived; archived records cannot be shared"));
        }
        // An active grant to the grantee is extended, never shortened or taken over: only the
        // owner or its sharer may extend it, and it then rests on the extender's consent.
        if (std::optional<GrantInfo> held = LatestGrant(txn, record_id, grantee);
            held && IsActive(*held, now) && held->granted_by != ctx.principal.spiffe_id &&
            record->owner != ctx.principal.spiffe_id) {
          // Not said: when it ends or who made it. The caller does not see grants it did not
          // make (ListRecords and downloads show it its own).
          return absl::FailedPreconditionError(absl::StrCat(
              "grantee already holds an active grant on record '", record_id,
              "' made by another practitioner; only they or the record's owner may extend it"));
        }
        audit::Entry entry = AuditEntryFor(ctx, audit::Action::kCreate, "share_grant", record_id,
                                      record->tenant_id, record->patient_id, "");
        // The consent lets the patient's tenant share the record; one narrowed to a practitioner
        // lets that practitioner share it, with anyone (another tenant's practitioners too).
        if (!consent.ok()) return consent.status();
        const consent::AccessDecision& decision = *consent;
        CiteConsent(entry, decision);
        if (!decision.permit) {
          entry.reason =
              absl::StrCat(consent::AccessReasonName(decision.reason), ": grantee=", grantee);
          return Deny<GrantInfo>(txn, entry, ConsentRefusal(decision, "sharing this record"));
        }
        if (territory.code() == absl::StatusCode::kFailedPrecondition) {
          // The residency rule keeps the grantee's tenant from reading: refused and audited as
          // a grantee's download would be.
          // The caller learns the patient's rule refuses the grantee's tenant, not which
          // territories another tenant serves or whether it is registered: the audit entry,
          // which ops read, keeps that.
          entry.reason = absl::StrCat("TERRITORY_NOT_PERMITTED: grantee=", grantee, " (",
                                      territory.message(), ")");
          return Deny<GrantInfo>(
              txn, entry,
              absl::PermissionDeniedError(
                  "the grantee's tenant may not read this patient's data: the residency rule of "
                  "the patient's territory does not permit reads from every territory it serves, "
                  "or it is not an active tenant"));
        }
        RETURN_IF_ERROR(territory);
        const int64_t others =
            txn.exec_prepared1(sql::kCountOtherActiveGrants, record_id, PgTime(now), grantee)[0]
                .as<int64_t>();
        if (others >= kMaxActiveGrantsPerRecord) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "record '", record_id, "' has the most active grants a record may have (",
              kMaxActiveGrantsPerRecord, "); revoke one before sharing with another "
              "practitioner"));
        }
        GrantInfo grant = GrantFromRow(txn.exec_prepared1(
            sql::kUpsertGrant, NewId(region, "g"), record_id, grantee, to->tenant,
            ctx.principal.spiffe_id, PgTime(now), PgTime(expires_at)));
        // At most two rows per grantee: this grant and the latest revoked one.
        txn.exec_prepared(sql::kTrimRevokedGrants, record_id, grantee);
        entry.object_id = grant.grant_id;
        entry.reason = absl::StrCat("PERMITTED: record=", record_id, " grantee=", grantee,
                                    " until=", Rfc3339(grant.expires_at));
        RETURN_IF_ERROR(audit::Append(txn, entry).status());
        return Done(std::move(grant));
      }));
}

absl::StatusOr<GrantInfo> SharingCore::RevokeShare(const CallContext& ctx,
                                                   const std::string& grant_id,
                                                   const std::string& record_id,
                                                   const std::string& grantee) {
  const bool by_id = !grant_id.empty();
  if (by_id) {
    RETURN_IF_ERROR(ValidateIdentifier(grant_id, "grant_id", kMaxIdBytes));
  } else {
    RETURN_IF_ERROR(ValidateIdentifier(record_id, "record_grantee.record_id", kMaxIdBytes));
    RETURN_IF_ERROR(ValidateText(grantee, "record_grantee.grantee", 512));
  }
  const std::string& id = by_id ? grant_id : record_id;
  ASSIGN_OR_RETURN(pg::Pool * pool, ShardOf(id, by_id ? "grant" : "record"));
  const absl::Time now = Now();
  return ResultOf(pool->TransactValue<Outcome<GrantInfo>>(
      [&](pqxx::work& txn) -> absl::StatusOr<Outcome<GrantInfo>> {
    std::optional<GrantInfo> found;
    if (by_id) {
      pqxx::result rows = txn.exec_prepared(sql::kSelectGrant, grant_id);
      if (!rows.empty()) found = GrantFromRow(rows[0]);
    } else {
      found = LatestGrant(txn, record_id, grantee);
    }
    const absl::Status not_found =
        by_id ? absl::NotFoundError(absl::StrCat("grant '", grant_id, "' not found"))
              : absl::NotFoundError(
                    absl::StrCat("record '", record_id, "' has no grant to ", grantee));
    if (!found) return not_found;
    // The record first, as ShareRecord locks it: a re-share by the grantee and this revocation
    // take turns, so a grant made onward is either refused or revoked with this one.
    std::optional<RecordInfo> record =
        SelectRecord(txn, sql::kSelectRecordForShare, found->record_id);
    if (!record || record->tenant_id != ctx.principal.tenant) return not_found;
    // A share that committed while this waited for the record may have trimmed this grant (a
    // revoked one a later revocation superseded, shard migration 0029): then it is not found.
    pqxx::result locked = txn.exec_prepared(sql::kSelectGrantForUpdate, found->grant_id);
    if (locked.empty()) return not_found;
    const GrantInfo grant = GrantFromRow(locked[0]);
    if (ctx.principal.spiffe_id != record->owner && ctx.principal.spiffe_id != grant.granted_by) {
      // Audited: a practitioner of the tenant tried to end another's share.
      return Deny<GrantInfo>(
          txn,
          AuditEntryFor(ctx, audit::Action::kUpdate, "share_grant", grant.grant_id,
                        record->tenant_id, record->patient_id,
                        absl::StrCat("NOT_OWNER_OR_SHARER: record=", record->record_id,
                                     " grantee=", grant.grantee)),
          absl::PermissionDeniedError(
              "only the record's owner or the practitioner who shared may revoke a grant"));
    }
    if (grant.revoked_at) return Done(grant);  // idempotent: the earlier revocation stands
    GrantInfo revoked =
        GrantFromRow(txn.exec_prepared1(sql::kRevokeGrant, grant.grant_id, PgTime(now)));
    std::vector<audit::Entry> entries = {
        AuditEntryFor(ctx, audit::Action::kUpdate, "share_grant", revoked.grant_id,
                      record->tenant_id, record->patient_id,
                      absl::StrCat("REVOKED: record=", record->record_id,
                                   " grantee=", revoked.grantee))};
    // What the grantee shared onward rested on its grant: it ends with it, each audited (all the
    // entries in one statement, the chain head locked once).
    for (const pqxx::row& row :
         txn.exec_prepared(sql::kRevokeSharedOnward, record->record_id, revoked.grantee, PgTime(now))) {
      const GrantInfo onward = GrantFromRow(row);
      entries.push_back(AuditEntryFor(ctx, audit::Action::kUpdate, "share_grant", onward.grant_id,
                                      record->tenant_id, record->patient_id,
                                      absl::StrCat("REVOKED: record=", record->record_id,
                                                   " grantee=", onward.grantee,
                                                   " (shared onward by ", onward.granted_by,
                                                   ", whose grant was revoked)")));
    }
    RETURN_IF_ERROR(audit::AppendMany(txn, entries).status());
    return Done(std::move(revoked));
  }));
}

absl::StatusOr<bool> SharingCore::MayRead(const std::string& region, const RecordInfo& record,
                                          const std::string& caller, absl::Time now) {
  if (record.owner == caller) {
    ASSIGN_OR_RETURN(consent::AccessDecision care,
                     consent_.Check(region, record.patient_id, consent::Purpose::kCare, caller,
                                    DataCategoryOf(record.kind), now));
    return care.permit;
  }
  // AttachGrants gave a grantee's record its caller's active grant, if any.
  auto grant = std::find_if(record.grants.begin(), record.grants.end(),
                            [&](const GrantInfo& g) { return g.grantee == caller; });
  if (grant == record.grants.end()) return false;
  ASSIGN_OR_RETURN(consent::AccessDecision sharing,
                   consent_.Check(region, record.patient_id, consent::Purpose::kRecordSharing,
                                  grant->granted_by, DataCategoryOf(record.kind), now));
  if (!sharing.permit) return false;
  if (grant->grantee_tenant == record.tenant_id) return true;
  absl::Status territory = CheckReadTerritory(record, grant->grantee_tenant);
  if (territory.code() == absl::StatusCode::kFailedPrecondition) return false;
  RETURN_IF_ERROR(territory);
  return true;
}

absl::StatusOr<ListResult> SharingCore::ListRecords(const CallContext& ctx,
                                                    const ListQuery& query) {
  if (query.scope == ListScope::kUnspecified) return absl::InvalidArgumentError("scope: required");
  if (query.scope == ListScope::kPatient) {
    RETURN_IF_ERROR(ValidateIdentifier(query.patient_id, "patient_id", kMaxIdBytes));
  } else if (!query.patient_id.empty()) {
    return absl::InvalidArgumentError("patient_id: only with RECORD_SCOPE_PATIENT");
  }
  if (query.page_size < 1) return absl::InvalidArgumentError("page_size: must be positive");
  const int size = query.page_size;
  ASSIGN_OR_RETURN(auto after, ParsePageToken(query.page_token));
  const absl::Time now = Now();
  const std::string& caller = ctx.principal.spiffe_id;

  std::vector<std::string> regions;
  if (query.scope == ListScope::kPatient) {
    ASSIGN_OR_RETURN(const PatientHome home, HomeOfCallersPatient(ctx, query.patient_id));
    regions.push_back(home.region_id);
  } else {
    // A practitioner's records and grants may be in any region.
    regions = shards_.RegionIds();
  }

  // Each region's newest `size + 1` after the token, those the caller may still read, merged
  // newest first. A region that had more than it gave may hold unseen records older than the
  // last it gave: nothing older than the newest such cut-off (the horizon) is shown on this page,
  // since a record of that region could belong before it.
  std::vector<RecordInfo> merged;
  std::optional<RecordInfo> horizon;  // the region cut-off nothing on this page may pass
  const size_t max_grants =
      options_.max_listed_grants > 0
          ? std::max<size_t>(options_.max_listed_grants, kMaxActiveGrantsPerRecord)
          : options_.max_list_page_bytes / 64 + kMaxActiveGrantsPerRecord;
  auto newer = [](const RecordInfo& a, const RecordInfo& b) {
    return std::tie(a.created_at, a.record_id) > std::tie(b.created_at, b.record_id);
  };
  for (const std::string& region : regions) {
    ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(region));
    // The region's records cut short by the grants they hold: cut off as when it had more
    // records than the page.
    bool grants_cut = false;
    absl::StatusOr<std::vector<RecordInfo>> page = pool->TransactValue<std::vector<RecordInfo>>(
        [&](pqxx::work& txn) -> absl::StatusOr<std::vector<RecordInfo>> {
          const int kind = static_cast<int>(query.kind);
          const std::string before = PgTime(after.first);
          pqxx::result rows;
          switch (query.scope) {
            case ListScope::kMine:
              rows = txn.exec_prepared(sql::kListOwned, caller, kind, query.include_archived,
                                       before, after.second, size + 1);
              break;
            case ListScope::kSharedWithMe:
              rows = txn.exec_prepared(sql::kListShared, caller, kind, query.include_archived,
                                       before, after.second, size + 1, PgTime(now));
              break;
            default:
              rows = txn.exec_prepared(sql::kListPatient, query.patient_id, kind,
                                       query.include_archived, before, after.second, size + 1,
                                       caller, PgTime(now));
              break;
          }
          std::vector<RecordInfo> records;
          for (const pqxx::row& row : rows) {
            records.push_back(RecordFromRow(row));
            // A damaged record is listed as such (to those who may read it, below): it does not
            // take the caller's whole listing down with it. A vault that does not answer does.
            absl::Status opened = OpenMetadata(txn, records.back(), row);
            if (opened.code() == absl::StatusCode::kDataLoss) {
              log::Error("record_damaged", {{"record", records.back().record_id},
                                            {"error", opened.message()}});
              records.back().damaged = std::string(opened.message());
              records.back().content_type.clear();
              records.back().file_name.clear();
              records.back().sha256.clear();
            } else if (!opened.ok()) {
              return opened;
            }
          }
          grants_cut = AttachGrants(txn, records, caller, now, max_grants);
          return records;
        });
    if (!page.ok()) {
      return absl::Status(page.status().code(),
                          absl::StrCat("region ", region, ": ", page.status().message()));
    }
    if ((page->size() > static_cast<size_t>(size) || grants_cut) &&
        !page->empty() && (!horizon || newer(page->back(), *horizon))) {
      horizon = page->back();
    }
    for (RecordInfo& record : *page) {
      absl::StatusOr<bool> readable = MayRead(region, record, caller, now);
      if (!readable.ok()) {
        return absl::Status(readable.status().code(),
                            absl::StrCat("region ", region, ": ", readable.status().message()));
      }
      if (*readable) merged.push_back(std::move(record));
    }
  }
  std::sort(merged.begin(), merged.end(), newer);
  if (horizon) {
    merged.erase(std::find_if(merged.begin(), merged.end(),
                              [&](const RecordInfo& r) { return newer(*horizon, r); }),
                 merged.end());
  }
  ListResult result;
  // At most `size` records, and fewer when they would not fit max_list_page_bytes (at least one).
  size_t keep = 0;
  size_t bytes = 0;
  for (; keep < merged.size() && keep < static_cast<size_t>(size); ++keep) {
    const size_t record_bytes = ApproximateBytes(merged[keep]);
    if (keep > 0 && bytes + record_bytes > options_.max_list_page_bytes) break;
    bytes += record_bytes;
  }
  if (keep < merged.size()) {
    merged.resize(keep);
    result.next_page_token = PageToken(merged.back());
  } else if (horizon) {
    // Everything up to the horizon is on this page (or was not the caller's to read): the next
    // page starts below it.
    result.next_page_token = PageToken(*horizon);
  }
  RETURN_IF_ERROR(AuditListing(ctx, query.scope, merged));
  result.records = std::move(merged);
  return result;
}

absl::Status SharingCore::AuditListing(const CallContext& ctx, ListScope scope,
                                       const std::vector<RecordInfo>& listed) {
  // Record metadata (kind, file name, content type) is the patient's data: each patient whose
  // records a page shows gets a read entry in its home shard's chain before the page leaves.
  std::map<std::string, std::map<std::pair<std::string, std::string>, int>> by_region;
  for (const RecordInfo& r : listed) {
    ++by_region[r.record_id.substr(0, r.record_id.find('.'))][{r.tenant_id, r.patient_id}];
  }
  const char* scope_name = scope == ListScope::kMine           ? "mine"
                           : scope == ListScope::kSharedWithMe ? "shared_with_me"
                                                               : "patient";
  for (const auto& [region, patients] : by_region) {
    ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(region));
    // One statement per region: a page of many patients locks the region's chain head once.
    std::vector<audit::Entry> entries;
    entries.reserve(patients.size());
    for (const auto& [who, count] : patients) {
      entries.push_back(AuditEntryFor(ctx, audit::Action::kRead, "record_list", who.second,
                                      who.first, who.second,
                                      absl::StrCat("LISTED: count=", count, " scope=", scope_name)));
    }
    absl::Status audited = pool->Transact([&](pqxx::work& txn) -> absl::Status {
      return audit::AppendMany(txn, entries).status();
    });
    if (!audited.ok()) {
      return absl::Status(audited.code(),
                          absl::StrCat("region ", region, ": the listing's audit entries could "
                                       "not be written: ", audited.message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<PatientHome> SharingCore::HomeOfCallersPatient(const CallContext& ctx,
                                                              const std::string& patient_id) {
  absl::StatusOr<PatientHome> home = directory_.Resolve(patient_id);
  if (!home.ok() && home.status().code() != absl::StatusCode::kNotFound) return home.status();
  if (!home.ok() || home->tenant_id != ctx.principal.tenant) {
    return absl::NotFoundError(absl::StrCat("patient '", patient_id, "' not found"));
  }
  return home;
}

absl::StatusOr<std::unique_ptr<Download>> SharingCore::OpenDownload(
    const CallContext& ctx, const std::string& record_id, const std::string& break_glass_reason) {
  return OpenRecord(ctx, record_id, break_glass_reason, nullptr);
}

absl::StatusOr<ExportListing> SharingCore::ListForExport(const CallContext& ctx,
                                                         const std::string& patient_id,
                                                         const std::string& reason, int limit,
                                                         const std::string& page_token) {
  RETURN_IF_ERROR(ValidateIdentifier(patient_id, "patient_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxReasonBytes));
  if (limit < 1) return absl::InvalidArgumentError("page_size: must be positive");
  ASSIGN_OR_RETURN(auto after, ParsePageToken(page_token, "ExportPatientRecords"));
  if (ctx.principal.kind != PrincipalKind::kApp) {
    return absl::PermissionDeniedError("a patient's records are exported by an app of its tenant");
  }
  ASSIGN_OR_RETURN(const PatientHome home, HomeOfCallersPatient(ctx, patient_id));
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  return pool->TransactValue<ExportListing>(
      [&](pqxx::work& txn) -> absl::StatusOr<ExportListing> {
        const pqxx::result rows =
            txn.exec_prepared(sql::kListPatientForExport, patient_id, PgTime(after.first),
                              after.second, limit + 1);
        ExportListing listing;
        for (const pqxx::row& row : rows) {
          if (listing.record_ids.size() == static_cast<size_t>(limit)) {
            RecordInfo last;
            last.record_id = listing.record_ids.back();
            last.created_at = TimeOf(rows[limit - 1][1]);
            listing.next_page_token = PageToken(last);
            break;
          }
          listing.record_ids.push_back(row[0].c_str());
        }
        // Which records the patient has is the patient's data: the listing is audited with the
        // reason, even when it finds none.
        RETURN_IF_ERROR(
            audit::Append(txn, AuditEntryFor(ctx, audit::Action::kRead, "record_list", patient_id,
                                             home.tenant_id, patient_id,
                                             ReasonWithDetail(absl::StrCat(
                                                 "EXPORT_LISTED: count=",
                                                 listing.record_ids.size(), "; "), reason)))
                .status());
        return listing;
      });
}

absl::StatusOr<std::unique_ptr<Download>> SharingCore::OpenExport(const CallContext& ctx,
                                                                  const std::string& patient_id,
                                                                  const std::string& record_id,
                                                                  const std::string& reason) {
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxReasonBytes));
  if (ctx.principal.kind != PrincipalKind::kApp) {
    return absl::PermissionDeniedError("a patient's records are exported by an app of its tenant");
  }
  const ExportOf export_of{patient_id, reason};
  return OpenRecord(ctx, record_id, "", &export_of);
}

absl::StatusOr<std::unique_ptr<Download>> SharingCore::OpenRecord(
    const CallContext& ctx, const std::string& record_id, const std::string& break_glass_reason,
    const ExportOf* export_of) {
  RETURN_IF_ERROR(ValidateIdentifier(record_id, "record_id", kMaxIdBytes));
  const bool ops = ctx.principal.kind == PrincipalKind::kOps && export_of == nullptr;
  // A break-glass request its caller may not make is refused once the record is read, so that the
  // refusal is audited with it (unless the record is not the caller's to know of).
  // An ops read with a reason too short to justify it is refused and audited as one without;
  // a reason too long, or not text, is bad input, refused before anything is read.
  absl::Status break_glass_refused;
  if (ops && break_glass_reason.empty()) {
    break_glass_refused = absl::PermissionDeniedError(
        "ops read records only by break-glass: break_glass_reason is required");
  } else if (ops && break_glass_reason.size() < kMinBreakGlassReasonBytes) {
    break_glass_refused = absl::InvalidArgumentError(
        absl::StrCat("break_glass_reason: ", kMinBreakGlassReasonBytes, " to ",
                     kMaxBreakGlassReasonBytes, " bytes, got ", break_glass_reason.size()));
  } else if (ops) {
    if (break_glass_reason.size() > kMaxBreakGlassReasonBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("break_glass_reason: ", kMinBreakGlassReasonBytes, " to ",
                       kMaxBreakGlassReasonBytes, " bytes, got ", break_glass_reason.size()));
    }
    RETURN_IF_ERROR(
        ValidateText(break_glass_reason, "break_glass_reason", kMaxBreakGlassReasonBytes));
  } else if (!break_glass_reason.empty()) {
    break_glass_refused =
        absl::PermissionDeniedError("break-glass reads are for ops identities only");
  }
  ASSIGN_OR_RETURN(pg::Pool * pool, ShardOf(record_id, "record"));
  // Taken before the record is read, so a download refused for want of one reads and audits
  // nothing; an ops identity (no tenant) counts with the other ops identities. A break-glass
  // request refused for who asks takes none: it is refused (and audited) whatever the load.
  std::unique_ptr<TransferSlot> slot;
  if (break_glass_refused.ok()) {
    ASSIGN_OR_RETURN(slot, TakeTransferSlot(downloads_in_progress_,
                                            options_.max_downloads_per_tenant,
                                            ctx.principal.tenant, pool->name(), "downloads",
                                            "max_downloads_per_tenant"));
  }
  const std::string region = record_id.substr(0, record_id.find('.'));
  const absl::Time now = Now();
  const std::string& caller = ctx.principal.spiffe_id;

  // The consent a download rests on, asked again before each chunk after the first is handed
  // over: a withdrawal stops a download in progress as a revocation or an erasure does.
  auto consent_holds = [this, region](const RecordInfo& record, consent::Purpose purpose,
                                      std::string actor) -> std::function<absl::Status()> {
    return [this, region, purpose, actor = std::move(actor), record_id = record.record_id,
            patient_id = record.patient_id,
            category = std::string(DataCategoryOf(record.kind))]() -> absl::Status {
      ASSIGN_OR_RETURN(consent::AccessDecision decision,
                       consent_.Check(region, patient_id, purpose, actor, category, Now()));
      if (decision.permit) return absl::OkStatus();
      return absl::PermissionDeniedError(absl::StrCat(
          "record '", record_id, "': the patient's ", consent::PurposeName(purpose),
          " consent no longer permits this download (", consent::AccessReasonName(decision.reason),
          "); it stopped during the download"));
    };
  };
  struct Opened {
    RecordInfo record;
    SecretKey key;
    std::string grantee;  // the caller, when it reads under a grant
    std::function<absl::Status()> consent_holds;  // none for break-glass and exports
  };
  ASSIGN_OR_RETURN(
      Opened opened,
      ResultOf(pool->TransactValue<Outcome<Opened>>([&](pqxx::work& txn)
                                                        -> absl::StatusOr<Outcome<Opened>> {
        // The record with what opens its key, in one round trip.
        const pqxx::result rows = txn.exec_prepared(sql::kSelectRecordWithKey, record_id);
        // The same refusal whether the record exists or not.
        if (rows.empty() && !break_glass_refused.ok()) return break_glass_refused;
        if (rows.empty()) return RecordNotFound(record_id);
        const RecordInfo record = RecordFromRow(rows[0]);
        audit::Entry entry = AuditEntryFor(ctx, audit::Action::kRead, "record", record_id,
                                      record.tenant_id, record.patient_id, "");
        if (!break_glass_refused.ok()) {
          if (!ops && record.tenant_id != ctx.principal.tenant) return break_glass_refused;
          entry.reason = ops ? "BREAK_GLASS_WITHOUT_REASON" : "BREAK_GLASS_NOT_OPS";
          return Deny<Opened>(txn, entry, break_glass_refused);
        }
        const std::string bytes = absl::StrCat("bytes=", record.size_bytes);
        std::vector<RecordInfo> one = {record};
        std::string grantee;  // the caller, when it reads under a grant
        std::function<absl::Status()> holds;
        if (export_of != nullptr) {
          // An app of the patient's tenant, for the patient's request: no consent is asked.
          if (record.tenant_id != ctx.principal.tenant ||
              record.patient_id != export_of->patient_id) {
            return RecordNotFound(record_id);
          }
          entry.reason = ReasonWithDetail(absl::StrCat("EXPORTED: ", bytes, "; "),
                                          export_of->reason);
        } else if (ops) {
          // The ops reason may take the whole detail by itself: its end gives way to the size.
          entry.reason = absl::StrCat(
              "BREAK_GLASS: ",
              ReasonWithDetail(absl::StrCat(bytes, " reason="), break_glass_reason));
        } else if (record.owner == caller) {
          // The owner reads for the patient's care, while CARE permits them.
          ASSIGN_OR_RETURN(consent::AccessDecision care,
                           consent_.Check(region, record.patient_id, consent::Purpose::kCare,
                                          caller, DataCategoryOf(record.kind), now));
          CiteConsent(entry, care, consent::Purpose::kCare);
          if (!care.permit) {
            entry.reason = std::string(consent::AccessReasonName(care.reason));
            return Deny<Opened>(txn, entry,
                                ConsentRefusal(care, "reading this record", consent::Purpose::kCare));
          }
          entry.reason = absl::StrCat("PERMITTED: ", bytes);
          AttachGrants(txn, one, caller, now);
          holds = consent_holds(record, consent::Purpose::kCare, caller);
        } else {
          std::optional<GrantInfo> grant = LatestGrant(txn, record_id, caller);
          if (!grant) {
            if (record.tenant_id != ctx.principal.tenant) return RecordNotFound(record_id);
            entry.reason = "NOT_SHARED";
            return Deny<Opened>(txn, entry,
                                absl::PermissionDeniedError(absl::StrCat(
                                    "record '", record_id, "' is not shared with you")));
          }
          const std::string which = absl::StrCat(" grant=", grant->grant_id);
          if (grant->revoked_at) {
            entry.reason = absl::StrCat("GRANT_REVOKED:", which);
            return Deny<Opened>(txn, entry,
                                absl::PermissionDeniedError(absl::StrCat(
                                    "your grant on record '", record_id, "' was revoked at ",
                                    Rfc3339(*grant->revoked_at))));
          }
          if (grant->expires_at <= now) {
            entry.reason = absl::StrCat("GRANT_EXPIRED:", which);
            return Deny<Opened>(txn, entry,
                                absl::PermissionDeniedError(
                                    absl::StrCat("your grant on record '", record_id,
                                                 "' expired at ", Rfc3339(grant->expires_at))));
          }
          // The share stands only while the consent it rested on does.
          ASSIGN_OR_RETURN(
              consent::AccessDecision decision,
              consent_.Check(region, record.patient_id, consent::Purpose::kRecordSharing,
                             grant->granted_by, DataCategoryOf(record.kind), now));
          CiteConsent(entry, decision);
          if (!decision.permit) {
            entry.reason = absl::StrCat(consent::AccessReasonName(decision.reason), ":", which);
            return Deny<Opened>(txn, entry, ConsentRefusal(decision, "reading this shared record"));
          }
          if (grant->grantee_tenant != record.tenant_id) {
            absl::Status territory = CheckReadTerritory(record, grant->grantee_tenant);
            if (territory.code() == absl::StatusCode::kFailedPrecondition) {
              entry.reason = absl::StrCat("TERRITORY_NOT_PERMITTED:", which);
              return Deny<Opened>(txn, entry, absl::PermissionDeniedError(territory.message()));
            }
            RETURN_IF_ERROR(territory);
          }
          entry.reason = absl::StrCat("PERMITTED: ", bytes, which);
          one[0].grants.push_back(*grant);
          grantee = caller;
          holds = consent_holds(record, consent::Purpose::kRecordSharing, grant->granted_by);
        }
        absl::StatusOr<SecretKey> key = OpenRecordKey(txn, record, rows[0]);
        absl::Status opened = key.ok() ? OpenSealedMetadata(*key, one[0]) : key.status();
        if (opened.code() == absl::StatusCode::kDataLoss) {
          log::Error("record_damaged", {{"record", record.record_id}, {"error", opened.message()}});
        }
        RETURN_IF_ERROR(opened);
        // Audited before the first byte leaves, for the full size.
        RETURN_IF_ERROR(audit::Append(txn, entry).status());
        return Done(Opened{std::move(one[0]), *std::move(key), std::move(grantee),
                           std::move(holds)});
      })));
  return std::unique_ptr<Download>(new PgDownload(
      *this, *pool, std::move(opened.record), std::move(opened.key), std::move(opened.grantee),
      std::move(opened.consent_holds), std::move(slot)));
}

absl::StatusOr<RecordInfo> SharingCore::ArchiveRecord(const CallContext& ctx,
                                                      const std::string& record_id,
                                                      absl::Time retain_until) {
  RETURN_IF_ERROR(ValidateIdentifier(record_id, "record_id", kMaxIdBytes));
  const absl::Time now = Now();
  if (retain_until <= now) return absl::InvalidArgumentError("retain_until: must be in the future");
  if (retain_until > now + kMaxRetention) {
    return absl::InvalidArgumentError("retain_until: at most 100 years ahead");
  }
  ASSIGN_OR_RETURN(pg::Pool * pool, ShardOf(record_id, "record"));
  return ResultOf(pool->TransactValue<Outcome<RecordInfo>>(
      [&](pqxx::work& txn) -> absl::StatusOr<Outcome<RecordInfo>> {
    std::optional<RecordInfo> record = SelectRecord(txn, sql::kSelectRecordForUpdate, record_id);
    if (!record || record->tenant_id != ctx.principal.tenant) return RecordNotFound(record_id);
    if (record->owner != ctx.principal.spiffe_id) {
      return Deny<RecordInfo>(txn,
                              AuditEntryFor(ctx, audit::Action::kUpdate, "record", record_id,
                                            record->tenant_id, record->patient_id, "NOT_OWNER"),
                              absl::PermissionDeniedError("only the record's owner may archive it"));
    }
    // Archiving keeps the record for the patient's care (and answers with its metadata): only
    // while CARE permits its owner, as reading it does. An owner whose CARE was withdrawn could
    // otherwise hold the record past any erasure by the tenant for up to a century.
    ASSIGN_OR_RETURN(consent::AccessDecision care,
                     consent_.Check(record_id.substr(0, record_id.find('.')), record->patient_id,
                                    consent::Purpose::kCare, ctx.principal.spiffe_id,
                                    DataCategoryOf(record->kind), now));
    if (!care.permit) {
      audit::Entry entry =
          AuditEntryFor(ctx, audit::Action::kUpdate, "record", record_id, record->tenant_id,
                        record->patient_id, std::string(consent::AccessReasonName(care.reason)));
      CiteConsent(entry, care, consent::Purpose::kCare);
      return Deny<RecordInfo>(txn, entry,
                              ConsentRefusal(care, "archiving this record", consent::Purpose::kCare));
    }
    // A retention end only moves later: an earlier one would let the record be erased before the
    // retention it was archived under.
    if (record->state == RecordState::kArchived && record->retain_until &&
        retain_until < *record->retain_until) {
      return absl::FailedPreconditionError(absl::StrCat(
          "record '", record_id, "' is archived until ", Rfc3339(*record->retain_until),
          "; its retention end can be moved later, not earlier"));
    }
    txn.exec_prepared0(sql::kArchiveRecord, record_id, PgTime(retain_until));
    audit::Entry archived =
        AuditEntryFor(ctx, audit::Action::kUpdate, "record", record_id, record->tenant_id,
                      record->patient_id, absl::StrCat("ARCHIVED: until=", Rfc3339(retain_until)));
    CiteConsent(archived, care, consent::Purpose::kCare);
    RETURN_IF_ERROR(audit::Append(txn, archived).status());
    const pqxx::result rows = txn.exec_prepared(sql::kSelectRecordWithKey, record_id);
    std::vector<RecordInfo> one = {RecordFromRow(rows.at(0))};
    AttachGrants(txn, one, ctx.principal.spiffe_id, now);
    ASSIGN_OR_RETURN(SecretKey key, OpenRecordKey(txn, one[0], rows[0]));
    RETURN_IF_ERROR(OpenSealedMetadata(key, one[0]));
    return Done(std::move(one[0]));
  }));
}

absl::StatusOr<absl::Time> SharingCore::EraseRecord(const CallContext& ctx,
                                                    const std::string& record_id,
                                                    const std::string& reason) {
  RETURN_IF_ERROR(ValidateIdentifier(record_id, "record_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxReasonBytes));
  ASSIGN_OR_RETURN(pg::Pool * pool, ShardOf(record_id, "record"));
  const std::string region = record_id.substr(0, record_id.find('.'));
  const absl::Time now = Now();
  std::vector<std::string> retired;
  std::string patient_id;
  absl::StatusOr<absl::Time> erased = ResultOf(pool->TransactValue<Outcome<absl::Time>>(
      [&](pqxx::work& txn) -> absl::StatusOr<Outcome<absl::Time>> {
    retired.clear();
    std::optional<RecordInfo> record = SelectRecord(txn, sql::kSelectRecordForUpdate, record_id);
    if (!record || record->tenant_id != ctx.principal.tenant) return RecordNotFound(record_id);
    // Refusals are audited: who tried to erase a patient's record, and why they could not.
    auto refuse = [&](absl::string_view reason, absl::Status status) {
      return Deny<absl::Time>(txn,
                              AuditEntryFor(ctx, audit::Action::kDelete, "record", record_id,
                                            record->tenant_id, record->patient_id,
                                            std::string(reason)),
                              std::move(status));
    };
    if (ctx.principal.kind != PrincipalKind::kApp && record->owner != ctx.principal.spiffe_id) {
      return refuse("NOT_OWNER", absl::PermissionDeniedError(
                                     "only the record's owner or an app of its tenant may erase it"));
    }
    if (record->state == RecordState::kArchived && *record->retain_until > now) {
      return refuse(
          absl::StrCat("ARCHIVED_UNTIL: ", Rfc3339(*record->retain_until)),
          absl::FailedPreconditionError(absl::StrCat(
              "record '", record_id, "' is archived until ", Rfc3339(*record->retain_until),
              " and cannot be erased before its retention end; only the erasure of all of the "
              "patient's records (ErasePatientRecords, GDPR art. 17) erases it earlier")));
    }
    // Crypto-shredding: the record key goes, and the patient key it was wrapped under is
    // retired (its other records rewrapped under a new one), to be destroyed in the key vault
    // once this commits. The ciphertext left behind, here and in backups, no longer opens; the
    // purge removes the chunk rows later.
    patient_id = record->patient_id;
    RETURN_IF_ERROR(ShredRecordKey(txn, region, *record, retired));
    txn.exec_prepared0(sql::kDeleteRecord, record_id);
    RETURN_IF_ERROR(audit::Append(txn, AuditEntryFor(ctx, audit::Action::kDelete, "record", record_id,
                                                record->tenant_id, record->patient_id,
                                                absl::StrCat("ERASED: ", reason)))
                        .status());
    return Done(now);
  }));
  AfterRecordErasure(*pool, region, patient_id, retired, erased.ok());
  return erased;
}

absl::StatusOr<PatientErasure> SharingCore::ErasePatientRecords(const CallContext& ctx,
                                                                const std::string& patient_id,
                                                                const std::string& reason) {
  RETURN_IF_ERROR(ValidateIdentifier(patient_id, "patient_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxReasonBytes));
  ASSIGN_OR_RETURN(const PatientHome home, HomeOfCallersPatient(ctx, patient_id));
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  const absl::Time now = Now();
  // Forgotten before and after: an upload finishing meanwhile may have cached the key again.
  patient_keys_.Forget(patient_id);
  absl::Cleanup forget = [&] { patient_keys_.Forget(patient_id); };
  std::vector<std::string> retired;
  absl::StatusOr<PatientErasure> erased = pool->TransactValue<PatientErasure>(
      [&](pqxx::work& txn) -> absl::StatusOr<PatientErasure> {
        retired.clear();
        // The records first, as an erasure of one of them takes its row before the key: a
        // patient erasure holding the key while it waited for such a record would deadlock
        // with it.
        txn.exec_prepared(sql::kLockPatientRecords, patient_id);
        // The patient's current key, locked until this commits, so that no upload stores under it
        // meanwhile. An erasure of one of the records that committed while this waited for the
        // lock has replaced the key it waited for (the lock then finds no row); the next
        // statement sees the new key, which is locked in turn. Without that, an upload could
        // store under the new key between here and the deletion below, which would not see its
        // record but would destroy its key: an acknowledged record lost.
        for (int attempt = 0;; ++attempt) {
          if (!txn.exec_prepared(sql::kLockPatientKey, patient_id).empty()) break;
          if (txn.exec_prepared(sql::kSelectPatientKey, patient_id).empty()) break;  // none
          if (attempt == 2) {
            return absl::AbortedError(
                "the patient's key was replaced by other erasures while this one waited; retry");
          }
        }
        // One statement deletes the records and every key row and queues the patient keys, so
        // they see the same rows: a record an upload committed while this erasure waited for the
        // key is among them, one committed after it is left whole, never without its key. Every
        // record erased gets its entry (the ids come from the deletion itself); the patient keys
        // are destroyed in the key vault once this commits, so what was wrapped under them no
        // longer opens, here or in the shard's backups.
        std::vector<std::string> ids;
        for (const pqxx::row& row : txn.exec_prepared(sql::kDeletePatientRecords, patient_id)) {
          (std::string_view(row[0].c_str()) == "record" ? ids : retired).push_back(row[1].c_str());
        }
        // In one statement: the region's chain head is locked once, not for a round trip per
        // record erased (every audited write of the region waits for it meanwhile).
        std::vector<audit::Entry> entries;
        entries.reserve(ids.size() + 1);
        for (const std::string& id : ids) {
          entries.push_back(AuditEntryFor(ctx, audit::Action::kDelete, "record", id,
                                          home.tenant_id, patient_id,
                                          absl::StrCat("PATIENT_ERASURE: ", reason)));
        }
        entries.push_back(AuditEntryFor(ctx, audit::Action::kDelete, "patient_records", patient_id,
                                        home.tenant_id, patient_id,
                                        absl::StrCat("PATIENT_ERASURE: erased=", ids.size(),
                                                     " reason=", reason)));
        RETURN_IF_ERROR(audit::AppendMany(txn, entries).status());
        return PatientErasure{ids.size(), now};
      },
      options_.patient_erasure_timeout);  // its statements' bound, not the pool's
  if (erased.ok()) DestroyRetiredKeys(*pool, home.region_id, retired);
  return erased;
}

absl::StatusOr<int64_t> SharingCore::PatientKeysInShardNotUnder(const std::string& region,
                                                                const std::string& kek_id) {
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(region));
  return pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
    return txn.exec_prepared1(sql::kCountPatientKeysInShardNotUnder, kek_id)[0].as<int64_t>();
  });
}

absl::StatusOr<SweepResult> SharingCore::SweepRetention(int batch) {
  if (batch < 1) return absl::InvalidArgumentError("batch: at least 1");
  SweepResult result;
  absl::Status first_error;
  const absl::Time now = Now();
  CallContext ctx;
  ctx.principal.kind = PrincipalKind::kService;
  ctx.principal.spiffe_id = options_.service_identity;
  ctx.request_id = "retention-sweep";
  ctx.origin = "sharing";
  for (const std::string& region : shards_.RegionIds()) {
    pg::Pool* pool = *shards_.Get(region);
    std::pair<absl::Time, std::string> archives_after{absl::InfinitePast(), ""};
    {
      std::lock_guard<std::mutex> lock(retention_mu_);
      if (auto it = retention_after_.find(region); it != retention_after_.end()) {
        archives_after = it->second;
      }
    }
    struct Expired {
      std::string record_id;
      absl::Time retain_until;
      std::string patient_id;
    };
    absl::StatusOr<std::vector<Expired>> expired = pool->TransactValue<std::vector<Expired>>(
        [&](pqxx::work& txn) -> absl::StatusOr<std::vector<Expired>> {
          std::vector<Expired> page;
          for (const pqxx::row& row :
               txn.exec_prepared(sql::kSelectExpiredArchives, PgTime(now), batch,
                                 archives_after.first == absl::InfinitePast()
                                     ? std::string("-infinity")
                                     : PgTime(archives_after.first),
                                 archives_after.second)) {
            page.push_back(Expired{row[0].c_str(), TimeOf(row[1]), row[2].c_str()});
          }
          return page;
        });
    // The region's other work (purges, key destructions still owed) goes on without the expired
    // archives of this call: a region whose archives cannot be listed must not also keep keys
    // erasures retired.
    const bool listed = expired.ok();
    if (!listed) {
      if (first_error.ok()) first_error = expired.status();
      expired = std::vector<Expired>{};
    }
    if (listed) {
      // A full page: the next call goes on past it. A short one reached the end: the next call
      // starts again from the first, trying again what failed.
      std::lock_guard<std::mutex> lock(retention_mu_);
      if (!expired->empty() && expired->size() == static_cast<size_t>(batch)) {
        retention_after_[region] = {expired->back().retain_until, expired->back().record_id};
      } else {
        retention_after_.erase(region);
      }
    }
    if (expired->size() == static_cast<size_t>(batch)) result.more = true;
    // A patient's expired archives are erased together, in one transaction that gives the
    // patient's other records one new key: erased one by one, each erasure would rewrap all the
    // others again (a patient's archives often share their retention end). A group whose
    // transaction fails is tried again one record at a time, so that a record whose erasure fails
    // does not hold back the patient's others.
    // The patients in the order the sweep took their first archive, each one's in that order.
    std::vector<std::pair<std::string, std::vector<std::string>>> by_patient;
    for (const Expired& e : *expired) {
      auto it = std::find_if(by_patient.begin(), by_patient.end(),
                             [&](const auto& group) { return group.first == e.patient_id; });
      if (it == by_patient.end()) it = by_patient.insert(by_patient.end(), {e.patient_id, {}});
      it->second.push_back(e.record_id);
    }
    // `ids` (one patient's) in one transaction, their rows locked in record id order (the order a
    // patient erasure locks them in); how many it erased (those still archived and expired) in
    // `erased_count`.
    auto erase = [&](std::vector<std::string> ids, int& erased_count) {
      std::sort(ids.begin(), ids.end());
      std::vector<std::string> retired;
      std::string patient_id;
      absl::Status erased = pool->Transact([&](pqxx::work& txn) -> absl::Status {
        retired.clear();
        patient_id.clear();
        erased_count = 0;
        std::vector<RecordInfo> records;
        for (const std::string& id : ids) {
          std::optional<RecordInfo> record = SelectRecord(txn, sql::kSelectRecordForUpdate, id);
          if (!record || record->state != RecordState::kArchived || *record->retain_until > now) {
            continue;  // erased or re-archived meanwhile
          }
          records.push_back(*std::move(record));
        }
        if (records.empty()) return absl::OkStatus();
        patient_id = records[0].patient_id;
        std::vector<std::string> shredded;
        for (const RecordInfo& record : records) shredded.push_back(record.record_id);
        RETURN_IF_ERROR(ShredRecordKeys(txn, region, patient_id, shredded, retired));
        for (const RecordInfo& record : records) {
          txn.exec_prepared0(sql::kDeleteRecord, record.record_id);
          RETURN_IF_ERROR(audit::Append(txn, AuditEntryFor(ctx, audit::Action::kDelete, "record",
                                                           record.record_id, record.tenant_id,
                                                           record.patient_id,
                                                           absl::StrCat("RETENTION_END: until=",
                                                                        Rfc3339(*record.retain_until))))
                              .status());
        }
        erased_count = static_cast<int>(records.size());
        return absl::OkStatus();
      });
      AfterRecordErasure(*pool, region, patient_id, retired, erased.ok());
      if (!erased.ok()) erased_count = 0;
      return erased;
    };
    for (const auto& [patient, ids] : by_patient) {
      int erased_count = 0;
      if (ids.size() > 1 && erase(ids, erased_count).ok()) {
        result.erased_records += erased_count;
        continue;
      }
      for (const std::string& id : ids) {
        absl::Status erased = erase({id}, erased_count);
        if (!erased.ok()) {
          ++result.failed_records;
          if (result.first_failure.ok()) result.first_failure = erased;
          if (result.failed_record_ids.size() < 10) result.failed_record_ids.push_back(id);
        } else {
          result.erased_records += erased_count;
        }
      }
    }
    // Upload request ids past the time a retry can come.
    absl::StatusOr<int64_t> forgotten =
        pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
          return txn.exec_prepared1(sql::kPurgeRecordRequests, PgTime(now - kRecordRequestRetention),
                                    batch)[0]
              .as<int64_t>();
        });
    if (forgotten.ok()) {
      result.forgotten_request_ids += *forgotten;
      if (*forgotten == batch) result.more = true;
    } else if (first_error.ok()) {
      first_error = forgotten.status();
    }
    absl::StatusOr<int64_t> purged =
        pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
          const int64_t deleted =
              txn.exec_prepared1(sql::kPurgeOrphanChunks, batch)[0].as<int64_t>();
          txn.exec_prepared0(sql::kDequeuePurgedRecords);
          return deleted;
        });
    if (purged.ok()) {
      result.purged_chunks += *purged;
      if (*purged == batch) result.more = true;
    } else if (first_error.ok()) {
      first_error = purged.status();
    }

    // Page by record id past records that cannot be sealed (they stay in clear and are logged),
    // so that however many there are they never hide the ones after them; at most `batch`
    // records are sealed per sweep.
    int sealed = 0;
    std::string after;
    while (true) {
      absl::StatusOr<SealPage> page = SealMetadataInClear(*pool, batch, after);
      if (!page.ok()) {
        if (first_error.ok()) first_error = page.status();
        break;
      }
      sealed += page->sealed;
      if (page->selected < batch) break;
      if (sealed >= batch) {
        result.more = true;
        break;
      }
      after = page->last_record_id;
    }
    result.sealed_metadata += sealed;
    if (absl::Status keys = SweepKeys(*pool, region, batch, result);
        !keys.ok() && first_error.ok()) {
      first_error = keys;
    }
  }
  result.first_error = first_error;
  return result;
}

absl::StatusOr<int64_t> SharingCore::FoldTenantUsage() {
  std::lock_guard<std::mutex> fold(fold_mu_);
  int64_t total = 0;
  absl::Status first_error;
  for (const std::string& region : shards_.RegionIds()) {
    pg::Pool* pool = *shards_.Get(region);
    std::map<std::string, int64_t> usage;
    absl::StatusOr<int64_t> folded =
        pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
          usage.clear();
          const int64_t changes = txn.exec_prepared1(sql::kFoldTenantUsage)[0].as<int64_t>();
          for (const pqxx::row& row : txn.exec_prepared(sql::kAllTenantsUsage)) {
            usage[row[0].c_str()] = row[1].as<int64_t>();
          }
          return changes;
        });
    if (folded.ok()) {
      total += *folded;
      std::lock_guard<std::mutex> lock(usage_mu_);
      usage_by_region_[region] = std::move(usage);
    } else if (first_error.ok()) {
      first_error = folded.status();
    }
  }
  if (!first_error.ok()) return first_error;
  return total;
}

absl::Status SharingCore::SweepKeys(pg::Pool& shard, const std::string& region, int batch,
                                    SweepResult& result) {
  // Keys erasures retired whose destruction in the vault did not happen with the erasure.
  ASSIGN_OR_RETURN(std::vector<std::string> queued,
                   shard.TransactValue<std::vector<std::string>>(
                       [&](pqxx::work& txn) -> absl::StatusOr<std::vector<std::string>> {
                         std::vector<std::string> ids;
                         for (const pqxx::row& row :
                              txn.exec_prepared(sql::kSelectKeyDestructions, batch)) {
                           ids.push_back(row[0].c_str());
                         }
                         return ids;
                       }));
  if (!queued.empty()) {
    RETURN_IF_ERROR(vault_.Destroy(region, queued));
    RETURN_IF_ERROR(shard.Transact([&](pqxx::work& txn) {
      txn.exec_prepared0(sql::kDeleteKeyDestructions, pg::TextArrayLiteral(queued));
      return absl::OkStatus();
    }));
    result.destroyed_keys += static_cast<int>(queued.size());
    if (queued.size() == static_cast<size_t>(batch)) result.more = true;
  }

  // Keys the vault holds that the shard was not yet seen to use: confirmed if it does; deleted
  // if it does not after the grace period (their transaction did not commit).
  ASSIGN_OR_RETURN(std::vector<std::string> unconfirmed,
                   vault_.Unconfirmed(region, options_.unused_vault_key_grace, batch));
  if (!unconfirmed.empty()) {
    ASSIGN_OR_RETURN(std::vector<std::string> in_use,
                     shard.TransactValue<std::vector<std::string>>(
                         [&](pqxx::work& txn) -> absl::StatusOr<std::vector<std::string>> {
                           std::vector<std::string> ids;
                           for (const pqxx::row& row :
                                txn.exec_prepared(sql::kSelectPatientKeysInUse,
                                                  pg::TextArrayLiteral(unconfirmed))) {
                             ids.push_back(row[0].c_str());
                           }
                           return ids;
                         }));
    std::vector<std::string> unused;
    for (const std::string& id : unconfirmed) {
      if (std::find(in_use.begin(), in_use.end(), id) == in_use.end()) unused.push_back(id);
    }
    RETURN_IF_ERROR(vault_.Confirm(region, in_use));
    RETURN_IF_ERROR(vault_.Destroy(region, unused));
    result.destroyed_keys += static_cast<int>(unused.size());
    if (unconfirmed.size() == static_cast<size_t>(batch)) result.more = true;
  }

  // Patient keys written before the vault move into it: the vault first, then the shard forgets
  // the wrapped key (a backup taken before still holds it: README, "Erasure and backups"). A key
  // of a KEK this process is not given, or that does not unwrap, stays in the shard, logged and
  // passed: it must not hold up the others.
  std::string after;
  while (true) {
    const std::string start = after;
    int fetched = 0;
    int skipped = 0;
    ASSIGN_OR_RETURN(int moved, shard.TransactValue<int>([&](pqxx::work& txn) -> absl::StatusOr<int> {
      int n = 0;
      fetched = 0;
      skipped = 0;
      after = start;  // again from there if the pool runs this again
      for (const pqxx::row& row : txn.exec_prepared(sql::kSelectPatientKeysInShard, batch, start)) {
        ++fetched;
        const std::string key_id = row[0].c_str();
        after = key_id;
        absl::Status put = vault_.PutWrapped(region, row[1].c_str(), key_id, row[2].c_str(),
                                             BytesOf(row[3]));
        if (put.code() == absl::StatusCode::kFailedPrecondition ||
            put.code() == absl::StatusCode::kDataLoss) {
          log::Warning("patient_key_move_skipped",
                       {{"region", region}, {"key_id", key_id}, {"error", put.message()}});
          ++skipped;
          continue;
        }
        RETURN_IF_ERROR(put);
        txn.exec_prepared0(sql::kMarkPatientKeyInVault, key_id);
        ++n;
      }
      return n;
    }));
    result.moved_keys += moved;
    result.unmovable_keys += skipped;
    if (fetched < batch) break;
  }
  return absl::OkStatus();
}

}  // namespace medgate::sharing
