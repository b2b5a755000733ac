// The Audit service's logic.
#include "services/sharing/audit_core.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/pg/pg_status.h"
#include "services/sharing/sql.h"

namespace medgate::sharing {
namespace {

constexpr absl::string_view kTerritoryRefusal = "TERRITORY_NOT_PERMITTED: grantee=";

// Cuts a share's territory refusal to the grantee it names; any other reason is left whole.
// Whether it cut anything.
bool WithholdGranteeTerritories(std::string& reason) {
  if (!absl::StartsWith(reason, kTerritoryRefusal)) return false;
  const size_t why = reason.find(" (", kTerritoryRefusal.size());
  if (why == std::string::npos) return false;
  reason.resize(why);
  return true;
}

constexpr size_t kMaxReasonCodeBytes = 64;
constexpr size_t kMaxActorBytes = 512;
constexpr size_t kMaxPatientIdBytes = 64;  // as every other call's patient_id
constexpr size_t kMaxRegionIdBytes = 64;

std::string LogName(const AuditLogRef& log) { return log.control ? "control" : log.region_id; }

absl::StatusOr<audit::StoredEntry> EntryFromRow(const pqxx::row& row) {
  audit::StoredEntry s;
  s.seq = row[0].as<int64_t>();
  s.at_us = row[1].as<int64_t>();
  ASSIGN_OR_RETURN(s.entry, audit::EntryFromColumns(row, 2));
  s.prev_hash = pqxx::binarystring(row[15]).str();
  s.hash = pqxx::binarystring(row[16]).str();
  return s;
}

int64_t MicrosOrBound(absl::Time t) {
  if (t == absl::InfinitePast()) return std::numeric_limits<int64_t>::min();
  if (t == absl::InfiniteFuture()) return std::numeric_limits<int64_t>::max();
  return absl::ToUnixMicros(t);
}

// Why the anchor's entry no longer has the anchor's hash ("" when it has).
std::string AnchorProblem(pqxx::transaction_base& txn, const ChainAnchor& anchor) {
  pqxx::result rows = txn.exec_prepared(sql::kSelectAuditHash, anchor.seq);
  if (rows.empty()) {
    return absl::StrCat("entry ", anchor.seq, ", the anchor's, is not in the log: it was cut "
                        "short after the anchor was taken");
  }
  if (pqxx::binarystring(rows[0][0]).str() != anchor.hash) {
    return absl::StrCat("entry ", anchor.seq, " does not have the anchor's hash: the log was "
                        "rewritten up to it after the anchor was taken");
  }
  return "";
}

void FailOnAnchor(ChainReport& report, std::string problem, const ChainAnchor& anchor) {
  if (problem.empty()) return;
  report.ok = false;
  report.first_bad_seq = anchor.seq;
  report.fault = ChainFault::kAnchorMismatch;
  report.detail = std::move(problem);
}

constexpr absl::string_view kAnchorPrefix = "ANCHOR: seq=";
constexpr absl::string_view kAnchorHashField = " hash=";
constexpr absl::string_view kAnchorRebased = " REBASED: ";

}  // namespace

std::string AnchorReason(const ChainAnchor& anchor, absl::string_view rebased) {
  std::string reason =
      absl::StrCat(kAnchorPrefix, anchor.seq, kAnchorHashField, audit::ToHex(anchor.hash));
  if (!rebased.empty()) absl::StrAppend(&reason, kAnchorRebased, rebased);
  return reason;
}

std::optional<ChainAnchor> ParseAnchorReason(absl::string_view reason) {
  if (!absl::ConsumePrefix(&reason, kAnchorPrefix)) return std::nullopt;
  const size_t hash_at = reason.find(kAnchorHashField);
  if (hash_at == absl::string_view::npos) return std::nullopt;
  // Exactly as AnchorReason writes it: digits alone, no sign, space or leading zero.
  const absl::string_view seq = reason.substr(0, hash_at);
  ChainAnchor anchor;
  if (seq.empty() || seq[0] == '0' ||
      !std::all_of(seq.begin(), seq.end(),
                   [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); }) ||
      !absl::SimpleAtoi(seq, &anchor.seq)) {
    return std::nullopt;
  }
  const size_t hex_at = hash_at + kAnchorHashField.size();
  const absl::string_view hex = reason.substr(hex_at, 64);
  const absl::string_view rest = reason.substr(std::min(reason.size(), hex_at + 64));
  if (hex.size() != 64 || (!rest.empty() && !absl::StartsWith(rest, kAnchorRebased)) ||
      !std::all_of(hex.begin(), hex.end(), [](char c) {
        return absl::ascii_isdigit(static_cast<unsigned char>(c)) || (c >= 'a' && c <= 'f');
      })) {
    return std::nullopt;
  }
  anchor.hash = absl::HexStringToBytes(hex);
  return anchor;
}

ChainFault FaultOf(const audit::VerifyResult& result) {
  switch (result.fault) {
    case audit::ChainFault::kNone:
      return ChainFault::kNone;
    case audit::ChainFault::kMissing:
    case audit::ChainFault::kHeadBehind:
      return ChainFault::kSeqGap;
    case audit::ChainFault::kMalformed:
      return ChainFault::kMalformed;
    case audit::ChainFault::kPrevHash:
      return result.first_bad_seq == 1 ? ChainFault::kBadGenesis : ChainFault::kPrevHashMismatch;
    // The head's hash is not the last entry's, at the same seq: that entry was rewritten with its
    // hash recomputed (or the head altered).
    case audit::ChainFault::kAltered:
    case audit::ChainFault::kHeadHash:
      return ChainFault::kHashMismatch;
    case audit::ChainFault::kPastHead:
      return ChainFault::kPastHead;
  }
  return ChainFault::kMalformed;
}

