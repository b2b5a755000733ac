// The device SDK: buffers batches durably, streams them to medgate over mTLS, resends what was
// not acknowledged (after reconnects and restarts), with exponential backoff and jitter, waiting a
// retryable ack's retry_after plus the jitter. A batch the server refuses as a whole is
// reported (OnRejected) and dropped instead of being resent forever.
#ifndef MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_
#define MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/device_sdk/batch_buffer.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/ingest.grpc.pb.h"

namespace medgate::device {

struct DeviceOptions {
  std::string address;       // ingest host:port
  // The ingest service's SPIFFE id, which its certificate must carry (e.g.
  // spiffe://TRUST_DOMAIN/service/ingest): a server the CA signed for anyone else is refused.
  std::string server_identity;
  TlsConfig tls;             // the device's certificate
  std::string buffer_path;   // the durable buffer file
  // Send refuses a batch (RESOURCE_EXHAUSTED) while this many batches, or this many bytes of them
  // (serialized; they are held in memory as well as in the file), wait for acks.
  size_t max_buffered_batches = 10000;
  size_t max_buffered_bytes = kDefaultMaxBufferedBytes;
  absl::Duration backoff_initial = absl::Milliseconds(100);
  // Reconnects wait up to a backoff that doubles from backoff_initial to backoff_max, and starts
  // over after a stream on which a batch was acked or rejected.
  absl::Duration backoff_max = absl::Seconds(30);  // also bounds a server's retry_after
  // (Open refuses a backoff_initial that is not positive, or a backoff_max below it or over a
  // day.) The SDK's own channel reconnects its connection within the same bounds: gRPC's own
  // backoff, up to 2 minutes, would leave streams failing at once for that long after a server
  // came back.
  // How long a written batch may wait for its ack before the stream is given up for a reconnect
  // and a resend: a connection can die without either end being told. Longer than a server may
  // hold an ack back (ingest's enqueue_wait, 10 s by default). Positive, at most a day. Timed on
  // the steady clock.
  absl::Duration ack_timeout = absl::Seconds(30);
  // The first sample seq of a new buffer file (a new device, or one whose file was lost or
  // damaged); 0: the clock's microseconds since 1970. From the clock, a lost file's seqs are all
  // below the new file's (unless the device made over a million samples a second, or its clock
  // went back), so none of the new samples is taken for a duplicate. A file's later seqs follow
  // on from its first, whatever the clock does. A first_seq given here must be above every seq
  // the device ever sent: seqs given out again are caught only in part (when the service's cursor
  // is above every seq of the new file, or when a batch's first send by this process is answered
  // duplicates). A batch the file held across a restart, or whose first answer was lost, cannot
  // tell samples the service had from an earlier file from its own earlier send: they are
  // counted as duplicates, and not sent again.
  uint64_t first_seq = 0;
};

struct DeviceStats {
  uint64_t batches_sent = 0;
  uint64_t batches_acked = 0;
  uint64_t samples_stored = 0;
  uint64_t samples_duplicate = 0;
  uint64_t samples_rejected = 0;
  uint64_t batches_rejected = 0;  // refused as a whole by the server, dropped (see OnRejected)
  // Batches the buffer file held whole but could not read, dropped when it was opened: sealed
  // with a string that is not UTF-8 by an SDK before Send checked them (no server reads them).
  uint64_t batches_unreadable = 0;
  uint64_t retries = 0;
  uint64_t reconnects = 0;
  uint64_t ack_timeouts = 0;  // streams given up because an ack took longer than ack_timeout
  // Reconnects that waited a retryable ack's retry_after (plus the jitter).
  uint64_t waits_set_by_server = 0;
  // Times the server held seqs this device's buffer never gave out (its earlier buffer file was
  // lost or replaced): the buffer's seqs were moved above them, and the samples taken for
  // duplicates were sent again (BatchBuffer::RestartSeqsAbove). Counted, like the acks, once the
  // batch has left the buffer: a restart that cannot be written leaves it to be sent again.
  uint64_t seq_restarts = 0;
  // Connections that could not even be set up (certificate or key files missing or unreadable):
  // tried again after the backoff, like a failed stream.
  uint64_t dial_failures = 0;
  std::string last_dial_error;
  // Streams that ended with an error (the server unreachable or refusing, an ack overdue...):
  // each is followed by a reconnect; the last one's status.
  uint64_t stream_failures = 0;
  std::string last_stream_error;
  // Set when Open found the buffer file damaged before its end: where its bytes were kept (the
  // batches after the damage are in it, for support to recover); the client goes on with the
  // batches before it.
  std::string buffer_damaged_copy;
  // Compactions of the buffer file that failed (a full disk): the file keeps growing with ack
  // records until one succeeds (BatchBuffer::Ack); the last one's reason.
  uint64_t buffer_compaction_failures = 0;
  std::string last_buffer_compaction_error;
};

// The wait before a reconnect: `jitter` (drawn at random up to the backoff) on top of what the
// server's last retryable ack asked (`retry_after`, at most `backoff_max`; zero if none). Added,
// not the larger of the two: the devices a server told to come back in a second would otherwise
// all come back at the same instant.
absl::Duration ReconnectWait(absl::Duration jitter, absl::Duration retry_after,
                             absl::Duration backoff_max);

// The SDK's own channel: no BDP probes (small batches and acks); keepalive pings after a minute
// without anything received, which find a connection that died without a word while the stream
// waits; and gRPC's reconnects of the connection between backoff_initial and backoff_max.
ChannelOptions DeviceChannelOptions(const DeviceOptions& options);

class DeviceClient {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceClient>> Open(DeviceOptions options);
  // Sends over `channel` instead of dialing options.address with options.tls (a caller with a
  // channel of its own, tests). The SDK's own channel sends keepalive pings; this one, as made.
  static absl::StatusOr<std::unique_ptr<DeviceClient>> Open(
      DeviceOptions options, std::shared_ptr<grpc::Channel> channel);
  ~DeviceClient();  // stops sending; what is not acked stays in the buffer file

