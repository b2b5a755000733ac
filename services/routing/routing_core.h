// The routing logic over plain values: tenants, residency rules, placement, device assignment.
#ifndef MEDGATE_SERVICES_ROUTING_ROUTING_CORE_H_
#define MEDGATE_SERVICES_ROUTING_ROUTING_CORE_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "libs/identity/principal.h"
#include "libs/server/rpc_util.h"
#include "libs/pg/pool.h"
#include "libs/pg/shard_set.h"
#include "libs/residency/placement.h"
#include "libs/routing_client/routing_client.h"

namespace medgate::routing {

using ::medgate::CallContext;  // who asks, for the audit entry (libs/server/rpc_util.h)

// How many patients (of a territory, or of a tenant) live in one region.
struct RegionPatients {
  std::string region_id;
  int64_t patients = 0;
};

struct TerritoryPatients {
  std::string territory;
  int64_t patients = 0;
};

struct TenantInfo {
  std::string tenant_id;
  std::string display_name;
  std::vector<std::string> territories;
  std::optional<std::vector<std::string>> region_ids;  // nullopt: no narrowing
  bool active = true;
  absl::Time created_at;
  absl::Time updated_at;
  int64_t version = 0;  // 1 when created, one more at every upsert
  // An upsert's only, with keep_placed_patients: the regions its narrowing dropped where patients
  // of the tenant live, and how many.
  std::vector<RegionPatients> placed_outside;
  // An upsert's only, with keep_placed_patients: the territories it dropped where patients of the
  // tenant live, and how many.
  std::vector<TerritoryPatients> patients_in_dropped_territories;
};

struct RuleInfo {
  std::string territory;
  std::vector<std::string> region_ids;
  std::vector<std::string> readable_from;
  int64_t version = 0;
  absl::Time updated_at;
  std::string updated_by;
  // A put's only, with keep_placed_patients: the regions it dropped where patients of the
  // territory live, and how many.
  std::vector<RegionPatients> placed_outside;
};

struct RegionInfo {
  std::string region_id;
  std::vector<std::string> territories;
  bool healthy = false;
  absl::Time checked_at;
};

struct PlaceResult {
  std::string patient_id;
  std::string region_id;
  std::string territory;
  bool newly_placed = false;
  int64_t rule_version = 0;
};

struct AssignResult {
  std::string device_id;
  std::string patient_id;
  std::string region_id;
  bool newly_assigned = false;
};

struct UnassignResult {
  std::string device_id;
  std::string patient_id;
  bool was_assigned = false;
};

inline constexpr size_t kMaxRefBytes = 256;  // a patient_ref (routing.proto)
inline constexpr size_t kMaxListedTerritories = 64;  // ListResidencyRules' filter
inline constexpr size_t kMaxIdBytes = 128;
// A tenant id is the T of spiffe://TD/tenant/T/...; new ones have the API's form:
// [a-z][a-z0-9-]*, at most 63 bytes (a DNS label, so it can name Kubernetes objects too).
inline constexpr size_t kMaxNewTenantIdBytes = 63;
absl::Status ValidateNewTenantId(absl::string_view tenant_id);
inline constexpr size_t kMaxBatch = 1000;
// The API's bounds on a tenant's and a residency rule's lists.
inline constexpr size_t kMaxTenantTerritories = 64;
inline constexpr size_t kMaxTenantRegions = 32;
inline constexpr size_t kMaxRuleRegions = 16;
inline constexpr size_t kMaxRuleReadableFrom = 64;

class RoutingCore {
 public:
  // `control` must have been created with sql::Statements(). `shards` is used only to report
  // region health. `regions` come from the configuration.
  // `reassign_wait`: how long an unassigned device waits before it may be assigned to another
  // patient (longer than any service's cache of device answers).
  RoutingCore(pg::Pool& control, const pg::ShardSet& shards,
              std::vector<residency::Region> regions, absl::Duration reassign_wait);

