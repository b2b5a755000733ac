// Numbered SQL migrations: loaded from a folder, checksummed, applied in order in transactions.
#ifndef MEDGATE_LIBS_MIGRATE_MIGRATE_H_
#define MEDGATE_LIBS_MIGRATE_MIGRATE_H_

#include <string>
#include <vector>

#include <pqxx/pqxx>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace medgate::migrate {

struct Migration {
  int version = 0;       // the file's number: 0001_create_x.sql -> 1
  std::string file_name;
  std::string sql;
  std::string checksum;  // hex SHA-256 of the file's bytes
};

// Loads NNNN_name.sql files sorted by number. A file not of that form, a duplicate number, or a
// gap in the numbering is FAILED_PRECONDITION naming the file.
absl::StatusOr<std::vector<Migration>> LoadMigrations(const std::string& dir);

struct MigrateResult {
  std::vector<std::string> applied;  // file names applied by this run
  int already_applied = 0;
};

// How long the migrator waits for any lock (the migrators' advisory lock, a table a migration
// alters) before it stops with an error: a migration queued behind a long transaction would
// otherwise make every query of the services on that table queue behind it, without bound.
inline constexpr absl::Duration kDefaultLockTimeout = absl::Minutes(1);

// Applies the pending migrations in order, each in its own transaction together with its
// schema_migrations row, under an advisory lock so two migrators never interleave. A recorded
// migration whose checksum differs from its file, or one recorded but missing from the folder,
// is FAILED_PRECONDITION and nothing is applied. A lock not had within `lock_timeout` stops the
// run at that migration (the ones before it stay applied; run again later).
absl::StatusOr<MigrateResult> Apply(pqxx::connection& connection,
                                    const std::vector<Migration>& migrations,
                                    absl::Duration lock_timeout = kDefaultLockTimeout);

}  // namespace medgate::migrate

#endif  // MEDGATE_LIBS_MIGRATE_MIGRATE_H_
