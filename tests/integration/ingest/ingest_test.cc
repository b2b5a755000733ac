// The ingest service over real mTLS and real PostgreSQL, with real routing and consent services:
// residency, acks after commit, duplicates, validation, consent, geolocation, shard failure.
#include <signal.h>

#include <atomic>
#include <bit>
#include <filesystem>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "libs/audit/audit_log.h"
#include "libs/common/grpc_status.h"
#include "libs/common/proto_duration.h"
#include "libs/device_sdk/device_client.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/consent/consent_server.h"
#include "services/ingest/ingest_server.h"
#include "services/ingest/sql.h"
#include "services/ingest/vitals_catalogue.h"
#include "services/routing/routing_server.h"
#include "tests/support/health_check.h"
#include "tests/support/pg_fault_proxy.h"
#include "tests/support/poll.h"
#include "tests/support/directory_services.h"
#include "tests/support/fuzz.h"
#include "tests/support/test_stack.h"
#include "tests/support/tenants.h"

namespace medgate::ingest {
namespace {

using ::testing::HasSubstr;
using test_support::PollUntil;
using test_support::TestCert;
using test_support::TestStack;

template <typename Service>
std::unique_ptr<typename Service::Stub> StubAs(const TestCert& cert, const std::string& ca, int port,
                                               const std::string& server_identity) {
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port),
                             TlsConfig{cert.cert_path, cert.key_path, ca, 60}, server_identity);
  EXPECT_TRUE(channel.ok()) << channel.status();
  return Service::NewStub(*channel);
}

google::protobuf::Timestamp Ts(absl::Time t) {
  google::protobuf::Timestamp ts;
  ts.set_seconds(absl::ToUnixSeconds(t));
  ts.set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(absl::ToUnixSeconds(t)))));
  return ts;
}

v1::VitalSample HeartRate(uint64_t seq, double bpm = 72) {
  v1::VitalSample s;
  s.set_seq(seq);
  s.set_loinc_code("8867-4");
  s.set_value(bpm);
  s.set_ucum_unit("/min");
  // Measured now (after the device's assignment, which refuses earlier samples), in seq order.
  *s.mutable_measured_at() = Ts(absl::Now() + absl::Microseconds(static_cast<int64_t>(seq)));
  return s;
}

v1::VitalsBatch Batch(uint64_t batch_seq, uint64_t first_seq, int n) {
  v1::VitalsBatch batch;
  batch.set_batch_seq(batch_seq);
  for (int i = 0; i < n; ++i) *batch.add_samples() = HeartRate(first_seq + static_cast<uint64_t>(i));
  return batch;
}

// One device's stream: send a batch, read its ack.
class DeviceStream {
 public:
  DeviceStream(v1::DeviceIngest::Stub& stub) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    stream_ = stub.StreamVitals(&context_);
  }
  // The ack, or nullopt when the stream ended (then Finish() tells why).
  std::optional<v1::IngestAck> Send(const v1::VitalsBatch& batch) {
    if (!stream_->Write(batch)) return std::nullopt;
    v1::IngestAck ack;
    if (!stream_->Read(&ack)) return std::nullopt;
    return ack;
  }
  // A batch sent without waiting for its ack; false when the stream ended.
  bool Write(const v1::VitalsBatch& batch) { return stream_->Write(batch); }
  std::optional<v1::IngestAck> Read() {
    v1::IngestAck ack;
    if (!stream_->Read(&ack)) return std::nullopt;
    return ack;
  }
  // Cancels the call from the client's side.
  void Cancel() { context_.TryCancel(); }
  grpc::Status Finish() {
    stream_->WritesDone();
    v1::IngestAck ignored;
    while (stream_->Read(&ignored)) {
    }
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::VitalsBatch, v1::IngestAck>> stream_;
};

class IngestTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto stack = TestStack::Start({"routing", "consent", "ingest"},
                                  "ingest: {tenant_samples_per_second: 1000000}\n");
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = stack->release();
    auto directory = test_support::DirectoryServices::Start(*stack_);
    ASSERT_TRUE(directory.ok()) << directory.status();
    directory_ = directory->release();
    routing_ = &directory_->routing();
    consent_ = &directory_->consent();
    auto ingest = IngestServer::Create(stack_->config());
    ASSERT_TRUE(ingest.ok()) << ingest.status();
    ingest_ = ingest->release();
    ASSERT_TRUE(ingest_->Start().ok());

    auto ops = Routing(pki().ops());
    for (const char* tenant : {"acme", "globex"}) {
      v1::UpsertTenantRequest r;
      r.mutable_tenant()->set_tenant_id(tenant);
      r.mutable_tenant()->set_display_name(tenant);
      for (const char* t : {"FR", "DE", "BE"}) r.mutable_tenant()->add_territories(t);
      r.mutable_tenant()->set_active(true);
      v1::UpsertTenantResponse response;
      grpc::ClientContext context;
      ASSERT_TRUE(ops->UpsertTenant(&context, r, &response).ok());
    }
  }

  // A second ingest server on the stack with its own `ingest:` settings. The server keeps a
  // reference to its configuration: both live in one object, the configuration first.
  struct ExtraIngest {
    MedgateConfig config;
    std::unique_ptr<IngestServer> server;
  };
  // A `statement_timeout_ms` other than 0 replaces the regions' shard statement timeout; a
  // `fr1_conninfo` replaces fr-1's; a `crl_dir`, the server's (none).
  static std::unique_ptr<ExtraIngest> StartIngest(
      const std::string& ingest_yaml, int statement_timeout_ms = 0,
      const std::string& fr1_conninfo = "", const ServerLimits* limits = nullptr,
      const std::string& crl_dir = "") {
    auto extra = std::make_unique<ExtraIngest>();
    extra->config = stack_->config();
    if (limits != nullptr) extra->config.limits = *limits;
    extra->config.services["ingest"].tls.crl_dir = crl_dir;
    for (RegionConfig& region : extra->config.regions) {
      if (statement_timeout_ms != 0) region.db.statement_timeout_ms = statement_timeout_ms;
      if (region.id == "fr-1" && !fr1_conninfo.empty()) region.db.conninfo = fr1_conninfo;
    }
    absl::StatusOr<ConfigNode> node = ConfigNode::Parse(ingest_yaml);
    EXPECT_TRUE(node.ok()) << node.status();
    if (!node.ok()) return nullptr;
    extra->config.root = *node;
    auto server = IngestServer::Create(extra->config);
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return nullptr;
    extra->server = *std::move(server);
    if (absl::Status started = extra->server->Start(); !started.ok()) {
      ADD_FAILURE() << started;
      return nullptr;
    }
    // Consents loaded before a region's change feed listens are not kept (the feed's start drops
    // them): tests that count loads or hand-overs need the feeds up first.
    for (const RegionConfig& region : extra->config.regions) {
      if (!PollUntil(absl::Now() + absl::Seconds(30),
                     [&] { return extra->server->consent().FeedListening(region.id); })) {
        ADD_FAILURE() << "the consent feed of " << region.id << " is not listening";
        return nullptr;
      }
    }
    return extra;
  }

  // Holds a device's cursor row in fr-1 until Release(): the device's next batch then waits in its
  // writer's transaction (whose shard statement timeout must outlast the hold).
  class CursorHold {
   public:
    explicit CursorHold(const std::string& device)
        : conn_(stack_->clusters().region("fr-1").ConnectionString()), txn_(conn_) {
      EXPECT_EQ(txn_.exec_params("SELECT 1 FROM device_cursors WHERE device_id = $1 FOR UPDATE",
                                 device)
                    .size(),
                1u);
    }
    // True once a writer waits for a device's cursor.
    static bool WriterWaits() {
      pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
      pqxx::nontransaction q(c);
      return q.exec1("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND query LIKE '%medgate_advance_device_cursors%'")[0]
                 .as<int64_t>() > 0;
    }
    void Release() { txn_.commit(); }

   private:
    pqxx::connection conn_;
    pqxx::work txn_;
  };

  static void TearDownTestSuite() {
    ingest_->Shutdown();
    delete ingest_;
    delete directory_;
    delete stack_;
  }

  static test_support::TestPki& pki() { return stack_->pki(); }
  static std::unique_ptr<v1::TenantRouting::Stub> Routing(const TestCert& as) {
    return StubAs<v1::TenantRouting>(as, pki().ca_path(), routing_->port(),
                                     pki().SpiffeId("/service/routing"));
  }
  // A device stub to the suite's ingest server, or to the one on `port`.
  static std::unique_ptr<v1::DeviceIngest::Stub> Ingest(const TestCert& as, int port = 0) {
    return StubAs<v1::DeviceIngest>(as, pki().ca_path(), port != 0 ? port : ingest_->port(),
                                    pki().SpiffeId("/service/ingest"));
  }

  // As Ingest, on a connection of its own whose streams have a 64 KiB window: a server stream of
  // more soon waits for its client to read.
  static std::unique_ptr<v1::DeviceIngest::Stub> IngestWithSmallWindow(const TestCert& as) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds = MakeChannelCredentials(
        TlsConfig{as.cert_path, as.key_path, pki().ca_path(), 60},
        pki().SpiffeId("/service/ingest"));
    EXPECT_TRUE(creds.ok()) << creds.status();
    if (!creds.ok()) return nullptr;
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
    return v1::DeviceIngest::NewStub(grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", ingest_->port()), *creds, args));
  }

  // A certificate of `path` (e.g. "/tenant/acme/app/x") that expires in `lifetime`.
  static TestCert ExpiringCert(const std::string& name, const std::string& path,
                               absl::Duration lifetime) {
    devpki::LeafOptions options;
    options.common_name = name;
    options.uri_sans = {pki().SpiffeId(path)};
    options.not_after = lifetime;
    absl::StatusOr<TestCert> cert = pki().Issue(name, options);
    EXPECT_TRUE(cert.ok()) << cert.status();
    return cert.ok() ? *cert : TestCert{};
  }

  // Puts `rows` heart-rate readings of `patient` in the FR shard, one a second back from now.
  static void StoreReadings(const std::string& patient, const std::string& device, int rows) {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', $3, g, $1, '8867-4', 70, '/min', "
        "date_trunc('second', now()) - interval '1 second' * g FROM generate_series(1, $2) AS g",
        patient, rows, device);
    txn.commit();
  }

  // Places a patient of `as`'s tenant (acme by default) and assigns `device` to it; returns the
  // patient id.
  static std::string PatientWithDevice(const std::string& ref, const std::string& territory,
                                       const std::string& device, const TestCert& as = pki().app()) {
    auto app = Routing(as);
    v1::PlacePatientRequest place;
    place.set_patient_ref(ref);
    place.set_territory(territory);
    v1::PlacePatientResponse placed;
    grpc::ClientContext c1;
    EXPECT_TRUE(app->PlacePatient(&c1, place, &placed).ok());
    v1::AssignDeviceRequest assign;
    assign.set_device_id(device);
    assign.set_patient_ref(ref);
    v1::AssignDeviceResponse assigned;
    grpc::ClientContext c2;
    grpc::Status s = app->AssignDevice(&c2, assign, &assigned);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return placed.patient_id();
  }

  // A patient placed in `territory` with device `device_id` assigned (PatientWithDevice), who has
  // granted REMOTE_MONITORING: the device's samples are stored.
  static std::string MonitoredPatientWithDevice(const std::string& ref,
                                                const std::string& territory,
                                                const std::string& device_id) {
    std::string patient = PatientWithDevice(ref, territory, device_id);
    Grant(patient, v1::PURPOSE_REMOTE_MONITORING);
    return patient;
  }

  static void Grant(const std::string& patient_id, v1::Purpose purpose, const std::string& actor = "",
                    const TestCert& as = pki().app(),
                    const std::vector<std::string>& categories = {}) {
    auto stub = StubAs<v1::Consent>(as, pki().ca_path(), consent_->port(),
                                    pki().SpiffeId("/service/consent"));
    v1::GrantConsentRequest r;
    r.set_patient_id(patient_id);
    r.set_purpose(purpose);
    r.set_actor(actor);
    for (const std::string& c : categories) r.add_categories(c);
    r.set_evidence_ref("signed-form-1");
    v1::GrantConsentResponse response;
    grpc::ClientContext context;
    grpc::Status s = stub->GrantConsent(&context, r, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  // The id of the patient's consent for `purpose` (its name, as stored) narrowed to `actor` ("":
  // tenant-wide), read from fr-1.
  static std::string ConsentId(const std::string& patient_id, const std::string& purpose,
                               const std::string& actor = "") {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    return q
        .exec_params1("SELECT consent_id FROM consents WHERE patient_id = $1 AND purpose = $2 "
                      "AND actor = $3",
                      patient_id, purpose, actor)[0]
        .as<std::string>();
  }

  static void Revoke(const std::string& patient_id, v1::Purpose purpose) {
    auto stub = StubAs<v1::Consent>(pki().app(), pki().ca_path(), consent_->port(),
                                    pki().SpiffeId("/service/consent"));
    v1::RevokeConsentRequest r;
    r.mutable_key()->set_patient_id(patient_id);
    r.mutable_key()->set_purpose(purpose);
    r.set_reason("the patient withdrew");
    v1::RevokeConsentResponse response;
    grpc::ClientContext context;
    grpc::Status s = stub->RevokeConsent(&context, r, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  // A device certificate, valid for a year or for `valid` from now.
  static TestCert Device(const std::string& tenant, const std::string& name,
                         absl::Duration valid = absl::Hours(24 * 365)) {
    devpki::LeafOptions options;
    options.common_name = name;
    options.not_after = valid;
    options.uri_sans = {pki().SpiffeId(absl::StrCat("/tenant/", tenant, "/device/", name))};
    auto cert = pki().Issue(absl::StrCat(tenant, "-", name), options);
    EXPECT_TRUE(cert.ok());
    return *cert;
  }

  // Device SDK options for `cert` against the ingest server on `port` (the suite's by default),
  // with a buffer file of its own that does not exist yet. Buffer files and their lock files are
  // in the suite's directory, removed with it.
  static device::DeviceOptions SdkOptions(const TestCert& cert, const std::string& buffer_tag,
                                          int port = 0) {
    device::DeviceOptions options;
    options.address = absl::StrCat("127.0.0.1:", port != 0 ? port : ingest_->port());
    options.tls = TlsConfig{cert.cert_path, cert.key_path, pki().ca_path(), 60};
    options.server_identity = pki().SpiffeId("/service/ingest");
    options.buffer_path = SuitePath(absl::StrCat("medgate-", buffer_tag, ".buffer"));
    std::filesystem::remove(options.buffer_path);
    return options;
  }

  // `name` in the suite's own directory (the stack's), which its teardown removes.
  static std::string SuitePath(const std::string& name) {
    return (std::filesystem::path(stack_->dir()) / name).string();
  }

  // `n` heart rates for the SDK to number (60 to 159 bpm).
  static std::vector<v1::VitalSample> HeartRates(int n) {
    std::vector<v1::VitalSample> out;
    for (int i = 0; i < n; ++i) out.push_back(HeartRate(0, 60 + i % 100));
    return out;
  }

  // Sends `batches` batches of 10 heart rates through a new SDK client with `options`, waits for
  // their acks and returns the client's statistics.
  static device::DeviceStats Deliver(const device::DeviceOptions& options, int batches) {
    auto client = device::DeviceClient::Open(options);
    EXPECT_TRUE(client.ok()) << client.status();
    if (!client.ok()) return {};
    for (int b = 0; b < batches; ++b) EXPECT_TRUE((*client)->Send(HeartRates(10)).ok());
    (*client)->Start();
    EXPECT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
    device::DeviceStats stats = (*client)->stats();
    (*client)->Stop();
    return stats;
  }

  // Starts `region`'s server again if a test stopped it (for a cleanup).
  static void StartIfStopped(const std::string& region) {
    test_support::PgCluster& cluster = stack_->clusters().region(region);
    if (!cluster.running()) {
      EXPECT_TRUE(cluster.StartAgain().ok()) << region;
    }
  }

  // The lowest seq stored for `device` in `region` (0 when none is).
  static int64_t FirstSeq(const std::string& region, const std::string& device) {
    pqxx::connection c(stack_->clusters().region(region).ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec_params1("SELECT coalesce(min(seq), 0) FROM vitals WHERE device_id = $1", device)[0]
        .as<int64_t>();
  }

  static int64_t Count(const std::string& region, const std::string& where) {
    pqxx::connection c(stack_->clusters().region(region).ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1("SELECT count(*) FROM vitals WHERE " + where)[0].as<int64_t>();
  }

  static TestStack* stack_;
  static test_support::DirectoryServices* directory_;
  static routing::RoutingServer* routing_;  // directory_'s
  static consent::ConsentServer* consent_;  // directory_'s
  static IngestServer* ingest_;
};

TestStack* IngestTest::stack_ = nullptr;
test_support::DirectoryServices* IngestTest::directory_ = nullptr;
routing::RoutingServer* IngestTest::routing_ = nullptr;
consent::ConsentServer* IngestTest::consent_ = nullptr;
IngestServer* IngestTest::ingest_ = nullptr;

TEST_F(IngestTest, StoresInTheHomeShardOnlyAndResendsAreDuplicates) {
  std::string patient = MonitoredPatientWithDevice("home-fr", "FR", "dev-home");
  TestCert device = Device("acme", "dev-home");
  auto stub = Ingest(device);
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 50));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_FALSE(ack->has_retryable_error()) << ack->retryable_error().message();
  EXPECT_EQ(ack->batch_seq(), 1u);
  EXPECT_EQ(ack->stored_count(), 50u);
  EXPECT_EQ(ack->highest_committed_seq(), 50u);
  // Acked means committed: the rows are there now, in fr-1 only.
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-home'"), 50);
  EXPECT_EQ(Count("de-1", "device_id = 'dev-home'"), 0);
  EXPECT_EQ(Count("eu-1", "device_id = 'dev-home'"), 0);
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = 'dev-home' AND patient_id = '", patient, "'")), 50);

  // The ack was "lost": the device resends the batch, plus a batch overlapping it.
  ack = stream.Send(Batch(1, 1, 50));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 0u);
  EXPECT_EQ(ack->duplicate_count(), 50u);
  ack = stream.Send(Batch(2, 41, 20));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 10u);
  EXPECT_EQ(ack->duplicate_count(), 10u);
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-home'"), 60);

  // Each batch that stored something has its audit entry in fr-1's chain, written with it: the
  // device, the patient, the consent, the counts; the resend that stored nothing has none.
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::nontransaction q(c);
    pqxx::result entries = q.exec_params(
        "SELECT actor, tenant, object_id, decision, reason, purpose, request_id, consent_id, "
        "consent_version, origin FROM audit_log WHERE patient_id = $1 AND action = 'create' AND "
        "object_type = 'vitals' ORDER BY seq",
        patient);
    ASSERT_EQ(entries.size(), 2u);
    EXPECT_EQ(entries[0][0].as<std::string>(), pki().SpiffeId("/tenant/acme/device/dev-home"));
    EXPECT_EQ(entries[0][1].as<std::string>(), "acme");
    EXPECT_EQ(entries[0][2].as<std::string>(), "dev-home");
    EXPECT_EQ(entries[0][3].as<std::string>(), "permit");
    EXPECT_EQ(entries[0][4].as<std::string>(), "PERMITTED: stored=50 duplicates=0");
    EXPECT_EQ(entries[0][5].as<std::string>(), "REMOTE_MONITORING");
    EXPECT_EQ(entries[0][6].as<std::string>(), "batch:1");
    EXPECT_FALSE(entries[0][7].as<std::string>().empty());
    EXPECT_GE(entries[0][8].as<int64_t>(), 1);
    EXPECT_THAT(entries[0][9].as<std::string>(), ::testing::StartsWith("ipv4:127.0.0.1:"));
    EXPECT_EQ(entries[1][4].as<std::string>(), "PERMITTED: stored=10 duplicates=10");
    EXPECT_EQ(entries[1][6].as<std::string>(), "batch:2");
  }
  for (const char* other : {"de-1", "eu-1"}) {
    pqxx::connection o(stack_->clusters().region(other).ConnectionString());
    pqxx::nontransaction q(o);
    EXPECT_EQ(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1", patient)[0]
                  .as<int>(),
              0)
        << other;
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// Ingest's writers, consent cache and reads reach the shard as its own database role (next to
// routing's and consent's): once the test's own connections have closed, none of the schema
// owner's is left.
TEST_F(IngestTest, IngestConnectsAsItsOwnDatabaseRole) {
  std::string patient = MonitoredPatientWithDevice("role-fr", "FR", "dev-role");
  auto stub = Ingest(Device("acme", "dev-role"));
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 5u);
  EXPECT_TRUE(stream.Finish().ok());
  std::set<std::string> connected;
  const bool no_owner = PollUntil(absl::Now() + absl::Seconds(30), [&] {
    connected = stack_->clusters().region("fr-1").ClientConnections();
    return connected.count("medgate medgate") == 0;
  });
  EXPECT_TRUE(no_owner) << absl::StrJoin(connected, ", ");
  EXPECT_EQ(connected.count("medgate medgate_ingest"), 1u) << absl::StrJoin(connected, ", ");
}

// The ingest service makes the coming months' vitals partitions in every region, at start and
// then every ingest.partition_check_minutes: a month without its partition would file its samples
// in the default partition, where its partition could then never be made.
TEST_F(IngestTest, ComingMonthsHaveTheirVitalsPartitions) {
  std::map<std::string, std::string> dropped;  // region -> the partition dropped there
  for (const RegionConfig& region : stack_->config().regions) {
    pqxx::connection c(region.db.conninfo);
    pqxx::work w(c);
    const std::string name =
        w.exec1("SELECT 'vitals_' || to_char(date_trunc('month', now()) + interval '3 months', "
                "'YYYY_MM')")[0]
            .c_str();
    ASSERT_FALSE(w.exec_params1("SELECT to_regclass($1) IS NULL", name)[0].as<bool>()) << name;
    w.exec0("DROP TABLE " + w.quote_name(name));
    w.commit();
    dropped[region.id] = name;
  }
  auto extra = StartIngest("ingest: {tenant_samples_per_second: 1000000}\n");
  ASSERT_NE(extra, nullptr);
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return extra->server->partition_passes() >= 1; }));
  for (const RegionConfig& region : stack_->config().regions) {
    pqxx::connection c(region.db.conninfo);
    pqxx::nontransaction n(c);
    EXPECT_FALSE(n.exec_params1("SELECT to_regclass($1) IS NULL", dropped[region.id])[0].as<bool>())
        << region.id << " " << dropped[region.id];
  }
}

// Vitals partitions are calendar months in UTC whatever the session's time zone, and a month the
// keeper makes next to months made in another time zone (a server west of UTC made them before the
// keeper ran in UTC) starts and ends where they do: no overlap (the keeper failed for good on
// one), no gap (samples filed in vitals_default).
TEST_F(IngestTest, VitalsPartitionsAreUtcMonthsContiguousWithMonthsMadeElsewhere) {
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::work w(c);
    w.exec0("SET LOCAL TIME ZONE 'America/Sao_Paulo'");
    for (int k = 5; k <= 12; ++k) {
      w.exec0(absl::StrCat("DROP TABLE IF EXISTS ",
                           w.exec1(absl::StrCat("SELECT 'vitals_' || to_char(date_trunc('month', "
                                                "now()) + interval '", k,
                                                " months', 'YYYY_MM')"))[0]
                               .c_str()));
    }
    for (int k = 5; k <= 6; ++k) {
      w.exec0(absl::StrCat(
          "DO $$ DECLARE m timestamptz := date_trunc('month', now()) + interval '", k,
          " months'; BEGIN EXECUTE format('CREATE TABLE %I PARTITION OF vitals FOR VALUES FROM "
          "(%L) TO (%L)', 'vitals_' || to_char(m, 'YYYY_MM'), m, m + interval '1 month'); END $$"));
    }
    w.commit();
  }
  {
    pqxx::work w(c);
    w.exec0("SET LOCAL TIME ZONE 'Asia/Tokyo'");  // the keeper's caller's zone does not matter
    w.exec("SELECT medgate_ensure_vitals_partitions(2, 12)");
    w.commit();
  }
  pqxx::work w(c);
  w.exec0("SET LOCAL TIME ZONE 'UTC'");
  const std::string bounds =
      "SELECT c.relname AS name, "
      "substring(pg_get_expr(c.relpartbound, c.oid) FROM $r$FROM \\('([^']+)'\\)$r$)::timestamptz AS lo, "
      "substring(pg_get_expr(c.relpartbound, c.oid) FROM $r$TO \\('([^']+)'\\)$r$)::timestamptz AS hi "
      "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
      "WHERE i.inhparent = 'vitals'::regclass AND c.relname <> 'vitals_default'";
  // From the months made elsewhere on, each partition ends where the next one starts. (The test
  // made only the two months in another zone; before them the months are UTC ones.)
  const pqxx::result breaks = w.exec(absl::StrCat(
      "SELECT name, hi, next_lo FROM (SELECT name, hi, lead(lo) OVER (ORDER BY lo) AS next_lo "
      "FROM (", bounds, ") b WHERE lo > date_trunc('month', now()) + interval '4 months') n "
      "WHERE next_lo IS NOT NULL AND next_lo <> hi"));
  EXPECT_EQ(w.exec1(absl::StrCat("SELECT count(*) FROM (", bounds, ") b WHERE lo > "
                                 "date_trunc('month', now()) + interval '4 months'"))[0]
                .as<int>(),
            8);  // months 5 to 12
  for (const pqxx::row& row : breaks) {
    ADD_FAILURE() << row[0].c_str() << " ends at " << row[1].c_str() << ", the next starts at "
                  << row[2].c_str();
  }
  // The months made here from scratch are UTC months.
  for (int k = 8; k <= 12; ++k) {
    EXPECT_TRUE(w.exec1(absl::StrCat("SELECT lo = date_trunc('month', now()) + interval '", k,
                                     " months' AND hi = date_trunc('month', now()) + interval '",
                                     k + 1, " months' FROM (", bounds,
                                     ") b WHERE name = 'vitals_' || to_char(date_trunc('month', "
                                     "now()) + interval '", k, " months', 'YYYY_MM')"))[0]
                    .as<bool>())
        << k;
  }
}

// The consent cache of ingest is bounded by the consent.cache keys, as the consent service's is
// (it was built with the defaults whatever the configuration said).
TEST_F(IngestTest, TheConsentCacheHasTheConfiguredBounds) {
  const std::string first = MonitoredPatientWithDevice("cache-bound-1", "FR", "dev-cache-bound-1");
  const std::string second = MonitoredPatientWithDevice("cache-bound-2", "FR", "dev-cache-bound-2");
  auto extra = StartIngest("consent: {cache: {max_patients: 1}}\n");
  ASSERT_NE(extra, nullptr);
  for (const char* device : {"dev-cache-bound-1", "dev-cache-bound-2"}) {
    auto stub = Ingest(Device("acme", device), extra->server->port());
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 3));
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    EXPECT_EQ(ack->stored_count(), 3u) << ack->retryable_error().message();
    EXPECT_TRUE(stream.Finish().ok());
  }
  const consent::ConsentCacheStats stats = extra->server->consent().Stats();
  EXPECT_GE(stats.loads, 2u);
  EXPECT_LE(stats.entries, 1u);
  extra->server->Shutdown();
}

