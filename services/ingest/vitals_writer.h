// The per-region writer: coalesces batches from many streams into one COPY transaction, with an
// audit entry for each batch that stores something or was refused for lack of consent, commits,
// then reports each batch's outcome. Its queue is bounded; a full queue makes callers wait.
#ifndef MEDGATE_SERVICES_INGEST_VITALS_WRITER_H_
#define MEDGATE_SERVICES_INGEST_VITALS_WRITER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include <libpq-fe.h>

#include "libs/common/config.h"
#include "libs/common/log.h"
#include "libs/pg/statement_watch.h"
#include "services/ingest/vitals_catalogue.h"

namespace medgate::ingest {

// One validated sample to store.
struct VitalRow {
  uint64_t seq = 0;
  std::string loinc;
  double value = 0;
  std::string ucum;
  absl::Time measured_at;
  std::optional<Location> location;  // already dropped unless GEOLOCATION is permitted
  bool location_dropped = false;     // it came with one, dropped for want of GEOLOCATION
};

// What happened to a batch's rows.
struct WriteOutcome {
  absl::Status status;            // not OK: nothing of the batch was stored; retry it
  uint32_t stored = 0;
  uint32_t duplicates = 0;
  uint64_t highest_committed_seq = 0;  // the device's cursor after the commit
  // Of the rows stored (duplicates aside): those that kept their location, and those whose
  // location was dropped.
  uint32_t locations_kept = 0;
  uint32_t locations_dropped = 0;
  // Of the samples the batch refused for lack of consent, the seqs already in storage: stored by
  // an earlier send of the same samples (whose commit was not answered), under the consent of
  // then. They are the device's duplicates, not refusals, and the denial does not count them.
  std::vector<uint64_t> refused_already_stored{};
};

// A sample refused for lack of consent, as its batch's denial entry counts it.
struct RefusedSample {
  uint64_t seq = 0;
  absl::Time measured_at;
  absl::string_view category;  // the catalogue's (static) data category
};

// Who sends a stream's batches, for their audit entries. The same for every batch of a stream:
// made once when the stream opens and shared by its batches, not copied into each.
struct BatchSource {
  std::string actor;   // the device's SPIFFE id
  std::string origin;  // its peer address
};

// A batch of one device, all rows for one patient, in increasing seq order.
struct WriteRequest {
  std::string tenant_id;
  std::string device_id;
  std::string patient_id;
  std::vector<VitalRow> rows;
  // Called once, on the writer's thread, after commit or failure. Must not block.
  std::function<void(const WriteOutcome&)> done;
  // Shared by a stream's requests: once one fails, the stream's later requests fail without
  // being written, so a device's seq never has a gap below its committed cursor.
  std::shared_ptr<std::atomic<bool>> poisoned;
  absl::Time read_at;  // when its batch was read off the stream
  // For the audit entry of what the batch stores (written in the same transaction): its stream's
  // source, its batch sequence, and the REMOTE_MONITORING consent the batch was accepted under.
  std::shared_ptr<const BatchSource> source;
  uint64_t batch_seq = 0;
  std::string consent_id;
  int64_t consent_version = 0;
  // Samples refused for lack of consent, in seq order: their audit entry is a denial
  // ("<denial_code>: refused=N categories=..."), under the consent it cites, written in the same
  // transaction as the rows stored (if any), and the batch is answered once it is committed. A
  // refused sample found already in storage is not counted (see WriteOutcome).
  std::vector<RefusedSample> refused;
  std::string denial_code;  // consent::AccessReasonName of the refusal
  std::string denial_consent_id;
  int64_t denial_consent_version = 0;
  // For a stored batch's entry when the rows it stores carried locations: the GEOLOCATION decision
  // they were kept under ("GEOLOCATION=<consent>/v<version>"), or dropped for
  // ("GEOLOCATION=<reason>"). The writer adds how many, of the rows it stored.
  std::string locations_kept_under;
  std::string locations_dropped_for;
};

struct WriterOptions {
  size_t max_queued_requests = 4096;
  // Rows queued at most (a request larger than this is still taken into an empty queue): with
  // batches of up to 1,000 samples, the request bound alone would let a lane hold millions.
  size_t max_queued_rows = 200000;
  size_t max_rows_per_transaction = 20000;
  absl::Duration linger = absl::Milliseconds(2);  // wait this long for more work to coalesce
  // A batch read longer ago than this when its transaction starts is not written: answered with
  // a retryable error, so its device resends it and it is decided again. Its consent and
  // routing decisions were taken when it was read; this bounds how old they may be when it is
  // stored (with the transaction's own statement bound on top).
  absl::Duration max_batch_wait = absl::Seconds(10);
  // How often `vitals_writer_stats` (and the service's `ingest_ack_latency`) is logged.
  absl::Duration stats_interval = absl::Seconds(10);
};

class VitalsWriter {
 public:
  // The writer owns one libpq connection to the region's shard (binary COPY needs libpq itself).
  VitalsWriter(std::string region_id, DbConfig db, WriterOptions options);
  ~VitalsWriter();
  VitalsWriter(const VitalsWriter&) = delete;
  VitalsWriter& operator=(const VitalsWriter&) = delete;

