// Throwaway PostgreSQL 15 servers on loopback for tests: one per PgCluster, four per PgClusterSet.
#ifndef MEDGATE_TESTS_SUPPORT_PG_CLUSTER_H_
#define MEDGATE_TESTS_SUPPORT_PG_CLUSTER_H_

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace medgate::test_support {

// A real PostgreSQL server in a fresh temporary directory, listening on 127.0.0.1 on a free port,
// with superuser `medgate`, a random password (scram-sha-256) and a database `medgate`. The
// services' roles (libs/pg/database_roles.h) exist, with the same password and no rights yet.
//
// Durability is off (fsync, synchronous_commit, full_page_writes, wal_level=minimal): the data is
// throwaway and start-up speed matters more (benchmarks turn it on: UseProductionSettings). The
// data directory is a copy of a template that initdb builds once per PostgreSQL version and user,
// kept as BASE/medgate-pg-template-v1-<version>-uid<euid> and reused by later runs (rebuilt if
// found incomplete). BASE is $MEDGATE_PG_TMPDIR if set, else /dev/shm if it is a tmpfs with 2 GiB free
// (file creation on disk is what makes clusters slow to copy and to migrate), else $TMPDIR, else
// /tmp. Clusters live in BASE/medgate-pg-<name>-XXXXXX.
//
// Run as root (as in CI containers), the server runs as the `postgres` system user, because
// PostgreSQL refuses to run as root.
//
// Cleanup: the destructor stops the server and deletes its directory. In case the test process dies
// without running it (crash, SIGKILL, ctest timeout, exit() with the cluster still alive), each
// cluster has a watchdog process, in its own session, that notices its parent is gone and stops the
// server and deletes the directory. No server outlives its test process.
//
// Not thread-safe: call Stop() and StartAgain() from one thread at a time.
class PgCluster {
 public:
  // `name` ("control", "fr-1", ...) only labels the directory and error messages.
  static absl::StatusOr<std::unique_ptr<PgCluster>> Start(std::string name);

  PgCluster(const PgCluster&) = delete;
  PgCluster& operator=(const PgCluster&) = delete;
  ~PgCluster();

  // libpq keyword/value form: "host=127.0.0.1 port=N dbname=medgate user=medgate password=...
  // connect_timeout=5". `dbname` names another database for tests that create their own; `user`
  // one of the services' roles (libs/pg/database_roles.h), which have the same password.
  std::string ConnectionString(absl::string_view dbname = "medgate",
                               absl::string_view user = "") const;

  // "database user" for each database and user connected to the server now, but for the
  // connection that asks.
  std::set<std::string> ClientConnections() const;

  const std::string& name() const { return name_; }
  int port() const { return port_; }
  const std::string& password() const { return password_; }
  // The server log: attach it to a failure message when the server misbehaves.
  std::string log_path() const;
  bool running() const { return running_; }

  // What a benchmark runs on: the settings of a production shard instead of the test settings.
  // Durable commits (fsync, synchronous_commit and full_page_writes on), WAL for replicas, and
  // memory and WAL sized for a write-heavy load (the test settings' 32 MB of shared buffers make
  // backends write out dirty pages themselves, inside their transactions), and WAL segments of
  // PostgreSQL's default size instead of the template's 1 MB. The server restarts on the same port
  // with them, with min_wal_size of WAL files ready for reuse and its shared buffers' memory in
  // place, as a server that has been running has them (see PrepareWalFiles and
  // PrewarmSharedBuffers).
  struct ProductionSettings {
    int wal_segment_mb = 16;
    std::string shared_buffers = "1GB";
    std::string wal_buffers = "16MB";
    std::string max_wal_size = "1GB";
    // A checkpoint cycle's worth of WAL for a write-heavy shard, kept for reuse: with less, files
    // are created (16 MB of zeros written while commits wait) whenever the load rises.
    std::string min_wal_size = "1GB";
  };
  absl::Status UseProductionSettings(const ProductionSettings& settings);

  // The settings a benchmark's figures depend on, as the running server reports them, for the
  // benchmark to print: "fsync=on synchronous_commit=on shared_buffers=1GB ...".
  absl::StatusOr<std::string> DescribeSettings();

  // Fast shutdown (pg_ctl stop -m fast): what a failed shard looks like to its clients.
  absl::Status Stop();
  // Restarts on the same data directory and port, so connection strings handed out stay valid.
  // Fails if another process took the port meanwhile.
  absl::Status StartAgain();
  // Sends `signal` to the server and its backends. SIGSTOP: a shard that stops answering without
  // closing its connections, as behind a network partition; SIGCONT: it answers again.
  absl::Status Signal(int signal);

 private:
  explicit PgCluster(std::string name);

  absl::Status Create();
  absl::Status StartServer();
  absl::Status SetPassword();
  absl::Status PrepareWalFiles();
  absl::Status PrewarmSharedBuffers();
  // Runs statements as the superuser over the private Unix socket, each in its own transaction.
  std::string SuperuserConnectionString() const;
  absl::Status RunAsSuperuser(const std::vector<std::string>& statements);
  std::string data_dir() const;

  std::string name_;
  std::string dir_;  // Temporary directory holding data/, run/ (socket) and postgres.log.
  int port_ = 0;
  std::string password_;
  bool running_ = false;
  int watchdog_fd_ = -1;  // Write end of the watchdog's stdin; its closing is the watchdog's cue.
};

// One control cluster and a set of regional clusters (fr-1, de-1, eu-1 by default), started in
// parallel. Stops them, also in parallel, when destroyed.
class PgClusterSet {
 public:
  static absl::StatusOr<std::unique_ptr<PgClusterSet>> Start(
      std::vector<std::string> region_names = {"fr-1", "de-1", "eu-1"});

  PgClusterSet(const PgClusterSet&) = delete;
  PgClusterSet& operator=(const PgClusterSet&) = delete;
  ~PgClusterSet();

  PgCluster& control() const { return *control_; }
  // Aborts the test binary on an unknown name: that is a bug in the test, not a test failure.
  PgCluster& region(absl::string_view name) const;
  // In the order given to Start().
  std::vector<PgCluster*> regions() const;

 private:
  PgClusterSet() = default;

  std::unique_ptr<PgCluster> control_;
  std::vector<std::unique_ptr<PgCluster>> regions_;
};

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_PG_CLUSTER_H_
