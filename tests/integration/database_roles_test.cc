// The services' database roles against real PostgreSQL, after the project's migrations: each role
// holds exactly the rights its service uses, none can touch the audit trail but through the
// chaining functions, and the migrations refuse a role that holds more than a service should.
// (That the rights suffice is shown by every service's integration tests, which connect as them.)
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "libs/audit/audit_log.h"
#include "libs/migrate/migrate.h"
#include "libs/pg/database_roles.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_stack.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;
using test_support::PgCluster;

constexpr char kControl[] = "medgate";
constexpr char kShard[] = "shard";
constexpr char kVault[] = "vault";
constexpr char kDenied[] = "permission denied";
constexpr char kNoConnection[] = "may not connect";

std::string MigrationsDir(const std::string& kind) {
  return std::string(MEDGATE_SOURCE_DIR) + "/migrations/" + kind;
}

absl::Status Migrate(PgCluster& cluster, const std::string& db, const std::string& kind) {
  return test_support::MigrateDatabase(cluster.ConnectionString(db), kind);
}

// "role table PRIVILEGE" for every right a service role holds on a table of `db`, "role
// table(column) PRIVILEGE" for one it holds on a column only, "role function()" for every function
// it may execute (trigger functions aside: they cannot be called), and "function() SECURITY
// DEFINER settings" for every function run with its owner's rights; "role DATABASE PRIVILEGE"
// for its rights on `db` itself, and "role SCHEMA CREATE" if it may create objects in public.
std::set<std::string> RightsIn(PgCluster& cluster, const std::string& db) {
  pqxx::connection connection(cluster.ConnectionString(db));
  pqxx::nontransaction txn(connection);
  std::set<std::string> rights;
  for (const pqxx::row& row : txn.exec(
           "SELECT r.rolname, c.relname, p.priv FROM pg_class c "
           "CROSS JOIN pg_roles r "
           "CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', "
           "  'REFERENCES', 'TRIGGER']) AS p(priv) "
           "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v') "
           "AND r.rolname LIKE 'medgate\\_%' AND has_table_privilege(r.oid, c.oid, p.priv)")) {
    rights.insert(absl::StrCat(row[0].c_str(), " ", row[1].c_str(), " ", row[2].c_str()));
  }
  for (const pqxx::row& row : txn.exec(
           "SELECT r.rolname, c.relname, a.attname, p.priv FROM pg_class c "
           "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
           "CROSS JOIN pg_roles r "
           "CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p(priv) "
           "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v') "
           "AND r.rolname LIKE 'medgate\\_%' AND NOT has_table_privilege(r.oid, c.oid, p.priv) "
           "AND has_column_privilege(r.oid, c.oid, a.attnum, p.priv)")) {
    rights.insert(absl::StrCat(row[0].c_str(), " ", row[1].c_str(), "(", row[2].c_str(), ") ",
                               row[3].c_str()));
  }
  for (const pqxx::row& row : txn.exec(
           "SELECT r.rolname, f.proname FROM pg_proc f CROSS JOIN pg_roles r "
           "WHERE f.pronamespace = 'public'::regnamespace AND f.prorettype <> 'trigger'::regtype "
           "AND r.rolname LIKE 'medgate\\_%' AND has_function_privilege(r.oid, f.oid, 'EXECUTE')")) {
    rights.insert(absl::StrCat(row[0].c_str(), " ", row[1].c_str(), "()"));
  }
  for (const pqxx::row& row : txn.exec(
           "SELECT r.rolname, p.priv FROM pg_roles r "
           "CROSS JOIN unnest(ARRAY['CONNECT', 'TEMPORARY', 'CREATE']) AS p(priv) "
           "WHERE r.rolname LIKE 'medgate\\_%' "
           "AND has_database_privilege(r.oid, current_database(), p.priv)")) {
    rights.insert(absl::StrCat(row[0].c_str(), " DATABASE ", row[1].c_str()));
  }
  for (const pqxx::row& row : txn.exec(
           "SELECT rolname FROM pg_roles WHERE rolname LIKE 'medgate\\_%' "
           "AND has_schema_privilege(oid, 'public', 'CREATE')")) {
    rights.insert(absl::StrCat(row[0].c_str(), " SCHEMA CREATE"));
  }
  for (const pqxx::row& row : txn.exec(
           "SELECT proname, array_to_string(proconfig, ' ') FROM pg_proc "
           "WHERE pronamespace = 'public'::regnamespace AND prosecdef")) {
    rights.insert(absl::StrCat(row[0].c_str(), "() SECURITY DEFINER ", row[1].c_str()));
  }
  return rights;
}

// What `sql` run as `role` in `db` gives: "ok", kDenied, kNoConnection, or the error.
std::string RunAs(PgCluster& cluster, const std::string& db, absl::string_view role,
                  const std::string& sql) {
  try {
    pqxx::connection connection(cluster.ConnectionString(db, role));
    pqxx::work txn(connection);
    txn.exec(sql);
    txn.commit();
    return "ok";
  } catch (const pqxx::insufficient_privilege&) {
    // SQLSTATE 42501, "must be owner" included (libpqxx 6.4 leaves sqlstate() empty for it).
    return kDenied;
  } catch (const pqxx::broken_connection& e) {
    // The role may not connect to the database at all.
    if (absl::StrContains(e.what(), "permission denied for database")) return kNoConnection;
    return e.what();
  } catch (const pqxx::sql_error& e) {
    return e.what();
  }
}

class DatabaseRolesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start("roles");
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();
    absl::Status migrated = test_support::CreateAndMigrateEveryKind(*cluster_);
    ASSERT_TRUE(migrated.ok()) << migrated;
  }
  static void TearDownTestSuite() { delete cluster_; }

  static PgCluster* cluster_;
};

PgCluster* DatabaseRolesTest::cluster_ = nullptr;

TEST_F(DatabaseRolesTest, EachRoleHoldsExactlyTheRightsItsServiceUses) {
  std::set<std::string> control = {
      "medgate_routing tenants SELECT",       "medgate_routing tenants INSERT",
      "medgate_routing residency_rules SELECT",
      "medgate_routing residency_rules INSERT",
      "medgate_routing devices SELECT",       "medgate_routing devices INSERT",
      "medgate_routing patients SELECT",
      "medgate_routing patients INSERT",      "medgate_routing audit_append()",
      "medgate_sharing audit_log SELECT",     "medgate_sharing audit_head SELECT",
      "medgate_sharing audit_append()",
      // Tenants' territories, not their pseudonym keys.
      "medgate_sharing tenants(tenant_id) SELECT", "medgate_sharing tenants(territories) SELECT",
      "medgate_sharing tenants(active) SELECT",
      "audit_append() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_routing DATABASE CONNECT",     "medgate_sharing DATABASE CONNECT",
  };
  // Of a tenant, what PutTenant sets (control migrations 0013, 0016: its version); of a device,
  // its assignment (0013).
  for (const char* column :
       {"display_name", "territories", "region_ids", "active", "updated_at", "version"}) {
    control.insert(absl::StrCat("medgate_routing tenants(", column, ") UPDATE"));
  }
  for (const char* column : {"patient_id", "former_patient_id", "assigned_at", "updated_at"}) {
    control.insert(absl::StrCat("medgate_routing devices(", column, ") UPDATE"));
  }
  EXPECT_THAT(RightsIn(*cluster_, kControl), ::testing::ContainerEq(control));

  std::set<std::string> shard = {
      "medgate_consent consents SELECT",
      "medgate_consent consents INSERT",
      "medgate_consent consents UPDATE",
      "medgate_consent consent_versions SELECT",
      "medgate_consent consent_versions INSERT",
      "medgate_consent audit_append()",
      "medgate_ingest consents SELECT",
      "medgate_ingest consent_versions SELECT",
      "medgate_ingest vitals SELECT",
      "medgate_ingest vitals INSERT",
      "medgate_ingest device_cursors SELECT",
      "medgate_ingest device_cursors INSERT",
      "medgate_ingest device_cursors(max_seq) UPDATE",
      "medgate_ingest device_cursors(updated_at) UPDATE",
      "medgate_ingest medgate_advance_device_cursors()",
      "medgate_ingest medgate_ensure_vitals_partitions()",
      "medgate_ingest medgate_erase_vitals()",
      "medgate_ingest audit_append()",
      "medgate_ingest audit_append_many()",
      "medgate_sharing consents SELECT",
      "medgate_sharing consent_versions SELECT",
      "medgate_sharing share_grants SELECT",
      "medgate_sharing share_grants INSERT",
      "medgate_sharing share_grants(granted_by) UPDATE",
      "medgate_sharing share_grants(created_at) UPDATE",
      "medgate_sharing share_grants(expires_at) UPDATE",
      "medgate_sharing share_grants(revoked_at) UPDATE",
      "medgate_sharing key_destructions SELECT",
      "medgate_sharing key_destructions INSERT",
      "medgate_sharing key_destructions DELETE",
      "medgate_sharing audit_log SELECT",
      "medgate_sharing audit_head SELECT",
      "medgate_sharing audit_append()",
      "medgate_sharing audit_append_many()",
      "medgate_sharing record_chunks SELECT",
      "medgate_sharing record_chunks INSERT",
      "medgate_sharing record_chunks DELETE",
      "medgate_sharing tenant_record_usage SELECT",
      "medgate_sharing tenant_record_usage_changes SELECT",
      "medgate_sharing medgate_fold_record_usage()",
      "medgate_sharing medgate_lock_tenant_usage()",
      "medgate_sharing medgate_trim_revoked_grants()",
      "medgate_sharing medgate_vitals_summary()",
      "medgate_sharing chunk_purge_queue SELECT",
      "medgate_sharing chunk_purge_queue DELETE",
      "medgate_sharing record_requests SELECT",
      "medgate_sharing record_requests INSERT",
      "medgate_sharing record_requests DELETE",
      "audit_append() SECURITY DEFINER search_path=public, pg_temp",
      "audit_append_many() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_ensure_vitals_partitions() SECURITY DEFINER search_path=public, pg_temp "
      "TimeZone=UTC",
      "medgate_erase_vitals() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_note_records_added() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_note_records_removed() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_note_records_changed() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_fold_record_usage() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_queue_chunk_purge() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_trim_revoked_grants() SECURITY DEFINER search_path=public, pg_temp",
      "medgate_vitals_summary() SECURITY DEFINER search_path=public, pg_temp",
  };
  for (const char* table : {"records", "record_keys"}) {
    for (const char* right : {"SELECT", "INSERT", "DELETE"}) {
      shard.insert(absl::StrCat("medgate_sharing ", table, " ", right));
    }
  }
  // Of a record, its state and sealed metadata; of a key, its wrapping (shard migration 0030).
  for (const char* column : {"state", "retain_until", "content_type", "file_name", "sha256",
                             "content_type_sealed", "file_name_sealed", "sha256_sealed"}) {
    shard.insert(absl::StrCat("medgate_sharing records(", column, ") UPDATE"));
  }
  for (const char* column : {"wrapped_by", "wrapped_key"}) {
    shard.insert(absl::StrCat("medgate_sharing record_keys(", column, ") UPDATE"));
  }
  for (absl::string_view role : pg::kServiceRoles) {
    shard.insert(absl::StrCat(role, " DATABASE CONNECT"));
  }
  // The vitals partitions (made by the migrations and the keeper) are reached through vitals only.
  EXPECT_THAT(RightsIn(*cluster_, kShard), ::testing::ContainerEq(shard));

  const std::set<std::string> vault = {
      "medgate_sharing patient_keys SELECT", "medgate_sharing patient_keys INSERT",
      "medgate_sharing patient_keys DELETE",
      "medgate_sharing patient_keys(confirmed) UPDATE",
      "medgate_sharing patient_keys(kek_id) UPDATE",
      "medgate_sharing patient_keys(wrapped_key) UPDATE",
      "medgate_sharing DATABASE CONNECT"};
  EXPECT_THAT(RightsIn(*cluster_, kVault), ::testing::ContainerEq(vault));
}

