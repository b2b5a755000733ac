#include "libs/common/latency_histogram.h"

#include <algorithm>
#include <cmath>

namespace medgate {
namespace {

constexpr double kFirstBoundMs = 0.1;

int BucketOf(double ms) {
  if (ms <= kFirstBoundMs) return 0;
  // ms <= 0.1 * 2^(i/4)  <=>  i >= 4 * log2(ms / 0.1)
  const double i = std::ceil(4.0 * std::log2(ms / kFirstBoundMs) - 1e-9);
  return static_cast<int>(std::min(i, static_cast<double>(LatencyHistogram::kBuckets - 1)));
}

}  // namespace

double LatencyHistogram::UpperBoundMs(int bucket) {
  return kFirstBoundMs * std::exp2(static_cast<double>(bucket) / 4.0);
}

void LatencyHistogram::Record(absl::Duration latency) {
  const int64_t us = std::max<int64_t>(0, absl::ToInt64Microseconds(latency));
  counts_[static_cast<size_t>(BucketOf(static_cast<double>(us) / 1000.0))].fetch_add(
      1, std::memory_order_relaxed);
  int64_t seen = max_us_.load(std::memory_order_relaxed);
  while (us > seen && !max_us_.compare_exchange_weak(seen, us, std::memory_order_relaxed)) {
  }
}

LatencyHistogram::Summary LatencyHistogram::TakeSummary() {
  std::array<uint64_t, kBuckets> counts{};
  Summary s;
  for (int i = 0; i < kBuckets; ++i) {
    counts[static_cast<size_t>(i)] =
        counts_[static_cast<size_t>(i)].exchange(0, std::memory_order_relaxed);
    s.count += counts[static_cast<size_t>(i)];
  }
  s.max_ms = static_cast<double>(max_us_.exchange(0, std::memory_order_relaxed)) / 1000.0;
  if (s.count == 0) return s;
  // The smallest bucket bound under which at least `fraction` of the latencies fall, capped by
  // the exact maximum (the overflow bucket has no upper bound of its own).
  auto percentile = [&](double fraction) {
    const double rank = std::ceil(fraction * static_cast<double>(s.count));
    uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += counts[static_cast<size_t>(i)];
      if (static_cast<double>(seen) >= rank) {
        return i == kBuckets - 1 ? s.max_ms : std::min(UpperBoundMs(i), s.max_ms);
      }
    }
    return s.max_ms;
  };
  s.p50_ms = percentile(0.50);
  s.p90_ms = percentile(0.90);
  s.p99_ms = percentile(0.99);
  return s;
}

std::optional<LatencyWindow::Closed> LatencyWindow::Record(absl::Duration latency, absl::Time now) {
  histogram_.Record(latency);
  const int64_t now_us = absl::ToUnixMicros(now);
  int64_t started = started_us_.load(std::memory_order_relaxed);
  if (started == 0) {
    started_us_.compare_exchange_strong(started, now_us, std::memory_order_relaxed);
    return std::nullopt;
  }
  // One caller closes the window: the one whose exchange moves its start.
  if (now_us - started < absl::ToInt64Microseconds(interval_) ||
      !started_us_.compare_exchange_strong(started, now_us, std::memory_order_relaxed)) {
    return std::nullopt;
  }
  return Closed{absl::Microseconds(now_us - started), histogram_.TakeSummary()};
}

}  // namespace medgate
