// The consent service over real mTLS and real PostgreSQL, with routing in-process and two consent
// instances on one cluster set: decisions, revocation reaching the other instance, history,
// periods, actor narrowing, residency, tenant isolation, bad input, audit, and shard outages.
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>

#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "libs/audit/audit_log.h"
#include "libs/common/grpc_status.h"
#include "libs/consent_client/consent_decision.h"
#include "libs/identity/credentials.h"
#include "libs/migrate/migrate.h"
#include "libs/server/rpc_util.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/consent/consent_server.h"
#include "services/routing/routing_server.h"
#include "tests/support/fuzz.h"
#include "tests/support/health_check.h"
#include "tests/support/poll.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_pki.h"
#include "tests/support/tenants.h"

namespace medgate::consent {
namespace {

using test_support::PgCluster;
using test_support::PgClusterSet;
using test_support::TestCert;
using test_support::TestPki;
using ::testing::HasSubstr;
using ::testing::Not;

// The consent caches fail closed this long after their change feed went silent (the most allowed).
constexpr int kFailClosedMs = 1000;
// Generous bounds for things the tests wait for that have no timing requirement.
constexpr absl::Duration kPatience = absl::Seconds(30);

void Migrate(const std::string& conninfo, const std::string& kind) {
  pqxx::connection c(conninfo);
  auto migrations =
      migrate::LoadMigrations(std::string(MEDGATE_SOURCE_DIR) + "/migrations/" + kind);
  ASSERT_TRUE(migrations.ok()) << migrations.status();
  auto result = migrate::Apply(c, *migrations);
  ASSERT_TRUE(result.ok()) << result.status();
}

// Calls `done` until it returns true or `deadline` passes; whether it did.
using test_support::PollUntil;

// A GrantConsent request: CARE for the whole tenant, open-ended, unless said otherwise.
struct GrantArgs {
  explicit GrantArgs(std::string patient) : patient_id(std::move(patient)) {}
  GrantArgs& WithPurpose(v1::Purpose p) {
    purpose = p;
    return *this;
  }
  GrantArgs& WithActor(std::string a) {
    actor = std::move(a);
    return *this;
  }
  GrantArgs& StartingAt(absl::Time t) {
    start_at = t;
    return *this;
  }
  GrantArgs& EndingAt(absl::Time t) {
    end_at = t;
    return *this;
  }
  GrantArgs& WithEvidence(std::string e) {
    evidence_ref = std::move(e);
    return *this;
  }
  GrantArgs& WithRequestId(std::string r) {
    request_id = std::move(r);
    return *this;
  }
  GrantArgs& InCategories(std::vector<std::string> c) {
    categories = std::move(c);
    return *this;
  }

  std::string patient_id;
  v1::Purpose purpose = v1::PURPOSE_CARE;
  std::string actor;
  std::vector<std::string> categories;
  std::optional<absl::Time> start_at;
  std::optional<absl::Time> end_at;
  std::string evidence_ref = "signed-form-1";
  std::string request_id;
};

class ConsentTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto clusters = PgClusterSet::Start();
    ASSERT_TRUE(clusters.ok()) << clusters.status();
    clusters_ = clusters->release();
    Migrate(clusters_->control().ConnectionString(), "control");
    for (auto* region : clusters_->regions()) Migrate(region->ConnectionString(), "shard");
    dir_ = new std::string(std::filesystem::temp_directory_path() /
                           ("medgate-consent-" + std::to_string(getpid())));
    std::filesystem::create_directories(*dir_);
    auto pki = TestPki::Create(*dir_);
    ASSERT_TRUE(pki.ok()) << pki.status();
    pki_ = pki->release();

    routing_config_ = ParseConfig(
        absl::StrCat(Common(), "control_db: {conninfo: \"", clusters_->control().ConnectionString(),
                     "\", acquire_timeout_ms: 1000}\n", "services:\n",
                     Endpoint("routing", "127.0.0.1:0"), "routing:\n  seed_rules:\n",
                     "    - {territory: FR, regions: [fr-1], readable_from: [FR]}\n",
                     "    - {territory: DE, regions: [de-1], readable_from: [DE]}\n",
                     "    - {territory: BE, regions: [eu-1, fr-1]}\n"));
    ASSERT_NE(routing_config_, nullptr);
    auto routing = routing::RoutingServer::Create(*routing_config_);
    ASSERT_TRUE(routing.ok()) << routing.status();
    routing_ = routing->release();
    ASSERT_TRUE(routing_->Start().ok());

