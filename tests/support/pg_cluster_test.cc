// Tests PgCluster and PgClusterSet against real PostgreSQL servers.
#include "tests/support/pg_cluster.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <pqxx/pqxx>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace medgate::test_support {
namespace {

std::string QueryOne(const std::string& connection_string, const std::string& sql) {
  pqxx::connection connection(connection_string);
  pqxx::work work(connection);
  std::string value = work.exec1(sql)[0].as<std::string>();
  work.commit();
  return value;
}

bool Accepts(const std::string& connection_string) {
  try {
    pqxx::connection connection(connection_string);
    return true;
  } catch (const pqxx::broken_connection&) {
    return false;
  }
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Polls `condition` until it holds or `timeout` passes; for effects of another process.
template <typename Condition>
bool WaitFor(Condition condition, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

class PgClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::Time start = absl::Now();
    absl::StatusOr<std::unique_ptr<PgClusterSet>> clusters = PgClusterSet::Start();
    ASSERT_TRUE(clusters.ok()) << clusters.status();
    // Printed, never asserted: tests do not judge timings.
    std::printf("PgClusterSet::Start took %s\n", absl::FormatDuration(absl::Now() - start).c_str());
    clusters_ = *std::move(clusters);
  }
  static void TearDownTestSuite() {
    absl::Time start = absl::Now();
    clusters_.reset();
    std::printf("PgClusterSet teardown took %s\n",
                absl::FormatDuration(absl::Now() - start).c_str());
  }

  void SetUp() override { ASSERT_NE(clusters_, nullptr); }

  static std::vector<PgCluster*> All() {
    std::vector<PgCluster*> all = {&clusters_->control()};
    for (PgCluster* region : clusters_->regions()) all.push_back(region);
    return all;
  }

  static inline std::unique_ptr<PgClusterSet> clusters_;
};

TEST_F(PgClusterTest, EveryClusterAnswersAsMedgateOverTcp) {
  for (PgCluster* cluster : All()) {
    SCOPED_TRACE(cluster->name());
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "select 1"), "1");
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "select current_database()"), "medgate");
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "select current_user"), "medgate");
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "select inet_server_port()"),
              std::to_string(cluster->port()));
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "show fsync"), "off");
    EXPECT_GE(std::stoi(QueryOne(cluster->ConnectionString(), "show max_connections")), 200);
  }
}

TEST_F(PgClusterTest, ConnectionStringHasTheAgreedForm) {
  PgCluster& control = clusters_->control();
  EXPECT_EQ(control.ConnectionString(), absl::StrCat("host=127.0.0.1 port=", control.port(),
                                                     " dbname=medgate user=medgate password=",
                                                     control.password(), " connect_timeout=5"));
  EXPECT_EQ(QueryOne(control.ConnectionString("postgres"), "select current_database()"),
            "postgres");
}

TEST_F(PgClusterTest, RegionsAreNamedInOrder) {
  std::vector<PgCluster*> regions = clusters_->regions();
  ASSERT_EQ(regions.size(), 3u);
  EXPECT_EQ(regions[0]->name(), "fr-1");
  EXPECT_EQ(regions[1]->name(), "de-1");
  EXPECT_EQ(regions[2]->name(), "eu-1");
  EXPECT_EQ(&clusters_->region("de-1"), regions[1]);
  EXPECT_EQ(clusters_->control().name(), "control");
}

TEST_F(PgClusterTest, ClustersAreDistinctServers) {
  std::set<int> ports;
  std::set<std::string> passwords;
  for (PgCluster* cluster : All()) {
    ports.insert(cluster->port());
    passwords.insert(cluster->password());
    pqxx::connection connection(cluster->ConnectionString());
    pqxx::work work(connection);
    work.exec0("create table whoami (name text)");
    work.exec_params0("insert into whoami values ($1)", cluster->name());
    work.commit();
  }
  EXPECT_EQ(ports.size(), 4u);
  EXPECT_EQ(passwords.size(), 4u);
  for (PgCluster* cluster : All()) {
    EXPECT_EQ(QueryOne(cluster->ConnectionString(), "select string_agg(name, ',') from whoami"),
              cluster->name());
  }
}

