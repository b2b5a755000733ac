// The tenant gate every service puts in front of its RPCs: is the caller's tenant registered and
// active? Answers come from routing and are cached for a short TTL, so a suspension reaches every
// service within that TTL and a steady caller costs routing one look-up per tenant per TTL.
#ifndef MEDGATE_LIBS_ROUTING_CLIENT_TENANT_GATE_H_
#define MEDGATE_LIBS_ROUTING_CLIENT_TENANT_GATE_H_

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/channel.h>

#include "absl/base/thread_annotations.h"

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "libs/common/config.h"
#include "libs/common/monotonic_clock.h"
#include "libs/common/token_buckets.h"
#include "libs/common/ttl_cache.h"
#include "libs/identity/authz.h"
#include "libs/routing_client/routing_client.h"

namespace medgate {

struct TenantGateOptions {
  // How long an answer is used: the most a suspension (or reactivation) waits to take effect.
  absl::Duration ttl = absl::Seconds(2);
  size_t max_cached = 10000;  // LRU-evicted beyond this
  // Time source for expiry only: monotonic, so a host clock stepped back never extends an
  // answer's life (a suspended tenant served past the TTL); tests inject a fake one.
  std::function<absl::Time()> clock = MonotonicNow;
  // Calls one active tenant's identities may start a second through this gate, after a burst
  // (limits.tenant_calls_per_second and limits.tenant_call_burst): one more is RESOURCE_EXHAUSTED,
  // saying when to retry. Timed on `clock`.
  double calls_per_second = ServerLimits{}.tenant_calls_per_second;
  double call_burst = ServerLimits{}.tenant_call_burst;

  // The defaults, with the call rate of `limits`.
  static TenantGateOptions FromLimits(const ServerLimits& limits);
};

// Asks where tenants stand, one answer per id in order (routing's ResolveTenants, or routing's
// own control database inside the routing service).
using TenantStatusFetcher =
    std::function<absl::StatusOr<std::vector<TenantStatus>>(absl::Span<const std::string>)>;

// A TenantGate over `fetch` with a TTL cache, and each active tenant's call rate. Thread-safe. A failed fetch caches nothing and
// answers UNAVAILABLE with its message (fail closed, retryable). Concurrent misses of one tenant
// share one fetch: when an answer expires under load, routing is asked once, not once per call.
class CachedTenantGate final : public TenantGate {
 public:
  CachedTenantGate(TenantStatusFetcher fetch, TenantGateOptions options);
  absl::Status CheckActive(absl::string_view tenant, double calls = 1) override;
  // Calls waiting for another call's fetch (for tests).
  size_t waiting_for_fetch();

 private:
  struct Flight;  // one fetch in progress, and its answer once there
  absl::StatusOr<TenantStatus> Fetch(const std::string& tenant);

  const TenantStatusFetcher fetch_;
  const TenantGateOptions options_;
  absl::Mutex mu_;
  TtlCache<std::string, TenantStatus> cache_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(mu_);
  size_t waiting_ ABSL_GUARDED_BY(mu_) = 0;
  TokenBuckets calls_;  // by tenant: calls let through
};

std::unique_ptr<TenantGate> NewCachedTenantGate(TenantStatusFetcher fetch,
                                                TenantGateOptions options = {});

// A TenantGate asking TenantRouting.ResolveTenants over `channel` (an mTLS channel made with the
// caller's service certificate), with `rpc_deadline` per call.
std::unique_ptr<TenantGate> NewRoutingTenantGate(std::shared_ptr<grpc::Channel> channel,
                                                 TenantGateOptions options = {},
                                                 absl::Duration rpc_deadline = absl::Seconds(2));

}  // namespace medgate

#endif  // MEDGATE_LIBS_ROUTING_CLIENT_TENANT_GATE_H_
