// The routing logic: validation, placement through the residency engine, audited mutations.
#include "services/routing/routing_core.h"

#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <set>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "libs/audit/audit_log.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/pg/sql_array.h"
#include "libs/residency/territory.h"
#include "services/routing/sql.h"

namespace medgate::routing {
namespace {

absl::Time FromEpochSeconds(const pqxx::field& f) {
  return absl::FromUnixMicros(static_cast<int64_t>(std::llround(f.as<double>() * 1e6)));
}

std::string RandomKeyHex() {
  unsigned char key[32];
  // Without the CSPRNG the key would be stack bytes: nothing is safe to go on with.
  if (RAND_bytes(key, sizeof(key)) != 1) std::abort();
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(key), sizeof(key)));
}

absl::Status ValidateRef(absl::string_view ref) {
  if (ref.empty()) return absl::InvalidArgumentError("patient_ref: must not be empty");
  if (ref.size() > kMaxRefBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("patient_ref: at most ", kMaxRefBytes, " bytes, got ", ref.size()));
  }
  for (char c : ref) {
    if (static_cast<unsigned char>(c) < 0x20) {
      return absl::InvalidArgumentError("patient_ref: control characters are not allowed");
    }
  }
  return absl::OkStatus();
}

TenantInfo TenantFromRow(const pqxx::row& row) {
  TenantInfo t;
  t.tenant_id = row[0].c_str();
  t.display_name = row[1].c_str();
  t.territories = pg::ParseTextArray(row[2]);
  if (!row[3].is_null()) t.region_ids = pg::ParseTextArray(row[3]);
  t.active = row[4].as<bool>();
  t.created_at = FromEpochSeconds(row[6]);
  t.updated_at = FromEpochSeconds(row[7]);
  t.version = row[8].as<int64_t>();
  return t;
}

struct TenantRow {
  TenantInfo info;
  std::string key;  // raw bytes
};

// The calling tenant, which must be registered and active to act.
absl::StatusOr<TenantRow> LoadActiveTenant(pqxx::work& txn, const std::string& tenant_id) {
  pqxx::result rows = txn.exec_prepared(sql::kSelectTenant, tenant_id);
  // The same answers as the tenant gate's, which normally refuses such callers first.
  if (rows.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "tenant '", tenant_id, "' is not registered with medgate; ops must create it first"));
  }
  TenantRow t{TenantFromRow(rows[0]), ""};
  if (!t.info.active) {
    return absl::PermissionDeniedError(
        absl::StrCat("tenant '", tenant_id,
                     "' is suspended: its identities may not call medgate until ops reactivate it"));
  }
  t.key = absl::HexStringToBytes(rows[0][5].c_str());
  if (t.key.size() != 32) return absl::InternalError("tenant key is malformed");
  return t;
}

// Where counted patients live: a region's id, or a territory.
const std::string& PlaceOf(const RegionPatients& r) { return r.region_id; }
const std::string& PlaceOf(const TerritoryPatients& t) { return t.territory; }

// "region 'eu-1' (3 patients of FR live there), ..." for a refusal; `kind` names the places
// ("region", "territory"), `of` whose patients they are.
template <typename Counts>
std::string DescribeWherePatientsLive(const std::vector<Counts>& counts, absl::string_view kind,
                                      absl::string_view of) {
  return absl::StrJoin(counts, ", ", [kind, of](std::string* out, const Counts& c) {
    absl::StrAppend(out, kind, " '", PlaceOf(c), "' (", c.patients,
                    c.patients == 1 ? " patient of " : " patients of ", of,
                    c.patients == 1 ? " lives" : " live", " there)");
  });
}

// " KEY=eu-1:3,..." for the audit entry of a change that left patients where it no longer places
// any (the chain says who did, and how many), or "".
template <typename Counts>
std::string WherePatientsLiveReason(absl::string_view key, const std::vector<Counts>& counts) {
  if (counts.empty()) return "";
  return absl::StrCat(" ", key, "=", absl::StrJoin(counts, ",", [](std::string* out, const Counts& c) {
                        absl::StrAppend(out, PlaceOf(c), ":", c.patients);
                      }));
}

residency::TenantPolicy PolicyOf(const TenantInfo& t) {
  residency::TenantPolicy policy;
  policy.served_territories.insert(t.territories.begin(), t.territories.end());
  if (t.region_ids) {
    policy.allowed_regions = residency::RegionIdSet(t.region_ids->begin(), t.region_ids->end());
  }
  return policy;
}

