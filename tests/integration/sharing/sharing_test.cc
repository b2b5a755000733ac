// The sharing service over real mTLS and real PostgreSQL, with routing and consent in-process:
// encrypted uploads and downloads, a 100 MiB record with bounded memory, grants with consent,
// revocation and expiry, residency of reads, tenant isolation, tampering, break-glass, archive,
// erasure by crypto-shredding, quotas, and the Audit service.
#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <pqxx/pqxx>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "absl/strings/escaping.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "libs/common/grpc_status.h"
#include "libs/crypto/aes_gcm.h"
#include "libs/crypto/chunk_cipher.h"
#include "libs/crypto/key_encryption_key.h"
#include "libs/audit/audit_log.h"
#include "libs/crypto/sha256.h"
#include "libs/identity/credentials.h"
#include "libs/identity/principal.h"
#include "libs/server/rpc_util.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/consent/consent_server.h"
#include "services/routing/routing_server.h"
#include "services/sharing/sharing_server.h"
#include "services/ingest/sql.h"
#include "services/sharing/sql.h"
#include "tests/support/health_check.h"
#include "tests/support/pg_fault_proxy.h"
#include "tests/support/poll.h"
#include "tests/support/directory_services.h"
#include "tests/support/fuzz.h"
#include "tests/support/test_stack.h"
#include "tests/support/tenants.h"

namespace medgate::sharing {
namespace {

using test_support::PgCluster;
using test_support::PgClusterSet;
using test_support::TestCert;
using test_support::TestPki;
using ::testing::AnyOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr absl::Duration kPatience = absl::Seconds(30);
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr char kKekHex[] = "8f1e6a0c3b2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";
constexpr char kOtherKekHex[] = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
constexpr int64_t kTinyQuota = 3 * kMiB;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// The sharing server's clock: real time plus an offset that tests move forward (grant expiry,
// retention) instead of waiting.
std::atomic<int64_t> clock_offset_us{0};
absl::Time ServerNow() { return absl::Now() + absl::Microseconds(clock_offset_us.load()); }
void AdvanceClock(absl::Duration d) { clock_offset_us += absl::ToInt64Microseconds(d); }

using test_support::PollUntil;

// Deterministic content of any size, generated piecewise: byte i depends only on (seed, i).
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::string Generate(uint64_t seed, uint64_t offset, size_t n) {
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i) {
    uint64_t pos = offset + i;
    out[i] = static_cast<char>(Mix(seed * 0x100000001b3ULL + pos / 8) >> (8 * (pos % 8)));
  }
  return out;
}

std::string Sha(absl::string_view data) { return crypto::Sha256::Of(data); }

// Peak resident set size of this process since the last ResetPeakRss(), and the current one.
int64_t ProcStatusKb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return std::stoll(line.substr(field.size()));
  }
  return -1;
}
void ResetPeakRss() { std::ofstream("/proc/self/clear_refs") << "5"; }

struct UploadSpec {
  std::string patient_id;
  std::string content;          // sent as is, unless generated_size is set
  uint64_t generated_size = 0;  // content from Generate(seed, ...), never held whole
  uint64_t seed = 1;
  size_t chunk_bytes = 256 * 1024;
  std::optional<uint64_t> declared_size;
  std::optional<std::string> declared_sha;
  v1::RecordKind kind = v1::RECORD_KIND_DOCUMENT;
  std::string content_type = "application/pdf";
  std::string file_name = "letter.pdf";
  bool send_header = true;
  bool header_twice = false;
  // Empty: a new one for each upload (a request id names one upload; sent again, it is a retry).
  std::string request_id;
  // Called before each chunk is sent, with the offset of its first byte.
  std::function<void(uint64_t offset)> before_chunk;
};

struct Downloaded {
  grpc::Status status;
  bool has_header = false;
  v1::Record header;
  std::string content;  // when kept
  std::string sha256;   // of every content byte received
  uint64_t bytes = 0;
  int chunks = 0;
};

class SharingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The key-encryption keys live outside the stack, which reads the path from its config.
    kek_dir_ = new std::string(std::filesystem::temp_directory_path() /
                               ("medgate-sharing-keks-" + std::to_string(getpid())));
    std::filesystem::create_directories(*kek_dir_);
    for (const auto& [name, hex] :
         {std::pair{"kek.hex", kKekHex}, {"other-kek.hex", kOtherKekHex}}) {
      const std::string path = *kek_dir_ + "/" + name;
      std::ofstream(path) << hex << "\n";
      std::filesystem::permissions(
          path, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    }
    auto stack = test_support::TestStack::Start(
        {"routing", "consent", "sharing", "audit"},
        absl::StrCat("sharing:\n  kek_file: ", *kek_dir_, "/kek.hex\n  tenant_quotas: {tiny: ",
                     kTinyQuota, "}\n  retention_sweep_seconds: 86400\n"
                     // Anchors only where a test records them (AuditCore::RecordAnchors).
                     "  audit_anchor_seconds: 0\n"));
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = stack->release();
    clusters_ = &stack_->clusters();
    pki_ = &stack_->pki();

    auto directory = test_support::DirectoryServices::Start(*stack_);
    ASSERT_TRUE(directory.ok()) << directory.status();
    directory_ = directory->release();
    routing_ = &directory_->routing();
    consent_ = &directory_->consent();
    // FR and LU data may also be read from DE here (the stack's seed rules allow their own
    // territory only).
    for (const auto& [territory, regions, readable] :
         std::vector<std::tuple<std::string, std::vector<std::string>, std::vector<std::string>>>{
             {"FR", {"fr-1"}, {"FR", "DE"}}, {"LU", {"eu-1", "fr-1"}, {"LU", "DE"}}}) {
      v1::PutResidencyRuleRequest request;
      request.mutable_rule()->set_territory(territory);
      for (const std::string& r : regions) request.mutable_rule()->add_region_ids(r);
      for (const std::string& t : readable)
        request.mutable_rule()->add_readable_from_territories(t);
      v1::PutResidencyRuleResponse response;
      grpc::ClientContext context;
      grpc::Status status =
          RoutingStub(pki_->ops())->PutResidencyRule(&context, request, &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
    }
    for (const auto& [tenant, territories] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{
             {"acme", {"FR", "DE", "BE", "LU"}},
             {"globex", {"FR", "DE", "BE"}},
             {"initech", {"DE"}},
             {"umbrella", {"US"}},
             {"tiny", {"FR"}}}) {
      v1::UpsertTenantRequest request;
      request.set_request_id(absl::StrCat("create-", tenant));
      request.mutable_tenant()->set_tenant_id(tenant);
      request.mutable_tenant()->set_display_name(tenant);
      for (const std::string& t : territories) request.mutable_tenant()->add_territories(t);
      request.mutable_tenant()->set_active(true);
      v1::UpsertTenantResponse response;
      grpc::ClientContext context;
      grpc::Status status = RoutingStub(pki_->ops())->UpsertTenant(&context, request, &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
    }

    SharingServerOptions options;
    options.clock = ServerNow;
    options.key_cache_clock = [] {
      return MonotonicNow() + absl::Microseconds(clock_offset_us.load());
    };
    auto sharing = SharingServer::Create(stack_->config(), options);
    ASSERT_TRUE(sharing.ok()) << sharing.status();
    sharing_ = sharing->release();
    ASSERT_TRUE(sharing_->Start().ok());
    // Until a region's consent feed listens, the cache keeps nothing it loads for it.
    for (consent::ConsentCache* cache : {&consent_->cache(), &sharing_->consent_cache()}) {
      ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
        for (const char* region : {"fr-1", "de-1", "eu-1"}) {
          if (!cache->FeedListening(region)) return false;
        }
        return true;
      }));
    }

    for (const auto& [name, path] : std::vector<std::pair<std::string, std::string>>{
             {"acme-p2", "/tenant/acme/practitioner/p-2"},
             {"acme-p3", "/tenant/acme/practitioner/p-3"},
             {"acme-p4", "/tenant/acme/practitioner/p-4"},
             {"acme-p5", "/tenant/acme/practitioner/p-5"},
             {"acme-p6", "/tenant/acme/practitioner/p-6"},
             {"initech-p", "/tenant/initech/practitioner/i-1"},
             {"umbrella-p", "/tenant/umbrella/practitioner/u-1"},
             {"tiny-p", "/tenant/tiny/practitioner/t-1"},
             {"tiny-app", "/tenant/tiny/app/backend"}}) {
      devpki::LeafOptions options;
      options.common_name = name;
      options.uri_sans = {pki_->SpiffeId(path)};
      auto cert = pki_->Issue(name, options);
      ASSERT_TRUE(cert.ok()) << cert.status();
      certs_->insert_or_assign(name, *cert);  // a repeated suite (--gtest_repeat) has a new PKI
    }
  }

  static void TearDownTestSuite() {
    if (sharing_ != nullptr) sharing_->Shutdown();
    delete sharing_;
    delete directory_;
    delete stack_;
    if (kek_dir_ != nullptr) std::filesystem::remove_all(*kek_dir_);
    delete kek_dir_;
  }

  // The stack's configuration with `from` replaced by `to`, for a second sharing server.
  static std::unique_ptr<MedgateConfig> ConfigWith(const std::string& from, const std::string& to) {
    return ConfigWith({{from, to}});
  }
  // ... with each `from` replaced by its `to`, in turn.
  static std::unique_ptr<MedgateConfig> ConfigWith(
      const std::vector<std::pair<std::string, std::string>>& replacements) {
    const std::string path = stack_->dir() + "/edited.yaml";
    EXPECT_TRUE(stack_->WriteConfig(path).ok());
    std::stringstream yaml;
    yaml << std::ifstream(path).rdbuf();
    std::string text = yaml.str();
    for (const auto& [from, to] : replacements) {
      EXPECT_NE(text.find(from), std::string::npos) << from;
      if (text.find(from) != std::string::npos) text.replace(text.find(from), from.size(), to);
    }
    auto root = ConfigNode::Parse(text);
    EXPECT_TRUE(root.ok()) << root.status();
    auto config = ParseMedgateConfig(*root);
    EXPECT_TRUE(config.ok()) << config.status();
    return std::make_unique<MedgateConfig>(*std::move(config));
  }

  // ... with another key-encryption key.
  static std::unique_ptr<MedgateConfig> ConfigWithOtherKek() {
    return ConfigWith(*kek_dir_ + "/kek.hex", *kek_dir_ + "/other-kek.hex");
  }

  // ... with uploads that may pause at most 1 s between two messages.
  static std::unique_ptr<MedgateConfig> ConfigWithOneSecondUploadIdleTimeout() {
    return ConfigWith("retention_sweep_seconds: 86400",
                      "retention_sweep_seconds: 86400\n  upload_idle_timeout_seconds: 1");
  }

  // A second sharing server on the stack, its sharing section given `settings` too (YAML lines
  // such as "max_uploads_per_tenant: 1"), started. The server keeps a reference to its
  // configuration: both live in one object, the configuration first. `server` is null (and the
  // test has failed) if it did not start.
  struct ExtraSharing {
    std::unique_ptr<MedgateConfig> config;
    std::unique_ptr<SharingServer> server;
  };
  static ExtraSharing StartSharingWith(const std::string& settings) {
    return StartSharingOn(ConfigWith("retention_sweep_seconds: 86400",
                                     absl::StrCat("retention_sweep_seconds: 86400\n  ", settings)));
  }
  // ... on `config` (ConfigWith's, say).
  static ExtraSharing StartSharingOn(std::unique_ptr<MedgateConfig> config,
                                     SharingServerOptions options = {}) {
    ExtraSharing extra;
    extra.config = std::move(config);
    auto server = SharingServer::Create(*extra.config, std::move(options));
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return extra;
    if (absl::Status started = (*server)->Start(); !started.ok()) {
      ADD_FAILURE() << started;
      return extra;
    }
    extra.server = *std::move(server);
    return extra;
  }

  // A second sharing server (StartSharingWith `settings`) holding one record: `size` generated
  // bytes (`seed`) of a new FR patient `ref`, uploaded by the test PKI's practitioner.
  struct ExtraWithRecord {
    ExtraSharing extra;
    UploadSpec spec;
    std::string record;
  };
  static ExtraWithRecord StartSharingWithRecord(const std::string& settings,
                                                const std::string& ref, uint64_t seed,
                                                size_t size) {
    ExtraWithRecord out{StartSharingWith(settings), {}, ""};
    if (out.extra.server == nullptr) return out;
    out.spec.patient_id = Place(ref, "FR");
    out.spec.content = Generate(seed, 0, size);
    out.record = UploadOk(pki_->practitioner(), out.spec, out.extra.server->port());
    return out;
  }

  // A sharing binary's main thread: SIGTERM blocked, waiting for it in RunUntilSignal.
  // Terminate() sends SIGTERM to that thread only, so that no other thread of the test takes it.
  class MainThread {
   public:
    explicit MainThread(SharingServer& server) {
      thread_ = std::thread([this, &server] {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, nullptr);
        waiting_ = true;
        server.RunUntilSignal();
      });
      EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [this] { return waiting_.load(); }));
    }
    ~MainThread() { thread_.join(); }
    void Terminate() { EXPECT_EQ(pthread_kill(thread_.native_handle(), SIGTERM), 0); }

   private:
    std::atomic<bool> waiting_{false};
    std::thread thread_;
  };

  // --- identities and stubs --------------------------------------------------------------------

  static const TestCert& Cert(const std::string& name) { return certs_->at(name); }
  static std::string Id(const std::string& path) { return pki_->SpiffeId(path); }
  // fr-1's key vault refuses to destroy keys (database error MG002) until the returned cleanup
  // runs (or goes out of scope): every key an erasure retires stays queued for the sweep.
  static auto RefuseKeyDestructionInFr1Vault() {
    Exec("fr-1 keys",
         "CREATE FUNCTION refuse_key_delete() RETURNS trigger LANGUAGE plpgsql AS $$ "
         "BEGIN RAISE EXCEPTION USING ERRCODE = 'MG002', MESSAGE = 'injected vault failure'; "
         "END $$");
    Exec("fr-1 keys",
         "CREATE TRIGGER refuse_key_delete BEFORE DELETE ON patient_keys FOR EACH ROW "
         "EXECUTE FUNCTION refuse_key_delete()");
    return absl::Cleanup([] {
      Exec("fr-1 keys", "DROP TRIGGER IF EXISTS refuse_key_delete ON patient_keys");
      Exec("fr-1 keys", "DROP FUNCTION IF EXISTS refuse_key_delete()");
    });
  }
  // fr-1 refuses to delete the records `ids` (database error MG004, as when their erasure cannot
  // be done) until the returned cleanup runs (or goes out of scope).
  static auto RefuseRecordErasureInFr1(const std::vector<std::string>& ids) {
    Exec("fr-1", absl::StrCat("CREATE FUNCTION refuse_record_delete() RETURNS trigger "
                              "LANGUAGE plpgsql AS $$ BEGIN IF OLD.record_id IN ('",
                              absl::StrJoin(ids, "', '"),
                              "') THEN RAISE EXCEPTION USING ERRCODE = 'MG004', "
                              "MESSAGE = 'injected erasure failure'; END IF; "
                              "RETURN OLD; END $$"));
    Exec("fr-1",
         "CREATE TRIGGER refuse_record_delete BEFORE DELETE ON records FOR EACH ROW "
         "EXECUTE FUNCTION refuse_record_delete()");
    return absl::Cleanup([] {
      Exec("fr-1", "DROP TRIGGER IF EXISTS refuse_record_delete ON records");
      Exec("fr-1", "DROP FUNCTION IF EXISTS refuse_record_delete()");
    });
  }
  // A sweep's status: the call's, or the first step that failed in it.
  static absl::Status SweepStatus(const absl::StatusOr<SweepResult>& swept) {
    return swept.ok() ? swept->first_error : swept.status();
  }
  // Sweeps until nothing expired is left from earlier tests, so that the next sweep starts from
  // the region's first expired archive.
  static void DrainRetentionSweeps() {
    bool drained_all = false;
    for (int i = 0; i < 1000 && !drained_all; ++i) {
      absl::StatusOr<SweepResult> drained = sharing_->core().SweepRetention();
      ASSERT_TRUE(SweepStatus(drained).ok()) << SweepStatus(drained);
      drained_all = !drained->more;
    }
    ASSERT_TRUE(drained_all);
  }
  // `n` records of `patient` uploaded by p-1 (contents from seed `seed` on), archived with a
  // retention end long past: what the next retention sweep erases.
  static std::vector<std::string> ExpiredArchives(const std::string& patient, int seed, int n) {
    std::vector<std::string> archives;
    for (int i = 0; i < n; ++i) {
      UploadSpec spec;
      spec.patient_id = patient;
      spec.content = Generate(seed + i, 0, 1000);
      archives.push_back(UploadOk(pki_->practitioner(), spec));
      Exec("fr-1",
           "UPDATE records SET state = 'archived', retain_until = '2001-01-01 00:00:00+00' "
           "WHERE record_id = $1",
           archives.back());
    }
    return archives;
  }
  static std::string P1() { return Id("/tenant/acme/practitioner/p-1"); }
  static std::string P2() { return Id("/tenant/acme/practitioner/p-2"); }
  static std::string P3() { return Id("/tenant/acme/practitioner/p-3"); }

  // A channel to the stack's `service` on `port`.
  static std::shared_ptr<grpc::Channel> Channel(int port, const TestCert& cert,
                                                const std::string& service) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port),
                               TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), 60},
                               Id(absl::StrCat("/service/", service)));
    EXPECT_TRUE(channel.ok());
    return *channel;
  }
  static std::unique_ptr<v1::TenantRouting::Stub> RoutingStub(const TestCert& cert) {
    return v1::TenantRouting::NewStub(Channel(routing_->port(), cert, "routing"));
  }
  static std::unique_ptr<v1::RecordSharing::Stub> Stub(const TestCert& cert, int port = 0) {
    return v1::RecordSharing::NewStub(Channel(port != 0 ? port : sharing_->port(), cert, "sharing"));
  }
  static std::unique_ptr<v1::Audit::Stub> AuditStub(const TestCert& cert) {
    return v1::Audit::NewStub(Channel(sharing_->audit_port(), cert, "audit"));
  }

  // --- routing and consent ---------------------------------------------------------------------

  // Places a patient of `as`'s tenant (acme's app by default) and records the tenant-wide CARE
  // consent its practitioners' uploads and reads rest on, unless `with_care` is false.
  static std::string Place(const std::string& ref, const std::string& territory,
                           const TestCert* as = nullptr, bool with_care = true) {
    const TestCert& who = as != nullptr ? *as : pki_->app();
    v1::PlacePatientRequest request;
    request.set_patient_ref(ref);
    request.set_territory(territory);
    v1::PlacePatientResponse response;
    grpc::ClientContext context;
    grpc::Status status = RoutingStub(who)->PlacePatient(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    if (with_care && status.ok()) {
      GrantConsent(who, response.patient_id(), v1::PURPOSE_CARE, "",
                   absl::StrCat("care-", response.patient_id().substr(0, 40)));
    }
    return response.patient_id();
  }

  // Records a consent through the consent service as `as`; its id.
  static std::string GrantConsent(const TestCert& as, const std::string& patient_id,
                                  v1::Purpose purpose, const std::string& actor,
                                  const std::string& request_id,
                                  const std::vector<std::string>& categories = {}) {
    v1::GrantConsentRequest request;
    request.set_request_id(request_id);
    request.set_patient_id(patient_id);
    request.set_purpose(purpose);
    request.set_actor(actor);
    for (const std::string& c : categories) request.add_categories(c);
    request.set_evidence_ref("signed-form-7");
    v1::GrantConsentResponse response;
    grpc::ClientContext context;
    grpc::Status status = v1::Consent::NewStub(Channel(consent_->port(), as, "consent"))
                              ->GrantConsent(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.consent_id();
  }

  // A tenant-wide RECORD_SHARING consent (or one for `actor` only), through the consent service.
  static std::string GrantSharingConsent(const std::string& patient_id,
                                         const std::string& actor = "") {
    return GrantConsent(pki_->app(), patient_id, v1::PURPOSE_RECORD_SHARING, actor,
                        absl::StrCat("consent-", patient_id.substr(0, 20)));
  }

  static void WithdrawConsent(const std::string& consent_id) {
    v1::RevokeConsentRequest request;
    request.set_consent_id(consent_id);
    request.set_reason("patient withdrew");
    v1::RevokeConsentResponse response;
    grpc::ClientContext context;
    grpc::Status status = v1::Consent::NewStub(Channel(consent_->port(), pki_->app(), "consent"))
                              ->RevokeConsent(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }

  // --- sharing RPCs ----------------------------------------------------------------------------

  static grpc::Status Upload(const TestCert& as, const UploadSpec& spec,
                             v1::UploadRecordResponse* response = nullptr, int port = 0) {
    const uint64_t size = spec.generated_size > 0 ? spec.generated_size : spec.content.size();
    auto piece = [&](uint64_t offset, size_t n) {
      return spec.generated_size > 0 ? Generate(spec.seed, offset, n)
                                     : spec.content.substr(offset, n);
    };
    std::string sha;
    if (spec.declared_sha) {
      sha = *spec.declared_sha;
    } else {
      crypto::Sha256 hasher;
      for (uint64_t off = 0; off < size; off += spec.chunk_bytes) {
        hasher.Update(piece(off, std::min<uint64_t>(spec.chunk_bytes, size - off)));
      }
      sha = hasher.Finish();
    }
    v1::UploadRecordResponse ignored;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    auto stub = Stub(as, port);
    std::unique_ptr<grpc::ClientWriter<v1::UploadRecordRequest>> writer(
        stub->UploadRecord(&context, response != nullptr ? response : &ignored));
    v1::UploadRecordRequest message;
    v1::UploadRecordHeader* header = message.mutable_header();
    static std::atomic<uint64_t> uploads{0};
    header->set_request_id(!spec.request_id.empty()
                               ? spec.request_id
                               : absl::StrCat("upload-test-", uploads.fetch_add(1)));
    header->set_patient_id(spec.patient_id);
    header->set_kind(spec.kind);
    header->set_content_type(spec.content_type);
    header->set_file_name(spec.file_name);
    header->set_size_bytes(spec.declared_size.value_or(size));
    header->set_sha256(sha);
    bool open = true;
    if (spec.send_header) open = writer->Write(message);
    if (open && spec.header_twice) open = writer->Write(message);
    for (uint64_t off = 0; open && off < size; off += spec.chunk_bytes) {
      if (spec.before_chunk) spec.before_chunk(off);
      v1::UploadRecordRequest chunk;
      chunk.mutable_chunk()->set_data(piece(off, std::min<uint64_t>(spec.chunk_bytes, size - off)));
      open = writer->Write(chunk);
    }
    if (open) writer->WritesDone();
    return writer->Finish();
  }

  // Downloads `record_id` as `as`, expecting `content`.
  static void ExpectContent(const TestCert& as, const std::string& record_id,
                            const std::string& content) {
    Downloaded d = Download(as, record_id);
    ASSERT_TRUE(d.status.ok()) << record_id << ": " << d.status.error_message();
    EXPECT_EQ(d.content, content) << record_id;
  }

  // Three records the suite's practitioner uploads for `patient`, of Generate(seed + i, 0,
  // size + i): their ids and contents.
  static std::pair<std::vector<std::string>, std::vector<std::string>> UploadThree(
      const std::string& patient, int seed, int size) {
    std::vector<std::string> ids;
    std::vector<std::string> contents;
    for (int i = 0; i < 3; ++i) {
      UploadSpec spec;
      spec.patient_id = patient;
      spec.content = Generate(seed + i, 0, size + i);
      ids.push_back(UploadOk(pki_->practitioner(), spec));
      contents.push_back(spec.content);
    }
    return {ids, contents};
  }

  // A FR patient of acme (`ref`) with RECORD_SHARING consent, and a record of `content` the
  // suite's practitioner uploaded for it.
  struct ConsentedUpload {
    std::string patient;
    UploadSpec spec;
    std::string record;
  };
  static ConsentedUpload ConsentedRecord(const std::string& ref, const std::string& content) {
    ConsentedUpload out;
    out.patient = Place(ref, "FR");
    GrantSharingConsent(out.patient);
    out.spec.patient_id = out.patient;
    out.spec.content = content;
    out.record = UploadOk(pki_->practitioner(), out.spec);
    return out;
  }

  static std::string UploadOk(const TestCert& as, const UploadSpec& spec, int port = 0) {
    v1::UploadRecordResponse response;
    grpc::Status status = Upload(as, spec, &response, port);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.record_id();
  }

  static Downloaded Download(const TestCert& as, const std::string& record_id,
                             const std::string& break_glass_reason = "", bool keep = true,
                             int port = 0) {
    Downloaded out;
    v1::DownloadRecordRequest request;
    request.set_record_id(record_id);
    request.set_break_glass_reason(break_glass_reason);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    auto stub = Stub(as, port);
    std::unique_ptr<grpc::ClientReader<v1::DownloadRecordResponse>> reader(
        stub->DownloadRecord(&context, request));
    crypto::Sha256 hasher;
    v1::DownloadRecordResponse message;
    while (reader->Read(&message)) {
      if (message.has_header()) {
        EXPECT_FALSE(out.has_header);
        EXPECT_EQ(out.chunks, 0);
        out.has_header = true;
        out.header = message.header();
        continue;
      }
      EXPECT_TRUE(out.has_header);
      EXPECT_LE(message.chunk().data().size(), kMiB);
      hasher.Update(message.chunk().data());
      out.bytes += message.chunk().data().size();
      if (keep) out.content += message.chunk().data();
      ++out.chunks;
    }
    out.sha256 = hasher.Finish();
    out.status = reader->Finish();
    return out;
  }

  // A download whose client reads the header and then nothing: on its own connection with a
  // small window, so the service soon waits to send and the download stays in progress.
  struct Stalled {
    std::unique_ptr<v1::RecordSharing::Stub> stub;
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::DownloadRecordResponse>> reader;
  };
  static std::unique_ptr<Stalled> StalledDownload(const TestCert& as, const std::string& record_id,
                                                  int port = 0) {
    auto creds = MakeChannelCredentials(TlsConfig{as.cert_path, as.key_path, pki_->ca_path(), 60},
                                        Id("/service/sharing"));
    EXPECT_TRUE(creds.ok()) << creds.status();
    auto s = std::make_unique<Stalled>();
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
    s->stub = v1::RecordSharing::NewStub(grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", port != 0 ? port : sharing_->port()), *creds, args));
    s->context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    v1::DownloadRecordRequest request;
    request.set_record_id(record_id);
    s->reader = s->stub->DownloadRecord(&s->context, request);
    return s;
  }

  static absl::StatusOr<v1::ShareRecordResponse> Share(const TestCert& as,
                                                       const std::string& record_id,
                                                       const std::string& grantee,
                                                       absl::Time expires_at) {
    v1::ShareRecordRequest request;
    request.set_request_id("share-test");
    request.set_record_id(record_id);
    request.set_grantee(grantee);
    *request.mutable_expires_at() = ToProtoTimestamp(expires_at);
    v1::ShareRecordResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->ShareRecord(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::RevokeShareResponse> RevokeByGrantee(const TestCert& as,
                                                                 const std::string& record_id,
                                                                 const std::string& grantee) {
    v1::RevokeShareRequest request;
    request.mutable_record_grantee()->set_record_id(record_id);
    request.mutable_record_grantee()->set_grantee(grantee);
    v1::RevokeShareResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->RevokeShare(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::RevokeShareResponse> RevokeById(const TestCert& as,
                                                            const std::string& grant_id) {
    v1::RevokeShareRequest request;
    request.set_grant_id(grant_id);
    v1::RevokeShareResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->RevokeShare(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::ListRecordsResponse> List(
      const TestCert& as, v1::RecordScope scope, const std::string& patient_id = "",
      int page_size = 0, const std::string& token = "", bool include_archived = false,
      v1::RecordKind kind = v1::RECORD_KIND_UNSPECIFIED) {
    v1::ListRecordsRequest request;
    request.set_scope(scope);
    request.set_patient_id(patient_id);
    request.set_page_size(page_size);
    request.set_page_token(token);
    request.set_include_archived(include_archived);
    request.set_kind(kind);
    v1::ListRecordsResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->ListRecords(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  // ShareRecord, asked again until it succeeds (the consent just recorded reaches the sharing
  // service's cache within moments); the last answer.
  static absl::StatusOr<v1::ShareRecordResponse> ShareOnceConsented(const TestCert& as,
                                                                    const std::string& record_id,
                                                                    const std::string& grantee,
                                                                    absl::Time expires_at) {
    absl::StatusOr<v1::ShareRecordResponse> shared;
    PollUntil(absl::Now() + kPatience, [&] {
      shared = Share(as, record_id, grantee, expires_at);
      return shared.ok();
    });
    return shared;
  }

  static std::vector<std::string> ListedIds(const TestCert& as, v1::RecordScope scope,
                                            const std::string& patient_id = "") {
    std::vector<std::string> ids;
    auto listed = List(as, scope, patient_id, 1000);
    EXPECT_TRUE(listed.ok()) << listed.status();
    if (listed.ok()) {
      for (const v1::Record& r : listed->records()) ids.push_back(r.record_id());
    }
    return ids;
  }

  static absl::StatusOr<v1::ArchiveRecordResponse> Archive(const TestCert& as,
                                                           const std::string& record_id,
                                                           absl::Time retain_until) {
    v1::ArchiveRecordRequest request;
    request.set_record_id(record_id);
    *request.mutable_retain_until() = ToProtoTimestamp(retain_until);
    v1::ArchiveRecordResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->ArchiveRecord(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::EraseRecordResponse> Erase(
      const TestCert& as, const std::string& record_id,
      const std::string& reason = "no longer needed") {
    v1::EraseRecordRequest request;
    request.set_record_id(record_id);
    request.set_reason(reason);
    v1::EraseRecordResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as)->EraseRecord(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  static absl::StatusOr<v1::ErasePatientRecordsResponse> ErasePatient(
      const TestCert& as, const std::string& patient_id, int port = 0) {
    v1::ErasePatientRecordsRequest request;
    request.set_patient_id(patient_id);
    request.set_reason("GDPR art. 17 request");
    v1::ErasePatientRecordsResponse response;
    grpc::ClientContext context;
    grpc::Status status = Stub(as, port)->ErasePatientRecords(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  // Audit.PatientDataReport as `as`, request id "data-report-test", of the suite's sharing
  // server or the one whose audit service is on `port`.
  static absl::StatusOr<v1::PatientDataReportResponse> DataReport(const TestCert& as,
                                                                  const std::string& patient_id,
                                                                  int port = 0) {
    v1::PatientDataReportRequest request;
    request.set_patient_id(patient_id);
    request.set_request_id("data-report-test");
    v1::PatientDataReportResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    grpc::Status status =
        v1::Audit::NewStub(Channel(port != 0 ? port : sharing_->audit_port(), as, "audit"))
            ->PatientDataReport(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  // One ExportPatientRecords call: what it sent, record by record.
  struct Exported {
    grpc::Status status;
    std::vector<v1::ExportedRecord> records;
    std::map<std::string, std::string> contents;  // by record id
    int largest_content_message = 0;
    bool page_end = false;
    v1::ExportPageEnd end;
  };
  static Exported Export(const TestCert& as, const std::string& patient_id,
                         const std::string& reason, int page_size = 0,
                         const std::string& page_token = "",
                         const std::string& request_id = "export-test") {
    v1::ExportPatientRecordsRequest request;
    request.set_request_id(request_id);
    request.set_patient_id(patient_id);
    request.set_reason(reason);
    request.set_page_size(page_size);
    request.set_page_token(page_token);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    auto stub = Stub(as);
    std::unique_ptr<grpc::ClientReader<v1::ExportPatientRecordsResponse>> reader(
        stub->ExportPatientRecords(&context, request));
    Exported out;
    v1::ExportPatientRecordsResponse message;
    while (reader->Read(&message)) {
      EXPECT_FALSE(out.page_end) << "a message after the page end";
      if (message.has_record()) {
        out.records.push_back(message.record());
        out.contents[message.record().record_id()];
      } else if (message.has_content()) {
        EXPECT_FALSE(out.records.empty()) << "content before its record";
        if (out.records.empty()) continue;
        out.contents[out.records.back().record_id()] += message.content();
        out.largest_content_message =
            std::max(out.largest_content_message, static_cast<int>(message.content().size()));
      } else {
        EXPECT_TRUE(message.has_page_end());
        out.page_end = true;
        out.end = message.page_end();
      }
    }
    out.status = reader->Finish();
    return out;
  }

  static absl::StatusOr<v1::QueryAuditResponse> QueryAudit(const TestCert& as,
                                                           v1::QueryAuditRequest request) {
    v1::QueryAuditResponse response;
    grpc::ClientContext context;
    grpc::Status status = AuditStub(as)->QueryAudit(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  // A download by `as` of `record_id` whose reader's flow-control window stays small, so the
  // service cannot send far ahead of what it reads: what happens meanwhile reaches it mid-way.
  class SlowDownload {
   public:
    SlowDownload(const TestCert& as, const std::string& record_id) {
      auto creds = MakeChannelCredentials(TlsConfig{as.cert_path, as.key_path, pki_->ca_path(), 60},
                                          Id("/service/sharing"));
      EXPECT_TRUE(creds.ok()) << creds.status();
      if (!creds.ok()) return;
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
      args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
      stub_ = v1::RecordSharing::NewStub(grpc::CreateCustomChannel(
          absl::StrCat("127.0.0.1:", sharing_->port()), *creds, args));
      v1::DownloadRecordRequest request;
      request.set_record_id(record_id);
      context_.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
      reader_ = stub_->DownloadRecord(&context_, request);
    }
    // Reads the header and the first chunk; false if they did not come.
    bool ReadFirstChunk() {
      v1::DownloadRecordResponse message;
      if (reader_ == nullptr || !reader_->Read(&message) || !message.has_header()) return false;
      if (!reader_->Read(&message) || !message.has_chunk()) return false;
      received = message.chunk().data();
      return true;
    }
    // Reads one more chunk; false if it did not come.
    bool ReadChunk() {
      v1::DownloadRecordResponse message;
      if (!reader_->Read(&message) || !message.has_chunk()) return false;
      received += message.chunk().data();
      return true;
    }
    // Reads to the end; how the download ended.
    grpc::Status ReadTheRest() {
      v1::DownloadRecordResponse message;
      while (reader_->Read(&message)) received += message.chunk().data();
      return reader_->Finish();
    }

    std::string received;  // the content received so far

   private:
    std::unique_ptr<v1::RecordSharing::Stub> stub_;
    grpc::ClientContext context_;
    std::unique_ptr<grpc::ClientReader<v1::DownloadRecordResponse>> reader_;
  };

  static std::vector<v1::AuditEntry> PatientAudit(const std::string& patient_id) {
    v1::QueryAuditRequest request;
    request.set_patient_id(patient_id);
    request.set_page_size(1000);
    auto response = QueryAudit(pki_->app(), request);
    EXPECT_TRUE(response.ok()) << response.status();
    if (!response.ok()) return {};
    return {response->entries().begin(), response->entries().end()};
  }

  static absl::StatusOr<v1::VerifyChainResponse> Verify(const std::string& region,
                                                        const TestCert* as = nullptr,
                                                        uint64_t start_seq = 0,
                                                        uint64_t end_seq = 0,
                                                        uint64_t anchor_seq = 0,
                                                        const std::string& anchor_hash = "") {
    v1::VerifyChainRequest request;
    request.set_start_seq(start_seq);
    request.set_end_seq(end_seq);
    request.set_anchor_seq(anchor_seq);
    request.set_anchor_hash(anchor_hash);
    if (region == "control") {
      request.mutable_log()->set_control(true);
    } else {
      request.mutable_log()->set_region_id(region);
    }
    v1::VerifyChainResponse response;
    grpc::ClientContext context;
    // A walk that waits (behind a lock a test holds) fails the test instead of hanging it.
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    grpc::Status status =
        AuditStub(as != nullptr ? *as : pki_->ops())->VerifyChain(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  // A walk of de-1's log by ops, on a thread of its own, whose first read (the chain's head)
  // waits behind an exclusive lock on audit_head, taken first, until End().
  class WalkBehindALock {
   public:
    WalkBehindALock() : locker_(Db("de-1").ConnectionString()), lock_(locker_) {
      lock_.exec0("LOCK TABLE audit_head IN ACCESS EXCLUSIVE MODE");
      request_.mutable_log()->set_region_id("de-1");
      call_ = std::thread(
          [this] { status_ = AuditStub(pki_->ops())->VerifyChain(&context_, request_, &response_); });
    }
    ~WalkBehindALock() { End(); }
    // Whether the walk came to wait behind the lock.
    bool Waiting() {
      return PollUntil(absl::Now() + kPatience, [] {
        return Count("de-1",
                     "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND query LIKE '%audit_head%'") > 0;
      });
    }
    void Cancel() { context_.TryCancel(); }
    // Releases the lock and waits for the call's end.
    void End() {
      if (!call_.joinable()) return;
      lock_.abort();
      call_.join();
    }
    const grpc::Status& status() const { return status_; }
    const v1::VerifyChainResponse& response() const { return response_; }

   private:
    pqxx::connection locker_;
    pqxx::work lock_;
    v1::VerifyChainRequest request_;
    grpc::ClientContext context_;
    v1::VerifyChainResponse response_;
    grpc::Status status_;
    std::thread call_;
  };

  // --- direct database access ------------------------------------------------------------------

  // Keeps the reasons of `object_id`'s audit entries in `db` (whose update trigger the caller has
  // disabled to alter them); run, the returned cleanup puts them back as they were and enables
  // the trigger again.
  static auto PutBackReasonsAfter(const std::string& db, const std::string& object_id) {
    Exec(db, "CREATE TABLE reasons_kept AS SELECT seq, reason FROM audit_log WHERE object_id = $1",
         object_id);
    return absl::Cleanup([db] {
      Exec(db, "UPDATE audit_log a SET reason = k.reason FROM reasons_kept k WHERE a.seq = k.seq");
      Exec(db, "DROP TABLE reasons_kept");
      Exec(db, "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update");
    });
  }

  static PgCluster& Db(const std::string& name) {
    return name == "control" ? clusters_->control() : clusters_->region(name);
  }

  // `db`: "control", a region's shard ("fr-1"), or a region's key vault ("fr-1 keys").
  static std::string ConnInfo(const std::string& db) {
    const size_t space = db.find(' ');
    if (space == std::string::npos) return Db(db).ConnectionString();
    return Db(db.substr(0, space)).ConnectionString(test_support::kKeysDatabase);
  }

  static int64_t Count(const std::string& db, const std::string& sql, const std::string& arg = "") {
    pqxx::connection c(ConnInfo(db));
    pqxx::nontransaction q(c);
    return arg.empty() ? q.exec1(sql)[0].as<int64_t>() : q.exec_params1(sql, arg)[0].as<int64_t>();
  }

  static std::string Text(const std::string& db, const std::string& sql) {
    pqxx::connection c(ConnInfo(db));
    pqxx::nontransaction q(c);
    return q.exec1(sql)[0].c_str();
  }

  // Cuts `db`'s audit log short after entry `cut` and moves its head back, as someone able to
  // write the database could: every entry left still links to the one before. The function
  // returned puts back the tail and the head as they were (the suite's other tests verify the
  // log too), removing whatever was appended meanwhile.
  static std::function<void()> CutLogShort(const std::string& db, int64_t cut) {
    Exec(db, "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
    Exec(db, "CREATE TABLE tail_kept AS SELECT * FROM audit_log WHERE seq > $1::bigint",
         std::to_string(cut));
    Exec(db, "CREATE TABLE head_kept AS SELECT * FROM audit_head");
    Exec(db, "DELETE FROM audit_log WHERE seq > $1::bigint", std::to_string(cut));
    Exec(db, "UPDATE audit_head SET seq = $1::bigint, hash = (SELECT hash FROM audit_log "
             "WHERE seq = $1::bigint)", std::to_string(cut));
    return [db] {
      Exec(db, "DELETE FROM audit_log WHERE seq > (SELECT min(seq) - 1 FROM tail_kept)");
      Exec(db, "INSERT INTO audit_log SELECT * FROM tail_kept");
      Exec(db, "UPDATE audit_head SET seq = k.seq, hash = k.hash FROM head_kept k");
      Exec(db, "DROP TABLE tail_kept, head_kept");
      Exec(db, "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update");
    };
  }

  // The rows of share_grants (active or revoked) of `record` in fr-1 for `grantee`.
  static int64_t GrantRows(const std::string& record, const std::string& grantee) {
    pqxx::connection c(ConnInfo("fr-1"));
    pqxx::nontransaction q(c);
    return q
        .exec_params1("SELECT count(*) FROM share_grants WHERE record_id = $1 AND grantee = $2",
                      record, grantee)[0]
        .as<int64_t>();
  }

  static void Exec(const std::string& db, const std::string& sql, const std::string& arg = "") {
    pqxx::connection c(ConnInfo(db));
    pqxx::work txn(c);
    if (arg.empty()) {
      txn.exec0(sql);
    } else {
      txn.exec_params0(sql, arg);
    }
    txn.commit();
  }

  // Sessions of `db` waiting for a lock in a statement like `query` (a LIKE pattern).
  // Stores a record of kKeyCachingBytes for `patient` through the sharing server on `port` (0:
  // the stack's), which then holds the patient's key: its next one-chunk upload for the patient
  // is one statement. Whether it was stored.
  static constexpr int64_t kKeyCachingBytes = 24;
  static bool CachePatientKey(const std::string& patient, int port = 0) {
    UploadSpec warm;
    warm.patient_id = patient;
    warm.content = std::string(kKeyCachingBytes, 'k');
    return !UploadOk(pki_->practitioner(), warm, port).empty();
  }
  // A tenant's usage in `region`, as an upload's quota check reads it (shard migration 0024).
  static int64_t TenantUsage(const std::string& region, const std::string& tenant) {
    return Count(region, "SELECT medgate_lock_tenant_usage($1)", tenant);
  }

  static int64_t LockWaits(const std::string& db, const std::string& query) {
    return Count(db,
                 "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                 "datname = current_database() AND query LIKE $1",
                 query);
  }
  // An upload's record statement (sql.h, kFinishUpload), by what comes early in its text:
  // pg_stat_activity keeps a query's first 1024 bytes only, and its audit_append comes later.
  static constexpr char kRecordStatementQuery[] = "%medgate_lock_tenant_usage(%INSERT INTO records%";
  // An erasure's lock on a patient key (sql.h, kLockPatientKey).
  static constexpr char kPatientKeyLockQuery[] =
      "%FROM record_keys WHERE patient_id = $1 AND record_id IS NULL FOR UPDATE";

  // Sessions of `db` idle inside an upload's transaction, between two of its chunks.
  static std::vector<int> IdleUploadSessions(const std::string& db) {
    pqxx::connection c(Db(db).ConnectionString());
    pqxx::nontransaction q(c);
    std::vector<int> pids;
    for (const pqxx::row& row :
         q.exec("SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query LIKE 'INSERT INTO record_chunks%'")) {
      pids.push_back(row[0].as<int>());
    }
    return pids;
  }

  // The one upload session idle in a transaction in `db` that is not among `before` (sessions of
  // earlier tests may still be ending), or 0 while there is not exactly one.
  static int NewIdleUploadSession(const std::string& db, const std::vector<int>& before) {
    int found = 0;
    for (int pid : IdleUploadSessions(db)) {
      if (std::find(before.begin(), before.end(), pid) != before.end()) continue;
      if (found != 0) return 0;
      found = pid;
    }
    return found;
  }

  // The state of session `pid` of `db` ("idle", "active", "idle in transaction"...); empty once
  // the session has ended.
  static std::string SessionState(const std::string& db, int pid) {
    pqxx::connection c(Db(db).ConnectionString());
    pqxx::nontransaction q(c);
    pqxx::result rows = q.exec_params("SELECT state FROM pg_stat_activity WHERE pid = $1", pid);
    return rows.empty() || rows[0][0].is_null() ? std::string() : rows[0][0].as<std::string>();
  }

  // Tenants of `db` whose usage (what the quota reads: the count and the changes not yet folded
  // into it) is not the sum of their records.
  static int64_t UsageCountsOff(const std::string& db) {
    return Count(db,
                 "SELECT count(*) FROM (SELECT tenant_id, sum(size_bytes) AS bytes FROM records "
                 "GROUP BY tenant_id) r FULL JOIN (SELECT tenant_id, sum(bytes) AS bytes FROM "
                 "(SELECT tenant_id, bytes FROM tenant_record_usage UNION ALL "
                 "SELECT tenant_id, bytes FROM tenant_record_usage_changes) AS a "
                 "GROUP BY tenant_id) u USING (tenant_id) "
                 "WHERE coalesce(r.bytes, 0) <> coalesce(u.bytes, 0)");
  }

  // Rows that an upload creates, in every shard, patient keys included.
  static int64_t StoredRows() {
    int64_t total = 0;
    for (const char* region : {"fr-1", "de-1", "eu-1"}) {
      total += Count(region,
                     "SELECT (SELECT count(*) FROM records) + (SELECT count(*) FROM record_chunks) "
                     "+ (SELECT count(*) FROM record_keys)");
    }
    return total;
  }

  static bool HasEntry(const std::vector<v1::AuditEntry>& entries, const std::string& actor,
                       v1::AuditAction action, const std::string& object_id,
                       const std::string& reason) {
    for (const v1::AuditEntry& e : entries) {
      if (e.actor() == actor && e.action() == action && e.object_id() == object_id &&
          e.reason() == reason) {
        return true;
      }
    }
    return false;
  }

  static test_support::TestStack* stack_;
  static std::string* kek_dir_;
  static PgClusterSet* clusters_;
  static TestPki* pki_;
  static std::map<std::string, TestCert>* certs_;
  static test_support::DirectoryServices* directory_;
  static routing::RoutingServer* routing_;  // directory_'s
  static consent::ConsentServer* consent_;  // directory_'s
  static SharingServer* sharing_;
};

test_support::TestStack* SharingTest::stack_ = nullptr;
std::string* SharingTest::kek_dir_ = nullptr;
PgClusterSet* SharingTest::clusters_ = nullptr;
TestPki* SharingTest::pki_ = nullptr;
std::map<std::string, TestCert>* SharingTest::certs_ = new std::map<std::string, TestCert>();
test_support::DirectoryServices* SharingTest::directory_ = nullptr;
routing::RoutingServer* SharingTest::routing_ = nullptr;
consent::ConsentServer* SharingTest::consent_ = nullptr;
SharingServer* SharingTest::sharing_ = nullptr;

// --- uploads and downloads ---------------------------------------------------------------------

TEST_F(SharingTest, UploadDownloadRoundTripAndTheShardHoldsOnlyCiphertext) {
  const std::string patient = Place("roundtrip-1", "FR");
  std::string content;
  while (content.size() < 2 * kMiB + 12345) content += "MEDGATE-PLAINTEXT-MARKER discharge letter ";
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = content;
  spec.chunk_bytes = 100 * 1000;  // the server re-chunks to 1 MiB storage chunks
  v1::UploadRecordResponse uploaded;
  ASSERT_TRUE(Upload(pki_->practitioner(), spec, &uploaded).ok());
  EXPECT_EQ(uploaded.size_bytes(), content.size());
  EXPECT_EQ(uploaded.sha256(), Sha(content));
  const std::string record = uploaded.record_id();

  Downloaded d = Download(pki_->practitioner(), record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, content);
  EXPECT_EQ(d.chunks, 3);
  EXPECT_EQ(d.header.record_id(), record);
  EXPECT_EQ(d.header.patient_id(), patient);
  EXPECT_EQ(d.header.size_bytes(), content.size());
  EXPECT_EQ(d.header.sha256(), Sha(content));
  EXPECT_EQ(d.header.owner(), P1());
  EXPECT_EQ(d.header.kind(), v1::RECORD_KIND_DOCUMENT);
  EXPECT_EQ(d.header.file_name(), "letter.pdf");
  EXPECT_EQ(d.header.state(), v1::RECORD_STATE_ACTIVE);

  // Storage chunks of exactly 1 MiB, ciphertext only: no marker anywhere in the shard.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks WHERE record_id = $1", record), 3);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_chunks WHERE record_id = $1 AND "
                  "length(ciphertext) = 1048576 + 29",
                  record),
            2);
  for (const char* table : {"record_chunks", "record_keys", "records", "audit_log"}) {
    EXPECT_EQ(Count("fr-1",
                    absl::StrCat("SELECT count(*) FROM ", table,
                                 " t WHERE position(convert_to($1, 'UTF8') in "
                                 "convert_to(t::text, 'UTF8')) > 0"),
                    "PLAINTEXT-MARKER"),
              0)
        << table;
  }
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_chunks WHERE position(convert_to($1, 'UTF8') in "
                  "ciphertext) > 0",
                  "PLAINTEXT-MARKER"),
            0);
  // Data keys are stored only wrapped: a patient key and a record key, neither 32 raw bytes.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 2);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys WHERE patient_id = $1 AND "
                  "length(wrapped_key) = 32",
                  patient),
            0);
}

// The latest grant of a record to a grantee, read on every grantee download, re-share and
// revocation by grantee, whatever the grants' states (so the partial indexes of unrevoked grants
// cannot serve it), and a record's erasure cascading to its grants, go through an index of a
// record's grants: with sequential scans priced out, the plans use it.
TEST_F(SharingTest, GrantLookUpsByRecordUseAnIndex) {
  const pg::Statement* latest = nullptr;
  for (const pg::Statement& s : sql::ShardStatements()) {
    if (std::string(s.name) == sql::kSelectLatestGrant) latest = &s;
  }
  ASSERT_NE(latest, nullptr);
  pqxx::connection c(ConnInfo("fr-1"));
  pqxx::work txn(c);
  txn.exec0("SET LOCAL enable_seqscan = off");
  auto plan = [&](const std::string& query) {
    std::string text;
    for (const pqxx::row& row : txn.exec(query)) text += row[0].as<std::string>() + "\n";
    return text;
  };
  txn.exec0(absl::StrCat("PREPARE latest_grant(text, text) AS ", latest->sql));
  EXPECT_THAT(plan("EXPLAIN EXECUTE latest_grant('fr-1.r0', 'spiffe://medgate.test/x')"),
              HasSubstr("share_grants_by_record"));
  EXPECT_THAT(plan("EXPLAIN DELETE FROM share_grants WHERE record_id = 'fr-1.r0'"),
              HasSubstr("share_grants_by_record"));
}

TEST_F(SharingTest, FileNameAndContentTypeAreStoredSealedUnderTheRecordKey) {
  const std::string patient = Place("sealed-names-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(51, 0, 2000);
  spec.file_name = "NAME-MARKER Dupont oncology referral.pdf";
  spec.content_type = "application/x-type-marker";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  spec.file_name = "second.pdf";
  const std::string other = UploadOk(pki_->practitioner(), spec);

  // Neither appears in the shard, in any table, as text or as bytes.
  for (const char* table : {"records", "record_keys", "record_chunks", "share_grants", "audit_log"}) {
    for (const char* marker : {"NAME-MARKER", "type-marker"}) {
      EXPECT_EQ(Count("fr-1",
                      absl::StrCat("SELECT count(*) FROM ", table,
                                   " t WHERE position(convert_to($1, 'UTF8') in "
                                   "convert_to(t::text, 'UTF8')) > 0"),
                      marker),
                0)
          << table << " " << marker;
    }
  }
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM records WHERE position(convert_to($1, 'UTF8') in "
                  "file_name_sealed || content_type_sealed) > 0",
                  "MARKER"),
            0);
  // Nor does the content's SHA-256: sealed too, it cannot confirm a guessed document.
  const std::string content_sha_hex = absl::BytesToHexString(Sha(spec.content));
  EXPECT_EQ(Count("fr-1",
                  absl::StrCat("SELECT count(*) FROM records WHERE patient_id = $1 AND (sha256 IS "
                               "NOT NULL OR position(decode('", content_sha_hex,
                               "', 'hex') in sha256_sealed) > 0 OR length(sha256_sealed) <> ",
                               32 + crypto::kSealOverheadBytes, ")"),
                  patient),
            0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 2);
  // Sealed: exactly the name's length plus the seal's version byte, nonce and tag.
  EXPECT_EQ(Count("fr-1",
                  absl::StrCat("SELECT count(*) FROM records WHERE record_id = $1 AND file_name IS "
                               "NULL AND content_type IS NULL AND length(file_name_sealed) = ",
                               crypto::kSealOverheadBytes +
                                   std::string("NAME-MARKER Dupont oncology referral.pdf").size()),
                  record),
            1);

  // Who may read the record reads them in clear: listing, download, archive.
  auto listed = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient, 10);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->records_size(), 2);
  EXPECT_EQ(listed->records(1).record_id(), record);
  EXPECT_EQ(listed->records(1).file_name(), "NAME-MARKER Dupont oncology referral.pdf");
  EXPECT_EQ(listed->records(1).content_type(), "application/x-type-marker");
  EXPECT_EQ(listed->records(1).sha256(), Sha(spec.content));
  Downloaded d = Download(pki_->practitioner(), record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.header.file_name(), "NAME-MARKER Dupont oncology referral.pdf");
  EXPECT_EQ(d.header.content_type(), "application/x-type-marker");
  auto archived = Archive(pki_->practitioner(), other, ServerNow() + absl::Hours(24 * 365));
  ASSERT_TRUE(archived.ok()) << archived.status();
  EXPECT_EQ(archived->record().file_name(), "second.pdf");

  // A sealed value moved to the other field, or to another record, does not open: the record is
  // listed as damaged, named, with nothing of its metadata shown; the other record as it is.
  Exec("fr-1",
       "UPDATE records SET file_name_sealed = content_type_sealed, content_type_sealed = "
       "file_name_sealed WHERE record_id = $1",
       record);
  auto swapped = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient, 10, "", true);
  ASSERT_TRUE(swapped.ok()) << swapped.status();
  ASSERT_EQ(swapped->records_size(), 2);
  for (const v1::Record& r : swapped->records()) {
    if (r.record_id() == record) {
      EXPECT_THAT(r.damaged(), HasSubstr(record));
      EXPECT_EQ(r.file_name(), "");
      EXPECT_EQ(r.content_type(), "");
    } else {
      EXPECT_EQ(r.damaged(), "");
      EXPECT_EQ(r.file_name(), "second.pdf");
    }
  }
  Downloaded refused = Download(pki_->practitioner(), record);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_FALSE(refused.has_header);
  Exec("fr-1",
       "UPDATE records SET file_name_sealed = content_type_sealed, content_type_sealed = "
       "file_name_sealed WHERE record_id = $1",
       record);
  Exec("fr-1",
       "UPDATE records r SET file_name_sealed = o.file_name_sealed FROM records o "
       "WHERE r.record_id = $1 AND o.record_id <> r.record_id AND o.patient_id = r.patient_id",
       record);
  EXPECT_EQ(Download(pki_->practitioner(), record).status.error_code(),
            grpc::StatusCode::DATA_LOSS);

  // A record written before metadata was sealed (clear columns) reads as before, and the sweep
  // seals it, even when other such records cannot be sealed (their key is gone) and come before
  // it in the sweep's order (record id), with a batch of one record.
  Exec("fr-1", "DELETE FROM record_keys WHERE record_id = $1", record);  // left damaged above
  Exec("fr-1", "DELETE FROM records WHERE record_id = $1", record);
  spec.file_name = "legacy.pdf";
  std::vector<std::string> legacy_ids;
  for (int i = 0; i < 3; ++i) legacy_ids.push_back(UploadOk(pki_->practitioner(), spec));
  std::sort(legacy_ids.begin(), legacy_ids.end());
  const std::string good = legacy_ids.back();
  const std::vector<std::string> damaged(legacy_ids.begin(), legacy_ids.end() - 1);
  for (const std::string& id : legacy_ids) {
    Exec("fr-1",
         absl::StrCat("UPDATE records SET file_name = 'legacy name.pdf', content_type = "
                      "'text/plain', sha256 = decode('", absl::BytesToHexString(Sha(spec.content)),
                      "', 'hex'), file_name_sealed = NULL, content_type_sealed = NULL, "
                      "sha256_sealed = NULL WHERE record_id = $1"),
         id);
  }
  for (const std::string& id : damaged) {
    Exec("fr-1", "DELETE FROM record_keys WHERE record_id = $1", id);
  }
  auto legacy = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient, 10);
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  ASSERT_EQ(legacy->records_size(), 3);  // the archived one is not listed
  int legacy_listed = 0;
  for (const v1::Record& r : legacy->records()) {
    if (std::find(legacy_ids.begin(), legacy_ids.end(), r.record_id()) == legacy_ids.end()) continue;
    ++legacy_listed;
    EXPECT_EQ(r.file_name(), "legacy name.pdf");
    EXPECT_EQ(r.sha256(), Sha(spec.content));
  }
  EXPECT_EQ(legacy_listed, 3);
  auto swept = sharing_->core().SweepRetention(/*batch=*/1);
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(swept->sealed_metadata, 1);
  EXPECT_TRUE(swept->more);  // a full batch was sealed: the caller sweeps again
  const std::string in_clear =
      "SELECT count(*) FROM records WHERE record_id = $1 AND (file_name IS NOT NULL OR "
      "content_type IS NOT NULL OR sha256 IS NOT NULL OR file_name_sealed IS NULL OR "
      "content_type_sealed IS NULL OR sha256_sealed IS NULL)";
  EXPECT_EQ(Count("fr-1", in_clear, good), 0);
  for (const std::string& id : damaged) EXPECT_EQ(Count("fr-1", in_clear, id), 1);
  // Nothing left that can be sealed: the next sweep seals nothing.
  swept = sharing_->core().SweepRetention(/*batch=*/1);
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(swept->sealed_metadata, 0);
  for (const std::string& id : damaged) {
    Exec("fr-1", "DELETE FROM records WHERE record_id = $1", id);
  }
  Downloaded resealed = Download(pki_->practitioner(), good);
  ASSERT_TRUE(resealed.status.ok()) << resealed.status.error_message();
  EXPECT_EQ(resealed.header.file_name(), "legacy name.pdf");
  EXPECT_EQ(resealed.header.content_type(), "text/plain");
  EXPECT_EQ(resealed.header.sha256(), Sha(spec.content));
  EXPECT_EQ(resealed.sha256, Sha(spec.content));  // the download's own check passed on it
}

// Routing, consent and sharing (and the audit server) reach the databases as their own roles:
// once the test's own connections have closed, no connection of the schema owner is left, and the
// key vault is reached by sharing alone.
TEST_F(SharingTest, EveryServiceConnectsAsItsOwnDatabaseRole) {
  const std::string patient = Place("roles-1", "FR");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(8, 0, 1000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());
  std::set<std::string> control;
  std::set<std::string> fr;
  const bool no_owner = PollUntil(absl::Now() + kPatience, [&] {
    control = Db("control").ClientConnections();
    fr = Db("fr-1").ClientConnections();
    return control.count("medgate medgate") == 0 && fr.count("medgate medgate") == 0 &&
           fr.count("medgate_keys medgate") == 0;
  });
  EXPECT_TRUE(no_owner) << "control: " << absl::StrJoin(control, ", ")
                        << "; fr-1: " << absl::StrJoin(fr, ", ");
  EXPECT_TRUE(control.count("medgate medgate_routing")) << absl::StrJoin(control, ", ");
  EXPECT_TRUE(control.count("medgate medgate_sharing")) << absl::StrJoin(control, ", ");
  EXPECT_TRUE(fr.count("medgate medgate_consent")) << absl::StrJoin(fr, ", ");
  EXPECT_TRUE(fr.count("medgate medgate_sharing")) << absl::StrJoin(fr, ", ");
  for (const std::string& entry : fr) {
    if (entry.rfind("medgate_keys ", 0) == 0) {
      EXPECT_EQ(entry, "medgate_keys medgate_sharing");
    }
  }
  EXPECT_TRUE(fr.count("medgate_keys medgate_sharing")) << absl::StrJoin(fr, ", ");
}

TEST_F(SharingTest, FrPatientsRecordExistsOnlyInFr1) {
  const std::string patient = Place("residency-fr-1", "FR");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(7, 0, kMiB + 10);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  EXPECT_EQ(record.rfind("fr-1.", 0), 0u) << record;
  ASSERT_TRUE(Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1)).ok());
  ASSERT_TRUE(Download(Cert("acme-p2"), record).status.ok());

  const std::string everything =
      "SELECT (SELECT count(*) FROM records WHERE record_id = $1 OR patient_id = $1) + "
      "(SELECT count(*) FROM record_chunks WHERE record_id = $1) + "
      "(SELECT count(*) FROM record_keys WHERE record_id = $1 OR patient_id = $1) + "
      "(SELECT count(*) FROM share_grants WHERE record_id = $1) + "
      "(SELECT count(*) FROM audit_log WHERE object_id = $1 OR patient_id = $1 OR "
      "reason LIKE '%' || $1 || '%')";
  for (const char* region : {"de-1", "eu-1"}) {
    EXPECT_EQ(Count(region, everything, record), 0) << region;
    EXPECT_EQ(Count(region, everything, patient), 0) << region;
  }
  EXPECT_EQ(
      Count("control",
            "SELECT count(*) FROM audit_log WHERE object_id = $1 OR reason LIKE '%' || $1 || '%'",
            record),
      0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", record), 1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks WHERE record_id = $1", record), 2);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM share_grants WHERE record_id = $1", record), 1);
  // Upload, share, two reads.
  EXPECT_GE(Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient), 4);
}

TEST_F(SharingTest, HundredMiBUploadAndDownloadStreamWithBoundedMemory) {
  const std::string patient = Place("big-record-1", "DE");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.generated_size = 100 * kMiB;
  spec.seed = 42;
  spec.chunk_bytes = kMiB;
  spec.kind = v1::RECORD_KIND_IMAGING;
  spec.content_type = "application/dicom";
  spec.file_name = "ct-scan.dcm";
  crypto::Sha256 expected;
  for (uint64_t off = 0; off < spec.generated_size; off += kMiB) {
    expected.Update(Generate(spec.seed, off, kMiB));
  }
  const std::string sha = expected.Finish();
  spec.declared_sha = sha;

  ResetPeakRss();
  const int64_t rss_before_kb = ProcStatusKb("VmRSS:");
  v1::UploadRecordResponse uploaded;
  grpc::Status status = Upload(pki_->practitioner(), spec, &uploaded);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const int64_t upload_growth_kb = ProcStatusKb("VmHWM:") - rss_before_kb;
  EXPECT_EQ(uploaded.size_bytes(), 100 * kMiB);
  EXPECT_EQ(uploaded.sha256(), sha);
  EXPECT_EQ(Count("de-1", "SELECT count(*) FROM record_chunks WHERE record_id = $1",
                  uploaded.record_id()),
            100);

  ResetPeakRss();
  const int64_t rss_before_download_kb = ProcStatusKb("VmRSS:");
  Downloaded d = Download(pki_->practitioner(), uploaded.record_id(), "", /*keep=*/false);
  const int64_t download_growth_kb = ProcStatusKb("VmHWM:") - rss_before_download_kb;
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.bytes, 100 * kMiB);
  EXPECT_EQ(d.sha256, sha);
  EXPECT_EQ(d.chunks, 100);

  // Client and server share this process: buffering the record anywhere would add 100 MiB or
  // more (200 MiB as hex); streaming holds a few chunks per side. The process's peak also moves
  // with gRPC's transport buffers and the allocator's per-thread caches: 24-53 MiB over runs of
  // this test on one 2-core host, hence a 96 MiB bound, still under the 100 MiB that buffering
  // would add. The service's own account of what it holds (below) is the tight check.
  RecordProperty("upload_peak_rss_growth_kib", static_cast<int>(upload_growth_kb));
  RecordProperty("download_peak_rss_growth_kib", static_cast<int>(download_growth_kb));
  RecordProperty("service_peak_buffered_bytes",
                 static_cast<int>(sharing_->core().peak_buffered_bytes()));
  if (!kSanitized) {  // sanitizers keep freed memory in quarantine: RSS says nothing there
    EXPECT_LT(upload_growth_kb, 96 * 1024) << "peak RSS grew by " << upload_growth_kb << " KiB";
    EXPECT_LT(download_growth_kb, 96 * 1024) << "peak RSS grew by " << download_growth_kb << " KiB";
  }
  // What the service itself holds for uploads and downloads at once, at most.
  EXPECT_LE(sharing_->core().peak_buffered_bytes(), static_cast<int64_t>(8 * kMiB));
  EXPECT_EQ(sharing_->core().buffered_bytes(), 0);
}

// Names in right-to-left scripts need no bidirectional control character (which are refused,
// below): they are stored and listed as sent.
TEST_F(SharingTest, RightToLeftFileNamesAreStoredAsSent) {
  const std::string patient = Place("rtl-names-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "scan";
  spec.file_name = "\xd7\xaa\xd7\x95\xd7\xa6\xd7\x90\xd7\x95\xd7\xaa 2026.pdf";  // Hebrew
  UploadOk(pki_->practitioner(), spec);
  spec.file_name = "\xd8\xaa\xd9\x82\xd8\xb1\xd9\x8a\xd8\xb1.pdf";  // Arabic
  UploadOk(pki_->practitioner(), spec);
  auto listed = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient, 10);
  ASSERT_TRUE(listed.ok()) << listed.status();
  std::set<std::string> names;
  for (const v1::Record& r : listed->records()) names.insert(r.file_name());
  EXPECT_EQ(names, (std::set<std::string>{
                       "\xd7\xaa\xd7\x95\xd7\xa6\xd7\x90\xd7\x95\xd7\xaa 2026.pdf",
                       "\xd8\xaa\xd9\x82\xd8\xb1\xd9\x8a\xd8\xb1.pdf"}));
}

TEST_F(SharingTest, BadUploadsAreRefusedClearlyAndStoreNothing) {
  const std::string patient = Place("bad-uploads-1", "FR");
  const int64_t before = StoredRows();
  const std::string content = Generate(3, 0, 5000);
  struct Case {
    std::string name;
    std::function<void(UploadSpec&)> change;
    const TestCert* as;
    grpc::StatusCode code;
    std::string mentions;
  };
  const std::vector<Case> cases = {
      {"chunk over 1 MiB",
       [](UploadSpec& s) {
         s.content = Generate(4, 0, kMiB + 1);
         s.chunk_bytes = kMiB + 1;
       },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "1048576"},
      {"more bytes than declared", [](UploadSpec& s) { s.declared_size = 4000; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "more bytes than declared"},
      {"fewer bytes than declared", [](UploadSpec& s) { s.declared_size = 6000; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "declared 6000"},
      {"hash mismatch", [](UploadSpec& s) { s.declared_sha = Sha("something else"); },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "SHA-256"},
      {"unknown patient", [](UploadSpec& s) { s.patient_id = "pt_0123456789abcdef"; },
       &pki_->practitioner(), grpc::StatusCode::NOT_FOUND, "patient"},
      {"another tenant's patient", [](UploadSpec&) {}, &pki_->globex_practitioner(),
       grpc::StatusCode::NOT_FOUND, "patient"},
      {"device identity", [](UploadSpec&) {}, &pki_->device(), grpc::StatusCode::PERMISSION_DENIED,
       "device"},
      {"app identity", [](UploadSpec&) {}, &pki_->app(), grpc::StatusCode::PERMISSION_DENIED,
       "app"},
      {"no header", [](UploadSpec& s) { s.send_header = false; }, &pki_->practitioner(),
       grpc::StatusCode::INVALID_ARGUMENT, "header"},
      {"two headers", [](UploadSpec& s) { s.header_twice = true; }, &pki_->practitioner(),
       grpc::StatusCode::INVALID_ARGUMENT, "chunk"},
      {"no kind", [](UploadSpec& s) { s.kind = v1::RECORD_KIND_UNSPECIFIED; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "header.kind"},
      // A proto3 string must be UTF-8: the header does not parse (a C++ client sends it anyway).
      {"file name not UTF-8", [](UploadSpec& s) { s.file_name = "r\xe9sum\xe9.pdf"; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "must be valid UTF-8"},
      // U+202E: shows as "scanexe.pdf".
      {"bidirectional control in file name",
       [](UploadSpec& s) { s.file_name = "scan\xe2\x80\xae" "fdp.exe"; }, &pki_->practitioner(),
       grpc::StatusCode::INVALID_ARGUMENT, "bidirectional control characters"},
      {"path in file name", [](UploadSpec& s) { s.file_name = "../etc/passwd"; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "header.file_name"},
      {"empty content type", [](UploadSpec& s) { s.content_type = ""; }, &pki_->practitioner(),
       grpc::StatusCode::INVALID_ARGUMENT, "header.content_type"},
      // The content type is the DocumentReference's contentType and a download's header.
      {"content type not a media type", [](UploadSpec& s) { s.content_type = "PDF document"; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT,
       "header.content_type: not a media type such as application/pdf or text/plain; "
       "charset=utf-8 (expected '/' after the type at byte 3)"},
      {"size over 256 MiB", [](UploadSpec& s) { s.declared_size = (uint64_t{256} << 20) + 1; },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "header.size_bytes"},
      {"short hash", [](UploadSpec& s) { s.declared_sha = std::string(31, 'h'); },
       &pki_->practitioner(), grpc::StatusCode::INVALID_ARGUMENT, "header.sha256"},
  };
  for (const Case& c : cases) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = content;
    spec.chunk_bytes = 1000;
    c.change(spec);
    grpc::Status status = Upload(*c.as, spec);
    EXPECT_EQ(status.error_code(), c.code) << c.name << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.mentions)) << c.name;
  }

  // A client that goes away mid-upload: the server ends the upload's transaction and frees what
  // it held.
  {
    const std::vector<int> earlier = IdleUploadSessions("fr-1");
    grpc::ClientContext context;
    v1::UploadRecordResponse response;
    auto stub = Stub(pki_->practitioner());
    auto writer = stub->UploadRecord(&context, &response);
    v1::UploadRecordRequest message;
    message.mutable_header()->set_patient_id(patient);
    message.mutable_header()->set_kind(v1::RECORD_KIND_REPORT);
    message.mutable_header()->set_content_type("text/plain");
    message.mutable_header()->set_file_name("partial.txt");
    message.mutable_header()->set_size_bytes(3 * kMiB);
    message.mutable_header()->set_sha256(std::string(32, 'x'));
    ASSERT_TRUE(writer->Write(message));
    v1::UploadRecordRequest chunk;
    chunk.mutable_chunk()->set_data(Generate(5, 0, kMiB));
    ASSERT_TRUE(writer->Write(chunk));
    ASSERT_TRUE(writer->Write(chunk));
    // Less than a storage chunk: the upload buffers it until more comes or the upload ends.
    chunk.mutable_chunk()->set_data(Generate(5, 2 * kMiB, 1000));
    ASSERT_TRUE(writer->Write(chunk));
    // The upload holds its transaction open in fr-1, idle between chunks, and the piece.
    int upload_pid = 0;
    ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
      upload_pid = NewIdleUploadSession("fr-1", earlier);
      return upload_pid != 0 && sharing_->core().buffered_bytes() != 0;
    }));
    context.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
    // Released whenever the server notices: the session is back in the pool with its transaction
    // ended. A transaction left open would keep it idle in transaction until the shard's own
    // idle timeout ended the session, which then would be gone instead.
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
      return SessionState("fr-1", upload_pid) == "idle" &&
             sharing_->core().buffered_bytes() == 0;
    })) << "session state '" << SessionState("fr-1", upload_pid) << "', "
        << sharing_->core().buffered_bytes() << " bytes buffered";
    EXPECT_TRUE(IdleUploadSessions("fr-1").empty());
  }
  // None of these uploads stored anything.
  EXPECT_EQ(StoredRows(), before);
  EXPECT_TRUE(ListedIds(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient).empty());
}

// Random upload streams: the header first or not, once or twice, chunks of random sizes (empty,
// one byte, up to just over 1 MiB), a declared size off by a little or right, a hash right or
// wrong. An upload is stored exactly when the stream is what the API asks for (the header once,
// first; chunks of 1 byte to 1 MiB; their bytes the declared size and hash), and then downloads
// as sent; anything else is INVALID_ARGUMENT and stores nothing. Seeded (MEDGATE_FUZZ_SEED and
// MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(SharingTest, RandomUploadStreamsAreStoredExactlyWhenWellFormed) {
  const std::string patient = Place("random-uploads-1", "FR");
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(40);
  std::map<std::string, int> outcomes;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    static const size_t kSizes[] = {1, 7, 1000, 65536, kMiB - 1, kMiB};
    std::vector<std::string> chunks(testing::Uniform(rng, 0, 3));
    std::string content;
    bool chunks_ok = !chunks.empty();
    for (std::string& chunk : chunks) {
      // Mostly sizes the API takes; now and then an empty chunk or one over 1 MiB.
      size_t size = kSizes[testing::Uniform(rng, 0, 5)];
      if (testing::Uniform(rng, 0, 7) == 0) size = testing::Uniform(rng, 0, 1) == 0 ? 0 : kMiB + 1;
      chunk = Generate(seed + static_cast<uint64_t>(round), content.size(), size);
      content += chunk;
      chunks_ok = chunks_ok && size >= 1 && size <= kMiB;
    }
    uint64_t declared = content.size();
    if (testing::Uniform(rng, 0, 7) == 0) declared += testing::Uniform(rng, 0, 1) == 0 ? 1 : -1;
    std::string sha = Sha(content);
    if (testing::Uniform(rng, 0, 7) == 0) sha[testing::Uniform(rng, 0, 31)] ^= 0x01;
    const bool header_first = testing::Uniform(rng, 0, 11) != 0;
    const bool header_again = testing::Uniform(rng, 0, 11) == 0;
    const bool well_formed = header_first && !header_again && chunks_ok &&
                             declared == content.size() && declared >= 1 && sha == Sha(content);

    const int64_t rows_before = StoredRows();
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    v1::UploadRecordResponse response;
    auto stub = Stub(pki_->practitioner());
    auto writer = stub->UploadRecord(&context, &response);
    v1::UploadRecordRequest header;
    header.mutable_header()->set_request_id(absl::StrCat("random-upload-", seed, "-", round));
    header.mutable_header()->set_patient_id(patient);
    header.mutable_header()->set_kind(v1::RECORD_KIND_DOCUMENT);
    header.mutable_header()->set_content_type("application/octet-stream");
    header.mutable_header()->set_file_name("random.bin");
    header.mutable_header()->set_size_bytes(declared);
    header.mutable_header()->set_sha256(sha);
    std::vector<v1::UploadRecordRequest> stream;
    if (header_first) stream.push_back(header);
    for (size_t i = 0; i < chunks.size(); ++i) {
      v1::UploadRecordRequest chunk;
      chunk.mutable_chunk()->set_data(chunks[i]);
      stream.push_back(chunk);
      if (header_again && i == 0) stream.push_back(header);
    }
    if (!header_first) stream.push_back(header);
    bool open = true;
    for (const v1::UploadRecordRequest& message : stream) {
      if (open) open = writer->Write(message);
    }
    if (open) writer->WritesDone();
    const grpc::Status status = writer->Finish();
    SCOPED_TRACE(absl::StrCat(chunks.size(), " chunks, ", content.size(), " bytes, declared ",
                              declared, ", hash ", sha == Sha(content) ? "right" : "wrong",
                              header_first ? "" : ", header last", header_again ? ", twice" : ""));
    if (well_formed) {
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_EQ(response.size_bytes(), content.size());
      ExpectContent(pki_->practitioner(), response.record_id(), content);
      ++outcomes["stored"];
    } else {
      ++outcomes[!chunks_ok ? "refused: no chunk, an empty one or one over 1 MiB"
                 : !header_first || header_again ? "refused: the header not once and first"
                                                 : "refused: size or hash"];
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
      EXPECT_EQ(StoredRows(), rows_before);
    }
    if (HasFailure()) break;
  }
  for (const auto& [outcome, n] : outcomes) std::printf("%s: %d rounds\n", outcome.c_str(), n);
}

// Random listings of one practitioner's records, page after page: records of patients in three
// regions, of three kinds, some archived; a random kind filter or none, archived ones included or
// not, MINE or one patient's, page sizes 1 to 7. The pages together are exactly the records that
// match, newest first, none twice, no page over its size. Seeded (MEDGATE_FUZZ_SEED and
// MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(SharingTest, RandomListingsPageThroughExactlyTheMatchingRecordsNewestFirst) {
  const TestCert& owner = Cert("acme-p5");
  const uint64_t seed = testing::FuzzSeed();
  const std::vector<std::string> patients = {
      Place(absl::StrCat("random-list-fr-", seed % 100000), "FR"),
      Place(absl::StrCat("random-list-de-", seed % 100000), "DE"),
      Place(absl::StrCat("random-list-be-", seed % 100000), "BE")};
  static const v1::RecordKind kKinds[] = {v1::RECORD_KIND_DOCUMENT, v1::RECORD_KIND_IMAGING,
                                          v1::RECORD_KIND_REPORT};
  struct Uploaded {
    std::string patient;
    v1::RecordKind kind;
    bool archived = false;
  };
  std::map<std::string, Uploaded> uploaded;
  {
    std::mt19937_64 rng = testing::FuzzRng(seed, -1);
    for (int i = 0; i < 24; ++i) {
      UploadSpec spec;
      spec.patient_id = patients[testing::Uniform(rng, 0, 2)];
      spec.kind = kKinds[testing::Uniform(rng, 0, 2)];
      spec.content = absl::StrCat("listed record ", seed, "-", i);
      const std::string id = UploadOk(owner, spec);
      ASSERT_FALSE(id.empty());
      Uploaded u{spec.patient_id, spec.kind};
      if (testing::Uniform(rng, 0, 3) == 0) {
        ASSERT_TRUE(Archive(owner, id, absl::Now() + absl::Hours(24)).ok());
        u.archived = true;
      }
      uploaded[id] = u;
    }
  }
  const int rounds = testing::FuzzRounds(20);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const bool by_patient = testing::Uniform(rng, 0, 2) == 0;
    const std::string patient = by_patient ? patients[testing::Uniform(rng, 0, 2)] : "";
    const v1::RecordKind kind = testing::Uniform(rng, 0, 1) == 0
                                    ? v1::RECORD_KIND_UNSPECIFIED
                                    : kKinds[testing::Uniform(rng, 0, 2)];
    const bool include_archived = testing::Uniform(rng, 0, 1) == 0;
    const int page_size = static_cast<int>(testing::Uniform(rng, 1, 7));
    std::set<std::string> expected;
    for (const auto& [id, u] : uploaded) {
      if ((patient.empty() || u.patient == patient) &&
          (kind == v1::RECORD_KIND_UNSPECIFIED || u.kind == kind) &&
          (include_archived || !u.archived)) {
        expected.insert(id);
      }
    }
    std::vector<std::string> got;
    std::optional<absl::Time> last_created;
    std::string token;
    for (int page = 1;; ++page) {
      ASSERT_LT(page, 200) << "pages never end";
      absl::StatusOr<v1::ListRecordsResponse> listed =
          List(owner, by_patient ? v1::RECORD_SCOPE_PATIENT : v1::RECORD_SCOPE_MINE, patient,
               page_size, token, include_archived, kind);
      ASSERT_TRUE(listed.ok()) << listed.status();
      EXPECT_LE(listed->records_size(), page_size);
      for (const v1::Record& r : listed->records()) {
        got.push_back(r.record_id());
        const absl::Time created = absl::FromUnixSeconds(r.created_at().seconds()) +
                                   absl::Nanoseconds(r.created_at().nanos());
        if (last_created) {
          EXPECT_LE(created, *last_created) << "not newest first";
        }
        last_created = created;
      }
      token = listed->next_page_token();
      if (token.empty()) break;
    }
    const std::set<std::string> got_set(got.begin(), got.end());
    EXPECT_EQ(got_set.size(), got.size()) << "a record listed twice";
    EXPECT_EQ(got_set, expected) << (by_patient ? "one patient's" : "mine") << ", page size "
                                 << page_size << (include_archived ? ", archived too" : "");
    if (HasFailure()) break;
  }
}

// Random pages through a region's log by ops, and through one patient's entries by the app,
// filtered by actor or not, page sizes 1 to 12, while uploads keep appending entries to the same
// log. Every entry that matched before the paging began is on a page, in seq order, none twice,
// and every entry listed matches the request. Seeded (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS
// replay or extend it); how the appends fall among the pages is the machine's timing.
// Each QueryAudit page writes a read entry in the log it lists. A listing ends where its first
// page was read, so that pages of one entry run out: each lists an entry that was there when
// the listing began, once; the pages' own entries are for the next query.
TEST_F(SharingTest, AuditPagesOfOneEntryEndAtTheEntriesThereWhenTheListingBegan) {
  const std::string patient = Place("audit-one-by-one-1", "FR");
  for (int i = 0; i < 3; ++i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = absl::StrCat("paged one by one ", i);
    UploadOk(pki_->practitioner(), spec);
  }
  std::vector<int64_t> there;
  {
    pqxx::connection c(ConnInfo("fr-1"));
    pqxx::nontransaction q(c);
    for (const pqxx::row& row :
         q.exec_params("SELECT seq FROM audit_log WHERE patient_id = $1 ORDER BY at_us, seq",
                       patient)) {
      there.push_back(row[0].as<int64_t>());
    }
  }
  ASSERT_GE(there.size(), 3u);
  v1::QueryAuditRequest request;
  request.set_patient_id(patient);
  request.set_page_size(1);
  std::vector<int64_t> listed;
  int pages = 0;
  for (;; ++pages) {
    ASSERT_LT(pages, 50) << "pages never end";
    absl::StatusOr<v1::QueryAuditResponse> response = QueryAudit(pki_->app(), request);
    ASSERT_TRUE(response.ok()) << response.status();
    for (const v1::AuditEntry& e : response->entries()) listed.push_back(e.seq());
    if (response->next_page_token().empty()) break;
    request.set_page_token(response->next_page_token());
  }
  EXPECT_EQ(listed, there);
  // The next query shows the listing's own read entries, one a page.
  request.clear_page_token();
  request.set_page_size(1000);
  absl::StatusOr<v1::QueryAuditResponse> again = QueryAudit(pki_->app(), request);
  ASSERT_TRUE(again.ok()) << again.status();
  int reads = 0;
  for (const v1::AuditEntry& e : again->entries()) {
    if (e.object_type() == "audit_log") ++reads;
  }
  EXPECT_EQ(reads, pages + 1);
  // A token of the form servers before this one gave (the seq alone) still continues.
  request.set_page_size(1);
  request.set_page_token(absl::StrCat(there[0]));
  absl::StatusOr<v1::QueryAuditResponse> legacy = QueryAudit(pki_->app(), request);
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  ASSERT_EQ(legacy->entries_size(), 1);
  EXPECT_EQ(static_cast<int64_t>(legacy->entries(0).seq()), there[1]);
  for (const char* bad : {"1.2.3", "1.x", "x.1", "0.5"}) {
    request.set_page_token(bad);
    EXPECT_EQ(QueryAudit(pki_->app(), request).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST_F(SharingTest, RandomAuditPagesWhileEntriesArriveMissNoneAndRepeatNone) {
  const uint64_t seed = testing::FuzzSeed();
  const std::string patient = Place(absl::StrCat("random-audit-", seed % 100000), "FR");
  auto upload = [&](const std::string& content) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = content;
    return Upload(pki_->practitioner(), spec).ok();
  };
  int appended = 0;
  const int rounds = testing::FuzzRounds(10);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    // Each round reads from its own start: the entries of its first uploads, and those of the
    // uploads that go on while it reads.
    const absl::Time since = absl::Now() - absl::Milliseconds(1);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(upload(absl::StrCat("audited ", round, "-", i)));
    std::atomic<bool> stop{false};
    std::atomic<int> arriving{0};
    std::thread appender([&] {
      for (int i = 0; !stop.load(); ++i) {
        if (upload(absl::StrCat("arriving ", round, "-", i))) arriving.fetch_add(1);
      }
    });
    absl::Cleanup join = [&] {
      stop.store(true);
      appender.join();
      appended += arriving.load();
    };
    const bool whole_log = testing::Uniform(rng, 0, 1) == 0;
    // Unfiltered, or the uploading practitioner's entries only (among the upload's own reads).
    const std::string actor =
        testing::Uniform(rng, 0, 1) == 0 ? "" : Id("/tenant/acme/practitioner/p-1");
    const int page_size = static_cast<int>(testing::Uniform(rng, 1, 12));
    v1::QueryAuditRequest request;
    if (whole_log) {
      request.mutable_log()->set_region_id("fr-1");
    } else {
      request.set_patient_id(patient);
    }
    *request.mutable_time_range()->mutable_start_at() = ToProtoTimestamp(since);
    request.set_actor(actor);
    request.set_page_size(page_size);
    // What matches now, by the shard itself.
    std::set<int64_t> before;
    {
      pqxx::connection c(ConnInfo("fr-1"));
      pqxx::nontransaction q(c);
      for (const pqxx::row& row : q.exec_params(
               "SELECT seq FROM audit_log WHERE at_us >= $1 AND ($2 = '' OR patient_id = $2) "
               "AND ($3 = '' OR actor = $3)",
               absl::ToUnixMicros(since), whole_log ? "" : patient, actor)) {
        before.insert(row[0].as<int64_t>());
      }
    }
    ASSERT_FALSE(before.empty());
    std::vector<int64_t> listed;
    for (int page = 1;; ++page) {
      ASSERT_LT(page, 2000) << "pages never end";
      absl::StatusOr<v1::QueryAuditResponse> response =
          QueryAudit(whole_log ? pki_->ops() : pki_->app(), request);
      ASSERT_TRUE(response.ok()) << response.status();
      EXPECT_LE(response->entries_size(), page_size);
      for (const v1::AuditEntry& e : response->entries()) {
        if (!listed.empty()) {
          EXPECT_GT(static_cast<int64_t>(e.seq()), listed.back()) << "out of order or twice";
        }
        listed.push_back(static_cast<int64_t>(e.seq()));
        if (!whole_log) {
          EXPECT_EQ(e.patient_id(), patient);
        }
        if (!actor.empty()) {
          EXPECT_EQ(e.actor(), actor);
        }
      }
      // Past the entries that were there to begin with, enough: the log keeps growing.
      if (response->next_page_token().empty() ||
          (!listed.empty() && listed.back() >= *before.rbegin())) {
        break;
      }
      request.set_page_token(response->next_page_token());
    }
    std::move(join).Invoke();
    for (int64_t seq : before) {
      EXPECT_TRUE(std::binary_search(listed.begin(), listed.end(), seq))
          << "entry " << seq << " missing; " << (whole_log ? "the log" : "the patient's")
          << (actor.empty() ? "" : ", by actor") << ", page size " << page_size;
    }
    if (HasFailure()) break;
  }
  std::printf("%d uploads appended entries while the pages were read\n", appended);
  EXPECT_GT(appended, 0) << "no upload appended an entry during the rounds: nothing arrived";
}

// GDPR art. 20 for records: an app of the patient's tenant exports every record of the patient,
// archived ones too, newest first, each as a FHIR R4 DocumentReference followed by its content,
// page by page; every record and every listing audited with the request's reason and id.
TEST_F(SharingTest, AnAppExportsEveryRecordOfThePatientWithItsDocumentReference) {
  const std::string patient = Place("export-records-1", "FR");
  const std::string other_patient = Place("export-records-2", "FR");
  UploadSpec letter;
  letter.patient_id = patient;
  letter.content = Generate(61, 0, 5000);
  letter.file_name = "lettre de sortie.pdf";
  UploadSpec scan = letter;
  scan.content = Generate(62, 0, 2 * kMiB + 700);  // three chunks
  scan.kind = v1::RECORD_KIND_IMAGING;
  scan.content_type = "application/dicom";
  scan.file_name = "thorax.dcm";
  UploadSpec report = letter;
  report.content = Generate(63, 0, 900);
  report.kind = v1::RECORD_KIND_REPORT;
  report.file_name = "bilan.pdf";
  const std::string letter_id = UploadOk(pki_->practitioner(), letter);
  const std::string scan_id = UploadOk(Cert("acme-p2"), scan);
  const std::string report_id = UploadOk(pki_->practitioner(), report);
  const absl::Time retain_until = absl::FromUnixSeconds(absl::ToUnixSeconds(ServerNow())) +
                                  absl::Hours(24 * 365);
  ASSERT_TRUE(Archive(pki_->practitioner(), report_id, retain_until).ok());
  UploadSpec not_theirs = letter;
  not_theirs.patient_id = other_patient;
  const std::string other_id = UploadOk(pki_->practitioner(), not_theirs);
  const std::string reason = "the patient asked for a copy (ticket 4242)";

  // Two pages of at most two records, newest first.
  Exported first = Export(pki_->app(), patient, reason, 2);
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  ASSERT_TRUE(first.page_end);
  EXPECT_EQ(first.end.record_count(), 2u);
  ASSERT_FALSE(first.end.next_page_token().empty());
  Exported second = Export(pki_->app(), patient, reason, 2, first.end.next_page_token());
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  ASSERT_TRUE(second.page_end);
  EXPECT_EQ(second.end.record_count(), 1u);
  EXPECT_TRUE(second.end.next_page_token().empty());
  std::vector<v1::ExportedRecord> records = first.records;
  records.insert(records.end(), second.records.begin(), second.records.end());
  std::vector<std::string> ids;
  for (const v1::ExportedRecord& r : records) ids.push_back(r.record_id());
  EXPECT_EQ(ids, (std::vector<std::string>{report_id, scan_id, letter_id}));
  std::map<std::string, std::string> contents = first.contents;
  contents.insert(second.contents.begin(), second.contents.end());
  EXPECT_EQ(contents[letter_id], letter.content);
  EXPECT_EQ(contents[scan_id], scan.content);
  EXPECT_EQ(contents[report_id], report.content);
  EXPECT_EQ(contents.count(other_id), 0u);
  EXPECT_LE(first.largest_content_message, static_cast<int>(kMiB));

  const std::map<std::string, const UploadSpec*> specs = {
      {letter_id, &letter}, {scan_id, &scan}, {report_id, &report}};
  for (const v1::ExportedRecord& r : records) {
    const UploadSpec& spec = *specs.at(r.record_id());
    EXPECT_EQ(r.size_bytes(), spec.content.size());
    EXPECT_EQ(r.sha256(), crypto::Sha256::Of(spec.content));
    // One line of JSON, a FHIR R4 DocumentReference.
    const std::string& line = r.document_reference();
    ASSERT_FALSE(line.empty());
    EXPECT_EQ(line.back(), '\n');
    EXPECT_EQ(line.find('\n'), line.size() - 1);
    google::protobuf::Struct json;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(line, &json).ok()) << line;
    const auto& f = json.fields();
    EXPECT_EQ(f.at("resourceType").string_value(), "DocumentReference");
    EXPECT_EQ(f.at("status").string_value(), "current");
    const auto& identifier = f.at("identifier").list_value().values(0).struct_value().fields();
    EXPECT_EQ(identifier.at("system").string_value(), "urn:medgate:record");
    EXPECT_EQ(identifier.at("value").string_value(), r.record_id());
    const auto& subject = f.at("subject").struct_value().fields();
    EXPECT_EQ(subject.at("type").string_value(), "Patient");
    EXPECT_EQ(subject.at("identifier").struct_value().fields().at("value").string_value(), patient);
    const auto& author =
        f.at("author").list_value().values(0).struct_value().fields().at("identifier");
    EXPECT_EQ(author.struct_value().fields().at("value").string_value(),
              r.record_id() == scan_id ? Id("/tenant/acme/practitioner/p-2")
                                       : P1());
    const auto& category = f.at("category").list_value().values(0).struct_value().fields().at(
        "coding").list_value().values(0).struct_value().fields();
    EXPECT_EQ(category.at("code").string_value(),
              spec.kind == v1::RECORD_KIND_IMAGING  ? "imaging"
              : spec.kind == v1::RECORD_KIND_REPORT ? "report"
                                                    : "document");
    const auto& attachment = f.at("content").list_value().values(0).struct_value().fields().at(
        "attachment").struct_value().fields();
    EXPECT_EQ(attachment.at("contentType").string_value(), spec.content_type);
    EXPECT_EQ(attachment.at("title").string_value(), spec.file_name);
    EXPECT_EQ(attachment.at("size").number_value(), static_cast<double>(spec.content.size()));
    EXPECT_EQ(attachment.at("url").string_value(), "content/" + r.record_id());
    std::map<std::string, std::string> extensions;
    for (const auto& e : f.at("extension").list_value().values()) {
      const auto& ef = e.struct_value().fields();
      extensions[ef.at("url").string_value()] =
          ef.contains("valueBase64Binary") ? ef.at("valueBase64Binary").string_value()
                                           : ef.at("valueInstant").string_value();
    }
    EXPECT_EQ(extensions["urn:medgate:fhir:content-sha256"], absl::Base64Escape(r.sha256()));
    if (r.record_id() == report_id) {
      EXPECT_EQ(extensions["urn:medgate:fhir:retain-until"],
                absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", retain_until, absl::UTCTimeZone()));
    } else {
      EXPECT_EQ(extensions.count("urn:medgate:fhir:retain-until"), 0u);
    }
  }

  // Audited in the patient's home shard: each record as a read before its bytes left, each call's
  // listing, all with the reason and the request id; nothing of the other patient.
  const std::string app = Id("/tenant/acme/app/backend");
  auto entries = [&](const std::string& object_type, const std::string& like) {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    pqxx::row row = q.exec_params1(
        "SELECT string_agg(object_id || ' ' || reason, ',' ORDER BY seq) FROM audit_log "
        "WHERE actor = $1 AND patient_id IN ($2, $3) AND object_type = $4 AND reason LIKE $5 "
        "AND request_id = 'export-test' AND action = 'read' AND decision = 'permit'",
        app, patient, other_patient, object_type, like);
    return row[0].is_null() ? std::string() : row[0].as<std::string>();
  };
  EXPECT_EQ(entries("record", "EXPORTED:%"),
            absl::StrCat(report_id, " EXPORTED: bytes=900; ", reason, ",", scan_id,
                         " EXPORTED: bytes=", scan.content.size(), "; ", reason, ",", letter_id,
                         " EXPORTED: bytes=5000; ", reason));
  EXPECT_EQ(entries("record_list", "EXPORT_LISTED:%"),
            absl::StrCat(patient, " EXPORT_LISTED: count=2; ", reason, ",", patient,
                         " EXPORT_LISTED: count=1; ", reason));
  EXPECT_EQ(Count("de-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient), 0);

  // A patient without records: an empty page, audited all the same.
  const std::string none = Place("export-records-none", "FR");
  Exported empty = Export(pki_->app(), none, reason);
  ASSERT_TRUE(empty.status.ok()) << empty.status.error_message();
  ASSERT_TRUE(empty.page_end);
  EXPECT_EQ(empty.end.record_count(), 0u);
  EXPECT_TRUE(empty.records.empty());
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND "
                  "reason LIKE 'EXPORT_LISTED: count=0; %'",
                  none),
            1);

  // Only an app of the patient's tenant, with a reason; nothing sent otherwise.
  struct Refused {
    const TestCert* as;
    std::string reason;
    std::string token;
    grpc::StatusCode code;
    std::string message;
  };
  const std::vector<Refused> refused = {
      {&pki_->practitioner(), reason, "", grpc::StatusCode::PERMISSION_DENIED,
       "practitioner identity may not call ExportPatientRecords"},
      {&pki_->device(), reason, "", grpc::StatusCode::PERMISSION_DENIED, "may not call"},
      {&pki_->ops(), reason, "", grpc::StatusCode::PERMISSION_DENIED, "may not call"},
      {&pki_->globex_app(), reason, "", grpc::StatusCode::NOT_FOUND, "not found"},
      {&pki_->app(), "", "", grpc::StatusCode::INVALID_ARGUMENT, "reason"},
      {&pki_->app(), reason, "not-a-token", grpc::StatusCode::INVALID_ARGUMENT,
       "not a token from an earlier ExportPatientRecords response"},
  };
  const std::string entries_of_patient =
      "SELECT count(*) FROM audit_log WHERE patient_id = $1";
  const int64_t entries_before = Count("fr-1", entries_of_patient, patient);
  for (const Refused& r : refused) {
    Exported e = Export(*r.as, patient, r.reason, 0, r.token);
    EXPECT_EQ(e.status.error_code(), r.code) << r.as->cert_path << ": " << e.status.error_message();
    EXPECT_THAT(e.status.error_message(), HasSubstr(r.message));
    EXPECT_TRUE(e.records.empty());
  }
  // Refused before anything of the patient was read: nothing to audit.
  EXPECT_EQ(Count("fr-1", entries_of_patient, patient), entries_before);

  // A damaged record ends the export with DATA_LOSS naming it.
  const std::string flip =
      "UPDATE record_chunks SET ciphertext = set_byte(ciphertext, 100, "
      "get_byte(ciphertext, 100) # 1) WHERE record_id = $1 AND chunk_index = 2";
  Exec("fr-1", flip, scan_id);
  Exported damaged = Export(pki_->app(), patient, reason);
  EXPECT_EQ(damaged.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(damaged.status.error_message(), HasSubstr(scan_id));
  EXPECT_FALSE(damaged.page_end);
  Exec("fr-1", flip, scan_id);  // flipped back
  // An erased record is no longer the patient's to export.
  ASSERT_TRUE(Erase(pki_->practitioner(), letter_id).ok());
  Exported after_erasure = Export(pki_->app(), patient, reason);
  ASSERT_TRUE(after_erasure.status.ok()) << after_erasure.status.error_message();
  EXPECT_EQ(after_erasure.end.record_count(), 2u);
  EXPECT_EQ(after_erasure.contents.count(letter_id), 0u);
  EXPECT_EQ(after_erasure.contents[scan_id], scan.content);
}

// An export page holds 20 records when no size is asked, and at most 100 whatever is asked; the
// token goes on where the page stopped.
TEST_F(SharingTest, AnExportPageHoldsTwentyRecordsByDefaultAndAtMostAHundred) {
  const std::string patient = Place("export-records-pages", "FR");
  std::set<std::string> uploaded;
  for (int i = 0; i < 101; ++i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = absl::StrCat("note ", i);
    spec.file_name = absl::StrCat("note-", i, ".txt");
    spec.content_type = "text/plain; charset=utf-8";
    const std::string id = UploadOk(pki_->practitioner(), spec);
    ASSERT_FALSE(id.empty()) << i;
    uploaded.insert(id);
  }
  const std::string reason = "the patient asked for a copy (ticket 4343)";
  Exported by_default = Export(pki_->app(), patient, reason);
  ASSERT_TRUE(by_default.status.ok()) << by_default.status.error_message();
  EXPECT_EQ(by_default.records.size(), 20u);
  EXPECT_EQ(by_default.end.record_count(), 20u);
  for (int asked : {101, 1000, std::numeric_limits<int32_t>::max()}) {
    Exported first = Export(pki_->app(), patient, reason, asked);
    ASSERT_TRUE(first.status.ok()) << asked << ": " << first.status.error_message();
    EXPECT_EQ(first.records.size(), 100u) << asked;
    EXPECT_EQ(first.end.record_count(), 100u) << asked;
    ASSERT_FALSE(first.end.next_page_token().empty()) << asked;
    Exported rest = Export(pki_->app(), patient, reason, asked, first.end.next_page_token());
    ASSERT_TRUE(rest.status.ok()) << asked << ": " << rest.status.error_message();
    EXPECT_EQ(rest.records.size(), 1u) << asked;
    EXPECT_TRUE(rest.end.next_page_token().empty()) << asked;
    std::set<std::string> exported;
    for (const Exported* page : {&first, &rest}) {
      for (const v1::ExportedRecord& r : page->records) {
        exported.insert(r.record_id());
        EXPECT_EQ(page->contents.at(r.record_id()).rfind("note ", 0), 0u) << r.record_id();
      }
    }
    EXPECT_EQ(exported, uploaded) << asked;
  }
}

// A record erased after the export listed it, before its turn, is left out of the export (no
// longer the patient's data); one erased while it is being sent ends the call with ABORTED. The
// client's flow-control window stays small, so the service cannot send far ahead of what it reads.
TEST_F(SharingTest, AnExportLeavesOutARecordErasedBeforeItsTurnAndStopsAtOneErasedWhileSent) {
  const std::string patient = Place("export-records-erased", "FR");
  UploadSpec older;
  older.patient_id = patient;
  older.content = Generate(71, 0, 3000);
  UploadSpec newer = older;
  newer.content = Generate(72, 0, 4 * kMiB + 10);
  const std::string older_id = UploadOk(pki_->practitioner(), older);
  const std::string newer_id = UploadOk(pki_->practitioner(), newer);
  auto creds = MakeChannelCredentials(
      TlsConfig{pki_->app().cert_path, pki_->app().key_path, pki_->ca_path(), 60},
      Id("/service/sharing"));
  ASSERT_TRUE(creds.ok()) << creds.status();
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 * 1024);
  auto stub = v1::RecordSharing::NewStub(
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", sharing_->port()), *creds, args));
  struct Run {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::ExportPatientRecordsResponse>> reader;
  };
  auto start = [&](Run& run) {
    v1::ExportPatientRecordsRequest request;
    request.set_patient_id(patient);
    request.set_reason("the patient asked for a copy");
    run.context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    run.reader = stub->ExportPatientRecords(&run.context, request);
    // The newer record's start and its first chunk: the service has listed both.
    v1::ExportPatientRecordsResponse message;
    EXPECT_TRUE(run.reader->Read(&message) && message.record().record_id() == newer_id);
    EXPECT_TRUE(run.reader->Read(&message) && message.has_content());
  };

  {
    Run run;
    start(run);
    ASSERT_TRUE(Erase(pki_->practitioner(), older_id).ok());
    v1::ExportPatientRecordsResponse message;
    std::vector<std::string> started;
    uint32_t counted = 0;
    while (run.reader->Read(&message)) {
      if (message.has_record()) started.push_back(message.record().record_id());
      if (message.has_page_end()) counted = message.page_end().record_count();
    }
    const grpc::Status status = run.reader->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(started.empty()) << started.front();  // the older record never started
    EXPECT_EQ(counted, 1u);
  }
  {
    Run run;
    start(run);
    ASSERT_TRUE(Erase(pki_->practitioner(), newer_id).ok());
    v1::ExportPatientRecordsResponse message;
    bool ended = false;
    while (run.reader->Read(&message)) ended = ended || message.has_page_end();
    const grpc::Status status = run.reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(newer_id));
    EXPECT_FALSE(ended);
  }
}

// A patient's audit trail tells who treats them and which kinds of data they hold: a practitioner
// reads it (QueryAudit, PatientDataReport) only under the patient's CARE consent, one covering
// every data category; each refusal is in the trail. The tenant's apps (for the patient) and ops
// need none.
TEST_F(SharingTest, APractitionerReadsAPatientsAuditTrailOnlyUnderCareConsent) {
  const std::string patient = Place("trail-care-1", "FR", nullptr, /*with_care=*/false);
  v1::QueryAuditRequest request;
  request.set_patient_id(patient);
  absl::StatusOr<v1::QueryAuditResponse> refused = QueryAudit(pki_->practitioner(), request);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("the patient's CARE consent does not permit it (NO_CONSENT)"));
  absl::StatusOr<v1::PatientDataReportResponse> report = DataReport(pki_->practitioner(), patient);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kPermissionDenied) << report.status();
  EXPECT_TRUE(QueryAudit(pki_->app(), request).ok());
  EXPECT_TRUE(DataReport(pki_->app(), patient).ok());
  EXPECT_TRUE(DataReport(pki_->ops(), patient).ok());

  // CARE narrowed to one category does not open the whole trail; a tenant-wide one does.
  GrantConsent(pki_->app(), patient, v1::PURPOSE_CARE, P1(), "trail-care-1-heart", {"heart-rate"});
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    refused = QueryAudit(pki_->practitioner(), request);
    return absl::StrContains(refused.status().message(), "CATEGORY_NOT_COVERED");
  })) << refused.status();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
  GrantConsent(pki_->app(), patient, v1::PURPOSE_CARE, "", "trail-care-1-all");
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return QueryAudit(pki_->practitioner(), request).ok(); }));
  report = DataReport(pki_->practitioner(), patient);
  EXPECT_TRUE(report.ok()) << report.status();

  int query_refusals = 0;
  int report_refusals = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    if (e.actor() != P1() || e.decision() != v1::DECISION_DENY) continue;
    EXPECT_EQ(e.purpose(), v1::PURPOSE_CARE);
    query_refusals += e.object_type() == "audit_log";
    report_refusals += e.object_type() == "patient_report";
  }
  EXPECT_GE(query_refusals, 2);  // without consent, and under the narrowed one (maybe more polls)
  EXPECT_EQ(report_refusals, 1);
}

// "Where is my data and who saw it": the report of a patient's data, from its home shard in one
// snapshot, every other shard asked, audited in the home shard only.
TEST_F(SharingTest, APatientsDataReportSaysWhereTheirDataIsAndWhoSawIt) {
  ConsentedUpload up = ConsentedRecord("data-report-1", Generate(71, 0, 4000));
  const std::string& patient = up.patient;
  EXPECT_FALSE(Download(Cert("acme-p3"), up.record).status.ok());  // no grant: refused, audited
  // One grant in force (p-2, who reads), one revoked (p-3), one expired (p-4).
  ASSERT_TRUE(
      ShareOnceConsented(pki_->practitioner(), up.record, P2(), ServerNow() + absl::Hours(1)).ok());
  ASSERT_TRUE(Download(Cert("acme-p2"), up.record).status.ok());
  ASSERT_TRUE(Share(pki_->practitioner(), up.record, P3(), ServerNow() + absl::Hours(1)).ok());
  ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), up.record, P3()).ok());
  const std::string p4 = Id("/tenant/acme/practitioner/p-4");
  ASSERT_TRUE(Share(pki_->practitioner(), up.record, p4, ServerNow() + absl::Hours(1)).ok());
  Exec("fr-1",
       absl::StrCat("UPDATE share_grants SET expires_at = now() - interval '1 second' "
                    "WHERE record_id = $1 AND grantee = '", p4, "'"),
       up.record);
  // Three samples, written in the shard directly (the report reads what is stored, whoever
  // stored it).
  const absl::Time first = absl::FromUnixSeconds(1'793'000'000);
  for (int i = 0; i < 3; ++i) {
    Exec("fr-1",
         absl::StrCat("INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, "
                      "ucum, measured_at) VALUES ('acme', 'dev-report', ", i + 1, ", $1, "
                      "'8867-4', 70, '/min', to_timestamp(", absl::ToUnixSeconds(first) + 3600 * i,
                      "))"),
         patient);
  }
  auto stored = [](const v1::PatientDataReportResponse& r, const std::string& kind) {
    for (const v1::StoredData& s : r.stored()) {
      if (s.kind() == kind) return s;
    }
    ADD_FAILURE() << "no " << kind;
    return v1::StoredData();
  };
  auto accessor = [](const v1::PatientDataReportResponse& r, const std::string& actor) {
    for (const v1::DataAccessor& a : r.accessors()) {
      if (a.actor() == actor) return a;
    }
    ADD_FAILURE() << "no accessor " << actor;
    return v1::DataAccessor();
  };
  auto entries = [&](const std::string& region, const std::string& where) {
    return Count(region, absl::StrCat("SELECT count(*) FROM audit_log WHERE patient_id = $1", where),
                 patient);
  };
  auto entry_times = [&](const char* aggregate) {
    return absl::FromUnixMicros(Count(
        "fr-1", absl::StrCat("SELECT ", aggregate, "(at_us) FROM audit_log WHERE patient_id = $1"),
        patient));
  };

  const int64_t entries_before = entries("fr-1", "");
  const absl::Time earliest_entry = entry_times("min");
  const absl::Time latest_entry = entry_times("max");
  const int64_t consents = Count("fr-1", "SELECT count(*) FROM consents WHERE patient_id = $1",
                                 patient);
  EXPECT_EQ(consents, 2);  // CARE and RECORD_SHARING
  const absl::Time asked = ServerNow();
  absl::StatusOr<v1::PatientDataReportResponse> r = DataReport(pki_->app(), patient);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->patient_id(), patient);
  EXPECT_EQ(r->tenant_id(), "acme");
  EXPECT_EQ(r->territory(), "FR");
  EXPECT_EQ(r->home_region_id(), "fr-1");
  std::vector<std::string> kinds;
  for (const v1::StoredData& s : r->stored()) kinds.push_back(s.kind());
  EXPECT_THAT(kinds, ::testing::ElementsAre("vitals", "records", "share_grants", "consents",
                                            "audit_entries"));
  const v1::StoredData vitals = stored(*r, "vitals");
  EXPECT_EQ(vitals.count(), 3u);
  EXPECT_EQ(FromProtoTimestamp(vitals.first_at()), first);
  EXPECT_EQ(FromProtoTimestamp(vitals.last_at()), first + absl::Hours(2));
  EXPECT_EQ(stored(*r, "records").count(), 1u);
  EXPECT_EQ(stored(*r, "share_grants").count(), 1u);  // p-2's: not the revoked, not the expired
  EXPECT_EQ(stored(*r, "consents").count(), static_cast<uint64_t>(consents));
  const v1::StoredData audited = stored(*r, "audit_entries");
  EXPECT_EQ(audited.count(), static_cast<uint64_t>(entries_before));
  EXPECT_EQ(FromProtoTimestamp(audited.first_at()), earliest_entry);
  EXPECT_EQ(FromProtoTimestamp(audited.last_at()), latest_entry);
  EXPECT_GE(FromProtoTimestamp(r->as_of()), asked - absl::Seconds(5));
  EXPECT_LE(FromProtoTimestamp(r->as_of()), ServerNow() + absl::Seconds(5));
  // Every other region, asked, holds nothing of the patient; which regions they are is for ops.
  EXPECT_EQ(r->other_regions_asked(), 2u);
  EXPECT_EQ(r->other_regions_unanswered(), 0u);
  EXPECT_EQ(r->rows_elsewhere(), 0u);
  EXPECT_EQ(r->other_regions_size(), 0);
  // Who acted: the uploader wrote (upload, shares, revocation), the grantee read, the
  // practitioner without a grant was refused; the latest first.
  EXPECT_GE(accessor(*r, P1()).writes(), 4u);
  EXPECT_EQ(accessor(*r, P2()).reads(),
            static_cast<uint64_t>(entries("fr-1", absl::StrCat(" AND actor = '", P2(),
                                                               "' AND action = 'read' AND "
                                                               "decision = 'permit'"))));
  EXPECT_GE(accessor(*r, P2()).reads(), 1u);
  EXPECT_EQ(accessor(*r, P2()).denied(), 0u);
  EXPECT_GE(accessor(*r, P3()).denied(), 1u);
  EXPECT_EQ(accessor(*r, P3()).reads() + accessor(*r, P3()).writes(), 0u);
  uint64_t listed_entries = 0;
  for (int i = 0; i < r->accessors_size(); ++i) {
    const v1::DataAccessor& a = r->accessors(i);
    listed_entries += a.reads() + a.writes() + a.denied();
    EXPECT_LE(FromProtoTimestamp(a.first_at()), FromProtoTimestamp(a.last_at()));
    if (i > 0) {
      EXPECT_GE(FromProtoTimestamp(r->accessors(i - 1).last_at()), FromProtoTimestamp(a.last_at()));
    }
  }
  EXPECT_EQ(listed_entries, audited.count()) << "every entry is of one listed identity";
  EXPECT_EQ(r->accessors_left_out(), 0u);
  const uint64_t app_reads = accessor(*r, Id("/tenant/acme/app/backend")).reads();

  // The report is audited in the home shard, counts only; nothing naming the patient elsewhere.
  EXPECT_EQ(entries("fr-1", ""), entries_before + 1);
  EXPECT_EQ(entries("fr-1", absl::StrCat(" AND object_type = 'patient_report' AND action = "
                                         "'read' AND tenant = 'acme' AND request_id = "
                                         "'data-report-test' AND reason = 'PERMITTED: vitals=3 "
                                         "records=1 share_grants=1 consents=2 audit_entries=",
                                         entries_before, " accessors=", r->accessors_size(),
                                         " rows_elsewhere=0'")),
            1);
  EXPECT_EQ(entries("de-1", ""), 0);
  EXPECT_EQ(entries("eu-1", ""), 0);
  // The next report counts the first.
  absl::StatusOr<v1::PatientDataReportResponse> again = DataReport(pki_->practitioner(), patient);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(stored(*again, "audit_entries").count(), static_cast<uint64_t>(entries_before + 1));
  EXPECT_EQ(accessor(*again, Id("/tenant/acme/app/backend")).reads(), app_reads + 1);

  // The patient's tenant and ops only. Ops see the other regions by name, and their entry is
  // of the patient's tenant.
  EXPECT_EQ(DataReport(pki_->globex_app(), patient).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(DataReport(pki_->globex_practitioner(), patient).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(DataReport(pki_->device(), patient).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(DataReport(pki_->app(), "pt_nobody").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(DataReport(pki_->app(), "").status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<v1::PatientDataReportResponse> by_ops = DataReport(pki_->ops(), patient);
  ASSERT_TRUE(by_ops.ok()) << by_ops.status();
  ASSERT_EQ(by_ops->other_regions_size(), 2);
  EXPECT_EQ(by_ops->other_regions(0).region_id(), "de-1");
  EXPECT_EQ(by_ops->other_regions(1).region_id(), "eu-1");
  for (const v1::RegionHolding& held : by_ops->other_regions()) {
    EXPECT_EQ(held.rows(), 0u) << held.region_id();
    EXPECT_EQ(held.unavailable(), "") << held.region_id();
  }
  EXPECT_EQ(entries("fr-1", absl::StrCat(" AND object_type = 'patient_report' AND actor = '",
                                         Id("/ops/alice"), "' AND tenant = 'acme'")),
            1);

  // Rows naming the patient in another region (residency broken) are counted there.
  {
    pqxx::connection c(ConnInfo("de-1"));
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) VALUES ('acme', 'dev-stray', 1, $1, '8867-4', 70, '/min', now())",
        patient);
    txn.exec_params0(
        "INSERT INTO record_keys (key_id, patient_id, record_id, wrapped_by, wrapped_key, "
        "created_at) VALUES ('stray-key', $1, 'stray-record', 'stray-wrapper', '\\x00', now())",
        patient);
    txn.commit();
  }
  // Residency broken is a fault ops must hear of: each report logs it, naming its request and
  // the home region, never the patient.
  ::testing::internal::CaptureStderr();
  r = DataReport(pki_->app(), patient);
  by_ops = DataReport(pki_->ops(), patient);
  const std::string logged = ::testing::internal::GetCapturedStderr();
  std::vector<std::string> outside_home;
  for (absl::string_view line : absl::StrSplit(logged, '\n')) {
    if (absl::StrContains(line, "\"event\":\"patient_data_outside_home_region\"")) {
      outside_home.emplace_back(line);
    }
  }
  ASSERT_EQ(outside_home.size(), 2u) << logged;
  for (const std::string& line : outside_home) {
    EXPECT_THAT(line, HasSubstr("\"level\":\"warning\"")) << line;
    EXPECT_THAT(line, HasSubstr("\"request_id\":\"data-report-test\"")) << line;
    EXPECT_THAT(line, HasSubstr("\"home_region\":\"fr-1\"")) << line;
    EXPECT_THAT(line, HasSubstr("\"rows\":2}")) << line;
    EXPECT_THAT(line, Not(HasSubstr(patient))) << line;
  }
  Exec("de-1", "DELETE FROM vitals WHERE patient_id = $1", patient);
  Exec("de-1", "DELETE FROM record_keys WHERE patient_id = $1", patient);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->rows_elsewhere(), 2u);
  EXPECT_EQ(r->other_regions_size(), 0);
  ASSERT_TRUE(by_ops.ok()) << by_ops.status();
  ASSERT_EQ(by_ops->other_regions_size(), 2);
  EXPECT_EQ(by_ops->other_regions(0).rows(), 2u);
  EXPECT_EQ(by_ops->other_regions(1).rows(), 0u);
  EXPECT_EQ(entries("fr-1", " AND object_type = 'patient_report' AND reason LIKE "
                            "'% rows_elsewhere=2'"),
            2);

  // More identities than a report lists: the latest 100, and how many were left out.
  {
    pqxx::connection c(ConnInfo("fr-1"));
    pqxx::work txn(c);
    for (int i = 0; i < 120; ++i) {
      audit::Entry e;
      e.actor = Id(absl::StrCat("/tenant/acme/practitioner/reader-", i));
      e.tenant = "acme";
      e.action = audit::Action::kRead;
      e.object_type = "record";
      e.object_id = up.record;
      e.patient_id = patient;
      e.decision = audit::Decision::kPermit;
      e.reason = "PERMITTED";
      e.request_id = "many-readers";
      ASSERT_TRUE(audit::Append(txn, e).ok());
    }
    txn.commit();
  }
  const int64_t actors =
      Count("fr-1", "SELECT count(DISTINCT actor) FROM audit_log WHERE patient_id = $1", patient);
  const int64_t all_entries = entries("fr-1", "");
  r = DataReport(pki_->app(), patient);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->accessors_size(), 100);
  EXPECT_EQ(r->accessors_left_out(), static_cast<uint64_t>(actors - 100));
  // The 120 readers acted after everyone else: the 100 listed are readers.
  for (const v1::DataAccessor& a : r->accessors()) {
    EXPECT_THAT(a.actor(), HasSubstr("/tenant/acme/practitioner/reader-"));
    EXPECT_EQ(a.reads(), 1u);
  }
  // Entries are counted over every identity, listed or not.
  EXPECT_EQ(stored(*r, "audit_entries").count(), static_cast<uint64_t>(all_entries));

  // A region that does not answer is reported so, without its cause; the report goes on.
  auto proxy = test_support::PgFaultProxy::Start(Db("de-1").port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  const std::string direct = Db("de-1").ConnectionString();
  ExtraSharing extra = StartSharingOn(ConfigWith(direct, (*proxy)->Via(direct)));
  ASSERT_NE(extra.server, nullptr);
  (*proxy)->Sever();
  r = DataReport(pki_->app(), patient, extra.server->audit_port());
  by_ops = DataReport(pki_->ops(), patient, extra.server->audit_port());
  (*proxy)->Restore();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->other_regions_asked(), 2u);
  EXPECT_EQ(r->other_regions_unanswered(), 1u);
  ASSERT_TRUE(by_ops.ok()) << by_ops.status();
  ASSERT_EQ(by_ops->other_regions_size(), 2);
  EXPECT_EQ(by_ops->other_regions(0).region_id(), "de-1");
  EXPECT_EQ(by_ops->other_regions(0).unavailable(),
            "UNAVAILABLE: the region's shard did not answer; ask again later");
  EXPECT_EQ(by_ops->other_regions(1).unavailable(), "");
  EXPECT_EQ(entries("fr-1", " AND object_type = 'patient_report' AND reason LIKE "
                            "'% rows_elsewhere=0 unanswered=1'"),
            2);
  extra.server->Shutdown();
}

// A report holds a home shard connection while it counts: a tenant runs at most two at once, and
// another tenant's are not held back by them.
TEST_F(SharingTest, ATenantRunsAtMostTwoDataReportsAtOnce) {
  const std::string patient = Place("data-report-busy", "FR");
  const std::string theirs = Place("data-report-busy-globex", "DE", &pki_->globex_app());
  // fr-1's chain head held: the reports of an FR patient wait to append their entries.
  pqxx::connection hold(ConnInfo("fr-1"));
  auto head = std::make_unique<pqxx::work>(hold);
  ASSERT_EQ(head->exec("SELECT 1 FROM audit_head FOR UPDATE").size(), 1u);
  std::atomic<int> done{0};
  std::vector<std::thread> running;
  for (int i = 0; i < 2; ++i) {
    running.emplace_back([&] {
      if (DataReport(pki_->app(), patient).ok()) ++done;
    });
  }
  absl::Cleanup release = [&] {
    head.reset();
    for (std::thread& t : running) t.join();
  };
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", "%audit_append%") == 2; }))
      << LockWaits("fr-1", "%audit_append%") << " reports waiting";
  absl::StatusOr<v1::PatientDataReportResponse> third = DataReport(pki_->practitioner(), patient);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("at most 2 data reports at once"));
  EXPECT_TRUE(DataReport(pki_->globex_app(), theirs).ok());
  std::move(release).Invoke();
  EXPECT_EQ(done.load(), 2);
  EXPECT_TRUE(DataReport(pki_->app(), patient).ok()) << "the places are given back";
}

// A data report whose caller goes away before the home shard is read stops there: it audits
// nothing, and gives its tenant's place back. Here it waits on de-1 (a table of its count locked)
// when cancelled; the tenant's other place is held by a report waiting on fr-1's chain head, so a
// third report is let in only once the cancelled one has ended.
TEST_F(SharingTest, ACancelledDataReportAuditsNothingAndGivesItsPlaceBack) {
  const std::string patient = Place("data-report-cancelled", "FR");
  const std::string other = Place("data-report-cancelled-2", "FR");
  auto report = [&](const std::string& of, const std::string& request_id, absl::Duration patience,
                    grpc::ClientContext& context) {
    v1::PatientDataReportRequest request;
    request.set_patient_id(of);
    request.set_request_id(request_id);
    v1::PatientDataReportResponse response;
    context.set_deadline(absl::ToChronoTime(absl::Now() + patience));
    return v1::Audit::NewStub(Channel(sharing_->audit_port(), pki_->app(), "audit"))
        ->PatientDataReport(&context, request, &response);
  };
  auto entries_of = [&](const std::string& request_id) {
    return Count("fr-1", "SELECT count(*) FROM audit_log WHERE request_id = $1", request_id);
  };
  // The tenant's first place: a report of another patient waiting to append its entry.
  pqxx::connection hold_head(ConnInfo("fr-1"));
  auto head = std::make_unique<pqxx::work>(hold_head);
  ASSERT_EQ(head->exec("SELECT 1 FROM audit_head FOR UPDATE").size(), 1u);
  grpc::ClientContext waiting_context;
  std::thread waiting([&] { EXPECT_TRUE(report(other, "report-waiting", kPatience, waiting_context).ok()); });
  absl::Cleanup release_head = [&] {
    head.reset();
    waiting.join();
  };
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", "%audit_append%") == 1; }));
  // The second: the report to cancel, held in de-1.
  pqxx::connection hold_de(ConnInfo("de-1"));
  auto locked = std::make_unique<pqxx::work>(hold_de);
  locked->exec0("LOCK TABLE consents IN ACCESS EXCLUSIVE MODE");
  grpc::ClientContext cancelled_context;
  grpc::Status cancelled_status;
  std::thread cancelled(
      [&] { cancelled_status = report(patient, "report-cancelled", kPatience, cancelled_context); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("de-1", "%key_destructions%") == 1; }));
  cancelled_context.TryCancel();
  cancelled.join();
  EXPECT_EQ(cancelled_status.error_code(), grpc::StatusCode::CANCELLED);
  locked.reset();  // de-1 answers; the cancelled report goes on to find its caller gone
  // A third report is let in (and waits on the chain head until its deadline) once the
  // cancelled one has given its place back.
  grpc::StatusCode third = grpc::StatusCode::RESOURCE_EXHAUSTED;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    grpc::ClientContext context;
    third = report(patient, "report-third", absl::Seconds(1), context).error_code();
    return third != grpc::StatusCode::RESOURCE_EXHAUSTED;
  })) << "the cancelled report kept its place";
  EXPECT_EQ(third, grpc::StatusCode::DEADLINE_EXCEEDED);
  std::move(release_head).Invoke();
  EXPECT_EQ(entries_of("report-cancelled"), 0);  // ended before the home shard: nothing audited
  EXPECT_EQ(entries_of("report-waiting"), 1);
}

// A report whose statement in the home shard passes its bound (2 s here, 30 s in service) ends
// DEADLINE_EXCEEDED saying so, audits nothing, and gives its tenant's place back.
TEST_F(SharingTest, ADataReportPastItsStatementBoundSaysSoAuditsNothingAndGivesItsPlaceBack) {
  SharingServerOptions options;
  options.audit_report_statement_timeout = absl::Seconds(2);
  ExtraSharing extra = StartSharingOn(
      ConfigWith("retention_sweep_seconds: 86400", "retention_sweep_seconds: 86400"), options);
  ASSERT_NE(extra.server, nullptr);
  // A bound of 0 is taken as 1 ms: PostgreSQL would read 0 as no bound at all.
  options.audit_report_statement_timeout = absl::ZeroDuration();
  ExtraSharing unbounded = StartSharingOn(
      ConfigWith("retention_sweep_seconds: 86400", "retention_sweep_seconds: 86400"), options);
  ASSERT_NE(unbounded.server, nullptr);
  const std::string patient = Place("data-report-bound", "FR");
  auto report = [&](const std::string& request_id, SharingServer* server = nullptr) {
    v1::PatientDataReportRequest request;
    request.set_patient_id(patient);
    request.set_request_id(request_id);
    v1::PatientDataReportResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    server = server != nullptr ? server : extra.server.get();
    return v1::Audit::NewStub(Channel(server->audit_port(), pki_->app(), "audit"))
        ->PatientDataReport(&context, request, &response);
  };
  auto entries_of = [&](const std::string& request_id) {
    return Count("fr-1", "SELECT count(*) FROM audit_log WHERE request_id = $1", request_id);
  };
  {
    // The patient's consents cannot be counted while this lock is held.
    pqxx::connection hold(ConnInfo("fr-1"));
    pqxx::work locked(hold);
    locked.exec0("LOCK TABLE consents IN ACCESS EXCLUSIVE MODE");
    // As many reports as the tenant may run at once, one after the other: each must give its
    // place back for the next to be let in at all.
    for (int i = 0; i < kMaxReportsPerTenant + 1; ++i) {
      const std::string request_id = absl::StrCat("report-past-bound-", i);
      const grpc::Status status = report(request_id);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << request_id;
      EXPECT_THAT(status.error_message(),
                  HasSubstr("the report's statement in the patient's home region fr-1 was "
                            "cancelled; its bound is 2s"))
          << request_id;
      EXPECT_THAT(status.error_message(), HasSubstr("nothing was audited")) << request_id;
    }
    const grpc::Status zero = report("report-zero-bound", unbounded.server.get());
    EXPECT_EQ(zero.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    EXPECT_THAT(zero.error_message(), HasSubstr("was cancelled; its bound is 1ms"));
  }
  for (int i = 0; i < kMaxReportsPerTenant + 1; ++i) {
    EXPECT_EQ(entries_of(absl::StrCat("report-past-bound-", i)), 0) << i;
  }
  // Once the shard answers in time, the same report is made and audited.
  const grpc::Status answered = report("report-within-bound");
  EXPECT_TRUE(answered.ok()) << answered.error_message();
  EXPECT_EQ(entries_of("report-within-bound"), 1);
}

// Random shares, extensions and revocations of one record among four practitioners of its
// tenant (the owner and three others), each followed by a download attempt by everyone: a
// download is allowed exactly while the model says the downloader holds an active grant (or owns
// the record). The model is the API's: the owner or an active grantee may share; an active grant
// is extended only by the owner or its sharer, and becomes the extender's; a grant is revoked by
// the owner or its sharer, and with it every grant its grantee shared on, and theirs, but not the
// owner's. Seeded (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(SharingTest, RandomSharesAndRevocationsAllowExactlyTheActiveGrantees) {
  const uint64_t seed = testing::FuzzSeed();
  const std::string patient = Place(absl::StrCat("random-shares-", seed % 100000), "FR");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "shared around";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  ASSERT_FALSE(record.empty());
  const TestCert* as[4] = {&pki_->practitioner(), &Cert("acme-p2"), &Cert("acme-p3"),
                           &Cert("acme-p4")};
  const std::string id[4] = {P1(), P2(), P3(), Id("/tenant/acme/practitioner/p-4")};
  // Expiries are whole hours after t0, so that the model compares them exactly.
  const absl::Time t0 = absl::FromUnixSeconds(absl::ToUnixSeconds(absl::Now()));
  // The first share waits for the consent to reach the sharing service's cache.
  ASSERT_TRUE(ShareOnceConsented(*as[0], record, id[1], t0 + absl::Hours(24)).ok());
  struct Grant {
    int sharer = 0;
    bool active = false;
    int64_t hours = 0;  // expires at t0 + hours
  };
  std::map<int, Grant> grants = {{1, {0, true, 24}}};
  int onward_revoked = 0;   // grants revoked with the one they rested on
  int further_revoked = 0;  // ... with one that rested on another
  std::function<void(int, int)> cascade = [&](int grantee, int depth) {
    for (auto& [other, g] : grants) {
      if (g.active && g.sharer == grantee) {
        g.active = false;
        ++(depth == 1 ? onward_revoked : further_revoked);
        cascade(other, depth + 1);
      }
    }
  };
  const int rounds = testing::FuzzRounds(60);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    // Chains of grantees sharing on, and their revocations, are what the model is for: half the
    // shares are a grantee's, and revocations aim at active grants.
    std::vector<int> active;
    std::vector<int> inactive;
    std::vector<int> shared_on;  // active grantees with active grants of their own making
    for (int p = 1; p <= 3; ++p) {
      (grants[p].active ? active : inactive).push_back(p);
    }
    for (int p : active) {
      for (const auto& [other, g] : grants) {
        if (g.active && g.sharer == p) {
          shared_on.push_back(p);
          break;
        }
      }
    }
    auto pick = [&](const std::vector<int>& from) {
      return from[testing::Uniform(rng, 0, from.size() - 1)];
    };
    const bool share = active.empty() || testing::Uniform(rng, 0, 4) < 3;
    int actor = static_cast<int>(testing::Uniform(rng, 0, 3));
    int target = static_cast<int>(testing::Uniform(rng, 1, 3));
    if (share) {
      if (!active.empty() && testing::Uniform(rng, 0, 2) != 0) actor = pick(active);
      if (!inactive.empty() && testing::Uniform(rng, 0, 2) != 0) target = pick(inactive);
    } else {
      target = !shared_on.empty() && testing::Uniform(rng, 0, 1) == 0 ? pick(shared_on)
                                                                      : pick(active);
      if (testing::Uniform(rng, 0, 1) == 0) actor = 0;
    }
    if (target == actor) target = target % 3 + 1;
    std::string what;
    if (share) {
      // A grantee's share mostly within its own grant's time.
      const int64_t hours =
          actor != 0 && grants[actor].active && testing::Uniform(rng, 0, 4) != 0
              ? static_cast<int64_t>(testing::Uniform(rng, 1, grants[actor].hours))
              : static_cast<int64_t>(testing::Uniform(rng, 1, 48));
      what = absl::StrCat("p", actor + 1, " shares with p", target + 1, " for ", hours, " h");
      auto shared = Share(*as[actor], record, id[target], t0 + absl::Hours(hours));
      Grant& g = grants[target];
      if (actor != 0 && !grants[actor].active) {
        EXPECT_EQ(shared.status().code(), absl::StatusCode::kPermissionDenied)
            << what << ": " << shared.status();
      } else if (actor != 0 && ((g.active && g.sharer != actor) || hours > grants[actor].hours)) {
        // Another's grant to extend, or past the sharer's own grant.
        EXPECT_EQ(shared.status().code(), absl::StatusCode::kFailedPrecondition)
            << what << ": " << shared.status();
      } else {
        EXPECT_TRUE(shared.ok()) << what << ": " << shared.status();
        g = {actor, true, g.active ? std::max(g.hours, hours) : hours};  // never shortened
        if (shared.ok()) {
          EXPECT_EQ(absl::FromUnixSeconds(shared->expires_at().seconds()),
                    t0 + absl::Hours(g.hours))
              << what;
        }
      }
    } else {
      if (!grants[target].active) continue;  // revoking a revoked grant is idempotent: not asked
      what = absl::StrCat("p", actor + 1, " revokes p", target + 1, "'s grant");
      auto revoked = RevokeByGrantee(*as[actor], record, id[target]);
      if (actor != 0 && grants[target].sharer != actor) {
        EXPECT_EQ(revoked.status().code(), absl::StatusCode::kPermissionDenied)
            << what << ": " << revoked.status();
      } else {
        EXPECT_TRUE(revoked.ok()) << what << ": " << revoked.status();
        grants[target].active = false;
        cascade(target, 1);
      }
    }
    SCOPED_TRACE(what);
    for (int reader = 0; reader < 4; ++reader) {
      const Downloaded got = Download(*as[reader], record);
      const bool allowed = reader == 0 || grants[reader].active;
      EXPECT_EQ(got.status.ok(), allowed)
          << "p" << reader + 1 << ": " << got.status.error_message();
      if (!allowed) {
        EXPECT_EQ(got.status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
            << "p" << reader + 1 << ": " << got.status.error_message();
      }
    }
    if (HasFailure()) break;
  }
  std::printf("grants revoked with the one they rested on: %d, further down: %d\n", onward_revoked,
              further_revoked);
  // What the model is for happened (60 rounds of the default seed revoke several grants with the
  // ones they rested on; a short replay need not).
  if (rounds >= 60) {
    EXPECT_GT(onward_revoked, 0) << "no revocation took a grant shared on with it";
  }
}

// A patient's key is created by the first upload that stores a record, in that record's
// transaction: an upload that fails, even after the key was written, leaves no key behind, and
// concurrent first uploads end up with one key.
TEST_F(SharingTest, FailedUploadsLeaveNoPatientKeyAndFirstUploadsShareOne) {
  const std::string patient = Place("first-key-1", "FR");
  const int64_t before = StoredRows();
  auto keys = [&](const std::string& which) {
    return Count("fr-1",
                 absl::StrCat("SELECT count(*) FROM record_keys WHERE patient_id = $1 AND ",
                              which),
                 patient);
  };
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(61, 0, 3 * kMiB + 5);  // several storage chunks
  spec.chunk_bytes = kMiB;
  UploadSpec bad_hash = spec;
  bad_hash.declared_sha = Sha("not this");
  EXPECT_EQ(Upload(pki_->practitioner(), bad_hash).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  UploadSpec single = spec;
  single.content = Generate(62, 0, 1000);
  single.declared_size = 1001;
  EXPECT_EQ(Upload(pki_->practitioner(), single).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(keys("true"), 0);

  // A failure after the key's insert, in the statement that stores the record.
  Exec("fr-1",
       absl::StrCat("CREATE FUNCTION refuse_test_record() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF NEW.patient_id = '",
                    patient,
                    "' THEN RAISE EXCEPTION USING ERRCODE = 'MG001', MESSAGE = 'injected failure'; "
                    "END IF; RETURN NEW; END $$"));
  Exec("fr-1",
       "CREATE TRIGGER refuse_test_record BEFORE INSERT ON records FOR EACH ROW "
       "EXECUTE FUNCTION refuse_test_record()");
  for (const UploadSpec* attempt : {&spec, &single}) {
    UploadSpec whole = *attempt;
    whole.declared_size.reset();
    grpc::Status failed = Upload(pki_->practitioner(), whole);
    EXPECT_FALSE(failed.ok());
    EXPECT_THAT(failed.error_message(), HasSubstr("database error MG001: "));
  }
  Exec("fr-1", "DROP TRIGGER refuse_test_record ON records");
  Exec("fr-1", "DROP FUNCTION refuse_test_record()");
  EXPECT_EQ(keys("true"), 0);
  EXPECT_EQ(StoredRows(), before);  // no record, chunk or key anywhere

  // Concurrent first uploads: every one stored, under the one key the first commit created.
  constexpr int kUploads = 4;
  std::vector<std::string> ids(kUploads);
  std::vector<std::thread> uploads;
  for (int i = 0; i < kUploads; ++i) {
    uploads.emplace_back([&, i] {
      UploadSpec mine = single;
      mine.declared_size.reset();
      mine.content = Generate(70 + i, 0, 1000 + i);
      v1::UploadRecordResponse response;
      grpc::Status status = Upload(pki_->practitioner(), mine, &response);
      EXPECT_TRUE(status.ok()) << status.error_message();
      ids[i] = response.record_id();
    });
  }
  for (std::thread& t : uploads) t.join();
  EXPECT_EQ(keys("record_id IS NULL"), 1);
  EXPECT_EQ(keys("record_id IS NOT NULL"), kUploads);
  for (int i = 0; i < kUploads; ++i) {
    Downloaded d = Download(pki_->practitioner(), ids[i]);
    ASSERT_TRUE(d.status.ok()) << d.status.error_message();
    EXPECT_EQ(d.content, Generate(70 + i, 0, 1000 + i));
  }
}

// A one-chunk upload takes a connection only to store its record: with one upload connection to
// the region, a client still sending does not keep another's upload from being stored.
// An upload asks the tenant gate, which counts the tenant's calls, once: with a burst of two
// calls, two uploads in a row are stored (counted at its start and again at its header, the first
// left nothing for the second). Past the rate an upload is refused, saying why.
TEST_F(SharingTest, AnUploadCountsOnceAgainstItsTenantsCallRate) {
  ExtraSharing extra = StartSharingOn(
      ConfigWith("limits: {drain_seconds: 1}",
                 "limits: {drain_seconds: 1, tenant_calls_per_second: 1, tenant_call_burst: 2}"));
  ASSERT_NE(extra.server, nullptr);
  const std::string patient = Place("call-rate-1", "FR");
  auto upload = [&](int i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = absl::StrCat("upload ", i);
    return Upload(pki_->practitioner(), spec, nullptr, extra.server->port());
  };
  for (int i = 0; i < 2; ++i) {
    grpc::Status status = upload(i);
    EXPECT_TRUE(status.ok()) << i << ": " << status.error_message();
  }
  grpc::Status refused;
  for (int i = 2; i < 50 && refused.ok(); ++i) refused = upload(i);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("limits.tenant_calls_per_second"));
  extra.server->Shutdown();
}

// A data report counts as 10 calls against its tenant's rate: with 10 calls a second after a
// burst of 30, the tenant runs about 3 in a row before one is refused (well before 30, as one
// call each would allow, unless each report took about a second).
TEST_F(SharingTest, ADataReportCountsAsTenCallsAgainstItsTenantsCallRate) {
  ExtraSharing extra = StartSharingOn(
      ConfigWith("limits: {drain_seconds: 1}",
                 "limits: {drain_seconds: 1, tenant_calls_per_second: 10, tenant_call_burst: 30}"));
  ASSERT_NE(extra.server, nullptr);
  const std::string patient = Place("data-report-rate", "FR");
  int reported = 0;
  absl::Status refused;
  for (int i = 0; i < 50 && refused.ok(); ++i) {
    absl::StatusOr<v1::PatientDataReportResponse> r =
        DataReport(pki_->app(), patient, extra.server->audit_port());
    if (r.ok()) {
      ++reported;
    } else {
      refused = r.status();
    }
  }
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_THAT(std::string(refused.message()), HasSubstr("limits.tenant_calls_per_second"));
  EXPECT_GE(reported, 3);
  EXPECT_LE(reported, 10) << "each report counted as more than one call";
  extra.server->Shutdown();
}

// The consent section's cache bounds (consent.cache.*) are sharing's too: with room for one
// patient, uploads for two patients keep at most one cached.
TEST_F(SharingTest, TheConsentCacheHasTheConfiguredBounds) {
  ExtraSharing extra = StartSharingOn(ConfigWith(
      "limits: {drain_seconds: 1}\n", "limits: {drain_seconds: 1}\nconsent: {cache: {max_patients: 1}}\n"));
  ASSERT_NE(extra.server, nullptr);
  for (const char* ref : {"cache-bound-1", "cache-bound-2"}) {
    UploadSpec spec;
    spec.patient_id = Place(ref, "FR");
    spec.content = absl::StrCat("a record of ", ref);
    UploadOk(pki_->practitioner(), spec, extra.server->port());
  }
  const consent::ConsentCacheStats stats = extra.server->consent_cache().Stats();
  EXPECT_GE(stats.loads, 2u);
  EXPECT_LE(stats.entries, 1u);
  extra.server->Shutdown();
}

TEST_F(SharingTest, AOneChunkUploadHoldsNoConnectionWhileItIsSent) {
  ExtraSharing extra = StartSharingOn(
      ConfigWith("acquire_timeout_ms: 1000}}", "acquire_timeout_ms: 1000, pool_size: 1}}"));
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  const std::string patient = Place("one-connection-1", "FR");
  UploadSpec slow;
  slow.patient_id = patient;
  slow.content = Generate(91, 0, 2000);
  slow.chunk_bytes = 1000;
  grpc::Status other_status;
  v1::UploadRecordResponse other_response;
  slow.before_chunk = [&](uint64_t offset) {
    if (offset != 1000) return;
    // The slow upload has started (its first piece is held in memory): another one now.
    ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return extra.server->core().buffered_bytes() >= 1000; }));
    UploadSpec other;
    other.patient_id = patient;
    other.content = "stored while the other is still being sent";
    other_status = Upload(pki_->practitioner(), other, &other_response, port);
  };
  v1::UploadRecordResponse slow_response;
  grpc::Status slow_status = Upload(pki_->practitioner(), slow, &slow_response, port);
  EXPECT_TRUE(other_status.ok()) << other_status.error_message();
  EXPECT_TRUE(slow_status.ok()) << slow_status.error_message();
  extra.server->Shutdown();
  for (const auto& [record, content] :
       {std::make_pair(other_response.record_id(),
                       std::string("stored while the other is still being sent")),
        std::make_pair(slow_response.record_id(), slow.content)}) {
    Downloaded d = Download(pki_->practitioner(), record);
    ASSERT_TRUE(d.status.ok()) << d.status.error_message();
    EXPECT_EQ(d.content, content);
  }
}

// A client that keeps sending, but too little to matter, is not let hold its upload for good:
// past the idle timeout the upload must average the minimum rate, or it ends and stores nothing.
TEST_F(SharingTest, AnUploadTricklingUnderTheMinimumRateEndsAndStoresNothing) {
  ExtraSharing extra = StartSharingWith(
      "upload_idle_timeout_seconds: 2\n  upload_min_bytes_per_second: 100000");
  ASSERT_NE(extra.server, nullptr);
  const std::string patient = Place("trickle-1", "FR");
  auto records = [&] {
    return Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient);
  };
  UploadSpec trickle;
  trickle.patient_id = patient;
  trickle.content = Generate(93, 0, 20000);
  trickle.chunk_bytes = 1000;
  // A piece every 300 ms: never idle for the 2 s the server allows (unless the machine stalls
  // for 1.7 s), but about 3 KB/s.
  trickle.before_chunk = [](uint64_t) { absl::SleepFor(absl::Milliseconds(300)); };
  grpc::Status status = Upload(pki_->practitioner(), trickle, nullptr, extra.server->port());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("under the minimum of 100000"));
  EXPECT_THAT(status.error_message(), HasSubstr("nothing was stored"));
  EXPECT_EQ(records(), 0);
  // The same record at full speed, in one piece, is stored.
  UploadSpec quick = trickle;
  quick.before_chunk = nullptr;
  quick.chunk_bytes = trickle.content.size();
  EXPECT_TRUE(Upload(pki_->practitioner(), quick, nullptr, extra.server->port()).ok());
  extra.server->Shutdown();
  EXPECT_EQ(records(), 1);
}

// A tenant's uploads to a region are bounded (sharing.max_uploads_per_tenant): one more is refused
// retryably while they run, and let in once one ends.
TEST_F(SharingTest, ATenantsUploadsInProgressAreBounded) {
  ExtraSharing extra = StartSharingWith("max_uploads_per_tenant: 1");
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  const std::string patient = Place("per-tenant-1", "FR");
  UploadSpec running;
  running.patient_id = patient;
  running.content = Generate(95, 0, 2000);
  running.chunk_bytes = 1000;
  UploadSpec another;
  another.patient_id = patient;
  another.content = "one upload too many";
  grpc::Status refused;
  running.before_chunk = [&](uint64_t offset) {
    if (offset != 1000) return;
    ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return extra.server->core().buffered_bytes() >= 1000; }));
    refused = Upload(Cert("acme-p2"), another, nullptr, port);
  };
  EXPECT_TRUE(Upload(pki_->practitioner(), running, nullptr, port).ok());
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("sharing.max_uploads_per_tenant"));
  EXPECT_TRUE(Upload(Cert("acme-p2"), another, nullptr, port).ok());
  extra.server->Shutdown();
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 2);
}

// On SIGTERM the sharing binary drains its sharing and audit servers at once, so that stopping
// takes one drain period, which is what a pod's grace period allows for: the audit server stops
// while an upload is still being stored, and the upload completes.
TEST_F(SharingTest, ATerminationSignalDrainsSharingAndAuditAtOnce) {
  ExtraSharing extra =
      StartSharingOn(ConfigWith("limits: {drain_seconds: 1}", "limits: {drain_seconds: 120}"));
  ASSERT_NE(extra.server, nullptr);
  std::shared_ptr<grpc::Channel> audit =
      Channel(extra.server->audit_port(), pki_->practitioner(), "audit");
  ASSERT_TRUE(test_support::WaitForHealth(audit, test_support::Health::kServing,
                                          absl::Now() + kPatience)
                  .ok());
  auto main_thread = std::make_unique<MainThread>(*extra.server);
  // Holding the audit chain's head stops the upload in its last statement, in progress.
  const std::string patient = Place("drain-together-1", "FR");
  pqxx::connection holder(ConnInfo("fr-1"));
  auto head = std::make_unique<pqxx::work>(holder);
  ASSERT_EQ(head->exec("SELECT 1 FROM audit_head FOR UPDATE").size(), 1u);
  UploadSpec upload;
  upload.patient_id = patient;
  upload.content = Generate(97, 0, 1000);
  grpc::Status uploaded;
  std::thread uploading(
      [&] { uploaded = Upload(pki_->practitioner(), upload, nullptr, extra.server->port()); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", kRecordStatementQuery) == 1; }));
  main_thread->Terminate();
  // Well within the statement's timeout (5 s), so that the upload is still being drained.
  const bool audit_stopped = PollUntil(absl::Now() + absl::Seconds(3), [&] {
    absl::StatusOr<test_support::Health> health =
        test_support::CheckHealth(audit, absl::Seconds(1));
    return !health.ok() || *health != test_support::Health::kServing;
  });
  head.reset();  // rolls back: the upload stores its record
  uploading.join();
  main_thread.reset();
  EXPECT_TRUE(audit_stopped) << "the audit server kept serving while the sharing server drained";
  EXPECT_TRUE(uploaded.ok()) << uploaded.error_message();
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 1);
}

// A stop drains an upload whose client is still sending: it may pause between two messages (here
// 1 s) and still have its record stored. (A call that reaches the server as it stops, before a
// handler has taken it, is cancelled by gRPC without reaching the service, and stores nothing:
// the stop comes once the service holds the upload.)
TEST_F(SharingTest, AnUploadStillBeingSentWhenTheServiceStopsIsStored) {
  ExtraSharing extra =
      StartSharingOn(ConfigWith("limits: {drain_seconds: 1}", "limits: {drain_seconds: 120}"));
  ASSERT_NE(extra.server, nullptr);
  auto main_thread = std::make_unique<MainThread>(*extra.server);
  const std::string patient = Place("drain-sending-1", "FR");
  UploadSpec upload;
  upload.patient_id = patient;
  upload.content = Generate(99, 0, 2000);
  upload.chunk_bytes = 1000;
  upload.before_chunk = [&](uint64_t offset) {
    if (offset != 1000) return;
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
      return extra.server->core().UploadsInProgress("acme", "fr-1") == 1;
    }));
    main_thread->Terminate();
    absl::SleepFor(absl::Seconds(1));
  };
  const grpc::Status status = Upload(pki_->practitioner(), upload, nullptr, extra.server->port());
  main_thread.reset();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 1);
}

// A client that opens an upload and stops sending: the server ends the stream after the idle
// timeout, saying so, and keeps nothing of it.
TEST_F(SharingTest, IdleUploadsEndWithDeadlineExceededAndStoreNothing) {
  ExtraSharing extra = StartSharingOn(ConfigWithOneSecondUploadIdleTimeout());
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  const std::string patient = Place("idle-upload-1", "FR");
  const int64_t before = StoredRows();
  const int64_t audited = Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1",
                                patient);

  struct Case {
    std::string name;
    uint64_t declared_size;
    bool send_header;
    int chunks;  // of 1 MiB, sent before going quiet
  };
  for (const Case& c : std::vector<Case>{{"nothing at all", 0, false, 0},
                                         {"header only", 1000, true, 0},
                                         {"a chunk of three", 3 * kMiB, true, 1}}) {
    grpc::ClientContext context;
    // Far later than the server's idle timeout: the client's own deadline must not be what ends it.
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    v1::UploadRecordResponse response;
    auto stub = Stub(pki_->practitioner(), port);
    auto writer = stub->UploadRecord(&context, &response);
    if (c.send_header) {
      v1::UploadRecordRequest header;
      header.mutable_header()->set_patient_id(patient);
      header.mutable_header()->set_kind(v1::RECORD_KIND_DOCUMENT);
      header.mutable_header()->set_content_type("text/plain");
      header.mutable_header()->set_file_name("quiet.txt");
      header.mutable_header()->set_size_bytes(c.declared_size);
      header.mutable_header()->set_sha256(std::string(32, 'x'));
      ASSERT_TRUE(writer->Write(header)) << c.name;
    }
    for (int i = 0; i < c.chunks; ++i) {
      v1::UploadRecordRequest chunk;
      chunk.mutable_chunk()->set_data(Generate(80 + i, 0, kMiB));
      ASSERT_TRUE(writer->Write(chunk)) << c.name;
    }
    // The client now waits for the server without sending anything more.
    grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
        << c.name << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("the upload sent nothing for 1s")) << c.name;
    EXPECT_THAT(status.error_message(), HasSubstr("nothing was stored")) << c.name;
  }
  extra.server->Shutdown();
  EXPECT_EQ(StoredRows(), before);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient),
            audited);
  EXPECT_TRUE(ListedIds(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient).empty());
}

// The shard's own bound on an upload's open transaction, for when nothing above it ends an idle
// upload (the idle watch belongs to the gRPC adapter; the core is called directly here): the
// shard ends the session, the upload fails and stores nothing, and the next upload gets a
// working connection.
TEST_F(SharingTest, AnUploadIdlePastTheShardsBoundFailsAndTheNextUploadWorks) {
  std::unique_ptr<MedgateConfig> config = ConfigWithOneSecondUploadIdleTimeout();
  auto server = SharingServer::Create(*config);
  ASSERT_TRUE(server.ok()) << server.status();
  SharingCore& core = (*server)->core();
  const std::string patient = Place("idle-transaction-1", "FR");
  const int64_t before = StoredRows();
  absl::StatusOr<Principal> practitioner =
      ParseSpiffeId(pki_->SpiffeId("/tenant/acme/practitioner/p-1"), pki_->trust_domain());
  ASSERT_TRUE(practitioner.ok()) << practitioner.status();
  const CallContext ctx{*practitioner, "idle-transaction", "test"};
  const std::string content = Generate(90, 0, 3 * kMiB);
  UploadHeader header{patient, RecordKind::kDocument, "text/plain", "slow.txt", content.size(),
                      Sha(content), ""};

  const std::vector<int> earlier = IdleUploadSessions("fr-1");
  absl::StatusOr<std::unique_ptr<sharing::Upload>> slow = core.StartUpload(ctx, header);
  ASSERT_TRUE(slow.ok()) << slow.status();
  ASSERT_TRUE((*slow)->Write(absl::string_view(content).substr(0, kMiB)).ok());
  // The shard lets the transaction sit idle for the idle timeout and the service's 10 s grace,
  // then ends the session.
  // (The chunk's insert may still be running: the session is idle once it is done.)
  int upload_pid = 0;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    upload_pid = NewIdleUploadSession("fr-1", earlier);
    return upload_pid != 0;
  }));
  ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(1 + 10) + kPatience,
                        [&] { return SessionState("fr-1", upload_pid).empty(); }))
      << "session state '" << SessionState("fr-1", upload_pid) << "'";
  absl::Status status = (*slow)->Write(absl::string_view(content).substr(kMiB, kMiB));
  if (status.ok()) status = (*slow)->Write(absl::string_view(content).substr(2 * kMiB));
  if (status.ok()) status = (*slow)->Finish().status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  slow->reset();
  EXPECT_EQ(StoredRows(), before);
  EXPECT_TRUE(ListedIds(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient).empty());

  absl::StatusOr<std::unique_ptr<sharing::Upload>> next = core.StartUpload(ctx, header);
  ASSERT_TRUE(next.ok()) << next.status();
  for (size_t off = 0; off < content.size(); off += kMiB) {
    ASSERT_TRUE((*next)->Write(absl::string_view(content).substr(off, kMiB)).ok());
  }
  absl::StatusOr<UploadResult> stored = (*next)->Finish();
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->size_bytes, content.size());
  EXPECT_GT(StoredRows(), before);
}

// A client that keeps sending, but so slowly that a storage chunk (1 MiB) takes longer to fill
// than the shard lets the upload's transaction sit idle (the idle timeout and the 10 s grace),
// is within every bound of the service: its upload is stored.
TEST_F(SharingTest, AnUploadSlowerThanTheShardsIdleBoundButSendingIsStored) {
  ExtraSharing extra = StartSharingOn(ConfigWithOneSecondUploadIdleTimeout());
  ASSERT_NE(extra.server, nullptr);
  const std::string patient = Place("slow-steady-upload-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(91, 0, kMiB + 1024);  // two storage chunks: the transaction is open
  spec.chunk_bytes = 16 * 1024;
  // 66 pieces 0.2 s apart: about 13 s for the first MiB (the shard's bound is 1 + 10 s), never
  // idle for the service's 1 s, and 80 KiB/s, over its 16 KiB/s minimum.
  spec.before_chunk = [](uint64_t offset) {
    if (offset > 0) absl::SleepFor(absl::Milliseconds(200));
  };
  v1::UploadRecordResponse response;
  grpc::Status status = Upload(pki_->practitioner(), spec, &response, extra.server->port());
  ASSERT_TRUE(status.ok()) << status.error_message();
  Downloaded got = Download(pki_->practitioner(), response.record_id());
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.content, spec.content);
}

TEST_F(SharingTest, TenantQuotaLimitsStoredBytes) {
  const std::string patient = Place("tiny-1", "FR", &Cert("tiny-app"));
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(9, 0, 2 * kMiB);
  const std::string first = UploadOk(Cert("tiny-p"), spec);
  ASSERT_FALSE(first.empty());
  const int64_t before = StoredRows();
  grpc::Status refused = Upload(Cert("tiny-p"), spec);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("limit of 3145728 bytes"));
  EXPECT_EQ(StoredRows(), before);
  // Other tenants are not limited by tiny's quota.
  UploadSpec other;
  other.patient_id = Place("quota-other-1", "FR");
  other.content = spec.content;
  EXPECT_FALSE(UploadOk(pki_->practitioner(), other).empty());
  // An erasure gives the bytes back: the same upload is stored now.
  ASSERT_TRUE(Erase(Cert("tiny-p"), first, "made room").ok());
  EXPECT_FALSE(UploadOk(Cert("tiny-p"), spec).empty());
  // The per-tenant counts the quota reads are the sums of the tenants' records, in every region.
  for (const char* region : {"fr-1", "de-1", "eu-1"}) {
    EXPECT_EQ(UsageCountsOff(region), 0) << region;
  }
}

// A tenant's quota holds for all its regions together: what it stores in one region counts
// against an upload in another once the service has read it (as it starts, then every 10 s;
// here also when the test folds), and an erasure there gives the room back.
TEST_F(SharingTest, ATenantsQuotaCountsItsRecordsInEveryRegion) {
  const std::string in_france = Place("quota-regions-fr", "FR");
  const std::string in_germany = Place("quota-regions-de", "DE");
  int64_t used = 0;
  for (const char* region : {"fr-1", "de-1", "eu-1"}) used += TenantUsage(region, "acme");
  // A MiB in de-1 (through the stack's server), then room for half a MiB more, wherever it goes.
  UploadSpec german;
  german.patient_id = in_germany;
  german.content = Generate(140, 0, kMiB);
  const std::string stored = UploadOk(pki_->practitioner(), german);
  ASSERT_FALSE(stored.empty());
  const int64_t quota = used + kMiB + kMiB / 2;
  ExtraSharing extra = StartSharingOn(ConfigWith(
      "tenant_quotas: {tiny: ", absl::StrCat("tenant_quotas: {acme: ", quota, ", tiny: ")));
  ASSERT_NE(extra.server, nullptr);
  SharingCore& core = extra.server->core();
  // Read as the server started, before it served.
  ASSERT_GE(TenantUsage("de-1", "acme"), static_cast<int64_t>(kMiB));
  EXPECT_EQ(core.LimitIn("acme", "fr-1").elsewhere,
            TenantUsage("de-1", "acme") + TenantUsage("eu-1", "acme"));

  UploadSpec french;
  french.patient_id = in_france;
  french.content = Generate(141, 0, kMiB);
  const int64_t before = StoredRows();
  grpc::Status refused = Upload(pki_->practitioner(), french, nullptr, extra.server->port());
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(),
              HasSubstr(absl::StrCat(" in its other regions; adding ", kMiB,
                                     " would exceed its limit of ", quota, " bytes")));
  EXPECT_EQ(StoredRows(), before);
  // So is a record of several chunks, as it starts.
  UploadSpec larger = french;
  larger.content = Generate(144, 0, 2 * kMiB);
  refused = Upload(pki_->practitioner(), larger, nullptr, extra.server->port());
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr(" in its other regions; adding 2097152 "));
  EXPECT_EQ(StoredRows(), before);

  ASSERT_TRUE(Erase(pki_->practitioner(), stored, "made room").ok());
  ASSERT_TRUE(core.FoldTenantUsage().ok());
  EXPECT_FALSE(UploadOk(pki_->practitioner(), french, extra.server->port()).empty());
  // fr-1's own records are not counted as elsewhere for it.
  ASSERT_TRUE(core.FoldTenantUsage().ok());
  ASSERT_GE(TenantUsage("fr-1", "acme"), static_cast<int64_t>(kMiB));
  const QuotaLimit limit = core.LimitIn("acme", "fr-1");
  EXPECT_EQ(limit.quota, quota);
  EXPECT_EQ(limit.elsewhere, TenantUsage("de-1", "acme") + TenantUsage("eu-1", "acme"));

  // Half a MiB is left. An upload started while it was is refused at its end if another region
  // took the room meanwhile: the record's own statement (the patient's key is cached) checks
  // fr-1's part.
  absl::StatusOr<Principal> practitioner =
      ParseSpiffeId(pki_->SpiffeId("/tenant/acme/practitioner/p-1"), pki_->trust_domain());
  ASSERT_TRUE(practitioner.ok()) << practitioner.status();
  const CallContext ctx{*practitioner, "quota-regions-late", "test"};
  const std::string late = Generate(142, 0, 400 * 1024);
  absl::StatusOr<std::unique_ptr<sharing::Upload>> pending = core.StartUpload(
      ctx, {in_france, RecordKind::kDocument, "text/plain", "late.txt", late.size(), Sha(late),
            ""});
  ASSERT_TRUE(pending.ok()) << pending.status();
  german.content = Generate(143, 0, 300 * 1024);
  ASSERT_FALSE(UploadOk(pki_->practitioner(), german, extra.server->port()).empty());
  ASSERT_TRUE(core.FoldTenantUsage().ok());
  const int64_t before_late = StoredRows();
  ASSERT_TRUE((*pending)->Write(late).ok());
  absl::StatusOr<UploadResult> finished = (*pending)->Finish();
  EXPECT_EQ(finished.status().code(), absl::StatusCode::kResourceExhausted) << finished.status();
  pending->reset();
  EXPECT_EQ(StoredRows(), before_late);
  // Other tenants have the default quota. A region's part is what the others leave, none or
  // less when they hold it all (no record fits), and no limit without a quota.
  EXPECT_EQ(core.LimitIn("globex", "fr-1").quota, kDefaultTenantQuotaBytes);
  EXPECT_EQ((QuotaLimit{100, 99}.room_here()), std::optional<int64_t>(1));
  EXPECT_EQ((QuotaLimit{100, 100}.room_here()), std::optional<int64_t>(0));
  EXPECT_EQ((QuotaLimit{100, 250}.room_here()), std::optional<int64_t>(-150));
  EXPECT_EQ((QuotaLimit{0, 250}.room_here()), std::nullopt);
}

// Once a tenant's other regions hold more than its whole quota (a region's room is then below
// zero), no record fits in the region, however small: the record's statement refuses it, also
// for a patient whose key is cached.
TEST_F(SharingTest, NoRecordFitsARegionWhoseRoomTheOtherRegionsTook) {
  const std::string in_france = Place("quota-taken-fr", "FR", &pki_->globex_app());
  const std::string in_germany = Place("quota-taken-de", "DE", &pki_->globex_app());
  int64_t used = 0;
  for (const char* region : {"fr-1", "de-1", "eu-1"}) used += TenantUsage(region, "globex");
  const int64_t quota = used + 1000;  // room for the first record below, in any region
  ExtraSharing extra = StartSharingOn(ConfigWith(
      "tenant_quotas: {tiny: ", absl::StrCat("tenant_quotas: {globex: ", quota, ", tiny: ")));
  ASSERT_NE(extra.server, nullptr);
  UploadSpec french;
  french.patient_id = in_france;
  french.content = Generate(152, 0, 1000);
  ASSERT_FALSE(UploadOk(pki_->globex_practitioner(), french, extra.server->port()).empty());
  // The stack's server (the default quota) stores more in de-1 than fr-1 holds, which the extra
  // server reads at its next fold.
  UploadSpec german;
  german.patient_id = in_germany;
  german.content = Generate(153, 0, static_cast<size_t>(TenantUsage("fr-1", "globex")) + 4096);
  ASSERT_FALSE(UploadOk(pki_->globex_practitioner(), german).empty());
  SharingCore& core = extra.server->core();
  ASSERT_TRUE(core.FoldTenantUsage().ok());
  const std::optional<int64_t> room = core.LimitIn("globex", "fr-1").room_here();
  ASSERT_TRUE(room.has_value());
  ASSERT_LT(*room, 0);
  const int64_t before = StoredRows();
  french.content = "x";  // the patient's key is cached since the first upload
  grpc::Status refused =
      Upload(pki_->globex_practitioner(), french, nullptr, extra.server->port());
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(),
              HasSubstr(absl::StrCat("; adding 1 would exceed its limit of ", quota, " bytes")));
  EXPECT_EQ(StoredRows(), before);
  extra.server->Shutdown();
}

// A region that cannot be read as the server starts does not keep it from starting and serving;
// until a fold reads that region, what the tenant stores there counts as nothing.
TEST_F(SharingTest, AServerStartsWhileARegionsUsageCannotBeRead) {
  UploadSpec german;
  german.patient_id = Place("quota-region-down-de", "DE");
  german.content = Generate(146, 0, 1000);
  ASSERT_FALSE(UploadOk(pki_->practitioner(), german).empty());
  ASSERT_GT(TenantUsage("de-1", "acme"), 0);
  const std::string reachable = Db("de-1").ConnectionString();
  std::string unreachable = reachable;
  const size_t port_at = unreachable.find(" port=");
  ASSERT_NE(port_at, std::string::npos);
  unreachable.replace(port_at, unreachable.find(' ', port_at + 1) - port_at, " port=1");
  ExtraSharing extra = StartSharingOn(ConfigWith(reachable, unreachable));
  ASSERT_NE(extra.server, nullptr);
  SharingCore& core = extra.server->core();
  EXPECT_EQ(core.LimitIn("acme", "fr-1").elsewhere, TenantUsage("eu-1", "acme"));
  EXPECT_FALSE(core.FoldTenantUsage().ok());  // de-1's, named in the log
  EXPECT_EQ(core.LimitIn("acme", "fr-1").elsewhere, TenantUsage("eu-1", "acme"));
  UploadSpec spec;
  spec.patient_id = Place("quota-region-down-fr", "FR");
  spec.content = Generate(145, 0, 1000);
  EXPECT_FALSE(UploadOk(pki_->practitioner(), spec, extra.server->port()).empty());
}

// A retry of an upload already stored is answered even when the tenant has no room left for a
// second copy: its record already takes its room.
TEST_F(SharingTest, ARetryIsAnsweredWhenTheQuotaHasNoRoomForASecondCopy) {
  const std::string patient = Place("tiny-retry-1", "FR", &Cert("tiny-app"));
  const int64_t used =
      Count("fr-1", "SELECT coalesce(sum(size_bytes), 0) FROM records WHERE tenant_id = 'tiny'");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(130, 0, 500000);
  spec.request_id = "tiny-retry-upload";
  ASSERT_LE(used + static_cast<int64_t>(spec.content.size()), kTinyQuota);
  const std::string record = UploadOk(Cert("tiny-p"), spec);
  ASSERT_FALSE(record.empty());
  // What is left is less than another copy.
  const int64_t left = kTinyQuota - used - static_cast<int64_t>(spec.content.size());
  if (left > 1000) {
    UploadSpec filler;
    filler.patient_id = patient;
    filler.generated_size = static_cast<uint64_t>(left - 1000);
    filler.seed = 131;
    ASSERT_FALSE(UploadOk(Cert("tiny-p"), filler).empty());
  }
  UploadSpec another = spec;
  another.request_id = "tiny-retry-upload-2";
  EXPECT_EQ(Upload(Cert("tiny-p"), another).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  v1::UploadRecordResponse again;
  grpc::Status retried = Upload(Cert("tiny-p"), spec, &again);
  ASSERT_TRUE(retried.ok()) << retried.error_message();
  EXPECT_EQ(again.record_id(), record);
  // The same request id with another header is still refused for what it is.
  UploadSpec renamed = spec;
  renamed.file_name = "other.pdf";
  EXPECT_EQ(Upload(Cert("tiny-p"), renamed).error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

// The tenant's usage count is written at commit: an upload (its audit entry first, then its
// record) and an erasure of the same tenant (its delete first, then its entry) take the audit
// chain's head and the count in the same order, and do not deadlock.
// The shard's connection lost after it committed an upload, before the service heard so: the
// client is told the outcome is unknown and how to find out, never that nothing was stored; the
// record is there once, with its one audit entry, and can be read.
TEST_F(SharingTest, AnUploadWhoseCommitAnswerIsLostSaysItMayHaveBeenStored) {
  const std::string patient = Place("lost-commit-1", "FR");
  auto proxy = test_support::PgFaultProxy::Start(Db("fr-1").port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  const std::string direct = Db("fr-1").ConnectionString();
  ExtraSharing extra = StartSharingOn(ConfigWith(direct, (*proxy)->Via(direct)));
  ASSERT_NE(extra.server, nullptr);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(97, 0, 5000);
  (*proxy)->CutAtNextCommit(sql::kFinishUpload);
  grpc::Status lost = Upload(pki_->practitioner(), spec, nullptr, extra.server->port());
  EXPECT_EQ(lost.error_code(), grpc::StatusCode::UNAVAILABLE) << lost.error_message();
  EXPECT_THAT(lost.error_message(), HasSubstr("may or may not have been stored"));
  EXPECT_THAT(lost.error_message(), HasSubstr("list the patient's records"));
  EXPECT_EQ((*proxy)->cuts(), 1);

  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 1);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = 'create' "
                  "AND object_type = 'record'",
                  patient),
            1);
  absl::StatusOr<v1::ListRecordsResponse> listed =
      List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->records_size(), 1);
  Downloaded got = Download(pki_->practitioner(), listed->records(0).record_id());
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.content, spec.content);
  extra.server->Shutdown();
}

// The same when the record is one statement that commits by itself (a one-chunk upload, the
// patient's key cached; here for a tenant without a quota): the statement's answer is lost after
// its commit.
TEST_F(SharingTest, AOneStatementUploadWhoseAnswerIsLostSaysItMayHaveBeenStored) {
  const std::string patient = Place("lost-commit-2", "FR");
  auto proxy = test_support::PgFaultProxy::Start(Db("fr-1").port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  const std::string direct = Db("fr-1").ConnectionString();
  // fr-1 through the proxy, and no quota.
  ExtraSharing proxied = StartSharingOn(ConfigWith(
      {{direct, (*proxy)->Via(direct)},
       {"retention_sweep_seconds: 86400",
        "retention_sweep_seconds: 86400\n  tenant_quota_bytes: 0"}}));
  ASSERT_NE(proxied.server, nullptr);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(96, 0, 3000);
  UploadOk(pki_->practitioner(), spec, proxied.server->port());  // caches the patient's key
  spec.content = Generate(95, 0, 4000);
  spec.request_id = "lost-one-statement-1";
  // Sent by the record's statement only (in its audit entry's reason), not by the look-up of
  // the request id before it.
  (*proxy)->CutAtNextCommit("PERMITTED: bytes=4000 ");
  grpc::Status lost = Upload(pki_->practitioner(), spec, nullptr, proxied.server->port());
  EXPECT_EQ(lost.error_code(), grpc::StatusCode::UNAVAILABLE) << lost.error_message();
  EXPECT_THAT(lost.error_message(), HasSubstr("may or may not have been stored"));
  EXPECT_EQ((*proxy)->cuts(), 1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 2);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND action = 'create' "
                  "AND object_type = 'record' AND request_id = 'lost-one-statement-1'",
                  patient),
            1);
  // The retry the message suggests: answered with the record stored, nothing stored twice.
  v1::UploadRecordResponse retried;
  ASSERT_TRUE(Upload(pki_->practitioner(), spec, &retried, proxied.server->port()).ok());
  pqxx::connection c(direct);
  pqxx::nontransaction q(c);
  EXPECT_EQ(retried.record_id(),
            q.exec1("SELECT record_id FROM record_requests WHERE request_id = "
                    "'lost-one-statement-1'")[0]
                .c_str());
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 2);
  proxied.server->Shutdown();
}

// A one-chunk upload whose patient key is cached is one statement that commits by itself (here
// for a tenant without a quota, whose statement skips the usage lock). Its content is still
// checked against the declared hash before that statement: a mismatch stores nothing.
TEST_F(SharingTest, AOneStatementUploadIsStillCheckedFirst) {
  ExtraSharing extra = StartSharingWith("tenant_quota_bytes: 0");
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  UploadSpec spec;
  spec.patient_id = Place("no-quota-1", "FR");
  spec.content = Generate(98, 0, 7000);
  const std::string first = UploadOk(pki_->practitioner(), spec, port);  // caches the key
  const int64_t before = StoredRows();
  const auto entries = [&] {
    return Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", spec.patient_id);
  };
  const int64_t entries_before = entries();
  ASSERT_GE(entries_before, 1);  // the first upload's
  UploadSpec bad = spec;
  bad.declared_sha = Sha("other content");
  bad.request_id = "checked-first";
  grpc::Status refused = Upload(pki_->practitioner(), bad, nullptr, port);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("does not match header.sha256"));
  EXPECT_EQ(StoredRows(), before);
  EXPECT_EQ(entries(), entries_before);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id = $1",
                  bad.request_id),
            0);
  spec.content = Generate(99, 0, 9000);
  const std::string second = UploadOk(pki_->practitioner(), spec, port);
  EXPECT_EQ(StoredRows(), before + 3);  // the record, its chunk, its key
  Downloaded got = Download(pki_->practitioner(), second);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.content, spec.content);
  extra.server->Shutdown();
}

TEST_F(SharingTest, AnUploadAndAnErasureOfOneTenantDoNotDeadlockOnItsUsage) {
  const std::string patient = Place("usage-order-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(93, 0, 3000);
  const std::string erased = UploadOk(pki_->practitioner(), spec);
  const std::string source = UploadOk(pki_->practitioner(), spec);
  audit::Entry entry;
  entry.actor = P1();
  entry.tenant = "acme";
  entry.action = audit::Action::kCreate;
  entry.object_type = "record";
  entry.object_id = "usage-order";
  entry.patient_id = patient;
  entry.decision = audit::Decision::kPermit;

  pqxx::connection erasing_connection(ConnInfo("fr-1"));
  pqxx::work erasing(erasing_connection);
  erasing.exec_params0("DELETE FROM records WHERE record_id = $1", erased);
  std::atomic<bool> stored{false};
  std::atomic<bool> upload_ended{false};
  std::atomic<int> upload_pid{0};
  std::string upload_error;  // read once the thread is joined
  std::thread upload([&] {
    absl::Cleanup ended = [&] { upload_ended = true; };
    try {
      pqxx::connection c(ConnInfo("fr-1"));
      upload_pid = c.backendpid();
      pqxx::work txn(c);
      if (absl::StatusOr<int64_t> seq = audit::Append(txn, entry); !seq.ok()) {
        upload_error = std::string(seq.status().message());
        return;
      }
      txn.exec_params0(
          "INSERT INTO records (record_id, tenant_id, patient_id, kind, content_type_sealed, "
          "file_name_sealed, size_bytes, sha256_sealed, chunk_count, owner, created_at, state) "
          "SELECT 'fr-1.rusageorder', tenant_id, patient_id, kind, content_type_sealed, "
          "file_name_sealed, size_bytes, sha256_sealed, chunk_count, owner, created_at, state "
          "FROM records WHERE record_id = $1",
          source);
      txn.commit();
      stored = true;
    } catch (const std::exception& e) {
      upload_error = e.what();
    }
  });
  // The upload holds the chain's head once it is past its entry: stored, or waiting for a lock.
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return upload_ended.load() ||
           (upload_pid.load() != 0 &&
            Count("fr-1",
                  absl::StrCat("SELECT count(*) FROM pg_stat_activity WHERE pid = ", upload_pid.load(),
                               " AND wait_event_type = 'Lock'")) == 1);
  }));
  std::string erasure_error;
  try {
    if (absl::StatusOr<int64_t> seq = audit::Append(erasing, entry); !seq.ok()) {
      erasure_error = std::string(seq.status().message());
    }
    erasing.commit();
  } catch (const std::exception& e) {
    erasure_error = e.what();
  }
  upload.join();
  EXPECT_EQ(upload_error, "");
  EXPECT_EQ(erasure_error, "");
  EXPECT_TRUE(stored.load());
  EXPECT_EQ(UsageCountsOff("fr-1"), 0);
  Exec("fr-1", "DELETE FROM records WHERE record_id = 'fr-1.rusageorder'");
}

// A tenant's usage is its folded count plus the changes that the records' triggers append: one
// per statement and tenant, however many records the statement writes (an erasure of a patient's
// records is one statement), so that no row is updated once per record. The server folds them
// (every 10 s), and the usage is the sum of the records throughout.
TEST_F(SharingTest, UsageChangesAreOnePerStatementAndAreFoldedIntoTheCounts) {
  // The servers' folds wait while this session holds the fold's lock: what the statements
  // append stays in sight until the test folds it (in this session, which the lock lets in).
  pqxx::connection holder(ConnInfo("fr-1"));
  pqxx::nontransaction hold(holder);
  hold.exec("SELECT pg_advisory_lock(hashtextextended('medgate-records-usage-fold', 0))");
  auto fold = [&] { return hold.exec1("SELECT medgate_fold_record_usage()")[0].as<int64_t>(); };
  auto changes = [](const std::string& where) {
    return Count("fr-1",
                 absl::StrCat("SELECT count(*) FROM tenant_record_usage_changes WHERE ", where));
  };
  const std::string patient = Place("usage-fold-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  const int64_t before_uploads = changes("true");
  const int64_t of_1003_bytes = changes("tenant_id = 'acme' AND bytes = 1003");
  for (int i = 0; i < 4; ++i) {
    spec.content = Generate(100 + i, 0, 1000 + i);
    ASSERT_FALSE(UploadOk(pki_->practitioner(), spec).empty());
  }
  EXPECT_EQ(changes("true"), before_uploads + 4);  // one per upload
  EXPECT_EQ(changes("tenant_id = 'acme' AND bytes = 1003"), of_1003_bytes + 1);
  {
    auto erased = ErasePatient(pki_->app(), patient);
    ASSERT_TRUE(erased.ok()) << erased.status();
  }
  EXPECT_EQ(changes("true"), before_uploads + 5);
  EXPECT_GE(changes("tenant_id = 'acme' AND bytes = -4006"), 1);  // the four records at once
  EXPECT_EQ(UsageCountsOff("fr-1"), 0);

  EXPECT_EQ(fold(), before_uploads + 5);
  EXPECT_EQ(changes("true"), 0);
  EXPECT_EQ(UsageCountsOff("fr-1"), 0);

  // A count that fell short (records restored with triggers off, say) stops at zero instead of
  // failing the fold, for a tenant counted before or not.
  auto count = [] {
    return Count("fr-1", "SELECT bytes FROM tenant_record_usage WHERE tenant_id = 'short-count'");
  };
  Exec("fr-1", "INSERT INTO tenant_record_usage_changes VALUES ('short-count', -500)");
  EXPECT_EQ(fold(), 1);
  EXPECT_EQ(count(), 0);
  Exec("fr-1",
       "INSERT INTO tenant_record_usage_changes VALUES ('short-count', 100), ('short-count', -300)");
  EXPECT_EQ(fold(), 2);
  EXPECT_EQ(count(), 0);
  Exec("fr-1", "INSERT INTO tenant_record_usage_changes VALUES ('short-count', 700)");
  EXPECT_EQ(fold(), 1);
  EXPECT_EQ(count(), 700);
  Exec("fr-1", "DELETE FROM tenant_record_usage WHERE tenant_id = 'short-count'");
  hold.exec("SELECT pg_advisory_unlock(hashtextextended('medgate-records-usage-fold', 0))");

  // The server folds on its own every 10 s: a record stored now is folded without being asked.
  spec.content = Generate(104, 0, 1500);
  ASSERT_FALSE(UploadOk(pki_->practitioner(), spec).empty());
  EXPECT_GE(changes("true"), 1);
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] { return changes("true") == 0; }));
  EXPECT_EQ(UsageCountsOff("fr-1"), 0);
  // And when asked, in every region.
  absl::StatusOr<int64_t> folded = sharing_->core().FoldTenantUsage();
  ASSERT_TRUE(folded.ok()) << folded.status();
  for (const char* region : {"fr-1", "de-1", "eu-1"}) {
    EXPECT_EQ(Count(region, "SELECT count(*) FROM tenant_record_usage_changes"), 0) << region;
    EXPECT_EQ(UsageCountsOff(region), 0) << region;
  }
}

// --- sharing -----------------------------------------------------------------------------------

TEST_F(SharingTest, SharingNeedsConsentAndGrantsAreRevokedAndExpire) {
  const std::string patient = Place("share-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(11, 0, 300000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const TestCert& p2 = Cert("acme-p2");

  Downloaded before_share = Download(p2, record);
  EXPECT_EQ(before_share.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_FALSE(before_share.has_header);
  auto no_consent = Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  EXPECT_EQ(no_consent.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(no_consent.status().message()), HasSubstr("RECORD_SHARING"));
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM share_grants WHERE record_id = $1", record), 0);

  GrantSharingConsent(patient);
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  Downloaded d = Download(p2, record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
  ASSERT_EQ(d.header.grants_size(), 1);  // a grantee sees only its own grant
  EXPECT_EQ(d.header.grants(0).grantee(), P2());
  EXPECT_EQ(d.header.grants(0).granted_by(), P1());
  EXPECT_THAT(ListedIds(p2, v1::RECORD_SCOPE_SHARED_WITH_ME), ::testing::Contains(record));

  // Sharing again extends the grant and keeps its id.
  auto extended = Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(2));
  ASSERT_TRUE(extended.ok());
  EXPECT_EQ(extended->grant_id(), shared->grant_id());

  // Bad grants.
  EXPECT_EQ(Share(pki_->practitioner(), record, P1(), ServerNow() + absl::Hours(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Share(pki_->practitioner(), record, Id("/tenant/acme/app/backend"),
                  ServerNow() + absl::Hours(1))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      Share(pki_->practitioner(), record, P3(), ServerNow() - absl::Minutes(1)).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Share(pki_->practitioner(), record, P3(), ServerNow() + absl::Hours(24 * 366))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Share(Cert("acme-p3"), record, Id("/tenant/acme/practitioner/p-4"),
                  ServerNow() + absl::Hours(1))
                .status()
                .code(),
            absl::StatusCode::kPermissionDenied);  // p-3 holds no grant
  EXPECT_TRUE(HasEntry(PatientAudit(patient), P3(), v1::AUDIT_ACTION_CREATE, record, "NOT_SHARED"));

  // A grantee of the patient's tenant may re-share, not beyond its own grant.
  auto reshared = Share(p2, record, P3(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(reshared.ok()) << reshared.status();
  EXPECT_EQ(Share(p2, record, P3(), ServerNow() + absl::Hours(3)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // The owner sees every active grant.
  Downloaded owner = Download(pki_->practitioner(), record);
  ASSERT_TRUE(owner.status.ok());
  EXPECT_EQ(owner.header.grants_size(), 2);

  // Revocation takes effect for the next request; revoking again changes nothing.
  auto revoked = RevokeByGrantee(pki_->practitioner(), record, P2());
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(revoked->grant_id(), shared->grant_id());
  Downloaded after_revoke = Download(p2, record);
  EXPECT_EQ(after_revoke.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(after_revoke.status.error_message(), HasSubstr("revoked"));
  EXPECT_FALSE(after_revoke.has_header);
  auto again = RevokeById(pki_->practitioner(), shared->grant_id());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->revoked_at().seconds(), revoked->revoked_at().seconds());
  EXPECT_EQ(RevokeById(Cert("acme-p3"), reshared->grant_id()).status().code(),
            absl::StatusCode::kPermissionDenied);  // neither owner nor the one who shared
  EXPECT_TRUE(HasEntry(PatientAudit(patient), P3(), v1::AUDIT_ACTION_UPDATE, reshared->grant_id(),
                       "NOT_OWNER_OR_SHARER"));
  EXPECT_EQ(RevokeById(pki_->practitioner(), "fr-1.gnonexistent").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_THAT(ListedIds(p2, v1::RECORD_SCOPE_SHARED_WITH_ME),
              ::testing::Not(::testing::Contains(record)));

  // A new grant after revocation has a new id; it expires by itself.
  auto renewed = Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(renewed.ok());
  EXPECT_NE(renewed->grant_id(), shared->grant_id());
  ASSERT_TRUE(Download(p2, record).status.ok());
  // Shares and revocations over and over keep two rows for the grantee: its grant and the latest
  // revoked one (the audit log keeps them all). The latest revocation still reads as such.
  auto p2_rows = [&] {
    return GrantRows(record, P2());
  };
  EXPECT_EQ(p2_rows(), 2);
  for (int round = 0; round < 5; ++round) {
    ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), record, P2()).ok());
    ASSERT_TRUE(Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1)).ok());
    EXPECT_EQ(p2_rows(), 2) << round;
  }
  ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), record, P2()).ok());
  Downloaded revoked_again = Download(p2, record);
  EXPECT_EQ(revoked_again.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(revoked_again.status.error_message(), HasSubstr("revoked"));
  renewed = Share(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(renewed.ok());
  ASSERT_TRUE(Download(p2, record).status.ok());
  AdvanceClock(absl::Hours(3));
  Downloaded expired = Download(p2, record);
  EXPECT_EQ(expired.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(expired.status.error_message(), HasSubstr("expired"));
  EXPECT_THAT(ListedIds(p2, v1::RECORD_SCOPE_SHARED_WITH_ME),
              ::testing::Not(::testing::Contains(record)));

  // Every refusal of an existing grant is in the audit, as a denial.
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  int denials = 0;
  for (const v1::AuditEntry& e : entries) denials += e.decision() == v1::DECISION_DENY;
  EXPECT_GE(denials, 4);  // not shared, no consent, revoked, expired
  EXPECT_TRUE(HasEntry(entries, P2(), v1::AUDIT_ACTION_READ, record, "GRANT_REVOKED"));
  EXPECT_TRUE(HasEntry(entries, P2(), v1::AUDIT_ACTION_READ, record, "GRANT_EXPIRED"));
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_UPDATE, shared->grant_id(), "REVOKED"));
}

// A RECORD_SHARING consent narrowed to one practitioner lets that practitioner share the record;
// a grantee it does not name may read what was shared with them but not share it on.
TEST_F(SharingTest, AConsentNarrowedToOnePractitionerLetsOnlyThemShare) {
  const std::string patient = Place("narrow-share-1", "FR");
  GrantSharingConsent(patient, P1());
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(41, 0, 4000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  absl::StatusOr<v1::ShareRecordResponse> to_p2 =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(to_p2.ok()) << to_p2.status();
  Downloaded d = Download(Cert("acme-p2"), record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
  auto reshared = Share(Cert("acme-p2"), record, P3(), ServerNow() + absl::Minutes(30));
  EXPECT_EQ(reshared.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(reshared.status().message()), HasSubstr("ACTOR_NOT_COVERED"));
  EXPECT_EQ(GrantRows(record, P3()), 0);
}

// Consents narrowed to kinds of record: RECORD_SHARING for documents lets a document be shared
// but not an imaging study; CARE for documents lets the owner upload and read documents, not
// imaging. Each refusal names the category, and nothing is stored for it.
TEST_F(SharingTest, ConsentsNarrowedToKindsOfRecordCoverOnlyThose) {
  const std::string patient = Place("kinds-1", "FR");  // CARE for every kind
  UploadSpec document;
  document.patient_id = patient;
  document.content = Generate(61, 0, 3000);
  const std::string letter = UploadOk(pki_->practitioner(), document);
  UploadSpec imaging = document;
  imaging.kind = v1::RECORD_KIND_IMAGING;
  imaging.content_type = "application/dicom";
  imaging.file_name = "chest.dcm";
  imaging.content = Generate(62, 0, 5000);
  const std::string scan = UploadOk(pki_->practitioner(), imaging);

  GrantConsent(pki_->app(), patient, v1::PURPOSE_RECORD_SHARING, "", "kinds-1-sharing",
               {"document"});
  ASSERT_TRUE(ShareOnceConsented(pki_->practitioner(), letter, P2(), ServerNow() + absl::Hours(1))
                  .ok());
  auto refused = Share(pki_->practitioner(), scan, P2(), ServerNow() + absl::Hours(1));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("CATEGORY_NOT_COVERED"));
  EXPECT_EQ(GrantRows(scan, P2()), 0);

  // CARE re-granted for documents only: the owner still reads the letter, not the scan, and may
  // upload no more imaging.
  GrantConsent(pki_->app(), patient, v1::PURPOSE_CARE, "", "kinds-1-care-documents",
               {"document"});
  Downloaded denied;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    denied = Download(pki_->practitioner(), scan);
    return !denied.status.ok();
  }));
  EXPECT_EQ(denied.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(denied.status.error_message(), HasSubstr("CATEGORY_NOT_COVERED"));
  Downloaded read = Download(pki_->practitioner(), letter);
  ASSERT_TRUE(read.status.ok()) << read.status.error_message();
  EXPECT_EQ(read.content, document.content);
  const int64_t before = StoredRows();
  imaging.content = Generate(63, 0, 2000);
  grpc::Status upload = Upload(pki_->practitioner(), imaging);
  EXPECT_EQ(upload.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(upload.error_message(), HasSubstr("CATEGORY_NOT_COVERED"));
  EXPECT_EQ(StoredRows(), before);
  // The grantee of the letter still reads it: RECORD_SHARING covers documents.
  Downloaded shared = Download(Cert("acme-p2"), letter);
  ASSERT_TRUE(shared.status.ok()) << shared.status.error_message();
  // The refusals are in the patient's chain, each for its category.
  int category_refusals = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    if (e.decision() == v1::DECISION_DENY &&
        e.reason().find("CATEGORY_NOT_COVERED") != std::string::npos) {
      ++category_refusals;
    }
  }
  EXPECT_GE(category_refusals, 3);  // the share, the read, the upload
}

TEST_F(SharingTest, RevokedConsentStopsGranteeReads) {
  const std::string patient = Place("consent-revoke-1", "FR");
  const std::string consent_id = GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "a short report";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  ASSERT_TRUE(Download(Cert("acme-p2"), record).status.ok());
  WithdrawConsent(consent_id);
  Downloaded denied;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    denied = Download(Cert("acme-p2"), record);
    return denied.status.error_code() == grpc::StatusCode::PERMISSION_DENIED;
  })) << denied.status.error_message();
  EXPECT_THAT(denied.status.error_message(), HasSubstr("REVOKED"));
  // The owner's own reads do not rest on the sharing consent.
  EXPECT_TRUE(Download(pki_->practitioner(), record).status.ok());
}

// A grant already held is extended, never shortened, and only by the owner or its sharer: a
// practitioner re-sharing cannot cut short or take over a grant the owner made.
TEST_F(SharingTest, AHeldGrantIsOnlyExtendedAndOnlyByItsOwnerOrSharer) {
  const auto [patient, spec, record] = ConsentedRecord("grant-extend-1", "extended");
  const absl::Time now = ServerNow();
  absl::StatusOr<v1::ShareRecordResponse> to_p3 =
      ShareOnceConsented(pki_->practitioner(), record, P3(), now + absl::Hours(24 * 30));
  ASSERT_TRUE(to_p3.ok()) << to_p3.status();
  ASSERT_TRUE(Share(pki_->practitioner(), record, P2(), now + absl::Hours(24)).ok());
  auto cut_short = Share(Cert("acme-p2"), record, P3(), now + absl::Hours(1));
  EXPECT_EQ(cut_short.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(cut_short.status().message()), HasSubstr("only they or the record's owner"));
  // Of a grant it did not make, the caller learns neither its maker nor its end.
  EXPECT_THAT(std::string(cut_short.status().message()), Not(HasSubstr(P1())));
  EXPECT_THAT(std::string(cut_short.status().message()),
              Not(HasSubstr(absl::FormatTime("%Y-%m-%d", now + absl::Hours(24 * 30),
                                             absl::UTCTimeZone()))));
  auto stored = [&] {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::nontransaction n(c);
    pqxx::row row = n.exec_params1(
        "SELECT granted_by, floor(extract(epoch from expires_at))::bigint FROM share_grants "
        "WHERE record_id = $1 AND grantee = $2 AND revoked_at IS NULL",
        record, P3());
    return std::make_pair(std::string(row[0].c_str()), row[1].as<int64_t>());
  };
  EXPECT_EQ(stored(), std::make_pair(P1(), absl::ToUnixSeconds(now + absl::Hours(24 * 30))));
  // The owner asking for less keeps what the grant has; asking for more extends it, same id.
  auto shorter = Share(pki_->practitioner(), record, P3(), now + absl::Hours(2));
  ASSERT_TRUE(shorter.ok()) << shorter.status();
  EXPECT_EQ(shorter->grant_id(), to_p3->grant_id());
  EXPECT_EQ(shorter->expires_at().seconds(), absl::ToUnixSeconds(now + absl::Hours(24 * 30)));
  auto longer = Share(pki_->practitioner(), record, P3(), now + absl::Hours(24 * 60));
  ASSERT_TRUE(longer.ok()) << longer.status();
  EXPECT_EQ(longer->grant_id(), to_p3->grant_id());
  EXPECT_EQ(stored(), std::make_pair(P1(), absl::ToUnixSeconds(now + absl::Hours(24 * 60))));
}

// A grant shared onward rests on the grant it came from: revoking a grantee revokes what it shared
// on, and what those grantees shared on in turn, each in the audit; a grant the owner made stays.
// The revoked grantees can no longer read, nor give the record back to the one revoked.
TEST_F(SharingTest, RevokingAGranteeRevokesWhatItSharedOnward) {
  const auto [patient, spec, record] = ConsentedRecord("revoke-onward-1", "shared onward");
  const TestCert& p2 = Cert("acme-p2");
  const TestCert& p3 = Cert("acme-p3");
  const TestCert& p4 = Cert("acme-p4");
  const std::string p4_id = Id("/tenant/acme/practitioner/p-4");
  const absl::Time now = ServerNow();
  absl::StatusOr<v1::ShareRecordResponse> to_p2 =
      ShareOnceConsented(pki_->practitioner(), record, P2(), now + absl::Hours(24));
  ASSERT_TRUE(to_p2.ok()) << to_p2.status();
  absl::StatusOr<v1::ShareRecordResponse> to_p3 = Share(p2, record, P3(), now + absl::Hours(2));
  ASSERT_TRUE(to_p3.ok()) << to_p3.status();
  // p-4 holds the owner's own grant: it does not rest on p-2's.
  absl::StatusOr<v1::ShareRecordResponse> to_p4 =
      Share(pki_->practitioner(), record, p4_id, now + absl::Hours(2));
  ASSERT_TRUE(to_p4.ok()) << to_p4.status();
  ASSERT_TRUE(Download(p3, record).status.ok());

  ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), record, P2()).ok());
  for (const TestCert* revoked : {&p2, &p3}) {
    Downloaded refused = Download(*revoked, record);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_THAT(refused.status.error_message(), HasSubstr("revoked"));
    EXPECT_FALSE(refused.has_header);
  }
  EXPECT_TRUE(Download(p4, record).status.ok());
  // p-3 may no longer share it, with p-2 or anyone.
  EXPECT_EQ(Share(p3, record, P2(), now + absl::Hours(1)).status().code(),
            absl::StatusCode::kPermissionDenied);
  Downloaded owner = Download(pki_->practitioner(), record);
  ASSERT_TRUE(owner.status.ok());
  ASSERT_EQ(owner.header.grants_size(), 1);
  EXPECT_EQ(owner.header.grants(0).grant_id(), to_p4->grant_id());
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_UPDATE, to_p2->grant_id(), "REVOKED"));
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_UPDATE, to_p3->grant_id(), "REVOKED"));
  bool onward_detail = false;
  for (const v1::AuditEntry& e : entries) {
    onward_detail |= e.object_id() == to_p3->grant_id() && e.reason() == "REVOKED" &&
                     absl::StrContains(e.reason_detail(), "shared onward by " + P2());
  }
  EXPECT_TRUE(onward_detail);
  EXPECT_FALSE(HasEntry(entries, P1(), v1::AUDIT_ACTION_UPDATE, to_p4->grant_id(), "REVOKED"));
}

// A grant stands only while the consent it rests on does: once the patient withdraws the
// RECORD_SHARING consent its sharer shared under, its grantee may neither read the record nor
// share it onward, though the grantee's own consent would let it share (refused, and audited
// citing the withdrawn consent); the would-be grantee holds nothing.
TEST_F(SharingTest, AGrantWhoseSharersConsentWasWithdrawnIsNotSharedOnward) {
  const std::string patient = Place("onward-after-withdrawal-1", "FR");
  const std::string p1_consent = GrantConsent(pki_->app(), patient, v1::PURPOSE_RECORD_SHARING,
                                              P1(), "onward-after-withdrawal-1-p1");
  GrantConsent(pki_->app(), patient, v1::PURPOSE_RECORD_SHARING, P2(),
               "onward-after-withdrawal-1-p2");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "a letter shared on";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const absl::Time now = ServerNow();
  ASSERT_TRUE(ShareOnceConsented(pki_->practitioner(), record, P2(), now + absl::Hours(2)).ok());
  const TestCert& p2 = Cert("acme-p2");
  ASSERT_TRUE(Download(p2, record).status.ok());

  WithdrawConsent(p1_consent);
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {  // the service knows of the withdrawal
    return Download(p2, record).status.error_code() == grpc::StatusCode::PERMISSION_DENIED;
  }));
  absl::StatusOr<v1::ShareRecordResponse> onward = Share(p2, record, P3(), now + absl::Hours(1));
  EXPECT_EQ(onward.status().code(), absl::StatusCode::kPermissionDenied) << onward.status();
  EXPECT_THAT(std::string(onward.status().message()),
              HasSubstr("sharing onward a record shared with you: the patient's RECORD_SHARING "
                        "consent does not permit it"));
  EXPECT_EQ(Download(Cert("acme-p3"), record).status.error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  int audited = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    audited += e.actor() == P2() && e.action() == v1::AUDIT_ACTION_CREATE &&
               e.object_id() == record && e.decision() == v1::DECISION_DENY &&
               e.purpose() == v1::PURPOSE_RECORD_SHARING && e.consent_id() == p1_consent &&
               absl::StrContains(e.reason_detail(), "grantee=" + P3());
  }
  EXPECT_EQ(audited, 1);
}

// A listing shows what DownloadRecord would let the caller read, no more: once the sharer's
// RECORD_SHARING consent is withdrawn the grantee's listings leave the record out, and once the
// owner's CARE consent is withdrawn so do the owner's. Pages skip what is left out without losing
// what follows it.
TEST_F(SharingTest, ListingsShowOnlyWhatTheCallerMayRead) {
  const std::string hidden_patient = Place("list-consent-1", "FR");
  const std::string shown_patient = Place("list-consent-2", "FR");
  const std::string sharing_consent = GrantSharingConsent(hidden_patient);
  GrantSharingConsent(shown_patient);
  std::vector<std::string> hidden;
  std::vector<std::string> shown;
  // Interleaved, so the hidden records fall between the shown ones on every page.
  for (int i = 0; i < 6; ++i) {
    UploadSpec spec;
    spec.patient_id = i % 2 == 0 ? hidden_patient : shown_patient;
    spec.content = absl::StrCat("report ", i);
    const std::string record = UploadOk(pki_->practitioner(), spec);
    absl::StatusOr<v1::ShareRecordResponse> shared =
        ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
    ASSERT_TRUE(shared.ok()) << shared.status();
    (i % 2 == 0 ? hidden : shown).push_back(record);
  }
  auto all_pages = [&](const TestCert& as, v1::RecordScope scope, const std::string& patient) {
    std::vector<std::string> ids;
    std::string token;
    for (int page = 0; page < 20; ++page) {
      auto listed = List(as, scope, patient, 2, token);
      EXPECT_TRUE(listed.ok()) << listed.status();
      if (!listed.ok()) break;
      for (const v1::Record& r : listed->records()) ids.push_back(r.record_id());
      token = listed->next_page_token();
      if (token.empty()) break;
    }
    return ids;
  };
  auto contains = [](const std::vector<std::string>& ids, const std::string& id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  auto lists_none_of = [&](const std::vector<std::string>& ids,
                           const std::vector<std::string>& left_out) {
    return std::none_of(left_out.begin(), left_out.end(),
                        [&](const std::string& id) { return contains(ids, id); });
  };
  std::vector<std::string> before = all_pages(Cert("acme-p2"), v1::RECORD_SCOPE_SHARED_WITH_ME, "");
  for (const std::string& id : hidden) EXPECT_TRUE(contains(before, id)) << id;
  for (const std::string& id : shown) EXPECT_TRUE(contains(before, id)) << id;

  WithdrawConsent(sharing_consent);
  // The withdrawal reaches the service's consent cache within kPatience; a listing of several
  // pages may straddle that moment (its first pages decided before, the others after), so it is
  // polled until no hidden record is listed, then a new listing must agree.
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return lists_none_of(all_pages(Cert("acme-p2"), v1::RECORD_SCOPE_SHARED_WITH_ME, ""), hidden);
  }));
  const std::vector<std::string> after =
      all_pages(Cert("acme-p2"), v1::RECORD_SCOPE_SHARED_WITH_ME, "");
  for (const std::string& id : hidden) EXPECT_FALSE(contains(after, id)) << id;
  for (const std::string& id : shown) EXPECT_TRUE(contains(after, id)) << id;
  EXPECT_TRUE(all_pages(Cert("acme-p2"), v1::RECORD_SCOPE_PATIENT, hidden_patient).empty());
  EXPECT_EQ(all_pages(Cert("acme-p2"), v1::RECORD_SCOPE_PATIENT, shown_patient).size(),
            shown.size());
  // The owner's listings do not rest on the sharing consent, but on CARE.
  std::vector<std::string> owned = all_pages(pki_->practitioner(), v1::RECORD_SCOPE_MINE, "");
  for (const std::string& id : hidden) EXPECT_TRUE(contains(owned, id)) << id;
  const int64_t care_consents = Count(
      "fr-1", "SELECT count(*) FROM consents WHERE patient_id = $1 AND purpose = 'CARE'",
      hidden_patient);
  ASSERT_EQ(care_consents, 1);
  pqxx::connection c(Db("fr-1").ConnectionString());
  pqxx::nontransaction n(c);
  WithdrawConsent(
      n.exec_params1("SELECT consent_id FROM consents WHERE patient_id = $1 AND purpose = 'CARE'",
                     hidden_patient)[0]
          .c_str());
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return lists_none_of(all_pages(pki_->practitioner(), v1::RECORD_SCOPE_MINE, ""), hidden);
  }));
  owned = all_pages(pki_->practitioner(), v1::RECORD_SCOPE_MINE, "");
  for (const std::string& id : hidden) EXPECT_FALSE(contains(owned, id)) << id;
  for (const std::string& id : shown) EXPECT_TRUE(contains(owned, id)) << id;
  EXPECT_TRUE(all_pages(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, hidden_patient).empty());
}

// A suspended tenant's practitioners are refused every sharing and audit call, as grantees of
// another tenant's record too; the other tenants are unaffected, and reactivation restores the
// grant as it was.
TEST_F(SharingTest, ASuspendedTenantsGranteesAreRefused) {
  auto upsert = [](bool active) {
    return test_support::UpsertTenant(*pki_, routing_->port(), "pausable", {"FR"}, active);
  };
  ASSERT_TRUE(upsert(true).ok());
  absl::StatusOr<TestCert> grantee =
      test_support::IssueIdentity(*pki_, "pausable-q1", "/tenant/pausable/practitioner/q-1");
  ASSERT_TRUE(grantee.ok()) << grantee.status();

  const std::string patient = Place("pausable-grant-1", "FR");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(29, 0, 5000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, Id("/tenant/pausable/practitioner/q-1"),
                         ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  ASSERT_TRUE(Download(*grantee, record).status.ok());

  ASSERT_TRUE(upsert(false).ok());
  Downloaded refused;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    refused = Download(*grantee, record);
    return !refused.status.ok();
  }));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("suspended"));
  EXPECT_EQ(refused.bytes, 0u);
  EXPECT_FALSE(refused.has_header);
  auto listed = List(*grantee, v1::RECORD_SCOPE_SHARED_WITH_ME);
  EXPECT_EQ(listed.status().code(), absl::StatusCode::kPermissionDenied);
  v1::QueryAuditRequest query;
  query.set_patient_id(patient);
  v1::QueryAuditResponse entries;
  grpc::ClientContext query_context;
  EXPECT_EQ(AuditStub(*grantee)->QueryAudit(&query_context, query, &entries).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // The record's owner (another tenant) reads as before.
  Downloaded own = Download(pki_->practitioner(), record);
  ASSERT_TRUE(own.status.ok()) << own.status.error_message();
  EXPECT_EQ(own.content, spec.content);

  ASSERT_TRUE(upsert(true).ok());
  Downloaded again;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    again = Download(*grantee, record);
    return again.status.ok();
  })) << again.status.error_message();
  EXPECT_EQ(again.content, spec.content);
}

TEST_F(SharingTest, CrossTenantGranteesReadOnlyFromTerritoriesTheRuleAllows) {
  const std::string patient = Place("cross-border-1", "LU");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(13, 0, 70000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const std::string initech = Id("/tenant/initech/practitioner/i-1");
  const std::string umbrella = Id("/tenant/umbrella/practitioner/u-1");

  // LU data is readable from DE (initech serves DE) but not from US (umbrella).
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, initech, ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  Downloaded d = Download(Cert("initech-p"), record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
  // The patient's tenant sees that initech's practitioner read the record, not from which
  // address; its own practitioner's address it sees, and ops see both.
  {
    int initech_reads = 0;
    int own_entries = 0;
    for (const v1::AuditEntry& e : PatientAudit(patient)) {
      if (e.actor() == initech) {
        ++initech_reads;
        EXPECT_EQ(e.origin_address(), "") << e.seq();
        // Nor the entry's hashes, which would give the address back to whoever tries
        // candidates against them.
        EXPECT_EQ(e.hash(), "") << e.seq();
        EXPECT_EQ(e.prev_hash(), "") << e.seq();
      } else if (e.actor() == P1()) {
        ++own_entries;
        EXPECT_NE(e.origin_address(), "") << e.seq();
        EXPECT_EQ(e.hash().size(), 32u) << e.seq();
      }
    }
    EXPECT_GE(initech_reads, 1);
    EXPECT_GE(own_entries, 1);
    v1::QueryAuditRequest request;
    request.set_patient_id(patient);
    request.set_page_size(1000);
    auto ops_view = QueryAudit(pki_->ops(), request);
    ASSERT_TRUE(ops_view.ok()) << ops_view.status();
    int seen = 0;
    for (const v1::AuditEntry& e : ops_view->entries()) {
      if (e.actor() != initech) continue;
      ++seen;
      EXPECT_NE(e.origin_address(), "") << e.seq();
      EXPECT_EQ(e.hash().size(), 32u) << e.seq();
      EXPECT_EQ(e.prev_hash().size(), 32u) << e.seq();
    }
    EXPECT_GE(seen, 1);
  }
  auto refused = Share(pki_->practitioner(), record, umbrella, ServerNow() + absl::Hours(1));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("residency rule"));
  // Refused as a download for it would be: audited, with what the caller is not told of another
  // tenant (the territories it serves).
  EXPECT_THAT(std::string(refused.status().message()), Not(HasSubstr("US")));
  EXPECT_THAT(std::string(refused.status().message()), Not(HasSubstr("umbrella")));
  EXPECT_TRUE(HasEntry(PatientAudit(patient), P1(), v1::AUDIT_ACTION_CREATE, record,
                       "TERRITORY_NOT_PERMITTED"));
  // The patient's tenant reads whom the share was refused for, not which territories that tenant
  // serves; ops read why.
  int refusals = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    if (e.reason() != "TERRITORY_NOT_PERMITTED" || e.object_type() != "share_grant") continue;
    ++refusals;
    EXPECT_EQ(e.reason_detail(), absl::StrCat("grantee=", umbrella));
    EXPECT_EQ(e.hash(), "");  // it covers the territories withheld
    EXPECT_EQ(e.prev_hash(), "");
  }
  EXPECT_EQ(refusals, 1);
  {
    v1::QueryAuditRequest request;
    request.set_patient_id(patient);
    request.set_page_size(1000);
    auto ops_view = QueryAudit(pki_->ops(), request);
    ASSERT_TRUE(ops_view.ok()) << ops_view.status();
    bool detailed = false;
    for (const v1::AuditEntry& e : ops_view->entries()) {
      detailed |= e.reason() == "TERRITORY_NOT_PERMITTED" &&
                  absl::StrContains(e.reason_detail(), "from US, a territory tenant 'umbrella'") &&
                  e.hash().size() == 32u;
    }
    EXPECT_TRUE(detailed);
  }
  // Nor does the hash of an entry withheld in part reach the tenant another way: as the
  // prev_hash of the entry after it (here the tenant's own reads of the trail, each written
  // right after a withheld entry).
  {
    std::vector<v1::AuditEntry> tenant_view = PatientAudit(patient);
    v1::QueryAuditRequest request;
    request.set_patient_id(patient);
    request.set_page_size(1000);
    auto ops_view = QueryAudit(pki_->ops(), request);
    ASSERT_TRUE(ops_view.ok()) << ops_view.status();
    std::map<uint64_t, std::string> ops_hash;
    for (const v1::AuditEntry& e : ops_view->entries()) ops_hash[e.seq()] = e.hash();
    std::set<std::string> given;
    for (const v1::AuditEntry& e : tenant_view) {
      if (!e.hash().empty()) given.insert(e.hash());
      if (!e.prev_hash().empty()) given.insert(e.prev_hash());
    }
    int withheld = 0;
    int followed = 0;  // withheld entries whose next entry is in the patient's trail
    for (const v1::AuditEntry& e : tenant_view) {
      if (!e.hash().empty()) continue;
      ++withheld;
      ASSERT_TRUE(ops_hash.contains(e.seq())) << e.seq();
      EXPECT_FALSE(given.contains(ops_hash[e.seq()])) << "the hash of withheld entry " << e.seq();
      if (ops_hash.contains(e.seq() + 1)) ++followed;
    }
    EXPECT_GE(withheld, 2);  // initech's read, umbrella's refusal
    EXPECT_GE(followed, 1);
  }
  // A tenant that does not exist is refused in the same words: whether it does is not told.
  auto unknown = Share(pki_->practitioner(), record, Id("/tenant/nosuchtenant/practitioner/n-1"),
                       ServerNow() + absl::Hours(1));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(unknown.status().message(), refused.status().message());
  // A cross-tenant grantee may read, not re-share or manage.
  EXPECT_EQ(Share(Cert("initech-p"), record, initech, ServerNow() + absl::Hours(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Share(Cert("initech-p"), record, P2(), ServerNow() + absl::Hours(1)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(HasEntry(PatientAudit(patient), initech, v1::AUDIT_ACTION_CREATE, record,
                       "SHARER_OF_ANOTHER_TENANT"));
  EXPECT_EQ(Erase(Cert("initech-p"), record).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(RevokeById(Cert("initech-p"), shared->grant_id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(RevokeByGrantee(Cert("initech-p"), record, initech).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Archive(Cert("initech-p"), record, ServerNow() + absl::Hours(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(List(Cert("initech-p"), v1::RECORD_SCOPE_PATIENT, patient).status().code(),
            absl::StatusCode::kNotFound);
  // What it may do, it still may: the record is listed as shared with it and downloads.
  EXPECT_THAT(ListedIds(Cert("initech-p"), v1::RECORD_SCOPE_SHARED_WITH_ME),
              ::testing::Contains(record));
  EXPECT_TRUE(Download(Cert("initech-p"), record).status.ok());

  // Ops narrow LU's rule: the next read from DE is refused once the cached rule ages out.
  v1::PutResidencyRuleRequest put;
  put.mutable_rule()->set_territory("LU");
  put.mutable_rule()->add_region_ids("eu-1");
  put.mutable_rule()->add_region_ids("fr-1");
  put.mutable_rule()->add_readable_from_territories("LU");
  v1::PutResidencyRuleResponse rule;
  grpc::ClientContext context;
  ASSERT_TRUE(RoutingStub(pki_->ops())->PutResidencyRule(&context, put, &rule).ok());
  AdvanceClock(absl::Minutes(1));
  Downloaded narrowed = Download(Cert("initech-p"), record);
  EXPECT_EQ(narrowed.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  // It is told which of its own territories the rule refuses, not the patient's territory.
  EXPECT_THAT(narrowed.status.error_message(), HasSubstr("from DE, a territory tenant 'initech'"));
  EXPECT_THAT(narrowed.status.error_message(), Not(HasSubstr("LU")));
  EXPECT_TRUE(HasEntry(PatientAudit(patient), initech, v1::AUDIT_ACTION_READ, record,
                       "TERRITORY_NOT_PERMITTED"));
  // Readers of the patient's own tenant are not concerned.
  EXPECT_TRUE(Download(pki_->practitioner(), record).status.ok());
}

TEST_F(SharingTest, CrossTenantMatrixHasZeroSuccesses) {
  const auto [patient, spec, record] = ConsentedRecord("matrix-1", "acme's record");
  absl::StatusOr<v1::ShareRecordResponse> grant =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(grant.ok()) << grant.status();
  const int64_t grants_before = Count("fr-1", "SELECT count(*) FROM share_grants");
  const int64_t rows_before = StoredRows();

  int successes = 0;
  int calls = 0;
  auto expect_not_found = [&](const std::string& what, absl::StatusCode code) {
    ++calls;
    successes += code == absl::StatusCode::kOk;
    EXPECT_EQ(code, absl::StatusCode::kNotFound) << what;
  };
  // Also worded, but for the id, as the same call's answer for an id that exists nowhere
  // (`unknown`): another tenant's ids are not revealed to exist.
  const std::string no_record = "fr-1.r" + std::string(32, '0');
  const std::string no_patient = "pt_" + std::string(40, '0');
  auto expect_as_unknown = [&](const std::string& what, const absl::Status& status,
                               const std::string& id, const absl::Status& unknown,
                               const std::string& unknown_id) {
    expect_not_found(what, status.code());
    EXPECT_EQ(absl::StrReplaceAll(status.message(), {{id, "ID"}}),
              absl::StrReplaceAll(unknown.message(), {{unknown_id, "ID"}}))
        << what;
  };
  for (const TestCert* as : {&pki_->globex_practitioner(), &pki_->globex_app()}) {
    const bool practitioner = as == &pki_->globex_practitioner();
    if (practitioner) {
      expect_as_unknown("download", FromGrpcStatus(Download(*as, record).status), record,
                        FromGrpcStatus(Download(*as, no_record).status), no_record);
      expect_not_found("share", Share(*as, record, Id("/tenant/globex/practitioner/p-9"),
                                      ServerNow() + absl::Hours(1))
                                    .status()
                                    .code());
      expect_not_found("revoke by id", RevokeById(*as, grant->grant_id()).status().code());
      expect_not_found("revoke by grantee", RevokeByGrantee(*as, record, P2()).status().code());
      expect_as_unknown("list patient", List(*as, v1::RECORD_SCOPE_PATIENT, patient).status(),
                        patient, List(*as, v1::RECORD_SCOPE_PATIENT, no_patient).status(),
                        no_patient);
      expect_as_unknown("archive", Archive(*as, record, ServerNow() + absl::Hours(1)).status(),
                        record, Archive(*as, no_record, ServerNow() + absl::Hours(1)).status(),
                        no_record);
      UploadSpec theirs = spec;
      expect_not_found("upload", FromGrpcStatus(Upload(*as, theirs)).code());
      EXPECT_THAT(ListedIds(*as, v1::RECORD_SCOPE_MINE),
                  ::testing::Not(::testing::Contains(record)));
      EXPECT_THAT(ListedIds(*as, v1::RECORD_SCOPE_SHARED_WITH_ME),
                  ::testing::Not(::testing::Contains(record)));
    }
    expect_as_unknown("erase", Erase(*as, record).status(), record,
                      Erase(*as, no_record).status(), no_record);
    if (practitioner) {
      // Only apps erase a patient's records: refused by role before the patient is looked up.
      ++calls;
      const absl::StatusCode code = ErasePatient(*as, patient).status().code();
      successes += code == absl::StatusCode::kOk;
      EXPECT_EQ(code, absl::StatusCode::kPermissionDenied);
    } else {
      expect_as_unknown("erase patient", ErasePatient(*as, patient).status(), patient,
                        ErasePatient(*as, no_patient).status(), no_patient);
    }
    v1::QueryAuditRequest query;
    query.set_patient_id(patient);
    v1::QueryAuditRequest unknown_query;
    unknown_query.set_patient_id(no_patient);
    expect_as_unknown("query audit", QueryAudit(*as, query).status(), patient,
                      QueryAudit(*as, unknown_query).status(), no_patient);
  }
  EXPECT_EQ(calls, 13);
  EXPECT_EQ(successes, 0);
  // Nothing changed: the record, its grant and its key are intact.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM share_grants"), grants_before);
  EXPECT_EQ(StoredRows(), rows_before);
  Downloaded d = Download(pki_->practitioner(), record);
  ASSERT_TRUE(d.status.ok());
  EXPECT_EQ(d.content, spec.content);
  EXPECT_TRUE(Download(Cert("acme-p2"), record).status.ok());
}

TEST_F(SharingTest, DevicesServicesAppsAndOpsAreRefusedWhatTheyMayNotDo) {
  std::vector<std::pair<std::string, grpc::Status>> results;
#define MEDGATE_CALL(name, stub, Rpc)                                    \
  {                                                                      \
    v1::Rpc##Request request;                                            \
    v1::Rpc##Response response;                                          \
    grpc::ClientContext context;                                         \
    results.emplace_back(name, stub->Rpc(&context, request, &response)); \
  }
  // Every call that changes records or grants, as `who`.
  auto changes = [&](const std::string& who, const TestCert& cert) {
    auto stub = Stub(cert);
    MEDGATE_CALL(who + " ShareRecord", stub, ShareRecord);
    MEDGATE_CALL(who + " RevokeShare", stub, RevokeShare);
    MEDGATE_CALL(who + " ArchiveRecord", stub, ArchiveRecord);
    MEDGATE_CALL(who + " EraseRecord", stub, EraseRecord);
    MEDGATE_CALL(who + " ErasePatientRecords", stub, ErasePatientRecords);
    UploadSpec spec;
    spec.patient_id = "pt_x";
    spec.content = "x";
    results.emplace_back(who + " UploadRecord", Upload(cert, spec));
  };
  for (const auto& [who, cert] : {std::pair{"device", &pki_->device()},
                                  std::pair{"service", &pki_->service()}}) {
    changes(who, *cert);
    auto stub = Stub(*cert);
    MEDGATE_CALL(std::string(who) + " ListRecords", stub, ListRecords);
    auto audit = AuditStub(*cert);
    MEDGATE_CALL(std::string(who) + " QueryAudit", audit, QueryAudit);
    MEDGATE_CALL(std::string(who) + " VerifyChain", audit, VerifyChain);
    MEDGATE_CALL(std::string(who) + " RebaseAnchor", audit, RebaseAnchor);
    results.emplace_back(std::string(who) + " DownloadRecord", Download(*cert, "fr-1.x").status);
  }
  {
    // Apps erase (a record, a patient's records); they neither share, archive, upload nor read.
    auto stub = Stub(pki_->app());
    MEDGATE_CALL("app ShareRecord", stub, ShareRecord);
    MEDGATE_CALL("app RevokeShare", stub, RevokeShare);
    MEDGATE_CALL("app ArchiveRecord", stub, ArchiveRecord);
    MEDGATE_CALL("app ListRecords", stub, ListRecords);
    UploadSpec spec;
    spec.patient_id = "pt_x";
    spec.content = "x";
    results.emplace_back("app UploadRecord", Upload(pki_->app(), spec));
    results.emplace_back("app DownloadRecord", Download(pki_->app(), "fr-1.x").status);
    auto app_audit = AuditStub(pki_->app());
    MEDGATE_CALL("app VerifyChain", app_audit, VerifyChain);
    MEDGATE_CALL("app RebaseAnchor", app_audit, RebaseAnchor);
    auto audit = AuditStub(pki_->practitioner());
    MEDGATE_CALL("practitioner VerifyChain", audit, VerifyChain);
    MEDGATE_CALL("practitioner RebaseAnchor", audit, RebaseAnchor);
  }
  // Ops host the records: they may read one under break-glass, and change none.
  changes("ops", pki_->ops());
  auto ops = Stub(pki_->ops());
  MEDGATE_CALL("ops ListRecords", ops, ListRecords);
#undef MEDGATE_CALL
  ASSERT_EQ(results.size(), 39u);
  for (const auto& [name, status] : results) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << name;
  }
}

// A request that does not parse (a name in Latin-1, as a C++ client sends it after logging an
// error) is INVALID_ARGUMENT naming the method, for a unary call and a download alike, and
// changes nothing.
TEST_F(SharingTest, RequestsThatDoNotParseAreInvalidArgumentNamingTheMethod) {
  const std::string patient = Place("not-utf8", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "discharge letter";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  ASSERT_FALSE(record.empty());
  {
    v1::ShareRecordRequest request;
    request.set_record_id(record);
    request.set_grantee("practitioner:acme/Andr\xe9");
    v1::ShareRecordResponse response;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    grpc::Status status = Stub(pki_->practitioner())->ShareRecord(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("/medgate.v1.RecordSharing/ShareRecord"));
    EXPECT_THAT(status.error_message(), HasSubstr("UTF-8"));
  }
  Downloaded refused = Download(pki_->practitioner(), record, "raison m\xe9" "dicale");
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << refused.status.error_message();
  EXPECT_THAT(refused.status.error_message(),
              HasSubstr("/medgate.v1.RecordSharing/DownloadRecord"));
  EXPECT_FALSE(refused.has_header);
  // No grant was made, and the record reads as stored.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM share_grants WHERE record_id = $1", record), 0);
  Downloaded d = Download(pki_->practitioner(), record);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
}

// --- integrity ---------------------------------------------------------------------------------

TEST_F(SharingTest, TamperedCiphertextIsDataLossNamingTheRecordNeverAlteredBytes) {
  const std::string patient = Place("tamper-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(17, 0, 2 * kMiB + 500);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  // Another record of the same owner, left intact: the listing below must still show it whole.
  UploadSpec intact_spec;
  intact_spec.patient_id = patient;
  intact_spec.content = Generate(18, 0, 1000);
  const std::string intact = UploadOk(pki_->practitioner(), intact_spec);

  // One flipped bit in the middle chunk: the first chunk arrives, then DATA_LOSS.
  const std::string flip =
      "UPDATE record_chunks SET ciphertext = set_byte(ciphertext, 5000, "
      "get_byte(ciphertext, 5000) # 1) WHERE record_id = $1 AND chunk_index = 1";
  Exec("fr-1", flip, record);
  Downloaded d = Download(pki_->practitioner(), record);
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(d.status.error_message(), HasSubstr(record));
  EXPECT_EQ(d.chunks, 1);
  EXPECT_EQ(d.content, spec.content.substr(0, kMiB));
  Exec("fr-1", flip, record);  // flipped back
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // A chunk row grown past what a sealed chunk can be (2 MiB more): DATA_LOSS naming it, and the
  // service never reads it (it would hold the whole row in memory).
  Exec("fr-1",
       "UPDATE record_chunks SET ciphertext = ciphertext || decode(repeat('00', 2097152), 'hex') "
       "WHERE record_id = $1 AND chunk_index = 1",
       record);
  Downloaded grown = Download(pki_->practitioner(), record);
  EXPECT_EQ(grown.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(grown.status.error_message(), HasSubstr(record));
  EXPECT_THAT(grown.status.error_message(),
              HasSubstr("chunk 1 is stored larger than a sealed chunk can be; it was not read"));
  EXPECT_EQ(grown.content, spec.content.substr(0, grown.content.size()));
  Exec("fr-1",
       "UPDATE record_chunks SET ciphertext = substring(ciphertext from 1 for "
       "octet_length(ciphertext) - 2097152) WHERE record_id = $1 AND chunk_index = 1",
       record);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  auto move = [&](int from, int to) {
    Exec("fr-1",
         absl::StrCat("UPDATE record_chunks SET chunk_index = ", to,
                      " WHERE record_id = $1 AND chunk_index = ", from),
         record);
  };
  // A chunk gone while its record stays: DATA_LOSS naming the record and the chunk, after the
  // chunks before it.
  move(1, 99);
  // Ops hear of it from the service's log, naming the record, never the patient.
  ::testing::internal::CaptureStderr();
  Downloaded gap = Download(pki_->practitioner(), record);
  const std::string logged = ::testing::internal::GetCapturedStderr();
  std::vector<std::string> damaged;
  for (absl::string_view line : absl::StrSplit(logged, '\n')) {
    if (absl::StrContains(line, "\"event\":\"record_damaged\"")) damaged.emplace_back(line);
  }
  ASSERT_EQ(damaged.size(), 1u) << logged;
  EXPECT_THAT(damaged[0], HasSubstr("\"level\":\"error\"")) << damaged[0];
  EXPECT_THAT(damaged[0], HasSubstr(absl::StrCat("\"record\":\"", record, "\""))) << damaged[0];
  EXPECT_THAT(damaged[0], HasSubstr("\"chunks_returned\":1,")) << damaged[0];
  EXPECT_THAT(damaged[0], HasSubstr("chunk 1 is missing")) << damaged[0];
  EXPECT_THAT(damaged[0], Not(HasSubstr(patient))) << damaged[0];
  EXPECT_EQ(gap.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(gap.status.error_message(), HasSubstr(record));
  EXPECT_THAT(gap.status.error_message(), HasSubstr("chunk 1 is missing"));
  EXPECT_EQ(gap.chunks, 1);
  EXPECT_EQ(gap.content, spec.content.substr(0, kMiB));
  move(99, 1);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // Swapped chunks: nothing of the content arrives.
  move(0, 99);
  move(2, 0);
  move(99, 2);
  Downloaded swapped = Download(pki_->practitioner(), record);
  EXPECT_EQ(swapped.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(swapped.status.error_message(), HasSubstr(record));
  EXPECT_EQ(swapped.chunks, 0);
  move(0, 99);
  move(2, 0);
  move(99, 2);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // A record row whose size was altered: every chunk authenticates and the content matches its
  // hash, but the download does not end as complete with the size its header announced.
  const std::string grow = "UPDATE records SET size_bytes = size_bytes + 5 WHERE record_id = $1";
  Exec("fr-1", grow, record);
  Downloaded resized = Download(pki_->practitioner(), record);
  EXPECT_EQ(resized.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(resized.status.error_message(), HasSubstr(record));
  EXPECT_THAT(resized.status.error_message(), HasSubstr("its record says"));
  Exec("fr-1", "UPDATE records SET size_bytes = size_bytes - 5 WHERE record_id = $1", record);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // A damaged wrapped data key: DATA_LOSS before any content.
  const std::string damage_key =
      "UPDATE record_keys SET wrapped_key = set_byte(wrapped_key, 20, "
      "get_byte(wrapped_key, 20) # 1) WHERE record_id = $1";
  Exec("fr-1", damage_key, record);
  Downloaded bad_key = Download(pki_->practitioner(), record);
  EXPECT_EQ(bad_key.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(bad_key.status.error_message(), HasSubstr(record));
  EXPECT_FALSE(bad_key.has_header);
  // The owner's listing still answers: the record is listed as damaged, without its metadata,
  // and the owner's other records as they are.
  {
    std::map<std::string, v1::Record> listed;
    std::string token;
    for (int page = 0; page < 50; ++page) {
      auto mine = List(pki_->practitioner(), v1::RECORD_SCOPE_MINE, "", 100, token);
      ASSERT_TRUE(mine.ok()) << mine.status();
      for (const v1::Record& r : mine->records()) listed[r.record_id()] = r;
      token = mine->next_page_token();
      if (token.empty()) break;
    }
    ASSERT_EQ(listed.count(record), 1u);
    EXPECT_THAT(listed[record].damaged(), HasSubstr(record));
    EXPECT_TRUE(listed[record].file_name().empty());
    EXPECT_TRUE(listed[record].content_type().empty());
    ASSERT_EQ(listed.count(intact), 1u);
    EXPECT_TRUE(listed[intact].damaged().empty()) << listed[intact].damaged();
    EXPECT_EQ(listed[intact].file_name(), intact_spec.file_name);
    EXPECT_EQ(listed[intact].size_bytes(), 1000u);
  }
  Exec("fr-1", damage_key, record);

  // The data key gone from the shard: DATA_LOSS naming the record, before any content.
  Exec("fr-1", "UPDATE record_keys SET record_id = 'elsewhere' WHERE record_id = $1", record);
  Downloaded no_key = Download(pki_->practitioner(), record);
  EXPECT_EQ(no_key.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(no_key.status.error_message(), HasSubstr(record));
  EXPECT_THAT(no_key.status.error_message(), HasSubstr("data key is missing"));
  EXPECT_FALSE(no_key.has_header);
  Exec("fr-1", "UPDATE record_keys SET record_id = $1 WHERE record_id = 'elsewhere'", record);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // The last chunk dropped and the count adjusted to hide it: the new last chunk was not sealed
  // as last.
  Exec("fr-1", "DELETE FROM record_chunks WHERE record_id = $1 AND chunk_index = 2", record);
  Exec("fr-1", "UPDATE records SET chunk_count = 2 WHERE record_id = $1", record);
  Downloaded truncated = Download(pki_->practitioner(), record);
  EXPECT_EQ(truncated.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(truncated.chunks, 1);
  EXPECT_EQ(truncated.content, spec.content.substr(0, kMiB));
}

// A download whose shard sessions end mid-way (the shard's processes ended: a restart, a
// failover) goes on: the pool hands out no connection the server closed, so each of its reads
// runs on a new one, and the client receives the whole record.
TEST_F(SharingTest, ADownloadWhoseShardConnectionsAreLostGoesOnOnNewOnes) {
  UploadSpec spec;
  spec.patient_id = Place("connections-lost-mid-download-1", "FR");
  spec.content = Generate(43, 0, 8 * kMiB);
  const std::string record = UploadOk(pki_->practitioner(), spec);

  SlowDownload download(pki_->practitioner(), record);
  ASSERT_TRUE(download.ReadFirstChunk());
  {
    pqxx::connection admin(Db("fr-1").ConnectionString());
    pqxx::nontransaction q(admin);
    constexpr char kOthers[] =
        " FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = "
        "current_database() AND pid <> pg_backend_pid() AND application_name <> "
        "'medgate-consent-feed'";
    ASSERT_FALSE(q.exec(absl::StrCat("SELECT pg_terminate_backend(pid)", kOthers)).empty());
    ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
      return q.exec1(absl::StrCat("SELECT count(*)", kOthers))[0].as<int>() == 0;
    }));
  }
  grpc::Status status = download.ReadTheRest();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(download.received == spec.content)
      << "received " << download.received.size() << " of " << spec.content.size() << " bytes";
}

// An erasure stops a download already running at its next chunk: ABORTED naming the record,
// after only what had been sent before, all of it the record's own bytes. (Its chunks stay in the
// shard until they are purged; the data key is gone, and so must the stream be.) The client has
// taken the first chunk; the service may have handed the second to gRPC before the erasure (the
// client's 64 KiB window holds it back), and no more, though it reads chunks ahead.
TEST_F(SharingTest, AnErasureStopsARunningDownloadAtItsNextChunk) {
  const std::string patient = Place("erased-mid-download-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(41, 0, 8 * kMiB);
  const std::string record = UploadOk(pki_->practitioner(), spec);

  SlowDownload download(pki_->practitioner(), record);
  ASSERT_TRUE(download.ReadFirstChunk());
  ASSERT_TRUE(Erase(pki_->practitioner(), record).ok());
  grpc::Status status = download.ReadTheRest();
  const std::string& received = download.received;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(record));
  EXPECT_THAT(status.error_message(), HasSubstr("erased"));
  EXPECT_LE(received.size(), 2 * kMiB);
  EXPECT_EQ(received, spec.content.substr(0, received.size()));
  RecordProperty("bytes_sent_after_start", static_cast<int>(received.size()));
}

// A grantee's download in progress ends at the next chunk read once its grant is revoked (at most
// the chunk already handed to gRPC gets through, as above); what it received before is what was
// uploaded.
TEST_F(SharingTest, ARevocationStopsTheGranteesRunningDownload) {
  const auto [patient, spec, record] = ConsentedRecord("revoked-mid-download-1", "a letter");
  UploadSpec big = spec;
  big.content = Generate(42, 0, 8 * kMiB);
  const std::string large = UploadOk(pki_->practitioner(), big);
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), large, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();

  SlowDownload download(Cert("acme-p2"), large);
  ASSERT_TRUE(download.ReadFirstChunk());
  ASSERT_TRUE(RevokeById(pki_->practitioner(), shared->grant_id()).ok());
  grpc::Status status = download.ReadTheRest();
  const std::string& received = download.received;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(large));
  EXPECT_THAT(status.error_message(), HasSubstr("revoked or expired during the download"));
  EXPECT_LE(received.size(), 2 * kMiB);
  EXPECT_EQ(received, big.content.substr(0, received.size()));
  // The owner's download of the same record is not affected by the grant.
  ExpectContent(pki_->practitioner(), large, big.content);
}

// A consent withdrawn while a download runs stops it at its next chunk, as a revocation does: the
// grantee's, once the RECORD_SHARING consent its grant rests on is withdrawn, while the owner's
// download of the same record goes on; then the owner's, once its CARE consent is withdrawn. Each
// receives nothing but the record's own bytes, and at most the chunk already handed to gRPC
// after the withdrawal.
TEST_F(SharingTest, AConsentWithdrawnDuringADownloadStopsItAtItsNextChunk) {
  const std::string patient = Place("consent-mid-download-1", "FR", nullptr, /*with_care=*/false);
  const std::string care =
      GrantConsent(pki_->app(), patient, v1::PURPOSE_CARE, "", "consent-mid-download-1-care");
  const std::string sharing = GrantSharingConsent(patient);
  UploadSpec big;
  big.patient_id = patient;
  big.content = Generate(44, 0, 8 * kMiB);
  UploadSpec small = big;
  small.content = "a probe of the service's consent cache";
  std::string record;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {  // once the service knows of CARE
    v1::UploadRecordResponse response;
    if (!Upload(pki_->practitioner(), big, &response).ok()) return false;
    record = response.record_id();
    return true;
  }));
  const std::string probe = UploadOk(pki_->practitioner(), small);
  for (const std::string& id : {record, probe}) {
    ASSERT_TRUE(ShareOnceConsented(pki_->practitioner(), id, P2(), ServerNow() + absl::Hours(1)).ok());
  }
  auto refused = [&](const TestCert& as) {
    return PollUntil(absl::Now() + kPatience, [&] {
      return Download(as, probe).status.error_code() == grpc::StatusCode::PERMISSION_DENIED;
    });
  };

  SlowDownload grantees(Cert("acme-p2"), record);
  SlowDownload owners(pki_->practitioner(), record);
  ASSERT_TRUE(grantees.ReadFirstChunk());
  ASSERT_TRUE(owners.ReadFirstChunk());
  WithdrawConsent(sharing);
  ASSERT_TRUE(refused(Cert("acme-p2")));  // the service knows of the withdrawal
  grpc::Status status = grantees.ReadTheRest();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(record));
  EXPECT_THAT(status.error_message(),
              HasSubstr("RECORD_SHARING consent no longer permits this download"));
  EXPECT_LE(grantees.received.size(), 2 * kMiB);
  EXPECT_EQ(grantees.received, big.content.substr(0, grantees.received.size()));

  ASSERT_TRUE(owners.ReadChunk());
  ASSERT_TRUE(owners.ReadChunk());  // past the chunk handed over before: the owner reads on
  WithdrawConsent(care);
  ASSERT_TRUE(refused(pki_->practitioner()));
  const size_t before_withdrawal = owners.received.size();
  status = owners.ReadTheRest();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("CARE consent no longer permits this download"));
  EXPECT_LE(owners.received.size(), before_withdrawal + kMiB);
  EXPECT_EQ(owners.received, big.content.substr(0, owners.received.size()));
}

TEST_F(SharingTest, ATenantsDownloadsInProgressAreBounded) {
  // A server of its own whose idle bound cannot end the stalled downloads below during the test.
  ExtraSharing extra = StartSharingWith("download_idle_timeout_seconds: 3600");
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  const std::string patient = Place("download-bound-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(99, 0, 4 * kMiB);
  const std::string record = UploadOk(pki_->practitioner(), spec, port);

  auto stall = [&] { return StalledDownload(pki_->practitioner(), record, port); };
  constexpr int kBound = 8;  // sharing.max_downloads_per_tenant's default
  std::vector<std::unique_ptr<Stalled>> running;
  for (int i = 0; i < kBound; ++i) {
    running.push_back(stall());
    v1::DownloadRecordResponse header;
    ASSERT_TRUE(running.back()->reader->Read(&header)) << running.back()->reader->Finish().error_message();
    ASSERT_TRUE(header.has_header());
  }
  absl::Cleanup cancel_all = [&] {
    for (auto& s : running) {
      s->context.TryCancel();
      s->reader->Finish();
    }
  };

  // One more of the tenant's is refused; another's (ops, break-glass) is not.
  Downloaded refused = Download(pki_->practitioner(), record, "", true, port);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_THAT(refused.status.error_message(), HasSubstr("max_downloads_per_tenant"));
  Downloaded ops =
      Download(pki_->ops(), record, "incident 4711: patient unconscious in the ER", true, port);
  ASSERT_TRUE(ops.status.ok()) << ops.status.error_message();
  EXPECT_EQ(ops.content, spec.content);

  // Once one ends, the tenant may download again.
  running.back()->context.TryCancel();
  running.back()->reader->Finish();
  running.pop_back();
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    Downloaded again = Download(pki_->practitioner(), record, "", true, port);
    return again.status.ok() && again.content == spec.content;
  }));
  std::move(cancel_all).Invoke();
  extra.server->Shutdown();
}

// The handshake verified the practitioner's certificate once; a download or an upload runs on
// after it. One whose certificate expires meanwhile ends at its next chunk, UNAUTHENTICATED: the
// download's client keeps what came before, and the upload stores nothing.
TEST_F(SharingTest, ATransferEndsAtItsNextChunkOnceTheCallersCertificateHasExpired) {
  UploadSpec spec;
  spec.patient_id = Place("expiring-transfer-1", "FR");
  spec.content = Generate(99, 0, 4 * kMiB);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  // The same practitioner (p-1), on a certificate valid for 5 s.
  devpki::LeafOptions options;
  options.common_name = "p-1-expiring";
  options.uri_sans = {Id("/tenant/acme/practitioner/p-1")};
  options.not_after = absl::Seconds(5);
  absl::StatusOr<TestCert> expiring = pki_->Issue("p-1-expiring", options);
  ASSERT_TRUE(expiring.ok()) << expiring.status();
  const absl::Time expires = absl::Now() + absl::Seconds(5);

  std::unique_ptr<Stalled> download = StalledDownload(*expiring, record);
  v1::DownloadRecordResponse message;
  ASSERT_TRUE(download->reader->Read(&message)) << download->reader->Finish().error_message();
  ASSERT_TRUE(message.has_header());

  // An upload of two chunks, the second sent once the certificate has expired.
  UploadSpec second;
  second.patient_id = spec.patient_id;
  second.content = Generate(100, 0, 2 * second.chunk_bytes);
  second.before_chunk = [&](uint64_t offset) {
    if (offset > 0) absl::SleepFor(expires - absl::Now() + absl::Seconds(1));
  };
  const grpc::Status uploaded = Upload(*expiring, second);
  EXPECT_EQ(uploaded.error_code(), grpc::StatusCode::UNAUTHENTICATED) << uploaded.error_message();
  EXPECT_THAT(uploaded.error_message(), HasSubstr("expired at"));
  EXPECT_THAT(uploaded.error_message(), HasSubstr("nothing was stored"));

  uint64_t received = 0;
  while (download->reader->Read(&message)) received += message.chunk().data().size();
  const grpc::Status downloaded = download->reader->Finish();
  EXPECT_EQ(downloaded.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << downloaded.error_message();
  EXPECT_THAT(downloaded.error_message(), HasSubstr("expired at"));
  EXPECT_LT(received, spec.content.size());

  // The patient has the first record only; its owner, on a current certificate, downloads it.
  absl::StatusOr<v1::ListRecordsResponse> listed =
      List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, spec.patient_id);
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->records_size(), 1);
  EXPECT_EQ(listed->records(0).record_id(), record);
  Downloaded whole = Download(pki_->practitioner(), record);
  EXPECT_TRUE(whole.status.ok()) << whole.status.error_message();
  EXPECT_EQ(whole.content, spec.content);
}

// A client that stops reading does not keep its download (a thread and one of its tenant's
// places) for good: past sharing.download_idle_timeout_seconds it ends, and the place is free.
TEST_F(SharingTest, ADownloadWhoseClientStopsReadingEndsAndGivesBackItsPlace) {
  ExtraWithRecord stored = StartSharingWithRecord(
      "download_idle_timeout_seconds: 1\n  max_downloads_per_tenant: 1",
      "download-stall-1", 97, 4 * kMiB);
  ASSERT_NE(stored.extra.server, nullptr);
  const int port = stored.extra.server->port();
  const UploadSpec& spec = stored.spec;
  const std::string& record = stored.record;

  std::unique_ptr<Stalled> stalled = StalledDownload(pki_->practitioner(), record, port);
  v1::DownloadRecordResponse message;
  ASSERT_TRUE(stalled->reader->Read(&message)) << stalled->reader->Finish().error_message();
  ASSERT_TRUE(message.has_header());
  // The tenant's one place is taken until the stalled download ends; then a download works.
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    Downloaded again = Download(pki_->practitioner(), record, "", true, port);
    return again.status.ok() && again.content == spec.content;
  }));
  // The stalled client reads what reached it before the end, then learns why it ended.
  uint64_t received = 0;
  while (stalled->reader->Read(&message)) received += message.chunk().data().size();
  grpc::Status ended = stalled->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("download_idle_timeout_seconds"));
  EXPECT_LT(received, spec.content.size());
  stored.extra.server->Shutdown();
}

// A client that keeps reading, but too slowly to matter, is not let hold its download either:
// past the idle timeout it must have gone at sharing.download_min_bytes_per_second.
TEST_F(SharingTest, ADownloadReadUnderTheMinimumRateEnds) {
  ExtraWithRecord stored = StartSharingWithRecord(
      "download_idle_timeout_seconds: 2\n  download_min_bytes_per_second: 100000000",
      "download-slow-1", 98, 12 * kMiB);
  ASSERT_NE(stored.extra.server, nullptr);
  const int port = stored.extra.server->port();
  const UploadSpec& spec = stored.spec;
  const std::string& record = stored.record;

  // A 1 MiB chunk every 400 ms: never idle for the 2 s allowed (unless the machine stalls for
  // 1.6 s), but about 2.6 MB/s, under the 100 MB/s this server asks for.
  std::unique_ptr<Stalled> slow = StalledDownload(pki_->practitioner(), record, port);
  v1::DownloadRecordResponse message;
  uint64_t received = 0;
  while (slow->reader->Read(&message)) {
    received += message.chunk().data().size();
    absl::SleepFor(absl::Milliseconds(400));
  }
  grpc::Status ended = slow->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ended.error_message();
  EXPECT_THAT(ended.error_message(), HasSubstr("under the minimum of 100000000"));
  EXPECT_LT(received, spec.content.size());
  stored.extra.server->Shutdown();
}

// Only the time spent waiting for the client counts against a transfer's minimum rate: a
// prompt client is not cut off while the shard is slow to give the chunks.
TEST_F(SharingTest, ASlowShardDoesNotCountAgainstAPromptDownload) {
  ExtraWithRecord stored = StartSharingWithRecord(
      "download_idle_timeout_seconds: 1\n  download_min_bytes_per_second: 100000000",
      "download-slow-shard-1", 96, 3 * kMiB);
  ASSERT_NE(stored.extra.server, nullptr);
  const int port = stored.extra.server->port();
  const UploadSpec& spec = stored.spec;
  const std::string& record = stored.record;

  // The shard keeps the download waiting for its chunks for twice the 1 s the client may take.
  pqxx::connection blocker(Db("fr-1").ConnectionString());
  pqxx::work hold(blocker);
  hold.exec0("LOCK TABLE record_chunks IN ACCESS EXCLUSIVE MODE");
  Downloaded downloaded;
  std::thread download([&] { downloaded = Download(pki_->practitioner(), record, "", true, port); });
  absl::Cleanup join = [&] { download.join(); };
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [] { return LockWaits("fr-1", "%record_chunks%") > 0; }));
  absl::SleepFor(absl::Seconds(2));
  hold.commit();
  std::move(join).Invoke();
  ASSERT_TRUE(downloaded.status.ok()) << downloaded.status.error_message();
  EXPECT_EQ(downloaded.content, spec.content);
  stored.extra.server->Shutdown();
}

TEST_F(SharingTest, AnotherKeyEncryptionKeyCannotReadOrWrite) {
  const std::string patient = Place("wrong-kek-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "written under the right KEK";
  const std::string record = UploadOk(pki_->practitioner(), spec);

  std::unique_ptr<MedgateConfig> config = ConfigWithOtherKek();
  // A vault that answers at start tells the other KEK apart: the service does not start.
  auto refused = SharingServer::Create(*config);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("holds patient keys wrapped by key-encryption key"));

  // Started as if no vault had answered then, it still neither reads nor writes.
  SharingServerOptions unchecked;
  unchecked.check_kek_at_start = false;
  auto other = SharingServer::Create(*config, unchecked);
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE((*other)->Start().ok());
  const int64_t before = StoredRows();
  Downloaded d = Download(pki_->practitioner(), record, "", true, (*other)->port());
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(d.status.error_message(), HasSubstr("key-encryption key"));
  EXPECT_FALSE(d.has_header);
  grpc::Status upload = Upload(pki_->practitioner(), spec, nullptr, (*other)->port());
  EXPECT_EQ(upload.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(StoredRows(), before);
  // Nor does it make a key of its own for a patient new to it: that patient's records would be
  // readable by this pod only.
  UploadSpec fresh;
  fresh.patient_id = Place("wrong-kek-2", "FR");
  fresh.content = "a first record of this patient";
  upload = Upload(pki_->practitioner(), fresh, nullptr, (*other)->port());
  EXPECT_EQ(upload.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(upload.error_message(), HasSubstr("key-encryption key"));
  EXPECT_EQ(StoredRows(), before);
  (*other)->Shutdown();
  // The right KEK still reads the record, and writes the new patient's first.
  EXPECT_TRUE(Download(pki_->practitioner(), record).status.ok());
  const std::string first = UploadOk(pki_->practitioner(), fresh);
  EXPECT_EQ(Download(pki_->practitioner(), first).content, fresh.content);
}

// Rotating the KEK (README, "Rotating the KEK"): pods given the other KEK in
// sharing.previous_kek_files open the keys it wraps and rewrap nothing; with sharing.kek_rewrap,
// a key read is rewrapped under the current KEK, and a sweep rewraps the rest; a vault holding
// any key of a KEK a pod is not given refuses that pod at start. (The stack's vaults are shared by
// the suite: the test rotates every key back before it ends.)
TEST_F(SharingTest, ARotatedKekOpensTheOldOnesKeysAndRewrapsThem) {
  const std::string old_kek = *kek_dir_ + "/kek.hex";
  const std::string new_kek = *kek_dir_ + "/other-kek.hex";
  const std::string old_id = (*crypto::LoadKeyEncryptionKeyFile(old_kek))->id();
  const std::string new_id = (*crypto::LoadKeyEncryptionKeyFile(new_kek))->id();
  UploadSpec spec;
  spec.patient_id = Place("rotated-kek-1", "FR");
  spec.content = "written under the old KEK";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  UploadSpec other;
  other.patient_id = Place("rotated-kek-2", "FR");
  other.content = "also written under the old KEK";
  const std::string other_record = UploadOk(pki_->practitioner(), other);
  auto keys_under = [&](const std::string& kek_id, const std::string& patient = "") {
    int64_t n = 0;
    for (const char* vault : {"fr-1 keys", "de-1 keys", "eu-1 keys"}) {
      n += patient.empty()
               ? Count(vault, "SELECT count(*) FROM patient_keys WHERE kek_id = $1", kek_id)
               : Count(vault,
                       absl::StrCat("SELECT count(*) FROM patient_keys WHERE patient_id = '",
                                    patient, "' AND kek_id = $1"),
                       kek_id);
    }
    return n;
  };
  ASSERT_EQ(keys_under(old_id, spec.patient_id), 1);

  // A previous KEK that is the current one is a mistake, named.
  auto same = SharingServer::Create(*ConfigWith(
      "retention_sweep_seconds: 86400",
      absl::StrCat("retention_sweep_seconds: 86400\n  previous_kek_files: [", old_kek, "]")));
  ASSERT_FALSE(same.ok());
  EXPECT_THAT(same.status().message(), HasSubstr("sharing.previous_kek_files[0]"));

  auto rotated_config = [&](const std::string& current, const std::string& previous, bool rewrap,
                            int rewrap_seconds) {
    return ConfigWith(
        {{*kek_dir_ + "/kek.hex", current},
         {"retention_sweep_seconds: 86400",
          absl::StrCat("retention_sweep_seconds: 86400\n  previous_kek_files: [", previous,
                       "]\n  kek_rewrap: ", rewrap ? "true" : "false",
                       "\n  kek_rewrap_seconds: ", rewrap_seconds)}});
  };
  // Back to the suite's KEK the same way, however the test ends: the suite's other tests read
  // the vaults with it.
  absl::Cleanup rotate_back = [&] {
    ExtraSharing back = StartSharingOn(rotated_config(old_kek, new_kek, true, 1));
    ASSERT_NE(back.server, nullptr);
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] { return keys_under(new_id) == 0; }))
        << keys_under(new_id) << " keys still under the other KEK";
    back.server->Shutdown();
  };
  // Without kek_rewrap (while pods holding the old KEK as their current one may still run): the
  // old KEK's keys open, and stay as they are.
  {
    ExtraSharing reading = StartSharingOn(rotated_config(new_kek, old_kek, false, 1));
    ASSERT_NE(reading.server, nullptr);
    Downloaded read = Download(pki_->practitioner(), record, "", true, reading.server->port());
    ASSERT_TRUE(read.status.ok()) << read.status.error_message();
    EXPECT_EQ(read.content, spec.content);
    EXPECT_EQ(keys_under(old_id, spec.patient_id), 1);
    EXPECT_EQ(keys_under(new_id), 0);
    reading.server->Shutdown();
  }
  // With it (the sweep hourly: only reads rewrap here), a key read is rewrapped.
  {
    ExtraSharing rotating = StartSharingOn(rotated_config(new_kek, old_kek, true, 3600));
    ASSERT_NE(rotating.server, nullptr);
    Downloaded read = Download(pki_->practitioner(), record, "", true, rotating.server->port());
    ASSERT_TRUE(read.status.ok()) << read.status.error_message();
    EXPECT_EQ(read.content, spec.content);
    EXPECT_EQ(keys_under(new_id, spec.patient_id), 1);
    EXPECT_EQ(keys_under(old_id, spec.patient_id), 0);
    EXPECT_EQ(keys_under(old_id, other.patient_id), 1);  // not read: not yet rewrapped
    rotating.server->Shutdown();
  }
  // Keys of both KEKs in the vaults: a pod given only one of them does not start, whichever key
  // it happens to look at first.
  for (const std::unique_ptr<MedgateConfig>& only : {ConfigWithOtherKek(), ConfigWith({})}) {
    auto refused = SharingServer::Create(*only);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  }
  // With the sweep every second, every key the old KEK wraps is rewrapped.
  {
    ExtraSharing sweeping = StartSharingOn(rotated_config(new_kek, old_kek, true, 1));
    ASSERT_NE(sweeping.server, nullptr);
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] { return keys_under(old_id) == 0; }))
        << keys_under(old_id) << " keys still under the old KEK";
    sweeping.server->Shutdown();
  }
  // The old KEK retired: the new one alone opens both records.
  {
    ExtraSharing retired = StartSharingOn(ConfigWithOtherKek());
    ASSERT_NE(retired.server, nullptr);
    EXPECT_EQ(Download(pki_->practitioner(), record, "", true, retired.server->port()).content,
              spec.content);
    EXPECT_EQ(Download(pki_->practitioner(), other_record, "", true, retired.server->port()).content,
              other.content);
    retired.server->Shutdown();
  }
  std::move(rotate_back).Invoke();
  EXPECT_EQ(Download(pki_->practitioner(), other_record).content, other.content);
}

// --- break-glass -------------------------------------------------------------------------------

// Uploads and the owner's downloads are for the patient's care: CARE must permit the practitioner
// (GDPR art. 9, consent per purpose). Refusals are audited and store or reveal nothing; break-glass
// does not rest on consent.
TEST_F(SharingTest, UploadsAndOwnerReadsNeedCareConsent) {
  const std::string patient = Place("care-1", "FR", nullptr, /*with_care=*/false);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(23, 0, 3000);
  const int64_t before = StoredRows();
  grpc::Status refused = Upload(pki_->practitioner(), spec);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(refused.error_message(), HasSubstr("CARE"));
  EXPECT_EQ(StoredRows(), before);

  // A CARE consent for another practitioner does not let this one in.
  auto grant_care = [&](const std::string& actor, const std::string& request_id) {
    return GrantConsent(pki_->app(), patient, v1::PURPOSE_CARE, actor, request_id);
  };
  grant_care(P2(), "care-1-p2");
  grpc::Status other;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    other = Upload(pki_->practitioner(), spec);
    return other.error_message().find("ACTOR_NOT_COVERED") != std::string::npos;
  })) << other.error_message();
  EXPECT_EQ(StoredRows(), before);

  const std::string consent_id = grant_care("", "care-1-all");
  std::string record;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    v1::UploadRecordResponse response;
    if (!Upload(pki_->practitioner(), spec, &response).ok()) return false;
    record = response.record_id();
    return true;
  }));
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  // Revoked: the owner may no longer read; ops still may, by break-glass.
  WithdrawConsent(consent_id);
  Downloaded denied;
  int read_before_withdrawal_arrived = 0;  // each one a permitted read in the audit
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    denied = Download(pki_->practitioner(), record);
    read_before_withdrawal_arrived += denied.status.ok();
    return !denied.status.ok();
  }));
  EXPECT_EQ(denied.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(denied.status.error_message(), HasSubstr("CARE"));
  EXPECT_FALSE(denied.has_header);
  EXPECT_TRUE(
      Download(pki_->ops(), record, "unconscious patient in ER, record needed for treatment")
          .status.ok());
  // Nor may the owner archive it (which answers with its metadata, and would keep it from the
  // tenant's erasure for as long as the owner chose).
  absl::StatusOr<v1::ArchiveRecordResponse> kept =
      Archive(pki_->practitioner(), record, absl::Now() + absl::Hours(24 * 365));
  EXPECT_EQ(kept.status().code(), absl::StatusCode::kPermissionDenied) << kept.status();
  EXPECT_THAT(std::string(kept.status().message()), HasSubstr("CARE"));

  // Every decision is in the patient's chain: the refused uploads, read and archiving, and the
  // permitted ones, each citing CARE.
  int refusals = 0;
  int permitted_care = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    if (e.purpose() != v1::PURPOSE_CARE || e.actor() != P1()) continue;
    if (e.decision() == v1::DECISION_DENY) {
      ++refusals;
    } else {
      ++permitted_care;
      EXPECT_FALSE(e.consent_id().empty());
    }
  }
  EXPECT_GE(refusals, 4);  // no consent, another actor's, revoked (the read and the archiving)
  // The upload, the first download, and any read that came before the withdrawal reached the
  // cache.
  EXPECT_EQ(permitted_care, 2 + read_before_withdrawal_arrived);
  // The tenant can still erase it: it was not archived.
  EXPECT_TRUE(Erase(pki_->app(), record).ok());
}

// CARE is asked again before an upload commits: a consent withdrawn while the content arrived
// stops the record (audited), and nothing of it is stored.
TEST_F(SharingTest, ACareConsentWithdrawnDuringAnUploadStopsItBeforeItIsStored) {
  const std::string patient = Place("care-mid-upload-1", "FR");
  std::string consent_id;
  {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::nontransaction n(c);
    consent_id = n.exec_params1(
                      "SELECT consent_id FROM consents WHERE patient_id = $1 AND purpose = 'CARE'",
                      patient)[0]
                     .c_str();
  }
  const int64_t before = StoredRows();
  // A probe of the service's consent cache that stores nothing even while CARE still permits it
  // (its declared hash is wrong): PERMISSION_DENIED once the withdrawal is known.
  UploadSpec probe;
  probe.patient_id = patient;
  probe.content = "a probe of the service's consent cache";
  probe.declared_sha = std::string(32, 'p');
  auto care_denials = [&] {
    int n = 0;
    for (const v1::AuditEntry& e : PatientAudit(patient)) {
      n += e.actor() == P1() && e.action() == v1::AUDIT_ACTION_CREATE &&
           e.decision() == v1::DECISION_DENY && e.purpose() == v1::PURPOSE_CARE;
    }
    return n;
  };
  int denials_before_finish = 0;
  const std::vector<int> earlier = IdleUploadSessions("fr-1");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(29, 0, 3 * kMiB);
  spec.chunk_bytes = kMiB;
  bool withdrawn_seen = false;
  spec.before_chunk = [&](uint64_t offset) {
    if (offset != 2 * kMiB) return;
    // Two chunks are in the upload's transaction (the service let it in: CARE permitted it);
    // the consent is withdrawn, and the service knows it, before the last.
    ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return NewIdleUploadSession("fr-1", earlier) != 0; }));
    WithdrawConsent(consent_id);
    withdrawn_seen = PollUntil(absl::Now() + kPatience, [&] {
      return Upload(pki_->practitioner(), probe).error_code() ==
             grpc::StatusCode::PERMISSION_DENIED;
    });
    denials_before_finish = care_denials();
  };
  grpc::Status status = Upload(pki_->practitioner(), spec);
  ASSERT_TRUE(withdrawn_seen);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("CARE"));
  EXPECT_THAT(status.error_message(), HasSubstr("nothing was stored"));
  EXPECT_EQ(StoredRows(), before);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 0);
  // The refusal at the commit is audited: one more CARE denial than the probes left.
  EXPECT_EQ(care_denials(), denials_before_finish + 1);
}

TEST_F(SharingTest, BreakGlassIsOpsOnlyWithAReasonAndFlaggedInTheAudit) {
  const std::string patient = Place("break-glass-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(19, 0, 4000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const std::string reason = "unconscious patient in ER, record needed for treatment";

  EXPECT_EQ(Download(pki_->ops(), record).status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Download(pki_->ops(), record, "too short").status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Download(Cert("acme-p2"), record, reason).status.error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Download(pki_->ops(), "fr-1.missing", reason).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  // Refused the same way whether the record exists or not, and not audited in a tenant the
  // caller does not belong to.
  EXPECT_EQ(Download(Cert("acme-p2"), "fr-1.missing", reason).status.error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Download(pki_->globex_practitioner(), record, reason).status.error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // The refused break-glass attempts on the record are in its patient's audit.
  auto denial = [&](const std::string& actor, const std::string& why) {
    int n = 0;
    for (const v1::AuditEntry& e : PatientAudit(patient)) {
      n += e.actor() == actor && e.action() == v1::AUDIT_ACTION_READ && e.object_id() == record &&
           e.decision() == v1::DECISION_DENY && e.reason() == why;
    }
    return n;
  };
  // Without a reason, and with one too short to justify the read.
  EXPECT_EQ(denial(Id("/ops/alice"), "BREAK_GLASS_WITHOUT_REASON"), 2);
  EXPECT_EQ(denial(P2(), "BREAK_GLASS_NOT_OPS"), 1);
  EXPECT_EQ(denial(Id("/tenant/globex/practitioner/p-1"), "BREAK_GLASS_NOT_OPS"), 0);
  Downloaded d = Download(pki_->ops(), record, reason);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
  EXPECT_EQ(d.header.grants_size(), 0);

  // The patient's tenant sees who read, that it was break-glass, why, and how much.
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  bool found = false;
  for (const v1::AuditEntry& e : entries) {
    if (e.reason() != "BREAK_GLASS") continue;
    found = true;
    EXPECT_EQ(e.actor(), Id("/ops/alice"));
    EXPECT_EQ(e.action(), v1::AUDIT_ACTION_READ);
    EXPECT_EQ(e.object_id(), record);
    EXPECT_EQ(e.tenant_id(), "acme");
    EXPECT_EQ(e.decision(), v1::DECISION_PERMIT);
    EXPECT_THAT(e.reason_detail(), HasSubstr(reason));
    EXPECT_THAT(e.reason_detail(), HasSubstr("bytes=4000"));
  }
  EXPECT_TRUE(found);
}

TEST_F(SharingTest, ABreakGlassReasonIsCutToFitTheAuditDetail) {
  const std::string patient = Place("break-glass-2", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(20, 0, 4000);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  // The longest reason allowed, of two-byte characters after one ASCII byte: a cut at the
  // detail's bound would land inside one.
  std::string reason = "x";
  while (reason.size() + 2 <= kMaxBreakGlassReasonBytes) reason += "\xc3\xa9";  // "é"
  reason += "x";
  ASSERT_EQ(reason.size(), kMaxBreakGlassReasonBytes);
  Downloaded d = Download(pki_->ops(), record, reason);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();

  int found = 0;
  for (const v1::AuditEntry& e : PatientAudit(patient)) {
    if (e.reason() != "BREAK_GLASS") continue;
    ++found;
    const std::string head = "bytes=4000 reason=";
    ASSERT_THAT(e.reason_detail(), StartsWith(head));
    EXPECT_LE(e.reason_detail().size(), 1024u);
    // Only the reason's end is cut: at the bound, moved back to the start of the character that
    // the bound splits.
    const std::string kept = e.reason_detail().substr(head.size());
    EXPECT_GE(kept.size(), 1024u - head.size() - 1);
    EXPECT_EQ(kept, reason.substr(0, kept.size()));
    EXPECT_NE(static_cast<unsigned char>(reason[kept.size()]) & 0xC0, 0x80);
  }
  EXPECT_EQ(found, 1);
}

// --- archive and erasure -----------------------------------------------------------------------

TEST_F(SharingTest, ErasureCryptoShredsTheRecordWhileTheChainVerifies) {
  const std::string patient = Place("erase-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(23, 0, kMiB + 77);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  ASSERT_TRUE(Download(pki_->practitioner(), record).status.ok());

  EXPECT_EQ(Erase(Cert("acme-p2"), record).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Erase(pki_->practitioner(), record, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto erased = Erase(pki_->practitioner(), record, "uploaded to the wrong patient");
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->record_id(), record);

  Downloaded d = Download(pki_->practitioner(), record);
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(d.has_header);
  EXPECT_EQ(Erase(pki_->practitioner(), record).status().code(), absl::StatusCode::kNotFound);
  // The key is gone; the ciphertext left behind (as in a backup) has nothing to decrypt it.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE record_id = $1", record), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", record), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks WHERE record_id = $1", record), 2);

  auto chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok()) << chain.status();
  EXPECT_TRUE(chain->ok()) << chain->detail();
  EXPECT_EQ(chain->fault(), v1::CHAIN_FAULT_UNSPECIFIED);
  EXPECT_EQ(chain->last_hash().size(), 32u);
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_CREATE, record, "PERMITTED"));
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_DELETE, record, "ERASED"));
  // The refused erasure too.
  EXPECT_TRUE(HasEntry(entries, P2(), v1::AUDIT_ACTION_DELETE, record, "NOT_OWNER"));

  // The purge removes the orphaned ciphertext; the chain still verifies.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM chunk_purge_queue WHERE record_id = $1", record),
            1);
  auto swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->purged_chunks, 2);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks WHERE record_id = $1", record), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM chunk_purge_queue WHERE record_id = $1", record),
            0);
  chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok());
  EXPECT_TRUE(chain->ok()) << chain->detail();
}

// --- erasure and the shard's backups ----------------------------------------------------------

// What a backup of the shard taken now holds of a patient's records: their key rows (patient key
// and record keys) and their first chunk.
struct ShardBackup {
  struct KeyRow {
    std::string key_id;
    std::string wrapped_by;
    std::string wrapped_key;
  };
  std::map<std::string, KeyRow> patient_keys;  // by key id
  std::map<std::string, KeyRow> record_keys;   // by record id
  std::map<std::string, std::string> first_chunks;
};

ShardBackup BackUp(const std::string& shard_conninfo, const std::string& patient_id) {
  ShardBackup backup;
  pqxx::connection c(shard_conninfo);
  pqxx::nontransaction q(c);
  for (const pqxx::row& row : q.exec_params(
           "SELECT key_id, coalesce(record_id, ''), wrapped_by, wrapped_key FROM record_keys "
           "WHERE patient_id = $1",
           patient_id)) {
    ShardBackup::KeyRow key{row[0].c_str(), row[2].c_str(), pqxx::binarystring(row[3]).str()};
    if (std::string(row[1].c_str()).empty()) {
      backup.patient_keys[key.key_id] = key;
    } else {
      backup.record_keys[row[1].c_str()] = key;
    }
  }
  for (const pqxx::row& row : q.exec_params(
           "SELECT c.record_id, c.ciphertext FROM record_chunks c JOIN records r "
           "ON r.record_id = c.record_id WHERE r.patient_id = $1 AND c.chunk_index = 0",
           patient_id)) {
    backup.first_chunks[row[0].c_str()] = pqxx::binarystring(row[1]).str();
  }
  return backup;
}

// The patient key `key_id` as the region's key vault holds it now, unwrapped with the KEK:
// NOT_FOUND when the vault no longer holds it.
absl::StatusOr<crypto::SecretKey> FromVault(const std::string& vault_conninfo,
                                    const std::string& patient_id, const std::string& key_id) {
  pqxx::connection c(vault_conninfo);
  pqxx::nontransaction q(c);
  pqxx::result rows =
      q.exec_params("SELECT wrapped_key FROM patient_keys WHERE key_id = $1", key_id);
  if (rows.empty()) return absl::NotFoundError(absl::StrCat("the vault holds no key ", key_id));
  auto kek = crypto::ParseHexKeyEncryptionKey(kKekHex, "test");
  if (!kek.ok()) return kek.status();
  return (*kek)->Unwrap(pqxx::binarystring(rows[0][0]).str(),
                        sharing::PatientKeyContext(patient_id, key_id));
}

// Record `record_id`'s first (and only) chunk, opened from `backup` with what is kept outside the
// shard: the KEK and the region's key vault as it is now.
absl::StatusOr<std::string> OpenFromBackup(const ShardBackup& backup,
                                           const std::string& vault_conninfo,
                                           const std::string& patient_id,
                                           const std::string& record_id) {
  auto record_key = backup.record_keys.find(record_id);
  auto chunk = backup.first_chunks.find(record_id);
  if (record_key == backup.record_keys.end() || chunk == backup.first_chunks.end()) {
    return absl::NotFoundError("the backup does not hold the record");
  }
  auto patient_key = backup.patient_keys.find(record_key->second.wrapped_by);
  if (patient_key == backup.patient_keys.end()) {
    return absl::NotFoundError("the backup does not hold the record's patient key row");
  }
  if (patient_key->second.wrapped_by != "vault") {
    return absl::FailedPreconditionError("the backup holds the patient key itself");
  }
  auto key = FromVault(vault_conninfo, patient_id, patient_key->first);
  if (!key.ok()) return key.status();
  auto opened = crypto::Open(*key, absl::StrCat("medgate-record-key-v1/", record_id),
                             record_key->second.wrapped_key);
  if (!opened.ok()) return opened.status();
  auto data_key = crypto::SecretKey::FromBytes(*opened);
  if (!data_key.ok()) return data_key.status();
  return crypto::DecryptChunk(*data_key, record_id, 0, /*last=*/true, chunk->second);
}

TEST_F(SharingTest, AnErasedRecordDoesNotOpenFromABackupOfTheShardTakenBefore) {
  const std::string patient = Place("backup-1", "FR");
  const std::string shard = ConnInfo("fr-1");
  const std::string vault = ConnInfo("fr-1 keys");
  UploadSpec a;
  a.patient_id = patient;
  a.content = Generate(91, 0, 3000);
  UploadSpec b = a;
  b.content = Generate(92, 0, 4000);
  const std::string record_a = UploadOk(pki_->practitioner(), a);
  const std::string record_b = UploadOk(pki_->practitioner(), b);

  // The shard holds no patient key, only its id: what it names is in the vault.
  const ShardBackup before = BackUp(shard, patient);
  ASSERT_EQ(before.patient_keys.size(), 1u);
  for (const auto& [id, key] : before.patient_keys) {
    EXPECT_EQ(key.wrapped_by, "vault");
    EXPECT_TRUE(key.wrapped_key.empty());
  }
  // Before the erasure, that backup opens with the vault and the KEK.
  auto opened = OpenFromBackup(before, vault, patient, record_a);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, a.content);
  opened = OpenFromBackup(before, vault, patient, record_b);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, b.content);

  auto erased = Erase(pki_->practitioner(), record_a, "uploaded to the wrong patient");
  ASSERT_TRUE(erased.ok()) << erased.status();

  // The patient key the backup names is destroyed in the vault: the erased record does not open
  // from it (nor does the other record's copy there; it opens from the shard as it is now).
  opened = OpenFromBackup(before, vault, patient, record_a);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kNotFound) << opened.status();
  EXPECT_EQ(OpenFromBackup(before, vault, patient, record_b).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE key_id = $1",
                  before.patient_keys.begin()->first),
            0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            0);
  ExpectContent(pki_->practitioner(), record_b, b.content);
  const ShardBackup after = BackUp(shard, patient);
  ASSERT_EQ(after.patient_keys.size(), 1u);
  EXPECT_NE(after.patient_keys.begin()->first, before.patient_keys.begin()->first);
  opened = OpenFromBackup(after, vault, patient, record_b);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, b.content);
  // The patient's current key does not open the erased record's key from the old backup.
  auto current = FromVault(vault, patient, after.patient_keys.begin()->first);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_FALSE(crypto::Open(*current, absl::StrCat("medgate-record-key-v1/", record_a),
                            before.record_keys.at(record_a).wrapped_key)
                   .ok());

  // Erasing all of the patient's records destroys the current key too.
  auto all = ErasePatient(pki_->app(), patient);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(OpenFromBackup(after, vault, patient, record_b).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE patient_id = $1", patient),
            0);
  auto chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok()) << chain.status();
  EXPECT_TRUE(chain->ok()) << chain->detail();
}

TEST_F(SharingTest, AKeyTheVaultCouldNotDestroyAtTheErasureIsDestroyedByTheSweep) {
  const std::string patient = Place("backup-2", "FR");
  const std::string vault = ConnInfo("fr-1 keys");
  UploadSpec a;
  a.patient_id = patient;
  a.content = Generate(93, 0, 2000);
  UploadSpec b = a;
  b.content = Generate(94, 0, 2500);
  const std::string record_a = UploadOk(pki_->practitioner(), a);
  UploadOk(pki_->practitioner(), b);
  const ShardBackup before = BackUp(ConnInfo("fr-1"), patient);

  auto drop = RefuseKeyDestructionInFr1Vault();
  // The erasure is done (the record is gone from the shard); its retired key stays queued.
  auto erased = Erase(pki_->practitioner(), record_a);
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(Download(pki_->practitioner(), record_a).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            1);
  EXPECT_TRUE(OpenFromBackup(before, vault, patient, record_a).ok());
  auto swept = sharing_->core().SweepRetention();
  EXPECT_THAT(SweepStatus(swept).message(), HasSubstr("database error MG002: "));  // still refusing
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            1);

  std::move(drop).Invoke();
  swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->destroyed_keys, 1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            0);
  EXPECT_EQ(OpenFromBackup(before, vault, patient, record_a).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SharingTest, ARecordStoredWhileAnErasureWaitedIsRewrappedUnderTheNewKey) {
  const std::string patient = Place("rotate-race-1", "FR");
  UploadSpec first;
  first.patient_id = patient;
  first.content = Generate(97, 0, 1000);
  const std::string first_id = UploadOk(pki_->practitioner(), first);
  const std::string old_key = BackUp(ConnInfo("fr-1"), patient).patient_keys.begin()->first;
  // Holding the audit chain's head stops the next upload in its last statement, after it took
  // the patient key FOR KEY SHARE and before its commit.
  pqxx::connection holder(ConnInfo("fr-1"));
  auto head = std::make_unique<pqxx::work>(holder);
  ASSERT_EQ(head->exec("SELECT 1 FROM audit_head FOR UPDATE").size(), 1u);
  UploadSpec late = first;
  late.content = Generate(98, 0, 1100);
  grpc::Status uploaded;
  v1::UploadRecordResponse late_response;
  std::thread uploading([&] { uploaded = Upload(pki_->practitioner(), late, &late_response); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", kRecordStatementQuery) == 1; }));
  // The erasure waits for the upload's lock on the patient key.
  absl::StatusOr<v1::EraseRecordResponse> erased;
  std::thread erasing([&] { erased = Erase(pki_->practitioner(), first_id); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return LockWaits("fr-1", kPatientKeyLockQuery) == 1;
  }));
  head.reset();  // rolls back: the upload commits, then the erasure goes on
  uploading.join();
  erasing.join();
  ASSERT_TRUE(uploaded.ok()) << uploaded.error_message();
  ASSERT_TRUE(erased.ok()) << erased.status();

  const ShardBackup now = BackUp(ConnInfo("fr-1"), patient);
  ASSERT_EQ(now.patient_keys.size(), 1u);
  EXPECT_NE(now.patient_keys.begin()->first, old_key);
  EXPECT_EQ(now.record_keys.at(late_response.record_id()).wrapped_by,
            now.patient_keys.begin()->first);
  EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE key_id = $1", old_key), 0);
  ExpectContent(pki_->practitioner(), late_response.record_id(), late.content);
}

TEST_F(SharingTest, TwoErasuresOfOnePatientAtOnceRetireEveryKeyTheirRecordsWereUnder) {
  const std::string patient = Place("rotate-race-2", "FR");
  const auto [ids, contents] = UploadThree(patient, 110, 900);
  const std::string first_key = BackUp(ConnInfo("fr-1"), patient).patient_keys.begin()->first;
  // The first erasure stops at its audit entry, its rewrap done; the second waits for the
  // patient key the first holds.
  pqxx::connection holder(ConnInfo("fr-1"));
  auto head = std::make_unique<pqxx::work>(holder);
  ASSERT_EQ(head->exec("SELECT 1 FROM audit_head FOR UPDATE").size(), 1u);
  absl::StatusOr<v1::EraseRecordResponse> erased_0;
  std::thread erasing_0([&] { erased_0 = Erase(pki_->practitioner(), ids[0]); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] { return LockWaits("fr-1", "%audit_append%") == 1; }));
  absl::StatusOr<v1::EraseRecordResponse> erased_1;
  std::thread erasing_1([&] { erased_1 = Erase(pki_->practitioner(), ids[1]); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return LockWaits("fr-1", kPatientKeyLockQuery) == 1;
  }));
  // The key the first erasure made (in the vault already, not yet named by the shard): the
  // second record's key is wrapped under it once the first erasure commits.
  std::string second_key;
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::nontransaction q(v);
    pqxx::result rows = q.exec_params(
        "SELECT key_id FROM patient_keys WHERE patient_id = $1 AND key_id <> $2", patient,
        first_key);
    ASSERT_EQ(rows.size(), 1u);
    second_key = rows[0][0].c_str();
  }
  head.reset();
  erasing_0.join();
  erasing_1.join();
  ASSERT_TRUE(erased_0.ok()) << erased_0.status();
  ASSERT_TRUE(erased_1.ok()) << erased_1.status();

  // Both keys the erased records were ever under are destroyed; the third record is under a
  // third key, and reads.
  const ShardBackup now = BackUp(ConnInfo("fr-1"), patient);
  ASSERT_EQ(now.patient_keys.size(), 1u);
  const std::string third_key = now.patient_keys.begin()->first;
  EXPECT_NE(third_key, first_key);
  EXPECT_NE(third_key, second_key);
  EXPECT_EQ(now.record_keys.size(), 1u);
  EXPECT_EQ(now.record_keys.at(ids[2]).wrapped_by, third_key);
  for (const std::string& retired : {first_key, second_key}) {
    EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE key_id = $1", retired),
              0)
        << retired;
  }
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            0);
  ExpectContent(pki_->practitioner(), ids[2], contents[2]);
  EXPECT_EQ(Download(pki_->practitioner(), ids[1]).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST(KeyVaultConfigTest, UnusedKeysOutliveEveryStatementTimeout) {
  MedgateConfig config;
  config.regions.resize(2);
  EXPECT_EQ(UnusedVaultKeyGrace(config), absl::Hours(1));  // 5 s timeouts: the 1 h floor
  config.regions[1].keys_db = DbConfig{};
  config.regions[1].keys_db->statement_timeout_ms = 600000;  // 10 min
  EXPECT_EQ(UnusedVaultKeyGrace(config), absl::Minutes(200));
  config.regions[0].db.statement_timeout_ms = 3600000;  // 1 h
  EXPECT_EQ(UnusedVaultKeyGrace(config), absl::Hours(20));
}

TEST(KeyVaultConfigTest, EveryRegionNeedsAKeyVault) {
  std::vector<RegionConfig> regions(2);
  regions[0].id = "fr-1";
  regions[0].keys_db = DbConfig{"host=127.0.0.1 port=1"};
  regions[1].id = "de-1";
  auto kek = crypto::ParseHexKeyEncryptionKey(kKekHex, "test");
  ASSERT_TRUE(kek.ok());
  auto vault = KeyVault::Create(regions, **kek);
  EXPECT_EQ(vault.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(vault.status().message(), HasSubstr("'regions[1].keys_db'"));
  EXPECT_THAT(vault.status().message(), HasSubstr("de-1"));
  regions[1].keys_db = DbConfig{"host=127.0.0.1 port=2"};
  EXPECT_TRUE(KeyVault::Create(regions, **kek).ok());
}

// An erasure that cannot give the patient's other records a new key changes nothing: neither
// when the vault refuses the new key, nor when the vault has lost the key the shard names.
TEST_F(SharingTest, AnErasureThatCannotRewrapTheOtherRecordsChangesNothing) {
  const std::string patient = Place("rotate-fail-1", "FR");
  UploadSpec a;
  a.patient_id = patient;
  a.content = Generate(120, 0, 1300);
  UploadSpec b = a;
  b.content = Generate(121, 0, 1400);
  const std::string record_a = UploadOk(pki_->practitioner(), a);
  const std::string record_b = UploadOk(pki_->practitioner(), b);
  const ShardBackup before = BackUp(ConnInfo("fr-1"), patient);
  auto unchanged = [&] {
    const ShardBackup now = BackUp(ConnInfo("fr-1"), patient);
    EXPECT_EQ(now.patient_keys.size(), 1u);
    EXPECT_EQ(now.patient_keys.begin()->first, before.patient_keys.begin()->first);
    EXPECT_EQ(now.record_keys.size(), 2u);
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1",
                    patient),
              0);
  };

  Exec("fr-1 keys",
       "CREATE FUNCTION refuse_new_key() RETURNS trigger LANGUAGE plpgsql AS $$ "
       "BEGIN RAISE EXCEPTION USING ERRCODE = 'MG003', MESSAGE = 'injected vault refusal'; "
       "END $$");
  Exec("fr-1 keys",
       "CREATE TRIGGER refuse_new_key BEFORE INSERT ON patient_keys FOR EACH ROW "
       "EXECUTE FUNCTION refuse_new_key()");
  auto refused = Erase(pki_->practitioner(), record_a);
  Exec("fr-1 keys", "DROP TRIGGER refuse_new_key ON patient_keys");
  Exec("fr-1 keys", "DROP FUNCTION refuse_new_key()");
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("database error MG003: "));
  unchanged();
  ExpectContent(pki_->practitioner(), record_a, a.content);

  // The vault loses the key the shard names (the service's cached copy expired meanwhile).
  const std::string key_id = before.patient_keys.begin()->first;
  std::string kek_id;
  std::string wrapped;
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    pqxx::row row = vt.exec_params1(
        "DELETE FROM patient_keys WHERE key_id = $1 RETURNING kek_id, wrapped_key", key_id);
    kek_id = row[0].c_str();
    wrapped = pqxx::binarystring(row[1]).str();
    vt.commit();
  }
  AdvanceClock(absl::Minutes(2));
  auto lost = Erase(pki_->practitioner(), record_a);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kDataLoss) << lost.status();
  EXPECT_THAT(lost.status().message(), HasSubstr(key_id));
  unchanged();
  // A reader reads the record's key row again: it still names the lost key, so no retry would
  // help (an erasure that replaced the key would have rewrapped the record first).
  Downloaded unreadable = Download(pki_->practitioner(), record_b);
  EXPECT_EQ(unreadable.status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(unreadable.status.error_message(), HasSubstr(record_b));

  // The key back, the erasure goes through and the other record reads.
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    vt.exec_params0(
        "INSERT INTO patient_keys (key_id, patient_id, kek_id, wrapped_key, confirmed) "
        "VALUES ($1, $2, $3, $4, true)",
        key_id, patient, kek_id, pqxx::binarystring(wrapped));
    vt.commit();
  }
  ASSERT_TRUE(Erase(pki_->practitioner(), record_a).ok());
  ExpectContent(pki_->practitioner(), record_b, b.content);
}

// A record key that no longer opens (damaged) does not keep an erasure of another record from
// happening: it stays under the retired key, as unreadable as it was.
TEST_F(SharingTest, ADamagedRecordKeyDoesNotBlockTheErasureOfAnother) {
  const std::string patient = Place("rotate-damaged-1", "FR");
  const auto [ids, contents] = UploadThree(patient, 130, 800);
  // Record 1's wrapped key, one byte flipped.
  Exec("fr-1",
       "UPDATE record_keys SET wrapped_key = set_byte(wrapped_key, 20, get_byte(wrapped_key, 20) # 1) "
       "WHERE record_id = $1",
       ids[1]);
  auto erased = Erase(pki_->practitioner(), ids[0]);
  ASSERT_TRUE(erased.ok()) << erased.status();
  ExpectContent(pki_->practitioner(), ids[2], contents[2]);
  EXPECT_EQ(Download(pki_->practitioner(), ids[1]).status.error_code(), grpc::StatusCode::DATA_LOSS);
  const ShardBackup now = BackUp(ConnInfo("fr-1"), patient);
  EXPECT_NE(now.record_keys.at(ids[1]).wrapped_by, now.patient_keys.begin()->first);
  // The damaged record, left under the retired key, is erased in its turn; the others stay.
  auto damaged_erased = Erase(pki_->practitioner(), ids[1], "damaged beyond repair");
  ASSERT_TRUE(damaged_erased.ok()) << damaged_erased.status();
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE record_id = $1", ids[1]), 0);
  ExpectContent(pki_->practitioner(), ids[2], contents[2]);
  auto chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok()) << chain.status();
  EXPECT_TRUE(chain->ok()) << chain->detail();
}

TEST_F(SharingTest, VaultKeysNoShardUsesAreDeletedAfterTheGracePeriod) {
  const std::string patient = Place("vault-orphan-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(95, 0, 1500);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  // As a key written for an upload whose shard transaction then failed.
  Exec("fr-1 keys",
       "INSERT INTO patient_keys (key_id, patient_id, kek_id, wrapped_key) "
       "VALUES ('fr-1.pstray', $1, 'unused', '\\x00')",
       patient);
  auto keys = [&](const std::string& which) {
    return Count("fr-1 keys",
                 absl::StrCat("SELECT count(*) FROM patient_keys WHERE patient_id = $1 AND ", which),
                 patient);
  };
  EXPECT_EQ(keys("NOT confirmed"), 2);

  // Within the grace period nothing is decided: its transaction may still commit.
  auto swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(keys("true"), 2);

  // Two hours later, by the vault's clock.
  Exec("fr-1 keys",
       "UPDATE patient_keys SET created_at = created_at - interval '2 hours' WHERE patient_id = $1",
       patient);
  swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(keys("key_id = 'fr-1.pstray'"), 0);
  EXPECT_EQ(keys("confirmed"), 1);  // the key the shard uses stays
  AdvanceClock(absl::Minutes(2));     // past the service's cache of the key: read from the vault
  ExpectContent(pki_->practitioner(), record, spec.content);
}

TEST_F(SharingTest, PatientKeysTheShardHeldMoveToTheVault) {
  const std::string patient = Place("vault-move-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(96, 0, 1200);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const std::string key_id = BackUp(ConnInfo("fr-1"), patient).patient_keys.begin()->first;
  // As a key written before the vault: wrapped by the KEK in the shard's row.
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    pqxx::row row = vt.exec_params1(
        "DELETE FROM patient_keys WHERE key_id = $1 RETURNING kek_id, wrapped_key", key_id);
    pqxx::connection s(ConnInfo("fr-1"));
    pqxx::work st(s);
    st.exec_params0("UPDATE record_keys SET wrapped_by = $2, wrapped_key = $3 WHERE key_id = $1",
                    key_id, row[0].c_str(), pqxx::binarystring(row[1]));
    st.commit();
    vt.commit();
  }
  AdvanceClock(absl::Minutes(2));  // past the service's cache of the key
  ExpectContent(pki_->practitioner(), record, spec.content);

  auto swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->moved_keys, 1);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys WHERE key_id = $1 AND wrapped_by = 'vault' "
                  "AND length(wrapped_key) = 0",
                  key_id),
            1);
  EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE key_id = $1 AND confirmed",
                  key_id),
            1);
  AdvanceClock(absl::Minutes(2));
  ExpectContent(pki_->practitioner(), record, spec.content);
}

// A key the shard held before the vault, wrapped by another KEK of a rotation: it opens with that
// KEK, and moves into the vault rewrapped under the current one, which every pod holds.
TEST_F(SharingTest, AShardHeldKeyOfAPreviousKekMovesIntoTheVaultUnderTheCurrentOne) {
  const std::string patient = Place("vault-move-rotated-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(97, 0, 1500);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  const std::string key_id = BackUp(ConnInfo("fr-1"), patient).patient_keys.begin()->first;
  absl::StatusOr<crypto::SecretKey> key = FromVault(ConnInfo("fr-1 keys"), patient, key_id);
  ASSERT_TRUE(key.ok()) << key.status();
  auto other_kek = crypto::ParseHexKeyEncryptionKey(kOtherKekHex, "test");
  ASSERT_TRUE(other_kek.ok());
  absl::StatusOr<std::string> wrapped =
      (*other_kek)->Wrap(*key, sharing::PatientKeyContext(patient, key_id));
  ASSERT_TRUE(wrapped.ok());
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    vt.exec_params0("DELETE FROM patient_keys WHERE key_id = $1", key_id);
    pqxx::connection s(ConnInfo("fr-1"));
    pqxx::work st(s);
    st.exec_params0("UPDATE record_keys SET wrapped_by = $2, wrapped_key = $3 WHERE key_id = $1",
                    key_id, (*other_kek)->id(), pqxx::binarystring(*wrapped));
    st.commit();
    vt.commit();
  }
  // Another patient's key, in the shard under a KEK no pod is given: it cannot move, and must not
  // hold up the others. (Put back in the vault as it was at the end.)
  const std::string stranded_patient = Place("vault-move-rotated-2", "FR");
  UploadSpec stranded_spec;
  stranded_spec.patient_id = stranded_patient;
  stranded_spec.content = "under a KEK nobody holds";
  UploadOk(pki_->practitioner(), stranded_spec);
  const std::string stranded_key =
      BackUp(ConnInfo("fr-1"), stranded_patient).patient_keys.begin()->first;
  pqxx::binarystring stranded_vault_row("");
  std::string stranded_kek_id;
  {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    pqxx::row row = vt.exec_params1(
        "DELETE FROM patient_keys WHERE key_id = $1 RETURNING kek_id, wrapped_key", stranded_key);
    stranded_kek_id = row[0].c_str();
    stranded_vault_row = pqxx::binarystring(row[1]);
    pqxx::connection s(ConnInfo("fr-1"));
    pqxx::work st(s);
    st.exec_params0("UPDATE record_keys SET wrapped_by = 'unheld-kek', wrapped_key = '\\x00' "
                    "WHERE key_id = $1",
                    stranded_key);
    st.commit();
    vt.commit();
  }
  absl::Cleanup put_back = [&] {
    pqxx::connection v(ConnInfo("fr-1 keys"));
    pqxx::work vt(v);
    vt.exec_params0("INSERT INTO patient_keys (key_id, patient_id, kek_id, wrapped_key, confirmed) "
                    "VALUES ($1, $2, $3, $4, true)",
                    stranded_key, stranded_patient, stranded_kek_id, stranded_vault_row);
    pqxx::connection s(ConnInfo("fr-1"));
    pqxx::work st(s);
    st.exec_params0("UPDATE record_keys SET wrapped_by = 'vault', wrapped_key = ''::bytea "
                    "WHERE key_id = $1",
                    stranded_key);
    vt.commit();
    st.commit();
  };
  ExtraSharing rotating = StartSharingOn(ConfigWith(
      "retention_sweep_seconds: 86400",
      absl::StrCat("retention_sweep_seconds: 86400\n  previous_kek_files: [", *kek_dir_,
                   "/other-kek.hex]")));
  ASSERT_NE(rotating.server, nullptr);
  Downloaded read = Download(pki_->practitioner(), record, "", true, rotating.server->port());
  ASSERT_TRUE(read.status.ok()) << read.status.error_message();
  EXPECT_EQ(read.content, spec.content);
  auto swept = rotating.server->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->moved_keys, 1);
  EXPECT_EQ(swept->unmovable_keys, 1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE key_id = $1 AND wrapped_by = "
                          "'unheld-kek'",
                  stranded_key),
            1);
  const std::string current_kek = (*crypto::ParseHexKeyEncryptionKey(kKekHex, "test"))->id();
  absl::StatusOr<int64_t> in_shard =
      rotating.server->core().PatientKeysInShardNotUnder("fr-1", current_kek);
  ASSERT_TRUE(in_shard.ok()) << in_shard.status();
  EXPECT_EQ(*in_shard, 1);
  EXPECT_EQ(Count("fr-1 keys",
                  absl::StrCat("SELECT count(*) FROM patient_keys WHERE key_id = $1 AND kek_id = '",
                               current_kek, "'"),
                  key_id),
            1);
  rotating.server->Shutdown();
  // The suite's server, which holds the current KEK only, opens it.
  AdvanceClock(absl::Minutes(2));
  ExpectContent(pki_->practitioner(), record, spec.content);
}

TEST_F(SharingTest, ArchivedRecordsResistErasureUntilRetentionEnd) {
  const auto [patient, spec, record] = ConsentedRecord("archive-1", "an old discharge summary");
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(48));
  ASSERT_TRUE(shared.ok()) << shared.status();

  EXPECT_EQ(Archive(Cert("acme-p2"), record, ServerNow() + absl::Hours(24)).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Archive(pki_->practitioner(), record, ServerNow() - absl::Hours(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto archived = Archive(pki_->practitioner(), record, ServerNow() + absl::Hours(24));
  ASSERT_TRUE(archived.ok()) << archived.status();
  EXPECT_EQ(archived->record().state(), v1::RECORD_STATE_ARCHIVED);
  EXPECT_TRUE(archived->record().has_retain_until());
  // The retention end moves later, never earlier (an earlier one would open the record to an
  // erasure before the retention it was archived under).
  auto sooner = Archive(pki_->practitioner(), record, ServerNow() + absl::Minutes(1));
  EXPECT_EQ(sooner.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(sooner.status().message()), HasSubstr("moved later, not earlier"));
  auto later = Archive(pki_->practitioner(), record, ServerNow() + absl::Hours(24) + absl::Seconds(5));
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_GT(later->record().retain_until().seconds(), archived->record().retain_until().seconds());

  auto refused = Erase(pki_->practitioner(), record);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("retention end"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("ErasePatientRecords"));
  EXPECT_EQ(Erase(pki_->app(), record).status().code(), absl::StatusCode::kFailedPrecondition);
  // The refusals are audited: the archiving by another practitioner, each early erasure.
  {
    const std::vector<v1::AuditEntry> entries = PatientAudit(patient);
    EXPECT_TRUE(HasEntry(entries, P2(), v1::AUDIT_ACTION_UPDATE, record, "NOT_OWNER"));
    int early_erasures = 0;
    for (const v1::AuditEntry& e : entries) {
      early_erasures += e.action() == v1::AUDIT_ACTION_DELETE && e.object_id() == record &&
                        e.decision() == v1::DECISION_DENY && e.reason() == "ARCHIVED_UNTIL";
    }
    EXPECT_EQ(early_erasures, 2);
  }
  auto share = Share(pki_->practitioner(), record, P3(), ServerNow() + absl::Hours(1));
  EXPECT_EQ(share.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(share.status().message()), HasSubstr("archived"));
  // Still readable by the owner and grantees; listed only on request.
  EXPECT_TRUE(Download(Cert("acme-p2"), record).status.ok());
  EXPECT_THAT(ListedIds(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient),
              ::testing::Not(::testing::Contains(record)));
  auto with_archived = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient, 10, "", true);
  ASSERT_TRUE(with_archived.ok());
  ASSERT_EQ(with_archived->records_size(), 1);
  EXPECT_EQ(with_archived->records(0).state(), v1::RECORD_STATE_ARCHIVED);

  // At its retention end the sweep erases it.
  AdvanceClock(absl::Hours(25));
  auto swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->erased_records, 1);
  EXPECT_EQ(Download(pki_->practitioner(), record).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(HasEntry(PatientAudit(patient), Id("/service/sharing"), v1::AUDIT_ACTION_DELETE,
                       record, "RETENTION_END"));
}

// Archived records past their retention end whose erasure keeps failing do not hold back the
// others: the sweep goes on past them (reporting them, not failing), and tries them again once it
// has been through the region's other expired archives.
TEST_F(SharingTest, TheRetentionSweepGoesPastRecordsWhoseErasureFails) {
  ASSERT_NO_FATAL_FAILURE(DrainRetentionSweeps());
  const std::string patient = Place("retention-stuck-1", "FR");
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = Generate(170 + i, 0, 1000);
    ids.push_back(UploadOk(pki_->practitioner(), spec));
    ASSERT_FALSE(ids.back().empty());
    // Long past their retention end, so that they come first, in this order.
    Exec("fr-1",
         absl::StrCat("UPDATE records SET state = 'archived', retain_until = "
                      "'2000-01-01 00:00:0",
                      i + 1, "+00' WHERE record_id = $1"),
         ids.back());
  }
  // The first two cannot be erased (as when the key vault lost their patient's key).
  auto drop = RefuseRecordErasureInFr1({ids[0], ids[1]});
  const auto exists = [](const std::string& id) {
    return Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", id) == 1;
  };

  absl::StatusOr<SweepResult> swept = sharing_->core().SweepRetention(/*batch=*/2);
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(swept->failed_records, 2);
  EXPECT_EQ(swept->erased_records, 0);
  EXPECT_THAT(swept->failed_record_ids, ::testing::ElementsAre(ids[0], ids[1]));
  EXPECT_THAT(std::string(swept->first_failure.message()), HasSubstr("database error MG004: "));
  EXPECT_TRUE(swept->more);
  // The next batch starts past them.
  swept = sharing_->core().SweepRetention(/*batch=*/2);
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(swept->failed_records, 0);
  EXPECT_GE(swept->erased_records, 1);
  EXPECT_FALSE(exists(ids[2]));
  EXPECT_TRUE(exists(ids[0]));
  EXPECT_TRUE(exists(ids[1]));

  // Once they can be erased, a later pass erases them.
  std::move(drop).Invoke();
  for (int i = 0; i < 10 && (exists(ids[0]) || exists(ids[1])); ++i) {
    swept = sharing_->core().SweepRetention(/*batch=*/2);
    ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
    EXPECT_EQ(swept->failed_records, 0);
  }
  EXPECT_FALSE(exists(ids[0]));
  EXPECT_FALSE(exists(ids[1]));
  const std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  for (const std::string& id : ids) {
    EXPECT_TRUE(HasEntry(entries, Id("/service/sharing"), v1::AUDIT_ACTION_DELETE, id,
                         "RETENTION_END"))
        << id;
  }
}

// A patient's archives that reach their retention end together are erased in one transaction,
// which gives the patient's other records one new key: one patient key retired, not one per
// record (each erasure alone rewraps all the patient's other record keys again).
TEST_F(SharingTest, TheRetentionSweepErasesAPatientsExpiredArchivesUnderOneNewKey) {
  ASSERT_NO_FATAL_FAILURE(DrainRetentionSweeps());
  const std::string patient = Place("retention-together-1", "FR");
  const std::vector<std::string> archives = ExpiredArchives(patient, 180, 3);
  UploadSpec kept_spec;
  kept_spec.patient_id = patient;
  kept_spec.content = Generate(183, 0, 5000);
  const std::string kept = UploadOk(pki_->practitioner(), kept_spec);
  // The vault refuses to destroy keys, so that every key the erasures retire stays queued.
  auto drop = RefuseKeyDestructionInFr1Vault();
  absl::StatusOr<SweepResult> swept = sharing_->core().SweepRetention();
  // The vault's refusal is told, and so is the work the sweep did all the same.
  ASSERT_TRUE(swept.ok()) << swept.status();
  EXPECT_THAT(swept->first_error.message(), HasSubstr("database error MG002: "));  // the vault
  EXPECT_EQ(swept->erased_records, static_cast<int>(archives.size()));
  for (const std::string& id : archives) {
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", id), 0) << id;
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE record_id = $1", id), 0) << id;
  }
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            1);
  std::move(drop).Invoke();
  swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM key_destructions WHERE patient_id = $1", patient),
            0);
  EXPECT_EQ(Count("fr-1 keys", "SELECT count(*) FROM patient_keys WHERE patient_id = $1", patient),
            1);
  ExpectContent(pki_->practitioner(), kept, kept_spec.content);
  const std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  for (const std::string& id : archives) {
    EXPECT_TRUE(HasEntry(entries, Id("/service/sharing"), v1::AUDIT_ACTION_DELETE, id,
                         "RETENTION_END"))
        << id;
  }
  auto chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok()) << chain.status();
  EXPECT_TRUE(chain->ok()) << chain->detail();
}

// A patient's expired archives whose one transaction fails (one of them cannot be erased) are
// tried again one by one in the same sweep: the failing one is reported, the others are erased.
TEST_F(SharingTest, ARecordThatCannotBeErasedHoldsBackNoneOfItsPatientsOtherArchives) {
  ASSERT_NO_FATAL_FAILURE(DrainRetentionSweeps());
  const std::string patient = Place("retention-together-2", "FR");
  const std::vector<std::string> archives = ExpiredArchives(patient, 190, 3);
  const std::string stuck = archives[1];
  auto drop = RefuseRecordErasureInFr1({stuck});
  absl::StatusOr<SweepResult> swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(swept->erased_records, 2);
  EXPECT_EQ(swept->failed_records, 1);
  EXPECT_THAT(swept->failed_record_ids, ::testing::ElementsAre(stuck));
  for (const std::string& id : archives) {
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", id),
              id == stuck ? 1 : 0)
        << id;
  }
  std::move(drop).Invoke();
  swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1", stuck), 0);
}

// An upload that stores its record while a patient erasure runs: the erasure waits for it, then
// erases that record too, counts it and audits it.
TEST_F(SharingTest, APatientErasureIncludesARecordStoredWhileItWaited) {
  const std::string patient = Place("gdpr-race-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "first";
  const std::string first = UploadOk(pki_->practitioner(), spec);
  const std::string late = "fr-1.rlate0123456789abcdef";
  // An upload's last statement, as it stands just before its commit: the record stored under the
  // patient key it holds FOR KEY SHARE.
  pqxx::connection upload(Db("fr-1").ConnectionString());
  pqxx::work storing(upload);
  ASSERT_EQ(storing
                .exec_params("SELECT 1 FROM record_keys WHERE patient_id = $1 AND record_id IS "
                             "NULL FOR KEY SHARE",
                             patient)
                .size(),
            1u);
  storing.exec_params0(
      "INSERT INTO records (record_id, tenant_id, patient_id, kind, content_type_sealed, "
      "file_name_sealed, size_bytes, sha256_sealed, chunk_count, owner, created_at, state) "
      "SELECT $2, tenant_id, patient_id, kind, content_type_sealed, file_name_sealed, size_bytes, "
      "sha256_sealed, chunk_count, owner, created_at, state FROM records WHERE record_id = $1",
      first, late);
  absl::StatusOr<v1::ErasePatientRecordsResponse> erased;
  std::thread erasing([&] { erased = ErasePatient(pki_->app(), patient); });
  // The erasure waits for the upload's lock.
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", kPatientKeyLockQuery) > 0; }));
  storing.commit();
  erasing.join();
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), 2u);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  for (const std::string& record : {first, late}) {
    EXPECT_TRUE(HasEntry(entries, Id("/tenant/acme/app/backend"), v1::AUDIT_ACTION_DELETE, record,
                         "PATIENT_ERASURE"))
        << record;
  }
}

// An erasure of one record holds its row, then takes the patient key. A patient erasure
// meanwhile takes the records before the key, in the same order: it waits for that record
// without holding the key, so the record's erasure gets the key at once instead of the two
// waiting on each other until PostgreSQL aborts one (a deadlock, a second later).
TEST_F(SharingTest, APatientErasureTakesTheRecordsBeforeTheKeyAsOneRecordsErasureDoes) {
  const std::string patient = Place("gdpr-order-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "one of two";
  const std::string first = UploadOk(pki_->practitioner(), spec);
  spec.content = "two of two";
  UploadOk(pki_->practitioner(), spec);
  // A record's erasure, as it stands once it holds its record (kSelectRecordForUpdate).
  pqxx::connection one(Db("fr-1").ConnectionString());
  pqxx::work erasing_one(one);
  ASSERT_EQ(erasing_one.exec_params("SELECT 1 FROM records WHERE record_id = $1 FOR UPDATE", first)
                .size(),
            1u);
  absl::StatusOr<v1::ErasePatientRecordsResponse> erased;
  std::thread erasing_all([&] { erased = ErasePatient(pki_->app(), patient); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", "%FROM records WHERE patient_id%") > 0; }));
  // The record's erasure takes the key next: free, as the patient erasure waits holding nothing.
  std::string key_lock;
  try {
    key_lock = erasing_one
                   .exec_params("SELECT key_id FROM record_keys WHERE patient_id = $1 AND "
                                "record_id IS NULL FOR UPDATE NOWAIT",
                                patient)
                   .at(0)[0]
                   .c_str();
  } catch (const pqxx::sql_error& e) {
    ADD_FAILURE() << "the patient erasure held the key while it waited for the record: "
                  << e.what();
  }
  EXPECT_FALSE(key_lock.empty());
  erasing_one.abort();
  erasing_all.join();
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), 2u);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
}

TEST_F(SharingTest, AnUploadRetriedWithItsRequestIdIsAnsweredWithTheRecordStored) {
  const std::string patient = Place("retry-1", "FR");
  auto stored = [&] {
    return Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient);
  };
  auto audited = [&](const std::string& action) {
    return Count("fr-1",
                 "SELECT count(*) FROM audit_log WHERE object_type = 'record' AND patient_id = $1 "
                 "AND action = '" + action + "'",
                 patient);
  };
  // A record of several chunks, whose retry is answered from its header, and one of a single
  // chunk, whose retry is answered when its record's statement meets the first one's request id.
  UploadSpec large;
  large.patient_id = patient;
  large.generated_size = kMiB + kMiB / 2;
  large.seed = 120;
  large.request_id = "retry-upload-1";
  UploadSpec small;
  small.patient_id = patient;
  small.content = Generate(121, 0, 300000);
  small.request_id = "retry-upload-2";
  const std::string large_record = UploadOk(pki_->practitioner(), large);
  const std::string small_record = UploadOk(pki_->practitioner(), small);
  ASSERT_FALSE(large_record.empty());
  ASSERT_FALSE(small_record.empty());
  const int64_t chunks = Count("fr-1", "SELECT count(*) FROM record_chunks");

  // Their answers were lost: the retries get the same records, nothing is stored or created
  // again, and each answer is audited as a read of the record.
  for (const auto& [spec, record] : {std::pair{large, large_record}, {small, small_record}}) {
    v1::UploadRecordResponse again;
    ASSERT_TRUE(Upload(pki_->practitioner(), spec, &again).ok()) << spec.request_id;
    EXPECT_EQ(again.record_id(), record);
    EXPECT_EQ(again.size_bytes(), spec.generated_size > 0 ? spec.generated_size : spec.content.size());
  }
  EXPECT_EQ(stored(), 2);
  EXPECT_EQ(audited("create"), 2);
  EXPECT_EQ(audited("read"), 2);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM audit_log WHERE object_id = $1 AND action = 'read' AND "
                  "reason LIKE '%request_id retry-upload-2%'",
                  small_record),
            1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks"), chunks);
  // Answered from the header: a retry of the large one that sends no content at all gets it.
  UploadSpec header_only = large;
  header_only.declared_size = large.generated_size;
  header_only.declared_sha = Sha(Generate(large.seed, 0, large.generated_size));
  header_only.generated_size = 0;
  header_only.content.clear();
  v1::UploadRecordResponse from_header;
  ASSERT_TRUE(Upload(pki_->practitioner(), header_only, &from_header).ok());
  EXPECT_EQ(from_header.record_id(), large_record);
  ExpectContent(pki_->practitioner(), small_record, small.content);

  // The same request id for other content, another file name or another patient is refused
  // (from the header, or at the record's statement); nothing is stored.
  for (UploadSpec first : {large, small}) {
    UploadSpec other = first;
    other.seed = 122;
    other.content = first.content.empty() ? "" : Generate(122, 0, first.content.size());
    grpc::Status refused = Upload(pki_->practitioner(), other);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::ALREADY_EXISTS) << refused.error_message();
    EXPECT_THAT(refused.error_message(), HasSubstr(first.request_id));
    // The refusal names no record: the one stored may be another patient's.
    EXPECT_THAT(refused.error_message(), Not(HasSubstr(large_record)));
    EXPECT_THAT(refused.error_message(), Not(HasSubstr(small_record)));
    UploadSpec renamed = first;
    renamed.file_name = "other.pdf";
    EXPECT_EQ(Upload(pki_->practitioner(), renamed).error_code(),
              grpc::StatusCode::ALREADY_EXISTS);
    UploadSpec elsewhere = first;
    elsewhere.patient_id = Place("retry-2", "FR");
    EXPECT_EQ(Upload(pki_->practitioner(), elsewhere).error_code(),
              grpc::StatusCode::ALREADY_EXISTS);
  }
  EXPECT_EQ(stored(), 2);
  EXPECT_EQ(
      Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id LIKE 'retry-upload-%'"),
      2);
  // Another practitioner's request ids are its own.
  const std::string theirs = UploadOk(Cert("acme-p2"), small);
  EXPECT_NE(theirs, small_record);
  EXPECT_EQ(stored(), 3);

  // Once the record is erased, a late retry is refused rather than storing the erased document
  // again, from the header or at the record's statement; a new request id stores it anew.
  ASSERT_TRUE(Erase(pki_->practitioner(), small_record).ok());
  ASSERT_TRUE(Erase(pki_->practitioner(), large_record).ok());
  for (const UploadSpec& late : {large, small}) {
    grpc::Status refused = Upload(pki_->practitioner(), late);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
        << refused.error_message();
    EXPECT_THAT(refused.error_message(), HasSubstr("erased"));
  }
  EXPECT_EQ(stored(), 1);  // the other practitioner's
  UploadSpec renewed = small;
  renewed.request_id = "retry-upload-3";
  const std::string anew = UploadOk(pki_->practitioner(), renewed);
  EXPECT_NE(anew, small_record);
  ExpectContent(pki_->practitioner(), anew, small.content);
  // The retention sweep forgets request ids once no retry can come.
  Exec("fr-1", "UPDATE record_requests SET created_at = now() - interval '31 days' "
               "WHERE request_id = 'retry-upload-2'");
  absl::StatusOr<SweepResult> swept = sharing_->core().SweepRetention();
  ASSERT_TRUE(SweepStatus(swept).ok()) << SweepStatus(swept);
  EXPECT_GE(swept->forgotten_request_ids, 1);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id = 'retry-upload-2'"),
            0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id = 'retry-upload-1'"),
            1);
}

TEST_F(SharingTest, TwoUploadsWithOneRequestIdAtOnceStoreOneRecord) {
  // Without a quota (whose lock would put the second behind the first's commit) and with the
  // patient's key cached, the second upload's record meets the first's uncommitted one.
  ExtraSharing quota_less = StartSharingWith("tenant_quota_bytes: 0");
  ASSERT_NE(quota_less.server, nullptr);
  const int port = quota_less.server->port();
  const std::string patient = Place("retry-race-1", "FR");
  ASSERT_TRUE(CachePatientKey(patient, port));
  // A record of one chunk, and one of several (whose chunks the loser's transaction rolls back).
  int round = 0;
  for (const uint64_t size : {uint64_t{5000}, kMiB + kMiB / 2}) {
    SCOPED_TRACE(size);
    UploadSpec spec;
    spec.patient_id = patient;
    spec.generated_size = size;
    spec.seed = 140 + round;
    spec.request_id = absl::StrCat("retry-race-upload-", round++);
    const int64_t chunks_before = Count("fr-1", "SELECT count(*) FROM record_chunks");
    // The chain's head held: the first upload waits in its record's statement, its record and
    // request id written (uncommitted); the second, past any look-up that could have seen them,
    // waits on that request id, not on the chain's head.
    pqxx::connection head_holder(Db("fr-1").ConnectionString());
    pqxx::work head_hold(head_holder);
    head_hold.exec("SELECT 1 FROM audit_head FOR UPDATE");
    v1::UploadRecordResponse first;
    grpc::Status first_status;
    std::thread one([&] { first_status = Upload(pki_->practitioner(), spec, &first, port); });
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return LockWaits("fr-1", "%INSERT INTO records%") >= 1; }));
    v1::UploadRecordResponse second;
    grpc::Status second_status;
    std::thread two([&] { second_status = Upload(pki_->practitioner(), spec, &second, port); });
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return LockWaits("fr-1", "%INSERT INTO records%") >= 2; }));
    head_hold.commit();
    one.join();
    two.join();
    ASSERT_TRUE(first_status.ok()) << first_status.error_message();
    ASSERT_TRUE(second_status.ok()) << second_status.error_message();
    EXPECT_EQ(second.record_id(), first.record_id());
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id = $1",
                    spec.request_id),
              1);
    EXPECT_EQ(Count("fr-1",
                    "SELECT count(*) FROM audit_log WHERE action = 'create' AND "
                    "object_type = 'record' AND object_id = $1",
                    first.record_id()),
              1);
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_chunks") - chunks_before,
              static_cast<int64_t>((size + kMiB - 1) / kMiB));
    ExpectContent(pki_->practitioner(), first.record_id(), Generate(spec.seed, 0, size));
  }
  quota_less.server->Shutdown();
}

// The quota is checked in the record's own statement, under the tenant's usage lock, reading the
// usage after the lock is held (shard migration 0024): of two uploads at once with room for one,
// the second, waiting on that lock while the first commits, sees the first's bytes and is refused.
// With the patient's key cached, a one-chunk upload is one statement that commits by itself, begun
// before the other committed; an upload of several chunks ends its own transaction with it.
TEST_F(SharingTest, TwoUploadsAtOnceCannotBothTakeTheQuotasLastRoom) {
  // The quota is the tenant's in all regions; the race is for fr-1's part of it.
  const auto usage = [] {
    return TenantUsage("fr-1", "acme") + TenantUsage("de-1", "acme") +
           TenantUsage("eu-1", "acme");
  };
  int round = 0;
  for (const int64_t size : {int64_t{200000}, static_cast<int64_t>(kMiB + kMiB / 2)}) {
    SCOPED_TRACE(size);
    const std::string patient = Place(absl::StrCat("quota-race-", round), "FR");
    // acme's quota on a server of its own: its usage now, plus room for one record of `size`
    // (nothing else changes acme's usage meanwhile: tests run one at a time, and the sweep that
    // could erase an archived record runs once a day). Statements may wait a minute: the first
    // upload waits in its statement while the second is sent and sealed.
    const int64_t quota = usage() + kKeyCachingBytes + size + size / 2;
    std::unique_ptr<MedgateConfig> config =
        ConfigWith("retention_sweep_seconds: 86400",
                   absl::StrCat("retention_sweep_seconds: 86400\n  tenant_quota_bytes: ", quota));
    for (RegionConfig& region : config->regions) region.db.statement_timeout_ms = 60000;
    ExtraSharing limited = StartSharingOn(std::move(config));
    ASSERT_NE(limited.server, nullptr);
    // What acme stores in the other regions is known to the server: it read it as it started.
    const int port = limited.server->port();
    ASSERT_TRUE(CachePatientKey(patient, port));
    const int64_t records_before =
        Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient);

    // The chain's head held: the first upload waits in its record's statement, holding the
    // tenant's usage lock; the second's statement waits on that lock.
    pqxx::connection head_holder(Db("fr-1").ConnectionString());
    pqxx::work head_hold(head_holder);
    head_hold.exec("SELECT 1 FROM audit_head FOR UPDATE");
    std::array<grpc::Status, 2> statuses;
    std::vector<std::thread> uploads;
    for (int i = 0; i < 2; ++i) {
      uploads.emplace_back([&, i] {
        UploadSpec spec;
        spec.patient_id = patient;
        spec.generated_size = static_cast<uint64_t>(size);
        spec.seed = 150 + 2 * round + i;
        statuses[i] = Upload(pki_->practitioner(), spec, nullptr, port);
      });
      EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
        return LockWaits("fr-1", kRecordStatementQuery) >= i + 1;
      })) << "upload " << i << " never waited in its record's statement";
    }
    head_hold.commit();
    for (std::thread& t : uploads) t.join();
    int stored = 0;
    for (const grpc::Status& status : statuses) {
      if (status.ok()) {
        ++stored;
        continue;
      }
      EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << status.error_message();
      EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat("limit of ", quota, " bytes")));
    }
    EXPECT_EQ(stored, 1);
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient),
              records_before + 1);
    EXPECT_LE(usage(), quota);
    // The refusal came from the record's statement: the patient's key is still cached, and the
    // next upload, which fits, is one such statement again (it waits in it for the usage lock
    // held here; an upload that had to read the key would wait in a statement of its own).
    pqxx::connection usage_holder(Db("fr-1").ConnectionString());
    pqxx::work usage_hold(usage_holder);
    usage_hold.exec(
        "SELECT pg_advisory_xact_lock(hashtextextended('medgate-records-usage:acme', 0))");
    UploadSpec fits;
    fits.patient_id = patient;
    fits.content = Generate(154 + round, 0, 1000);
    grpc::Status fitted;
    std::thread fitting([&] { fitted = Upload(pki_->practitioner(), fits, nullptr, port); });
    EXPECT_TRUE(PollUntil(absl::Now() + kPatience,
                          [&] { return LockWaits("fr-1", kRecordStatementQuery) == 1; }))
        << "the upload after the refusal did not wait in its record's statement";
    usage_hold.commit();
    fitting.join();
    EXPECT_TRUE(fitted.ok()) << fitted.error_message();
    limited.server->Shutdown();
    ++round;
  }
}

// A one-chunk upload whose record's statement met its request id, which the retention sweep then
// forgot before the upload could look it up: nothing answers it and nothing was stored, so it is
// ABORTED, to be sent again, rather than the database's unique violation. Here the request id is
// another session's, committed while the upload's statement waits on it; a third session, queued
// for the records table behind that statement, deletes it before the look-up can read.
TEST_F(SharingTest, AnUploadWhoseRequestIdIsForgottenMeanwhileIsAborted) {
  const std::string patient = Place("request-forgotten-1", "FR");
  ASSERT_TRUE(CachePatientKey(patient));
  const int64_t records_before =
      Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient);
  constexpr char kRequest[] = "forgotten-request-1";

  pqxx::connection earlier_connection(Db("fr-1").ConnectionString());
  pqxx::work earlier(earlier_connection);
  earlier.exec_params0(
      "INSERT INTO record_requests (owner, request_id, record_id, created_at) "
      "VALUES ($1, $2, 'fr-1.r-earlier', now())",
      P1(), kRequest);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(160, 0, 6000);
  spec.request_id = kRequest;
  grpc::Status uploaded;
  std::thread uploading([&] { uploaded = Upload(pki_->practitioner(), spec); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", kRecordStatementQuery) == 1; }));
  std::string sweep_error;  // read once the thread is joined
  std::thread sweeping([&] {
    try {
      pqxx::connection c(Db("fr-1").ConnectionString());
      pqxx::work sweep(c);
      sweep.exec0("LOCK TABLE records IN ACCESS EXCLUSIVE MODE");
      sweep.exec_params0("DELETE FROM record_requests WHERE request_id = $1", kRequest);
      sweep.commit();
    } catch (const std::exception& e) {
      sweep_error = e.what();
    }
  });
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", "LOCK TABLE records%") == 1; }));
  earlier.commit();
  uploading.join();
  sweeping.join();
  EXPECT_EQ(sweep_error, "");
  EXPECT_EQ(uploaded.error_code(), grpc::StatusCode::ABORTED) << uploaded.error_message();
  EXPECT_THAT(uploaded.error_message(),
              HasSubstr("was forgotten while this upload was being stored; nothing was stored"));
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient),
            records_before);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_requests WHERE request_id = $1", kRequest),
            0);
  // Sent again, it is stored.
  EXPECT_FALSE(UploadOk(pki_->practitioner(), spec).empty());
}

// A patient's erasure that waited while an erasure of one record replaced the patient key, then
// an upload storing under the new key while the patient's erasure still waits: whatever the
// erasure leaves opens, and what it erased it counted. It locks the new key before deleting, so
// the upload either commits before that (and its record is erased with the rest, counted and
// audited) or waits for the erasure and stores under a key of its own. Without that lock the
// upload stored under the new key, which the patient's erasure (not seeing the record) then
// destroyed: an acknowledged record unreadable.
TEST_F(SharingTest, AnUploadDuringAPatientErasureThatWaitedForTheKeyStaysReadable) {
  const std::string patient = Place("gdpr-race-2", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "zero";
  const std::string r0 = UploadOk(pki_->practitioner(), spec);
  spec.content = "one";
  const std::string r1 = UploadOk(pki_->practitioner(), spec);
  // r1's row held, so that the patient's erasure waits for it once r0's erasure is done.
  pqxx::connection holder(Db("fr-1").ConnectionString());
  pqxx::work row_hold(holder);
  row_hold.exec_params("SELECT 1 FROM records WHERE record_id = $1 FOR UPDATE", r1);
  // The chain's head held, so that the erasure of r0 waits with the patient's key replaced.
  pqxx::connection head_holder(Db("fr-1").ConnectionString());
  pqxx::work head_hold(head_holder);
  head_hold.exec("SELECT 1 FROM audit_head FOR UPDATE");
  absl::StatusOr<v1::EraseRecordResponse> one;
  std::thread erasing_one([&] { one = Erase(pki_->practitioner(), r0); });
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience,
                        [&] { return LockWaits("fr-1", "%audit_append%") > 0; }));
  absl::StatusOr<v1::ErasePatientRecordsResponse> all;
  std::thread erasing_all([&] { all = ErasePatient(pki_->app(), patient); });
  // It waits for the records r0's erasure and this session hold.
  auto erasure_waits = [&] {
    return PollUntil(absl::Now() + kPatience, [&] {
      return LockWaits("fr-1", "%FROM records WHERE patient_id%") > 0;
    });
  };
  ASSERT_TRUE(erasure_waits());
  head_hold.commit();
  erasing_one.join();
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(erasure_waits());
  spec.content = Generate(94, 0, 2000);
  std::string late;
  std::atomic<bool> uploaded{false};
  std::thread uploading([&] {
    late = UploadOk(pki_->practitioner(), spec);
    uploaded = true;
  });
  // The upload stores now (under the new key, unlocked), or waits for the erasure's lock on it.
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    return uploaded.load() || LockWaits("fr-1", "%FOR KEY SHARE%") > 0;
  }));
  row_hold.abort();
  erasing_all.join();
  uploading.join();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_FALSE(late.empty());
  // r0 by its own erasure, r1 by the patient's, the late record by one or the other: left
  // readable, or erased and counted.
  const int64_t left =
      Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient);
  EXPECT_EQ(static_cast<int64_t>(all->erased_count()) + left, 2);
  if (left == 1) {
    Downloaded got = Download(pki_->practitioner(), late);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_EQ(got.content, spec.content);
  } else {
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
    EXPECT_TRUE(HasEntry(PatientAudit(patient), Id("/tenant/acme/app/backend"),
                         v1::AUDIT_ACTION_DELETE, late, "PATIENT_ERASURE"));
  }
}

TEST_F(SharingTest, PatientErasureShredsEveryRecordIncludingArchivedOnes) {
  const std::string patient = Place("gdpr-1", "BE");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(29, 0, 3000);
  const std::string first = UploadOk(pki_->practitioner(), spec);
  const std::string second = UploadOk(Cert("acme-p2"), spec);
  EXPECT_EQ(first.rfind("eu-1.", 0), 0u);  // BE patients live in eu-1
  ASSERT_TRUE(Archive(Cert("acme-p2"), second, ServerNow() + absl::Hours(24 * 3650)).ok());
  EXPECT_EQ(Erase(Cert("acme-p2"), second).status().code(), absl::StatusCode::kFailedPrecondition);

  auto erased = ErasePatient(pki_->app(), patient);
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), 2u);
  for (const std::string& record : {first, second}) {
    EXPECT_EQ(Download(pki_->practitioner(), record).status.error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  // The patient key went too: nothing wrapped under it can be unwrapped again.
  EXPECT_EQ(Count("eu-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
  EXPECT_EQ(Count("eu-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 0);
  // Not a practitioner's to ask, not even of the patient's tenant.
  auto by_practitioner = ErasePatient(pki_->practitioner(), patient);
  EXPECT_EQ(by_practitioner.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(by_practitioner.status().message()),
              HasSubstr("practitioner identity may not call ErasePatientRecords"));
  auto again = ErasePatient(pki_->app(), patient);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->erased_count(), 0u);
  auto chain = Verify("eu-1");
  ASSERT_TRUE(chain.ok());
  EXPECT_TRUE(chain->ok()) << chain->detail();
  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  EXPECT_TRUE(HasEntry(entries, Id("/tenant/acme/app/backend"), v1::AUDIT_ACTION_DELETE, second,
                       "PATIENT_ERASURE"));
  // The erasure's entries (a record's each, then the patient's) are consecutive and of one time:
  // chained in one statement, the region's chain head locked once rather than for a round trip
  // per record.
  std::vector<const v1::AuditEntry*> erasure;
  for (const v1::AuditEntry& e : entries) {
    // (QueryAudit gives the reason code and its detail apart.)
    if (e.reason() == "PATIENT_ERASURE" && e.decision() == v1::DECISION_PERMIT &&
        e.reason_detail().rfind("erased=0 ", 0) != 0) {
      erasure.push_back(&e);
    }
  }
  ASSERT_EQ(erasure.size(), 3u);
  std::sort(erasure.begin(), erasure.end(),
            [](const auto* a, const auto* b) { return a->seq() < b->seq(); });
  EXPECT_EQ(erasure[2]->seq(), erasure[0]->seq() + 2);
  EXPECT_EQ(erasure[2]->object_type(), "patient_records");
  for (const v1::AuditEntry* e : erasure) {
    EXPECT_EQ(FromProtoTimestamp(e->recorded_at()), FromProtoTimestamp(erasure[0]->recorded_at()));
  }

  // The patient may get new records afterwards, under a new key.
  const std::string later = UploadOk(pki_->practitioner(), spec);
  Downloaded d = Download(pki_->practitioner(), later);
  ASSERT_TRUE(d.status.ok());
  EXPECT_EQ(d.content, spec.content);
}

// An erasure of all of a patient's records while an upload for the patient is under way erases
// what was stored before it; the upload, finished after it, is a new record under a new patient
// key (the erased key, cached when the upload started, is not used), and it can be read.
TEST_F(SharingTest, AnUploadFinishedAfterAPatientErasureIsStoredUnderANewKey) {
  const std::string patient = Place("erased-mid-upload-1", "FR");
  UploadSpec before_spec;
  before_spec.patient_id = patient;
  before_spec.content = Generate(91, 0, 3000);
  const std::string before = UploadOk(pki_->practitioner(), before_spec);  // caches the key

  // A three-chunk upload: once the upload's transaction holds its first chunk, uncommitted, the
  // patient's records are erased; then the upload sends the rest.
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(92, 0, 2 * kMiB + 5);
  spec.chunk_bytes = kMiB;
  spec.before_chunk = [&](uint64_t offset) {
    if (offset != kMiB) return;
    ASSERT_TRUE(PollUntil(absl::Now() + absl::Seconds(30), [&] {
      return Count("fr-1",
                   "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                   "AND datname = current_database()") > 0;
    }));
    auto erased = ErasePatient(pki_->app(), patient);
    ASSERT_TRUE(erased.ok()) << erased.status();
    EXPECT_EQ(erased->erased_count(), 1u);  // the record stored before; the upload is not one yet
    EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
  };
  v1::UploadRecordResponse response;
  grpc::Status finished = Upload(pki_->practitioner(), spec, &response);
  ASSERT_TRUE(finished.ok()) << finished.error_message();
  const std::string& content = spec.content;

  Downloaded d = Download(pki_->practitioner(), response.record_id());
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, content);
  EXPECT_EQ(Download(pki_->practitioner(), before).status.error_code(), grpc::StatusCode::NOT_FOUND);
  // The patient has one key again, a new one, and the new record's key is wrapped under it.
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys WHERE patient_id = $1 AND record_id IS NULL",
                  patient),
            1);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys rk JOIN record_keys pk ON pk.key_id = "
                  "rk.wrapped_by AND pk.record_id IS NULL WHERE rk.record_id = $1",
                  response.record_id()),
            1);
  auto chain = Verify("fr-1");
  ASSERT_TRUE(chain.ok());
  EXPECT_TRUE(chain->ok()) << chain->detail();
}

// --- listing -----------------------------------------------------------------------------------

// Uploads wrap record keys under a cached patient key; an erasure by another sharing process
// does not reach that cache, so the next upload must notice the key is gone and use a new one.
TEST_F(SharingTest, UploadAfterAnErasureByAnotherProcessUsesTheNewPatientKey) {
  const std::string patient = Place("erased-elsewhere-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(37, 0, 4000);
  const std::string before = UploadOk(pki_->practitioner(), spec);
  // The patient key and the record key.
  ASSERT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 2);

  auto other = SharingServer::Create(stack_->config());
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE((*other)->Start().ok());
  auto erased = ErasePatient(pki_->app(), patient, (*other)->port());
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), 1u);
  (*other)->Shutdown();

  spec.content = Generate(38, 0, 5000);
  const std::string after = UploadOk(pki_->practitioner(), spec);
  Downloaded d = Download(pki_->practitioner(), after);
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.content, spec.content);
  EXPECT_EQ(Download(pki_->practitioner(), before).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  // The new record key rests on the patient's new key, the only one the patient has.
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys rk JOIN record_keys pk ON pk.key_id = "
                  "rk.wrapped_by AND pk.record_id IS NULL WHERE rk.record_id = $1",
                  after),
            1);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM record_keys WHERE patient_id = $1 AND record_id IS NULL",
                  patient),
            1);
}

// A patient key the region's vault no longer holds (the vault restored from a backup older than
// the key) while the record still rests on it: DATA_LOSS naming the record, and the record listed
// as damaged, instead of a "retry" that no retry would ever get past.
TEST_F(SharingTest, ARecordWhosePatientKeyTheVaultLostIsDataLossNotARetry) {
  const std::string patient = Place("vault-lost-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(39, 0, 3000);
  spec.file_name = "lost.pdf";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  Exec("fr-1 keys", "DELETE FROM patient_keys WHERE patient_id = $1", patient);
  // Another instance of the service: nothing of the patient's in its caches.
  auto other = SharingServer::Create(stack_->config());
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE((*other)->Start().ok());
  ::testing::internal::CaptureStderr();
  Downloaded d = Download(pki_->practitioner(), record, "", true, (*other)->port());
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::DATA_LOSS) << d.status.error_message();
  EXPECT_THAT(d.status.error_message(), HasSubstr(record));
  EXPECT_TRUE(d.content.empty());
  // Ops hear of it from the service's log too.
  EXPECT_THAT(logged, ::testing::ContainsRegex(absl::StrCat(
                          "\"level\":\"error\",\"event\":\"record_damaged\",\"record\":\"",
                          record, "\",\"error\":\"[^\"]*does not hold patient key")))
      << logged;
  v1::ListRecordsRequest request;
  request.set_scope(v1::RECORD_SCOPE_PATIENT);
  request.set_patient_id(patient);
  v1::ListRecordsResponse listed;
  grpc::ClientContext context;
  grpc::Status status = Stub(pki_->practitioner(), (*other)->port())
                            ->ListRecords(&context, request, &listed);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(listed.records_size(), 1);
  EXPECT_EQ(listed.records(0).record_id(), record);
  EXPECT_THAT(listed.records(0).damaged(), HasSubstr("does not hold patient key"));
  // An upload for the patient is refused as lost, not as worth a retry, and stores nothing.
  UploadSpec more = spec;
  more.content = Generate(40, 0, 2000);
  grpc::Status upload = Upload(pki_->practitioner(), more, nullptr, (*other)->port());
  EXPECT_EQ(upload.error_code(), grpc::StatusCode::DATA_LOSS) << upload.error_message();
  EXPECT_THAT(upload.error_message(), HasSubstr("does not hold patient key"));
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 1);
  (*other)->Shutdown();
  // With one connection to the shard, finding the key lost needs no second one.
  MedgateConfig one_connection = stack_->config();
  for (RegionConfig& region : one_connection.regions) region.db.pool_size = 1;
  auto narrow = SharingServer::Create(one_connection);
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  ASSERT_TRUE((*narrow)->Start().ok());
  d = Download(pki_->practitioner(), record, "", true, (*narrow)->port());
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::DATA_LOSS) << d.status.error_message();
  (*narrow)->Shutdown();
}

TEST_F(SharingTest, ListRecordsPagesNewestFirstAcrossRegions) {
  const TestCert& p4 = Cert("acme-p4");
  std::vector<std::string> uploaded;
  for (const auto& [ref, territory] : std::vector<std::pair<std::string, std::string>>{
           {"list-fr-1", "FR"}, {"list-de-1", "DE"}, {"list-be-1", "BE"}, {"list-fr-1", "FR"}}) {
    UploadSpec spec;
    spec.patient_id = Place(ref, territory);
    spec.content = absl::StrCat("record for ", ref);
    spec.kind = uploaded.size() == 2 ? v1::RECORD_KIND_REPORT : v1::RECORD_KIND_DOCUMENT;
    uploaded.push_back(UploadOk(p4, spec));
  }
  std::vector<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    auto page = List(p4, v1::RECORD_SCOPE_MINE, "", 3, token);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_LE(page->records_size(), 3);
    for (const v1::Record& r : page->records()) {
      seen.push_back(r.record_id());
      EXPECT_EQ(r.owner(), Id("/tenant/acme/practitioner/p-4"));
    }
    token = page->next_page_token();
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 2);
  EXPECT_EQ(seen, std::vector<std::string>(uploaded.rbegin(), uploaded.rend()));
  // Each page audits a read for each patient it shows, in the patient's home shard: the FR
  // patient's two records came on different pages.
  const std::string listings =
      "SELECT string_agg(reason, ',' ORDER BY seq) FROM audit_log WHERE object_type = "
      "'record_list' AND action = 'read' AND actor = $1";
  auto reasons = [&](const std::string& region) {
    pqxx::connection c(Db(region).ConnectionString());
    pqxx::nontransaction q(c);
    pqxx::row row = q.exec_params1(listings, Id("/tenant/acme/practitioner/p-4"));
    return row[0].is_null() ? std::string() : row[0].as<std::string>();
  };
  EXPECT_EQ(reasons("fr-1"), "LISTED: count=1 scope=mine,LISTED: count=1 scope=mine");
  EXPECT_EQ(reasons("de-1"), "LISTED: count=1 scope=mine");
  EXPECT_EQ(reasons("eu-1"), "LISTED: count=1 scope=mine");
  // QueryAudit gives them a reason code like every other entry, the counts as its detail.
  const std::vector<v1::AuditEntry> fr_entries = PatientAudit(Place("list-fr-1", "FR"));
  EXPECT_EQ(std::count_if(fr_entries.begin(), fr_entries.end(),
                          [](const v1::AuditEntry& e) {
                            return e.object_type() == "record_list" &&
                                   e.action() == v1::AUDIT_ACTION_READ &&
                                   e.reason() == "LISTED" &&
                                   e.reason_detail() == "count=1 scope=mine";
                          }),
            2);
  auto reports = List(p4, v1::RECORD_SCOPE_MINE, "", 0, "", false, v1::RECORD_KIND_REPORT);
  ASSERT_TRUE(reports.ok());
  ASSERT_EQ(reports->records_size(), 1);
  EXPECT_EQ(reports->records(0).record_id(), uploaded[2]);
  EXPECT_EQ(ListedIds(p4, v1::RECORD_SCOPE_PATIENT, Place("list-fr-1", "FR")).size(), 2u);
  // Bad listing requests.
  EXPECT_EQ(List(p4, v1::RECORD_SCOPE_UNSPECIFIED).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(List(p4, v1::RECORD_SCOPE_PATIENT).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(List(p4, v1::RECORD_SCOPE_MINE, "", 0, "not-a-token").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A page ends early, with a token to go on, when its records would not fit the page's byte bound:
// here so small that each page holds one record (never none).
TEST_F(SharingTest, ListRecordsPagesEndAtTheirByteBound) {
  const TestCert& p3 = Cert("acme-p3");
  for (const char* ref : {"bytes-1", "bytes-2", "bytes-3"}) {
    UploadSpec spec;
    spec.patient_id = Place(ref, "FR");
    spec.content = absl::StrCat("record for ", ref);
    UploadOk(p3, spec);
  }
  const std::vector<std::string> all = ListedIds(p3, v1::RECORD_SCOPE_MINE);
  ASSERT_GE(all.size(), 3u);
  SharingServerOptions options;
  options.clock = ServerNow;
  options.max_list_page_bytes = 1;
  auto server = SharingServer::Create(stack_->config(), options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  auto stub = Stub(p3, (*server)->port());
  std::vector<std::string> seen;
  std::string token;
  do {
    v1::ListRecordsRequest request;
    request.set_scope(v1::RECORD_SCOPE_MINE);
    request.set_page_size(1000);
    request.set_page_token(token);
    v1::ListRecordsResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub->ListRecords(&context, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(response.records_size(), 1);
    seen.push_back(response.records(0).record_id());
    token = response.next_page_token();
  } while (!token.empty() && seen.size() <= all.size());
  EXPECT_EQ(seen, all);
  (*server)->Shutdown();
}

// A listing reads a bounded number of grants from a region: a page ends, with a token to go on,
// at the first record whose grants would pass the bound. Each record still comes once, with all
// of its grants; a grantee's listing reads only its own grant of each record.
TEST_F(SharingTest, ListRecordsReadsABoundedNumberOfGrants) {
  const std::string patient = Place("listed-grants-1", "FR");
  GrantSharingConsent(patient);
  std::vector<std::string> records;
  for (int i = 0; i < 3; ++i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = absl::StrCat("record ", i, " of three, each shared with a hundred");
    records.push_back(UploadOk(pki_->practitioner(), spec));
  }
  {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::work txn(c);
    for (const std::string& record : records) {
      txn.exec_params0(
          "INSERT INTO share_grants (grant_id, record_id, grantee, grantee_tenant, granted_by, "
          "created_at, expires_at) SELECT $1 || n, $2, $3 || n, 'acme', $4, "
          "to_timestamp($6), to_timestamp($6) + interval '1 day' "
          "FROM generate_series(1, $5::int) AS n",
          absl::StrCat(record, ".g"), record, Id("/tenant/acme/practitioner/listed-"), P1(),
          kMaxActiveGrantsPerRecord - 1, absl::ToUnixSeconds(ServerNow()));
      // The hundredth to a practitioner who lists what is shared with it (only this test's).
      txn.exec_params0(
          "INSERT INTO share_grants (grant_id, record_id, grantee, grantee_tenant, granted_by, "
          "created_at, expires_at) VALUES ($1, $2, $3, 'acme', $4, to_timestamp($5), "
          "to_timestamp($5) + interval '1 day')",
          absl::StrCat(record, ".g-p6"), record, Id("/tenant/acme/practitioner/p-6"), P1(),
          absl::ToUnixSeconds(ServerNow()));
    }
    txn.commit();
  }
  SharingServerOptions options;
  options.clock = ServerNow;
  options.max_listed_grants = kMaxActiveGrantsPerRecord * 3 / 2;
  auto server = SharingServer::Create(stack_->config(), options);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  auto list_all = [&](const TestCert& as, v1::RecordScope scope) {
    auto stub = Stub(as, (*server)->port());
    std::vector<std::pair<std::string, int>> seen;  // record, grants shown with it
    std::vector<int> page_sizes;
    std::string token;
    do {
      v1::ListRecordsRequest request;
      request.set_scope(scope);
      if (scope == v1::RECORD_SCOPE_PATIENT) request.set_patient_id(patient);
      request.set_page_size(1000);
      request.set_page_token(token);
      v1::ListRecordsResponse response;
      grpc::ClientContext context;
      grpc::Status status = stub->ListRecords(&context, request, &response);
      EXPECT_TRUE(status.ok()) << status.error_message();
      if (!status.ok()) break;
      page_sizes.push_back(response.records_size());
      for (const v1::Record& r : response.records()) seen.emplace_back(r.record_id(), r.grants_size());
      token = response.next_page_token();
    } while (!token.empty() && page_sizes.size() < 10);
    return std::pair{seen, page_sizes};
  };
  // The owner's listing: 150 grants read at most, so one record (100 grants) a page.
  const auto [owned, owned_pages] = list_all(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT);
  std::vector<std::string> owned_ids;
  for (const auto& [id, grants] : owned) {
    owned_ids.push_back(id);
    EXPECT_EQ(grants, kMaxActiveGrantsPerRecord) << id;
  }
  EXPECT_THAT(owned_ids, ::testing::UnorderedElementsAreArray(records));
  for (int size : owned_pages) EXPECT_LE(size, 1);
  // A grantee's: only its own grant of each record is read, so all three fit one page.
  const auto [shared, shared_pages] = list_all(Cert("acme-p6"), v1::RECORD_SCOPE_SHARED_WITH_ME);
  std::vector<std::string> shared_ids;
  for (const auto& [id, grants] : shared) {
    shared_ids.push_back(id);
    EXPECT_EQ(grants, 1) << id;
  }
  EXPECT_THAT(shared_ids, ::testing::UnorderedElementsAreArray(records));
  EXPECT_THAT(shared_pages, ElementsAre(3));
  (*server)->Shutdown();
}

// A listing whose read entries cannot be written fails, and shows nothing (a request whose audit
// entry cannot be written fails).
TEST_F(SharingTest, AListingItCannotAuditFails) {
  const std::string patient = Place("unaudited-list-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "listed";
  UploadOk(pki_->practitioner(), spec);
  ASSERT_EQ(ListedIds(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient).size(), 1u);
  Exec("fr-1",
       "CREATE FUNCTION refuse_listing_entries() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
       "IF NEW.object_type = 'record_list' THEN RAISE EXCEPTION 'listing entries refused'; END IF; "
       "RETURN NEW; END $$");
  Exec("fr-1",
       "CREATE TRIGGER refuse_listing_entries BEFORE INSERT ON audit_log FOR EACH ROW "
       "EXECUTE FUNCTION refuse_listing_entries()");
  absl::Cleanup restore = [] {
    Exec("fr-1", "DROP TRIGGER refuse_listing_entries ON audit_log");
    Exec("fr-1", "DROP FUNCTION refuse_listing_entries()");
  };
  auto listed = List(pki_->practitioner(), v1::RECORD_SCOPE_PATIENT, patient);
  EXPECT_FALSE(listed.ok());
  EXPECT_THAT(std::string(listed.status().message()),
              HasSubstr("the listing's audit entries could not be written"));
}

// A revocation by grant id reads the grant, then waits for the record's lock; a share that
// trims that grant (a revoked one a later revocation superseded) may commit meanwhile. The grant
// is then not found, as any grant that is not there: NOT_FOUND, not an internal error. Here the
// test holds the record's lock and deletes the grant itself, as such a share would.
TEST_F(SharingTest, ARevocationOfAGrantTrimmedWhileItWaitedIsNotFound) {
  const auto [patient, spec, record] = ConsentedRecord("trimmed-grant-1", "shared and revoked");
  absl::StatusOr<v1::ShareRecordResponse> first =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), record, P2()).ok());
  pqxx::connection holder(Db("fr-1").ConnectionString());
  pqxx::work hold(holder);
  hold.exec_params("SELECT 1 FROM records WHERE record_id = $1 FOR UPDATE", record);
  absl::StatusOr<v1::RevokeShareResponse> revoked;
  std::thread revoking([&] { revoked = RevokeById(pki_->practitioner(), first->grant_id()); });
  const bool waited = PollUntil(absl::Now() + kPatience, [] {
    return LockWaits("fr-1", "%FROM records r WHERE r.record_id = $1 FOR NO KEY UPDATE%") > 0;
  });
  hold.exec_params0("DELETE FROM share_grants WHERE grant_id = $1", first->grant_id());
  hold.commit();
  revoking.join();
  ASSERT_TRUE(waited) << "the revocation never waited for the record's lock";
  EXPECT_EQ(revoked.status().code(), absl::StatusCode::kNotFound) << revoked.status();
  EXPECT_THAT(std::string(revoked.status().message()),
              HasSubstr(absl::StrCat("grant '", first->grant_id(), "' not found")));
}

// A patient's erasure deletes and audits every record in one transaction: its statements may
// take sharing.patient_erasure_timeout_seconds, not the shard's statement timeout, or a patient
// with many records could never be erased. Here the shard's statements may take 50 ms, and the
// patient has 5,001 records (the copies are made in SQL, sharing the first one's key and content).
TEST_F(SharingTest, APatientWithManyRecordsIsErasedPastTheShardsStatementTimeout) {
  const std::string patient = Place("many-records-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "one of many";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  constexpr int kCopies = 5000;
  {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO records SELECT (jsonb_populate_record(NULL::records, to_jsonb(r) || "
        "jsonb_build_object('record_id', r.record_id || 'c' || g))).* FROM records r, "
        "generate_series(1, $2::int) g WHERE r.record_id = $1",
        record, kCopies);
    txn.exec_params0(
        "INSERT INTO record_keys SELECT (jsonb_populate_record(NULL::record_keys, to_jsonb(k) || "
        "jsonb_build_object('key_id', k.key_id || 'c' || g, 'record_id', "
        "k.record_id || 'c' || g))).* FROM record_keys k, generate_series(1, $2::int) g "
        "WHERE k.record_id = $1",
        record, kCopies);
    txn.commit();
  }
  std::unique_ptr<MedgateConfig> config = ConfigWith(std::vector<std::pair<std::string, std::string>>{});
  for (RegionConfig& region : config->regions) region.db.statement_timeout_ms = 50;
  ExtraSharing tight = StartSharingOn(std::move(config));
  ASSERT_NE(tight.server, nullptr);
  absl::StatusOr<v1::ErasePatientRecordsResponse> erased =
      ErasePatient(pki_->app(), patient, tight.server->port());
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(erased->erased_count(), kCopies + 1u);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE patient_id = $1", patient), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM record_keys WHERE patient_id = $1", patient), 0);
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM audit_log WHERE patient_id = $1 AND object_type = 'record' "
                  "AND action = 'delete'",
                  patient),
            kCopies + 1);
  tight.server->Shutdown();
}

// A request whose audit entry cannot be written fails, and changes or shows nothing: every kind of
// download (owner, grantee, break-glass), a share, a revocation, an archiving, an erasure of the
// record and of the patient's records, and a query of the patient's audit entries, while the
// shard refuses the patient's audit entries.
TEST_F(SharingTest, CallsWhoseAuditEntryCannotBeWrittenFailAndChangeNothing) {
  const auto [patient, spec, record] = ConsentedRecord("unaudited-calls-1", "kept as it was");
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  const std::string grants_sql =
      "SELECT count(*) FROM share_grants WHERE record_id = $1 AND revoked_at IS NULL";
  ASSERT_EQ(Count("fr-1", grants_sql, record), 1);
  const int64_t entries_before =
      Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient);
  Exec("fr-1",
       absl::StrCat("CREATE FUNCTION refuse_patient_entries() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN IF NEW.patient_id = '", patient,
                    "' THEN RAISE EXCEPTION USING ERRCODE = 'MG005', "
                    "MESSAGE = 'entries refused by the test'; END IF; RETURN NEW; END $$"));
  Exec("fr-1",
       "CREATE TRIGGER refuse_patient_entries BEFORE INSERT ON audit_log FOR EACH ROW "
       "EXECUTE FUNCTION refuse_patient_entries()");
  absl::Cleanup restore = [] {
    Exec("fr-1", "DROP TRIGGER IF EXISTS refuse_patient_entries ON audit_log");
    Exec("fr-1", "DROP FUNCTION IF EXISTS refuse_patient_entries()");
  };
  const std::string break_glass = "unconscious patient in ER, record needed for treatment";
  for (const auto& [who, as, reason] :
       std::vector<std::tuple<std::string, const TestCert*, std::string>>{
           {"owner", &pki_->practitioner(), ""},
           {"grantee", &Cert("acme-p2"), ""},
           {"break-glass", &pki_->ops(), break_glass}}) {
    Downloaded d = Download(*as, record, reason);
    // Failed for want of its entry (the trigger's SQLSTATE), not for anything else.
    EXPECT_THAT(d.status.error_message(), HasSubstr("database error MG005: ")) << who;
    EXPECT_FALSE(d.has_header) << who;
    EXPECT_EQ(d.bytes, 0u) << who;
  }
  v1::QueryAuditRequest query;
  query.set_patient_id(patient);
  for (const absl::Status& status :
       {Share(pki_->practitioner(), record, P3(), ServerNow() + absl::Hours(1)).status(),
        RevokeByGrantee(pki_->practitioner(), record, P2()).status(),
        Archive(pki_->practitioner(), record, ServerNow() + absl::Hours(24)).status(),
        Erase(pki_->practitioner(), record).status(), ErasePatient(pki_->app(), patient).status(),
        QueryAudit(pki_->app(), query).status()}) {
    EXPECT_THAT(std::string(status.message()), HasSubstr("database error MG005: ")) << status;
  }
  std::move(restore).Invoke();

  // Nothing was changed, nor written to the audit log: the grants are as they were, and the
  // record is whole, not archived, and reads as before for its owner and its grantee.
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient),
            entries_before);
  EXPECT_EQ(Count("fr-1", grants_sql, record), 1);
  EXPECT_EQ(GrantRows(record, P3()), 0);
  for (const TestCert* as : {&pki_->practitioner(), &Cert("acme-p2")}) {
    Downloaded d = Download(*as, record);
    ASSERT_TRUE(d.status.ok()) << d.status.error_message();
    EXPECT_EQ(d.content, spec.content);
    EXPECT_NE(d.header.state(), v1::RECORD_STATE_ARCHIVED);
  }
}

// A record has at most kMaxActiveGrantsPerRecord active grants: one more grantee is refused, an
// extension of a present grantee is not, and a revocation makes room.
TEST_F(SharingTest, ARecordsActiveGrantsAreBounded) {
  const auto [patient, spec, record] = ConsentedRecord("many-grants-1", "shared widely");
  // The grants already made (as ShareRecord stores them), all active.
  {
    pqxx::connection c(Db("fr-1").ConnectionString());
    pqxx::work txn(c);
    txn.exec_params0(
        "INSERT INTO share_grants (grant_id, record_id, grantee, grantee_tenant, granted_by, "
        "created_at, expires_at) SELECT 'fr-1.gfill' || n, $1, $2 || n, 'acme', $3, "
        "to_timestamp($5), to_timestamp($5) + interval '1 day' "
        "FROM generate_series(1, $4::int) AS n",
        record, Id("/tenant/acme/practitioner/filler-"), P1(), kMaxActiveGrantsPerRecord,
        absl::ToUnixSeconds(ServerNow()));  // the server's clock, which tests move forward
    txn.commit();
  }
  const absl::Time until = ServerNow() + absl::Hours(2);
  absl::StatusOr<v1::ShareRecordResponse> refused;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    refused = Share(pki_->practitioner(), record, P2(), until);
    return refused.status().code() != absl::StatusCode::kPermissionDenied;  // consent loaded
  }));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr(absl::StrCat("most active grants a record may have (",
                                     kMaxActiveGrantsPerRecord, ")")));
  EXPECT_TRUE(Share(pki_->practitioner(), record, Id("/tenant/acme/practitioner/filler-1"), until)
                  .ok());
  ASSERT_TRUE(RevokeByGrantee(pki_->practitioner(), record,
                              Id("/tenant/acme/practitioner/filler-2"))
                  .ok());
  auto shared = Share(pki_->practitioner(), record, P2(), until);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(Count("fr-1",
                  "SELECT count(*) FROM share_grants WHERE record_id = $1 AND revoked_at IS NULL",
                  record),
            kMaxActiveGrantsPerRecord);
}

// Timestamps a Timestamp cannot hold, and retention ends beyond any archive's, are refused naming
// the field; nothing changes.
TEST_F(SharingTest, TimestampsOutOfRangeAreRefusedNamingTheField) {
  const auto [patient, spec, record] = ConsentedRecord("timestamps-1", "dated");

  v1::ShareRecordRequest share;
  share.set_record_id(record);
  share.set_grantee(P2());
  share.mutable_expires_at()->set_seconds(int64_t{1} << 50);  // far beyond year 9999
  v1::ShareRecordResponse shared;
  grpc::ClientContext share_context;
  grpc::Status status = Stub(pki_->practitioner())->ShareRecord(&share_context, share, &shared);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("expires_at: not a valid timestamp"));

  auto archived = Archive(pki_->practitioner(), record, ServerNow() + absl::Hours(24 * 365 * 150));
  EXPECT_EQ(archived.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(archived.status().message()), HasSubstr("100 years"));
  v1::ArchiveRecordRequest archive;
  archive.set_record_id(record);
  archive.mutable_retain_until()->set_seconds(1);
  archive.mutable_retain_until()->set_nanos(-5);
  v1::ArchiveRecordResponse ignored;
  grpc::ClientContext archive_context;
  status = Stub(pki_->practitioner())->ArchiveRecord(&archive_context, archive, &ignored);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("retain_until: not a valid timestamp"));

  v1::QueryAuditRequest query;
  query.set_patient_id(patient);
  query.mutable_time_range()->mutable_start_at()->set_seconds(-(int64_t{1} << 40));
  auto queried = QueryAudit(pki_->practitioner(), query);
  EXPECT_EQ(queried.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(queried.status().message()), HasSubstr("time_range.start_at"));

  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM share_grants WHERE record_id = $1", record), 0);
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM records WHERE record_id = $1 AND state = 'active'",
                  record),
            1);
}

// --- the Audit service -------------------------------------------------------------------------

TEST_F(SharingTest, QueryAuditAnswersWhoAccessedThePatientsData) {
  const std::string patient = Place("who-saw-1", "DE");
  GrantSharingConsent(patient);
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = Generate(31, 0, 12345);
  const std::string record = UploadOk(pki_->practitioner(), spec);
  absl::StatusOr<v1::ShareRecordResponse> shared =
      ShareOnceConsented(pki_->practitioner(), record, P2(), ServerNow() + absl::Hours(1));
  ASSERT_TRUE(shared.ok()) << shared.status();
  ASSERT_TRUE(Download(Cert("acme-p2"), record).status.ok());

  std::vector<v1::AuditEntry> entries = PatientAudit(patient);
  ASSERT_GE(entries.size(), 3u);
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_CREATE, record, "PERMITTED"));
  EXPECT_TRUE(HasEntry(entries, P1(), v1::AUDIT_ACTION_CREATE, shared->grant_id(), "PERMITTED"));
  bool read = false;
  // Each entry's hash; the prev_hash of one whose previous entry is on the page too (a tenant's
  // caller gets no other), and then it is that entry's hash.
  std::map<uint64_t, std::string> hash_of;
  for (const v1::AuditEntry& e : entries) hash_of[e.seq()] = e.hash();
  int linked = 0;
  for (const v1::AuditEntry& e : entries) {
    EXPECT_EQ(e.patient_id(), patient);
    EXPECT_EQ(e.hash().size(), 32u);
    if (auto before = hash_of.find(e.seq() - 1); before != hash_of.end()) {
      ++linked;
      EXPECT_EQ(e.prev_hash(), before->second) << e.seq();
    } else if (e.seq() == 1) {
      EXPECT_EQ(e.prev_hash(), std::string(32, '\0'));
    } else {
      EXPECT_EQ(e.prev_hash(), "") << e.seq();
    }
    if (e.actor() == P2() && e.action() == v1::AUDIT_ACTION_READ) {
      read = true;
      EXPECT_EQ(e.reason(), "PERMITTED");
      EXPECT_THAT(e.reason_detail(), HasSubstr("bytes=12345"));
      EXPECT_EQ(e.purpose(), v1::PURPOSE_RECORD_SHARING);
      EXPECT_FALSE(e.consent_id().empty());
      EXPECT_TRUE(e.has_recorded_at());
    }
    if (e.object_id() == shared->grant_id()) {
      EXPECT_THAT(e.reason_detail(), HasSubstr(P2()));  // to whom it was shared
    }
  }
  EXPECT_TRUE(read);
  EXPECT_GE(linked, 1);
  for (size_t i = 1; i < entries.size(); ++i) EXPECT_LT(entries[i - 1].seq(), entries[i].seq());

  // Filters and pages.
  v1::QueryAuditRequest by_actor;
  by_actor.set_patient_id(patient);
  by_actor.set_actor(P2());
  auto only_p2 = QueryAudit(pki_->practitioner(), by_actor);
  ASSERT_TRUE(only_p2.ok()) << only_p2.status();
  ASSERT_GE(only_p2->entries_size(), 1);
  for (const v1::AuditEntry& e : only_p2->entries()) EXPECT_EQ(e.actor(), P2());
  v1::QueryAuditRequest paged;
  paged.set_patient_id(patient);
  paged.set_page_size(1);
  auto first = QueryAudit(pki_->app(), paged);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->entries_size(), 1);
  ASSERT_FALSE(first->next_page_token().empty());
  paged.set_page_token(first->next_page_token());
  auto second = QueryAudit(pki_->app(), paged);
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(second->entries_size(), 1);
  EXPECT_GT(second->entries(0).seq(), first->entries(0).seq());
  // A token is the patient's: with another patient of the same log, the tenant's or another
  // tenant's, it is refused rather than read from, and another tenant's caller learns nothing of
  // the token's patient either.
  const std::string other_patient = Place("who-saw-other", "DE");
  const std::string globex_patient = Place("who-saw-globex", "DE", &pki_->globex_app());
  for (const auto& [as, whose] :
       {std::pair{&pki_->app(), other_patient}, std::pair{&pki_->globex_app(), globex_patient}}) {
    v1::QueryAuditRequest reused = paged;
    reused.set_patient_id(whose);
    auto refused = QueryAudit(*as, reused);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << whose;
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr("page_token")) << whose;
  }
  EXPECT_EQ(QueryAudit(pki_->globex_app(), paged).status().code(), absl::StatusCode::kNotFound);

  // The query itself is audited; whole logs are for ops.
  EXPECT_GE(
      Count("de-1",
            "SELECT count(*) FROM audit_log WHERE object_type = 'audit_log' AND patient_id = $1",
            patient),
      3);
  v1::QueryAuditRequest whole;
  whole.mutable_log()->set_region_id("de-1");
  EXPECT_EQ(QueryAudit(pki_->app(), whole).status().code(), absl::StatusCode::kPermissionDenied);
  auto ops_view = QueryAudit(pki_->ops(), whole);
  ASSERT_TRUE(ops_view.ok()) << ops_view.status();
  EXPECT_GE(ops_view->entries_size(), 3);
  v1::QueryAuditRequest control;
  control.mutable_log()->set_control(true);
  auto control_view = QueryAudit(pki_->ops(), control);
  ASSERT_TRUE(control_view.ok()) << control_view.status();
  EXPECT_GE(control_view->entries_size(), 1);  // tenants and placements
  // The patient's entries of the control log: their placement, for ops.
  v1::QueryAuditRequest placement;
  placement.set_patient_id(patient);
  placement.mutable_log()->set_control(true);
  EXPECT_EQ(QueryAudit(pki_->app(), placement).status().code(), absl::StatusCode::kPermissionDenied);
  auto placement_view = QueryAudit(pki_->ops(), placement);
  ASSERT_TRUE(placement_view.ok()) << placement_view.status();
  ASSERT_EQ(placement_view->entries_size(), 1);
  EXPECT_EQ(placement_view->entries(0).patient_id(), patient);
  EXPECT_EQ(placement_view->entries(0).object_type(), "patient");
  EXPECT_EQ(placement_view->entries(0).action(), v1::AUDIT_ACTION_CREATE);
  // Another region's log holds nothing of the patient's, and the read's entry naming the patient
  // is not written there: refused, naming the logs that do.
  v1::QueryAuditRequest elsewhere;
  elsewhere.set_patient_id(patient);
  elsewhere.mutable_log()->set_region_id("fr-1");
  auto refused_elsewhere = QueryAudit(pki_->ops(), elsewhere);
  EXPECT_EQ(refused_elsewhere.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused_elsewhere.status().message()), HasSubstr("'de-1'"));
  EXPECT_EQ(Count("fr-1", "SELECT count(*) FROM audit_log WHERE patient_id = $1", patient), 0);
  v1::QueryAuditRequest missing;
  EXPECT_EQ(QueryAudit(pki_->practitioner(), missing).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Served on the audit endpoint and on the sharing endpoint alike.
  v1::QueryAuditResponse response;
  grpc::ClientContext context;
  paged.clear_page_token();
  EXPECT_TRUE(v1::Audit::NewStub(Channel(sharing_->port(), pki_->app(), "sharing"))
                  ->QueryAudit(&context, paged, &response)
                  .ok());
}

// What the audit query did for a time range, in one plan (EXPLAIN ANALYZE): the rows its scans
// read and threw away (filters), and the buffers its scan of audit_log read (with its index's;
// not the catalog's, which a first execution reads).
struct AuditScan {
  int64_t discarded = 0;
  int64_t buffers = 0;
  std::string plan;
};

AuditScan ScanOfAuditQuery(pqxx::connection& c, absl::string_view statement,
                           absl::string_view arguments, absl::string_view plan_cache_mode) {
  std::string text;
  for (const pg::Statement& s : sql::AuditStatements()) {
    if (s.name == statement) text = s.sql;
  }
  EXPECT_FALSE(text.empty()) << statement;
  pqxx::nontransaction q(c);
  q.exec0(absl::StrCat("SET plan_cache_mode = ", plan_cache_mode));
  q.exec0("DEALLOCATE ALL");
  q.exec0(absl::StrCat("PREPARE audit_range AS ", text));
  AuditScan scan;
  for (const pqxx::row& row : q.exec(absl::StrCat(
           "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE audit_range(", arguments, ")"))) {
    absl::StrAppend(&scan.plan, row[0].c_str(), "\n");
  }
  q.exec0("RESET plan_cache_mode");
  bool scan_node = false;
  bool counted = false;
  for (absl::string_view line : absl::StrSplit(scan.plan, '\n')) {
    if (absl::StrContains(line, "Planning")) break;  // the plan's own reads (the catalog)
    for (absl::string_view what : {"Rows Removed by Filter: ", "Rows Removed by Index Recheck: "}) {
      const size_t at = line.find(what);
      int64_t n = 0;
      if (at != absl::string_view::npos && absl::SimpleAtoi(line.substr(at + what.size()), &n)) {
        scan.discarded += n;
      }
    }
    // The scan's node (an index scan, or a bitmap heap scan over its index's bitmap), whose
    // Buffers line comes after the node's, counts its children's.
    if (absl::StrContains(line, " on audit_log")) scan_node = true;
    if (scan_node && !counted && absl::StrContains(line, "Buffers: shared")) {
      counted = true;
      for (absl::string_view what : {"hit=", "read="}) {
        const size_t at = line.find(what);
        if (at == absl::string_view::npos) continue;
        absl::string_view n = line.substr(at + what.size());
        n = n.substr(0, n.find(' '));
        int64_t count = 0;
        EXPECT_TRUE(absl::SimpleAtoi(n, &count)) << line;
        scan.buffers += count;
      }
    }
  }
  EXPECT_TRUE(counted) << "no buffer counts for audit_log in the plan:\n" << scan.plan;
  return scan;
}

TEST_F(SharingTest, AnAuditQueryForARecentRangeOfALongHistoryStartsAtTheRange) {
  const std::string patient = Place("audit-range-1", "DE");
  // A monitored patient's long history: 3,000 entries, each at its own time, then two groups of
  // 7 appended together (one time each, as ingest appends a transaction's batches). The range
  // asked for is the last 10 single entries and the two groups.
  constexpr int kHistory = 3000;
  constexpr int kGroup = 7;
  std::vector<std::string> expected;
  std::vector<int64_t> at_of;  // at_us of each single entry
  int64_t other_patients_seq = 0;
  int64_t range_end_us = 0;
  {
    pqxx::connection c(Db("de-1").ConnectionString());
    pqxx::work txn(c);
    audit::Entry e;
    e.actor = P1();
    e.tenant = "acme";
    e.action = audit::Action::kCreate;
    e.object_type = "vitals";
    e.decision = audit::Decision::kPermit;
    e.reason = "PERMITTED";
    e.patient_id = "another-patient";
    absl::StatusOr<int64_t> other = audit::Append(txn, e);
    ASSERT_TRUE(other.ok()) << other.status();
    other_patients_seq = *other;
    e.patient_id = patient;
    for (int i = 0; i < kHistory; ++i) {
      e.object_id = absl::StrCat("batch-", i);
      absl::StatusOr<int64_t> seq = audit::Append(txn, e);
      ASSERT_TRUE(seq.ok()) << seq.status();
      at_of.push_back(
          txn.exec_params1("SELECT at_us FROM audit_log WHERE seq = $1", *seq)[0].as<int64_t>());
      if (i >= kHistory - 10) expected.push_back(e.object_id);
    }
    txn.commit();
    auto quote = [&](const std::string& s) -> absl::StatusOr<std::string> { return c.quote(s); };
    for (int g = 0; g < 2; ++g) {
      std::vector<audit::Entry> group;
      for (int k = 0; k < kGroup; ++k) {
        e.object_id = absl::StrCat("group-", g, "-", k);
        group.push_back(e);
        expected.push_back(e.object_id);
      }
      absl::StatusOr<std::string> appended = ingest::sql::AuditAndCommitQuery(quote, group);
      ASSERT_TRUE(appended.ok()) << appended.status();
      pqxx::nontransaction n(c);
      n.exec(absl::StrCat("BEGIN; ", *appended));
    }
    pqxx::nontransaction n(c);
    range_end_us = n.exec_params1("SELECT max(at_us) + 1 FROM audit_log WHERE patient_id = $1",
                                  patient)[0]
                       .as<int64_t>();
    ASSERT_EQ(n.exec_params1("SELECT count(DISTINCT at_us) FROM audit_log WHERE object_id "
                             "LIKE 'group-%' AND patient_id = $1",
                             patient)[0]
                  .as<int64_t>(),
              2);
  }
  const int64_t range_start_us = at_of[kHistory - 11] + 1;  // after the entry before the range

  // The range's entries, in pages of 4 (two of them end inside a group), in order.
  v1::QueryAuditRequest request;
  request.set_patient_id(patient);
  *request.mutable_time_range()->mutable_start_at() =
      ToProtoTimestamp(absl::FromUnixMicros(range_start_us));
  *request.mutable_time_range()->mutable_end_at() =
      ToProtoTimestamp(absl::FromUnixMicros(range_end_us));
  request.set_page_size(4);
  auto all_pages = [&](v1::QueryAuditRequest r) {
    std::vector<v1::AuditEntry> got;
    for (int page = 0; page < 20; ++page) {
      auto response = QueryAudit(pki_->app(), r);
      EXPECT_TRUE(response.ok()) << response.status();
      if (!response.ok()) break;
      got.insert(got.end(), response->entries().begin(), response->entries().end());
      if (response->next_page_token().empty()) break;
      r.set_page_token(response->next_page_token());
    }
    return got;
  };
  std::vector<v1::AuditEntry> got = all_pages(request);
  std::vector<std::string> ids;
  for (const v1::AuditEntry& entry : got) ids.push_back(entry.object_id());
  EXPECT_EQ(ids, expected);
  for (size_t i = 1; i < got.size(); ++i) EXPECT_EQ(got[i].seq(), got[i - 1].seq() + 1);

  // A token of an entry before the range (from a query of the whole history) starts at the range.
  v1::QueryAuditRequest earlier = request;
  earlier.clear_time_range();
  earlier.set_page_size(5);
  auto first_five = QueryAudit(pki_->app(), earlier);
  ASSERT_TRUE(first_five.ok()) << first_five.status();
  ASSERT_FALSE(first_five->next_page_token().empty());
  request.set_page_token(first_five->next_page_token());
  auto from_before = QueryAudit(pki_->app(), request);
  ASSERT_TRUE(from_before.ok()) << from_before.status();
  ASSERT_EQ(from_before->entries_size(), 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(from_before->entries(i).object_id(), expected[i]);
  // Tokens that are not a seq of this patient's entries: among them, an entry of another patient
  // (whether it exists is not for this caller to learn) and one past the log's end.
  for (const std::string& bad :
       {std::string("x"), std::string("0"), std::string("-3"), std::string("1.2"),
        absl::StrCat(other_patients_seq), std::string("99999999")}) {
    request.set_page_token(bad);
    EXPECT_EQ(QueryAudit(pki_->app(), request).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }

  // Found in an index: nothing is read and thrown away, and the range at the end of the history
  // reads about as many buffers as one at its start (walking the history's index entries would
  // read every leaf page), in the plans made for these values and in the generic plan a prepared
  // statement comes to use.
  pqxx::connection c(Db("de-1").ConnectionString());
  const std::string patient_quoted = c.quote(patient);
  // As many entries at the history's start as the range holds.
  const int64_t first_range_start = at_of[0];
  const int64_t first_range_end = at_of[expected.size() - 1] + 1;
  for (absl::string_view mode : {"force_custom_plan", "force_generic_plan"}) {
    for (bool whole_log : {false, true}) {
      auto args = [&](int64_t start, int64_t end) {
        return absl::StrCat(whole_log ? "" : patient_quoted + ", ", start, ", 0, ", end,
                            ", '', 5, 5");
      };
      const char* statement = whole_log ? sql::kSelectAuditLog : sql::kSelectAuditForPatient;
      const AuditScan recent = ScanOfAuditQuery(c, statement, args(range_start_us, range_end_us), mode);
      const AuditScan first =
          ScanOfAuditQuery(c, statement, args(first_range_start, first_range_end), mode);
      EXPECT_EQ(recent.discarded, 0) << mode << "\n" << recent.plan;
      EXPECT_LE(recent.buffers, first.buffers + 3)
          << mode << "\n" << recent.plan << "\nagainst\n" << first.plan;
    }
  }
}

// A query by actor reads a bounded part of the range per page (the actor is not in the index):
// a rare actor in a long history gives short or empty pages with a token, not a scan of it all,
// and paging on still finds every entry of that actor, in order.
TEST_F(SharingTest, AnAuditQueryByActorReadsABoundedPartOfTheRangeAPage) {
  constexpr int64_t kScanned = 500;
  SharingServerOptions options;
  options.audit_scanned_per_page = kScanned;
  ExtraSharing extra = StartSharingOn(
      ConfigWith("retention_sweep_seconds: 86400", "retention_sweep_seconds: 86400"), options);
  ASSERT_NE(extra.server, nullptr);
  const std::string patient = Place("audit-actor-1", "DE");
  // P2's entry, 1,200 of P1's, P2's again: 1,202 entries of the patient.
  {
    pqxx::connection c(Db("de-1").ConnectionString());
    pqxx::work txn(c);
    audit::Entry e;
    e.tenant = "acme";
    e.action = audit::Action::kRead;
    e.object_type = "record";
    e.decision = audit::Decision::kPermit;
    e.reason = "PERMITTED";
    e.patient_id = patient;
    for (int i = 0; i < 1202; ++i) {
      e.actor = i == 0 || i == 1201 ? P2() : P1();
      e.object_id = absl::StrCat("r-", i);
      ASSERT_TRUE(audit::Append(txn, e).ok());
    }
    txn.commit();
  }
  auto stub = v1::Audit::NewStub(Channel(extra.server->port(), pki_->app(), "sharing"));
  v1::QueryAuditRequest request;
  request.set_patient_id(patient);
  request.set_actor(P2());
  request.set_page_size(10);
  std::vector<std::string> found;
  std::vector<int> page_sizes;
  for (int page = 0; page < 10; ++page) {
    v1::QueryAuditResponse response;
    grpc::ClientContext context;
    grpc::Status status = stub->QueryAudit(&context, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    page_sizes.push_back(response.entries_size());
    for (const v1::AuditEntry& entry : response.entries()) found.push_back(entry.object_id());
    if (response.next_page_token().empty()) break;
    request.set_page_token(response.next_page_token());
  }
  // 500 entries read a page: P2's first entry, then none, then (the last 202) P2's second.
  EXPECT_THAT(page_sizes, ElementsAre(1, 0, 1));
  EXPECT_THAT(found, ElementsAre("r-0", "r-1201"));
  // Without an actor, pages are full as before.
  request.clear_actor();
  request.clear_page_token();
  v1::QueryAuditResponse all;
  grpc::ClientContext context;
  ASSERT_TRUE(stub->QueryAudit(&context, request, &all).ok());
  EXPECT_EQ(all.entries_size(), 10);
  EXPECT_FALSE(all.next_page_token().empty());
  extra.server->Shutdown();
}

// Until its header comes, an upload counts against its tenant's uploads in every region together
// (sharing.max_uploads_per_tenant each): streams that never send a header cannot hold every
// thread of the server, and other tenants' uploads go on.
TEST_F(SharingTest, UploadsThatSendNoHeaderAreBoundedPerTenant) {
  ExtraSharing extra = StartSharingWith("max_uploads_per_tenant: 1");
  ASSERT_NE(extra.server, nullptr);
  const int port = extra.server->port();
  const int bound = static_cast<int>(extra.config->regions.size());  // 1 in each region
  auto stub = v1::RecordSharing::NewStub(Channel(port, pki_->practitioner(), "sharing"));
  struct Held {
    grpc::ClientContext context;
    v1::UploadRecordResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::UploadRecordRequest>> writer;
  };
  std::vector<std::unique_ptr<Held>> held;
  // What the held streams that ended other than by this test's cancelling ended with.
  std::vector<std::string> held_ended;
  // Exactly `bound` streams are held. A held stream the server ended at once (a refusal while the
  // machine is loaded, say) holds nothing, and its client cannot tell without sending: every two
  // seconds without a refusal, they are all ended (their outcome kept) and held anew.
  auto hold = [&] {
    for (auto& h : held) {
      h->context.TryCancel();
      const grpc::Status ended = h->writer->Finish();
      if (ended.error_code() != grpc::StatusCode::CANCELLED) {
        held_ended.push_back(absl::StrCat(ended.error_code(), ": ", ended.error_message()));
      }
    }
    held.clear();
    for (int i = 0; i < bound; ++i) {
      auto h = std::make_unique<Held>();
      // Waiting for the connection: gRPC shares subchannels between channels, and one to a port
      // an earlier test's server had (now this one's) may still be backing off; a stream that
      // failed fast would hold nothing.
      h->context.set_wait_for_ready(true);
      h->writer = stub->UploadRecord(&h->context, &h->response);
      held.push_back(std::move(h));
    }
  };
  hold();
  absl::Time hold_again_at = absl::Now() + absl::Seconds(2);
  // One more of acme's, without a header, is refused once those are all waiting for theirs.
  grpc::Status refused;
  ASSERT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    if (absl::Now() >= hold_again_at) {
      hold();
      hold_again_at = absl::Now() + absl::Seconds(2);
    }
    grpc::ClientContext context;
    v1::UploadRecordResponse response;
    auto writer = stub->UploadRecord(&context, &response);
    writer->WritesDone();
    refused = writer->Finish();
    return refused.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
  })) << refused.error_message() << "; held streams ended with: " << absl::StrJoin(held_ended, "; ");
  EXPECT_THAT(refused.error_message(), HasSubstr("waiting for their header"));
  EXPECT_THAT(refused.error_message(), HasSubstr("sharing.max_uploads_per_tenant"));
  // Another tenant's upload is stored meanwhile.
  UploadSpec theirs;
  theirs.patient_id = Place("no-header-globex", "FR", &pki_->globex_app());
  theirs.content = "globex's record";
  EXPECT_TRUE(Upload(pki_->globex_practitioner(), theirs, nullptr, port).ok());
  // One held stream ends: acme uploads again.
  held.front()->context.TryCancel();
  UploadSpec mine;
  mine.patient_id = Place("no-header-acme", "FR");
  mine.content = "acme's record";
  grpc::Status stored;
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    stored = Upload(pki_->practitioner(), mine, nullptr, port);
    return stored.ok();
  })) << stored.error_message();
  for (auto& h : held) {
    h->context.TryCancel();
    h->writer->Finish();
  }
  extra.server->Shutdown();
}

// Ids that cannot be any are refused before anything is looked up, naming the field the caller
// sent, with a message of bounded size.
TEST_F(SharingTest, AuditAndRevokeRefuseMalformedIdsNamingTheirField) {
  v1::QueryAuditRequest query;
  for (const std::string& id : {std::string("p!"), std::string(200 * 1024, 'p')}) {
    query.set_patient_id(id);
    absl::StatusOr<v1::QueryAuditResponse> refused = QueryAudit(pki_->app(), query);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
    EXPECT_THAT(std::string(refused.status().message()), StartsWith("patient_id:"));
    EXPECT_THAT(std::string(refused.status().message()), Not(HasSubstr("routing")));
  }
  // The actor filter is text: a NUL (which the database would cut the filter at, dropping it) or
  // another control character is refused.
  for (const std::string& actor : {std::string("spiffe://x\0y", 13), std::string("a\nb")}) {
    v1::QueryAuditRequest by_actor;
    by_actor.set_patient_id("p-1");
    by_actor.set_actor(actor);
    absl::StatusOr<v1::QueryAuditResponse> refused = QueryAudit(pki_->app(), by_actor);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
    EXPECT_THAT(std::string(refused.status().message()), StartsWith("actor:"));
  }
  absl::StatusOr<v1::VerifyChainResponse> huge = Verify(std::string(1 << 20, 'x'));
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument) << huge.status().code();
  EXPECT_THAT(std::string(huge.status().message()), StartsWith("log.region_id:"));
  EXPECT_LT(huge.status().message().size(), 1024u);
  v1::RevokeShareRequest revoke;
  revoke.set_grant_id("");
  v1::RevokeShareResponse response;
  grpc::ClientContext context;
  grpc::Status status = Stub(pki_->practitioner())->RevokeShare(&context, revoke, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), StartsWith("grant_id:"));
}

// A walk cancelled by its caller stops (the service asks the call between pages) and is audited
// as not concluded: it read entries of the log all the same.
TEST_F(SharingTest, ACancelledVerifyChainStopsAndIsAuditedAsNotConcluded) {
  Place("verify-cancel-1", "DE");  // an entry or more in de-1's log
  // The walk's first read waits behind a lock while the call is cancelled.
  WalkBehindALock walk;
  const bool waiting = walk.Waiting();
  walk.Cancel();
  walk.End();
  ASSERT_TRUE(waiting);
  EXPECT_EQ(walk.status().error_code(), grpc::StatusCode::CANCELLED)
      << walk.status().error_message();
  std::string reason;
  EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] {
    pqxx::connection c(ConnInfo("de-1"));
    pqxx::nontransaction q(c);
    pqxx::result rows = q.exec(
        "SELECT reason FROM audit_log WHERE object_type = 'audit_log' AND action = 'execute' "
        "ORDER BY seq DESC LIMIT 1");
    if (rows.empty()) return false;
    reason = rows[0][0].c_str();
    return true;
  }));
  EXPECT_THAT(reason, StartsWith("NOT_CONCLUDED: CANCELLED")) << reason;
  // The log still verifies, the cancelled walk's entry with it.
  auto verified = Verify("de-1");
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok()) << verified->detail();
}

// A server walks a log once at a time (a walk holds one of the log's connections, and a snapshot,
// for as long as it reads): a second walk of the same log meanwhile is refused, one of another log
// goes ahead, and once the first has ended the log is walked again.
TEST_F(SharingTest, AServerWalksALogOnceAtATime) {
  Place("verify-once-1", "DE");
  WalkBehindALock first;
  const bool waiting = first.Waiting();
  absl::StatusOr<v1::VerifyChainResponse> second = Verify("de-1");
  absl::StatusOr<v1::VerifyChainResponse> other = Verify("control");
  first.End();
  ASSERT_TRUE(waiting);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted) << second.status();
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("a walk of log 'de-1' is already running"));
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_TRUE(other->ok()) << other->detail();
  ASSERT_TRUE(first.status().ok()) << first.status().error_message();
  EXPECT_TRUE(first.response().ok()) << first.response().detail();
  absl::StatusOr<v1::VerifyChainResponse> again = Verify("de-1");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->ok()) << again->detail();
}

TEST_F(SharingTest, VerifyChainLocatesATamperedEntry) {
  const std::string patient = Place("verify-1", "DE");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "checked";
  const std::string record = UploadOk(pki_->practitioner(), spec);
  auto ok = Verify("de-1");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->ok());
  EXPECT_GT(ok->entries_checked(), 0u);
  EXPECT_EQ(ok->last_seq(), ok->entries_checked());
  EXPECT_EQ(ok->last_hash().size(), 32u);
  auto control = Verify("control");
  ASSERT_TRUE(control.ok());
  EXPECT_TRUE(control->ok());

  const int64_t seq = Count("de-1", "SELECT seq FROM audit_log WHERE object_id = $1", record);
  Exec("de-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
  // Put back as it was whatever happens below: the suite's other tests verify this log too.
  absl::Cleanup put_back = PutBackReasonsAfter("de-1", record);
  Exec("de-1", "UPDATE audit_log SET reason = 'PERMITTED: bytes=1' WHERE object_id = $1", record);
  auto broken = Verify("de-1");
  ASSERT_TRUE(broken.ok());
  EXPECT_FALSE(broken->ok());
  EXPECT_EQ(broken->first_bad_seq(), static_cast<uint64_t>(seq));
  EXPECT_EQ(broken->fault(), v1::CHAIN_FAULT_HASH_MISMATCH);
  EXPECT_FALSE(broken->detail().empty());
  // Put back as it was: the chain verifies again (the verifications are logged in it too).
  std::move(put_back).Invoke();
  auto repaired = Verify("de-1");
  ASSERT_TRUE(repaired.ok());
  EXPECT_TRUE(repaired->ok()) << repaired->detail();

  // A removed entry is located too; put back, the chain verifies again.
  Exec("de-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
  Exec("de-1", "CREATE TABLE removed_entry AS SELECT * FROM audit_log WHERE object_id = $1",
       record);
  Exec("de-1", "DELETE FROM audit_log WHERE object_id = $1", record);
  auto gap = Verify("de-1");
  ASSERT_TRUE(gap.ok());
  EXPECT_FALSE(gap->ok());
  EXPECT_EQ(gap->first_bad_seq(), static_cast<uint64_t>(seq));
  EXPECT_EQ(gap->fault(), v1::CHAIN_FAULT_SEQ_GAP);
  Exec("de-1", "INSERT INTO audit_log SELECT * FROM removed_entry");
  Exec("de-1", "DROP TABLE removed_entry");
  Exec("de-1", "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update");
  auto restored = Verify("de-1");
  ASSERT_TRUE(restored.ok());
  EXPECT_TRUE(restored->ok()) << restored->detail();

  // The last entry rewritten with its hash recomputed, the head left as it was: every entry
  // checks, the head's hash does not; the fault is that entry's content, not a gap.
  const int64_t last = Count("de-1", "SELECT max(seq) FROM audit_log");
  Exec("de-1", "CREATE TABLE last_entry AS SELECT * FROM audit_log WHERE seq = $1",
       std::to_string(last));
  Exec("de-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
  Exec("de-1",
       "UPDATE audit_log SET reason = 'VERIFIED: entries=0', hash = sha256(prev_hash || "
       "audit_field('medgate-audit-v1') || int8send(seq) || int8send(at_us) || "
       "audit_encoded_tail(actor, tenant, action, object_type, object_id, patient_id, decision, "
       "'VERIFIED: entries=0', purpose, consent_id, consent_version, request_id, origin)) "
       "WHERE seq = $1",
       std::to_string(last));
  auto rewritten = Verify("de-1");
  Exec("de-1",
       "UPDATE audit_log a SET reason = l.reason, hash = l.hash FROM last_entry l "
       "WHERE a.seq = l.seq");
  Exec("de-1", "DROP TABLE last_entry");
  Exec("de-1", "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update");
  ASSERT_TRUE(rewritten.ok()) << rewritten.status();
  EXPECT_FALSE(rewritten->ok());
  EXPECT_EQ(rewritten->first_bad_seq(), static_cast<uint64_t>(last));
  EXPECT_EQ(rewritten->fault(), v1::CHAIN_FAULT_HASH_MISMATCH) << rewritten->detail();
  EXPECT_EQ(rewritten->entries_checked(), static_cast<uint64_t>(last));
  auto put_right = Verify("de-1");
  ASSERT_TRUE(put_right.ok());
  EXPECT_TRUE(put_right->ok()) << put_right->detail();
  // A removed entry is not counted as checked.
  EXPECT_EQ(gap->entries_checked(), static_cast<uint64_t>(seq - 1));

  v1::VerifyChainRequest bad;
  v1::VerifyChainResponse response;
  grpc::ClientContext context;
  EXPECT_EQ(AuditStub(pki_->ops())->VerifyChain(&context, bad, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Verify("xx-9").status().code(), absl::StatusCode::kNotFound);
}

// Someone able to write the shard cuts the log short and moves its head back: every entry left
// still links to the one before, so the chain alone verifies. Against an anchor kept from an
// earlier verification (its last_seq and last_hash), the cut is found.
TEST_F(SharingTest, VerifyChainAgainstAnAnchorFindsALogCutShort) {
  const std::string patient = Place("verify-anchor-1", "DE");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "anchored";
  // Entries enough to cut five before the anchor's, whichever tests ran before.
  for (int i = 0; i < 6; ++i) UploadOk(pki_->practitioner(), spec);
  auto anchored = Verify("de-1");
  ASSERT_TRUE(anchored.ok()) << anchored.status();
  ASSERT_TRUE(anchored->ok()) << anchored->detail();
  const uint64_t anchor_seq = anchored->last_seq();
  const std::string anchor_hash = anchored->last_hash();
  // The anchor holds while the log only grows.
  UploadOk(pki_->practitioner(), spec);
  auto grown = Verify("de-1", nullptr, 0, 0, anchor_seq, anchor_hash);
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_TRUE(grown->ok()) << grown->detail();

  // Cut five entries before the anchor's: the three verifications below add one each (audited),
  // and the anchor's entry stays missing.
  ASSERT_GT(anchor_seq, 5u);
  const int64_t cut = static_cast<int64_t>(anchor_seq) - 5;
  // Put back whatever happens below.
  absl::Cleanup restore = CutLogShort("de-1", cut);

  auto alone = Verify("de-1");
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_TRUE(alone->ok()) << "the chain alone cannot see the cut: " << alone->detail();
  auto against = Verify("de-1", nullptr, 0, 0, anchor_seq, anchor_hash);
  ASSERT_TRUE(against.ok()) << against.status();
  EXPECT_FALSE(against->ok());
  EXPECT_EQ(against->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
  EXPECT_EQ(against->first_bad_seq(), anchor_seq);
  EXPECT_THAT(against->detail(), HasSubstr("cut short"));
  // So is the next check from where the last one ended: the log no longer reaches its start.
  auto onward = Verify("de-1", nullptr, anchor_seq + 1, 0, anchor_seq, anchor_hash);
  ASSERT_TRUE(onward.ok()) << onward.status();
  EXPECT_FALSE(onward->ok());
  EXPECT_EQ(onward->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
  EXPECT_EQ(onward->first_bad_seq(), anchor_seq);
  // An anchor's hash must be a hash, and its seq one a log can have.
  EXPECT_EQ(Verify("de-1", nullptr, 0, 0, anchor_seq, "short").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Verify("de-1", nullptr, 0, 0, std::numeric_limits<uint64_t>::max(), anchor_hash)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // A hash without its seq would leave the log's end unchecked (here, the log cut short).
  absl::StatusOr<v1::VerifyChainResponse> unanchored = Verify("de-1", nullptr, 0, 0, 0, anchor_hash);
  EXPECT_EQ(unanchored.status().code(), absl::StatusCode::kInvalidArgument) << unanchored.status();
  EXPECT_THAT(std::string(unanchored.status().message()), HasSubstr("anchor_seq"));
  std::move(restore).Invoke();
  auto restored = Verify("de-1", nullptr, 0, 0, anchor_seq, anchor_hash);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_TRUE(restored->ok()) << restored->detail();

  // A range checked against the anchor contains its entry and starts at most one entry after it:
  // the entries in between would otherwise be trusted unchecked.
  auto late = Verify("de-1", nullptr, anchor_seq + 2, 0, anchor_seq, anchor_hash);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(late.status().message()), HasSubstr("trusted unchecked"));
  auto early = Verify("de-1", nullptr, 1, anchor_seq - 1, anchor_seq, anchor_hash);
  EXPECT_EQ(early.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(early.status().message()), HasSubstr("contain the anchor's entry"));
  auto from_next = Verify("de-1", nullptr, anchor_seq + 1, 0, anchor_seq, anchor_hash);
  ASSERT_TRUE(from_next.ok()) << from_next.status();
  EXPECT_TRUE(from_next->ok()) << from_next->detail();
  auto up_to = Verify("de-1", nullptr, 1, anchor_seq, anchor_seq, anchor_hash);
  ASSERT_TRUE(up_to.ok()) << up_to.status();
  EXPECT_TRUE(up_to->ok()) << up_to->detail();
}

TEST_F(SharingTest, VerifyChainChecksARangeFromTheStoredHashBeforeIt) {
  const std::string patient = Place("verify-range-1", "DE");
  std::vector<std::string> records;
  for (int i = 0; i < 4; ++i) {
    UploadSpec spec;
    spec.patient_id = patient;
    spec.content = Generate(40 + i, 0, 100);
    records.push_back(UploadOk(pki_->practitioner(), spec));
  }
  auto seq_of = [](const std::string& record) {
    return static_cast<uint64_t>(
        Count("de-1", "SELECT seq FROM audit_log WHERE object_id = $1", record));
  };
  const uint64_t first = seq_of(records[0]);
  const uint64_t last = seq_of(records[3]);
  const uint64_t altered = seq_of(records[2]);
  ASSERT_GT(first, 1u);
  ASSERT_LT(first, altered);
  ASSERT_LT(altered, last);

  // An intact range verifies, and only its entries are counted.
  auto range = Verify("de-1", nullptr, first, last);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_TRUE(range->ok()) << range->detail();
  EXPECT_EQ(range->entries_checked(), last - first + 1);
  EXPECT_EQ(range->last_seq(), last);
  {
    pqxx::connection c(Db("de-1").ConnectionString());
    pqxx::nontransaction q(c);
    EXPECT_EQ(range->last_hash(),
              pqxx::binarystring(q.exec_params1("SELECT hash FROM audit_log WHERE seq = $1",
                                                static_cast<int64_t>(last))[0])
                  .str());
  }
  // Up to the last entry (end_seq 0) includes the chain head check, and ends at the head as it was
  // (the verification's own audit entry comes after).
  const int64_t head_seq = Count("de-1", "SELECT seq FROM audit_head");
  auto to_head = Verify("de-1", nullptr, first, 0);
  ASSERT_TRUE(to_head.ok()) << to_head.status();
  EXPECT_TRUE(to_head->ok()) << to_head->detail();
  EXPECT_EQ(static_cast<int64_t>(to_head->last_seq()), head_seq);
  EXPECT_GT(head_seq, static_cast<int64_t>(last));

  // An altered entry inside the range is named; ranges that leave it out still verify, the one
  // after it from its stored hash.
  Exec("de-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
  absl::Cleanup put_back = PutBackReasonsAfter("de-1", records[2]);
  Exec("de-1", "UPDATE audit_log SET reason = 'PERMITTED: bytes=1' WHERE object_id = $1",
       records[2]);
  auto broken = Verify("de-1", nullptr, first, last);
  ASSERT_TRUE(broken.ok()) << broken.status();
  EXPECT_FALSE(broken->ok());
  EXPECT_EQ(broken->first_bad_seq(), altered);
  EXPECT_EQ(broken->fault(), v1::CHAIN_FAULT_HASH_MISMATCH);
  EXPECT_EQ(broken->entries_checked(), altered - first + 1);
  auto before = Verify("de-1", nullptr, first, altered - 1);
  ASSERT_TRUE(before.ok());
  EXPECT_TRUE(before->ok()) << before->detail();
  auto after = Verify("de-1", nullptr, altered + 1, last);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->ok()) << after->detail();
  auto just_it = Verify("de-1", nullptr, altered, altered);
  ASSERT_TRUE(just_it.ok());
  EXPECT_FALSE(just_it->ok());
  EXPECT_EQ(just_it->first_bad_seq(), altered);
  std::move(put_back).Invoke();
  auto repaired = Verify("de-1", nullptr, first, last);
  ASSERT_TRUE(repaired.ok());
  EXPECT_TRUE(repaired->ok()) << repaired->detail();

  // Ranges outside the log or empty are refused, saying which bound to change.
  const uint64_t head = static_cast<uint64_t>(Count("de-1", "SELECT seq FROM audit_head"));
  auto reversed = Verify("de-1", nullptr, last, first);
  EXPECT_EQ(reversed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(reversed.status().message()), HasSubstr("is after end_seq"));
  auto past_end = Verify("de-1", nullptr, first, head + 1000);
  EXPECT_EQ(past_end.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(past_end.status().message()),
              HasSubstr(absl::StrCat("end_seq ", head + 1000, " is past the log's last entry")));
  auto past_start = Verify("de-1", nullptr, head + 1000, 0);
  EXPECT_EQ(past_start.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(past_start.status().message()), HasSubstr("start_seq"));
  auto huge = Verify("de-1", nullptr, 1, uint64_t{1} << 63);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(huge.status().message()), HasSubstr("end_seq"));
  // Verifying is for ops only, ranged or not.
  EXPECT_EQ(Verify("de-1", &pki_->app(), first, last).status().code(),
            absl::StatusCode::kPermissionDenied);
}

// The standard health check of the sharing and audit servers, as a load balancer asks it: SERVING
// while the control database and any region's shard answer (one region down fails only its own
// patients' calls); NOT_SERVING with every shard down, or with the control database down. Runs
// last: it stops every server of the stack, and waits for the consent feeds to listen again.
TEST_F(SharingTest, HealthServesWhileControlAndAnyRegionsShardAnswer) {
  const TestCert& ops = pki_->ops();
  const TlsConfig tls{ops.cert_path, ops.key_path, pki_->ca_path(), 60};
  for (int port : {sharing_->port(), sharing_->audit_port()}) {
    SCOPED_TRACE(port == sharing_->port() ? "sharing" : "audit");
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port), tls,
                               Id(port == sharing_->port() ? "/service/sharing" : "/service/audit"));
    ASSERT_TRUE(channel.ok()) << channel.status();
    absl::Status regions = test_support::ExpectServingWhileAnyRegionAnswers(
        *channel, *clusters_, "fr-1", absl::Now() + kPatience);
    EXPECT_TRUE(regions.ok()) << regions;

    ASSERT_TRUE(clusters_->control().Stop().ok());
    absl::Status down = test_support::WaitForHealth(*channel, test_support::Health::kNotServing,
                                                    absl::Now() + kPatience);
    EXPECT_TRUE(down.ok()) << "with the control database down: " << down;
    ASSERT_TRUE(clusters_->control().StartAgain().ok());
    absl::Status back = test_support::WaitForHealth(*channel, test_support::Health::kServing,
                                                    absl::Now() + kPatience);
    EXPECT_TRUE(back.ok()) << "with the control database back: " << back;
  }
  for (consent::ConsentCache* cache : {&consent_->cache(), &sharing_->consent_cache()}) {
    for (const char* region : {"fr-1", "de-1", "eu-1"}) {
      EXPECT_TRUE(PollUntil(absl::Now() + kPatience, [&] { return cache->FeedListening(region); }))
          << "the consent feed of " << region << " did not come back";
    }
  }
}

TEST(AuditAnchorTest, AnAnchorsReasonReadsBackAndNothingElseIsAnAnchor) {
  const ChainAnchor anchor{42, std::string(32, '\xab')};
  const std::string reason = AnchorReason(anchor);
  std::string hex_ab;
  for (int i = 0; i < 32; ++i) hex_ab += "ab";
  EXPECT_EQ(reason, "ANCHOR: seq=42 hash=" + hex_ab);
  std::optional<ChainAnchor> back = ParseAnchorReason(reason);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->seq, 42);
  EXPECT_EQ(back->hash, anchor.hash);
  // Anchored anew by ops, with their reason after it.
  const std::string rebased = AnchorReason(anchor, "INC-7: restored");
  EXPECT_EQ(rebased, "ANCHOR: seq=42 hash=" + hex_ab + " REBASED: INC-7: restored");
  std::optional<ChainAnchor> rebased_back = ParseAnchorReason(rebased);
  ASSERT_TRUE(rebased_back.has_value());
  EXPECT_EQ(rebased_back->seq, 42);
  EXPECT_EQ(rebased_back->hash, anchor.hash);
  const std::string hex(64, 'a');
  for (const std::string& other :
       {std::string("VERIFIED: entries=3"), absl::StrCat("ANCHOR: seq=0 hash=", hex),
        absl::StrCat("ANCHOR: seq=-1 hash=", hex), absl::StrCat("ANCHOR: seq=x hash=", hex),
        absl::StrCat("ANCHOR: seq=1 hash=", hex.substr(1)),
        absl::StrCat("ANCHOR: seq=1 hash=", hex, "0"),
        absl::StrCat("ANCHOR: seq=1 hash=", std::string(64, 'A')),
        absl::StrCat("ANCHOR: seq=1 hash=", std::string(64, 'g')),
        absl::StrCat("ANCHOR: seq=1  hash=", hex), absl::StrCat("ANCHOR: seq= 1 hash=", hex),
        absl::StrCat("ANCHOR: seq=+1 hash=", hex), absl::StrCat("ANCHOR: seq=01 hash=", hex),
        absl::StrCat("ANCHOR_MISMATCH: seq=1 hash=", hex),
        absl::StrCat("ANCHOR: seq=1 hash=", hex, " rebased: x"),
        absl::StrCat("ANCHOR: seq=1 hash=", hex, "REBASED: x"),
        std::string("ANCHOR: seq=99999999999999999999 hash=") + hex}) {
    EXPECT_FALSE(ParseAnchorReason(other).has_value()) << other;
  }
}

// Every audit log's head is recorded in the other logs (RecordAnchors; every
// sharing.audit_anchor_seconds on its own, off in this suite): a shard's in the control log, the
// control log's in each shard. Someone able to write only fr-1 cuts its log short and moves its
// head back: every entry left links to the one before, and VerifyChain, given no anchor, still
// finds the cut, against fr-1's anchor in the control log. Logs with nothing new are not anchored
// again. (Last in the suite: the anchors it records stay, and the tests above cut and rewrite
// de-1's log.)
TEST_F(SharingTest, AuditLogsAreAnchoredInEachOtherAndALogCutShortIsFound) {
  const std::string patient = Place("anchor-1", "FR");
  UploadSpec spec;
  spec.patient_id = patient;
  spec.content = "anchored elsewhere";
  for (int i = 0; i < 6; ++i) UploadOk(pki_->practitioner(), spec);
  const std::string actor = pki_->SpiffeId("/service/sharing");
  auto round = [&] {
    AnchorRound r = sharing_->audit_core().RecordAnchors(actor);
    EXPECT_TRUE(r.failed.empty()) << absl::StrJoin(r.failed, "; ");
    return r;
  };
  const AnchorRound first = round();
  EXPECT_TRUE(first.mismatched.empty()) << absl::StrJoin(first.mismatched, ", ");
  EXPECT_GT(first.recorded, 0);
  const auto latest_anchor = [](const std::string& in, const std::string& of) {
    return Text(in, absl::StrCat("SELECT coalesce(max(reason), '') FROM audit_log WHERE seq = "
                                 "(SELECT max(seq) FROM audit_log WHERE object_type = "
                                 "'audit_anchor' AND object_id = '", of,
                                 "' AND decision = 'permit')"));
  };
  // fr-1's head is what the control log records, the control log's anchor written into fr-1
  // first included; the control log's anchor in fr-1 is an entry of the control log.
  const int64_t fr_head = Count("fr-1", "SELECT seq FROM audit_head");
  EXPECT_EQ(latest_anchor("control", "fr-1"),
            Text("fr-1", "SELECT 'ANCHOR: seq=' || seq || ' hash=' || encode(hash, 'hex') "
                         "FROM audit_head"));
  std::optional<ChainAnchor> of_control = ParseAnchorReason(latest_anchor("fr-1", "control"));
  ASSERT_TRUE(of_control.has_value());
  EXPECT_EQ(Text("control", absl::StrCat("SELECT encode(hash, 'hex') FROM audit_log WHERE seq = ",
                                         of_control->seq)),
            audit::ToHex(of_control->hash));

  // Nothing but anchors appended since: the next round records nothing, and no log moves.
  const int64_t control_head = Count("control", "SELECT seq FROM audit_head");
  const AnchorRound idle = round();
  EXPECT_EQ(idle.recorded, 0);
  EXPECT_TRUE(idle.mismatched.empty());
  EXPECT_EQ(Count("control", "SELECT seq FROM audit_head"), control_head);
  EXPECT_EQ(Count("fr-1", "SELECT seq FROM audit_head"), fr_head);

  // A shard that does not answer: the round says so and anchors the others (nothing moved
  // there); the control log's verification goes on without that shard's anchor, and says so.
  ASSERT_TRUE(clusters_->region("de-1").Stop().ok());
  const AnchorRound partial = sharing_->audit_core().RecordAnchors(actor);
  EXPECT_EQ(partial.failed.size(), 2u) << absl::StrJoin(partial.failed, "; ");
  EXPECT_THAT(partial.failed, Contains(HasSubstr("control -> de-1")));
  EXPECT_THAT(partial.failed, Contains(HasSubstr("de-1 -> control")));
  EXPECT_EQ(partial.unchanged, 4);
  auto without_de = Verify("control");
  ASSERT_TRUE(clusters_->region("de-1").StartAgain().ok());
  ASSERT_TRUE(without_de.ok()) << without_de.status();
  EXPECT_TRUE(without_de->ok()) << without_de->detail();
  EXPECT_THAT(without_de->recorded_anchor_unavailable(), HasSubstr("log de-1"));

  // VerifyChain checks fr-1 against its anchor in the control log without being given one, and
  // the control log against the highest of its anchors in the shards.
  auto verified = Verify("fr-1");
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok()) << verified->detail();
  EXPECT_EQ(verified->recorded_anchor_seq(), static_cast<uint64_t>(fr_head));
  EXPECT_EQ(verified->recorded_anchor_log(), "control");
  EXPECT_EQ(verified->recorded_anchor_unavailable(), "");
  auto control = Verify("control");
  ASSERT_TRUE(control.ok()) << control.status();
  EXPECT_TRUE(control->ok()) << control->detail();
  EXPECT_GE(control->recorded_anchor_seq(), static_cast<uint64_t>(of_control->seq));
  EXPECT_THAT(control->recorded_anchor_log(), AnyOf("fr-1", "de-1", "eu-1"));
  // Every shard's anchor of the control log is checked, not only reported: fr-1's rewritten to
  // another hash (in fr-1's log, which the control log's verification does not walk), the
  // control log is reported against it.
  {
    const std::string anchor_seq = Text(
        "fr-1", "SELECT max(seq) FROM audit_log WHERE object_type = 'audit_anchor' AND "
                "object_id = 'control' AND decision = 'permit'");
    Exec("fr-1", "CREATE TABLE anchor_kept AS SELECT * FROM audit_log WHERE seq = $1::bigint",
         anchor_seq);
    absl::Cleanup put_back = [anchor_seq] {
      Exec("fr-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
      Exec("fr-1", "UPDATE audit_log a SET reason = k.reason FROM anchor_kept k WHERE a.seq = k.seq");
      Exec("fr-1", "DROP TABLE anchor_kept");
      Exec("fr-1", "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update");
    };
    Exec("fr-1", "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update");
    Exec("fr-1", absl::StrCat("UPDATE audit_log SET reason = 'ANCHOR: seq=", of_control->seq,
                              " hash=", std::string(64, '0'), "' WHERE seq = $1::bigint"),
         anchor_seq);
    auto against_fr = Verify("control");
    ASSERT_TRUE(against_fr.ok()) << against_fr.status();
    EXPECT_FALSE(against_fr->ok());
    EXPECT_EQ(against_fr->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
    EXPECT_EQ(against_fr->first_bad_seq(), static_cast<uint64_t>(of_control->seq));
    EXPECT_THAT(against_fr->detail(), HasSubstr("recorded in log fr-1"));
  }
  auto control_again = Verify("control");
  ASSERT_TRUE(control_again.ok()) << control_again.status();
  EXPECT_TRUE(control_again->ok()) << control_again->detail();
  // A range that starts past the entry after the anchor's would trust the entries between
  // unchecked: no recorded anchor is applied to it, nor to one ending before the anchor's entry.
  ASSERT_TRUE(Verify("fr-1").ok());  // one more entry: fr_head + 2 exists
  auto later = Verify("fr-1", nullptr, static_cast<uint64_t>(fr_head) + 2, 0);
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_TRUE(later->ok()) << later->detail();
  EXPECT_EQ(later->recorded_anchor_seq(), 0u);
  auto earlier = Verify("fr-1", nullptr, 1, static_cast<uint64_t>(fr_head) - 1);
  ASSERT_TRUE(earlier.ok()) << earlier.status();
  EXPECT_EQ(earlier->recorded_anchor_seq(), 0u);
  auto from_next = Verify("fr-1", nullptr, static_cast<uint64_t>(fr_head) + 1, 0);
  ASSERT_TRUE(from_next.ok()) << from_next.status();
  EXPECT_EQ(from_next->recorded_anchor_seq(), static_cast<uint64_t>(fr_head));

  // fr-1's log cut short three entries before the anchor's, its head moved back.
  ASSERT_GT(fr_head, 5);
  const int64_t cut = fr_head - 3;
  // Put back whatever happens below.
  absl::Cleanup restore = CutLogShort("fr-1", cut);
  auto cut_short = Verify("fr-1");
  ASSERT_TRUE(cut_short.ok()) << cut_short.status();
  EXPECT_FALSE(cut_short->ok());
  EXPECT_EQ(cut_short->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
  EXPECT_EQ(cut_short->first_bad_seq(), static_cast<uint64_t>(fr_head));
  EXPECT_THAT(cut_short->detail(), HasSubstr("cut short"));
  EXPECT_THAT(cut_short->detail(), HasSubstr("recorded in log control"));
  // The next round does not anchor the log as it now is: it records the refusal in the control
  // log, and the anchor the log no longer matches stays the latest.
  const AnchorRound refused = round();
  EXPECT_THAT(refused.mismatched, Contains("fr-1"));
  EXPECT_EQ(Count("control", "SELECT count(*) FROM audit_log WHERE object_type = 'audit_anchor' "
                             "AND object_id = 'fr-1' AND decision = 'deny' AND reason LIKE "
                             "'ANCHOR_MISMATCH: entry %cut short%'"),
            1);
  // Recorded once for what it found, not again at each round while it stays so.
  EXPECT_THAT(round().mismatched, Contains("fr-1"));
  EXPECT_EQ(Count("control", "SELECT count(*) FROM audit_log WHERE object_type = 'audit_anchor' "
                             "AND object_id = 'fr-1' AND decision = 'deny'"),
            1);
  auto still = Verify("fr-1");
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_EQ(still->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
  EXPECT_EQ(still->first_bad_seq(), static_cast<uint64_t>(fr_head));

  // Ops who know why (a restore from an older backup, say) anchor the log anew from its head:
  // ops only, with a reason, kept in the anchor entry.
  auto rebase = [](const TestCert& as, const std::string& log, const std::string& reason)
      -> absl::StatusOr<v1::RebaseAnchorResponse> {
    v1::RebaseAnchorRequest request;
    if (log == "control") {
      request.mutable_log()->set_control(true);
    } else {
      request.mutable_log()->set_region_id(log);
    }
    request.set_reason(reason);
    request.set_request_id("rebase-1");
    v1::RebaseAnchorResponse response;
    grpc::ClientContext context;
    grpc::Status status = AuditStub(as)->RebaseAnchor(&context, request, &response);
    if (!status.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                          status.error_message());
    }
    return response;
  };
  const std::string why = "INC-42: fr-1 restored from an older backup";
  EXPECT_EQ(rebase(pki_->practitioner(), "fr-1", why).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(rebase(pki_->ops(), "fr-1", "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rebase(pki_->ops(), "fr-1", std::string(kMaxRebaseReasonBytes + 1, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto rebased = rebase(pki_->ops(), "fr-1", why);
  ASSERT_TRUE(rebased.ok()) << rebased.status();
  EXPECT_THAT(rebased->recorded_in(), ElementsAre("control"));
  EXPECT_TRUE(rebased->unavailable().empty());
  EXPECT_EQ(rebased->anchor_seq(),
            static_cast<uint64_t>(Count("fr-1", "SELECT seq FROM audit_head")));
  EXPECT_EQ(latest_anchor("control", "fr-1"),
            absl::StrCat("ANCHOR: seq=", rebased->anchor_seq(),
                         " hash=", audit::ToHex(rebased->anchor_hash()), " REBASED: ", why));
  EXPECT_EQ(Count("control", "SELECT count(*) FROM audit_log WHERE object_type = 'audit_anchor' "
                             "AND object_id = 'fr-1' AND actor = $1 AND request_id = 'rebase-1'",
                  pki_->SpiffeId("/ops/alice")),
            1);
  auto after_rebase = Verify("fr-1");
  ASSERT_TRUE(after_rebase.ok()) << after_rebase.status();
  EXPECT_TRUE(after_rebase->ok()) << after_rebase->detail();
  EXPECT_EQ(after_rebase->recorded_anchor_seq(), rebased->anchor_seq());
  // Anchored on from there by the rounds (the verification moved it).
  EXPECT_TRUE(round().mismatched.empty());
  std::optional<ChainAnchor> after_round = ParseAnchorReason(latest_anchor("control", "fr-1"));
  ASSERT_TRUE(after_round.has_value());
  EXPECT_GT(static_cast<uint64_t>(after_round->seq), rebased->anchor_seq());
  // The control log's anchor is rebased in every shard.
  auto control_rebased = rebase(pki_->ops(), "control", why);
  ASSERT_TRUE(control_rebased.ok()) << control_rebased.status();
  EXPECT_EQ(control_rebased->recorded_in_size(), 3);

  // The cut tail put back: the entry of the new anchor is now another entry (its hash differs),
  // as for a log rewritten after its anchor, and the log is reported again.
  std::move(restore).Invoke();
  auto rewritten = Verify("fr-1");
  ASSERT_TRUE(rewritten.ok()) << rewritten.status();
  EXPECT_FALSE(rewritten->ok());
  EXPECT_EQ(rewritten->fault(), v1::CHAIN_FAULT_ANCHOR_MISMATCH);
  EXPECT_EQ(rewritten->first_bad_seq(), static_cast<uint64_t>(after_round->seq));
  EXPECT_THAT(rewritten->detail(), HasSubstr("does not have the anchor's hash"));
  auto rebased_back = rebase(pki_->ops(), "fr-1", "INC-42: the backup's tail put back");
  ASSERT_TRUE(rebased_back.ok()) << rebased_back.status();
  auto restored = Verify("fr-1");
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_TRUE(restored->ok()) << restored->detail();
  EXPECT_EQ(restored->recorded_anchor_seq(), rebased_back->anchor_seq());
  const AnchorRound again = round();
  EXPECT_TRUE(again.mismatched.empty()) << absl::StrJoin(again.mismatched, ", ");
  std::optional<ChainAnchor> moved_on = ParseAnchorReason(latest_anchor("control", "fr-1"));
  ASSERT_TRUE(moved_on.has_value());
  EXPECT_GT(static_cast<uint64_t>(moved_on->seq), rebased_back->anchor_seq());
  auto anchored_again = Verify("fr-1");
  ASSERT_TRUE(anchored_again.ok()) << anchored_again.status();
  EXPECT_TRUE(anchored_again->ok()) << anchored_again->detail();
  EXPECT_GT(anchored_again->recorded_anchor_seq(), rebased_back->anchor_seq());
}

}  // namespace
}  // namespace medgate::sharing
