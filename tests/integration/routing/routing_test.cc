// The routing service over real mTLS and real PostgreSQL: placement, devices, authorization,
// bad input, audit, and the control database going away and coming back.
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <pqxx/pqxx>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "libs/audit/audit_log.h"
#include "libs/common/grpc_status.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/routing/routing_server.h"
#include "tests/support/poll.h"
#include "tests/support/tenants.h"
#include "tests/support/test_stack.h"

namespace medgate::routing {
namespace {

using ::testing::HasSubstr;
using test_support::PgClusterSet;
using test_support::TestCert;
using test_support::TestPki;

class RoutingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto stack = test_support::TestStack::Start({"routing"});
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = stack->release();
    clusters_ = &stack_->clusters();
    pki_ = &stack_->pki();
    config_ = &stack_->config();
    auto server = RoutingServer::Create(*config_);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    ASSERT_TRUE(server_->Start().ok());

    // Two tenants, created by ops.
    for (const char* tenant : {"acme", "globex"}) {
      v1::UpsertTenantRequest request;
      request.set_request_id(absl::StrCat("create-", tenant));
      request.mutable_tenant()->set_tenant_id(tenant);
      request.mutable_tenant()->set_display_name(absl::StrCat(tenant, " telehealth"));
      for (const char* t : {"FR", "DE", "BE", "LU", "US"}) request.mutable_tenant()->add_territories(t);
      request.mutable_tenant()->set_active(true);
      v1::UpsertTenantResponse response;
      grpc::ClientContext context;
      grpc::Status status = Stub(pki_->ops())->UpsertTenant(&context, request, &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
      ASSERT_TRUE(response.created());
    }
  }

  static void TearDownTestSuite() {
    server_->Shutdown();
    delete server_;
    delete stack_;
  }

  // A certificate of medgate service `name` (spiffe://TD/service/NAME).
  static const TestCert& ServiceCert(const std::string& name) {
    return test_support::ServiceCert(*pki_, name);
  }
  // Ingest's identity: it resolves devices, patients and tenants.
  static const TestCert& IngestCert() { return ServiceCert("ingest"); }

  static std::unique_ptr<v1::TenantRouting::Stub> Stub(const TestCert& cert) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", server_->port()),
                               TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), 60},
                               pki_->SpiffeId("/service/routing"));
    EXPECT_TRUE(channel.ok());
    return v1::TenantRouting::NewStub(*channel);
  }

  static absl::StatusOr<v1::PlacePatientResponse> Place(const TestCert& as, const std::string& ref,
                                                        const std::string& territory,
                                                        bool allow_move = false) {
    v1::PlacePatientRequest request;
    static std::atomic<int> counter{0};
    request.set_request_id(absl::StrCat("place-", counter.fetch_add(1)));
    request.set_patient_ref(ref);
    request.set_territory(territory);
    request.set_allow_move(allow_move);
    v1::PlacePatientResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->PlacePatient(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static grpc::Status Assign(const TestCert& as, const std::string& device, const std::string& ref,
                             v1::AssignDeviceResponse* response = nullptr) {
    v1::AssignDeviceRequest request;
    request.set_device_id(device);
    request.set_patient_ref(ref);
    v1::AssignDeviceResponse ignored;
    grpc::ClientContext context;
    return Stub(as)->AssignDevice(&context, request, response ? response : &ignored);
  }

  static int64_t AuditCount() {
    pqxx::connection c(clusters_->control().ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1("SELECT count(*) FROM audit_log")[0].as<int64_t>();
  }

  // Whether, within 30 s, one session's INSERT INTO devices waits on a lock (the test holds it).
  static bool ADeviceInsertWaitsOnALock() {
    return test_support::PollUntil(absl::Now() + absl::Seconds(30), [] {
      return CountIn(clusters_->control(),
                     "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND query LIKE 'INSERT INTO devices%'") == 1;
    });
  }

  // Whether, within 30 s, `sessions` sessions wait for an advisory lock (a residency rule's, or
  // a tenant's), taken by a statement starting with "SELECT " + `call`.
  static bool AdvisoryLockWaits(const std::string& call, int sessions) {
    return test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
      return CountIn(clusters_->control(),
                     absl::StrCat("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                  "'Lock' AND query LIKE 'SELECT ",
                                  call, "%'")) == sessions;
    });
  }

  // An app identity of a new tenant serving `territory` only (a rule no other test uses).
  static absl::StatusOr<TestCert> AppOfTenantServing(const std::string& tenant,
                                                     const std::string& territory) {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id(tenant);
    request.mutable_tenant()->set_display_name(tenant);
    request.mutable_tenant()->add_territories(territory);
    request.mutable_tenant()->set_active(true);
    v1::UpsertTenantResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(pki_->ops())->UpsertTenant(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    devpki::LeafOptions options;
    options.common_name = tenant + " app";
    options.uri_sans = {pki_->SpiffeId("/tenant/" + tenant + "/app/backend")};
    return pki_->Issue(tenant + "-app", options);
  }

  static int64_t CountIn(test_support::PgCluster& cluster, const std::string& sql) {
    pqxx::connection c(cluster.ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1(sql)[0].as<int64_t>();
  }

  static test_support::TestStack* stack_;
  static PgClusterSet* clusters_;
  static TestPki* pki_;
  static MedgateConfig* config_;
  static RoutingServer* server_;
};

test_support::TestStack* RoutingTest::stack_ = nullptr;
PgClusterSet* RoutingTest::clusters_ = nullptr;
TestPki* RoutingTest::pki_ = nullptr;
MedgateConfig* RoutingTest::config_ = nullptr;
RoutingServer* RoutingTest::server_ = nullptr;

TEST_F(RoutingTest, PlacesByResidencyRulesAndFailsClosed) {
  auto fr = Place(pki_->app(), "fr-patient-1", "FR");
  ASSERT_TRUE(fr.ok()) << fr.status();
  EXPECT_EQ(fr->region_id(), "fr-1");
  EXPECT_TRUE(fr->newly_placed());
  EXPECT_EQ(fr->residency_rule_version(), 1);
  auto be = Place(pki_->practitioner(), "be-patient-1", "BE");
  ASSERT_TRUE(be.ok()) << be.status();
  EXPECT_EQ(be->region_id(), "eu-1");
  auto de = Place(pki_->app(), "de-patient-1", "DE");
  ASSERT_TRUE(de.ok()) << de.status();
  EXPECT_EQ(de->region_id(), "de-1");

  // US has no rule: refused, not defaulted, even though the tenant serves it.
  auto us = Place(pki_->app(), "us-patient-1", "US");
  EXPECT_EQ(us.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(us.status().message()), HasSubstr("US"));
  // GB: a valid territory the tenant does not serve.
  EXPECT_EQ(Place(pki_->app(), "gb-patient-1", "GB").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(RoutingTest, PlacementIsIdempotentAndMovesAreExplicit) {
  auto first = Place(pki_->app(), "idem-1", "FR");
  ASSERT_TRUE(first.ok()) << first.status();
  auto again = Place(pki_->practitioner(), "idem-1", "FR");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->patient_id(), first->patient_id());
  EXPECT_EQ(again->region_id(), "fr-1");
  EXPECT_FALSE(again->newly_placed());
  auto moved = Place(pki_->app(), "idem-1", "DE");
  EXPECT_EQ(moved.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(moved.status().message()), HasSubstr("allow_move"));
  EXPECT_EQ(Place(pki_->app(), "idem-1", "DE", true).status().code(),
            absl::StatusCode::kUnimplemented);
  // Still where it was.
  EXPECT_EQ(Place(pki_->app(), "idem-1", "FR")->region_id(), "fr-1");
}

TEST_F(RoutingTest, DirectoryHoldsNoPatientReference) {
  const std::string ref = "INS-1234567890123-secret-ref";
  auto placed = Place(pki_->app(), ref, "FR");
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->patient_id().find(ref), std::string::npos);
  pqxx::connection c(clusters_->control().ConnectionString());
  pqxx::nontransaction q(c);
  // No column of any directory or audit row contains the reference in clear.
  for (const char* table : {"patients", "devices", "audit_log", "tenants"}) {
    EXPECT_EQ(q.exec_params1(absl::StrCat("SELECT count(*) FROM ", table, " t WHERE t::text LIKE $1"),
                             "%" + ref + "%")[0].as<int>(), 0) << table;
  }
}

// A database error reaches the client as its SQLSTATE and what that means; the server's own text,
// which names tables, functions and constraints, and may quote what the statement carried, stays
// in the service's log. Here a trigger (as a compromised or broken schema would) fails a
// placement with a text of its own, for each class of answer.
TEST_F(RoutingTest, ADatabaseErrorIsToldByItsSqlStateAndItsTextStaysInTheLog) {
  pqxx::connection c(clusters_->control().ConnectionString());
  pqxx::nontransaction q(c);
  auto drop = absl::MakeCleanup([&] {
    q.exec0("DROP TRIGGER IF EXISTS medgate_test_refuse ON patients");
    q.exec0("DROP FUNCTION IF EXISTS medgate_test_refuse()");
  });
  const struct {
    const char* errcode;
    absl::StatusCode code;
  } cases[] = {
      {"XX000", absl::StatusCode::kInternal},
      {"P0001", absl::StatusCode::kFailedPrecondition},
      {"23514", absl::StatusCode::kInvalidArgument},
      {"42501", absl::StatusCode::kInternal},
  };
  int n = 0;
  for (const auto& each : cases) {
    const std::string marker = absl::StrCat("hidden_relation_", each.errcode);
    q.exec0(absl::StrCat(
        "CREATE OR REPLACE FUNCTION medgate_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION USING ERRCODE = '", each.errcode, "', MESSAGE = 'table ", marker,
        " refused the row', DETAIL = 'Key (ref)=(detail-secret)'; END $$"));
    q.exec0("CREATE OR REPLACE TRIGGER medgate_test_refuse BEFORE INSERT ON patients "
            "FOR EACH ROW EXECUTE FUNCTION medgate_test_refuse()");
    ::testing::internal::CaptureStderr();
    auto placed = Place(pki_->app(), absl::StrCat("db-error-", ++n), "FR");
    const std::string logged = ::testing::internal::GetCapturedStderr();
    ASSERT_FALSE(placed.ok()) << each.errcode;
    EXPECT_EQ(placed.status().code(), each.code) << placed.status();
    const std::string message(placed.status().message());
    EXPECT_THAT(message, HasSubstr(absl::StrCat("database error ", each.errcode, ": ")));
    EXPECT_THAT(message, HasSubstr("the service's log has the database's message"));
    EXPECT_THAT(message, ::testing::Not(HasSubstr(marker)));
    EXPECT_THAT(message, ::testing::Not(HasSubstr("secret")));
    EXPECT_THAT(logged, HasSubstr(absl::StrCat("table ", marker, " refused the row")));
    EXPECT_THAT(logged, ::testing::Not(HasSubstr("detail-secret")));
  }
  std::move(drop).Invoke();
  EXPECT_TRUE(Place(pki_->app(), "db-error-after", "FR").ok());
}

TEST_F(RoutingTest, DevicesAssignResolveAndUnassign) {
  auto patient = Place(pki_->app(), "dev-owner-1", "BE");
  ASSERT_TRUE(patient.ok());
  ASSERT_TRUE(Place(pki_->app(), "dev-owner-2", "BE").ok());
  v1::AssignDeviceResponse assigned;
  ASSERT_TRUE(Assign(pki_->app(), "dev-100", "dev-owner-1", &assigned).ok());
  EXPECT_EQ(assigned.patient_id(), patient->patient_id());
  EXPECT_EQ(assigned.region_id(), "eu-1");
  EXPECT_TRUE(assigned.newly_assigned());
  // Idempotent for the same patient; refused for another one while assigned.
  ASSERT_TRUE(Assign(pki_->practitioner(), "dev-100", "dev-owner-1", &assigned).ok());
  EXPECT_FALSE(assigned.newly_assigned());
  grpc::Status busy = Assign(pki_->app(), "dev-100", "dev-owner-2");
  EXPECT_EQ(busy.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(busy.error_message(), HasSubstr("unassign"));
  // Assigning to a patient never placed: NOT_FOUND.
  EXPECT_EQ(Assign(pki_->app(), "dev-101", "never-placed").error_code(), grpc::StatusCode::NOT_FOUND);

  // Services resolve devices and patients in batches.
  {
    v1::ResolveDevicesRequest request;
    auto* key = request.add_devices();
    key->set_tenant_id("acme");
    key->set_device_id("dev-100");
    key = request.add_devices();
    key->set_tenant_id("globex");
    key->set_device_id("dev-100");
    v1::ResolveDevicesResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(Stub(IngestCert())->ResolveDevices(&context, request, &response).ok());
    ASSERT_EQ(response.devices_size(), 2);
    EXPECT_TRUE(response.devices(0).found());
    EXPECT_EQ(response.devices(0).patient_id(), patient->patient_id());
    EXPECT_EQ(response.devices(0).region_id(), "eu-1");
    EXPECT_FALSE(response.devices(1).found());
  }
  {
    v1::ResolvePatientsRequest request;
    request.add_patient_ids(patient->patient_id());
    request.add_patient_ids("pt_unknown");
    v1::ResolvePatientsResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(Stub(IngestCert())->ResolvePatients(&context, request, &response).ok());
    ASSERT_EQ(response.patients_size(), 2);
    EXPECT_TRUE(response.patients(0).found());
    EXPECT_EQ(response.patients(0).tenant_id(), "acme");
    EXPECT_EQ(response.patients(0).region_id(), "eu-1");
    EXPECT_EQ(response.patients(0).territory(), "BE");
    EXPECT_FALSE(response.patients(1).found());
  }

  v1::UnassignDeviceRequest unassign;
  unassign.set_device_id("dev-100");
  v1::UnassignDeviceResponse unassigned;
  grpc::ClientContext context;
  ASSERT_TRUE(Stub(pki_->app())->UnassignDevice(&context, unassign, &unassigned).ok());
  EXPECT_TRUE(unassigned.was_assigned());
  EXPECT_EQ(unassigned.patient_id(), patient->patient_id());
  // Not yet to another patient (ingest may still send its samples to the former one), but back to
  // the former patient at once.
  grpc::Status too_soon = Assign(pki_->app(), "dev-100", "dev-owner-2");
  EXPECT_EQ(too_soon.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(too_soon.error_message(), HasSubstr("was unassigned"));
  EXPECT_TRUE(Assign(pki_->app(), "dev-100", "dev-owner-1").ok());
}

// Two first assignments of a new device at once: the second waits for the first's commit and is
// then refused, instead of both answering OK and the second silently replacing the first.
TEST_F(RoutingTest, ConcurrentFirstAssignmentsGiveADeviceToOnePatient) {
  auto a = Place(pki_->app(), "race-owner-a", "BE");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(Place(pki_->app(), "race-owner-b", "BE").ok());
  // The first assignment, to A, held uncommitted while B's runs.
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work held(first);
  held.exec_params0("INSERT INTO devices (tenant_id, device_id, patient_id, assigned_at) "
                    "VALUES ('acme', 'race-dev', $1, now())", a->patient_id());
  grpc::Status second;
  std::thread other([&] { second = Assign(pki_->app(), "race-dev", "race-owner-b"); });
  // B's insert waits on the held row's key before A's commits.
  const bool waiting = ADeviceInsertWaitsOnALock();
  held.commit();
  other.join();
  ASSERT_TRUE(waiting) << "the second assignment never waited for the first";
  EXPECT_EQ(second.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << second.error_message();
  EXPECT_THAT(second.error_message(), HasSubstr("assigned to another patient"));
  EXPECT_EQ(CountIn(clusters_->control(),
                    absl::StrCat("SELECT count(*) FROM devices WHERE device_id = 'race-dev' AND "
                                 "patient_id = '", a->patient_id(), "'")),
            1);
}

// A first assignment whose look-up found no row, while another call gives the device to A and
// takes it back (committed after that look-up): the row it then meets was unassigned just now,
// and the reassignment wait applies to it, as to any unassigned device.
TEST_F(RoutingTest, AFirstAssignmentMeetingADeviceUnassignedMeanwhileWaitsForTheReassignment) {
  auto a = Place(pki_->app(), "race-unassigned-a", "BE");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(Place(pki_->app(), "race-unassigned-b", "BE").ok());
  // What the other calls leave, held uncommitted: fed A, unassigned now.
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work held(first);
  held.exec_params0(
      "INSERT INTO devices (tenant_id, device_id, patient_id, former_patient_id, assigned_at, "
      "updated_at) VALUES ('acme', 'race-unassigned-dev', NULL, $1, now(), clock_timestamp())",
      a->patient_id());
  grpc::Status second;
  std::thread other(
      [&] { second = Assign(pki_->app(), "race-unassigned-dev", "race-unassigned-b"); });
  const bool waiting = ADeviceInsertWaitsOnALock();
  held.commit();
  other.join();
  ASSERT_TRUE(waiting) << "the assignment never waited for the held row";
  EXPECT_EQ(second.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << second.error_message();
  EXPECT_THAT(second.error_message(), HasSubstr("was unassigned"));
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM devices WHERE device_id = 'race-unassigned-dev' AND "
                    "patient_id IS NULL"),
            1);
}

// Two puts of one territory's rule at once: the second waits for the first's commit, then stores
// the next version (expected_version 0: whatever the current one), or is refused with ABORTED
// when it expected the version the first replaced; never a database error.
TEST_F(RoutingTest, ConcurrentRulePutsStoreOneVersionEach) {
  auto put = [&](int64_t expected_version) {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory("PT");  // as seeded: placements do not change
    request.mutable_rule()->add_region_ids("eu-1");
    request.mutable_rule()->add_region_ids("fr-1");
    request.set_expected_version(expected_version);
    v1::PutResidencyRuleResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(pki_->ops())->PutResidencyRule(&context, request, &response);
    return std::make_pair(status, response.rule().version());
  };
  auto race = [&](int64_t held_version, int64_t expected_version) {
    pqxx::connection first(clusters_->control().ConnectionString());
    pqxx::work held(first);
    held.exec_params0("INSERT INTO residency_rules (territory, version, region_ids, readable_from, "
                      "updated_by) VALUES ('PT', $1, '{eu-1,fr-1}', '{}', 'test')", held_version);
    std::pair<grpc::Status, int64_t> second;
    std::thread other([&] { second = put(expected_version); });
    const bool waiting = test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
      return CountIn(clusters_->control(),
                     "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND query LIKE 'INSERT INTO residency_rules%'") == 1;
    });
    held.commit();
    other.join();
    EXPECT_TRUE(waiting) << "the second put never waited for the first";
    return second;
  };
  // Version 2 (the seed is version 1) put twice at once, the second put unconditional.
  auto [first_status, first_version] = race(2, 0);
  ASSERT_TRUE(first_status.ok()) << first_status.error_message();
  EXPECT_EQ(first_version, 3);
  // Both expected version 3: the one that commits second is refused.
  auto [stale, ignored] = race(4, 3);
  EXPECT_EQ(stale.error_code(), grpc::StatusCode::ABORTED) << stale.error_message();
  EXPECT_THAT(stale.error_message(), HasSubstr("re-read and retry"));
  EXPECT_EQ(CountIn(clusters_->control(), "SELECT count(*) FROM residency_rules WHERE territory = 'PT'"),
            4);
}

// A put whose expected_version is behind the rule is answered ABORTED once: its transaction is
// not run again (each run takes the territory's lock, and placements of the territory wait
// behind it). Here another session takes the territory's lock again as soon as the put has had
// it: a put that ran again would wait for that session until its statement timeout, and answer
// DEADLINE_EXCEEDED.
TEST_F(RoutingTest, AStaleRulePutIsAnsweredWithoutRunningAgain) {
  pqxx::connection holder(clusters_->control().ConnectionString());
  pqxx::nontransaction hold(holder);
  hold.exec("SELECT pg_advisory_lock_shared(7201, hashtext('PT'))");
  grpc::Status status;
  std::thread put([&] {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory("PT");
    request.mutable_rule()->add_region_ids("eu-1");
    request.mutable_rule()->add_region_ids("fr-1");
    request.set_expected_version(1'000'000);
    v1::PutResidencyRuleResponse response;
    grpc::ClientContext context;
    status = Stub(pki_->ops())->PutResidencyRule(&context, request, &response);
  });
  const bool waited = test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
    return CountIn(clusters_->control(),
                   "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE '%pg_advisory_xact_lock%'") == 1;
  });
  // The put has the lock once this session lets go, and this session's next request waits for
  // the put's transaction to end.
  hold.exec("SELECT pg_advisory_unlock_shared(7201, hashtext('PT')), "
            "pg_advisory_lock_shared(7201, hashtext('PT'))");
  put.join();
  hold.exec("SELECT pg_advisory_unlock_all()");
  EXPECT_TRUE(waited) << "the put never waited for the territory's lock";
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("not 1000000; re-read and retry"));
}

