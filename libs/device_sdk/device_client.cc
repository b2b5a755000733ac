// The device SDK's sender.
#include "libs/device_sdk/device_client.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <random>
#include <set>

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "libs/common/grpc_status.h"
#include "libs/common/proto_duration.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "libs/identity/credentials.h"

namespace medgate::device {
namespace {

absl::StatusOr<std::shared_ptr<grpc::Channel>> Dial(const DeviceOptions& options) {
  return MakeChannel(options.address, options.tls, options.server_identity,
                     DeviceChannelOptions(options));
}

// The longest backoff_max and ack_timeout Open takes: longer is a mistake (an infinite one would
// overflow the waits), and a device waiting a day has lost its connection for good anyway.
constexpr absl::Duration kLongestWait = absl::Hours(24);

// True when the end of a stream refuses its batch in flight as such: every resend would be
// refused the same way. One batch is in flight at a time, so a server's INVALID_ARGUMENT after it
// was written is about this one. So is gRPC's RESOURCE_EXHAUSTED for a message larger than the
// server's message bound (kMaxBatchBytes, or a limits.max_message_bytes configured below it; a
// batch buffered by an older SDK): its text ("Received message larger than max (N vs. M)") tells it from a
// RESOURCE_EXHAUSTED that passes (the server's streams per device), whose batch is resent, and
// says it is about the message sent, whatever Write returned.
bool RefusesTheBatch(const grpc::Status& ended, bool written) {
  switch (ended.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
      return written;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return absl::StrContains(ended.error_message(), "message larger than max");
    default:
      return false;
  }
}

}  // namespace

absl::Duration ReconnectWait(absl::Duration jitter, absl::Duration retry_after,
                             absl::Duration backoff_max) {
  return jitter + std::clamp(retry_after, absl::ZeroDuration(), backoff_max);
}

ChannelOptions DeviceChannelOptions(const DeviceOptions& options) {
  ChannelOptions channel;
  channel.bdp_probe = false;
  channel.keepalive_time = absl::Seconds(60);
  channel.keepalive_timeout = absl::Seconds(20);
  channel.reconnect_backoff_initial = options.backoff_initial;
  channel.reconnect_backoff_max = options.backoff_max;
  return channel;
}

absl::StatusOr<std::unique_ptr<DeviceClient>> DeviceClient::Open(DeviceOptions options) {
  return Open(std::move(options), nullptr);
}

absl::StatusOr<std::unique_ptr<DeviceClient>> DeviceClient::Open(
    DeviceOptions options, std::shared_ptr<grpc::Channel> channel) {
  if (options.ack_timeout <= absl::ZeroDuration() || options.ack_timeout > kLongestWait) {
    return absl::InvalidArgumentError(
        absl::StrCat("ack_timeout must be positive and at most ", absl::FormatDuration(kLongestWait),
                     ", not ", absl::FormatDuration(options.ack_timeout)));
  }
  if (options.backoff_initial <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("backoff_initial must be positive");
  }
  if (options.backoff_max < options.backoff_initial) {
    return absl::InvalidArgumentError(
        absl::StrCat("backoff_max (", absl::FormatDuration(options.backoff_max),
                     ") must be at least backoff_initial (",
                     absl::FormatDuration(options.backoff_initial), ")"));
  }
  if (options.backoff_max > kLongestWait) {
    return absl::InvalidArgumentError(
        absl::StrCat("backoff_max must be at most ", absl::FormatDuration(kLongestWait), ", not ",
                     absl::FormatDuration(options.backoff_max)));
  }
  if (options.max_buffered_batches == 0 || options.max_buffered_bytes == 0) {
    // Every Send would be refused.
    return absl::InvalidArgumentError(
        "max_buffered_batches and max_buffered_bytes must be positive");
  }
  // The service refuses a seq above the largest signed 64-bit integer (INVALID_SEQ): every sample
  // of such a buffer would be rejected, and dropped.
  constexpr uint64_t kLargestServerSeq = std::numeric_limits<int64_t>::max();
  if (options.first_seq > kLargestServerSeq) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_seq must be at most ", kLargestServerSeq, " (the service's largest seq), not ",
        options.first_seq));
  }
  if (channel == nullptr) {
    // The ingest service's SPIFFE id, e.g. spiffe://TRUST_DOMAIN/service/ingest.
    RETURN_IF_ERROR(CheckSpiffeId(options.server_identity, "server_identity"));
  }
  std::unique_ptr<DeviceClient> client(new DeviceClient(std::move(options)));
  client->channel_ = std::move(channel);
  absl::StatusOr<std::unique_ptr<BatchBuffer>> buffer =
      BatchBuffer::Open(client->options_.buffer_path, client->options_.max_buffered_batches,
                        client->options_.first_seq != 0
                            ? client->options_.first_seq
                            : static_cast<uint64_t>(std::max<int64_t>(1, absl::ToUnixMicros(absl::Now()))),
                        client->options_.max_buffered_bytes);
  if (!buffer.ok()) return buffer.status();
  client->buffer_ = *std::move(buffer);
  client->stats_.buffer_damaged_copy = client->buffer_->damaged_copy();
  client->stats_.batches_unreadable = client->buffer_->unreadable_batches();
  if (!client->buffer_->pending().empty()) {
    client->maybe_sent_up_to_ = client->buffer_->pending().back().batch_seq();
  }
  return client;
}

