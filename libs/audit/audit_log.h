// The append-only, hash-chained audit log kept in every database (control and each shard).
#ifndef MEDGATE_LIBS_AUDIT_AUDIT_LOG_H_
#define MEDGATE_LIBS_AUDIT_AUDIT_LOG_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>
#include <string_view>
#include <utility>

#include <pqxx/pqxx>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace medgate::audit {

enum class Action { kCreate, kRead, kUpdate, kDelete, kExecute };
enum class Decision { kPermit, kDeny };

absl::string_view ActionName(Action action);
absl::string_view DecisionName(Decision decision);

// What happened. No health values: only identities, object ids and outcomes.
struct Entry {
  std::string actor;        // SPIFFE id of the caller
  std::string tenant;       // tenant of the caller or of the object ("" for ops/service work)
  Action action = Action::kRead;
  std::string object_type;  // e.g. "patient", "consent", "record"
  std::string object_id;
  std::string patient_id;   // pseudonym, "" when no patient is concerned
  Decision decision = Decision::kPermit;
  std::string reason;
  std::string purpose;      // purpose of use the decision was made for, "" when none
  std::string consent_id;   // the consent the decision rests on, "" when none
  int64_t consent_version = 0;
  std::string request_id;
  std::string origin;       // peer address
};

// An entry as stored: with its position in the chain.
struct StoredEntry {
  int64_t seq = 0;
  int64_t at_us = 0;  // microseconds since the Unix epoch, UTC
  Entry entry;
  std::string prev_hash;  // 32 raw bytes
  std::string hash;       // 32 raw bytes
};

// The bytes hashed for an entry: a versioned, length-prefixed encoding of every field.
std::string CanonicalEncoding(int64_t seq, int64_t at_us, const Entry& entry);
// The canonical encoding of an entry in the two parts around its seq and time, which only the
// chain head decides: CanonicalEncoding(seq, at_us, e) == head || seq || at_us || tail (each
// number 8 bytes, big-endian). Shards chain entries in SQL with these (audit_append(), shard
// migration 0005), so that a change and its audit entry can travel in one statement.
struct EncodedEntry {
  std::string head;
  std::string tail;
};
EncodedEntry EncodeEntry(const Entry& entry);

// SHA-256(prev_hash || canonical encoding).
std::string ChainHash(absl::string_view prev_hash, int64_t seq, int64_t at_us, const Entry& entry);

std::string ToHex(absl::string_view bytes);

// Calls `exec(args..., p1, ..., p15)` with p1..p15 the entry as the 15 parameters of the
// databases' audit_append() function, in its order (shard migration 0005, control migration
// 0003). A statement whose first parameters are `args` can so chain its audit entry in the same
// round trip, e.g. "WITH change AS (...) SELECT audit_append($n, ..., $n+14) FROM change".
template <typename Exec, typename... Args>
decltype(auto) WithEntryParams(const Entry& e, Exec&& exec, const Args&... args) {
  const EncodedEntry encoded = EncodeEntry(e);
  return std::forward<Exec>(exec)(
      args..., e.actor, e.tenant, std::string(ActionName(e.action)), e.object_type, e.object_id,
      e.patient_id, std::string(DecisionName(e.decision)), e.reason, e.purpose, e.consent_id,
      e.consent_version, e.request_id, e.origin, pqxx::binarystring(encoded.head),
      pqxx::binarystring(encoded.tail));
}

// Appends `entry` in the caller's transaction: the change and its audit entry commit or fail
// together. Every entry is chained by the database's audit_append(), on the database's clock, so
// entry times never go backwards along the chain whichever service wrote them. Appends serialize
// on the chain head row, so concurrent writers never fork the chain; append last in a
// transaction to hold that lock briefly. Returns the new sequence number.
absl::StatusOr<int64_t> Append(pqxx::work& txn, const Entry& entry);

// audit_append_many()'s 15 arguments for `entries`: text-array literals whose element i is entry
// i's field as the database stores it (text up to a NUL), each to be cast to the type of the same
// index in kAppendManyArgTypes. What AppendMany sends as parameters, and what a caller building
// the statement's text (the ingest writer, which pipelines it with its COMMIT) quotes.
inline constexpr int kAppendManyArgs = 15;
inline constexpr const char* kAppendManyArgTypes[kAppendManyArgs] = {
    "text[]", "text[]", "text[]", "text[]", "text[]", "text[]",  "text[]",  "text[]",
    "text[]", "text[]", "bigint[]", "text[]", "text[]", "bytea[]", "bytea[]"};
std::vector<std::string> AppendManyArgs(const std::vector<Entry>& entries);

// Appends `entries`, in their order, in the caller's transaction with one call of a shard's
// audit_append_many() (shard migration 0009): the chain head is locked once, for one statement,
// where Append would hold it from the first entry's round trip to the commit. Shard databases only
// (the control database has audit_append alone). Returns the last entry's seq; 0 for no entries.
absl::StatusOr<int64_t> AppendMany(pqxx::work& txn, const std::vector<Entry>& entries);

// The fields of an entry read from columns first..first+12 of `row`: actor, tenant, action,
// object_type, object_id, patient_id, decision, reason, purpose, consent_id, consent_version,
// request_id, origin, as the log's readers select them. DATA_LOSS naming an action or decision no
// entry may hold (a row altered in the database).
absl::StatusOr<Entry> EntryFromColumns(const pqxx::row& row, int first);

// What is wrong with the first entry a walk stops at.
enum class ChainFault {
  kNone,
  kMissing,     // the entry is not in the log (removed)
  kMalformed,   // a column cannot be read (hash, action, decision)
  kPrevHash,    // its prev_hash is not the previous entry's hash (moved, or the first rewritten)
  kAltered,     // its content does not match its hash
  kHeadBehind,  // the chain head names a later last entry than the log has (entries removed)
  kHeadHash,    // the chain head's hash is not the last entry's (rewritten with its hash redone)
  kPastHead,    // chained entries follow the one the head names as last
};

struct VerifyResult {
  bool ok = true;
  ChainFault fault = ChainFault::kNone;
  int64_t entries_checked = 0;
  int64_t first_bad_seq = 0;  // 0 when ok
  std::string problem;        // what was wrong with that entry
  int64_t last_seq = 0;       // the last entry checked (the first bad one when not ok)
  std::string last_hash;      // when ok: the hash the walk computed for last_seq (empty: none)
};

// Walks the chain from the first entry and names the first entry that does not verify
// (altered fields, broken link, missing entry, or a head that does not match the last entry).
absl::StatusOr<VerifyResult> VerifyChain(pqxx::connection_base& connection);

// The same for entries first_seq..last_seq only: the walk starts from the stored hash of entry
// first_seq - 1 (trusted, as the anchor of the range), and checks the chain head only when
// last_seq is 0 (up to the last entry). first_seq <= 1 starts at the first entry.
// INVALID_ARGUMENT, saying which bound is wrong, when the range is empty or outside the log.
// `cancelled`, when given, is asked between pages of entries: once it answers true the walk stops
// with CANCELLED (its caller gone, its server draining), however long the log. Each page is read in
// a short snapshot of its own (no transaction stays open between pages); an unranged walk follows
// the head to the one its last page's snapshot shows, and checks the head there.
absl::StatusOr<VerifyResult> VerifyChainRange(pqxx::connection_base& connection, int64_t first_seq,
                                              int64_t last_seq,
                                              const std::function<bool()>& cancelled = nullptr);

}  // namespace medgate::audit

#endif  // MEDGATE_LIBS_AUDIT_AUDIT_LOG_H_
