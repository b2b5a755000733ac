// Every statement the routing service runs against the control database.
#ifndef MEDGATE_SERVICES_ROUTING_SQL_H_
#define MEDGATE_SERVICES_ROUTING_SQL_H_

#include <vector>

#include "libs/pg/pool.h"

namespace medgate::routing::sql {

inline constexpr char kSelectTenant[] = "select_tenant";
inline constexpr char kInsertTenant[] = "insert_tenant";
inline constexpr char kUpdateTenant[] = "update_tenant";
inline constexpr char kSelectCurrentRules[] = "select_current_rules";
inline constexpr char kSelectCurrentRule[] = "select_current_rule";
inline constexpr char kShareRule[] = "share_rule";
inline constexpr char kLockRule[] = "lock_rule";
inline constexpr char kInsertRule[] = "insert_rule";
inline constexpr char kCountPlacedOutside[] = "count_placed_outside";
inline constexpr char kShareTenant[] = "share_tenant";
inline constexpr char kLockTenant[] = "lock_tenant";
inline constexpr char kCountTenantPatientsIn[] = "count_tenant_patients_in";
inline constexpr char kCountTenantPatientsOfTerritories[] = "count_tenant_patients_of_territories";
inline constexpr char kSelectPatient[] = "select_patient";
inline constexpr char kInsertPatient[] = "insert_patient";
inline constexpr char kResolvePatients[] = "resolve_patients";
inline constexpr char kSelectDevice[] = "select_device";
inline constexpr char kInsertDevice[] = "insert_device";
inline constexpr char kAssignLockedDevice[] = "assign_locked_device";
inline constexpr char kUnassignDevice[] = "unassign_device";
inline constexpr char kRestampUnassignment[] = "restamp_unassignment";
inline constexpr char kResolveDevices[] = "resolve_devices";
inline constexpr char kResolveTenants[] = "resolve_tenants";

inline const std::vector<pg::Statement>& Statements() {
  static const std::vector<pg::Statement> statements = {
      {kSelectTenant,
       "SELECT tenant_id, display_name, territories, region_ids, active, "
       "encode(pseudonym_key, 'hex'), "
       "extract(epoch from created_at)::float8, extract(epoch from updated_at)::float8, version "
       "FROM tenants WHERE tenant_id = $1"},
      {kInsertTenant,
       "INSERT INTO tenants (tenant_id, display_name, territories, region_ids, active, pseudonym_key) "
       "VALUES ($1, $2, $3::text[], CASE WHEN $7 THEN $4::text[] END, $5, decode($6, 'hex')) "
       "ON CONFLICT (tenant_id) DO NOTHING"},
      {kUpdateTenant,
       "UPDATE tenants SET display_name = $2, territories = $3::text[], "
       "region_ids = CASE WHEN $6 THEN $4::text[] END, "
       "active = $5, updated_at = now(), version = version + 1 WHERE tenant_id = $1"},
      {kSelectCurrentRules,
       "SELECT DISTINCT ON (territory) territory, version, region_ids, readable_from, "
       "extract(epoch from updated_at)::float8, updated_by FROM residency_rules "
       "ORDER BY territory, version DESC"},
      {kSelectCurrentRule,
       "SELECT version, region_ids FROM residency_rules WHERE territory = $1 "
       "ORDER BY version DESC LIMIT 1"},
      // A territory's rule, held while placements use it (shared) and while a put replaces it
      // (exclusive), until the transaction ends: a put waits for the placements under the version
      // it replaces, and a placement waiting for a put reads the new version. Advisory locks,
      // not row locks: they queue in order, so placements that keep overlapping cannot starve a
      // waiting put (a row's share lock takes in new sharers past a waiting writer). Key: the
      // class 7201 (residency rules) and the territory.
      {kShareRule, "SELECT pg_advisory_xact_lock_shared(7201, hashtext($1))"},
      {kLockRule, "SELECT pg_advisory_xact_lock(7201, hashtext($1))"},
      // No row returned: a concurrent put stored this version first.
      {kInsertRule,
       "INSERT INTO residency_rules (territory, version, region_ids, readable_from, updated_by) "
       "VALUES ($1, $2, $3::text[], $4::text[], $5) ON CONFLICT (territory, version) DO NOTHING "
       "RETURNING extract(epoch from updated_at)::float8"},
      // How many patients of a territory live in each of the regions a put drops (index
      // patients_territory_region: control migration 0012, read for those regions only).
      {kCountPlacedOutside,
       "SELECT region_id, count(*) FROM patients WHERE territory = $1 "
       "AND region_id = ANY($2::text[]) GROUP BY region_id ORDER BY region_id"},
      // A tenant, held while its placements read its narrowing (shared) and while an upsert
      // replaces it (exclusive): class 7202 (tenants) and the tenant id. As for the rules:
      // advisory locks queue in order, so placements cannot starve a waiting upsert.
      {kShareTenant, "SELECT pg_advisory_xact_lock_shared(7202, hashtext($1))"},
      {kLockTenant, "SELECT pg_advisory_xact_lock(7202, hashtext($1))"},
      // How many patients of a tenant live in each of the regions an upsert's narrowing drops
      // (index patients_tenant_region: control migration 0012).
      {kCountTenantPatientsIn,
       "SELECT region_id, count(*) FROM patients WHERE tenant_id = $1 "
       "AND region_id = ANY($2::text[]) GROUP BY region_id ORDER BY region_id"},
      // Walks the tenant's patients (patients_tenant_region): an upsert dropping a territory
      // is rare, and an index for it would cost every placement.
      {kCountTenantPatientsOfTerritories,
       "SELECT territory, count(*) FROM patients WHERE tenant_id = $1 "
       "AND territory = ANY($2::text[]) GROUP BY territory ORDER BY territory"},
      {kSelectPatient,
       "SELECT patient_id, tenant_id, territory, region_id, rule_version FROM patients "
       "WHERE patient_id = $1 AND tenant_id = $2"},
      {kInsertPatient,
       "INSERT INTO patients (patient_id, tenant_id, territory, region_id, rule_version) "
       "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (patient_id) DO NOTHING"},
      {kResolvePatients,
       "SELECT patient_id, tenant_id, region_id, territory FROM patients "
       "WHERE patient_id = ANY($1::text[])"},
      {kSelectDevice,
       "SELECT patient_id, former_patient_id, "
       "extract(epoch FROM (now() - updated_at))::float8 FROM devices "
       "WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE"},
      // A device's first row, when the look-up found none. A row a concurrent call committed
      // after that look-up (assigned, or assigned and unassigned since) is left as it is (no row
      // affected), for the caller to look again: its reassignment wait must be checked on it.
      {kInsertDevice,
       "INSERT INTO devices (tenant_id, device_id, patient_id, assigned_at) "
       "VALUES ($1, $2, $3, now()) ON CONFLICT (tenant_id, device_id) DO NOTHING"},
      // The row the look-up locked, unassigned. assigned_at: a device given back to the patient it
      // last fed within the reassignment wait ($4 seconds: an unassignment undone) continues that
      // assignment (its samples measured meanwhile are that patient's); any other starts now: a
      // device unassigned for longer may have been worn by someone else meanwhile.
      {kAssignLockedDevice,
       "UPDATE devices SET patient_id = $3, "
       "assigned_at = CASE WHEN former_patient_id = $3 AND assigned_at IS NOT NULL "
       "AND now() - updated_at < make_interval(secs => $4::float8) "
       "THEN assigned_at ELSE now() END, updated_at = now() "
       "WHERE tenant_id = $1 AND device_id = $2 AND patient_id IS NULL"},
      // The time it is written, not the transaction's start: the reassignment wait counts from when
      // the unassignment became visible (the transaction's last statement, just before COMMIT).
      // kRestampUnassignment moves it past the COMMIT; this stamp stands if that never runs.
      {kUnassignDevice,
       "UPDATE devices SET former_patient_id = patient_id, patient_id = NULL, "
       "updated_at = clock_timestamp() WHERE tenant_id = $1 AND device_id = $2"},
      // Run once the unassignment has committed, in a transaction of its own: a COMMIT can take
      // long (a slow disk, a synchronous standby), and look-ups answered the former patient ($3)
      // until it was done. Only while the device is still unassigned from that patient, and
      // never earlier than the stamp it replaces.
      {kRestampUnassignment,
       "UPDATE devices SET updated_at = greatest(updated_at, clock_timestamp()) "
       "WHERE tenant_id = $1 AND device_id = $2 AND patient_id IS NULL "
       "AND former_patient_id = $3"},
      // Every key answered, with its tenant's state even when the device is not assigned.
      {kResolveDevices,
       "SELECT k.tenant_id, k.device_id, p.patient_id, p.region_id, coalesce(t.active, false), "
       "floor(extract(epoch FROM d.assigned_at) * 1000000)::bigint "
       "FROM unnest($1::text[], $2::text[]) AS k(tenant_id, device_id) "
       "LEFT JOIN tenants t ON t.tenant_id = k.tenant_id "
       "LEFT JOIN devices d ON d.tenant_id = k.tenant_id AND d.device_id = k.device_id "
       "LEFT JOIN patients p ON p.patient_id = d.patient_id AND p.tenant_id = d.tenant_id"},
      {kResolveTenants, "SELECT tenant_id, active FROM tenants WHERE tenant_id = ANY($1::text[])"},
  };
  return statements;
}

}  // namespace medgate::routing::sql

#endif  // MEDGATE_SERVICES_ROUTING_SQL_H_