DeviceClient::~DeviceClient() { Stop(); }

absl::StatusOr<uint64_t> DeviceClient::Send(std::vector<v1::VitalSample> samples) {
  // A server ends the stream on a batch out of these bounds: buffered, it would never be acked.
  if (samples.empty()) return absl::InvalidArgumentError("a batch needs at least one sample");
  if (samples.size() > kMaxSamplesPerBatch) {
    return absl::InvalidArgumentError(
        absl::StrCat("a batch has at most ", kMaxSamplesPerBatch, " samples, not ", samples.size(),
                     ": split them over several Send calls"));
  }
  // A proto3 string must be UTF-8: a batch with one that is not does not parse at the server.
  for (size_t i = 0; i < samples.size(); ++i) {
    for (const auto& [field, text] : {std::pair<const char*, const std::string*>{
                                          "loinc_code", &samples[i].loinc_code()},
                                      {"ucum_unit", &samples[i].ucum_unit()}}) {
      if (!IsValidUtf8(*text)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "samples[", i, "].", field, " is not valid UTF-8, as every string of a batch must be: "
            "the server could not read the batch"));
      }
    }
  }
  v1::VitalsBatch batch;
  // Sized with the largest seqs the buffer could assign: the sealed batch is no larger.
  constexpr uint64_t kLargestSeq = std::numeric_limits<uint64_t>::max();
  batch.set_batch_seq(kLargestSeq);
  for (auto& s : samples) {
    v1::VitalSample* sample = batch.add_samples();
    *sample = std::move(s);
    sample->set_seq(kLargestSeq);
  }
  if (const size_t bytes = batch.ByteSizeLong(); bytes > kMaxBatchBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the batch is ", bytes, " bytes serialized, over the ", kMaxBatchBytes,
                     " a server accepts: split its samples over several Send calls"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<uint64_t> seq = buffer_->Seal(std::move(batch));
  cv_.notify_all();
  return seq;
}

void DeviceClient::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_) return;
  running_ = true;
  stopping_ = false;
  thread_ = std::thread([this] { Loop(); });
  sender_id_ = thread_.get_id();
  watchdog_ = std::thread([this] { Watchdog(); });
}

void DeviceClient::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!running_) return;
    stopping_ = true;
    if (active_ != nullptr) active_->TryCancel();
    if (std::this_thread::get_id() == sender_id_) {
      // From an OnAck or OnRejected callback, on the sender's own thread: it ends once the
      // callback returns; joining it here would throw (and terminate the process).
      cv_.notify_all();
      return;
    }
  }
  cv_.notify_all();
  // One caller joins; another one calling at the same time waits for it.
  std::lock_guard<std::mutex> joining(stop_mu_);
  if (thread_.joinable()) thread_.join();
  if (watchdog_.joinable()) watchdog_.join();
  std::lock_guard<std::mutex> lock(mu_);
  running_ = false;
}