    for (const char* tenant : {"acme", "globex"}) {
      v1::UpsertTenantRequest request;
      request.set_request_id(absl::StrCat("create-", tenant));
      request.mutable_tenant()->set_tenant_id(tenant);
      request.mutable_tenant()->set_display_name(tenant);
      for (const char* t : {"FR", "DE", "BE"}) request.mutable_tenant()->add_territories(t);
      request.mutable_tenant()->set_active(true);
      v1::UpsertTenantResponse response;
      grpc::ClientContext context;
      grpc::Status status = RoutingStub(pki_->ops())->UpsertTenant(&context, request, &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
    }

    // Both consent instances call routing with their own (service) certificate.
    consent_config_ = ParseConfig(ConsentYaml(absl::StrCat("127.0.0.1:", routing_->port())));
    ASSERT_NE(consent_config_, nullptr);
    for (ConsentServer** server : {&a_, &b_}) {
      auto created = ConsentServer::Create(*consent_config_);
      ASSERT_TRUE(created.ok()) << created.status();
      *server = created->release();
      ASSERT_TRUE((*server)->Start().ok());
      // Until a region's feed listens, nothing loaded for it is kept.
      ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
        for (const char* region : {"fr-1", "de-1", "eu-1"}) {
          if (!(*server)->cache().FeedListening(region)) return false;
        }
        return true;
      }));
    }
  }

  static void TearDownTestSuite() {
    for (ConsentServer* server : {a_, b_}) {
      if (server != nullptr) server->Shutdown();
      delete server;
    }
    if (routing_ != nullptr) routing_->Shutdown();
    delete routing_;
    delete consent_config_;
    delete routing_config_;
    delete pki_;
    delete clusters_;
    if (dir_ != nullptr) std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  static std::string Common() {
    return absl::StrCat(
        "trust_domain: ", pki_->trust_domain(), "\nca: ", pki_->ca_path(), "\n",
        "limits: {drain_seconds: 1}\n", "regions:\n",
        "  - {id: fr-1, territories: [FR, BE], db: {conninfo: \"",
        clusters_->region("fr-1").ConnectionString(), "\", acquire_timeout_ms: 1000}}\n",
        "  - {id: de-1, territories: [DE], db: {conninfo: \"",
        clusters_->region("de-1").ConnectionString(), "\", acquire_timeout_ms: 1000}}\n",
        "  - {id: eu-1, territories: [BE], db: {conninfo: \"",
        clusters_->region("eu-1").ConnectionString(), "\", acquire_timeout_ms: 1000}}\n");
  }

  // Each service with a certificate of its own, for spiffe://TD/service/NAME, issued once: files
  // replaced under a running server could be read half old, half new.
  static std::string Endpoint(const std::string& name, const std::string& listen) {
    static std::map<std::string, absl::StatusOr<TestCert>>* issued =
        new std::map<std::string, absl::StatusOr<TestCert>>();
    const std::string key = absl::StrCat(pki_->dir(), "/", name);  // one PKI's certificates
    auto it = issued->find(key);
    if (it == issued->end()) {
      it = issued->emplace(key, pki_->IssueServer(absl::StrCat(name, "-server"), name)).first;
    }
    const absl::StatusOr<TestCert>& cert = it->second;
    EXPECT_TRUE(cert.ok()) << cert.status();
    if (!cert.ok()) return "";
    return absl::StrCat("  ", name, ":\n    listen: ", listen, "\n    tls: {cert: ", cert->cert_path,
                        ", key: ", cert->key_path, "}\n");
  }


  static std::string ConsentYaml(const std::string& routing_address) {
    return absl::StrCat(Common(), "services:\n", Endpoint("consent", "127.0.0.1:0"),
                        Endpoint("routing", routing_address),
                        "consent:\n  cache: {fail_closed_after_ms: ", kFailClosedMs,
                        ", max_staleness_ms: 600000}\n");
  }

  static MedgateConfig* ParseConfig(const std::string& yaml) {
    auto root = ConfigNode::Parse(yaml);
    EXPECT_TRUE(root.ok()) << root.status();
    if (!root.ok()) return nullptr;
    auto config = ParseMedgateConfig(*root);
    EXPECT_TRUE(config.ok()) << config.status();
    if (!config.ok()) return nullptr;
    return new MedgateConfig(*std::move(config));
  }

  // A channel to `service` on `port`.
  static std::shared_ptr<grpc::Channel> Channel(int port, const TestCert& cert,
                                                const std::string& service) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port),
                               TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), 60},
                               pki_->SpiffeId(absl::StrCat("/service/", service)));
    EXPECT_TRUE(channel.ok());
    return *channel;
  }

  static std::unique_ptr<v1::TenantRouting::Stub> RoutingStub(const TestCert& cert) {
    return v1::TenantRouting::NewStub(Channel(routing_->port(), cert, "routing"));
  }

  // A certificate of medgate service `name` (spiffe://TD/service/NAME).
  static const TestCert& ServiceCert(const std::string& name) {
    return test_support::ServiceCert(*pki_, name);
  }
  // The sharing service's identity, which checks access on behalf of its callers.
  static const TestCert& Sharing() { return ServiceCert("sharing"); }

  static std::unique_ptr<v1::Consent::Stub> Stub(const TestCert& cert,
                                                 ConsentServer* server = nullptr) {
    return v1::Consent::NewStub(Channel((server != nullptr ? server : a_)->port(), cert, "consent"));
  }

  // Places a patient of `as`'s tenant; its pseudonymous id.
  static std::string Place(const std::string& ref, const std::string& territory,
                           const TestCert* as = nullptr) {
    v1::PlacePatientRequest request;
    request.set_patient_ref(ref);
    request.set_territory(territory);
    v1::PlacePatientResponse response;
    grpc::ClientContext context;
    grpc::Status status =
        RoutingStub(as != nullptr ? *as : pki_->app())->PlacePatient(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.patient_id();
  }

  static absl::StatusOr<v1::GrantConsentResponse> Grant(v1::Consent::Stub& stub,
                                                        const GrantArgs& args) {
    v1::GrantConsentRequest request;
    request.set_request_id(args.request_id);
    request.set_patient_id(args.patient_id);
    request.set_purpose(args.purpose);
    request.set_actor(args.actor);
    if (args.start_at) *request.mutable_period()->mutable_start_at() = ToProtoTimestamp(*args.start_at);
    if (args.end_at) *request.mutable_period()->mutable_end_at() = ToProtoTimestamp(*args.end_at);
    request.set_evidence_ref(args.evidence_ref);
    for (const std::string& c : args.categories) request.add_categories(c);
    v1::GrantConsentResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub.GrantConsent(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::GrantConsentResponse> Grant(const GrantArgs& args,
                                                        const TestCert* as = nullptr) {
    return Grant(*Stub(as != nullptr ? *as : pki_->app()), args);
  }

  static absl::StatusOr<v1::RevokeConsentResponse> Revoke(v1::Consent::Stub& stub,
                                                          v1::RevokeConsentRequest request) {
    if (request.reason().empty()) request.set_reason("patient withdrew");
    v1::RevokeConsentResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub.RevokeConsent(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static v1::RevokeConsentRequest ById(const std::string& consent_id) {
    v1::RevokeConsentRequest request;
    request.set_consent_id(consent_id);
    return request;
  }

  static v1::RevokeConsentRequest ByKey(const std::string& patient_id, v1::Purpose purpose,
                                        const std::string& actor = "") {
    v1::RevokeConsentRequest request;
    request.mutable_key()->set_patient_id(patient_id);
    request.mutable_key()->set_purpose(purpose);
    request.mutable_key()->set_actor(actor);
    return request;
  }

  static absl::StatusOr<v1::CheckAccessResponse> Check(v1::Consent::Stub& stub,
                                                       const std::string& patient_id,
                                                       v1::Purpose purpose,
                                                       const std::string& actor,
                                                       const std::string& category = "") {
    v1::CheckAccessRequest request;
    request.set_patient_id(patient_id);
    request.set_purpose(purpose);
    request.set_actor(actor);
    request.set_category(category);
    v1::CheckAccessResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub.CheckAccess(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::ListConsentsResponse> List(v1::Consent::Stub& stub,
                                                       v1::ListConsentsRequest request) {
    v1::ListConsentsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub.ListConsents(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static v1::ListConsentsRequest ListOf(const std::string& patient_id, bool history = false) {
    v1::ListConsentsRequest request;
    request.set_patient_id(patient_id);
    request.set_include_history(history);
    return request;
  }

  static int64_t CountIn(PgCluster& cluster, const std::string& sql, const std::string& arg) {
    pqxx::connection c(cluster.ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec_params1(sql, arg)[0].as<int64_t>();
  }

  // Stores versions `first` to `last` of a consent of fr-1, as earlier calls by the app would
  // have: granted, every other one revoked if `alternating`, each with a period that ended a day
  // ago if `ended`, open-ended otherwise.
  static void StoreVersions(const std::string& consent_id, int64_t first, int64_t last,
                            bool alternating, bool ended) {
    pqxx::connection c(clusters_->region("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO consent_versions (consent_id, version, state, valid_from, valid_until, "
        "evidence_ref, reason, recorded_by, recorded_at, request_id) "
        "SELECT $1, v, CASE WHEN $4 AND v % 2 = 1 THEN 'revoked' ELSE 'granted' END, "
        "CASE WHEN $5 THEN now() - interval '2 days' ELSE now() END, "
        "CASE WHEN $5 THEN now() - interval '1 day' END, 'form-' || v, '', $6, now(), "
        "'fill-' || v FROM generate_series($2::int8, $3::int8) AS v",
        consent_id, first, last, alternating, ended, App());
    txn.commit();
  }

  // Every page of a patient's export by the app, in turn: each page's (consent_count,
  // resource_count), and each line's consent id, versionId and status. At most 10 pages.
  struct ExportedLine {
    std::string consent_id;
    std::string version;
    std::string status;
  };
  struct ExportedPages {
    std::vector<std::pair<uint32_t, uint32_t>> counts;
    std::vector<ExportedLine> lines;
  };
  static absl::StatusOr<ExportedPages> ExportEveryPage(const std::string& patient_id) {
    v1::ExportConsentsRequest request;
    request.set_patient_id(patient_id);
    request.set_reason("the patient asked for a copy");
    ExportedPages pages;
    do {
      v1::ExportConsentsResponse response;
      grpc::ClientContext context;
      grpc::Status status = Stub(pki_->app())->ExportConsents(&context, request, &response);
      if (!status.ok()) return FromGrpcStatus(status);
      pages.counts.emplace_back(response.consent_count(), response.resource_count());
      for (absl::string_view line : absl::StrSplit(response.ndjson(), '\n', absl::SkipEmpty())) {
        google::protobuf::Struct json;
        if (!google::protobuf::util::JsonStringToMessage(std::string(line), &json).ok()) {
          return absl::DataLossError(absl::StrCat("not JSON: ", line));
        }
        const auto& fields = json.fields();
        pages.lines.push_back(
            {fields.at("identifier").list_value().values(0).struct_value().fields().at(
                 "value").string_value(),
             fields.at("meta").struct_value().fields().at("versionId").string_value(),
             fields.at("status").string_value()});
      }
      request.set_page_token(response.next_page_token());
    } while (!request.page_token().empty() && pages.counts.size() < 10);
    return pages;
  }

  static std::string Practitioner() { return pki_->SpiffeId("/tenant/acme/practitioner/p-1"); }
  static std::string App() { return pki_->SpiffeId("/tenant/acme/app/backend"); }
  static std::string Device() { return pki_->SpiffeId("/tenant/acme/device/dev-1"); }
  static std::string GlobexPractitioner() {
    return pki_->SpiffeId("/tenant/globex/practitioner/p-1");
  }

  static PgClusterSet* clusters_;
  static std::string* dir_;
  static TestPki* pki_;
  static MedgateConfig* routing_config_;
  static MedgateConfig* consent_config_;
  static routing::RoutingServer* routing_;
  static ConsentServer* a_;
  static ConsentServer* b_;
};

PgClusterSet* ConsentTest::clusters_ = nullptr;
std::string* ConsentTest::dir_ = nullptr;
TestPki* ConsentTest::pki_ = nullptr;
MedgateConfig* ConsentTest::routing_config_ = nullptr;
MedgateConfig* ConsentTest::consent_config_ = nullptr;
routing::RoutingServer* ConsentTest::routing_ = nullptr;
ConsentServer* ConsentTest::a_ = nullptr;
ConsentServer* ConsentTest::b_ = nullptr;

TEST_F(ConsentTest, GrantThenCheckAccessPermitsAndDefaultIsDeny) {
  const std::string patient = Place("grant-check-1", "FR");
  auto service = Stub(Sharing());
  // Nothing granted yet: default deny.
  auto before = Check(*service, patient, v1::PURPOSE_CARE, Practitioner());
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->decision(), v1::DECISION_DENY);
  EXPECT_EQ(before->reason(), v1::ACCESS_REASON_NO_CONSENT);
  EXPECT_EQ(before->consent_id(), "");

  auto granted = Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE));
  ASSERT_TRUE(granted.ok()) << granted.status();
  EXPECT_EQ(granted->version(), 1);
  EXPECT_LE(granted->consent_id().size(), 64u);

  for (const std::string& actor : {Practitioner(), App(), Device()}) {
    auto check = Check(*service, patient, v1::PURPOSE_CARE, actor);
    ASSERT_TRUE(check.ok()) << check.status();
    EXPECT_EQ(check->decision(), v1::DECISION_PERMIT) << actor;
    EXPECT_EQ(check->reason(), v1::ACCESS_REASON_PERMITTED);
    EXPECT_EQ(check->consent_id(), granted->consent_id());
    EXPECT_EQ(check->consent_version(), 1);
    EXPECT_FALSE(check->has_valid_until());
  }
  // Other purposes stay denied; the tenant's own practitioner may ask too, and that read of the
  // patient's consent is audited in the home shard (a service's is not: it audits its own access).
  auto audited = [&](const std::string& more) {
    return CountIn(clusters_->region("fr-1"),
                   "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND "
                   "object_type = 'consent_decision'" + more,
                   patient);
  };
  EXPECT_EQ(audited(""), 0);
  auto research = Check(*Stub(pki_->practitioner()), patient, v1::PURPOSE_RESEARCH, App());
  ASSERT_TRUE(research.ok()) << research.status();
  EXPECT_EQ(research->reason(), v1::ACCESS_REASON_NO_CONSENT);
  EXPECT_EQ(audited(absl::StrCat(" AND action = 'read' AND actor = '", Practitioner(),
                                 "' AND purpose = 'RESEARCH' AND "
                                 "reason LIKE 'CHECKED: DENY NO_CONSENT%'")),
            1);
  EXPECT_EQ(audited(""), 1);
  // The second instance answers the same.
  auto other = Check(*Stub(Sharing(), b_), patient, v1::PURPOSE_CARE, App());
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->decision(), v1::DECISION_PERMIT);
}

// Random grants (tenant-wide or narrowed to a practitioner or an app, started or starting later,
// open-ended or ending later) and revocations of one patient's consents, each followed by
// CheckAccess for random purposes and actors (of the tenant, a device, another tenant's):
// every answer is the decision the pure library gives over the versions the test recorded, the
// consent and version it rests on included; and the history lists every version, numbered from 1
// without a gap, in the states recorded. Seeded (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS).
TEST_F(ConsentTest, RandomGrantsAndRevocationsDecideAsRecorded) {
  const uint64_t seed = testing::FuzzSeed();
  const std::string patient = Place(absl::StrCat("random-consents-", seed % 100000), "FR");
  auto service = Stub(Sharing());
  const v1::Purpose purposes[] = {v1::PURPOSE_CARE, v1::PURPOSE_REMOTE_MONITORING,
                                  v1::PURPOSE_RESEARCH};
  const std::string narrowed_to[] = {"", Practitioner(), App()};
  const std::string askers[] = {Practitioner(), App(), Device(), GlobexPractitioner(),
                                pki_->SpiffeId("/tenant/acme/practitioner/p-2")};
  struct Recorded {
    std::string consent_id;
    int64_t version = 0;
    bool revoked = false;
    absl::Time from = absl::InfinitePast();
    absl::Time until = absl::InfiniteFuture();
    std::vector<std::string> categories;  // sorted, as the service keeps them
    std::vector<v1::ConsentState> states;  // of each version, oldest first
  };
  std::map<std::pair<int, int>, Recorded> recorded;  // (purpose, actor) -> latest version
  const absl::Time now = absl::Now();
  const int rounds = testing::FuzzRounds(40);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const int p = static_cast<int>(testing::Uniform(rng, 0, 2));
    const int a = static_cast<int>(testing::Uniform(rng, 0, 2));
    auto found = recorded.find({p, a});
    if (found != recorded.end() && testing::Uniform(rng, 0, 2) == 0) {
      auto revoked = Revoke(*Stub(pki_->app()), ByKey(patient, purposes[p], narrowed_to[a]));
      ASSERT_TRUE(revoked.ok()) << revoked.status();
      EXPECT_EQ(revoked->already_revoked(), found->second.revoked);
      if (!found->second.revoked) {
        found->second.revoked = true;
        found->second.version++;
        found->second.states.push_back(v1::CONSENT_STATE_REVOKED);
      }
      EXPECT_EQ(revoked->version(), found->second.version);
    } else {
      GrantArgs args(patient);
      args.WithPurpose(purposes[p]).WithActor(narrowed_to[a]);
      args.WithRequestId(absl::StrCat("random-grant-", seed, "-", round));
      Recorded r = found != recorded.end() ? found->second : Recorded{};
      r.from = absl::InfinitePast();
      r.until = absl::InfiniteFuture();
      if (testing::Uniform(rng, 0, 2) == 0) {
        r.from = now + absl::Hours(static_cast<int64_t>(testing::Uniform(rng, 0, 1)) * 2 - 1);
        args.StartingAt(r.from);
      }
      if (testing::Uniform(rng, 0, 2) == 0) {
        r.until = now + absl::Hours(static_cast<int64_t>(testing::Uniform(rng, 2, 5)));
        args.EndingAt(r.until);
      }
      // Narrowed to some categories a third of the time (imaging for CARE only).
      r.categories.clear();
      if (testing::Uniform(rng, 0, 2) == 0) {
        for (const char* c : {"blood-glucose", "heart-rate", "imaging"}) {
          if (purposes[p] != v1::PURPOSE_CARE && std::string(c) == "imaging") continue;
          if (testing::Uniform(rng, 0, 1) == 0) r.categories.push_back(c);
        }
      }
      args.InCategories(r.categories);
      auto granted = Grant(args);
      ASSERT_TRUE(granted.ok()) << granted.status();
      r.consent_id = granted->consent_id();
      r.version++;
      r.revoked = false;
      r.states.push_back(v1::CONSENT_STATE_GRANTED);
      EXPECT_EQ(granted->version(), r.version);
      recorded[{p, a}] = r;
    }
    // Asked as the service would, for a random purpose and actor.
    for (int ask = 0; ask < 3; ++ask) {
      const int q = static_cast<int>(testing::Uniform(rng, 0, 2));
      const std::string& asker = askers[testing::Uniform(rng, 0, 4)];
      const std::string category =
          std::vector<std::string>{"", "heart-rate", "blood-glucose", "imaging"}[testing::Uniform(
              rng, 0, 3)];
      std::vector<ConsentRecord> records;
      for (const auto& [key, r] : recorded) {
        ConsentRecord c;
        c.consent_id = r.consent_id;
        c.tenant_id = "acme";
        c.purpose = *PurposeFromNumber(static_cast<int>(purposes[key.first]));
        c.actor = narrowed_to[key.second];
        c.version = r.version;
        c.revoked = r.revoked;
        // An unset start is the time of recording: before any check that follows it.
        c.valid_from = r.from;
        c.valid_until = r.until;
        c.categories = r.categories;
        records.push_back(c);
      }
      const AccessDecision want =
          Decide(records, *PurposeFromNumber(static_cast<int>(purposes[q])), asker, category,
                 absl::Now());
      auto check = Check(*service, patient, purposes[q], asker, category);
      ASSERT_TRUE(check.ok()) << check.status();
      EXPECT_EQ(check->decision() == v1::DECISION_PERMIT, want.permit) << asker;
      EXPECT_EQ(v1::AccessReason_Name(check->reason()),
                absl::StrCat("ACCESS_REASON_", AccessReasonName(want.reason)))
          << asker;
      EXPECT_EQ(check->consent_id(), want.consent_id) << asker;
      EXPECT_EQ(check->consent_version(), want.consent_version) << asker;
    }
    if (HasFailure()) break;
  }
  auto listed = List(*Stub(pki_->app()), ListOf(patient, /*history=*/true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  size_t consents = 0;
  for (const v1::PatientConsent& c : listed->consents()) {
    ++consents;
    for (const auto& [key, r] : recorded) {
      if (r.consent_id != c.consent_id()) continue;
      ASSERT_EQ(static_cast<size_t>(c.history_size()), r.states.size()) << c.consent_id();
      for (int v = 0; v < c.history_size(); ++v) {
        EXPECT_EQ(c.history(v).version(), v + 1);
        EXPECT_EQ(c.history(v).state(), r.states[static_cast<size_t>(v)]) << "version " << v + 1;
      }
    }
  }
  EXPECT_EQ(consents, recorded.size());
}

// How fast a change reaches another instance is consent_bench's to measure (DOMAIN.md: within a
// second); this test shows it arrives through the change feed, not through an entry's expiry.
TEST_F(ConsentTest, RevocationOnOneInstanceReachesTheOtherThroughTheChangeFeed) {
  const std::string patient = Place("propagation-1", "FR");
  auto on_a = Stub(pki_->app(), a_);
  auto on_b = Stub(Sharing(), b_);
  const uint64_t heard = b_->cache().Stats().notifications;
  auto granted = Grant(*on_a, GrantArgs(patient).WithPurpose(v1::PURPOSE_REMOTE_MONITORING));
  ASSERT_TRUE(granted.ok()) << granted.status();
  // B has heard of the grant, and now keeps the patient in its cache: only the change feed can
  // make it change its answer (its entries live for ten minutes).
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return b_->cache().Stats().notifications > heard; }));
  auto permit = Check(*on_b, patient, v1::PURPOSE_REMOTE_MONITORING, Device());
  ASSERT_TRUE(permit.ok()) << permit.status();
  ASSERT_EQ(permit->decision(), v1::DECISION_PERMIT);
  const uint64_t hits = b_->cache().Stats().hits;
  ASSERT_EQ(Check(*on_b, patient, v1::PURPOSE_REMOTE_MONITORING, Device())->decision(),
            v1::DECISION_PERMIT);
  ASSERT_EQ(b_->cache().Stats().hits, hits + 1);

  const uint64_t heard_before_revocation = b_->cache().Stats().notifications;
  auto revoked = Revoke(*on_a, ById(granted->consent_id()));
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->version(), 2);
  absl::StatusOr<v1::CheckAccessResponse> last;
  bool denied = PollUntil(absl::Now() + kPatience, [&] {
    last = Check(*on_b, patient, v1::PURPOSE_REMOTE_MONITORING, Device());
    return last.ok() && last->decision() == v1::DECISION_DENY;
  });
  ASSERT_TRUE(denied) << "instance B still answers "
                      << (last.ok() ? last->DebugString() : last.status().ToString());
  EXPECT_EQ(last->reason(), v1::ACCESS_REASON_REVOKED);
  EXPECT_EQ(last->consent_id(), granted->consent_id());
  EXPECT_EQ(last->consent_version(), 2);
  EXPECT_GT(b_->cache().Stats().notifications, heard_before_revocation);

  // And the other way round: a new grant on B reaches A's cache.
  auto on_a_check = Stub(Sharing(), a_);
  ASSERT_EQ(Check(*on_a_check, patient, v1::PURPOSE_REMOTE_MONITORING, Device())->decision(),
            v1::DECISION_DENY);
  const uint64_t a_heard = a_->cache().Stats().notifications;
  auto regranted = Grant(*Stub(pki_->practitioner(), b_),
                         GrantArgs(patient).WithPurpose(v1::PURPOSE_REMOTE_MONITORING));
  ASSERT_TRUE(regranted.ok()) << regranted.status();
  EXPECT_EQ(regranted->version(), 3);
  bool permitted = PollUntil(absl::Now() + kPatience, [&] {
    last = Check(*on_a_check, patient, v1::PURPOSE_REMOTE_MONITORING, Device());
    return last.ok() && last->decision() == v1::DECISION_PERMIT;
  });
  ASSERT_TRUE(permitted);
  EXPECT_EQ(last->consent_version(), 3);
  EXPECT_GT(a_->cache().Stats().notifications, a_heard);
}

// A grant whose answer was lost, retried after the patient withdrew: the retry records nothing
// and the consent stays revoked. The same request id with other evidence is a client's mistake.
TEST_F(ConsentTest, ALateRetryOfAGrantDoesNotUndoARevocation) {
  const std::string patient = Place("late-retry-1", "FR");
  auto app = Stub(pki_->app());
  auto granted = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("lr-1"));
  ASSERT_TRUE(granted.ok()) << granted.status();
  v1::RevokeConsentRequest revoke = ByKey(patient, v1::PURPOSE_CARE);
  revoke.set_request_id("lr-2");
  revoke.set_reason("withdrawn");
  ASSERT_TRUE(Revoke(*app, revoke).ok());

  auto retry = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("lr-1"));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->version(), 1);
  EXPECT_EQ(retry->consent_id(), granted->consent_id());
  auto listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).state(), v1::CONSENT_STATE_REVOKED);
  EXPECT_EQ(listed->consents(0).history_size(), 2);

  auto reused = Grant(*app, GrantArgs(patient).WithEvidence("form-9").WithRequestId("lr-1"));
  EXPECT_EQ(reused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(reused.status().message().find("request_id 'lr-1'"), absl::string_view::npos)
      << reused.status();
  auto other_period = Grant(*app, GrantArgs(patient)
                                      .WithEvidence("form-1")
                                      .WithRequestId("lr-1")
                                      .EndingAt(absl::Now() + absl::Hours(24)));
  EXPECT_EQ(other_period.status().code(), absl::StatusCode::kInvalidArgument) << other_period.status();
  // A new request id grants again.
  auto regranted = Grant(*app, GrantArgs(patient).WithEvidence("form-2").WithRequestId("lr-3"));
  ASSERT_TRUE(regranted.ok()) << regranted.status();
  EXPECT_EQ(regranted->version(), 3);

  // Request ids are each caller's own: another caller's grant that happens to reuse one (a form
  // number, say) is a grant of its own, not a retry of the app's.
  revoke.set_request_id("lr-4");
  ASSERT_TRUE(Revoke(*app, revoke).ok());
  auto practitioner = Stub(pki_->practitioner());
  auto other_caller =
      Grant(*practitioner, GrantArgs(patient).WithEvidence("form-1").WithRequestId("lr-1"));
  ASSERT_TRUE(other_caller.ok()) << other_caller.status();
  EXPECT_EQ(other_caller->version(), 5);
  auto now_listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(now_listed.ok()) << now_listed.status();
  ASSERT_EQ(now_listed->consents_size(), 1);
  EXPECT_EQ(now_listed->consents(0).state(), v1::CONSENT_STATE_GRANTED);
}

