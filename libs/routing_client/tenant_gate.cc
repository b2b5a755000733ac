// TenantGate over a TTL cache of routing's answers.
#include "libs/routing_client/tenant_gate.h"

#include <algorithm>
#include <optional>
#include <utility>

#include <grpcpp/client_context.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "libs/common/ttl_cache.h"
#include "libs/routing_client/routing_client.h"
#include "medgate/v1/routing.grpc.pb.h"

namespace medgate {

struct CachedTenantGate::Flight {
  bool done = false;
  absl::StatusOr<TenantStatus> answer;
};

namespace {

TenantGateOptions WithClock(TenantGateOptions options) {
  if (!options.clock) options.clock = MonotonicNow;
  return options;
}

}  // namespace

TenantGateOptions TenantGateOptions::FromLimits(const ServerLimits& limits) {
  TenantGateOptions options;
  options.calls_per_second = limits.tenant_calls_per_second;
  options.call_burst = limits.tenant_call_burst;
  return options;
}

CachedTenantGate::CachedTenantGate(TenantStatusFetcher fetch, TenantGateOptions options)
    : fetch_(std::move(fetch)),
      options_(WithClock(std::move(options))),
      cache_(options_.max_cached),
      calls_(options_.calls_per_second, options_.call_burst) {}

size_t CachedTenantGate::waiting_for_fetch() {
  absl::MutexLock lock(&mu_);
  return waiting_;
}

absl::Status CachedTenantGate::CheckActive(absl::string_view tenant, double calls) {
  const std::string key(tenant);
  absl::StatusOr<TenantStatus> status = Fetch(key);
  if (!status.ok()) return status.status();
  if (!status->found) {
    return absl::PermissionDeniedError(absl::StrCat(
        "tenant '", key, "' is not registered with medgate; ops must create it first"));
  }
  if (!status->active) {
    return absl::PermissionDeniedError(absl::StrCat(
        "tenant '", key, "' is suspended: its identities may not call medgate until ops "
        "reactivate it"));
  }
  // Only calls let through are counted: a refused tenant's calls cost it nothing.
  // A call that counts for more than the whole burst takes the burst, or it could never pass.
  const absl::Duration wait =
      calls_.TryTake(key, std::min(calls, options_.call_burst), options_.clock());
  if (wait > absl::ZeroDuration()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", key, "' is calling faster than this service instance takes (",
        options_.calls_per_second, " calls a second after a burst of ", options_.call_burst,
        ": limits.tenant_calls_per_second and limits.tenant_call_burst; this call counts as ",
        calls, "); retry in ",
        absl::ToInt64Milliseconds(absl::Ceil(wait, absl::Milliseconds(1))), " ms"));
  }
  return absl::OkStatus();
}

absl::StatusOr<TenantStatus> CachedTenantGate::Fetch(const std::string& key) {
  std::shared_ptr<Flight> flight;
  {
    absl::MutexLock lock(&mu_);
    if (std::optional<TenantStatus> cached = cache_.Get(key, options_.clock())) return *cached;
    auto it = flights_.find(key);
    if (it != flights_.end()) {
      // Another call is asking: its answer is this call's too. The wait is bounded by the
      // fetch's own deadline.
      flight = it->second;
      ++waiting_;
      mu_.Await(absl::Condition(+[](Flight* f) { return f->done; }, flight.get()));
      --waiting_;
      return flight->answer;
    }
    flight = std::make_shared<Flight>();
    flights_.emplace(key, flight);
  }
  const absl::Time asked_at = options_.clock();
  absl::StatusOr<std::vector<TenantStatus>> fetched = fetch_({key});
  absl::StatusOr<TenantStatus> answer;
  if (!fetched.ok()) {
    // Whatever routing answered, the caller's request was not decided: retry later.
    answer = absl::UnavailableError(absl::StrCat("cannot learn whether tenant '", key,
                                                 "' may act: ", fetched.status().message()));
  } else if (fetched->size() != 1 || (*fetched)[0].tenant_id != key) {
    answer = absl::InternalError("routing answered another tenant");
  } else {
    answer = (*fetched)[0];
  }
  absl::MutexLock lock(&mu_);
  if (answer.ok()) cache_.Put(key, *answer, options_.ttl, asked_at);
  flight->answer = answer;
  flight->done = true;
  flights_.erase(key);
  return answer;
}

std::unique_ptr<TenantGate> NewCachedTenantGate(TenantStatusFetcher fetch,
                                                TenantGateOptions options) {
  return std::make_unique<CachedTenantGate>(std::move(fetch), std::move(options));
}

std::unique_ptr<TenantGate> NewRoutingTenantGate(std::shared_ptr<grpc::Channel> channel,
                                                 TenantGateOptions options,
                                                 absl::Duration rpc_deadline) {
  std::shared_ptr<v1::TenantRouting::Stub> stub = v1::TenantRouting::NewStub(channel);
  auto fetch = [stub, rpc_deadline](absl::Span<const std::string> tenant_ids)
      -> absl::StatusOr<std::vector<TenantStatus>> {
    v1::ResolveTenantsRequest request;
    for (const std::string& id : tenant_ids) request.add_tenant_ids(id);
    v1::ResolveTenantsResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + rpc_deadline));
    const grpc::Status rpc_status = stub->ResolveTenants(&context, request, &response);
    if (!rpc_status.ok()) return RoutingCallError("ResolveTenants", rpc_status);
    if (static_cast<size_t>(response.tenants_size()) != tenant_ids.size()) {
      return absl::InternalError(absl::StrCat("routing ResolveTenants answered ",
                                              response.tenants_size(), " tenants for ",
                                              tenant_ids.size(), " asked"));
    }
    std::vector<TenantStatus> out;
    out.reserve(tenant_ids.size());
    for (const v1::ResolvedTenant& t : response.tenants()) {
      out.push_back(TenantStatus{.tenant_id = t.tenant_id(), .found = t.found(), .active = t.active()});
    }
    return out;
  };
  return NewCachedTenantGate(std::move(fetch), std::move(options));
}

}  // namespace medgate
