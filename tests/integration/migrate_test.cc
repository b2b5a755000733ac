// Migrations against real PostgreSQL: fresh, re-run, tampered, gap, duplicate; medgate-migrate.
#include <algorithm>
#include <cstdlib>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "libs/migrate/migrate.h"
#include "tests/support/pg_cluster.h"

namespace medgate::migrate {
namespace {

using ::testing::HasSubstr;
using test_support::PgClusterSet;
namespace fs = std::filesystem;

std::string SourceDir() { return MEDGATE_SOURCE_DIR; }

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

class MigrateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<PgClusterSet>> clusters = PgClusterSet::Start();
    ASSERT_TRUE(clusters.ok()) << clusters.status();
    clusters_ = clusters->release();
  }
  static void TearDownTestSuite() { delete clusters_; }

  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("medgate-migrate-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // Each test gets its own database on the control server.
    db_ = std::string("t_") + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (char& c : db_) c = static_cast<char>(std::tolower(c));
    pqxx::connection admin(clusters_->control().ConnectionString());
    pqxx::nontransaction txn(admin);
    txn.exec0("DROP DATABASE IF EXISTS " + txn.quote_name(db_));
    txn.exec0("CREATE DATABASE " + txn.quote_name(db_));
  }
  void TearDown() override { fs::remove_all(dir_); }

  pqxx::connection Connect() { return pqxx::connection(clusters_->control().ConnectionString(db_)); }

  static PgClusterSet* clusters_;
  fs::path dir_;
  std::string db_;
};

PgClusterSet* MigrateTest::clusters_ = nullptr;

TEST_F(MigrateTest, AppliesTheProjectMigrationsThenReRunIsANoOp) {
  for (const char* kind : {"control", "shard"}) {
    absl::StatusOr<std::vector<Migration>> migrations = LoadMigrations(SourceDir() + "/migrations/" + kind);
    ASSERT_TRUE(migrations.ok()) << migrations.status();
    ASSERT_FALSE(migrations->empty());
    pqxx::connection c = Connect();
    pqxx::nontransaction reset(c);
    reset.exec0("DROP SCHEMA public CASCADE; CREATE SCHEMA public;");
    reset.commit();
    absl::StatusOr<MigrateResult> first = Apply(c, *migrations);
    ASSERT_TRUE(first.ok()) << kind << ": " << first.status();
    EXPECT_EQ(first->applied.size(), migrations->size());
    EXPECT_EQ(first->already_applied, 0);
    absl::StatusOr<MigrateResult> second = Apply(c, *migrations);
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_TRUE(second->applied.empty());
    EXPECT_EQ(second->already_applied, static_cast<int>(migrations->size()));
    pqxx::nontransaction check(c);
    EXPECT_EQ(check.exec1("SELECT count(*) FROM schema_migrations")[0].as<size_t>(), migrations->size());
    EXPECT_EQ(check.exec1("SELECT count(*) FROM audit_head")[0].as<int>(), 1);
  }
}

// An index built beforehand (CREATE INDEX CONCURRENTLY, without blocking writes on a large
// table) that a migration then keeps: helpers to prepare one.
void Exec(pqxx::connection& c, const std::string& sql) {
  pqxx::nontransaction n(c);
  n.exec0(sql);
}

int64_t Oid(pqxx::connection& c, const std::string& index) {
  pqxx::nontransaction n(c);
  return n.exec1("SELECT '" + index + "'::regclass::oid")[0].as<int64_t>();
}

size_t Applied(pqxx::connection& c) {
  pqxx::nontransaction n(c);
  return n.exec1("SELECT count(*) FROM schema_migrations")[0].as<size_t>();
}

// Marks `index` valid or not, as a concurrent build that failed leaves it.
void SetValid(pqxx::connection& c, const std::string& index, bool valid) {
  Exec(c, std::string("UPDATE pg_index SET indisvalid = ") + (valid ? "true" : "false") +
             " WHERE indexrelid = '" + index + "'::regclass");
}

