// Tests the routing client's caching, batching, dedup, invalidation, refresh ahead and error
// handling against an in-process fake TenantRouting service that counts the RPCs it receives.
#include "libs/routing_client/routing_client.h"

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "tests/unit/routing_client/wall_clock_step.h"

namespace medgate {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::Each;
using ::testing::Ge;
using ::testing::HasSubstr;
using ::testing::Le;
using ::testing::SizeIs;
using ::testing::UnorderedElementsAre;

using DeviceKeyPair = std::pair<std::string, std::string>;

// A clock the test moves by hand, so expiry is exact and nothing sleeps.
class FakeClock {
 public:
  absl::Time Now() const {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::FromUnixSeconds(1700000000);
};

// TenantRouting with an in-memory directory. Records every Resolve* request it receives and can
// be told to fail, to corrupt its answers, or to run a hook after computing an answer.
class FakeTenantRouting final : public v1::TenantRouting::Service {
 public:
  grpc::Status ResolvePatients(grpc::ServerContext* context,
                               const v1::ResolvePatientsRequest* request,
                               v1::ResolvePatientsResponse* response) override {
    std::function<void(v1::ResolvePatientsResponse&)> tamper;
    std::function<void()> after_answer;
    {
      absl::MutexLock lock(&mu_);
      patient_batches_.emplace_back(request->patient_ids().begin(), request->patient_ids().end());
      RecordDeadline(*context);
      if (grpc::Status failure = NextFailure(); !failure.ok()) return failure;
      for (const std::string& id : request->patient_ids()) {
        auto it = patients_.find(id);
        if (it != patients_.end()) {
          *response->add_patients() = it->second;
        } else {
          response->add_patients()->set_patient_id(id);
        }
      }
      tamper = tamper_patients_;
      after_answer = after_answer_;
    }
    if (tamper) tamper(*response);
    if (after_answer) after_answer();
    return grpc::Status::OK;
  }

  grpc::Status ResolveDevices(grpc::ServerContext* context,
                              const v1::ResolveDevicesRequest* request,
                              v1::ResolveDevicesResponse* response) override {
    std::function<void(v1::ResolveDevicesResponse&)> tamper;
    std::function<void()> after_answer;
    {
      absl::MutexLock lock(&mu_);
      std::vector<DeviceKeyPair>& batch = device_batches_.emplace_back();
      for (const v1::DeviceKey& key : request->devices()) {
        batch.emplace_back(key.tenant_id(), key.device_id());
      }
      RecordDeadline(*context);
      if (grpc::Status failure = NextFailure(); !failure.ok()) return failure;
      for (const v1::DeviceKey& key : request->devices()) {
        auto it = devices_.find(DeviceKeyPair(key.tenant_id(), key.device_id()));
        if (it != devices_.end()) {
          *response->add_devices() = it->second;
        } else {
          v1::ResolvedDevice* device = response->add_devices();
          device->set_tenant_id(key.tenant_id());
          device->set_device_id(key.device_id());
        }
      }
      tamper = tamper_devices_;
      after_answer = after_answer_;
    }
    if (tamper) tamper(*response);
    if (after_answer) after_answer();
    return grpc::Status::OK;
  }

  void PlacePatient(const std::string& id, const std::string& tenant, const std::string& region,
                    const std::string& territory) {
    v1::ResolvedPatient patient;
    patient.set_patient_id(id);
    patient.set_found(true);
    patient.set_tenant_id(tenant);
    patient.set_region_id(region);
    patient.set_territory(territory);
    absl::MutexLock lock(&mu_);
    patients_[id] = std::move(patient);
  }

  void AssignDevice(const std::string& tenant, const std::string& device,
                    const std::string& patient, const std::string& region) {
    v1::ResolvedDevice resolved;
    resolved.set_tenant_id(tenant);
    resolved.set_device_id(device);
    resolved.set_found(true);
    resolved.set_patient_id(patient);
    resolved.set_region_id(region);
    absl::MutexLock lock(&mu_);
    devices_[DeviceKeyPair(tenant, device)] = std::move(resolved);
  }

  void UnassignDevice(const std::string& tenant, const std::string& device) {
    absl::MutexLock lock(&mu_);
    devices_.erase(DeviceKeyPair(tenant, device));
  }

  // After `successes` more successful RPCs, every RPC fails with `status` until StopFailing().
  void FailRpcs(grpc::Status status, int successes = 0) {
    absl::MutexLock lock(&mu_);
    failure_ = std::move(status);
    successes_before_failure_ = successes;
  }
  void StopFailing() { FailRpcs(grpc::Status::OK); }

  void TamperPatients(std::function<void(v1::ResolvePatientsResponse&)> tamper) {
    absl::MutexLock lock(&mu_);
    tamper_patients_ = std::move(tamper);
  }
  void TamperDevices(std::function<void(v1::ResolveDevicesResponse&)> tamper) {
    absl::MutexLock lock(&mu_);
    tamper_devices_ = std::move(tamper);
  }
  // Runs in the handler after the answer is computed and before it is sent.
  void AfterAnswer(std::function<void()> hook) {
    absl::MutexLock lock(&mu_);
    after_answer_ = std::move(hook);
  }