// Making a partition needs an ACCESS EXCLUSIVE lock on vitals, and every write of the region
// queues behind that request while it waits (here behind a read the test holds open): the keeper
// gives up after ingest.partition_lock_timeout_ms, so batches are stored meanwhile, rather than
// after the shard's statement timeout (two minutes here).
TEST_F(IngestTest, APartitionKeeperWaitingForItsLockGivesWayToWrites) {
  const std::string patient =
      MonitoredPatientWithDevice("partition-lock", "FR", "dev-partition-lock");
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  const std::string name = [&] {
    pqxx::work w(c);
    const std::string month =
        w.exec1("SELECT 'vitals_' || to_char(date_trunc('month', now()) + interval '4 months', "
                "'YYYY_MM')")[0]
            .c_str();
    w.exec0("DROP TABLE " + w.quote_name(month));
    w.commit();
    return month;
  }();
  absl::Cleanup restore = [&] {
    pqxx::work w(c);
    w.exec("SELECT medgate_ensure_vitals_partitions(2, 12)");
    w.commit();
  };
  {
    pqxx::work reading(c);
    reading.exec0("LOCK TABLE vitals IN ACCESS SHARE MODE");
    auto extra = StartIngest(
        "ingest: {tenant_samples_per_second: 1000000, partition_lock_timeout_ms: 5000}\n",
        /*statement_timeout_ms=*/120000);
    ASSERT_NE(extra, nullptr);
    auto keeper_waits = [] {
      pqxx::connection q(stack_->clusters().region("fr-1").ConnectionString());
      pqxx::nontransaction n(q);
      return n.exec1("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                     "query LIKE '%medgate_ensure_vitals_partitions%'")[0]
                 .as<int64_t>() > 0;
    };
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), keeper_waits));
    // While the read still holds vitals, a batch is stored: the keeper gave up.
    auto stub = Ingest(Device("acme", "dev-partition-lock"), extra->server->port());
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    EXPECT_FALSE(ack->has_retryable_error()) << ack->retryable_error().message();
    EXPECT_EQ(ack->stored_count(), 5u);
    EXPECT_FALSE(keeper_waits());
    EXPECT_EQ(extra->server->partition_passes(), 0u);
    EXPECT_TRUE(stream.Finish().ok());
    reading.commit();
    extra->server->Shutdown();
  }
  std::move(restore).Invoke();
  pqxx::nontransaction n(c);
  EXPECT_FALSE(n.exec_params1("SELECT to_regclass($1) IS NULL", name)[0].as<bool>()) << name;
  EXPECT_EQ(Count("fr-1", absl::StrCat("patient_id = '", patient, "'")), 5);
}

// Once a device's routing answer and its patient's consents are in memory, its batches are
// processed on gRPC's callback thread; only what has to wait (the first batch's look-ups) goes to a
// worker thread. Every batch is stored either way.
TEST_F(IngestTest, BatchesWithNothingToWaitForSkipTheWorkerThreads) {
  std::string patient = MonitoredPatientWithDevice("inline", "FR", "dev-inline");
  auto extra = StartIngest("ingest: {linger_ms: 0}\n");
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  auto stub = Ingest(Device("acme", "dev-inline"), server.port());
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 10));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  ASSERT_EQ(ack->stored_count(), 10u);
  // The new server had not yet read the patient's consents: the first batch waited for them on a
  // worker.
  EXPECT_EQ(server.batches_handed_to_workers(), 1u);
  const uint64_t handed = server.batches_handed_to_workers();
  for (uint64_t b = 2; b <= 6; ++b) {
    ack = stream.Send(Batch(b, (b - 1) * 10 + 1, 10));
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    EXPECT_EQ(ack->stored_count(), 10u);
  }
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(server.batches_handed_to_workers(), handed);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-inline'"), 60);
  server.Shutdown();
}

// Besides the device cursors the service checks, the shard's primary key refuses a second copy of
// a stored sample (same tenant, device, seq and measurement time), whoever writes it.
TEST_F(IngestTest, TheShardRefusesASecondCopyOfAStoredSample) {
  std::string patient = MonitoredPatientWithDevice("pkey", "FR", "dev-pkey");
  auto stub = Ingest(Device("acme", "dev-pkey"));
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  ASSERT_EQ(ack->stored_count(), 5u);
  EXPECT_TRUE(stream.Finish().ok());

  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    // Its columns lead with the fixed-width ones (migration 0007: cheaper inserts).
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec1("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                      "WHERE conname = 'vitals_pkey' AND conrelid = 'vitals'::regclass")[0]
                  .as<std::string>(),
              "PRIMARY KEY (measured_at, seq, tenant_id, device_id)");
  }
  pqxx::work txn(c);
  EXPECT_THROW(txn.exec0("INSERT INTO vitals SELECT * FROM vitals WHERE device_id = 'dev-pkey' "
                         "AND seq = 3"),
               pqxx::unique_violation);
  txn.abort();
  // The same sample under another device is another sample.
  pqxx::work other(c);
  other.exec0("INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
              "measured_at) SELECT tenant_id, 'dev-pkey-2', seq, patient_id, loinc, value, ucum, "
              "measured_at FROM vitals WHERE device_id = 'dev-pkey' AND seq = 3");
  other.commit();
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-pkey'"), 5);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-pkey-2'"), 1);
}

// A batch of a thousand samples all rejected: every rejection is in the ack with its reason, the
// first 32 with their detail too, so that the ack stays small (a stream owes at most 16 of them,
// and stops reading once those it owes pass 64 KiB).
TEST_F(IngestTest, AnAckOfManyRejectionsGivesTheFirstDetailsOnly) {
  MonitoredPatientWithDevice("rejections", "FR", "dev-rejections");
  auto stub = Ingest(Device("acme", "dev-rejections"));
  v1::VitalsBatch batch;
  batch.set_batch_seq(1);
  for (uint64_t seq = 1; seq <= 1000; ++seq) {
    v1::VitalSample s = HeartRate(seq);
    s.set_ucum_unit("mm[Hg]");  // a heart rate's unit is /min
    *batch.add_samples() = s;
  }
  DeviceStream stream(*stub);
  auto ack = stream.Send(batch);
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 0u);
  EXPECT_EQ(ack->rejected_count(), 1000u);
  ASSERT_EQ(ack->rejections_size(), 1000);
  for (int i = 0; i < ack->rejections_size(); ++i) {
    const v1::SampleRejection& r = ack->rejections(i);
    EXPECT_EQ(r.sample_index(), static_cast<uint32_t>(i));
    EXPECT_EQ(r.reason(), v1::REJECT_REASON_WRONG_UNIT);
    EXPECT_EQ(r.detail().empty(), i >= 32) << i;
  }
  EXPECT_THAT(ack->rejections(0).detail(), HasSubstr("/min"));
  EXPECT_LT(ack->ByteSizeLong(), 24u * 1024);
  EXPECT_TRUE(stream.Finish().ok());
}

// A device that sends batches of rejected samples and reads no ack: once the acks the stream
// owes pass 64 KiB, the stream reads no further batch (fewer than the 16 owed acks the count
// bound alone allows, plus those the client's 64 KiB window takes); read, every batch is acked.
TEST_F(IngestTest, AStreamOwingTooManyAckBytesStopsReading) {
  MonitoredPatientWithDevice("owed-acks", "FR", "dev-owed-acks");
  auto extra = StartIngest("ingest: {worker_threads: 2}\n");
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  auto creds = MakeChannelCredentials(
      TlsConfig{Device("acme", "dev-owed-acks").cert_path, Device("acme", "dev-owed-acks").key_path,
                pki().ca_path(), 60},
      pki().SpiffeId("/service/ingest"));
  ASSERT_TRUE(creds.ok()) << creds.status();
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
  auto stub = v1::DeviceIngest::NewStub(
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server.port()), *creds, args));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto stream = stub->StreamVitals(&context);

  constexpr uint64_t kBatches = 40;
  const uint64_t before = server.counters().batches;
  std::thread sending([&] {
    for (uint64_t b = 1; b <= kBatches; ++b) {
      v1::VitalsBatch batch;
      batch.set_batch_seq(b);
      for (uint64_t seq = (b - 1) * 1000 + 1; seq <= b * 1000; ++seq) {
        v1::VitalSample s = HeartRate(seq);
        s.set_ucum_unit("mm[Hg]");  // every sample rejected: each ack is about 14 KB
        *batch.add_samples() = s;
      }
      if (!stream->Write(batch)) return;
    }
    stream->WritesDone();
  });
  // The stream reads until it owes too much, then waits for the client.
  uint64_t read = 0;
  int unchanged = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  while (unchanged < 10 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(100));
    const uint64_t now = server.counters().batches - before;
    unchanged = now == read && now > 0 ? unchanged + 1 : 0;
    read = now;
  }
  ASSERT_EQ(unchanged, 10) << "the stream read " << read << " batches, never holding still for 1 s";
  EXPECT_LE(read, 16u) << "the stream kept reading while it owed more than 64 KiB of acks";
  // Stopped, not merely slow: it still holds after as long again and more.
  absl::SleepFor(absl::Seconds(2));
  EXPECT_EQ(server.counters().batches - before, read) << "the stream read on without its acks read";
  // Read, the acks come, and the stream reads on: every batch is answered.
  v1::IngestAck ack;
  uint64_t acked = 0;
  while (stream->Read(&ack)) {
    ++acked;
    EXPECT_EQ(ack.rejected_count(), 1000u);
  }
  sending.join();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(acked, kBatches);
}

TEST_F(IngestTest, EachValidationCaseHasItsReasonAndValidSamplesAreStored) {
  std::string patient = MonitoredPatientWithDevice("validation", "FR", "dev-validate");
  auto stub = Ingest(Device("acme", "dev-validate"));
  v1::VitalsBatch batch;
  batch.set_batch_seq(7);
  *batch.add_samples() = HeartRate(1);                       // 0 ok
  v1::VitalSample s = HeartRate(2);
  // 15 bytes, then a 2-byte character its detail would cut in half at 16 bytes: the ack must
  // still be UTF-8 (a proto3 string that is not fails to parse, and the device could never read
  // its ack).
  s.set_loinc_code("000000000000000\xc3\xa9");
  *batch.add_samples() = s;                                  // 1 unknown code
  s = HeartRate(3);
  s.set_ucum_unit("bpm");
  *batch.add_samples() = s;                                  // 2 wrong unit
  *batch.add_samples() = HeartRate(4, 400);                  // 3 out of range
  *batch.add_samples() = HeartRate(5, std::nan(""));         // 4 not finite
  s = HeartRate(6);
  *s.mutable_measured_at() = Ts(absl::Now() + absl::Minutes(10));
  *batch.add_samples() = s;                                  // 5 future
  s = HeartRate(7);
  *s.mutable_measured_at() = Ts(absl::Now() - absl::Hours(24 * 40));
  *batch.add_samples() = s;                                  // 6 too old
  *batch.add_samples() = HeartRate(8, 180);                  // 7 ok
  *batch.add_samples() = HeartRate(8);                       // 8 seq not increasing
  s = HeartRate(9);
  s.clear_measured_at();
  *batch.add_samples() = s;                                  // 9 no time
  s = HeartRate(10);
  s.mutable_location()->set_latitude(95);
  *batch.add_samples() = s;                                  // 10 latitude out of range
  s = HeartRate(11);
  s.mutable_measured_at()->set_nanos(-1);
  *batch.add_samples() = s;                                  // 11 not a valid Timestamp
  DeviceStream stream(*stub);
  auto ack = stream.Send(batch);
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 2u);
  EXPECT_EQ(ack->rejected_count(), 10u);
  std::vector<std::pair<uint32_t, v1::RejectReason>> got;
  for (const auto& r : ack->rejections()) {
    got.emplace_back(r.sample_index(), r.reason());
    EXPECT_FALSE(r.detail().empty());
  }
  EXPECT_THAT(ack->rejections(0).detail(), HasSubstr("LOINC code '000000000000000'"));
  EXPECT_THAT(got, ::testing::ElementsAre(
                       std::make_pair(1u, v1::REJECT_REASON_UNKNOWN_CODE),
                       std::make_pair(2u, v1::REJECT_REASON_WRONG_UNIT),
                       std::make_pair(3u, v1::REJECT_REASON_OUT_OF_RANGE),
                       std::make_pair(4u, v1::REJECT_REASON_NOT_FINITE),
                       std::make_pair(5u, v1::REJECT_REASON_TIME_IN_FUTURE),
                       std::make_pair(6u, v1::REJECT_REASON_TIME_TOO_OLD),
                       std::make_pair(8u, v1::REJECT_REASON_INVALID_SEQ),
                       std::make_pair(9u, v1::REJECT_REASON_MISSING_TIME),
                       std::make_pair(10u, v1::REJECT_REASON_INVALID_LOCATION),
                       std::make_pair(11u, v1::REJECT_REASON_MISSING_TIME)));
  EXPECT_THAT(ack->rejections(9).detail(), HasSubstr("measured_at is not a valid timestamp"));
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-validate'"), 2);
  // A batch over the bound ends the stream with a clear error; nothing of it is stored.
  DeviceStream big(*stub);
  EXPECT_FALSE(big.Send(Batch(8, 100, 1001)).has_value());
  grpc::Status status = big.Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("1001"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-validate'"), 2);
}

// Random batches over one stream: samples of several catalogue codes, valid or wrong in one way
// (unknown code, wrong unit, just out of range, NaN or infinite, no time, minutes in the future,
// weeks too old, a seq that does not increase, an impossible location), and now and then a batch
// sent again. Each ack rejects exactly the samples the catalogue's rules reject, in order and with
// their reasons; counts add up; valid samples above the device's cursor are stored and the others
// are duplicates; and the shard ends up holding exactly the valid samples, once each. Seeded
// (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(IngestTest, RandomBatchesAreValidatedSampleBySampleAndStoredOnce) {
  struct Kind {
    const char* loinc;
    const char* ucum;
    double min, max;
  };
  static const Kind kKinds[] = {{"8867-4", "/min", 20, 300},
                                {"2708-6", "%", 50, 100},
                                {"29463-7", "kg", 0.3, 400},
                                {"15074-8", "mmol/L", 0.5, 55}};
  const uint64_t seed = testing::FuzzSeed();
  const std::string device = absl::StrCat("dev-random-", seed % 100000);
  MonitoredPatientWithDevice(absl::StrCat("random-batches-", seed % 100000), "FR", device);
  auto stub = Ingest(Device("acme", device));
  DeviceStream stream(*stub);
  std::mt19937_64 rng = testing::FuzzRng(seed, 0);
  uint64_t next_seq = 1;
  uint64_t cursor = 0;                      // the device's highest stored seq, as modelled
  std::map<uint64_t, double> expect_stored;  // seq -> value
  std::vector<v1::VitalsBatch> sent;
  std::map<std::string, int> reasons;
  const int rounds = testing::FuzzRounds(60);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    v1::VitalsBatch batch;
    std::vector<v1::RejectReason> expected;  // per sample; UNSPECIFIED: valid
    if (!sent.empty() && testing::Uniform(rng, 0, 7) == 0) {
      batch = sent[testing::Uniform(rng, 0, sent.size() - 1)];  // sent again, as it was
    } else {
      batch.set_batch_seq(static_cast<uint64_t>(round) + 1);
      const uint64_t n = testing::Uniform(rng, 1, 20);
      for (uint64_t i = 0; i < n; ++i) {
        const Kind& kind = kKinds[testing::Uniform(rng, 0, 3)];
        v1::VitalSample* s = batch.add_samples();
        s->set_seq(next_seq++);
        s->set_loinc_code(kind.loinc);
        s->set_ucum_unit(kind.ucum);
        s->set_value(kind.min + (kind.max - kind.min) *
                                    static_cast<double>(testing::Uniform(rng, 0, 1000)) / 1000);
        *s->mutable_measured_at() =
            Ts(absl::Now() + absl::Seconds(static_cast<int64_t>(testing::Uniform(rng, 0, 120))));
        switch (testing::Uniform(rng, 0, 15)) {
          case 0: s->set_loinc_code("1234-5"); break;
          case 1: s->set_ucum_unit("bpm"); break;
          case 2:
            s->set_value(testing::Uniform(rng, 0, 1) == 0 ? kind.min - 0.01 : kind.max + 0.01);
            break;
          case 3:
            s->set_value(testing::Uniform(rng, 0, 1) == 0
                             ? std::nan("")
                             : std::numeric_limits<double>::infinity());
            break;
          case 4: s->clear_measured_at(); break;
          case 5:
            *s->mutable_measured_at() = Ts(absl::Now() + absl::Minutes(static_cast<int64_t>(
                                                             testing::Uniform(rng, 10, 60))));
            break;
          case 6:
            *s->mutable_measured_at() = Ts(absl::Now() - absl::Hours(24 * static_cast<int64_t>(
                                                             testing::Uniform(rng, 31, 90))));
            break;
          case 7:
            if (s->seq() > 1) {
              s->set_seq(s->seq() - testing::Uniform(rng, 1, std::min<uint64_t>(3, s->seq() - 1)));
            }
            break;
          case 8:
            s->mutable_location()->set_latitude(testing::Uniform(rng, 0, 1) == 0 ? 91 : -91);
            break;
          default:
            break;
        }
      }
    }
    // The rules, in the order the catalogue applies them.
    uint64_t previous = 0;
    uint64_t highest_valid = 0;
    for (const v1::VitalSample& s : batch.samples()) {
      v1::RejectReason r = v1::REJECT_REASON_UNSPECIFIED;
      const Kind* kind = nullptr;
      for (const Kind& k : kKinds) {
        if (s.loinc_code() == k.loinc) kind = &k;
      }
      const absl::Time t = absl::FromUnixSeconds(s.measured_at().seconds());
      if (s.seq() == 0 || s.seq() <= previous) r = v1::REJECT_REASON_INVALID_SEQ;
      else if (kind == nullptr) r = v1::REJECT_REASON_UNKNOWN_CODE;
      else if (s.ucum_unit() != kind->ucum) r = v1::REJECT_REASON_WRONG_UNIT;
      else if (!std::isfinite(s.value())) r = v1::REJECT_REASON_NOT_FINITE;
      else if (s.value() < kind->min || s.value() > kind->max) r = v1::REJECT_REASON_OUT_OF_RANGE;
      else if (!s.has_measured_at()) r = v1::REJECT_REASON_MISSING_TIME;
      else if (t > absl::Now() + absl::Minutes(5)) r = v1::REJECT_REASON_TIME_IN_FUTURE;
      else if (t < absl::Now() - absl::Hours(24 * 30)) r = v1::REJECT_REASON_TIME_TOO_OLD;
      else if (s.has_location() && std::abs(s.location().latitude()) > 90) {
        r = v1::REJECT_REASON_INVALID_LOCATION;
      }
      previous = std::max(previous, s.seq());
      expected.push_back(r);
      if (r == v1::REJECT_REASON_UNSPECIFIED) highest_valid = std::max(highest_valid, s.seq());
    }
    std::optional<v1::IngestAck> ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    ASSERT_FALSE(ack->has_retryable_error()) << ack->retryable_error().message();
    std::vector<std::pair<uint32_t, v1::RejectReason>> want;
    uint32_t stored = 0;
    uint32_t duplicates = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      const v1::VitalSample& s = batch.samples(static_cast<int>(i));
      if (expected[i] != v1::REJECT_REASON_UNSPECIFIED) {
        want.emplace_back(static_cast<uint32_t>(i), expected[i]);
        ++reasons[v1::RejectReason_Name(expected[i])];
      } else if (s.seq() > cursor) {
        ++stored;
        expect_stored[s.seq()] = s.value();
      } else {
        ++duplicates;
      }
    }
    cursor = std::max(cursor, highest_valid);
    std::vector<std::pair<uint32_t, v1::RejectReason>> got;
    for (const auto& r : ack->rejections()) got.emplace_back(r.sample_index(), r.reason());
    EXPECT_EQ(got, want);
    EXPECT_EQ(ack->stored_count(), stored);
    EXPECT_EQ(ack->duplicate_count(), duplicates);
    EXPECT_EQ(ack->rejected_count(), want.size());
    if (stored + duplicates > 0) {
      EXPECT_EQ(ack->highest_committed_seq(), cursor);
    }
    sent.push_back(batch);
    if (HasFailure()) break;
  }
  EXPECT_TRUE(stream.Finish().ok());
  std::map<uint64_t, double> in_shard;
  {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    for (const pqxx::row& row :
         q.exec_params("SELECT seq, value FROM vitals WHERE device_id = $1", device)) {
      EXPECT_TRUE(in_shard.emplace(row[0].as<uint64_t>(), row[1].as<double>()).second)
          << "seq " << row[0].as<uint64_t>() << " stored twice";
    }
  }
  EXPECT_EQ(in_shard, expect_stored);
  for (const auto& [reason, n] : reasons) std::printf("%s: %d samples\n", reason.c_str(), n);
  std::printf("stored: %zu samples\n", expect_stored.size());
}

// A batch's message is bounded before it is read (256 KiB: a thousand samples with every field at
// its largest fit in under 100 KiB), and its batch_seq must be at least 1: either fault ends the
// stream and stores nothing.
TEST_F(IngestTest, ABatchMessageIsBoundedAndNeedsABatchSeq) {
  MonitoredPatientWithDevice("batch-bounds", "FR", "dev-batch-bounds");
  auto stub = Ingest(Device("acme", "dev-batch-bounds"));
  // The largest valid batch: 1000 samples, every field set, seqs of the largest size.
  v1::VitalsBatch largest = Batch(std::numeric_limits<int64_t>::max(), 1, 1000);
  for (int i = 0; i < largest.samples_size(); ++i) {
    v1::VitalSample* sample = largest.mutable_samples(i);
    sample->set_seq(static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) - 1000 + i);
    sample->mutable_location()->set_latitude(-89.123456789);
    sample->mutable_location()->set_longitude(-179.123456789);
    sample->mutable_location()->set_accuracy_m(12345.678);
    sample->mutable_measured_at()->set_nanos(999999999);
  }
  ASSERT_LT(largest.ByteSizeLong(), 100u * 1024);
  DeviceStream ok(*stub);
  std::optional<v1::IngestAck> ack = ok.Send(largest);
  ASSERT_TRUE(ack.has_value()) << ok.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 1000u);
  EXPECT_TRUE(ok.Finish().ok());
  // Past the bound: refused before it is parsed, whatever it holds.
  v1::VitalsBatch too_large = Batch(2, 1, 1);
  for (int i = 0; i < 150 * 1024; ++i) too_large.add_samples();  // 2 bytes each on the wire
  ASSERT_GT(too_large.ByteSizeLong(), 256u * 1024);
  DeviceStream big(*stub);
  EXPECT_FALSE(big.Send(too_large).has_value());
  grpc::Status refused = big.Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  // batch_seq 0.
  DeviceStream zero(*stub);
  EXPECT_FALSE(zero.Send(Batch(0, 1, 1)).has_value());
  refused = zero.Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.error_message(), HasSubstr("batch_seq must be at least 1"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-batch-bounds'"), 1000);
}

// A message that does not parse as a VitalsBatch (here a unit that is not UTF-8, which a proto3
// string must be: a device's protobuf library may send it anyway) ends the stream with
// INVALID_ARGUMENT saying so, after the batches read before it are answered and stored. Parsed by
// gRPC it read as the end of the stream: the stream ended OK without an answer, and a device
// resent the batch on its next stream, forever.
TEST_F(IngestTest, AMessageThatIsNotABatchEndsTheStreamInvalidAfterEarlierAcks) {
  MonitoredPatientWithDevice("not-a-batch", "FR", "dev-not-a-batch");
  auto stub = Ingest(Device("acme", "dev-not-a-batch"));
  v1::VitalsBatch latin1 = Batch(2, 3, 2);
  latin1.mutable_samples(1)->set_ucum_unit("\xb5g");  // "µg" in Latin-1
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->StreamVitals(&context);
  // Both written before any ack is read: the first is answered all the same.
  ASSERT_TRUE(stream->Write(Batch(1, 1, 2)));
  stream->Write(latin1);
  std::vector<v1::IngestAck> acks;
  for (v1::IngestAck ack; stream->Read(&ack);) acks.push_back(ack);
  const grpc::Status ended = stream->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("the message after batch_seq 1 is not a VitalsBatch"));
  EXPECT_THAT(ended.error_message(), HasSubstr("UTF-8"));
  ASSERT_EQ(acks.size(), 1u);
  EXPECT_EQ(acks[0].batch_seq(), 1u);
  EXPECT_EQ(acks[0].stored_count(), 2u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-not-a-batch'"), 2);
  // The next stream of the device works.
  DeviceStream next(*stub);
  std::optional<v1::IngestAck> ack = next.Send(Batch(3, 5, 1));
  ASSERT_TRUE(ack.has_value()) << next.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 1u);
  EXPECT_TRUE(next.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-not-a-batch'"), 3);
}

