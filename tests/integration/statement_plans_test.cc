// Every statement the services prepare, planned by real PostgreSQL against the project's
// migrations as the services run them: generically (the plan a prepared statement settles on,
// whatever its arguments) and with sequential scans priced out, so that a scan of a whole table
// in a plan means no index can serve that statement. A statement that reads a whole table
// grows with everything the shard holds, and runs under the services' statement timeout: past
// some size it fails every time (an erasure never done, a lookup refused). (Statements built at
// run time, such as ingest's COPY transaction, and the SQL inside functions, are not covered.)
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "libs/pg/pool.h"
#include "services/consent/sql.h"
#include "services/ingest/sql.h"
#include "services/routing/sql.h"
#include "services/sharing/key_vault.h"
#include "services/sharing/sql.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_stack.h"

namespace medgate {
namespace {

using test_support::PgCluster;

// "statement: Seq Scan on table" for each table a statement's generic plan reads whole.
std::vector<std::string> SequentialScans(pqxx::connection& connection,
                                         const std::vector<pg::Statement>& statements) {
  std::vector<std::string> scans;
  for (const pg::Statement& s : statements) {
    pqxx::work txn(connection);
    txn.exec0("SET LOCAL enable_seqscan = off");
    txn.exec0("SET LOCAL plan_cache_mode = force_generic_plan");
    txn.exec0(absl::StrCat("PREPARE planned AS ", s.sql));
    const int parameters =
        txn.exec1("SELECT cardinality(parameter_types) FROM pg_prepared_statements "
                  "WHERE name = 'planned'")[0]
            .as<int>();
    std::vector<std::string> nulls(parameters, "NULL");
    std::string plan;
    const std::string execute =
        parameters == 0 ? "EXECUTE planned"
                        : absl::StrCat("EXECUTE planned(", absl::StrJoin(nulls, ", "), ")");
    for (const pqxx::row& row : txn.exec(absl::StrCat("EXPLAIN (COSTS OFF) ", execute))) {
      absl::StrAppend(&plan, row[0].c_str(), "\n");
    }
    txn.exec0("DEALLOCATE planned");  // a prepared statement outlives its transaction
    txn.abort();
    for (absl::string_view line : absl::StrSplit(plan, '\n')) {
      const size_t at = line.find("Seq Scan on ");
      if (at == absl::string_view::npos) continue;
      std::string table(line.substr(at + 12));
      table = table.substr(0, table.find(' '));
      scans.push_back(absl::StrCat(s.name, ": Seq Scan on ", table, "\n", plan));
    }
  }
  return scans;
}

class StatementPlansTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start("plans");
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();
    absl::Status migrated = test_support::CreateAndMigrateEveryKind(*cluster_);
    ASSERT_TRUE(migrated.ok()) << migrated;
  }
  static void TearDownTestSuite() { delete cluster_; }

  static std::vector<std::string> Check(const std::string& db,
                                        const std::vector<pg::Statement>& statements) {
    pqxx::connection connection(cluster_->ConnectionString(db));
    return SequentialScans(connection, statements);
  }

  static PgCluster* cluster_;
};

PgCluster* StatementPlansTest::cluster_ = nullptr;

TEST_F(StatementPlansTest, ShardStatementsReadTablesThroughIndexes) {
  std::vector<std::string> scans;
  for (const std::vector<pg::Statement>* statements :
       {&ingest::sql::Statements(), &consent::sql::Statements(), &sharing::sql::ShardStatements()}) {
    for (std::string& scan : Check("shard", *statements)) scans.push_back(scan);
  }
  EXPECT_THAT(scans, ::testing::IsEmpty()) << absl::StrJoin(scans, "\n");
}

TEST_F(StatementPlansTest, ControlStatementsReadTablesThroughIndexes) {
  std::vector<std::string> scans;
  for (const std::vector<pg::Statement>* statements :
       {&routing::sql::Statements(), &sharing::sql::ControlStatements()}) {
    for (std::string& scan : Check("medgate", *statements)) scans.push_back(scan);
  }
  EXPECT_THAT(scans, ::testing::IsEmpty()) << absl::StrJoin(scans, "\n");
}

TEST_F(StatementPlansTest, VaultStatementsReadTablesThroughIndexes) {
  const std::vector<std::string> scans = Check("vault", sharing::VaultStatements());
  EXPECT_THAT(scans, ::testing::IsEmpty()) << absl::StrJoin(scans, "\n");
}

}  // namespace
}  // namespace medgate
