// RoutingClient over the TenantRouting stub: per-call dedup, batched misses, two TTL caches.
#include "libs/routing_client/routing_client.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/client_context.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "libs/common/grpc_status.h"
#include "libs/common/log.h"
#include "libs/common/monotonic_clock.h"
#include "libs/common/status_macros.h"
#include "libs/common/ttl_cache.h"
#include "medgate/v1/routing.grpc.pb.h"

namespace medgate {
namespace {

// The API's limit on ids per Resolve* request: routing refuses larger batches.
constexpr size_t kMaxIdsPerRpc = 1000;

// Device ids are unique within a tenant only.
using DeviceCacheKey = std::pair<std::string, std::string>;  // (tenant_id, device_id)

// A cache and its invalidation epoch, changed together under one lock. The epoch lets a call
// that fetched before an invalidation see that its answers may be stale and not cache them.
template <typename Key, typename Value>
struct GuardedCache {
  explicit GuardedCache(size_t capacity) : entries(capacity) {}

  absl::Mutex mu;
  TtlCache<Key, Value> entries ABSL_GUARDED_BY(mu);
  uint64_t epoch ABSL_GUARDED_BY(mu) = 0;
  // Keys whose answers are due for a background refresh; at most the cache's capacity.
  std::vector<Key> due ABSL_GUARDED_BY(mu);
};

struct TtlPolicy {
  absl::Duration found;
  absl::Duration not_found;
  // A found answer hit from this age on is due for a refresh (infinite: never).
  absl::Duration refresh_after = absl::InfiniteDuration();
};

// Caches answers fetched at `now` (found ones with their refresh point).
template <typename Key, typename Value>
void CacheAnswers(GuardedCache<Key, Value>& cache, const std::vector<Key>& keys,
                  const std::vector<Value>& values, const TtlPolicy& ttl, absl::Time now)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(cache.mu) {
  for (size_t j = 0; j < keys.size(); ++j) {
    cache.entries.Put(keys[j], values[j], values[j].found ? ttl.found : ttl.not_found, now,
                      values[j].found ? ttl.refresh_after : absl::InfiniteDuration());
  }
}

// Queues `key` for the background refresher unless the queue already holds as many keys as the
// cache can (beyond that an entry is not refreshed: it expires, and its next use fetches it).
template <typename Key, typename Value>
bool QueueForRefresh(GuardedCache<Key, Value>& cache, const Key& key)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(cache.mu) {
  if (cache.due.size() >= cache.entries.capacity()) return false;
  cache.due.push_back(key);
  return true;
}

// The cached answer for `key`, if any; when it is due for a refresh, the key is queued for the
// refresher and `*queued` set.
template <typename Key, typename Value>
std::optional<Value> CachedAnswer(GuardedCache<Key, Value>& cache, const Key& key, absl::Time now,
                                  bool* queued) ABSL_EXCLUSIVE_LOCKS_REQUIRED(cache.mu) {
  bool refresh_due = false;
  std::optional<Value> hit = cache.entries.Get(key, now, &refresh_due);
  if (hit && refresh_due && QueueForRefresh(cache, key)) *queued = true;
  return hit;
}

// Answers `keys` in order when every one is cached, nullopt otherwise; never fetches.
template <typename Key, typename Value>
std::optional<std::vector<Value>> AnswerFromCache(absl::Span<const Key> keys,
                                                  GuardedCache<Key, Value>& cache,
                                                  const std::function<absl::Time()>& clock,
                                                  const std::function<void()>& on_due) {
  std::vector<Value> answers(keys.size());
  bool complete = true;
  bool queued = false;
  {
    absl::MutexLock lock(&cache.mu);
    const absl::Time now = clock();
    for (size_t i = 0; i < keys.size(); ++i) {
      std::optional<Value> hit = CachedAnswer(cache, keys[i], now, &queued);
      if (!hit) {
        complete = false;
        break;
      }
      answers[i] = *std::move(hit);
    }
  }
  if (queued && on_due) on_due();
  if (!complete) return std::nullopt;
  return answers;
}

// Answers `keys` in order from `cache`, fetching the distinct misses in batches of `max_batch`
// with `fetch` (which returns one validated answer per key, in order). Answers are cached only
// when every batch succeeded and nothing was invalidated meanwhile. Hits due for a refresh are
// queued on `cache.due`, and `on_due` is called once the cache is unlocked.
template <typename Key, typename Value, typename FetchFn>
absl::StatusOr<std::vector<Value>> ResolveThroughCache(
    absl::Span<const Key> keys, GuardedCache<Key, Value>& cache, const TtlPolicy& ttl,
    const std::function<absl::Time()>& clock, size_t max_batch, FetchFn fetch,
    const std::function<void()>& on_due) {
  std::vector<Value> answers(keys.size());
  // Filled only on a miss, so a lookup answered from the cache (the common case, once per ingest
  // batch) allocates nothing for them.
  std::vector<std::pair<size_t, size_t>> miss_of;  // (position in `keys`, index in `misses`)
  std::vector<Key> misses;
  uint64_t epoch_at_lookup;
  bool queued = false;
  {
    absl::flat_hash_map<Key, size_t> miss_index;
    absl::MutexLock lock(&cache.mu);
    const absl::Time now = clock();
    for (size_t i = 0; i < keys.size(); ++i) {
      if (std::optional<Value> hit = CachedAnswer(cache, keys[i], now, &queued)) {
        answers[i] = *std::move(hit);
        continue;
      }
      auto [it, inserted] = miss_index.try_emplace(keys[i], misses.size());
      if (inserted) misses.push_back(keys[i]);
      miss_of.emplace_back(i, it->second);
    }
    epoch_at_lookup = cache.epoch;
  }
  if (queued && on_due) on_due();
  if (misses.empty()) return answers;

  std::vector<Value> fetched;
  fetched.reserve(misses.size());
  // An answer is timed from when it was asked for, not from when it came: routing may have read
  // it up to an RPC deadline before it arrived, and readers of the cache (the device
  // reassignment window) count on an answer being used at most a TTL after routing read it.
  const absl::Time asked_at = clock();
  const absl::Span<const Key> all_misses(misses);
  for (size_t start = 0; start < all_misses.size(); start += max_batch) {
    ASSIGN_OR_RETURN(std::vector<Value> batch, fetch(all_misses.subspan(start, max_batch)));
    std::move(batch.begin(), batch.end(), std::back_inserter(fetched));
  }

  {
    absl::MutexLock lock(&cache.mu);
    if (cache.epoch == epoch_at_lookup) CacheAnswers(cache, misses, fetched, ttl, asked_at);
  }
  for (const auto& [position, miss] : miss_of) answers[position] = fetched[miss];
  return answers;
}

// Fetches the answers due for a refresh in batches of `max_batch` and caches each batch unless an
// invalidation came while it was fetched. A failed fetch ends the round with its error, and the
// rest is dropped: those entries expire, and their next use fetches them itself.
template <typename Key, typename Value, typename FetchFn>
absl::Status RefreshDue(GuardedCache<Key, Value>& cache, const TtlPolicy& ttl,
                        const std::function<absl::Time()>& clock, size_t max_batch,
                        FetchFn fetch) {
  std::vector<Key> due;
  {
    absl::MutexLock lock(&cache.mu);
    due.swap(cache.due);
  }
  // A key can be queued twice (prefetched by two streams of one device): it is fetched once.
  absl::flat_hash_set<Key> seen;
  due.erase(std::remove_if(due.begin(), due.end(),
                           [&seen](const Key& key) { return !seen.insert(key).second; }),
            due.end());
  for (size_t start = 0; start < due.size(); start += max_batch) {
    const size_t end = std::min(due.size(), start + max_batch);
    const std::vector<Key> batch(due.begin() + static_cast<long>(start),
                                 due.begin() + static_cast<long>(end));
    uint64_t epoch;
    {
      absl::MutexLock lock(&cache.mu);
      epoch = cache.epoch;
    }
    const absl::Time asked_at = clock();  // as in Lookup
    ASSIGN_OR_RETURN(std::vector<Value> fetched, fetch(absl::Span<const Key>(batch)));
    absl::MutexLock lock(&cache.mu);
    if (cache.epoch == epoch) CacheAnswers(cache, batch, fetched, ttl, asked_at);
  }
  return absl::OkStatus();
}

class GrpcRoutingClient final : public RoutingClient {
 public:
  GrpcRoutingClient(std::shared_ptr<grpc::Channel> channel, RoutingClientOptions options)
      : options_(std::move(options)),
        stub_(v1::TenantRouting::NewStub(std::move(channel))),
        patients_(options_.max_cached_patients),
        devices_(options_.max_cached_devices) {
    options_.max_batch = std::clamp<size_t>(options_.max_batch, 1, kMaxIdsPerRpc);
    if (!options_.clock) options_.clock = MonotonicNow;
    if (options_.refresh_ahead) {
      patient_ttl_.refresh_after = options_.patient_ttl / 2;
      device_ttl_.refresh_after = options_.device_ttl / 2;
      on_due_ = [this] {
        absl::MutexLock lock(&refresh_mu_);
        refresh_wanted_ = true;
      };
      refresher_ = std::thread([this] { RefreshLoop(); });
    }
  }