// The handshake verifies a device's certificate once, and a stream would outlive it. One
// device's certificate is revoked (a CRL written while it streams), another's expires: each
// stream's next batch is not stored, and the stream ends UNAUTHENTICATED saying why, after its
// earlier batches were answered and stored. Another device's stream on the same server goes on.
TEST_F(IngestTest, AStreamEndsAtItsNextBatchOnceItsCertificateIsRevokedOrExpired) {
  const std::string crl_dir = SuitePath("ingest-crl");
  std::filesystem::create_directories(crl_dir);
  std::unique_ptr<ExtraIngest> extra = StartIngest(
      "ingest: {tenant_samples_per_second: 1000000}\n", 0, "", nullptr, crl_dir);
  ASSERT_NE(extra, nullptr);
  MonitoredPatientWithDevice("revoked-mid", "FR", "dev-revoked-mid");
  MonitoredPatientWithDevice("expires-mid", "FR", "dev-expires-mid");
  MonitoredPatientWithDevice("stays-mid", "FR", "dev-stays-mid");
  const TestCert revoked = Device("acme", "dev-revoked-mid");
  const TestCert expiring = Device("acme", "dev-expires-mid", absl::Seconds(5));
  const absl::Time expires = absl::Now() + absl::Seconds(5);
  auto revoked_stub = Ingest(revoked, extra->server->port());
  auto expiring_stub = Ingest(expiring, extra->server->port());
  auto stays_stub = Ingest(Device("acme", "dev-stays-mid"), extra->server->port());
  DeviceStream revoked_stream(*revoked_stub);
  DeviceStream expiring_stream(*expiring_stub);
  DeviceStream stays_stream(*stays_stub);
  for (DeviceStream* stream : {&revoked_stream, &expiring_stream, &stays_stream}) {
    std::optional<v1::IngestAck> ack = stream->Send(Batch(1, 1, 2));
    ASSERT_TRUE(ack.has_value()) << stream->Finish().error_message();
    EXPECT_EQ(ack->stored_count(), 2u);
  }
  ASSERT_TRUE(pki().WriteCrl({revoked.serial}, crl_dir).ok());
  // Past the expiry, and past the server's next look at its CRL directory (every second).
  absl::SleepFor(expires - absl::Now() + absl::Seconds(1));

  EXPECT_FALSE(revoked_stream.Send(Batch(2, 3, 2)).has_value());
  const grpc::Status revoked_end = revoked_stream.Finish();
  EXPECT_EQ(revoked_end.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << revoked_end.error_message();
  EXPECT_THAT(revoked_end.error_message(), HasSubstr(absl::StrCat("serial ", revoked.serial)));
  EXPECT_THAT(revoked_end.error_message(), HasSubstr("revoked"));
  EXPECT_FALSE(expiring_stream.Send(Batch(2, 3, 2)).has_value());
  const grpc::Status expired_end = expiring_stream.Finish();
  EXPECT_EQ(expired_end.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << expired_end.error_message();
  EXPECT_THAT(expired_end.error_message(), HasSubstr("expired at"));
  std::optional<v1::IngestAck> goes_on = stays_stream.Send(Batch(2, 3, 2));
  ASSERT_TRUE(goes_on.has_value()) << stays_stream.Finish().error_message();
  EXPECT_EQ(goes_on->stored_count(), 2u);
  EXPECT_TRUE(stays_stream.Finish().ok());

  EXPECT_EQ(Count("fr-1", "device_id = 'dev-revoked-mid'"), 2);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-expires-mid'"), 2);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-stays-mid'"), 4);
  // A new stream of the revoked device is refused in its handshake.
  auto again_stub = Ingest(revoked, extra->server->port());
  DeviceStream again(*again_stub);
  EXPECT_FALSE(again.Send(Batch(3, 5, 1)).has_value());
  EXPECT_EQ(again.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-revoked-mid'"), 2);
}

// A device renews its certificate files before the old certificate expires. Its open connection
// still carries the old one: once that expires, the server ends the stream at its next batch
// (UNAUTHENTICATED) and would refuse every stream on that connection. The SDK dials a new
// connection, with the renewed files, and delivers the batch: nothing is lost or held for the
// connection's maximum age.
TEST_F(IngestTest, TheSdkDialsAgainWithItsRenewedCertificateOnceTheOldOneIsRefused) {
  MonitoredPatientWithDevice("renews", "FR", "dev-renews");
  const TestCert first = Device("acme", "dev-renews", absl::Seconds(5));
  const absl::Time expires = absl::Now() + absl::Seconds(5);
  device::DeviceOptions options = SdkOptions(first, "renews");
  options.backoff_initial = absl::Milliseconds(100);
  options.backoff_max = absl::Milliseconds(500);
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  const TestCert renewed = Device("acme", "dev-renews");  // the same files, a year's validity
  ASSERT_EQ(renewed.cert_path, first.cert_path);
  absl::SleepFor(expires - absl::Now() + absl::Seconds(1));

  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  EXPECT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  const device::DeviceStats stats = (*client)->stats();
  (*client)->Stop();
  EXPECT_GE(stats.stream_failures, 1u);
  EXPECT_THAT(stats.last_stream_error, HasSubstr("expired at"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-renews'"), 20);
}

// A channel the app gave the SDK is the app's: after UNAUTHENTICATED the SDK streams on it again
// rather than dial a connection of its own (here its options name an address where nothing
// listens, which such a dial would report).
TEST_F(IngestTest, TheSdkKeepsAChannelTheAppGaveItAfterItsCertificateIsRefused) {
  MonitoredPatientWithDevice("app-channel", "FR", "dev-app-channel");
  const TestCert cert = Device("acme", "dev-app-channel", absl::Seconds(5));
  const absl::Time expires = absl::Now() + absl::Seconds(5);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      MakeChannel(absl::StrCat("127.0.0.1:", ingest_->port()),
                  TlsConfig{cert.cert_path, cert.key_path, pki().ca_path(), 60},
                  pki().SpiffeId("/service/ingest"));
  ASSERT_TRUE(channel.ok()) << channel.status();
  device::DeviceOptions options = SdkOptions(cert, "app-channel");
  options.address = "127.0.0.1:1";
  options.backoff_initial = absl::Milliseconds(100);
  options.backoff_max = absl::Milliseconds(300);
  auto client = device::DeviceClient::Open(options, *channel);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  absl::SleepFor(expires - absl::Now() + absl::Seconds(1));

  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  const bool refused_again = PollUntil(absl::Now() + absl::Seconds(30), [&] {
    return (*client)->stats().stream_failures >= 3;
  });
  const device::DeviceStats stats = (*client)->stats();
  (*client)->Stop();
  EXPECT_TRUE(refused_again) << stats.stream_failures << " stream failures";
  EXPECT_THAT(stats.last_stream_error, HasSubstr("expired at"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-app-channel'"), 10);
  std::filesystem::remove(options.buffer_path);
}

// The device SDK refuses a batch with a code or unit that is not UTF-8 when it is sent, buffering
// nothing: the server could not read it (above). The batches around it are delivered.
TEST_F(IngestTest, TheSdkRefusesABatchThatIsNotUtf8WhenItIsSent) {
  MonitoredPatientWithDevice("sdk-not-utf8", "FR", "dev-sdk-not-utf8");
  device::DeviceOptions options = SdkOptions(Device("acme", "dev-sdk-not-utf8"), "sdk-not-utf8");
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<v1::VitalSample> latin1 = HeartRates(3);
  latin1[1].set_ucum_unit("\xb5g");  // "µg" in Latin-1
  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  absl::StatusOr<uint64_t> refused = (*client)->Send(latin1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("samples[1].ucum_unit is not valid UTF-8"));
  latin1[1] = HeartRates(1)[0];
  latin1[2].set_loinc_code("8867-4\xff");
  EXPECT_THAT(std::string((*client)->Send(latin1).status().message()),
              HasSubstr("samples[2].loinc_code is not valid UTF-8"));
  ASSERT_TRUE((*client)->Send(HeartRates(10)).ok());
  EXPECT_EQ((*client)->pending(), 2u);
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  (*client)->Stop();
  const device::DeviceStats stats = (*client)->stats();
  EXPECT_EQ(stats.batches_acked, 2u);
  EXPECT_EQ(stats.batches_rejected, 0u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-not-utf8'"), 20);
  std::filesystem::remove(options.buffer_path);
}

// A sample is the patient's only if the device fed that patient when it was measured: one
// measured before the device's current assignment began (a former patient's, buffered on the
// device through a reassignment, or from while it fed nobody) is refused with its own reason, and
// the batch's other samples are stored.
TEST_F(IngestTest, SamplesMeasuredBeforeTheAssignmentAreNotThePatients) {
  const absl::Time before_assignment = absl::Now() - absl::Seconds(30);
  const std::string patient = MonitoredPatientWithDevice("assigned-late", "FR", "dev-assigned-late");
  auto stub = Ingest(Device("acme", "dev-assigned-late"));
  v1::VitalsBatch batch;
  batch.set_batch_seq(1);
  v1::VitalSample early = HeartRate(1);
  *early.mutable_measured_at() = Ts(before_assignment);
  *batch.add_samples() = early;        // 0: before the assignment
  *batch.add_samples() = HeartRate(2);  // 1: measured now
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(batch);
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 1u);
  ASSERT_EQ(ack->rejected_count(), 1u);
  EXPECT_EQ(ack->rejections(0).sample_index(), 0u);
  EXPECT_EQ(ack->rejections(0).reason(), v1::REJECT_REASON_BEFORE_ASSIGNMENT);
  EXPECT_THAT(ack->rejections(0).detail(), HasSubstr("before this device's assignment"));
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-assigned-late'"), 1);
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = 'dev-assigned-late' AND patient_id = '", patient,
                                       "' AND seq = 2")),
            1);
}

TEST_F(IngestTest, WithoutConsentNothingIsStoredAndLocationNeedsGeolocation) {
  const std::string refused_patient = PatientWithDevice("no-consent", "FR", "dev-noconsent");
  auto stub = Ingest(Device("acme", "dev-noconsent"));
  DeviceStream stream(*stub);
  auto ack = stream.Send(Batch(1, 1, 5));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 0u);
  ASSERT_EQ(ack->rejected_count(), 5u);
  EXPECT_EQ(ack->rejections(0).reason(), v1::REJECT_REASON_NO_CONSENT);
  EXPECT_THAT(ack->rejections(0).detail(), HasSubstr("REMOTE_MONITORING"));
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-noconsent'"), 0);
  // The refusal is in the patient's chain, committed before the ack: who tried, for which batch,
  // why, and how many samples it refused.
  {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    pqxx::result denials = q.exec_params(
        "SELECT actor, decision, reason, purpose, request_id, object_id FROM audit_log "
        "WHERE patient_id = $1 AND object_type = 'vitals'",
        refused_patient);
    ASSERT_EQ(denials.size(), 1u);
    EXPECT_EQ(denials[0][0].as<std::string>(), pki().SpiffeId("/tenant/acme/device/dev-noconsent"));
    EXPECT_EQ(denials[0][1].as<std::string>(), "deny");
    EXPECT_EQ(denials[0][2].as<std::string>(), "NO_CONSENT: refused=5 categories=heart-rate");
    EXPECT_EQ(denials[0][3].as<std::string>(), "REMOTE_MONITORING");
    EXPECT_EQ(denials[0][4].as<std::string>(), "batch:1");
    EXPECT_EQ(denials[0][5].as<std::string>(), "dev-noconsent");
  }

  std::string patient = MonitoredPatientWithDevice("geo", "FR", "dev-geo");
  auto geo_stub = Ingest(Device("acme", "dev-geo"));
  DeviceStream geo(*geo_stub);
  v1::VitalsBatch batch = Batch(1, 1, 1);
  batch.mutable_samples(0)->mutable_location()->set_latitude(48.85);
  batch.mutable_samples(0)->mutable_location()->set_longitude(2.35);
  ack = geo.Send(batch);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 1u);
  EXPECT_EQ(ack->locations_dropped_count(), 1u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-geo' AND latitude IS NULL"), 1);
  // Resent (its ack lost, say), it stores nothing: no location of it is dropped this time.
  ack = geo.Send(batch);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 0u);
  EXPECT_EQ(ack->duplicate_count(), 1u);
  EXPECT_EQ(ack->locations_dropped_count(), 0u);
  // With GEOLOCATION consent (reaching ingest's cache within a second), location is kept.
  Grant(patient, v1::PURPOSE_GEOLOCATION);
  uint64_t seq = 1;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  do {
    ++seq;
    v1::VitalsBatch next = Batch(seq, seq, 1);
    *next.mutable_samples(0)->mutable_location() = batch.samples(0).location();
    ack = geo.Send(next);
    ASSERT_TRUE(ack.has_value());
  } while (ack->locations_dropped_count() == 1 && absl::Now() < deadline);
  EXPECT_EQ(ack->locations_dropped_count(), 0u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-geo' AND latitude = 48.85"), 1);
  // A batch whose first sample was stored before: its entry counts the location it stores.
  const uint64_t overlapping = seq + 1;
  {
    v1::VitalsBatch next = Batch(overlapping, seq, 2);
    for (int i = 0; i < 2; ++i) {
      *next.mutable_samples(i)->mutable_location() = batch.samples(0).location();
    }
    ack = geo.Send(next);
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->stored_count(), 1u);
    EXPECT_EQ(ack->duplicate_count(), 1u);
  }
  EXPECT_TRUE(geo.Finish().ok());
  // Each stored batch's entry says what became of its locations: dropped, and why, then kept
  // under the GEOLOCATION consent it cites.
  {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    const std::string geolocation_consent = ConsentId(patient, "GEOLOCATION");
    auto reason_of = [&](uint64_t batch_seq) {
      pqxx::result rows = q.exec_params(
          "SELECT reason FROM audit_log WHERE patient_id = $1 AND object_type = 'vitals' AND "
          "request_id = $2",
          patient, absl::StrCat("batch:", batch_seq));
      return rows.size() == 1 ? rows[0][0].as<std::string>() : std::string("(none)");
    };
    EXPECT_THAT(reason_of(1), ::testing::StartsWith(
                                  "PERMITTED: stored=1 duplicates=0 locations_dropped=1 GEOLOCATION="));
    EXPECT_EQ(reason_of(seq), absl::StrCat("PERMITTED: stored=1 duplicates=0 locations=1 GEOLOCATION=",
                                           geolocation_consent, "/v1"));
    EXPECT_EQ(reason_of(overlapping),
              absl::StrCat("PERMITTED: stored=1 duplicates=1 locations=1 GEOLOCATION=",
                           geolocation_consent, "/v1"));
  }
}

// A consent narrowed to some measures: a batch's samples of those are stored, the others are
// rejected for consent, and the batch's two audit entries (what it stored, what it refused) are in
// the same transaction. A practitioner's CARE narrowed the same way reads only those measures.
TEST_F(IngestTest, AConsentNarrowedToSomeMeasuresCoversOnlyThose) {
  const std::string patient = PatientWithDevice("narrowed-measures", "FR", "dev-narrowed");
  Grant(patient, v1::PURPOSE_REMOTE_MONITORING, "", pki().app(), {"heart-rate"});
  Grant(patient, v1::PURPOSE_CARE, "", pki().app(), {"heart-rate"});
  v1::VitalsBatch batch = Batch(1, 1, 3);
  v1::VitalSample* glucose = batch.mutable_samples(1);
  glucose->set_loinc_code("2339-0");
  glucose->set_ucum_unit("mg/dL");
  glucose->set_value(110);
  auto stub = Ingest(Device("acme", "dev-narrowed"));
  DeviceStream stream(*stub);
  for (int attempt = 0; attempt < 2; ++attempt) {  // the second, a resend
    auto ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->stored_count(), attempt == 0 ? 2u : 0u);
    EXPECT_EQ(ack->duplicate_count(), attempt == 0 ? 0u : 2u);
    ASSERT_EQ(ack->rejected_count(), 1u);
    EXPECT_EQ(ack->rejections(0).sample_index(), 1u);
    EXPECT_EQ(ack->rejections(0).reason(), v1::REJECT_REASON_NO_CONSENT);
    EXPECT_EQ(ack->rejections(0).detail(),
              "no REMOTE_MONITORING consent for this patient's blood-glucose samples "
              "(CATEGORY_NOT_COVERED)");
  }
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-narrowed' AND loinc = '8867-4'"), 2);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-narrowed' AND loinc = '2339-0'"), 0);
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::nontransaction q(c);
    const std::string monitoring = ConsentId(patient, "REMOTE_MONITORING");
    const pqxx::result entries = q.exec_params(
        "SELECT decision, reason, consent_id, consent_version FROM audit_log WHERE patient_id = $1 "
        "AND object_type = 'vitals' AND action = 'create' ORDER BY seq",
        patient);
    ASSERT_EQ(entries.size(), 3u);  // the first send's two, the resend's refusal
    EXPECT_EQ(entries[0][0].as<std::string>(), "permit");
    EXPECT_EQ(entries[0][1].as<std::string>(), "PERMITTED: stored=2 duplicates=0");
    for (int i : {1, 2}) {
      EXPECT_EQ(entries[i][0].as<std::string>(), "deny");
      EXPECT_EQ(entries[i][1].as<std::string>(),
                "CATEGORY_NOT_COVERED: refused=1 categories=blood-glucose");
    }
    for (const pqxx::row& e : entries) {
      EXPECT_EQ(e[2].as<std::string>(), monitoring);
      EXPECT_EQ(e[3].as<int64_t>(), 1);
    }
  }
  // A glucose reading stored before the narrowing (by SQL here) is not read under it.
  {
    pqxx::work txn(c);
    txn.exec_params(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) VALUES ('acme', 'dev-narrowed', 100, $1, '2339-0', 120, 'mg/dL', now())",
        patient);
    txn.commit();
  }
  auto read = [&](std::vector<std::string> codes, std::vector<v1::VitalReading>* out) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    for (const std::string& code : codes) request.add_loinc_codes(code);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
      for (const auto& r : response.readings()) out->push_back(r);
    }
    return reader->Finish();
  };
  std::vector<v1::VitalReading> readings;
  grpc::Status refused = read({"8867-4", "2339-0"}, &readings);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(refused.error_message(),
              HasSubstr("no CARE consent for this patient's blood-glucose readings "
                        "(CATEGORY_NOT_COVERED"));
  EXPECT_TRUE(readings.empty());
  grpc::Status every = read({}, &readings);
  ASSERT_TRUE(every.ok()) << every.error_message();
  ASSERT_EQ(readings.size(), 2u);
  for (const v1::VitalReading& r : readings) EXPECT_EQ(r.sample().loinc_code(), "8867-4");
  {
    pqxx::nontransaction q(c);
    const pqxx::result reads = q.exec_params(
        "SELECT decision, reason FROM audit_log WHERE patient_id = $1 AND object_type = 'vitals' "
        "AND action = 'read' ORDER BY seq",
        patient);
    ASSERT_EQ(reads.size(), 2u);
    EXPECT_EQ(reads[0][0].as<std::string>(), "deny");
    EXPECT_EQ(reads[0][1].as<std::string>(), "CATEGORY_NOT_COVERED: category=blood-glucose");
    EXPECT_EQ(reads[1][0].as<std::string>(), "permit");
    EXPECT_EQ(reads[1][1].as<std::string>(),
              "PERMITTED: readings=2 categories_withheld=blood-glucose,blood-pressure,"
              "body-temperature,body-weight,oxygen-saturation,respiratory-rate");
  }
  // The practitioner's own CARE for glucose: the read now rests on two consents, the practitioner's
  // for glucose and the tenant-wide one for heart rate, and its entry names both.
  Grant(patient, v1::PURPOSE_CARE, pki().SpiffeId("/tenant/acme/practitioner/p-1"), pki().app(),
        {"blood-glucose"});
  readings.clear();
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(10), [&] {
    readings.clear();
    return read({}, &readings).ok() && readings.size() == 3;
  }));
  {
    pqxx::nontransaction q(c);
    const std::string own =
        ConsentId(patient, "CARE", pki().SpiffeId("/tenant/acme/practitioner/p-1"));
    const std::string tenant_wide = ConsentId(patient, "CARE");
    const pqxx::row last = q.exec_params1(
        "SELECT reason, consent_id FROM audit_log WHERE patient_id = $1 AND object_type = 'vitals' "
        "AND action = 'read' ORDER BY seq DESC LIMIT 1",
        patient);
    // Codes in order: glucose (2339-0) comes before heart rate (8867-4).
    EXPECT_EQ(last[1].as<std::string>(), own);
    EXPECT_EQ(last[0].as<std::string>(),
              absl::StrCat("PERMITTED: readings=3 also_under=", tenant_wide,
                           "/v1 categories_withheld=blood-pressure,body-temperature,body-weight,"
                           "oxygen-saturation,respiratory-rate"));
  }
  // A patient whose CARE covers documents only: a read of every code covers no measure, and says so.
  const std::string documents_only = PatientWithDevice("narrowed-to-documents", "FR", "dev-docs");
  Grant(documents_only, v1::PURPOSE_CARE, "", pki().app(), {"document"});
  {
    v1::ReadVitalsRequest request;
    request.set_patient_id(documents_only);
    request.set_purpose(v1::PURPOSE_CARE);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    EXPECT_FALSE(reader->Read(&response));
    grpc::Status none = reader->Finish();
    EXPECT_EQ(none.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(none.error_message(),
                HasSubstr("no CARE consent for this patient covers any measure of vitals "
                          "(CATEGORY_NOT_COVERED"));
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok());
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// A withdrawal of REMOTE_MONITORING reaches a stream already open: once ingest knows of it (its
// consent cache hears of it within about a second), every later batch is refused for it and
// nothing more is stored; what was stored before stays.
TEST_F(IngestTest, AWithdrawalStopsAStreamAlreadyOpenFromStoring) {
  std::string patient = MonitoredPatientWithDevice("withdrawn-mid-stream", "FR", "dev-withdrawn");
  auto stub = Ingest(Device("acme", "dev-withdrawn"));
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
  ASSERT_TRUE(ack.has_value());
  ASSERT_EQ(ack->stored_count(), 5u);
  Revoke(patient, v1::PURPOSE_REMOTE_MONITORING);
  uint64_t batch_seq = 1;
  uint64_t stored_after_revocation = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  do {
    ++batch_seq;
    ack = stream.Send(Batch(batch_seq, 5 * batch_seq - 4, 5));
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    stored_after_revocation += ack->stored_count();
  } while (ack->rejected_count() == 0 && absl::Now() < deadline);
  ASSERT_EQ(ack->rejected_count(), 5u);
  EXPECT_EQ(ack->rejections(0).reason(), v1::REJECT_REASON_NO_CONSENT);
  // From then on, every batch is refused.
  for (int i = 0; i < 5; ++i) {
    ++batch_seq;
    ack = stream.Send(Batch(batch_seq, 5 * batch_seq - 4, 5));
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->stored_count(), 0u);
    EXPECT_EQ(ack->rejected_count(), 5u);
  }
  EXPECT_TRUE(stream.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-withdrawn'"),
            static_cast<int64_t>(5 + stored_after_revocation));
}

// A device resends samples whose commit it never heard of (its connection broke at the COMMIT,
// which happened) after the patient withdrew REMOTE_MONITORING: the samples already stored are
// answered as the duplicates they are, not refused (they were stored under the consent of their
// first send, and the ack must say they are stored); samples of the same batch never stored are
// refused, though their seqs are below the device's cursor, and only they are counted in the
// refusal's audit entry.
TEST_F(IngestTest, StoredSamplesResentAfterAWithdrawalAreDuplicatesNotRefusals) {
  const std::string patient =
      MonitoredPatientWithDevice("withdrawn-resend", "FR", "dev-withdrawn-resend");
  auto stub = Ingest(Device("acme", "dev-withdrawn-resend"));
  const v1::VitalsBatch first = Batch(1, 1, 5);  // seqs 1-5
  {
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(first);
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    ASSERT_EQ(ack->stored_count(), 5u);
    ack = stream.Send(Batch(2, 50, 5));  // the device's cursor at 54
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    ASSERT_EQ(ack->stored_count(), 5u);
    EXPECT_TRUE(stream.Finish().ok());
  }
  Revoke(patient, v1::PURPOSE_REMOTE_MONITORING);
  // New samples (seqs from 100) until the service has seen the withdrawal.
  DeviceStream stream(*stub);
  uint64_t batch_seq = 2;
  uint64_t probes_stored = 0;
  std::optional<v1::IngestAck> probe;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  do {
    ++batch_seq;
    probe = stream.Send(Batch(batch_seq, 100 + 5 * batch_seq, 5));
    ASSERT_TRUE(probe.has_value()) << stream.Finish().error_message();
    probes_stored += probe->stored_count();
  } while (probe->rejected_count() == 0 && absl::Now() < deadline);
  ASSERT_EQ(probe->rejected_count(), 5u);
  ASSERT_EQ(probe->rejections(0).reason(), v1::REJECT_REASON_NO_CONSENT);

  v1::VitalsBatch resend = first;
  resend.set_batch_seq(++batch_seq);
  const uint64_t resend_seq = batch_seq;
  std::optional<v1::IngestAck> ack = stream.Send(resend);
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 0u);
  EXPECT_EQ(ack->duplicate_count(), 5u);
  EXPECT_EQ(ack->rejected_count(), 0u);
  EXPECT_EQ(ack->rejections_size(), 0);

  // Samples 4 and 5 again, with 6 and 7, never sent before.
  v1::VitalsBatch mixed;
  mixed.set_batch_seq(++batch_seq);
  const uint64_t mixed_seq = batch_seq;
  *mixed.add_samples() = first.samples(3);
  *mixed.add_samples() = first.samples(4);
  *mixed.add_samples() = HeartRate(6);
  *mixed.add_samples() = HeartRate(7);
  ack = stream.Send(mixed);
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 0u);
  EXPECT_EQ(ack->duplicate_count(), 2u);
  EXPECT_EQ(ack->rejected_count(), 2u);
  ASSERT_EQ(ack->rejections_size(), 2);
  EXPECT_EQ(ack->rejections(0).sample_index(), 2u);
  EXPECT_EQ(ack->rejections(0).seq(), 6u);
  EXPECT_EQ(ack->rejections(0).reason(), v1::REJECT_REASON_NO_CONSENT);
  EXPECT_EQ(ack->rejections(1).seq(), 7u);
  EXPECT_TRUE(stream.Finish().ok());

  EXPECT_EQ(Count("fr-1", "device_id = 'dev-withdrawn-resend'"),
            static_cast<int64_t>(10 + probes_stored));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-withdrawn-resend' AND seq IN (6, 7)"), 0);
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::nontransaction q(c);
  auto denials = [&](uint64_t batch) {
    std::vector<std::string> reasons;
    for (const pqxx::row& row : q.exec_params(
             "SELECT reason FROM audit_log WHERE patient_id = $1 AND object_type = 'vitals' "
             "AND decision = 'deny' AND request_id = $2",
             patient, absl::StrCat("batch:", batch))) {
      reasons.push_back(row[0].as<std::string>());
    }
    return reasons;
  };
  EXPECT_THAT(denials(resend_seq), ::testing::IsEmpty());
  const std::vector<std::string> mixed_denials = denials(mixed_seq);
  ASSERT_EQ(mixed_denials.size(), 1u);
  EXPECT_THAT(mixed_denials[0], ::testing::EndsWith(": refused=2 categories=heart-rate"));
}

TEST_F(IngestTest, OnlyAssignedDevicesMayStreamAndOnlyDevicesMayStream) {
  // A device of another tenant, or one never assigned, cannot write for anybody.
  auto stub = Ingest(pki().globex_device());
  DeviceStream stream(*stub);
  EXPECT_FALSE(stream.Send(Batch(1, 1, 1)).has_value());
  grpc::Status status = stream.Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("not assigned"));
  // An app certificate may not stream vitals; a device may not read them.
  auto app = Ingest(pki().app());
  DeviceStream as_app(*app);
  as_app.Send(Batch(1, 1, 1));
  EXPECT_EQ(as_app.Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::ReadVitalsRequest read;
  read.set_patient_id("pt_x");
  read.set_purpose(v1::PURPOSE_CARE);
  grpc::ClientContext context;
  auto reader = Ingest(pki().device())->ReadVitals(&context, read);
  v1::ReadVitalsResponse response;
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Count("fr-1", "tenant_id = 'globex'"), 0);
}

