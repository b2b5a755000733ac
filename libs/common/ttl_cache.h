// A bounded LRU map whose entries expire; the current time is passed in so tests never sleep.
#ifndef MEDGATE_LIBS_COMMON_TTL_CACHE_H_
#define MEDGATE_LIBS_COMMON_TTL_CACHE_H_

#include <cstddef>
#include <list>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"

namespace medgate {

// Not thread-safe: callers serialise access (RoutingClient keeps each cache behind an
// absl::Mutex together with the state that must change atomically with it).
//
// Holds at most `capacity` entries; inserting a new key into a full cache evicts the least
// recently used one, expired or not. Expired entries are dropped lazily (on Get, or by
// eviction) unless the caller calls EraseExpired, so size() may count entries that Get would no
// longer return.
template <typename K, typename V>
class TtlCache {
 public:
  explicit TtlCache(size_t capacity) : capacity_(capacity) {}

  // The index points into the list: copying or moving would leave it dangling or surprising.
  TtlCache(const TtlCache&) = delete;
  TtlCache& operator=(const TtlCache&) = delete;

  // The value of `key` if present and not expired at `now`; a hit becomes the most recently
  // used entry, an expired entry is removed. With `refresh_due`, it is set to true for the first
  // hit at or after the entry's refresh time (see Put) and to false otherwise, so a caller can
  // fetch a fresh value, once, before the entry expires.
  std::optional<V> Get(const K& key, absl::Time now, bool* refresh_due = nullptr) {
    if (refresh_due != nullptr) *refresh_due = false;
    auto it = index_.find(key);
    if (it == index_.end()) return std::nullopt;
    auto entry = it->second;
    if (now >= entry->expires_at) {
      entries_.erase(entry);
      index_.erase(it);
      return std::nullopt;
    }
    entries_.splice(entries_.begin(), entries_, entry);
    if (refresh_due != nullptr && now >= entry->refresh_at && !entry->refresh_reported) {
      entry->refresh_reported = true;
      *refresh_due = true;
    }
    return entry->value;
  }

  // Stores `value` until `now + ttl` as the most recently used entry, replacing any previous
  // value of `key`. A non-positive ttl (or a zero capacity) stores nothing but still removes
  // the previous value, so the cache never answers with something older than the caller knows.
  // A hit from `now + refresh_after` on reports the entry as due for a refresh (see Get).
  void Put(K key, V value, absl::Duration ttl, absl::Time now,
           absl::Duration refresh_after = absl::InfiniteDuration()) {
    Erase(key);
    if (ttl <= absl::ZeroDuration() || capacity_ == 0) return;
    if (entries_.size() >= capacity_) {
      index_.erase(entries_.back().key);
      entries_.pop_back();
    }
    entries_.push_front(Entry{std::move(key), std::move(value), now + ttl, now + refresh_after});
    index_.emplace(entries_.front().key, entries_.begin());
  }

  // Removes every entry expired at `now` (a walk of the whole cache); how many.
  size_t EraseExpired(absl::Time now) {
    size_t erased = 0;
    for (auto entry = entries_.begin(); entry != entries_.end();) {
      if (now >= entry->expires_at) {
        index_.erase(entry->key);
        entry = entries_.erase(entry);
        ++erased;
      } else {
        ++entry;
      }
    }
    return erased;
  }

  // Removes `key`; true if it was present (expired or not).
  bool Erase(const K& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return false;
    entries_.erase(it->second);
    index_.erase(it);
    return true;
  }

  void Clear() {
    index_.clear();
    entries_.clear();
  }

  size_t size() const { return entries_.size(); }
  size_t capacity() const { return capacity_; }

 private:
  struct Entry {
    K key;
    V value;
    absl::Time expires_at;
    absl::Time refresh_at;
    bool refresh_reported = false;
  };

  const size_t capacity_;
  std::list<Entry> entries_;  // most recently used first
  absl::flat_hash_map<K, typename std::list<Entry>::iterator> index_;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_TTL_CACHE_H_
