// What the TLS handshake verified once, checked again on every call and on every message of a
// long stream: that the peer's certificate has not expired, and has not been revoked, since.
#ifndef MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_
#define MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/security/auth_context.h>
#include <grpcpp/server_context.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace medgate {

// The parts of a verified peer certificate that decide whether it is still good.
struct PeerCertificate {
  absl::Time not_after;
  std::string serial_hex;   // upper-case hex, as CRL tools and `devpki` print it
  // The SHA-256 of the issuer's canonical name and the serial: how a CRL names it.
  std::string revoked_key;
  // Not empty: why the peer is refused whatever the CRLs say (the chain it sent).
  std::string refusal;

  // The intermediate CAs the peer sent with it, from its certificate's issuer up (not a
  // self-signed root, nor a certificate that issued none of them), whose revocation ends the
  // peer's acceptance as well.
  struct Issuer {
    std::string serial_hex;
    std::string revoked_key;
  };
  std::vector<Issuer> issuers;
};

struct PeerCertificatesOptions {
  // A directory of CRLs in OpenSSL's hashed form (TlsConfig::crl_dir); empty: nothing revoked.
  std::string crl_dir;
  // The CA certificate(s) (TlsConfig::ca_path): a CRL that one of them signed can release what an
  // earlier CRL revoked.
  std::string ca_path;
  // How often a thread of its own looks at the directory for a changed CRL (a file added,
  // replaced or removed, by name, size and time); zero: only when Rescan is called.
  absl::Duration rescan = absl::Seconds(1);
  // How soon a look that could not read all of the directory is tried again, even if no file
  // seems to have changed (a transient read error, a file rewritten within its own time stamp).
  absl::Duration partial_retry = absl::Seconds(10);
  // Certificates decoded and kept, by the SHA-256 of their PEM (all forgotten at once when full).
  size_t max_cached = 65536;
  // Bounds on what is read from the directory; a file beyond them is not read, and logged.
  size_t max_crl_files = 1024;
  uintmax_t max_crl_bytes = 16u << 20;
};

// Shared by a server's per-call identity check and a service's long streams. Thread-safe.
//
// What counts as revoked, never less than the handshake refuses:
// - of the CRLs that a CA of `ca_path` signed (any of those with the CRL's issuer name), the one
//   each CA issued last, as in OpenSSL's handshake;
// - of the CRLs of a CA not in `ca_path` (an intermediate's, which the handshake verifies with
//   the peer's chain and this cannot), the one issued last;
// - and whatever any other CRL lists (one under the name of a CA of `ca_path` that none of them
//   verifies, a delta CRL, one issued in the future): such a CRL can refuse, but releases
//   nothing. One issued in the future is read again once its time has come.
// An entry whose reason is removeFromCRL revokes nothing (a hold released, as OpenSSL reads it).
// A peer is refused once its certificate, or a CA certificate it sent with it (an intermediate,
// revoked by its own CA's CRL), is revoked.
// A look at the directory that could not read all of it (the directory or the CA file
// unreadable, a file over its bound or holding no CRL, a CRL under a CA's name that no CA
// verifies while none of that CA's does) keeps everything the previous look revoked as well, and
// is tried again every `partial_retry` (10 s) until one reads it all: a revocation is never lost
// to a file half written. Each such problem is logged (`crl_skipped`, `crl_dir_unreadable`).
class PeerCertificates {
 public:
  // Reads the directory once, now, then every `rescan` on a thread of its own.
  explicit PeerCertificates(PeerCertificatesOptions options);
  ~PeerCertificates();

  PeerCertificates(const PeerCertificates&) = delete;
  PeerCertificates& operator=(const PeerCertificates&) = delete;

  // The certificate in `pem`, with its issuers among the certificates of `chain` (PEM, as the
  // peer sent them), decoded once and then kept; UNAUTHENTICATED when it does not parse, or
  // `chain` is over kMaxChainBytes. A chain of over kMaxChain certificates, or one that does not
  // parse, is kept as a refusal, which Check answers.
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> Read(absl::string_view pem,
                                                              absl::string_view chain = {});
  static constexpr size_t kMaxChain = 16;
  static constexpr size_t kMaxChainBytes = 64 * 1024;
  // The verified client certificate of a call (exactly one PEM certificate in its auth context),
  // with the chain its client sent.
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> OfCall(const grpc::AuthContext& context);

  // OK while `certificate` has neither expired nor been revoked at `now`; UNAUTHENTICATED saying
  // which, otherwise. Reads nothing from disk: a look-up in memory.
  absl::Status Check(const PeerCertificate& certificate, absl::Time now) const;

  // A call's verified client certificate, read once, to check again between the messages of a
  // call that runs on (a read, an upload, a download) without reading it each time.
  class CallCheck {
   public:
    // OK while the call's certificate has neither expired nor been revoked, now; the reason the
    // certificate could not be read, if it could not.
    absl::Status Check() const;

   private:
    friend class PeerCertificates;
    CallCheck(const PeerCertificates& peers,
              absl::StatusOr<std::shared_ptr<const PeerCertificate>> certificate)
        : peers_(peers), certificate_(std::move(certificate)) {}
    const PeerCertificates& peers_;
    const absl::StatusOr<std::shared_ptr<const PeerCertificate>> certificate_;
  };
  CallCheck ForCall(const grpc::ServerContextBase& context);

  // Looks at the directory now, and reads it again if anything changed.
  void Rescan();

  // Certificates kept; CRLs in force (a CA's latest, and those that can only refuse);
  // certificates revoked (for tests and logs).
  size_t cached() const;
  size_t crls_in_force() const;
  size_t revoked() const;

 private:
  struct Revocations;

  std::shared_ptr<const Revocations> Scan(const std::string& fingerprint,
                                          const Revocations* previous) const;
  std::string Fingerprint() const;
  void RescanLoop();

  const PeerCertificatesOptions options_;

  mutable absl::Mutex cache_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const PeerCertificate>> by_digest_
      ABSL_GUARDED_BY(cache_mu_);

  absl::Mutex rescan_mu_;  // one look at a time (the thread's, a caller's)
  mutable absl::Mutex mu_;
  std::shared_ptr<const Revocations> revocations_ ABSL_GUARDED_BY(mu_);
  absl::Notification stopping_;  // not under mu_: a waiter there would slow every check
  std::thread rescanner_;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_PEER_CERTIFICATES_H_