TEST_F(DatabaseRolesTest, NoServiceCanRewriteTheAuditTrail) {
  const std::vector<std::string> tampering = {
      "UPDATE audit_log SET actor = 'nobody'",
      "DELETE FROM audit_log",
      "TRUNCATE audit_log",
      "INSERT INTO audit_log SELECT * FROM audit_log LIMIT 1",
      "UPDATE audit_head SET seq = 0",
      "ALTER TABLE audit_log DISABLE TRIGGER USER",
      "DROP TRIGGER audit_log_no_update ON audit_log",
      "DROP TABLE audit_log CASCADE",
      "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
      "$$ BEGIN RETURN NULL; END $$",
  };
  for (const char* db : {kControl, kShard}) {
    for (absl::string_view role : pg::kServiceRoles) {
      for (const std::string& sql : tampering) {
        // Consent and ingest may not even connect to the control database.
        const bool connects = std::string(db) == kShard || role == pg::kRoutingRole ||
                              role == pg::kSharingRole;
        EXPECT_EQ(RunAs(*cluster_, db, role, sql), connects ? kDenied : kNoConnection)
            << db << ", " << role << ": " << sql;
      }
    }
  }
  // A service appends through the chaining function, run with its owner's rights; the chain
  // verifies.
  audit::Entry entry;
  entry.actor = "spiffe://medgate.test/tenant/acme/practitioner/p-1";
  entry.tenant = "acme";
  entry.action = audit::Action::kRead;
  entry.object_type = "record";
  entry.object_id = "fr-1.r1";
  entry.decision = audit::Decision::kPermit;
  {
    pqxx::connection connection(cluster_->ConnectionString(kShard, pg::kSharingRole));
    pqxx::work txn(connection);
    absl::StatusOr<int64_t> seq = audit::Append(txn, entry);
    ASSERT_TRUE(seq.ok()) << seq.status();
    txn.commit();
  }
  // A role its service does not append with cannot call it.
  EXPECT_EQ(RunAs(*cluster_, kShard, pg::kRoutingRole,
                  "SELECT audit_append('a', 't', 'read', 'x', 'y', '', 'permit', '', '', '', 0, "
                  "'', '', ''::bytea, ''::bytea)"),
            kDenied);
  pqxx::connection owner(cluster_->ConnectionString(kShard));
  absl::StatusOr<audit::VerifyResult> verified = audit::VerifyChain(owner);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
  EXPECT_GE(verified->entries_checked, 1);
}

