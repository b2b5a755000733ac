// Residency placement: picks the regional shard that stores a patient's data, failing closed.
//
// Pure logic over plain values (no I/O): the routing service loads regions, rules and tenant
// policies from the control database, asks health checks which regions are up, and calls Place().
#ifndef MEDGATE_LIBS_RESIDENCY_PLACEMENT_H_
#define MEDGATE_LIBS_RESIDENCY_PLACEMENT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace medgate::residency {

// Ordered sets throughout, so that error messages and the dev seed are deterministic.
// Every member below has a default initializer so that designated initializers may omit it:
// GCC 12 with -Wextra flags an omitted member that has none.
using TerritorySet = absl::btree_set<std::string>;
using RegionIdSet = absl::btree_set<std::string>;

// One PostgreSQL shard and the territories whose patients it may store.
struct Region {
  std::string id = {};            // e.g. "fr-1"
  TerritorySet territories = {};  // ISO 3166-1 alpha-2 codes
};

// Where a territory's patients may be stored and from where their data may be read.
struct ResidencyRule {
  std::string territory = {};                     // patients' territory of residence
  std::vector<std::string> allowed_regions = {};  // region ids, most preferred first
  TerritorySet readable_from = {};                // reader territories besides `territory`
  int64_t version = 0;                            // positive; cited by every placement
};

// What one tenant accepts. A policy can only narrow the rules, never widen them.
struct TenantPolicy {
  // Territories whose patients the tenant may place. Empty means none: a tenant must opt in to
  // each territory, so a policy row that lost its territories refuses instead of placing anywhere.
  TerritorySet served_territories = {};
  // If set, only these regions may store the tenant's patients (intersected with each rule's
  // allowed regions). nullopt means no narrowing; an empty set means no region, so nothing places.
  std::optional<RegionIdSet> allowed_regions = std::nullopt;
};

// The outcome of a successful Place().
struct Placement {
  std::string region_id = {};
  int64_t rule_version = 0;

  friend bool operator==(const Placement&, const Placement&) = default;
};

// Checks a region configuration: ids are unique lowercase DNS labels ("fr-1": they name
// databases, config keys and metric labels) and every hosted territory is assigned.
// INVALID_ARGUMENT naming the field (e.g. "regions[2].territories: 'UK' is not ...") otherwise.
absl::Status ValidateRegions(absl::Span<const Region> regions);

// How ValidateRule's messages name the rule's fields: ResidencyRule's own names by default; a
// caller checking a request passes the request's field paths, so that the caller is told what
// it sent wrong in its own terms.
struct RuleFieldNames {
  std::string territory = "territory";
  std::string allowed_regions = "allowed_regions";  // messages add the index: "...[1]"
  std::string readable_from = "readable_from";
  std::string version = "version";
};

// Checks a rule against the configured regions before it is stored:
// - INVALID_ARGUMENT: invalid territory, non-positive version, empty or duplicated
//   allowed_regions, invalid readable_from territory;
// - FAILED_PRECONDITION: an allowed region that is not configured ("allowed_regions[1]: region
//   'xx-9' is not configured") or that does not host the rule's territory.
// Checks that need only the rule come first, so INVALID_ARGUMENT means "the rule itself is wrong".
// Fields are named as `names` says.
absl::Status ValidateRule(const ResidencyRule& rule, absl::Span<const Region> regions,
                          const RuleFieldNames& names = {});

// Checks a tenant policy before it is stored: served territories are assigned codes
// (INVALID_ARGUMENT) and narrowing names only configured regions (FAILED_PRECONDITION), since a
// typo there would silently refuse every placement.
absl::Status ValidateTenantPolicy(const TenantPolicy& policy, absl::Span<const Region> regions);

// Chooses the region that stores a new patient of `territory` for `tenant`: the first region, in
// the territory's rule order, that is configured, hosts the territory, is within the tenant's
// narrowing and is in `available_regions`. Deterministic: same inputs, same answer, whatever the
// order of `rules` and `regions`.
//
// Fails closed, never guessing a region:
// - INVALID_ARGUMENT: `territory` is not an assigned ISO 3166-1 alpha-2 code;
// - FAILED_PRECONDITION (a policy refusal; retrying will not help): the tenant does not serve the
//   territory; no rule, or more than one, for the territory; two regions with the same id; no
//   allowed region satisfies the policy (the message says why for each);
// - UNAVAILABLE (retryable): some region satisfies the policy but none of them is available.
//
// Unlike ValidateRule, a rule naming unknown regions or regions that do not host the territory is
// not refused as a whole: those regions are skipped, because a region removed from configuration
// must not stop placement in the rule's other regions.
absl::StatusOr<Placement> Place(absl::string_view territory, absl::Span<const ResidencyRule> rules,
                                absl::Span<const Region> regions, const TenantPolicy& tenant,
                                const RegionIdSet& available_regions);

// True iff data of a patient placed under `rule` may be read from `reader_territory`: the rule's
// own territory always, others only if listed in readable_from. False for an invalid code.
bool MayReadFrom(const ResidencyRule& rule, absl::string_view reader_territory);

// Dev and test seed, matching scripts/up: fr-1 hosts FR and the eight other EEA territories below
// (it is their fallback), de-1 hosts DE, eu-1 hosts BE, NL, LU, AT, IT, ES, PT, IE.
std::vector<Region> DevRegions();

// Dev and test seed, all version 1: FR -> [fr-1], DE -> [de-1], and BE, NL, LU, AT, IT, ES, PT,
// IE -> [eu-1, fr-1]; no other territory can be placed. Every rule is readable from the whole EEA
// (EU 27 + IS, LI, NO): GDPR restricts transfers out of the EEA, not within it, and cross-border
// care (Directive 2011/24/EU) needs a doctor in one member state to read a record stored in
// another. Storage never moves; consent and share grants still gate each read.
std::vector<ResidencyRule> DevRules();

}  // namespace medgate::residency

#endif  // MEDGATE_LIBS_RESIDENCY_PLACEMENT_H_