std::pair<std::string, std::string> SplitReason(absl::string_view reason) {
  size_t end = 0;
  while (end < reason.size() &&
         ((reason[end] >= 'A' && reason[end] <= 'Z') ||
          (reason[end] >= '0' && reason[end] <= '9') || reason[end] == '_')) {
    ++end;
  }
  const bool code = end > 0 && end <= kMaxReasonCodeBytes && reason[0] >= 'A' && reason[0] <= 'Z';
  if (code && end == reason.size()) return {std::string(reason), ""};
  if (code && reason[end] == ':') {
    absl::string_view rest = reason.substr(end + 1);
    if (!rest.empty() && rest[0] == ' ') rest.remove_prefix(1);
    return {std::string(reason.substr(0, end)), std::string(rest)};
  }
  return {"", std::string(reason)};
}

AuditCore::AuditCore(pg::Pool& control, const pg::ShardSet& shards, PatientDirectory& directory,
                     consent::ConsentCache& consent, int64_t max_scanned_per_page,
                     absl::Duration report_statement_timeout)
    : control_(control),
      shards_(shards),
      directory_(directory),
      consent_(consent),
      max_scanned_(max_scanned_per_page),
      // 0 would be no bound at all in PostgreSQL's statement_timeout.
      report_statement_timeout_(std::max(report_statement_timeout, absl::Milliseconds(1))) {}

absl::StatusOr<pg::Pool*> AuditCore::PoolOf(const AuditLogRef& log) const {
  if (log.control) return &control_;
  RETURN_IF_ERROR(ValidateIdentifier(log.region_id, "log.region_id", kMaxRegionIdBytes));
  absl::StatusOr<pg::Pool*> pool = shards_.Get(log.region_id);
  if (!pool.ok()) {
    return absl::NotFoundError(
        absl::StrCat("log.region_id: region '", log.region_id, "' is not configured"));
  }
  return pool;
}