// Device ids are a tenant's own: another tenant's device of the same id is not the one assigned,
// and writes for nobody; the tenant's own device of that id writes for its patient.
TEST_F(IngestTest, ADeviceOfAnotherTenantWithTheSameIdWritesForNobody) {
  const std::string patient = MonitoredPatientWithDevice("same-id-fr", "FR", "dev-same-id");
  const std::string of_patient = absl::StrCat("patient_id = '", patient, "'");
  auto globex = Ingest(Device("globex", "dev-same-id"));
  DeviceStream theirs(*globex);
  EXPECT_FALSE(theirs.Send(Batch(1, 1, 3)).has_value());
  const grpc::Status refused = theirs.Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.error_message(), HasSubstr("not assigned"));
  EXPECT_EQ(Count("fr-1", of_patient), 0);

  auto acme = Ingest(Device("acme", "dev-same-id"));
  DeviceStream ours(*acme);
  std::optional<v1::IngestAck> ack = ours.Send(Batch(1, 1, 3));
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(ack->stored_count(), 3u);
  EXPECT_TRUE(ours.Finish().ok());
  EXPECT_EQ(Count("fr-1", of_patient + " AND tenant_id = 'acme'"), 3);
  for (const char* region : {"fr-1", "de-1", "eu-1"}) {
    EXPECT_EQ(Count(region, "tenant_id = 'globex' AND device_id = 'dev-same-id'"), 0) << region;
  }
}

// Only devices stream, only practitioners read: every other kind of identity is refused both,
// though the patient has samples and CARE consent covering every actor of the tenant (a
// practitioner reads them).
// The streaming call refuses identities as every call does (mtls_test checks a unary service):
// an identity the certificate cannot give is UNAUTHENTICATED, a certificate the CA did not sign
// or that expired fails the handshake; nothing is stored either way.
TEST_F(IngestTest, StreamVitalsRefusesEveryBadIdentityAndStoresNothing) {
  MonitoredPatientWithDevice("bad-identities", "FR", "dev-bad-ids");
  auto stored = [] {
    int64_t n = 0;
    for (auto* region : stack_->clusters().regions()) n += Count(region->name(), "true");
    return n;
  };
  const int64_t before = stored();
  struct Case {
    const TestCert* cert;
    grpc::StatusCode code;
    std::string why;
  };
  for (const Case& c :
       {Case{&pki().two_uris(), grpc::StatusCode::UNAUTHENTICATED, "more than one URI SAN"},
        Case{&pki().no_san(), grpc::StatusCode::UNAUTHENTICATED, "no URI SAN"},
        Case{&pki().other_trust_domain(), grpc::StatusCode::UNAUTHENTICATED,
             "another trust domain"},
        Case{&pki().unknown_form(), grpc::StatusCode::UNAUTHENTICATED, "unknown identity form"},
        Case{&pki().rogue_signed(), grpc::StatusCode::UNAVAILABLE, ""},
        Case{&pki().expired(), grpc::StatusCode::UNAVAILABLE, ""}}) {
    auto stub = Ingest(*c.cert);
    DeviceStream stream(*stub);
    EXPECT_FALSE(stream.Send(Batch(1, 1, 5)).has_value()) << c.cert->cert_path;
    grpc::Status status = stream.Finish();
    EXPECT_EQ(status.error_code(), c.code) << c.cert->cert_path << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.why)) << c.cert->cert_path;
  }
  EXPECT_EQ(stored(), before);
  // The same batch from the device's own certificate is stored: the refusals above were the
  // identities'.
  auto device = Ingest(Device("acme", "dev-bad-ids"));
  DeviceStream stream(*device);
  std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 5u);
  EXPECT_TRUE(stream.Finish().ok());
}

TEST_F(IngestTest, OnlyDevicesStreamAndOnlyPractitionersRead) {
  const std::string patient = MonitoredPatientWithDevice("roles-fr", "FR", "dev-roles");
  {
    auto device = Ingest(Device("acme", "dev-roles"));
    DeviceStream stream(*device);
    ASSERT_EQ(stream.Send(Batch(1, 1, 2))->stored_count(), 2u);
    EXPECT_TRUE(stream.Finish().ok());
  }
  Grant(patient, v1::PURPOSE_CARE);
  // The readings `as` gets, and how its call ended.
  auto read = [&](const TestCert& as, int* readings) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    grpc::ClientContext context;
    auto stub = Ingest(as);
    auto reader = stub->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    *readings = 0;
    while (reader->Read(&response)) *readings += response.readings_size();
    return reader->Finish();
  };
  int readings = 0;
  // The CARE grant reaches the service's consent cache within its feed's delay.
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(10),
                        [&] { return read(pki().practitioner(), &readings).ok(); }));
  EXPECT_EQ(readings, 2);

  for (const TestCert* as : {&pki().practitioner(), &pki().ops(), &pki().service()}) {
    auto stub = Ingest(*as);
    DeviceStream stream(*stub);
    stream.Write(Batch(2, 3, 1));
    EXPECT_EQ(stream.Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << as->cert_path;
  }
  for (const TestCert* as : {&pki().app(), &pki().ops(), &pki().service()}) {
    EXPECT_EQ(read(*as, &readings).error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << as->cert_path;
    EXPECT_EQ(readings, 0) << as->cert_path;
  }
}

// A stream refused as it opens (a caller that may not stream, a device over its stream bound) and
// cancelled by its client before the refusal is sent ends once: the service keeps serving.
TEST_F(IngestTest, RefusedStreamsCancelledAtOnceLeaveTheServiceServing) {
  std::string patient = MonitoredPatientWithDevice("refused-cancel-fr", "FR", "dev-refused-cancel");
  auto extra = StartIngest("ingest: {max_streams_per_device: 1}\n");
  ASSERT_NE(extra, nullptr);
  auto device = Ingest(Device("acme", "dev-refused-cancel"), extra->server->port());
  DeviceStream held(*device);  // the device's one stream: every other one is refused
  std::optional<v1::IngestAck> first = held.Send(Batch(1, 1, 1));
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->stored_count(), 1u);
  auto app = Ingest(pki().app(), extra->server->port());
  for (int i = 0; i < 400; ++i) {
    grpc::ClientContext context;
    // Some calls are cancelled before the server reads them, some just after it refused them.
    if (i % 2 == 0) {
      context.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::microseconds(200 * (i % 10)));
    }
    auto stream = (i % 4 < 2 ? app : device)->StreamVitals(&context);
    context.TryCancel();
    ASSERT_FALSE(stream->Finish().ok()) << i;
  }
  // The service still serves the device's stream, and a refused one is still told why.
  std::optional<v1::IngestAck> ack = held.Send(Batch(2, 2, 1));
  ASSERT_TRUE(ack.has_value()) << held.Finish().error_message();
  EXPECT_EQ(ack->stored_count(), 1u);
  DeviceStream refused(*device);
  EXPECT_FALSE(refused.Send(Batch(3, 3, 1)).has_value());
  EXPECT_EQ(refused.Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(held.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-refused-cancel'"), 2);
}

// One stream of a device stores at a time (DeviceTurns): a device's batches are stored in the
// order it sent them, so its seq cursor never passes a sample it has not stored.
TEST_F(IngestTest, ANewStreamOfADeviceTakesOverOnlyOnceTheOlderOnesBatchesAreAnswered) {
  std::string patient = MonitoredPatientWithDevice("turns-fr", "FR", "dev-turns");
  // The writer waits for the test's lock below far longer than the shard's default 5 s.
  std::string ingest_yaml = "ingest: {max_streams_per_device: 2}\n";
  auto extra = StartIngest(ingest_yaml, 600000);
  ASSERT_NE(extra, nullptr);
  const TestCert device = Device("acme", "dev-turns");
  const std::string device_id = pki().SpiffeId("/tenant/acme/device/dev-turns");
  auto stub = Ingest(device, extra->server->port());
  DeviceStream a(*stub);
  ASSERT_EQ(a.Send(Batch(1, 1, 5))->stored_count(), 5u);

  // Hold the device's cursor: A's next batch waits in its transaction.
  CursorHold hold("dev-turns");
  ASSERT_TRUE(a.Write(Batch(2, 6, 5)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), &CursorHold::WriterWaits));

  // B opens. Its batch needs no writer (its one sample is refused), yet it is not answered
  // while A's batch is: B reads nothing before A's batches are answered.
  DeviceStream b(*stub);
  v1::VitalsBatch unknown = Batch(3, 11, 1);
  unknown.mutable_samples(0)->set_loinc_code("0000-0");
  ASSERT_TRUE(b.Write(unknown));
  std::atomic<bool> b_answered = false;
  std::optional<v1::IngestAck> b_ack;
  std::thread b_reader([&] {
    b_ack = b.Read();
    b_answered = true;
  });
  absl::Cleanup join = [&] { b_reader.join(); };
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return extra->server->device_streams(device_id) == 2; }));
  // A stays open while it owes an ack and B waits for the turn: the device's bound is reached.
  {
    DeviceStream c(*stub);
    EXPECT_FALSE(c.Send(Batch(4, 12, 1)).has_value());
    grpc::Status refused = c.Finish();
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(refused.error_message(), HasSubstr("max_streams_per_device"));
  }
  absl::SleepFor(absl::Seconds(1));
  EXPECT_FALSE(b_answered.load()) << "B's batch was answered while A's was unanswered";
  hold.Release();

  // A answers what it read, then ends: superseded.
  std::optional<v1::IngestAck> a_ack = a.Read();
  ASSERT_TRUE(a_ack.has_value());
  EXPECT_EQ(a_ack->batch_seq(), 2u);
  EXPECT_EQ(a_ack->stored_count(), 5u);
  grpc::Status ended = a.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::ABORTED);
  EXPECT_THAT(ended.error_message(), HasSubstr("newer stream of this device"));
  std::move(join).Invoke();
  ASSERT_TRUE(b_ack.has_value());
  EXPECT_EQ(b_ack->rejected_count(), 1u);
  EXPECT_EQ(b_ack->stored_count(), 0u);
  std::optional<v1::IngestAck> stored = b.Send(Batch(5, 12, 5));
  ASSERT_TRUE(stored.has_value());
  EXPECT_EQ(stored->stored_count(), 5u);
  EXPECT_EQ(stored->duplicate_count(), 0u);
  EXPECT_TRUE(b.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-turns'"), 15);
  // Every stream that ended gave its place back.
  EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return extra->server->device_streams(device_id) == 0; }));
}

// A stream waiting for its device's turn, whose client gives up, ends then and there (it has no
// read or write of its own to end it), and the turn passes over it to the device's next stream.
TEST_F(IngestTest, AStreamCancelledWhileWaitingForItsDevicesTurnEnds) {
  std::string patient = MonitoredPatientWithDevice("turns-cancel-fr", "FR", "dev-turns-cancel");
  auto extra = StartIngest("ingest: {}\n", 600000);
  ASSERT_NE(extra, nullptr);
  const std::string device_id = pki().SpiffeId("/tenant/acme/device/dev-turns-cancel");
  auto stub = Ingest(Device("acme", "dev-turns-cancel"), extra->server->port());
  DeviceStream a(*stub);
  ASSERT_EQ(a.Send(Batch(1, 1, 5))->stored_count(), 5u);
  CursorHold hold("dev-turns-cancel");
  ASSERT_TRUE(a.Write(Batch(2, 6, 5)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), &CursorHold::WriterWaits));
  {
    DeviceStream b(*stub);
    ASSERT_TRUE(b.Write(Batch(3, 11, 5)));
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return extra->server->device_streams(device_id) == 2; }));
    b.Cancel();
    // B's place is given back while A's batch is still held.
    EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return extra->server->device_streams(device_id) == 1; }));
    EXPECT_EQ(b.Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  hold.Release();
  std::optional<v1::IngestAck> a_ack = a.Read();
  ASSERT_TRUE(a_ack.has_value());
  EXPECT_EQ(a_ack->stored_count(), 5u);
  EXPECT_EQ(a.Finish().error_code(), grpc::StatusCode::ABORTED);  // B superseded it
  // The device's next stream gets the turn B never took.
  DeviceStream c(*stub);
  std::optional<v1::IngestAck> c_ack = c.Send(Batch(4, 11, 5));
  ASSERT_TRUE(c_ack.has_value());
  EXPECT_EQ(c_ack->stored_count(), 5u);
  EXPECT_TRUE(c.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-turns-cancel'"), 15);
}

TEST_F(IngestTest, AStreamSupersededWhileItWaitsForItsReadEndsAtOnce) {
  std::string patient = MonitoredPatientWithDevice("turns-idle-fr", "FR", "dev-turns-idle");
  auto stub = Ingest(Device("acme", "dev-turns-idle"));
  DeviceStream a(*stub);
  ASSERT_EQ(a.Send(Batch(1, 1, 3))->stored_count(), 3u);
  // A's device reconnects while A idles (a lingering connection): B stores, and A ends without
  // its client closing it (the server does not wait for A's next batch).
  DeviceStream b(*stub);
  ASSERT_EQ(b.Send(Batch(2, 4, 3))->stored_count(), 3u);
  EXPECT_FALSE(a.Read().has_value());
  grpc::Status ended = a.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::ABORTED);
  EXPECT_TRUE(b.Finish().ok());
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-turns-idle'"), 6);
}

// A page of ReadVitals reads about a page of rows per code asked for, however long the patient's
// history: each code is walked in time order through vitals_patient_code_time, not the whole time
// range gathered and sorted for every page. And the pages, put together, are that history in order.
// Random reads of one patient's readings, page after page: a random set of codes (or none: every
// code), a random time range (either bound unset, the start inclusive, the end exclusive) and a
// random page size, over readings of three devices that share measurement times and seqs. The
// pages together are exactly the rows the shard holds for the request, in (measured_at, device,
// seq) order, none twice, and no call returns more than its page size. Seeded
// (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(IngestTest, RandomReadsPageThroughExactlyTheRequestedReadingsInOrder) {
  const uint64_t seed = testing::FuzzSeed();
  const std::string patient =
      PatientWithDevice(absl::StrCat("random-reads-", seed % 100000), "FR", "dev-random-reads");
  Grant(patient, v1::PURPOSE_CARE);
  static const char* const kCodes[] = {"8867-4", "9279-1", "8310-5", "2708-6"};
  static const char* const kUnits[] = {"/min", "/min", "Cel", "%"};
  const absl::Time base = absl::FromUnixSeconds(absl::ToUnixSeconds(absl::Now()) - 86400);
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    // 300 readings at 40 distinct times a second apart: many share a time, some a time and a
    // device (two seqs), and the devices' seqs overlap.
    std::mt19937_64 rng = testing::FuzzRng(seed, -1);
    pqxx::work txn(c);
    for (int i = 0; i < 300; ++i) {
      const int device = i % 3;  // seqs 1..100 for each device
      const int code = static_cast<int>(testing::Uniform(rng, 0, 3));
      txn.exec_params0(
          "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
          "measured_at) VALUES ('acme', $1, $2, $3, $4, 50, $5, "
          "to_timestamp($6::double precision))",
          absl::StrCat("dev-random-reads-", device), i / 3 + 1, patient,
          kCodes[code], kUnits[code],
          static_cast<double>(absl::ToUnixSeconds(base) +
                              static_cast<int64_t>(testing::Uniform(rng, 0, 39))));
    }
    txn.commit();
  }
  const int rounds = testing::FuzzRounds(25);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    std::vector<std::string> codes;
    for (const char* code : kCodes) {
      if (testing::Uniform(rng, 0, 2) == 0) codes.push_back(code);
    }
    std::optional<absl::Time> from;
    std::optional<absl::Time> until;
    if (testing::Uniform(rng, 0, 2) != 0) {
      from = base + absl::Seconds(static_cast<int64_t>(testing::Uniform(rng, 0, 30)));
    }
    if (testing::Uniform(rng, 0, 2) != 0) {
      until = (from ? *from : base) +
              absl::Seconds(static_cast<int64_t>(testing::Uniform(rng, 1, 30)));
    }
    const int page_size = static_cast<int>(testing::Uniform(rng, 1, 40));
    std::string where = "patient_id = " + c.quote(patient);
    if (!codes.empty()) where += " AND loinc = ANY(" + c.quote(pg::TextArrayLiteral(codes)) + ")";
    if (from) {
      where += absl::StrCat(" AND measured_at >= to_timestamp(", absl::ToUnixSeconds(*from), ")");
    }
    if (until) {
      where += absl::StrCat(" AND measured_at < to_timestamp(", absl::ToUnixSeconds(*until), ")");
    }
    std::vector<std::string> expected;
    {
      pqxx::nontransaction q(c);
      for (const pqxx::row& row :
           q.exec("SELECT device_id || ':' || seq FROM vitals WHERE " + where +
                  " ORDER BY measured_at, device_id, seq")) {
        expected.push_back(row[0].as<std::string>());
      }
    }
    std::vector<std::string> got;
    std::string token;
    for (int calls = 1;; ++calls) {
      ASSERT_LT(calls, 2000) << "pages never end";
      v1::ReadVitalsRequest request;
      request.set_patient_id(patient);
      request.set_purpose(v1::PURPOSE_CARE);
      for (const std::string& code : codes) request.add_loinc_codes(code);
      if (from) *request.mutable_time_range()->mutable_start_at() = Ts(*from);
      if (until) *request.mutable_time_range()->mutable_end_at() = Ts(*until);
      request.set_page_size(page_size);
      request.set_page_token(token);
      grpc::ClientContext context;
      auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
      v1::ReadVitalsResponse response;
      const size_t before = got.size();
      const std::string asked = token;
      token.clear();
      size_t in_call = 0;
      while (reader->Read(&response)) {
        // At most 500 readings a message; the token on the last message only.
        EXPECT_LE(response.readings_size(), 500);
        EXPECT_TRUE(token.empty()) << "a message after the one with the token";
        for (const v1::VitalReading& r : response.readings()) {
          got.push_back(absl::StrCat(r.device_id(), ":", r.sample().seq()));
          ++in_call;
        }
        if (!response.next_page_token().empty()) token = response.next_page_token();
      }
      const grpc::Status status = reader->Finish();
      if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        // The tenant's call rate (a read counts as 10 calls), met by a long run: the page again.
        got.resize(before);
        token = asked;
        absl::SleepFor(absl::Milliseconds(100));
        continue;
      }
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_LE(in_call, static_cast<size_t>(page_size));
      if (token.empty()) break;
    }
    EXPECT_EQ(got, expected) << codes.size() << " codes, page size " << page_size;
    if (HasFailure()) break;
  }
}

// What a device measured is what a practitioner reads: values and coordinates to the bit, the
// measurement time to the microsecond (the shard keeps microseconds; nanoseconds are cut, never
// rounded up). Random samples of every catalogue kind, at full double precision with the ranges'
// ends among them, half of them located. Seeded (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS).
TEST_F(IngestTest, RandomSamplesAreReadBackExactlyAsTheDeviceSentThem) {
  const uint64_t seed = testing::FuzzSeed();
  const std::string device = absl::StrCat("dev-exact-", seed % 100000);
  const std::string patient =
      MonitoredPatientWithDevice(absl::StrCat("exact-reads-", seed % 100000), "FR", device);
  // Samples measured before the assignment are not the patient's: every time drawn is after it.
  const absl::Time assigned = absl::Now();
  Grant(patient, v1::PURPOSE_CARE);
  Grant(patient, v1::PURPOSE_GEOLOCATION);
  auto stub = Ingest(Device("acme", device));
  DeviceStream stream(*stub);
  // Until ingest's cache has the GEOLOCATION consent (within a second), locations are dropped:
  // these first one-sample batches are read back with or without theirs, as their acks say.
  std::map<uint64_t, v1::VitalSample> sent;  // by seq, as it should read back
  uint64_t seq = 0;
  uint64_t batch_seq = 0;
  const absl::Time located_by = absl::Now() + absl::Seconds(10);
  for (bool dropped = true; dropped && absl::Now() < located_by;) {
    v1::VitalsBatch batch = Batch(++batch_seq, ++seq, 1);
    batch.mutable_samples(0)->mutable_location()->set_latitude(48.85);
    batch.mutable_samples(0)->mutable_location()->set_longitude(2.35);
    std::optional<v1::IngestAck> ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    ASSERT_EQ(ack->stored_count(), 1u);
    dropped = ack->locations_dropped_count() != 0;
    v1::VitalSample stored = batch.samples(0);
    if (dropped) stored.clear_location();
    stored.mutable_measured_at()->set_nanos(stored.measured_at().nanos() / 1000 * 1000);
    sent[seq] = stored;
  }
  ASSERT_EQ(sent.rbegin()->second.has_location(), true) << "GEOLOCATION never reached ingest";

  const absl::Span<const VitalKind> catalogue = VitalCatalogue();
  const int rounds = testing::FuzzRounds(20);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    // A double in [lo, hi] with all 53 bits drawn, or one of the ends.
    auto draw = [&](double lo, double hi) {
      switch (testing::Uniform(rng, 0, 9)) {
        case 0: return lo;
        case 1: return hi;
        default: return lo + (hi - lo) * (static_cast<double>(rng() >> 11) * 0x1.0p-53);
      }
    };
    v1::VitalsBatch batch;
    batch.set_batch_seq(++batch_seq);
    const int64_t since_assigned = absl::ToInt64Nanoseconds(absl::Now() - assigned);
    const uint64_t n = testing::Uniform(rng, 1, 50);
    for (uint64_t i = 0; i < n; ++i) {
      const VitalKind& kind = catalogue[testing::Uniform(rng, 0, catalogue.size() - 1)];
      v1::VitalSample* s = batch.add_samples();
      s->set_seq(++seq);
      s->set_loinc_code(std::string(kind.loinc));
      s->set_ucum_unit(std::string(kind.ucum));
      s->set_value(draw(kind.min, kind.max));
      // Since the assignment, to the nanosecond.
      *s->mutable_measured_at() = Ts(assigned + absl::Nanoseconds(static_cast<int64_t>(
                                                    testing::Uniform(rng, 0, since_assigned))));
      if (testing::Uniform(rng, 0, 1) == 0) {
        s->mutable_location()->set_latitude(draw(-90, 90));
        s->mutable_location()->set_longitude(draw(-180, 180));
        s->mutable_location()->set_accuracy_m(draw(0, 10000));
      }
      v1::VitalSample stored = *s;
      stored.mutable_measured_at()->set_nanos(s->measured_at().nanos() / 1000 * 1000);
      sent[s->seq()] = stored;
    }
    std::optional<v1::IngestAck> ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
    ASSERT_EQ(ack->stored_count(), n);
    ASSERT_EQ(ack->locations_dropped_count(), 0u);
  }
  EXPECT_TRUE(stream.Finish().ok());

  std::map<uint64_t, v1::VitalReading> read;
  std::string token;
  for (int calls = 1;; ++calls) {
    ASSERT_LT(calls, 100) << "pages never end";
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.set_page_size(200);
    request.set_page_token(token);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    std::map<uint64_t, v1::VitalReading> page;
    std::string next;
    while (reader->Read(&response)) {
      for (const v1::VitalReading& r : response.readings()) page[r.sample().seq()] = r;
      if (!response.next_page_token().empty()) next = response.next_page_token();
    }
    const grpc::Status status = reader->Finish();
    if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      absl::SleepFor(absl::Milliseconds(100));  // the tenant's call rate: the page again
      continue;
    }
    ASSERT_TRUE(status.ok()) << status.error_message();
    read.merge(page);
    token = next;
    if (token.empty()) break;
  }
  ASSERT_EQ(read.size(), sent.size());
  for (const auto& [at, want] : sent) {
    SCOPED_TRACE(absl::StrCat("seq ", at));
    ASSERT_EQ(read.count(at), 1u);
    const v1::VitalReading& got = read[at];
    EXPECT_EQ(got.device_id(), device);
    EXPECT_EQ(got.sample().loinc_code(), want.loinc_code());
    EXPECT_EQ(got.sample().ucum_unit(), want.ucum_unit());
    // Bit for bit: a value that came back one unit in the last place off would fail here.
    EXPECT_EQ(std::bit_cast<uint64_t>(got.sample().value()), std::bit_cast<uint64_t>(want.value()))
        << got.sample().value() << " read, " << want.value() << " sent";
    EXPECT_EQ(got.sample().measured_at().seconds(), want.measured_at().seconds());
    EXPECT_EQ(got.sample().measured_at().nanos(), want.measured_at().nanos());
    ASSERT_EQ(got.sample().has_location(), want.has_location());
    if (want.has_location()) {
      const v1::Location& g = got.sample().location();
      const v1::Location& w = want.location();
      EXPECT_EQ(std::bit_cast<uint64_t>(g.latitude()), std::bit_cast<uint64_t>(w.latitude()));
      EXPECT_EQ(std::bit_cast<uint64_t>(g.longitude()), std::bit_cast<uint64_t>(w.longitude()));
      EXPECT_EQ(std::bit_cast<uint64_t>(g.accuracy_m()), std::bit_cast<uint64_t>(w.accuracy_m()));
    }
    if (HasFailure()) break;
  }
}

