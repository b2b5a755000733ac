// The audit chain against real PostgreSQL: concurrent writers, tamper detection, same transaction.
#include <atomic>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "libs/audit/audit_log.h"
#include "libs/migrate/migrate.h"
#include "libs/pg/pool.h"
#include "tests/support/fuzz.h"
#include "tests/support/pg_cluster.h"

namespace medgate::audit {
namespace {

using ::testing::HasSubstr;
using test_support::PgCluster;

constexpr int kWriters = 8;
constexpr int kEntriesPerWriter = 500;

class AuditChainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<PgCluster>> cluster = PgCluster::Start("audit");
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = *std::move(cluster);
    pqxx::connection c(cluster_->ConnectionString());
    absl::StatusOr<std::vector<migrate::Migration>> migrations =
        migrate::LoadMigrations(std::string(MEDGATE_SOURCE_DIR) + "/migrations/shard");
    ASSERT_TRUE(migrations.ok()) << migrations.status();
    ASSERT_TRUE(migrate::Apply(c, *migrations).ok());
    pg::PoolOptions options;
    options.name = "audit-test";
    options.conninfo = cluster_->ConnectionString();
    options.size = kWriters;
    options.acquire_timeout = absl::Seconds(30);
    options.statement_timeout = absl::Seconds(30);
    options.max_retries = 0;  // a fork must not be hidden by retries
    pool_ = std::make_unique<pg::Pool>(options);
  }

  static Entry MakeEntry(int writer, int i) {
    Entry e;
    e.actor = absl::StrCat("spiffe://medgate.test/tenant/acme/app/w", writer);
    e.tenant = "acme";
    e.action = i % 2 == 0 ? Action::kCreate : Action::kRead;
    e.object_type = "record";
    e.object_id = absl::StrCat("r-", writer, "-", i);
    e.patient_id = absl::StrCat("p-", i % 17);
    e.decision = Decision::kPermit;
    e.reason = "test";
    e.request_id = absl::StrCat("req-", writer, "-", i);
    e.origin = "ipv4:127.0.0.1:1";
    return e;
  }

  // Appends `n` entries of one writer, each in its own transaction: false if one failed.
  bool AppendEntries(int n) {
    for (int i = 0; i < n; ++i) {
      absl::Status appended =
          pool_->Transact([&](pqxx::work& txn) { return Append(txn, MakeEntry(0, i)).status(); });
      EXPECT_TRUE(appended.ok()) << appended;
      if (!appended.ok()) return false;
    }
    return true;
  }

  VerifyResult Verify() {
    pqxx::connection c(cluster_->ConnectionString());
    absl::StatusOr<VerifyResult> result = VerifyChain(c);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.value_or(VerifyResult{});
  }

  void Tamper(const std::string& sql) {
    // A superuser bypassing the append-only trigger: what an attacker with DB access could do.
    pqxx::connection c(cluster_->ConnectionString());
    pqxx::work txn(c);
    txn.exec0("SET LOCAL session_replication_role = replica");
    txn.exec0(sql);
    txn.commit();
  }

  void WriteConcurrently() {
    std::vector<std::thread> writers;
    std::atomic<int> failures{0};
    for (int w = 0; w < kWriters; ++w) {
      writers.emplace_back([&, w] {
        for (int i = 0; i < kEntriesPerWriter; ++i) {
          absl::Status s = pool_->Transact([&](pqxx::work& txn) {
            return Append(txn, MakeEntry(w, i)).status();
          });
          if (!s.ok()) failures.fetch_add(1);
        }
      });
    }
    for (auto& t : writers) t.join();
    ASSERT_EQ(failures.load(), 0);
  }

  std::unique_ptr<PgCluster> cluster_;
  std::unique_ptr<pg::Pool> pool_;
};