std::vector<residency::ResidencyRule> ToEngineRules(const std::vector<RuleInfo>& rules) {
  std::vector<residency::ResidencyRule> out;
  for (const RuleInfo& r : rules) {
    residency::ResidencyRule e;
    e.territory = r.territory;
    e.allowed_regions = r.region_ids;
    e.readable_from.insert(r.readable_from.begin(), r.readable_from.end());
    e.version = r.version;
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<RuleInfo> CurrentRules(pqxx::work& txn) {
  std::vector<RuleInfo> rules;
  for (const pqxx::row& row : txn.exec_prepared(sql::kSelectCurrentRules)) {
    RuleInfo r;
    r.territory = row[0].c_str();
    r.version = row[1].as<int64_t>();
    r.region_ids = pg::ParseTextArray(row[2]);
    r.readable_from = pg::ParseTextArray(row[3]);
    r.updated_at = FromEpochSeconds(row[4]);
    r.updated_by = row[5].c_str();
    rules.push_back(std::move(r));
  }
  return rules;
}

// Runs `fn` in a control-DB transaction, turning libpqxx exceptions into Status.
template <typename T>
absl::StatusOr<T> InTransaction(pg::Pool& pool,
                                const std::function<absl::StatusOr<T>(pqxx::work&)>& fn) {
  return pool.TransactValue<T>(fn);
}

}  // namespace

std::string PseudonymFor(absl::string_view key, absl::string_view patient_ref) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  std::string message = absl::StrCat("medgate-patient-v1:", patient_ref);
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &len);
  return absl::StrCat("pt_", absl::BytesToHexString(
                                 absl::string_view(reinterpret_cast<const char*>(mac), 20)));
}

RoutingCore::RoutingCore(pg::Pool& control, const pg::ShardSet& shards,
                         std::vector<residency::Region> regions, absl::Duration reassign_wait)
    : control_(control),
      shards_(shards),
      regions_(std::move(regions)),
      reassign_wait_(reassign_wait) {}

absl::Status ValidateNewTenantId(absl::string_view tenant_id) {
  const bool ok = !tenant_id.empty() && tenant_id.size() <= kMaxNewTenantIdBytes &&
                  absl::ascii_islower(static_cast<unsigned char>(tenant_id[0])) &&
                  std::all_of(tenant_id.begin(), tenant_id.end(), [](char c) {
                    return absl::ascii_islower(static_cast<unsigned char>(c)) ||
                           absl::ascii_isdigit(static_cast<unsigned char>(c)) || c == '-';
                  });
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tenant.tenant_id: a new tenant's id is 1 to ", kMaxNewTenantIdBytes,
      " bytes of lower-case letters, digits and '-', starting with a letter; got '",
      tenant_id.substr(0, kMaxIdBytes), "'"));
}

