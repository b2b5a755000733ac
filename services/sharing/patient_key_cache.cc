// The bounded cache of unwrapped patient keys.
#include "services/sharing/patient_key_cache.h"

namespace medgate::sharing {

std::optional<PatientKey> PatientKeyCache::Get(const std::string& patient_id, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.Get(patient_id, now);
}

uint64_t PatientKeyCache::generation() {
  std::lock_guard<std::mutex> lock(mu_);
  return generation_;
}

void PatientKeyCache::Put(const std::string& patient_id, const PatientKey& key, absl::Time now,
                          uint64_t read_at_generation) {
  std::lock_guard<std::mutex> lock(mu_);
  // A Forget since the key was read may be an erasure that retired it: not cached. (Forgets are
  // rare; any of them makes the next read of every patient's key go to its row.)
  if (generation_ != read_at_generation) return;
  // The expiry is not extended: a key is re-read from its row at least once per max age.
  std::optional<PatientKey> cached = keys_.Get(patient_id, now);
  if (cached && cached->key_id == key.key_id) return;
  keys_.Put(patient_id, key, max_age_, now);
}

void PatientKeyCache::Forget(const std::string& patient_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ++generation_;
  keys_.Erase(patient_id);
}

size_t PatientKeyCache::DropExpired(absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.EraseExpired(now);
}

size_t PatientKeyCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.size();
}

}  // namespace medgate::sharing