TEST_F(IngestTest, AReadVitalsPageReadsAboutAPageOfRowsPerCodeAndPagesKeepOrder) {
  std::string patient = PatientWithDevice("long-history", "FR", "dev-long-history");
  Grant(patient, v1::PURPOSE_CARE);
  constexpr int kRows = 30000;
  constexpr int kPage = 100;
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    // Two days of a sample every 6 s, cycling through three codes; two devices share the times.
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-long-history-' || (g % 2), g, $1, "
        "(ARRAY['8867-4', '9279-1', '8310-5'])[g % 3 + 1], 37, "
        "(ARRAY['/min', '/min', 'Cel'])[g % 3 + 1], "
        "date_trunc('second', now()) - interval '6 seconds' * (g / 2) "
        "FROM generate_series(1, $2) AS g",
        patient, kRows);
    // Other patients measured at the same times, as on a shard with many patients: walking the
    // whole shard in time order would not find this patient's page fast either.
    txn.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-long-history-other-' || (g % 20), g, "
        "'pt_long_history_other_' || (g % 20), '8867-4', 70, '/min', "
        "date_trunc('second', now()) - interval '6 seconds' * (g / 20) "
        "FROM generate_series(1, $1) AS g",
        20 * kRows / 2);
    txn.exec0("ANALYZE vitals");
    txn.commit();
  }
  const std::vector<std::string> codes = {"8867-4", "9279-1"};

  // What one page costs the shard: the rows its scans of vitals return.
  std::string read_sql;
  for (const pg::Statement& st : sql::Statements()) {
    if (std::string(st.name) == sql::kReadVitals) read_sql = st.sql;
  }
  ASSERT_FALSE(read_sql.empty());
  {
    pqxx::nontransaction q(c);
    q.exec0(absl::StrCat("PREPARE read_page(text, text[], bigint, bigint, bigint, text, bigint, "
                         "bigint) AS ",
                         read_sql));
  }
  auto rows_scanned = [&](const std::vector<std::string>& of) {
    pqxx::work txn(c);
    const int64_t now_us = absl::ToUnixMicros(absl::Now());
    const int64_t from_us = now_us - 3 * 86400 * int64_t{1000000};
    const pqxx::result plan = txn.exec(absl::StrCat(
        "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE read_page(", txn.quote(patient), ", ",
        txn.quote(pg::TextArrayLiteral(of)), ", ", from_us, ", ", now_us + int64_t{3600000000},
        ", ", from_us - 1, ", '', 0, ", kPage + 1, ")"));
    // A scan's rows are what it returned and what its filter removed (both per loop).
    const std::regex scan_rows("actual time=[0-9.]+\\.\\.[0-9.]+ rows=([0-9]+) loops=([0-9]+)");
    const std::regex removed("Rows Removed by (Filter|Index Recheck): ([0-9]+)");
    int64_t scanned = 0;
    int64_t loops = 0;  // of the last scan of vitals, whose detail lines follow it
    std::string text;
    for (const pqxx::row& row : plan) {
      const std::string line = row[0].as<std::string>();
      text += line + "\n";
      std::smatch m;
      if (line.find("->") != std::string::npos) loops = 0;
      if (line.find("Scan") != std::string::npos && line.find(" on vitals") != std::string::npos &&
          std::regex_search(line, m, scan_rows)) {
        loops = std::stoll(m[2].str());
        scanned += std::stoll(m[1].str()) * loops;
      } else if (loops > 0 && std::regex_search(line, m, removed)) {
        scanned += std::stoll(m[2].str()) * loops;
      }
    }
    EXPECT_GT(scanned, 0) << text;
    return std::make_pair(scanned, text);
  };
  {
    auto [scanned, plan] = rows_scanned(codes);
    // Two codes, a page and one each: not the 20,000 rows of those codes in the range.
    EXPECT_LE(scanned, 2 * (kPage + 1) + 10) << plan;
  }
  {
    // No code asked for: the service asks for every code of the catalogue, each walked alike.
    std::vector<std::string> every;
    for (const VitalKind& kind : VitalCatalogue()) every.emplace_back(kind.loinc);
    auto [scanned, plan] = rows_scanned(every);
    EXPECT_LE(scanned, 3 * (kPage + 1) + 10) << plan;
  }

  // Through the service, page after page: the codes asked for, in (time, device, seq) order,
  // exactly the rows the shard holds.
  std::vector<std::string> expected;
  {
    pqxx::nontransaction q(c);
    for (const pqxx::row& row : q.exec_params(
             "SELECT device_id || ':' || seq FROM vitals WHERE patient_id = $1 AND loinc IN "
             "('8867-4', '9279-1') ORDER BY measured_at, device_id, seq LIMIT 350",
             patient)) {
      expected.push_back(row[0].as<std::string>());
    }
  }
  ASSERT_EQ(expected.size(), 350u);
  std::vector<std::string> got;
  std::string token;
  for (int page = 0; page < 4; ++page) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    for (const std::string& code : codes) request.add_loinc_codes(code);
    request.add_loinc_codes("8867-4");  // asked twice: read once
    request.set_page_size(kPage);
    request.set_page_token(token);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    token.clear();
    while (reader->Read(&response)) {
      for (const v1::VitalReading& r : response.readings()) {
        got.push_back(absl::StrCat(r.device_id(), ":", r.sample().seq()));
      }
      if (!response.next_page_token().empty()) token = response.next_page_token();
    }
    grpc::Status status = reader->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_FALSE(token.empty());
  }
  got.resize(std::min<size_t>(got.size(), expected.size()));
  EXPECT_EQ(got, expected);
}

// Reads a first message of `reader`, waits until a second after `expires` (the caller's
// certificate's end), then reads on: the stream ends UNAUTHENTICATED, short of the `rows` it
// would have given (each message's `count`).
template <typename Response, typename Count>
void ExpectEndsOnceExpired(grpc::ClientReader<Response>& reader, absl::Time expires, int rows,
                           Count count) {
  Response response;
  ASSERT_TRUE(reader.Read(&response)) << reader.Finish().error_message();
  size_t received = count(response);
  absl::SleepFor(expires - absl::Now() + absl::Seconds(1));
  while (reader.Read(&response)) received += count(response);
  const grpc::Status ended = reader.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("expired at"));
  EXPECT_GT(received, 0u);
  EXPECT_LT(received, static_cast<size_t>(rows));
}

// A ReadVitals page is checked again before each message: a reader whose certificate expires
// before it has taken the whole page gets the messages sent before, then UNAUTHENTICATED.
TEST_F(IngestTest, AReadEndsAtItsNextMessageOnceTheReadersCertificateHasExpired) {
  const std::string patient =
      PatientWithDevice("expiring-reader", "FR", "dev-expiring-reader");
  Grant(patient, v1::PURPOSE_CARE);
  constexpr int kRows = 5000;  // ten messages of 500 readings, far more than a 64 KiB window
  StoreReadings(patient, "dev-expiring-reader", kRows);
  const TestCert cert = ExpiringCert(
      "p-expiring-reader", "/tenant/acme/practitioner/p-expiring-reader", absl::Seconds(5));
  const absl::Time expires = absl::Now() + absl::Seconds(5);
  auto stub = IngestWithSmallWindow(cert);
  ASSERT_NE(stub, nullptr);
  v1::ReadVitalsRequest request;
  request.set_patient_id(patient);
  request.set_purpose(v1::PURPOSE_CARE);
  request.add_loinc_codes("8867-4");
  request.set_page_size(kRows);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto reader = stub->ReadVitals(&context, request);
  ExpectEndsOnceExpired(*reader, expires, kRows, [](const v1::ReadVitalsResponse& message) {
    return static_cast<size_t>(message.readings_size());
  });
}

// The same for an export (an app's, of a whole patient): it checks the app's certificate before
// each message it sends.
TEST_F(IngestTest, AnExportEndsAtItsNextMessageOnceTheAppsCertificateHasExpired) {
  const std::string patient =
      PatientWithDevice("expiring-export", "FR", "dev-expiring-export");
  constexpr int kRows = 5000;  // ten messages of 500 observations, each over a 64 KiB window
  StoreReadings(patient, "dev-expiring-export", kRows);
  const TestCert cert =
      ExpiringCert("app-expiring", "/tenant/acme/app/app-expiring", absl::Seconds(5));
  const absl::Time expires = absl::Now() + absl::Seconds(5);
  auto stub = IngestWithSmallWindow(cert);
  ASSERT_NE(stub, nullptr);
  v1::ExportVitalsRequest request;
  request.set_request_id("export-expiring");
  request.set_patient_id(patient);
  request.set_reason("the patient asked for a copy of their data (ticket 7781)");
  request.set_page_size(kRows);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  auto reader = stub->ExportVitals(&context, request);
  ExpectEndsOnceExpired(*reader, expires, kRows, [](const v1::ExportVitalsResponse& message) {
    return static_cast<size_t>(message.observation_count());
  });
}

TEST_F(IngestTest, PractitionerReadsWithCareConsentAndTheReadIsAudited) {
  std::string patient = MonitoredPatientWithDevice("reader", "FR", "dev-read");
  auto stub = Ingest(Device("acme", "dev-read"));
  DeviceStream stream(*stub);
  ASSERT_EQ(stream.Send(Batch(1, 1, 30))->stored_count(), 30u);
  EXPECT_TRUE(stream.Finish().ok());

  auto read = [&](const TestCert& as, const std::string& token, int page_size,
                  std::vector<v1::VitalReading>* out, std::string* next) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.add_loinc_codes("8867-4");
    request.set_page_size(page_size);
    request.set_page_token(token);
    grpc::ClientContext context;
    auto reader = Ingest(as)->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
      for (const auto& r : response.readings()) out->push_back(r);
      if (!response.next_page_token().empty()) *next = response.next_page_token();
    }
    return reader->Finish();
  };
  std::vector<v1::VitalReading> readings;
  std::string next;
  grpc::Status denied = read(pki().practitioner(), "", 0, &readings, &next);
  EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(denied.error_message(), HasSubstr("CARE"));
  Grant(patient, v1::PURPOSE_CARE);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  grpc::Status status;
  do {
    readings.clear();
    status = read(pki().practitioner(), "", 20, &readings, &next);
  } while (!status.ok() && absl::Now() < deadline);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(readings.size(), 20u);
  ASSERT_FALSE(next.empty());
  std::string last_page_token = next;
  next.clear();
  ASSERT_TRUE(read(pki().practitioner(), last_page_token, 20, &readings, &next).ok());
  EXPECT_EQ(readings.size(), 30u);
  EXPECT_TRUE(next.empty());
  for (size_t i = 0; i < readings.size(); ++i) EXPECT_EQ(readings[i].sample().seq(), i + 1);
  // Another tenant's practitioner: NOT_FOUND, as if the patient did not exist.
  std::vector<v1::VitalReading> none;
  EXPECT_EQ(read(pki().globex_practitioner(), "", 0, &none, &next).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(none.empty());
  // The reads (and the refusal) are in fr-1's audit chain, which verifies.
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::nontransaction q(c);
    EXPECT_GE(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = 'read' "
                             "AND decision = 'permit' AND purpose = 'CARE'", patient)[0].as<int>(), 2);
    EXPECT_GE(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = 'read' "
                             "AND decision = 'deny'", patient)[0].as<int>(), 1);
    // Each call's entry has a request id of its own; the second page's says where it began.
    const pqxx::result reads = q.exec_params(
        "SELECT request_id, reason FROM audit_log WHERE patient_id = $1 AND action = 'read' "
        "AND object_type = 'vitals' ORDER BY seq",
        patient);
    std::set<std::string> ids;
    for (const pqxx::row& row : reads) {
      EXPECT_THAT(row[0].as<std::string>(), ::testing::StartsWith("srv-"));
      ids.insert(row[0].as<std::string>());
    }
    EXPECT_EQ(ids.size(), reads.size());
    EXPECT_EQ(reads[reads.size() - 1][1].as<std::string>(),
              absl::StrCat("PERMITTED: readings=10 after=", last_page_token));
  }
  // A malformed patient id, a start an hour ahead and an end before 1970 (no start) are refused in
  // this call's own terms, naming the field sent.
  auto refused = [&](const std::string& patient_id, absl::Time start, bool start_is_end = false) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient_id);
    request.set_purpose(v1::PURPOSE_CARE);
    google::protobuf::Timestamp* bound = start_is_end ? request.mutable_time_range()->mutable_end_at()
                                                      : request.mutable_time_range()->mutable_start_at();
    bound->set_seconds(absl::ToUnixSeconds(start));
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish();
  };
  grpc::Status bad_id = refused("a/b", absl::Now() - absl::Hours(1));
  EXPECT_EQ(bad_id.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_id.error_message(), ::testing::StartsWith("patient_id:"));
  grpc::Status ahead = refused(patient, absl::Now() + absl::Hours(2));
  EXPECT_EQ(ahead.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(ahead.error_message(), ::testing::StartsWith("time_range.start_at:"));
  grpc::Status before_1970 = refused(patient, absl::FromUnixSeconds(-3600), /*start_is_end=*/true);
  EXPECT_EQ(before_1970.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(before_1970.error_message(), ::testing::StartsWith("time_range.end_at:"));
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok());
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// GDPR art. 17 for vitals: an app of the patient's tenant erases every stored sample of the
// patient from its home shard (of the catalogue's codes, and of any other code stored), code by
// code in bounded transactions, each with its audit entry in
// that transaction; another patient's samples stay, the chain still verifies, and no other caller
// may erase them.
TEST_F(IngestTest, AnAppErasesAPatientsVitalsInBoundedAuditedSteps) {
  const std::string patient = MonitoredPatientWithDevice("erase-me", "FR", "dev-erase");
  const std::string kept = MonitoredPatientWithDevice("erase-keep", "FR", "dev-erase-keep");
  for (const char* device : {"dev-erase", "dev-erase-keep"}) {
    auto stub = Ingest(Device("acme", device));
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 30));
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), 30u) << device;
    EXPECT_TRUE(stream.Finish().ok());
  }
  // Weeks of a device's heart rates and some temperatures, put in the shard directly: one code
  // then takes several erasure transactions.
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::nontransaction q(c);
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-erase-bulk', g, $1, '8867-4', 70, '/min', "
        "now() - interval '20 days' + g * interval '1 second' FROM generate_series(1, 25000) g",
        patient);
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-erase-bulk', 100000 + g, $1, '8310-5', 37, 'Cel', "
        "now() - interval '10 days' + g * interval '1 minute' FROM generate_series(1, 40) g",
        patient);
    // Samples of a code no longer in the catalogue (stored before a version dropped it).
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-erase-bulk', 200000 + g, $1, '99999-9', 1, '1', "
        "now() - interval '5 days' + g * interval '1 minute' FROM generate_series(1, 5) g",
        patient);
  }
  const std::string of_patient = absl::StrCat("patient_id = '", patient, "'");
  const std::string of_kept = absl::StrCat("patient_id = '", kept, "'");
  ASSERT_EQ(Count("fr-1", of_patient), 25075);
  ASSERT_EQ(Count("fr-1", of_kept), 30);

  auto erase = [&](const TestCert& as, const std::string& patient_id, const std::string& reason,
                   const std::string& request_id) -> absl::StatusOr<v1::EraseVitalsResponse> {
    v1::EraseVitalsRequest request;
    request.set_request_id(request_id);
    request.set_patient_id(patient_id);
    request.set_reason(reason);
    v1::EraseVitalsResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status status = Ingest(as)->EraseVitals(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  };
  const std::string why = "the patient asked for erasure (ticket 4711)";
  // Only apps, and only of the patient's tenant; a reason is required.
  EXPECT_EQ(erase(pki().practitioner(), patient, why, "e-0").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(erase(Device("acme", "dev-erase"), patient, why, "e-0").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(erase(pki().globex_app(), patient, why, "e-0").status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<v1::EraseVitalsResponse> no_reason = erase(pki().app(), patient, "", "e-0");
  EXPECT_EQ(no_reason.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_reason.status().message()), HasSubstr("reason"));
  EXPECT_EQ(Count("fr-1", of_patient), 25075);

  absl::StatusOr<v1::EraseVitalsResponse> erased = erase(pki().app(), patient, why, "erase-v-1");
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), 25075u);
  EXPECT_EQ(Count("fr-1", of_patient), 0);
  EXPECT_EQ(Count("fr-1", of_kept), 30);
  for (const char* region : {"de-1", "eu-1"}) EXPECT_EQ(Count(region, of_patient), 0) << region;

  // One entry per transaction, in the home shard, saying what each deleted: the heart rates in
  // steps of sql::kEraseVitalsRows, the temperatures in one.
  {
    pqxx::nontransaction q(c);
    std::map<std::string, std::vector<int64_t>> steps;  // code -> samples per entry
    for (const pqxx::row& row : q.exec_params(
             "SELECT reason, actor, decision FROM audit_log WHERE patient_id = $1 AND "
             "action = 'delete' AND object_type = 'vitals' AND request_id = 'erase-v-1' "
             "ORDER BY seq",
             patient)) {
      const std::string reason = row[0].as<std::string>();
      EXPECT_EQ(row[1].as<std::string>(), pki().SpiffeId("/tenant/acme/app/backend")) << reason;
      EXPECT_EQ(row[2].as<std::string>(), "permit");
      EXPECT_THAT(reason, ::testing::EndsWith(absl::StrCat("; ", why)));
      std::vector<std::string> words = absl::StrSplit(reason, ' ');
      ASSERT_GE(words.size(), 3u) << reason;
      int64_t samples = 0;
      ASSERT_TRUE(absl::SimpleAtoi(absl::StripPrefix(words[1], "samples="), &samples)) << reason;
      steps[std::string(absl::StripSuffix(absl::StripPrefix(words[2], "code="), ";"))].push_back(
          samples);
    }
    EXPECT_EQ(steps["8867-4"], (std::vector<int64_t>{10000, 10000, 5030}));
    EXPECT_EQ(steps["8310-5"], (std::vector<int64_t>{40}));
    EXPECT_EQ(steps["99999-9"], (std::vector<int64_t>{5}));
    EXPECT_EQ(steps.size(), 3u);
  }
  // Called again: nothing left, nothing deleted, no entry.
  absl::StatusOr<v1::EraseVitalsResponse> again = erase(pki().app(), patient, why, "erase-v-2");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->erased_count(), 0u);
  {
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE request_id = 'erase-v-2'")[0].as<int>(),
              0);
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// One ExportVitals of a patient, page after page: the NDJSON lines and the pages, or the first
// failing call's status.
struct Export {
  std::vector<std::string> lines;
  int pages = 0;
};

TEST_F(IngestTest, AnAppExportsAPatientsVitalsAsFhirObservationsPageByPage) {
  const std::string patient = MonitoredPatientWithDevice("export-me", "FR", "dev-export");
  MonitoredPatientWithDevice("export-other", "FR", "dev-export-other");
  // Three samples through the device's stream (one of them blood glucose), and one of the other
  // patient's.
  {
    auto stub = Ingest(Device("acme", "dev-export"));
    DeviceStream stream(*stub);
    v1::VitalsBatch batch = Batch(1, 1, 3);
    batch.mutable_samples(1)->set_loinc_code("15074-8");
    batch.mutable_samples(1)->set_ucum_unit("mmol/L");
    batch.mutable_samples(1)->set_value(5.4);
    std::optional<v1::IngestAck> ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), 3u);
    EXPECT_TRUE(stream.Finish().ok());
    auto other_stub = Ingest(Device("acme", "dev-export-other"));
    DeviceStream other_stream(*other_stub);
    ack = other_stream.Send(Batch(1, 1, 1));
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), 1u);
    EXPECT_TRUE(other_stream.Finish().ok());
  }
  // Days of readings of two codes put in the shard directly, one with a location: the export
  // takes pages.
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  {
    pqxx::nontransaction q(c);
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-export-bulk', g, $1, "
        "CASE WHEN g % 2 = 0 THEN '8867-4' ELSE '8310-5' END, "
        "CASE WHEN g % 2 = 0 THEN 60 + g % 50 ELSE 36 + (g % 30) / 10.0 + 0.05 END, "
        "CASE WHEN g % 2 = 0 THEN '/min' ELSE 'Cel' END, "
        "now() - interval '10 days' + g * interval '1 minute' FROM generate_series(1, 12000) g",
        patient);
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at, latitude, longitude, accuracy_m) VALUES ('acme', 'dev-export-bulk', 20000, "
        "$1, '29463-7', 71.3, 'kg', now() - interval '11 days', 43.2965, 5.3698, 15)",
        patient);
    // Samples of a code no longer in the catalogue (stored before a version dropped it): the
    // export is of everything stored.
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', 'dev-export-bulk', 30000 + g, $1, '99999-9', g, '1', "
        "now() - interval '12 days' + g * interval '1 minute' FROM generate_series(1, 3) g",
        patient);
  }
  // What the shard holds of the patient, by the Observation's identifier.
  struct Stored {
    std::string loinc;
    double value;
    std::string ucum;
    int64_t measured_us;
  };
  std::map<std::string, Stored> stored;
  {
    pqxx::nontransaction q(c);
    for (const pqxx::row& row : q.exec_params(
             "SELECT device_id, seq, loinc, value, ucum, "
             "(extract(epoch from measured_at) * 1000000)::bigint FROM vitals "
             "WHERE patient_id = $1",
             patient)) {
      stored[absl::StrCat(pki().SpiffeId(absl::StrCat("/tenant/acme/device/",
                                                      row[0].as<std::string>())),
                          "#", row[1].as<int64_t>())] =
          Stored{row[2].as<std::string>(), row[3].as<double>(), row[4].as<std::string>(),
                 row[5].as<int64_t>()};
    }
  }
  ASSERT_EQ(stored.size(), 12007u);

  const std::string why = "the patient asked for a copy of their data (ticket 5120)";
  auto export_all = [&](const TestCert& as, const std::string& patient_id,
                        const std::string& reason, const std::string& request_id,
                        int page_size = 0) -> absl::StatusOr<Export> {
    Export result;
    v1::ExportVitalsRequest request;
    request.set_request_id(request_id);
    request.set_patient_id(patient_id);
    request.set_reason(reason);
    request.set_page_size(page_size);
    do {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      auto reader = Ingest(as)->ExportVitals(&context, request);
      v1::ExportVitalsResponse message;
      std::string token;
      while (reader->Read(&message)) {
        std::vector<std::string> lines = absl::StrSplit(message.ndjson(), '\n');
        // Complete lines only: the text ends with a newline, so the last piece is empty.
        EXPECT_EQ(lines.back(), "");
        lines.pop_back();
        EXPECT_EQ(lines.size(), message.observation_count());
        EXPECT_LE(message.observation_count(), 500u) << "at most 500 observations a message";
        for (std::string& line : lines) result.lines.push_back(std::move(line));
        EXPECT_TRUE(token.empty()) << "a token on a message before the last";
        token = message.next_page_token();
      }
      grpc::Status status = reader->Finish();
      if (!status.ok()) return FromGrpcStatus(status);
      ++result.pages;
      request.set_page_token(token);
    } while (!request.page_token().empty() && result.pages < 100);
    return result;
  };

  // Only apps, of the patient's tenant, with a reason; bounds as ReadVitals has.
  EXPECT_EQ(export_all(pki().practitioner(), patient, why, "x-0").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(export_all(Device("acme", "dev-export"), patient, why, "x-0").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(export_all(pki().globex_app(), patient, why, "x-0").status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<Export> refused = export_all(pki().app(), patient, "", "x-0");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("reason"));
  refused = export_all(pki().app(), patient, why, "x-0", -1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  {
    v1::ExportVitalsRequest request;
    request.set_patient_id(patient);
    request.set_reason(why);
    request.set_page_token("1|x|d");
    grpc::ClientContext context;
    auto reader = Ingest(pki().app())->ExportVitals(&context, request);
    v1::ExportVitalsResponse ignored;
    while (reader->Read(&ignored)) {
    }
    grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(status.error_message(), "page_token: not a token we issued");
  }
  {
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE request_id = 'x-0'")[0].as<int>(), 0);
  }

  absl::StatusOr<Export> exported = export_all(pki().app(), patient, why, "export-1");
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->pages, 3);  // 5,000 a page by default
  ASSERT_EQ(exported->lines.size(), stored.size());
  // Each line one Observation of the patient, exactly as stored, each stored sample once, in
  // measured_at order.
  std::set<std::string> seen;
  int64_t previous_us = std::numeric_limits<int64_t>::min();
  int located = 0;
  for (const std::string& line : exported->lines) {
    google::protobuf::Struct o;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(line, &o).ok()) << line;
    const auto& f = o.fields();
    ASSERT_EQ(f.at("resourceType").string_value(), "Observation") << line;
    const std::string id =
        f.at("identifier").list_value().values(0).struct_value().fields().at("value").string_value();
    ASSERT_TRUE(stored.contains(id)) << line;  // the other patient's sample is not one
    ASSERT_TRUE(seen.insert(id).second) << "twice: " << line;
    const Stored& s = stored.at(id);
    EXPECT_EQ(f.at("subject").struct_value().fields().at("identifier").struct_value().fields().at(
                  "value").string_value(),
              patient);
    EXPECT_EQ(f.at("code").struct_value().fields().at("coding").list_value().values(0)
                  .struct_value().fields().at("code").string_value(),
              s.loinc) << line;
    const auto& quantity = f.at("valueQuantity").struct_value().fields();
    EXPECT_EQ(quantity.at("value").number_value(), s.value) << line;
    EXPECT_EQ(quantity.at("code").string_value(), s.ucum) << line;
    absl::Time measured;
    std::string error;
    ASSERT_TRUE(absl::ParseTime("%Y-%m-%dT%H:%M:%E*SZ", f.at("effectiveDateTime").string_value(),
                                &measured, &error))
        << error;
    EXPECT_EQ(absl::ToUnixMicros(measured), s.measured_us) << line;
    EXPECT_GE(s.measured_us, previous_us);
    previous_us = s.measured_us;
    if (f.contains("extension")) ++located;
  }
  EXPECT_EQ(located, 0) << "locations go out only under GEOLOCATION";
  // One entry per page, in the home shard, in the page's transaction: what it exported and why.
  {
    pqxx::nontransaction q(c);
    std::vector<std::string> reasons;
    for (const pqxx::row& row : q.exec_params(
             "SELECT reason, actor, action, decision, object_type FROM audit_log "
             "WHERE patient_id = $1 AND request_id = 'export-1' ORDER BY seq",
             patient)) {
      EXPECT_EQ(row[1].as<std::string>(), pki().SpiffeId("/tenant/acme/app/backend"));
      EXPECT_EQ(row[2].as<std::string>(), "read");
      EXPECT_EQ(row[3].as<std::string>(), "permit");
      EXPECT_EQ(row[4].as<std::string>(), "vitals");
      EXPECT_THAT(row[0].as<std::string>(), ::testing::EndsWith(absl::StrCat("; ", why)));
      reasons.push_back(row[0].as<std::string>());
    }
    ASSERT_EQ(reasons.size(), 3u);
    // The first page has the located sample, whose location was withheld.
    EXPECT_THAT(reasons[0], ::testing::StartsWith("EXPORTED: observations=5000 format=fhir-r4 "
                                                  "locations_withheld=1 ("));
    EXPECT_THAT(reasons[1], ::testing::StartsWith("EXPORTED: observations=5000 format=fhir-r4 after="));
    EXPECT_THAT(reasons[2], ::testing::StartsWith("EXPORTED: observations=2007 format=fhir-r4 after="));
  }
  for (const char* region : {"de-1", "eu-1"}) {
    pqxx::connection elsewhere(stack_->clusters().region(region).ConnectionString());
    pqxx::nontransaction q(elsewhere);
    EXPECT_EQ(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1", patient)[0]
                  .as<int>(),
              0)
        << region;
  }

  // Under a GEOLOCATION consent (once ingest's cache has it), the location goes out, with the
  // consent its entry cites; pages of 10,000.
  Grant(patient, v1::PURPOSE_GEOLOCATION);
  const std::string geolocation = ConsentId(patient, "GEOLOCATION");
  const absl::Time by = absl::Now() + absl::Seconds(10);
  int n = 0;
  do {
    located = 0;
    exported = export_all(pki().app(), patient, why, absl::StrCat("export-geo-", ++n), 10000);
    ASSERT_TRUE(exported.ok()) << exported.status();
    for (const std::string& line : exported->lines) {
      if (absl::StrContains(line, "\"extension\"")) {
        ++located;
        EXPECT_THAT(line, HasSubstr("{\"url\":\"urn:medgate:fhir:measured-at-location\","
                                    "\"extension\":[{\"url\":\"latitude\",\"valueDecimal\":43.2965},"
                                    "{\"url\":\"longitude\",\"valueDecimal\":5.3698},"
                                    "{\"url\":\"accuracy\",\"valueQuantity\":{\"value\":15,"));
      }
    }
  } while (located == 0 && absl::Now() < by);
  EXPECT_EQ(located, 1);
  EXPECT_EQ(exported->pages, 2);
  EXPECT_EQ(exported->lines.size(), stored.size());
  {
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec_params1("SELECT count(*) FROM audit_log WHERE request_id = $1 AND reason "
                             "LIKE $2",
                             absl::StrCat("export-geo-", n),
                             absl::StrCat("EXPORTED: observations=10000 format=fhir-r4 locations=1 "
                                          "GEOLOCATION=", geolocation, "/v1; ", why))[0]
                  .as<int>(),
              1);
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// A ReadVitals call whose client takes nothing: its first message read, the rest left in the
// transport until flow control stops the service's writes (a 10,000-reading page is about 700 KB,
// the stalled client's window 64 KiB).
struct StalledRead {
  std::unique_ptr<v1::DeviceIngest::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::ReadVitalsResponse>> reader;
};

class IngestReadBoundsTest : public IngestTest {
 protected:
  // A patient of acme's with CARE for the suite's practitioner and `rows` heart-rate readings in
  // fr-1, written directly.
  static std::string PatientWithReadings(const std::string& ref, int rows) {
    std::string patient = PatientWithDevice(ref, "FR", absl::StrCat("dev-", ref));
    Grant(patient, v1::PURPOSE_CARE);
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', $3, g, $1, '8867-4', 70, '/min', "
        "date_trunc('second', now()) - interval '1 second' * g FROM generate_series(1, $2) AS g",
        patient, rows, absl::StrCat("dev-", ref));
    txn.commit();
    return patient;
  }
  static v1::ReadVitalsRequest PageOf(const std::string& patient) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.set_page_size(10000);
    return request;
  }
  static std::unique_ptr<StalledRead> StallRead(const std::string& patient, int port) {
    auto creds = MakeChannelCredentials(
        TlsConfig{pki().practitioner().cert_path, pki().practitioner().key_path, pki().ca_path(), 60},
        pki().SpiffeId("/service/ingest"));
    EXPECT_TRUE(creds.ok()) << creds.status();
    auto s = std::make_unique<StalledRead>();
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
    s->stub = v1::DeviceIngest::NewStub(
        grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), *creds, args));
    s->context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    s->reader = s->stub->ReadVitals(&s->context, PageOf(patient));
    return s;
  }
  // Within 30 s, a read of a whole page (10,000 readings) succeeds: the tenant's place is free.
  static void ExpectAWholePageWithin30s(const std::string& patient, int port) {
    absl::StatusOr<size_t> read;
    EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
      read = ReadPage(patient, port);
      return read.ok();
    })) << read.status();
    if (read.ok()) {
      EXPECT_EQ(*read, 10000u);
    }
  }
  // A whole page read by a client that keeps reading: the readings, or the call's status. The
  // page comes in messages of 500 readings (the last may have fewer), the last with the token of
  // the next page when this one is full (every patient here has more readings than a page, or
  // fewer).
  static absl::StatusOr<size_t> ReadPage(const std::string& patient, int port) {
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner(), port)->ReadVitals(&context, PageOf(patient));
    v1::ReadVitalsResponse response;
    size_t readings = 0;
    int last_size = 500;
    std::string token;
    while (reader->Read(&response)) {
      EXPECT_EQ(last_size, 500) << "a message after one of fewer than 500 readings";
      EXPECT_TRUE(token.empty()) << "a message after the one with the token";
      EXPECT_LE(response.readings_size(), 500);
      last_size = response.readings_size();
      readings += response.readings_size();
      token = response.next_page_token();
    }
    grpc::Status status = reader->Finish();
    if (!status.ok()) return FromGrpcStatus(status);
    EXPECT_EQ(!token.empty(), readings == 10000u) << "a full page, and only a full page, has a token";
    return readings;
  }
};