absl::StatusOr<std::pair<TenantInfo, bool>> RoutingCore::UpsertTenant(
    const CallContext& ctx, const TenantInfo& tenant, const UpsertOptions& options) {
  const bool keep_placed_patients = options.keep_placed_patients;
  if (options.expected_version < 0) {
    return absl::InvalidArgumentError("expected_version: must not be negative");
  }
  RETURN_IF_ERROR(ValidateIdentifier(tenant.tenant_id, "tenant.tenant_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateText(tenant.display_name, "tenant.display_name", 200));
  if (tenant.territories.empty()) {
    return absl::InvalidArgumentError("tenant.territories: a tenant serves at least one territory");
  }
  if (tenant.territories.size() > kMaxTenantTerritories) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant.territories: at most ", kMaxTenantTerritories));
  }
  if (tenant.region_ids && tenant.region_ids->size() > kMaxTenantRegions) {
    return absl::InvalidArgumentError(absl::StrCat("tenant.region_ids: at most ", kMaxTenantRegions));
  }
  for (size_t i = 0; i < tenant.territories.size(); ++i) {
    RETURN_IF_ERROR(residency::ValidateTerritory(tenant.territories[i],
                                                 absl::StrCat("tenant.territories[", i, "]")));
  }
  RETURN_IF_ERROR(ValidateDistinct(tenant.territories, "tenant.territories"));
  if (tenant.region_ids) {
    for (size_t i = 0; i < tenant.region_ids->size(); ++i) {
      const std::string& id = (*tenant.region_ids)[i];
      bool known = std::any_of(regions_.begin(), regions_.end(),
                               [&](const residency::Region& r) { return r.id == id; });
      if (!known) {
        return absl::FailedPreconditionError(
            absl::StrCat("tenant.region_ids[", i, "]: region '", id, "' is not configured"));
      }
    }
    // Configured ids, so safe to name.
    RETURN_IF_ERROR(ValidateDistinct(*tenant.region_ids, "tenant.region_ids"));
  }
  const absl::Status new_id = ValidateNewTenantId(tenant.tenant_id);
  // The inner status is the answer to the caller, the outer one the transaction's: a stale
  // expected_version is ABORTED from the inner one, which the pool does not run again (it retries
  // a transaction that fails ABORTED, a conflict between transactions).
  using Upserted = absl::StatusOr<std::pair<TenantInfo, bool>>;
  absl::StatusOr<Upserted> upserted = InTransaction<Upserted>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<Upserted> {
        // Waits for the tenant's placements in progress and holds new ones off until this
        // commits: the patients counted below are all there will be under the old narrowing.
        txn.exec_prepared(sql::kLockTenant, tenant.tenant_id);
        pqxx::result stored_row = txn.exec_prepared(sql::kSelectTenant, tenant.tenant_id);
        std::optional<TenantInfo> before;
        if (!stored_row.empty()) before = TenantFromRow(stored_row[0]);
        // An id of another form names no tenant that can be created; one registered before the
        // rule existed may still be updated (suspended, for one).
        if (!new_id.ok() && !before) return new_id;
        // An upsert replaces the whole tenant: one made from an older read would undo what came
        // since (a suspension, say).
        if (options.expected_version != 0) {
          if (!before) {
            return Upserted(absl::AbortedError(absl::StrCat(
                "tenant '", tenant.tenant_id, "' does not exist, not at expected_version ",
                options.expected_version, "; re-read and retry (0 creates it)")));
          }
          if (before->version != options.expected_version) {
            return Upserted(absl::AbortedError(absl::StrCat(
                "tenant '", tenant.tenant_id, "' is at version ", before->version,
                ", not expected_version ", options.expected_version,
                ": it changed since it was read; re-read and retry")));
          }
        }
        // Without regions the tenant would be placed in any region its rules allow: a narrowing
        // is dropped only when asked, not by an upsert that forgot to resend it.
        if (before && before->region_ids && !tenant.region_ids && !options.drop_region_narrowing) {
          return absl::FailedPreconditionError(absl::StrCat(
              "tenant.region_ids: empty, and tenant '", tenant.tenant_id, "' is narrowed to ",
              absl::StrJoin(*before->region_ids, ", "), "; resend its regions to keep them, or "
              "set drop_region_narrowing to place its new patients in any region its "
              "territories' rules allow"));
        }
        // Narrowing picks among the regions the tenant's territories' rules allow: a region that
        // none of them allows would never be used. Regions the tenant is already narrowed to are
        // kept whatever the rules say since (a rule may drop one later): ops resend them with any
        // change, a suspension for one, and must not be refused for them.
        std::vector<RegionPatients> placed_outside;
        if (tenant.region_ids) {
          std::vector<std::string> kept;
          if (before) kept = before->region_ids.value_or(std::vector<std::string>{});
          const std::vector<RuleInfo> rules = CurrentRules(txn);
          for (size_t i = 0; i < tenant.region_ids->size(); ++i) {
            const std::string& id = (*tenant.region_ids)[i];
            if (absl::c_linear_search(kept, id)) continue;
            const bool allowed = std::any_of(rules.begin(), rules.end(), [&](const RuleInfo& r) {
              return absl::c_linear_search(tenant.territories, r.territory) &&
                     absl::c_linear_search(r.region_ids, id);
            });
            if (!allowed) {
              return absl::FailedPreconditionError(absl::StrCat(
                  "tenant.region_ids[", i, "]: region '", id, "' is allowed by no residency rule "
                  "of the tenant's territories (", absl::StrJoin(tenant.territories, ", "),
                  "); narrowing only chooses among the regions the rules allow"));
            }
          }
          // Patients of the tenant in a region this narrowing drops (from the tenant's current
          // narrowing, or from every region when it had none) stay there: medgate does not move
          // a patient's data. A new tenant has none.
          std::vector<std::string> dropped;
          if (before) {
            std::vector<std::string> had;
            if (before->region_ids) {
              had = *before->region_ids;
            } else {
              for (const residency::Region& r : regions_) had.push_back(r.id);
            }
            for (const std::string& id : had) {
              if (!absl::c_linear_search(*tenant.region_ids, id)) dropped.push_back(id);
            }
          }
          if (!dropped.empty()) {
            for (const pqxx::row& row : txn.exec_prepared(sql::kCountTenantPatientsIn,
                                                          tenant.tenant_id,
                                                          pg::TextArrayLiteral(dropped))) {
              placed_outside.push_back({row[0].c_str(), row[1].as<int64_t>()});
            }
          }
          if (!placed_outside.empty() && !keep_placed_patients) {
            return absl::FailedPreconditionError(absl::StrCat(
                "tenant.region_ids would drop ",
                DescribeWherePatientsLive(placed_outside, "region", absl::StrCat("tenant ", tenant.tenant_id)),
                "; medgate does not move their data, so they would stay there. Keep the region, "
                "or upsert the tenant again with keep_placed_patients to leave them where they "
                "are"));
          }
        }
        // Territories this upsert drops where patients of the tenant live: those patients stay
        // placed and served (medgate neither moves nor forgets a patient), but the tenant would
        // place no new patient of those territories. Refused unless ops drop them knowingly.
        std::vector<TerritoryPatients> in_dropped;
        if (before) {
          std::vector<std::string> dropped_territories;
          for (const std::string& t : before->territories) {
            if (!absl::c_linear_search(tenant.territories, t)) dropped_territories.push_back(t);
          }
          if (!dropped_territories.empty()) {
            for (const pqxx::row& row :
                 txn.exec_prepared(sql::kCountTenantPatientsOfTerritories, tenant.tenant_id,
                                   pg::TextArrayLiteral(dropped_territories))) {
              in_dropped.push_back({row[0].c_str(), row[1].as<int64_t>()});
            }
          }
          if (!in_dropped.empty() && !keep_placed_patients) {
            return absl::FailedPreconditionError(absl::StrCat(
                "tenant.territories would drop ",
                DescribeWherePatientsLive(in_dropped, "territory", absl::StrCat("tenant ", tenant.tenant_id)),
                "; they would stay placed and served, but the tenant would place no new patient "
                "of those territories. Keep the territory, or upsert the tenant again with "
                "keep_placed_patients to drop it all the same"));
          }
        }
        std::string territories = pg::TextArrayLiteral(tenant.territories);
        std::string regions = pg::TextArrayLiteral(tenant.region_ids.value_or(std::vector<std::string>{}));
        bool narrowed = tenant.region_ids.has_value();
        pqxx::result inserted =
            txn.exec_prepared(sql::kInsertTenant, tenant.tenant_id, tenant.display_name,
                              territories, regions, tenant.active, RandomKeyHex(), narrowed);
        bool created = inserted.affected_rows() == 1;
        if (!created) {
          txn.exec_prepared0(sql::kUpdateTenant, tenant.tenant_id, tenant.display_name,
                             territories, regions, tenant.active, narrowed);
        }
        pqxx::row row = txn.exec_prepared1(sql::kSelectTenant, tenant.tenant_id);
        TenantInfo stored = TenantFromRow(row);
        stored.placed_outside = placed_outside;
        stored.patients_in_dropped_territories = in_dropped;
        // What the tenant now is: the row is overwritten in place, so the chain is its history
        // (who suspended it, who widened its regions).
        const std::string state = absl::StrCat(
            created ? "TENANT_CREATED" : "TENANT_UPDATED", ": active=",
            stored.active ? "true" : "false", " territories=", absl::StrJoin(stored.territories, ","),
            " regions=", stored.region_ids ? absl::StrJoin(*stored.region_ids, ",") : "any",
            WherePatientsLiveReason("placed_outside", placed_outside),
            WherePatientsLiveReason("patients_in_dropped_territories", in_dropped));
        RETURN_IF_ERROR(audit::Append(
            txn, AuditEntryFor(ctx, created ? audit::Action::kCreate : audit::Action::kUpdate, "tenant",
                          tenant.tenant_id, tenant.tenant_id, "", state)).status());
        return Upserted(std::make_pair(stored, created));
      });
  if (!upserted.ok()) return upserted.status();
  return *std::move(upserted);
}