absl::Status DeviceClient::WaitUntilAcked(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto acked = [this] { return buffer_->pending().empty(); };
  // On the steady clock (a device's wall clock may step at its first time sync), and bounded: an
  // infinite (or very long) timeout overflowed a wait_for.
  constexpr absl::Duration kLongest = absl::Hours(24 * 365);
  const bool done =
      timeout >= kLongest
          ? (cv_.wait(lock, acked), true)
          : cv_.wait_until(lock,
                           std::chrono::steady_clock::now() +
                               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                   absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration()))),
                           acked);
  if (!done) {
    return absl::DeadlineExceededError(
        absl::StrCat(buffer_->pending().size(), " batches still unacknowledged"));
  }
  return absl::OkStatus();
}

DeviceStats DeviceClient::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceStats stats = stats_;
  stats.buffer_compaction_failures = buffer_->compaction_failures();
  stats.last_buffer_compaction_error = buffer_->last_compaction_error();
  return stats;
}

size_t DeviceClient::pending() {
  std::lock_guard<std::mutex> lock(mu_);
  return buffer_->pending().size();
}

void DeviceClient::OnAck(std::function<void(const v1::IngestAck&, absl::Duration)> callback) {
  std::lock_guard<std::mutex> lock(mu_);
  on_ack_ = std::move(callback);
}

void DeviceClient::OnRejected(
    std::function<void(const v1::VitalsBatch&, const absl::Status&)> callback) {
  std::lock_guard<std::mutex> lock(mu_);
  on_rejected_ = std::move(callback);
}

void DeviceClient::Loop() {
  std::mt19937_64 rng(std::random_device{}());
  absl::Duration backoff = options_.backoff_initial;
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = channel_;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !buffer_->pending().empty(); });
      if (stopping_) return;
    }
    // Made again after each failure (certificate files not there yet, or replaced since), with
    // the same backoff as a failed stream.
    if (!channel.ok() || *channel == nullptr) {
      channel = Dial(options_);
      if (!channel.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.dial_failures;
        stats_.last_dial_error = std::string(channel.status().message());
      }
    }
    bool answered = false;
    if (channel.ok()) {
      auto stub = v1::DeviceIngest::NewStub(*channel);
      // Every end is followed by a reconnect; why, the app can read in the stats (a refusal
      // such as PERMISSION_DENIED is retried too, and would otherwise look like being offline).
      absl::Status ended = RunStream(*stub, &answered);
      // The server refuses the device's certificate on this connection (it expired or was
      // revoked since the handshake): every stream on it would be refused until the connection
      // ends, up to the server's maximum connection age. The next stream dials anew, with the
      // certificate files as they are now (renewed, if the device has renewed them).
      // A channel the app gave is the app's to replace.
      if (ended.code() == absl::StatusCode::kUnauthenticated && channel_ == nullptr) {
        channel = std::shared_ptr<grpc::Channel>();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!ended.ok() && !stopping_) {
        ++stats_.stream_failures;
        stats_.last_stream_error = ended.ToString();
      }
    }
    // The stream reached a server that works: this failure is the first of a new series. (A
    // stream of retryable acks only does not count: their server cannot store anything.)
    if (answered) backoff = options_.backoff_initial;
    // Full jitter: wait a random time up to the current backoff, then double it; after what the
    // server's last retryable ack asked (a quota refill), up to backoff_max.
    std::uniform_int_distribution<int64_t> jitter(0, absl::ToInt64Milliseconds(backoff));
    const absl::Duration jittered = absl::Milliseconds(jitter(rng));
    backoff = std::min(backoff * 2, options_.backoff_max);
    std::unique_lock<std::mutex> lock(mu_);
    const absl::Duration wait = ReconnectWait(jittered, retry_after_, options_.backoff_max);
    if (retry_after_ > absl::ZeroDuration()) ++stats_.waits_set_by_server;
    retry_after_ = absl::ZeroDuration();
    ++stats_.reconnects;
    cv_.wait_for(lock, absl::ToChronoMilliseconds(wait), [this] { return stopping_; });
    if (stopping_) return;
  }
}