TEST_F(AuditChainTest, ConcurrentWritersNeverForkAndAlteredRowIsNamed) {
  WriteConcurrently();
  VerifyResult ok = Verify();
  EXPECT_TRUE(ok.ok) << ok.problem;
  EXPECT_EQ(ok.entries_checked, kWriters * kEntriesPerWriter);
  {
    pqxx::connection c(cluster_->ConnectionString());
    pqxx::nontransaction q(c);
    // No two entries share a predecessor (no fork), and seq is 1..N without holes.
    EXPECT_EQ(q.exec1("SELECT count(DISTINCT prev_hash) FROM audit_log")[0].as<int>(),
              kWriters * kEntriesPerWriter);
    EXPECT_EQ(q.exec1("SELECT max(seq) FROM audit_log")[0].as<int>(), kWriters * kEntriesPerWriter);
  }

  Tamper("UPDATE audit_log SET object_id = 'r-forged' WHERE seq = 1234");
  VerifyResult bad = Verify();
  EXPECT_FALSE(bad.ok);
  EXPECT_EQ(bad.first_bad_seq, 1234);
  EXPECT_THAT(bad.problem, HasSubstr("altered"));
}

// Append() and statements that chain their entry themselves, with WithEntryParams (as uploads
// do: the change and its entry in one statement), interleave without forking; every entry
// verifies with the C++ hash, and entry times follow the chain (one clock: the database's).
TEST_F(AuditChainTest, AppendersInOneStatementAndAloneShareOneChainAndOneClock) {
  std::vector<std::thread> writers;
  std::atomic<int> failures{0};
  constexpr int kEach = 200;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < kEach; ++i) {
        absl::Status s = pool_->Transact([&](pqxx::work& txn) -> absl::Status {
          const Entry e = MakeEntry(w, i);
          if (w % 2 == 0) return Append(txn, e).status();
          pqxx::row appended = WithEntryParams(
              e,
              [&txn](const auto&... params) {
                return txn.exec_params1(
                    "WITH change AS (SELECT $1::text AS note) "
                    "SELECT audit_append($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::bigint, "
                    "$13, $14, $15::bytea, $16::bytea) FROM change",
                    params...);
              },
              std::string("change"));
          return appended[0].is_null() ? absl::InternalError("no entry appended")
                                       : absl::OkStatus();
        });
        if (!s.ok()) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : writers) t.join();
  ASSERT_EQ(failures.load(), 0);
  VerifyResult ok = Verify();
  EXPECT_TRUE(ok.ok) << ok.problem;
  EXPECT_EQ(ok.entries_checked, kWriters * kEach);
  pqxx::connection c(cluster_->ConnectionString());
  pqxx::nontransaction q(c);
  EXPECT_EQ(q.exec1("SELECT count(DISTINCT prev_hash) FROM audit_log")[0].as<int>(),
            kWriters * kEach);
  // Both kinds are in it, and the in-statement ones carry the right fields.
  EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE actor LIKE '%/w1'")[0].as<int>(), kEach);
  EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log WHERE actor LIKE '%/w0'")[0].as<int>(), kEach);
  // No entry is older than the one before it in the chain.
  EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log a JOIN audit_log b ON b.seq = a.seq + 1 "
                    "WHERE b.at_us < a.at_us")[0].as<int>(),
            0);
}

TEST_F(AuditChainTest, RemovedEntriesAreLocated) {
  ASSERT_TRUE(AppendEntries(20));
  Tamper("DELETE FROM audit_log WHERE seq = 20");
  VerifyResult tail = Verify();
  EXPECT_FALSE(tail.ok);
  EXPECT_EQ(tail.first_bad_seq, 20);
  Tamper("DELETE FROM audit_log WHERE seq = 7");
  VerifyResult middle = Verify();
  EXPECT_FALSE(middle.ok);
  EXPECT_EQ(middle.first_bad_seq, 7);
  EXPECT_THAT(middle.problem, HasSubstr("missing"));
}