// Reads hold handler threads: a tenant has at most ingest.max_reads_per_tenant in progress, so
// clients that stop reading cannot take every thread of the server.
TEST_F(IngestReadBoundsTest, ATenantsReadsInProgressAreBounded) {
  const std::string patient = PatientWithReadings("read-bound", 12000);
  auto extra = StartIngest("ingest: {max_reads_per_tenant: 2, read_idle_timeout_seconds: 3600}\n");
  ASSERT_NE(extra, nullptr);
  const int port = extra->server->port();
  std::vector<std::unique_ptr<StalledRead>> stalled;
  for (int i = 0; i < 2; ++i) {
    stalled.push_back(StallRead(patient, port));
    v1::ReadVitalsResponse first;
    ASSERT_TRUE(stalled.back()->reader->Read(&first)) << stalled.back()->reader->Finish().error_message();
    EXPECT_EQ(first.readings_size(), 500);
  }
  absl::Cleanup cancel_all = [&] {
    for (auto& s : stalled) {
      s->context.TryCancel();
      s->reader->Finish();
    }
  };
  absl::StatusOr<size_t> refused = ReadPage(patient, port);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("ingest.max_reads_per_tenant"));

  // Once one ends, the tenant reads again, the whole page.
  stalled.back()->context.TryCancel();
  stalled.back()->reader->Finish();
  stalled.pop_back();
  ExpectAWholePageWithin30s(patient, port);
  std::move(cancel_all).Invoke();
  extra->server->Shutdown();
}

// A client that stops reading does not keep its read (a thread and one of its tenant's places)
// for good: past ingest.read_idle_timeout_seconds it ends, and the place is free.
TEST_F(IngestReadBoundsTest, AReadWhoseClientStopsTakingReadingsEndsAndGivesBackItsPlace) {
  const std::string patient = PatientWithReadings("read-stall", 12000);
  auto extra = StartIngest("ingest: {max_reads_per_tenant: 1, read_idle_timeout_seconds: 1}\n");
  ASSERT_NE(extra, nullptr);
  const int port = extra->server->port();
  std::unique_ptr<StalledRead> stalled = StallRead(patient, port);
  v1::ReadVitalsResponse message;
  ASSERT_TRUE(stalled->reader->Read(&message)) << stalled->reader->Finish().error_message();
  size_t received = message.readings_size();
  // The tenant's one place is taken until the stalled read ends; then a read works.
  ExpectAWholePageWithin30s(patient, port);
  // The stalled client reads what reached it before the end, then learns why it ended.
  while (stalled->reader->Read(&message)) received += message.readings_size();
  grpc::Status ended = stalled->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("ingest.read_idle_timeout_seconds"));
  EXPECT_LT(received, 10000u);
  extra->server->Shutdown();
}

// A client that keeps taking readings, but too slowly to matter, is not let hold its read either:
// once the service has waited ingest.read_idle_timeout_seconds for it in all, it must have taken
// them at ingest.read_min_bytes_per_second.
TEST_F(IngestReadBoundsTest, AReadTakenUnderTheMinimumRateEnds) {
  const std::string patient = PatientWithReadings("read-slow", 12000);
  auto extra = StartIngest(
      "ingest: {read_idle_timeout_seconds: 2, read_min_bytes_per_second: 100000000}\n");
  ASSERT_NE(extra, nullptr);
  const int port = extra->server->port();
  // A message of 500 readings every 400 ms: never idle for the 2 s allowed (unless the machine
  // stalls for 1.6 s), but some tens of KB/s, under the 100 MB/s this server asks for.
  std::unique_ptr<StalledRead> slow = StallRead(patient, port);
  v1::ReadVitalsResponse message;
  size_t received = 0;
  while (slow->reader->Read(&message)) {
    received += message.readings_size();
    absl::SleepFor(absl::Milliseconds(400));
  }
  grpc::Status ended = slow->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("under the minimum of 100000000"));
  EXPECT_THAT(ended.error_message(), HasSubstr("ingest.read_min_bytes_per_second"));
  EXPECT_LT(received, 10000u);
  // A client that takes its readings at once is not cut off by the same server.
  absl::StatusOr<size_t> prompt = ReadPage(patient, port);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt, 10000u);
  extra->server->Shutdown();
}

// A read counts as kReadVitalsCalls calls against its tenant's call rate: with 10 calls a second
// after a burst of 30, a tenant starts 3 reads at once, then one is refused RESOURCE_EXHAUSTED,
// saying which limits and when to retry; another tenant's reads are not charged for it.
TEST_F(IngestReadBoundsTest, ATenantStartsReadsAtMostAtItsRate) {
  const std::string patient = PatientWithReadings("read-rate", 3);
  ServerLimits limits = stack_->config().limits;
  limits.tenant_calls_per_second = static_cast<int>(kReadVitalsCalls);
  limits.tenant_call_burst = static_cast<int>(3 * kReadVitalsCalls);
  auto extra = StartIngest("ingest: {}\n", 0, "", &limits);
  ASSERT_NE(extra, nullptr);
  const int port = extra->server->port();
  // Reads one after the other: the burst goes through, then one is refused (well before 50 at
  // one token a second, unless each read took about a second).
  int read_before_refusal = 0;
  absl::Status refused;
  for (int i = 0; i < 50 && refused.ok(); ++i) {
    absl::StatusOr<size_t> read = ReadPage(patient, port);
    if (read.ok()) {
      EXPECT_EQ(*read, 3u);
      ++read_before_refusal;
    } else {
      refused = read.status();
    }
  }
  ASSERT_FALSE(refused.ok()) << "50 reads in a row, none refused";
  EXPECT_GE(read_before_refusal, 3);
  EXPECT_LE(read_before_refusal, 10);  // each read counted as more than one call
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_THAT(std::string(refused.message()), HasSubstr("limits.tenant_calls_per_second"));
  EXPECT_THAT(std::string(refused.message()), HasSubstr("retry in"));

  // Another tenant's read is not refused for acme's rate: it goes on to find no such patient.
  grpc::ClientContext context;
  auto other = Ingest(pki().globex_practitioner(), port)->ReadVitals(&context, PageOf(patient));
  v1::ReadVitalsResponse response;
  while (other->Read(&response)) {
  }
  EXPECT_EQ(other->Finish().error_code(), grpc::StatusCode::NOT_FOUND);

  // Tokens come back with time: acme reads again.
  absl::StatusOr<size_t> again;
  EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
    again = ReadPage(patient, port);
    return again.ok();
  })) << again.status();
  extra->server->Shutdown();
}

// Time bounds a Timestamp cannot hold are the caller's error, named; a refused read whose audit
// entry cannot be written fails (UNAVAILABLE) instead of being answered as an audited refusal.
TEST_F(IngestTest, ReadVitalsRefusesBadBoundsAndFailsWhenItsRefusalCannotBeAudited) {
  std::string patient = PatientWithDevice("read-bounds", "FR", "dev-read-bounds");
  auto read = [&](int64_t start_seconds) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.mutable_time_range()->mutable_start_at()->set_seconds(start_seconds);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish();
  };
  for (int64_t bad : {std::numeric_limits<int64_t>::min(), int64_t{-62135596801}}) {
    grpc::Status status = read(bad);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(status.error_message(), HasSubstr("time_range.start_at")) << bad;
  }
  // A code that is not in the catalogue is named with its place in the list, before anything is
  // read; a NUL byte in it never reaches the database's text.
  auto read_codes = [&](std::vector<std::string> codes, v1::Purpose purpose) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(purpose);
    for (const std::string& code : codes) request.add_loinc_codes(code);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    int messages = 0;
    while (reader->Read(&response)) ++messages;
    EXPECT_EQ(messages, 0);
    return reader->Finish();
  };
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad_codes = {
      {{"8867-4", std::string("\0x", 2)},
       "loinc_codes[1]: '\\x00x' is not in the vitals catalogue"},
      {{"nope"}, "loinc_codes[0]: 'nope' is not in the vitals catalogue"}};
  for (const auto& [codes, message] : bad_codes) {
    grpc::Status status = read_codes(codes, v1::PURPOSE_CARE);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << message;
    EXPECT_EQ(status.error_message(), message);
  }
  // Only the purposes vitals are read for.
  for (v1::Purpose purpose : {v1::PURPOSE_UNSPECIFIED, v1::PURPOSE_GEOLOCATION,
                              v1::PURPOSE_RECORD_SHARING, static_cast<v1::Purpose>(99)}) {
    grpc::Status status = read_codes({"8867-4"}, purpose);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << purpose;
    EXPECT_EQ(status.error_message(), "purpose: CARE, REMOTE_MONITORING or RESEARCH is required");
  }
  // No CARE consent: refused, and audited.
  EXPECT_EQ(read(0).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  // The same refusal while the shard refuses this patient's audit entries.
  const std::string fr1 = stack_->clusters().region("fr-1").ConnectionString();
  auto exec = [&](const std::string& sql) {
    pqxx::connection c(fr1);
    pqxx::nontransaction q(c);
    q.exec0(sql);
  };
  exec(absl::StrCat(
      "CREATE FUNCTION refuse_test_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
      "IF NEW.patient_id = '", patient, "' THEN RAISE EXCEPTION 'audit refused by the test'; "
      "END IF; RETURN NEW; END $$"));
  exec("CREATE TRIGGER refuse_test_audit BEFORE INSERT ON audit_log FOR EACH ROW "
       "EXECUTE FUNCTION refuse_test_audit()");
  grpc::Status unaudited = read(0);
  exec("DROP TRIGGER refuse_test_audit ON audit_log");
  exec("DROP FUNCTION refuse_test_audit()");
  EXPECT_EQ(unaudited.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(unaudited.error_message(), HasSubstr("could not be audited"));
}

// Stored locations are read back only while GEOLOCATION permits the reader: a revocation hides
// what was stored under the earlier consent, and the read's audit entry says so.
TEST_F(IngestTest, ReadVitalsReturnsLocationsOnlyWhileGeolocationPermitsTheReader) {
  std::string patient = MonitoredPatientWithDevice("geo-reader", "FR", "dev-geo-read");
  Grant(patient, v1::PURPOSE_CARE);
  auto consents = StubAs<v1::Consent>(pki().app(), pki().ca_path(), consent_->port(),
                                              pki().SpiffeId("/service/consent"));
  v1::GrantConsentRequest geo;
  geo.set_patient_id(patient);
  geo.set_purpose(v1::PURPOSE_GEOLOCATION);
  geo.set_evidence_ref("signed-form-2");
  v1::GrantConsentResponse granted;
  {
    grpc::ClientContext context;
    grpc::Status s = consents->GrantConsent(&context, geo, &granted);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  // Stored with its location once ingest's cache has the consent (within a second).
  auto stub = Ingest(Device("acme", "dev-geo-read"));
  DeviceStream stream(*stub);
  uint64_t seq = 0;
  std::optional<v1::IngestAck> ack;
  const absl::Time stored_by = absl::Now() + absl::Seconds(10);
  do {
    ++seq;
    v1::VitalsBatch batch = Batch(seq, seq, 1);
    batch.mutable_samples(0)->mutable_location()->set_latitude(43.3);
    batch.mutable_samples(0)->mutable_location()->set_longitude(5.4);
    ack = stream.Send(batch);
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), 1u) << "batch " << seq;
  } while (ack->locations_dropped_count() != 0 && absl::Now() < stored_by);
  ASSERT_EQ(ack->locations_dropped_count(), 0u);
  EXPECT_TRUE(stream.Finish().ok());
  const uint64_t located_seq = seq;

  // The practitioner's read: whether the located sample comes back with its location.
  auto read = [&](const std::string& token, v1::VitalReading* located) {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.set_page_token(token);
    grpc::ClientContext context;
    auto reader = Ingest(pki().practitioner())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
      for (const auto& r : response.readings()) {
        if (r.sample().seq() == located_seq) *located = r;
      }
    }
    return reader->Finish();
  };
  v1::VitalReading reading;
  const absl::Time readable_by = absl::Now() + absl::Seconds(10);
  grpc::Status status;
  do {
    reading.Clear();
    status = read("", &reading);
  } while ((!status.ok() || !reading.sample().has_location()) && absl::Now() < readable_by);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_TRUE(reading.sample().has_location());
  EXPECT_DOUBLE_EQ(reading.sample().location().latitude(), 43.3);

  v1::RevokeConsentRequest revoke;
  revoke.set_consent_id(granted.consent_id());
  revoke.set_reason("patient withdrew location sharing");
  v1::RevokeConsentResponse revoked;
  {
    grpc::ClientContext context;
    grpc::Status s = consents->RevokeConsent(&context, revoke, &revoked);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  const absl::Time hidden_by = absl::Now() + absl::Seconds(10);
  do {
    reading.Clear();
    status = read("", &reading);
  } while ((!status.ok() || reading.sample().has_location()) && absl::Now() < hidden_by);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(reading.sample().seq(), located_seq);
  EXPECT_FALSE(reading.sample().has_location());
  // Still stored: only withheld from this reader, and the audit entry of the read says so.
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-geo-read' AND latitude = 43.3"), 1);
  pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::nontransaction q(c);
  EXPECT_GE(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = "
                           "'read' AND reason LIKE '%locations_withheld=1 (%'",
                           patient)[0]
                .as<int>(),
            1);
  // The reads that disclosed the location cite the GEOLOCATION consent that let it out.
  EXPECT_GE(q.exec_params1("SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = "
                           "'read' AND reason LIKE $2",
                           patient,
                           absl::StrCat("%locations=1 GEOLOCATION=", granted.consent_id(), "/v",
                                        granted.version()))[0]
                .as<int>(),
            1);

  // A page token is what the service issued: bounded, its device part an identifier.
  for (const std::string& token :
       {absl::StrCat("1|1|", std::string(300, 'd')), std::string("1|1|dev 1"), std::string("1|x|d")}) {
    grpc::Status refused = read(token, &reading);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << token;
    EXPECT_EQ(refused.error_message(), "page_token: not a token we issued");
  }
  // Its position lies in the request's time range: a forged time far outside it (which the shard
  // could not convert) is refused as the token it is, not as a database error.
  for (const std::string& token : {std::string("-9223372036854775807|1|d"),
                                   std::string("9223372036854775807|1|d")}) {
    grpc::Status refused = read(token, &reading);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << token;
    EXPECT_EQ(refused.error_message(), "page_token: not a token we issued for this time_range")
        << token;
  }
}

TEST_F(IngestTest, AShardDownLosesNoAckedSampleAndOtherRegionsKeepWorking) {
  std::string de_patient = MonitoredPatientWithDevice("fault-de", "DE", "dev-fault");
  std::string fr_patient = MonitoredPatientWithDevice("fault-fr", "FR", "dev-steady");
  auto stub = Ingest(Device("acme", "dev-fault"));
  auto steady_stub = Ingest(Device("acme", "dev-steady"));
  constexpr int kBatches = 30;
  constexpr int kPerBatch = 20;
  uint64_t acked_stored = 0;
  int retryable_seen = 0;
  bool restarted = false;
  // The shard runs again after the test whatever happens in it: the suite's other tests use it.
  absl::Cleanup restart_de1 = [] { StartIfStopped("de-1"); };
  auto stream = std::make_unique<DeviceStream>(*stub);
  for (int b = 1; b <= kBatches;) {
    if (b == 10 && !restarted && stack_->clusters().region("de-1").running()) {
      ASSERT_TRUE(stack_->clusters().region("de-1").Stop().ok());
      // fr-1 is unaffected while de-1 is down.
      DeviceStream steady(*steady_stub);
      auto ack = steady.Send(Batch(1, 1, 5));
      ASSERT_TRUE(ack.has_value());
      EXPECT_EQ(ack->stored_count(), 5u);
      EXPECT_TRUE(steady.Finish().ok());
    }
    std::optional<v1::IngestAck> ack =
        stream->Send(Batch(static_cast<uint64_t>(b), static_cast<uint64_t>((b - 1) * kPerBatch + 1), kPerBatch));
    if (!ack.has_value() || ack->has_retryable_error()) {
      // Not acked as stored: keep the batch and resend it (what the device SDK does).
      ++retryable_seen;
      if (!ack.has_value()) {
        stream->Finish();
        stream = std::make_unique<DeviceStream>(*stub);
      }
      if (!restarted && retryable_seen >= 3) {
        ASSERT_TRUE(stack_->clusters().region("de-1").StartAgain().ok());
        restarted = true;
      }
      absl::SleepFor(absl::Milliseconds(100));  // the device's retry backoff
      ASSERT_LT(retryable_seen, 500) << "ingest never recovered";
      continue;
    }
    acked_stored += ack->stored_count() + ack->duplicate_count();
    ++b;
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(restarted);
  EXPECT_GE(retryable_seen, 3);
  // Every sample acknowledged is stored, exactly once.
  EXPECT_EQ(acked_stored, static_cast<uint64_t>(kBatches * kPerBatch));
  EXPECT_EQ(Count("de-1", "device_id = 'dev-fault'"), kBatches * kPerBatch);
  EXPECT_EQ(Count("de-1", "device_id = 'dev-fault'"),
            Count("de-1", "device_id = 'dev-fault' AND seq BETWEEN 1 AND 600"));
}

// While the shard's consent feed is lost for longer than the cache may trust what it holds
// (1 s), a batch is refused retryably as "consent unavailable", never stored on a decision that
// may be stale; once the shard is reachable again the device's resend is stored, and nothing that
// was acked is missing.
TEST_F(IngestTest, ABatchWhileConsentIsUnknownIsRefusedRetryablyAndStoredOnResend) {
  const std::string patient = MonitoredPatientWithDevice("consent-lost", "FR", "dev-consent-lost");
  auto proxy = test_support::PgFaultProxy::Start(stack_->clusters().region("fr-1").port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  std::unique_ptr<ExtraIngest> extra = StartIngest(
      "ingest: {tenant_samples_per_second: 1000000}\n", 0, (*proxy)->Via(stack_->clusters().region("fr-1").ConnectionString()));
  ASSERT_NE(extra, nullptr);
  auto stub = Ingest(Device("acme", "dev-consent-lost"), extra->server->port());
  {
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(1, 1, 5));
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), 5u) << ack->DebugString();
    EXPECT_TRUE(stream.Finish().ok());
  }

  (*proxy)->Sever();
  absl::SleepFor(absl::Milliseconds(1500));  // past the cache's fail_closed_after (1 s)
  {
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(2, 6, 5));
    ASSERT_TRUE(ack.has_value());
    ASSERT_TRUE(ack->has_retryable_error()) << ack->DebugString();
    EXPECT_EQ(ack->retryable_error().code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
    EXPECT_EQ(ack->retryable_error().message(), "consent unavailable; resend");
    EXPECT_EQ(ack->retry_after().seconds(), 1);
    EXPECT_EQ(ack->stored_count(), 0u);
    stream.Finish();
  }

  (*proxy)->Restore();
  // The device resends until the shard and the consent feed answer again.
  bool stored = false;
  for (int attempt = 0; attempt < 100 && !stored; ++attempt) {
    DeviceStream stream(*stub);
    std::optional<v1::IngestAck> ack = stream.Send(Batch(2, 6, 5));
    if (ack.has_value() && !ack->has_retryable_error()) {
      EXPECT_EQ(ack->stored_count(), 5u) << ack->DebugString();
      stored = true;
    }
    stream.Finish();
    if (!stored) absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_TRUE(stored);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-consent-lost'"), 10);
  extra->server->Shutdown();
}

TEST_F(IngestTest, TheSdkResendsItsFileBufferAfterARestart) {
  std::string patient = MonitoredPatientWithDevice("sdk", "BE", "dev-sdk");
  device::DeviceOptions options = SdkOptions(Device("acme", "dev-sdk"), "sdk");
  const absl::Time test_start = absl::Now();
  auto samples = HeartRates;
  {
    // The device process records 5 batches while offline, then dies before sending any.
    auto client = device::DeviceClient::Open(options);
    ASSERT_TRUE(client.ok()) << client.status();
    for (int b = 0; b < 5; ++b) ASSERT_TRUE((*client)->Send(samples(10)).ok());
    EXPECT_EQ((*client)->pending(), 5u);
  }
  EXPECT_EQ(Count("eu-1", "device_id = 'dev-sdk'"), 0);
  // After the restart it finds them in its buffer file and delivers them.
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok());
  EXPECT_EQ((*client)->pending(), 5u);
  ASSERT_TRUE((*client)->Send(samples(10)).ok());
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  device::DeviceStats stats = (*client)->stats();
  EXPECT_EQ(stats.samples_stored, 60u);
  EXPECT_EQ(stats.batches_acked, 6u);
  (*client)->Stop();
  EXPECT_EQ(Count("eu-1", "device_id = 'dev-sdk'"), 60);
  // A new buffer file numbers its samples from the clock's microseconds, one after the other.
  const int64_t first = FirstSeq("eu-1", "dev-sdk");
  EXPECT_GE(first, absl::ToUnixMicros(test_start));
  EXPECT_EQ(Count("eu-1", absl::StrCat("device_id = 'dev-sdk' AND seq BETWEEN ", first, " AND ",
                                       first + 59)),
            60);
  std::filesystem::remove(options.buffer_path);
}

// A device whose buffer file was lost (an app reinstalled, its storage wiped) starts a new one,
// numbered from the clock: above every seq the lost file gave out, so each new sample is stored,
// none taken for a duplicate, with no restart needed.
TEST_F(IngestTest, TheSdkNumbersANewBufferFileAboveTheLostOnesSeqs) {
  std::string patient = MonitoredPatientWithDevice("sdk-new-file", "FR", "dev-sdk-new-file");
  device::DeviceOptions options = SdkOptions(Device("acme", "dev-sdk-new-file"), "sdk-new-file");
  device::DeviceStats first = Deliver(options, 3);
  EXPECT_EQ(first.samples_stored, 30u);
  ASSERT_EQ(Count("fr-1", "device_id = 'dev-sdk-new-file'"), 30);
  const int64_t lost_first = FirstSeq("fr-1", "dev-sdk-new-file");

  ASSERT_TRUE(std::filesystem::remove(options.buffer_path));
  device::DeviceStats second = Deliver(options, 2);
  EXPECT_EQ(second.samples_stored, 20u);
  EXPECT_EQ(second.samples_duplicate, 0u);
  EXPECT_EQ(second.seq_restarts, 0u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-new-file'"), 50);
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = 'dev-sdk-new-file' AND seq > ", lost_first + 29)),
            20);
  std::filesystem::remove(options.buffer_path);
}