// The migrations of `kind` before the one whose file name ends with `suffix`, applied to a fresh
// schema of `c`; all of them in `all`.
std::vector<Migration> ApplyBefore(pqxx::connection& c, const char* kind,
                                   const std::string& suffix, std::vector<Migration>* all) {
  absl::StatusOr<std::vector<Migration>> loaded =
      LoadMigrations(SourceDir() + "/migrations/" + kind);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return {};
  *all = *std::move(loaded);
  auto it = std::find_if(all->begin(), all->end(),
                         [&](const Migration& m) { return m.file_name.ends_with(suffix); });
  EXPECT_NE(it, all->end()) << suffix;
  std::vector<Migration> before(all->begin(), it);
  Exec(c, "DROP SCHEMA public CASCADE; CREATE SCHEMA public;");
  absl::StatusOr<MigrateResult> applied = Apply(c, before);
  EXPECT_TRUE(applied.ok()) << applied.status();
  return before;
}

// The audit logs' time indexes may be built beforehand, without blocking appends, on a large log;
// the migration keeps them when they are usable and as it builds them, and otherwise stops.
TEST_F(MigrateTest, AuditTimeIndexesBuiltBeforehandAreKeptOnlyWhenValid) {
  for (const char* kind : {"control", "shard"}) {
    SCOPED_TRACE(kind);
    pqxx::connection c = Connect();
    std::vector<Migration> all;
    const std::vector<Migration> before = ApplyBefore(c, kind, "_audit_log_by_time.sql", &all);
    ASSERT_FALSE(before.empty());
    // Built beforehand, one of them without its WHERE clause: refused, nothing recorded.
    Exec(c, "CREATE INDEX CONCURRENTLY audit_log_time ON audit_log (at_us, seq)");
    Exec(c, "CREATE INDEX CONCURRENTLY audit_log_patient_time ON audit_log (patient_id, at_us, seq)");
    absl::StatusOr<MigrateResult> wrong = Apply(c, all);
    ASSERT_FALSE(wrong.ok());
    EXPECT_THAT(std::string(wrong.status().message()),
                HasSubstr("DROP INDEX CONCURRENTLY audit_log_patient_time"));
    EXPECT_EQ(Applied(c), before.size());
    // As built, but left invalid (a concurrent build that failed): refused too.
    Exec(c, "DROP INDEX audit_log_patient_time");
    Exec(c, "CREATE INDEX CONCURRENTLY audit_log_patient_time ON audit_log (patient_id, at_us, seq) "
           "WHERE patient_id <> ''");
    SetValid(c, "audit_log_time", false);
    absl::StatusOr<MigrateResult> invalid = Apply(c, all);
    ASSERT_FALSE(invalid.ok());
    EXPECT_THAT(std::string(invalid.status().message()), HasSubstr("audit_log_time"));
    EXPECT_THAT(std::string(invalid.status().message()), HasSubstr("not valid"));
    EXPECT_EQ(Applied(c), before.size());
    // Valid and as built: kept (not built again), and the migrations go on.
    SetValid(c, "audit_log_time", true);
    const int64_t built = Oid(c, "audit_log_time");
    absl::StatusOr<MigrateResult> kept = Apply(c, all);
    ASSERT_TRUE(kept.ok()) << kept.status();
    EXPECT_EQ(Applied(c), all.size());
    EXPECT_EQ(Oid(c, "audit_log_time"), built);
  }
}