  // Makes `samples` a batch (seqs assigned here) durable before returning. INVALID_ARGUMENT, and
  // nothing buffered, for a batch a server would refuse as a whole: no samples, more than
  // kMaxSamplesPerBatch, more than kMaxBatchBytes serialized, or a code or unit that is not
  // valid UTF-8 (the batch would not parse).
  absl::StatusOr<uint64_t> Send(std::vector<v1::VitalSample> samples);
  // Starts the background sender (resending whatever the buffer file holds).
  void Start();
  // Stops the sender and waits for it. From an OnAck or OnRejected callback (the sender's own
  // thread) it only tells the sender to stop once the callback returns; the destructor, or a
  // Stop() from another thread, then waits for it.
  void Stop();
  // Waits until the buffer is empty (every batch acked or rejected); DEADLINE_EXCEEDED otherwise.
  absl::Status WaitUntilAcked(absl::Duration timeout);

  DeviceStats stats();
  size_t pending();
  // Called on the sender thread for every ack (including retryable ones).
  void OnAck(std::function<void(const v1::IngestAck&, absl::Duration latency)> callback);
  // Called on the sender thread for a batch the server refused as a whole: it ended the stream
  // with INVALID_ARGUMENT (`why`) while waiting for that batch's ack, e.g. a batch buffered by an
  // older SDK, or a server with tighter bounds; or gRPC refused the batch with RESOURCE_EXHAUSTED
  // as larger than the server's max message size. Every resend would be refused the same way, so
  // the batch leaves the buffer (counted in batches_rejected) and is never sent again; its samples
  // are not stored. Other errors that end a stream (a RESOURCE_EXHAUSTED quota among them) leave
  // the batch to be resent.
  void OnRejected(std::function<void(const v1::VitalsBatch&, const absl::Status& why)> callback);

 private:
  explicit DeviceClient(DeviceOptions options) : options_(std::move(options)) {}
  void Loop();
  // Cancels the active stream once the ack of its batch in flight is overdue.
  void Watchdog();
  // Sends everything pending on one stream; returns when the stream fails or Stop() is called.
  // Sets `*answered` once a batch of the stream was acked (retryable acks aside) or rejected.
  absl::Status RunStream(v1::DeviceIngest::Stub& stub, bool* answered);
  // Drops `batch` from the buffer and reports it to OnRejected's callback.
  absl::Status Reject(const v1::VitalsBatch& batch, const absl::Status& why);

  const DeviceOptions options_;
  std::shared_ptr<grpc::Channel> channel_;  // null: dial options_.address
  std::unique_ptr<BatchBuffer> buffer_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool running_ = false;
  DeviceStats stats_;
  std::function<void(const v1::IngestAck&, absl::Duration)> on_ack_;
  std::function<void(const v1::VitalsBatch&, const absl::Status&)> on_rejected_;
  grpc::ClientContext* active_ = nullptr;  // to cancel a blocked stream on Stop()
  std::thread::id sender_id_;  // thread_'s, set by Start()
  std::mutex stop_mu_;         // held by the Stop() that joins the threads
  absl::Duration retry_after_;             // from the last retryable ack, for the next wait
  // Batches up to this batch_seq may have been written to a stream before (by this process, or
  // by one before it: those the buffer file had when opened). A later one's seqs reach a server
  // for the first time, so none of its samples can be a duplicate of one it sent.
  uint64_t maybe_sent_up_to_ = 0;
  // While a batch waits for its ack (steady clock); kNoAckDue otherwise.
  static constexpr std::chrono::steady_clock::time_point kNoAckDue =
      std::chrono::steady_clock::time_point::max();
  std::chrono::steady_clock::time_point ack_due_ = kNoAckDue;
  bool ack_overdue_ = false;                     // the watchdog cancelled the active stream
  std::thread thread_;
  std::thread watchdog_;
};

}  // namespace medgate::device

#endif  // MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_
