// Reads certificates back for test assertions, independently of how medgate_devpki wrote them.
#ifndef MEDGATE_TESTS_SUPPORT_X509_INSPECT_H_
#define MEDGATE_TESTS_SUPPORT_X509_INSPECT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace medgate::test_support {

struct SubjectAltNames {
  std::vector<std::string> uris;
  std::vector<std::string> dns;
  std::vector<std::string> ips;  // Printed form: "127.0.0.1", "::1".
  bool present = false;          // Whether the extension exists at all.
};

absl::StatusOr<SubjectAltNames> ReadSubjectAltNames(const std::string& cert_pem);

// Verifies `cert_pem` against `ca_pem` as the only trust anchor with X509_verify_cert, as a TLS
// peer would (purpose sslclient when `as_client`, else sslserver). Returns X509_V_OK or the
// X509_V_ERR_* code; an error status only when the inputs cannot be parsed.
absl::StatusOr<int> VerifyCertificate(const std::string& ca_pem, const std::string& cert_pem,
                                      bool as_client = true);

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_X509_INSPECT_H_