  std::vector<std::vector<std::string>> patient_batches() const {
    absl::MutexLock lock(&mu_);
    return patient_batches_;
  }
  std::vector<std::vector<DeviceKeyPair>> device_batches() const {
    absl::MutexLock lock(&mu_);
    return device_batches_;
  }
  size_t patient_rpcs() const { return patient_batches().size(); }
  size_t device_rpcs() const { return device_batches().size(); }
  // Per RPC, how far its deadline was when it arrived (InfiniteDuration: no deadline).
  std::vector<absl::Duration> deadlines() const {
    absl::MutexLock lock(&mu_);
    return deadlines_;
  }

 private:
  void RecordDeadline(const grpc::ServerContext& context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const auto deadline = context.deadline();
    deadlines_.push_back(deadline == std::chrono::system_clock::time_point::max()
                             ? absl::InfiniteDuration()
                             : absl::FromChrono(deadline) - absl::Now());
  }

  grpc::Status NextFailure() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (failure_.ok()) return grpc::Status::OK;
    if (successes_before_failure_ > 0) {
      --successes_before_failure_;
      return grpc::Status::OK;
    }
    return failure_;
  }

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, v1::ResolvedPatient> patients_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<DeviceKeyPair, v1::ResolvedDevice> devices_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<std::string>> patient_batches_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<DeviceKeyPair>> device_batches_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::Duration> deadlines_ ABSL_GUARDED_BY(mu_);
  grpc::Status failure_ ABSL_GUARDED_BY(mu_);
  int successes_before_failure_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void(v1::ResolvePatientsResponse&)> tamper_patients_ ABSL_GUARDED_BY(mu_);
  std::function<void(v1::ResolveDevicesResponse&)> tamper_devices_ ABSL_GUARDED_BY(mu_);
  std::function<void()> after_answer_ ABSL_GUARDED_BY(mu_);
};

std::string Describe(const PatientLocation& p) {
  if (!p.found) return absl::StrCat(p.patient_id, " missing");
  return absl::StrCat(p.patient_id, " ", p.tenant_id, "/", p.region_id, "/", p.territory);
}

std::string Describe(const DeviceLocation& d) {
  if (!d.found) return absl::StrCat(d.tenant_id, "/", d.device_id, " missing");
  return absl::StrCat(d.tenant_id, "/", d.device_id, " ", d.patient_id, "@", d.region_id);
}

std::unique_ptr<grpc::Server> StartServer(grpc::Service* service, int* port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  builder.RegisterService(service);
  return builder.BuildAndStart();
}

class RoutingClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int port = 0;
    server_ = StartServer(&fake_, &port);
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(port, 0);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials());
    options_.clock = [this] { return clock_.Now(); };

    fake_.PlacePatient("p1", "t1", "fr-1", "FR");
    fake_.PlacePatient("p2", "t1", "de-1", "DE");
    fake_.PlacePatient("p3", "t2", "eu-1", "BE");
    fake_.AssignDevice("t1", "d1", "p1", "fr-1");
    fake_.AssignDevice("t2", "d1", "p3", "eu-1");
  }

  void TearDown() override {
    ResetWallClock();
    if (!release_.HasBeenNotified()) release_.Notify();
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  }

  // Made on first use so a test can set options_ first.
  RoutingClient& client() {
    if (client_ == nullptr) client_ = NewRoutingClient(channel_, options_);
    return *client_;
  }

  std::vector<std::string> Patients(const std::vector<std::string>& ids) {
    absl::StatusOr<std::vector<PatientLocation>> answers = client().ResolvePatients(ids);
    if (!answers.ok()) {
      ADD_FAILURE() << answers.status();
      return {};
    }
    std::vector<std::string> described;
    for (const PatientLocation& p : *answers) described.push_back(Describe(p));
    return described;
  }

  std::vector<std::string> Devices(const std::vector<DeviceRef>& devices) {
    absl::StatusOr<std::vector<DeviceLocation>> answers = client().ResolveDevices(devices);
    if (!answers.ok()) {
      ADD_FAILURE() << answers.status();
      return {};
    }
    std::vector<std::string> described;
    for (const DeviceLocation& d : *answers) described.push_back(Describe(d));
    return described;
  }

  FakeClock clock_;
  absl::Notification release_;  // lets a handler blocked by a test return
  FakeTenantRouting fake_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  RoutingClientOptions options_;
  std::unique_ptr<RoutingClient> client_;
};

std::vector<std::string> ManyIds(int n) {
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) ids.push_back(absl::StrCat("p-", i));
  return ids;
}

// --- patients ---------------------------------------------------------------------------------

TEST_F(RoutingClientTest, ResolvesPatientsInRequestOrder) {
  EXPECT_THAT(Patients({"p2", "nobody", "p1"}),
              ElementsAre("p2 t1/de-1/DE", "nobody missing", "p1 t1/fr-1/FR"));
  EXPECT_EQ(fake_.patient_rpcs(), 1u);
}

TEST_F(RoutingClientTest, EmptyRequestMakesNoRpc) {
  EXPECT_THAT(Patients({}), SizeIs(0));
  EXPECT_THAT(Devices({}), SizeIs(0));
  EXPECT_EQ(fake_.patient_rpcs(), 0u);
  EXPECT_EQ(fake_.device_rpcs(), 0u);
}

TEST_F(RoutingClientTest, SecondLookupIsServedFromCache) {
  const std::vector<std::string> first = Patients({"p1", "p2", "nobody"});
  ASSERT_EQ(fake_.patient_rpcs(), 1u);
  EXPECT_EQ(Patients({"p1", "p2", "nobody"}), first);
  EXPECT_THAT(Patients({"nobody", "p2"}), ElementsAre("nobody missing", "p2 t1/de-1/DE"));
  EXPECT_EQ(fake_.patient_rpcs(), 1u);
}