// A placement racing a rule put: the patient is placed under the rule as it stands when the
// placement commits. A put in progress (its rule held, its next version written) makes the
// placement wait, and once the put commits the placement follows the new version, not the one it
// would have read before the put committed.
TEST_F(RoutingTest, APlacementRacingARulePutFollowsTheRuleItCommitsUnder) {
  // AT is seeded as [eu-1, fr-1]: a patient would go to eu-1. The put narrows it to fr-1.
  absl::StatusOr<TestCert> app = AppOfTenantServing("racer", "AT");
  ASSERT_TRUE(app.ok()) << app.status();
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work held(first);
  // What a put does first (sql::kLockRule), then its new version.
  held.exec("SELECT pg_advisory_xact_lock(7201, hashtext('AT'))");
  const int64_t current =
      held.exec1("SELECT version FROM residency_rules WHERE territory = 'AT' ORDER BY version DESC "
                 "LIMIT 1")[0]
          .as<int64_t>();
  held.exec_params0("INSERT INTO residency_rules (territory, version, region_ids, readable_from, "
                    "updated_by) VALUES ('AT', $1, '{fr-1}', '{}', 'test')",
                    current + 1);
  absl::StatusOr<v1::PlacePatientResponse> placed;
  std::thread other([&] { placed = Place(*app, "at-race-1", "AT"); });
  const bool waiting = AdvisoryLockWaits("pg_advisory_xact_lock_shared", 1);
  held.commit();
  other.join();
  EXPECT_TRUE(waiting) << "the placement never waited for the put in progress";
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->region_id(), "fr-1");
  EXPECT_EQ(placed->residency_rule_version(), current + 1);
  EXPECT_EQ(CountIn(clusters_->control(),
                    absl::StrCat("SELECT count(*) FROM patients WHERE patient_id = '",
                                 placed->patient_id(), "' AND region_id = 'fr-1' AND rule_version = ",
                                 current + 1)),
            1);
}

