// The regions' key vaults.
#include "services/sharing/key_vault.h"

#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/pg/sql_array.h"

namespace medgate::sharing {
namespace {

constexpr char kInsertKey[] = "vault_insert_key";
constexpr char kSelectKey[] = "vault_select_key";
constexpr char kDeleteKeys[] = "vault_delete_keys";
constexpr char kSelectUnconfirmed[] = "vault_select_unconfirmed";
constexpr char kConfirmKeys[] = "vault_confirm_keys";
constexpr char kSelectAnyKek[] = "vault_select_any_kek";
constexpr char kSelectOtherKeks[] = "vault_select_other_keks";
constexpr char kRewrapKey[] = "vault_rewrap_key";
constexpr char kCountOfKeks[] = "vault_count_of_keks";

}  // namespace

const std::vector<pg::Statement>& VaultStatements() {
  static const std::vector<pg::Statement> statements = {
      {kInsertKey,
       "INSERT INTO patient_keys (key_id, patient_id, kek_id, wrapped_key, confirmed) "
       "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id) DO NOTHING"},
      {kSelectKey,
       "SELECT kek_id, wrapped_key FROM patient_keys WHERE key_id = $1 AND patient_id = $2"},
      {kDeleteKeys, "DELETE FROM patient_keys WHERE key_id = ANY($1::text[])"},
      {kSelectUnconfirmed,
       "SELECT key_id FROM patient_keys WHERE NOT confirmed "
       "AND created_at < now() - make_interval(secs => $1::double precision) "
       "ORDER BY created_at LIMIT $2"},
      {kConfirmKeys, "UPDATE patient_keys SET confirmed = true WHERE key_id = ANY($1::text[])"},
      // A KEK not among those held that wraps a key, if any: the KEKs that wrap keys, one index
      // probe each (index patient_keys_kek: vault migration 0005), not every key.
      {kSelectAnyKek,
       "WITH RECURSIVE k AS ("
       "  (SELECT kek_id FROM patient_keys ORDER BY kek_id LIMIT 1)"
       "  UNION ALL"
       "  SELECT (SELECT p.kek_id FROM patient_keys p WHERE p.kek_id > k.kek_id "
       "          ORDER BY p.kek_id LIMIT 1) FROM k WHERE k.kek_id IS NOT NULL)"
       "SELECT kek_id FROM k WHERE kek_id IS NOT NULL AND NOT (kek_id = ANY($1::text[])) LIMIT 1"},
      // The next keys one other KEK wraps, by key id (the same index).
      {kSelectOtherKeks,
       "SELECT key_id, patient_id, kek_id, wrapped_key FROM patient_keys WHERE kek_id = $1 "
       "AND key_id > $2 ORDER BY key_id LIMIT $3"},
      {kCountOfKeks, "SELECT count(*) FROM patient_keys WHERE kek_id = ANY($1::text[])"},
      {kRewrapKey,
       "UPDATE patient_keys SET kek_id = $3, wrapped_key = $4 "
       "WHERE key_id = $1 AND patient_id = $2 AND kek_id = $5"},
  };
  return statements;
}

std::string PatientKeyContext(absl::string_view patient_id, absl::string_view key_id) {
  return absl::StrCat("patient-key/", patient_id, "/", key_id);
}

crypto::KeyEncryptionKey* KeyVault::KekOf(absl::string_view kek_id) const {
  if (kek_id == kek_.id()) return &kek_;
  for (crypto::KeyEncryptionKey* previous : previous_) {
    if (kek_id == previous->id()) return previous;
  }
  return nullptr;
}

std::string KeyVault::HeldKeks() const {
  std::string held = kek_.id();
  for (const crypto::KeyEncryptionKey* previous : previous_) {
    absl::StrAppend(&held, " (and previous ", previous->id(), ")");
  }
  return held;
}

absl::StatusOr<crypto::SecretKey> KeyVault::Unwrap(absl::string_view kek_id,
                                                   absl::string_view wrapped,
                                                   absl::string_view context) {
  crypto::KeyEncryptionKey* kek = KekOf(kek_id);
  if (kek == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the patient's data key is wrapped by key-encryption key ", kek_id,
                     ", but this service holds ", HeldKeks()));
  }
  return kek->Unwrap(wrapped, context);
}

absl::StatusOr<bool> KeyVault::Rewrap(pg::Pool& pool, const std::string& patient_id,
                                      const std::string& key_id, absl::string_view from_kek_id,
                                      const crypto::SecretKey& key) {
  ASSIGN_OR_RETURN(std::string wrapped, kek_.Wrap(key, PatientKeyContext(patient_id, key_id)));
  return pool.TransactValue<bool>([&](pqxx::work& txn) -> absl::StatusOr<bool> {
    pqxx::result updated = txn.exec_prepared(kRewrapKey, key_id, patient_id, kek_.id(),
                                             pqxx::binarystring(wrapped), std::string(from_kek_id));
    return updated.affected_rows() == 1;
  });
}

