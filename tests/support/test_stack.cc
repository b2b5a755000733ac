// A whole local medgate stack for integration tests.
#include "tests/support/test_stack.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>

#include <atomic>
#include <filesystem>
#include <utility>

#include <pqxx/pqxx>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "libs/common/status_macros.h"
#include "libs/migrate/migrate.h"
#include "libs/pg/pg_status.h"

namespace medgate::test_support {

absl::Status MigrateDatabase(const std::string& conninfo, const std::string& kind) {
  ASSIGN_OR_RETURN(std::vector<migrate::Migration> migrations,
                   migrate::LoadMigrations(absl::StrCat(MEDGATE_SOURCE_DIR, "/migrations/", kind)));
  try {
    pqxx::connection connection(conninfo);
    return migrate::Apply(connection, migrations).status();
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
}

absl::Status CreateAndMigrateEveryKind(PgCluster& cluster) {
  try {
    pqxx::connection admin(cluster.ConnectionString());
    pqxx::nontransaction txn(admin);
    txn.exec0("CREATE DATABASE shard");
    txn.exec0("CREATE DATABASE vault");
  } catch (const std::exception& e) {
    return pg::StatusFromException(e);
  }
  for (const auto& [db, kind] : {std::pair{"medgate", "control"}, {"shard", "shard"},
                                 {"vault", "vault"}}) {
    RETURN_IF_ERROR(MigrateDatabase(cluster.ConnectionString(db), kind));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TestStack>> TestStack::Start(const std::vector<std::string>& services,
                                                            const std::string& extra_yaml) {
  static std::atomic<int> counter{0};
  std::unique_ptr<TestStack> stack(new TestStack());
  stack->dir_ = (std::filesystem::temp_directory_path() /
                 absl::StrCat("medgate-stack-", getpid(), "-", counter.fetch_add(1)))
                    .string();
  std::filesystem::create_directories(stack->dir_);
  ASSIGN_OR_RETURN(stack->clusters_, PgClusterSet::Start());
  RETURN_IF_ERROR(MigrateDatabase(stack->clusters_->control().ConnectionString(), "control"));
  for (PgCluster* region : stack->clusters_->regions()) {
    RETURN_IF_ERROR(MigrateDatabase(region->ConnectionString(), "shard"));
    // The region's key vault: a database of its own (on the shard's server here; apart from it
    // in production).
    try {
      pqxx::connection admin(region->ConnectionString());
      pqxx::nontransaction txn(admin);
      txn.exec0(absl::StrCat("CREATE DATABASE ", kKeysDatabase));
    } catch (const std::exception& e) {
      return pg::StatusFromException(e);
    }
    RETURN_IF_ERROR(MigrateDatabase(region->ConnectionString(kKeysDatabase), "vault"));
  }
  ASSIGN_OR_RETURN(stack->pki_, TestPki::Create(stack->dir_));
  const TestPki& pki = *stack->pki_;
  PgClusterSet& pg = *stack->clusters_;
  const std::string eea = "[BE, NL, LU, AT, IT, ES, PT, IE]";
  std::string yaml = absl::StrCat(
      "trust_domain: ", pki.trust_domain(), "\nca: ", pki.ca_path(), "\n",
      // `extra_yaml` may set limits of its own (a key given twice is refused).
      absl::StartsWith(extra_yaml, "limits:") || absl::StrContains(extra_yaml, "\nlimits:")
          ? ""
          : "limits: {drain_seconds: 1}\n",
      "control_db: {conninfo: \"", pg.control().ConnectionString(), "\", acquire_timeout_ms: 1000}\n",
      "regions:\n",
      "  - {id: fr-1, territories: [FR, BE, NL, LU, AT, IT, ES, PT, IE], db: {conninfo: \"",
      pg.region("fr-1").ConnectionString(), "\", acquire_timeout_ms: 1000}, keys_db: {conninfo: \"",
      pg.region("fr-1").ConnectionString(kKeysDatabase), "\", acquire_timeout_ms: 1000}}\n",
      "  - {id: de-1, territories: [DE], db: {conninfo: \"", pg.region("de-1").ConnectionString(),
      "\", acquire_timeout_ms: 1000}, keys_db: {conninfo: \"",
      pg.region("de-1").ConnectionString(kKeysDatabase), "\", acquire_timeout_ms: 1000}}\n",
      "  - {id: eu-1, territories: ", eea, ", db: {conninfo: \"",
      pg.region("eu-1").ConnectionString(), "\", acquire_timeout_ms: 1000}, keys_db: {conninfo: \"",
      pg.region("eu-1").ConnectionString(kKeysDatabase), "\", acquire_timeout_ms: 1000}}\n",
      "routing:\n  seed_rules:\n",
      "    - {territory: FR, regions: [fr-1], readable_from: [FR]}\n",
      "    - {territory: DE, regions: [de-1], readable_from: [DE]}\n");
  for (const char* t : {"BE", "NL", "LU", "AT", "IT", "ES", "PT", "IE"}) {
    absl::StrAppend(&yaml, "    - {territory: ", t, ", regions: [eu-1, fr-1]}\n");
  }
  absl::StrAppend(&yaml, "services:\n");
  for (const std::string& name : services) {
    // Each service its own certificate, for spiffe://TD/service/NAME: what its clients require.
    ASSIGN_OR_RETURN(TestCert cert, pki.IssueServer(absl::StrCat(name, "-server"), name));
    absl::StrAppend(&yaml, "  ", name, ":\n    listen: 127.0.0.1:0\n    tls: {cert: ",
                    cert.cert_path, ", key: ", cert.key_path, "}\n");
  }
  absl::StrAppend(&yaml, extra_yaml);
  stack->yaml_ = yaml;
  ASSIGN_OR_RETURN(ConfigNode root, ConfigNode::Parse(yaml));
  ASSIGN_OR_RETURN(MedgateConfig config, ParseMedgateConfig(root));
  stack->config_ = std::make_unique<MedgateConfig>(std::move(config));
  return stack;
}

void TestStack::SetAddress(const std::string& service, int port) {
  config_->services[service].address = absl::StrCat("127.0.0.1:", port);
  const std::string block = absl::StrCat("  ", service, ":\n");
  size_t at = yaml_.find(block);
  if (at == std::string::npos) return;
  at += block.size();
  // An address set before is replaced: a key given twice is refused.
  const std::string line = absl::StrCat("    address: 127.0.0.1:", port, "\n");
  if (yaml_.compare(at, 13, "    address: ") == 0) {
    yaml_.replace(at, yaml_.find('\n', at) + 1 - at, line);
  } else {
    yaml_.insert(at, line);
  }
}

int TestStack::ReservePort(const std::string& service) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  close(fd);
  config_->services[service].listen = absl::StrCat("127.0.0.1:", port);
  const std::string from = absl::StrCat("  ", service, ":\n    listen: 127.0.0.1:0\n");
  size_t at = yaml_.find(from);
  if (at != std::string::npos) {
    yaml_.replace(at, from.size(), absl::StrCat("  ", service, ":\n    listen: 127.0.0.1:", port, "\n"));
  }
  SetAddress(service, port);
  return port;
}

absl::Status TestStack::WriteConfig(const std::string& path) const {
  std::FILE* out = std::fopen(path.c_str(), "w");
  if (out == nullptr) return absl::InternalError(absl::StrCat("cannot write ", path));
  std::fwrite(yaml_.data(), 1, yaml_.size(), out);
  std::fclose(out);
  return absl::OkStatus();
}

TestStack::~TestStack() {
  clusters_.reset();
  pki_.reset();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

}  // namespace medgate::test_support
