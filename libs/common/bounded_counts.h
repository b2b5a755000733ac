// How many of something are in progress per key (streams per device, transfers per tenant and
// region), each count bounded: a place is taken only below the bound, and given back when its
// Slot is destroyed.
#ifndef MEDGATE_LIBS_COMMON_BOUNDED_COUNTS_H_
#define MEDGATE_LIBS_COMMON_BOUNDED_COUNTS_H_

#include <map>
#include <memory>
#include <mutex>

namespace medgate {

// Thread-safe. Must outlive its slots.
template <typename Key>
class BoundedCounts {
 public:
  class Slot {
   public:
    Slot(BoundedCounts& counts, Key key) : counts_(counts), key_(std::move(key)) {}
    ~Slot() { counts_.Release(key_); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    BoundedCounts& counts_;
    const Key key_;
  };

  // A place for `key`, or nullptr when `max` are taken already.
  std::unique_ptr<Slot> TryTake(const Key& key, int max) {
    std::lock_guard<std::mutex> lock(mu_);
    int& n = counts_[key];
    if (n >= max) {
      if (n == 0) counts_.erase(key);
      return nullptr;
    }
    ++n;
    return std::make_unique<Slot>(*this, key);
  }

  // Places taken for `key` now.
  int count(const Key& key) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = counts_.find(key);
    return it == counts_.end() ? 0 : it->second;
  }

 private:
  void Release(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = counts_.find(key);
    if (it != counts_.end() && --it->second == 0) counts_.erase(it);
  }

  mutable std::mutex mu_;
  std::map<Key, int> counts_;  // keys with a place taken
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_BOUNDED_COUNTS_H_