// A device whose buffer file was lost and whose new one starts its seqs below what the server
// stored for it (its clock was behind, or here its first_seq set to 1): its new samples would be
// taken for duplicates and never stored. The ack's highest_committed_seq shows the SDK seqs it
// never gave out: it moves its seqs above them and sends the samples taken for duplicates again.
// Each sample is stored once.
TEST_F(IngestTest, TheSdkMovesItsSeqsAboveTheStoredOnesWhenItsBufferFileWasLost) {
  std::string patient = MonitoredPatientWithDevice("sdk-lost", "FR", "dev-sdk-lost");
  device::DeviceOptions options = SdkOptions(Device("acme", "dev-sdk-lost"), "sdk-lost");
  options.first_seq = 1;
  device::DeviceStats first = Deliver(options, 3);
  EXPECT_EQ(first.samples_stored, 30u);
  EXPECT_EQ(first.seq_restarts, 0u);
  ASSERT_EQ(Count("fr-1", "device_id = 'dev-sdk-lost'"), 30);

  // The buffer file is gone: the next process seals its batches with seqs 1-10 and 11-20.
  ASSERT_TRUE(std::filesystem::remove(options.buffer_path));
  device::DeviceStats second = Deliver(options, 2);
  EXPECT_EQ(second.seq_restarts, 1u);
  EXPECT_EQ(second.samples_stored, 20u);
  EXPECT_EQ(second.samples_duplicate, 0u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-lost'"), 50);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-lost' AND seq BETWEEN 31 AND 50"), 20);
  // With its buffer file back in place, the next process goes on above them: no restart.
  device::DeviceStats third = Deliver(options, 1);
  EXPECT_EQ(third.seq_restarts, 0u);
  EXPECT_EQ(third.samples_stored, 10u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-lost'"), 60);
  std::filesystem::remove(options.buffer_path);
}

// Certificate files provisioned after the SDK starts (or replaced while it runs): a connection
// that cannot be set up is tried again after the backoff, and the buffered batch goes once the
// files are there.
TEST_F(IngestTest, TheSdkConnectsOnceItsCertificateFilesAppear) {
  std::string patient = MonitoredPatientWithDevice("sdk-late-cert", "FR", "dev-sdk-late-cert");
  TestCert cert = Device("acme", "dev-sdk-late-cert");
  const std::filesystem::path dir = SuitePath("medgate-sdk-certs");
  std::filesystem::remove_all(dir);
  device::DeviceOptions options;
  options.address = absl::StrCat("127.0.0.1:", ingest_->port());
  options.tls = TlsConfig{(dir / "device.crt").string(), (dir / "device.key").string(),
                          pki().ca_path(), 60};
  options.server_identity = pki().SpiffeId("/service/ingest");
  options.buffer_path = (dir.string() + ".buffer");
  options.backoff_initial = absl::Milliseconds(20);
  options.backoff_max = absl::Milliseconds(200);
  std::filesystem::remove(options.buffer_path);
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<v1::VitalSample> batch = {HeartRate(0)};
  ASSERT_TRUE((*client)->Send(std::move(batch)).ok());
  (*client)->Start();
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(10),
                        [&] { return (*client)->stats().dial_failures >= 2; }));
  EXPECT_THAT((*client)->stats().last_dial_error, HasSubstr("device.crt"));
  EXPECT_EQ((*client)->pending(), 1u);
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(cert.cert_path, dir / "device.crt");
  std::filesystem::copy_file(cert.key_path, dir / "device.key");
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  EXPECT_EQ((*client)->stats().samples_stored, 1u);
  (*client)->Stop();
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-late-cert'"), 1);
  std::filesystem::remove_all(dir);
  std::filesystem::remove(options.buffer_path);
}

// The SDK sends a device's samples only to the server whose certificate carries the ingest
// identity it was given: to any other (here the ingest server itself, taken for routing), the
// handshake fails, nothing is sent, and the batch stays buffered; the right identity delivers it.
TEST_F(IngestTest, TheSdkSendsNothingToAServerWithAnotherIdentity) {
  std::string patient = MonitoredPatientWithDevice("sdk-identity", "FR", "dev-sdk-identity");
  device::DeviceOptions options =
      SdkOptions(Device("acme", "dev-sdk-identity"), "sdk-identity");
  options.server_identity = pki().SpiffeId("/service/routing");
  options.backoff_initial = absl::Milliseconds(20);
  options.backoff_max = absl::Milliseconds(200);
  {
    auto client = device::DeviceClient::Open(options);
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE((*client)->Send({HeartRate(0)}).ok());
    (*client)->Start();
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(10),
                          [&] { return (*client)->stats().reconnects >= 2; }));
    (*client)->Stop();
    EXPECT_EQ((*client)->stats().batches_acked, 0u);
    EXPECT_EQ((*client)->pending(), 1u);
  }
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-identity'"), 0);
  // The same buffer file, reopened with the right identity: the batch goes.
  options.server_identity = pki().SpiffeId("/service/ingest");
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok()) << client.status();
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(30)).ok());
  (*client)->Stop();
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-identity'"), 1);
  std::filesystem::remove(options.buffer_path);
}

// A device over its tenant's quota is told how long to wait (retry_after): the SDK waits at least
// that long before it reconnects and resends, and every batch is stored once.
TEST_F(IngestTest, TheSdkWaitsAsLongAsAQuotaRefusalAsksAndLosesNothing) {
  std::string patient = MonitoredPatientWithDevice("sdk-quota", "FR", "dev-sdk-quota");
  // A second ingest server whose tenants may send 1,000 samples at once, then 500 a second.
  auto extra = StartIngest("ingest: {tenant_samples_per_second: 500, tenant_burst: 1000}\n");
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  device::DeviceOptions options =
      SdkOptions(Device("acme", "dev-sdk-quota"), "sdk-quota", server.port());
  options.backoff_initial = absl::Milliseconds(100);  // far shorter than a quota refill
  auto samples = HeartRates;
  auto client = device::DeviceClient::Open(options);
  ASSERT_TRUE(client.ok()) << client.status();
  // The first batch empties the bucket; each of the next two needs a second of refill.
  ASSERT_TRUE((*client)->Send(samples(1000)).ok());
  ASSERT_TRUE((*client)->Send(samples(500)).ok());
  ASSERT_TRUE((*client)->Send(samples(500)).ok());
  (*client)->Start();
  ASSERT_TRUE((*client)->WaitUntilAcked(absl::Seconds(60)).ok());
  device::DeviceStats stats = (*client)->stats();
  (*client)->Stop();
  EXPECT_EQ(stats.batches_acked, 3u);
  EXPECT_EQ(stats.samples_stored, 2000u);
  EXPECT_EQ(stats.samples_duplicate, 0u);
  EXPECT_GE(stats.retries, 1u) << "no batch was refused for the quota";
  // A refusal's retry_after (about a second) is longer than the first backoffs (100-200 ms): the
  // waits after refusals were the server's.
  EXPECT_GE(stats.waits_set_by_server, 1u);
  EXPECT_LE(stats.waits_set_by_server, stats.reconnects);
  // Seen from the server: batches 2 and 3 are each refused about once. A client resending after
  // its own 100-200 ms backoffs instead would be refused about five times for each.
  EXPECT_GE(server.counters().quota_refused, 1u);
  EXPECT_LE(server.counters().quota_refused, 4u);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sdk-quota'"), 2000);
  const int64_t first = FirstSeq("fr-1", "dev-sdk-quota");
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = 'dev-sdk-quota' AND seq BETWEEN ", first,
                                       " AND ", first + 1999)),
            2000);
  std::filesystem::remove(options.buffer_path);
  server.Shutdown();
}

// Every sample a batch carries counts against the tenant's quota, valid or not: a device sending
// only samples that are refused meets RESOURCE_EXHAUSTED like any other.
TEST_F(IngestTest, RefusedSamplesCountAgainstTheTenantsQuota) {
  std::string patient = MonitoredPatientWithDevice("quota-invalid", "FR", "dev-quota-invalid");
  // 1,000 samples at once, then one a second.
  auto extra = StartIngest("ingest: {tenant_samples_per_second: 1, tenant_burst: 1000}\n");
  ASSERT_NE(extra, nullptr);
  auto stub = Ingest(Device("acme", "dev-quota-invalid"), extra->server->port());
  auto unknown_codes = [](uint64_t batch_seq, uint64_t first_seq, int n) {
    v1::VitalsBatch batch = Batch(batch_seq, first_seq, n);
    for (v1::VitalSample& sample : *batch.mutable_samples()) sample.set_loinc_code("0000-0");
    return batch;
  };
  DeviceStream stream(*stub);
  auto first = stream.Send(unknown_codes(1, 1, 1000));
  ASSERT_TRUE(first.has_value()) << stream.Finish().error_message();
  EXPECT_FALSE(first->has_retryable_error());
  EXPECT_EQ(first->rejected_count(), 1000u);
  auto second = stream.Send(unknown_codes(2, 1001, 100));
  ASSERT_TRUE(second.has_value()) << stream.Finish().error_message();
  ASSERT_TRUE(second->has_retryable_error());
  EXPECT_EQ(second->retryable_error().code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_THAT(second->retryable_error().message(), HasSubstr("quota"));
  EXPECT_GE(extra->server->counters().quota_refused, 1u);
  stream.Finish();
  extra->server->Shutdown();
}

// Threads that wait for room in full write queues are bounded per region and over all regions:
// with two regions' writers stalled, a batch of a third, healthy region still finds a worker.
// Here two workers: at most one waits, whatever the region; the second stalled region's batch is
// answered at once that its queue is full, and the healthy region's batch is stored.
TEST_F(IngestTest, StalledRegionsLeaveAWorkerForTheOthers) {
  MonitoredPatientWithDevice("stalls-fr", "FR", "dev-stalls-fr");
  MonitoredPatientWithDevice("stalls-de", "DE", "dev-stalls-de");
  MonitoredPatientWithDevice("stalls-healthy-be", "BE", "dev-stalls-healthy-be");
  // Waits for room that outlast the test, and shard statements that outlast the stalls.
  auto extra = StartIngest(
      "ingest: {worker_threads: 2, writers_per_region: 1, max_queued_batches: 1, "
      "enqueue_wait_ms: 600000, linger_ms: 0}\n",
      /*statement_timeout_ms=*/600000);
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  constexpr uint64_t kPerBatch = 10;

  struct Stalled {
    std::string region;
    std::unique_ptr<v1::DeviceIngest::Stub> stub;
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<v1::VitalsBatch, v1::IngestAck>> stream;
    std::unique_ptr<pqxx::connection> blocker;
    std::unique_ptr<pqxx::work> hold;
  };
  std::vector<std::unique_ptr<Stalled>> stalled;
  for (const auto& [region, device] : {std::pair<std::string, std::string>{"fr-1", "dev-stalls-fr"},
                                       std::pair<std::string, std::string>{"de-1", "dev-stalls-de"}}) {
    SCOPED_TRACE(region);
    auto st = std::make_unique<Stalled>();
    st->region = region;
    st->stub = Ingest(Device("acme", device), server.port());
    st->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    st->stream = st->stub->StreamVitals(&st->context);
    // A first batch stored: the device's routing and consent are cached.
    v1::IngestAck ack;
    ASSERT_TRUE(st->stream->Write(Batch(1, 1, kPerBatch)));
    ASSERT_TRUE(st->stream->Read(&ack));
    ASSERT_EQ(ack.stored_count(), kPerBatch);
    // The region's writer stalls in its next transaction (batch 2); batch 3 fills the queue behind
    // it; batch 4 needs room. Each step is seen before the next batch is sent: sent together,
    // batch 3 could find batch 2 still queued and take the place to wait.
    st->blocker =
        std::make_unique<pqxx::connection>(stack_->clusters().region(region).ConnectionString());
    st->hold = std::make_unique<pqxx::work>(*st->blocker);
    st->hold->exec0("LOCK TABLE device_cursors IN EXCLUSIVE MODE");
    const uint64_t taken = server.write_groups_taken();
    const size_t queued = server.queued_batches();
    ASSERT_TRUE(st->stream->Write(Batch(2, kPerBatch + 1, kPerBatch)));
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return server.write_groups_taken() > taken; }));
    ASSERT_TRUE(st->stream->Write(Batch(3, 2 * kPerBatch + 1, kPerBatch)));
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return server.queued_batches() == queued + 1; }));
    ASSERT_TRUE(st->stream->Write(Batch(4, 3 * kPerBatch + 1, kPerBatch)));
    stalled.push_back(std::move(st));
    if (region == "fr-1") {
      // The first stalled region's batch takes the one place to wait.
      ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                            [&] { return server.waiting_for_room("fr-1") == 1; }));
    }
  }
  // The second's is answered at once: no worker may wait for it.
  EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return server.counters().queue_full >= 1; }))
      << "the second stalled region's batch took a worker to wait";
  EXPECT_EQ(server.waiting_for_room("de-1"), 0);

  // The healthy region's batch, whose look-ups need a worker, is stored.
  {
    auto stub = Ingest(Device("acme", "dev-stalls-healthy-be"), server.port());
    DeviceStream healthy(*stub);
    std::optional<v1::IngestAck> ack = healthy.Send(Batch(1, 1, kPerBatch));
    ASSERT_TRUE(ack.has_value()) << healthy.Finish().error_message();
    EXPECT_EQ(ack->stored_count(), kPerBatch);
    EXPECT_TRUE(healthy.Finish().ok());
  }

  // The stalls end: the first region's batches are all stored; the second's last batch was
  // refused, retryably, for its full queue, and so the batch queued before it is not stored
  // either (once a batch of a stream is not stored, the stream stores nothing more): the device
  // resends both.
  for (auto& st : stalled) st->hold->abort();
  for (auto& st : stalled) {
    SCOPED_TRACE(st->region);
    st->stream->WritesDone();
    v1::IngestAck ack;
    uint64_t stored = kPerBatch;
    int queue_full = 0;
    while (st->stream->Read(&ack)) {
      stored += ack.stored_count();
      if (ack.has_retryable_error()) {
        queue_full += ack.retryable_error().code() ==
                              static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED) &&
                          absl::StrContains(ack.retryable_error().message(), "write queue is full");
      }
    }
    st->stream->Finish();
    if (st->region == "fr-1") {
      EXPECT_EQ(stored, 4 * kPerBatch);
      EXPECT_EQ(queue_full, 0);
    } else {
      EXPECT_EQ(stored, 2 * kPerBatch);
      EXPECT_EQ(queue_full, 1);
    }
  }
}

// A region's write queue that stays full stops reading the stream; after enqueue_wait the batch is
// answered RESOURCE_EXHAUSTED (retryable), nothing after it on that stream is stored, the stream
// ends, and the device's resend of every unacknowledged batch loses nothing. The batches not
// stored are given back to the tenant's quota: with a burst of exactly all the batches and next
// to no refill, the resends fit only with those refunds.
TEST_F(IngestTest, AFullWriteQueueStopsTheStreamAndLosesNothing) {
  // The queue is full at one batch: by its batch bound, then by its row bound (one batch's rows).
  for (const auto& [queue_bound, device] :
       {std::pair<std::string, std::string>{"max_queued_batches: 1", "dev-bp"},
        std::pair<std::string, std::string>{"max_queued_rows: 200", "dev-bp-rows"}}) {
    SCOPED_TRACE(queue_bound);
    std::string patient = MonitoredPatientWithDevice(absl::StrCat("backpressure-", device), "FR", device);
    constexpr uint64_t kBatches = 5;
    constexpr uint64_t kPerBatch = 200;  // kBatches * kPerBatch = the burst
    // A second ingest server on the same stack: one writer lane, a one-batch queue, a short wait,
    // and a quota of 1,000 samples refilling one a second.
    auto extra = StartIngest(absl::StrCat(
        "ingest: {tenant_samples_per_second: 1, tenant_burst: 1000, writers_per_region: 1, ",
        queue_bound, ", enqueue_wait_ms: 200, linger_ms: 0}\n"));
    ASSERT_NE(extra, nullptr);
    IngestServer& server = *extra->server;
    auto stub = Ingest(Device("acme", device), server.port());

    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto stream = stub->StreamVitals(&context);
    v1::IngestAck ack;
    ASSERT_TRUE(stream->Write(Batch(1, 1, kPerBatch)));
    ASSERT_TRUE(stream->Read(&ack));
    ASSERT_EQ(ack.stored_count(), kPerBatch);

    // Hold the writer: its next transaction waits for this lock on the cursor table.
    pqxx::connection blocker(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::work hold(blocker);
    hold.exec0("LOCK TABLE device_cursors IN EXCLUSIVE MODE");
    for (uint64_t b = 2; b <= kBatches; ++b) {
      ASSERT_TRUE(stream->Write(Batch(b, (b - 1) * kPerBatch + 1, kPerBatch)));
    }
    // One batch is in the blocked writer, one fills the queue, the next waits for room in vain.
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return server.counters().queue_full >= 1; }));
    EXPECT_EQ(server.queued_batches(), 1u);
    hold.abort();

    // Acks come in batch order: stored batches, then retryable answers only (the batch refused for
    // a full queue, and any batch still queued behind the blocked one: once a batch of a stream is
    // not stored, the stream stores nothing more); then the stream ends.
    uint64_t stored = kPerBatch;
    uint64_t last_stored_batch = 1;
    uint64_t last_acked_batch = 1;
    int queue_full_answers = 0;
    bool refusing = false;
    while (stream->Read(&ack)) {
      EXPECT_EQ(ack.batch_seq(), last_acked_batch + 1);
      last_acked_batch = ack.batch_seq();
      if (ack.has_retryable_error()) {
        refusing = true;
        if (ack.retryable_error().code() == static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED)) {
          EXPECT_THAT(ack.retryable_error().message(), HasSubstr("write queue is full"));
          ++queue_full_answers;
        } else {
          EXPECT_EQ(ack.retryable_error().code(), static_cast<int32_t>(grpc::StatusCode::UNAVAILABLE));
          EXPECT_THAT(ack.retryable_error().message(), HasSubstr("stores nothing more"));
        }
        continue;
      }
      EXPECT_FALSE(refusing) << "batch " << ack.batch_seq() << " stored after a refused one";
      last_stored_batch = ack.batch_seq();
      stored += ack.stored_count();
    }
    grpc::Status ended = stream->Finish();
    EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
    EXPECT_EQ(queue_full_answers, 1) << "the stream stops reading after the refused batch";
    EXPECT_LT(last_acked_batch, kBatches) << "batches after the refused one were never read";
    EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = '", device, "'")), static_cast<int64_t>(stored));

    // The device resends every batch not acknowledged as stored, on a new stream.
    DeviceStream again(*stub);
    for (uint64_t b = last_stored_batch + 1; b <= kBatches; ++b) {
      std::optional<v1::IngestAck> resent =
          again.Send(Batch(b, (b - 1) * kPerBatch + 1, kPerBatch));
      ASSERT_TRUE(resent.has_value());
      ASSERT_FALSE(resent->has_retryable_error()) << resent->retryable_error().message();
      EXPECT_EQ(resent->duplicate_count(), 0u);
      stored += resent->stored_count();
    }
    EXPECT_TRUE(again.Finish().ok());
    EXPECT_EQ(stored, kBatches * kPerBatch);
    EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = '", device, "'")), static_cast<int64_t>(kBatches * kPerBatch));
    EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = '", device, "' AND seq BETWEEN 1 AND ",
                                         kBatches * kPerBatch)),
              static_cast<int64_t>(kBatches * kPerBatch));
    EXPECT_EQ(server.counters().quota_refused, 0u);
    server.Shutdown();
  }
}

// A batch that waited longer than max_batch_wait_ms for its writer's transaction (the shard held
// the writer up) is not stored on the consent decision it was read under: it gets a retryable
// UNAVAILABLE saying so, and the stream, which stores nothing more, ends by itself (it used to
// wait for the device's next message). The resend is decided again and stored.
TEST_F(IngestTest, ABatchThatWaitedPastItsBoundIsNotStoredOnItsOldDecision) {
  const std::string device = "dev-old-decision";
  MonitoredPatientWithDevice("old-decision-1", "FR", device);
  auto extra =
      StartIngest("ingest: {writers_per_region: 1, linger_ms: 0, max_batch_wait_ms: 300}\n");
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  auto stub = Ingest(Device("acme", device), server.port());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->StreamVitals(&context);
  v1::IngestAck ack;
  ASSERT_TRUE(stream->Write(Batch(1, 1, 10)));
  ASSERT_TRUE(stream->Read(&ack));
  ASSERT_EQ(ack.stored_count(), 10u);

  auto hold = std::make_unique<CursorHold>(device);
  ASSERT_TRUE(stream->Write(Batch(2, 11, 10)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [] { return CursorHold::WriterWaits(); }));
  ASSERT_TRUE(stream->Write(Batch(3, 21, 10)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return server.queued_batches() == 1; }));
  absl::SleepFor(absl::Milliseconds(600));  // batch 3 waits in the queue past its bound
  ::testing::internal::CaptureStderr();
  hold->Release();

  // Batch 2's transaction started within its bound: stored.
  ASSERT_TRUE(stream->Read(&ack));
  EXPECT_EQ(ack.batch_seq(), 2u);
  EXPECT_FALSE(ack.has_retryable_error()) << ack.retryable_error().message();
  EXPECT_EQ(ack.stored_count(), 10u);
  ASSERT_TRUE(stream->Read(&ack));
  EXPECT_EQ(ack.batch_seq(), 3u);
  ASSERT_TRUE(ack.has_retryable_error());
  EXPECT_EQ(ack.retryable_error().code(), static_cast<int32_t>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_THAT(ack.retryable_error().message(), HasSubstr("more than its bound of 300ms"));
  EXPECT_THAT(ack.retryable_error().message(), HasSubstr("nothing of it was stored"));
  EXPECT_EQ(ack.stored_count(), 0u);
  // Ops hear of it: the writer's warning counts the batch and names the bound.
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(logged, ::testing::ContainsRegex(
                          "\"level\":\"warning\",\"event\":\"vitals_batches_waited_too_long\","
                          "\"region\":\"fr-1\",\"batches\":1,\"bound_ms\":300"))
      << logged;
  // The stream ends without the device half-closing it.
  EXPECT_FALSE(stream->Read(&ack));
  grpc::Status ended = stream->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = '", device, "'")), 20);

  DeviceStream again(*stub);
  std::optional<v1::IngestAck> resent = again.Send(Batch(3, 21, 10));
  ASSERT_TRUE(resent.has_value());
  ASSERT_FALSE(resent->has_retryable_error()) << resent->retryable_error().message();
  EXPECT_EQ(resent->stored_count(), 10u);
  EXPECT_TRUE(again.Finish().ok());
  EXPECT_EQ(Count("fr-1", absl::StrCat("device_id = '", device, "'")), 30);
  server.Shutdown();
}

// Batches that would wait for a worker thread beyond max_waiting_batches are answered with a
// retryable RESOURCE_EXHAUSTED: "ingest is saturated" for one not yet looked up, "write queue is
// full" for one built but finding its writer's queue full. That stream stores nothing more and
// ends UNAVAILABLE, the batches already accepted are all stored once the writer moves again, and
// the devices' resends of the refused batches are stored.
TEST_F(IngestTest, BatchesBeyondTheWorkersBoundAreRefusedRetryablyAndLoseNothing) {
  constexpr int kPerBatch = 10;
  for (const char* name : {"a", "b", "c", "d"}) {
    Grant(PatientWithDevice(absl::StrCat("saturated-", name), "FR", absl::StrCat("dev-sat-", name)),
          v1::PURPOSE_REMOTE_MONITORING);
  }
  // One worker thread, one batch waiting for it, one writer with a one-batch queue.
  auto extra = StartIngest(
      "ingest: {writers_per_region: 1, max_queued_batches: 1, enqueue_wait_ms: 30000, "
      "linger_ms: 0, worker_threads: 1, max_waiting_batches: 1}\n");
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  // Device D's first batch is stored: its routing answer and consents are then in memory.
  auto stub_d = Ingest(Device("acme", "dev-sat-d"), server.port());
  DeviceStream d(*stub_d);
  {
    std::optional<v1::IngestAck> ack = d.Send(Batch(1, 1, kPerBatch));
    ASSERT_TRUE(ack.has_value());
    ASSERT_EQ(ack->stored_count(), static_cast<uint32_t>(kPerBatch));
  }
  auto stub_a = Ingest(Device("acme", "dev-sat-a"), server.port());
  auto stub_b = Ingest(Device("acme", "dev-sat-b"), server.port());
  auto stub_c = Ingest(Device("acme", "dev-sat-c"), server.port());

  // Hold the writer: its next transaction waits for this lock on the cursor table.
  pqxx::connection blocker(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::work hold(blocker);
  hold.exec0("LOCK TABLE device_cursors IN EXCLUSIVE MODE");

  // Each step below ends in a state that lasts until the lock is released. Device A: batch 1 in
  // the held transaction, batch 2 in the writer's queue; then batch 3 holds the worker thread
  // (waiting for room in that queue); then device B's batch waits for the worker.
  pqxx::connection watcher(stack_->clusters().region("fr-1").ConnectionString());
  auto writer_waits_for_lock = [&] {
    pqxx::nontransaction q(watcher);
    return q.exec1("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                   "WHERE c.relname = 'device_cursors' AND NOT l.granted")[0]
               .as<int64_t>() > 0;
  };
  grpc::ClientContext context_a;
  context_a.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream_a = stub_a->StreamVitals(&context_a);
  for (uint64_t b = 1; b <= 2; ++b) {
    ASSERT_TRUE(stream_a->Write(Batch(b, (b - 1) * kPerBatch + 1, kPerBatch)));
  }
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
    return writer_waits_for_lock() && server.queued_batches() == 1 &&
           server.processing_batches() == 0 && server.waiting_batches() == 0;
  }));
  ASSERT_TRUE(stream_a->Write(Batch(3, 2 * kPerBatch + 1, kPerBatch)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return server.processing_batches() == 1; }));
  grpc::ClientContext context_b;
  context_b.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream_b = stub_b->StreamVitals(&context_b);
  ASSERT_TRUE(stream_b->Write(Batch(1, 1, kPerBatch)));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                        [&] { return server.waiting_batches() == 1; }));
  EXPECT_EQ(server.processing_batches(), 1u);

  // Device C's batch finds no room: refused, retryably, and its stream ends.
  {
    DeviceStream c(*stub_c);
    std::optional<v1::IngestAck> ack = c.Send(Batch(1, 1, kPerBatch));
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->batch_seq(), 1u);
    ASSERT_TRUE(ack->has_retryable_error());
    EXPECT_EQ(ack->retryable_error().code(),
              static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED));
    EXPECT_THAT(ack->retryable_error().message(), HasSubstr("ingest is saturated"));
    EXPECT_EQ(ack->stored_count(), 0u);
    grpc::Status ended = c.Finish();
    EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  }
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-c'"), 0);
  // Device D's next batch is built at once (nothing to look up) but its writer's queue is full,
  // and no worker can wait for room: refused as well.
  {
    std::optional<v1::IngestAck> ack = d.Send(Batch(2, kPerBatch + 1, kPerBatch));
    ASSERT_TRUE(ack.has_value());
    EXPECT_EQ(ack->batch_seq(), 2u);
    ASSERT_TRUE(ack->has_retryable_error());
    EXPECT_EQ(ack->retryable_error().code(),
              static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED));
    EXPECT_THAT(ack->retryable_error().message(), HasSubstr("write queue is full"));
    grpc::Status ended = d.Finish();
    EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  }
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-d'"), kPerBatch);

  // The writer moves again: every batch accepted from A and B is stored and acknowledged.
  hold.abort();
  v1::IngestAck ack;
  for (uint64_t b = 1; b <= 3; ++b) {
    ASSERT_TRUE(stream_a->Read(&ack)) << "batch " << b;
    EXPECT_EQ(ack.batch_seq(), b);
    EXPECT_FALSE(ack.has_retryable_error()) << ack.retryable_error().message();
    EXPECT_EQ(ack.stored_count(), static_cast<uint32_t>(kPerBatch));
  }
  ASSERT_TRUE(stream_b->Read(&ack));
  EXPECT_FALSE(ack.has_retryable_error()) << ack.retryable_error().message();
  EXPECT_EQ(ack.stored_count(), static_cast<uint32_t>(kPerBatch));
  stream_a->WritesDone();
  stream_b->WritesDone();
  EXPECT_TRUE(stream_a->Finish().ok());
  EXPECT_TRUE(stream_b->Finish().ok());

  // Device C resends the refused batch on a new stream: stored.
  DeviceStream again(*stub_c);
  std::optional<v1::IngestAck> resent = again.Send(Batch(1, 1, kPerBatch));
  ASSERT_TRUE(resent.has_value());
  ASSERT_FALSE(resent->has_retryable_error()) << resent->retryable_error().message();
  EXPECT_EQ(resent->stored_count(), static_cast<uint32_t>(kPerBatch));
  EXPECT_TRUE(again.Finish().ok());
  DeviceStream d_again(*stub_d);
  resent = d_again.Send(Batch(2, kPerBatch + 1, kPerBatch));
  ASSERT_TRUE(resent.has_value());
  ASSERT_FALSE(resent->has_retryable_error()) << resent->retryable_error().message();
  EXPECT_EQ(resent->stored_count(), static_cast<uint32_t>(kPerBatch));
  EXPECT_TRUE(d_again.Finish().ok());

  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-a'"), 3 * kPerBatch);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-b'"), kPerBatch);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-c'"), kPerBatch);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-sat-d'"), 2 * kPerBatch);
  server.Shutdown();
}