// Entries chained after the one the head names as the last (the head moved back, or entries added
// without it) are located at the first of them, not taken for removed ones.
TEST_F(AuditChainTest, EntriesPastTheHeadAreLocatedAtTheFirstOfThem) {
  ASSERT_TRUE(AppendEntries(20));
  Tamper("UPDATE audit_head SET seq = 17, hash = (SELECT hash FROM audit_log WHERE seq = 17)");
  VerifyResult past = Verify();
  EXPECT_FALSE(past.ok);
  EXPECT_EQ(past.first_bad_seq, 18);
  EXPECT_EQ(past.entries_checked, 18);
  EXPECT_THAT(past.problem, HasSubstr("entries 18 to 20 follow entry 17"));
}

TEST_F(AuditChainTest, RangesVerifyFromTheStoredHashBeforeThem) {
  ASSERT_TRUE(AppendEntries(20));
  pqxx::connection c(cluster_->ConnectionString());
  absl::StatusOr<VerifyResult> middle = VerifyChainRange(c, 5, 10);
  ASSERT_TRUE(middle.ok()) << middle.status();
  EXPECT_TRUE(middle->ok) << middle->problem;
  EXPECT_EQ(middle->entries_checked, 6);
  EXPECT_EQ(middle->last_seq, 10);
  absl::StatusOr<VerifyResult> whole = VerifyChainRange(c, 0, 0);
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->entries_checked, 20);
  EXPECT_EQ(whole->last_seq, 20);

  Tamper("DELETE FROM audit_log WHERE seq IN (8, 20)");
  absl::StatusOr<VerifyResult> gap = VerifyChainRange(c, 5, 10);
  ASSERT_TRUE(gap.ok());
  EXPECT_FALSE(gap->ok);
  EXPECT_EQ(gap->first_bad_seq, 8);
  EXPECT_THAT(gap->problem, HasSubstr("missing"));
  // The range after it cannot be anchored.
  absl::StatusOr<VerifyResult> unanchored = VerifyChainRange(c, 9, 10);
  ASSERT_TRUE(unanchored.ok());
  EXPECT_FALSE(unanchored->ok);
  EXPECT_EQ(unanchored->first_bad_seq, 8);
  EXPECT_THAT(unanchored->problem, HasSubstr("anchor"));
  // The head still says 20: its removal is found at the end of a range that names it.
  absl::StatusOr<VerifyResult> tail = VerifyChainRange(c, 15, 20);
  ASSERT_TRUE(tail.ok());
  EXPECT_FALSE(tail->ok);
  EXPECT_EQ(tail->first_bad_seq, 20);
  absl::StatusOr<VerifyResult> intact = VerifyChainRange(c, 10, 19);
  ASSERT_TRUE(intact.ok());
  EXPECT_TRUE(intact->ok) << intact->problem;

  for (auto [from, to] : std::vector<std::pair<int64_t, int64_t>>{{21, 0}, {5, 3}, {1, 21}, {1, -1}}) {
    absl::StatusOr<VerifyResult> refused = VerifyChainRange(c, from, to);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << from << ".." << to;
  }
}

TEST_F(AuditChainTest, AppendOnlyAndInTheCallersTransaction) {
  ASSERT_TRUE(pool_->Transact([&](pqxx::work& txn) { return Append(txn, MakeEntry(0, 0)).status(); }).ok());
  // A failed change takes its audit entry with it.
  absl::Status failed = pool_->Transact([&](pqxx::work& txn) -> absl::Status {
    absl::StatusOr<int64_t> seq = Append(txn, MakeEntry(0, 1));
    if (!seq.ok()) return seq.status();
    return absl::FailedPreconditionError("the change itself failed");
  });
  EXPECT_EQ(failed.code(), absl::StatusCode::kFailedPrecondition);
  // Ordinary SQL cannot rewrite or delete history.
  absl::Status update = pool_->Transact([](pqxx::work& txn) {
    txn.exec0("UPDATE audit_log SET reason = 'x'");
    return absl::OkStatus();
  });
  EXPECT_EQ(update.code(), absl::StatusCode::kFailedPrecondition) << update;
  // P0001: the append-only trigger's RAISE (its text is in the log, not in the status).
  EXPECT_THAT(std::string(update.message()), HasSubstr("database error P0001: "));
  absl::Status del = pool_->Transact([](pqxx::work& txn) {
    txn.exec0("DELETE FROM audit_log");
    return absl::OkStatus();
  });
  EXPECT_EQ(del.code(), absl::StatusCode::kFailedPrecondition);
  VerifyResult result = Verify();
  EXPECT_TRUE(result.ok) << result.problem;
  EXPECT_EQ(result.entries_checked, 1);
}