// A migration that needs a lock a long transaction holds, or a migrator that finds the migration
// lock taken, stops after the lock timeout instead of waiting (and making every query of the
// services on that table wait behind it) without bound. Run again, it goes through.
TEST_F(MigrateTest, WaitsForALockOnlyAsLongAsTheLockTimeout) {
  WriteFile(dir_ / "0001_create_a.sql", "CREATE TABLE a (id int);");
  pqxx::connection c = Connect();
  ASSERT_TRUE(Apply(c, *LoadMigrations(dir_)).ok());
  WriteFile(dir_ / "0002_alter_a.sql", "ALTER TABLE a ADD COLUMN label text;");
  {
    pqxx::connection reader = Connect();
    pqxx::work long_transaction(reader);
    long_transaction.exec0("LOCK TABLE a IN ACCESS SHARE MODE");
    absl::StatusOr<MigrateResult> stopped =
        Apply(c, *LoadMigrations(dir_), absl::Milliseconds(200));
    ASSERT_FALSE(stopped.ok());
    EXPECT_EQ(stopped.status().code(), absl::StatusCode::kUnavailable) << stopped.status();
    EXPECT_THAT(std::string(stopped.status().message()),
                HasSubstr("migration '0002_alter_a.sql' waited longer than the lock timeout"));
    EXPECT_EQ(Applied(c), 1u);
  }
  {
    pqxx::connection other = Connect();
    pqxx::nontransaction holder(other);
    holder.exec("SELECT pg_advisory_lock(x'6d656467617465'::int8)");
    absl::StatusOr<MigrateResult> locked =
        Apply(c, *LoadMigrations(dir_), absl::Milliseconds(200));
    EXPECT_EQ(locked.status().code(), absl::StatusCode::kUnavailable) << locked.status();
    EXPECT_THAT(std::string(locked.status().message()),
                HasSubstr("another migrator has held the migration lock"));
  }
  absl::StatusOr<MigrateResult> again = Apply(c, *LoadMigrations(dir_), absl::Milliseconds(200));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(Applied(c), 2u);
}

TEST_F(MigrateTest, RefusesAnAppliedFileThatChanged) {
  WriteFile(dir_ / "0001_create_a.sql", "CREATE TABLE a (id int);");
  WriteFile(dir_ / "0002_create_b.sql", "CREATE TABLE b (id int);");
  pqxx::connection c = Connect();
  ASSERT_TRUE(Apply(c, *LoadMigrations(dir_)).ok());
  WriteFile(dir_ / "0001_create_a.sql", "CREATE TABLE a (id int, sneaky text);");
  WriteFile(dir_ / "0003_create_c.sql", "CREATE TABLE c (id int);");
  absl::StatusOr<MigrateResult> result = Apply(c, *LoadMigrations(dir_));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("0001_create_a.sql"));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("changed after it was applied"));
  // Nothing after the refusal was applied.
  pqxx::nontransaction check(c);
  EXPECT_EQ(check.exec1("SELECT to_regclass('public.c') IS NULL")[0].as<bool>(), true);
}

TEST_F(MigrateTest, RefusesGapsDuplicatesAndBadNames) {
  WriteFile(dir_ / "0001_a.sql", "SELECT 1;");
  WriteFile(dir_ / "0003_c.sql", "SELECT 1;");
  absl::StatusOr<std::vector<Migration>> gap = LoadMigrations(dir_);
  EXPECT_EQ(gap.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(gap.status().message()), HasSubstr("skip number 2"));

  WriteFile(dir_ / "0002_b.sql", "SELECT 1;");
  WriteFile(dir_ / "002_b_again.sql", "SELECT 1;");
  absl::StatusOr<std::vector<Migration>> dup = LoadMigrations(dir_);
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(dup.status().message()), HasSubstr("share number 2"));

  fs::remove(dir_ / "002_b_again.sql");
  WriteFile(dir_ / "init.sql", "SELECT 1;");
  absl::StatusOr<std::vector<Migration>> bad = LoadMigrations(dir_);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("'init.sql' is not named NNNN_description.sql"));

  fs::remove(dir_ / "init.sql");

  // A folder named like a migration would read as an empty one, recorded as applied.
  fs::create_directory(dir_ / "0003_folder.sql");
  absl::StatusOr<std::vector<Migration>> folder = LoadMigrations(dir_);
  EXPECT_THAT(std::string(folder.status().message()),
              HasSubstr("migration '0003_folder.sql' is not a regular file"));
  fs::remove(dir_ / "0003_folder.sql");
  // A folder that cannot be listed is an error, not an exception (as another user than root,
  // whom no mode stops).
  fs::permissions(dir_, fs::perms::owner_write | fs::perms::owner_exec | fs::perms::others_exec |
                            fs::perms::others_write);
  absl::StatusOr<std::vector<Migration>> unlistable;
  if (geteuid() == 0) {
    ASSERT_EQ(seteuid(65534), 0);
    unlistable = LoadMigrations(dir_);
    ASSERT_EQ(seteuid(0), 0);
  } else {
    unlistable = LoadMigrations(dir_);
  }
  fs::permissions(dir_, fs::perms::owner_all);
  EXPECT_EQ(unlistable.status().code(), absl::StatusCode::kFailedPrecondition) << unlistable.status();
  EXPECT_THAT(std::string(unlistable.status().message()), HasSubstr("cannot be read"));
}

