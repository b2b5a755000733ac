// Tenants for service integration tests.
#include "tests/support/tenants.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <utility>

#include <grpcpp/client_context.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/routing.grpc.pb.h"

namespace medgate::test_support {

grpc::Status UpsertTenant(const TestPki& pki, int routing_port, const std::string& tenant,
                          const std::vector<std::string>& territories, bool active) {
  const TestCert& ops = pki.ops();
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      MakeChannel(absl::StrCat("127.0.0.1:", routing_port),
                  TlsConfig{ops.cert_path, ops.key_path, pki.ca_path(), 60},
                  pki.SpiffeId("/service/routing"));
  if (!channel.ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL, std::string(channel.status().message()));
  }
  v1::UpsertTenantRequest request;
  request.set_request_id(absl::StrCat(tenant, active ? "-active" : "-suspended"));
  request.mutable_tenant()->set_tenant_id(tenant);
  request.mutable_tenant()->set_display_name(tenant);
  for (const std::string& territory : territories) request.mutable_tenant()->add_territories(territory);
  request.mutable_tenant()->set_active(active);
  // The tenant as given: any narrowing it had is dropped.
  request.set_drop_region_narrowing(true);
  v1::UpsertTenantResponse response;
  grpc::ClientContext context;
  return v1::TenantRouting::NewStub(*channel)->UpsertTenant(&context, request, &response);
}

absl::StatusOr<TestCert> IssueIdentity(const TestPki& pki, const std::string& name,
                                       const std::string& path) {
  devpki::LeafOptions options;
  options.common_name = name;
  options.uri_sans = {pki.SpiffeId(path)};
  return pki.Issue(name, options);
}

const TestCert& ServiceCert(const TestPki& pki, const std::string& service) {
  static absl::Mutex mu(absl::kConstInit);
  static auto* issued = new std::map<std::pair<std::string, std::string>, TestCert>();
  absl::MutexLock lock(&mu);
  // By the CA too: a suite run again (--gtest_repeat) makes a new PKI in the same directory.
  const std::pair<std::string, std::string> key{pki.ca_pem(), service};
  auto it = issued->find(key);
  if (it == issued->end()) {
    absl::StatusOr<TestCert> cert = IssueIdentity(pki, "svc-" + service, "/service/" + service);
    if (!cert.ok()) {
      // The test PKI issues every other certificate the same way: nothing can go on without it.
      std::fprintf(stderr, "cannot issue the certificate of service %s: %s\n", service.c_str(),
                   cert.status().ToString().c_str());
      std::abort();
    }
    it = issued->emplace(key, *std::move(cert)).first;
  }
  return it->second;
}

}  // namespace medgate::test_support
