// The DeviceIngest gRPC adapter.
#include "services/ingest/ingest_service.h"

#include <algorithm>
#include <deque>
#include <mutex>
#include <optional>
#include <set>

#include <grpcpp/support/proto_buffer_reader.h>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "libs/audit/audit_log.h"
#include "libs/common/grpc_status.h"
#include "libs/common/log.h"
#include "libs/common/validation.h"
#include "libs/common/proto_duration.h"
#include "libs/pg/sql_array.h"
#include "libs/server/rpc_util.h"
#include "libs/server/transfer_pace.h"
#include "services/ingest/fhir_observation.h"
#include "services/ingest/sql.h"

namespace medgate::ingest {
namespace {

using K = PrincipalKind;

// Acks a stream may owe before it stops reading (per-stream bound on in-flight batches).
constexpr size_t kMaxInFlightBatches = 16;
// Bytes of acks made and not yet sent past which a stream stops reading: a device that sends
// batches of rejected samples and reads no ack holds at most this, plus an ack or two.
constexpr size_t kMaxOwedAckBytes = 64 * 1024;
// Rejections of one ack that carry their detail; the others carry their reason only (a batch
// with this many rejected samples has a fault the first details show). Bounds an ack to about
// 20 KB with 1,000 rejections.
constexpr int kDetailedRejectionsPerAck = 32;
// A stream keeps the sample objects of its last batch for the next read, up to this many.
constexpr int kRetainedSamples = 100;
constexpr int kReadChunk = 500;
constexpr int kDefaultReadPage = 1000;
constexpr int kMaxReadPage = 10000;
constexpr int kDefaultExportPage = 5000;
// A device id is at most 128 bytes (routing's identifiers); a page token is two numbers and one.
constexpr size_t kMaxDeviceIdBytes = 128;
constexpr size_t kMaxPageTokenBytes = 64 + kMaxDeviceIdBytes;

v1::RejectReason ToProto(Reject r) {
  switch (r) {
    case Reject::kUnknownCode: return v1::REJECT_REASON_UNKNOWN_CODE;
    case Reject::kWrongUnit: return v1::REJECT_REASON_WRONG_UNIT;
    case Reject::kOutOfRange: return v1::REJECT_REASON_OUT_OF_RANGE;
    case Reject::kNotFinite: return v1::REJECT_REASON_NOT_FINITE;
    case Reject::kTimeInFuture: return v1::REJECT_REASON_TIME_IN_FUTURE;
    case Reject::kTimeTooOld: return v1::REJECT_REASON_TIME_TOO_OLD;
    case Reject::kNoConsent: return v1::REJECT_REASON_NO_CONSENT;
    case Reject::kInvalidSeq: return v1::REJECT_REASON_INVALID_SEQ;
    case Reject::kMissingTime: return v1::REJECT_REASON_MISSING_TIME;
    case Reject::kInvalidLocation: return v1::REJECT_REASON_INVALID_LOCATION;
    case Reject::kBeforeAssignment: return v1::REJECT_REASON_BEFORE_ASSIGNMENT;
    case Reject::kNone: break;
  }
  return v1::REJECT_REASON_UNSPECIFIED;
}

google::protobuf::Timestamp TimestampFromMicros(int64_t us) {
  google::protobuf::Timestamp ts;
  ts.set_seconds(us / 1000000);
  ts.set_nanos(static_cast<int32_t>((us % 1000000) * 1000));
  return ts;
}

v1::IngestAck ToAck(const BatchResult& r) {
  v1::IngestAck ack;
  ack.set_batch_seq(r.batch_seq);
  if (!r.retryable.ok()) {
    ack.mutable_retryable_error()->set_code(static_cast<int32_t>(r.retryable.code()));
    ack.mutable_retryable_error()->set_message(std::string(r.retryable.message()));
    // Rounded up to the millisecond: a device that waits this long finds room.
    *ack.mutable_retry_after() = ToProtoDuration(absl::Ceil(r.retry_after, absl::Milliseconds(1)));
    return ack;
  }
  ack.set_stored_count(r.stored);
  ack.set_duplicate_count(r.duplicates);
  ack.set_rejected_count(static_cast<uint32_t>(r.rejections.size()));
  for (const Rejection& rej : r.rejections) {
    v1::SampleRejection* out = ack.add_rejections();
    out->set_sample_index(rej.index);
    out->set_seq(rej.seq);
    out->set_reason(ToProto(rej.reason));
    if (ack.rejections_size() <= kDetailedRejectionsPerAck) out->set_detail(rej.detail);
  }
  ack.set_locations_dropped_count(r.locations_dropped);
  ack.set_highest_committed_seq(r.highest_committed_seq);
  return ack;
}

// A sample as a device sent it, or as ReadVitals returns a stored one.
Sample ToSample(const v1::VitalSample& in) {
  Sample s;
  s.seq = in.seq();
  s.loinc = in.loinc_code();
  s.value = in.value();
  s.ucum = in.ucum_unit();
  if (in.has_measured_at()) {
    // Out-of-range nanos would otherwise move the sample in time.
    if (IsValidTimestamp(in.measured_at())) {
      s.measured_at = FromProtoTimestamp(in.measured_at());
    } else {
      s.measured_at_malformed = true;
    }
  }
  if (in.has_location()) {
    s.location = Location{in.location().latitude(), in.location().longitude(),
                          in.location().accuracy_m()};
  }
  return s;
}

std::vector<Sample> ToSamples(const v1::VitalsBatch& batch) {
  std::vector<Sample> samples;
  samples.reserve(static_cast<size_t>(batch.samples_size()));
  for (const v1::VitalSample& in : batch.samples()) samples.push_back(ToSample(in));
  return samples;
}

// Keyset position after which a page of readings starts.
struct PagePosition {
  int64_t after_us = 0;
  int64_t after_seq = 0;
  std::string after_device;
};

// The position of `token` ("measured_us|seq|device_id" of the last reading of the previous page),
// issued for the time range [from_us, to_us); an empty token starts the range.
absl::StatusOr<PagePosition> ParsePageToken(const std::string& token, int64_t from_us,
                                            int64_t to_us) {
  PagePosition position;
  position.after_us = from_us - 1;
  if (token.empty()) return position;
  // Bounded, as it goes into the audit entry.
  std::vector<std::string> parts = absl::StrSplit(token, absl::MaxSplits('|', 2));
  if (token.size() > kMaxPageTokenBytes || parts.size() != 3 ||
      !absl::SimpleAtoi(parts[0], &position.after_us) ||
      !absl::SimpleAtoi(parts[1], &position.after_seq) ||
      !ValidateIdentifier(parts[2], "page_token", kMaxDeviceIdBytes).ok()) {
    return absl::InvalidArgumentError("page_token: not a token we issued");
  }
  // A token's position is a reading of its request's time range: one outside this request's
  // (another request's token, or a forged time the shard could not even convert) is refused.
  if (position.after_us < from_us - 1 || position.after_us >= to_us) {
    return absl::InvalidArgumentError("page_token: not a token we issued for this time_range");
  }
  position.after_device = std::move(parts[2]);
  return position;
}

// The token of the page after `last`.
std::string PageTokenAfter(const v1::VitalReading& last) {
  return absl::StrCat(absl::ToUnixMicros(FromProtoTimestamp(last.sample().measured_at())), "|",
                      last.sample().seq(), "|", last.device_id());
}

// One page of a patient's readings, and one more if there is one (so that the caller knows
// whether to issue a token).
struct PageRead {
  std::vector<v1::VitalReading> readings;
  size_t locations_disclosed = 0;  // of the page's readings (not the extra one)
  size_t locations_withheld = 0;
};

// Every code the patient's samples have: the catalogue's, and any a later version dropped from
// it (stored before).
std::vector<std::string> StoredCodes(pqxx::work& txn, const PatientLocation& where) {
  std::vector<std::string> codes;
  for (const pqxx::row& row :
       txn.exec_prepared(sql::kStoredVitalCodes, where.tenant_id, where.patient_id)) {
    codes.push_back(row[0].as<std::string>());
  }
  return codes;
}

PageRead ReadPage(pqxx::work& txn, const std::string& patient_id,
                  const std::vector<std::string>& codes, int64_t from_us, int64_t to_us,
                  const PagePosition& after, int page, bool with_location) {
  PageRead read;
  for (const pqxx::row& row :
       txn.exec_prepared(sql::kReadVitals, patient_id, pg::TextArrayLiteral(codes), from_us,
                         to_us, after.after_us, after.after_device, after.after_seq, page + 1)) {
    v1::VitalReading r;
    r.set_device_id(row[0].c_str());
    v1::VitalSample* s = r.mutable_sample();
    s->set_seq(row[1].as<uint64_t>());
    s->set_loinc_code(row[2].c_str());
    s->set_value(row[3].as<double>());
    s->set_ucum_unit(row[4].c_str());
    *s->mutable_measured_at() = TimestampFromMicros(row[5].as<int64_t>());
    *r.mutable_received_at() = TimestampFromMicros(row[6].as<int64_t>());
    const bool in_page = read.readings.size() < static_cast<size_t>(page);
    if (!row[7].is_null() && with_location) {
      if (in_page) ++read.locations_disclosed;
      s->mutable_location()->set_latitude(row[7].as<double>());
      s->mutable_location()->set_longitude(row[8].as<double>());
      s->mutable_location()->set_accuracy_m(row[9].as<double>());
    } else if (!row[7].is_null() && in_page) {
      ++read.locations_withheld;
    }
    read.readings.push_back(std::move(r));
  }
  return read;
}

// What an audit entry of a read says of the locations it let out, under the GEOLOCATION
// decision that let them out, and of those it withheld.
void AppendLocations(const PageRead& read,
                     const absl::StatusOr<consent::AccessDecision>& geolocation,
                     std::string* reason) {
  if (read.locations_disclosed > 0) {
    absl::StrAppend(reason, " locations=", read.locations_disclosed, " GEOLOCATION=",
                    geolocation->consent_id, "/v", geolocation->consent_version);
  }
  if (read.locations_withheld > 0) {
    absl::StrAppend(reason, " locations_withheld=", read.locations_withheld, " (",
                    geolocation.ok() ? consent::AccessReasonName(geolocation->reason)
                                     : "GEOLOCATION consent unavailable",
                    ")");
  }
}

class VitalsStream;

// What outlives the reactor: callbacks from the writer reach the reactor only while it lives.
struct StreamShared {
  std::mutex mu;
  VitalsStream* reactor = nullptr;
};

using Turn = std::shared_ptr<DeviceTurns::Turn>;

class VitalsStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  VitalsStream(IngestCore& core, StreamExecutor& executor, LatencyWindow& ack_latency,
               DeviceTurns& turns, PeerCertificates& peers,
               absl::StatusOr<Principal> principal,
               std::shared_ptr<const PeerCertificate> certificate, std::string origin,
               std::unique_ptr<IngestService::DeviceStreamSlot> slot)
      : core_(core),
        executor_(executor),
        ack_latency_(ack_latency),
        peers_(peers),
        certificate_(std::move(certificate)),
        slot_(std::move(slot)),
        shared_(std::make_shared<StreamShared>()) {
    if (!principal.ok()) {
      // Marked finished first: a cancellation from the client (OnCancel) must not finish the
      // call a second time, which gRPC treats as a fatal misuse.
      std::lock_guard<std::mutex> lock(shared_->mu);
      finished_ = true;
      fail_ = ToGrpcStatus(principal.status());
      Finish(*fail_);
      return;
    }
    principal_ = *std::move(principal);
    source_ =
        std::make_shared<const BatchSource>(BatchSource{principal_.spiffe_id, std::move(origin)});
    shared_->reactor = this;
    // The stream reads once it holds its device's turn (DeviceTurns): now, or when the device's
    // older stream is done with it. Not under the lock: taking the turn supersedes the older
    // stream, which may hand the turn over (and call `start`) at once.
    std::weak_ptr<StreamShared> weak = shared_;
    DeviceTurns::Stream callbacks;
    callbacks.supersede = [weak] {
      std::shared_ptr<StreamShared> shared = weak.lock();
      if (shared == nullptr) return;
      Turn released;  // destroyed after the lock: it may start the next stream
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->reactor != nullptr) released = shared->reactor->SupersedeLocked();
    };
    callbacks.start = [weak](Turn turn) {
      std::shared_ptr<StreamShared> shared = weak.lock();
      if (shared == nullptr) return;
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->reactor != nullptr) shared->reactor->StartLocked(turn);
    };
    Turn turn = turns.Open(principal_.spiffe_id, std::move(callbacks));
    std::lock_guard<std::mutex> lock(shared_->mu);
    if (turn != nullptr) StartLocked(turn);
  }

  void OnReadDone(bool ok) override {
    // The message read is the reactor's alone until it starts the next read: parsed unlocked.
    bool parsed = false;
    if (ok) {
      {
        grpc::ProtoBufferReader reader(&incoming_bytes_);
        parsed = reader.status().ok() && incoming_.ParseFromZeroCopyStream(&reader);
      }
      incoming_bytes_.Clear();
    }
    // The handshake verified the device's certificate once; a stream lives on (up to the
    // connection's maximum age) after it expires or is revoked. Checked again for each batch, as
    // the server checks each call: the batch is not stored, those before it are answered, and
    // the stream ends UNAUTHENTICATED.
    const absl::Time read_at = absl::Now();  // the batch's, and the check's: one clock read
    absl::Status still_good = absl::OkStatus();
    if (ok && parsed) still_good = peers_.Check(*certificate_, read_at);
    std::unique_lock<std::mutex> lock(shared_->mu);
    read_outstanding_ = false;
    if (!ok || superseded_ || fail_) {
      // A batch read after a newer stream of the device opened is dropped unanswered: the
      // device resends it there, after this stream's earlier batches. So is one read after the
      // stream failed (a batch of it was not stored): it would be refused, and the stream is
      // ending; the device resends it on its next stream.
      if (!ok) reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    if (!parsed) {
      // Not a batch: nothing of it is stored, and it cannot be acknowledged by its batch_seq.
      // The batches read before it are answered, then the stream ends.
      incoming_.Clear();
      if (!fail_) {
        fail_ = grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            absl::StrCat("the message after batch_seq ", last_batch_seq_,
                         " is not a VitalsBatch: it does not parse (every string field, "
                         "loinc_code and ucum_unit among them, must be valid UTF-8); nothing "
                         "of it was stored, and the batches before it are answered"));
      }
      MaybeFinishLocked();
      return;
    }
    if (!still_good.ok()) {
      incoming_.Clear();
      if (!fail_) fail_ = ToGrpcStatus(still_good);
      MaybeFinishLocked();
      return;
    }
    const uint64_t slot = first_slot_ + pending_.size();
    pending_.push_back(PendingAck{std::nullopt, 0, read_at});
    // Until the batch is with its writer (or answered), the stream reads nothing more and cannot
    // finish: this reactor stays alive while it is processed below.
    processing_ = true;
    // The samples are copied out and `incoming_` is cleared, not moved from: the next read
    // reuses its sample objects instead of allocating them again (unless the batch was large).
    const uint64_t batch_seq = incoming_.batch_seq();
    last_batch_seq_ = batch_seq;
    const absl::Status shape =
        IngestCore::CheckBatch(batch_seq, static_cast<size_t>(incoming_.samples_size()));
    std::vector<Sample> samples;
    if (shape.ok()) samples = ToSamples(incoming_);
    if (incoming_.samples_size() > kRetainedSamples) {
      incoming_ = v1::VitalsBatch();
    } else {
      incoming_.Clear();
    }
    std::shared_ptr<StreamShared> shared = shared_;
    Turn turn = turn_;  // each batch holds the device's turn until it is answered
    lock.unlock();
    // Most batches need nothing that waits (their routing and consent answers are in memory and
    // their writer's queue has room): they are processed here, on gRPC's callback thread, which
    // saves a hand-over to a worker thread per batch. What has to wait goes to a worker thread:
    // the whole batch when a look-up would, only its enqueueing when the writer's queue is full.
    IngestCore::Later later;
    absl::Status status =
        shape.ok() ? Process(shared, turn, batch_seq, samples, read_at, slot, &later) : shape;
    std::function<void()> rest;
    if (later.again) {
      // Untouched by Process: moved to the worker (a std::function's captures must be copyable).
      rest = [this, shared, turn, batch_seq, read_at, slot,
              held = std::make_shared<std::vector<Sample>>(std::move(samples))] {
        absl::Status waited = Process(shared, turn, batch_seq, *held, read_at, slot, nullptr);
        Processed(shared, slot, waited);
      };
    } else if (later.enqueue) {
      rest = [this, shared, slot, status, enqueue = later.enqueue] {
        enqueue(/*wait=*/true);
        Processed(shared, slot, status);
      };
    } else {
      Processed(shared, slot, status);
      return;
    }
    if (executor_.Post(std::move(rest))) return;
    // No worker can take it: a built batch is answered that its queue is full; one not yet looked
    // up, that ingest is saturated.
    if (later.enqueue) {
      later.enqueue(/*wait=*/false);
      Processed(shared, slot, status);
      return;
    }
    BatchResult busy;
    busy.batch_seq = batch_seq;
    busy.retryable = absl::ResourceExhaustedError("ingest is saturated; resend later");
    busy.retry_after = absl::Seconds(1);
    lock.lock();
    processing_ = false;
    Turn released = ReleaseTurnIfSupersededLocked();
    CompleteLocked(slot, ToAck(busy));
    ContinueLocked();
    lock.unlock();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(shared_->mu);
    write_in_flight_ = false;
    if (!ok) {
      broken_ = true;  // the client is gone: acks can no longer be delivered
      pending_.clear();
      owed_ack_bytes_ = 0;
    }
    FlushLocked();
    ContinueLocked();
    MaybeFinishLocked();
  }

  void OnCancel() override {
    // Reads and writes in progress end by themselves; a stream still waiting for its device's
    // turn has none, and finishes here.
    std::lock_guard<std::mutex> lock(shared_->mu);
    if (!fail_) fail_ = grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled");
    MaybeFinishLocked();
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->reactor = nullptr;
    }
    delete this;  // gives up the device's turn, if the stream still holds it
  }

  // The device's turn has come (DeviceTurns): read, unless the stream is ending already. The
  // turn is kept only then; otherwise it is passed on when the caller drops it.
  void StartLocked(Turn& turn) {
    if (fail_ || finished_ || broken_) return;
    turn_ = std::move(turn);
    ContinueLocked();
  }

  // A newer stream of the device opened: read no more, answer what was read, then end. Returns
  // the device's turn for the caller to drop after unlocking, if nothing read is in processing.
  [[nodiscard]] Turn SupersedeLocked() {
    superseded_ = true;
    if (!fail_) {
      fail_ = grpc::Status(grpc::StatusCode::ABORTED,
                           "a newer stream of this device opened; this one reads no more. "
                           "Resend on the newer stream what this one did not acknowledge");
    }
    Turn released = ReleaseTurnIfSupersededLocked();
    MaybeFinishLocked();
    return released;
  }

  // The stream's own hold on the device's turn ends once it is superseded and processes no
  // batch; the batches with the writer keep theirs until they are answered.
  [[nodiscard]] Turn ReleaseTurnIfSupersededLocked() {
    if (!superseded_ || processing_) return nullptr;
    return std::move(turn_);
  }

 private:
  // Hands the batch to the core; with `later` (on gRPC's callback thread) it waits for nothing
  // and says what is left (IngestCore::Later).
  absl::Status Process(const std::shared_ptr<StreamShared>& shared, const Turn& turn,
                       uint64_t batch_seq, std::vector<Sample>& samples, absl::Time read_at,
                       uint64_t slot, IngestCore::Later* later) {
    return core_.Process(
        principal_, source_, batch_seq, samples, poisoned_, read_at,
        [shared, turn, slot](BatchResult result) {
          std::lock_guard<std::mutex> lock(shared->mu);
          if (shared->reactor != nullptr) shared->reactor->CompleteLocked(slot, ToAck(result));
        },
        later);
  }

  // The batch is with its writer, or answered: the stream may read its next one.
  void Processed(const std::shared_ptr<StreamShared>& shared, uint64_t slot, absl::Status status) {
    Turn released;  // destroyed after the lock: it may start the device's next stream
    std::lock_guard<std::mutex> lock(shared->mu);
    if (shared->reactor == nullptr) return;
    processing_ = false;
    released = ReleaseTurnIfSupersededLocked();
    if (!status.ok()) {
      // A problem with the stream itself: earlier batches still get their acks, then it ends.
      fail_ = ToGrpcStatus(status);
      // The batch and those after it get no ack (pending_ is empty once the client is gone).
      const size_t from = std::min<size_t>(slot - first_slot_, pending_.size());
      for (size_t i = from; i < pending_.size(); ++i) owed_ack_bytes_ -= pending_[i].bytes;
      pending_.erase(pending_.begin() + static_cast<long>(from), pending_.end());
    }
    ContinueLocked();
    MaybeFinishLocked();
  }

  void CompleteLocked(uint64_t slot, v1::IngestAck ack) {
    // A batch not stored (retryable ack): no later batch of this stream may be stored before
    // the device resends it, or the device's seq cursor would pass it and the resend would count
    // as duplicates. Every retryable answer comes here before the stream reads its next batch.
    if (ack.has_retryable_error()) poisoned_->store(true);
    if (broken_ || slot < first_slot_ || slot - first_slot_ >= pending_.size()) return;
    PendingAck& owed = pending_[slot - first_slot_];
    // Serialized once, here: its size is what the stream owes. An ack is bounded (its first
    // rejections' details only), so it always serializes.
    owed.ack.emplace();
    bool own_buffer = false;
    static_cast<void>(
        grpc::SerializationTraits<v1::IngestAck>::Serialize(ack, &*owed.ack, &own_buffer));
    owed.bytes = owed.ack->Length();
    owed_ack_bytes_ += owed.bytes;
    if (poisoned_->load() && !fail_) {
      // A write of this stream failed: later batches would be refused anyway. Owed acks go out,
      // then the stream ends so the device reconnects and resends what was not acknowledged.
      fail_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                           "a batch of this stream was not stored (its ack says why); reconnect "
                           "and resend unacknowledged batches");
    }
    FlushLocked();
    ContinueLocked();
    MaybeFinishLocked();
  }

  // Acks go out in batch order, one write at a time.
  void FlushLocked() {
    if (write_in_flight_ || broken_ || pending_.empty() || !pending_.front().ack.has_value()) return;
    outgoing_.Swap(&*pending_.front().ack);  // outgoing_'s last ack, written, goes with it
    const absl::Time now = absl::Now();
    if (std::optional<LatencyWindow::Closed> window =
            ack_latency_.Record(now - pending_.front().read_at, now)) {
      const LatencyHistogram::Summary& s = window->summary;
      log::Info("ingest_ack_latency", {{"window_s", absl::ToDoubleSeconds(window->length)},
                                       {"acks", s.count},
                                       {"p50_ms", s.p50_ms},
                                       {"p90_ms", s.p90_ms},
                                       {"p99_ms", s.p99_ms},
                                       {"max_ms", s.max_ms}});
    }
    owed_ack_bytes_ -= pending_.front().bytes;
    pending_.pop_front();
    ++first_slot_;
    write_in_flight_ = true;
    StartWrite(&outgoing_);
  }

  // Reads the next batch unless the stream owes too many acks (backpressure) or is ending.
  void ContinueLocked() {
    if (turn_ == nullptr) return;  // waiting for the device's turn, or superseded
    if (read_outstanding_ || processing_ || reads_done_ || fail_ || broken_ || finished_) return;
    if (pending_.size() >= kMaxInFlightBatches || owed_ack_bytes_ >= kMaxOwedAckBytes) return;
    read_outstanding_ = true;
    StartRead(&incoming_bytes_);
  }

  void MaybeFinishLocked() {
    // A superseded or failed stream does not wait for its device's next batch: that read ends
    // with the call (a client waiting for the stream's end, as its status tells it to, would
    // otherwise wait until it sent, half-closed or gave up).
    if (finished_ || processing_ || write_in_flight_ ||
        (read_outstanding_ && !superseded_ && !fail_)) {
      return;
    }
    if (!(reads_done_ || fail_ || broken_)) return;
    if (!pending_.empty() && !broken_) return;
    finished_ = true;
    Finish(fail_.value_or(grpc::Status::OK));
  }

  // A batch read, and its ack once it has one.
  struct PendingAck {
    std::optional<grpc::ByteBuffer> ack;  // serialized
    size_t bytes = 0;  // the ack's, once made
    absl::Time read_at;
  };

  IngestCore& core_;
  StreamExecutor& executor_;
  LatencyWindow& ack_latency_;
  PeerCertificates& peers_;
  // The device's certificate (null when the stream was refused at its start).
  const std::shared_ptr<const PeerCertificate> certificate_;
  // Counts this stream against its device's bound until the reactor is deleted.
  const std::unique_ptr<IngestService::DeviceStreamSlot> slot_;
  std::shared_ptr<StreamShared> shared_;
  Principal principal_;
  std::shared_ptr<const BatchSource> source_;  // for the audit entries of its batches
  std::shared_ptr<std::atomic<bool>> poisoned_ = std::make_shared<std::atomic<bool>>(false);
  // The device's turn while this stream may read (guarded by shared_->mu).
  Turn turn_;
  bool superseded_ = false;
  grpc::ByteBuffer incoming_bytes_;  // the message read, parsed into incoming_
  v1::VitalsBatch incoming_;
  uint64_t last_batch_seq_ = 0;  // of the last batch read, for the message of one that is not
  grpc::ByteBuffer outgoing_;    // the ack being written
  // Guarded by shared_->mu.
  std::deque<PendingAck> pending_;
  size_t owed_ack_bytes_ = 0;  // of the acks in pending_ made and not yet sent
  uint64_t first_slot_ = 0;
  bool read_outstanding_ = false;
  bool processing_ = false;
  bool write_in_flight_ = false;
  bool reads_done_ = false;
  bool broken_ = false;
  bool finished_ = false;
  std::optional<grpc::Status> fail_;
};

