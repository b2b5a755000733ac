// The per-region COPY writer on its own, against a real PostgreSQL shard: what a batch's outcome
// reports matches what the shard holds, a resend stores nothing twice, and a connection whose
// setup failed is never used to write.
#include "services/ingest/vitals_writer.h"

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "libs/audit/audit_log.h"
#include "tests/support/fuzz.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/pg_fault_proxy.h"
#include "tests/support/poll.h"
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

  // A batch of `device` whose samples were all refused for lack of consent (`code`).
  static WriteRequest Refusal(const std::string& device, uint64_t batch_seq,
                              std::vector<RefusedSample> refused, const std::string& code) {
    WriteRequest request;
    request.tenant_id = "acme";
    request.device_id = device;
    request.patient_id = "pt-" + device;
    request.batch_seq = batch_seq;
    request.read_at = absl::Now();
    request.refused = std::move(refused);
    request.denial_code = code;
    return request;
  }

  // The reasons of `device`'s denial entries.
  static std::vector<std::string> Denials(const std::string& device) {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    std::vector<std::string> reasons;
    for (const pqxx::row& row : q.exec_params(
             "SELECT reason FROM audit_log WHERE object_id = $1 AND decision = 'deny' ORDER BY seq",
             device)) {
      reasons.push_back(row[0].as<std::string>());
    }
    return reasons;
  }

  // Queues `request` (a copy: the caller may send it again); its outcome to come.
  static std::future<WriteOutcome> Queue(VitalsWriter& writer, WriteRequest request) {
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    std::future<WriteOutcome> outcome = promise->get_future();
    request.done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    EXPECT_TRUE(writer.Enqueue(std::move(request), absl::Seconds(10)));
    return outcome;
  }

  // Queues `request` and waits for its outcome.
  static WriteOutcome Write(VitalsWriter& writer, WriteRequest request) {
    return Queue(writer, std::move(request)).get();
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

// The queue's row bound: a batch larger than it is still taken into an empty queue (or it could
// never be written), and nothing more until that batch has gone to the shard.
TEST_F(VitalsWriterTest, TheRowBoundRefusesMoreButNeverABatchIntoAnEmptyQueue) {
  WriterOptions options;
  options.max_queued_rows = 10;
  options.linger = absl::ZeroDuration();
  VitalsWriter writer("fr-1", Db(), options);
  // The writer's COPY waits while this lock is held: what it took off the queue stays with it.
  pqxx::connection holder(shard_->ConnectionString());
  auto lock = std::make_unique<pqxx::work>(holder);
  lock->exec0("LOCK TABLE vitals IN SHARE MODE");
  std::vector<std::future<WriteOutcome>> outcomes;
  auto queue = [&](WriteRequest request, bool wait) {
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    std::future<WriteOutcome> outcome = promise->get_future();
    request.done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    const bool taken =
        wait ? writer.Enqueue(std::move(request), absl::Milliseconds(200)) : writer.TryEnqueue(request);
    if (taken) outcomes.push_back(std::move(outcome));
    return taken;
  };
  ASSERT_TRUE(queue(Batch("dev-bound-a", 1, 5), false));
  for (int i = 0; i < 500 && writer.queued() > 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_EQ(writer.queued(), 0u);  // with the writer, which waits for the lock

  EXPECT_TRUE(queue(Batch("dev-bound-b", 1, 50), false));  // 50 rows > 10, into an empty queue
  EXPECT_EQ(writer.queued(), 1u);
  EXPECT_FALSE(queue(Batch("dev-bound-c", 1, 1), false));  // one row more is over the bound
  EXPECT_FALSE(queue(Batch("dev-bound-c", 1, 1), true));   // also after waiting 200 ms
  EXPECT_EQ(writer.queued(), 1u);

  lock.reset();  // rolls back: the writer goes on
  for (std::future<WriteOutcome>& o : outcomes) {
    WriteOutcome outcome = o.get();
    EXPECT_TRUE(outcome.status.ok()) << outcome.status;
  }
  EXPECT_EQ(Stored("dev-bound-a"), 5);
  EXPECT_EQ(Stored("dev-bound-b"), 50);
  EXPECT_EQ(Stored("dev-bound-c"), 0);
  WriteOutcome later = Write(writer, Batch("dev-bound-c", 1, 1));
  ASSERT_TRUE(later.status.ok()) << later.status;
  EXPECT_EQ(Stored("dev-bound-c"), 1);
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

// The samples and their audit entries commit together: while the shard refuses audit entries,
// a batch is not stored (its outcome says to retry) and its device's cursor does not move; once
// they are accepted again, the resend is stored whole, with one entry naming the counts.
TEST_F(VitalsWriterTest, ABatchIsStoredOnlyWithItsAuditEntry) {
  auto exec = [](const std::string& sql) {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    q.exec0(sql);
  };
  exec("CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
       "RAISE EXCEPTION 'audit refused for the test'; END $$");
  exec("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log FOR EACH ROW "
       "EXECUTE FUNCTION refuse_audit()");
  VitalsWriter writer("fr-1", Db(), WriterOptions{});
  WriteRequest batch = Batch("dev-audited", 1, 4);
  batch.source = std::make_shared<const BatchSource>(
      BatchSource{"spiffe://test/tenant/acme/device/dev-audited", "ipv4:127.0.0.1:40000"});
  batch.batch_seq = 7;
  batch.consent_id = "c-1";
  batch.consent_version = 2;
  WriteOutcome refused = Write(writer, batch);
  EXPECT_FALSE(refused.status.ok());
  EXPECT_EQ(refused.stored, 0u);
  EXPECT_EQ(Stored("dev-audited"), 0);

  exec("DROP TRIGGER refuse_audit ON audit_log");
  WriteOutcome stored = Write(writer, batch);
  ASSERT_TRUE(stored.status.ok()) << stored.status;
  EXPECT_EQ(stored.stored, 4u);
  EXPECT_EQ(stored.duplicates, 0u);
  EXPECT_EQ(Stored("dev-audited"), 4);
  pqxx::connection c(shard_->ConnectionString());
  {
    pqxx::nontransaction q(c);
    pqxx::result entries = q.exec_params(
        "SELECT actor, tenant, action, object_type, object_id, patient_id, reason, purpose, "
        "consent_id, consent_version, request_id, origin FROM audit_log WHERE object_id = $1",
        "dev-audited");
    ASSERT_EQ(entries.size(), 1u);
    EXPECT_EQ(entries[0][0].as<std::string>(), "spiffe://test/tenant/acme/device/dev-audited");
    EXPECT_EQ(entries[0][1].as<std::string>(), "acme");
    EXPECT_EQ(entries[0][2].as<std::string>(), "create");
    EXPECT_EQ(entries[0][3].as<std::string>(), "vitals");
    EXPECT_EQ(entries[0][5].as<std::string>(), "pt-dev-audited");
    EXPECT_EQ(entries[0][6].as<std::string>(), "PERMITTED: stored=4 duplicates=0");
    EXPECT_EQ(entries[0][7].as<std::string>(), "REMOTE_MONITORING");
    EXPECT_EQ(entries[0][8].as<std::string>(), "c-1");
    EXPECT_EQ(entries[0][9].as<int64_t>(), 2);
    EXPECT_EQ(entries[0][10].as<std::string>(), "batch:7");
    EXPECT_EQ(entries[0][11].as<std::string>(), "ipv4:127.0.0.1:40000");
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
  exec("DROP FUNCTION refuse_audit()");
}

// Nor is an audit entry kept for samples that were not stored: when the transaction fails at its
// COMMIT, after its entries were appended, neither the samples nor the entries remain and the
// chain head has not moved.
TEST_F(VitalsWriterTest, AnAuditEntryIsKeptOnlyWithItsSamples) {
  auto exec = [](const std::string& sql) {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    q.exec0(sql);
  };
  auto head = [] {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1("SELECT seq FROM audit_head")[0].as<int64_t>();
  };
  exec("CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
       "RAISE EXCEPTION 'commit refused for the test'; END $$");
  // Checked at COMMIT, after the writer appended the audit entries.
  exec("CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON vitals_default "
       "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()");
  const int64_t before = head();
  VitalsWriter writer("fr-1", Db(), WriterOptions{});
  WriteRequest batch = Batch("dev-not-committed", 1, 3);
  batch.source = std::make_shared<const BatchSource>(
      BatchSource{"spiffe://test/tenant/acme/device/dev-not-committed", ""});
  // Measured long ago, so the rows go to the default partition, where the trigger is.
  for (VitalRow& row : batch.rows) row.measured_at = absl::FromUnixSeconds(86400);
  WriteOutcome refused = Write(writer, batch);
  EXPECT_FALSE(refused.status.ok());
  EXPECT_EQ(Stored("dev-not-committed"), 0);
  EXPECT_EQ(head(), before);
  {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE object_id = 'dev-not-committed'")[0]
                  .as<int>(),
              0);
  }
  exec("DROP TRIGGER refuse_commit ON vitals_default");
  exec("DROP FUNCTION refuse_commit()");
}

// The connection lost after the shard committed, before the writer heard so: the outcome is
// unknown, so nothing is acknowledged and nothing is written again. The batches are answered
// "resend"; the samples are in the shard once, a resend is counted as duplicates, and the refusal
// of a batch without consent is in the audit log once, as it was sent once.
TEST_F(VitalsWriterTest, ACommitWhoseAnswerIsLostIsNeitherAckedNorWrittenAgain) {
  auto proxy = test_support::PgFaultProxy::Start(shard_->port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  DbConfig db = Db();
  db.conninfo = (*proxy)->Via(db.conninfo);
  WriterOptions options;
  options.linger = absl::Milliseconds(200);  // the two batches below go in one transaction
  VitalsWriter writer("fr-1", db, options);
  ASSERT_TRUE(Write(writer, Batch("dev-lost-commit", 1, 1)).status.ok());  // connected

  WriteRequest stored = Batch("dev-lost-commit", 2, 4);
  stored.batch_seq = 2;
  WriteRequest refused =
      Refusal("dev-lost-commit-refused", 9, {{1, absl::Now(), "heart-rate"}}, "NO_CONSENT");
  (*proxy)->CutAtNextCommit();
  std::vector<std::future<WriteOutcome>> outcomes;
  for (WriteRequest* r : {&stored, &refused}) {
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    outcomes.push_back(promise->get_future());
    r->done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    ASSERT_TRUE(writer.Enqueue(*r, absl::Seconds(10)));
  }
  for (std::future<WriteOutcome>& o : outcomes) {
    WriteOutcome outcome = o.get();
    EXPECT_EQ(outcome.status.code(), absl::StatusCode::kUnavailable) << outcome.status;
    EXPECT_EQ(outcome.stored, 0u);
  }
  EXPECT_EQ((*proxy)->cuts(), 1);
  EXPECT_EQ(Stored("dev-lost-commit"), 4);  // committed: the shard has them
  EXPECT_THAT(Denials("dev-lost-commit-refused"),
              ::testing::ElementsAre("NO_CONSENT: refused=1 categories=heart-rate"));

  // The device's resend: nothing twice.
  stored.done = nullptr;
  WriteOutcome resent = Write(writer, stored);
  ASSERT_TRUE(resent.status.ok()) << resent.status;
  EXPECT_EQ(resent.stored, 0u);
  EXPECT_EQ(resent.duplicates, 3u);
  EXPECT_EQ(resent.highest_committed_seq, 4u);
  EXPECT_EQ(Stored("dev-lost-commit"), 4);

  // The same resend decided after a withdrawal of the patient's consent, with one sample never
  // sent before: the samples the lost commit stored are found in storage (answered duplicates by
  // the service), and the refusal's entry counts only the one it refused.
  WriteRequest withdrawn = Refusal("dev-lost-commit", 3, {}, "CONSENT_WITHDRAWN");
  for (const VitalRow& row : stored.rows) {
    withdrawn.refused.push_back({row.seq, row.measured_at, "heart-rate"});
  }
  withdrawn.refused.push_back({5, absl::Now(), "heart-rate"});
  WriteOutcome decided_again = Write(writer, withdrawn);
  ASSERT_TRUE(decided_again.status.ok()) << decided_again.status;
  EXPECT_THAT(decided_again.refused_already_stored, ::testing::ElementsAre(2u, 3u, 4u));
  EXPECT_EQ(decided_again.stored, 0u);
  EXPECT_THAT(Denials("dev-lost-commit"),
              ::testing::ElementsAre("CONSENT_WITHDRAWN: refused=1 categories=heart-rate"));
  pqxx::connection c(shard_->ConnectionString());
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// A shard that stops answering (its processes frozen, as a paused host or hung storage leave it)
// cannot end the writer's statements by its statement_timeout: the writer gives up on it once it
// has sent nothing for the statement timeout and 5 s more, answers the batch "resend" (nothing of
// it stored), and stores the resend once the shard answers again.
TEST_F(VitalsWriterTest, AShardThatStopsAnsweringIsGivenUpOnAndWrittenOnceItAnswers) {
  DbConfig db = Db();
  db.statement_timeout_ms = 1000;
  VitalsWriter writer("fr-1", db, WriterOptions{});
  ASSERT_TRUE(Write(writer, Batch("dev-frozen-shard", 1, 2)).status.ok());  // connected
  ASSERT_TRUE(shard_->Signal(SIGSTOP).ok());
  absl::Cleanup resume = [] { (void)shard_->Signal(SIGCONT); };  // also if an ASSERT fails
  const WriteRequest frozen = Batch("dev-frozen-shard", 3, 4);
  std::future<WriteOutcome> outcome = Queue(writer, frozen);
  const bool answered = outcome.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  ASSERT_TRUE(shard_->Signal(SIGCONT).ok());
  ASSERT_TRUE(answered) << "the writer still waited on the frozen shard after 60 s";
  const WriteOutcome given_up = outcome.get();
  EXPECT_EQ(given_up.status.code(), absl::StatusCode::kUnavailable) << given_up.status;
  EXPECT_THAT(given_up.status.message(), ::testing::HasSubstr("resend"));
  EXPECT_EQ(given_up.stored, 0u);

  const WriteOutcome resent = Write(writer, frozen);
  ASSERT_TRUE(resent.status.ok()) << resent.status;
  EXPECT_EQ(resent.stored, 2u);
  EXPECT_EQ(Stored("dev-frozen-shard"), 4);
}

// The same when the shard stops answering while the writer sets up a new connection (let in and
// authenticated, its session settings unanswered): the batch is answered "resend", nothing of it
// stored, and the next transaction starts from a new connection.
TEST_F(VitalsWriterTest, ANewConnectionWhoseSetUpGetsNoAnswerIsGivenUpOn) {
  auto proxy = test_support::PgFaultProxy::Start(shard_->port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  DbConfig db = Db();
  db.conninfo = (*proxy)->Via(db.conninfo);
  db.statement_timeout_ms = 1000;
  VitalsWriter writer("fr-1", db, WriterOptions{});
  (*proxy)->FreezeAfterNextStartUp();
  absl::Cleanup thaw = [&] { (*proxy)->Thaw(); };  // also if an ASSERT fails
  const WriteRequest batch = Batch("dev-frozen-set-up", 1, 2);
  std::future<WriteOutcome> outcome = Queue(writer, batch);
  const bool answered = outcome.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  (*proxy)->Thaw();
  ASSERT_TRUE(answered) << "the writer still waited on its connection's set-up after 60 s";
  const WriteOutcome given_up = outcome.get();
  EXPECT_EQ(given_up.status.code(), absl::StatusCode::kUnavailable) << given_up.status;
  EXPECT_THAT(given_up.status.message(), ::testing::HasSubstr("resend"));
  EXPECT_EQ(given_up.stored, 0u);
  EXPECT_EQ(Stored("dev-frozen-set-up"), 0);

  const WriteOutcome resent = Write(writer, batch);
  ASSERT_TRUE(resent.status.ok()) << resent.status;
  EXPECT_EQ(resent.stored, 2u);
  EXPECT_EQ(Stored("dev-frozen-set-up"), 2);
}

// The bound on a batch's wait holds until its transaction starts, the writer's connecting
// included: a batch that waited past max_batch_wait while the shard was slow to let the writer in
// is not stored on its old decision (answered "resend"); its resend, decided again, is.
TEST_F(VitalsWriterTest, ABatchThatWaitedPastItsBoundWhileTheWriterConnectedIsNotStored) {
  auto proxy = test_support::PgFaultProxy::Start(shard_->port());
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  DbConfig db = Db();
  db.conninfo = (*proxy)->Via(db.conninfo);
  WriterOptions options;
  options.max_batch_wait = absl::Seconds(1);
  (*proxy)->Freeze();  // the shard's answers to the writer's connection are held back
  absl::Cleanup thaw = [&] { (*proxy)->Thaw(); };  // also if an ASSERT fails
  VitalsWriter writer("fr-1", db, options);
  WriteRequest batch = Batch("dev-slow-connect", 1, 2);
  std::future<WriteOutcome> outcome = Queue(writer, batch);
  // Past the bound (and within the connect timeout), the shard lets the writer in.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  (*proxy)->Thaw();
  ASSERT_EQ(outcome.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  const WriteOutcome too_old = outcome.get();
  EXPECT_EQ(too_old.status.code(), absl::StatusCode::kUnavailable) << too_old.status;
  EXPECT_THAT(too_old.status.message(), ::testing::HasSubstr("more than its bound of 1s"));
  EXPECT_EQ(too_old.stored, 0u);
  EXPECT_EQ(Stored("dev-slow-connect"), 0);

  batch.read_at = absl::Now();
  const WriteOutcome resent = Write(writer, batch);
  ASSERT_TRUE(resent.status.ok()) << resent.status;
  EXPECT_EQ(resent.stored, 2u);
  EXPECT_EQ(Stored("dev-slow-connect"), 2);
}

// A refused resend in the same transaction as the batch it repeats (the first send still queued
// when the device, reconnected, sent it again and was refused): the samples that transaction
// stores are found too, and the refusal counts only the sample stored by neither.
TEST_F(VitalsWriterTest, ARefusedResendFindsTheSamplesItsTransactionStores) {
  WriterOptions options;
  options.linger = absl::Milliseconds(300);  // both in one transaction
  VitalsWriter writer("fr-1", Db(), options);
  ASSERT_TRUE(Write(writer, Batch("dev-same-txn", 1, 1)).status.ok());  // connected, cursor 1
  WriteRequest first = Batch("dev-same-txn", 2, 3);
  first.batch_seq = 2;
  WriteRequest refused =
      Refusal("dev-same-txn", 3,
              {{2, first.rows[0].measured_at, "heart-rate"},
               {3, first.rows[1].measured_at + absl::Seconds(1), "heart-rate"},  // not it
               {4, absl::Now(), "heart-rate"}},
              "CONSENT_WITHDRAWN");
  std::vector<std::future<WriteOutcome>> outcomes;
  const uint64_t groups = writer.groups_taken();
  for (WriteRequest* r : {&first, &refused}) {
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    outcomes.push_back(promise->get_future());
    r->done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    ASSERT_TRUE(writer.Enqueue(*r, absl::Seconds(10)));
  }
  const WriteOutcome stored = outcomes[0].get();
  const WriteOutcome decided = outcomes[1].get();
  ASSERT_EQ(writer.groups_taken(), groups + 1) << "the two batches were not written together";
  ASSERT_TRUE(stored.status.ok()) << stored.status;
  EXPECT_EQ(stored.stored, 2u);
  ASSERT_TRUE(decided.status.ok()) << decided.status;
  EXPECT_THAT(decided.refused_already_stored, ::testing::ElementsAre(2u));
  EXPECT_THAT(Denials("dev-same-txn"),
              ::testing::ElementsAre("CONSENT_WITHDRAWN: refused=2 categories=heart-rate"));
}

// Two writers' transactions taking the cursor of a device new to the shard: the later waits for the
// earlier, then reads the cursor it committed, so it counts those samples as duplicates instead of
// copying them again (which failed its whole transaction on the vitals key).
TEST_F(VitalsWriterTest, ASecondWriterOfANewDeviceReadsTheFirstOnesCursor) {
  const std::string call =
      "SELECT tenant_id, device_id, max_seq FROM medgate_advance_device_cursors("
      "ARRAY['acme'], ARRAY['dev-new-race'], ARRAY[50]::bigint[])";
  pqxx::connection first_connection(shard_->ConnectionString());
  pqxx::work first(first_connection);
  EXPECT_EQ(first.exec(call).size(), 1u);  // the new row, at 0: nothing stored yet
  std::promise<pqxx::result> second_result;
  std::thread second([&] {
    try {
      pqxx::connection c(shard_->ConnectionString());
      pqxx::work txn(c);
      pqxx::result r = txn.exec(call);
      txn.commit();
      second_result.set_value(r);
    } catch (...) {
      second_result.set_exception(std::current_exception());
    }
  });
  std::future<pqxx::result> later = second_result.get_future();
  // The second waits on the first's uncommitted row.
  EXPECT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(10), [&] {
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec1("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE '%dev-new-race%'")[0]
               .as<int>() == 1;
  }));
  EXPECT_EQ(later.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  first.commit();
  pqxx::result r = later.get();
  second.join();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0][2].as<int64_t>(), 50) << "the first writer's committed cursor";
  pqxx::nontransaction q(first_connection);
  q.exec0("DELETE FROM device_cursors WHERE device_id = 'dev-new-race'");
}

// Random batches of a few devices through two writers at once (as two lanes, or two ingest
// replicas after a device reconnected), without waiting for each other's outcome, so that a
// transaction holds several batches of a device and both writers lock the same devices' cursors:
// resends, overlaps and gaps of seqs. Whatever the order the shard commits them in, every sample
// stored is claimed by exactly one batch's outcome, as that batch's highest seqs (its others are
// duplicates), and nothing else is stored; a batch that failed stored nothing. Seeded
// (MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS replay or extend it); how the lanes' transactions
// interleave is the machine's: with the cursors read without their lock (shard migration 0015),
// a batch stored twice shows in about one run in three.
TEST_F(VitalsWriterTest, RandomConcurrentResendsAreStoredOnceAndCountedAsStored) {
  WriterOptions options;
  options.linger = absl::Milliseconds(1);
  VitalsWriter lanes[2] = {VitalsWriter("fr-1", Db(), options),
                           VitalsWriter("fr-1", Db(), options)};
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(60);
  int failed_batches = 0;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    constexpr int kDevices = 2;
    constexpr int kBatches = 80;
    struct Sent {
      std::string device;
      std::vector<uint64_t> seqs;
      WriteOutcome outcome;
    };
    std::vector<Sent> sent(kBatches);
    std::mutex mu;
    std::condition_variable cv;
    int answered = 0;
    uint64_t next[kDevices] = {1, 1};
    const absl::Time measured_at = absl::Now();
    for (int b = 0; b < kBatches; ++b) {
      const int d = static_cast<int>(testing::Uniform(rng, 0, kDevices - 1));
      sent[b].device = absl::StrCat("dev-fuzz-", seed, "-", round, "-", d);
      // Mostly the next seqs, or a resend of earlier ones, an overlap, or a gap.
      uint64_t first = next[d];
      switch (testing::Uniform(rng, 0, 5)) {
        case 0:
          first = testing::Uniform(rng, 1, next[d]);
          break;
        case 1:
          first = next[d] + testing::Uniform(rng, 1, 5);
          break;
        default:
          break;
      }
      const uint64_t last = first + testing::Uniform(rng, 0, 19);
      next[d] = std::max(next[d], last + 1);
      WriteRequest request = Batch(sent[b].device, first, last);
      for (VitalRow& row : request.rows) {
        row.value = b;  // which batch a stored row came from
        row.measured_at = measured_at + absl::Microseconds(testing::Uniform(rng, 0, 1000));
        sent[b].seqs.push_back(row.seq);
      }
      request.done = [&, b](const WriteOutcome& o) {
        std::lock_guard<std::mutex> lock(mu);
        sent[b].outcome = o;
        ++answered;
        cv.notify_all();
      };
      ASSERT_TRUE(
          lanes[testing::Uniform(rng, 0, 1)].Enqueue(std::move(request), absl::Seconds(10)));
      // Now and then a pause, so that the lanes' transactions interleave through the round.
      if (testing::Uniform(rng, 0, 3) == 0) {
        absl::SleepFor(absl::Microseconds(testing::Uniform(rng, 0, 3000)));
      }
    }
    {
      std::unique_lock<std::mutex> lock(mu);
      ASSERT_TRUE(
          cv.wait_for(lock, std::chrono::seconds(60), [&] { return answered == kBatches; }));
    }
    // What the outcomes claim was stored: (device, seq) -> the batch that stored it.
    std::map<std::pair<std::string, uint64_t>, int> claimed;
    std::map<std::string, uint64_t> highest;
    for (int b = 0; b < kBatches; ++b) {
      const WriteOutcome& o = sent[b].outcome;
      if (!o.status.ok()) {
        ++failed_batches;
        continue;
      }
      EXPECT_EQ(o.stored + o.duplicates, sent[b].seqs.size()) << "batch " << b;
      EXPECT_GE(o.highest_committed_seq, sent[b].seqs.back()) << "batch " << b;
      highest[sent[b].device] = std::max(highest[sent[b].device], o.highest_committed_seq);
      for (size_t i = sent[b].seqs.size() - o.stored; i < sent[b].seqs.size(); ++i) {
        auto [it, inserted] =
            claimed.emplace(std::make_pair(sent[b].device, sent[b].seqs[i]), b);
        EXPECT_TRUE(inserted) << "seq " << sent[b].seqs[i] << " of " << sent[b].device
                              << " claimed stored by batches " << it->second << " and " << b;
      }
    }
    pqxx::connection c(shard_->ConnectionString());
    pqxx::nontransaction q(c);
    std::map<std::pair<std::string, uint64_t>, int> stored;
    for (const pqxx::row& row : q.exec_params(
             "SELECT device_id, seq, value FROM vitals WHERE device_id LIKE $1",
             absl::StrCat("dev-fuzz-", seed, "-", round, "-%"))) {
      auto [it, inserted] = stored.emplace(
          std::make_pair(row[0].as<std::string>(), row[1].as<uint64_t>()),
          static_cast<int>(row[2].as<double>()));
      EXPECT_TRUE(inserted) << "seq " << it->first.second << " of " << it->first.first
                            << " stored twice";
    }
    EXPECT_EQ(stored, claimed);
    for (const auto& [device, cursor] : highest) {
      EXPECT_EQ(q.exec_params1("SELECT max_seq FROM device_cursors WHERE device_id = $1", device)[0]
                    .as<uint64_t>(),
                cursor);
    }
    if (HasFailure()) break;
  }
  std::printf("%d rounds of 80 batches, %d batches failed (retryable)\n", rounds, failed_batches);
}

// audit_append_many refuses arrays of different lengths (a NULL one included) before it touches
// the chain.
TEST_F(VitalsWriterTest, AuditAppendManyRefusesArraysOfDifferentLengths) {
  pqxx::connection c(shard_->ConnectionString());
  const std::string args =
      "ARRAY['a','b'], ARRAY['t','t'], ARRAY['create','create'], ARRAY['vitals','vitals'], "
      "ARRAY['d','d'], ARRAY['p','p'], ARRAY['permit','permit'], ARRAY['r','r'], "
      "ARRAY['REMOTE_MONITORING','REMOTE_MONITORING'], ARRAY['c','c'], ARRAY[1,1]::bigint[], "
      "ARRAY['q','q'], ARRAY['o','o'], ARRAY['\\x00'::bytea, '\\x00'], ";
  for (const std::string tails : {"ARRAY['\\x00'::bytea]", "NULL::bytea[]"}) {
    pqxx::nontransaction q(c);
    try {
      q.exec(absl::StrCat("SELECT audit_append_many(", args, tails, ")"));
      ADD_FAILURE() << "accepted p_encoded_tail " << tails;
    } catch (const pqxx::sql_error& e) {
      EXPECT_NE(std::string(e.what()).find("every array must have 2 elements"), std::string::npos)
          << e.what();
    }
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

// Many batches in one transaction: each gets its own entry, chained one after the other, and the
// chain verifies.
TEST_F(VitalsWriterTest, EveryBatchOfATransactionHasItsChainedEntry) {
  WriterOptions options;
  options.linger = absl::Milliseconds(200);  // the batches below go in one transaction
  VitalsWriter writer("fr-1", Db(), options);
  constexpr int kDevices = 40;
  std::vector<std::future<WriteOutcome>> outcomes;
  for (int i = 0; i < kDevices; ++i) {
    WriteRequest request = Batch(absl::StrCat("dev-many-", i), 1, 3);
    request.source = std::make_shared<const BatchSource>(
        BatchSource{absl::StrCat("spiffe://test/tenant/acme/device/dev-many-", i), ""});
    request.batch_seq = 1;
    auto promise = std::make_shared<std::promise<WriteOutcome>>();
    outcomes.push_back(promise->get_future());
    request.done = [promise](const WriteOutcome& o) { promise->set_value(o); };
    ASSERT_TRUE(writer.Enqueue(std::move(request), absl::Seconds(10)));
  }
  for (auto& outcome : outcomes) {
    WriteOutcome o = outcome.get();
    ASSERT_TRUE(o.status.ok()) << o.status;
    EXPECT_EQ(o.stored, 3u);
  }
  pqxx::connection c(shard_->ConnectionString());
  {
    pqxx::nontransaction q(c);
    EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE object_id LIKE 'dev-many-%' AND "
                      "reason = 'PERMITTED: stored=3 duplicates=0'")[0]
                  .as<int>(),
              kDevices);
    // Several entries were appended by one call (one transaction, one time) and chained.
    EXPECT_GE(q.exec1("SELECT max(n) FROM (SELECT count(*) AS n FROM audit_log WHERE object_id "
                      "LIKE 'dev-many-%' GROUP BY at_us) AS per_call")[0]
                  .as<int>(),
              2);
  }
  auto verified = audit::VerifyChain(c);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_TRUE(verified->ok) << verified->problem;
}

}  // namespace
}  // namespace medgate::ingest
