// mTLS over real TLS on loopback: the accept/reject matrix, Principals, rotation, health.
#include <atomic>
#include <future>
#include <optional>
#include <filesystem>
#include <thread>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/log.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "libs/identity/authz.h"
#include "libs/identity/credentials.h"
#include "libs/server/service_server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "tests/support/health_check.h"
#include "tests/support/poll.h"
#include "tests/support/test_pki.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;
using test_support::TestCert;
using test_support::TestPki;

// A handler that records who reached it: nothing may reach it with a refused certificate.
std::string SerialOfPem(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (cert == nullptr) return "";
  BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(cert), nullptr);
  char* hex = BN_bn2hex(bn);
  std::string serial(hex);
  OPENSSL_free(hex);
  BN_free(bn);
  X509_free(cert);
  return serial;
}

class RecordingAuditService final : public v1::Audit::Service {
 public:
  explicit RecordingAuditService(const std::string& trust_domain)
      : policy_(trust_domain, {{"VerifyChain", {PrincipalKind::kOps, PrincipalKind::kApp,
                                               PrincipalKind::kPractitioner,
                                               PrincipalKind::kDevice, PrincipalKind::kService}}}) {}

  grpc::Status VerifyChain(grpc::ServerContext* context, const v1::VerifyChainRequest*,
                           v1::VerifyChainResponse*) override {
    calls_.fetch_add(1);
    {
      // While held, a call stays in its handler (on its thread) until released.
      absl::MutexLock lock(&mu_);
      ++running_;
      max_running_ = std::max(max_running_, running_);
      mu_.Await(absl::Condition(
          +[](bool* held) { return !*held; }, &held_));
      --running_;
    }
    absl::StatusOr<Principal> principal = policy_.Authorize(*context, "VerifyChain");
    absl::MutexLock lock(&mu_);
    if (!principal.ok()) {
      return grpc::Status(static_cast<grpc::StatusCode>(principal.status().code()),
                          std::string(principal.status().message()));
    }
    last_ = *principal;
    return grpc::Status::OK;
  }

  // Not in the policy: default deny.
  grpc::Status QueryAudit(grpc::ServerContext* context, const v1::QueryAuditRequest*,
                          v1::QueryAuditResponse*) override {
    calls_.fetch_add(1);
    absl::StatusOr<Principal> principal = policy_.Authorize(*context, "QueryAudit");
    return grpc::Status(static_cast<grpc::StatusCode>(principal.status().code()),
                        std::string(principal.status().message()));
  }

  int calls() const { return calls_.load(); }
  void Hold(bool held) {
    absl::MutexLock lock(&mu_);
    held_ = held;
  }
  int running() {
    absl::MutexLock lock(&mu_);
    return running_;
  }
  int max_running() {
    absl::MutexLock lock(&mu_);
    return max_running_;
  }
  Principal last() {
    absl::MutexLock lock(&mu_);
    return last_;
  }

 private:
  RpcPolicy policy_;
  std::atomic<int> calls_{0};
  absl::Mutex mu_;
  Principal last_;
  bool held_ ABSL_GUARDED_BY(mu_) = false;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int max_running_ ABSL_GUARDED_BY(mu_) = 0;
};

// Counts the bandwidth-delay-product pings gRPC starts in this process (both ends of a loopback
// connection are here), from gRPC's own trace of them.
class BdpPingCounter {
 public:
  BdpPingCounter() {
    pings_.store(0);
    gpr_set_log_function(&Log);
    gpr_set_log_verbosity(GPR_LOG_SEVERITY_INFO);
    grpc_tracer_set_enabled("bdp_estimator", 1);
  }
  ~BdpPingCounter() {
    grpc_tracer_set_enabled("bdp_estimator", 0);
    gpr_set_log_verbosity(GPR_LOG_SEVERITY_ERROR);
    gpr_set_log_function(nullptr);  // back to gRPC's own
  }
  int pings() const { return pings_.load(); }

 private:
  // "bdp[<peer>]:start acc=... est=...": a probe put on the wire.
  static void Log(gpr_log_func_args* args) {
    if (absl::StrContains(args->message, "bdp[") && absl::StrContains(args->message, "]:start ")) {
      pings_.fetch_add(1);
    }
  }
  static std::atomic<int> pings_;
};
std::atomic<int> BdpPingCounter::pings_{0};

class MtlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(std::filesystem::temp_directory_path() /
                           ("medgate-mtls-" + std::to_string(getpid())));
    std::filesystem::create_directories(*dir_);
    absl::StatusOr<std::unique_ptr<TestPki>> pki = TestPki::Create(*dir_);
    ASSERT_TRUE(pki.ok()) << pki.status();
    pki_ = pki->release();
  }
  static void TearDownTestSuite() {
    delete pki_;
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  void SetUp() override {
    // The server's certificate files are copies, so the rotation test can replace them.
    server_cert_ = *dir_ + "/live-server.crt";
    server_key_ = *dir_ + "/live-server.key";
    std::filesystem::copy_file(pki_->server().cert_path, server_cert_,
                               std::filesystem::copy_options::overwrite_existing);
    std::filesystem::copy_file(pki_->server().key_path, server_key_,
                               std::filesystem::copy_options::overwrite_existing);
    config_.trust_domain = pki_->trust_domain();
    config_.ca_path = pki_->ca_path();
    config_.limits.drain_seconds = 1;
    ServiceEndpoint endpoint;
    endpoint.listen = "127.0.0.1:0";
    endpoint.tls = TlsConfig{server_cert_, server_key_, pki_->ca_path(), 1};
    endpoint.identity = pki_->server_identity();
    config_.services["test"] = endpoint;
    service_ = std::make_unique<RecordingAuditService>(pki_->trust_domain());
    server_ = std::make_unique<ServiceServer>(config_, "test");
    server_->AddService(service_.get());
    server_->SetHealthProbe([this] { return healthy_.load() ? absl::OkStatus()
                                                            : absl::UnavailableError("db down"); },
                            absl::Milliseconds(50));
    ASSERT_TRUE(server_->Start().ok());
    address_ = "127.0.0.1:" + std::to_string(server_->port());
  }

  void TearDown() override { server_->Shutdown(); }

  // A practitioner of acme, `name`, with a certificate of its own.
  TestCert IssuePractitioner(const std::string& name) {
    devpki::LeafOptions options;
    options.common_name = name;
    options.uri_sans = {pki_->SpiffeId(absl::StrCat("/tenant/acme/practitioner/", name))};
    absl::StatusOr<TestCert> cert = pki_->Issue(name, options);
    EXPECT_TRUE(cert.ok()) << cert.status();
    return cert.ok() ? *cert : TestCert{};
  }

  // The test server's configuration, with `name`, a new empty directory, as its crl_dir.
  MedgateConfig WithEmptyCrlDir(const std::string& name) {
    const std::string crl_dir = *dir_ + "/" + name;
    std::filesystem::remove_all(crl_dir);
    std::filesystem::create_directories(crl_dir);
    MedgateConfig with_crls = config_;
    with_crls.services["test"].tls.crl_dir = crl_dir;
    return with_crls;
  }

  // The test service on a server of its own that reads CRLs from the empty directory `name`
  // (WithEmptyCrlDir), started; null (and a test failure) if it does not start.
  struct CrlServer {
    CrlServer(MedgateConfig with_crls, const std::string& trust_domain)
        : config(std::move(with_crls)),
          crl_dir(config.services.at("test").tls.crl_dir),
          service(trust_domain),
          server(config, "test") {
      server.AddService(&service);
    }
    const MedgateConfig config;
    const std::string crl_dir;
    RecordingAuditService service;
    ServiceServer server;
  };
  std::unique_ptr<CrlServer> StartWithCrls(const std::string& name) {
    auto started = std::make_unique<CrlServer>(WithEmptyCrlDir(name), pki_->trust_domain());
    if (absl::Status s = started->server.Start(); !s.ok()) {
      ADD_FAILURE() << s;
      return nullptr;
    }
    return started;
  }

  // A channel to the test server as `cert`, or to the server on `port` if not 0, whose
  // certificate files are read again every `refresh_seconds`.
  std::shared_ptr<grpc::Channel> ChannelAs(const TestCert& cert, int port = 0,
                                           int refresh_seconds = 1) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(
        port == 0 ? address_ : absl::StrCat("127.0.0.1:", port),
        TlsConfig{cert.cert_path, cert.key_path, pki_->ca_path(), refresh_seconds},
        pki_->server_identity());
    EXPECT_TRUE(channel.ok()) << channel.status();
    return *channel;
  }

  grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel,
                    std::string* server_cert_pem = nullptr) {
    auto stub = v1::Audit::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::VerifyChainRequest request;
    v1::VerifyChainResponse response;
    grpc::Status status = stub->VerifyChain(&context, request, &response);
    if (server_cert_pem != nullptr && context.auth_context()) {
      auto pems = context.auth_context()->FindPropertyValues("x509_pem_cert");
      if (!pems.empty()) server_cert_pem->assign(pems[0].data(), pems[0].size());
    }
    return status;
  }

  static std::string* dir_;
  static TestPki* pki_;
  MedgateConfig config_;
  std::string server_cert_;
  std::string server_key_;
  std::unique_ptr<RecordingAuditService> service_;
  std::unique_ptr<ServiceServer> server_;
  std::string address_;
  std::atomic<bool> healthy_{true};
};