// The tenant quota is the deployment's: an instance of two (ingest.instances, which the Helm
// chart sets to the ingest replicas) holds half of the rate and of the burst, so that a tenant
// whose devices' connections the load balancer spreads over both gets the quota once, not twice.
TEST_F(IngestTest, EachInstanceEnforcesItsShareOfTheTenantsQuota) {
  MonitoredPatientWithDevice("quota-share", "FR", "dev-quota-share");
  // Over the deployment: 1 sample a second, a burst of 2000; this instance's share: 1000.
  auto extra = StartIngest("ingest: {tenant_samples_per_second: 2, tenant_burst: 2000, instances: 2}\n");
  ASSERT_NE(extra, nullptr);
  auto stub = Ingest(Device("acme", "dev-quota-share"), extra->server->port());
  DeviceStream stream(*stub);
  std::optional<v1::IngestAck> first = stream.Send(Batch(1, 1, 1000));
  ASSERT_TRUE(first.has_value()) << stream.Finish().error_message();
  EXPECT_EQ(first->stored_count(), 1000u);
  std::optional<v1::IngestAck> second = stream.Send(Batch(2, 1001, 1000));
  ASSERT_TRUE(second.has_value()) << stream.Finish().error_message();
  ASSERT_TRUE(second->has_retryable_error()) << "stored " << second->stored_count();
  EXPECT_EQ(second->retryable_error().code(),
            static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_THAT(second->retryable_error().message(), HasSubstr("quota"));
  stream.Finish();
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-quota-share'"), 1000);
}

// A tenant over its sample quota gets, for the batch over it, a retryable RESOURCE_EXHAUSTED ack:
// its stream then stores nothing more and ends UNAVAILABLE, while another tenant on the same server
// keeps storing; once the quota has refilled, the device's resend of the refused batch is stored.
TEST_F(IngestTest, ATenantOverItsRateQuotaIsRefusedRetryablyAndLosesNothing) {
  constexpr uint32_t kBurst = 1000;    // the smallest burst allowed: the largest batch
  constexpr uint32_t kRate = 500;      // samples a second
  constexpr uint32_t kPerBatch = 50;  // a tenth of a second of refill
  std::string patient = MonitoredPatientWithDevice("quota", "FR", "dev-quota");
  std::string other_patient = PatientWithDevice("quota-other", "DE", "dev-quota", pki().globex_app());
  Grant(other_patient, v1::PURPOSE_REMOTE_MONITORING, "", pki().globex_app());
  // A second ingest server on the same stack, whose tenants' buckets start full at kBurst.
  auto extra = StartIngest(
      absl::StrCat("ingest: {tenant_samples_per_second: ", kRate, ", tenant_burst: ", kBurst, "}\n"));
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  auto stub = Ingest(Device("acme", "dev-quota"), server.port());
  auto retry_after = [](const v1::IngestAck& ack) { return FromProtoDuration(ack.retry_after()); };
  const auto kResourceExhausted = static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED);
  const std::string kAcmeDevice = "tenant_id = 'acme' AND device_id = 'dev-quota'";

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->StreamVitals(&context);
  v1::IngestAck ack;
  ASSERT_TRUE(stream->Write(Batch(1, 1, kBurst)));
  ASSERT_TRUE(stream->Read(&ack));
  ASSERT_FALSE(ack.has_retryable_error()) << ack.retryable_error().message();
  ASSERT_EQ(ack.stored_count(), kBurst);
  uint64_t stored = ack.stored_count();
  // The burst is spent: the next batches, each acked before the next is sent, outrun the refill.
  std::optional<v1::VitalsBatch> refused;
  uint64_t batch_seq = 1;
  while (!refused && batch_seq < 20) {
    ++batch_seq;
    v1::VitalsBatch batch = Batch(batch_seq, kBurst + (batch_seq - 2) * kPerBatch + 1, kPerBatch);
    ASSERT_TRUE(stream->Write(batch));
    ASSERT_TRUE(stream->Read(&ack));
    ASSERT_EQ(ack.batch_seq(), batch_seq);
    if (ack.has_retryable_error()) {
      refused = batch;
    } else {
      EXPECT_EQ(ack.stored_count(), kPerBatch);
      stored += ack.stored_count();
    }
  }
  ASSERT_TRUE(refused.has_value()) << "no batch went over the quota";
  EXPECT_EQ(ack.retryable_error().code(), kResourceExhausted) << ack.retryable_error().message();
  EXPECT_THAT(ack.retryable_error().message(), HasSubstr("quota"));
  ASSERT_TRUE(ack.has_retry_after());
  EXPECT_LE(retry_after(ack), absl::Seconds(1)) << "one batch refills in a second at the configured rate";
  absl::Time next_try = absl::Now() + retry_after(ack);
  uint64_t quota_refusals = 1;
  const uint64_t refused_last_seq = refused->samples(refused->samples_size() - 1).seq();
  // The device goes on streaming; the stream reads nothing more, owes no more acks and ends (the
  // write itself may already fail, the server having ended the stream).
  (void)stream->Write(Batch(batch_seq + 1, refused_last_seq + 1, kPerBatch));
  stream->WritesDone();
  EXPECT_FALSE(stream->Read(&ack)) << "an ack for batch " << ack.batch_seq() << " after the refusal";
  grpc::Status ended = stream->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  // Every sample acknowledged is stored, nothing unacknowledged is.
  EXPECT_EQ(Count("fr-1", kAcmeDevice), static_cast<int64_t>(stored));
  EXPECT_EQ(Count("fr-1", absl::StrCat(kAcmeDevice, " AND seq >= ", refused->samples(0).seq())), 0);

  // Another tenant's device, while acme's bucket is empty, stores a whole burst (a bucket shared by
  // the tenants would take two seconds to hold that much again).
  auto other_stub =
      Ingest(Device("globex", "dev-quota"), server.port());
  DeviceStream other(*other_stub);
  std::optional<v1::IngestAck> other_ack = other.Send(Batch(1, 1, kBurst));
  ASSERT_TRUE(other_ack.has_value()) << other.Finish().error_message();
  ASSERT_FALSE(other_ack->has_retryable_error()) << other_ack->retryable_error().message();
  EXPECT_EQ(other_ack->stored_count(), kBurst);
  EXPECT_TRUE(other.Finish().ok());
  EXPECT_EQ(Count("de-1", "tenant_id = 'globex' AND device_id = 'dev-quota'"),
            static_cast<int64_t>(kBurst));

  // Once the quota has refilled as far as the ack said, the device's resend on a new stream is stored.
  std::optional<v1::IngestAck> resent;
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
    if (absl::Now() < next_try) return false;
    DeviceStream again(*stub);
    resent = again.Send(*refused);
    if (!resent.has_value()) {
      ADD_FAILURE() << "the resend got no ack: " << again.Finish().error_message();
      return true;
    }
    if (!resent->has_retryable_error()) {
      EXPECT_TRUE(again.Finish().ok());
      return true;
    }
    EXPECT_EQ(resent->retryable_error().code(), kResourceExhausted) << resent->retryable_error().message();
    ++quota_refusals;
    next_try = absl::Now() + retry_after(*resent);
    EXPECT_EQ(again.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
    return false;
  }));
  ASSERT_TRUE(resent.has_value());
  EXPECT_EQ(resent->batch_seq(), refused->batch_seq());
  EXPECT_EQ(resent->stored_count(), kPerBatch);
  EXPECT_EQ(resent->duplicate_count(), 0u);
  stored += resent->stored_count();
  EXPECT_EQ(Count("fr-1", kAcmeDevice), static_cast<int64_t>(stored));
  EXPECT_EQ(Count("fr-1", absl::StrCat(kAcmeDevice, " AND seq BETWEEN 1 AND ", refused_last_seq)),
            static_cast<int64_t>(stored));
  EXPECT_EQ(server.counters().quota_refused, quota_refusals);
  server.Shutdown();
}

// Samples charged to the tenant's quota and then not stored (the home shard is down) are given
// back: a device resending one batch through an outage, for more samples in all than the burst,
// has it stored once the shard is back instead of refused for the quota.
TEST_F(IngestTest, AResendAfterAShardOutageIsNotRefusedForTheQuota) {
  constexpr uint32_t kBurst = 1000;  // the smallest burst allowed: the largest batch
  constexpr uint32_t kPerBatch = 400;
  constexpr int kAttemptsWhileDown = 3;  // 1,200 samples charged while down: more than the burst
  std::string patient = MonitoredPatientWithDevice("refund", "DE", "dev-refund");
  // A second ingest server whose tenants refill one sample a second: next to nothing in this test.
  auto extra = StartIngest(
      absl::StrCat("ingest: {tenant_samples_per_second: 1, tenant_burst: ", kBurst, "}\n"));
  ASSERT_NE(extra, nullptr);
  IngestServer& server = *extra->server;
  auto stub = Ingest(Device("acme", "dev-refund"), server.port());
  const auto kUnavailable = static_cast<int32_t>(grpc::StatusCode::UNAVAILABLE);
  const std::string kAcmeDevice = "tenant_id = 'acme' AND device_id = 'dev-refund'";

  // A first sample while de-1 is up: the server has the device's patient and consent in its caches.
  DeviceStream first(*stub);
  std::optional<v1::IngestAck> ack = first.Send(Batch(1, 1, 1));
  ASSERT_TRUE(ack.has_value()) << first.Finish().error_message();
  ASSERT_FALSE(ack->has_retryable_error()) << ack->retryable_error().message();
  ASSERT_EQ(ack->stored_count(), 1u);
  EXPECT_TRUE(first.Finish().ok());
  uint64_t stored = ack->stored_count();

  // While the shard is down the device resends its next batch, each time on a new stream: the
  // writer answers every attempt (the quota charged it), none is refused for the quota. Each
  // attempt has an outage of its own, sent as soon as the shard stops with the patient's consents
  // cached: past a second without its consent feed the cache fails closed, and a batch then never
  // reaches the writer (a loaded machine took more than that for three attempts in one outage).
  // Such an attempt is answered UNAVAILABLE too, is not counted, and is made again in the next.
  const v1::VitalsBatch batch = Batch(2, 2, kPerBatch);
  // The shard runs again after the test whatever happens in it: the suite's other tests use it.
  absl::Cleanup restart_de1 = [] { StartIfStopped("de-1"); };
  test_support::PgCluster& de1 = stack_->clusters().region("de-1");
  int charged = 0;
  for (int attempt = 1; charged < kAttemptsWhileDown && attempt <= 4 * kAttemptsWhileDown;
       ++attempt) {
    // The cache forgets a region's consents when its feed comes back: the first batch, sent
    // again (a duplicate, nothing stored), loads them while de-1 is up.
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
      if (!server.consent().FeedListening("de-1")) return false;
      DeviceStream prime(*stub);
      std::optional<v1::IngestAck> primed = prime.Send(Batch(1, 1, 1));
      prime.Finish();
      return primed.has_value() && !primed->has_retryable_error();
    }));
    ASSERT_TRUE(de1.Stop().ok());
    DeviceStream stream(*stub);
    ack = stream.Send(batch);
    grpc::Status ended = stream.Finish();
    ASSERT_TRUE(de1.StartAgain().ok());
    if (!ack.has_value()) {
      ADD_FAILURE() << "attempt " << attempt << " got no ack: " << ended.error_message();
      continue;
    }
    EXPECT_EQ(ack->retryable_error().code(), kUnavailable)
        << "attempt " << attempt << ": " << ack->retryable_error().message();
    if (absl::StrContains(ack->retryable_error().message(), "could not store the batch")) {
      ++charged;
    } else {
      EXPECT_THAT(ack->retryable_error().message(), HasSubstr("consent unavailable"));
    }
  }
  ASSERT_EQ(charged, kAttemptsWhileDown) << "attempts that reached the writer while de-1 was down";

  // The shard is back: the resend is stored (the shard or the consent feed may still need a moment,
  // answering UNAVAILABLE, never RESOURCE_EXHAUSTED).
  absl::Time next_try = absl::Now();
  std::optional<v1::IngestAck> resent;
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
    if (absl::Now() < next_try) return false;
    DeviceStream again(*stub);
    resent = again.Send(batch);
    grpc::Status ended = again.Finish();
    if (!resent.has_value()) {
      ADD_FAILURE() << "the resend got no ack: " << ended.error_message();
      return true;
    }
    if (!resent->has_retryable_error()) return true;
    EXPECT_EQ(resent->retryable_error().code(), kUnavailable) << resent->retryable_error().message();
    next_try = absl::Now() + FromProtoDuration(resent->retry_after());
    return resent->retryable_error().code() != kUnavailable;
  }));
  ASSERT_TRUE(resent.has_value());
  ASSERT_FALSE(resent->has_retryable_error()) << resent->retryable_error().message();
  EXPECT_EQ(resent->batch_seq(), batch.batch_seq());
  EXPECT_EQ(resent->stored_count(), kPerBatch);
  EXPECT_EQ(resent->duplicate_count(), 0u);
  stored += resent->stored_count();
  // Every sample acknowledged is stored, nothing else.
  EXPECT_EQ(Count("de-1", kAcmeDevice), static_cast<int64_t>(stored));
  EXPECT_EQ(Count("de-1", absl::StrCat(kAcmeDevice, " AND seq BETWEEN 1 AND ", kPerBatch + 1)),
            static_cast<int64_t>(stored));
  EXPECT_EQ(server.counters().quota_refused, 0u);
  server.Shutdown();
}

// A suspended tenant's devices stop streaming (an open stream ends PERMISSION_DENIED at a batch
// after routing's answer for the device says so, with everything acked before it stored) and its
// practitioners may not read; reactivated, both work again.
TEST_F(IngestTest, ASuspendedTenantNeitherStreamsNorReads) {
  auto upsert = [](bool active) {
    return test_support::UpsertTenant(pki(), routing_->port(), "pauseco", {"FR"}, active);
  };
  ASSERT_TRUE(upsert(true).ok());
  absl::StatusOr<TestCert> issued =
      test_support::IssueIdentity(pki(), "pauseco-app", "/tenant/pauseco/app/backend");
  ASSERT_TRUE(issued.ok()) << issued.status();
  const TestCert app = *issued;
  issued = test_support::IssueIdentity(pki(), "pauseco-p", "/tenant/pauseco/practitioner/p-1");
  ASSERT_TRUE(issued.ok()) << issued.status();
  const TestCert practitioner = *issued;
  const TestCert device = Device("pauseco", "dev-pause");
  const std::string patient = PatientWithDevice("pause-1", "FR", "dev-pause", app);
  Grant(patient, v1::PURPOSE_REMOTE_MONITORING, "", app);
  Grant(patient, v1::PURPOSE_CARE, "", app);
  // Routing's answer for a device lives 2 s here (30 s by default).
  auto extra = StartIngest("ingest: {device_cache_ttl_seconds: 2}\n");
  ASSERT_NE(extra, nullptr);
  auto read = [&] {
    v1::ReadVitalsRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    grpc::ClientContext context;
    auto reader = Ingest(practitioner, extra->server->port())->ReadVitals(&context, request);
    v1::ReadVitalsResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish();
  };
  ASSERT_TRUE(read().ok());

  auto stub = Ingest(device, extra->server->port());
  DeviceStream stream(*stub);
  uint64_t acked = 0;
  uint64_t batch = 1;
  std::optional<v1::IngestAck> ack = stream.Send(Batch(batch, 1, 10));
  ASSERT_TRUE(ack.has_value()) << stream.Finish().error_message();
  acked += ack->stored_count();
  ASSERT_TRUE(upsert(false).ok());
  // The open stream goes on until routing's answer for the device is refreshed, then ends.
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    ++batch;
    ack = stream.Send(Batch(batch, (batch - 1) * 10 + 1, 10));
    if (!ack) break;
    acked += ack->stored_count();
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_FALSE(ack.has_value()) << "the stream of a suspended tenant's device was not ended";
  grpc::Status ended = stream.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(ended.error_message(), HasSubstr("suspended"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-pause'"), static_cast<int64_t>(acked));
  // A new stream is refused at its first batch, and so is one of a device the tenant never
  // assigned; reads are refused by the tenant gate.
  {
    DeviceStream again(*stub);
    EXPECT_FALSE(again.Send(Batch(batch + 1, batch * 10 + 1, 10)).has_value());
    EXPECT_EQ(again.Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
    auto unassigned_stub = Ingest(Device("pauseco", "dev-never-assigned"), extra->server->port());
    DeviceStream unassigned(*unassigned_stub);
    EXPECT_FALSE(unassigned.Send(Batch(1, 1, 1)).has_value());
    grpc::Status refused_unassigned = unassigned.Finish();
    EXPECT_EQ(refused_unassigned.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(refused_unassigned.error_message(), HasSubstr("suspended"));
  }
  grpc::Status refused;
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(15), [&] {
    refused = read();
    return !refused.ok();
  }));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(refused.error_message(), HasSubstr("suspended"));
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-pause'"), static_cast<int64_t>(acked));

  // Reactivated: the device streams and the practitioner reads again.
  ASSERT_TRUE(upsert(true).ok());
  std::optional<v1::IngestAck> resumed;
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(20), [&] {
    DeviceStream again(*stub);
    resumed = again.Send(Batch(batch + 1, batch * 10 + 1, 10));
    again.Finish();
    if (!resumed) absl::SleepFor(absl::Milliseconds(50));
    return resumed.has_value();
  }));
  EXPECT_EQ(resumed->stored_count(), 10u);
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(15), [&] { return read().ok(); }));
}

// A region whose shard stops answering fills its write queue, and batches waiting for room there
// hold worker threads. At most half the workers wait for one region: a further batch for it is
// answered at once with a retryable RESOURCE_EXHAUSTED, and another region's batch that needs a
// worker (its device not yet in the routing cache) is stored meanwhile.
TEST_F(IngestTest, AStalledRegionHoldsAtMostHalfTheWorkers) {
  const std::string de_patient = MonitoredPatientWithDevice("stall-de", "DE", "dev-stall-de");
  const std::string de_patient2 = MonitoredPatientWithDevice("stall-de-2", "DE", "dev-stall-de-2");
  const std::string fr_patient = MonitoredPatientWithDevice("stall-fr", "FR", "dev-stall-fr");
  // Two workers, so one may wait for de-1; one lane and one queued batch per region.
  auto extra = StartIngest(
      "ingest: {worker_threads: 2, writers_per_region: 1, max_queued_batches: 1, "
      "enqueue_wait_ms: 120000}\n");
  ASSERT_NE(extra, nullptr);
  auto de_stub = Ingest(Device("acme", "dev-stall-de"), extra->server->port());
  auto de2_stub = Ingest(Device("acme", "dev-stall-de-2"), extra->server->port());
  auto fr_stub = Ingest(Device("acme", "dev-stall-fr"), extra->server->port());
  DeviceStream de(*de_stub);
  DeviceStream de2(*de2_stub);
  // Both DE devices' routing and consents in memory before the shard stalls.
  ASSERT_EQ(de.Send(Batch(1, 1, 5))->stored_count(), 5u);
  ASSERT_EQ(de2.Send(Batch(1, 1, 5))->stored_count(), 5u);

  test_support::PgCluster& shard = stack_->clusters().region("de-1");
  IngestServer& server = *extra->server;
  const uint64_t taken = server.write_groups_taken();
  ASSERT_TRUE(shard.Signal(SIGSTOP).ok());
  absl::Cleanup resume = [&shard] { (void)shard.Signal(SIGCONT); };  // also if an ASSERT fails
  // The writer takes batch 2 and waits on the shard; then batch 3 fills the queue; then batch 4
  // goes to a worker to wait for room. Each step is seen before the next batch is sent: sent
  // together, batch 3 could find batch 2 still queued and take the worker's place.
  ASSERT_TRUE(de.Write(Batch(2, 6, 5)));
  const bool writer_holds_2 = PollUntil(absl::Now() + absl::Seconds(30), [&] {
    return server.write_groups_taken() > taken;
  });
  ASSERT_TRUE(de.Write(Batch(3, 11, 5)));
  const bool queue_holds_3 =
      PollUntil(absl::Now() + absl::Seconds(30), [&] { return server.queued_batches() == 1; });
  ASSERT_TRUE(de.Write(Batch(4, 16, 5)));
  const bool one_waits = writer_holds_2 && queue_holds_3 &&
                         PollUntil(absl::Now() + absl::Seconds(30), [&] {
                           return server.waiting_for_room("de-1") == 1;
                         });
  std::optional<v1::IngestAck> refused;
  std::optional<v1::IngestAck> fr_ack;
  if (one_waits) {
    refused = de2.Send(Batch(2, 6, 5));
    DeviceStream fr(*fr_stub);
    fr_ack = fr.Send(Batch(1, 1, 5));
    EXPECT_TRUE(fr.Finish().ok());
  }
  ASSERT_TRUE(shard.Signal(SIGCONT).ok());
  ASSERT_TRUE(writer_holds_2) << "de-1's writer never took batch 2";
  ASSERT_TRUE(queue_holds_3) << "batch 3 never waited in de-1's write queue";
  ASSERT_TRUE(one_waits) << "no batch waited for room in de-1's write queue";
  ASSERT_TRUE(refused.has_value()) << de2.Finish().error_message();
  ASSERT_TRUE(refused->has_retryable_error());
  EXPECT_EQ(refused->retryable_error().code(), static_cast<int32_t>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_THAT(refused->retryable_error().message(), HasSubstr("de-1"));
  ASSERT_TRUE(fr_ack.has_value());
  EXPECT_EQ(fr_ack->stored_count(), 5u);
  // Once the shard answers again, the waiting batches are stored and acked in order.
  for (uint64_t b = 2; b <= 4; ++b) {
    std::optional<v1::IngestAck> ack = de.Read();
    ASSERT_TRUE(ack.has_value()) << de.Finish().error_message();
    EXPECT_EQ(ack->batch_seq(), b);
    EXPECT_EQ(ack->stored_count(), 5u);
  }
  EXPECT_TRUE(de.Finish().ok());
  // The refused batch's stream ends after its retryable ack; resent on a new one, it is stored.
  EXPECT_EQ(de2.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  DeviceStream again(*de2_stub);
  std::optional<v1::IngestAck> resent = again.Send(Batch(2, 6, 5));
  ASSERT_TRUE(resent.has_value()) << again.Finish().error_message();
  EXPECT_EQ(resent->stored_count(), 5u);
  EXPECT_TRUE(again.Finish().ok());
  EXPECT_EQ(Count("de-1", "device_id = 'dev-stall-de'"), 20);
  EXPECT_EQ(Count("de-1", "device_id = 'dev-stall-de-2'"), 10);
  EXPECT_EQ(Count("fr-1", "device_id = 'dev-stall-fr'"), 5);
}

// The standard health check, as a load balancer asks it, answers SERVING while any region's shard
// answers: one region down gets retryable acks for its own batches (above), and must not take the
// other regions' devices out of service with it. With every shard down, NOT_SERVING.
TEST_F(IngestTest, HealthServesWhileAnyRegionsShardAnswers) {
  const TestCert& ops = pki().ops();
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", ingest_->port()),
                             TlsConfig{ops.cert_path, ops.key_path, pki().ca_path(), 60},
                             pki().SpiffeId("/service/ingest"));
  ASSERT_TRUE(channel.ok()) << channel.status();
  absl::Status checked = test_support::ExpectServingWhileAnyRegionAnswers(
      *channel, stack_->clusters(), "fr-1", absl::Now() + absl::Seconds(30));
  EXPECT_TRUE(checked.ok()) << checked;
  // The next tests need the consent feeds up again.
  for (const RegionConfig& region : stack_->config().regions) {
    EXPECT_TRUE(PollUntil(absl::Now() + absl::Seconds(30),
                          [&] { return ingest_->consent().FeedListening(region.id); }))
        << "the consent feed of " << region.id << " did not come back";
  }
}

}  // namespace
}  // namespace medgate::ingest