// The patient and the reason of a call made at the patient's request (an export, an erasure).
absl::Status ValidatePatientsRequest(const std::string& patient_id, const std::string& reason) {
  if (absl::Status id = ValidateIdentifier(patient_id, "patient_id", 128); !id.ok()) return id;
  return ValidateText(reason, "reason", kMaxEraseReasonBytes);
}

}  // namespace

IngestService::IngestService(IngestCore& core, RoutingClient& routing,
                             consent::ConsentCache& consent, const pg::ShardSet& shards,
                             std::string trust_domain, StreamExecutor& executor,
                             absl::Duration stats_interval, TenantGate* tenant_gate,
                             std::shared_ptr<PeerCertificates> peers,
                             int max_streams_per_device, ReadBounds reads)
    : core_(core),
      routing_(routing),
      consent_(consent),
      shards_(shards),
      policy_(std::move(trust_domain),
              {{"StreamVitals", {K::kDevice}}, {"ReadVitals", {K::kPractitioner}, kReadVitalsCalls},
               {"EraseVitals", {K::kApp}, kReadVitalsCalls},
               {"ExportVitals", {K::kApp}, kReadVitalsCalls}}),
      executor_(executor),
      peers_(std::move(peers)),
      max_streams_per_device_(max_streams_per_device),
      reads_(reads),
      read_watch_(reads.idle_timeout,
                  absl::StrCat("the reader took nothing for ", absl::FormatDuration(reads.idle_timeout),
                               " (ingest.read_idle_timeout_seconds); read the page again")),
      ack_latency_(stats_interval) {
  policy_.set_tenant_gate(tenant_gate);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* IngestService::StreamVitals(
    grpc::CallbackServerContext* context) {
  // The tenant's state comes with routing's answer for the device (DeviceLocation::tenant_active),
  // checked for every batch: asking the tenant gate here could hold a callback thread.
  absl::StatusOr<Principal> principal = policy_.AuthorizeRole(*context, "StreamVitals");
  // Where the device's patient lives is fetched in the background, in one RPC with the devices
  // of other streams opening meanwhile, so a fleet reconnecting at once (after a restart of this
  // service) does not resolve its devices one round trip at a time on the executor threads.
  std::shared_ptr<const PeerCertificate> certificate;
  if (principal.ok()) {
    absl::StatusOr<std::shared_ptr<const PeerCertificate>> read =
        peers_->OfCall(*context->auth_context());
    if (read.ok()) {
      certificate = *std::move(read);
    } else {
      principal = read.status();
    }
  }
  std::unique_ptr<DeviceStreamSlot> slot;
  if (principal.ok()) {
    slot = streams_per_device_.TryTake(principal->spiffe_id, max_streams_per_device_);
    if (slot != nullptr) {
      routing_.PrefetchDevices({DeviceRef{principal->tenant, principal->name}});
    } else {
      principal = absl::ResourceExhaustedError(absl::StrCat(
          "this device already has ", max_streams_per_device_,
          " streams open, the most ingest.max_streams_per_device allows; send on an open "
          "stream, or close one first"));
    }
  }
  return new VitalsStream(core_, executor_, ack_latency_, turns_, *peers_, std::move(principal),
                          std::move(certificate), context->peer(), std::move(slot));
}

std::unique_ptr<BoundedCounts<std::string>::Slot> IngestService::TakeReadPlace(
    const std::string& tenant, grpc::Status& refused) {
  std::unique_ptr<BoundedCounts<std::string>::Slot> slot =
      reads_per_tenant_.TryTake(tenant, reads_.max_per_tenant);
  if (slot == nullptr) {
    refused = grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("this tenant already has ", reads_.max_per_tenant,
                     " ReadVitals, ExportVitals or EraseVitals calls in progress, the most "
                     "ingest.max_reads_per_tenant allows; retry once one has ended"));
  }
  return slot;
}

