// The regions' key vaults.
#include "services/sharing/key_vault.h"

#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
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
      {kSelectAnyKek, "SELECT kek_id FROM patient_keys LIMIT 1"},
  };
  return statements;
}

}  // namespace

std::string PatientKeyContext(absl::string_view patient_id, absl::string_view key_id) {
  return absl::StrCat("patient-key/", patient_id, "/", key_id);
}

absl::StatusOr<std::unique_ptr<KeyVault>> KeyVault::Create(
    const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek) {
  for (size_t i = 0; i < regions.size(); ++i) {
    if (!regions[i].keys_db) {
      return absl::FailedPreconditionError(absl::StrCat(
          "config key 'regions[", i, "].keys_db': missing for region '", regions[i].id,
          "'; the sharing service keeps the patients' data keys in each region's key vault, a "
          "database apart from the shard (migrations/vault)"));
    }
  }
  return std::unique_ptr<KeyVault>(new KeyVault(regions, kek));
}

KeyVault::KeyVault(const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek)
    : kek_(kek) {
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
  RETURN_IF_ERROR(pool->Transact([&](pqxx::work& txn) {
    pqxx::result rows = txn.exec_prepared(kSelectAnyKek);
    if (!rows.empty()) held = rows[0][0].c_str();
    return absl::OkStatus();
  }));
  if (held.empty()) return absl::OkStatus();  // no key yet: the first one written decides
  if (held != kek_.id()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the key vault of region ", region, " holds patient keys wrapped by key-encryption key ",
        held, ", but this service was given ", kek_.id(), ": configure the cluster's KEK (one "
        "KEK per cluster; keys are not rewrapped)"));
  }
  kek_verified_.find(region)->second->store(true);
  return absl::OkStatus();
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
  return Insert(region, patient_id, key_id, kek_id, wrapped, /*confirmed=*/true);
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
  if (kek_id != kek_.id()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the patient's data key is wrapped by key-encryption key ", kek_id,
                     ", but this service holds ", kek_.id()));
  }
  return kek_.Unwrap(wrapped, PatientKeyContext(patient_id, key_id));
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