  ~GrpcRoutingClient() override {
    {
      absl::MutexLock lock(&refresh_mu_);
      stopping_ = true;
    }
    if (refresher_.joinable()) refresher_.join();
  }

  absl::StatusOr<std::vector<PatientLocation>> ResolvePatients(
      absl::Span<const std::string> patient_ids) override {
    return ResolveThroughCache(
        patient_ids, patients_, patient_ttl_, options_.clock, options_.max_batch,
        [this](absl::Span<const std::string> batch) { return FetchPatients(batch); }, on_due_);
  }

  absl::StatusOr<std::vector<DeviceLocation>> ResolveDevices(
      absl::Span<const DeviceRef> devices) override {
    std::vector<DeviceCacheKey> keys;
    keys.reserve(devices.size());
    for (const DeviceRef& device : devices) keys.emplace_back(device.tenant_id, device.device_id);
    return ResolveThroughCache(
        absl::Span<const DeviceCacheKey>(keys), devices_, device_ttl_, options_.clock,
        options_.max_batch,
        [this](absl::Span<const DeviceCacheKey> batch) { return FetchDevices(batch); }, on_due_);
  }

  std::optional<std::vector<DeviceLocation>> CachedDevices(
      absl::Span<const DeviceRef> devices) override {
    std::vector<DeviceCacheKey> keys;
    keys.reserve(devices.size());
    for (const DeviceRef& device : devices) keys.emplace_back(device.tenant_id, device.device_id);
    return AnswerFromCache(absl::Span<const DeviceCacheKey>(keys), devices_, options_.clock,
                           on_due_);
  }

