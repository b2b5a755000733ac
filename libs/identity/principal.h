// Who is calling: the Principal parsed from the verified peer certificate's single URI SAN.
#ifndef MEDGATE_LIBS_IDENTITY_PRINCIPAL_H_
#define MEDGATE_LIBS_IDENTITY_PRINCIPAL_H_

#include <string>
#include <string_view>

#include <grpcpp/security/auth_context.h>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "libs/common/openssl_ptr.h"

namespace medgate {

enum class PrincipalKind { kDevice, kPractitioner, kApp, kService, kOps };

absl::string_view PrincipalKindName(PrincipalKind kind);

// An authenticated caller. `tenant` is empty for service and ops identities.
struct Principal {
  PrincipalKind kind = PrincipalKind::kDevice;
  std::string trust_domain;
  std::string tenant;
  std::string name;       // device id, practitioner id, app id, service name or ops name
  std::string spiffe_id;  // the full URI SAN

  bool IsTenantScoped() const {
    return kind == PrincipalKind::kDevice || kind == PrincipalKind::kPractitioner ||
           kind == PrincipalKind::kApp;
  }
  friend bool operator==(const Principal&, const Principal&) = default;
};

// Parses spiffe://TD/tenant/T/{device,practitioner,app}/X, spiffe://TD/service/NAME or
// spiffe://TD/ops/NAME. Another trust domain or any other form is UNAUTHENTICATED.
absl::StatusOr<Principal> ParseSpiffeId(absl::string_view uri, absl::string_view trust_domain);

// The first certificate in `pem`; UNAUTHENTICATED when it cannot be read.
absl::StatusOr<openssl::Certificate> ReadPeerCertificate(absl::string_view pem);

// Requires exactly one URI SAN in the PEM certificate and parses it.
absl::StatusOr<Principal> PrincipalFromCertificatePem(absl::string_view pem,
                                                      absl::string_view trust_domain);

// The Principal of a verified TLS peer (the certificate chain was verified by the handshake).
absl::StatusOr<Principal> PrincipalFromAuthContext(const grpc::AuthContext& context,
                                                   absl::string_view trust_domain);

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_PRINCIPAL_H_