// The chaining functions hash the encoding their caller sends with the fields: an encoding that
// is not the fields' (here, of another reason) would leave an entry whose hash covers other data,
// reported by VerifyChain forever and hiding what follows it. It is refused, on a shard and on the
// control database, alone and within a batch, and nothing is appended.
TEST_F(DatabaseRolesTest, AnEntryWhoseEncodingIsNotItsFieldsIsRefused) {
  audit::Entry shown;
  shown.actor = "spiffe://medgate.test/service/consent";
  shown.tenant = "acme";
  shown.action = audit::Action::kCreate;
  shown.object_type = "consent";
  shown.object_id = "c-1";
  shown.patient_id = "pt_1";
  shown.decision = audit::Decision::kPermit;
  shown.reason = "GRANTED";
  shown.consent_version = 1;
  audit::Entry hashed = shown;
  hashed.reason = "REVOKED: withdrawn";
  const audit::EncodedEntry other = audit::EncodeEntry(hashed);
  const audit::EncodedEntry own = audit::EncodeEntry(shown);
  auto count = [&](const char* db) {
    pqxx::connection owner(cluster_->ConnectionString(db));
    pqxx::nontransaction q(owner);
    return q.exec1("SELECT count(*) FROM audit_log")[0].as<int64_t>();
  };
  for (const auto& [db, role] : {std::pair<const char*, absl::string_view>{kShard, pg::kConsentRole},
                                 {kControl, pg::kRoutingRole}}) {
    SCOPED_TRACE(db);
    const int64_t before = count(db);
    pqxx::connection connection(cluster_->ConnectionString(db, role));
    auto append = [&](const audit::EncodedEntry& encoding) {
      pqxx::work txn(connection);
      txn.exec_params(
          "SELECT audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::bigint, $12, $13, "
          "$14::bytea, $15::bytea)",
          shown.actor, shown.tenant, std::string(audit::ActionName(shown.action)),
          shown.object_type, shown.object_id, shown.patient_id,
          std::string(audit::DecisionName(shown.decision)), shown.reason, shown.purpose,
          shown.consent_id, shown.consent_version, shown.request_id, shown.origin,
          pqxx::binarystring(encoding.head), pqxx::binarystring(encoding.tail));
      txn.commit();
    };
    try {
      append(other);
      ADD_FAILURE() << "an entry hashed over other fields was appended";
    } catch (const pqxx::sql_error& e) {
      EXPECT_THAT(e.what(), HasSubstr("encoding is not that of its fields"));
    }
    EXPECT_EQ(count(db), before);
    append(own);  // its own encoding is taken
    EXPECT_EQ(count(db), before + 1);
    pqxx::connection owner(cluster_->ConnectionString(db));
    absl::StatusOr<audit::VerifyResult> verified = audit::VerifyChain(owner);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_TRUE(verified->ok) << verified->problem;
  }
  // In a batch, as ingest appends: the second entry's encoding is another's; none is appended.
  const int64_t before = count(kShard);
  pqxx::connection ingest(cluster_->ConnectionString(kShard, pg::kIngestRole));
  pqxx::work txn(ingest);
  try {
    txn.exec_params(
        "SELECT audit_append_many(ARRAY[$1, $1], ARRAY[$2, $2], ARRAY[$3, $3], ARRAY[$4, $4], "
        "ARRAY[$5, $5], ARRAY[$6, $6], ARRAY[$7, $7], ARRAY[$8, $8], ARRAY[$9, $9], "
        "ARRAY[$10, $10], ARRAY[$11::bigint, $11::bigint], ARRAY[$12, $12], ARRAY[$13, $13], "
        "ARRAY[$14::bytea, $14::bytea], ARRAY[$15::bytea, $16::bytea])",
        shown.actor, shown.tenant, std::string(audit::ActionName(shown.action)), shown.object_type,
        shown.object_id, shown.patient_id, std::string(audit::DecisionName(shown.decision)),
        shown.reason, shown.purpose, shown.consent_id, shown.consent_version, shown.request_id,
        shown.origin, pqxx::binarystring(own.head), pqxx::binarystring(own.tail),
        pqxx::binarystring(other.tail));
    ADD_FAILURE() << "a batch with an entry hashed over other fields was appended";
  } catch (const pqxx::sql_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("entry 2 of 2"));
  }
  txn.abort();
  EXPECT_EQ(count(kShard), before);

  // Fields the two encodings could disagree on are taken: non-ASCII, empty, a negative version,
  // text cut at a NUL; the chains verify.
  audit::Entry tricky = shown;
  tricky.actor = "spiffe://medgate.test/tenant/acme/practitioner/h\xc3\xa9l\xc3\xa8ne";
  tricky.object_id = "";
  tricky.consent_version = -1;
  tricky.reason = std::string("GRANTED\0hidden", 14);
  for (const auto& [db, role] : {std::pair<const char*, absl::string_view>{kShard, pg::kConsentRole},
                                 {kControl, pg::kRoutingRole}}) {
    SCOPED_TRACE(db);
    pqxx::connection connection(cluster_->ConnectionString(db, role));
    pqxx::work append(connection);
    absl::StatusOr<int64_t> seq = audit::Append(append, tricky);
    ASSERT_TRUE(seq.ok()) << seq.status();
    append.commit();
    pqxx::connection owner(cluster_->ConnectionString(db));
    absl::StatusOr<audit::VerifyResult> verified = audit::VerifyChain(owner);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_TRUE(verified->ok) << verified->problem;
    // The encoding is computed in the check's own statement, not by a call per field.
    pqxx::nontransaction q(owner);
    std::string plan;
    for (const pqxx::row& row :
         q.exec("EXPLAIN (VERBOSE) SELECT audit_encoded_tail(actor, tenant, action, object_type, "
                "object_id, patient_id, decision, reason, purpose, consent_id, consent_version, "
                "request_id, origin) FROM audit_log")) {
      plan += row[0].c_str();
    }
    EXPECT_THAT(plan, ::testing::Not(HasSubstr("audit_field("))) << plan;
  }
}