// Placements that keep overlapping do not starve a put: a placement that comes while a put waits
// for the placements in progress waits behind the put, and is placed under its version.
TEST_F(RoutingTest, APutWaitingForPlacementsIsNotOvertakenByNewOnes) {
  // IT is seeded as [eu-1, fr-1]; the put narrows it to fr-1.
  absl::StatusOr<TestCert> app = AppOfTenantServing("queuer", "IT");
  ASSERT_TRUE(app.ok()) << app.status();
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work placing(first);
  placing.exec("SELECT pg_advisory_xact_lock_shared(7201, hashtext('IT'))");  // a placement
  std::pair<grpc::Status, int64_t> put;
  std::thread putter([&] {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory("IT");
    request.mutable_rule()->add_region_ids("fr-1");
    v1::PutResidencyRuleResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(pki_->ops())->PutResidencyRule(&context, request, &response);
    put = {status, response.rule().version()};
  });
  const bool put_waits = AdvisoryLockWaits("pg_advisory_xact_lock(", 1);
  absl::StatusOr<v1::PlacePatientResponse> placed;
  std::thread placer([&] { placed = Place(*app, "it-queue-1", "IT"); });
  const bool placement_waits = AdvisoryLockWaits("pg_advisory_xact_lock_shared", 1);
  placing.commit();
  putter.join();
  placer.join();
  EXPECT_TRUE(put_waits) << "the put never waited for the placement in progress";
  EXPECT_TRUE(placement_waits) << "the new placement went past the waiting put";
  ASSERT_TRUE(put.first.ok()) << put.first.error_message();
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->residency_rule_version(), put.second);
  EXPECT_EQ(placed->region_id(), "fr-1");
}

// A rule that no longer allows a region where patients of its territory live cannot take them
// out of it (medgate does not move data): the put is refused, naming the region and how many live
// there, unless ops keep them there knowingly; then the response and the audit entry count them.
TEST_F(RoutingTest, ARuleThatDropsARegionWherePatientsLiveIsRefusedUnlessTheyAreKeptThere) {
  // ES is seeded as [eu-1, fr-1]: its patients go to eu-1.
  absl::StatusOr<TestCert> app = AppOfTenantServing("strander", "ES");
  ASSERT_TRUE(app.ok()) << app.status();
  for (const char* ref : {"es-kept-1", "es-kept-2"}) {
    absl::StatusOr<v1::PlacePatientResponse> placed = Place(*app, ref, "ES");
    ASSERT_TRUE(placed.ok()) << placed.status();
    ASSERT_EQ(placed->region_id(), "eu-1");
  }
  auto put = [&](std::vector<std::string> regions, bool keep, v1::PutResidencyRuleResponse* response,
                 std::vector<std::string> readable_from = {}) {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory("ES");
    for (const std::string& r : regions) request.mutable_rule()->add_region_ids(r);
    for (const std::string& t : readable_from) {
      request.mutable_rule()->add_readable_from_territories(t);
    }
    request.set_keep_placed_patients(keep);
    grpc::ClientContext context;
    return Stub(pki_->ops())->PutResidencyRule(&context, request, response);
  };
  auto version = [&] {
    return CountIn(clusters_->control(),
                   "SELECT max(version) FROM residency_rules WHERE territory = 'ES'");
  };
  const int64_t before = version();

  v1::PutResidencyRuleResponse refused_response;
  grpc::Status refused = put({"fr-1"}, false, &refused_response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("region 'eu-1' (2 patients of ES live there)"));
  EXPECT_THAT(refused.error_message(), HasSubstr("keep_placed_patients"));
  EXPECT_EQ(version(), before);
  EXPECT_EQ(Place(*app, "es-new-1", "ES")->region_id(), "eu-1");  // the rule is as it was

  // A put that keeps the region needs no acknowledgement and counts nothing.
  v1::PutResidencyRuleResponse reordered;
  grpc::Status kept_region = put({"fr-1", "eu-1"}, false, &reordered, {"FR", "PT"});
  ASSERT_TRUE(kept_region.ok()) << kept_region.error_message();
  EXPECT_EQ(reordered.placed_outside_rule_size(), 0);
  // Its chained audit entry says where the data may be read from, as well as where it is stored.
  EXPECT_EQ(CountIn(clusters_->control(),
                    absl::StrCat("SELECT count(*) FROM audit_log WHERE object_type = "
                                 "'residency_rule' AND object_id = 'ES@v",
                                 reordered.rule().version(),
                                 "' AND reason = 'regions=fr-1,eu-1 readable_from=FR,PT'")),
            1);

  v1::PutResidencyRuleResponse narrowed;
  grpc::Status kept = put({"fr-1"}, true, &narrowed);
  ASSERT_TRUE(kept.ok()) << kept.error_message();
  EXPECT_EQ(narrowed.rule().version(), before + 2);
  ASSERT_EQ(narrowed.placed_outside_rule_size(), 1);
  EXPECT_EQ(narrowed.placed_outside_rule(0).region_id(), "eu-1");
  EXPECT_EQ(narrowed.placed_outside_rule(0).patients(), 3);
  EXPECT_EQ(CountIn(clusters_->control(),
                    absl::StrCat("SELECT count(*) FROM audit_log WHERE object_type = "
                                 "'residency_rule' AND object_id = 'ES@v",
                                 before + 2, "' AND reason = 'regions=fr-1 readable_from=- placed_outside=eu-1:3'")),
            1);
  // The patients stay where they live; new ones follow the rule.
  EXPECT_EQ(Place(*app, "es-kept-1", "ES")->region_id(), "eu-1");
  EXPECT_EQ(Place(*app, "es-new-2", "ES")->region_id(), "fr-1");
  // A later put that drops no region of the current version needs no acknowledgement: eu-1 was
  // dropped knowingly already, and the patients in fr-1 live where the rule allows.
  v1::PutResidencyRuleResponse again;
  grpc::Status same = put({"fr-1"}, false, &again);
  ASSERT_TRUE(same.ok()) << same.error_message();
  EXPECT_EQ(again.placed_outside_rule_size(), 0);
  // Dropping fr-1 for eu-1 drops the region where es-new-2 lives: refused, counted alone.
  grpc::Status swapped = put({"eu-1"}, false, &again);
  EXPECT_EQ(swapped.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << swapped.error_message();
  EXPECT_THAT(swapped.error_message(), HasSubstr("region 'fr-1' (1 patient of ES lives there)"));
  EXPECT_THAT(swapped.error_message(), ::testing::Not(HasSubstr("eu-1")));
}

// A tenant's identities start calls at most at limits.tenant_calls_per_second after
// limits.tenant_call_burst, per service instance: past them RESOURCE_EXHAUSTED says which limits
// and when to retry. Ops and services are not counted, nor is another tenant.
TEST_F(RoutingTest, ATenantsCallsAreBoundedByTheCallRate) {
  MedgateConfig limited = *config_;
  limited.limits.tenant_calls_per_second = 1;
  limited.limits.tenant_call_burst = 3;
  auto created = RoutingServer::Create(limited);
  ASSERT_TRUE(created.ok()) << created.status();
  std::unique_ptr<RoutingServer> server = *std::move(created);
  ASSERT_TRUE(server->Start().ok());
  auto stub = [&](const TestCert& cert) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", server->port()),
                               TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), 60},
                               pki_->SpiffeId("/service/routing"));
    EXPECT_TRUE(channel.ok());
    return v1::TenantRouting::NewStub(*channel);
  };
  auto place = [&](const TestCert& as, const std::string& ref) {
    v1::PlacePatientRequest request;
    static int counter = 0;
    request.set_request_id(absl::StrCat("rate-place-", ++counter));
    request.set_patient_ref(ref);
    request.set_territory("FR");
    v1::PlacePatientResponse response;
    grpc::ClientContext context;
    return stub(as)->PlacePatient(&context, request, &response);
  };
  // Calls one after the other: the burst goes through, then one is refused (well before 50 at one
  // call a second, unless each took about a second).
  int before_refusal = 0;
  grpc::Status refused;
  for (int i = 0; i < 50 && refused.ok(); ++i) {
    grpc::Status status = place(pki_->app(), absl::StrCat("rate-", i % 2));
    if (status.ok()) {
      ++before_refusal;
    } else {
      refused = status;
    }
  }
  ASSERT_FALSE(refused.ok()) << "50 calls in a row, none refused";
  EXPECT_GE(before_refusal, 3);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("limits.tenant_calls_per_second"));
  EXPECT_THAT(refused.error_message(), HasSubstr("retry in"));

  // Another tenant, ops and services call on.
  EXPECT_TRUE(place(pki_->globex_app(), "rate-globex").ok());
  for (const TestCert* cert : {&pki_->ops(), &pki_->service()}) {
    for (int i = 0; i < 5; ++i) {
      v1::ListRegionsRequest request;
      v1::ListRegionsResponse response;
      grpc::ClientContext context;
      grpc::Status status = stub(*cert)->ListRegions(&context, request, &response);
      EXPECT_TRUE(status.ok()) << status.error_message();
    }
  }
  // Time gives the tenant calls back.
  EXPECT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30),
                                      [&] { return place(pki_->app(), "rate-0").ok(); }));
  server->Shutdown();
}

// An upsert that drops a territory where patients of the tenant live is refused, naming the
// territory and how many live there, unless ops drop it knowingly: those patients then stay placed
// and served, the tenant places no new patient of the territory, and the response and the tenant's
// audit entry count them. A territory without patients of the tenant is dropped without a word.
TEST_F(RoutingTest, DroppingATerritoryWherePatientsLiveIsRefusedUnlessKeptKnowingly) {
  absl::StatusOr<TestCert> app = AppOfTenantServing("territory-dropper", "NL");
  ASSERT_TRUE(app.ok()) << app.status();
  auto upsert = [&](std::vector<std::string> territories, bool keep,
                    v1::UpsertTenantResponse* response) {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id("territory-dropper");
    request.mutable_tenant()->set_display_name("territory-dropper");
    for (const std::string& t : territories) request.mutable_tenant()->add_territories(t);
    request.mutable_tenant()->set_active(true);
    request.set_keep_placed_patients(keep);
    grpc::ClientContext context;
    return Stub(pki_->ops())->UpsertTenant(&context, request, response);
  };
  v1::UpsertTenantResponse response;
  ASSERT_TRUE(upsert({"NL", "FR", "DE"}, false, &response).ok());
  std::string first_region;
  for (const char* ref : {"fr-dropped-1", "fr-dropped-2"}) {
    absl::StatusOr<v1::PlacePatientResponse> placed = Place(*app, ref, "FR");
    ASSERT_TRUE(placed.ok()) << placed.status();
    if (first_region.empty()) first_region = placed->region_id();
  }
  ASSERT_TRUE(Place(*app, "nl-stays-1", "NL").ok());

  // DE has no patient of the tenant: dropping it says nothing.
  grpc::Status quiet = upsert({"NL", "FR"}, false, &response);
  ASSERT_TRUE(quiet.ok()) << quiet.error_message();
  EXPECT_EQ(response.patients_in_dropped_territories_size(), 0);

  grpc::Status refused = upsert({"NL"}, false, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << refused.error_message();
  EXPECT_THAT(refused.error_message(),
              HasSubstr("territory 'FR' (2 patients of tenant territory-dropper live there)"));
  EXPECT_THAT(refused.error_message(), HasSubstr("keep_placed_patients"));
  ASSERT_TRUE(Place(*app, "fr-dropped-3", "FR").ok());  // FR still served

  v1::UpsertTenantResponse dropped;
  grpc::Status kept = upsert({"NL"}, true, &dropped);
  ASSERT_TRUE(kept.ok()) << kept.error_message();
  ASSERT_EQ(dropped.patients_in_dropped_territories_size(), 1);
  EXPECT_EQ(dropped.patients_in_dropped_territories(0).territory(), "FR");
  EXPECT_EQ(dropped.patients_in_dropped_territories(0).patients(), 3);
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'tenant' AND object_id = "
                    "'territory-dropper' AND reason LIKE "
                    "'% territories=NL % patients_in_dropped_territories=FR:3'"),
            1);
  // The patients placed there stay where they are, and are answered as before; no new one is
  // placed.
  absl::StatusOr<v1::PlacePatientResponse> again = Place(*app, "fr-dropped-1", "FR");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->newly_placed());
  EXPECT_EQ(again->region_id(), first_region);
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM patients WHERE tenant_id = 'territory-dropper' AND "
                    "territory = 'FR'"),
            3);
  absl::StatusOr<v1::PlacePatientResponse> fresh = Place(*app, "fr-dropped-4", "FR");
  ASSERT_FALSE(fresh.ok());
  EXPECT_EQ(fresh.status().code(), absl::StatusCode::kFailedPrecondition) << fresh.status();
}