// A walk asks whether to go on between pages of entries: once told it was cancelled (its
// caller gone, its server draining) it stops, however long the log, and concludes nothing.
TEST_F(AuditChainTest, AWalkStopsBetweenPagesOnceCancelled) {
  WriteConcurrently();  // 4,000 entries: two pages and more
  pqxx::connection c(cluster_->ConnectionString());
  int asked = 0;
  absl::StatusOr<VerifyResult> stopped = VerifyChainRange(c, 1, 0, [&] { return ++asked > 1; });
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
  EXPECT_THAT(std::string(stopped.status().message()), HasSubstr("after 2000 entries"));
  EXPECT_EQ(asked, 2);
  absl::StatusOr<VerifyResult> whole = VerifyChainRange(c, 1, 0, [] { return false; });
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_TRUE(whole->ok) << whole->problem;
  EXPECT_EQ(whole->entries_checked, kWriters * kEntriesPerWriter);
}

// A walk holds no snapshot between its pages (one held through a long walk would keep every row
// version the appends leave meanwhile, the chain head's among them, and slow every append): between
// pages its connection has no transaction open. Entries appended meanwhile are walked too, up to
// the head of the last page's snapshot.
TEST_F(AuditChainTest, AWalkHoldsNoSnapshotBetweenPagesAndFollowsTheHead) {
  WriteConcurrently();  // 4,000 entries: two full pages
  pqxx::connection c(cluster_->ConnectionString());
  pqxx::connection observer(cluster_->ConnectionString());
  int asked = 0;
  std::vector<std::string> states;
  absl::StatusOr<VerifyResult> walked = VerifyChainRange(c, 1, 0, [&] {
    if (++asked > 1) {
      pqxx::nontransaction q(observer);
      states.push_back(
          q.exec_params1("SELECT state FROM pg_stat_activity WHERE pid = $1", c.backendpid())[0]
              .c_str());
      EXPECT_TRUE(AppendEntries(1));
    }
    return false;
  });
  ASSERT_TRUE(walked.ok()) << walked.status();
  EXPECT_TRUE(walked->ok) << walked->problem;
  EXPECT_EQ(asked, 3);  // before each of the pages 1-2000, 2001-4000 and 4001-4002
  EXPECT_EQ(states, std::vector<std::string>({"idle", "idle"}));
  EXPECT_EQ(walked->entries_checked, kWriters * kEntriesPerWriter + 2);
}

