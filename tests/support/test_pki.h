// Certificates for mTLS tests, minted at test time: good identities of every kind and bad ones.
#ifndef MEDGATE_TESTS_SUPPORT_TEST_PKI_H_
#define MEDGATE_TESTS_SUPPORT_TEST_PKI_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "libs/devpki/devpki.h"

namespace medgate::test_support {

// One certificate and its key, as files (what servers and clients are configured with) and as PEM
// text (what in-process gRPC credentials take).
struct TestCert {
  std::string cert_path;
  std::string key_path;
  std::string cert_pem;
  std::string key_pem;
  std::string serial;  // Hex; tells a rotated certificate from the one it replaces.
};

// A test CA and a fixed cast of certificates under `dir`, each as NAME.crt and NAME.key. TD below
// is the trust domain given to Create. Unless said otherwise a certificate is signed by the test
// CA, valid from an hour ago for a year, with serverAuth and clientAuth.
class TestPki {
 public:
  static absl::StatusOr<std::unique_ptr<TestPki>> Create(std::string dir,
                                                         std::string trust_domain = "medgate.test");

  TestPki(const TestPki&) = delete;
  TestPki& operator=(const TestPki&) = delete;

  const std::string& dir() const { return dir_; }
  const std::string& trust_domain() const { return trust_domain_; }
  // "spiffe://TD" + path, e.g. SpiffeId("/tenant/acme/app/backend").
  std::string SpiffeId(absl::string_view path) const;

  // The CA every server and client in a test trusts.
  const std::string& ca_path() const { return ca_.cert_path; }
  const std::string& ca_pem() const { return ca_.cert_pem; }
  const TestCert& ca() const { return ca_; }

  // For the server under test: DNS:localhost, IP:127.0.0.1, URI spiffe://TD/service/test-server.
  const TestCert& server() const { return server_; }
  // The identity server() carries, which a client of it expects.
  std::string server_identity() const { return SpiffeId("/service/test-server"); }
  // spiffe://TD/service/routing
  const TestCert& service() const { return service_; }
  // spiffe://TD/ops/alice
  const TestCert& ops() const { return ops_; }
  // Tenant acme: spiffe://TD/tenant/acme/{device/dev-1, practitioner/p-1, app/backend}.
  const TestCert& device() const { return device_; }
  const TestCert& practitioner() const { return practitioner_; }
  const TestCert& app() const { return app_; }
  // Tenant globex, same shapes and ids: spiffe://TD/tenant/globex/{device/dev-1, ...}.
  const TestCert& globex_device() const { return globex_device_; }
  const TestCert& globex_practitioner() const { return globex_practitioner_; }
  const TestCert& globex_app() const { return globex_app_; }

  // Certificates a server must refuse. A second, untrusted CA (its files are a CA certificate and
  // key).
  const TestCert& rogue_ca() const { return rogue_ca_; }
  // spiffe://TD/tenant/acme/app/backend, but signed by the rogue CA.
  const TestCert& rogue_signed() const { return rogue_signed_; }
  // spiffe://TD/tenant/acme/app/backend, valid from two days ago until yesterday.
  const TestCert& expired() const { return expired_; }
  // Two URI SANs: spiffe://TD/tenant/acme/app/backend and spiffe://TD/ops/alice.
  const TestCert& two_uris() const { return two_uris_; }
  // No subjectAltName extension at all.
  const TestCert& no_san() const { return no_san_; }
  // spiffe://evil.test/tenant/acme/app/backend: right shape, foreign trust domain.
  const TestCert& other_trust_domain() const { return other_trust_domain_; }
  // spiffe://TD/robot/x: trusted domain, but no identity kind medgate knows.
  const TestCert& unknown_form() const { return unknown_form_; }

  // Issues one more certificate from the test CA, as dir/NAME.{crt,key} (overwriting).
  absl::StatusOr<TestCert> Issue(const std::string& name, const devpki::LeafOptions& options) const;
  // Issues an intermediate CA from the test CA, and from it a certificate saved as
  // dir/NAME.{crt,key}, the intermediate after it in the .crt: the chain its client sends. Sets
  // `intermediate_serial` to the intermediate's serial.
  absl::StatusOr<TestCert> IssueThroughIntermediate(const std::string& name,
                                                    const devpki::LeafOptions& options,
                                                    std::string* intermediate_serial) const;
  // A fresh certificate with the same SANs as server() but a new key and serial: for
  // certificate-rotation tests. With `service`, for spiffe://TD/service/SERVICE instead.
  absl::StatusOr<TestCert> IssueServer(const std::string& name,
                                       const std::string& service = "test-server") const;
  // Writes a CRL of the test CA revoking `serials` (TestCert::serial) into `dir`, as the next
  // <hash>.rN; answers its path.
  absl::StatusOr<std::string> WriteCrl(const std::vector<std::string>& serials,
                                       const std::string& dir) const;

 private:
  TestPki(std::string dir, std::string trust_domain, devpki::Credential ca);

  absl::Status IssueAll();
  absl::StatusOr<TestCert> Save(const devpki::Credential& credential,
                                const std::string& name) const;

  std::string dir_;
  std::string trust_domain_;
  devpki::Credential ca_credential_;
  TestCert ca_;
  TestCert server_;
  TestCert service_;
  TestCert ops_;
  TestCert device_;
  TestCert practitioner_;
  TestCert app_;
  TestCert globex_device_;
  TestCert globex_practitioner_;
  TestCert globex_app_;
  TestCert rogue_ca_;
  TestCert rogue_signed_;
  TestCert expired_;
  TestCert two_uris_;
  TestCert no_san_;
  TestCert other_trust_domain_;
  TestCert unknown_form_;
};

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_TEST_PKI_H_