absl::StatusOr<TenantInfo> RoutingCore::GetTenant(const CallContext&, const std::string& tenant_id) {
  RETURN_IF_ERROR(ValidateIdentifier(tenant_id, "tenant_id", kMaxIdBytes));
  return InTransaction<TenantInfo>(control_, [&](pqxx::work& txn) -> absl::StatusOr<TenantInfo> {
    pqxx::result rows = txn.exec_prepared(sql::kSelectTenant, tenant_id);
    if (rows.empty()) return absl::NotFoundError(absl::StrCat("tenant '", tenant_id, "' not found"));
    return TenantFromRow(rows[0]);
  });
}

absl::StatusOr<RuleInfo> RoutingCore::PutResidencyRule(const CallContext& ctx, const RuleInfo& rule,
                                                       int64_t expected_version,
                                                       bool only_if_absent,
                                                       bool keep_placed_patients) {
  if (rule.region_ids.size() > kMaxRuleRegions) {
    return absl::InvalidArgumentError(absl::StrCat("rule.region_ids: at most ", kMaxRuleRegions));
  }
  if (rule.readable_from.size() > kMaxRuleReadableFrom) {
    return absl::InvalidArgumentError(
        absl::StrCat("rule.readable_from_territories: at most ", kMaxRuleReadableFrom));
  }
  // Checked here, where the index is still known: the engine's rule holds them as a set.
  for (size_t i = 0; i < rule.readable_from.size(); ++i) {
    RETURN_IF_ERROR(residency::ValidateTerritory(
        rule.readable_from[i], absl::StrCat("rule.readable_from_territories[", i, "]")));
  }
  RETURN_IF_ERROR(ValidateDistinct(rule.readable_from, "rule.readable_from_territories"));
  residency::ResidencyRule engine_rule;
  engine_rule.territory = rule.territory;
  engine_rule.allowed_regions = rule.region_ids;
  engine_rule.readable_from.insert(rule.readable_from.begin(), rule.readable_from.end());
  engine_rule.version = 1;  // the stored version is assigned below
  RETURN_IF_ERROR(residency::ValidateRule(
      engine_rule, regions_,
      residency::RuleFieldNames{.territory = "rule.territory",
                                .allowed_regions = "rule.region_ids",
                                .readable_from = "rule.readable_from_territories",
                                .version = "rule.version"}));
  if (expected_version < 0) {
    return absl::InvalidArgumentError("expected_version: must not be negative");
  }
  // The inner status is the answer to the caller; the outer one, the transaction's. A caller's
  // expected_version behind the rule's is answered ABORTED (re-read and retry) from the inner
  // one: returned as the transaction's, the pool would run it again, as for a conflict between
  // transactions, taking the territory's lock each time for the same answer.
  absl::StatusOr<absl::StatusOr<RuleInfo>> put = InTransaction<absl::StatusOr<RuleInfo>>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<absl::StatusOr<RuleInfo>> {
    // Waits for the placements under the current version and for any other put of the territory,
    // and holds new ones off until this commits: the version read below is the latest.
    txn.exec_prepared(sql::kLockRule, rule.territory);
    pqxx::result current = txn.exec_prepared(sql::kSelectCurrentRule, rule.territory);
    int64_t current_version = current.empty() ? 0 : current[0][0].as<int64_t>();
    if (only_if_absent && current_version != 0) {
      return absl::AlreadyExistsError(absl::StrCat("rule for ", rule.territory, " exists (version ",
                                                   current_version, "); left as it is"));
    }
    if (expected_version != 0 && expected_version != current_version) {
      return absl::StatusOr<RuleInfo>(absl::AbortedError(
          absl::StrCat("rule for ", rule.territory, " is at version ", current_version, ", not ",
                       expected_version, "; re-read and retry")));
    }
    // Patients placed in a region this put drops from the current version stay there: medgate
    // does not move a patient's data. Counted under the lock, so no placement under the version
    // being replaced is still to commit. Regions an earlier put dropped knowingly are not counted
    // again: only what this put drops needs acknowledging.
    std::vector<std::string> dropped;
    if (!current.empty()) {
      for (const std::string& id : pg::ParseTextArray(current[0][1])) {
        if (!absl::c_linear_search(rule.region_ids, id)) dropped.push_back(id);
      }
    }
    std::vector<RegionPatients> placed_outside;
    if (!dropped.empty()) {
      for (const pqxx::row& row : txn.exec_prepared(sql::kCountPlacedOutside, rule.territory,
                                                    pg::TextArrayLiteral(dropped))) {
        placed_outside.push_back({row[0].c_str(), row[1].as<int64_t>()});
      }
    }
    if (!placed_outside.empty() && !keep_placed_patients) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rule for ", rule.territory, " would drop ",
          DescribeWherePatientsLive(placed_outside, "region", rule.territory),
          "; medgate does not move their data, so they would stay there. Keep the region in the "
          "rule, or put it again with keep_placed_patients to leave them where they are"));
    }
    RuleInfo stored = rule;
    stored.version = current_version + 1;
    stored.updated_by = ctx.principal.spiffe_id;
    stored.placed_outside = placed_outside;
    pqxx::result inserted = txn.exec_prepared(sql::kInsertRule, rule.territory, stored.version,
                                              pg::TextArrayLiteral(rule.region_ids),
                                              pg::TextArrayLiteral(rule.readable_from),
                                              stored.updated_by);
    if (inserted.empty()) {
      // A concurrent put stored this version after the look-up above: ABORTED makes the pool
      // run this again, and the look-up then sees that version (and checks expected_version).
      return absl::AbortedError(absl::StrCat("rule for ", rule.territory, " changed concurrently; "
                                             "re-read and retry"));
    }
    stored.updated_at = FromEpochSeconds(inserted[0][0]);
    // Who may read the territory's data is as much the rule as where it is stored: both are in
    // the chained entry (the territory itself always may, and is not listed).
    const std::string reason = absl::StrCat(
        "regions=", absl::StrJoin(rule.region_ids, ","), " readable_from=",
        rule.readable_from.empty() ? std::string("-") : absl::StrJoin(rule.readable_from, ","),
        WherePatientsLiveReason("placed_outside", placed_outside));
    RETURN_IF_ERROR(audit::Append(
        txn, AuditEntryFor(ctx, stored.version == 1 ? audit::Action::kCreate : audit::Action::kUpdate,
                      "residency_rule", absl::StrCat(rule.territory, "@v", stored.version), "",
                      "", reason))
                        .status());
    return absl::StatusOr<RuleInfo>(std::move(stored));
  });
  if (!put.ok()) return put.status();
  return *std::move(put);
}