// A tenant narrowed to fewer regions keeps its patients where they live (medgate does not move
// data): an upsert whose narrowing drops a region holding patients of the tenant is refused,
// naming the region and how many live there, unless ops keep them there knowingly.
TEST_F(RoutingTest, ANarrowingThatDropsARegionWherePatientsLiveIsRefusedUnlessTheyAreKeptThere) {
  // NL is seeded as [eu-1, fr-1]: an unnarrowed tenant's patients go to eu-1.
  absl::StatusOr<TestCert> app = AppOfTenantServing("narrower", "NL");
  ASSERT_TRUE(app.ok()) << app.status();
  for (const char* ref : {"nl-kept-1", "nl-kept-2"}) {
    absl::StatusOr<v1::PlacePatientResponse> placed = Place(*app, ref, "NL");
    ASSERT_TRUE(placed.ok()) << placed.status();
    ASSERT_EQ(placed->region_id(), "eu-1");
  }
  auto upsert = [&](std::optional<std::vector<std::string>> regions, bool keep,
                    v1::UpsertTenantResponse* response, bool drop_narrowing = false) {
    v1::UpsertTenantRequest request;
    request.set_drop_region_narrowing(drop_narrowing);
    request.mutable_tenant()->set_tenant_id("narrower");
    request.mutable_tenant()->set_display_name("narrower");
    request.mutable_tenant()->add_territories("NL");
    if (regions) {
      for (const std::string& r : *regions) request.mutable_tenant()->add_region_ids(r);
    }
    request.mutable_tenant()->set_active(true);
    request.set_keep_placed_patients(keep);
    grpc::ClientContext context;
    return Stub(pki_->ops())->UpsertTenant(&context, request, response);
  };
  v1::UpsertTenantResponse response;
  grpc::Status refused = upsert(std::vector<std::string>{"fr-1"}, false, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << refused.error_message();
  EXPECT_THAT(refused.error_message(),
              HasSubstr("region 'eu-1' (2 patients of tenant narrower live there)"));
  EXPECT_THAT(refused.error_message(), HasSubstr("keep_placed_patients"));
  EXPECT_EQ(Place(*app, "nl-new-1", "NL")->region_id(), "eu-1");  // still unnarrowed

  v1::UpsertTenantResponse narrowed;
  grpc::Status kept = upsert(std::vector<std::string>{"fr-1"}, true, &narrowed);
  ASSERT_TRUE(kept.ok()) << kept.error_message();
  ASSERT_EQ(narrowed.placed_outside_narrowing_size(), 1);
  EXPECT_EQ(narrowed.placed_outside_narrowing(0).region_id(), "eu-1");
  EXPECT_EQ(narrowed.placed_outside_narrowing(0).patients(), 3);
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'tenant' AND object_id = "
                    "'narrower' AND reason LIKE '% regions=fr-1 placed_outside=eu-1:3'"),
            1);
  EXPECT_EQ(Place(*app, "nl-kept-1", "NL")->region_id(), "eu-1");
  EXPECT_EQ(Place(*app, "nl-new-2", "NL")->region_id(), "fr-1");
  // Resending the narrowing (a suspension, say) drops nothing more, and widening drops nothing.
  v1::UpsertTenantResponse again;
  grpc::Status resent = upsert(std::vector<std::string>{"fr-1"}, false, &again);
  ASSERT_TRUE(resent.ok()) << resent.error_message();
  EXPECT_EQ(again.placed_outside_narrowing_size(), 0);
  // Widening is asked for, not the upsert of one who forgot to resend the regions.
  grpc::Status forgot = upsert(std::nullopt, false, &again);
  EXPECT_EQ(forgot.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << forgot.error_message();
  EXPECT_THAT(forgot.error_message(), HasSubstr("is narrowed to fr-1"));
  EXPECT_THAT(forgot.error_message(), HasSubstr("drop_region_narrowing"));
  {
    v1::GetTenantRequest get;
    get.set_tenant_id("narrower");
    v1::GetTenantResponse got;
    grpc::ClientContext context;
    ASSERT_TRUE(Stub(pki_->ops())->GetTenant(&context, get, &got).ok());
    EXPECT_THAT(got.tenant().region_ids(), ::testing::ElementsAre("fr-1"));  // still narrowed
  }
  grpc::Status widened = upsert(std::nullopt, false, &again, true);
  ASSERT_TRUE(widened.ok()) << widened.error_message();
  EXPECT_EQ(again.tenant().region_ids_size(), 0);
  // Narrowing to eu-1 now drops fr-1, where nl-new-2 lives, and counts it alone.
  grpc::Status swapped = upsert(std::vector<std::string>{"eu-1"}, false, &again);
  EXPECT_EQ(swapped.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << swapped.error_message();
  EXPECT_THAT(swapped.error_message(),
              HasSubstr("region 'fr-1' (1 patient of tenant narrower lives there)"));
  EXPECT_THAT(swapped.error_message(), ::testing::Not(HasSubstr("eu-1")));
}

// A placement racing an upsert of its tenant: an upsert in progress holds the tenant, so the
// placement waits, and follows the narrowing the upsert commits.
TEST_F(RoutingTest, APlacementRacingATenantUpsertFollowsTheNarrowingItCommitsUnder) {
  absl::StatusOr<TestCert> app = AppOfTenantServing("racing-tenant", "PT");
  ASSERT_TRUE(app.ok()) << app.status();
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work held(first);
  // What an upsert does first (sql::kLockTenant), then its new narrowing.
  held.exec("SELECT pg_advisory_xact_lock(7202, hashtext('racing-tenant'))");
  held.exec0("UPDATE tenants SET region_ids = '{fr-1}' WHERE tenant_id = 'racing-tenant'");
  absl::StatusOr<v1::PlacePatientResponse> placed;
  std::thread other([&] { placed = Place(*app, "pt-race-1", "PT"); });
  const bool waiting = AdvisoryLockWaits("pg_advisory_xact_lock_shared(7202", 1);
  held.commit();
  other.join();
  EXPECT_TRUE(waiting) << "the placement never waited for the upsert in progress";
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->region_id(), "fr-1");  // PT's rule alone would give eu-1
}

// An upsert racing a placement of its tenant: the upsert waits for the placement in progress
// (its tenant held shared) and counts the patient it placed.
TEST_F(RoutingTest, ATenantUpsertWaitsForThePlacementsInProgressAndCountsThem) {
  absl::StatusOr<TestCert> app = AppOfTenantServing("upsert-racer", "IE");
  ASSERT_TRUE(app.ok()) << app.status();
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work placing(first);
  // What a placement does first (sql::kShareTenant), then its patient, in eu-1.
  placing.exec("SELECT pg_advisory_xact_lock_shared(7202, hashtext('upsert-racer'))");
  placing.exec0("INSERT INTO patients (patient_id, tenant_id, territory, region_id, rule_version) "
                "VALUES ('ie-upsert-race-1', 'upsert-racer', 'IE', 'eu-1', 1)");
  grpc::Status upserted;
  std::thread upserter([&] {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id("upsert-racer");
    request.mutable_tenant()->set_display_name("upsert-racer");
    request.mutable_tenant()->add_territories("IE");
    request.mutable_tenant()->add_region_ids("fr-1");
    request.mutable_tenant()->set_active(true);
    v1::UpsertTenantResponse response;
    grpc::ClientContext context;
    upserted = Stub(pki_->ops())->UpsertTenant(&context, request, &response);
  });
  const bool waits = AdvisoryLockWaits("pg_advisory_xact_lock(7202", 1);
  placing.commit();
  upserter.join();
  EXPECT_TRUE(waits) << "the upsert never waited for the placement in progress";
  EXPECT_EQ(upserted.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << upserted.error_message();
  EXPECT_THAT(upserted.error_message(),
              HasSubstr("region 'eu-1' (1 patient of tenant upsert-racer lives there)"));
}

// Two replicas seeding at once (or a seed racing ops): a seed stores a territory's first version
// only, never a second one over a rule stored after it looked.
TEST_F(RoutingTest, ASeedRacingAnotherPutStoresNothingOverIt) {
  {
    // NL without its seeded rule, as on a first deployment (a superuser bypasses append-only).
    pqxx::connection c(clusters_->control().ConnectionString());
    pqxx::work txn(c);
    txn.exec0("SET LOCAL session_replication_role = replica");
    txn.exec0("DELETE FROM residency_rules WHERE territory = 'NL'");
    txn.commit();
  }
  pqxx::connection first(clusters_->control().ConnectionString());
  pqxx::work held(first);
  held.exec0("INSERT INTO residency_rules (territory, version, region_ids, readable_from, "
             "updated_by) VALUES ('NL', 1, '{eu-1,fr-1}', '{}', 'another replica')");
  CallContext ctx;
  ctx.principal.kind = PrincipalKind::kService;
  ctx.principal.spiffe_id = pki_->SpiffeId("/service/routing");
  ctx.request_id = "seed-rules";
  ctx.origin = "config";
  RuleInfo seed;
  seed.territory = "NL";
  seed.region_ids = {"eu-1", "fr-1"};
  absl::Status seeded = absl::UnknownError("not run");
  std::thread seeder([&] { seeded = server_->core().SeedRules(ctx, {seed}); });
  const bool waiting = test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
    return CountIn(clusters_->control(),
                   "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE 'INSERT INTO residency_rules%'") == 1;
  });
  held.commit();
  seeder.join();
  EXPECT_TRUE(waiting) << "the seed never waited for the other put";
  EXPECT_TRUE(seeded.ok()) << seeded;
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM residency_rules WHERE territory = 'NL'"),
            1);
}

