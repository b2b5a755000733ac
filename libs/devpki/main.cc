// medgate-devpki: creates (or completes) the local stack's dev PKI under --dir for --trust-domain.
//
// Idempotent: an existing DIR/ca.{crt,key} is reused, and a leaf is only (re)issued when its files
// are missing, unreadable, not signed by that CA, expired or for another trust domain. A freshly
// created CA therefore reissues every leaf: leaves of a lost CA would not verify.
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "libs/devpki/devpki.h"

namespace {

using medgate::devpki::Credential;

struct Leaf {
  std::string name;     // File stem under --dir.
  std::string path;     // URI SAN path after spiffe://TD.
  bool serves = false;  // Services also get localhost SANs: the same cert is their server cert.
};

std::vector<Leaf> Leaves() {
  std::vector<Leaf> leaves;
  for (const char* service : {"routing", "consent", "ingest", "sharing", "audit"}) {
    leaves.push_back({service, absl::StrCat("/service/", service), true});
  }
  leaves.push_back({"ops", "/ops/admin"});
  leaves.push_back({"app", "/tenant/demo/app/backend"});
  leaves.push_back({"practitioner", "/tenant/demo/practitioner/dr-martin"});
  leaves.push_back({"device", "/tenant/demo/device/dev-0001"});
  return leaves;
}

[[noreturn]] void Die(absl::string_view message) {
  std::fprintf(stderr, "medgate-devpki: %.*s\n", static_cast<int>(message.size()), message.data());
  std::exit(1);
}

[[noreturn]] void Usage() { Die("usage: medgate-devpki --dir DIR --trust-domain TRUST_DOMAIN"); }

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Accepts "--flag value" and "--flag=value".
void ParseFlags(int argc, char** argv, std::string& dir, std::string& trust_domain) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    std::string* target = nullptr;
    absl::string_view name = arg.substr(0, arg.find('='));
    if (name == "--dir") target = &dir;
    if (name == "--trust-domain") target = &trust_domain;
    if (target == nullptr) Usage();
    if (name.size() < arg.size()) {
      *target = std::string(arg.substr(name.size() + 1));
    } else if (i + 1 < argc) {
      *target = argv[++i];
    } else {
      Usage();
    }
  }
  if (dir.empty() || trust_domain.empty()) Usage();
  if (trust_domain.find_first_of("/:") != std::string::npos) {
    Die("--trust-domain is a bare name such as medgate.local, without "
        "spiffe:// or a path");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  std::string trust_domain;
  ParseFlags(argc, argv, dir, trust_domain);

  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) Die(absl::StrCat("cannot create ", dir, ": ", error.message()));

  const std::string ca_crt = absl::StrCat(dir, "/ca.crt");
  const std::string ca_key = absl::StrCat(dir, "/ca.key");
  bool new_ca = !Exists(ca_crt);
  medgate::devpki::CaOptions ca_options;
  ca_options.common_name = absl::StrCat("medgate dev CA ", trust_domain);
  absl::StatusOr<Credential> ca =
      new_ca ? medgate::devpki::CreateCa(ca_options) : Credential::ReadFiles(ca_crt, ca_key);
  if (!ca.ok()) Die(ca.status().ToString());
  if (new_ca) {
    if (absl::Status s = ca->WriteFiles(ca_crt, ca_key); !s.ok()) Die(s.ToString());
    std::printf("created %s\n", ca_crt.c_str());
  }

  for (const Leaf& leaf : Leaves()) {
    const std::string crt = absl::StrCat(dir, "/", leaf.name, ".crt");
    const std::string key = absl::StrCat(dir, "/", leaf.name, ".key");
    medgate::devpki::LeafOptions options;
    options.common_name = leaf.name;
    options.uri_sans = {absl::StrCat("spiffe://", trust_domain, leaf.path)};
    if (leaf.serves) {
      options.dns_sans = {"localhost"};
      options.ip_sans = {"127.0.0.1"};
    }
    if (!new_ca) {
      // A rerun with another --trust-domain must not keep leaves naming the old one.
      absl::StatusOr<Credential> existing = Credential::ReadFiles(crt, key);
      if (existing.ok() && existing->UriSans() == options.uri_sans &&
          medgate::devpki::CheckIssuedBy(*existing, *ca, absl::Now()).ok()) {
        continue;
      }
    }
    absl::StatusOr<Credential> issued = medgate::devpki::IssueLeaf(*ca, options);
    if (!issued.ok()) Die(issued.status().ToString());
    if (absl::Status s = issued->WriteFiles(crt, key); !s.ok()) Die(s.ToString());
    std::printf("issued %s (%s)\n", crt.c_str(), options.uri_sans[0].c_str());
  }
  return 0;
}