TEST_F(DatabaseRolesTest, AServiceCannotReachAnotherServicesData) {
  struct Attempt {
    const char* db;
    absl::string_view role;
    const char* sql;
    const char* result = kDenied;
  };
  const Attempt attempts[] = {
      {kShard, pg::kIngestRole, "SELECT * FROM record_chunks"},
      {kShard, pg::kIngestRole, "SELECT * FROM record_keys"},
      {kVault, pg::kIngestRole, "SELECT * FROM patient_keys", kNoConnection},
      {kShard, pg::kIngestRole, "INSERT INTO consents VALUES ('c', 'p', 't', 'CARE', '')"},
      {kShard, pg::kIngestRole, "DELETE FROM vitals"},
      // Ingest erases vitals one patient's code at a time, through medgate_erase_vitals only
      // (shard migration 0031); no other service may call it.
      {kShard, pg::kConsentRole, "SELECT medgate_erase_vitals('acme', 'p', '8867-4', 10)"},
      {kShard, pg::kSharingRole, "SELECT medgate_erase_vitals('acme', 'p', '8867-4', 10)"},
      {kShard, pg::kIngestRole, "SELECT medgate_erase_vitals('acme', 'p', '8867-4', 10)", "ok"},
      {kShard, pg::kConsentRole, "SELECT * FROM vitals"},
      {kShard, pg::kConsentRole, "SELECT * FROM records"},
      {kVault, pg::kConsentRole, "SELECT * FROM patient_keys", kNoConnection},
      {kShard, pg::kRoutingRole, "SELECT * FROM consents"},
      {kShard, pg::kRoutingRole, "SELECT * FROM vitals"},
      {kControl, pg::kConsentRole, "SELECT * FROM patients", kNoConnection},
      {kControl, pg::kIngestRole, "SELECT * FROM devices", kNoConnection},
      {kControl, pg::kSharingRole, "UPDATE tenants SET active = false"},
      {kControl, pg::kSharingRole, "SELECT * FROM devices"},
      {kShard, pg::kSharingRole, "SELECT * FROM vitals"},
      // A patient's data report counts their samples, through medgate_vitals_summary (shard
      // migration 0033), which answers a count and two times, never a value.
      {kShard, pg::kSharingRole, "SELECT * FROM medgate_vitals_summary('p')", "ok"},
      {kShard, pg::kConsentRole, "SELECT * FROM medgate_vitals_summary('p')"},
      {kShard, pg::kRoutingRole, "SELECT * FROM medgate_vitals_summary('p')"},
      {kShard, pg::kSharingRole, "DELETE FROM share_grants"},
      {kShard, pg::kSharingRole, "ALTER TABLE records ADD COLUMN x int"},
      {kShard, pg::kSharingRole, "CREATE TABLE scratch (id int)"},
      {kVault, pg::kSharingRole, "TRUNCATE patient_keys"},
      {kShard, pg::kSharingRole, "CREATE TEMPORARY TABLE scratch (id int)"},
      // No connection where the service has nothing to do.
      {kVault, pg::kRoutingRole, "SELECT 1", kNoConnection},
      // A service updates only the columns it changes: no record moves to another tenant,
      // patient or owner, no grant to another grantee or record, no key to another patient, no
      // tenant gets another pseudonym key, no device or cursor another tenant (migrations
      // control 0013, shard 0030, vault 0006).
      {kShard, pg::kSharingRole, "UPDATE records SET tenant_id = 'globex'"},
      {kShard, pg::kSharingRole, "UPDATE records SET patient_id = 'p', owner = 'o'"},
      {kShard, pg::kSharingRole, "UPDATE records SET size_bytes = 1"},
      {kShard, pg::kSharingRole, "UPDATE share_grants SET grantee = 'g'"},
      {kShard, pg::kSharingRole, "UPDATE share_grants SET record_id = 'r'"},
      {kShard, pg::kSharingRole, "UPDATE record_keys SET patient_id = 'p'"},
      {kVault, pg::kSharingRole, "UPDATE patient_keys SET patient_id = 'p'"},
      {kControl, pg::kRoutingRole, "UPDATE tenants SET pseudonym_key = '\\x00'"},
      {kControl, pg::kRoutingRole, "UPDATE devices SET tenant_id = 'globex'"},
      {kShard, pg::kIngestRole, "UPDATE device_cursors SET device_id = 'd'"},
      // What they do change, they may (no row here: the statements run, and change nothing).
      {kShard, pg::kSharingRole,
       "UPDATE share_grants SET revoked_at = now() WHERE grant_id = 'none'", "ok"},
      {kShard, pg::kSharingRole,
       "UPDATE records SET state = 'archived', retain_until = now() WHERE record_id = 'none'",
       "ok"},
      {kVault, pg::kSharingRole, "UPDATE patient_keys SET confirmed = true WHERE key_id = 'none'",
       "ok"},
      {kControl, pg::kRoutingRole, "UPDATE tenants SET active = false WHERE tenant_id = 'none'",
       "ok"},
  };
  for (const Attempt& a : attempts) {
    EXPECT_EQ(RunAs(*cluster_, a.db, a.role, a.sql), a.result) << a.db << ", " << a.role << ": "
                                                               << a.sql;
  }
  // Residency rules gain versions; none is changed, by routing either (which may not update them,
  // and the append-only trigger stops anyone who may).
  EXPECT_EQ(RunAs(*cluster_, kControl, pg::kRoutingRole,
                  "INSERT INTO residency_rules (territory, version, region_ids, readable_from, "
                  "updated_by) VALUES ('FR', 1, '{fr-1}', '{FR}', 'test')"),
            "ok");
  EXPECT_EQ(RunAs(*cluster_, kControl, pg::kRoutingRole,
                  "UPDATE residency_rules SET region_ids = '{de-1}'"),
            kDenied);
  {
    pqxx::connection owner(cluster_->ConnectionString(kControl));
    pqxx::work txn(owner);
    try {
      txn.exec0("UPDATE residency_rules SET region_ids = '{de-1}'");
      ADD_FAILURE() << "the schema's owner updated a residency rule";
    } catch (const pqxx::sql_error& e) {
      EXPECT_THAT(e.what(), HasSubstr("residency_rules is append-only: UPDATE refused"));
    }
  }
  // And what the services do is allowed.
  EXPECT_EQ(RunAs(*cluster_, kShard, pg::kIngestRole, "SELECT count(*) FROM vitals"), "ok");
  EXPECT_EQ(RunAs(*cluster_, kVault, pg::kSharingRole, "SELECT count(*) FROM patient_keys"), "ok");
}