absl::StatusOr<std::vector<RuleInfo>> RoutingCore::ListResidencyRules(
    absl::Span<const std::string> territories) {
  if (territories.size() > kMaxListedTerritories) {
    return absl::InvalidArgumentError(
        absl::StrCat("territories: at most ", kMaxListedTerritories, ", got ", territories.size()));
  }
  for (size_t i = 0; i < territories.size(); ++i) {
    RETURN_IF_ERROR(residency::ValidateTerritory(territories[i], absl::StrCat("territories[", i, "]")));
  }
  std::set<std::string> wanted(territories.begin(), territories.end());
  return InTransaction<std::vector<RuleInfo>>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<std::vector<RuleInfo>> {
        std::vector<RuleInfo> rules = CurrentRules(txn);
        if (wanted.empty()) return rules;
        std::vector<RuleInfo> out;
        for (RuleInfo& r : rules) {
          if (wanted.contains(r.territory)) out.push_back(std::move(r));
        }
        return out;
      });
}

absl::Status RoutingCore::SeedRules(const CallContext& ctx, absl::Span<const RuleInfo> rules) {
  ASSIGN_OR_RETURN(std::vector<RuleInfo> existing, ListResidencyRules({}));
  std::set<std::string> have;
  for (const RuleInfo& r : existing) have.insert(r.territory);
  for (const RuleInfo& rule : rules) {
    if (have.contains(rule.territory)) continue;
    absl::StatusOr<RuleInfo> put = PutResidencyRule(ctx, rule, 0, /*only_if_absent=*/true);
    // A concurrent seeder, or ops, stored one since the listing: it stays.
    if (!put.ok() && put.status().code() != absl::StatusCode::kAlreadyExists) return put.status();
  }
  return absl::OkStatus();
}