// A request id names one change of the caller's: sent again for another patient, purpose or
// actor, or a grant's id sent with a revocation, it is refused (INVALID_ARGUMENT naming what it
// recorded), and nothing is recorded. Sent again for the same change, it is a retry.
TEST_F(ConsentTest, ARequestIdReusedForAnotherChangeIsRefused) {
  const std::string patient = Place("request-id-once-1", "FR");
  const std::string other_patient = Place("request-id-once-2", "FR");
  auto app = Stub(pki_->app());
  auto granted = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("once-1"));
  ASSERT_TRUE(granted.ok()) << granted.status();
  const std::vector<std::pair<std::string, GrantArgs>> others = {
      {"another patient", GrantArgs(other_patient).WithEvidence("form-1").WithRequestId("once-1")},
      {"another purpose", GrantArgs(patient)
                              .WithPurpose(v1::PURPOSE_RESEARCH)
                              .WithEvidence("form-1")
                              .WithRequestId("once-1")},
      {"another actor", GrantArgs(patient)
                            .WithActor(Practitioner())
                            .WithEvidence("form-1")
                            .WithRequestId("once-1")},
  };
  for (const auto& [what, args] : others) {
    auto reused = Grant(*app, args);
    EXPECT_EQ(reused.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_NE(reused.status().message().find(absl::StrCat(
                  "request_id 'once-1' already recorded a grant (version 1 of consent '",
                  granted->consent_id(), "')")),
              absl::string_view::npos)
        << what << ": " << reused.status();
  }
  v1::RevokeConsentRequest revoke = ByKey(patient, v1::PURPOSE_CARE);
  revoke.set_request_id("once-1");
  revoke.set_reason("withdrawn");
  auto revoked = Revoke(*app, revoke);
  EXPECT_EQ(revoked.status().code(), absl::StatusCode::kInvalidArgument) << revoked.status();
  // Nothing of it was recorded: one consent, granted, and nothing for the other patient.
  auto listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).state(), v1::CONSENT_STATE_GRANTED);
  EXPECT_EQ(listed->consents(0).history_size(), 1);
  auto other_listed = List(*app, ListOf(other_patient, true));
  ASSERT_TRUE(other_listed.ok()) << other_listed.status();
  EXPECT_EQ(other_listed->consents_size(), 0);
  // The same change again is a retry, answered with what was recorded.
  auto retry = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("once-1"));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->consent_id(), granted->consent_id());
  EXPECT_EQ(retry->version(), 1);
  // A revocation's id is its own too: sent with a grant of the consent it revoked, refused.
  revoke.set_request_id("once-2");
  ASSERT_TRUE(Revoke(*app, revoke).ok());
  auto regrant = Grant(*app, GrantArgs(patient).WithEvidence("form-2").WithRequestId("once-2"));
  EXPECT_EQ(regrant.status().code(), absl::StatusCode::kInvalidArgument) << regrant.status();
  EXPECT_NE(regrant.status().message().find("already recorded a revocation (version 2"),
            absl::string_view::npos)
      << regrant.status();
}

// An instant far from 1970 is stored exactly: the end of 9999 (a common way to say "until
// revoked") read back as 10000-01-01, which a retry then took for another period.
TEST_F(ConsentTest, APeriodFarFromNowIsStoredToTheMicrosecond) {
  const std::string patient = Place("far-period-1", "FR");
  auto app = Stub(pki_->app());
  const absl::Time end_of_9999 =
      absl::FromCivil(absl::CivilSecond(9999, 12, 31, 23, 59, 59), absl::UTCTimeZone()) +
      absl::Microseconds(999999);
  auto granted = Grant(*app, GrantArgs(patient).EndingAt(end_of_9999).WithRequestId("far-1"));
  ASSERT_TRUE(granted.ok()) << granted.status();
  auto listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  const google::protobuf::Timestamp& end = listed->consents(0).current().period().end_at();
  EXPECT_EQ(end.seconds(), absl::ToUnixSeconds(end_of_9999));
  EXPECT_EQ(end.nanos(), 999999000);
  auto retry = Grant(*app, GrantArgs(patient).EndingAt(end_of_9999).WithRequestId("far-1"));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->version(), granted->version());
}

// A revocation whose answer was lost, retried after the patient granted again: the retry answers
// the first revocation, records nothing and leaves the newer grant in force. The same request id
// with another reason is a client's mistake, refused rather than taken for done.
TEST_F(ConsentTest, ALateRetryOfARevocationDoesNotUndoANewerGrant) {
  const std::string patient = Place("late-revoke-1", "FR");
  auto app = Stub(pki_->app());
  auto granted = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("lv-1"));
  ASSERT_TRUE(granted.ok()) << granted.status();
  v1::RevokeConsentRequest revoke = ByKey(patient, v1::PURPOSE_CARE);
  revoke.set_request_id("lv-2");
  revoke.set_reason("withdrawn");
  auto revoked = Revoke(*app, revoke);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->version(), 2);
  auto regranted = Grant(*app, GrantArgs(patient).WithEvidence("form-2").WithRequestId("lv-3"));
  ASSERT_TRUE(regranted.ok()) << regranted.status();
  EXPECT_EQ(regranted->version(), 3);

  auto retry = Revoke(*app, revoke);
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->consent_id(), granted->consent_id());
  EXPECT_EQ(retry->version(), 2);
  EXPECT_TRUE(retry->already_revoked());
  auto listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).state(), v1::CONSENT_STATE_GRANTED);
  EXPECT_EQ(listed->consents(0).current().version(), 3);
  EXPECT_EQ(listed->consents(0).history_size(), 3);

  revoke.set_reason("changed my mind");
  auto reused = Revoke(*app, revoke);
  EXPECT_EQ(reused.status().code(), absl::StatusCode::kInvalidArgument) << reused.status();
  EXPECT_NE(reused.status().message().find("request_id 'lv-2'"), absl::string_view::npos)
      << reused.status();
  // A new request id revokes the newer grant.
  revoke.set_request_id("lv-4");
  auto revoked_again = Revoke(*app, revoke);
  ASSERT_TRUE(revoked_again.ok()) << revoked_again.status();
  EXPECT_EQ(revoked_again->version(), 4);
  EXPECT_FALSE(revoked_again->already_revoked());
}

// A grant's answer lost, and its retry made after the end it gave: the retry answers what was
// recorded. A new grant with an end already past is refused.
TEST_F(ConsentTest, ARetryAfterTheGrantsEndAnswersWhatWasRecorded) {
  const std::string patient = Place("late-retry-2", "FR");
  auto app = Stub(pki_->app());
  const absl::Time end = absl::Now() + absl::Seconds(2);
  auto granted =
      Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("le-1").EndingAt(end));
  ASSERT_TRUE(granted.ok()) << granted.status();
  absl::SleepFor(end - absl::Now() + absl::Milliseconds(100));
  auto retry =
      Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("le-1").EndingAt(end));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->consent_id(), granted->consent_id());
  EXPECT_EQ(retry->version(), granted->version());
  auto past = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("le-2").EndingAt(end));
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument) << past.status();
  EXPECT_NE(past.status().message().find("must be in the future"), absl::string_view::npos)
      << past.status();
}

TEST_F(ConsentTest, HistoryKeepsEveryVersion) {
  const std::string patient = Place("history-1", "FR");
  auto app = Stub(pki_->app());
  const absl::Time end = absl::Now() + absl::Hours(24);
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("h-1")).ok());
  // A retry of the same grant records nothing.
  auto retry = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("h-1"));
  ASSERT_TRUE(retry.ok());
  EXPECT_EQ(retry->version(), 1);
  ASSERT_TRUE(Grant(*Stub(pki_->practitioner()),
                    GrantArgs(patient).EndingAt(end).WithEvidence("form-2").WithRequestId("h-2"))
                  .ok());
  v1::RevokeConsentRequest revoke = ByKey(patient, v1::PURPOSE_CARE);
  revoke.set_request_id("h-3");
  revoke.set_reason("moved to another clinic");
  auto revoked = Revoke(*app, revoke);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->version(), 3);
  EXPECT_FALSE(revoked->already_revoked());
  auto again = Revoke(*app, revoke);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_revoked());
  EXPECT_EQ(again->version(), 3);
  auto regranted = Grant(*app, GrantArgs(patient).WithEvidence("form-3").WithRequestId("h-4"));
  ASSERT_TRUE(regranted.ok());
  EXPECT_EQ(regranted->version(), 4);

  auto listed = List(*app, ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  const v1::PatientConsent& c = listed->consents(0);
  EXPECT_EQ(c.consent_id(), regranted->consent_id());
  EXPECT_EQ(c.patient_id(), patient);
  EXPECT_EQ(c.purpose(), v1::PURPOSE_CARE);
  EXPECT_EQ(c.actor(), "");
  EXPECT_EQ(c.state(), v1::CONSENT_STATE_GRANTED);
  ASSERT_EQ(c.history_size(), 4);
  const std::vector<std::pair<v1::ConsentState, std::string>> expected = {
      {v1::CONSENT_STATE_GRANTED, "form-1"},
      {v1::CONSENT_STATE_GRANTED, "form-2"},
      {v1::CONSENT_STATE_REVOKED, "form-2"},
      {v1::CONSENT_STATE_GRANTED, "form-3"}};
  for (int i = 0; i < 4; ++i) {
    const v1::ConsentVersion& v = c.history(i);
    EXPECT_EQ(v.version(), i + 1);
    EXPECT_EQ(v.state(), expected[i].first) << i;
    EXPECT_EQ(v.evidence_ref(), expected[i].second) << i;
    EXPECT_EQ(v.request_id(), absl::StrCat("h-", i + 1));
    EXPECT_TRUE(v.period().has_start_at());
    EXPECT_TRUE(v.has_recorded_at());
  }
  EXPECT_EQ(c.history(0).recorded_by(), App());
  EXPECT_EQ(c.history(1).recorded_by(), Practitioner());
  EXPECT_EQ(absl::ToUnixMicros(FromProtoTimestamp(c.history(1).period().end_at())), absl::ToUnixMicros(end));
  // The revoked version keeps the period it revoked, and says why.
  EXPECT_EQ(c.history(2).period().end_at().seconds(), c.history(1).period().end_at().seconds());
  EXPECT_EQ(c.history(2).reason(), "moved to another clinic");
  EXPECT_EQ(c.history(3).reason(), "");
  EXPECT_EQ(c.current().DebugString(), c.history(3).DebugString());

  // Without history only the current version comes back.
  auto current = List(*app, ListOf(patient, false));
  ASSERT_TRUE(current.ok());
  EXPECT_EQ(current->consents(0).history_size(), 0);
  EXPECT_EQ(current->consents(0).current().version(), 4);

  // History cannot be rewritten, even with SQL.
  pqxx::connection c_fr(clusters_->region("fr-1").ConnectionString());
  for (const char* sql : {"UPDATE consent_versions SET state = 'granted' WHERE consent_id = $1",
                          "DELETE FROM consent_versions WHERE consent_id = $1",
                          "DELETE FROM consents WHERE consent_id = $1"}) {
    pqxx::work txn(c_fr);
    EXPECT_THROW(txn.exec_params(sql, c.consent_id()), pqxx::sql_error) << sql;
  }
}

