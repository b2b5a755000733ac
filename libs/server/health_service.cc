#include "libs/server/health_service.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "libs/identity/principal.h"

namespace medgate {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call. Its writes and its Finish are started with no lock held (gRPC may run a
// reaction, even OnDone, on the thread that starts one); the service's notifications hold a
// reference, so the reactor outlives OnDone until the last of them has returned. A refused watch
// is never registered: it finishes, and OnDone deletes it.
class HealthService::WatchReactor final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  // `status` is the first answer: the server's, or SERVICE_UNKNOWN for a name it does not know
  // (which no later change concerns). A non-OK `refusal` ends the call at once.
  WatchReactor(HealthService* service, std::string caller, Status status, bool known)
      : service_(service), caller_(std::move(caller)), known_(known), latest_(status) {}

  // A notification's reference: taken while the service's lock shows the watch still registered.
  void Ref() {
    std::lock_guard<std::mutex> lock(mu_);
    ++refs_;
  }
  void Unref() {
    bool last = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = --refs_ == 0;
    }
    if (last) delete this;
  }

  // The server's status is now `status`, its change number `change`; with `end`, the watch is to
  // end UNAVAILABLE once it has been told. Notifications may arrive out of order (each is sent
  // after the service's lock is released): an older change than one already taken is ignored.
  void Update(Status status, uint64_t change, bool end) {
    std::unique_lock<std::mutex> lock(mu_);
    if (change <= change_) return;
    change_ = change;
    if (known_) latest_ = status;
    if (end && end_.ok()) end_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                              "the server is shutting down");
    Next(lock);
  }

  // Sends the first answer, the status as of change number `change`.
  void Start(uint64_t change) {
    std::unique_lock<std::mutex> lock(mu_);
    change_ = std::max(change_, change);
    Next(lock);
  }

  // Ends a watch refused at its start, before anything was sent.
  void Refuse(grpc::Status refusal) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      finishing_ = true;
    }
    Finish(std::move(refusal));
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      broken_ = true;
      if (end_.ok()) end_ = grpc::Status(grpc::StatusCode::CANCELLED, "the watch was cancelled");
    }
    Next(lock);
  }

  void OnCancel() override {
    std::unique_lock<std::mutex> lock(mu_);
    broken_ = true;
    if (end_.ok()) end_ = grpc::Status(grpc::StatusCode::CANCELLED, "the watch was cancelled");
    Next(lock);
  }

  void OnDone() override {
    service_->Remove(this);
    Unref();
  }

  const std::string& caller() const { return caller_; }
  bool counted() const { return counted_; }
  void set_counted() { counted_ = true; }

 private:
  // Starts what is due, one operation at a time: the latest status if it was not sent, then the
  // end if one is wanted. Releases `lock` before it calls gRPC.
  void Next(std::unique_lock<std::mutex>& lock) {
    if (writing_ || finishing_) return;
    if (!broken_ && (!sent_any_ || latest_ != sent_)) {
      writing_ = true;
      sent_any_ = true;
      sent_ = latest_;
      response_.set_status(latest_);
      lock.unlock();
      StartWrite(&response_);
      return;
    }
    if (!end_.ok()) {
      finishing_ = true;
      grpc::Status end = end_;
      lock.unlock();
      Finish(end);
    }
  }

  HealthService* const service_;
  const std::string caller_;
  const bool known_;
  bool counted_ = false;  // set under the service's lock

  std::mutex mu_;
  int refs_ = 1;  // gRPC's, given back at OnDone
  uint64_t change_ = 0;  // the latest change of the server's status taken
  Status latest_;
  Status sent_ = HealthCheckResponse::UNKNOWN;
  bool sent_any_ = false;
  bool writing_ = false;
  bool finishing_ = false;
  bool broken_ = false;  // cancelled, or a write failed: nothing more is sent
  grpc::Status end_;     // not OK once the watch is to end
  HealthCheckResponse response_;
};

