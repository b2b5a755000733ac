// mTLS credentials built on gRPC's TLS credentials and FileWatcherCertificateProvider.
#include "absl/strings/string_view.h"
#include "libs/identity/credentials.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <iterator>
#include <limits>

#include <grpc/grpc_security_constants.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "libs/common/grpc_status.h"
#include "libs/identity/principal.h"

namespace medgate {
namespace {

absl::Status CheckReadable(const std::string& path, absl::string_view what) {
  std::ifstream in(path);
  if (!in) return absl::FailedPreconditionError(absl::StrCat(what, " file '", path, "' cannot be read"));
  return absl::OkStatus();
}

// What a deployment may narrow gRPC's cipher suites to (GRPC_SSL_CIPHER_SUITES): AEAD only.
constexpr absl::string_view kAeadSuites[] = {
    "TLS_AES_128_GCM_SHA256",        "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",  "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",   "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
};

// A private key others may read is their identity too, and one its group may write is the
// group's to replace. Read by the group is allowed: Kubernetes mounts a Secret for the pod's group
// (the chart's 0440). Checked when the credentials are made; a key rotated in place later is
// not checked again.
absl::Status CheckPrivateKeyMode(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("private key file '", path, "' cannot be checked: ", std::strerror(errno)));
  }
  if ((st.st_mode & (S_IRWXO | S_IWGRP)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "private key file '", path, "' is open to others or writable by its group (mode ",
        absl::StrFormat("%04o", st.st_mode & 07777), "): anyone who reads it can act as this "
        "identity. Make it readable by its owner only (chmod 0600), or by its group too (0640, "
        "0440)"));
  }
  return absl::OkStatus();
}

absl::Status CheckFiles(const TlsConfig& tls) {
  if (absl::Status s = CheckReadable(tls.cert_path, "certificate"); !s.ok()) return s;
  if (absl::Status s = CheckReadable(tls.key_path, "private key"); !s.ok()) return s;
  if (absl::Status s = CheckPrivateKeyMode(tls.key_path); !s.ok()) return s;
  if (absl::Status s = CheckReadable(tls.ca_path, "CA certificate"); !s.ok()) return s;
  if (!tls.crl_dir.empty()) {
    // gRPC would take a missing directory for one without CRLs, and revoke nothing.
    std::error_code error;
    if (!std::filesystem::is_directory(tls.crl_dir, error)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "crl_dir '", tls.crl_dir, "' is not a directory that can be read (",
          error ? error.message() : "not a directory", "): CRLs would not be enforced"));
    }
  }
  return absl::OkStatus();
}

// Refuses every call whose verified peer certificate does not carry exactly one valid identity
// of this trust domain, or has expired or been revoked since the handshake verified it (a
// connection outlives its certificate's checks, up to its maximum age), before the call reaches
// a handler.
class PeerIdentityProcessor final : public grpc::AuthMetadataProcessor {
 public:
  PeerIdentityProcessor(std::string trust_domain, std::shared_ptr<PeerCertificates> peers)
      : trust_domain_(std::move(trust_domain)), peers_(std::move(peers)) {}

  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& /*metadata*/, grpc::AuthContext* context,
                       OutputMetadata* /*consumed*/, OutputMetadata* /*response*/) override {
    absl::StatusOr<Principal> principal = PrincipalFromAuthContext(*context, trust_domain_);
    if (!principal.ok()) return ToGrpcStatus(principal.status());
    absl::StatusOr<std::shared_ptr<const PeerCertificate>> certificate = peers_->OfCall(*context);
    if (!certificate.ok()) return ToGrpcStatus(certificate.status());
    return ToGrpcStatus(peers_->Check(**certificate, absl::Now()));
  }

 private:
  const std::string trust_domain_;
  const std::shared_ptr<PeerCertificates> peers_;
};

// Refuses, during the handshake, a server certificate that does not carry exactly one URI SAN equal
// to the expected identity. The chain itself was verified against the CA before this runs.
class ServerIdentityVerifier final : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit ServerIdentityVerifier(std::string expected) : expected_(std::move(expected)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> /*callback*/, grpc::Status* sync_status) override {
    std::vector<grpc::string_ref> uris = request->uri_names();
    if (uris.size() != 1) {
      *sync_status = grpc::Status(
          grpc::StatusCode::UNAUTHENTICATED,
          absl::StrCat("the server's certificate has ", uris.size(), " URI SANs; expected one, ",
                       expected_));
    } else if (absl::string_view(uris[0].data(), uris[0].size()) != expected_) {
      *sync_status = grpc::Status(
          grpc::StatusCode::UNAUTHENTICATED,
          absl::StrCat("the server's certificate is for ", absl::string_view(uris[0].data(), uris[0].size()),
                       ", not ", expected_));
    } else {
      *sync_status = grpc::Status::OK;
    }
    return true;  // decided synchronously
  }

  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest* /*request*/) override {}

 private:
  const std::string expected_;
};

}  // namespace

absl::Status CheckSpiffeId(absl::string_view id, absl::string_view what) {
  constexpr absl::string_view kScheme = "spiffe://";
  const size_t slash = absl::StartsWith(id, kScheme) ? id.find('/', kScheme.size()) : 0;
  if (slash == absl::string_view::npos || slash <= kScheme.size() ||
      !ParseSpiffeId(id, id.substr(kScheme.size(), slash - kScheme.size())).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " is '", id,
        "', not a medgate SPIFFE id (e.g. spiffe://TRUST_DOMAIN/service/ingest)"));
  }
  return absl::OkStatus();
}

