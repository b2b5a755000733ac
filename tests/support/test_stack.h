// A whole local medgate stack for integration tests: migrated PostgreSQL servers, a test PKI,
// and the configuration every service of the stack reads.
#ifndef MEDGATE_TESTS_SUPPORT_TEST_STACK_H_
#define MEDGATE_TESTS_SUPPORT_TEST_STACK_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "libs/common/config.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_pki.h"

namespace medgate::test_support {

// Applies migrations/<kind> ("control", "shard" or "vault") of the source tree to a database.
absl::Status MigrateDatabase(const std::string& conninfo, const std::string& kind);

// One server holding a database of each kind, migrated: "medgate" (control), "shard" and
// "vault", for tests of the schema itself (plans, rights) rather than of a service.
absl::Status CreateAndMigrateEveryKind(PgCluster& cluster);

// The database of each region's key vault (migrations/vault), on the region's server.
inline constexpr char kKeysDatabase[] = "medgate_keys";

class TestStack {
 public:
  // Starts control + fr-1 + de-1 + eu-1, migrates them, and creates a PKI under a temporary
  // directory. `services` get entries under services: (listening on 127.0.0.1:0, each with a
  // certificate of its own for spiffe://TD/service/NAME, also its identity as a client).
  // `extra_yaml` is appended to the config; when it sets `limits`, the stack's own
  // (drain_seconds: 1) is left out, as a key may be given once.
  static absl::StatusOr<std::unique_ptr<TestStack>> Start(const std::vector<std::string>& services,
                                                          const std::string& extra_yaml = "");
  ~TestStack();

  PgClusterSet& clusters() { return *clusters_; }
  TestPki& pki() { return *pki_; }
  // Services keep a reference to it: set services[name].address once a server has its port.
  MedgateConfig& config() { return *config_; }
  void SetAddress(const std::string& service, int port);
  // Makes `service` listen on a fixed free port (for a service run as a separate process).
  int ReservePort(const std::string& service);
  // The configuration as YAML, with the addresses and ports set so far, for a service process.
  absl::Status WriteConfig(const std::string& path) const;
  const std::string& dir() const { return dir_; }

 private:
  TestStack() = default;
  std::string dir_;
  std::unique_ptr<PgClusterSet> clusters_;
  std::unique_ptr<TestPki> pki_;
  std::unique_ptr<MedgateConfig> config_;
  std::string yaml_;
};

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_TEST_STACK_H_