std::string* MtlsTest::dir_ = nullptr;
TestPki* MtlsTest::pki_ = nullptr;

TEST_F(MtlsTest, GoodCertificatesYieldTheirPrincipal) {
  struct Case {
    const TestCert* cert;
    PrincipalKind kind;
    std::string tenant;
    std::string name;
  };
  for (const Case& c : {Case{&pki_->app(), PrincipalKind::kApp, "acme", "backend"},
                        Case{&pki_->practitioner(), PrincipalKind::kPractitioner, "acme", "p-1"},
                        Case{&pki_->device(), PrincipalKind::kDevice, "acme", "dev-1"},
                        Case{&pki_->globex_app(), PrincipalKind::kApp, "globex", "backend"},
                        Case{&pki_->service(), PrincipalKind::kService, "", "routing"},
                        Case{&pki_->ops(), PrincipalKind::kOps, "", "alice"}}) {
    grpc::Status status = Call(ChannelAs(*c.cert));
    ASSERT_TRUE(status.ok()) << status.error_message();
    Principal p = service_->last();
    EXPECT_EQ(p.kind, c.kind);
    EXPECT_EQ(p.tenant, c.tenant);
    EXPECT_EQ(p.name, c.name);
    EXPECT_EQ(p.trust_domain, pki_->trust_domain());
  }
  EXPECT_EQ(service_->calls(), 6);
}

TEST_F(MtlsTest, IdentityRefusalsAreUnauthenticatedBeforeAnyHandler) {
  struct Case {
    const TestCert* cert;
    const char* why;
  };
  for (const Case& c : {Case{&pki_->two_uris(), "more than one URI SAN"},
                        Case{&pki_->no_san(), "no URI SAN"},
                        Case{&pki_->other_trust_domain(), "another trust domain"},
                        Case{&pki_->unknown_form(), "unknown identity form"}}) {
    grpc::Status status = Call(ChannelAs(*c.cert));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << c.why;
    EXPECT_THAT(status.error_message(), HasSubstr(c.why));
  }
  EXPECT_EQ(service_->calls(), 0);
}

TEST_F(MtlsTest, HandshakeRefusalsNeverReachAHandler) {
  // Rogue CA and expired certificates fail verification in the TLS handshake.
  for (const TestCert* cert : {&pki_->rogue_signed(), &pki_->expired()}) {
    grpc::Status status = Call(ChannelAs(*cert));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << cert->cert_path;
  }
  // No client certificate at all.
  grpc::SslCredentialsOptions no_cert;
  no_cert.pem_root_certs = pki_->ca_pem();
  EXPECT_EQ(Call(grpc::CreateChannel(address_, grpc::SslCredentials(no_cert))).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Plaintext is not served at all.
  EXPECT_EQ(Call(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials())).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(service_->calls(), 0);
}

// A client names the server it means to reach by identity: a server whose certificate the CA signed
// for another identity is refused in the handshake, however well its host names match.
TEST_F(MtlsTest, ClientsRefuseAServerCertificateForAnotherIdentity) {
  const TestCert& app = pki_->app();
  const TlsConfig tls{app.cert_path, app.key_path, pki_->ca_path(), 1};
  ASSERT_TRUE(Call(ChannelAs(app)).ok());
  // The same server, but the client wanted routing.
  auto to_routing = MakeChannel(address_, tls, pki_->SpiffeId("/service/routing"));
  ASSERT_TRUE(to_routing.ok()) << to_routing.status();
  grpc::Status refused = Call(*to_routing);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(),
              HasSubstr(absl::StrCat("the server's certificate is for ", pki_->server_identity(),
                                     ", not ", pki_->SpiffeId("/service/routing"))));
  // An identity that is not a SPIFFE id at all is the caller's mistake, said before dialing.
  auto not_spiffe = MakeChannel(address_, tls, "test-server");
  ASSERT_FALSE(not_spiffe.ok());
  EXPECT_EQ(not_spiffe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(not_spiffe.status().message()), HasSubstr("not a medgate SPIFFE id"));
  EXPECT_EQ(MakeChannel(address_, tls, "spiffe://").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeChannel(address_, tls, "spiffe://medgate.test/service/a b").status().code(),
            absl::StatusCode::kInvalidArgument);
  const int served = service_->calls();

  // The server's files replaced by a certificate the CA signed for a device, with the server's
  // host names: what a stolen device key and a DNS answer would let an attacker present.
  devpki::LeafOptions impostor_options;
  impostor_options.common_name = "impostor";
  impostor_options.uri_sans = {pki_->SpiffeId("/tenant/acme/device/dev-1")};
  impostor_options.dns_sans = {"localhost"};
  impostor_options.ip_sans = {"127.0.0.1"};
  absl::StatusOr<TestCert> impostor = pki_->Issue("impostor", impostor_options);
  ASSERT_TRUE(impostor.ok()) << impostor.status();
  std::filesystem::copy_file(impostor->key_path, server_key_ + ".new");
  std::filesystem::copy_file(impostor->cert_path, server_cert_ + ".new");
  std::filesystem::rename(server_key_ + ".new", server_key_);
  std::filesystem::rename(server_cert_ + ".new", server_cert_);
  // A client that checks host names only accepts it once the server has reloaded its files...
  // (gRPC's credentials take over the options they are built from: new options for each.)
  auto hostname_only = [&] {
    grpc::experimental::TlsChannelCredentialsOptions options;
    options.set_certificate_provider(
        std::make_shared<grpc::experimental::StaticDataCertificateProvider>(
            pki_->ca_pem(), std::vector<grpc::experimental::IdentityKeyCertPair>{
                                {app.key_pem, app.cert_pem}}));
    options.watch_root_certs();
    options.watch_identity_key_cert_pairs();
    options.set_certificate_verifier(
        std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
    return grpc::experimental::TlsCredentials(options);
  };
  std::string seen;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline && seen != impostor->serial) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    std::string pem;
    if (Call(grpc::CreateCustomChannel(address_, hostname_only(), args), &pem).ok()) {
      seen = SerialOfPem(pem);
    }
    if (seen != impostor->serial) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_EQ(seen, impostor->serial) << "the server should have reloaded the impostor certificate";
  // ...medgate's clients, which expect the server's identity, do not.
  const int served_to_hostname_only = service_->calls() - served;
  refused = Call(ChannelAs(app));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(),
              HasSubstr(absl::StrCat("is for ", pki_->SpiffeId("/tenant/acme/device/dev-1"))));
  EXPECT_EQ(service_->calls() - served, served_to_hostname_only) << "no call of ours reached it";
}