  // A narrowing that drops a region where patients of the tenant live is FAILED_PRECONDITION
  // unless `keep_placed_patients` (they stay there; the result counts them in placed_outside);
  // so is dropping a territory where patients of the tenant live (they stay placed and served;
  // the result counts them in patients_in_dropped_territories). An upsert without regions of a
  // tenant narrowed to some is FAILED_PRECONDITION unless `drop_region_narrowing`. With a
  // non-zero `expected_version`, ABORTED unless the tenant exists at that version.
  struct UpsertOptions {
    bool keep_placed_patients = false;
    int64_t expected_version = 0;
    bool drop_region_narrowing = false;
  };
  absl::StatusOr<std::pair<TenantInfo, bool>> UpsertTenant(const CallContext& ctx,
                                                           const TenantInfo& tenant,
                                                           const UpsertOptions& options);
  absl::StatusOr<std::pair<TenantInfo, bool>> UpsertTenant(const CallContext& ctx,
                                                           const TenantInfo& tenant) {
    return UpsertTenant(ctx, tenant, UpsertOptions{});
  }
  absl::StatusOr<TenantInfo> GetTenant(const CallContext& ctx, const std::string& tenant_id);

  // `only_if_absent`: stores nothing, ALREADY_EXISTS, when the territory has a rule by the time
  // the put holds its lock (a seed never replaces what ops stored meanwhile). A put that drops a
  // region of the current version where patients of the territory live is FAILED_PRECONDITION
  // unless `keep_placed_patients` (they stay there; the result counts them in placed_outside).
  absl::StatusOr<RuleInfo> PutResidencyRule(const CallContext& ctx, const RuleInfo& rule,
                                            int64_t expected_version, bool only_if_absent = false,
                                            bool keep_placed_patients = false);
  absl::StatusOr<std::vector<RuleInfo>> ListResidencyRules(
      absl::Span<const std::string> territories);
  // Adds a version-1 rule for each seed territory that has none yet (dev and first deployment);
  // replicas seeding at once store one version between them.
  absl::Status SeedRules(const CallContext& ctx, absl::Span<const RuleInfo> rules);

  std::vector<RegionInfo> ListRegions();
  // Pings every shard and records its health (called by the health probe).
  void RefreshRegionHealth();

  absl::StatusOr<PlaceResult> PlacePatient(const CallContext& ctx, const std::string& patient_ref,
                                           const std::string& territory, bool allow_move);
  absl::StatusOr<std::vector<PatientLocation>> ResolvePatients(
      absl::Span<const std::string> patient_ids);

  absl::StatusOr<AssignResult> AssignDevice(const CallContext& ctx, const std::string& device_id,
                                            const std::string& patient_ref);
  absl::StatusOr<UnassignResult> UnassignDevice(const CallContext& ctx,
                                                const std::string& device_id);
  absl::StatusOr<std::vector<DeviceLocation>> ResolveDevices(absl::Span<const DeviceRef> devices);
  // One answer per id, in order (1 to kMaxBatch ids).
  absl::StatusOr<std::vector<TenantStatus>> ResolveTenants(absl::Span<const std::string> tenant_ids);

 private:
  pg::Pool& control_;
  const pg::ShardSet& shards_;
  const std::vector<residency::Region> regions_;
  const absl::Duration reassign_wait_;
  absl::Mutex health_mu_;
  std::map<std::string, std::pair<bool, absl::Time>> health_ ABSL_GUARDED_BY(health_mu_);
};

// The pseudonymous patient id: HMAC-SHA256 of the tenant's patient reference under the
// tenant's secret key, so the same reference always yields the same id and the id reveals
// nothing without the key.
std::string PseudonymFor(absl::string_view key, absl::string_view patient_ref);


}  // namespace medgate::routing

#endif  // MEDGATE_SERVICES_ROUTING_ROUTING_CORE_H_
