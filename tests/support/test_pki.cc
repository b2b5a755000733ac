// Mints the test PKI described in test_pki.h with medgate_devpki.
#include "tests/support/test_pki.h"

#include <filesystem>
#include <fstream>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/common/status_macros.h"

namespace medgate::test_support {
namespace {

devpki::LeafOptions ClientOptions(std::string common_name, std::vector<std::string> uris) {
  devpki::LeafOptions options;
  options.common_name = std::move(common_name);
  options.uri_sans = std::move(uris);
  return options;
}

}  // namespace

TestPki::TestPki(std::string dir, std::string trust_domain, devpki::Credential ca)
    : dir_(std::move(dir)), trust_domain_(std::move(trust_domain)), ca_credential_(std::move(ca)) {}

absl::StatusOr<std::unique_ptr<TestPki>> TestPki::Create(std::string dir,
                                                         std::string trust_domain) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("test_pki: cannot create ", dir, ": ", ec.message()));
  }
  devpki::CaOptions ca_options;
  ca_options.common_name = absl::StrCat("medgate test CA ", trust_domain);
  ASSIGN_OR_RETURN(devpki::Credential ca, devpki::CreateCa(ca_options));
  // Not make_unique: the constructor is private.
  std::unique_ptr<TestPki> pki(new TestPki(std::move(dir), std::move(trust_domain), std::move(ca)));
  RETURN_IF_ERROR(pki->IssueAll());
  return pki;
}

std::string TestPki::SpiffeId(absl::string_view path) const {
  return absl::StrCat("spiffe://", trust_domain_, path);
}

absl::Status TestPki::IssueAll() {
  ASSIGN_OR_RETURN(ca_, Save(ca_credential_, "ca"));

  const std::string acme_app = SpiffeId("/tenant/acme/app/backend");
  struct Planned {
    TestCert* target;
    std::string name;
    devpki::LeafOptions options;
  };
  std::vector<Planned> planned = {
      {&service_, "service", ClientOptions("routing", {SpiffeId("/service/routing")})},
      {&ops_, "ops", ClientOptions("alice", {SpiffeId("/ops/alice")})},
      {&device_, "device", ClientOptions("dev-1", {SpiffeId("/tenant/acme/device/dev-1")})},
      {&practitioner_, "practitioner",
       ClientOptions("p-1", {SpiffeId("/tenant/acme/practitioner/p-1")})},
      {&app_, "app", ClientOptions("backend", {acme_app})},
      {&globex_device_, "globex-device",
       ClientOptions("dev-1", {SpiffeId("/tenant/globex/device/dev-1")})},
      {&globex_practitioner_, "globex-practitioner",
       ClientOptions("p-1", {SpiffeId("/tenant/globex/practitioner/p-1")})},
      {&globex_app_, "globex-app",
       ClientOptions("backend", {SpiffeId("/tenant/globex/app/backend")})},
      {&two_uris_, "two-uris", ClientOptions("two-uris", {acme_app, SpiffeId("/ops/alice")})},
      {&no_san_, "no-san", ClientOptions("no-san", {})},
      {&other_trust_domain_, "other-trust-domain",
       ClientOptions("backend", {"spiffe://evil.test/tenant/acme/app/backend"})},
      {&unknown_form_, "unknown-form", ClientOptions("x", {SpiffeId("/robot/x")})},
  };
  devpki::LeafOptions expired = ClientOptions("expired", {acme_app});
  expired.not_before = -absl::Hours(48);
  expired.not_after = -absl::Hours(24);
  planned.push_back({&expired_, "expired", expired});

  for (const Planned& plan : planned) {
    ASSIGN_OR_RETURN(*plan.target, Issue(plan.name, plan.options));
  }
  ASSIGN_OR_RETURN(server_, IssueServer("server"));

  devpki::CaOptions rogue_options;
  rogue_options.common_name = "rogue CA";
  ASSIGN_OR_RETURN(devpki::Credential rogue, devpki::CreateCa(rogue_options));
  ASSIGN_OR_RETURN(rogue_ca_, Save(rogue, "rogue-ca"));
  ASSIGN_OR_RETURN(devpki::Credential rogue_signed,
                   devpki::IssueLeaf(rogue, ClientOptions("backend", {acme_app})));
  ASSIGN_OR_RETURN(rogue_signed_, Save(rogue_signed, "rogue-signed"));
  return absl::OkStatus();
}

absl::StatusOr<std::string> TestPki::WriteCrl(const std::vector<std::string>& serials,
                                              const std::string& dir) const {
  return devpki::WriteCrl(ca_credential_, serials, dir);
}

absl::StatusOr<TestCert> TestPki::Issue(const std::string& name,
                                        const devpki::LeafOptions& options) const {
  ASSIGN_OR_RETURN(devpki::Credential credential, devpki::IssueLeaf(ca_credential_, options));
  return Save(credential, name);
}

absl::StatusOr<TestCert> TestPki::IssueThroughIntermediate(
    const std::string& name, const devpki::LeafOptions& options,
    std::string* intermediate_serial) const {
  devpki::CaOptions ca_options;
  ca_options.common_name = absl::StrCat("medgate issuing CA for ", name);
  ASSIGN_OR_RETURN(devpki::Credential intermediate,
                   devpki::IssueIntermediateCa(ca_credential_, ca_options));
  ASSIGN_OR_RETURN(devpki::Credential credential, devpki::IssueLeaf(intermediate, options));
  ASSIGN_OR_RETURN(TestCert cert, Save(credential, name));
  ASSIGN_OR_RETURN(std::string intermediate_pem, intermediate.CertPem());
  {
    std::ofstream out(cert.cert_path, std::ios::app);
    out << intermediate_pem;
    if (!out.flush()) {
      return absl::InternalError(absl::StrCat("cannot append to ", cert.cert_path));
    }
  }
  cert.cert_pem += intermediate_pem;
  *intermediate_serial = intermediate.SerialHex();
  return cert;
}

absl::StatusOr<TestCert> TestPki::IssueServer(const std::string& name,
                                              const std::string& service) const {
  devpki::LeafOptions options = ClientOptions(service, {SpiffeId(absl::StrCat("/service/", service))});
  options.dns_sans = {"localhost"};
  options.ip_sans = {"127.0.0.1"};
  return Issue(name, options);
}

absl::StatusOr<TestCert> TestPki::Save(const devpki::Credential& credential,
                                       const std::string& name) const {
  TestCert cert;
  cert.cert_path = absl::StrCat(dir_, "/", name, ".crt");
  cert.key_path = absl::StrCat(dir_, "/", name, ".key");
  ASSIGN_OR_RETURN(cert.cert_pem, credential.CertPem());
  ASSIGN_OR_RETURN(cert.key_pem, credential.KeyPem());
  cert.serial = credential.SerialHex();
  RETURN_IF_ERROR(credential.WriteFiles(cert.cert_path, cert.key_path));
  return cert;
}

}  // namespace medgate::test_support
