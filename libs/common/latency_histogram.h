// A fixed-size, lock-free latency histogram for hot paths: Record() is a few relaxed atomic
// adds, TakeSummary() reads and resets it. Buckets grow by 2^(1/4) from 0.1 ms, so a percentile
// is reported as its bucket's upper bound: at most 19% above the true value, never below it.
#ifndef MEDGATE_LIBS_COMMON_LATENCY_HISTOGRAM_H_
#define MEDGATE_LIBS_COMMON_LATENCY_HISTOGRAM_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>

#include "absl/time/time.h"

namespace medgate {

class LatencyHistogram {
 public:
  // Bucket i holds latencies up to UpperBoundMs(i); the last one holds everything above
  // UpperBoundMs(kBuckets - 2) (about 5.5 s).
  static constexpr int kBuckets = 64;
  static double UpperBoundMs(int bucket);

  struct Summary {
    uint64_t count = 0;
    double p50_ms = 0;
    double p90_ms = 0;
    double p99_ms = 0;
    double max_ms = 0;  // exact
  };

  void Record(absl::Duration latency);
  // What was recorded since the last call; starts over.
  Summary TakeSummary();

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<int64_t> max_us_{0};
};

// A LatencyHistogram summarized once per `interval`: Record() returns the summary of the window
// it closes (the first record after the interval ends closes it), so the caller can log it. The
// caller passes the time it already read, so the hot path reads the clock once.
class LatencyWindow {
 public:
  struct Closed {
    absl::Duration length;  // from the window's first record to the one that closed it
    LatencyHistogram::Summary summary;
  };

  explicit LatencyWindow(absl::Duration interval) : interval_(interval) {}
  std::optional<Closed> Record(absl::Duration latency, absl::Time now);

 private:
  const absl::Duration interval_;
  LatencyHistogram histogram_;
  std::atomic<int64_t> started_us_{0};  // 0: no window open yet
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_LATENCY_HISTOGRAM_H_
