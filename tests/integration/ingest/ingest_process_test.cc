// The ingest process killed (SIGKILL) mid-stream: no acknowledged sample is lost, none was
// acknowledged before its commit, and after a restart the device SDK delivers the rest once.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <filesystem>
#include <mutex>
#include <set>

#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "libs/device_sdk/device_client.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/consent/consent_server.h"
#include "services/routing/routing_server.h"
#include "tests/support/test_stack.h"

extern char** environ;

namespace medgate::ingest {
namespace {

using test_support::TestStack;

pid_t Spawn(const std::string& config, const std::string& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  std::string binary = MEDGATE_INGEST_BINARY;
  std::vector<char*> argv = {binary.data(), const_cast<char*>("--config"),
                             const_cast<char*>(config.c_str()), nullptr};
  pid_t pid = 0;
  int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

TEST(IngestProcessTest, KilledMidStreamLosesNothingAcknowledged) {
  auto stack = TestStack::Start({"routing", "consent", "ingest"},
                                "ingest: {tenant_samples_per_second: 1000000}\n");
  ASSERT_TRUE(stack.ok()) << stack.status();
  TestStack& s = **stack;
  auto routing = routing::RoutingServer::Create(s.config());
  ASSERT_TRUE(routing.ok());
  ASSERT_TRUE((*routing)->Start().ok());
  s.SetAddress("routing", (*routing)->port());
  auto consent = consent::ConsentServer::Create(s.config());
  ASSERT_TRUE(consent.ok());
  ASSERT_TRUE((*consent)->Start().ok());
  s.SetAddress("consent", (*consent)->port());
  const int ingest_port = s.ReservePort("ingest");
  const std::string config = s.dir() + "/medgate.yaml";
  ASSERT_TRUE(s.WriteConfig(config).ok());
  const std::string log = s.dir() + "/ingest.log";

  // A tenant, a patient, its device and REMOTE_MONITORING consent.
  auto as = [&](const test_support::TestCert& cert, int port) {
    const std::string service = port == (*routing)->port() ? "routing" : "consent";
    return *MakeChannel(absl::StrCat("127.0.0.1:", port),
                        TlsConfig{cert.cert_path, cert.key_path, s.pki().ca_path(), 60},
                        s.pki().SpiffeId(absl::StrCat("/service/", service)));
  };
  {
    auto ops = v1::TenantRouting::NewStub(as(s.pki().ops(), (*routing)->port()));
    v1::UpsertTenantRequest r;
    r.mutable_tenant()->set_tenant_id("acme");
    r.mutable_tenant()->set_display_name("acme");
    r.mutable_tenant()->add_territories("FR");
    r.mutable_tenant()->set_active(true);
    v1::UpsertTenantResponse response;
    grpc::ClientContext c;
    ASSERT_TRUE(ops->UpsertTenant(&c, r, &response).ok());
  }
  std::string patient_id;
  {
    auto app = v1::TenantRouting::NewStub(as(s.pki().app(), (*routing)->port()));
    v1::PlacePatientRequest place;
    place.set_patient_ref("killed");
    place.set_territory("FR");
    v1::PlacePatientResponse placed;
    grpc::ClientContext c1;
    ASSERT_TRUE(app->PlacePatient(&c1, place, &placed).ok());
    patient_id = placed.patient_id();
    v1::AssignDeviceRequest assign;
    assign.set_device_id("dev-1");  // the test PKI's acme device
    assign.set_patient_ref("killed");
    v1::AssignDeviceResponse assigned;
    grpc::ClientContext c2;
    ASSERT_TRUE(app->AssignDevice(&c2, assign, &assigned).ok());
    auto consents = v1::Consent::NewStub(as(s.pki().app(), (*consent)->port()));
    v1::GrantConsentRequest grant;
    grant.set_patient_id(patient_id);
    grant.set_purpose(v1::PURPOSE_REMOTE_MONITORING);
    grant.set_evidence_ref("form");
    v1::GrantConsentResponse granted;
    grpc::ClientContext c3;
    ASSERT_TRUE(consents->GrantConsent(&c3, grant, &granted).ok());
  }

  pid_t pid = Spawn(config, log);
  ASSERT_GT(pid, 0);
  device::DeviceOptions options;
  options.address = absl::StrCat("127.0.0.1:", ingest_port);
  options.tls = TlsConfig{s.pki().device().cert_path, s.pki().device().key_path, s.pki().ca_path(), 60};
  options.server_identity = s.pki().SpiffeId("/service/ingest");
  options.buffer_path = s.dir() + "/device.buffer";
  options.backoff_initial = absl::Milliseconds(50);
  options.backoff_max = absl::Milliseconds(500);
  options.first_seq = 1;  // batch b holds seqs (b - 1) * kPerBatch + 1 onwards
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok());
  std::mutex mu;
  std::set<uint64_t> acked_batches;
  (*client)->OnAck([&](const v1::IngestAck& ack, absl::Duration) {
    if (ack.has_retryable_error()) return;
    std::lock_guard<std::mutex> lock(mu);
    acked_batches.insert(ack.batch_seq());
  });
  constexpr int kBatches = 300;
  constexpr int kPerBatch = 10;
  for (int b = 0; b < kBatches; ++b) {
    std::vector<v1::VitalSample> samples;
    for (int i = 0; i < kPerBatch; ++i) {
      v1::VitalSample v;
      v.set_loinc_code("8867-4");
      v.set_ucum_unit("/min");
      v.set_value(70);
      // Measured now: after the device's assignment (routing refuses earlier samples).
      const absl::Time t = absl::Now();
      v.mutable_measured_at()->set_seconds(absl::ToUnixSeconds(t));
      v.mutable_measured_at()->set_nanos(
          static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(absl::ToUnixSeconds(t)))));
      samples.push_back(v);
    }
    ASSERT_TRUE((*client)->Send(std::move(samples)).ok());
  }
  (*client)->Start();
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (acked_batches.size() >= 40) break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int wstatus = 0;
  waitpid(pid, &wstatus, 0);
  std::set<uint64_t> acked_before_kill;
  {
    std::lock_guard<std::mutex> lock(mu);
    acked_before_kill = acked_batches;
  }
  ASSERT_GE(acked_before_kill.size(), 40u);
  ASSERT_LT(acked_before_kill.size(), static_cast<size_t>(kBatches)) << "the kill came too late";

  // Acknowledged means committed: each acked batch's samples are in fr-1 now.
  auto count = [&](const std::string& where) {
    pqxx::connection c(s.clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1("SELECT count(*) FROM vitals WHERE device_id = 'dev-1' AND " + where)[0].as<int64_t>();
  };
  for (uint64_t batch : acked_before_kill) {
    uint64_t first = (batch - 1) * kPerBatch + 1;
    EXPECT_EQ(count(absl::StrCat("seq BETWEEN ", first, " AND ", first + kPerBatch - 1)), kPerBatch)
        << "batch " << batch;
  }

  // Restarted, the service gets the rest from the SDK, and nothing twice.
  pid = Spawn(config, log);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(60)).ok());
  (*client)->Stop();
  kill(pid, SIGTERM);
  waitpid(pid, &wstatus, 0);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "graceful drain on SIGTERM";
  EXPECT_EQ(count("true"), kBatches * kPerBatch);
  EXPECT_EQ(count(absl::StrCat("seq BETWEEN 1 AND ", kBatches * kPerBatch)), kBatches * kPerBatch);
  (*consent)->Shutdown();
  (*routing)->Shutdown();
}

}  // namespace
}  // namespace medgate::ingest