// The identity is what is checked, not host names: a server certificate with nothing but its URI
// SAN serves clients that expect it (dialing 127.0.0.1, which it does not list). A certificate
// with no URI SAN or two is refused.
TEST_F(MtlsTest, ClientsCheckTheServersIdentityNotItsHostNames) {
  const TestCert& app = pki_->app();
  const TlsConfig tls{app.cert_path, app.key_path, pki_->ca_path(), 1};
  devpki::LeafOptions uri_only;
  uri_only.common_name = "uri-only";
  uri_only.uri_sans = {pki_->SpiffeId("/service/uri-only")};
  absl::StatusOr<TestCert> cert = pki_->Issue("uri-only-server", uri_only);
  ASSERT_TRUE(cert.ok()) << cert.status();
  MedgateConfig config = config_;
  ServiceEndpoint& endpoint = config.services["uri-only"];
  endpoint.listen = "127.0.0.1:0";
  endpoint.tls = TlsConfig{cert->cert_path, cert->key_path, pki_->ca_path(), 1};
  endpoint.identity = pki_->SpiffeId("/service/uri-only");
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config, "uri-only");
  server.AddService(&service);
  ASSERT_TRUE(server.Start().ok());
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", server.port()), tls, endpoint.identity);
  ASSERT_TRUE(channel.ok()) << channel.status();
  EXPECT_TRUE(Call(*channel).ok());
  EXPECT_EQ(service.calls(), 1);
  server.Shutdown();

  // Servers that are not medgate's (no identity check at their start) with certificates the CA
  // signed: no URI SAN, and two.
  struct Case {
    const TestCert* cert;
    std::string says;
  };
  for (const Case& c : {Case{&pki_->no_san(), "has 0 URI SANs"}, Case{&pki_->two_uris(), "has 2 URI SANs"}}) {
    SCOPED_TRACE(c.says);
    grpc::SslServerCredentialsOptions options(
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    options.pem_root_certs = pki_->ca_pem();
    options.pem_key_cert_pairs.push_back({c.cert->key_pem, c.cert->cert_pem});
    RecordingAuditService other(pki_->trust_domain());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(options), &port);
    builder.RegisterService(&other);
    std::unique_ptr<grpc::Server> raw = builder.BuildAndStart();
    ASSERT_NE(raw, nullptr);
    auto to_raw = MakeChannel(absl::StrCat("127.0.0.1:", port), tls, pki_->server_identity());
    ASSERT_TRUE(to_raw.ok()) << to_raw.status();
    grpc::Status refused = Call(*to_raw);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(refused.error_message(), HasSubstr(c.says));
    EXPECT_EQ(other.calls(), 0);
    raw->Shutdown(std::chrono::system_clock::now());
  }
}

// A server started with a certificate that does not carry the identity its clients will expect
// would fail every client's handshake: it does not start, and says why.
TEST_F(MtlsTest, AServerDoesNotStartWithACertificateForAnotherIdentity) {
  MedgateConfig config = config_;
  config.services["test"].identity = pki_->SpiffeId("/service/routing");
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config, "test");
  server.AddService(&service);
  absl::Status started = server.Start();
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(started.message()), HasSubstr(pki_->server_identity()));
  EXPECT_THAT(std::string(started.message()), HasSubstr(pki_->SpiffeId("/service/routing")));

  // A certificate file that is missing, or carries no identity: said the same way.
  config.services["test"].identity = pki_->server_identity();
  config.services["test"].tls.cert_path = *dir_ + "/missing.crt";
  started = CheckServerIdentity(config.services["test"], pki_->trust_domain());
  EXPECT_EQ(started.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(started.message()), HasSubstr("cannot be read"));
  config.services["test"].tls.cert_path = pki_->no_san().cert_path;
  started = CheckServerIdentity(config.services["test"], pki_->trust_domain());
  EXPECT_EQ(started.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(started.message()), HasSubstr("does not carry a medgate identity"));
}

// What a raw OpenSSL client got from the server: the negotiated version and suite, or why not.
struct Handshake {
  bool ok = false;
  std::string version;
  std::string cipher;
  std::string error;
};

