// The append-only, hash-chained audit log.
#include "libs/audit/audit_log.h"

#include <limits>
#include <optional>

#include <openssl/sha.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "libs/common/status_macros.h"
#include "libs/crypto/sha256.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/sql_array.h"

namespace medgate::audit {
namespace {

constexpr absl::string_view kEncodingVersion = "medgate-audit-v1";
constexpr int kVerifyPage = 2000;

void AppendU64(std::string& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xff));
}

void AppendField(std::string& out, absl::string_view field) {
  uint32_t n = static_cast<uint32_t>(field.size());
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((n >> shift) & 0xff));
  out.append(field.data(), field.size());
}

std::string ZeroHash() { return std::string(SHA256_DIGEST_LENGTH, '\0'); }

absl::StatusOr<std::string> FromByteaText(absl::string_view text) {
  if (!absl::StartsWith(text, "\\x")) return absl::DataLossError("audit hash is not hex bytea");
  return absl::HexStringToBytes(text.substr(2));
}

absl::StatusOr<Action> ParseAction(absl::string_view s) {
  for (Action a : {Action::kCreate, Action::kRead, Action::kUpdate, Action::kDelete, Action::kExecute}) {
    if (ActionName(a) == s) return a;
  }
  return absl::DataLossError(absl::StrCat("unknown audit action '", s, "'"));
}

absl::StatusOr<Decision> ParseDecision(absl::string_view s) {
  if (s == "permit") return Decision::kPermit;
  if (s == "deny") return Decision::kDeny;
  return absl::DataLossError(absl::StrCat("unknown audit decision '", s, "'"));
}

}  // namespace

absl::string_view ActionName(Action action) {
  switch (action) {
    case Action::kCreate: return "create";
    case Action::kRead: return "read";
    case Action::kUpdate: return "update";
    case Action::kDelete: return "delete";
    case Action::kExecute: return "execute";
  }
  return "execute";
}

absl::string_view DecisionName(Decision decision) {
  return decision == Decision::kPermit ? "permit" : "deny";
}

std::string ToHex(absl::string_view bytes) { return absl::BytesToHexString(bytes); }

// A text field as the database stores it: libpq passes text parameters (and escapes literals) up
// to their first NUL byte, and PostgreSQL text holds none. Encoding anything past it would hash
// bytes the entry does not hold, and the chain would fail to verify from that entry on.
absl::string_view AsStored(const std::string& field) { return absl::string_view(field.c_str()); }

EncodedEntry EncodeEntry(const Entry& e) {
  EncodedEntry out;
  AppendField(out.head, kEncodingVersion);
  out.tail.reserve(256);
  for (absl::string_view field : {AsStored(e.actor), AsStored(e.tenant), ActionName(e.action),
                                 AsStored(e.object_type), AsStored(e.object_id),
                                 AsStored(e.patient_id), DecisionName(e.decision),
                                 AsStored(e.reason), AsStored(e.purpose),
                                 AsStored(e.consent_id)}) {
    AppendField(out.tail, field);
  }
  AppendU64(out.tail, static_cast<uint64_t>(e.consent_version));
  AppendField(out.tail, AsStored(e.request_id));
  AppendField(out.tail, AsStored(e.origin));
  return out;
}

std::string CanonicalEncoding(int64_t seq, int64_t at_us, const Entry& e) {
  EncodedEntry parts = EncodeEntry(e);
  std::string out;
  out.reserve(parts.head.size() + 16 + parts.tail.size());
  out.append(parts.head);
  AppendU64(out, static_cast<uint64_t>(seq));
  AppendU64(out, static_cast<uint64_t>(at_us));
  out.append(parts.tail);
  return out;
}

std::string ChainHash(absl::string_view prev_hash, int64_t seq, int64_t at_us, const Entry& entry) {
  // crypto::Sha256 stops the process if OpenSSL fails: a digest that silently came out wrong
  // would read as an altered entry.
  crypto::Sha256 hash;
  hash.Update(prev_hash);
  hash.Update(CanonicalEncoding(seq, at_us, entry));
  return hash.Finish();
}