absl::StatusOr<int64_t> KeyVault::KeysOfOtherKeks(absl::string_view region) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  std::vector<std::string> others;
  for (const crypto::KeyEncryptionKey* other : previous_) others.push_back(other->id());
  return pool->TransactValue<int64_t>([&](pqxx::work& txn) -> absl::StatusOr<int64_t> {
    return txn.exec_prepared1(kCountOfKeks, pg::TextArrayLiteral(others))[0].as<int64_t>();
  });
}

absl::StatusOr<KeyVault::Rewrapped> KeyVault::RewrapSome(
    absl::string_view region, const crypto::KeyEncryptionKey& from,
    const std::string& after_key_id, int limit, const std::function<bool()>& stopping) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  struct Row {
    std::string key_id, patient_id, kek_id, wrapped;
  };
  ASSIGN_OR_RETURN(std::vector<Row> rows,
                   pool->TransactValue<std::vector<Row>>(
                       [&](pqxx::work& txn) -> absl::StatusOr<std::vector<Row>> {
                         std::vector<Row> out;
                         for (const pqxx::row& r : txn.exec_prepared(
                                  kSelectOtherKeks, from.id(), after_key_id, limit)) {
                           out.push_back({r[0].c_str(), r[1].c_str(), r[2].c_str(),
                                          pqxx::binarystring(r[3]).str()});
                         }
                         return out;
                       }));
  Rewrapped done;
  done.scanned = static_cast<int>(rows.size());
  done.last_key_id = rows.empty() ? after_key_id : rows.back().key_id;
  for (const Row& row : rows) {
    if (stopping()) break;
    absl::StatusOr<crypto::SecretKey> key =
        Unwrap(row.kek_id, row.wrapped, PatientKeyContext(row.patient_id, row.key_id));
    if (!key.ok()) {
      ++done.damaged;  // passed: the walk goes on
      continue;
    }
    // A database error ends the walk (the next pass starts again).
    ASSIGN_OR_RETURN(bool rewrapped, Rewrap(*pool, row.patient_id, row.key_id, row.kek_id, *key));
    if (rewrapped) ++done.rewrapped;
  }
  return done;
}

absl::StatusOr<std::unique_ptr<KeyVault>> KeyVault::Create(
    const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek,
    std::vector<crypto::KeyEncryptionKey*> others, bool rewrap) {
  for (size_t i = 0; i < regions.size(); ++i) {
    if (!regions[i].keys_db) {
      return absl::FailedPreconditionError(absl::StrCat(
          "config key 'regions[", i, "].keys_db': missing for region '", regions[i].id,
          "'; the sharing service keeps the patients' data keys in each region's key vault, a "
          "database apart from the shard (migrations/vault)"));
    }
  }
  return std::unique_ptr<KeyVault>(new KeyVault(regions, kek, std::move(others), rewrap));
}

KeyVault::KeyVault(const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek,
                   std::vector<crypto::KeyEncryptionKey*> others, bool rewrap)
    : kek_(kek), previous_(std::move(others)), rewrap_(rewrap) {
  for (const RegionConfig& r : regions) {
    pg::PoolOptions options =
        pg::PoolOptions::FromConfig(absl::StrCat(r.id, " key vault"), *r.keys_db);
    options.statements = VaultStatements();
    pools_.emplace(r.id, std::make_unique<pg::Pool>(std::move(options)));
    kek_verified_.emplace(r.id, std::make_unique<std::atomic<bool>>(false));
  }
}

absl::Status KeyVault::CheckKek(absl::string_view region) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  std::string held;
  std::vector<std::string> known = {kek_.id()};
  for (const crypto::KeyEncryptionKey* other : previous_) known.push_back(other->id());
  RETURN_IF_ERROR(pool->Transact([&](pqxx::work& txn) {
    pqxx::result rows = txn.exec_prepared(kSelectAnyKek, pg::TextArrayLiteral(known));
    if (!rows.empty()) held = rows[0][0].c_str();
    return absl::OkStatus();
  }));
  // Every key (if any) is of a KEK held. With none yet the first one written decides, and Put
  // asks again until then.
  if (held.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the key vault of region ", region, " holds patient keys wrapped by key-encryption key ",
      held, ", but this service was given ", HeldKeks(),
      ": configure the cluster's KEK (README, \"Rotating the KEK\": every KEK that still wraps "
      "a key stays in sharing.previous_kek_files)"));
}

