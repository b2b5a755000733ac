// Principal parsing from SPIFFE URI SANs.
#include "absl/strings/string_view.h"
#include "libs/identity/principal.h"

#include <memory>
#include <vector>

#include <grpc/grpc_security_constants.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "libs/common/status_macros.h"

namespace medgate {
namespace {

constexpr size_t kMaxSegment = 128;

bool ValidSegment(absl::string_view s) {
  if (s.empty() || s.size() > kMaxSegment) return false;
  // The SPIFFE spec forbids them: a tool that normalises the path would read another identity.
  if (s == "." || s == "..") return false;
  for (char c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

absl::Status Unauthenticated(absl::string_view why) {
  return absl::UnauthenticatedError(absl::StrCat("client identity refused: ", why));
}

}  // namespace

absl::string_view PrincipalKindName(PrincipalKind kind) {
  switch (kind) {
    case PrincipalKind::kDevice: return "device";
    case PrincipalKind::kPractitioner: return "practitioner";
    case PrincipalKind::kApp: return "app";
    case PrincipalKind::kService: return "service";
    case PrincipalKind::kOps: return "ops";
  }
  return "unknown";
}

absl::StatusOr<Principal> ParseSpiffeId(absl::string_view uri, absl::string_view trust_domain) {
  constexpr absl::string_view kScheme = "spiffe://";
  if (uri.substr(0, kScheme.size()) != kScheme) {
    return Unauthenticated("the URI SAN is not a spiffe:// identity");
  }
  std::vector<absl::string_view> parts = absl::StrSplit(uri.substr(kScheme.size()), '/');
  if (parts.empty() || parts[0] != trust_domain) {
    return Unauthenticated("the identity belongs to another trust domain");
  }
  for (absl::string_view p : parts) {
    if (!ValidSegment(p)) return Unauthenticated("the identity has an empty or invalid segment");
  }
  Principal principal;
  principal.trust_domain = std::string(trust_domain);
  principal.spiffe_id = std::string(uri);
  if (parts.size() == 5 && parts[1] == "tenant") {
    principal.tenant = std::string(parts[2]);
    principal.name = std::string(parts[4]);
    if (parts[3] == "device") {
      principal.kind = PrincipalKind::kDevice;
    } else if (parts[3] == "practitioner") {
      principal.kind = PrincipalKind::kPractitioner;
    } else if (parts[3] == "app") {
      principal.kind = PrincipalKind::kApp;
    } else {
      return Unauthenticated("unknown tenant identity kind");
    }
    return principal;
  }
  if (parts.size() == 3 && (parts[1] == "service" || parts[1] == "ops")) {
    principal.kind = parts[1] == "service" ? PrincipalKind::kService : PrincipalKind::kOps;
    principal.name = std::string(parts[2]);
    return principal;
  }
  return Unauthenticated("unknown identity form");
}

absl::StatusOr<openssl::Certificate> ReadPeerCertificate(absl::string_view pem) {
  openssl::Bio bio = openssl::MemoryBio(pem);
  if (!bio) return Unauthenticated("cannot read the peer certificate");
  openssl::Certificate cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    ERR_clear_error();
    return Unauthenticated("cannot parse the peer certificate");
  }
  return cert;
}

absl::StatusOr<Principal> PrincipalFromCertificatePem(absl::string_view pem,
                                                      absl::string_view trust_domain) {
  ASSIGN_OR_RETURN(openssl::Certificate cert, ReadPeerCertificate(pem));
  openssl::GeneralNames names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr)));
  absl::string_view uri;
  int uri_count = 0;
  if (names) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
      const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
      if (name->type != GEN_URI) continue;
      ++uri_count;
      const ASN1_IA5STRING* s = name->d.uniformResourceIdentifier;
      uri = absl::string_view(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                             static_cast<size_t>(ASN1_STRING_length(s)));
    }
  }
  if (uri_count == 0) return Unauthenticated("the certificate has no URI SAN");
  if (uri_count > 1) return Unauthenticated("the certificate has more than one URI SAN");
  return ParseSpiffeId(uri, trust_domain);
}

absl::StatusOr<Principal> PrincipalFromAuthContext(const grpc::AuthContext& context,
                                                   absl::string_view trust_domain) {
  // The server requires and verifies the client certificate during the handshake, so a PEM
  // certificate in the auth context is a verified one. The handshake already parsed it and lists
  // each of its URI SANs as a `peer_uri` property: reading those avoids parsing the certificate
  // again on every call (OpenSSL 3 decoding costs about a millisecond).
  std::vector<grpc::string_ref> pems = context.FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME);
  if (pems.size() != 1) return Unauthenticated("no verified client certificate");
  // A resumed TLS session did not verify the certificate again: it may have expired since. The
  // servers issue no tickets (tls_buffers.cc); a session resumed any other way is refused.
  for (const grpc::string_ref& reused : context.FindPropertyValues(GRPC_SSL_SESSION_REUSED_PROPERTY)) {
    if (absl::string_view(reused.data(), reused.size()) == "true") {
      return Unauthenticated(
          "a resumed TLS session is not accepted (its certificate was not verified again); "
          "connect without a TLS session cache");
    }
  }
  std::vector<grpc::string_ref> uris = context.FindPropertyValues(GRPC_PEER_URI_PROPERTY_NAME);
  if (uris.empty()) return Unauthenticated("the certificate has no URI SAN");
  if (uris.size() > 1) return Unauthenticated("the certificate has more than one URI SAN");
  return ParseSpiffeId(absl::string_view(uris[0].data(), uris[0].size()), trust_domain);
}

}  // namespace medgate