absl::StatusOr<IngestService::PatientShard> IngestService::PatientOfTenant(
    const std::string& patient_id, const std::string& tenant) {
  absl::StatusOr<std::vector<PatientLocation>> located = routing_.ResolvePatients({patient_id});
  if (!located.ok()) return located.status();
  const PatientLocation& where = (*located)[0];
  // A patient of another tenant is not told apart from one that does not exist.
  if (!where.found || where.tenant_id != tenant) return absl::NotFoundError("patient not found");
  absl::StatusOr<pg::Pool*> pool = shards_.Get(where.region_id);
  if (!pool.ok()) return pool.status();
  return PatientShard{where, *pool};
}

grpc::Status IngestService::ReadVitals(grpc::ServerContext* context,
                                       const v1::ReadVitalsRequest* request,
                                       grpc::ServerWriter<v1::ReadVitalsResponse>* writer) {
  absl::StatusOr<Principal> principal = policy_.Authorize(*context, "ReadVitals");
  if (!principal.ok()) return ToGrpcStatus(principal.status());
  consent::Purpose purpose;
  switch (request->purpose()) {
    case v1::PURPOSE_CARE: purpose = consent::Purpose::kCare; break;
    case v1::PURPOSE_REMOTE_MONITORING: purpose = consent::Purpose::kRemoteMonitoring; break;
    case v1::PURPOSE_RESEARCH: purpose = consent::Purpose::kResearch; break;
    default:
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "purpose: CARE, REMOTE_MONITORING or RESEARCH is required");
  }
  // Checked here, so that a malformed id is refused in this request's own terms, not in those
  // of the routing call that resolves it.
  if (absl::Status id = ValidateIdentifier(request->patient_id(), "patient_id", 128); !id.ok()) {
    return ToGrpcStatus(id);
  }
  if (request->loinc_codes_size() > 32) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "loinc_codes: at most 32");
  }
  // Only codes of the catalogue are ever stored: any other is a mistake to name, not a filter
  // that silently matches nothing.
  for (int i = 0; i < request->loinc_codes_size(); ++i) {
    if (FindVital(request->loinc_codes(i)) == nullptr) {
      return grpc::Status(
          grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("loinc_codes[", i, "]: '",
                       absl::CHexEscape(TruncateUtf8(request->loinc_codes(i), 32)),
                       "' is not in the vitals catalogue"));
    }
  }
  absl::StatusOr<int> page_size = PageSize(request->page_size(), kDefaultReadPage, kMaxReadPage);
  if (!page_size.ok()) return ToGrpcStatus(page_size.status());
  const int page = *page_size;
  // Bounds outside what a Timestamp may hold are refused, so no arithmetic below overflows.
  int64_t from_us = 0;
  if (request->time_range().has_start_at()) {
    absl::StatusOr<absl::Time> start =
        TimeFromProto(request->time_range().start_at(), "time_range.start_at");
    if (!start.ok()) return ToGrpcStatus(start.status());
    from_us = absl::ToUnixMicros(*start);
  }
  int64_t to_us = absl::ToUnixMicros(absl::Now() + absl::Hours(1));
  if (request->time_range().has_end_at()) {
    absl::StatusOr<absl::Time> end =
        TimeFromProto(request->time_range().end_at(), "time_range.end_at");
    if (!end.ok()) return ToGrpcStatus(end.status());
    to_us = absl::ToUnixMicros(*end);
  }
  if (to_us <= from_us) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        !request->time_range().has_end_at()
            ? "time_range.start_at: more than an hour ahead of now, where no reading can be "
              "(with end_at unset the range ends an hour from now)"
        : !request->time_range().has_start_at()
            ? "time_range.end_at: at or before 1970-01-01T00:00:00Z, where no reading can be "
              "(with start_at unset the range starts there)"
            : "time_range: end_at must be after start_at");
  }
  absl::StatusOr<PagePosition> after = ParsePageToken(request->page_token(), from_us, to_us);
  if (!after.ok()) return ToGrpcStatus(after.status());
  // Taken once the request is known to be well formed: a malformed one is told what to fix, not
  // that the tenant's reads are busy.
  grpc::Status busy;
  std::unique_ptr<BoundedCounts<std::string>::Slot> slot = TakeReadPlace(principal->tenant, busy);
  if (slot == nullptr) return busy;

  absl::StatusOr<PatientShard> shard = PatientOfTenant(request->patient_id(), principal->tenant);
  if (!shard.ok()) return ToGrpcStatus(shard.status());
  const PatientLocation& where = shard->where;
  pg::Pool* const pool = shard->pool;
  // The codes asked for, each once; none means every code of the catalogue (the only ones stored).
  const bool every_code = request->loinc_codes().empty();
  std::set<std::string> distinct(request->loinc_codes().begin(), request->loinc_codes().end());
  if (every_code) {
    for (const VitalKind& kind : VitalCatalogue()) distinct.emplace(kind.loinc);
  }
  // The purpose decided for each data category of those codes (a consent may be narrowed to some
  // measures). Named codes must all be permitted; with none named, those permitted are read and
  // the entry names the categories withheld. The entry cites the first permit (or refusal), and
  // names the other consents the read rests on (an actor's own consent may cover some categories,
  // the tenant-wide one others).
  std::vector<std::pair<absl::string_view, consent::AccessDecision>> by_category;
  std::vector<std::string> codes;
  std::vector<absl::string_view> withheld_categories;
  std::optional<consent::AccessDecision> permit;
  std::optional<consent::AccessDecision> refusal;
  std::vector<std::string> also_under;  // "<consent>/v<version>" of the other permits
  absl::string_view refused_category;
  const absl::Time decided_at = absl::Now();
  for (const std::string& code : distinct) {
    const absl::string_view category = FindVital(code)->category;
    auto it = std::find_if(by_category.begin(), by_category.end(),
                           [&](const auto& d) { return d.first == category; });
    if (it == by_category.end()) {
      absl::StatusOr<consent::AccessDecision> decided =
          consent_.Check(where.region_id, where.patient_id, purpose, principal->spiffe_id,
                         category, decided_at);
      if (!decided.ok()) return ToGrpcStatus(decided.status());
      by_category.emplace_back(category, *decided);
      it = by_category.end() - 1;
      if (!decided->permit && every_code) withheld_categories.push_back(category);
    }
    if (it->second.permit) {
      codes.push_back(code);
      if (!permit) {
        permit = it->second;
      } else if (it->second.consent_id != permit->consent_id) {
        std::string other =
            absl::StrCat(it->second.consent_id, "/v", it->second.consent_version);
        if (std::find(also_under.begin(), also_under.end(), other) == also_under.end()) {
          also_under.push_back(std::move(other));
        }
      }
    } else if (!refusal) {
      refusal = it->second;
      refused_category = category;
    }
  }
  std::sort(withheld_categories.begin(), withheld_categories.end());
  const bool refused = !permit || (!every_code && refusal);
  const consent::AccessDecision& decision = refused ? *refusal : *permit;

  audit::Entry entry;
  entry.actor = principal->spiffe_id;
  entry.tenant = principal->tenant;
  entry.object_type = "vitals";
  entry.object_id = where.patient_id;
  entry.patient_id = where.patient_id;
  entry.purpose = std::string(consent::PurposeName(purpose));
  entry.consent_id = decision.consent_id;
  entry.consent_version = decision.consent_version;
  entry.origin = context->peer();
  // A request id of its own, as every other call's entry has; the page read is in the reason.
  entry.request_id = NewRequestId();
  if (refused) {
    // A refused read is audited too.
    entry.action = audit::Action::kRead;
    entry.decision = audit::Decision::kDeny;
    entry.reason = std::string(consent::AccessReasonName(decision.reason));
    if (decision.reason == consent::AccessReason::kCategoryNotCovered) {
      absl::StrAppend(&entry.reason, ": category=", refused_category);
    }
    absl::Status audited =
        pool->Transact([&](pqxx::work& txn) { return audit::Append(txn, entry).status(); });
    if (!audited.ok()) {
      // A request whose audit entry cannot be written fails: the refusal is not answered as one.
      log::Warning("audit_append_failed", {{"method", "ReadVitals"}, {"error", audited.message()}});
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the refusal could not be audited; retry later");
    }
    if (decision.reason == consent::AccessReason::kCategoryNotCovered) {
      return grpc::Status(
          grpc::StatusCode::PERMISSION_DENIED,
          every_code
              ? absl::StrCat("no ", consent::PurposeName(purpose), " consent for this patient "
                             "covers any measure of vitals (CATEGORY_NOT_COVERED: the consent is "
                             "narrowed to other data categories)")
              : absl::StrCat("no ", consent::PurposeName(purpose), " consent for this patient's ",
                             refused_category, " readings (CATEGORY_NOT_COVERED: the consent is "
                             "narrowed to other data categories); ask for the codes it covers"));
    }
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("no ", consent::PurposeName(purpose), " consent for this patient (",
                                     consent::AccessReasonName(decision.reason), ")"));
  }

  // Stored locations go out only while GEOLOCATION permits this reader (checked now: a revocation
  // hides what was stored under an earlier consent). A check that fails withholds them.
  absl::StatusOr<consent::AccessDecision> geolocation = consent_.Check(
      where.region_id, where.patient_id, consent::Purpose::kGeolocation, principal->spiffe_id, "",
      absl::Now());
  const bool with_location = geolocation.ok() && geolocation->permit;

  PageRead read;
  absl::Status status = pool->Transact([&](pqxx::work& txn) -> absl::Status {
    read = ReadPage(txn, where.patient_id, codes, from_us, to_us, *after, page, with_location);
    entry.action = audit::Action::kRead;
    entry.decision = audit::Decision::kPermit;
    entry.reason =
        absl::StrCat("PERMITTED: readings=", std::min<size_t>(read.readings.size(), page));
    if (!request->page_token().empty()) {
      absl::StrAppend(&entry.reason, " after=", request->page_token());
    }
    if (!also_under.empty()) {
      absl::StrAppend(&entry.reason, " also_under=", absl::StrJoin(also_under, ","));
    }
    if (!withheld_categories.empty()) {
      // Every code was asked for, and the consent is narrowed: these were not read.
      absl::StrAppend(&entry.reason, " categories_withheld=", absl::StrJoin(withheld_categories, ","));
    }
    AppendLocations(read, geolocation, &entry.reason);
    return audit::Append(txn, entry).status();
  });
  if (!status.ok()) return ToGrpcStatus(status);
  std::vector<v1::VitalReading>& readings = read.readings;
  std::string next_token;
  if (readings.size() > static_cast<size_t>(page)) {
    readings.resize(page);
    next_token = PageTokenAfter(readings.back());
  }
  // At most kReadChunk readings a message; the last message (the only one when the page is
  // empty) carries the token.
  size_t sent = 0;
  bool done = false;
  return SendPaced(*context, *writer, [&](v1::ReadVitalsResponse& message) {
    if (done) return false;
    for (; sent < readings.size() && message.readings_size() < kReadChunk; ++sent) {
      *message.add_readings() = std::move(readings[sent]);
    }
    done = sent == readings.size();
    if (done) message.set_next_page_token(next_token);
    return true;
  });
}