// Once routing.device_reassign_wait_seconds has passed since its unassignment, a device may feed
// another patient.
TEST_F(RoutingTest, AnUnassignedDeviceFeedsAnotherPatientAfterTheWait) {
  const std::string path = absl::StrCat(stack_->dir(), "/short-wait.yaml");
  ASSERT_TRUE(stack_->WriteConfig(path).ok());
  std::stringstream yaml;
  yaml << std::ifstream(path).rdbuf();
  std::string text = yaml.str();
  const std::string from = "routing:\n  seed_rules:\n";
  ASSERT_NE(text.find(from), std::string::npos);
  text.replace(text.find(from), from.size(),
               "routing:\n  device_reassign_wait_seconds: 3\n  seed_rules:\n");
  auto root = ConfigNode::Parse(text);
  ASSERT_TRUE(root.ok()) << root.status();
  auto config = ParseMedgateConfig(*root);
  ASSERT_TRUE(config.ok()) << config.status();
  auto server = RoutingServer::Create(*config);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  auto stub = [&](const TestCert& cert) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                               TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), 60},
                               pki_->SpiffeId("/service/routing"));
    return v1::TenantRouting::NewStub(*channel);
  };
  auto assign = [&](const std::string& ref) {
    v1::AssignDeviceRequest request;
    request.set_device_id("dev-wait");
    request.set_patient_ref(ref);
    v1::AssignDeviceResponse response;
    grpc::ClientContext context;
    return stub(pki_->app())->AssignDevice(&context, request, &response);
  };
  auto unassign = [&] {
    v1::UnassignDeviceRequest request;
    request.set_device_id("dev-wait");
    v1::UnassignDeviceResponse response;
    grpc::ClientContext context;
    return stub(pki_->app())->UnassignDevice(&context, request, &response);
  };
  // What ingest is told: the device's patient and when its assignment began.
  auto resolve = [&]() -> std::optional<v1::ResolvedDevice> {
    v1::ResolveDevicesRequest request;
    request.add_devices()->set_tenant_id("acme");
    request.mutable_devices(0)->set_device_id("dev-wait");
    v1::ResolveDevicesResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub(IngestCert())->ResolveDevices(&context, request, &response);
    if (!status.ok() || response.devices_size() != 1) {
      ADD_FAILURE() << status.error_message();
      return std::nullopt;
    }
    return response.devices(0);
  };
  auto micros = [](const google::protobuf::Timestamp& t) {
    return t.seconds() * 1000000 + t.nanos() / 1000;
  };
  auto patient1 = Place(pki_->app(), "wait-owner-1", "FR");
  ASSERT_TRUE(patient1.ok());
  auto patient2 = Place(pki_->app(), "wait-owner-2", "FR");
  ASSERT_TRUE(patient2.ok());
  const int64_t before = absl::ToUnixMicros(absl::Now());
  ASSERT_TRUE(assign("wait-owner-1").ok());
  std::optional<v1::ResolvedDevice> first = resolve();
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(first->found());
  ASSERT_TRUE(first->has_assigned_at());
  const int64_t began = micros(first->assigned_at());
  EXPECT_GE(began, before - 1000000);  // the database's clock, on this machine
  EXPECT_LE(began, absl::ToUnixMicros(absl::Now()) + 1000000);
  // Assigning it again to the same patient (a retry) changes nothing.
  ASSERT_TRUE(assign("wait-owner-1").ok());
  EXPECT_EQ(micros(resolve()->assigned_at()), began);
  // Unassigned, it has no patient and no assignment time; given back to the same patient at
  // once, it continues the assignment it had.
  ASSERT_TRUE(unassign().ok());
  EXPECT_FALSE(resolve()->found());
  EXPECT_FALSE(resolve()->has_assigned_at());
  ASSERT_TRUE(assign("wait-owner-1").ok());
  EXPECT_EQ(micros(resolve()->assigned_at()), began);
  // Given back only after longer than the reassignment wait (3 s here), when someone else may
  // have worn it meanwhile, a new assignment begins: what it measured unassigned is no one's.
  ASSERT_TRUE(unassign().ok());
  const int64_t left_unassigned = absl::ToUnixMicros(absl::Now());
  absl::SleepFor(absl::Seconds(4));
  ASSERT_TRUE(assign("wait-owner-1").ok());
  ASSERT_TRUE(resolve()->has_assigned_at());
  EXPECT_GT(micros(resolve()->assigned_at()), left_unassigned);

  ASSERT_TRUE(unassign().ok());
  const int64_t unassigned_at = absl::ToUnixMicros(absl::Now());
  EXPECT_EQ(assign("wait-owner-2").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  grpc::Status later;
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
    later = assign("wait-owner-2");
    return later.ok();
  })) << later.error_message();
  // Another patient's assignment begins when it is made: after the unassignment, so that the
  // samples the device measured for the first patient are not the second's.
  std::optional<v1::ResolvedDevice> second = resolve();
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->patient_id(), patient2->patient_id());
  ASSERT_TRUE(second->has_assigned_at());
  EXPECT_GT(micros(second->assigned_at()), unassigned_at);

  // An unassignment slow to commit (here it waits for the audit chain's head): look-ups answer
  // the second patient until it commits, and caches keep that answer for as long as the wait, so
  // the wait counts from the commit, not from when the unassignment began.
  {
    pqxx::connection holder(stack_->clusters().control().ConnectionString());
    pqxx::work hold(holder);
    hold.exec("SELECT 1 FROM audit_head FOR UPDATE");
    std::promise<grpc::Status> slow;
    std::thread unassigning([&] { slow.set_value(unassign()); });
    // Once the unassignment waits for the head, the wait passes while it has not committed.
    const bool waiting = test_support::PollUntil(absl::Now() + absl::Seconds(30), [] {
      return CountIn(clusters_->control(),
                     "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") == 1;
    });
    EXPECT_TRUE(waiting) << "the unassignment never waited for the audit chain's head";
    absl::SleepFor(absl::Seconds(4));  // longer than the 3 s wait
    std::optional<v1::ResolvedDevice> still = resolve();
    ASSERT_TRUE(still.has_value());
    EXPECT_EQ(still->patient_id(), patient2->patient_id());
    hold.commit();
    unassigning.join();
    ASSERT_TRUE(slow.get_future().get().ok());
  }
  EXPECT_EQ(assign("wait-owner-1").error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  // An unassignment whose COMMIT itself is slow (a deferred trigger standing in for a slow disk
  // or a synchronous standby), longer than the wait: look-ups answered the former patient until
  // the COMMIT was done, so the wait still counts from then, and another patient must wait.
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
    return assign("wait-owner-1").ok();
  }));
  {
    pqxx::connection admin(stack_->clusters().control().ConnectionString());
    pqxx::nontransaction q(admin);
    q.exec("CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
           "$$ BEGIN PERFORM pg_sleep(4); RETURN NULL; END $$");
    q.exec("CREATE CONSTRAINT TRIGGER test_slow_unassignment AFTER UPDATE ON devices "
           "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
           "WHEN (OLD.patient_id IS NOT NULL AND NEW.patient_id IS NULL) "
           "EXECUTE FUNCTION test_slow_commit()");
  }
  const grpc::Status slow_commit = unassign();
  // At once (the wait is 3 s; the trigger does not fire on an assignment).
  const grpc::Status right_after = assign("wait-owner-2");
  {
    pqxx::connection admin(stack_->clusters().control().ConnectionString());
    pqxx::nontransaction q(admin);
    q.exec("DROP TRIGGER test_slow_unassignment ON devices");
    q.exec("DROP FUNCTION test_slow_commit()");
  }
  ASSERT_TRUE(slow_commit.ok()) << slow_commit.error_message();
  EXPECT_EQ(right_after.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << right_after.error_message();
  (*server)->Shutdown();
}

TEST_F(RoutingTest, CrossTenantMatrixHasZeroSuccesses) {
  // acme's objects.
  auto acme_patient = Place(pki_->app(), "shared-ref-7", "FR");
  ASSERT_TRUE(acme_patient.ok());
  ASSERT_TRUE(Assign(pki_->app(), "acme-dev-7", "shared-ref-7").ok());

  int successes = 0;
  // globex names acme's device: unassign and reassign.
  {
    v1::UnassignDeviceRequest request;
    request.set_device_id("acme-dev-7");
    v1::UnassignDeviceResponse response;
    grpc::ClientContext context;
    grpc::Status s = Stub(pki_->globex_app())->UnassignDevice(&context, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    successes += s.ok();
  }
  {
    // acme's patient reference means nothing to globex: NOT_FOUND, and acme's device untouched.
    grpc::Status s = Assign(pki_->globex_practitioner(), "acme-dev-7", "shared-ref-7");
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    successes += s.ok();
  }
  {
    // globex placing the same reference gets its own, different pseudonym.
    auto globex_patient = Place(pki_->globex_app(), "shared-ref-7", "FR");
    ASSERT_TRUE(globex_patient.ok());
    EXPECT_NE(globex_patient->patient_id(), acme_patient->patient_id());
    EXPECT_TRUE(globex_patient->newly_placed());
    // Assigning globex's device of the same name to it leaves acme's device alone.
    EXPECT_TRUE(Assign(pki_->globex_app(), "acme-dev-7", "shared-ref-7").ok());
  }
  {
    // Tenant identities cannot resolve anything (service only), so no cross-tenant lookups.
    v1::ResolvePatientsRequest request;
    request.add_patient_ids(acme_patient->patient_id());
    v1::ResolvePatientsResponse response;
    grpc::ClientContext context;
    grpc::Status s = Stub(pki_->globex_app())->ResolvePatients(&context, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    successes += s.ok();
  }
  EXPECT_EQ(successes, 0);
  // acme's device still points at acme's patient.
  v1::ResolveDevicesRequest request;
  auto* key = request.add_devices();
  key->set_tenant_id("acme");
  key->set_device_id("acme-dev-7");
  v1::ResolveDevicesResponse response;
  grpc::ClientContext context;
  ASSERT_TRUE(Stub(IngestCert())->ResolveDevices(&context, request, &response).ok());
  EXPECT_EQ(response.devices(0).patient_id(), acme_patient->patient_id());
}

// Services call routing for what their work needs, each with its own identity: sharing reads the
// residency rules; ingest, consent and sharing resolve patients and tenants; ingest alone resolves
// devices. Any other service identity is refused, and told which may.
TEST_F(RoutingTest, EachServiceIdentityReachesOnlyWhatItsWorkNeeds) {
  auto call = [](const TestCert& cert, const std::string& rpc) {
    auto stub = Stub(cert);
    grpc::ClientContext context;
    if (rpc == "ListResidencyRules") {
      v1::ListResidencyRulesResponse response;
      return stub->ListResidencyRules(&context, {}, &response);
    }
    if (rpc == "ResolvePatients") {
      v1::ResolvePatientsRequest request;
      request.add_patient_ids("pt_nobody");
      v1::ResolvePatientsResponse response;
      return stub->ResolvePatients(&context, request, &response);
    }
    if (rpc == "ResolveTenants") {
      v1::ResolveTenantsRequest request;
      request.add_tenant_ids("acme");
      v1::ResolveTenantsResponse response;
      return stub->ResolveTenants(&context, request, &response);
    }
    v1::ResolveDevicesRequest request;
    v1::DeviceKey* key = request.add_devices();
    key->set_tenant_id("acme");
    key->set_device_id("nobodys-device");
    v1::ResolveDevicesResponse response;
    return stub->ResolveDevices(&context, request, &response);
  };
  const std::map<std::string, std::set<std::string>> may = {
      {"ingest", {"ResolvePatients", "ResolveTenants", "ResolveDevices"}},
      {"consent", {"ResolvePatients", "ResolveTenants"}},
      {"sharing", {"ResolvePatients", "ResolveTenants", "ListResidencyRules"}},
      {"routing", {}},
      {"audit", {}}};
  for (const auto& [service, allowed] : may) {
    for (const std::string rpc :
         {"ListResidencyRules", "ResolvePatients", "ResolveTenants", "ResolveDevices"}) {
      SCOPED_TRACE(absl::StrCat(service, " calls ", rpc));
      const grpc::Status status = call(ServiceCert(service), rpc);
      if (allowed.contains(rpc)) {
        EXPECT_TRUE(status.ok()) << status.error_message();
        continue;
      }
      EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
      EXPECT_THAT(status.error_message(),
                  HasSubstr(absl::StrCat("the service identity ",
                                         pki_->SpiffeId("/service/" + service), " may not call ",
                                         rpc, ": only ")));
    }
  }
  // Ops read the rules too (medgate-ctl list-rules).
  EXPECT_TRUE(call(pki_->ops(), "ListResidencyRules").ok());
}

TEST_F(RoutingTest, DevicesMayCallNothingAndAdminIsOpsOnly) {
  auto device = Stub(pki_->device());
  auto app = Stub(pki_->app());
  auto practitioner = Stub(pki_->practitioner());
  auto service = Stub(pki_->service());
  auto ops = Stub(pki_->ops());
  std::vector<std::pair<std::string, grpc::Status>> results;
  auto call = [&](const std::string& name, auto&& fn) { results.emplace_back(name, fn()); };
#define MEDGATE_CALL(stub, Rpc)                         \
  call(#stub "." #Rpc, [&] {                            \
    v1::Rpc##Request request;                           \
    v1::Rpc##Response response;                         \
    grpc::ClientContext context;                        \
    return stub->Rpc(&context, request, &response);     \
  })
  MEDGATE_CALL(device, UpsertTenant);
  MEDGATE_CALL(device, GetTenant);
  MEDGATE_CALL(device, PutResidencyRule);
  MEDGATE_CALL(device, ListResidencyRules);
  MEDGATE_CALL(device, ListRegions);
  MEDGATE_CALL(device, PlacePatient);
  MEDGATE_CALL(device, ResolvePatients);
  MEDGATE_CALL(device, AssignDevice);
  MEDGATE_CALL(device, UnassignDevice);
  MEDGATE_CALL(device, ResolveDevices);
  MEDGATE_CALL(device, ResolveTenants);
  MEDGATE_CALL(app, UpsertTenant);
  MEDGATE_CALL(app, GetTenant);
  MEDGATE_CALL(app, PutResidencyRule);
  // Rules and region health are the deployment's, for ops and services (as the API says).
  MEDGATE_CALL(app, ListResidencyRules);
  MEDGATE_CALL(app, ListRegions);
  MEDGATE_CALL(app, ResolveTenants);
  MEDGATE_CALL(practitioner, ListResidencyRules);
  MEDGATE_CALL(practitioner, ListRegions);
  MEDGATE_CALL(practitioner, ResolveTenants);
  // Administration is ops' alone: not a practitioner's, not a service's.
  MEDGATE_CALL(practitioner, UpsertTenant);
  MEDGATE_CALL(practitioner, GetTenant);
  MEDGATE_CALL(practitioner, PutResidencyRule);
  MEDGATE_CALL(service, UpsertTenant);
  MEDGATE_CALL(service, GetTenant);
  MEDGATE_CALL(service, PutResidencyRule);
  // Resolving a patient or a device is for the services that route data, not for a tenant's
  // identities (whose tenant is not the one asked about, in general).
  MEDGATE_CALL(app, ResolvePatients);
  MEDGATE_CALL(app, ResolveDevices);
  MEDGATE_CALL(practitioner, ResolvePatients);
  MEDGATE_CALL(practitioner, ResolveDevices);
  // Patients and devices are a tenant's to place and assign: a service has no tenant.
  MEDGATE_CALL(service, PlacePatient);
  MEDGATE_CALL(service, AssignDevice);
  MEDGATE_CALL(service, UnassignDevice);
  // Ops run the deployment; they neither place a tenant's patients nor resolve them.
  MEDGATE_CALL(ops, PlacePatient);
  MEDGATE_CALL(ops, AssignDevice);
  MEDGATE_CALL(ops, UnassignDevice);
  MEDGATE_CALL(ops, ResolvePatients);
  MEDGATE_CALL(ops, ResolveDevices);
  MEDGATE_CALL(ops, ResolveTenants);
  // A service reaches only what its work needs: the routing service's identity resolves nothing
  // and reads no rule; consent's finds no device and reads no rule.
  MEDGATE_CALL(service, ResolvePatients);
  MEDGATE_CALL(service, ResolveDevices);
  MEDGATE_CALL(service, ResolveTenants);
  MEDGATE_CALL(service, ListResidencyRules);
  auto consent = Stub(ServiceCert("consent"));
  MEDGATE_CALL(consent, ResolveDevices);
  MEDGATE_CALL(consent, ListResidencyRules);
#undef MEDGATE_CALL
  ASSERT_EQ(results.size(), 45u);
  for (const auto& [name, status] : results) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << name;
  }
}