absl::StatusOr<int64_t> Append(pqxx::work& txn, const Entry& entry) {
  try {
    pqxx::row appended = WithEntryParams(entry, [&txn](const auto&... params) {
      return txn.exec_params1(
          "SELECT audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::bigint, $12, $13, "
          "$14::bytea, $15::bytea)",
          params...);
    });
    return appended[0].as<int64_t>();
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

std::vector<std::string> AppendManyArgs(const std::vector<Entry>& entries) {
  std::vector<std::string> columns[kAppendManyArgs];
  for (std::vector<std::string>& column : columns) column.reserve(entries.size());
  for (const Entry& e : entries) {
    const EncodedEntry encoded = EncodeEntry(e);
    std::string values[kAppendManyArgs] = {
        std::string(AsStored(e.actor)), std::string(AsStored(e.tenant)),
        std::string(ActionName(e.action)), std::string(AsStored(e.object_type)),
        std::string(AsStored(e.object_id)), std::string(AsStored(e.patient_id)),
        std::string(DecisionName(e.decision)), std::string(AsStored(e.reason)),
        std::string(AsStored(e.purpose)), std::string(AsStored(e.consent_id)),
        absl::StrCat(e.consent_version), std::string(AsStored(e.request_id)),
        std::string(AsStored(e.origin)), absl::StrCat("\\x", ToHex(encoded.head)),
        absl::StrCat("\\x", ToHex(encoded.tail))};
    for (int i = 0; i < kAppendManyArgs; ++i) columns[i].push_back(std::move(values[i]));
  }
  std::vector<std::string> args;
  args.reserve(kAppendManyArgs);
  for (const std::vector<std::string>& column : columns) args.push_back(pg::TextArrayLiteral(column));
  return args;
}

absl::StatusOr<int64_t> AppendMany(pqxx::work& txn, const std::vector<Entry>& entries) {
  if (entries.empty()) return 0;
  const std::vector<std::string> a = AppendManyArgs(entries);
  std::string call = "SELECT audit_append_many(";
  for (int i = 0; i < kAppendManyArgs; ++i) {
    absl::StrAppend(&call, i == 0 ? "" : ", ", "$", i + 1, "::", kAppendManyArgTypes[i]);
  }
  call += ")";
  try {
    pqxx::row appended = txn.exec_params1(call, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                                          a[8], a[9], a[10], a[11], a[12], a[13], a[14]);
    return appended[0].as<int64_t>();
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

absl::StatusOr<Entry> EntryFromColumns(const pqxx::row& row, int first) {
  Entry e;
  e.actor = row[first].c_str();
  e.tenant = row[first + 1].c_str();
  ASSIGN_OR_RETURN(e.action, ParseAction(row[first + 2].c_str()));
  e.object_type = row[first + 3].c_str();
  e.object_id = row[first + 4].c_str();
  e.patient_id = row[first + 5].c_str();
  ASSIGN_OR_RETURN(e.decision, ParseDecision(row[first + 6].c_str()));
  e.reason = row[first + 7].c_str();
  e.purpose = row[first + 8].c_str();
  e.consent_id = row[first + 9].c_str();
  e.consent_version = row[first + 10].as<int64_t>();
  e.request_id = row[first + 11].c_str();
  e.origin = row[first + 12].c_str();
  return e;
}

absl::StatusOr<VerifyResult> VerifyChain(pqxx::connection_base& connection) {
  return VerifyChainRange(connection, 1, 0);
}

absl::StatusOr<VerifyResult> VerifyChainRange(pqxx::connection_base& connection, int64_t first_seq,
                                              int64_t last_seq,
                                              const std::function<bool()>& cancelled) {
  if (first_seq < 1) first_seq = 1;
  if (last_seq < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("end_seq ", last_seq, " is negative; use 0 for up to the last entry"));
  }
  if (last_seq != 0 && last_seq < first_seq) {
    return absl::InvalidArgumentError(absl::StrCat("start_seq ", first_seq, " is after end_seq ",
                                                   last_seq, "; the range would be empty"));
  }
  VerifyResult result;
  auto fail = [&](int64_t seq, ChainFault fault, std::string problem) {
    result.ok = false;
    result.fault = fault;
    result.first_bad_seq = seq;
    result.last_seq = seq;
    result.last_hash.clear();
    result.problem = std::move(problem);
    return result;
  };
  std::string prev_hash = ZeroHash();
  int64_t expected_seq = first_seq;
  // Checks the entries of `rows` (in seq order) as the next of the chain: the fault of the first
  // that does not verify, or none.
  auto check = [&](const pqxx::result& rows) -> std::optional<VerifyResult> {
    for (const pqxx::row& row : rows) {
      int64_t seq = row[0].as<int64_t>();
      if (seq != expected_seq) {
        return fail(expected_seq, ChainFault::kMissing,
                    absl::StrCat("entry ", expected_seq, " is missing"));
      }
      absl::StatusOr<Entry> parsed = EntryFromColumns(row, 2);
      if (!parsed.ok()) {
        return fail(seq, ChainFault::kMalformed, std::string(parsed.status().message()));
      }
      const Entry& e = *parsed;
      absl::StatusOr<std::string> stored_prev = FromByteaText(row[15].c_str());
      absl::StatusOr<std::string> stored_hash = FromByteaText(row[16].c_str());
      if (!stored_prev.ok() || !stored_hash.ok()) {
        return fail(seq, ChainFault::kMalformed, "hash column is malformed");
      }
      if (*stored_prev != prev_hash) {
        return fail(seq, ChainFault::kPrevHash, "prev_hash does not match the previous entry's hash");
      }
      std::string hash = ChainHash(prev_hash, seq, row[1].as<int64_t>(), e);
      if (hash != *stored_hash) {
        return fail(seq, ChainFault::kAltered, "content does not match its hash (entry altered)");
      }
      prev_hash = hash;
      result.last_seq = seq;
      result.last_hash = hash;
      ++expected_seq;
      ++result.entries_checked;
    }
    return std::nullopt;
  };
  // The next page of entries from expected_seq up to `stop`.
  auto page = [&](pqxx::dbtransaction& txn, int64_t stop) {
    return txn.exec_params(
        "SELECT seq, at_us, actor, tenant, action, object_type, object_id, patient_id, "
        "decision, reason, purpose, consent_id, consent_version, request_id, origin, prev_hash, "
        "hash FROM audit_log WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        expected_seq, stop, kVerifyPage);
  };
  try {
    // Each page is read in a short snapshot of its own: one snapshot held for a whole walk of a
    // long log would keep every row version the appends leave behind meanwhile, the chain head's
    // among them, and slow every append of the walk's time. Entries up to the head a snapshot
    // shows are all committed, and nobody the walk trusts changes them, so a later snapshot reads
    // them as that one would. What must be read together is the end: the head, and the entries
    // up to it and past it, in the snapshot of the last page.
    {
      // A ranged request names entries the log must have, as far as its head says; its walk
      // starts from the stored hash of the entry before it.
      pqxx::transaction<pqxx::repeatable_read, pqxx::read_only> txn(connection);
      const int64_t head_seq = txn.exec1("SELECT seq FROM audit_head WHERE id")[0].as<int64_t>();
      if (first_seq > 1 || last_seq != 0) {
        if (first_seq > head_seq) {
          return absl::InvalidArgumentError(
              absl::StrCat("start_seq ", first_seq, " is past the log's last entry (", head_seq,
                           "); start at 1 to ", head_seq));
        }
        if (last_seq > head_seq) {
          return absl::InvalidArgumentError(
              absl::StrCat("end_seq ", last_seq, " is past the log's last entry (", head_seq,
                           "); use at most ", head_seq, ", or 0 for up to the last entry"));
        }
      }
      if (first_seq > 1) {
        pqxx::result anchor =
            txn.exec_params("SELECT hash FROM audit_log WHERE seq = $1", first_seq - 1);
        if (anchor.empty()) {
          return fail(first_seq - 1, ChainFault::kMissing,
                      absl::StrCat("entry ", first_seq - 1, " is missing (the anchor of the range)"));
        }
        absl::StatusOr<std::string> anchor_hash = FromByteaText(anchor[0][0].c_str());
        if (!anchor_hash.ok()) {
          return fail(first_seq - 1, ChainFault::kMalformed, "hash column is malformed");
        }
        prev_hash = *anchor_hash;
      }
      txn.commit();
    }
    while (true) {
      if (cancelled && cancelled()) {
        return absl::CancelledError(absl::StrCat(
            "the verification was cancelled after ", result.entries_checked,
            " entries, up to entry ", expected_seq - 1, "; nothing was concluded"));
      }
      pqxx::transaction<pqxx::repeatable_read, pqxx::read_only> txn(connection);
      pqxx::row head = txn.exec1("SELECT seq, hash FROM audit_head WHERE id");
      const int64_t head_seq = head[0].as<int64_t>();
      // Up to the range's end, or to the entry this snapshot's head names as last.
      const int64_t stop = last_seq != 0 ? last_seq : head_seq;
      bool full = false;
      if (expected_seq <= stop) {
        const pqxx::result rows = page(txn, stop);
        if (std::optional<VerifyResult> bad = check(rows)) return *bad;
        full = rows.size() == static_cast<size_t>(kVerifyPage);
      }
      if (full && expected_seq <= stop) {
        txn.commit();
        continue;
      }
      // The walk reached `stop`, or the log ended before it, in this snapshot.
      if (last_seq != 0) {
        // The head said the range exists: an entry of it that is not there was removed.
        if (expected_seq <= last_seq) {
          return fail(expected_seq, ChainFault::kMissing,
                      absl::StrCat("entry ", expected_seq, " is missing"));
        }
        return result;
      }
      // Chained entries after the head's last are walked too (the head moved back, or entries
      // appended without moving it), then named.
      if (expected_seq == head_seq + 1) {
        while (true) {
          const pqxx::result rows = page(txn, std::numeric_limits<int64_t>::max());
          if (std::optional<VerifyResult> bad = check(rows)) return *bad;
          if (rows.size() < static_cast<size_t>(kVerifyPage)) break;
        }
      }
      absl::StatusOr<std::string> head_hash = FromByteaText(head[1].c_str());
      if (head_seq < expected_seq - 1) {
        // Chained entries after the one the head names as last: the first of them is the fault,
        // the entries up to the head's (and that one) verified. (A range starting past the head's
        // entry was refused above.)
        VerifyResult past = fail(head_seq + 1, ChainFault::kPastHead, absl::StrCat(
            "entries ", head_seq + 1, " to ", expected_seq - 1, " follow entry ", head_seq,
            ", the last by the chain head (appended without moving the head, or the head moved "
            "back)"));
        past.entries_checked = head_seq - first_seq + 2;
        return past;
      }
      if (head_seq != expected_seq - 1) {
        return fail(expected_seq, ChainFault::kHeadBehind,
                    absl::StrCat("chain head says entry ", head_seq, " is last but the log ends at ",
                                 expected_seq - 1, " (entries removed or head altered)"));
      }
      if (!head_hash.ok() || *head_hash != prev_hash) {
        return fail(head_seq, ChainFault::kHeadHash,
                    absl::StrCat("the chain head's hash is not entry ", head_seq,
                                 "'s (the entry rewritten with its hash recomputed, or the head "
                                 "altered)"));
      }
      return result;
    }
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

}  // namespace medgate::audit