template <typename Response, typename Next>
grpc::Status IngestService::SendPaced(grpc::ServerContext& context,
                                      grpc::ServerWriter<Response>& writer, Next next) {
  // A client that stops taking them would hold this thread (and its tenant's place) while the
  // write waits on flow control: the watch ends the call past the idle timeout, and the pace a
  // call whose client takes them too slowly past it.
  StallWatch::Call stall(read_watch_, context);
  TransferPace pace(stall, "read", reads_.idle_timeout, reads_.min_bytes_per_second,
                    "ingest.read_min_bytes_per_second", "read the page again");
  const PeerCertificates::CallCheck certificate = peers_->ForCall(context);
  Response message;
  while (next(message)) {
    // Asked before each message: a read whose last message was taken has ended well.
    if (grpc::Status slow = pace.Check(); !slow.ok()) return slow;
    // The caller's certificate may have expired, or been revoked, since the call began.
    if (absl::Status good = certificate.Check(); !good.ok()) return ToGrpcStatus(good);
    stall.Blocked();
    const bool written = writer.Write(message);
    stall.Unblocked();
    if (!written) {
      if (stall.fired()) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "read stalled");  // the watch's
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "client gone");
    }
    pace.Moved(message.ByteSizeLong());
    message.Clear();
  }
  return grpc::Status::OK;
}

