// The DeviceIngest gRPC adapter: StreamVitals as a callback (reactor) stream, ReadVitals.
#ifndef MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_
#define MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/time/time.h"
#include "libs/common/latency_histogram.h"

#include "libs/identity/authz.h"
#include "libs/pg/shard_set.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "services/ingest/ingest_core.h"
#include "services/ingest/stream_executor.h"

namespace medgate::ingest {

// Server-side ack latency: from a batch read off the stream to its ack handed to gRPC. Logged as
// `ingest_ack_latency` (acks, p50/p90/p99/max) once per interval, by the first ack after the
// interval ends: a quiet service logs nothing.
class AckLatency {
 public:
  explicit AckLatency(absl::Duration interval) : interval_(interval) {}
  void Record(absl::Duration latency);

 private:
  const absl::Duration interval_;
  LatencyHistogram histogram_;
  std::atomic<int64_t> next_log_us_{0};
};

class IngestService final
    : public v1::DeviceIngest::WithCallbackMethod_StreamVitals<v1::DeviceIngest::Service> {
 public:
  IngestService(IngestCore& core, RoutingClient& routing, consent::ConsentCache& consent,
                const pg::ShardSet& shards, std::string trust_domain, StreamExecutor& executor,
                absl::Duration stats_interval);

  grpc::ServerBidiReactor<v1::VitalsBatch, v1::IngestAck>* StreamVitals(
      grpc::CallbackServerContext* context) override;

  grpc::Status ReadVitals(grpc::ServerContext* context, const v1::ReadVitalsRequest* request,
                          grpc::ServerWriter<v1::ReadVitalsResponse>* writer) override;

 private:
  IngestCore& core_;
  RoutingClient& routing_;
  consent::ConsentCache& consent_;
  const pg::ShardSet& shards_;
  const RpcPolicy policy_;
  StreamExecutor& executor_;
  AckLatency ack_latency_;
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_