// GDPR art. 20 for consents: an app of the patient's tenant exports every version of the
// patient's consents as FHIR R4 Consent resources, page by page, each page audited with the
// request's reason.
TEST_F(ConsentTest, AnAppExportsEveryVersionOfThePatientsConsentsAsFhir) {
  const std::string patient = Place("export-consents-1", "FR");
  auto app = Stub(pki_->app());
  const absl::Time end = absl::FromUnixSeconds(absl::ToUnixSeconds(absl::Now()) + 86400);
  auto care = Grant(*app, GrantArgs(patient).WithEvidence("form-1").WithRequestId("x-1"));
  ASSERT_TRUE(care.ok()) << care.status();
  ASSERT_TRUE(Grant(*Stub(pki_->practitioner()),
                    GrantArgs(patient).EndingAt(end).WithEvidence("form-2").WithRequestId("x-2"))
                  .ok());
  v1::RevokeConsentRequest revoke = ByKey(patient, v1::PURPOSE_CARE);
  revoke.set_reason("moved to another clinic");
  ASSERT_TRUE(Revoke(*app, revoke).ok());
  auto monitoring = Grant(*app, GrantArgs(patient)
                                    .WithPurpose(v1::PURPOSE_REMOTE_MONITORING)
                                    .WithActor(Practitioner())
                                    .InCategories({"heart-rate", "blood-pressure"})
                                    .WithEvidence("app-event-9"));
  ASSERT_TRUE(monitoring.ok()) << monitoring.status();

  const std::string reason = "the patient asked for a copy (ticket 5151)";
  auto export_page = [&](const TestCert& as, const std::string& why, int page_size,
                         const std::string& token) -> absl::StatusOr<v1::ExportConsentsResponse> {
    v1::ExportConsentsRequest request;
    request.set_request_id("consent-export-test");
    request.set_patient_id(patient);
    request.set_reason(why);
    request.set_page_size(page_size);
    request.set_page_token(token);
    v1::ExportConsentsResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->ExportConsents(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  };
  // Pages of one consent, with every version: CARE's three, then REMOTE_MONITORING's one.
  auto first = export_page(pki_->app(), reason, 1, "");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->consent_count(), 1u);
  EXPECT_EQ(first->resource_count(), 3u);
  ASSERT_FALSE(first->next_page_token().empty());
  auto second = export_page(pki_->app(), reason, 1, first->next_page_token());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->consent_count(), 1u);
  EXPECT_EQ(second->resource_count(), 1u);
  EXPECT_TRUE(second->next_page_token().empty());

  std::vector<google::protobuf::Struct> lines;
  for (const std::string& ndjson : {first->ndjson(), second->ndjson()}) {
    ASSERT_FALSE(ndjson.empty());
    EXPECT_EQ(ndjson.back(), '\n');
    for (absl::string_view line : absl::StrSplit(ndjson, '\n', absl::SkipEmpty())) {
      google::protobuf::Struct json;
      ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(std::string(line), &json).ok())
          << line;
      lines.push_back(json);
    }
  }
  ASSERT_EQ(lines.size(), 4u);
  // References into `lines`, which outlives them.
  auto field = [](const google::protobuf::Struct& s,
                  const std::string& name) -> const google::protobuf::Value& {
    return s.fields().at(name);
  };
  auto first_of = [](const google::protobuf::Value& v) -> const google::protobuf::Struct& {
    return v.list_value().values(0).struct_value();
  };
  const std::vector<std::tuple<std::string, std::string, std::string, std::string>> expected = {
      // consent, versionId, status, evidence
      {care->consent_id(), "1", "active", "form-1"},
      {care->consent_id(), "2", "active", "form-2"},
      {care->consent_id(), "3", "inactive", "form-2"},
      {monitoring->consent_id(), "1", "active", "app-event-9"}};
  for (size_t i = 0; i < lines.size(); ++i) {
    SCOPED_TRACE(i);
    const google::protobuf::Struct& c = lines[i];
    EXPECT_EQ(field(c, "resourceType").string_value(), "Consent");
    EXPECT_EQ(field(first_of(field(c, "identifier")), "system").string_value(),
              "urn:medgate:consent");
    EXPECT_EQ(field(first_of(field(c, "identifier")), "value").string_value(),
              std::get<0>(expected[i]));
    EXPECT_EQ(field(field(c, "meta").struct_value(), "versionId").string_value(),
              std::get<1>(expected[i]));
    EXPECT_EQ(field(c, "status").string_value(), std::get<2>(expected[i]));
    EXPECT_EQ(field(field(field(c, "sourceReference").struct_value(), "identifier").struct_value(),
                    "value")
                  .string_value(),
              std::get<3>(expected[i]));
    EXPECT_EQ(field(field(field(c, "patient").struct_value(), "identifier").struct_value(),
                    "value")
                  .string_value(),
              patient);
    EXPECT_EQ(field(first_of(field(field(c, "scope").struct_value(), "coding")), "code")
                  .string_value(),
              "patient-privacy");
  }
  auto provision = [&](size_t i) -> const google::protobuf::Struct& {
    return field(lines[i], "provision").struct_value();
  };
  EXPECT_EQ(field(first_of(field(provision(0), "purpose")), "code").string_value(), "CARE");
  EXPECT_FALSE(provision(0).fields().contains("actor"));
  EXPECT_FALSE(field(provision(0), "period").struct_value().fields().contains("end"));
  EXPECT_EQ(field(field(provision(1), "period").struct_value(), "end").string_value(),
            absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", end, absl::UTCTimeZone()));
  // The revocation: who recorded it and why.
  std::map<std::string, std::string> extensions;
  for (const auto& e : field(lines[2], "extension").list_value().values()) {
    const auto& f = e.struct_value().fields();
    extensions[f.at("url").string_value()] = f.contains("valueUri")
                                                 ? f.at("valueUri").string_value()
                                                 : f.at("valueString").string_value();
  }
  EXPECT_EQ(extensions["urn:medgate:fhir:recorded-by"], App());
  EXPECT_EQ(extensions["urn:medgate:fhir:revocation-reason"], "moved to another clinic");
  // Narrowed to one practitioner and two categories.
  EXPECT_EQ(field(first_of(field(provision(3), "purpose")), "code").string_value(),
            "REMOTE_MONITORING");
  EXPECT_EQ(field(field(field(first_of(field(provision(3), "actor")), "reference").struct_value(),
                        "identifier")
                      .struct_value(),
                  "value")
                .string_value(),
            Practitioner());
  std::vector<std::string> classes;
  for (const auto& v : field(provision(3), "class").list_value().values()) {
    classes.push_back(v.struct_value().fields().at("code").string_value());
  }
  EXPECT_EQ(classes, (std::vector<std::string>{"blood-pressure", "heart-rate"}));

  // Each page audited with the reason and the request id, in the patient's home shard.
  pqxx::connection fr(clusters_->region("fr-1").ConnectionString());
  pqxx::nontransaction q(fr);
  pqxx::row reasons = q.exec_params1(
      "SELECT string_agg(reason, '|' ORDER BY seq) FROM audit_log WHERE patient_id = $1 AND "
      "action = 'read' AND actor = $2 AND request_id = 'consent-export-test'",
      patient, App());
  EXPECT_EQ(reasons[0].as<std::string>(""),
            absl::StrCat("EXPORTED: consents=1 versions=3 format=fhir-r4; ", reason,
                         "|EXPORTED: consents=1 versions=1 format=fhir-r4; ", reason));
  const int64_t entries_before =
      CountIn(clusters_->region("fr-1"), "SELECT count(*) FROM audit_log WHERE patient_id = $1",
              patient);

  // Only an app of the patient's tenant, with a reason.
  struct Refused {
    const TestCert* as;
    std::string reason;
    absl::StatusCode code;
  };
  for (const Refused& r : std::vector<Refused>{
           {&pki_->practitioner(), reason, absl::StatusCode::kPermissionDenied},
           {&pki_->device(), reason, absl::StatusCode::kPermissionDenied},
           {&pki_->ops(), reason, absl::StatusCode::kPermissionDenied},
           {&pki_->globex_app(), reason, absl::StatusCode::kNotFound},
           {&pki_->app(), "", absl::StatusCode::kInvalidArgument}}) {
    auto refused = export_page(*r.as, r.reason, 0, "");
    EXPECT_EQ(refused.status().code(), r.code) << r.as->cert_path << ": " << refused.status();
  }
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient),
            entries_before);
  EXPECT_EQ(export_page(pki_->app(), reason, -1, "").status().code(),
            absl::StatusCode::kInvalidArgument);

  // Pages of at most 4 consents (each with every version): 6 consents are 4 and 2, whatever was
  // asked for.
  const std::string many = Place("export-consents-many", "FR");
  for (int i = 1; i <= 6; ++i) {
    ASSERT_TRUE(Grant(*app, GrantArgs(many)
                                .WithActor(pki_->SpiffeId(absl::StrCat(
                                    "/tenant/acme/practitioner/p-", i)))
                                .WithEvidence("form"))
                    .ok());
  }
  for (int asked : {0, 50}) {
    SCOPED_TRACE(asked);
    v1::ExportConsentsRequest request;
    request.set_patient_id(many);
    request.set_reason(reason);
    request.set_page_size(asked);
    std::vector<uint32_t> pages;
    do {
      v1::ExportConsentsResponse response;
      grpc::ClientContext context;
      grpc::Status status = Stub(pki_->app())->ExportConsents(&context, request, &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
      pages.push_back(response.consent_count());
      request.set_page_token(response.next_page_token());
    } while (!request.page_token().empty() && pages.size() < 10);
    EXPECT_EQ(pages, (std::vector<uint32_t>{4, 2}));
  }
}

TEST_F(ConsentTest, ExpiredConsentDeniesAndFutureOneIsNotYetValid) {
  const std::string patient = Place("periods-1", "FR");
  auto service = Stub(Sharing());
  const absl::Time end = absl::Now() + absl::Milliseconds(1500);
  auto granted = Grant(GrantArgs(patient).EndingAt(end));
  ASSERT_TRUE(granted.ok()) << granted.status();
  // Decided before its end: permitted, and says until when (a consent ending in an hour, so that
  // a slow machine cannot reach the end first).
  const std::string lasting = Place("periods-1-lasting", "FR");
  const absl::Time lasting_end = absl::Now() + absl::Hours(1);
  ASSERT_TRUE(Grant(GrantArgs(lasting).EndingAt(lasting_end)).ok());
  auto before_end = Check(*service, lasting, v1::PURPOSE_CARE, App());
  ASSERT_TRUE(before_end.ok()) << before_end.status();
  EXPECT_EQ(before_end->decision(), v1::DECISION_PERMIT);
  EXPECT_EQ(absl::ToUnixMicros(FromProtoTimestamp(before_end->valid_until())),
            absl::ToUnixMicros(lasting_end));
  absl::StatusOr<v1::CheckAccessResponse> last;
  ASSERT_TRUE(PollUntil(end + kPatience, [&] {
    last = Check(*service, patient, v1::PURPOSE_CARE, App());
    return last.ok() && last->reason() == v1::ACCESS_REASON_EXPIRED;
  }));
  EXPECT_EQ(last->decision(), v1::DECISION_DENY);
  EXPECT_EQ(last->consent_id(), granted->consent_id());
  EXPECT_EQ(last->consent_version(), 1);  // the end alone made it expire: no version recorded
  auto listed = List(*Stub(pki_->app()), ListOf(patient));
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->consents(0).state(), v1::CONSENT_STATE_EXPIRED);
  EXPECT_EQ(listed->consents(0).current().state(), v1::CONSENT_STATE_GRANTED);

  // A consent that starts later.
  const absl::Time start = absl::Now() + absl::Hours(1);
  auto future = Grant(GrantArgs(patient)
                          .WithPurpose(v1::PURPOSE_RESEARCH)
                          .StartingAt(start)
                          .EndingAt(start + absl::Hours(1)));
  ASSERT_TRUE(future.ok()) << future.status();
  auto pending = Check(*service, patient, v1::PURPOSE_RESEARCH, App());
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(pending->decision(), v1::DECISION_DENY);
  EXPECT_EQ(pending->reason(), v1::ACCESS_REASON_NOT_YET_VALID);
  EXPECT_EQ(pending->consent_id(), future->consent_id());
  EXPECT_EQ(absl::ToUnixMicros(FromProtoTimestamp(pending->valid_until())), absl::ToUnixMicros(start));
}

TEST_F(ConsentTest, ActorNarrowingCoversOnlyThatActor) {
  const std::string patient = Place("narrowing-1", "FR");
  auto service = Stub(Sharing());
  auto narrowed =
      Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH).WithActor(Practitioner()));
  ASSERT_TRUE(narrowed.ok()) << narrowed.status();
  auto permit = Check(*service, patient, v1::PURPOSE_RESEARCH, Practitioner());
  ASSERT_TRUE(permit.ok());
  EXPECT_EQ(permit->decision(), v1::DECISION_PERMIT);
  EXPECT_EQ(permit->consent_id(), narrowed->consent_id());
  for (const std::string& actor :
       {App(), Device(), GlobexPractitioner(), pki_->SpiffeId("/tenant/acme/practitioner/p-2")}) {
    auto check = Check(*service, patient, v1::PURPOSE_RESEARCH, actor);
    ASSERT_TRUE(check.ok()) << check.status();
    EXPECT_EQ(check->decision(), v1::DECISION_DENY) << actor;
    EXPECT_EQ(check->reason(), v1::ACCESS_REASON_ACTOR_NOT_COVERED) << actor;
  }
  // A tenant-wide consent covers the tenant's devices, never another tenant's identities.
  ASSERT_TRUE(Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_GEOLOCATION)).ok());
  EXPECT_EQ(Check(*service, patient, v1::PURPOSE_GEOLOCATION, Device())->decision(),
            v1::DECISION_PERMIT);
  EXPECT_EQ(Check(*service, patient, v1::PURPOSE_GEOLOCATION, GlobexPractitioner())->reason(),
            v1::ACCESS_REASON_ACTOR_NOT_COVERED);
  // Narrowing only to a practitioner or app of the patient's tenant.
  for (const std::string& actor :
       {GlobexPractitioner(), Device(), pki_->SpiffeId("/service/ingest"),
        std::string("spiffe://evil.test/tenant/acme/practitioner/p-1")}) {
    auto refused = Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE).WithActor(actor));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << actor;
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr("actor")) << actor;
  }
}

