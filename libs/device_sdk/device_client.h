// The device SDK: buffers batches durably, streams them to medgate over mTLS, resends what was
// not acknowledged (after reconnects and restarts), with exponential backoff and jitter, waiting at
// least as long as a retryable ack's retry_after asks.
#ifndef MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_
#define MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_

#include <atomic>
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
#include "medgate/v1/ingest.grpc.pb.h"

namespace medgate::device {

struct DeviceOptions {
  std::string address;       // ingest host:port
  TlsConfig tls;             // the device's certificate
  std::string buffer_path;   // the durable buffer file
  size_t max_buffered_batches = 10000;
  absl::Duration backoff_initial = absl::Milliseconds(100);
  absl::Duration backoff_max = absl::Seconds(30);  // also bounds a server's retry_after
  absl::Duration ack_timeout = absl::Seconds(30);
};

struct DeviceStats {
  uint64_t batches_sent = 0;
  uint64_t batches_acked = 0;
  uint64_t samples_stored = 0;
  uint64_t samples_duplicate = 0;
  uint64_t samples_rejected = 0;
  uint64_t retries = 0;
  uint64_t reconnects = 0;
  // Reconnects that waited longer than the backoff because a retryable ack's retry_after asked to.
  uint64_t waits_set_by_server = 0;
};

class DeviceClient {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceClient>> Open(DeviceOptions options);
  ~DeviceClient();  // stops sending; what is not acked stays in the buffer file

  // Makes `samples` a batch (seqs assigned here) durable before returning.
  absl::StatusOr<uint64_t> Send(std::vector<v1::VitalSample> samples);
  // Starts the background sender (resending whatever the buffer file holds).
  void Start();
  void Stop();
  // Waits until the buffer is empty; DEADLINE_EXCEEDED otherwise.
  absl::Status WaitUntilAcked(absl::Duration timeout);

  DeviceStats stats();
  size_t pending();
  // Called on the sender thread for every ack (including retryable ones).
  void OnAck(std::function<void(const v1::IngestAck&, absl::Duration latency)> callback);

 private:
  explicit DeviceClient(DeviceOptions options) : options_(std::move(options)) {}
  void Loop();
  // Sends everything pending on one stream; returns when the stream fails or Stop() is called.
  absl::Status RunStream(v1::DeviceIngest::Stub& stub);

  const DeviceOptions options_;
  std::unique_ptr<BatchBuffer> buffer_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool running_ = false;
  DeviceStats stats_;
  std::function<void(const v1::IngestAck&, absl::Duration)> on_ack_;
  grpc::ClientContext* active_ = nullptr;  // to cancel a blocked stream on Stop()
  absl::Duration retry_after_;             // from the last retryable ack, for the next wait
  std::thread thread_;
};

}  // namespace medgate::device

#endif  // MEDGATE_LIBS_DEVICE_SDK_DEVICE_CLIENT_H_
