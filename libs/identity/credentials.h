// mTLS credentials for medgate servers and clients, reloading certificate files on change.
#ifndef MEDGATE_LIBS_IDENTITY_CREDENTIALS_H_
#define MEDGATE_LIBS_IDENTITY_CREDENTIALS_H_

#include <memory>
#include <string>

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "libs/common/config.h"
#include "libs/identity/peer_certificates.h"

namespace medgate {

// Server credentials that require and verify a client certificate signed by the CA, and refuse,
// before any handler runs, a certificate whose identity is not one of ours (UNAUTHENTICATED).
// Certificate files replaced on disk are picked up for new connections within refresh_seconds.
// TLS 1.2 or 1.3 with AEAD cipher suites only (gRPC's defaults); FAILED_PRECONDITION when the
// environment's GRPC_SSL_CIPHER_SUITES would allow anything else. FAILED_PRECONDITION too, here
// and in MakeChannelCredentials, when the private key file is open to others or writable by its
// group (readable by its owner, and its group, only: 0600, 0640, 0440).
// Every call is checked again, before its handler, against `peers` (made from `tls` when null):
// a call on a connection whose client certificate has expired, or been revoked by a CRL of
// tls.crl_dir, since its handshake is refused UNAUTHENTICATED, saying which.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsConfig& tls, const std::string& trust_domain,
    std::shared_ptr<PeerCertificates> peers = nullptr);

// The expiry and revocation checks for the peers of a server with `tls` (its crl_dir and CA).
std::shared_ptr<PeerCertificates> MakePeerCertificates(const TlsConfig& tls);

// OK when every suite of `list` (a GRPC_SSL_CIPHER_SUITES value, ':'-separated OpenSSL names) is
// an AEAD suite with forward secrecy (TLS 1.3's, or ECDHE with AES-GCM or ChaCha20-Poly1305).
absl::Status CheckCipherSuites(absl::string_view list);

// Client credentials presenting our certificate and verifying the server's: signed by the CA, and
// carrying exactly one URI SAN, `server_identity` (a SPIFFE id such as
// spiffe://TD/service/routing). A certificate the CA signed for anyone else (another service, a
// device, a practitioner) is refused during the handshake, whatever host names it lists: the
// identity is checked instead of the host name, as SPIFFE peers do. INVALID_ARGUMENT when
// `server_identity` is not a spiffe:// URI.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsConfig& tls, const std::string& server_identity);

struct ChannelOptions {
  // gRPC answers data received on a connection with a PING to estimate the link's bandwidth-delay
  // product and size its flow-control window from it. On a stream of small messages (a device's
  // batches and acks) that probe costs each side a write and a read per message, more than the
  // message itself, and the default 64 KiB window is already larger than a batch: turn it off.
  bool bdp_probe = true;
  // Pings after this long without anything received on the connection (zero: none), and how long
  // an unanswered one waits before the connection is closed: finds a connection that died
  // without a word (a NAT dropping it) while a long-lived stream is idle. medgate's servers accept
  // pings every 30 s or more (ServiceServer).
  absl::Duration keepalive_time = absl::ZeroDuration();
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // How long the channel waits before its first reconnect after the connection failed, and at
  // most between later ones (zero: gRPC's own, 1 s growing to 120 s). A client with a backoff
  // of its own sets them to it, or streams fail at once while gRPC waits.
  absl::Duration reconnect_backoff_initial = absl::ZeroDuration();
  absl::Duration reconnect_backoff_max = absl::ZeroDuration();
};

// The gRPC channel arguments of `options` (MakeChannel's, before its credentials).
grpc::ChannelArguments ChannelArgumentsFor(const ChannelOptions& options);

// A channel to `address` (host:port) over mTLS, to the server whose certificate carries
// `server_identity` (see MakeChannelCredentials).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                          const TlsConfig& tls,
                                                          const std::string& server_identity,
                                                          const ChannelOptions& options = {});

// A channel to the configured service `target` (its address and identity), presenting `own`.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeServiceChannel(const ServiceEndpoint& target,
                                                                 const TlsConfig& own,
                                                                 const ChannelOptions& options = {});

// OK when `id` is a medgate SPIFFE id (spiffe://TD/service/NAME, spiffe://TD/ops/NAME or
// spiffe://TD/tenant/T/KIND/X); INVALID_ARGUMENT starting with `what` otherwise.
absl::Status CheckSpiffeId(absl::string_view id, absl::string_view what);

// OK when the certificate file of `endpoint` carries exactly one URI SAN, the identity its clients
// expect (endpoint.identity); FAILED_PRECONDITION naming both otherwise, so that a server with the
// wrong certificate does not start instead of failing every client's handshake.
absl::Status CheckServerIdentity(const ServiceEndpoint& endpoint, absl::string_view trust_domain);

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_CREDENTIALS_H_