TEST_F(RoutingClientTest, AsksRoutingOnlyForMisses) {
  Patients({"p1"});
  EXPECT_THAT(Patients({"p1", "p2", "p3"}),
              ElementsAre("p1 t1/fr-1/FR", "p2 t1/de-1/DE", "p3 t2/eu-1/BE"));
  EXPECT_THAT(fake_.patient_batches(), ElementsAre(ElementsAre("p1"), ElementsAre("p2", "p3")));
}

TEST_F(RoutingClientTest, DeduplicatesIdsWithinACall) {
  EXPECT_THAT(Patients({"p1", "p2", "p1", "nobody", "p1", "nobody"}),
              ElementsAre("p1 t1/fr-1/FR", "p2 t1/de-1/DE", "p1 t1/fr-1/FR", "nobody missing",
                          "p1 t1/fr-1/FR", "nobody missing"));
  EXPECT_THAT(fake_.patient_batches(), ElementsAre(ElementsAre("p1", "p2", "nobody")));
}

TEST_F(RoutingClientTest, SplitsMissesIntoBatchesOfMaxBatch) {
  options_.max_batch = 1000;
  const std::vector<std::string> ids = ManyIds(2500);
  for (int i = 0; i < 2500; i += 7) fake_.PlacePatient(ids[i], "t1", "fr-1", "FR");

  absl::StatusOr<std::vector<PatientLocation>> answers = client().ResolvePatients(ids);
  ASSERT_TRUE(answers.ok()) << answers.status();
  ASSERT_EQ(answers->size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ((*answers)[i].patient_id, ids[i]);
    EXPECT_EQ((*answers)[i].found, i % 7 == 0) << ids[i];
  }
  const std::vector<std::vector<std::string>> batches = fake_.patient_batches();
  ASSERT_THAT(batches, SizeIs(3));
  EXPECT_THAT(batches[0], SizeIs(1000));
  EXPECT_THAT(batches[1], SizeIs(1000));
  EXPECT_THAT(batches[2], SizeIs(500));
  EXPECT_EQ(batches[1].front(), "p-1000");

  ASSERT_TRUE(client().ResolvePatients(ids).ok());
  EXPECT_EQ(fake_.patient_rpcs(), 3u);
}

TEST_F(RoutingClientTest, BatchesCountDistinctIds) {
  options_.max_batch = 2;
  EXPECT_THAT(Patients({"p1", "p1", "p2", "p2", "p3"}), SizeIs(5));
  EXPECT_THAT(fake_.patient_batches(), ElementsAre(ElementsAre("p1", "p2"), ElementsAre("p3")));
}

TEST_F(RoutingClientTest, ZeroMaxBatchMeansOneIdPerRpc) {
  options_.max_batch = 0;
  EXPECT_THAT(Patients({"p1", "p2"}), SizeIs(2));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, MaxBatchAboveTheApiLimitIsCapped) {
  options_.max_batch = 5000;  // routing refuses more than 1000 ids per request
  ASSERT_TRUE(client().ResolvePatients(ManyIds(2500)).ok());
  const std::vector<std::vector<std::string>> batches = fake_.patient_batches();
  ASSERT_THAT(batches, SizeIs(3));
  EXPECT_THAT(batches[0], SizeIs(1000));
}