TEST_F(ConsentTest, ACategoryNarrowedConsentPermitsOnlyItsCategories) {
  const std::string patient = Place("categories-1", "FR");
  auto service = Stub(Sharing());
  auto granted = Grant(GrantArgs(patient)
                           .WithPurpose(v1::PURPOSE_REMOTE_MONITORING)
                           .InCategories({"heart-rate", "blood-glucose"})
                           .WithRequestId("categories-grant-1"));
  ASSERT_TRUE(granted.ok()) << granted.status();
  for (const std::string category : {"heart-rate", "blood-glucose"}) {
    auto check = Check(*service, patient, v1::PURPOSE_REMOTE_MONITORING, Device(), category);
    ASSERT_TRUE(check.ok()) << check.status();
    EXPECT_EQ(check->decision(), v1::DECISION_PERMIT) << category;
    EXPECT_EQ(check->consent_id(), granted->consent_id());
  }
  // Another measure, or a use of no category in particular, is not covered; the deny cites the
  // consent that is narrowed.
  for (const std::string category : {"oxygen-saturation", ""}) {
    auto check = Check(*service, patient, v1::PURPOSE_REMOTE_MONITORING, Device(), category);
    ASSERT_TRUE(check.ok()) << check.status();
    EXPECT_EQ(check->decision(), v1::DECISION_DENY) << category;
    EXPECT_EQ(check->reason(), v1::ACCESS_REASON_CATEGORY_NOT_COVERED) << category;
    EXPECT_EQ(check->consent_id(), granted->consent_id());
  }
  // A practitioner's check (of their own access) is audited with the category asked about.
  auto asked = Check(*Stub(pki_->practitioner()), patient, v1::PURPOSE_REMOTE_MONITORING,
                     Practitioner(), "body-weight");
  ASSERT_TRUE(asked.ok()) << asked.status();
  EXPECT_EQ(asked->reason(), v1::ACCESS_REASON_CATEGORY_NOT_COVERED);
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND "
                    "object_type = 'consent_decision' AND reason LIKE "
                    "'CHECKED: DENY CATEGORY_NOT_COVERED actor=% category=body-weight'",
                    patient),
            1);
  // The grant's entry names its categories; the listing shows them sorted, and a revocation keeps
  // them on its version.
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND object_type = "
                    "'consent' AND reason = 'GRANTED: categories=blood-glucose,heart-rate'",
                    patient),
            1);
  ASSERT_TRUE(Revoke(*Stub(pki_->app()), ById(granted->consent_id())).ok());
  auto listed = List(*Stub(pki_->app()), ListOf(patient, /*history=*/true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  const v1::PatientConsent& listed_consent = listed->consents(0);
  ASSERT_EQ(listed_consent.history_size(), 2);
  for (const v1::ConsentVersion& v : listed_consent.history()) {
    EXPECT_THAT(std::vector<std::string>(v.categories().begin(), v.categories().end()),
                ::testing::ElementsAre("blood-glucose", "heart-rate"))
        << v.version();
  }
  EXPECT_EQ(Check(*service, patient, v1::PURPOSE_REMOTE_MONITORING, Device(), "heart-rate")
                ->reason(),
            v1::ACCESS_REASON_REVOKED);
  // A re-grant replaces the categories; with none it covers every category.
  ASSERT_TRUE(Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_REMOTE_MONITORING)).ok());
  EXPECT_EQ(Check(*service, patient, v1::PURPOSE_REMOTE_MONITORING, Device(), "oxygen-saturation")
                ->decision(),
            v1::DECISION_PERMIT);
  // A retry of the first grant with other categories is not a retry.
  auto changed = Grant(GrantArgs(patient)
                           .WithPurpose(v1::PURPOSE_REMOTE_MONITORING)
                           .InCategories({"heart-rate"})
                           .WithRequestId("categories-grant-1"));
  EXPECT_EQ(changed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(changed.status().message()), HasSubstr("other evidence, categories"));

  // Bad categories, each refused naming what is wrong, nothing recorded.
  struct Bad {
    v1::Purpose purpose;
    std::vector<std::string> categories;
    std::string says;
  };
  const Bad bad[] = {
      {v1::PURPOSE_CARE, {"mood"}, "'mood' is not a data category"},
      {v1::PURPOSE_CARE, {"imaging", "imaging"}, "'imaging' is given twice"},
      {v1::PURPOSE_GEOLOCATION, {"heart-rate"}, "GEOLOCATION consent is about locations"},
      {v1::PURPOSE_REMOTE_MONITORING, {"document"}, "'document' is a kind of record"},
      {v1::PURPOSE_RECORD_SHARING, {"heart-rate"}, "'heart-rate' is a measure of vitals"},
      {v1::PURPOSE_RESEARCH, {"imaging"}, "a RESEARCH consent covers vitals"},
      {v1::PURPOSE_CARE,
       {"heart-rate", "oxygen-saturation", "blood-pressure", "body-temperature", "respiratory-rate",
        "body-weight", "blood-glucose", "document", "imaging", "report", "heart-rate"},
       "categories: at most 10"},
  };
  const std::string other = Place("categories-2", "FR");
  for (const Bad& b : bad) {
    auto refused = Grant(GrantArgs(other).WithPurpose(b.purpose).InCategories(b.categories));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << b.says;
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr(b.says));
  }
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM consents WHERE patient_id = $1", other),
            0);
  auto unknown = Check(*service, patient, v1::PURPOSE_CARE, Device(), "mood");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("category: 'mood'"));
  // The shard refuses a category it does not know, a NULL one and a two-dimensional list, whoever
  // writes them.
  pqxx::connection owner(clusters_->region("fr-1").ConnectionString());
  for (const std::string bad_array : {"{mood}", "{imaging,NULL}", "{{imaging}}"}) {
    pqxx::work txn(owner);
    EXPECT_THROW(txn.exec_params(
                     "INSERT INTO consent_versions (consent_id, version, state, valid_from, "
                     "evidence_ref, reason, recorded_by, recorded_at, request_id, categories) "
                     "VALUES ($1, 99, 'granted', now(), 'e', '', 'x', now(), 'r', $2::text[])",
                     granted->consent_id(), bad_array),
                 pqxx::check_violation)
        << bad_array;
  }
}

TEST_F(ConsentTest, ConsentsOfAnFrPatientExistOnlyInFr1) {
  const std::string fr = Place("residency-fr", "FR");
  const std::string be = Place("residency-be", "BE");
  ASSERT_TRUE(Grant(GrantArgs(fr).WithPurpose(v1::PURPOSE_CARE)).ok());
  ASSERT_TRUE(Grant(GrantArgs(fr).WithPurpose(v1::PURPOSE_REMOTE_MONITORING)).ok());
  ASSERT_TRUE(Revoke(*Stub(pki_->app()), ByKey(fr, v1::PURPOSE_CARE)).ok());
  ASSERT_TRUE(Grant(GrantArgs(be).WithPurpose(v1::PURPOSE_CARE)).ok());
  // Per region and patient: its consents, their versions, and its audit entries there.
  for (auto* region : clusters_->regions()) {
    for (const auto& [patient, counts] : std::map<std::string, std::vector<int64_t>>{
             {fr, region->name() == "fr-1" ? std::vector<int64_t>{2, 3, 3}
                                           : std::vector<int64_t>{0, 0, 0}},
             {be, region->name() == "eu-1" ? std::vector<int64_t>{1, 1, 1}
                                           : std::vector<int64_t>{0, 0, 0}}}) {
      EXPECT_EQ(CountIn(*region, "SELECT count(*) FROM consents WHERE patient_id = $1", patient),
                counts[0])
          << region->name();
      EXPECT_EQ(
          CountIn(*region,
                  "SELECT count(*) FROM consent_versions v JOIN consents c USING (consent_id) "
                  "WHERE c.patient_id = $1",
                  patient),
          counts[1])
          << region->name();
      EXPECT_EQ(CountIn(*region, "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient),
                counts[2])
          << region->name();
    }
  }
  // The control database holds the directory only: no consent table, no consent audit entry.
  EXPECT_EQ(CountIn(clusters_->control(), "SELECT count(*) FROM pg_tables WHERE tablename = $1",
                    "consents"),
            0);
  EXPECT_EQ(CountIn(clusters_->control(), "SELECT count(*) FROM audit_log WHERE object_type = $1",
                    "consent"),
            0);
}

TEST_F(ConsentTest, CrossTenantMatrixHasZeroSuccesses) {
  const std::string patient = Place("cross-tenant-1", "FR");
  auto granted = Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE));
  ASSERT_TRUE(granted.ok());
  const std::string unknown_patient = "pt_0000000000000000000000000000000000000000";
  const std::string unknown_consent = "cn_fr-1_000000000000000000000000";

  int calls = 0;
  int successes = 0;
  for (const TestCert* as : {&pki_->globex_app(), &pki_->globex_practitioner()}) {
    auto stub = Stub(*as);
    // Each call on acme's ids must fail exactly like the same call on ids that do not exist.
    auto expect_not_found = [&](const absl::Status& theirs, const absl::Status& unknown,
                                const std::string& what) {
      ++calls;
      successes += theirs.ok();
      EXPECT_EQ(theirs.code(), absl::StatusCode::kNotFound) << what << ": " << theirs;
      EXPECT_EQ(theirs.message(), unknown.message()) << what;
      EXPECT_EQ(unknown.code(), absl::StatusCode::kNotFound) << what;
    };
    expect_not_found(Grant(*stub, GrantArgs(patient)).status(),
                     Grant(*stub, GrantArgs(unknown_patient)).status(), "GrantConsent");
    expect_not_found(Revoke(*stub, ById(granted->consent_id())).status(),
                     Revoke(*stub, ById(unknown_consent)).status(), "RevokeConsent(id)");
    expect_not_found(Revoke(*stub, ByKey(patient, v1::PURPOSE_CARE)).status(),
                     Revoke(*stub, ByKey(unknown_patient, v1::PURPOSE_CARE)).status(),
                     "RevokeConsent(key)");
    expect_not_found(List(*stub, ListOf(patient, true)).status(),
                     List(*stub, ListOf(unknown_patient, true)).status(), "ListConsents");
    expect_not_found(Check(*stub, patient, v1::PURPOSE_CARE, GlobexPractitioner()).status(),
                     Check(*stub, unknown_patient, v1::PURPOSE_CARE, GlobexPractitioner()).status(),
                     "CheckAccess");
  }
  EXPECT_EQ(calls, 10);
  EXPECT_EQ(successes, 0);
  // A service asking on behalf of globex's practitioner gets a deny, not acme's consent.
  auto on_behalf = Check(*Stub(Sharing()), patient, v1::PURPOSE_CARE, GlobexPractitioner());
  ASSERT_TRUE(on_behalf.ok());
  EXPECT_EQ(on_behalf->decision(), v1::DECISION_DENY);
  EXPECT_EQ(on_behalf->reason(), v1::ACCESS_REASON_ACTOR_NOT_COVERED);
  // acme's consent is untouched.
  auto listed = List(*Stub(pki_->app()), ListOf(patient, true));
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).state(), v1::CONSENT_STATE_GRANTED);
  EXPECT_EQ(listed->consents(0).history_size(), 1);
}

TEST_F(ConsentTest, DevicesMayCallNothingAndRolesAreEnforced) {
  const std::string patient = Place("roles-1", "FR");
  std::vector<std::pair<std::string, grpc::Status>> results;
  auto call_all = [&](const std::string& who, const TestCert& cert) {
    auto stub = Stub(cert);
    {
      v1::GrantConsentRequest request;
      request.set_patient_id(patient);
      request.set_purpose(v1::PURPOSE_REMOTE_MONITORING);
      request.set_evidence_ref("x");
      v1::GrantConsentResponse response;
      grpc::ClientContext context;
      results.emplace_back(who + ".GrantConsent", stub->GrantConsent(&context, request, &response));
    }
    {
      v1::RevokeConsentRequest request = ByKey(patient, v1::PURPOSE_CARE);
      request.set_reason("x");
      v1::RevokeConsentResponse response;
      grpc::ClientContext context;
      results.emplace_back(who + ".RevokeConsent",
                           stub->RevokeConsent(&context, request, &response));
    }
    {
      v1::ListConsentsResponse response;
      grpc::ClientContext context;
      results.emplace_back(who + ".ListConsents",
                           stub->ListConsents(&context, ListOf(patient), &response));
    }
    {
      v1::CheckAccessRequest request;
      request.set_patient_id(patient);
      request.set_purpose(v1::PURPOSE_REMOTE_MONITORING);
      request.set_actor(Device());
      v1::CheckAccessResponse response;
      grpc::ClientContext context;
      results.emplace_back(who + ".CheckAccess", stub->CheckAccess(&context, request, &response));
    }
  };
  call_all("device", pki_->device());
  call_all("globex_device", pki_->globex_device());
  ASSERT_EQ(results.size(), 8u);
  for (const auto& [name, status] : results) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << name;
  }
  // Services decide, they do not record; ops record, they do not decide.
  EXPECT_EQ(Grant(GrantArgs(patient), &pki_->service()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(List(*Stub(pki_->service()), ListOf(patient)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Check(*Stub(pki_->ops()), patient, v1::PURPOSE_CARE, App()).status().code(),
            absl::StatusCode::kPermissionDenied);
  // Nothing was recorded by any of it.
  EXPECT_EQ(List(*Stub(pki_->app()), ListOf(patient))->consents_size(), 0);
}

// Consents are the patient's tenant's to record and read: ops, who host the data, may neither
// grant, revoke nor list them, for any tenant.
TEST_F(ConsentTest, OpsNeitherRecordNorReadConsents) {
  const std::string patient = Place("ops-1", "DE");
  auto granted = Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE).WithActor(App()));
  ASSERT_TRUE(granted.ok()) << granted.status();
  auto by_ops =
      Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH).WithActor(App()), &pki_->ops());
  EXPECT_EQ(by_ops.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(by_ops.status().message()), HasSubstr("an ops identity may not call"));
  EXPECT_EQ(List(*Stub(pki_->ops()), ListOf(patient, true)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Revoke(*Stub(pki_->ops()), ById(granted->consent_id())).status().code(),
            absl::StatusCode::kPermissionDenied);
  // The tenant's consent is as it was: one version, granted by the app, none by ops.
  auto listed = List(*Stub(pki_->app()), ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).current().version(), 1);
  EXPECT_EQ(CountIn(clusters_->region("de-1"),
                    "SELECT count(*) FROM audit_log WHERE actor LIKE $1", "%/ops/%"),
            0);
}