TEST_F(DatabaseRolesTest, ThePartitionKeeperMakesTablesIngestCannotAlter) {
  ASSERT_EQ(RunAs(*cluster_, kShard, pg::kIngestRole,
                  "SELECT medgate_ensure_vitals_partitions(0, 14)"),
            "ok");
  pqxx::connection owner(cluster_->ConnectionString(kShard));
  pqxx::nontransaction txn(owner);
  // The partition 14 months ahead (the migrations make fewer) is new, and the schema owner's.
  const pqxx::row made = txn.exec1(
      "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_inherits i "
      "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'vitals'::regclass "
      "AND c.relname = to_char(now() + interval '14 months', '\"vitals_\"YYYY_MM')");
  EXPECT_EQ(std::string(made[1].c_str()), "medgate");
  const std::string partition = made[0].c_str();
  EXPECT_EQ(RunAs(*cluster_, kShard, pg::kIngestRole, "DROP TABLE " + partition), kDenied);
  EXPECT_EQ(RunAs(*cluster_, kShard, pg::kIngestRole, "SELECT * FROM " + partition), kDenied);
  // It makes the partitions of two years around now, not any number of tables.
  EXPECT_THAT(RunAs(*cluster_, kShard, pg::kIngestRole,
                    "SELECT medgate_ensure_vitals_partitions(0, 100000)"),
              HasSubstr("months_back and months_ahead must be 0 to 24"));
}

// Runs `statements` in `db` as the schema's owner (the cluster's superuser).
void ExecAsOwner(PgCluster& cluster, const std::string& db,
                 const std::vector<std::string>& statements) {
  pqxx::connection connection(cluster.ConnectionString(db));
  pqxx::nontransaction txn(connection);
  for (const std::string& statement : statements) txn.exec0(statement);
}

// The last migration applied to `db`.
int LastApplied(PgCluster& cluster, const std::string& db) {
  pqxx::connection connection(cluster.ConnectionString(db));
  pqxx::nontransaction txn(connection);
  return txn.exec1("SELECT max(version) FROM schema_migrations")[0].as<int>();
}

// The number of the migration of `kind` whose file name ends in `suffix`.
int VersionOf(const std::string& kind, const std::string& suffix) {
  absl::StatusOr<std::vector<migrate::Migration>> migrations =
      migrate::LoadMigrations(MigrationsDir(kind));
  EXPECT_TRUE(migrations.ok()) << migrations.status();
  for (const migrate::Migration& m : migrations.value_or(std::vector<migrate::Migration>{})) {
    if (absl::EndsWith(m.file_name, suffix)) return m.version;
  }
  ADD_FAILURE() << "no " << kind << " migration named *" << suffix;
  return -1;
}