std::vector<RegionInfo> RoutingCore::ListRegions() {
  std::vector<RegionInfo> out;
  absl::MutexLock lock(&health_mu_);
  for (const residency::Region& r : regions_) {
    RegionInfo info;
    info.region_id = r.id;
    info.territories.assign(r.territories.begin(), r.territories.end());
    if (auto it = health_.find(r.id); it != health_.end()) {
      info.healthy = it->second.first;
      info.checked_at = it->second.second;
    }
    out.push_back(std::move(info));
  }
  return out;
}

void RoutingCore::RefreshRegionHealth() {
  for (const residency::Region& r : regions_) {
    absl::StatusOr<pg::Pool*> pool = shards_.Get(r.id);
    bool healthy = pool.ok() && (*pool)->Ping().ok();
    absl::MutexLock lock(&health_mu_);
    health_[r.id] = {healthy, absl::Now()};
  }
}

absl::StatusOr<PlaceResult> RoutingCore::PlacePatient(const CallContext& ctx,
                                                      const std::string& patient_ref,
                                                      const std::string& territory,
                                                      bool allow_move) {
  RETURN_IF_ERROR(ValidateRef(patient_ref));
  RETURN_IF_ERROR(residency::ValidateTerritory(territory, "territory"));
  const std::string& tenant_id = ctx.principal.tenant;
  return InTransaction<PlaceResult>(control_, [&](pqxx::work& txn) -> absl::StatusOr<PlaceResult> {
    // The tenant (its narrowing) is held against upserts until this commits, and read once held:
    // an upsert counting the tenant's patients in the regions it drops sees this one.
    txn.exec_prepared(sql::kShareTenant, tenant_id);
    ASSIGN_OR_RETURN(TenantRow tenant, LoadActiveTenant(txn, tenant_id));
    const std::string patient_id = PseudonymFor(tenant.key, patient_ref);
    pqxx::result existing = txn.exec_prepared(sql::kSelectPatient, patient_id, tenant_id);
    PlaceResult result;
    result.patient_id = patient_id;
    if (existing.empty()) {
      // The patient is placed under the territory's rule as it stands when the placement commits:
      // the rule is held against puts until then, and read once held (a put that held it first
      // has committed its version by then).
      txn.exec_prepared(sql::kShareRule, territory);
      std::vector<residency::ResidencyRule> rules = ToEngineRules(CurrentRules(txn));
      residency::RegionIdSet all;
      for (const residency::Region& r : regions_) all.insert(r.id);
      // Placement is a directory decision, not a write to the shard: a shard's passing outage
      // must not send a patient to a second-choice region for good.
      ASSIGN_OR_RETURN(residency::Placement placement,
                       residency::Place(territory, rules, regions_, PolicyOf(tenant.info), all));
      pqxx::result inserted = txn.exec_prepared(sql::kInsertPatient, patient_id, tenant_id,
                                                territory, placement.region_id,
                                                placement.rule_version);
      if (inserted.affected_rows() == 0) {
        // A concurrent placement of the same reference won; retry reads its result.
        return absl::AbortedError("concurrent placement");
      }
      result.region_id = placement.region_id;
      result.territory = territory;
      result.newly_placed = true;
      result.rule_version = placement.rule_version;
      RETURN_IF_ERROR(audit::Append(txn, AuditEntryFor(ctx, audit::Action::kCreate, "patient", patient_id,
                                                  tenant_id, patient_id,
                                                  absl::StrCat("placed in ", placement.region_id)))
                          .status());
      return result;
    }
    const pqxx::row& row = existing[0];
    result.territory = row[2].c_str();
    result.region_id = row[3].c_str();
    result.rule_version = row[4].as<int64_t>();
    if (result.territory != territory) {
      if (allow_move) {
        return absl::UnimplementedError(
            "moving a patient to another territory is not supported yet");
      }
      return absl::FailedPreconditionError(absl::StrCat(
          "patient is already placed for territory ", result.territory, ", not ", territory,
          "; a move must be explicit (allow_move)"));
    }
    return result;
  });
}