absl::StatusOr<AuditPage> AuditCore::Query(const CallContext& ctx, const AuditQuery& query) {
  if (query.page_size < 1) return absl::InvalidArgumentError("page_size: must be positive");
  const int size = query.page_size;
  // Entries come in (at_us, seq) order: the log's order, unless the database's clock was set
  // back. A page token is the seq of the page's last entry (as when the order was seq alone, so
  // that servers of either version continue each other's pages); the query goes on after that
  // entry's (at_us, seq). After a '.', the token carries the listing's end: the database's clock
  // when its first page was read. Entries written later, among them each page's own read entry,
  // are left to the next query: without that end, pages of one entry never ran out, each page
  // adding the entry the next one listed.
  const absl::Status bad_token = absl::InvalidArgumentError(
      "page_token: not a token from an earlier QueryAudit response; query from the first page");
  int64_t after_seq = 0;
  std::optional<int64_t> listing_end;
  if (!query.page_token.empty()) {
    const std::vector<absl::string_view> parts = absl::StrSplit(query.page_token, '.');
    int64_t end = 0;
    if (parts.size() > 2 || !absl::SimpleAtoi(parts[0], &after_seq) || after_seq < 1 ||
        (parts.size() == 2 && !absl::SimpleAtoi(parts[1], &end))) {
      return bad_token;
    }
    if (parts.size() == 2) listing_end = end;
  }
  if (query.start >= query.end) {
    return absl::InvalidArgumentError("time_range: end_at must be after start_at");
  }
  if (!query.actor.empty()) RETURN_IF_ERROR(ValidateText(query.actor, "actor", kMaxActorBytes));
  const bool ops = ctx.principal.kind == PrincipalKind::kOps;
  if (!ops && query.log) return absl::PermissionDeniedError("only ops may read a whole audit log");

  pg::Pool* pool = nullptr;
  AuditLogRef log;
  std::string tenant;
  // The identities of the caller's own tenant.
  const std::string own_actors = absl::StrCat("spiffe://", ctx.principal.trust_domain, "/tenant/",
                                              ctx.principal.tenant, "/");
  if (!query.patient_id.empty()) {
    ASSIGN_OR_RETURN(const PatientHome home, HomeOf(ctx, query.patient_id));
    log.region_id = home.region_id;
    tenant = home.tenant_id;
    // Ops may read the patient's entries of the control log too, which holds their placement
    // and device assignments. Another region's log holds none, and the read's own entry, which
    // names the patient, would be written there: nothing about a patient is stored outside its
    // home shard (and the directory).
    if (query.log) {
      if (!query.log->control && query.log->region_id != home.region_id) {
        return absl::InvalidArgumentError(absl::StrCat(
            "log: patient '", query.patient_id, "' has entries only in its home region's log ('",
            home.region_id, "') and in the control log; ask one of those, or leave log unset"));
      }
      log = *query.log;
    }
    RETURN_IF_ERROR(MayReadTrail(ctx, home, query.patient_id, "audit_log", LogName(log)));
  } else if (!ops) {
    return absl::InvalidArgumentError("patient_id: required");
  } else if (!query.log) {
    return absl::InvalidArgumentError("patient_id or log: one is required");
  } else {
    log = *query.log;
  }
  ASSIGN_OR_RETURN(pool, PoolOf(log));

  return pool->TransactValue<AuditPage>([&](pqxx::work& txn) -> absl::StatusOr<AuditPage> {
    // The scan starts at its lower bound: the later of the range's start and the token's entry.
    const int64_t start_us = MicrosOrBound(query.start);
    int64_t after_at = start_us;
    int64_t after = 0;  // every seq is above: (at_us, seq) > (start, 0) is at_us >= start
    if (after_seq > 0) {
      // The token's entry, in the log and (for a patient's entries) the patient's.
      pqxx::result at = txn.exec_prepared(sql::kSelectAuditTime, after_seq, query.patient_id);
      if (at.empty()) return bad_token;
      if (const int64_t token_at = at[0][0].as<int64_t>(); token_at >= start_us) {
        after_at = token_at;
        after = after_seq;
      }
    }
    // Without an actor every entry read is returned; with one, at most max_scanned_per_page
    // entries of the range are read, and a page may come back short, or empty, with a token.
    int64_t end_us = MicrosOrBound(query.end);
    if (!listing_end) {
      listing_end = txn.exec_prepared1(sql::kSelectAuditClock)[0].as<int64_t>();
    }
    end_us = std::min(end_us, *listing_end);
    const int64_t scan = query.actor.empty() ? size + 1 : std::max<int64_t>(max_scanned_, size + 1);
    pqxx::result rows =
        query.patient_id.empty()
            ? txn.exec_prepared(sql::kSelectAuditLog, after_at, after, end_us, query.actor,
                                size + 1, scan)
            : txn.exec_prepared(sql::kSelectAuditForPatient, query.patient_id, after_at, after,
                                end_us, query.actor, size + 1, scan);
    AuditPage page;
    int64_t scanned = 0;
    int64_t last_scanned = 0;
    for (const pqxx::row& row : rows) {
      scanned = row[17].as<int64_t>();
      if (!row[18].is_null()) last_scanned = row[18].as<int64_t>();
      if (row[0].is_null()) continue;  // no entry matched: the scan's figures only
      if (page.entries.size() == static_cast<size_t>(size)) {
        page.next_page_token = absl::StrCat(page.entries.back().seq, ".", *listing_end);
        break;
      }
      ASSIGN_OR_RETURN(audit::StoredEntry entry, EntryFromRow(row));
      // A tenant's callers see who of another tenant (a grantee, ops) read the patient's data,
      // not that person's network address: personal data of another organization's staff. Ops
      // see every entry whole.
      bool withheld = false;
      if (!ops && !absl::StartsWith(entry.entry.actor, own_actors) && !entry.entry.origin.empty()) {
        entry.entry.origin.clear();
        withheld = true;
      }
      // Nor which territories another tenant serves, which a share refused by the patient's
      // residency rule records for ops ("TERRITORY_NOT_PERMITTED: grantee=ID (why)"): the sharer
      // was not told either.
      if (!ops) withheld = WithholdGranteeTerritories(entry.entry.reason) || withheld;
      // Nor the hashes of an entry withheld in part: they cover what was withheld, which trying
      // candidates against them would give back (a territory among a few hundred, an address in
      // a known network). Such an entry is checked by VerifyChain, ops', not by the caller.
      if (withheld) {
        entry.prev_hash.clear();
        entry.hash.clear();
      }
      page.entries.push_back(std::move(entry));
    }
    // An entry's prev_hash is the hash of the entry before it, which may be one withheld in part
    // (on this page, another, or in an entry the caller cannot see): a tenant's caller gets it
    // only where that entry is on this page and given whole, so it learns no hash it was not
    // given with its entry. Seq 1's is 32 zero bytes.
    if (!ops) {
      absl::flat_hash_set<int64_t> given_whole;  // entries given with their hash
      for (const audit::StoredEntry& entry : page.entries) {
        if (!entry.hash.empty()) given_whole.insert(entry.seq);
      }
      for (audit::StoredEntry& entry : page.entries) {
        if (entry.seq > 1 && !given_whole.contains(entry.seq - 1)) entry.prev_hash.clear();
      }
    }
    if (page.next_page_token.empty() && !query.actor.empty() && scanned == scan) {
      // The scan stopped at its bound, maybe before the range's end: the next page goes on after
      // the last entry it read, matching or not.
      page.next_page_token = absl::StrCat(last_scanned, ".", *listing_end);
    }
    // Reading the audit log is itself an access to the patient's data trail.
    audit::Entry e;
    e.actor = ctx.principal.spiffe_id;
    e.tenant = tenant;
    e.action = audit::Action::kRead;
    e.object_type = "audit_log";
    e.object_id = LogName(log);
    e.patient_id = query.patient_id;
    e.decision = audit::Decision::kPermit;
    e.reason = absl::StrCat("PERMITTED: entries=", page.entries.size());
    e.request_id = ctx.request_id;
    e.origin = ctx.origin;
    RETURN_IF_ERROR(audit::Append(txn, e).status());
    return page;
  });
}

absl::StatusOr<PatientHome> AuditCore::HomeOf(const CallContext& ctx,
                                              const std::string& patient_id) {
  RETURN_IF_ERROR(ValidateIdentifier(patient_id, "patient_id", kMaxPatientIdBytes));
  absl::StatusOr<PatientHome> home = directory_.Resolve(patient_id);
  if (!home.ok() && home.status().code() != absl::StatusCode::kNotFound) return home.status();
  if (!home.ok() ||
      (ctx.principal.kind != PrincipalKind::kOps && home->tenant_id != ctx.principal.tenant)) {
    return absl::NotFoundError(absl::StrCat("patient '", patient_id, "' not found"));
  }
  return home;
}