  // Queues a request, waiting up to `wait` for room: false when still full (backpressure).
  bool Enqueue(WriteRequest request, absl::Duration wait);
  // Queues a request if there is room now and no Enqueue is waiting for room; otherwise (or when
  // stopping) returns false and leaves `request` as it was.
  bool TryEnqueue(WriteRequest& request);
  size_t queued();
  // Groups of requests taken off the queue into a transaction since start.
  uint64_t groups_taken();
  const std::string& region_id() const { return region_id_; }

 private:
  void Loop();
  void PushAndUnlock(WriteRequest request, std::unique_lock<std::mutex>& lock);
  // Whether a request of `rows` rows fits the queue's bounds now (mu_ held).
  bool HasRoomFor(size_t rows) const;
  void Commit(std::vector<WriteRequest>& group);
  // Answers and takes out of `live` the requests not to be written now: those of a stream that
  // already failed, and those read longer than max_batch_wait ago (their streams then fail).
  void TakeOutStale(std::vector<WriteRequest*>& live);
  // One attempt at writing `live` in one transaction on the open connection (EnsureConnected
  // first); fills `outcomes`. `commit_sent` is set once the COMMIT has gone to the shard: from
  // then on a failure may follow a commit that happened.
  absl::Status WriteOnce(const std::vector<WriteRequest*>& live, std::vector<WriteOutcome>& outcomes,
                         bool& commit_sent);
  // The status of a transaction or connection set-up given up on a shard that did not answer.
  absl::Status NotAnswering() const;
  absl::Status EnsureConnected();

  const std::string region_id_;
  const DbConfig db_;
  PGconn* conn_ = nullptr;  // only the writer thread touches it
  // Gives up on a shard that stops answering (frozen, its storage hung) once it has sent nothing
  // for pg::UnansweredLimit(statement_timeout): its statement_timeout cannot end a wait then.
  pg::StatementWatch watch_;
  const WriterOptions options_;
  // Where the writer's time goes, logged every 10 s (writer thread only).
  struct WriterStats {
    absl::Time since = absl::Now();
    uint64_t transactions = 0;
    uint64_t batches = 0;
    uint64_t rows = 0;
    absl::Duration open;         // BEGIN, cursors locked and advanced, COPY started: one round trip
    absl::Duration encode;  // the rows encoded for COPY
    absl::Duration copy;    // sent and stored: the second round trip
    absl::Duration commit;  // audit entries appended and COMMIT: the third
    absl::Duration longest;      // the longest transaction, from BEGIN to COMMIT
    absl::Duration longest_wait;  // the longest from a batch read to its transaction's start
  };
  WriterStats stats_;
  // Batches answered for waiting past max_batch_wait since the last line that said so (writer
  // thread only), and that line's pace.
  uint64_t too_old_unlogged_ = 0;
  log::Throttle too_old_log_{absl::Seconds(1)};
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable room_cv_;
  std::deque<WriteRequest> queue_;
  size_t queued_rows_ = 0;  // rows of the requests in queue_
  uint64_t groups_taken_ = 0;
  int waiting_for_room_ = 0;  // Enqueue calls waiting for room
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_VITALS_WRITER_H_
