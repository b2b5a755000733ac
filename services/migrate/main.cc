// medgate-migrate: applies migrations/control to the control DB, migrations/shard to every shard and
// migrations/vault to every region's key vault.
#include <cstdio>
#include <cstring>
#include <string>

#include <pqxx/pqxx>

#include "absl/strings/str_join.h"
#include "libs/common/config.h"
#include "libs/common/log.h"
#include "libs/migrate/migrate.h"
#include "libs/pg/conninfo.h"
#include "libs/pg/pg_status.h"

namespace {

constexpr char kUsage[] =
    "usage: medgate-migrate --config FILE [--migrations DIR]\n"
    "  Applies DIR/control to the control database, DIR/shard to every region's shard and\n"
    "  DIR/vault to every region's key vault (keys_db).\n"
    "  DIR defaults to " MEDGATE_DEFAULT_MIGRATIONS_DIR "\n";

bool MigrateOne(const std::string& db_name, const std::string& conninfo,
                const std::vector<medgate::migrate::Migration>& migrations) {
  absl::StatusOr<medgate::migrate::MigrateResult> result = [&]()
      -> absl::StatusOr<medgate::migrate::MigrateResult> {
    try {
      // Bounded connect and keepalives, as the services' connections have.
      pqxx::connection connection(medgate::pg::WithConnectionDefaults(conninfo));
      return medgate::migrate::Apply(connection, migrations);
    } catch (const std::exception& e) {
      return medgate::pg::StatusWithServerText(e);
    }
  }();
  if (!result.ok()) {
    medgate::log::Error("migrate_failed", {{"database", db_name}, {"error", result.status().message()}});
    return false;
  }
  medgate::log::Info("migrated", {{"database", db_name},
                                  {"applied", absl::StrJoin(result->applied, ",")},
                                  {"already_applied", result->already_applied}});
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  std::string dir = MEDGATE_DEFAULT_MIGRATIONS_DIR;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if ((arg == "--config" || arg == "--migrations") && i + 1 < argc) {
      (arg == "--config" ? config_path : dir) = argv[++i];
    } else {
      std::fputs(kUsage, stderr);
      return 2;
    }
  }
  if (config_path.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  medgate::MedgateConfig config = medgate::LoadConfigOrExit(config_path);
  if (!config.control_db) {
    medgate::log::Error("config_invalid", {{"path", config_path}, {"error", "config key 'control_db': missing"}});
    return 2;
  }
  auto control = medgate::migrate::LoadMigrations(dir + "/control");
  auto shard = medgate::migrate::LoadMigrations(dir + "/shard");
  auto vault = medgate::migrate::LoadMigrations(dir + "/vault");
  for (const auto* loaded : {&control, &shard, &vault}) {
    if (!loaded->ok()) {
      medgate::log::Error("migrations_invalid", {{"error", loaded->status().message()}});
      return 1;
    }
  }
  bool ok = MigrateOne("control", config.control_db->conninfo, *control);
  for (const medgate::RegionConfig& region : config.regions) {
    ok = MigrateOne(region.id, region.db.conninfo, *shard) && ok;
    if (region.keys_db) {
      ok = MigrateOne(region.id + " key vault", region.keys_db->conninfo, *vault) && ok;
    }
  }
  return ok ? 0 : 1;
}