absl::Status AuditCore::MayReadTrail(const CallContext& ctx, const PatientHome& home,
                                     const std::string& patient_id,
                                     absl::string_view object_type,
                                     const std::string& object_id) {
  if (ctx.principal.kind != PrincipalKind::kPractitioner) return absl::OkStatus();
  // Of no category in particular: a consent narrowed to some covers only uses of those.
  ASSIGN_OR_RETURN(const consent::AccessDecision care,
                   consent_.Check(home.region_id, patient_id, consent::Purpose::kCare,
                                  ctx.principal.spiffe_id, "", absl::Now()));
  if (care.permit) return absl::OkStatus();
  audit::Entry e;
  e.actor = ctx.principal.spiffe_id;
  e.tenant = home.tenant_id;
  e.action = audit::Action::kRead;
  e.object_type = std::string(object_type);
  e.object_id = object_id;
  e.patient_id = patient_id;
  e.decision = audit::Decision::kDeny;
  e.purpose = std::string(consent::PurposeName(consent::Purpose::kCare));
  e.consent_id = care.consent_id;
  e.consent_version = care.consent_version;
  e.reason = std::string(consent::AccessReasonName(care.reason));
  e.request_id = ctx.request_id;
  e.origin = ctx.origin;
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  RETURN_IF_ERROR(pool->Transact([&](pqxx::work& txn) { return audit::Append(txn, e).status(); }));
  return absl::PermissionDeniedError(absl::StrCat(
      "reading this patient's audit trail: the patient's CARE consent does not permit it (",
      consent::AccessReasonName(care.reason),
      "); a practitioner reads it under a CARE consent covering every data category, the "
      "tenant's apps for the patient"));
}

absl::StatusOr<PatientReport> AuditCore::Report(const CallContext& ctx,
                                                const std::string& patient_id,
                                                const std::function<bool()>& cancelled) {
  ASSIGN_OR_RETURN(const PatientHome home, HomeOf(ctx, patient_id));
  RETURN_IF_ERROR(MayReadTrail(ctx, home, patient_id, "patient_report", patient_id));
  // A report holds a home shard connection for as long as its statement runs: a tenant's
  // reports in progress are bounded (ops' share one place).
  std::unique_ptr<BoundedCounts<std::string>::Slot> place =
      reports_.TryTake(ctx.principal.tenant, kMaxReportsPerTenant);
  if (place == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a tenant runs at most ", kMaxReportsPerTenant,
        " data reports at once; retry when one of them has ended"));
  }
  ASSIGN_OR_RETURN(pg::Pool * pool, shards_.Get(home.region_id));
  auto gave_up = [&] { return cancelled != nullptr && cancelled(); };
  const absl::Status cancelled_status =
      absl::CancelledError("the data report was cancelled; nothing was audited");

  PatientReport report;
  report.home = home;
  // The other shards first, outside the home shard's transaction, which stays short. They are
  // only read: an entry naming the patient is written in its home shard alone. They are asked at
  // once, a thread each (a country's cluster has a few regions), so that a region that does not
  // answer costs the report its own wait, not the sum of them all.
  if (gave_up()) return cancelled_status;
  for (const std::string& region : shards_.RegionIds()) {
    if (region != home.region_id) report.other_regions.emplace_back().region_id = region;
  }
  {
    std::vector<std::thread> asking;
    asking.reserve(report.other_regions.size());
    for (RegionRows& held : report.other_regions) {
      asking.emplace_back([this, &held, &patient_id] {
        absl::StatusOr<pg::Pool*> other = shards_.Get(held.region_id);
        absl::Status asked = other.status();
        if (asked.ok()) {
          asked = (*other)->Transact([&](pqxx::work& txn) {
            held.rows = txn.exec_prepared1(sql::kCountPatientRows, patient_id)[0].as<int64_t>();
            return absl::OkStatus();
          });
        }
        if (!asked.ok()) {
          // The cause (hosts, ports) is for ops' logs, not for a tenant's caller.
          log::Warning("patient_report_region_unavailable",
                       {{"region", held.region_id}, {"error", asked.ToString()}});
          held.rows = 0;
          held.unavailable = absl::StrCat(absl::StatusCodeToString(asked.code()),
                                          ": the region's shard did not answer; ask again later");
        }
      });
    }
    for (std::thread& t : asking) t.join();
  }
  int64_t rows_elsewhere = 0;
  std::vector<std::string> unanswered;
  for (const RegionRows& held : report.other_regions) {
    rows_elsewhere += held.rows;
    if (!held.unavailable.empty()) unanswered.push_back(held.region_id);
  }
  if (rows_elsewhere > 0) {
    // Residency broken: a fault ops must hear of. The log names the report's request, whose
    // entry in the home shard names the patient; not the patient.
    log::Warning("patient_data_outside_home_region",
                 {{"request_id", ctx.request_id}, {"home_region", home.region_id},
                  {"rows", rows_elsewhere}});
  }
  if (gave_up()) return cancelled_status;

  static constexpr absl::string_view kKinds[] = {"vitals", "records", "share_grants", "consents",
                                                 "audit_entries"};
  // Years of a monitored patient's samples and entries take seconds to count: more than the
  // pool's bound for a statement, less than report_statement_timeout_, this transaction's.
  absl::Status counted = pool->Transact([&](pqxx::work& txn) -> absl::Status {
    report.stored.clear();
    report.accessors.clear();
    report.accessors_left_out = 0;
    StoredCount entries{"audit_entries"};
    for (const pqxx::row& row :
         txn.exec_prepared(sql::kSelectPatientReport, patient_id, kMaxReportedAccessors)) {
      const std::string kind = row[0].as<std::string>();
      auto number = [&](int column) { return row[column].is_null() ? 0 : row[column].as<int64_t>(); };
      if (kind == "as_of") {
        report.as_of_us = number(5);
      } else if (kind == "accessor") {
        Accessor& a = report.accessors.emplace_back();
        a.actor = row[1].as<std::string>();
        a.reads = number(2);
        a.writes = number(3);
        a.denied = number(4);
        a.first_us = number(5);
        a.last_us = number(6);
        // Of every actor's entries, on each row alike.
        report.accessors_left_out = number(7);
        entries.count = number(8);  // a sum: numeric, whole
        entries.first_us = number(9);
        entries.last_us = number(10);
      } else {
        report.stored.push_back(StoredCount{kind, number(2), number(5), number(6)});
      }
    }
    report.accessors_left_out -= static_cast<int64_t>(report.accessors.size());
    report.stored.push_back(entries);
    // UNION ALL keeps no order the SQL standard promises: the report's order is set here.
    std::sort(report.accessors.begin(), report.accessors.end(),
              [](const Accessor& a, const Accessor& b) {
                return a.last_us != b.last_us ? a.last_us > b.last_us : a.actor < b.actor;
              });
    std::sort(report.stored.begin(), report.stored.end(),
              [](const StoredCount& a, const StoredCount& b) {
                auto rank = [](const std::string& kind) {
                  return std::find(std::begin(kKinds), std::end(kKinds), kind) - std::begin(kKinds);
                };
                return rank(a.kind) < rank(b.kind);
              });
    // The report is an access to the patient's data trail: audited in the home shard, counts
    // only (no health values).
    std::string reason = "PERMITTED:";
    for (const StoredCount& stored : report.stored) {
      absl::StrAppend(&reason, " ", stored.kind, "=", stored.count);
    }
    absl::StrAppend(&reason, " accessors=", report.accessors.size() + report.accessors_left_out,
                    " rows_elsewhere=", rows_elsewhere);
    // How many regions did not answer, not which: the entry is read back by the patient's
    // tenant (QueryAudit), and which regions a cluster has is not a tenant's to see. Ops have
    // their names in the log.
    if (!unanswered.empty()) {
      absl::StrAppend(&reason, " unanswered=", unanswered.size());
      log::Warning("patient_report_regions_unanswered",
                   {{"request_id", ctx.request_id}, {"home_region", home.region_id},
                    {"regions", absl::StrJoin(unanswered, ",")}});
    }
    audit::Entry e;
    e.actor = ctx.principal.spiffe_id;
    e.tenant = home.tenant_id;
    e.action = audit::Action::kRead;
    e.object_type = "patient_report";
    e.object_id = patient_id;
    e.patient_id = patient_id;
    e.decision = audit::Decision::kPermit;
    e.reason = std::move(reason);
    e.request_id = ctx.request_id;
    e.origin = ctx.origin;
    return audit::Append(txn, e).status();
  }, report_statement_timeout_);
  if (counted.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the report's statement in the patient's home region ", home.region_id,
        " was cancelled; its bound is ", absl::FormatDuration(report_statement_timeout_),
        " (the shard is busy, or the history very long); nothing was audited, ask again later (",
        counted.message(), ")"));
  }
  RETURN_IF_ERROR(counted);
  return report;
}