HealthService::HealthService(std::string trust_domain, int max_watches_per_caller,
                             int max_watches)
    : trust_domain_(std::move(trust_domain)),
      max_watches_per_caller_(max_watches_per_caller),
      max_watches_(max_watches) {}

HealthService::~HealthService() = default;

void HealthService::SetServing(bool serving) {
  std::vector<WatchReactor*> watches;
  Status status;
  uint64_t change = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    status_ = serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
    status = status_;
    change = ++change_;
    for (WatchReactor* watch : watches_) {
      watch->Ref();
      watches.push_back(watch);
    }
  }
  for (WatchReactor* watch : watches) {
    watch->Update(status, change, /*end=*/false);
    watch->Unref();
  }
}

void HealthService::Shutdown() {
  std::vector<WatchReactor*> watches;
  uint64_t change = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    shut_down_ = true;
    status_ = HealthCheckResponse::NOT_SERVING;
    change = ++change_;
    for (WatchReactor* watch : watches_) {
      watch->Ref();
      watches.push_back(watch);
    }
  }
  for (WatchReactor* watch : watches) {
    watch->Update(HealthCheckResponse::NOT_SERVING, change, /*end=*/true);
    watch->Unref();
  }
}

int HealthService::watches() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(watches_.size());
}

int HealthService::watches_of(const std::string& spiffe_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = watches_by_caller_.find(spiffe_id);
  return it == watches_by_caller_.end() ? 0 : it->second;
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!request->service().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                 absl::StrCat("no health status for service '",
                                              request->service(),
                                              "': this server answers for the empty name only")));
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    response->set_status(status_);
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* context, const HealthCheckRequest* request) {
  const bool known = request->service().empty();
  std::string caller;
  grpc::Status refusal;
  absl::StatusOr<Principal> principal =
      PrincipalFromAuthContext(*context->auth_context(), trust_domain_);
  if (!principal.ok()) {
    refusal = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                           std::string(principal.status().message()));
  } else if (principal->IsTenantScoped()) {
    // Load balancers, orchestrators and ops watch; devices and tenants' callers have no need to,
    // and could otherwise fill the server's watches between them.
    refusal = grpc::Status(
        grpc::StatusCode::PERMISSION_DENIED,
        absl::StrCat("Health/Watch is for service and ops identities, not a ",
                     PrincipalKindName(principal->kind), "'s: ask Health/Check"));
  } else {
    caller = principal->spiffe_id;
  }

  WatchReactor* watch = nullptr;
  uint64_t change = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (refusal.ok() && shut_down_) {
      refusal = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    }
    auto of_caller = watches_by_caller_.find(caller);
    const int open = of_caller == watches_by_caller_.end() ? 0 : of_caller->second;
    if (refusal.ok() && open >= max_watches_per_caller_) {
      refusal = grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrCat(caller, " already has ", open, " health watches open, the most one ",
                       "caller may (limits.max_health_watches_per_caller): end one first, ",
                       "or ask Health/Check"));
    } else if (refusal.ok() && static_cast<int>(watches_.size()) >= max_watches_) {
      refusal = grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrCat("this server has ", watches_.size(), " health watches open, the most it ",
                       "keeps (limits.max_health_watches): try again later, or ask ",
                       "Health/Check"));
    }
    const Status first = known ? status_ : HealthCheckResponse::SERVICE_UNKNOWN;
    watch = new WatchReactor(this, caller, first, known);
    if (refusal.ok()) {
      ++watches_by_caller_[caller];
      watch->set_counted();
      watches_.insert(watch);
      change = change_;
    }
  }
  // With no lock held. Until the reactor is returned, gRPC keeps what it starts for later.
  if (refusal.ok()) {
    watch->Start(change);
  } else {
    watch->Refuse(std::move(refusal));
  }
  return watch;
}

void HealthService::Remove(WatchReactor* watch) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!watch->counted()) return;
  watches_.erase(watch);
  auto it = watches_by_caller_.find(watch->caller());
  if (it != watches_by_caller_.end() && --it->second <= 0) watches_by_caller_.erase(it);
}

}  // namespace medgate