// An assignment holds its tenant against upserts, as a placement does: one that started while a
// suspension was being written waits for it, and is refused once it has committed, not made
// after it.
TEST_F(RoutingTest, AnAssignmentRacingASuspensionWaitsForItAndIsRefused) {
  absl::StatusOr<TestCert> issued =
      test_support::IssueIdentity(*pki_, "assign-race-app", "/tenant/assign-race/app/backend");
  ASSERT_TRUE(issued.ok()) << issued.status();
  const TestCert app = *issued;
  ASSERT_TRUE(
      test_support::UpsertTenant(*pki_, server_->port(), "assign-race", {"FR"}, true).ok());
  ASSERT_TRUE(Place(app, "assign-race-patient", "FR").ok());
  // A suspension being written, as UpsertTenant writes one: the tenant's lock held, the row
  // changed, not yet committed.
  pqxx::connection holder(clusters_->control().ConnectionString());
  pqxx::work suspending(holder);
  suspending.exec("SELECT pg_advisory_xact_lock(7202, hashtext('assign-race'))");
  suspending.exec("UPDATE tenants SET active = false WHERE tenant_id = 'assign-race'");
  std::promise<grpc::Status> assigned;
  std::thread assigning(
      [&] { assigned.set_value(Assign(app, "assign-race-dev", "assign-race-patient")); });
  const bool waits = test_support::PollUntil(absl::Now() + absl::Seconds(20), [] {
    return CountIn(clusters_->control(),
                   "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'") == 1;
  });
  suspending.commit();
  assigning.join();
  EXPECT_TRUE(waits) << "the assignment did not wait for the tenant's lock";
  const grpc::Status status = assigned.get_future().get();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("suspended"));
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM devices WHERE tenant_id = 'assign-race'"),
            0);
}

// Tenant.active = false refuses every call of the tenant's identities with PERMISSION_DENIED
// (within the gate's TTL), tells services so through ResolveTenants and ResolveDevices, and keeps
// the data; reactivating restores the same patient and device. An unregistered tenant's
// identities are refused the same way.
TEST_F(RoutingTest, SuspendedOrUnregisteredTenantIsRefused) {
  absl::StatusOr<TestCert> issued =
      test_support::IssueIdentity(*pki_, "pausable-app", "/tenant/pausable/app/backend");
  ASSERT_TRUE(issued.ok()) << issued.status();
  const TestCert app = *issued;
  issued = test_support::IssueIdentity(*pki_, "stranger-app", "/tenant/never-registered/app/backend");
  ASSERT_TRUE(issued.ok()) << issued.status();
  const TestCert stranger = *issued;
  auto upsert = [](bool active) {
    return test_support::UpsertTenant(*pki_, server_->port(), "pausable", {"FR"}, active);
  };
  auto resolve = [](const std::vector<std::string>& ids) {
    v1::ResolveTenantsRequest request;
    for (const std::string& id : ids) request.add_tenant_ids(id);
    v1::ResolveTenantsResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(Stub(IngestCert())->ResolveTenants(&context, request, &response).ok());
    return response;
  };
  auto device_tenant_active = [] {
    v1::ResolveDevicesRequest request;
    auto* key = request.add_devices();
    key->set_tenant_id("pausable");
    key->set_device_id("pausable-dev");
    v1::ResolveDevicesResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(Stub(IngestCert())->ResolveDevices(&context, request, &response).ok());
    EXPECT_TRUE(response.devices(0).found());
    return response.devices(0).tenant_active();
  };
  const absl::Duration gate_ttl_and_margin = absl::Seconds(15);

  ASSERT_TRUE(upsert(true).ok());
  auto placed = Place(app, "pausable-patient", "FR");
  ASSERT_TRUE(placed.ok()) << placed.status();
  ASSERT_TRUE(Assign(app, "pausable-dev", "pausable-patient").ok());
  EXPECT_TRUE(device_tenant_active());

  // Unassigning a device the tenant never had answers NOT_FOUND while the tenant may act, and
  // PERMISSION_DENIED from the gate once the suspension has reached it.
  auto unassign_unknown = [&] {
    v1::UnassignDeviceRequest unassign;
    unassign.set_device_id("pausable-no-such-device");
    v1::UnassignDeviceResponse unassigned;
    grpc::ClientContext context;
    return Stub(app)->UnassignDevice(&context, unassign, &unassigned);
  };
  EXPECT_EQ(unassign_unknown().error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(upsert(false).ok());
  // The chain says who suspended it, and what the tenant then was.
  {
    pqxx::connection c(clusters_->control().ConnectionString());
    pqxx::nontransaction q(c);
    pqxx::row last = q.exec1(
        "SELECT reason, actor FROM audit_log WHERE object_type = 'tenant' AND "
        "object_id = 'pausable' ORDER BY seq DESC LIMIT 1");
    EXPECT_EQ(last[0].as<std::string>(),
              "TENANT_UPDATED: active=false territories=FR regions=any");
    EXPECT_THAT(last[1].as<std::string>(), HasSubstr("/ops/"));
  }
  grpc::Status refused;
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + gate_ttl_and_margin, [&] {
    refused = unassign_unknown();
    return refused.error_code() != grpc::StatusCode::NOT_FOUND;
  }));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(refused.error_message(), HasSubstr("suspended"));
  absl::Status place = Place(app, "pausable-patient-2", "FR").status();
  EXPECT_EQ(place.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(place.message()), HasSubstr("suspended"));
  EXPECT_EQ(Assign(app, "pausable-dev-2", "pausable-patient").error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // Services learn it: the device still resolves (data in place) with its tenant inactive, and a
  // device never assigned says so too.
  EXPECT_FALSE(device_tenant_active());
  {
    v1::ResolveDevicesRequest request;
    auto* key = request.add_devices();
    key->set_tenant_id("pausable");
    key->set_device_id("pausable-never-assigned");
    key = request.add_devices();
    key->set_tenant_id("acme");
    key->set_device_id("acme-never-assigned");
    v1::ResolveDevicesResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(Stub(IngestCert())->ResolveDevices(&context, request, &response).ok());
    ASSERT_EQ(response.devices_size(), 2);
    EXPECT_FALSE(response.devices(0).found());
    EXPECT_FALSE(response.devices(0).tenant_active());
    EXPECT_FALSE(response.devices(1).found());
    EXPECT_TRUE(response.devices(1).tenant_active());
  }
  v1::ResolveTenantsResponse statuses = resolve({"pausable", "acme", "never-registered", "acme"});
  ASSERT_EQ(statuses.tenants_size(), 4);
  EXPECT_EQ(statuses.tenants(0).tenant_id(), "pausable");
  EXPECT_TRUE(statuses.tenants(0).found());
  EXPECT_FALSE(statuses.tenants(0).active());
  EXPECT_TRUE(statuses.tenants(1).found());
  EXPECT_TRUE(statuses.tenants(1).active());
  EXPECT_EQ(statuses.tenants(2).tenant_id(), "never-registered");
  EXPECT_FALSE(statuses.tenants(2).found());
  EXPECT_FALSE(statuses.tenants(2).active());
  EXPECT_TRUE(statuses.tenants(3).active());
  // Nothing was placed or assigned meanwhile.
  EXPECT_EQ(CountIn(clusters_->control(),
                    "SELECT count(*) FROM patients WHERE tenant_id = 'pausable'"),
            1);

  // An identity of a tenant ops never created is refused before any handler.
  auto stranger_placed = Place(stranger, "stranger-patient", "FR");
  EXPECT_EQ(stranger_placed.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(stranger_placed.status().message()), HasSubstr("not registered"));

  // Reactivated: the same patient and device, as they were.
  ASSERT_TRUE(upsert(true).ok());
  absl::StatusOr<v1::PlacePatientResponse> again;
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + gate_ttl_and_margin, [&] {
    again = Place(app, "pausable-patient", "FR");
    return again.ok();
  })) << again.status();
  EXPECT_EQ(again->patient_id(), placed->patient_id());
  EXPECT_TRUE(device_tenant_active());

  // Bad batches name the field.
  v1::ResolveTenantsRequest empty;
  v1::ResolveTenantsResponse ignored;
  grpc::ClientContext empty_context;
  grpc::Status bad = Stub(IngestCert())->ResolveTenants(&empty_context, empty, &ignored);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("tenant_ids"));
}