absl::StatusOr<ChainReport> AuditCore::Verify(const CallContext& ctx, const AuditLogRef& log,
                                              uint64_t start_seq, uint64_t end_seq,
                                              const ChainAnchor& anchor,
                                              const std::function<bool()>& cancelled) {
  if (!log.control && log.region_id.empty()) {
    return absl::InvalidArgumentError("log: region_id or control is required");
  }
  constexpr uint64_t kMaxSeq = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  if (anchor.seq < 0) return absl::InvalidArgumentError(absl::StrCat("anchor_seq: at most ", kMaxSeq));
  if (anchor.seq == 0 && !anchor.hash.empty()) {
    // Verified without it, the log's end would go unchecked while the caller trusts it was.
    return absl::InvalidArgumentError(
        "anchor_hash without anchor_seq: give the seq of the entry the hash is of");
  }
  if (anchor.seq > 0 && anchor.hash.size() != 32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "anchor_hash: 32 bytes (a last_hash of an earlier verification) with anchor_seq ",
        anchor.seq, ", got ", anchor.hash.size()));
  }
  if (start_seq > kMaxSeq || end_seq > kMaxSeq) {
    return absl::InvalidArgumentError(
        absl::StrCat(start_seq > kMaxSeq ? "start_seq" : "end_seq", ": at most ", kMaxSeq));
  }
  if (anchor.seq > 0) {
    const uint64_t anchor_seq = static_cast<uint64_t>(anchor.seq);
    if (start_seq > anchor_seq + 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "start_seq ", start_seq, " is after anchor_seq ", anchor_seq, " + 1: the entries between "
          "them would be trusted unchecked; start at most at ", anchor_seq + 1));
    }
    if (end_seq != 0 && end_seq < anchor_seq) {
      return absl::InvalidArgumentError(absl::StrCat(
          "end_seq ", end_seq, " is before anchor_seq ", anchor_seq,
          ": the range must contain the anchor's entry; end at ", anchor_seq,
          " or later, or 0 for the last entry"));
    }
  }
  const bool ranged = start_seq > 1 || end_seq != 0;
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(log));
  // Walks sent again and again (a schedule, its retries) must not take every connection of the
  // log's database, which uploads and downloads need too.
  const std::unique_ptr<BoundedCounts<std::string>::Slot> walking =
      walks_.TryTake(LogName(log), kMaxChainWalksPerLog);
  if (walking == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a walk of log '", LogName(log), "' is already running on this server (",
        kMaxChainWalksPerLog, " at a time: each holds one of the log's database connections for "
        "as long as it reads); retry when it ends"));
  }
  // The latest anchors of the log recorded elsewhere whose entry the range covers (a walk that
  // starts after one would trust the entries in between unchecked, one that ends before it says
  // nothing of the end).
  RecordedAnchors recorded = LatestRecordedAnchors(log);
  std::vector<RecordedAnchor> applied;
  for (RecordedAnchor& r : recorded.anchors) {
    const uint64_t seq = static_cast<uint64_t>(r.anchor.seq);
    if (start_seq <= seq + 1 && (end_seq == 0 || end_seq >= seq)) applied.push_back(std::move(r));
  }
  // Reported: the highest.
  const RecordedAnchor* reported =
      applied.empty() ? nullptr
                      : &*absl::c_max_element(applied, [](const RecordedAnchor& a,
                                                          const RecordedAnchor& b) {
                          return a.anchor.seq < b.anchor.seq;
                        });
  // The anchor given, then those recorded elsewhere.
  auto check_anchors = [&](pqxx::transaction_base& txn, ChainReport& report) {
    if (anchor.seq > 0) FailOnAnchor(report, AnchorProblem(txn, anchor), anchor);
    for (const RecordedAnchor& r : applied) {
      if (!report.ok) return;
      std::string problem = AnchorProblem(txn, r.anchor);
      if (!problem.empty()) {
        absl::StrAppend(&problem, " (the anchor recorded in log ", r.in_log, ")");
      }
      FailOnAnchor(report, std::move(problem), r.anchor);
    }
  };
  // Every walk that read the log is audited, concluded or not: ops read a log's entries either way.
  auto entry_for = [&](std::string reason) {
    audit::Entry e;
    e.actor = ctx.principal.spiffe_id;
    e.action = audit::Action::kExecute;
    e.object_type = "audit_log";
    e.object_id = LogName(log);
    e.decision = audit::Decision::kPermit;
    e.reason = std::move(reason);
    if (anchor.seq > 0) absl::StrAppend(&e.reason, " anchor_seq=", anchor.seq);
    if (reported != nullptr) {
      absl::StrAppend(&e.reason, " recorded_anchor_seq=", reported->anchor.seq,
                      " recorded_anchor_log=", reported->in_log);
    }
    if (ranged) {
      absl::StrAppend(&e.reason, " start_seq=", std::max<uint64_t>(start_seq, 1),
                      " end_seq=", end_seq);
    }
    e.request_id = ctx.request_id;
    e.origin = ctx.origin;
    return e;
  };
  ChainReport report;
  if (reported != nullptr) {
    report.recorded_anchor_seq = reported->anchor.seq;
    report.recorded_anchor_log = reported->in_log;
  }
  report.recorded_anchor_unavailable = recorded.unavailable;
  {
    ASSIGN_OR_RETURN(pg::Lease lease, pool->Acquire());
    absl::StatusOr<audit::VerifyResult> verified =
        audit::VerifyChainRange(lease.connection(), static_cast<int64_t>(start_seq),
                                static_cast<int64_t>(end_seq), cancelled);
    if (!verified.ok() && verified.status().code() != absl::StatusCode::kInvalidArgument) {
      // Cancelled (the caller gone, the server draining), or the database failed mid-walk.
      const absl::Status walk = verified.status();
      const audit::Entry not_concluded =
          entry_for(absl::StrCat("NOT_CONCLUDED: ", absl::StatusCodeToString(walk.code())));
      absl::Status audited;
      if (walk.code() == absl::StatusCode::kUnavailable) {
        // The walk's connection failed: another one writes the entry.
        lease.MarkBroken();
        audited = pool->Transact(
            [&](pqxx::work& txn) { return audit::Append(txn, not_concluded).status(); });
      } else {
        // On the walk's own connection: waiting for another one while holding this could wait
        // out the acquire timeout when every connection is held by walks ending together.
        try {
          pqxx::work txn(lease.connection());
          audited = audit::Append(txn, not_concluded).status();
          if (audited.ok()) txn.commit();
        } catch (const std::exception& e) {
          lease.MarkBroken();
          audited = pg::StatusFromException(e);
        }
      }
      if (!audited.ok()) {
        log::Warning("verify_chain_not_audited",
                     {{"log", LogName(log)}, {"walk", walk.message()}, {"error", audited.message()}});
      }
      return walk;
    }
    if (!verified.ok()) {
      // A range past the log's end: against an anchor the log no longer reaches, that is the
      // log cut short (the anchor's fault), not the caller's mistake.
      try {
        pqxx::nontransaction q(lease.connection());
        check_anchors(q, report);
      } catch (const std::exception& e) {
        return pg::StatusFromException(e);
      }
      if (report.ok) {
        return absl::InvalidArgumentError(
            absl::StrCat("log ", LogName(log), ": ", verified.status().message()));
      }
    } else {
      report.ok = verified->ok;
      report.first_bad_seq = verified->first_bad_seq;
      report.detail = TruncateUtf8(verified->problem, 1024);
      report.fault = FaultOf(*verified);
      // The bad entry was checked too, when there was one to read (not a missing entry, nor a
      // head that disagrees with the last entry read).
      const audit::ChainFault f = verified->fault;
      const bool bad_entry_read = f == audit::ChainFault::kMalformed ||
                                  f == audit::ChainFault::kPrevHash ||
                                  f == audit::ChainFault::kAltered;
      report.entries_checked = verified->entries_checked + (bad_entry_read ? 1 : 0);
      report.last_seq = verified->last_seq;
      // The hash the walk computed and checked, not one read again afterwards: a tail rewritten
      // in between must not be handed out as an anchor.
      report.last_hash = verified->last_hash;
    }
  }
  return pool->TransactValue<ChainReport>([&](pqxx::work& txn) -> absl::StatusOr<ChainReport> {
    ChainReport out = report;
    if (!out.ok && out.last_seq > 0) {
      // The first bad entry's stored hash, as it is (what the walk did not accept).
      pqxx::result rows = txn.exec_prepared(sql::kSelectAuditHash, out.last_seq);
      if (!rows.empty()) out.last_hash = pqxx::binarystring(rows[0][0]).str();
    }
    // The chain links every entry to the one before; only a hash kept outside the database shows
    // a log cut short (its head moved back) or rewritten with its hashes recomputed.
    if (out.ok) check_anchors(txn, out);
    RETURN_IF_ERROR(
        audit::Append(txn, entry_for(out.ok ? absl::StrCat("VERIFIED: entries=", out.entries_checked)
                                            : absl::StrCat("CHAIN_BROKEN: first_bad_seq=",
                                                           out.first_bad_seq)))
            .status());
    return out;
  });
}