// Checking access on behalf of a caller, unaudited and for any tenant's patient, is for the
// services that enforce consent (ingest and sharing): any other service identity is refused.
TEST_F(ConsentTest, OnlyTheServicesThatEnforceConsentCheckAccessOnBehalf) {
  const std::string patient = Place("service-check-1", "FR");
  ASSERT_TRUE(Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE).WithActor(App())).ok());
  for (const std::string enforcing : {"ingest", "sharing"}) {
    auto check = Check(*Stub(ServiceCert(enforcing)), patient, v1::PURPOSE_CARE, App());
    ASSERT_TRUE(check.ok()) << enforcing << ": " << check.status();
    EXPECT_EQ(check->decision(), v1::DECISION_PERMIT) << enforcing;
  }
  for (const std::string other : {"routing", "consent", "audit"}) {
    auto check = Check(*Stub(ServiceCert(other)), patient, v1::PURPOSE_CARE, App());
    EXPECT_EQ(check.status().code(), absl::StatusCode::kPermissionDenied) << other;
    EXPECT_THAT(std::string(check.status().message()),
                HasSubstr("may not call CheckAccess: only ingest, sharing may"))
        << other;
  }
}

// A service's identity belongs to no tenant, so only the role table keeps it from revoking any
// tenant's consent: by id and by key, it is refused, and the consent stays as it was.
TEST_F(ConsentTest, ServicesMayNotRevokeConsents) {
  const std::string patient = Place("service-revoke-1", "FR");
  auto granted = Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE).WithActor(App()));
  ASSERT_TRUE(granted.ok()) << granted.status();
  auto service = Stub(pki_->service());
  for (const v1::RevokeConsentRequest& request :
       {ById(granted->consent_id()), ByKey(patient, v1::PURPOSE_CARE, App())}) {
    SCOPED_TRACE(request.ShortDebugString());
    auto revoked = Revoke(*service, request);
    EXPECT_EQ(revoked.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(std::string(revoked.status().message()), HasSubstr("may not call"));
  }
  auto listed = List(*Stub(pki_->app()), ListOf(patient, true));
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).current().version(), 1);
  // And a service that enforces consent still decides with it: the consent is in force.
  auto decision = Check(*Stub(Sharing()), patient, v1::PURPOSE_CARE, App());
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_EQ(decision->decision(), v1::DECISION_PERMIT);
}

// A suspended tenant's identities may not record, read or check consents; what was recorded stays,
// and reactivation restores access to it.
TEST_F(ConsentTest, ASuspendedTenantIsRefused) {
  auto upsert = [](bool active) {
    return test_support::UpsertTenant(*pki_, routing_->port(), "pausable", {"FR"}, active);
  };
  ASSERT_TRUE(upsert(true).ok());
  absl::StatusOr<TestCert> app =
      test_support::IssueIdentity(*pki_, "pausable-app", "/tenant/pausable/app/backend");
  ASSERT_TRUE(app.ok()) << app.status();
  const std::string patient = Place("pausable-1", "FR", &*app);
  ASSERT_TRUE(Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_CARE), &*app).ok());

  ASSERT_TRUE(upsert(false).ok());
  absl::StatusOr<v1::ListConsentsResponse> listed;
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(15), [&] {
    listed = List(*Stub(*app), ListOf(patient));
    return !listed.ok();
  }));
  EXPECT_EQ(listed.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(listed.status().message()), HasSubstr("suspended"));
  EXPECT_EQ(Grant(GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH), &*app).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Revoke(*Stub(*app), ByKey(patient, v1::PURPOSE_CARE)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Check(*Stub(*app), patient, v1::PURPOSE_CARE, "").status().code(),
            absl::StatusCode::kPermissionDenied);
  // Services still decide for the tenant's data (the callers they serve are gated themselves).
  auto decided = Check(*Stub(Sharing()), patient, v1::PURPOSE_CARE,
                       pki_->SpiffeId("/tenant/pausable/app/backend"));
  ASSERT_TRUE(decided.ok()) << decided.status();

  ASSERT_TRUE(upsert(true).ok());
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(15), [&] {
    listed = List(*Stub(*app), ListOf(patient));
    return listed.ok();
  })) << listed.status();
  ASSERT_EQ(listed->consents_size(), 1);
  EXPECT_EQ(listed->consents(0).current().version(), 1);
}

// A patient has at most kMaxConsentsPerPatient consents narrowed to an actor; a page with history
// holds at most kMaxPageSizeWithHistory consents.
TEST_F(ConsentTest, APatientsConsentsAreBounded) {
  const std::string patient = Place("bounded-1", "FR");
  auto app = Stub(pki_->app());
  auto first = Grant(*app, GrantArgs(patient).WithRequestId("bounded-v1"));
  ASSERT_TRUE(first.ok()) << first.status();
  // What earlier grants would have stored: consents narrowed to an actor, each granted once, up
  // to one below the bound.
  {
    pqxx::connection c(clusters_->region("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO consents (consent_id, patient_id, tenant_id, purpose, actor) "
        "SELECT 'cn_fr-1_fill' || n, $1, 'acme', 'RESEARCH', $2 || n "
        "FROM generate_series(1, $3::int) AS n",
        patient, pki_->SpiffeId("/tenant/acme/app/fill-"), kMaxConsentsPerPatient - 1);
    txn.exec_params0(
        "INSERT INTO consent_versions (consent_id, version, state, valid_from, evidence_ref, "
        "reason, recorded_by, recorded_at, request_id) "
        "SELECT 'cn_fr-1_fill' || n, 1, 'granted', now(), 'form', '', $2, now(), 'fill' "
        "FROM generate_series(1, $1::int) AS n",
        kMaxConsentsPerPatient - 1, App());
    txn.commit();
  }
  // The last narrowed consent the bound allows, then one too many.
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithActor(Practitioner())).ok());
  auto refused = Grant(*app, GrantArgs(patient).WithActor(
                                 pki_->SpiffeId("/tenant/acme/practitioner/one-too-many")));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr(absl::StrCat(kMaxConsentsPerPatient, " consents narrowed to an actor")));
  // Tenant-wide consents are not held back by the narrowed ones: the patient can always consent
  // for every purpose (a device's samples rest on a tenant-wide REMOTE_MONITORING).
  for (v1::Purpose purpose : {v1::PURPOSE_GEOLOCATION, v1::PURPOSE_RESEARCH,
                              v1::PURPOSE_REMOTE_MONITORING, v1::PURPOSE_RECORD_SHARING}) {
    auto tenant_wide = Grant(*app, GrantArgs(patient).WithPurpose(purpose));
    EXPECT_TRUE(tenant_wide.ok()) << v1::Purpose_Name(purpose) << ": " << tenant_wide.status();
  }
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM consents WHERE patient_id = $1 AND actor <> ''", patient),
            kMaxConsentsPerPatient);
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM consents WHERE patient_id = $1 AND actor = ''", patient),
            5);
  // With history, pages are short; without, the usual size.
  v1::ListConsentsRequest with_history = ListOf(patient, true);
  with_history.set_page_size(1000);
  auto page = List(*app, with_history);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_EQ(page->consents_size(), kMaxPageSizeWithHistory);
  EXPECT_FALSE(page->next_page_token().empty());
  auto defaults = List(*app, ListOf(patient, true));
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->consents_size(), kMaxPageSizeWithHistory);
  v1::ListConsentsRequest plain = ListOf(patient);
  plain.set_page_size(1000);
  auto all = List(*app, plain);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->consents_size(), kMaxConsentsPerPatient);  // a page of 1,000 of the 1,005
}

// A consent's versions are not bounded, so a consent granted and revoked many times can always be
// granted again; a page with history holds at most kMaxHistoryVersionsPerPage versions (an export's
// kMaxExportVersionsPerPage), and a longer history ends its page and goes on at the start of the
// next.
TEST_F(ConsentTest, AConsentsHistoryOfAnyLengthIsPagedInListsAndExports) {
  const std::string patient = Place("long-history-1", "FR");
  auto app = Stub(pki_->app());
  auto care = Grant(*app, GrantArgs(patient).WithRequestId("long-v1"));
  ASSERT_TRUE(care.ok()) << care.status();
  // What years of grants and revocations would have stored: versions 2 to 1,200, the last a
  // grant.
  constexpr int64_t kStored = 1200;
  StoreVersions(care->consent_id(), 2, kStored, /*alternating=*/true, /*ended=*/false);
  // Revoked and granted again, well past any bound a consent once had.
  auto revoked = Revoke(*app, ById(care->consent_id()));
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->version(), kStored + 1);
  auto regranted =
      Grant(*app, GrantArgs(patient).WithEvidence("form-again").WithRequestId("again"));
  ASSERT_TRUE(regranted.ok()) << regranted.status();
  EXPECT_EQ(regranted->version(), kStored + 2);
  absl::StatusOr<v1::CheckAccessResponse> decided;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    decided = Check(*Stub(Sharing()), patient, v1::PURPOSE_CARE, App());
    return decided.ok() && decided->consent_version() == kStored + 2;
  })) << (decided.ok() ? decided->DebugString() : decided.status().ToString());
  EXPECT_EQ(decided->decision(), v1::DECISION_PERMIT);
  for (v1::Purpose purpose : {v1::PURPOSE_REMOTE_MONITORING, v1::PURPOSE_RESEARCH}) {
    ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithPurpose(purpose)).ok());
  }
  constexpr int64_t kLast = kStored + 2;

  // Listed with history: CARE's first 1,000 versions, then a page that starts with CARE again,
  // its versions 1,001 to the last, and the two other consents.
  std::vector<v1::ListConsentsResponse> pages;
  v1::ListConsentsRequest request = ListOf(patient, /*history=*/true);
  do {
    auto page = List(*app, request);
    ASSERT_TRUE(page.ok()) << page.status();
    pages.push_back(*page);
    request.set_page_token(page->next_page_token());
  } while (!request.page_token().empty() && pages.size() < 10);
  ASSERT_EQ(pages.size(), 2u);
  ASSERT_EQ(pages[0].consents_size(), 1);
  ASSERT_EQ(pages[1].consents_size(), 3);
  EXPECT_EQ(pages[0].consents(0).history_size(), static_cast<int>(kMaxHistoryVersionsPerPage));
  EXPECT_EQ(pages[1].consents(0).consent_id(), care->consent_id());
  std::vector<int64_t> versions;
  for (const auto* c : {&pages[0].consents(0), &pages[1].consents(0)}) {
    EXPECT_EQ(c->current().version(), kLast);
    EXPECT_EQ(c->state(), v1::CONSENT_STATE_GRANTED);
    for (const v1::ConsentVersion& v : c->history()) versions.push_back(v.version());
  }
  std::vector<int64_t> every(kLast);
  std::iota(every.begin(), every.end(), 1);
  EXPECT_EQ(versions, every);
  EXPECT_EQ(pages[1].consents(0).history(kLast - 1 - kMaxHistoryVersionsPerPage).evidence_ref(),
            "form-again");
  EXPECT_EQ(pages[1].consents(1).purpose(), v1::PURPOSE_REMOTE_MONITORING);
  EXPECT_EQ(pages[1].consents(1).history_size(), 1);
  EXPECT_EQ(pages[1].consents(2).purpose(), v1::PURPOSE_RESEARCH);
  // A token past the end of a history (what no page gives) lists what follows that consent.
  request.set_page_token(EncodePageToken({Purpose::kCare, "", kLast + 100}));
  auto past = List(*app, request);
  ASSERT_TRUE(past.ok()) << past.status();
  EXPECT_EQ(past->consents_size(), 2);
  ASSERT_FALSE(past->consents().empty());
  EXPECT_EQ(past->consents(0).purpose(), v1::PURPOSE_REMOTE_MONITORING);

  // Exported: 400 versions a page; the consents counted where they begin.
  absl::StatusOr<ExportedPages> exported = ExportEveryPage(patient);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->counts, (std::vector<std::pair<uint32_t, uint32_t>>{
                                  {1, 400}, {0, 400}, {0, 400}, {2, 4}}));
  std::vector<std::string> version_ids;
  for (const ExportedLine& line : exported->lines) {
    if (line.consent_id == care->consent_id()) version_ids.push_back(line.version);
  }
  ASSERT_EQ(version_ids.size(), static_cast<size_t>(kLast));
  for (int64_t v = 1; v <= kLast; ++v) EXPECT_EQ(version_ids[v - 1], absl::StrCat(v));
  for (const auto& [counts_of_page, pages_so_audited] :
       std::vector<std::pair<std::string, int64_t>>{
           {"consents=1 versions=400", 1}, {"consents=0 versions=400", 2},
           {"consents=2 versions=4", 1}}) {
    EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                      absl::StrCat("SELECT count(*) FROM audit_log WHERE patient_id = $1 AND "
                                   "reason LIKE 'EXPORTED: ", counts_of_page, " %'"),
                      patient),
              pages_so_audited)
        << counts_of_page;
  }
}