TEST_F(RoutingTest, TenantAndRuleListsAreBounded) {
  v1::UpsertTenantRequest tenant;
  tenant.mutable_tenant()->set_tenant_id("lists");
  tenant.mutable_tenant()->set_display_name("lists");
  for (int i = 0; i < 65; ++i) {
    tenant.mutable_tenant()->add_territories(std::string{static_cast<char>('A' + i / 26),
                                                         static_cast<char>('A' + i % 26)});
  }
  tenant.mutable_tenant()->set_active(true);
  v1::UpsertTenantResponse upserted;
  grpc::ClientContext c1;
  grpc::Status status = Stub(pki_->ops())->UpsertTenant(&c1, tenant, &upserted);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("tenant.territories: at most 64"));
  v1::PutResidencyRuleRequest put;
  put.mutable_rule()->set_territory("LU");
  put.mutable_rule()->add_region_ids("eu-1");
  for (int i = 0; i < 65; ++i) {
    put.mutable_rule()->add_readable_from_territories(
        std::string{static_cast<char>('A' + i / 26), static_cast<char>('A' + i % 26)});
  }
  v1::PutResidencyRuleResponse rule;
  grpc::ClientContext c2;
  status = Stub(pki_->ops())->PutResidencyRule(&c2, put, &rule);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("readable_from_territories: at most 64"));
  // Region lists: checked for their length before any region id is looked at.
  put.mutable_rule()->clear_readable_from_territories();
  for (int i = 0; i < 17; ++i) put.mutable_rule()->add_region_ids(absl::StrCat("r-", i));
  grpc::ClientContext c3;
  status = Stub(pki_->ops())->PutResidencyRule(&c3, put, &rule);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("rule.region_ids: at most 16"));
  tenant.mutable_tenant()->clear_territories();
  tenant.mutable_tenant()->add_territories("FR");
  for (int i = 0; i < 33; ++i) tenant.mutable_tenant()->add_region_ids(absl::StrCat("r-", i));
  grpc::ClientContext c4;
  status = Stub(pki_->ops())->UpsertTenant(&c4, tenant, &upserted);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("tenant.region_ids: at most 32"));
}