grpc::Status IngestService::EraseVitals(grpc::ServerContext* context,
                                        const v1::EraseVitalsRequest* request,
                                        v1::EraseVitalsResponse* response) {
  absl::StatusOr<CallContext> ctx =
      BeginCall(policy_, *context, "EraseVitals", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  if (absl::Status valid = ValidatePatientsRequest(request->patient_id(), request->reason());
      !valid.ok()) {
    return ToGrpcStatus(valid);
  }
  // An erasure holds a handler thread as a read does, for as long as its deletions take.
  grpc::Status busy;
  std::unique_ptr<BoundedCounts<std::string>::Slot> slot =
      TakeReadPlace(ctx->principal.tenant, busy);
  if (slot == nullptr) return busy;
  absl::StatusOr<PatientShard> shard =
      PatientOfTenant(request->patient_id(), ctx->principal.tenant);
  if (!shard.ok()) return ToGrpcStatus(shard.status());
  const PatientLocation& where = shard->where;
  pg::Pool* const pool = shard->pool;

  // Code by code (every code stored of the patient), earliest first, a bounded transaction at a
  // time, each with the audit entry of what it deleted.
  uint64_t erased = 0;
  auto stopped = [&](grpc::StatusCode code, absl::string_view why) {
    return grpc::Status(code, absl::StrCat(why, "; ", erased,
                                           " samples were erased before it (their audit entries "
                                           "say so); call again to go on"));
  };
  // Every sample of `loinc`, a bounded transaction at a time; a status to answer with if stopped.
  auto erase_code = [&](const std::string& loinc) -> std::optional<grpc::Status> {
    for (;;) {
      if (context->IsCancelled()) {
        return stopped(grpc::StatusCode::CANCELLED, "erasure cancelled");
      }
      int64_t deleted = 0;
      absl::Status status = pool->Transact([&](pqxx::work& txn) -> absl::Status {
        deleted = txn.exec_prepared1(sql::kEraseVitals, where.tenant_id, where.patient_id, loinc,
                                     sql::kEraseVitalsRows)[0]
                      .as<int64_t>();
        if (deleted == 0) return absl::OkStatus();  // nothing changed: nothing to audit
        return audit::Append(txn, AuditEntryFor(*ctx, audit::Action::kDelete, "vitals",
                                                where.patient_id, where.tenant_id, where.patient_id,
                                                absl::StrCat("ERASED: samples=", deleted, " code=",
                                                             loinc, "; ", request->reason())))
            .status();
      });
      if (!status.ok()) {
        return stopped(static_cast<grpc::StatusCode>(status.code()), status.message());
      }
      erased += static_cast<uint64_t>(deleted);
      if (deleted < sql::kEraseVitalsRows) return std::nullopt;
    }
  };
  absl::StatusOr<std::vector<std::string>> codes = pool->TransactValue<std::vector<std::string>>(
      [&](pqxx::work& txn) -> absl::StatusOr<std::vector<std::string>> {
        return StoredCodes(txn, where);
      });
  if (!codes.ok()) {
    return stopped(static_cast<grpc::StatusCode>(codes.status().code()), codes.status().message());
  }
  for (const std::string& loinc : *codes) {
    if (std::optional<grpc::Status> stop = erase_code(loinc)) return *stop;
  }
  response->set_erased_count(erased);
  return grpc::Status::OK;
}

grpc::Status IngestService::ExportVitals(grpc::ServerContext* context,
                                         const v1::ExportVitalsRequest* request,
                                         grpc::ServerWriter<v1::ExportVitalsResponse>* writer) {
  absl::StatusOr<CallContext> ctx =
      BeginCall(policy_, *context, "ExportVitals", request->request_id());
  if (!ctx.ok()) return ToGrpcStatus(ctx.status());
  if (absl::Status valid = ValidatePatientsRequest(request->patient_id(), request->reason());
      !valid.ok()) {
    return ToGrpcStatus(valid);
  }
  absl::StatusOr<int> page_size =
      PageSize(request->page_size(), kDefaultExportPage, kMaxReadPage);
  if (!page_size.ok()) return ToGrpcStatus(page_size.status());
  const int page = *page_size;
  // Every sample stored: none is measured more than 5 minutes ahead of its commit.
  const int64_t from_us = absl::ToUnixMicros(absl::UniversalEpoch());
  const int64_t to_us = absl::ToUnixMicros(absl::Now() + absl::Hours(1));
  absl::StatusOr<PagePosition> after = ParsePageToken(request->page_token(), from_us, to_us);
  if (!after.ok()) return ToGrpcStatus(after.status());
  grpc::Status busy;
  std::unique_ptr<BoundedCounts<std::string>::Slot> slot =
      TakeReadPlace(ctx->principal.tenant, busy);
  if (slot == nullptr) return busy;
  absl::StatusOr<PatientShard> shard =
      PatientOfTenant(request->patient_id(), ctx->principal.tenant);
  if (!shard.ok()) return ToGrpcStatus(shard.status());
  const PatientLocation& where = shard->where;
  pg::Pool* const pool = shard->pool;
  // The export rests on the patient's request, not on a consent; the locations, as in
  // ReadVitals, on GEOLOCATION permitting the caller now.
  absl::StatusOr<consent::AccessDecision> geolocation = consent_.Check(
      where.region_id, where.patient_id, consent::Purpose::kGeolocation, ctx->principal.spiffe_id,
      "", absl::Now());
  const bool with_location = geolocation.ok() && geolocation->permit;
  PageRead read;
  absl::Status status = pool->Transact([&](pqxx::work& txn) -> absl::Status {
    // An export is all that is stored of the patient.
    read = ReadPage(txn, where.patient_id, StoredCodes(txn, where), from_us, to_us, *after, page,
                    with_location);
    std::string reason = absl::StrCat(
        "EXPORTED: observations=", std::min<size_t>(read.readings.size(), page), " format=fhir-r4");
    if (!request->page_token().empty()) absl::StrAppend(&reason, " after=", request->page_token());
    AppendLocations(read, geolocation, &reason);
    absl::StrAppend(&reason, "; ", request->reason());
    return audit::Append(txn, AuditEntryFor(*ctx, audit::Action::kRead, "vitals", where.patient_id,
                                            where.tenant_id, where.patient_id, reason))
        .status();
  });
  if (!status.ok()) return ToGrpcStatus(status);
  std::vector<v1::VitalReading>& readings = read.readings;
  std::string next_token;
  if (readings.size() > static_cast<size_t>(page)) {
    readings.resize(page);
    next_token = PageTokenAfter(readings.back());
  }
  // A patient's devices are of the patient's tenant (routing assigns no other).
  const std::string device_prefix =
      absl::StrCat("spiffe://", policy_.trust_domain(), "/tenant/", where.tenant_id, "/device/");
  // Each message's observations are encoded when the one before it has been taken: a page holds
  // its readings, and one message's JSON at a time. At most kReadChunk observations a message;
  // the last (the only one when the page is empty) carries the token.
  size_t sent = 0;
  bool done = false;
  return SendPaced(*context, *writer, [&](v1::ExportVitalsResponse& message) {
    if (done) return false;
    for (; sent < readings.size() && message.observation_count() < kReadChunk; ++sent) {
      const v1::VitalReading& r = readings[sent];
      const StoredSample stored{absl::StrCat(device_prefix, r.device_id()), ToSample(r.sample()),
                                FromProtoTimestamp(r.received_at())};
      absl::StrAppend(message.mutable_ndjson(), FhirObservationJson(stored, where.patient_id),
                      "\n");
      message.set_observation_count(message.observation_count() + 1);
    }
    done = sent == readings.size();
    if (done) message.set_next_page_token(next_token);
    return true;
  });
}

}  // namespace medgate::ingest