TEST_F(PgClusterTest, TcpRequiresThePassword) {
  PgCluster& region = clusters_->region("fr-1");
  EXPECT_FALSE(Accepts(absl::StrCat("host=127.0.0.1 port=", region.port(),
                                    " dbname=medgate user=medgate password=wrong"
                                    " connect_timeout=5")));
  EXPECT_FALSE(Accepts(absl::StrCat("host=127.0.0.1 port=", region.port(),
                                    " dbname=medgate user=medgate password= connect_timeout=5")));
  // Another cluster's password does not open this one.
  EXPECT_FALSE(Accepts(absl::StrCat("host=127.0.0.1 port=", region.port(),
                                    " dbname=medgate user=medgate password=",
                                    clusters_->region("de-1").password(), " connect_timeout=5")));
}

TEST(PgClusterLifecycleTest, StopAndStartAgainKeepData) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("restart");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  const std::string connection_string = cluster.ConnectionString();
  const int port = cluster.port();
  {
    pqxx::connection connection(connection_string);
    pqxx::work work(connection);
    work.exec0("create table kept (v int)");
    work.exec0("insert into kept values (42)");
    work.commit();
  }

  ASSERT_TRUE(cluster.Stop().ok());
  EXPECT_FALSE(cluster.running());
  EXPECT_FALSE(Accepts(connection_string));
  EXPECT_TRUE(cluster.Stop().ok()) << "stopping a stopped cluster is a no-op";

  absl::Status again = cluster.StartAgain();
  ASSERT_TRUE(again.ok()) << again;
  EXPECT_TRUE(cluster.running());
  EXPECT_EQ(cluster.port(), port);
  EXPECT_EQ(cluster.ConnectionString(), connection_string);
  EXPECT_EQ(QueryOne(connection_string, "select v from kept"), "42");
}

TEST(PgClusterLifecycleTest, ProductionSettingsTakeEffectAfterARestartThatKeepsData) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("production");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  const std::string connection_string = cluster.ConnectionString();
  EXPECT_EQ(QueryOne(connection_string, "show fsync"), "off") << "the test settings are not durable";
  absl::StatusOr<std::string> test_settings = cluster.DescribeSettings();
  ASSERT_TRUE(test_settings.ok()) << test_settings.status();
  EXPECT_THAT(*test_settings, ::testing::HasSubstr("fsync=off synchronous_commit=off"));
  EXPECT_EQ(QueryOne(connection_string, "show wal_segment_size"), "1MB");
  {
    pqxx::connection connection(connection_string);
    pqxx::work work(connection);
    work.exec0("create table kept (v int)");
    work.exec0("insert into kept values (7)");
    work.commit();
  }

  PgCluster::ProductionSettings settings;
  settings.shared_buffers = "64MB";
  settings.wal_buffers = "4MB";
  // As the benchmarks have them: max_wal_size no larger than min_wal_size, so that preparing the
  // WAL files would start a checkpoint halfway if it did not raise max_wal_size meanwhile.
  settings.max_wal_size = "64MB";
  settings.min_wal_size = "64MB";
  absl::Status status = cluster.UseProductionSettings(settings);
  ASSERT_TRUE(status.ok()) << status;

  EXPECT_TRUE(cluster.running());
  EXPECT_EQ(cluster.ConnectionString(), connection_string);
  EXPECT_EQ(QueryOne(connection_string, "show fsync"), "on");
  EXPECT_EQ(QueryOne(connection_string, "show synchronous_commit"), "on");
  EXPECT_EQ(QueryOne(connection_string, "show full_page_writes"), "on");
  EXPECT_EQ(QueryOne(connection_string, "show wal_level"), "replica");
  EXPECT_EQ(QueryOne(connection_string, "show shared_buffers"), "64MB");
  EXPECT_EQ(QueryOne(connection_string, "show wal_buffers"), "4MB");
  EXPECT_EQ(QueryOne(connection_string, "show max_wal_size"), "64MB");
  EXPECT_EQ(QueryOne(connection_string, "show min_wal_size"), "64MB");
  // min_wal_size of WAL files is ready, the one being written included: the next three are
  // recycled ones, not files a commit would have to wait for.
  EXPECT_EQ(QueryOne(connection_string,
                     "select count(*) >= 4 from pg_ls_waldir() where name ~ '^[0-9A-F]{24}$' "
                     "and name >= pg_walfile_name(pg_current_wal_lsn())"),
            "t");
  EXPECT_EQ(QueryOne(connection_string, "show wal_segment_size"), "16MB");
  EXPECT_EQ(QueryOne(connection_string, "select v from kept"), "7");
  // Prewarming the shared buffers leaves neither its table nor the extension it checks with.
  EXPECT_EQ(QueryOne(connection_string,
                     "select count(*) from pg_class where relname = 'medgate_prewarm'"),
            "0");
  EXPECT_EQ(QueryOne(connection_string,
                     "select count(*) from pg_extension where extname = 'pg_buffercache'"),
            "0");
  absl::StatusOr<std::string> described = cluster.DescribeSettings();
  ASSERT_TRUE(described.ok()) << described.status();
  EXPECT_EQ(*described,
            "fsync=on synchronous_commit=on full_page_writes=on wal_level=replica "
            "shared_buffers=64MB wal_buffers=4MB min_wal_size=64MB max_wal_size=64MB "
            "wal_segment_size=16MB");
}

