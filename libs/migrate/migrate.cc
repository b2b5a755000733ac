// Numbered SQL migrations with checksums.
#include "absl/strings/string_view.h"
#include "libs/migrate/migrate.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <openssl/evp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "libs/pg/pg_status.h"

namespace medgate::migrate {
namespace {

// Distinguishes our advisory lock from any other user of pg_advisory_lock.
constexpr int64_t kMigrationLockKey = 0x6d656467617465;  // "medgate"

std::string Sha256Hex(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(digest), len));
}

}  // namespace

absl::StatusOr<std::vector<Migration>> LoadMigrations(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("migrations folder '", dir, "' does not exist"));
  }
  std::map<int, Migration> by_version;
  // An unreadable folder is an error to report, not an exception.
  std::filesystem::directory_iterator items(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("migrations folder '", dir, "' cannot be read: ", ec.message()));
  }
  for (; items != std::filesystem::directory_iterator(); items.increment(ec)) {
    const std::filesystem::directory_entry& item = *items;
    std::string name = item.path().filename().string();
    if (item.path().extension() != ".sql") continue;
    // A folder (or anything else) named like a migration would read as an empty one and be
    // recorded as applied.
    std::error_code type_error;
    if (!item.is_regular_file(type_error)) {
      return absl::FailedPreconditionError(
          absl::StrCat("migration '", name, "' is not a regular file"));
    }
    size_t underscore = name.find('_');
    int version = 0;
    if (underscore == std::string::npos || underscore == 0 ||
        !std::all_of(name.begin(), name.begin() + static_cast<long>(underscore), absl::ascii_isdigit) ||
        !absl::SimpleAtoi(name.substr(0, underscore), &version) || version <= 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "migration file '", name, "' is not named NNNN_description.sql"));
    }
    if (auto it = by_version.find(version); it != by_version.end()) {
      return absl::FailedPreconditionError(absl::StrCat("migrations '", it->second.file_name,
                                                        "' and '", name, "' share number ", version));
    }
    std::ifstream in(item.path(), std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    if (!in) return absl::FailedPreconditionError(absl::StrCat("cannot read migration '", name, "'"));
    Migration m;
    m.version = version;
    m.file_name = name;
    m.sql = buffer.str();
    m.checksum = Sha256Hex(m.sql);
    by_version.emplace(version, std::move(m));
  }
  // A failed step ends the iteration as if the folder were done: the listing was cut short.
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("migrations folder '", dir, "' cannot be read: ", ec.message()));
  }
  std::vector<Migration> out;
  int expected = 1;
  for (auto& [version, m] : by_version) {
    if (version != expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          "migrations in '", dir, "' skip number ", expected, " (next file is '", m.file_name, "')"));
    }
    out.push_back(std::move(m));
    ++expected;
  }
  return out;
}

