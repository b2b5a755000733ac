// Token buckets by key.
#include "libs/common/token_buckets.h"

#include <algorithm>

namespace medgate {

absl::Duration TokenBuckets::TryTake(const std::string& key, double n, absl::Time now) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = buckets_.try_emplace(key, Bucket{burst_, now});
  Bucket& b = it->second;
  // Callers on several threads pass times read a little apart: one earlier than the bucket's
  // last refill adds nothing, and never takes tokens away.
  if (now > b.at) {
    b.tokens = std::min(burst_, b.tokens + absl::ToDoubleSeconds(now - b.at) * rate_);
    b.at = now;
  }
  if (b.tokens >= n) {
    b.tokens -= n;
    return absl::ZeroDuration();
  }
  return absl::Seconds((n - b.tokens) / rate_);
}

void TokenBuckets::Refund(const std::string& key, double n) {
  absl::MutexLock lock(&mu_);
  auto it = buckets_.find(key);
  if (it == buckets_.end()) return;  // no bucket yet: it starts full
  it->second.tokens = std::min(burst_, it->second.tokens + n);
}

}  // namespace medgate