// The migrations make the roles a server lacks, able to log in once ops give them a password, and
// refuse one that holds more than a service should.
TEST(DatabaseRolesMigrationTest, MakesMissingRolesAndRefusesOverprivilegedOnes) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("roles-fresh");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  const int roles_migration = VersionOf("shard", "_service_roles.sql");
  const int connect_migration = VersionOf("shard", "_database_connect.sql");
  std::vector<std::string> drop;
  for (absl::string_view role : pg::kServiceRoles) drop.push_back(absl::StrCat("DROP ROLE ", role));
  ExecAsOwner(cluster, kControl, drop);
  absl::Status control = Migrate(cluster, kControl, "control");
  ASSERT_TRUE(control.ok()) << control;
  {
    pqxx::connection admin(cluster.ConnectionString());
    pqxx::nontransaction txn(admin);
    for (absl::string_view role : pg::kServiceRoles) {
      const pqxx::row made = txn.exec_params1(
          "SELECT rolcanlogin, rolsuper, rolcreaterole, rolpassword IS NULL FROM pg_authid "
          "WHERE rolname = $1",
          std::string(role));
      EXPECT_TRUE(made[0].as<bool>()) << role;
      EXPECT_FALSE(made[1].as<bool>()) << role;
      EXPECT_FALSE(made[2].as<bool>()) << role;
      EXPECT_TRUE(made[3].as<bool>()) << role << " has a password";
    }
  }
  // Each way a role could do more than its grants, set up, refused by name, then undone. The
  // refused migration leaves nothing: the one before it is the last applied.
  struct Case {
    std::string grant;
    std::string message;
    std::string undo;
  };
  const std::vector<Case> cases = {
      {"ALTER ROLE medgate_ingest CREATEROLE",
       "role medgate_ingest is a superuser or may create roles", "ALTER ROLE medgate_ingest NOCREATEROLE"},
      {"GRANT medgate TO medgate_sharing", "role medgate_sharing has the rights of medgate:",
       "REVOKE medgate FROM medgate_sharing"},
      {"GRANT pg_write_all_data TO medgate_consent",
       "role medgate_consent has the rights of pg_write_all_data",
       "REVOKE pg_write_all_data FROM medgate_consent"},
      {"GRANT medgate_sharing TO medgate_routing",
       "role medgate_routing has the rights of medgate_sharing",
       "REVOKE medgate_sharing FROM medgate_routing"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string db = absl::StrCat("shard_", i);
    ExecAsOwner(cluster, kControl, {"CREATE DATABASE " + db, cases[i].grant});
    absl::Status refused = Migrate(cluster, db, "shard");
    EXPECT_THAT(std::string(refused.message()), HasSubstr(cases[i].message)) << cases[i].grant;
    ExecAsOwner(cluster, kControl, {cases[i].undo});
    EXPECT_EQ(LastApplied(cluster, db), roles_migration - 1) << cases[i].grant;
  }
  // A role owning a table where the migrations run.
  ExecAsOwner(cluster, kControl, {"CREATE DATABASE shard_owned"});
  ExecAsOwner(cluster, "shard_owned",
              {"CREATE TABLE planted (id int)", "ALTER TABLE planted OWNER TO medgate_ingest"});
  absl::Status refused = Migrate(cluster, "shard_owned", "shard");
  EXPECT_THAT(std::string(refused.message()),
              HasSubstr("role medgate_ingest owns objects in database shard_owned"));
  // Rights held before the migrations are revoked: the grants are all a role has. (The password
  // as ops would set it, once the migrations have made the role.)
  ExecAsOwner(cluster, kControl,
              {"CREATE DATABASE shard_granted",
               absl::StrCat("ALTER ROLE medgate_ingest PASSWORD '", cluster.password(), "'")});
  ExecAsOwner(cluster, "shard_granted",
              {"CREATE TABLE spare (id int)", "GRANT ALL ON spare TO medgate_ingest"});
  ASSERT_TRUE(Migrate(cluster, "shard_granted", "shard").ok());
  EXPECT_EQ(RunAs(cluster, "shard_granted", pg::kIngestRole, "SELECT * FROM spare"), kDenied);

  // Migrations run by a role that does not own the database can neither take PUBLIC's right to
  // connect away nor grant the services theirs: they stop, saying so. On an open database, and on
  // one a DBA has closed to PUBLIC already (where the services could not connect).
  ExecAsOwner(cluster, kControl,
              {absl::StrCat("CREATE ROLE schema_owner LOGIN PASSWORD '", cluster.password(), "'"),
               "CREATE DATABASE shard_foreign", "CREATE DATABASE shard_closed",
               "REVOKE CONNECT, TEMPORARY ON DATABASE shard_closed FROM PUBLIC",
               "GRANT CONNECT ON DATABASE shard_closed TO schema_owner"});
  for (const char* db : {"shard_foreign", "shard_closed"}) {
    ExecAsOwner(cluster, db, {"GRANT CREATE ON SCHEMA public TO schema_owner"});
    refused = test_support::MigrateDatabase(cluster.ConnectionString(db, "schema_owner"), "shard");
    EXPECT_THAT(std::string(refused.message()),
                HasSubstr("right to connect or make temporary tables could not be set: the role "
                          "running the migrations (schema_owner) must own the database"))
        << db;
    EXPECT_EQ(LastApplied(cluster, db), connect_migration - 1) << db;
  }
}

