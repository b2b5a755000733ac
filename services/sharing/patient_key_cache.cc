// The bounded cache of unwrapped patient keys.
#include "services/sharing/patient_key_cache.h"

namespace medgate::sharing {

std::optional<PatientKey> PatientKeyCache::Get(const std::string& patient_id, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(patient_id);
  if (it == entries_.end()) return std::nullopt;
  if (it->second.expires <= now) {
    entries_.erase(it);
    return std::nullopt;
  }
  return it->second.key;
}

void PatientKeyCache::Put(const std::string& patient_id, const PatientKey& key, absl::Time now) {
  if (max_entries_ == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(patient_id);
  if (it != entries_.end()) {
    // The expiry is not extended: a key is re-read from its row at least once per max age.
    if (it->second.key.key_id != key.key_id) it->second = Entry{key, now + max_age_};
    return;
  }
  if (entries_.size() >= max_entries_) {
    for (auto e = entries_.begin(); e != entries_.end();) {
      e = e->second.expires <= now ? entries_.erase(e) : std::next(e);
    }
    // Still full: drop the entry that expires first.
    if (entries_.size() >= max_entries_) {
      auto oldest = entries_.begin();
      for (auto e = entries_.begin(); e != entries_.end(); ++e) {
        if (e->second.expires < oldest->second.expires) oldest = e;
      }
      entries_.erase(oldest);
    }
  }
  entries_.emplace(patient_id, Entry{key, now + max_age_});
}

void PatientKeyCache::Forget(const std::string& patient_id) {
  std::lock_guard<std::mutex> lock(mu_);
  entries_.erase(patient_id);
}

size_t PatientKeyCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

}  // namespace medgate::sharing