absl::Status CheckCipherSuites(absl::string_view list) {
  bool tls12 = false;
  for (absl::string_view suite : absl::StrSplit(list, ':')) {
    if (std::find(std::begin(kAeadSuites), std::end(kAeadSuites), suite) == std::end(kAeadSuites)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "GRPC_SSL_CIPHER_SUITES lists '", suite, "', which is not an AEAD cipher suite with "
          "forward secrecy; medgate serves TLS 1.2+ with AEAD suites only: unset it, or choose "
          "among ", absl::StrJoin(kAeadSuites, ":")));
    }
    tls12 = tls12 || absl::StartsWith(suite, "ECDHE-");
  }
  if (!tls12) {
    // OpenSSL's TLS 1.2 cipher list (which gRPC sets from it) cannot be empty.
    return absl::FailedPreconditionError(
        "GRPC_SSL_CIPHER_SUITES lists no TLS 1.2 suite; add one of the ECDHE-... suites");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsConfig& tls, const std::string& trust_domain,
    std::shared_ptr<PeerCertificates> peers) {
  if (absl::Status s = CheckFiles(tls); !s.ok()) return s;
  if (peers == nullptr) peers = MakePeerCertificates(tls);
  // gRPC reads the suites from the environment; its default list is AEAD only, and its TLS
  // credentials refuse versions below 1.2.
  if (const char* suites = std::getenv("GRPC_SSL_CIPHER_SUITES"); suites != nullptr) {
    if (absl::Status s = CheckCipherSuites(suites); !s.ok()) return s;
  }
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key_path, tls.cert_path, tls.ca_path, static_cast<unsigned>(tls.refresh_seconds));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  // A certificate revoked by a CRL of the directory is refused in the handshake; OpenSSL looks a
  // CRL up by the issuer's name hash at each handshake, so one added later (by a new name) is
  // enforced from the next handshake on. On connections already open, `peers` enforces it from
  // the next call on.
  if (!tls.crl_dir.empty()) options.set_crl_directory(tls.crl_dir);
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::experimental::TlsServerCredentials(options);
  if (!creds) return absl::InternalError("cannot build TLS server credentials");
  creds->SetAuthMetadataProcessor(
      std::make_shared<PeerIdentityProcessor>(trust_domain, std::move(peers)));
  return creds;
}

std::shared_ptr<PeerCertificates> MakePeerCertificates(const TlsConfig& tls) {
  PeerCertificatesOptions options;
  options.crl_dir = tls.crl_dir;
  options.ca_path = tls.ca_path;
  return std::make_shared<PeerCertificates>(std::move(options));
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsConfig& tls, const std::string& server_identity) {
  if (absl::Status s = CheckSpiffeId(server_identity, "the server identity to expect"); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckFiles(tls); !s.ok()) return s;
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key_path, tls.cert_path, tls.ca_path, static_cast<unsigned>(tls.refresh_seconds));
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  if (!tls.crl_dir.empty()) options.set_crl_directory(tls.crl_dir);
  // The identity is checked instead of host names: not per call either (which gRPC does by
  // default, against the certificate's DNS and IP SANs).
  options.set_check_call_host(false);
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<ServerIdentityVerifier>(
          server_identity));
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::experimental::TlsCredentials(options);
  if (!creds) return absl::InternalError("cannot build TLS channel credentials");
  return creds;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                          const TlsConfig& tls,
                                                          const std::string& server_identity,
                                                          const ChannelOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      MakeChannelCredentials(tls, server_identity);
  if (!creds.ok()) return creds.status();
  return grpc::CreateCustomChannel(address, *creds, ChannelArgumentsFor(options));
}

grpc::ChannelArguments ChannelArgumentsFor(const ChannelOptions& options) {
  // gRPC takes milliseconds as an int: a longer duration is its largest.
  auto ms = [](absl::Duration d) {
    return static_cast<int>(
        std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 1, std::numeric_limits<int>::max()));
  };
  grpc::ChannelArguments args;
  // Each channel gets its own connection so credentials are not shared across identities.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!options.bdp_probe) args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  if (options.keepalive_time > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ms(options.keepalive_time));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(options.keepalive_timeout));
  }
  if (options.reconnect_backoff_initial > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, ms(options.reconnect_backoff_initial));
  }
  if (options.reconnect_backoff_max > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ms(options.reconnect_backoff_max));
  }
  return args;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeServiceChannel(const ServiceEndpoint& target,
                                                                 const TlsConfig& own,
                                                                 const ChannelOptions& options) {
  return MakeChannel(target.address, own, target.identity, options);
}

absl::Status CheckServerIdentity(const ServiceEndpoint& endpoint, absl::string_view trust_domain) {
  std::ifstream in(endpoint.tls.cert_path);
  std::ostringstream pem;
  if (!in.is_open() || !(pem << in.rdbuf())) {
    return absl::FailedPreconditionError(
        absl::StrCat("certificate file '", endpoint.tls.cert_path, "' cannot be read"));
  }
  absl::StatusOr<Principal> principal = PrincipalFromCertificatePem(pem.str(), trust_domain);
  if (!principal.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("certificate file '", endpoint.tls.cert_path,
                     "' does not carry a medgate identity of trust domain ", trust_domain, " (",
                     principal.status().message(), ")"));
  }
  if (principal->spiffe_id != endpoint.identity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "certificate file '", endpoint.tls.cert_path, "' is for ", principal->spiffe_id,
        ", but this service's clients expect ", endpoint.identity,
        " (the service's 'identity' key, by default spiffe://TRUST_DOMAIN/service/NAME)"));
  }
  return absl::OkStatus();
}

}  // namespace medgate
