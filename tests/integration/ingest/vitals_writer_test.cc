// The per-region COPY writer on its own, against a real PostgreSQL shard: what a batch's outcome
// reports matches what the shard holds, a resend stores nothing twice, and a connection whose
// setup failed is never used to write.
#include "services/ingest/vitals_writer.h"

#include <future>
#include <memory>
#include <string>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/time/clock.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_stack.h"

namespace medgate::ingest {
namespace {

using test_support::PgCluster;

class VitalsWriterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto cluster = PgCluster::Start("fr-1");
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    absl::Status migrated = test_support::MigrateDatabase((*cluster)->ConnectionString(), "shard");
    ASSERT_TRUE(migrated.ok()) << migrated;
    shard_ = cluster->release();
  }

  static void TearDownTestSuite() { delete shard_; }

  static DbConfig Db() {
    DbConfig db;
    db.conninfo = shard_->ConnectionString();
    return db;
  }

  // Rows `first`..`last` of `device`, one heart rate each, measured now.
  static WriteRequest Batch(const std::string& device, uint64_t first, uint64_t last) {
    WriteRequest request;
    request.tenant_id = "acme";
    request.device_id = device;
    request.patient_id = "pt-" + device;
    for (uint64_t seq = first; seq <= last; ++seq) {
      VitalRow row;
      row.seq = seq;
      row.loinc = "8867-4";
      row.value = 60 + static_cast<double>(seq);
      row.ucum = "/min";
      row.measured_at = absl::Now();
      request.rows.push_back(row);
    }
    request.read_at = absl::Now();
    return request;
  }

  // Queues `request` and waits for its outcome.
  static WriteOutcome Write(VitalsWriter& writer, WriteRequest request) {
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    std::future<WriteOutcome> outcome = promise->get_future();
    request.done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    EXPECT_TRUE(writer.Enqueue(std::move(request), absl::Seconds(10)));
    return outcome.get();
  }

  static int64_t Stored(const std::string& device) {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec_params1("SELECT count(*) FROM vitals WHERE device_id = $1", device)[0]
        .as<int64_t>();
  }

  static PgCluster* shard_;
};

PgCluster* VitalsWriterTest::shard_ = nullptr;

TEST_F(VitalsWriterTest, AResentBatchIsCountedAsDuplicatesAndStoredOnce) {
  VitalsWriter writer("fr-1", Db(), WriterOptions{});
  WriteOutcome first = Write(writer, Batch("dev-resend", 1, 5));
  ASSERT_TRUE(first.status.ok()) << first.status;
  EXPECT_EQ(first.stored, 5u);
  EXPECT_EQ(first.duplicates, 0u);
  EXPECT_EQ(first.highest_committed_seq, 5u);

  // The same five again and three new ones: only the new ones are stored.
  WriteOutcome again = Write(writer, Batch("dev-resend", 1, 8));
  ASSERT_TRUE(again.status.ok()) << again.status;
  EXPECT_EQ(again.stored, 3u);
  EXPECT_EQ(again.duplicates, 5u);
  EXPECT_EQ(again.highest_committed_seq, 8u);
  EXPECT_EQ(Stored("dev-resend"), 8);
}

// A connection on which the writer's setup (its statement timeout) failed is dropped, not kept for
// the next transaction: nothing is ever written without the timeout. The timeout here is one the
// server refuses (the service's configuration does not let it through; this is how a failing setup
// is made to happen).
TEST_F(VitalsWriterTest, AConnectionWhoseSetupFailedIsNeverUsedToWrite) {
  DbConfig db = Db();
  db.statement_timeout_ms = -1;
  VitalsWriter writer("fr-1", db, WriterOptions{});
  for (int attempt = 0; attempt < 3; ++attempt) {
    WriteOutcome outcome = Write(writer, Batch("dev-no-setup", 1, 2));
    EXPECT_FALSE(outcome.status.ok()) << "attempt " << attempt;
    EXPECT_EQ(outcome.stored, 0u);
  }
  EXPECT_EQ(Stored("dev-no-setup"), 0);
}

}  // namespace
}  // namespace medgate::ingest