// A service role that belongs to a role without inheriting its rights (NOINHERIT) may SET ROLE to
// it: the migrations refuse it by membership, as they refuse membership of any role that is a
// superuser, where the roles' first check (by inherited rights, of listed roles) let both by.
TEST(DatabaseRolesMigrationTest, AServiceRoleThatMaySetRoleToAPowerfulRoleIsRefused) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("roles-member");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  ASSERT_TRUE(Migrate(cluster, kControl, "control").ok());
  const int vetting = VersionOf("shard", "_service_updates_by_column.sql");
  struct Case {
    std::vector<std::string> grant;
    std::string message;
    std::vector<std::string> undo;
  };
  const std::vector<Case> cases = {
      {{"ALTER ROLE medgate_sharing NOINHERIT", "GRANT medgate TO medgate_sharing"},
       "role medgate_sharing is a member of medgate (it may SET ROLE to it",
       {"REVOKE medgate FROM medgate_sharing", "ALTER ROLE medgate_sharing INHERIT"}},
      {{"CREATE ROLE dba SUPERUSER NOLOGIN", "GRANT dba TO medgate_ingest"},
       "role medgate_ingest is a member of dba",
       {"REVOKE dba FROM medgate_ingest", "DROP ROLE dba"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string db = absl::StrCat("shard_member_", i);
    std::vector<std::string> setup = {"CREATE DATABASE " + db};
    setup.insert(setup.end(), cases[i].grant.begin(), cases[i].grant.end());
    ExecAsOwner(cluster, kControl, setup);
    absl::Status refused = Migrate(cluster, db, "shard");
    EXPECT_THAT(std::string(refused.message()), HasSubstr(cases[i].message)) << i;
    EXPECT_EQ(LastApplied(cluster, db), vetting - 1) << i;
    ExecAsOwner(cluster, kControl, cases[i].undo);
    // Once undone, the migrations go on.
    absl::Status migrated = Migrate(cluster, db, "shard");
    EXPECT_TRUE(migrated.ok()) << i << ": " << migrated;
  }
}

// A database whose public schema lets everyone create objects (one upgraded from a server before
// PostgreSQL 15 keeps that; a grant can add it back) is closed by the migrations: a service role
// that could plant a function there would have the owner-rights functions run it, as the owner.
// A service role that still could, through a role it belongs to, stops them.
TEST(DatabaseRolesMigrationTest, NoServiceRoleMayCreateObjectsInPublic) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("roles-public");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  ExecAsOwner(cluster, kControl,
              {"CREATE DATABASE shard_open", "CREATE DATABASE vault_open",
               "CREATE DATABASE shard_group", "CREATE ROLE planters NOLOGIN"});
  for (const auto& [db, kind] : std::vector<std::pair<std::string, std::string>>{
           {kControl, "control"}, {"shard_open", "shard"}, {"vault_open", "vault"}}) {
    ExecAsOwner(cluster, db, {"GRANT CREATE ON SCHEMA public TO PUBLIC"});
    absl::Status migrated = Migrate(cluster, db, kind);
    ASSERT_TRUE(migrated.ok()) << db << ": " << migrated;
    for (const std::string& right : RightsIn(cluster, db)) {
      EXPECT_THAT(right, Not(HasSubstr("SCHEMA CREATE"))) << db;
    }
    // What the attack needs, refused: a function of the service's own in public.
    EXPECT_EQ(RunAs(cluster, db, kind == "vault" ? pg::kSharingRole : pg::kRoutingRole,
                    "CREATE FUNCTION public.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
              kDenied)
        << db;
  }
  // Through a role it belongs to.
  ExecAsOwner(cluster, "shard_group", {"GRANT CREATE ON SCHEMA public TO planters"});
  ExecAsOwner(cluster, kControl, {"GRANT planters TO medgate_ingest"});
  absl::Status refused = Migrate(cluster, "shard_group", "shard");
  EXPECT_THAT(std::string(refused.message()),
              HasSubstr("role medgate_ingest may create objects in schema public of database "
                        "shard_group"));
  EXPECT_EQ(LastApplied(cluster, "shard_group"),
            VersionOf("shard", "_no_objects_in_public_but_the_owners.sql") - 1);
}

// A device feeds patients of its own tenant only, whoever writes the row (control migration 0014):
// routing's own statement giving an acme device a globex patient is refused by the database.
TEST_F(DatabaseRolesTest, ADeviceCannotBeGivenAnotherTenantsPatient) {
  ExecAsOwner(*cluster_, kControl,
              {"INSERT INTO tenants (tenant_id, display_name, territories, active, pseudonym_key) "
               "VALUES ('t-acme', 'Acme', '{FR}', true, decode(repeat('00', 32), 'hex')), "
               "('t-globex', 'Globex', '{FR}', true, decode(repeat('01', 32), 'hex'))",
               "INSERT INTO patients (patient_id, tenant_id, territory, region_id, rule_version) "
               "VALUES ('p-acme', 't-acme', 'FR', 'fr-1', 1), "
               "('p-globex', 't-globex', 'FR', 'fr-1', 1)"});
  const std::string crossed =
      RunAs(*cluster_, kControl, pg::kRoutingRole,
            "INSERT INTO devices (tenant_id, device_id, patient_id) "
            "VALUES ('t-acme', 'd-1', 'p-globex')");
  EXPECT_THAT(crossed, HasSubstr("devices_patient_of_their_tenant"));
  EXPECT_EQ(RunAs(*cluster_, kControl, pg::kRoutingRole,
                  "INSERT INTO devices (tenant_id, device_id, patient_id) "
                  "VALUES ('t-acme', 'd-1', 'p-acme')"),
            "ok");
  EXPECT_THAT(RunAs(*cluster_, kControl, pg::kRoutingRole,
                    "UPDATE devices SET patient_id = 'p-globex' WHERE device_id = 'd-1'"),
              HasSubstr("devices_patient_of_their_tenant"));
  // Unassigned, it names no patient: nothing to check.
  EXPECT_EQ(RunAs(*cluster_, kControl, pg::kRoutingRole,
                  "UPDATE devices SET patient_id = NULL WHERE device_id = 'd-1'"),
            "ok");
}

}  // namespace
}  // namespace medgate
