// The regions' key vaults (migrations/vault): each patient's data key, wrapped by the KEK, kept in
// a database apart from the region's shard. The shard holds the record keys wrapped under these
// keys, so neither the shard nor its backups open a record without the vault; deleting a key
// here (an erasure) makes what it protected unreadable in the shard's backups too.
#ifndef MEDGATE_SERVICES_SHARING_KEY_VAULT_H_
#define MEDGATE_SERVICES_SHARING_KEY_VAULT_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/crypto/aes_gcm.h"
#include "libs/crypto/key_encryption_key.h"
#include "libs/pg/pool.h"

namespace medgate::sharing {

// What authenticates a wrapped patient key: its patient and its id, so a wrapped key copied to
// another row does not unwrap.
std::string PatientKeyContext(absl::string_view patient_id, absl::string_view key_id);

// Every statement the vault runs against a region's vault database.
const std::vector<pg::Statement>& VaultStatements();

// Thread-safe.
class KeyVault {
 public:
  // FAILED_PRECONDITION naming the first region without a `keys_db`. `kek` wraps every key
  // written; `others` (sharing.previous_kek_files: a rotation's other KEKs) only unwrap the keys
  // they wrap. With `rewrap` (sharing.kek_rewrap), those keys are rewrapped under `kek` (Get,
  // RewrapSome); without it, not as they are read or swept (a rotation's first step, while pods
  // that hold the old KEK as their current one still run). Keys moved in from the shard
  // (PutWrapped) are stored under `kek` either way.
  static absl::StatusOr<std::unique_ptr<KeyVault>> Create(
      const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek,
      std::vector<crypto::KeyEncryptionKey*> others = {}, bool rewrap = false);

  crypto::KeyEncryptionKey& kek() const { return kek_; }

  // The key `wrapped` holds, unwrapped by the KEK named `kek_id` (this process's or a previous
  // one): FAILED_PRECONDITION naming the KEKs held when it is neither; DATA_LOSS when it does not
  // unwrap.
  absl::StatusOr<crypto::SecretKey> Unwrap(absl::string_view kek_id, absl::string_view wrapped,
                                           absl::string_view context);

  // Whether the region's vault holds keys wrapped by a key-encryption key this process does not
  // hold: FAILED_PRECONDITION naming it (a KEK mistyped into one pod's Secret would wrap the keys
  // of the patients it sees first under a key no other pod holds, and a KEK dropped too early
  // would leave keys nobody opens); OK when every key is this KEK's or another one's it holds, or
  // there are none yet; UNAVAILABLE when the vault cannot be reached.
  absl::Status CheckKek(absl::string_view region);

  // Rewraps under this process's KEK the next `limit` keys of the region that `from` (one of the
  // other KEKs) wraps, by key id after `after_key_id`, until `stopping`. A key that does not
  // unwrap is left and counted, and the walk goes on past it; a database error ends it.
  struct Rewrapped {
    int scanned = 0;    // keys looked at (fewer than `limit`: the walk's end)
    int rewrapped = 0;  // now this KEK's
    int damaged = 0;    // that did not unwrap (DATA_LOSS)
    std::string last_key_id;  // where the next batch starts
  };
  absl::StatusOr<Rewrapped> RewrapSome(absl::string_view region,
                                       const crypto::KeyEncryptionKey& from,
                                       const std::string& after_key_id, int limit,
                                       const std::function<bool()>& stopping);
  // How many of the region's keys the other KEKs wrap.
  absl::StatusOr<int64_t> KeysOfOtherKeks(absl::string_view region);
  const std::vector<crypto::KeyEncryptionKey*>& others() const { return previous_; }
  bool rewrapping() const { return rewrap_; }

  // Stores a new key of the patient, wrapped by the KEK; it is committed when this returns.
  // FAILED_PRECONDITION, storing nothing, while the region's vault holds keys of a KEK this
  // process does not hold (checked until this process has written a key there).
  // UNAVAILABLE when the region's vault cannot be reached.
  absl::Status Put(absl::string_view region, const std::string& patient_id,
                   const std::string& key_id, const crypto::SecretKey& key);
  // Stores a key already wrapped by `kek_id` (one the shard held before the vault), as in use,
  // rewrapped under this process's KEK: FAILED_PRECONDITION when `kek_id` is not a KEK it holds,
  // storing nothing. A key already there is left as it is.
  absl::Status PutWrapped(absl::string_view region, const std::string& patient_id,
                          const std::string& key_id, const std::string& kek_id,
                          const std::string& wrapped);
  // The key, unwrapped. NOT_FOUND when the vault does not hold it (destroyed by an erasure);
  // FAILED_PRECONDITION when a KEK this process does not hold wraps it; DATA_LOSS when it does
  // not unwrap. With rewrap, a key another KEK wraps is rewrapped under this process's as it is
  // read, in a transaction of its own after the read (a failure is logged: the sweep tries again).
  absl::StatusOr<crypto::SecretKey> Get(absl::string_view region, const std::string& patient_id,
                                        const std::string& key_id);
  // Deletes the keys (those already gone are not an error).
  absl::Status Destroy(absl::string_view region, const std::vector<std::string>& key_ids);
  // Keys not yet confirmed in use that were written more than `age` ago (by the vault's clock),
  // oldest first, at most `limit`; and marking keys confirmed.
  absl::StatusOr<std::vector<std::string>> Unconfirmed(absl::string_view region,
                                                       absl::Duration age, int limit);
  absl::Status Confirm(absl::string_view region, const std::vector<std::string>& key_ids);

 private:
  KeyVault(const std::vector<RegionConfig>& regions, crypto::KeyEncryptionKey& kek,
           std::vector<crypto::KeyEncryptionKey*> others, bool rewrap);
  // Stores `key` wrapped by this process's KEK in place of its wrapping by `from_kek_id`, unless
  // the row changed meanwhile (rewrapped by another process, or destroyed): whether it did.
  absl::StatusOr<bool> Rewrap(pg::Pool& pool, const std::string& patient_id,
                              const std::string& key_id, absl::string_view from_kek_id,
                              const crypto::SecretKey& key);
  absl::StatusOr<pg::Pool*> PoolOf(absl::string_view region) const;
  // This process's KEK or a previous one named `kek_id`; null for another.
  crypto::KeyEncryptionKey* KekOf(absl::string_view kek_id) const;
  // "ID (and previous ID)...", for messages.
  std::string HeldKeks() const;
  absl::Status Insert(absl::string_view region, const std::string& patient_id,
                      const std::string& key_id, const std::string& kek_id,
                      const std::string& wrapped, bool confirmed);
  // Runs `statement` with the keys as its one text[] parameter (nothing when there are none).
  absl::Status ExecOnKeys(absl::string_view region, const char* statement,
                          const std::vector<std::string>& key_ids);

  crypto::KeyEncryptionKey& kek_;
  const std::vector<crypto::KeyEncryptionKey*> previous_;
  const bool rewrap_;
  // By region; each pool is named "<region> key vault", as its errors say.
  std::map<std::string, std::unique_ptr<pg::Pool>, std::less<>> pools_;
  // By region: this process has written a key there (Put), after CheckKek found no key of a KEK
  // it does not hold, so Put checks no more.
  std::map<std::string, std::unique_ptr<std::atomic<bool>>, std::less<>> kek_verified_;
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_KEY_VAULT_H_