absl::StatusOr<std::vector<PatientLocation>> RoutingCore::ResolvePatients(
    absl::Span<const std::string> patient_ids) {
  if (patient_ids.empty() || patient_ids.size() > kMaxBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("patient_ids: between 1 and ", kMaxBatch, " ids, got ", patient_ids.size()));
  }
  for (size_t i = 0; i < patient_ids.size(); ++i) {
    RETURN_IF_ERROR(ValidateIdentifier(patient_ids[i], absl::StrCat("patient_ids[", i, "]"), kMaxIdBytes));
  }
  return InTransaction<std::vector<PatientLocation>>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<std::vector<PatientLocation>> {
        std::map<std::string, PatientLocation> found;
        for (const pqxx::row& row : txn.exec_prepared(
                 sql::kResolvePatients,
                 pg::TextArrayLiteral(std::vector<std::string>(patient_ids.begin(), patient_ids.end())))) {
          PatientLocation p;
          p.patient_id = row[0].c_str();
          p.found = true;
          p.tenant_id = row[1].c_str();
          p.region_id = row[2].c_str();
          p.territory = row[3].c_str();
          found[p.patient_id] = p;
        }
        std::vector<PatientLocation> out;
        for (const std::string& id : patient_ids) {
          auto it = found.find(id);
          if (it != found.end()) {
            out.push_back(it->second);
          } else {
            PatientLocation missing;
            missing.patient_id = id;
            out.push_back(missing);
          }
        }
        return out;
      });
}

absl::StatusOr<AssignResult> RoutingCore::AssignDevice(const CallContext& ctx,
                                                       const std::string& device_id,
                                                       const std::string& patient_ref) {
  RETURN_IF_ERROR(ValidateIdentifier(device_id, "device_id", kMaxIdBytes));
  RETURN_IF_ERROR(ValidateRef(patient_ref));
  const std::string& tenant_id = ctx.principal.tenant;
  return InTransaction<AssignResult>(control_, [&](pqxx::work& txn) -> absl::StatusOr<AssignResult> {
    // Held against upserts of the tenant until this commits, as a placement holds it: an
    // assignment is never made after a suspension has committed.
    txn.exec_prepared(sql::kShareTenant, tenant_id);
    ASSIGN_OR_RETURN(TenantRow tenant, LoadActiveTenant(txn, tenant_id));
    const std::string patient_id = PseudonymFor(tenant.key, patient_ref);
    pqxx::result patient = txn.exec_prepared(sql::kSelectPatient, patient_id, tenant_id);
    if (patient.empty()) {
      return absl::NotFoundError("patient not found: place the patient before assigning a device");
    }
    AssignResult result;
    result.device_id = device_id;
    result.patient_id = patient_id;
    result.region_id = patient[0][3].c_str();
    pqxx::result device = txn.exec_prepared(sql::kSelectDevice, tenant_id, device_id);
    if (!device.empty() && !device[0][0].is_null()) {
      if (device[0][0].c_str() == patient_id) return result;  // already assigned: idempotent
      return absl::FailedPreconditionError(absl::StrCat(
          "device '", device_id, "' is assigned to another patient; unassign it first"));
    }
    // Services may still send a recently unassigned device's samples to its former patient (their
    // caches): it goes to another patient only once they have all let go of it.
    if (!device.empty() && !device[0][1].is_null() && device[0][1].c_str() != patient_id) {
      const absl::Duration since = absl::Seconds(device[0][2].as<double>());
      if (since < reassign_wait_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "device '", device_id, "' was unassigned ", absl::ToInt64Seconds(since),
            " s ago; it may feed another patient ", absl::ToInt64Seconds(reassign_wait_ - since) + 1,
            " s from now, once no service sends its samples to the former patient any more"));
      }
    }
    // The row the look-up locked is updated; without one, a row is inserted, unless a concurrent
    // call committed one after the look-up (which had nothing to lock): assigned, or assigned and
    // unassigned since, whose reassignment wait this call has not checked.
    const pqxx::result assigned =
        device.empty() ? txn.exec_prepared(sql::kInsertDevice, tenant_id, device_id, patient_id)
                       : txn.exec_prepared(sql::kAssignLockedDevice, tenant_id, device_id, patient_id,
                                           absl::ToDoubleSeconds(reassign_wait_));
    if (assigned.affected_rows() != 1) {
      // ABORTED makes the pool run this again, and the look-up sees (and locks) that row.
      return absl::AbortedError(absl::StrCat("device '", device_id,
                                             "' was changed by a concurrent call; look again"));
    }
    result.newly_assigned = true;
    RETURN_IF_ERROR(audit::Append(txn, AuditEntryFor(ctx, audit::Action::kUpdate, "device", device_id,
                                                tenant_id, patient_id, "device assigned"))
                        .status());
    return result;
  });
}