namespace {

// A log's head, and how it stands against its last anchor.
struct LogState {
  ChainAnchor head;
  std::string problem;  // why the log no longer matches `previous` ("" when it does)
  bool moved = false;   // entries other than anchors after `previous` (any entry without one)
};

absl::StatusOr<LogState> ReadLogState(pg::Pool& log, const std::optional<ChainAnchor>& previous) {
  ASSIGN_OR_RETURN(pg::Lease lease, log.Acquire());
  try {
    // One snapshot: the head, and the entries the checks read, as of the same moment.
    pqxx::transaction<pqxx::repeatable_read, pqxx::read_only> q(lease.connection());
    LogState state;
    const pqxx::row row = q.exec_prepared1(sql::kSelectAuditHead);
    state.head.seq = row[0].as<int64_t>();
    state.head.hash = pqxx::binarystring(row[1]).str();
    if (previous) {
      state.problem = AnchorProblem(q, *previous);
      state.moved = state.problem.empty() &&
                    q.exec_prepared1(sql::kSelectEntriesBesideAnchorsAfter, previous->seq)[0]
                        .as<bool>();
    } else {
      state.moved = state.head.seq > 0;
    }
    q.commit();
    return state;
  } catch (const std::exception& e) {
    lease.MarkBroken();
    return pg::StatusFromException(e);
  }
}

}  // namespace