// Where a page's versions run out: a history that fills it exactly, and one cut after another
// consent's; a token within a history asked for without history, or under a purpose filter; and
// the export's status of the version a page was cut at.
TEST_F(ConsentTest, AHistoryIsCutWhereItsPageIsFull) {
  const std::string patient = Place("cut-history-1", "FR");
  auto app = Stub(pki_->app());
  auto care = Grant(*app, GrantArgs(patient));
  auto monitoring = Grant(*app, GrantArgs(patient).WithPurpose(v1::PURPOSE_REMOTE_MONITORING));
  ASSERT_TRUE(care.ok() && monitoring.ok());
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH)).ok());
  // CARE: 600 versions, each granted for a period that has ended; REMOTE_MONITORING: 400.
  StoreVersions(care->consent_id(), 2, 600, /*alternating=*/false, /*ended=*/true);
  StoreVersions(monitoring->consent_id(), 2, 400, /*alternating=*/true, /*ended=*/false);
  ASSERT_EQ(600 + 400, static_cast<int>(kMaxHistoryVersionsPerPage));

  // Listed: CARE and REMOTE_MONITORING fill the first page exactly; RESEARCH is the next.
  auto shape = [](const v1::ListConsentsResponse& page) {
    std::vector<std::pair<int, int>> purposes_and_versions;
    for (const v1::PatientConsent& c : page.consents()) {
      purposes_and_versions.emplace_back(c.purpose(), c.history_size());
    }
    return purposes_and_versions;
  };
  v1::ListConsentsRequest request = ListOf(patient, /*history=*/true);
  auto first = List(*app, request);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(shape(*first), (std::vector<std::pair<int, int>>{
                               {v1::PURPOSE_CARE, 600}, {v1::PURPOSE_REMOTE_MONITORING, 400}}));
  request.set_page_token(first->next_page_token());
  auto second = List(*app, request);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(shape(*second), (std::vector<std::pair<int, int>>{{v1::PURPOSE_RESEARCH, 1}}));
  EXPECT_TRUE(second->next_page_token().empty());

  // A token within REMOTE_MONITORING's history: without history, what follows it; under its
  // purpose's filter, the rest of its history; under an earlier purpose's, nothing.
  const std::string within = EncodePageToken({Purpose::kRemoteMonitoring, "", 200});
  v1::ListConsentsRequest plain = ListOf(patient);
  plain.set_page_token(within);
  auto after_it = List(*app, plain);
  ASSERT_TRUE(after_it.ok()) << after_it.status();
  EXPECT_EQ(shape(*after_it), (std::vector<std::pair<int, int>>{{v1::PURPOSE_RESEARCH, 0}}));
  v1::ListConsentsRequest filtered = ListOf(patient, /*history=*/true);
  filtered.set_purpose(v1::PURPOSE_REMOTE_MONITORING);
  filtered.set_page_token(within);
  auto rest = List(*app, filtered);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(shape(*rest),
            (std::vector<std::pair<int, int>>{{v1::PURPOSE_REMOTE_MONITORING, 200}}));
  ASSERT_EQ(rest->consents_size(), 1);
  EXPECT_EQ(rest->consents(0).history(0).version(), 201);
  filtered.set_purpose(v1::PURPOSE_CARE);
  auto none = List(*app, filtered);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->consents_size(), 0);

  // Exported, 400 versions a page: CARE's first 400; its last 200 and REMOTE_MONITORING's first
  // 200; the rest of those and RESEARCH.
  absl::StatusOr<ExportedPages> exported = ExportEveryPage(patient);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->counts,
            (std::vector<std::pair<uint32_t, uint32_t>>{{1, 400}, {1, 400}, {1, 201}}));
  std::map<std::pair<std::string, std::string>, std::string> status_of;  // consent, version
  for (const ExportedLine& line : exported->lines) {
    status_of[std::make_pair(line.consent_id, line.version)] = line.status;
  }
  EXPECT_EQ(status_of.size(), 1001u);
  // A superseded grant is active whatever its period; the latest, ended, is inactive: the one a
  // page was cut at is not taken for the latest.
  auto status = [&](const std::string& consent_id, const std::string& version) {
    return status_of[std::make_pair(consent_id, version)];
  };
  EXPECT_EQ(status(care->consent_id(), "400"), "active");
  EXPECT_EQ(status(care->consent_id(), "401"), "active");
  EXPECT_EQ(status(care->consent_id(), "600"), "inactive");
  EXPECT_EQ(status(monitoring->consent_id(), "200"), "active");
}

// Grants racing for a patient's last free places: the per-patient lock lets exactly as many in as
// the bound has room for.
TEST_F(ConsentTest, ConcurrentGrantsStopAtThePatientsBound) {
  const std::string patient = Place("bounded-race-1", "FR");
  constexpr int kFree = 3;
  constexpr int kRacers = 8;
  {
    pqxx::connection c(clusters_->region("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO consents (consent_id, patient_id, tenant_id, purpose, actor) "
        "SELECT 'cn_fr-1_race' || n, $1, 'acme', 'RESEARCH', $2 || n "
        "FROM generate_series(1, $3::int) AS n",
        patient, pki_->SpiffeId("/tenant/acme/app/race-"), kMaxConsentsPerPatient - kFree);
    txn.exec_params0(
        "INSERT INTO consent_versions (consent_id, version, state, valid_from, evidence_ref, "
        "reason, recorded_by, recorded_at, request_id) "
        "SELECT 'cn_fr-1_race' || n, 1, 'granted', now(), 'form', '', $2, now(), 'fill' "
        "FROM generate_series(1, $1::int) AS n",
        kMaxConsentsPerPatient - kFree, App());
    txn.commit();
  }
  auto app = Stub(pki_->app());
  std::vector<absl::Status> results(kRacers);
  std::vector<std::thread> racers;
  for (int i = 0; i < kRacers; ++i) {
    racers.emplace_back([&, i] {
      // Each a consent of its own: CARE narrowed to a different practitioner.
      results[static_cast<size_t>(i)] =
          Grant(*app, GrantArgs(patient).WithActor(pki_->SpiffeId(
                          absl::StrCat("/tenant/acme/practitioner/racer-", i))))
              .status();
    });
  }
  for (std::thread& t : racers) t.join();
  int granted = 0;
  for (const absl::Status& s : results) {
    if (s.ok()) {
      ++granted;
    } else {
      EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    }
  }
  EXPECT_EQ(granted, kFree);
  EXPECT_EQ(CountIn(clusters_->region("fr-1"), "SELECT count(*) FROM consents WHERE patient_id = $1",
                    patient),
            kMaxConsentsPerPatient);
}

// A patient's consents tell who treats the patient and which kinds of data they hold: a
// practitioner lists them only under the patient's CARE consent for every category (as the audit
// trail), and a refusal is audited; the tenant's apps list them for the patient.
TEST_F(ConsentTest, APractitionerListsAPatientsConsentsOnlyUnderCareConsent) {
  const std::string patient = Place("listed-by-practitioner-1", "FR");
  auto app = Stub(pki_->app());
  auto practitioner = Stub(pki_->practitioner());
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH)).ok());
  // No CARE consent at all.
  auto refused = List(*practitioner, ListOf(patient, true));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("CARE consent"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("NO_CONSENT"));
  // CARE narrowed to the practitioner for one category does not cover every category.
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithActor(Practitioner()).InCategories({"heart-rate"}))
                  .ok());
  absl::StatusOr<v1::ListConsentsResponse> narrowed;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    narrowed = List(*practitioner, ListOf(patient));
    return absl::StrContains(narrowed.status().message(), "CATEGORY_NOT_COVERED");
  })) << narrowed.status();
  EXPECT_EQ(narrowed.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_list' AND "
                    "patient_id = $1 AND decision = 'deny' AND purpose = 'CARE' AND actor = '" +
                        Practitioner() + "'",
                    patient),
            2);
  // The tenant's app lists them whatever the consents say.
  auto by_app = List(*app, ListOf(patient));
  ASSERT_TRUE(by_app.ok()) << by_app.status();
  EXPECT_EQ(by_app->consents_size(), 2);
  // Under a tenant-wide CARE consent (once the service's cache has it), the practitioner lists.
  ASSERT_TRUE(Grant(*app, GrantArgs(patient)).ok());
  absl::StatusOr<v1::ListConsentsResponse> listed;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    listed = List(*practitioner, ListOf(patient));
    return listed.ok();
  })) << listed.status();
  EXPECT_EQ(listed->consents_size(), 3);
}

// A practitioner asks about their own access freely; about another actor's (who treats the
// patient, or may) only under the patient's CARE consent for every category, as for the list.
TEST_F(ConsentTest, APractitionerChecksAnotherActorsAccessOnlyUnderCareConsent) {
  const std::string patient = Place("checked-by-practitioner-1", "FR");
  auto app = Stub(pki_->app());
  auto practitioner = Stub(pki_->practitioner());
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithPurpose(v1::PURPOSE_RESEARCH)).ok());
  // Their own: answered (no CARE consent, so DENY), audited as a read.
  auto own = Check(*practitioner, patient, v1::PURPOSE_CARE, Practitioner());
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->decision(), v1::DECISION_DENY);
  // Another's: refused, the refusal in the trail, and nothing answered.
  auto other = Check(*practitioner, patient, v1::PURPOSE_RESEARCH, App());
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied) << other.status();
  EXPECT_THAT(std::string(other.status().message()),
              HasSubstr("checking another actor's access to this patient"));
  EXPECT_THAT(std::string(other.status().message()), HasSubstr("NO_CONSENT"));
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_decision' AND "
                    "patient_id = $1 AND decision = 'deny' AND purpose = 'CARE' AND actor = '" +
                        Practitioner() + "'",
                    patient),
            1);
  // Nothing was decided for the refused check: the one answered check is the practitioner's own.
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_decision' AND "
                    "patient_id = $1 AND reason LIKE 'CHECKED: %'",
                    patient),
            1);
  // The tenant's app asks about anyone.
  auto by_app = Check(*app, patient, v1::PURPOSE_RESEARCH, Practitioner());
  ASSERT_TRUE(by_app.ok()) << by_app.status();
  EXPECT_EQ(by_app->decision(), v1::DECISION_PERMIT);
  // Under a tenant-wide CARE consent (once the service's cache has it), the practitioner asks.
  ASSERT_TRUE(Grant(*app, GrantArgs(patient)).ok());
  absl::StatusOr<v1::CheckAccessResponse> answered;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    answered = Check(*practitioner, patient, v1::PURPOSE_RESEARCH, App());
    return answered.ok();
  })) << answered.status();
  EXPECT_EQ(answered->decision(), v1::DECISION_PERMIT);
}

// A listing, or a practitioner's access check, whose read entry cannot be written fails and
// shows nothing.
TEST_F(ConsentTest, ReadsItCannotAuditFail) {
  const std::string patient = Place("unaudited-list-1", "FR");
  auto app = Stub(pki_->app());
  ASSERT_TRUE(Grant(*app, GrantArgs(patient)).ok());
  ASSERT_TRUE(List(*app, ListOf(patient)).ok());
  auto practitioner = Stub(pki_->practitioner());
  ASSERT_TRUE(Check(*practitioner, patient, v1::PURPOSE_CARE, App()).ok());
  pqxx::connection c(clusters_->region("fr-1").ConnectionString());
  pqxx::nontransaction n(c);
  n.exec0("CREATE FUNCTION refuse_consent_reads() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
          "IF NEW.object_type IN ('consent_list', 'consent_decision') THEN "
          "RAISE EXCEPTION 'read entries refused'; END IF; RETURN NEW; END $$");
  n.exec0("CREATE TRIGGER refuse_consent_reads BEFORE INSERT ON audit_log FOR EACH ROW "
          "EXECUTE FUNCTION refuse_consent_reads()");
  auto listed = List(*app, ListOf(patient));
  auto checked = Check(*practitioner, patient, v1::PURPOSE_CARE, App());
  n.exec0("DROP TRIGGER refuse_consent_reads ON audit_log");
  n.exec0("DROP FUNCTION refuse_consent_reads()");
  EXPECT_FALSE(listed.ok());
  // The trigger's RAISE, told by its SQLSTATE: its text stays in the service's log.
  EXPECT_THAT(std::string(listed.status().message()), HasSubstr("database error P0001: "));
  EXPECT_THAT(std::string(listed.status().message()), Not(HasSubstr("read entries refused")));
  EXPECT_FALSE(checked.ok()) << "an access check answered without its audit entry";
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_decision' AND "
                    "patient_id = $1",
                    patient),
            1);
  // Nothing of the failed listing is in the chain; the next listing is audited again.
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_list' AND "
                    "patient_id = $1",
                    patient),
            1);
  ASSERT_TRUE(List(*app, ListOf(patient)).ok());
  EXPECT_EQ(CountIn(clusters_->region("fr-1"),
                    "SELECT count(*) FROM audit_log WHERE object_type = 'consent_list' AND "
                    "patient_id = $1",
                    patient),
            2);
}