absl::StatusOr<pg::Pool*> KeyVault::PoolOf(absl::string_view region) const {
  auto it = pools_.find(region);
  if (it == pools_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("region '", region, "' has no key vault configured"));
  }
  return it->second.get();
}

absl::Status KeyVault::Put(absl::string_view region, const std::string& patient_id,
                           const std::string& key_id, const crypto::SecretKey& key) {
  RETURN_IF_ERROR(PoolOf(region).status());  // a region with a vault has its flag too
  std::atomic<bool>& verified = *kek_verified_.find(region)->second;
  if (!verified.load()) RETURN_IF_ERROR(CheckKek(region));
  ASSIGN_OR_RETURN(std::string wrapped, kek_.Wrap(key, PatientKeyContext(patient_id, key_id)));
  RETURN_IF_ERROR(Insert(region, patient_id, key_id, kek_.id(), wrapped, /*confirmed=*/false));
  verified.store(true);
  return absl::OkStatus();
}

absl::Status KeyVault::PutWrapped(absl::string_view region, const std::string& patient_id,
                                  const std::string& key_id, const std::string& kek_id,
                                  const std::string& wrapped) {
  // Stored under this process's KEK, whichever held one wrapped it: a key the vault gains must be
  // one every pod of this configuration opens, or they would all refuse the vault at start.
  ASSIGN_OR_RETURN(crypto::SecretKey key,
                   Unwrap(kek_id, wrapped, PatientKeyContext(patient_id, key_id)));
  ASSIGN_OR_RETURN(std::string rewrapped, kek_.Wrap(key, PatientKeyContext(patient_id, key_id)));
  return Insert(region, patient_id, key_id, kek_.id(), rewrapped, /*confirmed=*/true);
}

absl::Status KeyVault::Insert(absl::string_view region, const std::string& patient_id,
                              const std::string& key_id, const std::string& kek_id,
                              const std::string& wrapped, bool confirmed) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  return pool->Transact([&](pqxx::work& txn) {
    txn.exec_prepared0(kInsertKey, key_id, patient_id, kek_id, pqxx::binarystring(wrapped),
                       confirmed);
    return absl::OkStatus();
  });
}

absl::StatusOr<crypto::SecretKey> KeyVault::Get(absl::string_view region,
                                                const std::string& patient_id,
                                                const std::string& key_id) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  std::string kek_id;
  std::string wrapped;
  RETURN_IF_ERROR(pool->Transact([&](pqxx::work& txn) {
    pqxx::result rows = txn.exec_prepared(kSelectKey, key_id, patient_id);
    if (rows.empty()) {
      return absl::NotFoundError(absl::StrCat("the key vault of region ", region,
                                              " holds no patient key '", key_id, "'"));
    }
    kek_id = rows[0][0].c_str();
    wrapped = pqxx::binarystring(rows[0][1]).str();
    return absl::OkStatus();
  }));
  ASSIGN_OR_RETURN(crypto::SecretKey key,
                   Unwrap(kek_id, wrapped, PatientKeyContext(patient_id, key_id)));
  if (rewrap_ && kek_id != kek_.id()) {
    // Another KEK's: from now on this process's wraps it.
    absl::StatusOr<bool> rewrapped = Rewrap(*pool, patient_id, key_id, kek_id, key);
    if (!rewrapped.ok()) {
      log::Warning("patient_key_rewrap_failed",
                   {{"region", region}, {"key_id", key_id}, {"error", rewrapped.status().message()}});
    }
  }
  return key;
}

absl::Status KeyVault::Destroy(absl::string_view region, const std::vector<std::string>& key_ids) {
  return ExecOnKeys(region, kDeleteKeys, key_ids);
}

absl::Status KeyVault::ExecOnKeys(absl::string_view region, const char* statement,
                                  const std::vector<std::string>& key_ids) {
  if (key_ids.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  return pool->Transact([&](pqxx::work& txn) {
    txn.exec_prepared0(statement, pg::TextArrayLiteral(key_ids));
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<std::string>> KeyVault::Unconfirmed(absl::string_view region,
                                                               absl::Duration age, int limit) {
  ASSIGN_OR_RETURN(pg::Pool * pool, PoolOf(region));
  return pool->TransactValue<std::vector<std::string>>(
      [&](pqxx::work& txn) -> absl::StatusOr<std::vector<std::string>> {
        std::vector<std::string> ids;
        for (const pqxx::row& row :
             txn.exec_prepared(kSelectUnconfirmed, absl::ToDoubleSeconds(age), limit)) {
          ids.push_back(row[0].c_str());
        }
        return ids;
      });
}

absl::Status KeyVault::Confirm(absl::string_view region, const std::vector<std::string>& key_ids) {
  return ExecOnKeys(region, kConfirmKeys, key_ids);
}

}  // namespace medgate::sharing