namespace {

absl::StatusOr<MigrateResult> ApplyLocked(pqxx::connection& connection,
                                          const std::vector<Migration>& migrations) {
  MigrateResult result;
  std::map<int, std::pair<std::string, std::string>> recorded;
  {
    pqxx::nontransaction session(connection);
    session.exec0(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, file_name text NOT NULL, checksum text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())");
    for (const pqxx::row& row :
         session.exec("SELECT version, file_name, checksum FROM schema_migrations ORDER BY version")) {
      recorded[row[0].as<int>()] = {row[1].c_str(), row[2].c_str()};
    }
  }
  for (const auto& [version, entry] : recorded) {
    auto it = std::find_if(migrations.begin(), migrations.end(),
                           [v = version](const Migration& m) { return m.version == v; });
    if (it == migrations.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "migration ", version, " ('", entry.first,
          "') is applied in the database but missing from the migrations folder"));
    }
    if (it->file_name != entry.first) {
      // Another set's migration (a shard's database named as the control database's, a vault's
      // as its shard's), or another branch's under the same number: not an edit.
      return absl::FailedPreconditionError(absl::StrCat(
          "migration ", version, " was applied to this database as '", entry.first,
          "', and the migrations folder has '", it->file_name,
          "' under that number: is this the database these migrations are for (the control "
          "database, a shard, a key vault)?"));
    }
    if (it->checksum != entry.second) {
      return absl::FailedPreconditionError(absl::StrCat(
          "migration '", it->file_name, "' was changed after it was applied (recorded checksum ",
          entry.second.substr(0, 12), "..., file now ", it->checksum.substr(0, 12),
          "...); add a new migration instead of editing an applied one"));
    }
  }
  for (const Migration& m : migrations) {
    if (recorded.contains(m.version)) {
      ++result.already_applied;
      continue;
    }
    try {
      pqxx::work txn(connection);
      txn.exec(m.sql);
      txn.exec_params0(
          "INSERT INTO schema_migrations (version, file_name, checksum) VALUES ($1, $2, $3)",
          m.version, m.file_name, m.checksum);
      txn.commit();
    } catch (const std::exception& e) {
      absl::Status s = pg::StatusWithServerText(e);
      const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e);
      if (sql != nullptr && sql->sqlstate() == "55P03") {
        return absl::UnavailableError(absl::StrCat(
            "migration '", m.file_name, "' waited longer than the lock timeout for a lock that "
            "another transaction holds; nothing of it was applied: run again once that "
            "transaction is done (", s.message(), ")"));
      }
      return absl::Status(s.code(),
                          absl::StrCat("migration '", m.file_name, "' failed: ", s.message()));
    }
    result.applied.push_back(m.file_name);
  }
  return result;
}

}  // namespace

absl::StatusOr<MigrateResult> Apply(pqxx::connection& connection,
                                    const std::vector<Migration>& migrations,
                                    absl::Duration lock_timeout) {
  try {
    {
      // For the session: the advisory lock below, and every lock the migrations take (one that
      // sets its own, as the audit index migrations do, keeps it).
      pqxx::nontransaction lock(connection);
      lock.exec0(absl::StrCat("SET lock_timeout = ",
                              std::max<int64_t>(1, absl::ToInt64Milliseconds(lock_timeout))));
      // Migrations run in UTC, as the services do: what they compute from the time (the first
      // vitals partitions, calendar months) must not depend on the server's time zone.
      lock.exec0("SET TIME ZONE 'UTC'");
      // A migrator that vanishes (its pod's node lost, its network cut) while a migration holds
      // its locks is found by the server within a minute, not when TCP gives up (15 minutes to
      // 2 hours): idle in its transaction, between statements, or silent during one, its
      // session ends and its locks, the advisory lock's included, go with it.
      lock.exec0("SET idle_in_transaction_session_timeout = '1min'");
      lock.exec0("SET tcp_keepalives_idle = 30");
      lock.exec0("SET tcp_keepalives_interval = 10");
      lock.exec0("SET tcp_keepalives_count = 3");
      lock.exec0("SET tcp_user_timeout = 60000");
      lock.exec0("SET client_connection_check_interval = '10s'");
      try {
        lock.exec_params("SELECT pg_advisory_lock($1)", kMigrationLockKey);
      } catch (const pqxx::sql_error& e) {
        if (e.sqlstate() != "55P03") throw;
        return absl::UnavailableError(absl::StrCat(
            "another migrator has held the migration lock of this database for ",
            absl::FormatDuration(lock_timeout), "; run again once it is done"));
      }
    }
    absl::StatusOr<MigrateResult> result = ApplyLocked(connection, migrations);
    // A connection lost during a migration took the lock with it: its failure is the answer,
    // which naming the lost connection again would hide.
    if (connection.is_open()) {
      try {
        pqxx::nontransaction unlock(connection);
        unlock.exec_params("SELECT pg_advisory_unlock($1)", kMigrationLockKey);
      } catch (const std::exception& e) {
        if (result.ok()) return pg::StatusWithServerText(e);
      }
    }
    return result;
  } catch (const std::exception& e) {
    return pg::StatusWithServerText(e);
  }
}

}  // namespace medgate::migrate