TEST_F(MigrateTest, AFailingMigrationLeavesNoTrace) {
  WriteFile(dir_ / "0001_ok.sql", "CREATE TABLE ok (id int);");
  WriteFile(dir_ / "0002_broken.sql", "CREATE TABLE half (id int); SELECT no_such_function();");
  pqxx::connection c = Connect();
  absl::StatusOr<MigrateResult> result = Apply(c, *LoadMigrations(dir_));
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("0002_broken.sql"));
  pqxx::nontransaction check(c);
  EXPECT_EQ(check.exec1("SELECT to_regclass('public.half') IS NULL")[0].as<bool>(), true);
  EXPECT_EQ(check.exec1("SELECT count(*) FROM schema_migrations")[0].as<int>(), 1);
}

// Migrations run in UTC whatever the server's (or the connection's) time zone: what they compute
// from the time, such as the first vitals partitions' months, is in UTC as the services' is.
TEST_F(MigrateTest, MigrationsRunInUtc) {
  WriteFile(dir_ / "0001_zone.sql",
            "CREATE TABLE zone AS SELECT current_setting('TimeZone') AS name, "
            "date_trunc('month', timestamptz '2027-03-15 12:00:00+00') AS month;");
  pqxx::connection c = Connect();
  {
    pqxx::nontransaction set(c);
    set.exec0("SET TIME ZONE 'America/Sao_Paulo'");  // a server west of UTC
  }
  absl::StatusOr<MigrateResult> result = Apply(c, *LoadMigrations(dir_));
  ASSERT_TRUE(result.ok()) << result.status();
  pqxx::nontransaction check(c);
  pqxx::row zone = check.exec1(
      "SELECT name, month = timestamptz '2027-03-01 00:00:00+00' FROM zone");
  EXPECT_EQ(zone[0].as<std::string>(), "UTC");
  EXPECT_TRUE(zone[1].as<bool>());
}

// A migrator that vanishes mid-migration is found by the server within a minute, its locks
// released: its session bounds idle time in a transaction and checks its peer.
TEST_F(MigrateTest, AMigratorsSessionEndsSoonAfterItVanishes) {
  WriteFile(dir_ / "0001_session.sql",
            "CREATE TABLE session AS SELECT "
            "current_setting('idle_in_transaction_session_timeout') AS idle, "
            "current_setting('tcp_user_timeout') AS user_timeout, "
            "current_setting('client_connection_check_interval') AS check_interval;");
  pqxx::connection c = Connect();
  absl::StatusOr<MigrateResult> result = Apply(c, *LoadMigrations(dir_));
  ASSERT_TRUE(result.ok()) << result.status();
  pqxx::nontransaction check(c);
  pqxx::row row = check.exec1("SELECT idle, user_timeout, check_interval FROM session");
  EXPECT_EQ(row[0].as<std::string>(), "1min");
  EXPECT_EQ(row[1].as<std::string>(), "60000");  // ms
  EXPECT_EQ(row[2].as<std::string>(), "10s");
}