// A TLS handshake with a client that offers what it is told, down to TLS 1.0 and CBC suites
// (security level 0), so that a refusal comes from the server, not from this client.
Handshake TryHandshake(int port, const TestCert& cert, const std::string& ca_path, int max_version,
                       const char* tls12_ciphers) {
  Handshake out;
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_security_level(ctx, 0);
  SSL_CTX_set_min_proto_version(ctx, TLS1_VERSION);
  SSL_CTX_set_max_proto_version(ctx, max_version);
  if (tls12_ciphers != nullptr &&
      SSL_CTX_set_cipher_list(ctx, absl::StrCat(tls12_ciphers, ":@SECLEVEL=0").c_str()) != 1) {
    out.error = "client: cipher list refused";
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, cert.cert_path.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, cert.key_path.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_load_verify_locations(ctx, ca_path.c_str(), nullptr) != 1) {
    out.error = "client: cannot load the test certificates";
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  static const unsigned char kAlpn[] = {2, 'h', '2'};
  SSL_CTX_set_alpn_protos(ctx, kAlpn, sizeof(kAlpn));
  BIO* bio = BIO_new_connect(absl::StrCat("127.0.0.1:", port).c_str());
  if (out.error.empty() && BIO_do_connect(bio) != 1) out.error = "client: cannot connect";
  SSL* ssl = SSL_new(ctx);
  SSL_set_bio(ssl, bio, bio);  // owned by ssl from here
  if (out.error.empty()) {
    int fd = -1;
    BIO_get_fd(bio, &fd);
    timeval timeout{10, 0};  // a server that never answered would fail the test, not hang it
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    ERR_clear_error();
    if (SSL_connect(ssl) == 1) {
      out.ok = true;
      out.version = SSL_get_version(ssl);
      out.cipher = SSL_get_cipher_name(ssl);
    } else {
      const unsigned long err = ERR_get_error();
      const char* reason = ERR_reason_error_string(err);
      out.error = reason != nullptr ? reason : absl::StrCat("SSL error ", err);
    }
  }
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return out;
}

// DOMAIN's API8: no plaintext port (HandshakeRefusalsNeverReachAHandler), TLS 1.2+ with AEAD
// cipher suites only, checked on the wire with a client that offers less.
TEST_F(MtlsTest, OnlyTls12OrLaterWithAeadSuitesIsAccepted) {
  const int port = server_->port();
  const TestCert& me = pki_->practitioner();
  // Positive controls: this client can complete a handshake when it offers what the server allows.
  Handshake tls13 = TryHandshake(port, me, pki_->ca_path(), TLS1_3_VERSION, nullptr);
  ASSERT_TRUE(tls13.ok) << tls13.error;
  EXPECT_EQ(tls13.version, "TLSv1.3");
  Handshake gcm = TryHandshake(port, me, pki_->ca_path(), TLS1_2_VERSION,
                               "ECDHE-ECDSA-AES128-GCM-SHA256");
  ASSERT_TRUE(gcm.ok) << gcm.error;
  EXPECT_EQ(gcm.version, "TLSv1.2");
  EXPECT_EQ(gcm.cipher, "ECDHE-ECDSA-AES128-GCM-SHA256");
  // TLS 1.2 with everything but AEAD: CBC with SHA-1 or SHA-2 MACs, and no encryption at all.
  Handshake cbc = TryHandshake(port, me, pki_->ca_path(), TLS1_2_VERSION,
                               "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:"
                               "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:"
                               "ECDHE-ECDSA-NULL-SHA");
  // The server's refusal: it ends the connection after the ClientHello (or sends an alert). A
  // client that could not offer these would fail before sending, with another reason.
  const auto refused_by_server =
      ::testing::AnyOf(HasSubstr("unexpected eof"), HasSubstr("alert"));
  EXPECT_FALSE(cbc.ok) << cbc.cipher;
  EXPECT_THAT(cbc.error, refused_by_server);
  // TLS 1.1 and 1.0, with every suite this client has.
  for (int version : {TLS1_1_VERSION, TLS1_VERSION}) {
    Handshake old = TryHandshake(port, me, pki_->ca_path(), version, "ALL:COMPLEMENTOFALL");
    EXPECT_FALSE(old.ok) << old.version;
    EXPECT_THAT(old.error, refused_by_server) << version;
  }
  EXPECT_EQ(service_->calls(), 0);
}

TEST(CipherSuitesTest, OnlyAeadSuitesMayBeConfigured) {
  EXPECT_TRUE(CheckCipherSuites("TLS_AES_128_GCM_SHA256:ECDHE-ECDSA-AES256-GCM-SHA384").ok());
  EXPECT_TRUE(CheckCipherSuites("ECDHE-RSA-CHACHA20-POLY1305").ok());
  EXPECT_EQ(CheckCipherSuites("TLS_AES_128_GCM_SHA256").code(),  // no TLS 1.2 suite at all
            absl::StatusCode::kFailedPrecondition);
  absl::Status cbc = CheckCipherSuites("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA");
  EXPECT_EQ(cbc.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(cbc.message()), HasSubstr("'ECDHE-ECDSA-AES128-SHA'"));
  EXPECT_EQ(CheckCipherSuites("").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CheckCipherSuites("AES128-GCM-SHA256").code(),  // AEAD without forward secrecy
            absl::StatusCode::kFailedPrecondition);
}

// The server runs at most limits.max_threads threads for all its connections together: calls
// beyond them are refused with RESOURCE_EXHAUSTED instead of queueing or growing threads, and the
// server serves again once its handlers return.
TEST_F(MtlsTest, HandlerThreadsAreBoundedAcrossConnections) {
  MedgateConfig limited = config_;
  limited.limits.max_threads = 6;
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(limited, "test");
  server.AddService(&service);
  ASSERT_TRUE(server.Start().ok());
  const std::string address = absl::StrCat("127.0.0.1:", server.port());
  service.Hold(true);
  constexpr int kCalls = 24;
  std::vector<grpc::Status> results(kCalls);
  std::atomic<int> answered{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < kCalls; ++i) {
    callers.emplace_back([&, i] {
      // Each call on its own connection.
      auto channel = MakeChannel(address, TlsConfig{pki_->ops().cert_path, pki_->ops().key_path,
                                                    pki_->ca_path(), 1},
                                   pki_->server_identity());
      auto stub = v1::Audit::NewStub(*channel);
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      v1::VerifyChainRequest request;
      v1::VerifyChainResponse response;
      results[i] = stub->VerifyChain(&context, request, &response);
      answered.fetch_add(1);
    });
  }
  // Every call is either held in a handler or already answered (refused): none waits for a thread.
  EXPECT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(20), [&] {
    return service.running() + answered.load() == kCalls;
  })) << service.running() << " held, " << answered.load() << " answered";
  const int held = service.running();
  service.Hold(false);
  for (std::thread& t : callers) t.join();
  int ok = 0;
  int exhausted = 0;
  for (const grpc::Status& s : results) {
    ok += s.ok();
    exhausted += s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
  }
  EXPECT_GE(held, 1);
  EXPECT_LT(service.max_running(), limited.limits.max_threads);
  EXPECT_EQ(ok, service.calls());
  EXPECT_GE(exhausted, 1);
  EXPECT_EQ(ok + exhausted, kCalls);
  // Free threads again: served.
  auto channel = MakeChannel(address, TlsConfig{pki_->ops().cert_path, pki_->ops().key_path,
                                                pki_->ca_path(), 1},
                               pki_->server_identity());
  grpc::ClientContext context;
  v1::VerifyChainRequest request;
  v1::VerifyChainResponse response;
  EXPECT_TRUE(v1::Audit::NewStub(*channel)->VerifyChain(&context, request, &response).ok());
  server.Shutdown();
}