// An upsert replaces the whole tenant: one sent from an older read would undo what came since.
// With expected_version (the version GetTenant returned), such an upsert is ABORTED and changes
// nothing; every upsert adds one to the version.
TEST_F(RoutingTest, AnUpsertFromAStaleReadOfTheTenantIsAborted) {
  auto upsert = [&](bool active, int64_t expected, v1::UpsertTenantResponse* response,
                    const std::string& id = "versioned") {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id(id);
    request.mutable_tenant()->set_display_name("versioned");
    request.mutable_tenant()->add_territories("FR");
    request.mutable_tenant()->set_active(active);
    request.set_expected_version(expected);
    grpc::ClientContext context;
    return Stub(pki_->ops())->UpsertTenant(&context, request, response);
  };
  auto get = [&] {
    v1::GetTenantRequest request;
    request.set_tenant_id("versioned");
    v1::GetTenantResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(Stub(pki_->ops())->GetTenant(&context, request, &response).ok());
    return response.tenant();
  };
  v1::UpsertTenantResponse response;
  // A tenant that does not exist is at no version: expected_version is for updates.
  grpc::Status absent = upsert(true, 1, &response);
  EXPECT_EQ(absent.error_code(), grpc::StatusCode::ABORTED) << absent.error_message();
  EXPECT_THAT(absent.error_message(), HasSubstr("does not exist"));
  ASSERT_TRUE(upsert(true, 0, &response).ok());
  EXPECT_TRUE(response.created());
  EXPECT_EQ(response.tenant().version(), 1);
  // Two ops read the tenant at version 1. One suspends it.
  const v1::Tenant read = get();
  ASSERT_EQ(read.version(), 1);
  grpc::Status suspended = upsert(false, read.version(), &response);
  ASSERT_TRUE(suspended.ok()) << suspended.error_message();
  EXPECT_EQ(response.tenant().version(), 2);
  // The other, from the same read, renames it: refused, and the suspension stays.
  grpc::Status stale = upsert(true, read.version(), &response);
  EXPECT_EQ(stale.error_code(), grpc::StatusCode::ABORTED) << stale.error_message();
  EXPECT_THAT(stale.error_message(),
              HasSubstr("tenant 'versioned' is at version 2, not expected_version 1"));
  EXPECT_FALSE(get().active());
  EXPECT_EQ(get().version(), 2);
  // From a fresh read it goes through; without expected_version the check is skipped.
  ASSERT_TRUE(upsert(false, 2, &response).ok());
  EXPECT_EQ(response.tenant().version(), 3);
  ASSERT_TRUE(upsert(false, 0, &response).ok());
  EXPECT_EQ(get().version(), 4);
  EXPECT_EQ(upsert(false, -1, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// The API promises distinct territory codes: a repeated one is refused, naming where.
TEST_F(RoutingTest, UpsertTenantRefusesARepeatedTerritory) {
  v1::UpsertTenantRequest request;
  request.mutable_tenant()->set_tenant_id("twinned");
  request.mutable_tenant()->set_display_name("Twinned");
  request.mutable_tenant()->set_active(true);
  request.mutable_tenant()->add_territories("FR");
  request.mutable_tenant()->add_territories("FR");
  v1::UpsertTenantResponse response;
  grpc::ClientContext context;
  grpc::Status status = Stub(pki_->ops())->UpsertTenant(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              HasSubstr("tenant.territories[1]: 'FR' is already listed at tenant.territories[0]"));
  v1::GetTenantRequest get;
  get.set_tenant_id("twinned");
  v1::GetTenantResponse got;
  grpc::ClientContext get_context;
  EXPECT_EQ(Stub(pki_->ops())->GetTenant(&get_context, get, &got).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // So are a repeated region, and a name that is not text (a NUL the database would cut it at).
  request.mutable_tenant()->clear_territories();
  request.mutable_tenant()->add_territories("FR");
  request.mutable_tenant()->add_region_ids("fr-1");
  request.mutable_tenant()->add_region_ids("fr-1");
  grpc::ClientContext regions_context;
  status = Stub(pki_->ops())->UpsertTenant(&regions_context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              HasSubstr("tenant.region_ids[1]: 'fr-1' is already listed at tenant.region_ids[0]"));
  request.mutable_tenant()->clear_region_ids();
  for (const std::string& name : {std::string("\0", 1), std::string("Twin\nned")}) {
    request.mutable_tenant()->set_display_name(name);
    grpc::ClientContext name_context;
    status = Stub(pki_->ops())->UpsertTenant(&name_context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("tenant.display_name"));
  }
  grpc::ClientContext get_again;
  EXPECT_EQ(Stub(pki_->ops())->GetTenant(&get_again, get, &got).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // A rule's readable-from territories alike.
  v1::PutResidencyRuleRequest put;
  put.mutable_rule()->set_territory("FR");
  put.mutable_rule()->add_region_ids("fr-1");
  put.mutable_rule()->add_readable_from_territories("FR");
  put.mutable_rule()->add_readable_from_territories("FR");
  v1::PutResidencyRuleResponse rule;
  grpc::ClientContext rule_context;
  status = Stub(pki_->ops())->PutResidencyRule(&rule_context, put, &rule);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              HasSubstr("rule.readable_from_territories[1]: 'FR' is already listed at "
                        "rule.readable_from_territories[0]"));
}

// A listing's page token is the last key of the page before: anything else is refused rather
// than answered with an empty page.
TEST_F(RoutingTest, ListingsRefuseTokensTheyDidNotGive) {
  for (const std::string& token : {std::string("zz-not-a-token"), std::string("FR\0", 3)}) {
    v1::ListResidencyRulesRequest rules;
    rules.set_page_token(token);
    v1::ListResidencyRulesResponse listed;
    grpc::ClientContext context;
    grpc::Status status = Stub(pki_->ops())->ListResidencyRules(&context, rules, &listed);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(status.error_message(), "page_token: not a token this listing gave");
  }
  v1::ListRegionsRequest regions;
  regions.set_page_token("not/a/region");
  v1::ListRegionsResponse listed;
  grpc::ClientContext context;
  grpc::Status status = Stub(pki_->ops())->ListRegions(&context, regions, &listed);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "page_token: not a token this listing gave");
  // A token the listing gave goes on after it.
  regions.set_page_token("");
  regions.set_page_size(1);
  grpc::ClientContext first_context;
  ASSERT_TRUE(Stub(pki_->ops())->ListRegions(&first_context, regions, &listed).ok());
  ASSERT_EQ(listed.regions_size(), 1);
  ASSERT_FALSE(listed.next_page_token().empty());
  const std::string first = listed.regions(0).region_id();
  regions.set_page_token(listed.next_page_token());
  grpc::ClientContext next_context;
  ASSERT_TRUE(Stub(pki_->ops())->ListRegions(&next_context, regions, &listed).ok());
  ASSERT_EQ(listed.regions_size(), 1);
  EXPECT_GT(listed.regions(0).region_id(), first);
}

TEST_F(RoutingTest, BadInputNamesTheField) {
  struct Case {
    std::string ref;
    std::string territory;
    absl::StatusCode code;
    std::string mentions;
  };
  for (const Case& c : {Case{"p", "fr", absl::StatusCode::kInvalidArgument, "territory"},
                        Case{"p", "XX", absl::StatusCode::kInvalidArgument, "territory"},
                        Case{"p", "", absl::StatusCode::kInvalidArgument, "territory"},
                        Case{"", "FR", absl::StatusCode::kInvalidArgument, "patient_ref"},
                        Case{std::string(257, 'r'), "FR", absl::StatusCode::kInvalidArgument, "patient_ref: at most 256"}}) {
    auto placed = Place(pki_->app(), c.ref, c.territory);
    EXPECT_EQ(placed.status().code(), c.code) << c.territory;
    EXPECT_THAT(std::string(placed.status().message()), HasSubstr(c.mentions));
  }
  auto put_rule = [&](const std::string& territory, std::vector<std::string> regions,
                      std::vector<std::string> readable_from = {}) {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory(territory);
    for (const auto& r : regions) request.mutable_rule()->add_region_ids(r);
    for (const auto& t : readable_from) request.mutable_rule()->add_readable_from_territories(t);
    v1::PutResidencyRuleResponse response;
    grpc::ClientContext context;
    return Stub(pki_->ops())->PutResidencyRule(&context, request, &response);
  };
  // A rule's errors name the request's fields, as the caller sent them.
  grpc::Status unknown = put_rule("FR", {"fr-1", "xx-9"});
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(unknown.error_message(), HasSubstr("rule.region_ids[1]: region 'xx-9'"));
  grpc::Status not_hosting = put_rule("BE", {"de-1"});
  EXPECT_EQ(not_hosting.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(not_hosting.error_message(), HasSubstr("rule.region_ids[0]: region 'de-1'"));
  grpc::Status repeated = put_rule("FR", {"fr-1", "fr-1"});
  EXPECT_EQ(repeated.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(repeated.error_message(),
              HasSubstr("rule.region_ids[1]: region 'fr-1' is already listed at rule.region_ids[0]"));
  grpc::Status no_region = put_rule("FR", {});
  EXPECT_EQ(no_region.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(no_region.error_message(), HasSubstr("rule.region_ids: must not be empty"));
  grpc::Status bad_territory = put_rule("ZZ", {"fr-1"});
  EXPECT_EQ(bad_territory.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_territory.error_message(), HasSubstr("rule.territory: 'ZZ'"));
  grpc::Status bad_reader = put_rule("FR", {"fr-1"}, {"DE", "UK"});
  EXPECT_EQ(bad_reader.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_reader.error_message(), HasSubstr("rule.readable_from_territories[1]: 'UK'"));
  // A tenant narrowed to an unknown region is refused.
  v1::UpsertTenantRequest tenant;
  tenant.mutable_tenant()->set_tenant_id("initech");
  tenant.mutable_tenant()->set_display_name("Initech");
  tenant.mutable_tenant()->add_territories("FR");
  tenant.mutable_tenant()->add_region_ids("mars-1");
  v1::UpsertTenantResponse response;
  grpc::ClientContext context;
  grpc::Status bad_tenant = Stub(pki_->ops())->UpsertTenant(&context, tenant, &response);
  EXPECT_EQ(bad_tenant.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(bad_tenant.error_message(), HasSubstr("region_ids[0]"));
  // So is one narrowed to a region no rule of its territories allows (FR's allows fr-1 only).
  tenant.mutable_tenant()->set_region_ids(0, "de-1");
  grpc::ClientContext context2;
  grpc::Status unused_region = Stub(pki_->ops())->UpsertTenant(&context2, tenant, &response);
  EXPECT_EQ(unused_region.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(unused_region.error_message(), HasSubstr("region 'de-1' is allowed by no residency rule"));
  // The rule listing's filter is bounded, and names a bad territory.
  auto list = [&](int n, const std::string& territory) {
    v1::ListResidencyRulesRequest request;
    for (int i = 0; i < n; ++i) request.add_territories(territory);
    v1::ListResidencyRulesResponse rules;
    grpc::ClientContext c;
    return Stub(pki_->ops())->ListResidencyRules(&c, request, &rules);
  };
  EXPECT_TRUE(list(64, "FR").ok());
  grpc::Status too_many = list(65, "FR");
  EXPECT_EQ(too_many.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(too_many.error_message(), HasSubstr("territories: at most 64"));
  grpc::Status bad_code = list(1, "france");
  EXPECT_EQ(bad_code.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_code.error_message(), HasSubstr("territories[0]"));
}

// A rule that later drops a region a narrowed tenant names does not stop ops from resending the
// tenant as it is (here to suspend it); a region newly named must still be one a rule allows.
TEST_F(RoutingTest, ATenantKeepsItsNarrowingWhenARuleDropsItsRegion) {
  auto put_ie = [&](std::vector<std::string> regions) {
    v1::PutResidencyRuleRequest request;
    request.mutable_rule()->set_territory("IE");
    for (const std::string& r : regions) request.mutable_rule()->add_region_ids(r);
    v1::PutResidencyRuleResponse response;
    grpc::ClientContext context;
    return Stub(pki_->ops())->PutResidencyRule(&context, request, &response);
  };
  auto upsert = [&](std::vector<std::string> regions, bool active) {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id("ie-narrow");
    request.mutable_tenant()->set_display_name("IE narrow");
    request.mutable_tenant()->add_territories("IE");
    for (const std::string& r : regions) request.mutable_tenant()->add_region_ids(r);
    request.mutable_tenant()->set_active(active);
    v1::UpsertTenantResponse response;
    grpc::ClientContext context;
    return Stub(pki_->ops())->UpsertTenant(&context, request, &response);
  };
  ASSERT_TRUE(upsert({"fr-1"}, true).ok());
  ASSERT_TRUE(put_ie({"eu-1"}).ok());
  absl::Cleanup seeded = [&] { EXPECT_TRUE(put_ie({"eu-1", "fr-1"}).ok()); };
  grpc::Status suspended = upsert({"fr-1"}, false);
  EXPECT_TRUE(suspended.ok()) << suspended.error_message();
  grpc::Status widened = upsert({"fr-1", "de-1"}, false);
  EXPECT_EQ(widened.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(widened.error_message(), HasSubstr("region 'de-1' is allowed by no residency rule"));
}

TEST_F(RoutingTest, RulesAreVersionedAndTenantNarrowingApplies) {
  // A tenant restricted to fr-1 places BE patients in fr-1 (the rule allows [eu-1, fr-1]).
  v1::UpsertTenantRequest tenant;
  tenant.mutable_tenant()->set_tenant_id("narrow");
  tenant.mutable_tenant()->set_display_name("Narrow");
  tenant.mutable_tenant()->add_territories("BE");
  tenant.mutable_tenant()->add_region_ids("fr-1");
  tenant.mutable_tenant()->set_active(true);
  v1::UpsertTenantResponse created;
  grpc::ClientContext context;
  ASSERT_TRUE(Stub(pki_->ops())->UpsertTenant(&context, tenant, &created).ok());
  devpki::LeafOptions narrow_options;
  narrow_options.common_name = "narrow app";
  narrow_options.uri_sans = {pki_->SpiffeId("/tenant/narrow/app/backend")};
  auto narrow_app = pki_->Issue("narrow-app", narrow_options);
  ASSERT_TRUE(narrow_app.ok());
  auto placed = Place(*narrow_app, "narrow-be-1", "BE");
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->region_id(), "fr-1");

  // Updating a rule adds a version; a stale expected_version is refused.
  v1::PutResidencyRuleRequest put;
  put.mutable_rule()->set_territory("LU");
  put.mutable_rule()->add_region_ids("fr-1");
  put.set_expected_version(1);
  v1::PutResidencyRuleResponse rule;
  grpc::ClientContext c1;
  ASSERT_TRUE(Stub(pki_->ops())->PutResidencyRule(&c1, put, &rule).ok());
  EXPECT_EQ(rule.rule().version(), 2);
  EXPECT_EQ(rule.rule().updated_by(), pki_->SpiffeId("/ops/alice"));
  grpc::ClientContext c2;
  EXPECT_EQ(Stub(pki_->ops())->PutResidencyRule(&c2, put, &rule).error_code(),
            grpc::StatusCode::ABORTED);
  v1::ListResidencyRulesRequest list;
  list.add_territories("LU");
  v1::ListResidencyRulesResponse rules;
  grpc::ClientContext c3;
  ASSERT_TRUE(Stub(pki_->ops())->ListResidencyRules(&c3, list, &rules).ok());
  ASSERT_EQ(rules.rules_size(), 1);
  EXPECT_EQ(rules.rules(0).version(), 2);
  EXPECT_EQ(rules.rules(0).region_ids(0), "fr-1");
  EXPECT_EQ(Place(pki_->app(), "lu-patient", "LU")->region_id(), "fr-1");
}

TEST_F(RoutingTest, ListsRegionsWithHealthAndPagesRules) {
  server_->core().RefreshRegionHealth();
  v1::ListRegionsRequest request;
  v1::ListRegionsResponse response;
  grpc::ClientContext context;
  ASSERT_TRUE(Stub(pki_->service())->ListRegions(&context, request, &response).ok());
  ASSERT_EQ(response.regions_size(), 3);
  EXPECT_EQ(response.regions(0).region_id(), "de-1");
  EXPECT_EQ(response.regions(0).health(), v1::REGION_HEALTH_SERVING);
  EXPECT_THAT(response.DebugString(), ::testing::Not(HasSubstr("password")));

  std::vector<std::string> seen;
  std::string token;
  do {
    v1::ListResidencyRulesRequest page;
    page.set_page_size(3);
    page.set_page_token(token);
    v1::ListResidencyRulesResponse rules;
    grpc::ClientContext c;
    ASSERT_TRUE(Stub(pki_->ops())->ListResidencyRules(&c, page, &rules).ok());
    EXPECT_LE(rules.rules_size(), 3);
    for (const auto& r : rules.rules()) seen.push_back(r.territory());
    token = rules.next_page_token();
  } while (!token.empty());
  EXPECT_EQ(seen.size(), 10u);  // FR, DE and the eight other EEA seeds
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
}

TEST_F(RoutingTest, EveryMutationIsAuditedInTheControlChain) {
  int64_t before = AuditCount();
  ASSERT_TRUE(Place(pki_->app(), "audited-1", "FR").ok());          // +1 create
  ASSERT_TRUE(Place(pki_->app(), "audited-1", "FR").ok());          // idempotent: no change
  ASSERT_TRUE(Assign(pki_->app(), "audited-dev", "audited-1").ok()); // +1 update
  EXPECT_EQ(AuditCount(), before + 2);
  pqxx::connection c(clusters_->control().ConnectionString());
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
  pqxx::nontransaction q(c);
  pqxx::row last = q.exec1("SELECT actor, tenant, action, object_type FROM audit_log ORDER BY seq DESC LIMIT 1");
  EXPECT_EQ(std::string(last[0].c_str()), pki_->SpiffeId("/tenant/acme/app/backend"));
  EXPECT_EQ(std::string(last[1].c_str()), "acme");
  EXPECT_EQ(std::string(last[2].c_str()), "update");
  EXPECT_EQ(std::string(last[3].c_str()), "device");
  // Patients live in the directory only; no shard holds anything about them.
  for (auto* region : clusters_->regions()) {
    EXPECT_EQ(CountIn(*region, "SELECT count(*) FROM audit_log"), 0) << region->name();
  }
}

TEST_F(RoutingTest, ControlDatabaseDownIsUnavailableThenRecovers) {
  ASSERT_TRUE(clusters_->control().Stop().ok());
  auto down = Place(pki_->app(), "during-outage", "FR");
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  ASSERT_TRUE(clusters_->control().StartAgain().ok());
  auto back = Place(pki_->app(), "during-outage", "FR");
  EXPECT_TRUE(back.ok()) << back.status();
}


// A new tenant's id has the API's form (the T of its identities' SPIFFE ids); a tenant registered
// before that rule keeps working and can still be updated, suspended for one.
TEST_F(RoutingTest, NewTenantIdsHaveTheApiForm) {
  auto upsert = [&](const std::string& id, bool active) {
    v1::UpsertTenantRequest request;
    request.mutable_tenant()->set_tenant_id(id);
    request.mutable_tenant()->set_display_name("form");
    request.mutable_tenant()->add_territories("FR");
    request.mutable_tenant()->set_active(active);
    v1::UpsertTenantResponse response;
    grpc::ClientContext context;
    return Stub(pki_->ops())->UpsertTenant(&context, request, &response);
  };
  for (const std::string& bad :
       {std::string("Acme"), std::string("9lives"), std::string("a_b"), std::string("a.b"),
        std::string("-ab"), std::string(64, 'a')}) {
    grpc::Status status = upsert(bad, true);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_THAT(status.error_message(), HasSubstr("tenant.tenant_id: a new tenant's id")) << bad;
  }
  EXPECT_TRUE(upsert(std::string(63, 'a'), true).ok());
  EXPECT_TRUE(upsert("x-9", true).ok());
  {
    pqxx::connection c(clusters_->control().ConnectionString());
    pqxx::work w(c);
    for (const char* bad : {"Acme", "9lives", "a_b", "a.b", "-ab"}) {
      EXPECT_TRUE(w.exec_params("SELECT 1 FROM tenants WHERE tenant_id = $1", bad).empty()) << bad;
    }
    w.exec0("INSERT INTO tenants (tenant_id, display_name, territories, active, pseudonym_key) "
            "VALUES ('Legacy_Co', 'legacy', ARRAY['FR'], true, decode(repeat('ab', 32), 'hex'))");
    w.commit();
  }
  EXPECT_TRUE(upsert("Legacy_Co", false).ok());
  pqxx::connection c(clusters_->control().ConnectionString());
  pqxx::nontransaction n(c);
  EXPECT_FALSE(n.exec1("SELECT active FROM tenants WHERE tenant_id = 'Legacy_Co'")[0].as<bool>());
}

}  // namespace
}  // namespace medgate::routing