// A migration recorded under another name than the folder's file of that number is another set's
// (the database is not the one these migrations are for) or another branch's: said so, not taken
// for an edit of an applied file.
TEST_F(MigrateTest, AMigrationAppliedUnderAnotherNameIsNamedAsSuch) {
  WriteFile(dir_ / "0001_patient_keys.sql", "CREATE TABLE keys (id int);");
  pqxx::connection c = Connect();
  ASSERT_TRUE(Apply(c, *LoadMigrations(dir_)).ok());
  fs::remove(dir_ / "0001_patient_keys.sql");
  WriteFile(dir_ / "0001_audit_log.sql", "CREATE TABLE audit (id int);");
  absl::StatusOr<MigrateResult> result = Apply(c, *LoadMigrations(dir_));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("migration 1 was applied to this database as '0001_patient_keys.sql', and "
                        "the migrations folder has '0001_audit_log.sql' under that number"));
  EXPECT_THAT(std::string(result.status().message()), ::testing::Not(HasSubstr("changed after")));
}

TEST_F(MigrateTest, CommandMigratesControlAndEveryShardIdempotently) {
  fs::path config = dir_ / "medgate.yaml";
  std::string yaml = "trust_domain: medgate.test\nca: /nonexistent/ca.crt\n";
  yaml += "control_db: {conninfo: \"" + clusters_->control().ConnectionString() + "\"}\nregions:\n";
  for (auto* region : clusters_->regions()) {
    yaml += "  - {id: " + region->name() + ", territories: [FR], db: {conninfo: \"" +
            region->ConnectionString() + "\"}}\n";
  }
  WriteFile(config, yaml);
  std::string command = std::string(MEDGATE_MIGRATE_BINARY) + " --config " + config.string() +
                        " --migrations " + SourceDir() + "/migrations 2>" + (dir_ / "out.log").string();
  ASSERT_EQ(std::system(command.c_str()), 0);
  ASSERT_EQ(std::system(command.c_str()), 0);
  std::ifstream log(dir_ / "out.log");
  std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  // The second run reported nothing applied for each of the four databases.
  size_t idle_runs = 0;
  for (size_t at = text.find("\"applied\":\"\""); at != std::string::npos;
       at = text.find("\"applied\":\"\"", at + 1)) {
    ++idle_runs;
  }
  EXPECT_EQ(idle_runs, 4u) << text;
  for (auto* region : clusters_->regions()) {
    pqxx::connection c(region->ConnectionString());
    pqxx::nontransaction check(c);
    EXPECT_GE(check.exec1("SELECT count(*) FROM schema_migrations")[0].as<int>(), 1) << region->name();
  }
  // A bad config exits 2 naming the key.
  WriteFile(config, "trust_domain: medgate.test\nca: x\nregions: [{id: fr-1}]\n");
  EXPECT_EQ(WEXITSTATUS(std::system(command.c_str())), 2);
  // So does a conninfo libpq cannot parse, and its password is not in the log (libpq's message
  // quotes the string).
  WriteFile(config, "trust_domain: medgate.test\nca: /nonexistent/ca.crt\n"
                    "control_db: {conninfo: \"host=/nonexistent password=hunter2 sesame\"}\n"
                    "regions: []\n");
  EXPECT_EQ(WEXITSTATUS(std::system(command.c_str())), 2);
  std::ifstream failed_log(dir_ / "out.log");
  const std::string failed((std::istreambuf_iterator<char>(failed_log)),
                           std::istreambuf_iterator<char>());
  EXPECT_THAT(failed, ::testing::HasSubstr("not a libpq connection string"));
  EXPECT_THAT(failed, ::testing::Not(::testing::HasSubstr("sesame")));
  EXPECT_THAT(failed, ::testing::Not(::testing::HasSubstr("hunter2")));
}

}  // namespace
}  // namespace medgate::migrate