// Expiry is what ends a certificate: a client that caches TLS sessions must not carry one past
// it. Servers issue no session tickets, so each connection of such a client verifies its
// certificate afresh, and one that has expired since the first connection is refused.
TEST_F(MtlsTest, AnExpiredCertificateIsRefusedEvenToAClientThatCachesTlsSessions) {
  devpki::LeafOptions options;
  options.common_name = "short-lived";
  options.uri_sans = {pki_->SpiffeId("/tenant/acme/device/dev-short")};
  options.not_after = absl::Seconds(4);
  absl::StatusOr<TestCert> cert = pki_->Issue("short-lived", options);
  ASSERT_TRUE(cert.ok()) << cert.status();
  const absl::Time expires = absl::Now() + absl::Seconds(4);
  grpc_ssl_session_cache* cache = grpc_ssl_session_cache_create_lru(8);
  auto channel = [&] {
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = pki_->ca_pem();
    tls.pem_private_key = cert->key_pem;
    tls.pem_cert_chain = cert->cert_pem;
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a new connection each time
    args.SetSslTargetNameOverride("localhost");
    grpc_arg session_cache = grpc_ssl_session_cache_create_channel_arg(cache);
    args.SetPointerWithVtable(session_cache.key, session_cache.value.pointer.p,
                              session_cache.value.pointer.vtable);
    return grpc::CreateCustomChannel(address_, grpc::SslCredentials(tls), args);
  };
  grpc::Status first = Call(channel());
  EXPECT_TRUE(first.ok()) << first.error_message();
  // Another connection while it is valid is served (a full handshake: there is no ticket).
  grpc::Status second = Call(channel());
  EXPECT_TRUE(second.ok()) << second.error_message();
  absl::SleepFor(expires - absl::Now() + absl::Seconds(2));
  const int served = service_->calls();
  grpc::Status expired = Call(channel());
  EXPECT_FALSE(expired.ok()) << "an expired certificate was served";
  EXPECT_EQ(service_->calls(), served);
  grpc_ssl_session_cache_destroy(cache);
}

// The handshake verifies a certificate once, and a connection outlives it (up to its maximum
// age): a call on a connection whose certificate has expired since is refused, UNAUTHENTICATED
// saying so, before any handler. (A new connection would be refused in its handshake instead,
// UNAVAILABLE.)
TEST_F(MtlsTest, ACallOnAConnectionWhoseCertificateExpiredSinceIsRefused) {
  devpki::LeafOptions options;
  options.common_name = "expiring";
  options.uri_sans = {pki_->SpiffeId("/tenant/acme/practitioner/p-expiring")};
  options.not_after = absl::Seconds(4);
  absl::StatusOr<TestCert> cert = pki_->Issue("expiring", options);
  ASSERT_TRUE(cert.ok()) << cert.status();
  const absl::Time expires = absl::Now() + absl::Seconds(4);
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config_, "test");
  server.AddService(&service);
  ASSERT_TRUE(server.Start().ok());
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      MakeChannel(absl::StrCat("127.0.0.1:", server.port()),
                  TlsConfig{cert->cert_path, cert->key_path, pki_->ca_path(), 60},
                  pki_->server_identity());
  ASSERT_TRUE(channel.ok()) << channel.status();
  grpc::Status before = Call(*channel);
  ASSERT_TRUE(before.ok()) << before.error_message();
  EXPECT_EQ(service.calls(), 1);
  absl::SleepFor(expires - absl::Now() + absl::Seconds(2));
  ASSERT_EQ((*channel)->GetState(false), GRPC_CHANNEL_READY) << "the connection was not kept";
  grpc::Status after = Call(*channel);
  EXPECT_EQ(after.error_code(), grpc::StatusCode::UNAUTHENTICATED) << after.error_message();
  EXPECT_THAT(after.error_message(), HasSubstr("expired at"));
  EXPECT_EQ(service.calls(), 1);
  server.Shutdown();
}