// A value the server refuses is reported before anything restarts: the server keeps running.
TEST(PgClusterLifecycleTest, ARefusedProductionSettingIsReportedAndTheServerKeepsRunning) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("refused");
  ASSERT_TRUE(started.ok()) << started.status();
  PgCluster& cluster = **started;
  PgCluster::ProductionSettings settings;
  settings.shared_buffers = "lots";
  absl::Status status = cluster.UseProductionSettings(settings);
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("shared_buffers"));
  EXPECT_TRUE(cluster.running());
  EXPECT_EQ(QueryOne(cluster.ConnectionString(), "select 1"), "1");
}

TEST(PgClusterLifecycleTest, DestructorStopsServerAndRemovesDirectory) {
  absl::StatusOr<std::unique_ptr<PgCluster>> started = PgCluster::Start("destroyed");
  ASSERT_TRUE(started.ok()) << started.status();
  const std::string connection_string = (*started)->ConnectionString();
  const std::string dir = std::filesystem::path((*started)->log_path()).parent_path();
  ASSERT_TRUE(Exists(dir));
  started->reset();
  EXPECT_FALSE(Exists(dir));
  EXPECT_FALSE(Accepts(connection_string));
}

// A test process that dies without running destructors must not leak its server: the watchdog stops
// it and deletes its directory.
TEST(PgClusterLifecycleTest, WatchdogCleansUpAfterTheProcessDies) {
  int report[2];
  ASSERT_EQ(pipe(report), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(report[0]);
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start("orphan");
    std::string line = cluster.ok() ? absl::StrCat((*cluster)->ConnectionString(), "\n",
                                                   (*cluster)->log_path(), "\n")
                                    : "";
    ssize_t ignored = write(report[1], line.data(), line.size());
    (void)ignored;
    _exit(cluster.ok() ? 0 : 1);  // No destructors: as if the process had crashed.
  }
  close(report[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = read(report[0], buf, sizeof(buf))) > 0;) text.append(buf, n);
  close(report[0]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::string connection_string = text.substr(0, text.find('\n'));
  std::string log_path = text.substr(text.find('\n') + 1);
  log_path.pop_back();
  const std::string dir = std::filesystem::path(log_path).parent_path();

  EXPECT_TRUE(WaitFor([&] { return !Exists(dir); }, absl::Seconds(60)));
  EXPECT_FALSE(Accepts(connection_string));
}

}  // namespace
}  // namespace medgate::test_support