std::vector<std::pair<std::string, pg::Pool*>> AuditCore::AnchorHolders(
    const AuditLogRef& log, std::vector<std::string>* unavailable) {
  std::vector<std::pair<std::string, pg::Pool*>> holders;
  if (!log.control) {
    holders.emplace_back("control", &control_);
    return holders;
  }
  for (const std::string& region : shards_.RegionIds()) {
    absl::StatusOr<pg::Pool*> shard = shards_.Get(region);
    if (shard.ok()) {
      holders.emplace_back(region, *shard);
    } else {
      unavailable->push_back(absl::StrCat(region, ": ", shard.status().message()));
    }
  }
  return holders;
}

AuditCore::RecordedAnchors AuditCore::LatestRecordedAnchors(const AuditLogRef& log) {
  RecordedAnchors latest;
  const std::string name = LogName(log);
  std::vector<std::string> unavailable;
  for (const auto& [holder_name, holder] : AnchorHolders(log, &unavailable)) {
    const std::string& in = holder_name;
    absl::Status read = holder->Transact([&](pqxx::work& txn) -> absl::Status {
      pqxx::result rows = txn.exec_prepared(sql::kSelectLastAnchor, name);
      if (rows.empty()) return absl::OkStatus();
      std::optional<ChainAnchor> anchor = ParseAnchorReason(rows[0][1].c_str());
      if (!anchor) {
        return absl::DataLossError(absl::StrCat("entry ", rows[0][0].c_str(),
                                                " is an anchor whose reason does not parse"));
      }
      latest.anchors.push_back({*std::move(anchor), in});
      return absl::OkStatus();
    });
    if (!read.ok()) unavailable.push_back(absl::StrCat(holder_name, ": ", read.message()));
  }
  if (!unavailable.empty()) {
    latest.unavailable = absl::StrCat("log ", absl::StrJoin(unavailable, "; log "));
  }
  return latest;
}