absl::StatusOr<UnassignResult> RoutingCore::UnassignDevice(const CallContext& ctx,
                                                           const std::string& device_id) {
  RETURN_IF_ERROR(ValidateIdentifier(device_id, "device_id", kMaxIdBytes));
  const std::string& tenant_id = ctx.principal.tenant;
  absl::StatusOr<UnassignResult> unassigned = InTransaction<UnassignResult>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<UnassignResult> {
        pqxx::result device = txn.exec_prepared(sql::kSelectDevice, tenant_id, device_id);
        if (device.empty()) {
          return absl::NotFoundError(absl::StrCat("device '", device_id, "' not found"));
        }
        UnassignResult result;
        result.device_id = device_id;
        if (device[0][0].is_null()) return result;
        result.patient_id = device[0][0].c_str();
        result.was_assigned = true;
        // The entry first, then the change: until COMMIT, look-ups still answer the former
        // patient (and caches keep that answer), so the unassignment's time is taken after the
        // wait for the chain's head, as late as a statement can.
        RETURN_IF_ERROR(audit::Append(txn, AuditEntryFor(ctx, audit::Action::kUpdate, "device",
                                                    device_id, tenant_id, result.patient_id,
                                                    "device unassigned"))
                            .status());
        txn.exec_prepared0(sql::kUnassignDevice, tenant_id, device_id);
        return result;
      });
  if (!unassigned.ok() || !unassigned->was_assigned) return unassigned;
  // The reassignment wait must count from when other sessions could see the unassignment, which
  // is only once COMMIT has returned. If this fails (or the process dies first), the stamp taken
  // just before COMMIT stands: the wait is then shorter by the COMMIT's duration, never longer
  // than intended, and the unassignment itself is done either way.
  absl::StatusOr<bool> restamped = InTransaction<bool>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<bool> {
        txn.exec_prepared(sql::kRestampUnassignment, tenant_id, device_id,
                          unassigned->patient_id);
        return true;
      });
  if (!restamped.ok()) {
    log::Warning("device_unassignment_restamp_failed", {{"error", restamped.status().message()}});
  }
  return unassigned;
}

absl::StatusOr<std::vector<DeviceLocation>> RoutingCore::ResolveDevices(
    absl::Span<const DeviceRef> devices) {
  if (devices.empty() || devices.size() > kMaxBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("devices: between 1 and ", kMaxBatch, " devices, got ", devices.size()));
  }
  std::vector<std::string> tenants;
  std::vector<std::string> ids;
  for (size_t i = 0; i < devices.size(); ++i) {
    RETURN_IF_ERROR(ValidateIdentifier(devices[i].tenant_id, absl::StrCat("devices[", i, "].tenant_id"), kMaxIdBytes));
    RETURN_IF_ERROR(ValidateIdentifier(devices[i].device_id, absl::StrCat("devices[", i, "].device_id"), kMaxIdBytes));
    tenants.push_back(devices[i].tenant_id);
    ids.push_back(devices[i].device_id);
  }
  return InTransaction<std::vector<DeviceLocation>>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<std::vector<DeviceLocation>> {
        std::map<std::pair<std::string, std::string>, DeviceLocation> found;
        for (const pqxx::row& row : txn.exec_prepared(sql::kResolveDevices, pg::TextArrayLiteral(tenants),
                                                      pg::TextArrayLiteral(ids))) {
          DeviceLocation d;
          d.tenant_id = row[0].c_str();
          d.device_id = row[1].c_str();
          d.found = !row[2].is_null();
          if (d.found) {
            d.patient_id = row[2].c_str();
            d.region_id = row[3].c_str();
            if (!row[5].is_null()) d.assigned_at = absl::FromUnixMicros(row[5].as<int64_t>());
          }
          d.tenant_active = row[4].as<bool>();
          found[{d.tenant_id, d.device_id}] = d;
        }
        std::vector<DeviceLocation> out;
        for (const DeviceRef& ref : devices) {
          auto it = found.find({ref.tenant_id, ref.device_id});
          if (it != found.end()) {
            out.push_back(it->second);
          } else {
            DeviceLocation missing;
            missing.tenant_id = ref.tenant_id;
            missing.device_id = ref.device_id;
            out.push_back(missing);
          }
        }
        return out;
      });
}

absl::StatusOr<std::vector<TenantStatus>> RoutingCore::ResolveTenants(
    absl::Span<const std::string> tenant_ids) {
  if (tenant_ids.empty() || tenant_ids.size() > kMaxBatch) {
    return absl::InvalidArgumentError(absl::StrCat("tenant_ids: between 1 and ", kMaxBatch,
                                                   " tenants, got ", tenant_ids.size()));
  }
  for (size_t i = 0; i < tenant_ids.size(); ++i) {
    RETURN_IF_ERROR(
        ValidateIdentifier(tenant_ids[i], absl::StrCat("tenant_ids[", i, "]"), kMaxIdBytes));
  }
  return InTransaction<std::vector<TenantStatus>>(
      control_, [&](pqxx::work& txn) -> absl::StatusOr<std::vector<TenantStatus>> {
        std::map<std::string, bool, std::less<>> active;
        for (const pqxx::row& row : txn.exec_prepared(sql::kResolveTenants,
                                                      pg::TextArrayLiteral(tenant_ids))) {
          active[row[0].c_str()] = row[1].as<bool>();
        }
        std::vector<TenantStatus> out;
        out.reserve(tenant_ids.size());
        for (const std::string& id : tenant_ids) {
          auto it = active.find(id);
          out.push_back(TenantStatus{.tenant_id = id,
                                     .found = it != active.end(),
                                     .active = it != active.end() && it->second});
        }
        return out;
      });
}

}  // namespace medgate::routing