// A text field holding a NUL byte is stored up to it (libpq sends text that far; PostgreSQL text
// holds none) and hashed as stored, in every field, so the chain still verifies.
// AppendMany chains several entries in one statement, interleaved with Append by other writers:
// one chain, every entry verifying, the batch's entries consecutive and of one time (one call,
// one lock of the head), with quotes, backslashes and commas in fields kept as they were.
TEST_F(AuditChainTest, AppendManyChainsABatchInOneStatementAmongSingleAppends) {
  std::vector<std::thread> writers;
  std::atomic<int> failures{0};
  constexpr int kEach = 50;
  constexpr int kBatch = 7;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < kEach; ++i) {
        absl::Status s = pool_->Transact([&](pqxx::work& txn) -> absl::Status {
          if (w % 2 == 0) return Append(txn, MakeEntry(w, i)).status();
          std::vector<Entry> batch;
          for (int k = 0; k < kBatch; ++k) {
            Entry e = MakeEntry(w, i * kBatch + k);
            e.reason = absl::StrCat("say \"hi\", {a,b} \\ ", k);
            e.consent_version = k;
            batch.push_back(std::move(e));
          }
          absl::StatusOr<int64_t> last = AppendMany(txn, batch);
          if (!last.ok()) return last.status();
          return *last > 0 ? absl::OkStatus() : absl::InternalError("no seq returned");
        });
        if (!s.ok()) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : writers) t.join();
  ASSERT_EQ(failures.load(), 0);
  constexpr int kTotal = kWriters / 2 * kEach + kWriters / 2 * kEach * kBatch;
  VerifyResult ok = Verify();
  EXPECT_TRUE(ok.ok) << ok.problem;
  EXPECT_EQ(ok.entries_checked, kTotal);
  pqxx::connection c(cluster_->ConnectionString());
  pqxx::nontransaction q(c);
  // Each batch: kBatch consecutive seqs, one time.
  EXPECT_EQ(q.exec1("SELECT count(*) FROM (SELECT actor, at_us, max(seq) - min(seq) AS span, "
                    "count(*) AS n FROM audit_log WHERE actor LIKE '%/w1' GROUP BY actor, at_us) b "
                    "WHERE n = 7 AND span = 6")[0].as<int>(),
            kEach);
  pqxx::row one = q.exec1(
      "SELECT reason, consent_version FROM audit_log WHERE actor LIKE '%/w1' ORDER BY seq "
      "OFFSET 3 LIMIT 1");
  EXPECT_EQ(one[0].as<std::string>(), "say \"hi\", {a,b} \\ 3");
  EXPECT_EQ(one[1].as<int64_t>(), 3);
  // Nothing to append appends nothing.
  absl::StatusOr<int64_t> none = -1;
  ASSERT_TRUE(pool_->Transact([&](pqxx::work& txn) {
    none = AppendMany(txn, {});
    return none.status();
  }).ok());
  EXPECT_EQ(*none, 0);
  EXPECT_EQ(q.exec1("SELECT count(*) FROM audit_log")[0].as<int>(), kTotal);
}

TEST_F(AuditChainTest, AFieldWithANulByteIsHashedAsStored) {
  Entry e = MakeEntry(0, 0);
  e.reason = std::string("before\0after", 12);
  e.request_id = std::string("req\0x", 5);
  ASSERT_TRUE(pool_->Transact([&](pqxx::work& txn) { return Append(txn, e).status(); }).ok());
  ASSERT_TRUE(pool_->Transact([&](pqxx::work& txn) { return Append(txn, MakeEntry(0, 1)).status(); }).ok());
  VerifyResult result = Verify();
  EXPECT_TRUE(result.ok) << result.problem;
  EXPECT_EQ(result.entries_checked, 2);
  pqxx::connection c(cluster_->ConnectionString());
  pqxx::nontransaction q(c);
  pqxx::row stored = q.exec1("SELECT reason, request_id FROM audit_log ORDER BY seq LIMIT 1");
  EXPECT_EQ(stored[0].as<std::string>(), "before");
  EXPECT_EQ(stored[1].as<std::string>(), "req");
  // The same through AppendMany.
  ASSERT_TRUE(pool_->Transact([&](pqxx::work& txn) {
    return AppendMany(txn, {e, MakeEntry(0, 2)}).status();
  }).ok());
  result = Verify();
  EXPECT_TRUE(result.ok) << result.problem;
  EXPECT_EQ(result.entries_checked, 4);
}

