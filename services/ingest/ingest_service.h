// The DeviceIngest gRPC adapter: StreamVitals as a callback (reactor) stream, ReadVitals,
// EraseVitals, ExportVitals.
#ifndef MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_
#define MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "libs/common/bounded_counts.h"
#include "libs/common/latency_histogram.h"
#include "libs/identity/authz.h"
#include "libs/identity/peer_certificates.h"
#include "libs/pg/shard_set.h"
#include "libs/server/stall_watch.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "services/ingest/device_turns.h"
#include "services/ingest/ingest_core.h"
#include "services/ingest/stream_executor.h"

namespace medgate::ingest {

// What ReadVitals, ExportVitals and EraseVitals calls may hold: each holds a handler thread of the server's
// bounded pool.
struct ReadBounds {
  // A tenant's reads in progress at once (ingest.max_reads_per_tenant); one more is refused
  // RESOURCE_EXHAUSTED, so one tenant cannot take every handler thread.
  int max_per_tenant = 16;
  // A read whose client takes nothing for this long while the service waits to hand over its
  // next readings ends DEADLINE_EXCEEDED (ingest.read_idle_timeout_seconds).
  absl::Duration idle_timeout = absl::Seconds(30);
  // A read whose client, once the service has waited idle_timeout for it in all, has taken its
  // readings at under this average rate (bytes of the messages taken over the time waited) ends
  // DEADLINE_EXCEEDED (ingest.read_min_bytes_per_second): a client taking a trickle is not let
  // hold its thread for as long as it likes either.
  int64_t min_bytes_per_second = 16 * 1024;
};

// What one ReadVitals call counts against its tenant's call rate (limits.tenant_calls_per_second,
// the tenant gate's): a read scans the shard and commits an audit entry. With the defaults, a
// tenant starts at most 100 reads a second on one instance, after a burst of 200.
inline constexpr double kReadVitalsCalls = 10;

// The longest reason an EraseVitals request may give (it goes into every audit entry).
inline constexpr size_t kMaxEraseReasonBytes = 512;

// StreamVitals is served raw (ByteBuffer in and out): a message that does not parse as a
// VitalsBatch (a string field that is not UTF-8, as a device's protobuf library may send) ends
// the stream with INVALID_ARGUMENT saying so. Parsed by gRPC, it would read as the end of the
// stream, which a device resends on its next stream forever.
class IngestService final
    : public v1::DeviceIngest::WithRawCallbackMethod_StreamVitals<v1::DeviceIngest::Service> {
 public:
  // `tenant_gate` (not owned) refuses ReadVitals to the identities of suspended or unregistered
  // tenants; a device's batches learn their tenant's state from routing's device answer.
  // `peers` (the server's, ServiceServer::peer_certificates) checks a device's certificate again
  // for each batch of its stream: one that has expired or been revoked since the stream opened
  // ends it UNAUTHENTICATED.
  // A device may have `max_streams_per_device` streams open at once; one of them reads and
  // stores: a stream opening supersedes the device's older ones (DeviceTurns).
  IngestService(IngestCore& core, RoutingClient& routing, consent::ConsentCache& consent,
                const pg::ShardSet& shards, std::string trust_domain, StreamExecutor& executor,
                absl::Duration stats_interval, TenantGate* tenant_gate,
                std::shared_ptr<PeerCertificates> peers, int max_streams_per_device,
                ReadBounds reads = {});

  // One of a device's open streams, counted while it lives.
  using DeviceStreamSlot = BoundedCounts<std::string>::Slot;

  // Reads VitalsBatch messages and writes IngestAck messages.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StreamVitals(
      grpc::CallbackServerContext* context) override;

  grpc::Status ReadVitals(grpc::ServerContext* context, const v1::ReadVitalsRequest* request,
                          grpc::ServerWriter<v1::ReadVitalsResponse>* writer) override;

  grpc::Status EraseVitals(grpc::ServerContext* context, const v1::EraseVitalsRequest* request,
                           v1::EraseVitalsResponse* response) override;

  grpc::Status ExportVitals(grpc::ServerContext* context, const v1::ExportVitalsRequest* request,
                            grpc::ServerWriter<v1::ExportVitalsResponse>* writer) override;

  // Streams the device with this SPIFFE id has open, superseded ones still ending included.
  int device_streams(const std::string& spiffe_id) const {
    return streams_per_device_.count(spiffe_id);
  }

 private:
  IngestCore& core_;
  RoutingClient& routing_;
  consent::ConsentCache& consent_;
  const pg::ShardSet& shards_;
  RpcPolicy policy_;
  StreamExecutor& executor_;
  const std::shared_ptr<PeerCertificates> peers_;
  const int max_streams_per_device_;
  BoundedCounts<std::string> streams_per_device_;  // by the device's SPIFFE id
  DeviceTurns turns_;                              // by the device's SPIFFE id
  // One of `tenant`'s places for a ReadVitals, ExportVitals or EraseVitals call (ingest.max_reads_per_tenant);
  // null when it has none left, with `refused` the RESOURCE_EXHAUSTED status to answer.
  std::unique_ptr<BoundedCounts<std::string>::Slot> TakeReadPlace(const std::string& tenant,
                                                                  grpc::Status& refused);

  // Where a patient of `tenant` lives, and its home shard's pool; NOT_FOUND for a patient of
  // another tenant or none.
  struct PatientShard {
    PatientLocation where;
    pg::Pool* pool;
  };
  absl::StatusOr<PatientShard> PatientOfTenant(const std::string& patient_id,
                                               const std::string& tenant);

  // Writes to a read's client the messages `next` fills, one at a time until it returns false
  // (each is built only when the one before it has been taken), ending the call
  // DEADLINE_EXCEEDED if the client takes nothing for reads_.idle_timeout or takes them under
  // reads_.min_bytes_per_second.
  template <typename Response, typename Next>
  grpc::Status SendPaced(grpc::ServerContext& context, grpc::ServerWriter<Response>& writer,
                         Next next);

  const ReadBounds reads_;
  BoundedCounts<std::string> reads_per_tenant_;
  StallWatch read_watch_;
  // From a batch read off a stream to its ack handed to gRPC; logged as `ingest_ack_latency`
  // (acks, p50/p90/p99/max) by the first ack after each stats interval: a quiet service logs
  // nothing.
  LatencyWindow ack_latency_;
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_INGEST_SERVICE_H_