// A certificate that a CRL of the CA revokes (a practitioner who left, a stolen laptop's) is
// refused in the handshake, before any handler, while every other certificate is served; a CRL
// written while the server runs, by the next name, is enforced from the next connection on.
TEST_F(MtlsTest, ACertificateRevokedByACrlIsRefusedInTheHandshake) {
  const TestCert left = IssuePractitioner("p-left");
  const TestCert stays = IssuePractitioner("p-stays");
  const TestCert later = IssuePractitioner("p-later");
  const std::unique_ptr<CrlServer> crls = StartWithCrls("crl");
  ASSERT_NE(crls, nullptr);
  auto call_as = [&](const TestCert& cert) { return Call(ChannelAs(cert, crls->server.port())); };
  // No CRL yet: every valid certificate is served.
  for (const TestCert* cert : {&left, &stays, &later}) {
    grpc::Status status = call_as(*cert);
    EXPECT_TRUE(status.ok()) << cert->cert_path << ": " << status.error_message();
  }
  EXPECT_EQ(crls->service.calls(), 3);

  absl::StatusOr<std::string> first = pki_->WriteCrl({left.serial}, crls->crl_dir);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(call_as(left).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(call_as(stays).ok());
  EXPECT_TRUE(call_as(later).ok());
  EXPECT_EQ(crls->service.calls(), 5);

  // The next CRL, beside the first, revokes one more. Of two CRLs of a CA, OpenSSL takes the
  // one issued later (to the second, as CRLs give their times): this one is issued a second on.
  absl::SleepFor(absl::Milliseconds(1100));
  absl::StatusOr<std::string> second = pki_->WriteCrl({left.serial, later.serial}, crls->crl_dir);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(*second, *first);
  EXPECT_EQ(call_as(later).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(call_as(left).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(call_as(stays).ok());
  EXPECT_EQ(crls->service.calls(), 6);
  crls->server.Shutdown();

  // A CRL directory that is not there is a configuration error, not a server that revokes nothing.
  MedgateConfig missing = config_;
  missing.services["test"].tls.crl_dir = *dir_ + "/no-such-crl-dir";
  ServiceServer refused(missing, "test");
  RecordingAuditService unused(pki_->trust_domain());
  refused.AddService(&unused);
  absl::Status started = refused.Start();
  EXPECT_EQ(started.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(started.message()), HasSubstr("crl_dir"));
}

// Revocation, like expiry, reaches connections already open: once a CRL revoking a certificate is
// in the directory (the server looks at it every second), a call on a connection it opened
// earlier is refused UNAUTHENTICATED, naming the serial, before any handler; a call of another
// certificate on its own open connection is served.
TEST_F(MtlsTest, ACallOnAConnectionWhoseCertificateWasRevokedSinceIsRefused) {
  const TestCert left = IssuePractitioner("p-left-open");
  const TestCert stays = IssuePractitioner("p-stays-open");
  const std::unique_ptr<CrlServer> crls = StartWithCrls("crl-open");
  ASSERT_NE(crls, nullptr);
  auto channel_of = [&](const TestCert& cert) { return ChannelAs(cert, crls->server.port(), 60); };
  std::shared_ptr<grpc::Channel> left_channel = channel_of(left);
  std::shared_ptr<grpc::Channel> stays_channel = channel_of(stays);
  ASSERT_TRUE(Call(left_channel).ok());
  ASSERT_TRUE(Call(stays_channel).ok());
  EXPECT_EQ(crls->service.calls(), 2);

  ASSERT_TRUE(pki_->WriteCrl({left.serial}, crls->crl_dir).ok());
  absl::SleepFor(absl::Milliseconds(1500));
  ASSERT_EQ(left_channel->GetState(false), GRPC_CHANNEL_READY) << "the connection was not kept";
  grpc::Status refused = Call(left_channel);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr(absl::StrCat("serial ", left.serial)));
  EXPECT_THAT(refused.error_message(), HasSubstr("revoked"));
  EXPECT_EQ(crls->service.calls(), 2);
  grpc::Status served = Call(stays_channel);
  EXPECT_TRUE(served.ok()) << served.error_message();
  EXPECT_EQ(crls->service.calls(), 3);
  EXPECT_EQ(crls->server.peer_certificates()->crls_in_force(), 1u);
  crls->server.Shutdown();
}

// A client that sends its intermediate CA with its certificate is refused on its open connection
// once the CA's CRL revokes that intermediate, though no CRL lists its own certificate.
TEST_F(MtlsTest, ACallOnAConnectionWhoseIntermediateCaWasRevokedSinceIsRefused) {
  devpki::LeafOptions options;
  options.common_name = "p-intermediate";
  options.uri_sans = {pki_->SpiffeId("/tenant/acme/practitioner/p-intermediate")};
  std::string intermediate_serial;
  absl::StatusOr<TestCert> chained =
      pki_->IssueThroughIntermediate("p-intermediate", options, &intermediate_serial);
  ASSERT_TRUE(chained.ok()) << chained.status();
  const TestCert stays = IssuePractitioner("p-stays-direct");
  const std::unique_ptr<CrlServer> crls = StartWithCrls("crl-intermediate");
  ASSERT_NE(crls, nullptr);
  std::shared_ptr<grpc::Channel> chained_channel = ChannelAs(*chained, crls->server.port(), 60);
  std::shared_ptr<grpc::Channel> stays_channel = ChannelAs(stays, crls->server.port(), 60);
  grpc::Status first = Call(chained_channel);
  ASSERT_TRUE(first.ok()) << "the handshake takes the chain: " << first.error_message();
  ASSERT_TRUE(Call(stays_channel).ok());

  ASSERT_TRUE(pki_->WriteCrl({intermediate_serial}, crls->crl_dir).ok());
  absl::SleepFor(absl::Milliseconds(1500));
  ASSERT_EQ(chained_channel->GetState(false), GRPC_CHANNEL_READY) << "the connection was not kept";
  grpc::Status refused = Call(chained_channel);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED) << refused.error_message();
  EXPECT_THAT(refused.error_message(),
              HasSubstr(absl::StrCat("issuing CA (serial ", intermediate_serial)));
  EXPECT_EQ(crls->service.calls(), 2);
  grpc::Status served = Call(stays_channel);
  EXPECT_TRUE(served.ok()) << served.error_message();
  crls->server.Shutdown();
}

// A private key file others may read (or its group write) is refused, by a server and by a client
// alike, before anything is served or dialled; the owner's and the group's reads are allowed.
TEST_F(MtlsTest, APrivateKeyOpenToOthersIsRefused) {
  const TestCert& ops = pki_->ops();
  const std::string key = *dir_ + "/mode-checked.key";
  std::filesystem::copy_file(ops.key_path, key, std::filesystem::copy_options::overwrite_existing);
  const TlsConfig tls{ops.cert_path, key, pki_->ca_path(), 60};
  for (const auto& [mode, allowed] : std::vector<std::pair<std::filesystem::perms, bool>>{
           {std::filesystem::perms(0600), true}, {std::filesystem::perms(0400), true},
           {std::filesystem::perms(0640), true}, {std::filesystem::perms(0440), true},
           {std::filesystem::perms(0644), false}, {std::filesystem::perms(0604), false},
           {std::filesystem::perms(0660), false}, {std::filesystem::perms(0602), false}}) {
    SCOPED_TRACE(absl::StrFormat("mode %04o", static_cast<unsigned>(mode)));
    std::filesystem::permissions(key, mode);
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server =
        MakeServerCredentials(tls, pki_->trust_domain());
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> client =
        MakeChannelCredentials(tls, pki_->server_identity());
    if (allowed) {
      EXPECT_TRUE(server.ok()) << server.status();
      EXPECT_TRUE(client.ok()) << client.status();
      continue;
    }
    for (const absl::Status& refused : {server.status(), client.status()}) {
      EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
      EXPECT_THAT(std::string(refused.message()), HasSubstr(key));
      EXPECT_THAT(std::string(refused.message()), HasSubstr("chmod 0600"));
    }
  }
  // A service configured with such a key does not start.
  std::filesystem::permissions(key, std::filesystem::perms(0644));
  MedgateConfig loose = config_;
  loose.services["test"].tls.key_path = key;
  ServiceServer refused(loose, "test");
  RecordingAuditService unused(pki_->trust_domain());
  refused.AddService(&unused);
  absl::Status started = refused.Start();
  EXPECT_EQ(started.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(started.message()), HasSubstr("open to others"));
  std::filesystem::remove(key);
}

// A connection that never starts its handshake is closed after the handshake timeout, not held
// (with its descriptor) for gRPC's default two minutes.
TEST_F(MtlsTest, AConnectionThatSaysNothingIsClosedAfterTheHandshakeTimeout) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(server_->port()));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)), 0);
  // Reads until the server closes it, or 60 s (gRPC's default would hold it 120 s; the timeout
  // is kHandshakeTimeoutMs).
  timeval wait{};
  wait.tv_sec = 60;
  ASSERT_EQ(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof(wait)), 0);
  char byte;
  const ssize_t got = ::recv(fd, &byte, 1, 0);
  ::close(fd);
  EXPECT_EQ(got, 0) << "not closed by the server within 60 s";
}

