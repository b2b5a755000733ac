// Declarative per-RPC role check.
#include "absl/strings/string_view.h"
#include "libs/identity/authz.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace medgate {

ServiceIdentities ConfiguredServiceIdentities(const MedgateConfig& config) {
  ServiceIdentities identities;
  for (const auto& [name, endpoint] : config.services) identities[name] = endpoint.identity;
  return identities;
}

RpcPolicy::RpcPolicy(std::string trust_domain, std::initializer_list<RpcRule> rules,
                     const ServiceIdentities& identities)
    : trust_domain_(std::move(trust_domain)) {
  for (const RpcRule& rule : rules) {
    rules_[std::string(rule.method)].insert(rule.allowed.begin(), rule.allowed.end());
    calls_[std::string(rule.method)] = rule.calls;
    if (rule.services.size() == 0) continue;
    ServiceCallers& callers = service_callers_[std::string(rule.method)];
    for (absl::string_view name : rule.services) {
      auto configured = identities.find(name);
      callers.names.emplace_back(name);
      callers.ids.insert(configured != identities.end()
                             ? configured->second
                             : absl::StrCat("spiffe://", trust_domain_, "/service/", name));
    }
  }
}

absl::Status RpcPolicy::Check(const Principal& principal, absl::string_view method) const {
  if (absl::Status s = CheckRole(principal, method); !s.ok()) return s;
  if (gate_ == nullptr || principal.tenant.empty()) return absl::OkStatus();
  return gate_->CheckActive(principal.tenant, CallsOf(method));
}

double RpcPolicy::CallsOf(absl::string_view method) const {
  auto it = calls_.find(method);
  return it == calls_.end() ? 1 : it->second;
}

absl::Status RpcPolicy::CheckRole(const Principal& principal, absl::string_view method) const {
  auto it = rules_.find(method);
  if (it == rules_.end() || !it->second.contains(principal.kind)) {
    const absl::string_view kind = PrincipalKindName(principal.kind);
    const bool vowel = !kind.empty() && absl::string_view("aeiou").find(kind[0]) != absl::string_view::npos;
    return absl::PermissionDeniedError(
        absl::StrCat(vowel ? "an " : "a ", kind, " identity may not call ", method));
  }
  if (principal.kind != PrincipalKind::kService) return absl::OkStatus();
  auto callers = service_callers_.find(method);
  if (callers != service_callers_.end() && !callers->second.ids.contains(principal.spiffe_id)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the service identity ", principal.spiffe_id, " may not call ", method, ": only ",
        absl::StrJoin(callers->second.names, ", "), " may"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Principal> RpcPolicy::Authorize(const grpc::ServerContextBase& context,
                                               absl::string_view method) const {
  absl::StatusOr<Principal> principal = AuthorizeRole(context, method);
  if (!principal.ok() || gate_ == nullptr || principal->tenant.empty()) return principal;
  if (absl::Status s = gate_->CheckActive(principal->tenant, CallsOf(method)); !s.ok()) return s;
  return principal;
}

absl::StatusOr<Principal> RpcPolicy::AuthorizeRole(const grpc::ServerContextBase& context,
                                                   absl::string_view method) const {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (!auth) return absl::UnauthenticatedError("client identity refused: no TLS peer");
  absl::StatusOr<Principal> principal = PrincipalFromAuthContext(*auth, trust_domain_);
  if (!principal.ok()) return principal.status();
  if (absl::Status s = CheckRole(*principal, method); !s.ok()) return s;
  return principal;
}

}  // namespace medgate
