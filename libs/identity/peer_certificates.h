// What the TLS handshake verified once, checked again on every call and on every message of a
// long stream: that the peer's certificate has not expired, and has not been revoked, since.
#ifndef MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_
#define MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/security/auth_context.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medgate {

// The parts of a verified peer certificate that decide whether it is still good.
struct PeerCertificate {
  absl::Time not_after;
  std::string serial_hex;   // upper-case hex, as CRL tools and `devpki` print it
  std::string revoked_key;  // the issuer's DER name and the serial: how a CRL names it
};

struct PeerCertificatesOptions {
  // A directory of CRLs in OpenSSL's hashed form (TlsConfig::crl_dir); empty: nothing revoked.
  std::string crl_dir;
  // The CA certificate(s) (TlsConfig::ca_path): a CRL counts only when one of them signed it.
  std::string ca_path;
  // How often the directory is looked at for a changed CRL (a file added, replaced or removed).
  absl::Duration rescan = absl::Seconds(1);
  // Certificates decoded and kept, by the SHA-256 of their PEM (all forgotten at once when full).
  size_t max_cached = 65536;
  // Bounds on what is read from the directory; a file beyond them is skipped, and logged.
  size_t max_crl_files = 1024;
  uintmax_t max_crl_bytes = 16u << 20;
};

// Shared by a server's per-call identity check and a service's long streams. Thread-safe.
//
// Of the CRLs in the directory that a CA of `ca_path` signed, the one issued last by each CA
// counts (as in OpenSSL's handshake); a certificate its issuer's CRL lists is revoked. A CRL file
// that cannot be read, or whose signature no CA of `ca_path` verifies, is skipped and logged (the
// handshake refuses every certificate of that issuer meanwhile).
class PeerCertificates {
 public:
  // Reads the directory once, now.
  explicit PeerCertificates(PeerCertificatesOptions options);

  // The certificate in `pem`, decoded once and then kept; UNAUTHENTICATED when it does not parse.
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> Read(absl::string_view pem);
  // The verified client certificate of a call (exactly one PEM certificate in its auth context).
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> OfCall(const grpc::AuthContext& context);

  // OK while `certificate` has neither expired nor been revoked at `now`; UNAUTHENTICATED saying
  // which, otherwise. Looks at the CRL directory again when `rescan` has passed since last time.
  absl::Status Check(const PeerCertificate& certificate, absl::Time now);

  // Certificates kept; CRLs in force (one per CA); certificates they revoke (for tests and logs).
  size_t cached() const;
  size_t crls_in_force() const;
  size_t revoked() const;

 private:
  struct Revocations;

  // The directory's CRLs: looked at again when `now` is past the next scan, read again when a
  // file's name, size or time changed. Not under mu_ while it reads.
  std::shared_ptr<const Revocations> Current(absl::Time now);
  std::shared_ptr<const Revocations> Scan(const std::string& fingerprint) const;
  std::string Fingerprint() const;

  const PeerCertificatesOptions options_;

  mutable absl::Mutex cache_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const PeerCertificate>> by_digest_
      ABSL_GUARDED_BY(cache_mu_);

  mutable absl::Mutex mu_;
  std::shared_ptr<const Revocations> revocations_ ABSL_GUARDED_BY(mu_);
  absl::Time next_scan_ ABSL_GUARDED_BY(mu_);
  bool scanning_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_