TEST_F(MtlsTest, UnlistedRpcIsDeniedToEveryKind) {
  auto stub = v1::Audit::NewStub(ChannelAs(pki_->ops()));
  grpc::ClientContext context;
  v1::QueryAuditRequest request;
  v1::QueryAuditResponse response;
  grpc::Status status = stub->QueryAudit(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

// A request message that does not parse is the client's error: INVALID_ARGUMENT saying what to
// fix, before any handler runs, where gRPC alone answers INTERNAL with an empty message.
TEST_F(MtlsTest, ARequestThatDoesNotParseIsInvalidArgumentBeforeAnyHandler) {
  std::shared_ptr<grpc::Channel> channel = ChannelAs(pki_->ops());
  {
    // What a C++ client sends for a string in Latin-1: protobuf logs an error and sends it.
    auto stub = v1::Audit::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::QueryAuditRequest request;
    request.set_patient_id("Andr\xe9");
    v1::QueryAuditResponse response;
    grpc::Status status = stub->QueryAudit(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("/medgate.v1.Audit/QueryAudit"));
    EXPECT_THAT(status.error_message(), HasSubstr("valid UTF-8"));
  }
  grpc::GenericStub generic(channel);
  const auto call_raw = [&](const std::string& bytes) {
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    std::promise<grpc::Status> done;
    generic.UnaryCall(&context, "/medgate.v1.Audit/VerifyChain", grpc::StubOptions(), &request,
                      &response, [&done](grpc::Status status) { done.set_value(status); });
    return done.get_future().get();
  };
  // Bytes that are no protobuf message: a field number 0 and a length past the end.
  for (const std::string& bytes : {std::string("\x00\x01", 2), std::string("\x0a\x7f\x01")}) {
    grpc::Status status = call_raw(bytes);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("/medgate.v1.Audit/VerifyChain did not parse"));
  }
  EXPECT_EQ(service_->calls(), 0);
  // An empty message is a valid request, and the handler answers it; so does a normal call.
  EXPECT_TRUE(call_raw("").ok());
  EXPECT_TRUE(Call(channel).ok());
  EXPECT_EQ(service_->calls(), 2);
}

// A unary call that sends no request message at all (a client that closes its side first) is
// told so, as INVALID_ARGUMENT.
TEST_F(MtlsTest, AUnaryCallWithoutARequestMessageIsInvalidArgument) {
  grpc::GenericStub generic(ChannelAs(pki_->ops()));
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      generic.PrepareCall(&context, "/medgate.v1.Audit/VerifyChain", &cq);
  const auto await = [&cq](intptr_t tag) {
    void* got = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&got, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(got), tag);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(await(1));
  call->WritesDone(reinterpret_cast<void*>(2));
  await(2);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(3));
  ASSERT_TRUE(await(3));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("carried no request message"));
  EXPECT_EQ(service_->calls(), 0);
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

TEST_F(MtlsTest, RotatedServerCertificateReachesNewConnections) {
  std::string first_pem;
  ASSERT_TRUE(Call(ChannelAs(pki_->app()), &first_pem).ok());
  EXPECT_EQ(SerialOfPem(first_pem), pki_->server().serial);

  absl::StatusOr<TestCert> rotated = pki_->IssueServer("rotated-server");
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  ASSERT_NE(rotated->serial, pki_->server().serial);
  // Replace the files the way cert-manager does: write aside, then rename over.
  std::filesystem::copy_file(rotated->key_path, server_key_ + ".new");
  std::filesystem::copy_file(rotated->cert_path, server_cert_ + ".new");
  std::filesystem::rename(server_key_ + ".new", server_key_);
  std::filesystem::rename(server_cert_ + ".new", server_cert_);

  std::string seen;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    std::string pem;
    if (Call(ChannelAs(pki_->app()), &pem).ok()) {
      seen = SerialOfPem(pem);
      if (seen == rotated->serial) break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(seen, rotated->serial) << "a new connection should see the rotated certificate";
}

TEST_F(MtlsTest, HealthFollowsTheProbe) {
  auto channel = ChannelAs(pki_->ops());
  using test_support::Health;
  auto wait_for = [&](Health want) {
    return test_support::WaitForHealth(channel, want, absl::Now() + absl::Seconds(10));
  };
  absl::Status serving = wait_for(Health::kServing);
  EXPECT_TRUE(serving.ok()) << serving;
  healthy_ = false;
  absl::Status unhealthy = wait_for(Health::kNotServing);
  EXPECT_TRUE(unhealthy.ok()) << unhealthy;
  healthy_ = true;
  absl::Status healthy = wait_for(Health::kServing);
  EXPECT_TRUE(healthy.ok()) << healthy;
}

// Until its first health probe has answered, a server says NOT_SERVING: that probe may wait out
// the databases' connect timeouts, and a readiness check answered SERVING meanwhile let a pod in
// that could not reach them.
TEST_F(MtlsTest, AServerIsNotServingUntilItsFirstProbeAnswers) {
  int port = 0;
  {
    // A port free now, for a server whose port the test must know before its Start returns.
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port = ntohs(addr.sin_port);
    close(fd);
  }
  MedgateConfig config = config_;
  config.services["test"].listen = absl::StrCat("127.0.0.1:", port);
  std::atomic<bool> hold{true};
  std::atomic<int> probes{0};
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config, "test");
  server.AddService(&service);
  server.SetHealthProbe(
      [&] {
        ++probes;
        while (hold.load()) absl::SleepFor(absl::Milliseconds(5));
        return absl::OkStatus();
      },
      absl::Milliseconds(50));
  absl::Status started;
  std::thread starting([&] { started = server.Start(); });
  absl::StatusOr<std::shared_ptr<grpc::Channel>> own =
      MakeChannel(absl::StrCat("127.0.0.1:", port),
                  TlsConfig{pki_->ops().cert_path, pki_->ops().key_path, pki_->ca_path(), 1},
                  pki_->server_identity());
  ASSERT_TRUE(own.ok()) << own.status();
  // The first answer the health service gives, while the first probe is held.
  absl::StatusOr<test_support::Health> first;
  const bool answered = test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
    first = test_support::CheckHealth(*own, absl::Seconds(1));
    return first.ok();
  });
  const int probes_then = probes.load();
  hold = false;
  starting.join();
  ASSERT_TRUE(started.ok()) << started;
  ASSERT_TRUE(answered) << first.status();
  EXPECT_EQ(probes_then, 1);
  EXPECT_EQ(*first, test_support::Health::kNotServing);
  EXPECT_TRUE(test_support::WaitForHealth(*own, test_support::Health::kServing,
                                          absl::Now() + absl::Seconds(10))
                  .ok());
  server.Shutdown();
}

// A stop answers NOT_SERVING and drains at once, without waiting for a health probe that is in
// progress (in a database call that may last until its timeout).
TEST_F(MtlsTest, AStopIsNotHeldByAHealthProbeInProgress) {
  std::atomic<bool> hold{false};
  std::atomic<int> held{0};
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config_, "test");
  server.AddService(&service);
  server.SetHealthProbe(
      [&] {
        if (hold.load()) {
          ++held;
          while (hold.load()) absl::SleepFor(absl::Milliseconds(5));
        }
        return absl::OkStatus();
      },
      absl::Milliseconds(50));
  ASSERT_TRUE(server.Start().ok());
  absl::StatusOr<std::shared_ptr<grpc::Channel>> own =
      MakeChannel(absl::StrCat("127.0.0.1:", server.port()),
                  TlsConfig{pki_->ops().cert_path, pki_->ops().key_path, pki_->ca_path(), 1},
                  pki_->server_identity());
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_TRUE(test_support::WaitForHealth(*own, test_support::Health::kServing,
                                          absl::Now() + absl::Seconds(10))
                  .ok());
  hold = true;
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10),
                                      [&] { return held.load() > 0; }));
  std::thread stopping([&] { server.Shutdown(); });
  // While the probe is still held, the server has stopped serving.
  const bool stopped = test_support::PollUntil(absl::Now() + absl::Seconds(5), [&] {
    absl::StatusOr<test_support::Health> health =
        test_support::CheckHealth(*own, absl::Seconds(1));
    return !health.ok() || *health != test_support::Health::kServing;
  });
  hold = false;
  stopping.join();
  EXPECT_TRUE(stopped) << "the server kept serving until its health probe returned";
}