  void PrefetchDevices(absl::Span<const DeviceRef> devices) override {
    if (!options_.refresh_ahead) return;
    bool queued = false;
    {
      absl::MutexLock lock(&devices_.mu);
      const absl::Time now = options_.clock();
      for (const DeviceRef& device : devices) {
        DeviceCacheKey key(device.tenant_id, device.device_id);
        // A cached answer is used as is (and refreshed ahead if it stays in use).
        if (devices_.entries.Get(key, now).has_value()) continue;
        if (!QueueForRefresh(devices_, key)) break;
        queued = true;
      }
    }
    if (queued) on_due_();
  }

  void InvalidatePatient(absl::string_view patient_id) override {
    absl::MutexLock lock(&patients_.mu);
    patients_.entries.Erase(std::string(patient_id));
    ++patients_.epoch;
  }

  void InvalidateDevice(absl::string_view tenant_id, absl::string_view device_id) override {
    absl::MutexLock lock(&devices_.mu);
    devices_.entries.Erase(DeviceCacheKey(std::string(tenant_id), std::string(device_id)));
    ++devices_.epoch;
  }

  void InvalidateAll() override {
    {
      absl::MutexLock lock(&patients_.mu);
      patients_.entries.Clear();
      ++patients_.epoch;
    }
    absl::MutexLock lock(&devices_.mu);
    devices_.entries.Clear();
    ++devices_.epoch;
  }

 private:
  // The background refresher: woken by a hit due for a refresh, it gathers for refresh_gather,
  // then fetches everything due.
  void RefreshLoop() {
    while (true) {
      {
        absl::MutexLock lock(&refresh_mu_);
        refresh_mu_.Await(absl::Condition(
            +[](GrpcRoutingClient* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->refresh_mu_) {
              return c->stopping_ || c->refresh_wanted_;
            },
            this));
        if (!stopping_) {
          refresh_mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.refresh_gather);
        }
        if (stopping_) return;
        refresh_wanted_ = false;
      }
      absl::Status patients = RefreshDue(
          patients_, patient_ttl_, options_.clock, options_.max_batch,
          [this](absl::Span<const std::string> batch) { return FetchPatients(batch); });
      absl::Status devices = RefreshDue(
          devices_, device_ttl_, options_.clock, options_.max_batch,
          [this](absl::Span<const DeviceCacheKey> batch) { return FetchDevices(batch); });
      for (const absl::Status& s : {patients, devices}) {
        if (!s.ok()) log::Warning("routing_refresh_failed", {{"error", s.message()}});
      }
    }
  }

