// Every statement the consent service runs against the regional shards.
#ifndef MEDGATE_SERVICES_CONSENT_SQL_H_
#define MEDGATE_SERVICES_CONSENT_SQL_H_

#include <vector>

#include "libs/pg/pool.h"

namespace medgate::consent::sql {

inline constexpr char kInsertConsent[] = "insert_consent";
inline constexpr char kLockConsentByKey[] = "lock_consent_by_key";
inline constexpr char kSelectConsentById[] = "select_consent_by_id";
inline constexpr char kLatestVersion[] = "latest_consent_version";
inline constexpr char kVersionByRequestId[] = "consent_version_by_request_id";
inline constexpr char kOtherChangeByRequestId[] = "consent_other_change_by_request_id";
inline constexpr char kInsertVersion[] = "insert_consent_version";
inline constexpr char kListConsents[] = "list_consents";
inline constexpr char kListVersions[] = "list_consent_versions";
inline constexpr char kLockPatientConsents[] = "lock_patient_consents";
inline constexpr char kCountPatientConsents[] = "count_patient_consents";

// Times travel as microseconds since the Unix epoch (int8), in both directions, so nothing
// depends on text formats or time zones.
// A version's columns, as VersionFromRow reads them (consent_core.cc).
#define MEDGATE_CONSENT_VERSION_COLUMNS                                                      \
  "version, state, (extract(epoch FROM valid_from) * 1000000)::int8, "                      \
  "(extract(epoch FROM valid_until) * 1000000)::int8, evidence_ref, reason, recorded_by, "  \
  "(extract(epoch FROM recorded_at) * 1000000)::int8, request_id, categories"

// The timestamptz `micros` (an int8 parameter: microseconds since 1970) stands for, exactly: an
// int8 times an interval goes through float8, exact only within 2^53 µs of 1970 (years 1685 to
// 2255), which stored 9999-12-31T23:59:59.999999Z as 10000-01-01.
#define MEDGATE_FROM_MICROS(micros)                                                     \
  "(timestamptz 'epoch' + (" micros "::int8 / 1000000) * interval '1 second' + (" micros \
  "::int8 % 1000000) * interval '1 microsecond')"

inline const std::vector<pg::Statement>& Statements() {
  static const std::vector<pg::Statement> statements = {
      {kInsertConsent,
       "INSERT INTO consents (consent_id, patient_id, tenant_id, purpose, actor) "
       "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (patient_id, purpose, actor) DO NOTHING"},
      // Serializes the writers of one consent, so versions are numbered without gaps or races.
      {kLockConsentByKey,
       "SELECT consent_id, tenant_id FROM consents "
       "WHERE patient_id = $1 AND purpose = $2 AND actor = $3 FOR UPDATE"},
      {kSelectConsentById,
       "SELECT patient_id, tenant_id, purpose, actor FROM consents WHERE consent_id = $1"},
      {kLatestVersion,
       "SELECT " MEDGATE_CONSENT_VERSION_COLUMNS
       " FROM consent_versions WHERE consent_id = $1 ORDER BY version DESC LIMIT 1"},
      // The grant or revocation ($4: its state) an earlier call of the same caller ($3) with
      // this request id recorded, if any (a late retry). Request ids are each caller's own:
      // another's that happens to be the same is a new change.
      {kVersionByRequestId,
       "SELECT " MEDGATE_CONSENT_VERSION_COLUMNS
       " FROM consent_versions WHERE consent_id = $1 AND request_id = $2 AND recorded_by = $3 "
       "AND state = $4 ORDER BY version LIMIT 1"},
      // A change of another consent ($3), or of another kind ($4: the state it recorded), that
      // the same caller ($1) recorded under this request id ($2): a request id names one change
      // (shard migration 0035 indexes them).
      {kOtherChangeByRequestId,
       "SELECT consent_id, version, state FROM consent_versions WHERE recorded_by = $1 "
       "AND request_id = $2 AND (consent_id <> $3 OR state <> $4) ORDER BY consent_id, version "
       "LIMIT 1"},
      {kInsertVersion,
       "INSERT INTO consent_versions (consent_id, version, state, valid_from, valid_until, "
       "evidence_ref, reason, recorded_by, recorded_at, request_id, categories) VALUES ($1, $2, "
       "$3, " MEDGATE_FROM_MICROS("$4") ", " MEDGATE_FROM_MICROS("$5") ", $6, $7, $8, "
       MEDGATE_FROM_MICROS("$9") ", $10, $11::text[])"},
      // A patient's consents with their latest version; $2 = '' for every purpose.
      {kListConsents,
       "SELECT c.consent_id, c.purpose, c.actor, v.version, v.state, "
       "(extract(epoch FROM v.valid_from) * 1000000)::int8, "
       "(extract(epoch FROM v.valid_until) * 1000000)::int8, v.evidence_ref, v.reason, "
       "v.recorded_by, (extract(epoch FROM v.recorded_at) * 1000000)::int8, v.request_id, "
       "v.categories "
       "FROM consents c CROSS JOIN LATERAL ("
       "  SELECT * FROM consent_versions cv WHERE cv.consent_id = c.consent_id "
       "  ORDER BY version DESC LIMIT 1) v "
       "WHERE c.patient_id = $1 AND ($2 = '' OR c.purpose = $2)"},
      // New consents of one patient take turns, so the bound on their number holds.
      {kLockPatientConsents, "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))"},
      // The patient's consents narrowed to an actor (the bound's; the tenant-wide ones, one a
      // purpose, are not counted).
      {kCountPatientConsents,
       "SELECT count(*) FROM consents WHERE patient_id = $1 AND actor <> ''"},
      // A consent's versions after version $2, oldest first, at most $3 of them.
      {kListVersions,
       "SELECT " MEDGATE_CONSENT_VERSION_COLUMNS
       " FROM consent_versions WHERE consent_id = $1 AND version > $2 ORDER BY version "
       "LIMIT $3"},
  };
  return statements;
}

#undef MEDGATE_CONSENT_VERSION_COLUMNS
#undef MEDGATE_FROM_MICROS

}  // namespace medgate::consent::sql

#endif  // MEDGATE_SERVICES_CONSENT_SQL_H_
