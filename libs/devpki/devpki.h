// A development PKI: EC P-256 CAs and leaf certificates with SPIFFE-style URI SANs, as PEM files.
#ifndef MEDGATE_LIBS_DEVPKI_DEVPKI_H_
#define MEDGATE_LIBS_DEVPKI_DEVPKI_H_

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/openssl_ptr.h"

namespace medgate::devpki {

using EvpPkeyPtr = openssl::EvpPkey;
using X509Ptr = openssl::Certificate;

// A private key and the certificate for it. Move-only: it owns the OpenSSL objects.
class Credential {
 public:
  Credential(EvpPkeyPtr key, X509Ptr cert);

  // Parses PEM text; fails if the key does not match the certificate.
  static absl::StatusOr<Credential> FromPem(const std::string& cert_pem,
                                            const std::string& key_pem);
  // Reads what WriteFiles wrote, e.g. to reuse a dev CA on a second run.
  static absl::StatusOr<Credential> ReadFiles(const std::string& cert_path,
                                              const std::string& key_path);

  EVP_PKEY* key() const { return key_.get(); }
  X509* cert() const { return cert_.get(); }

  absl::StatusOr<std::string> CertPem() const;
  // Unencrypted PKCS#8 PEM: dev and test material only.
  absl::StatusOr<std::string> KeyPem() const;
  // Serial number as upper-case hex, to tell certificates for the same identity apart.
  std::string SerialHex() const;
  // The certificate's URI SANs in order; empty when it has none.
  std::vector<std::string> UriSans() const;

  // Each file is written to a temporary name and renamed, so a reader never sees half a file; the
  // key file is created with mode 0600.
  absl::Status WriteFiles(const std::string& cert_path, const std::string& key_path) const;

 private:
  EvpPkeyPtr key_;
  X509Ptr cert_;
};

struct CaOptions {
  std::string common_name = "medgate dev CA";
  // Offsets from now; a slightly backdated start tolerates clock skew between hosts.
  absl::Duration not_before = -absl::Hours(1);
  absl::Duration not_after = absl::Hours(24 * 365 * 10);
};

struct LeafOptions {
  // Subject CN. Peers identify callers by URI SAN, never by CN; this only helps humans.
  std::string common_name = "medgate leaf";
  std::vector<std::string> uri_sans;  // e.g. "spiffe://medgate.test/service/routing"
  std::vector<std::string> dns_sans;  // e.g. "localhost"
  std::vector<std::string> ip_sans;   // IPv4 or IPv6 literals, e.g. "127.0.0.1"
  // Offsets from now; both negative makes an already-expired certificate.
  absl::Duration not_before = -absl::Hours(1);
  absl::Duration not_after = absl::Hours(24 * 365);
};

// A self-signed CA: basicConstraints CA:TRUE, keyUsage keyCertSign and cRLSign.
absl::StatusOr<Credential> CreateCa(const CaOptions& options);

// An intermediate CA signed by `ca` (basicConstraints CA:TRUE, pathlen:0; keyUsage keyCertSign
// and cRLSign), for leaves whose peers trust `ca` only and are sent the intermediate with them.
absl::StatusOr<Credential> IssueIntermediateCa(const Credential& ca, const CaOptions& options);

// A leaf signed by `ca` with a fresh key and a random serial: basicConstraints CA:FALSE, keyUsage
// digitalSignature, extendedKeyUsage serverAuth and clientAuth, and the SANs asked for (none at all
// is allowed, to test that peers refuse such a certificate).
absl::StatusOr<Credential> IssueLeaf(const Credential& ca, const LeafOptions& options);

// A certificate revocation list signed by `ca`, as PEM: the certificates of `revoked_serials`
// (upper-case hex, as Credential::SerialHex gives them) are revoked as of now; it was issued an
// hour ago (clock skew) and is current for `next_update` from now.
absl::StatusOr<std::string> CreateCrlPem(const Credential& ca,
                                         const std::vector<std::string>& revoked_serials,
                                         absl::Duration next_update = absl::Hours(24 * 7));

// Writes such a CRL into `dir` under the next name OpenSSL's hashed-directory look-up reads for
// `ca` ("<issuer name hash>.r0", then .r1, ...: a newer CRL beside the ones before, as a running
// server picks up new CRLs by new names), atomically; answers the path written.
absl::StatusOr<std::string> WriteCrl(const Credential& ca,
                                     const std::vector<std::string>& revoked_serials,
                                     const std::string& dir,
                                     absl::Duration next_update = absl::Hours(24 * 7));

// OK if `leaf` carries a signature by `ca`'s key and `at` lies inside its validity. A cheap check
// for deciding whether files left by an earlier run can be kept; not a chain verification.
absl::Status CheckIssuedBy(const Credential& leaf, const Credential& ca, absl::Time at);

}  // namespace medgate::devpki

#endif  // MEDGATE_LIBS_DEVPKI_DEVPKI_H_