// A health Watch, as a load balancer keeps one open.
struct HealthWatch {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader;

  // The next status the server sends; nullopt once the stream has ended.
  std::optional<grpc::health::v1::HealthCheckResponse::ServingStatus> Next() {
    grpc::health::v1::HealthCheckResponse response;
    if (!reader->Read(&response)) return std::nullopt;
    return response.status();
  }
};

std::unique_ptr<HealthWatch> OpenHealthWatch(const std::shared_ptr<grpc::Channel>& channel,
                                             const std::string& service = "") {
  auto watch = std::make_unique<HealthWatch>();
  watch->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  watch->reader = grpc::health::v1::Health::NewStub(channel)->Watch(&watch->context, request);
  return watch;
}

// A Watch answers the status at once, then each change; a stop tells it NOT_SERVING and ends it
// UNAVAILABLE, rather than leave it open until the drain's deadline cancels it.
TEST_F(MtlsTest, AHealthWatchIsToldEachChangeAndEndsWhenTheServerStops) {
  using grpc::health::v1::HealthCheckResponse;
  auto channel = ChannelAs(pki_->ops());
  ASSERT_TRUE(test_support::WaitForHealth(channel, test_support::Health::kServing,
                                          absl::Now() + absl::Seconds(10))
                  .ok());
  std::unique_ptr<HealthWatch> watch = OpenHealthWatch(channel);
  EXPECT_EQ(watch->Next(), HealthCheckResponse::SERVING);
  healthy_ = false;
  EXPECT_EQ(watch->Next(), HealthCheckResponse::NOT_SERVING);
  healthy_ = true;
  EXPECT_EQ(watch->Next(), HealthCheckResponse::SERVING);

  // A name the server does not answer for: SERVICE_UNKNOWN to a watch, NOT_FOUND to a check.
  std::unique_ptr<HealthWatch> unknown = OpenHealthWatch(channel, "medgate.v1.Nothing");
  EXPECT_EQ(unknown->Next(), HealthCheckResponse::SERVICE_UNKNOWN);
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service("medgate.v1.Nothing");
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status =
        grpc::health::v1::Health::NewStub(channel)->Check(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
  }

  std::thread stopping([&] { server_->Shutdown(); });
  EXPECT_EQ(watch->Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(watch->Next(), std::nullopt);
  grpc::Status ended = watch->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  EXPECT_THAT(ended.error_message(), ::testing::HasSubstr("shutting down"));
  EXPECT_EQ(unknown->Next(), std::nullopt);
  ended = unknown->reader->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  stopping.join();
}

// Watches hold memory for as long as their callers keep them: a caller identity may hold
// limits.max_health_watches_per_caller of them open, the server limits.max_health_watches in all,
// and only service and ops identities may watch. Checks are not counted.
TEST_F(MtlsTest, HealthWatchesAreBoundedPerCallerAndInAll) {
  using grpc::health::v1::HealthCheckResponse;
  MedgateConfig config = config_;
  config.limits.max_health_watches_per_caller = 2;
  config.limits.max_health_watches = 3;
  RecordingAuditService service(pki_->trust_domain());
  ServiceServer server(config, "test");
  server.AddService(&service);
  ASSERT_TRUE(server.Start().ok());
  auto channel_as = [&](const TestCert& cert) { return ChannelAs(cert, server.port()); };
  auto ops = channel_as(pki_->ops());
  auto watcher = channel_as(pki_->service());
  {
    std::unique_ptr<HealthWatch> tenants = OpenHealthWatch(channel_as(pki_->practitioner()));
    EXPECT_EQ(tenants->Next(), std::nullopt);
    grpc::Status status = tenants->reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr("Health/Check"));
    EXPECT_TRUE(test_support::CheckHealth(channel_as(pki_->practitioner()), absl::Seconds(10))
                    .ok());
  }
  const std::string ops_id = pki_->SpiffeId("/ops/alice");
  auto refused = [](HealthWatch& watch, const std::string& bound) {
    EXPECT_EQ(watch.Next(), std::nullopt);
    grpc::Status status = watch.reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr(bound));
  };

  std::vector<std::unique_ptr<HealthWatch>> open;
  for (int i = 0; i < 2; ++i) {
    open.push_back(OpenHealthWatch(ops));
    EXPECT_EQ(open.back()->Next(), HealthCheckResponse::SERVING);
  }
  std::unique_ptr<HealthWatch> third_of_ops = OpenHealthWatch(ops);
  refused(*third_of_ops, "max_health_watches_per_caller");
  EXPECT_EQ(server.health().watches_of(ops_id), 2);

  // Another caller has its own count, within the server's.
  open.push_back(OpenHealthWatch(watcher));
  EXPECT_EQ(open.back()->Next(), HealthCheckResponse::SERVING);
  std::unique_ptr<HealthWatch> beyond_the_server = OpenHealthWatch(watcher);
  refused(*beyond_the_server, "max_health_watches)");
  EXPECT_EQ(server.health().watches(), 3);
  EXPECT_TRUE(test_support::CheckHealth(ops, absl::Seconds(10)).ok());

  // A watch that ends gives its place back.
  open.front()->context.TryCancel();
  EXPECT_EQ(open.front()->Next(), std::nullopt);
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10),
                                      [&] { return server.health().watches_of(ops_id) == 1; }));
  std::unique_ptr<HealthWatch> again = OpenHealthWatch(ops);
  EXPECT_EQ(again->Next(), HealthCheckResponse::SERVING);
  EXPECT_EQ(server.health().watches_of(ops_id), 2);
  EXPECT_EQ(server.health().watches(), 3);
  server.Shutdown();
  EXPECT_EQ(server.health().watches(), 0);
}

// Device streams turn gRPC's BDP probe off at both ends (it costs more than their small messages).
// With the defaults, the same calls do probe: the count can tell the two apart.
TEST_F(MtlsTest, NoBdpProbeWhenBothEndsTurnItOff) {
  RecordingAuditService quiet_service(pki_->trust_domain());
  ServiceServer quiet(config_, "test");
  quiet.AddService(&quiet_service);
  quiet.DisableBdpProbe();
  ASSERT_TRUE(quiet.Start().ok());
  const TlsConfig ops{pki_->ops().cert_path, pki_->ops().key_path, pki_->ca_path(), 1};
  auto pings_over_calls = [&](const std::string& address, const ChannelOptions& options) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(address, ops, pki_->server_identity(), options);
    EXPECT_TRUE(channel.ok()) << channel.status();
    BdpPingCounter counter;
    for (int i = 0; i < 20; ++i) EXPECT_TRUE(Call(*channel).ok());
    return counter.pings();
  };

  EXPECT_GT(pings_over_calls(address_, ChannelOptions{}), 0) << "both ends probe by default";
  EXPECT_EQ(pings_over_calls(absl::StrCat("127.0.0.1:", quiet.port()),
                             ChannelOptions{.bdp_probe = false}),
            0);
  quiet.Shutdown();
}

}  // namespace
}  // namespace medgate
