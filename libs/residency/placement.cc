// Residency placement: rule and policy validation, the fail-closed Place(), and the dev seed.
#include "libs/residency/placement.h"

#include <cstddef>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "libs/common/validation.h"
#include "libs/residency/territory.h"

namespace medgate::residency {
namespace {

constexpr std::size_t kMaxRegionIdLength = 63;

// EU 27 plus Iceland, Liechtenstein and Norway.
constexpr absl::string_view kEeaTerritories[] = {
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE",
    "IS", "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
};

// The EEA territories that the dev stack stores in eu-1, with fr-1 as their fallback.
constexpr absl::string_view kDevEuTerritories[] = {"BE", "NL", "LU", "AT", "IT", "ES", "PT", "IE"};

// Region ids and similar config values reach messages and logs; quote them safely.
std::string Quoted(absl::string_view value) { return absl::StrCat("'", absl::CEscape(value), "'"); }

bool IsRegionId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxRegionIdLength) return false;
  if (id.front() < 'a' || id.front() > 'z' || id.back() == '-') return false;
  for (char c : id) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return true;
}

const Region* FindRegion(absl::Span<const Region> regions, absl::string_view id) {
  for (const Region& region : regions) {
    if (region.id == id) return &region;
  }
  return nullptr;
}

}  // namespace