TEST_F(ConsentTest, BadInputNamesTheField) {
  const std::string patient = Place("bad-input-1", "FR");
  const absl::Time now = absl::Now();
  struct GrantCase {
    GrantArgs args;
    std::string mentions;
  };
  std::vector<GrantCase> grants = {
      {GrantArgs(patient).WithPurpose(v1::PURPOSE_UNSPECIFIED), "purpose"},
      {GrantArgs(patient).WithPurpose(static_cast<v1::Purpose>(99)), "purpose"},
      {GrantArgs(patient).StartingAt(now + absl::Hours(2)).EndingAt(now + absl::Hours(1)),
       "period"},
      {GrantArgs(patient).StartingAt(now + absl::Hours(1)).EndingAt(now + absl::Hours(1)),
       "period"},
      {GrantArgs(patient).EndingAt(now - absl::Hours(1)), "period.end_at"},
      {GrantArgs(patient).WithEvidence(""), "evidence_ref"},
      {GrantArgs(patient).WithEvidence(std::string(513, 'e')), "evidence_ref"},
      {GrantArgs(patient).WithActor("not-an-identity"), "actor"},
      {GrantArgs(patient).WithActor(std::string(600, 'a')), "actor"},
      {GrantArgs(patient).WithRequestId(std::string(65, 'r')), "request_id"},
      {GrantArgs(""), "patient_id"},
      {GrantArgs(std::string(65, 'p')), "patient_id"},
      {GrantArgs("pt_with spaces"), "patient_id"},
  };
  for (const GrantCase& c : grants) {
    auto result = Grant(c.args);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << c.mentions;
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(c.mentions));
  }
  {
    v1::GrantConsentRequest request;
    request.set_patient_id(patient);
    request.set_purpose(v1::PURPOSE_CARE);
    request.set_evidence_ref("x");
    request.mutable_period()->mutable_end_at()->set_nanos(-5);
    v1::GrantConsentResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(pki_->app())->GrantConsent(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("period.end_at"));
  }
  auto app = Stub(pki_->app());
  struct RevokeCase {
    v1::RevokeConsentRequest request;
    std::string mentions;
  };
  v1::RevokeConsentRequest no_target;
  no_target.set_reason("x");
  v1::RevokeConsentRequest long_reason = ByKey(patient, v1::PURPOSE_CARE);
  long_reason.set_reason(std::string(513, 'r'));
  for (const RevokeCase& c :
       {RevokeCase{no_target, "target"},
        RevokeCase{ByKey(patient, v1::PURPOSE_UNSPECIFIED), "key.purpose"},
        RevokeCase{ByKey("", v1::PURPOSE_CARE), "key.patient_id"},
        RevokeCase{ById(std::string(70, 'c')), "consent_id"}, RevokeCase{long_reason, "reason"},
        // Taken as Grant takes it: not an identity, or one the database would read cut at a
        // NUL (and then revoke the consent of the identity before it).
        RevokeCase{ByKey(patient, v1::PURPOSE_CARE, "bogus"), "key.actor"},
        RevokeCase{ByKey(patient, v1::PURPOSE_CARE, App() + std::string("\0x", 2)),
                   "key.actor"}}) {
    auto result = Revoke(*app, c.request);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << c.mentions;
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(c.mentions));
  }
  v1::ListConsentsRequest negative = ListOf(patient);
  negative.set_page_size(-1);
  v1::ListConsentsRequest forged = ListOf(patient);
  forged.set_page_token("not-a-token!");
  v1::ListConsentsRequest bad_purpose = ListOf(patient);
  bad_purpose.set_purpose(static_cast<v1::Purpose>(42));
  for (const auto& [request, mentions] :
       std::vector<std::pair<v1::ListConsentsRequest, std::string>>{
           {negative, "page_size"}, {forged, "page_token"}, {bad_purpose, "purpose"}}) {
    auto result = List(*app, request);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << mentions;
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(mentions));
  }
  auto service = Stub(Sharing());
  for (const auto& [purpose, actor, mentions] :
       std::vector<std::tuple<v1::Purpose, std::string, std::string>>{
           {v1::PURPOSE_UNSPECIFIED, App(), "purpose"},
           {v1::PURPOSE_CARE, "", "actor"},
           {v1::PURPOSE_CARE, "spiffe://evil.test/tenant/acme/app/backend", "actor"},
           {v1::PURPOSE_CARE, pki_->SpiffeId("/service/ingest"), "actor"}}) {
    auto result = Check(*service, patient, purpose, actor);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << mentions;
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(mentions));
  }
  // Unknown patients and consents are NOT_FOUND.
  EXPECT_EQ(Check(*service, "pt_unknown", v1::PURPOSE_CARE, App()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Revoke(*app, ByKey(patient, v1::PURPOSE_RESEARCH)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Revoke(*app, ById("cn_mars-1_000000000000000000000000")).status().code(),
            absl::StatusCode::kNotFound);
  // Nothing was recorded by any of it.
  EXPECT_EQ(List(*app, ListOf(patient))->consents_size(), 0);
}

TEST_F(ConsentTest, ListsPageByPurposeThenActor) {
  const std::string patient = Place("paging-1", "FR");
  for (const auto& [purpose, actor] :
       std::vector<std::pair<v1::Purpose, std::string>>{{v1::PURPOSE_GEOLOCATION, ""},
                                                        {v1::PURPOSE_CARE, Practitioner()},
                                                        {v1::PURPOSE_RESEARCH, ""},
                                                        {v1::PURPOSE_CARE, ""},
                                                        {v1::PURPOSE_CARE, App()}}) {
    ASSERT_TRUE(Grant(GrantArgs(patient).WithPurpose(purpose).WithActor(actor)).ok());
  }
  auto app = Stub(pki_->app());
  std::vector<std::pair<int, std::string>> seen;
  std::string token;
  int pages = 0;
  do {
    v1::ListConsentsRequest request = ListOf(patient);
    request.set_page_size(2);
    request.set_page_token(token);
    auto page = List(*app, request);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_LE(page->consents_size(), 2);
    for (const auto& c : page->consents()) seen.emplace_back(c.purpose(), c.actor());
    token = page->next_page_token();
    ++pages;
  } while (!token.empty() && pages < 10);
  const std::vector<std::pair<int, std::string>> expected = {{v1::PURPOSE_CARE, ""},
                                                             {v1::PURPOSE_CARE, App()},
                                                             {v1::PURPOSE_CARE, Practitioner()},
                                                             {v1::PURPOSE_RESEARCH, ""},
                                                             {v1::PURPOSE_GEOLOCATION, ""}};
  EXPECT_EQ(seen, expected);
  EXPECT_EQ(pages, 3);
  v1::ListConsentsRequest care = ListOf(patient);
  care.set_purpose(v1::PURPOSE_CARE);
  EXPECT_EQ(List(*app, care)->consents_size(), 3);
}

TEST_F(ConsentTest, EveryGrantAndRevocationIsAuditedInTheHomeShardChain) {
  const std::string patient = Place("audit-1", "FR");
  PgCluster& fr = clusters_->region("fr-1");
  const std::string count_sql =
      "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND object_type = 'consent'";
  auto app = Stub(pki_->app());
  auto granted = Grant(*app, GrantArgs(patient).WithRequestId("audit-grant"));
  ASSERT_TRUE(granted.ok());
  ASSERT_TRUE(Grant(*app, GrantArgs(patient).WithRequestId("audit-grant")).ok());  // retry
  ASSERT_TRUE(
      Grant(*app, GrantArgs(patient).WithEvidence("form-2").WithRequestId("audit-regrant")).ok());
  v1::RevokeConsentRequest revoke = ById(granted->consent_id());
  revoke.set_request_id("audit-revoke");
  revoke.set_reason("patient withdrew");
  ASSERT_TRUE(Revoke(*app, revoke).ok());
  ASSERT_TRUE(Revoke(*app, revoke).ok());  // already revoked: nothing recorded
  EXPECT_EQ(CountIn(fr, count_sql, patient), 3);

  pqxx::connection c(fr.ConnectionString());
  {
    pqxx::nontransaction q(c);
    pqxx::result rows = q.exec_params(
        "SELECT actor, tenant, action, object_id, purpose, consent_id, consent_version, "
        "request_id, decision, reason FROM audit_log WHERE patient_id = $1 ORDER BY seq",
        patient);
    ASSERT_EQ(rows.size(), 3u);
    // A reason code (as QueryAudit splits it), and the revocation's reason as the caller gave it.
    const std::vector<std::tuple<std::string, int64_t, std::string, std::string>> expected = {
        {"create", 1, "audit-grant", "GRANTED"},
        {"update", 2, "audit-regrant", "GRANTED"},
        {"update", 3, "audit-revoke", "REVOKED: patient withdrew"}};
    for (size_t i = 0; i < rows.size(); ++i) {
      EXPECT_EQ(rows[i][0].as<std::string>(), App());
      EXPECT_EQ(rows[i][1].as<std::string>(), "acme");
      EXPECT_EQ(rows[i][2].as<std::string>(), std::get<0>(expected[i]));
      EXPECT_EQ(rows[i][3].as<std::string>(), granted->consent_id());
      EXPECT_EQ(rows[i][4].as<std::string>(), "CARE");
      EXPECT_EQ(rows[i][5].as<std::string>(), granted->consent_id());
      EXPECT_EQ(rows[i][6].as<int64_t>(), std::get<1>(expected[i]));
      EXPECT_EQ(rows[i][7].as<std::string>(), std::get<2>(expected[i]));
      EXPECT_EQ(rows[i][8].as<std::string>(), "permit");
      EXPECT_EQ(rows[i][9].as<std::string>(), std::get<3>(expected[i]));
    }
  }
  // Reading a patient's consents is an access too: one read entry per list call.
  v1::ListConsentsRequest list = ListOf(patient, true);
  list.set_purpose(v1::PURPOSE_CARE);
  auto listed = List(*app, list);
  ASSERT_TRUE(listed.ok()) << listed.status();
  {
    pqxx::nontransaction q(c);
    pqxx::result reads = q.exec_params(
        "SELECT actor, tenant, action, object_id, reason, decision FROM audit_log "
        "WHERE patient_id = $1 AND object_type = 'consent_list'",
        patient);
    ASSERT_EQ(reads.size(), 1u);
    EXPECT_EQ(reads[0][0].as<std::string>(), App());
    EXPECT_EQ(reads[0][1].as<std::string>(), "acme");
    EXPECT_EQ(reads[0][2].as<std::string>(), "read");
    EXPECT_EQ(reads[0][3].as<std::string>(), patient);
    EXPECT_EQ(reads[0][4].as<std::string>(), "LISTED: count=1 with_history purpose=CARE");
    EXPECT_EQ(reads[0][5].as<std::string>(), "permit");
  }
  for (auto* region : clusters_->regions()) {
    pqxx::connection rc(region->ConnectionString());
    auto verified = audit::VerifyChain(rc);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_TRUE(verified->ok) << region->name() << ": " << verified->problem;
  }
}

// What a client is told when a dependency is down: that it is, and to retry; not the addresses,
// sockets, users or library messages of the network behind the service.
void ExpectNoNetworkDetail(const absl::Status& status, const std::string& address) {
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  for (const std::string& detail : {address, std::string("ipv4:"), std::string("ipv6:"),
                                    std::string("connection to server"), std::string("socket"),
                                    std::string("failed to connect"), std::string("127.0.0.1")}) {
    EXPECT_THAT(std::string(status.message()), Not(HasSubstr(detail))) << status;
  }
}

TEST_F(ConsentTest, RoutingDownIsUnavailable) {
  // An instance whose routing does not answer (nothing listens on port 1).
  std::unique_ptr<MedgateConfig> config(ParseConfig(ConsentYaml("127.0.0.1:1")));
  ASSERT_NE(config, nullptr);
  auto server = ConsentServer::Create(*config);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  const std::string patient = Place("routing-down-1", "FR");
  auto app = Stub(pki_->app(), server->get());
  ExpectNoNetworkDetail(Grant(*app, GrantArgs(patient)).status(), "127.0.0.1:1");
  ExpectNoNetworkDetail(List(*app, ListOf(patient)).status(), "127.0.0.1:1");
  EXPECT_EQ(Check(*Stub(Sharing(), server->get()), patient, v1::PURPOSE_CARE, App())
                .status()
                .code(),
            absl::StatusCode::kUnavailable);
  (*server)->Shutdown();
}

// It stops and restarts a shard.
TEST_F(ConsentTest, ShardDownIsUnavailableForItsPatientsOnly) {
  const std::string de = Place("outage-de", "DE");
  const std::string fr = Place("outage-fr", "FR");
  auto app = Stub(pki_->app());
  auto service = Stub(Sharing());
  ASSERT_TRUE(Grant(*app, GrantArgs(de)).ok());
  ASSERT_TRUE(Grant(*app, GrantArgs(fr)).ok());
  ASSERT_EQ(Check(*service, de, v1::PURPOSE_CARE, App())->decision(), v1::DECISION_PERMIT);

  PgCluster& de1 = clusters_->region("de-1");
  ASSERT_TRUE(de1.Stop().ok());
  const std::string shard_port = absl::StrCat(de1.port());
  ExpectNoNetworkDetail(Grant(*app, GrantArgs(de).WithPurpose(v1::PURPOSE_RESEARCH)).status(),
                        shard_port);
  ExpectNoNetworkDetail(List(*app, ListOf(de)).status(), shard_port);
  ExpectNoNetworkDetail(Revoke(*app, ByKey(de, v1::PURPOSE_CARE)).status(), shard_port);
  // The cache fails closed for de-1's patients once its change feed has been down too long...
  absl::StatusOr<v1::CheckAccessResponse> last;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    last = Check(*service, de, v1::PURPOSE_CARE, App());
    return !last.ok();
  }));
  EXPECT_EQ(last.status().code(), absl::StatusCode::kUnavailable) << last.status();
  // ...while other regions' patients keep working, reads and writes.
  EXPECT_TRUE(Grant(*app, GrantArgs(fr).WithPurpose(v1::PURPOSE_RESEARCH)).ok());
  EXPECT_EQ(Check(*service, fr, v1::PURPOSE_CARE, App())->decision(), v1::DECISION_PERMIT);
  EXPECT_EQ(Check(*Stub(Sharing(), b_), fr, v1::PURPOSE_RESEARCH, App())->decision(),
            v1::DECISION_PERMIT);
  EXPECT_TRUE(List(*app, ListOf(fr)).ok());

  ASSERT_TRUE(de1.StartAgain().ok());
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    last = Check(*service, de, v1::PURPOSE_CARE, App());
    return last.ok();
  })) << last.status();
  EXPECT_EQ(last->decision(), v1::DECISION_PERMIT);
  absl::StatusOr<v1::GrantConsentResponse> regrant;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    regrant = Grant(*app, GrantArgs(de).WithPurpose(v1::PURPOSE_RESEARCH));
    return regrant.ok();
  })) << regrant.status();
}

// The standard health check answers SERVING while any region's shard answers: one region down must
// not take the other regions' patients out of a load balancer with it. With every shard down,
// NOT_SERVING.
TEST_F(ConsentTest, HealthServesWhileAnyRegionsShardAnswers) {
  absl::Status checked = test_support::ExpectServingWhileAnyRegionAnswers(
      Channel(a_->port(), pki_->ops(), "consent"), *clusters_, "de-1", absl::Now() + absl::Seconds(30));
  EXPECT_TRUE(checked.ok()) << checked;
}

}  // namespace
}  // namespace medgate::consent
