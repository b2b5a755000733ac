// The bounded cache of unwrapped patient keys.
#include "services/sharing/patient_key_cache.h"

namespace medgate::sharing {

std::optional<PatientKey> PatientKeyCache::Get(const std::string& patient_id, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.Get(patient_id, now);
}

void PatientKeyCache::Put(const std::string& patient_id, const PatientKey& key, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  // The expiry is not extended: a key is re-read from its row at least once per max age.
  std::optional<PatientKey> cached = keys_.Get(patient_id, now);
  if (cached && cached->key_id == key.key_id) return;
  keys_.Put(patient_id, key, max_age_, now);
}

void PatientKeyCache::Forget(const std::string& patient_id) {
  std::lock_guard<std::mutex> lock(mu_);
  keys_.Erase(patient_id);
}

size_t PatientKeyCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.size();
}

}  // namespace medgate::sharing