// Random tampering by someone with the database owner's rights, each undone before the next:
// a field of any entry changed (with its hash left, or recomputed as the chain would), entries
// removed or swapped, the head moved back, an entry forged after it. Every one is detected,
// located at the entry the chain first stops holding at, and named as the fault it is. Seeded (MEDGATE_FUZZ_SEED and
// MEDGATE_FUZZ_ROUNDS replay or extend it).
TEST_F(AuditChainTest, RandomTamperingIsDetectedAndLocated) {
  constexpr int kEntries = 30;
  ASSERT_TRUE(AppendEntries(kEntries));
  pqxx::connection c(cluster_->ConnectionString());
  {
    pqxx::work txn(c);
    txn.exec0("CREATE TABLE audit_log_kept AS SELECT * FROM audit_log");
    txn.exec0("CREATE TABLE audit_head_kept AS SELECT * FROM audit_head");
    txn.commit();
  }
  auto restore = [&] {
    Tamper("DELETE FROM audit_log; INSERT INTO audit_log SELECT * FROM audit_log_kept; "
           "UPDATE audit_head SET seq = k.seq, hash = k.hash FROM audit_head_kept k");
  };
  static const char* const kTextFields[] = {"actor",     "tenant",     "object_type", "object_id",
                                            "patient_id", "reason",     "purpose",     "consent_id",
                                            "request_id", "origin"};
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(80);
  std::map<std::string, int> tried;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const int64_t k = static_cast<int64_t>(testing::Uniform(rng, 1, kEntries));
    auto other_than_k = [&] {
      int64_t m = k;
      while (m == k) m = static_cast<int64_t>(testing::Uniform(rng, 1, kEntries));
      return m;
    };
    auto random_text = [&] {
      std::string t(testing::Uniform(rng, 0, 12), 'x');
      for (char& ch : t) ch = static_cast<char>(testing::Uniform(rng, 0x20, 0x7e));
      return t;
    };
    const std::string sk = std::to_string(k);
    std::string what;
    int64_t expected = k;
    ChainFault fault = ChainFault::kAltered;
    switch (testing::Uniform(rng, 0, 9)) {
      case 0: {
        const std::string field = kTextFields[testing::Uniform(rng, 0, 9)];
        what = "text field " + field + " changed";
        pqxx::work txn(c);
        txn.exec0("SET LOCAL session_replication_role = replica");
        const std::string value = random_text();
        const pqxx::result r = txn.exec_params(
            "UPDATE audit_log SET " + field + " = $1 WHERE seq = $2 AND " + field + " <> $1", value,
            k);
        txn.commit();
        if (r.affected_rows() == 0) continue;  // the same value: nothing changed
        break;
      }
      case 1:
        what = "time changed";
        Tamper("UPDATE audit_log SET at_us = at_us + " +
               std::to_string(testing::Uniform(rng, 1, 1000000)) + " WHERE seq = " + sk);
        break;
      case 2: {
        what = "action, decision or consent version changed";
        static const char* const kChanges[] = {"action = 'delete'", "decision = 'deny'",
                                               "consent_version = consent_version + 1"};
        Tamper(std::string("UPDATE audit_log SET ") + kChanges[testing::Uniform(rng, 0, 2)] +
               " WHERE seq = " + sk);
        break;
      }
      case 3: {
        const bool prev = testing::Uniform(rng, 0, 1) == 1;
        what = prev ? "prev_hash replaced" : "hash replaced";
        if (prev) fault = ChainFault::kPrevHash;
        Tamper(std::string("UPDATE audit_log SET ") + (prev ? "prev_hash" : "hash") +
               " = sha256(random()::text::bytea) WHERE seq = " + sk);
        break;
      }
      case 4: {
        const int64_t last =
            std::min<int64_t>(kEntries, k + static_cast<int64_t>(testing::Uniform(rng, 0, 3)));
        what = "entries removed";
        // Removed up to the end, the head names entries the log no longer has.
        fault = last == kEntries ? ChainFault::kHeadBehind : ChainFault::kMissing;
        Tamper("DELETE FROM audit_log WHERE seq BETWEEN " + sk + " AND " + std::to_string(last));
        break;
      }
      case 5: {
        const int64_t m = other_than_k();
        what = "two entries' contents swapped";
        expected = std::min(k, m);
        fault = ChainFault::kPrevHash;
        Tamper("UPDATE audit_log a SET at_us = b.at_us, actor = b.actor, object_id = b.object_id, "
               "request_id = b.request_id, prev_hash = b.prev_hash, hash = b.hash FROM audit_log b "
               "WHERE (a.seq, b.seq) IN ((" + sk + ", " + std::to_string(m) + "), (" +
               std::to_string(m) + ", " + sk + "))");
        break;
      }
      case 6: {
        // The chain's own hash recomputed for the changed entry: the link to the next entry (or
        // the head, for the last) no longer holds.
        what = "a field changed and its hash recomputed";
        expected = k < kEntries ? k + 1 : k;
        fault = k < kEntries ? ChainFault::kPrevHash : ChainFault::kHeadHash;
        pqxx::work txn(c);
        const pqxx::row row = txn.exec_params1(
            "SELECT at_us, actor, tenant, action, object_type, object_id, patient_id, decision, "
            "reason, purpose, consent_id, consent_version, request_id, origin, prev_hash FROM "
            "audit_log WHERE seq = $1", k);
        Entry e;
        e.actor = row[1].as<std::string>();
        e.tenant = row[2].as<std::string>();
        for (Action a : {Action::kCreate, Action::kRead, Action::kUpdate, Action::kDelete,
                         Action::kExecute}) {
          if (ActionName(a) == row[3].as<std::string>()) e.action = a;
        }
        e.object_type = row[4].as<std::string>();
        e.object_id = row[5].as<std::string>() + "-forged";
        e.patient_id = row[6].as<std::string>();
        e.decision = row[7].as<std::string>() == "deny" ? Decision::kDeny : Decision::kPermit;
        e.reason = row[8].as<std::string>();
        e.purpose = row[9].as<std::string>();
        e.consent_id = row[10].as<std::string>();
        e.consent_version = row[11].as<int64_t>();
        e.request_id = row[12].as<std::string>();
        e.origin = row[13].as<std::string>();
        const std::string prev = pqxx::binarystring(row[14]).str();
        const std::string forged = ChainHash(prev, k, row[0].as<int64_t>(), e);
        txn.exec0("SET LOCAL session_replication_role = replica");
        txn.exec_params("UPDATE audit_log SET object_id = $1, hash = $2 WHERE seq = $3",
                        e.object_id, pqxx::binarystring(forged), k);
        txn.commit();
        break;
      }
      case 7:
        if (k == kEntries) continue;
        what = "the head moved back";
        expected = k + 1;
        fault = ChainFault::kPastHead;
        Tamper("UPDATE audit_head SET seq = " + sk +
               ", hash = (SELECT hash FROM audit_log WHERE seq = " + sk + ")");
        break;
      case 8:
        what = "an entry forged after the head";
        expected = kEntries + 1;
        // Its hash is not the chain's: read before the head is, that is what the walk names.
        fault = ChainFault::kAltered;
        Tamper("INSERT INTO audit_log SELECT seq + 1, at_us + 1, actor, tenant, action, "
               "object_type, object_id, patient_id, decision, reason, purpose, consent_id, "
               "consent_version, request_id, origin, hash, sha256(hash) FROM audit_log "
               "WHERE seq = " + std::to_string(kEntries));
        break;
      default:
        what = "nothing changed";
        expected = 0;
        fault = ChainFault::kNone;
        break;
    }
    SCOPED_TRACE(what + " at entry " + sk);
    ++tried[what];
    const VerifyResult result = Verify();
    EXPECT_EQ(result.ok, expected == 0) << result.problem;
    EXPECT_EQ(result.first_bad_seq, expected) << result.problem;
    EXPECT_EQ(result.fault, fault) << result.problem;
    restore();
    if (HasFailure()) break;
  }
  const VerifyResult restored = Verify();
  EXPECT_TRUE(restored.ok) << restored.problem;
  EXPECT_EQ(restored.entries_checked, kEntries);
  for (const auto& [what, n] : tried) std::printf("%s: %d rounds\n", what.c_str(), n);
}

}  // namespace
}  // namespace medgate::audit
