// Declarative per-RPC role check: each service lists which identity kinds may call each RPC.
#ifndef MEDGATE_LIBS_IDENTITY_AUTHZ_H_
#define MEDGATE_LIBS_IDENTITY_AUTHZ_H_

#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include <grpcpp/server_context.h>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "libs/identity/principal.h"

namespace medgate {

struct RpcRule {
  absl::string_view method;  // the RPC name, e.g. "PlacePatient"
  std::initializer_list<PrincipalKind> allowed;
};

// An RPC not listed is denied to everybody (default deny).
class RpcPolicy {
 public:
  RpcPolicy(std::string trust_domain, std::initializer_list<RpcRule> rules);

  // The caller's Principal if its kind may call `method`: UNAUTHENTICATED without a valid
  // identity, PERMISSION_DENIED for a kind not allowed or an RPC not listed.
  absl::StatusOr<Principal> Authorize(const grpc::ServerContextBase& context,
                                      absl::string_view method) const;

  // The same decision for an already known Principal (pure; used by tests).
  absl::Status Check(const Principal& principal, absl::string_view method) const;

  const std::string& trust_domain() const { return trust_domain_; }

 private:
  std::string trust_domain_;
  std::map<std::string, std::set<PrincipalKind>, std::less<>> rules_;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_AUTHZ_H_