TEST_F(RoutingClientTest, FoundAnswerExpiresAfterPatientTtl) {
  options_.patient_ttl = absl::Minutes(5);
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/fr-1/FR"));
  fake_.PlacePatient("p1", "t1", "de-1", "DE");  // moved by ops

  clock_.Advance(absl::Minutes(5) - absl::Milliseconds(1));
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/fr-1/FR"));
  EXPECT_EQ(fake_.patient_rpcs(), 1u);

  clock_.Advance(absl::Milliseconds(1));
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/de-1/DE"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, NotFoundAnswerIsCachedForNegativeTtlOnly) {
  options_.negative_ttl = absl::Seconds(2);
  options_.patient_ttl = absl::Minutes(5);
  EXPECT_THAT(Patients({"p9"}), ElementsAre("p9 missing"));
  fake_.PlacePatient("p9", "t1", "fr-1", "FR");

  clock_.Advance(absl::Seconds(2) - absl::Milliseconds(1));
  EXPECT_THAT(Patients({"p9"}), ElementsAre("p9 missing"));
  EXPECT_EQ(fake_.patient_rpcs(), 1u);

  clock_.Advance(absl::Milliseconds(1));
  EXPECT_THAT(Patients({"p9"}), ElementsAre("p9 t1/fr-1/FR"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, InvalidatePatientRefetchesOnlyThatPatient) {
  Patients({"p1", "p2"});
  fake_.PlacePatient("p1", "t1", "de-1", "DE");
  client().InvalidatePatient("p1");
  EXPECT_THAT(Patients({"p1", "p2"}), ElementsAre("p1 t1/de-1/DE", "p2 t1/de-1/DE"));
  EXPECT_THAT(fake_.patient_batches(), ElementsAre(ElementsAre("p1", "p2"), ElementsAre("p1")));
}

TEST_F(RoutingClientTest, InvalidateAllRefetchesPatientsAndDevices) {
  Patients({"p1", "p2"});
  Devices({{"t1", "d1"}});
  client().InvalidateAll();
  Patients({"p1", "p2"});
  Devices({{"t1", "d1"}});
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

TEST_F(RoutingClientTest, InvalidationDuringAnRpcIsNotUndoneByItsAnswer) {
  // The answer in flight predates the move; caching it would hide the move for patient_ttl.
  fake_.AfterAnswer([this] {
    fake_.AfterAnswer(nullptr);
    fake_.PlacePatient("p1", "t1", "de-1", "DE");
    client().InvalidatePatient("p1");
  });
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/fr-1/FR"));
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/de-1/DE"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, LeastRecentlyUsedPatientsAreEvictedBeyondCapacity) {
  options_.max_cached_patients = 2;
  Patients({"p1"});
  Patients({"p2"});
  Patients({"p3"});  // evicts p1
  Patients({"p2", "p3"});
  EXPECT_EQ(fake_.patient_rpcs(), 3u);
  Patients({"p1"});
  EXPECT_THAT(fake_.patient_batches().back(), ElementsAre("p1"));
  EXPECT_EQ(fake_.patient_rpcs(), 4u);
}

// A failure of the call itself keeps its code; what gRPC or routing said of it (addresses of the
// network behind the service) is logged, not passed on.
TEST_F(RoutingClientTest, RpcErrorIsReturnedAndNothingIsCached) {
  fake_.FailRpcs(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                              "failed to connect to all addresses; last error: ipv4:10.0.0.5:7001"));
  absl::StatusOr<std::vector<PatientLocation>> answers =
      client().ResolvePatients(std::vector<std::string>{"p1", "nobody"});
  EXPECT_EQ(answers.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(answers.status().message(), "routing ResolvePatients failed (UNAVAILABLE); retry");

  fake_.StopFailing();
  EXPECT_THAT(Patients({"p1", "nobody"}), ElementsAre("p1 t1/fr-1/FR", "nobody missing"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

// Routing's answers about the request itself are passed on as they came.
TEST_F(RoutingClientTest, RpcStatusCodeIsKept) {
  fake_.FailRpcs(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "not a service identity"));
  EXPECT_EQ(client().ResolvePatients(std::vector<std::string>{"p1"}).status(),
            absl::PermissionDeniedError("routing ResolvePatients: not a service identity"));
  EXPECT_EQ(client().ResolveDevices(std::vector<DeviceRef>{{"t1", "d1"}}).status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(RoutingClientTest, FailureOfALaterBatchCachesNothingFromEarlierOnes) {
  options_.max_batch = 2;
  fake_.FailRpcs(grpc::Status(grpc::StatusCode::UNAVAILABLE, "flaky"), /*successes=*/1);
  EXPECT_EQ(client().ResolvePatients(std::vector<std::string>{"p1", "p2", "p3"}).status().code(),
            absl::StatusCode::kUnavailable);

  fake_.StopFailing();
  Patients({"p1", "p2", "p3"});
  EXPECT_THAT(fake_.patient_batches(),
              ElementsAre(ElementsAre("p1", "p2"), ElementsAre("p3"), ElementsAre("p1", "p2"),
                          ElementsAre("p3")));
}

TEST_F(RoutingClientTest, ShortResponseIsInternalAndNotCached) {
  fake_.TamperPatients([](v1::ResolvePatientsResponse& r) { r.mutable_patients()->RemoveLast(); });
  const absl::Status status =
      client().ResolvePatients(std::vector<std::string>{"p1", "p2"}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(status.message(), HasSubstr("1 patients for 2 asked"));

  fake_.TamperPatients(nullptr);
  EXPECT_THAT(Patients({"p1", "p2"}), ElementsAre("p1 t1/fr-1/FR", "p2 t1/de-1/DE"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, LongResponseIsInternal) {
  fake_.TamperPatients(
      [](v1::ResolvePatientsResponse& r) { r.add_patients()->set_patient_id("p9"); });
  EXPECT_EQ(client().ResolvePatients(std::vector<std::string>{"p1"}).status().code(),
            absl::StatusCode::kInternal);
}

TEST_F(RoutingClientTest, ReorderedResponseIsInternalAndNotCached) {
  fake_.TamperPatients(
      [](v1::ResolvePatientsResponse& r) { r.mutable_patients()->SwapElements(0, 1); });
  EXPECT_EQ(client().ResolvePatients(std::vector<std::string>{"p1", "p2"}).status().code(),
            absl::StatusCode::kInternal);

  fake_.TamperPatients(nullptr);
  Patients({"p1", "p2"});
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RoutingClientTest, EveryRpcHasTheConfiguredDeadline) {
  options_.rpc_deadline = absl::Seconds(30);
  options_.max_batch = 1;
  Patients({"p1", "p2"});
  Devices({{"t1", "d1"}});
  const std::vector<absl::Duration> deadlines = fake_.deadlines();
  ASSERT_THAT(deadlines, SizeIs(3));
  // Set, and as configured (not the 2 s default): the grpc-timeout header rounds up (here by
  // ~0.1 s), and the time in flight is spent, hence the slack both ways.
  EXPECT_THAT(deadlines, Each(AllOf(Ge(absl::Seconds(20)), Le(absl::Seconds(31)))));
}

TEST_F(RoutingClientTest, SlowRoutingIsDeadlineExceeded) {
  options_.rpc_deadline = absl::Milliseconds(20);
  // Blocks the handler until the test ends: the answer can only arrive after the deadline.
  fake_.AfterAnswer([this] { release_.WaitForNotificationWithTimeout(absl::Seconds(30)); });
  EXPECT_EQ(client().ResolvePatients(std::vector<std::string>{"p1"}).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(RoutingClientUnreachableTest, UnreachableRoutingIsUnavailable) {
  FakeTenantRouting fake;
  int port = 0;
  std::unique_ptr<grpc::Server> server = StartServer(&fake, &port);
  ASSERT_NE(server, nullptr);
  server->Shutdown();
  server->Wait();

  std::unique_ptr<RoutingClient> client = NewRoutingClient(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(client->ResolvePatients(std::vector<std::string>{"p1"}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(client->ResolveDevices(std::vector<DeviceRef>{{"t1", "d1"}}).status().code(),
            absl::StatusCode::kUnavailable);
}

// --- devices ----------------------------------------------------------------------------------

TEST_F(RoutingClientTest, ResolvesDevicesInRequestOrderAndCachesThem) {
  const std::vector<DeviceRef> devices = {{"t2", "d1"}, {"t1", "d9"}, {"t1", "d1"}};
  EXPECT_THAT(Devices(devices), ElementsAre("t2/d1 p3@eu-1", "t1/d9 missing", "t1/d1 p1@fr-1"));
  EXPECT_THAT(Devices(devices), ElementsAre("t2/d1 p3@eu-1", "t1/d9 missing", "t1/d1 p1@fr-1"));
  EXPECT_EQ(fake_.device_rpcs(), 1u);
}

TEST_F(RoutingClientTest, CachedDevicesAnswersFromTheCacheOrNotAtAllAndNeverAsksRouting) {
  auto cached = [&](const std::vector<DeviceRef>& devices) -> std::vector<std::string> {
    std::optional<std::vector<DeviceLocation>> answers = client().CachedDevices(devices);
    if (!answers) return {"nothing"};
    std::vector<std::string> described;
    for (const DeviceLocation& d : *answers) described.push_back(Describe(d));
    return described;
  };
  options_.device_ttl = absl::Seconds(5);
  EXPECT_THAT(cached({{"t1", "d1"}}), ElementsAre("nothing"));
  EXPECT_EQ(fake_.device_rpcs(), 0u);
  Devices({{"t1", "d1"}, {"t1", "d9"}});  // t1/d9 is cached as not found
  EXPECT_THAT(cached({{"t1", "d1"}, {"t1", "d9"}}), ElementsAre("t1/d1 p1@fr-1", "t1/d9 missing"));
  // One device not cached: no answer for any, and still no RPC.
  EXPECT_THAT(cached({{"t1", "d1"}, {"t2", "d1"}}), ElementsAre("nothing"));
  EXPECT_EQ(fake_.device_rpcs(), 1u);
  // Past its TTL an answer is not used.
  clock_.Advance(absl::Seconds(5));
  EXPECT_THAT(cached({{"t1", "d1"}}), ElementsAre("nothing"));
  EXPECT_EQ(fake_.device_rpcs(), 1u);
}

// An answer that took long to come is used at most a TTL after it was asked for: routing may
// have read it any time after the request left.
TEST_F(RoutingClientTest, AnAnswerExpiresATtlAfterItWasAskedForNotAfterItCame) {
  options_.device_ttl = absl::Seconds(5);
  fake_.AfterAnswer([this] { clock_.Advance(absl::Milliseconds(1500)); });
  Devices({{"t1", "d1"}});
  fake_.AfterAnswer(nullptr);
  // 1.5 s passed during the RPC: 3.5 s of the TTL are left.
  clock_.Advance(absl::Milliseconds(3400));
  std::optional<std::vector<DeviceLocation>> cached = client().CachedDevices({{"t1", "d1"}});
  ASSERT_TRUE(cached.has_value());
  clock_.Advance(absl::Milliseconds(100));
  EXPECT_FALSE(client().CachedDevices({{"t1", "d1"}}).has_value());
  EXPECT_EQ(fake_.device_rpcs(), 1u);
}

TEST_F(RoutingClientTest, DeduplicatesDevicesPerTenant) {
  EXPECT_THAT(Devices({{"t1", "d1"}, {"t2", "d1"}, {"t1", "d1"}}),
              ElementsAre("t1/d1 p1@fr-1", "t2/d1 p3@eu-1", "t1/d1 p1@fr-1"));
  EXPECT_THAT(fake_.device_batches(),
              ElementsAre(ElementsAre(DeviceKeyPair("t1", "d1"), DeviceKeyPair("t2", "d1"))));
}

TEST_F(RoutingClientTest, SplitsDeviceMissesIntoBatches) {
  options_.max_batch = 2;
  Devices({{"t1", "a"}, {"t1", "b"}, {"t1", "c"}, {"t1", "d"}, {"t1", "e"}});
  const std::vector<std::vector<DeviceKeyPair>> batches = fake_.device_batches();
  ASSERT_THAT(batches, SizeIs(3));
  EXPECT_THAT(batches[2], ElementsAre(DeviceKeyPair("t1", "e")));
}

TEST_F(RoutingClientTest, UnassignedDeviceResolvesUntilDeviceTtl) {
  options_.device_ttl = absl::Seconds(5);
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  fake_.UnassignDevice("t1", "d1");

  clock_.Advance(absl::Seconds(5) - absl::Milliseconds(1));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  clock_.Advance(absl::Milliseconds(1));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 missing"));
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

// The host clock stepped back (by NTP, by an operator) must not keep an unassigned device's old
// patient past the TTL: expiry is timed on a clock that the step does not move.
TEST_F(RoutingClientTest, AWallClockSteppedBackDoesNotExtendAnAnswer) {
  options_.clock = RoutingClientOptions{}.clock;
  options_.device_ttl = absl::Milliseconds(200);
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  fake_.UnassignDevice("t1", "d1");
  ASSERT_TRUE(StepWallClock(-absl::Hours(1)));
  // Waits for the unassignment, far longer than the TTL but far shorter than the step (on the
  // steady clock: test_support::PollUntil's deadline is on the wall clock, stepped here).
  std::vector<std::string> answer;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  do {
    answer = Devices({{"t1", "d1"}});
    if (answer != std::vector<std::string>{"t1/d1 p1@fr-1"}) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_THAT(answer, ElementsAre("t1/d1 missing"));
}

TEST_F(RoutingClientTest, UnknownDeviceIsCachedForNegativeTtl) {
  options_.negative_ttl = absl::Seconds(2);
  EXPECT_THAT(Devices({{"t1", "d7"}}), ElementsAre("t1/d7 missing"));
  fake_.AssignDevice("t1", "d7", "p2", "de-1");
  clock_.Advance(absl::Seconds(1));
  EXPECT_THAT(Devices({{"t1", "d7"}}), ElementsAre("t1/d7 missing"));
  clock_.Advance(absl::Seconds(1));
  EXPECT_THAT(Devices({{"t1", "d7"}}), ElementsAre("t1/d7 p2@de-1"));
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

TEST_F(RoutingClientTest, InvalidateDeviceRefetchesOnlyThatDevice) {
  Devices({{"t1", "d1"}, {"t2", "d1"}});
  fake_.UnassignDevice("t1", "d1");
  client().InvalidateDevice("t1", "d1");
  EXPECT_THAT(Devices({{"t1", "d1"}, {"t2", "d1"}}), ElementsAre("t1/d1 missing", "t2/d1 p3@eu-1"));
  EXPECT_THAT(fake_.device_batches().back(), ElementsAre(DeviceKeyPair("t1", "d1")));
}

TEST_F(RoutingClientTest, DeviceAnswerForAnotherTenantIsInternal) {
  fake_.TamperDevices(
      [](v1::ResolveDevicesResponse& r) { r.mutable_devices(0)->set_tenant_id("t2"); });
  EXPECT_EQ(client().ResolveDevices(std::vector<DeviceRef>{{"t1", "d1"}}).status().code(),
            absl::StatusCode::kInternal);
  fake_.TamperDevices(nullptr);
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
}

TEST_F(RoutingClientTest, DeviceRpcErrorCachesNothing) {
  fake_.FailRpcs(grpc::Status(grpc::StatusCode::UNAVAILABLE, "down"));
  EXPECT_EQ(client().ResolveDevices(std::vector<DeviceRef>{{"t1", "d1"}}).status().code(),
            absl::StatusCode::kUnavailable);
  fake_.StopFailing();
  Devices({{"t1", "d1"}});
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

// --- refresh ahead ----------------------------------------------------------------------------

// Waits, in real time and up to 10 s, until `done` holds: the refresher runs on its own thread.
bool Eventually(const std::function<bool()>& done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return true;
}

class RefreshAheadTest : public RoutingClientTest {
 protected:
  void SetUp() override {
    RoutingClientTest::SetUp();
    options_.refresh_ahead = true;
    options_.device_ttl = absl::Seconds(30);
    options_.refresh_gather = absl::Milliseconds(1);
  }
  bool DeviceIs(const DeviceRef& device, const std::string& described) {
    return Devices({device}) == std::vector<std::string>{described};
  }
};

TEST_F(RefreshAheadTest, ADeviceInSteadyUseIsFetchedAgainBeforeItsAnswerExpires) {
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  fake_.AssignDevice("t1", "d1", "p2", "de-1");  // reassigned by its tenant

  // In the second half of its TTL a hit still answers from the cache, and has it fetched again.
  clock_.Advance(absl::Seconds(20));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  ASSERT_TRUE(Eventually([&] { return DeviceIs({"t1", "d1"}, "t1/d1 p2@de-1"); }));
  EXPECT_EQ(fake_.device_rpcs(), 2u);

  // Past the first answer's expiry the refreshed one (fetched at +20 s) answers: no miss.
  clock_.Advance(absl::Seconds(12));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p2@de-1"));
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

TEST_F(RefreshAheadTest, OnlyAnswersUsedInTheSecondHalfOfTheirTtlAreFetchedAgain) {
  Devices({{"t1", "d1"}});
  clock_.Advance(absl::Seconds(10));
  Devices({{"t2", "d1"}});
  // t1/d1 is used only before half its TTL, t2/d1 after.
  clock_.Advance(absl::Seconds(5) - absl::Milliseconds(1));
  Devices({{"t1", "d1"}});
  clock_.Advance(absl::Seconds(10) + absl::Milliseconds(1));
  Devices({{"t2", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 3; }));
  // Had t1/d1 been queued, it would have gone in this batch or an earlier one.
  EXPECT_THAT(fake_.device_batches()[2], ElementsAre(DeviceKeyPair("t2", "d1")));

  // t1/d1 expires at its TTL as before, and its next use fetches it.
  clock_.Advance(absl::Seconds(5));
  EXPECT_THAT(Devices({{"t1", "d1"}, {"t2", "d1"}}), ElementsAre("t1/d1 p1@fr-1", "t2/d1 p3@eu-1"));
  EXPECT_EQ(fake_.device_rpcs(), 4u);
  EXPECT_THAT(fake_.device_batches()[3], ElementsAre(DeviceKeyPair("t1", "d1")));
}

TEST_F(RefreshAheadTest, DueAnswersAreFetchedTogether) {
  options_.refresh_gather = absl::Seconds(1);  // wide enough for a loaded machine
  fake_.AssignDevice("t1", "d2", "p1", "fr-1");
  Devices({{"t1", "d1"}, {"t1", "d2"}, {"t2", "d1"}});
  clock_.Advance(absl::Seconds(15));
  // Three lookups, as three streams would make them.
  Devices({{"t1", "d1"}});
  Devices({{"t1", "d2"}});
  Devices({{"t2", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  EXPECT_THAT(fake_.device_batches()[1],
              UnorderedElementsAre(DeviceKeyPair("t1", "d1"), DeviceKeyPair("t1", "d2"),
                                   DeviceKeyPair("t2", "d1")));
}

TEST_F(RefreshAheadTest, ARefreshAnswerPredatingAnInvalidationIsNotCached) {
  Devices({{"t1", "d1"}, {"t2", "d1"}});
  fake_.AfterAnswer([this] {
    fake_.AfterAnswer(nullptr);
    fake_.AssignDevice("t1", "d1", "p2", "de-1");
    client().InvalidateDevice("t1", "d1");
  });
  clock_.Advance(absl::Seconds(15));
  Devices({{"t1", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  // The refresher works one round at a time: once t2/d1's refresh is asked for, the round that
  // fetched t1/d1 is over.
  Devices({{"t2", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 3; }));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p2@de-1"));
  EXPECT_EQ(fake_.device_rpcs(), 4u);
}

TEST_F(RefreshAheadTest, AFailedRefreshNeverExtendsAnAnswer) {
  Devices({{"t1", "d1"}});
  fake_.FailRpcs(grpc::Status(grpc::StatusCode::UNAVAILABLE, "down"));
  clock_.Advance(absl::Seconds(15));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  clock_.Advance(absl::Seconds(15));
  EXPECT_EQ(client().ResolveDevices(std::vector<DeviceRef>{{"t1", "d1"}}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_.device_rpcs(), 3u);
}

TEST_F(RefreshAheadTest, PatientsInSteadyUseAreFetchedAgainToo) {
  options_.patient_ttl = absl::Minutes(5);
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/fr-1/FR"));
  fake_.PlacePatient("p1", "t1", "de-1", "DE");  // moved by ops
  clock_.Advance(absl::Minutes(3));
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/fr-1/FR"));
  ASSERT_TRUE(Eventually(
      [&] { return Patients({"p1"}) == std::vector<std::string>{"p1 t1/de-1/DE"}; }));
  // Refreshed at +3 min: it answers past the first answer's expiry, before its own refresh point.
  clock_.Advance(absl::Minutes(2));
  EXPECT_THAT(Patients({"p1"}), ElementsAre("p1 t1/de-1/DE"));
  EXPECT_EQ(fake_.patient_rpcs(), 2u);
}

TEST_F(RefreshAheadTest, PrefetchedDevicesAreFetchedTogetherThenAnsweredFromTheCache) {
  options_.refresh_gather = absl::Seconds(1);  // wide enough for a loaded machine
  fake_.AssignDevice("t1", "d2", "p1", "fr-1");
  // Three streams open, each prefetching its device; one device's stream opens twice.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d1"}});
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d2"}});
  client().PrefetchDevices(std::vector<DeviceRef>{{"t2", "d1"}});
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 1; }));
  EXPECT_THAT(fake_.device_batches()[0],
              UnorderedElementsAre(DeviceKeyPair("t1", "d1"), DeviceKeyPair("t1", "d2"),
                                   DeviceKeyPair("t2", "d1")));
  // The answers are cached once the RPC has returned. The fetcher works one round at a time:
  // once a later prefetch reaches routing, the round that fetched these is over.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d9"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  // The first batch of each stream finds its device cached.
  EXPECT_THAT(Devices({{"t1", "d1"}, {"t1", "d2"}, {"t2", "d1"}}),
              ElementsAre("t1/d1 p1@fr-1", "t1/d2 p1@fr-1", "t2/d1 p3@eu-1"));
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

TEST_F(RefreshAheadTest, ACachedDeviceIsNotPrefetched) {
  Devices({{"t1", "d1"}});
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d1"}, {"t2", "d1"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  EXPECT_THAT(fake_.device_batches()[1], ElementsAre(DeviceKeyPair("t2", "d1")));
}

TEST_F(RefreshAheadTest, TheFetchersQueueIsBoundedByTheCacheAndSentInRpcsOfMaxBatch) {
  options_.max_cached_devices = 2;
  options_.max_batch = 1;
  options_.refresh_gather = absl::Seconds(1);  // wide enough for a loaded machine
  // Three devices for a queue of two: the third is not queued, and is fetched when it is used.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d1"}, {"t2", "d1"}, {"t1", "d2"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  // A later round shows that the fetcher had nothing more.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d9"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() >= 3; }));
  EXPECT_THAT(fake_.device_batches(), ElementsAre(ElementsAre(DeviceKeyPair("t1", "d1")),
                                                  ElementsAre(DeviceKeyPair("t2", "d1")),
                                                  ElementsAre(DeviceKeyPair("t1", "d9"))));
}

TEST_F(RefreshAheadTest, ACachedOnlyHitDueForARefreshIsFetchedAgainToo) {
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  fake_.AssignDevice("t1", "d1", "p2", "de-1");
  clock_.Advance(absl::Seconds(20));
  std::optional<std::vector<DeviceLocation>> cached = client().CachedDevices({{"t1", "d1"}});
  ASSERT_TRUE(cached.has_value());
  EXPECT_EQ(Describe((*cached)[0]), "t1/d1 p1@fr-1");
  ASSERT_TRUE(Eventually([&] { return DeviceIs({"t1", "d1"}, "t1/d1 p2@de-1"); }));
  EXPECT_EQ(fake_.device_rpcs(), 2u);
}

// A hit due for a refresh is not queued when the fetcher's queue is full either: its answer then
// expires at its TTL, and its next use fetches it.
TEST_F(RefreshAheadTest, ADueHitFindingTheQueueFullIsFetchedWhenItIsNextUsedAfterItsTtl) {
  options_.max_cached_devices = 3;  // t1/d1, t1/d2 and t1/d9 all stay cached: nothing is evicted
  options_.refresh_gather = absl::Seconds(1);  // wide enough for a loaded machine
  fake_.AssignDevice("t1", "d2", "p1", "fr-1");
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  clock_.Advance(absl::Seconds(20));  // t1/d1 is in the second half of its TTL
  // Three streams of t1/d2 open and fill the queue (as many keys as the cache holds); then t1/d1
  // is used, due for a refresh, while the fetcher is still gathering.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d2"}, {"t1", "d2"}, {"t1", "d2"}});
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  EXPECT_EQ(fake_.device_rpcs(), 1u);  // answered from the cache
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 2; }));
  EXPECT_THAT(fake_.device_batches()[1], ElementsAre(DeviceKeyPair("t1", "d2")));
  // A later round shows that the fetcher had nothing more.
  client().PrefetchDevices(std::vector<DeviceRef>{{"t1", "d9"}});
  ASSERT_TRUE(Eventually([&] { return fake_.device_rpcs() == 3; }));
  EXPECT_THAT(fake_.device_batches()[2], ElementsAre(DeviceKeyPair("t1", "d9")));
  // Past its TTL (30 s from its only fetch), t1/d1's next use asks routing.
  clock_.Advance(absl::Seconds(11));
  EXPECT_THAT(Devices({{"t1", "d1"}}), ElementsAre("t1/d1 p1@fr-1"));
  EXPECT_EQ(fake_.device_rpcs(), 4u);
  EXPECT_THAT(fake_.device_batches()[3], ElementsAre(DeviceKeyPair("t1", "d1")));
}

// --- concurrency ------------------------------------------------------------------------------

TEST_F(RoutingClientTest, ConcurrentCallersAndInvalidationsGetCorrectAnswers) {
  options_.max_cached_patients = 8;  // small, so eviction runs concurrently too
  std::vector<std::string> ids = ManyIds(20);
  for (const std::string& id : ids) fake_.PlacePatient(id, "t1", "fr-1", "FR");
  RoutingClient& routing = client();

  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 50; ++round) {
        std::vector<std::string> asked;
        for (int k = 0; k < 5; ++k) asked.push_back(ids[(t * 7 + round * 3 + k) % ids.size()]);
        absl::StatusOr<std::vector<PatientLocation>> answers = routing.ResolvePatients(asked);
        ASSERT_TRUE(answers.ok()) << answers.status();
        ASSERT_EQ(answers->size(), asked.size());
        for (size_t k = 0; k < asked.size(); ++k) {
          EXPECT_EQ(Describe((*answers)[k]), absl::StrCat(asked[k], " t1/fr-1/FR"));
        }
        if (round % 10 == t) routing.InvalidatePatient(asked[0]);
        if (round == 25 && t == 0) routing.InvalidateAll();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  // The invalidations still work after all that: a patient moved by ops is answered where it is
  // now once invalidated, one by one or all at once.
  auto where = [&](const std::string& id) {
    absl::StatusOr<std::vector<PatientLocation>> answers = routing.ResolvePatients({id});
    EXPECT_TRUE(answers.ok()) << answers.status();
    return answers.ok() && answers->size() == 1 ? Describe((*answers)[0]) : std::string("-");
  };
  EXPECT_EQ(where(ids[0]), absl::StrCat(ids[0], " t1/fr-1/FR"));
  EXPECT_EQ(where(ids[1]), absl::StrCat(ids[1], " t1/fr-1/FR"));
  fake_.PlacePatient(ids[0], "t1", "de-1", "DE");
  fake_.PlacePatient(ids[1], "t1", "de-1", "DE");
  routing.InvalidatePatient(ids[0]);
  EXPECT_EQ(where(ids[0]), absl::StrCat(ids[0], " t1/de-1/DE"));
  EXPECT_EQ(where(ids[1]), absl::StrCat(ids[1], " t1/fr-1/FR"));  // still as cached
  routing.InvalidateAll();
  EXPECT_EQ(where(ids[1]), absl::StrCat(ids[1], " t1/de-1/DE"));
}

}  // namespace
}  // namespace medgate