void DeviceClient::Watchdog() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    if (ack_due_ == kNoAckDue) {
      cv_.wait(lock);
    } else if (std::chrono::steady_clock::now() < ack_due_) {
      cv_.wait_until(lock, ack_due_);
    } else {
      // Only an ack tells a live connection from one that died without a word (a half-open TCP
      // connection, where Write and Read wait forever). The cancelled stream ends its Write or
      // Read, and the sender reconnects and resends.
      ack_due_ = kNoAckDue;
      ack_overdue_ = true;
      ++stats_.ack_timeouts;
      if (active_ != nullptr) active_->TryCancel();
    }
  }
}

absl::Status DeviceClient::RunStream(v1::DeviceIngest::Stub& stub, bool* answered) {
  grpc::ClientContext context;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::CancelledError("stopping");
    active_ = &context;
  }
  struct Clear {
    DeviceClient* self;
    ~Clear() {
      std::lock_guard<std::mutex> lock(self->mu_);
      self->active_ = nullptr;
    }
  } clear{this};
  auto stream = stub.StreamVitals(&context);
  while (true) {
    v1::VitalsBatch batch;
    bool first_send = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !buffer_->pending().empty(); });
      if (stopping_) {
        context.TryCancel();
        return absl::CancelledError("stopping");
      }
      batch = buffer_->pending().front();  // oldest unacked first, resent until acked
      first_send = batch.batch_seq() > maybe_sent_up_to_;
      maybe_sent_up_to_ = std::max(maybe_sent_up_to_, batch.batch_seq());
      ++stats_.batches_sent;
      // On the steady clock: a device's wall clock may step (at its first time sync), which would
      // give up a healthy stream, or leave a dead one waiting.
      ack_due_ = std::chrono::steady_clock::now() +
                 std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                     absl::ToChronoNanoseconds(options_.ack_timeout));
      ack_overdue_ = false;
      cv_.notify_all();  // the watchdog
    }
    const std::chrono::steady_clock::time_point sent = std::chrono::steady_clock::now();
    v1::IngestAck ack;
    const bool written = stream->Write(batch);
    const bool got_ack = written && stream->Read(&ack);
    bool overdue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ack_due_ = kNoAckDue;
      overdue = ack_overdue_;
    }
    if (!got_ack) {
      stream->WritesDone();
      grpc::Status ended = stream->Finish();
      if (overdue) {
        return absl::DeadlineExceededError(
            absl::StrCat("no ack within ", absl::FormatDuration(options_.ack_timeout)));
      }
      if (ended.ok()) return absl::UnavailableError("stream ended");
      if (RefusesTheBatch(ended, written)) {
        RETURN_IF_ERROR(Reject(batch, FromGrpcStatus(ended)));
        *answered = true;
      }
      return FromGrpcStatus(ended);
    }
    // An ack for another batch than the one in flight, or whose counts are not the batch's,
    // changes nothing in the buffer: acted on, it would drop a batch never sent, or restart seqs
    // from counts that are not this batch's. The stream ends and the batch goes again.
    if (ack.batch_seq() != batch.batch_seq() ||
        (!ack.has_retryable_error() &&
         uint64_t{ack.stored_count()} + ack.duplicate_count() + ack.rejected_count() !=
             static_cast<uint64_t>(batch.samples_size()))) {
      context.TryCancel();
      return absl::InternalError(absl::StrCat(
          "the server answered batch ", batch.batch_seq(), " with an ack for batch ",
          ack.batch_seq(), " of ", ack.stored_count(), " stored, ", ack.duplicate_count(),
          " duplicate and ", ack.rejected_count(), " rejected samples (the batch has ",
          batch.samples_size(), ")"));
    }
    std::function<void(const v1::IngestAck&, absl::Duration)> callback;
    {
      std::lock_guard<std::mutex> lock(mu_);
      callback = on_ack_;
    }
    if (callback) callback(ack, absl::FromChrono(std::chrono::steady_clock::now() - sent));
    if (ack.has_retryable_error()) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.retries;
      retry_after_ = std::max(absl::ZeroDuration(), FromProtoDuration(ack.retry_after()));
      context.TryCancel();
      return absl::Status(static_cast<absl::StatusCode>(ack.retryable_error().code()),
                          ack.retryable_error().message());
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Duplicates the server took for samples it already had, though this buffer never gave their
    // seqs out before (the device's earlier buffer file was lost or replaced): the server's cursor
    // is above every seq given out, or this batch's first send found it within the batch's seqs.
    // (A batch sent before may get duplicates for what an earlier send stored, whose ack was lost.)
    const bool seqs_taken = ack.highest_committed_seq() >= buffer_->next_seq() ||
                            (first_send && ack.duplicate_count() > 0);
    // Counted once the batch has left the buffer's memory, whether or not the file could be
    // written: from then on this process does not send it again. A restart that cannot be
    // written leaves the batch in memory to be sent again, and counts nothing.
    auto count = [&](uint64_t resent) {
      if (std::any_of(buffer_->pending().begin(), buffer_->pending().end(),
                      [&](const v1::VitalsBatch& b) { return b.batch_seq() == ack.batch_seq(); })) {
        return;
      }
      ++stats_.batches_acked;
      stats_.samples_stored += ack.stored_count();
      stats_.samples_duplicate +=
          ack.duplicate_count() - std::min<uint64_t>(ack.duplicate_count(), resent);
      stats_.samples_rejected += ack.rejected_count();
      if (seqs_taken) ++stats_.seq_restarts;
    };
    absl::Status kept;
    if (!seqs_taken) {
      kept = buffer_->Ack(ack.batch_seq());
      count(0);
    } else {
      // The duplicates were not stored: those of a batch are its first samples not rejected for
      // themselves (its seqs increase, and the server's cursor stood at or above theirs). They go
      // again, with the pending batches, above the cursor. The restart takes the acked batch out
      // of the buffer in the same rewrite.
      std::vector<v1::VitalSample> unstored;
      if (ack.stored_count() == 0 || ack.highest_committed_seq() < buffer_->next_seq()) {
        std::set<uint32_t> rejected;
        for (const v1::SampleRejection& r : ack.rejections()) rejected.insert(r.sample_index());
        for (int i = 0; i < batch.samples_size() && unstored.size() < ack.duplicate_count(); ++i) {
          if (rejected.count(static_cast<uint32_t>(i)) == 0) unstored.push_back(batch.samples(i));
        }
      }
      const uint64_t resent = unstored.size();
      kept = buffer_->RestartSeqsAbove(ack.batch_seq(), ack.highest_committed_seq(),
                                        std::move(unstored));
      count(resent);
    }
    // WaitUntilAcked hears of what left the buffer, even when the file could not be written.
    cv_.notify_all();
    // The stream ends when the buffer could not take the answer, and the batch goes again after
    // a backoff that grows: a buffer that cannot be written (a full or read-only disk) would
    // otherwise have the batch resent every backoff_initial, for as long as it lasts.
    RETURN_IF_ERROR(kept);
    // The stream reached a server that works and the buffer has its answer.
    *answered = true;
  }
}

absl::Status DeviceClient::Reject(const v1::VitalsBatch& batch, const absl::Status& why) {
  std::function<void(const v1::VitalsBatch&, const absl::Status&)> callback;
  absl::Status dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The buffer forgets an acked batch and a rejected one alike.
    dropped = buffer_->Ack(batch.batch_seq());
    ++stats_.batches_rejected;
    callback = on_rejected_;
    cv_.notify_all();
  }
  if (callback) callback(batch, why);
  return dropped;
}

}  // namespace medgate::device