absl::Status ValidateRegions(absl::Span<const Region> regions) {
  absl::flat_hash_map<absl::string_view, std::size_t> first_index;
  for (std::size_t i = 0; i < regions.size(); ++i) {
    const Region& region = regions[i];
    const std::string field = absl::StrCat("regions[", i, "]");
    if (!IsRegionId(region.id)) {
      // Ids name databases, config keys and metric labels, hence a DNS label's alphabet.
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".id: ", Quoted(region.id), " is not a region id (at most ",
                       kMaxRegionIdLength, " lowercase letters, digits and '-', starting with a ",
                       "letter and not ending with '-', e.g. 'fr-1')"));
    }
    const auto [it, inserted] = first_index.emplace(region.id, i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".id: region ", Quoted(region.id),
                                                     " is already configured at regions[",
                                                     it->second, "]"));
    }
    for (const std::string& territory : region.territories) {
      absl::Status status = ValidateTerritory(territory, absl::StrCat(field, ".territories"));
      if (!status.ok()) return status;
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateRule(const ResidencyRule& rule, absl::Span<const Region> regions,
                          const RuleFieldNames& names) {
  absl::Status status = ValidateTerritory(rule.territory, names.territory);
  if (!status.ok()) return status;
  if (rule.version <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        names.version, ": ", rule.version, " is not positive; placements cite it"));
  }
  if (rule.allowed_regions.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(names.allowed_regions, ": must not be empty (rules are versioned, never "
                     "deleted; to stop placements of territory ", Quoted(rule.territory),
                     ", take it out of the tenants' territories with UpsertTenant)"));
  }
  status = ValidateDistinct(rule.allowed_regions, names.allowed_regions, "region ");
  if (!status.ok()) return status;
  auto allowed = [&names](std::size_t i) {
    return absl::StrCat(names.allowed_regions, "[", i, "]");
  };
  for (const std::string& reader : rule.readable_from) {
    status = ValidateTerritory(reader, names.readable_from);
    if (!status.ok()) return status;
  }
  // Only now the checks that depend on the current region configuration.
  for (std::size_t i = 0; i < rule.allowed_regions.size(); ++i) {
    const std::string& id = rule.allowed_regions[i];
    const Region* region = FindRegion(regions, id);
    if (region == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(allowed(i), ": region ", Quoted(id), " is not configured"));
    }
    if (!region->territories.contains(rule.territory)) {
      return absl::FailedPreconditionError(absl::StrCat(allowed(i), ": region ", Quoted(id),
                                                        " does not host territory ",
                                                        Quoted(rule.territory)));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTenantPolicy(const TenantPolicy& policy, absl::Span<const Region> regions) {
  for (const std::string& territory : policy.served_territories) {
    absl::Status status = ValidateTerritory(territory, "served_territories");
    if (!status.ok()) return status;
  }
  if (policy.allowed_regions.has_value()) {
    for (const std::string& id : *policy.allowed_regions) {
      if (FindRegion(regions, id) == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("allowed_regions: region ", Quoted(id), " is not configured"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Placement> Place(absl::string_view territory, absl::Span<const ResidencyRule> rules,
                                absl::Span<const Region> regions, const TenantPolicy& tenant,
                                const RegionIdSet& available_regions) {
  absl::Status status = ValidateTerritory(territory, "territory");
  if (!status.ok()) return status;
  const std::string quoted_territory = Quoted(territory);

  if (!tenant.served_territories.contains(territory)) {
    return absl::FailedPreconditionError(
        absl::StrCat("tenant does not serve territory ", quoted_territory));
  }

  // Exactly one rule: with two, which one applies would depend on load order.
  const ResidencyRule* rule = nullptr;
  for (const ResidencyRule& candidate : rules) {
    if (candidate.territory != territory) continue;
    if (rule != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("more than one residency rule for territory ", quoted_territory,
                       " (versions ", rule->version, " and ", candidate.version, ")"));
    }
    rule = &candidate;
  }
  if (rule == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no residency rule for territory ", quoted_territory));
  }

  // Same reasoning for regions: two definitions of one id could disagree on what it hosts.
  absl::flat_hash_map<absl::string_view, const Region*> by_id;
  for (const Region& region : regions) {
    if (!by_id.emplace(region.id, &region).second) {
      return absl::FailedPreconditionError(
          absl::StrCat("region ", Quoted(region.id), " is configured more than once"));
    }
  }

  const std::string rule_name =
      absl::StrCat("residency rule version ", rule->version, " for territory ", quoted_territory);
  std::vector<std::string> refusals;     // why each policy-invalid region was skipped
  std::vector<std::string> unavailable;  // policy-valid regions that are down
  absl::flat_hash_set<absl::string_view> seen;
  for (const std::string& id : rule->allowed_regions) {
    if (!seen.insert(id).second) continue;
    const auto it = by_id.find(id);
    if (it == by_id.end()) {
      refusals.push_back(absl::StrCat(Quoted(id), " is not configured"));
    } else if (!it->second->territories.contains(territory)) {
      refusals.push_back(absl::StrCat(Quoted(id), " does not host ", quoted_territory));
    } else if (tenant.allowed_regions.has_value() && !tenant.allowed_regions->contains(id)) {
      refusals.push_back(absl::StrCat(Quoted(id), " is outside the tenant's allowed regions"));
    } else if (!available_regions.contains(id)) {
      unavailable.push_back(Quoted(id));
    } else {
      return Placement{.region_id = id, .rule_version = rule->version};
    }
  }
  if (!unavailable.empty()) {
    // Not a refusal: the policy allows these regions, so the caller may retry once one is back.
    return absl::UnavailableError(
        absl::StrCat("every eligible region under ", rule_name,
                     " is unavailable: ", absl::StrJoin(unavailable, ", ")));
  }
  if (refusals.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(rule_name, " allows no region"));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("no region allowed by ", rule_name,
                   " can store the patient: ", absl::StrJoin(refusals, "; ")));
}

bool MayReadFrom(const ResidencyRule& rule, absl::string_view reader_territory) {
  // An invalid code never matches, even if an unvalidated rule happens to list it.
  if (!IsAssignedTerritory(reader_territory)) return false;
  return reader_territory == rule.territory || rule.readable_from.contains(reader_territory);
}

std::vector<Region> DevRegions() {
  Region fr{.id = "fr-1", .territories = {"FR"}};
  Region de{.id = "de-1", .territories = {"DE"}};
  Region eu{.id = "eu-1", .territories = {}};
  for (absl::string_view territory : kDevEuTerritories) {
    fr.territories.emplace(territory);
    eu.territories.emplace(territory);
  }
  return {std::move(fr), std::move(de), std::move(eu)};
}

std::vector<ResidencyRule> DevRules() {
  const TerritorySet eea(std::begin(kEeaTerritories), std::end(kEeaTerritories));
  std::vector<ResidencyRule> rules;
  rules.push_back(
      {.territory = "FR", .allowed_regions = {"fr-1"}, .readable_from = eea, .version = 1});
  rules.push_back(
      {.territory = "DE", .allowed_regions = {"de-1"}, .readable_from = eea, .version = 1});
  for (absl::string_view territory : kDevEuTerritories) {
    rules.push_back({.territory = std::string(territory),
                     .allowed_regions = {"eu-1", "fr-1"},
                     .readable_from = eea,
                     .version = 1});
  }
  return rules;
}

}  // namespace medgate::residency
