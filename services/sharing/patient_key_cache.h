// Recently used patient data keys, unwrapped, so that an upload need not read and unwrap its
// patient's key before it stores the record. Bounded in entries and in age.
#ifndef MEDGATE_SERVICES_SHARING_PATIENT_KEY_CACHE_H_
#define MEDGATE_SERVICES_SHARING_PATIENT_KEY_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

#include "absl/time/time.h"
#include "libs/crypto/aes_gcm.h"
#include "libs/common/ttl_cache.h"

namespace medgate::sharing {

struct PatientKey {
  std::string key_id;
  crypto::SecretKey key;
};

// A cached key is only a guess: whoever uses it checks in the same statement that the key row
// still exists (an erasure in another process does not reach this cache), and forgets it if not.
// The age bound also limits how long an erased key can stay in this process's memory: expired
// keys are dropped (and wiped) by DropExpired, which the sharing server calls every 10 s, so a
// key erased by another process is gone from this one's memory at most max_age plus 10 s after
// it was cached, however quiet this process is.
class PatientKeyCache {
 public:
  PatientKeyCache(size_t max_entries, absl::Duration max_age)
      : max_age_(max_age), keys_(max_entries) {}

  std::optional<PatientKey> Get(const std::string& patient_id, absl::Time now);
  // Counts the Forget calls: taken before a key is read from its row or the vault and given to
  // Put, so that a key read before an erasure's Forget is not cached after it.
  uint64_t generation();
  // Caches `key` unless a Forget came after `read_at_generation`.
  void Put(const std::string& patient_id, const PatientKey& key, absl::Time now,
           uint64_t read_at_generation);
  void Forget(const std::string& patient_id);
  // Drops every key expired at `now`; how many.
  size_t DropExpired(absl::Time now);
  size_t size();

 private:
  const absl::Duration max_age_;
  std::mutex mu_;
  uint64_t generation_ = 0;  // Forget calls so far
  TtlCache<std::string, PatientKey> keys_;  // least recently used first out when full
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_PATIENT_KEY_CACHE_H_
