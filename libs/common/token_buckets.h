// Token buckets by key (a tenant): a rate with a burst, each key its own bucket.
#ifndef MEDGATE_LIBS_COMMON_TOKEN_BUCKETS_H_
#define MEDGATE_LIBS_COMMON_TOKEN_BUCKETS_H_

#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medgate {

// `rate` tokens a second into buckets of at most `burst`; a key's bucket starts full. Thread-safe.
// One bucket per key ever used: callers key it by what is already bounded (registered tenants).
class TokenBuckets {
 public:
  TokenBuckets(double rate, double burst) : rate_(rate), burst_(burst) {}
  // Takes `n` tokens if available (zero returned); otherwise takes none and returns how long
  // until they would be.
  absl::Duration TryTake(const std::string& key, double n, absl::Time now);
  // Puts back `n` tokens taken for work that was then not done, never beyond the burst. It needs
  // no clock: refilling before or after adding them ends the same, both being capped at the burst.
  void Refund(const std::string& key, double n);

  double rate() const { return rate_; }
  double burst() const { return burst_; }

 private:
  struct Bucket {
    double tokens;
    absl::Time at;
  };
  const double rate_;
  const double burst_;
  absl::Mutex mu_;
  std::map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_TOKEN_BUCKETS_H_