  // Deadlines are real time, whatever clock the caches use.
  void SetDeadline(grpc::ClientContext& context) const {
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_deadline));
  }

  absl::StatusOr<std::vector<PatientLocation>> FetchPatients(
      absl::Span<const std::string> patient_ids) const {
    v1::ResolvePatientsRequest request;
    request.mutable_patient_ids()->Reserve(static_cast<int>(patient_ids.size()));
    for (const std::string& id : patient_ids) request.add_patient_ids(id);
    v1::ResolvePatientsResponse response;
    grpc::ClientContext context;
    SetDeadline(context);
    const grpc::Status rpc_status = stub_->ResolvePatients(&context, request, &response);
    if (!rpc_status.ok()) return RoutingCallError("ResolvePatients", rpc_status);

    // Identifiers stay out of error messages: they end up in logs.
    if (static_cast<size_t>(response.patients_size()) != patient_ids.size()) {
      return absl::InternalError(absl::StrCat("routing ResolvePatients answered ",
                                              response.patients_size(), " patients for ",
                                              patient_ids.size(), " asked"));
    }
    std::vector<PatientLocation> locations;
    locations.reserve(patient_ids.size());
    for (size_t i = 0; i < patient_ids.size(); ++i) {
      const v1::ResolvedPatient& p = response.patients(static_cast<int>(i));
      if (p.patient_id() != patient_ids[i]) {
        return absl::InternalError(absl::StrCat(
            "routing ResolvePatients answered another patient at position ", i));
      }
      locations.push_back(PatientLocation{.patient_id = p.patient_id(),
                                          .found = p.found(),
                                          .tenant_id = p.tenant_id(),
                                          .region_id = p.region_id(),
                                          .territory = p.territory()});
    }
    return locations;
  }

  absl::StatusOr<std::vector<DeviceLocation>> FetchDevices(
      absl::Span<const DeviceCacheKey> devices) const {
    v1::ResolveDevicesRequest request;
    request.mutable_devices()->Reserve(static_cast<int>(devices.size()));
    for (const auto& [tenant_id, device_id] : devices) {
      v1::DeviceKey* key = request.add_devices();
      key->set_tenant_id(tenant_id);
      key->set_device_id(device_id);
    }
    v1::ResolveDevicesResponse response;
    grpc::ClientContext context;
    SetDeadline(context);
    const grpc::Status rpc_status = stub_->ResolveDevices(&context, request, &response);
    if (!rpc_status.ok()) return RoutingCallError("ResolveDevices", rpc_status);

    if (static_cast<size_t>(response.devices_size()) != devices.size()) {
      return absl::InternalError(absl::StrCat("routing ResolveDevices answered ",
                                              response.devices_size(), " devices for ",
                                              devices.size(), " asked"));
    }
    std::vector<DeviceLocation> locations;
    locations.reserve(devices.size());
    for (size_t i = 0; i < devices.size(); ++i) {
      const v1::ResolvedDevice& d = response.devices(static_cast<int>(i));
      if (d.tenant_id() != devices[i].first || d.device_id() != devices[i].second) {
        return absl::InternalError(absl::StrCat(
            "routing ResolveDevices answered another device at position ", i));
      }
      locations.push_back(DeviceLocation{.tenant_id = d.tenant_id(),
                                         .device_id = d.device_id(),
                                         .found = d.found(),
                                         .patient_id = d.patient_id(),
                                         .region_id = d.region_id(),
                                         .tenant_active = d.tenant_active(),
                                         .assigned_at = d.has_assigned_at()
                                                            ? absl::FromUnixSeconds(d.assigned_at().seconds()) +
                                                                  absl::Nanoseconds(d.assigned_at().nanos())
                                                            : absl::InfinitePast()});
    }
    return locations;
  }

  RoutingClientOptions options_;
  const std::unique_ptr<v1::TenantRouting::Stub> stub_;
  TtlPolicy patient_ttl_{options_.patient_ttl, options_.negative_ttl};
  TtlPolicy device_ttl_{options_.device_ttl, options_.negative_ttl};
  GuardedCache<std::string, PatientLocation> patients_;
  GuardedCache<DeviceCacheKey, DeviceLocation> devices_;
  std::function<void()> on_due_;  // set with refresh_ahead
  absl::Mutex refresh_mu_;
  bool refresh_wanted_ ABSL_GUARDED_BY(refresh_mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(refresh_mu_) = false;
  std::thread refresher_;  // last: started after everything it uses
};

}  // namespace

absl::Status RoutingCallError(absl::string_view method, const grpc::Status& rpc_status) {
  const absl::Status status = FromGrpcStatus(rpc_status);
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kResourceExhausted:
      return absl::Status(status.code(), absl::StrCat("routing ", method, ": ", status.message()));
    default:
      break;
  }
  static log::Throttle throttle(absl::Seconds(1));
  if (uint64_t held_back = 0; throttle.Allow(absl::Now(), held_back)) {
    log::Warning("routing_call_failed", {{"method", method},
                                         {"code", absl::StatusCodeToString(status.code())},
                                         {"error", status.message()},
                                         {"similar_failures_not_logged", held_back}});
  }
  return absl::Status(status.code(), absl::StrCat("routing ", method, " failed (",
                                                  absl::StatusCodeToString(status.code()),
                                                  "); retry"));
}

std::unique_ptr<RoutingClient> NewRoutingClient(std::shared_ptr<grpc::Channel> channel,
                                                RoutingClientOptions options) {
  return std::make_unique<GrpcRoutingClient>(std::move(channel), std::move(options));
}

}  // namespace medgate
