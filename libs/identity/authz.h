// Declarative per-RPC role check: each service lists which identity kinds may call each RPC.
#ifndef MEDGATE_LIBS_IDENTITY_AUTHZ_H_
#define MEDGATE_LIBS_IDENTITY_AUTHZ_H_

#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/server_context.h>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "libs/common/config.h"
#include "libs/identity/principal.h"

namespace medgate {

struct RpcRule {
  absl::string_view method;  // the RPC name, e.g. "PlacePatient"
  std::initializer_list<PrincipalKind> allowed;
  // What one call of it counts against its tenant's call rate (the gate's): more than 1 for a
  // call that costs the service more (ReadVitals scans a shard and commits an audit entry).
  double calls = 1;
  // When `allowed` has kService: the medgate services, by name ("ingest"), whose identities may
  // call it; empty for any service's. A service reaches only what its work needs: one whose
  // certificate leaks does not open every internal RPC.
  std::initializer_list<absl::string_view> services = {};
};

// The SPIFFE ids of medgate's services by name, where the configuration gives one other than
// spiffe://TRUST_DOMAIN/service/NAME (services.NAME.identity).
using ServiceIdentities = std::map<std::string, std::string, std::less<>>;

// Those of the services `config` lists.
ServiceIdentities ConfiguredServiceIdentities(const MedgateConfig& config);

// Whether a tenant's identities may act now. Implementations cache what they learn.
class TenantGate {
 public:
  virtual ~TenantGate() = default;

  // OK while `tenant` is registered and active; PERMISSION_DENIED when it is suspended or not
  // registered; UNAVAILABLE (or another error) when that cannot be known now: fail closed. A gate
  // may also count the calls it lets through, `calls` for this one (RESOURCE_EXHAUSTED past its
  // rate): ask it once per call.
  virtual absl::Status CheckActive(absl::string_view tenant, double calls = 1) = 0;
};

// An RPC not listed is denied to everybody (default deny).
class RpcPolicy {
 public:
  // `identities` names the services that rules restrict to some services (RpcRule::services).
  RpcPolicy(std::string trust_domain, std::initializer_list<RpcRule> rules,
            const ServiceIdentities& identities = {});

  // The caller's Principal if its kind may call `method` and, for an identity of a tenant
  // (device, practitioner, app), the tenant gate (if set) lets its tenant act: UNAUTHENTICATED
  // without a valid identity, PERMISSION_DENIED for a kind not allowed, an RPC not listed or a
  // suspended or unregistered tenant.
  absl::StatusOr<Principal> Authorize(const grpc::ServerContextBase& context,
                                      absl::string_view method) const;

  // Authorize without the tenant gate, for a call that learns its tenant's state another way
  // and must not wait for the gate (a device stream: routing's device answer carries it).
  absl::StatusOr<Principal> AuthorizeRole(const grpc::ServerContextBase& context,
                                          absl::string_view method) const;

  // Every tenant identity's call asks `gate` (not owned; must outlive the policy) first.
  void set_tenant_gate(TenantGate* gate) { gate_ = gate; }

  // The same decisions for an already known Principal: Check as Authorize, CheckRole as
  // AuthorizeRole.
  absl::Status Check(const Principal& principal, absl::string_view method) const;
  absl::Status CheckRole(const Principal& principal, absl::string_view method) const;

  const std::string& trust_domain() const { return trust_domain_; }

 private:
  double CallsOf(absl::string_view method) const;

  std::string trust_domain_;
  TenantGate* gate_ = nullptr;
  std::map<std::string, std::set<PrincipalKind>, std::less<>> rules_;
  std::map<std::string, double, std::less<>> calls_;  // by method: what a call counts
  // By method, for those a rule restricts to some services: their names, and their SPIFFE ids.
  struct ServiceCallers {
    std::vector<std::string> names;
    std::set<std::string, std::less<>> ids;
  };
  std::map<std::string, ServiceCallers, std::less<>> service_callers_;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_IDENTITY_AUTHZ_H_
