// Tenants for service integration tests: created, suspended and reactivated as ops would, through
// the routing service, with certificates for their identities.
#ifndef MEDGATE_TESTS_SUPPORT_TENANTS_H_
#define MEDGATE_TESTS_SUPPORT_TENANTS_H_

#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/statusor.h"
#include "tests/support/test_pki.h"

namespace medgate::test_support {

// Creates or replaces `tenant` through the routing service on `routing_port`, as ops: serving
// `territories`, active or suspended, and narrowed to no region (any narrowing it had dropped).
grpc::Status UpsertTenant(const TestPki& pki, int routing_port, const std::string& tenant,
                          const std::vector<std::string>& territories, bool active);

// A certificate named `name` for the identity at `path` of the PKI's trust domain, e.g.
// "/tenant/acme/app/backend".
absl::StatusOr<TestCert> IssueIdentity(const TestPki& pki, const std::string& name,
                                       const std::string& path);

// The certificate of medgate service `service` (spiffe://TD/service/SERVICE) under the PKI's
// directory, issued on first use and kept for the process (the process aborts, saying why, if it
// cannot be issued).
const TestCert& ServiceCert(const TestPki& pki, const std::string& service);

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_TENANTS_H_
