// The client other services use to ask routing where patients and devices live, with a bounded
// TTL cache and batched look-ups so hot paths do not call routing per sample.
#ifndef MEDGATE_LIBS_ROUTING_CLIENT_ROUTING_CLIENT_H_
#define MEDGATE_LIBS_ROUTING_CLIENT_ROUTING_CLIENT_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/support/status.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "libs/common/monotonic_clock.h"

namespace medgate {

// Where a placed patient lives. `found` is false for an unknown patient id.
struct PatientLocation {
  std::string patient_id;
  bool found = false;
  std::string tenant_id;
  std::string region_id;
  std::string territory;
};

struct DeviceRef {
  std::string tenant_id;
  std::string device_id;
};

// The patient a device is assigned to. `found` is false for an unknown or unassigned device.
struct DeviceLocation {
  std::string tenant_id;
  std::string device_id;
  bool found = false;
  std::string patient_id;
  std::string region_id;
  bool tenant_active = false;  // false while the device's tenant is suspended
  // When the current assignment began: samples measured earlier are not this patient's.
  // InfinitePast when routing does not say.
  absl::Time assigned_at = absl::InfinitePast();
};

// Whether a tenant may act: registered (`found`) and not suspended (`active`).
struct TenantStatus {
  std::string tenant_id;
  bool found = false;
  bool active = false;
};

struct RoutingClientOptions {
  size_t max_cached_patients = 100000;  // LRU-evicted beyond this
  size_t max_cached_devices = 100000;
  absl::Duration patient_ttl = absl::Minutes(5);  // placements change only by explicit moves
  absl::Duration device_ttl = absl::Seconds(5);   // bounds how long an unassigned device still resolves
  absl::Duration negative_ttl = absl::Seconds(2); // "not found" answers are cached briefly
  absl::Duration rpc_deadline = absl::Seconds(2);
  size_t max_batch = 1000;  // ids per ResolvePatients/ResolveDevices call; used within [1, 1000]
  // Refresh ahead: a found answer used in the second half of its TTL is fetched again in the
  // background, in batched RPCs, so a device or patient in steady use (at least once per TTL)
  // is never a cache miss after its first lookup. An answer is still never used past its TTL,
  // and what is not used is never refetched. Off: every answer is fetched by the lookup that
  // misses it, and PrefetchDevices does nothing.
  bool refresh_ahead = false;
  // How long the background refresher gathers due ids into one RPC (up to max_batch).
  absl::Duration refresh_gather = absl::Milliseconds(100);
  // Time source for cache expiry only (RPC deadlines always use the real clock): monotonic, so a
  // host clock stepped back never extends an answer's life; tests inject a fake one so expiry is
  // deterministic. Its readings are compared only with each other.
  std::function<absl::Time()> clock = MonotonicNow;
};

// Thread-safe.
class RoutingClient {
 public:
  virtual ~RoutingClient() = default;

  // One answer per id, in order. Cache hits are answered from memory; all misses go to routing
  // in as few batched RPCs as max_batch allows. Routing unreachable: UNAVAILABLE (or the RPC's
  // status); nothing is cached from a failed call.
  virtual absl::StatusOr<std::vector<PatientLocation>> ResolvePatients(
      absl::Span<const std::string> patient_ids) = 0;
  virtual absl::StatusOr<std::vector<DeviceLocation>> ResolveDevices(
      absl::Span<const DeviceRef> devices) = 0;
  // The same answers when every one of them is in the cache now, nullopt otherwise: never waits
  // for routing (a hit due for a refresh is queued for the background refresher as above).
  virtual std::optional<std::vector<DeviceLocation>> CachedDevices(
      absl::Span<const DeviceRef> devices) = 0;

  // Has the background refresher fetch these devices' answers (batched with everything else it
  // fetches) unless they are cached already, so that a lookup soon after finds them: a stream
  // calls it when it opens, before its first batch arrives. Needs refresh_ahead; without it,
  // does nothing.
  virtual void PrefetchDevices(absl::Span<const DeviceRef> devices) = 0;

  virtual void InvalidatePatient(absl::string_view patient_id) = 0;
  virtual void InvalidateDevice(absl::string_view tenant_id, absl::string_view device_id) = 0;
  virtual void InvalidateAll() = 0;
};

// A client calling the TenantRouting service over `channel` (an mTLS channel made with the
// caller's service certificate, see libs/identity/credentials.h).
// The status a failed call to routing's `method` becomes. Routing's answers about the request
// itself (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION,
// OUT_OF_RANGE, RESOURCE_EXHAUSTED) keep their message. Any other failure (routing unreachable,
// too slow, or failing itself) keeps its code with a message that says only that: the message
// gRPC or routing gave names addresses and libraries of the network behind the service, which
// this service's clients are not told. That detail goes to the log, at most once a second.
absl::Status RoutingCallError(absl::string_view method, const grpc::Status& status);

std::unique_ptr<RoutingClient> NewRoutingClient(std::shared_ptr<grpc::Channel> channel,
                                                RoutingClientOptions options = {});

}  // namespace medgate

#endif  // MEDGATE_LIBS_ROUTING_CLIENT_ROUTING_CLIENT_H_
