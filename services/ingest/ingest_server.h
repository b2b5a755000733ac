// Wiring of the ingest service from the configuration; main.cc and the tests start it this way.
#ifndef MEDGATE_SERVICES_INGEST_INGEST_SERVER_H_
#define MEDGATE_SERVICES_INGEST_INGEST_SERVER_H_

#include <map>
#include <memory>
#include <atomic>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/common/periodic_task.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/reassign_window.h"
#include "libs/routing_client/routing_client.h"
#include "libs/routing_client/tenant_gate.h"
#include "libs/server/service_server.h"
#include "services/ingest/ingest_core.h"
#include "services/ingest/ingest_service.h"
#include "services/ingest/stream_executor.h"
#include "services/ingest/vitals_writer.h"

namespace medgate::ingest {

struct IngestSettings {
  // ingest.tenant_samples_per_second and ingest.tenant_burst are a tenant's quota over the whole
  // deployment; ingest.instances (the Helm chart sets the ingest replicas) divides them between
  // the instances, each of which holds its own token bucket (core.tenant_*: this one's share).
  int instances = 1;
  IngestOptions core;
  WriterOptions writer;
  int worker_threads = 8;
  // Batches read from their streams and waiting for a worker thread; a batch read beyond it is
  // answered RESOURCE_EXHAUSTED (retryable). ParseIngestSettings defaults it to four times
  // limits.max_concurrent_streams.
  size_t max_waiting_batches = 4000;
  int writers_per_region = 4;  // parallel COPY lanes (connections) per shard
  // How long a device -> patient answer is reused: bounds how long an unassigned device may
  // still write for its former patient. A device streaming at least once per TTL has its answer
  // fetched again in the background, off the hot path (the routing client's refresh ahead).
  absl::Duration device_cache_ttl = absl::Seconds(kDefaultDeviceCacheTtlSeconds);
  // How often each region's vitals partitions are made for the next 12 months (and at start):
  // a month without its partition would file its samples in the default partition.
  absl::Duration partition_check = absl::Minutes(60);
  // How long a pass waits for its lock on a region's vitals table (ingest.partition_lock_timeout_ms):
  // every write and read of the region waits behind that lock request meanwhile.
  absl::Duration partition_lock_timeout = absl::Seconds(1);
  // Streams one device may have open at once (a reconnecting device briefly has two); one more
  // ends RESOURCE_EXHAUSTED.
  int max_streams_per_device = 4;
  // ingest.max_reads_per_tenant and ingest.read_idle_timeout_seconds.
  ReadBounds reads;
};

absl::StatusOr<IngestSettings> ParseIngestSettings(const MedgateConfig& config);

class IngestServer {
 public:
  static absl::StatusOr<std::unique_ptr<IngestServer>> Create(const MedgateConfig& config);
  ~IngestServer();

  absl::Status Start();
  void Shutdown();
  void RunUntilSignal() { server_->RunUntilSignal(); }
  int port() const { return server_->port(); }
  RoutingClient& routing() { return *routing_; }
  consent::ConsentCache& consent() { return *consent_; }
  IngestCounters counters() const { return core_->Counters(); }
  int waiting_for_room(const std::string& region) const { return core_->WaitingForRoom(region); }
  // Batches waiting in the region writers' queues.
  size_t queued_batches() const {
    size_t n = 0;
    for (const auto& w : writers_) n += w->queued();
    return n;
  }
  // Transactions the region writers have taken batches into since start (for tests: a count that
  // moves once a writer holds a batch, even one whose transaction then stalls).
  uint64_t write_groups_taken() const {
    uint64_t n = 0;
    for (const auto& w : writers_) n += w->groups_taken();
    return n;
  }
  // Batches read from their streams and waiting for a worker thread, and those a worker thread
  // is processing (it may be waiting for room in a writer's queue).
  size_t waiting_batches() const { return executor_->waiting(); }
  size_t processing_batches() const { return executor_->running(); }
  // Batches handed to a worker thread since start: those that had to wait for routing, consent
  // or room in a writer's queue (the others are processed on gRPC's callback threads).
  uint64_t batches_handed_to_workers() const { return executor_->accepted(); }
  // Streams the device with this SPIFFE id has open, superseded ones still ending included.
  int device_streams(const std::string& spiffe_id) const {
    return service_->device_streams(spiffe_id);
  }
  // Passes of the partition keeper that covered every region (for tests).
  uint64_t partition_passes() const { return partition_passes_.load(); }

 private:
  IngestServer(MedgateConfig config, IngestSettings settings);
  // Makes each region's coming vitals partitions; the wait before the next pass (shorter when a
  // region failed: its shard may be down).
  absl::Duration MakePartitions();

  const MedgateConfig config_;  // connecting as the ingest database role
  IngestSettings settings_;
  std::unique_ptr<pg::ShardSet> shards_;
  std::unique_ptr<RoutingClient> routing_;
  std::unique_ptr<TenantGate> tenant_gate_;
  std::unique_ptr<consent::ConsentCache> consent_;
  std::vector<std::unique_ptr<VitalsWriter>> writers_;
  std::unique_ptr<IngestCore> core_;
  std::unique_ptr<StreamExecutor> executor_;
  std::unique_ptr<IngestService> service_;
  std::unique_ptr<ServiceServer> server_;
  std::atomic<uint64_t> partition_passes_{0};
  std::unique_ptr<PeriodicTask> partition_keeper_;  // at start, then every partition_check
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_INGEST_SERVER_H_
