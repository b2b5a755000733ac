// The ingest logic for one batch, in plain values: resolve the device, check consent, validate,
// apply the tenant's quota, and hand the rows to the home region's writer.
#ifndef MEDGATE_SERVICES_INGEST_INGEST_CORE_H_
#define MEDGATE_SERVICES_INGEST_INGEST_CORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "libs/common/bounded_counts.h"
#include "libs/common/token_buckets.h"
#include "absl/time/time.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/identity/principal.h"
#include "libs/routing_client/routing_client.h"
#include "services/ingest/vitals_catalogue.h"
#include "services/ingest/vitals_writer.h"

namespace medgate::ingest {

inline constexpr size_t kMaxSamplesPerBatch = 1000;
// The largest VitalsBatch message a stream receives: 1000 samples with every field at its
// largest take under 100 KiB. A larger message ends the stream with RESOURCE_EXHAUSTED before it
// is parsed (empty samples, 2 bytes each on the wire, take about 100 bytes each in memory).
inline constexpr size_t kMaxBatchMessageBytes = 256 << 10;

struct Rejection {
  uint32_t index = 0;
  uint64_t seq = 0;
  Reject reason = Reject::kNone;
  std::string detail;
};

// The outcome of one batch, which becomes its IngestAck.
struct BatchResult {
  uint64_t batch_seq = 0;
  absl::Status retryable;  // not OK: nothing stored, resend the whole batch
  absl::Duration retry_after;
  uint32_t stored = 0;
  uint32_t duplicates = 0;
  std::vector<Rejection> rejections;
  uint32_t locations_dropped = 0;  // stored samples whose location was dropped (no GEOLOCATION)
  uint64_t highest_committed_seq = 0;
};

struct IngestOptions {
  ValidationPolicy validation;
  double tenant_samples_per_second = 50000;  // per-tenant quota
  double tenant_burst = 100000;
  absl::Duration enqueue_wait = absl::Seconds(10);  // backpressure bound before RESOURCE_EXHAUSTED
  // Threads that may wait for room in one region's write queues at once (IngestServer gives half
  // its worker threads, from ingest.worker_threads): a region whose shard is slow or gone cannot
  // hold every worker, which the other regions' batches need too. One more is answered at once
  // as if the wait had ended.
  int max_waiting_per_region = 4;
  // The same bound over every region together (IngestServer leaves a quarter of its workers,
  // and at least one when it has two or more, free): two or more stalled regions cannot hold
  // them all either.
  int max_waiting = 6;
};

// Refusals since start, for metrics and tests.
struct IngestCounters {
  uint64_t queue_full = 0;     // a region's write queue stayed full for enqueue_wait
  uint64_t quota_refused = 0;  // the tenant's sample quota was exhausted
  uint64_t batches = 0;        // batches read off the streams
};

class IngestCore {
 public:
  // `writers` has one or more lanes per region; a device always uses the same lane, so its
  // batches are written in order while lanes of one region commit in parallel.
  IngestCore(RoutingClient& routing, consent::ConsentCache& consent,
             std::map<std::string, std::vector<VitalsWriter*>> writers, IngestOptions options);

  // Processes one batch of `device`: `done` is called exactly once with its result, possibly on
  // another thread, after the rows are committed (or immediately when nothing is to be written).
  // A permanent problem with the stream itself (device not assigned, batch too large) is returned
  // as an error status and `done` is not called. `poisoned` is the stream's flag: the writer
  // refuses a poisoned stream's batches (the stream sets it on any retryable ack). `read_at` is
  // when the batch was read off its stream: the time it is validated and charged at.
  //
  // Without `later`, routing and consent look-ups may wait for a round trip, and a full write
  // queue is waited on for enqueue_wait. With it, Process never waits, and leaves in `later` what
  // is left to do where waiting is allowed: see Later.
  struct Later {
    // A routing answer or the patient's consents are not in memory: nothing was done for the
    // batch (`samples` is untouched and `done` was not called); process it again, waiting.
    bool again = false;
    // The writer's queue was full: the batch is built and charged; call this to wait for room
    // (up to enqueue_wait when `wait`, else not at all), after which it is queued or answered
    // RESOURCE_EXHAUSTED. Empty when nothing is left.
    std::function<void(bool wait)> enqueue;
  };
  // A batch's shape as the stream received it: batch_seq >= 1, 1 to kMaxSamplesPerBatch samples.
  // INVALID_ARGUMENT otherwise (Process checks it too); checked before the samples are copied out
  // of the message, so that a message of millions of empty samples is not copied as well.
  static absl::Status CheckBatch(uint64_t batch_seq, size_t samples);

  // `samples` is consumed unless `later->again` is set. `source` names the stream's device and
  // peer address for the audit entries.
  absl::Status Process(const Principal& device, std::shared_ptr<const BatchSource> source,
                       uint64_t batch_seq,
                       std::vector<Sample>& samples,
                       std::shared_ptr<std::atomic<bool>> poisoned, absl::Time read_at,
                       std::function<void(BatchResult)> done, Later* later = nullptr);

  // Threads waiting for room in `region`'s write queues now.
  int WaitingForRoom(const std::string& region) const { return waiting_by_region_.count(region); }

  IngestCounters Counters() const {
    return {queue_full_.load(std::memory_order_relaxed),
            quota_refused_.load(std::memory_order_relaxed),
            batches_.load(std::memory_order_relaxed)};
  }

 private:
  RoutingClient& routing_;
  consent::ConsentCache& consent_;
  const std::map<std::string, std::vector<VitalsWriter*>> writers_;
  const IngestOptions options_;
  TokenBuckets quota_;  // samples, per tenant
  std::atomic<uint64_t> queue_full_{0};
  std::atomic<uint64_t> quota_refused_{0};
  std::atomic<uint64_t> batches_{0};
  BoundedCounts<std::string> waiting_by_region_;  // threads waiting for room, per region
  BoundedCounts<int> waiting_all_;                // the same, all regions together (key 0)
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_INGEST_CORE_H_