absl::StatusOr<RebasedAnchor> AuditCore::RebaseAnchor(const CallContext& ctx,
                                                      const AuditLogRef& log,
                                                      const std::string& reason) {
  if (!log.control && log.region_id.empty()) {
    return absl::InvalidArgumentError("log: region_id or control is required");
  }
  RETURN_IF_ERROR(ValidateText(reason, "reason", kMaxRebaseReasonBytes));
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(log));
  const std::string name = LogName(log);
  RebasedAnchor rebased;
  audit::Entry e;
  e.actor = ctx.principal.spiffe_id;
  e.action = audit::Action::kExecute;
  e.object_type = kAnchorObjectType;
  e.object_id = name;
  e.decision = audit::Decision::kPermit;
  e.request_id = ctx.request_id;
  e.origin = ctx.origin;
  for (const auto& [holder_name, holder] : AnchorHolders(log, &rebased.unavailable)) {
    ChainAnchor head;
    absl::Status written = holder->Transact([&](pqxx::work& txn) -> absl::Status {
      // The head as of after any round recording this log's anchor here, not an older one.
      txn.exec_prepared(sql::kLockAnchorsOf, name);
      ASSIGN_OR_RETURN(const LogState state, ReadLogState(*pool, std::nullopt));
      if (state.head.seq == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("log ", name, " has no entry yet: there is no head to anchor"));
      }
      head = state.head;
      e.reason = AnchorReason(head, reason);
      return audit::Append(txn, e).status();
    });
    if (written.code() == absl::StatusCode::kFailedPrecondition) return written;
    if (written.ok()) {
      rebased.recorded_in.push_back(holder_name);
      if (head.seq > rebased.anchor.seq) rebased.anchor = head;
    } else {
      rebased.unavailable.push_back(absl::StrCat(holder_name, ": ", written.message()));
    }
  }
  if (rebased.recorded_in.empty()) {
    return absl::UnavailableError(absl::StrCat("the anchor of log ", name,
                                               " could be recorded in no log: ",
                                               absl::StrJoin(rebased.unavailable, "; ")));
  }
  log::Warning("audit_anchor_rebased", {{"log", name},
                                       {"seq", rebased.anchor.seq},
                                       {"by", ctx.principal.spiffe_id},
                                       {"recorded_in", absl::StrJoin(rebased.recorded_in, ",")}});
  return rebased;
}

absl::StatusOr<AuditCore::AnchorOutcome> AuditCore::RecordAnchor(pg::Pool& source,
                                                                 const std::string& source_name,
                                                                 pg::Pool& dest,
                                                                 const std::string& actor) {
  return dest.TransactValue<AnchorOutcome>([&](pqxx::work& txn) -> absl::StatusOr<AnchorOutcome> {
    // Two servers recording the same log's anchor here take turns: the second sees the first's.
    txn.exec_prepared(sql::kLockAnchorsOf, source_name);
    pqxx::result last = txn.exec_prepared(sql::kSelectLastAnchor, source_name);
    std::optional<ChainAnchor> previous;
    if (!last.empty()) {
      previous = ParseAnchorReason(last[0][1].c_str());
      if (!previous) {
        return absl::DataLossError(absl::StrCat("entry ", last[0][0].c_str(),
                                                " is an anchor of log ", source_name,
                                                " whose reason does not parse"));
      }
    }
    ASSIGN_OR_RETURN(const LogState state, ReadLogState(source, previous));
    audit::Entry e;
    e.actor = actor;
    e.action = audit::Action::kExecute;
    e.object_type = kAnchorObjectType;
    e.object_id = source_name;
    if (!state.problem.empty()) {
      // The latest anchor stays the one the log no longer matches, for VerifyChain to report.
      log::Error("audit_anchor_mismatch", {{"log", source_name}, {"problem", state.problem}});
      e.decision = audit::Decision::kDeny;
      e.reason = absl::StrCat("ANCHOR_MISMATCH: ", state.problem);
      // Once for each thing found wrong, not again at every round while it stays so.
      pqxx::result newest = txn.exec_prepared(sql::kSelectLastAnchorEntry, source_name);
      const bool refused_already = !newest.empty() &&
                                   std::string_view(newest[0][0].c_str()) == "deny" &&
                                   e.reason == newest[0][1].c_str();
      if (!refused_already) RETURN_IF_ERROR(audit::Append(txn, e).status());
      return AnchorOutcome::kMismatch;
    }
    if (!state.moved) return AnchorOutcome::kUnchanged;
    e.decision = audit::Decision::kPermit;
    e.reason = AnchorReason(state.head);
    RETURN_IF_ERROR(audit::Append(txn, e).status());
    return AnchorOutcome::kRecorded;
  });
}

AnchorRound AuditCore::RecordAnchors(const std::string& actor) {
  AnchorRound round;
  auto count = [&](const std::string& from, const std::string& to,
                   const absl::StatusOr<AnchorOutcome>& outcome) {
    if (!outcome.ok()) {
      round.failed.push_back(absl::StrCat(from, " -> ", to, ": ", outcome.status().message()));
      return;
    }
    switch (*outcome) {
      case AnchorOutcome::kRecorded:
        ++round.recorded;
        break;
      case AnchorOutcome::kUnchanged:
        ++round.unchanged;
        break;
      case AnchorOutcome::kMismatch:
        if (!absl::c_linear_search(round.mismatched, from)) round.mismatched.push_back(from);
        break;
    }
  };
  for (const std::string& region : shards_.RegionIds()) {
    absl::StatusOr<pg::Pool*> shard = shards_.Get(region);
    if (!shard.ok()) {
      round.failed.push_back(absl::StrCat(region, ": ", shard.status().message()));
      continue;
    }
    // The control log's head first: the shard's anchor recorded next covers that entry too.
    count("control", region, RecordAnchor(control_, "control", **shard, actor));
    count(region, "control", RecordAnchor(**shard, region, control_, actor));
  }
  return round;
}

}  // namespace medgate::sharing
