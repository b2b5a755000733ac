// consent_bench: what a consent check costs from the cache (next to the SQL it replaces), and how
// long a committed revocation takes to reach a cache, against a real PostgreSQL it starts.
//
//   consent_bench [--patients N] [--checks N] [--uncached N] [--revocations N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "libs/common/log.h"
#include "libs/common/process.h"
#include "libs/consent_client/consent_cache.h"
#include "libs/consent_client/consent_decision.h"
#include "libs/consent_client/consent_store.h"
#include "libs/migrate/migrate.h"
#include "tests/support/pg_cluster.h"

namespace medgate::consent {
namespace {

constexpr char kActor[] = "spiffe://medgate.bench/tenant/acme/app/backend";

struct Flags {
  int patients = 10000;
  int checks = 2000000;
  int uncached = 2000;
  int revocations = 50;
};

int64_t Nanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU time of this thread: what a check costs, whatever else the machine is running.
int64_t CpuNanos() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "consent_bench: %s\n", what.c_str());
  std::exit(1);
}

std::string PatientId(int i) { return absl::StrCat("pt_bench_", i); }

// Grants CARE to patients [from, to) for the whole tenant, in one transaction.
void GrantCare(pqxx::connection& c, int from, int to) {
  pqxx::work txn(c);
  txn.exec_params0(
      "INSERT INTO consents (consent_id, patient_id, tenant_id, purpose, actor) "
      "SELECT 'cn_bench_' || i, 'pt_bench_' || i, 'acme', 'CARE', '' "
      "FROM generate_series($1::int, $2::int - 1) i",
      from, to);
  txn.exec_params0(
      "INSERT INTO consent_versions (consent_id, version, state, valid_from, valid_until, "
      "evidence_ref, reason, recorded_by, recorded_at, request_id) "
      "SELECT 'cn_bench_' || i, 1, 'granted', now(), NULL, 'form', '', 'bench', now(), 'b' "
      "FROM generate_series($1::int, $2::int - 1) i",
      from, to);
  txn.commit();
}

double Percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

bool ParseFlags(int argc, char** argv, Flags& flags) {
  for (int i = 1; i + 1 < argc; i += 2) {
    int value = std::atoi(argv[i + 1]);
    if (value <= 0) return false;
    if (std::strcmp(argv[i], "--patients") == 0) {
      flags.patients = value;
    } else if (std::strcmp(argv[i], "--checks") == 0) {
      flags.checks = value;
    } else if (std::strcmp(argv[i], "--uncached") == 0) {
      flags.uncached = value;
    } else if (std::strcmp(argv[i], "--revocations") == 0) {
      flags.revocations = value;
    } else {
      return false;
    }
  }
  return argc % 2 == 1;
}

int Run(const Flags& flags) {
  log::SetMinLevel(log::Level::kWarning);
  auto cluster = test_support::PgCluster::Start("bench-fr-1");
  if (!cluster.ok()) Die(std::string(cluster.status().message()));
  const std::string conninfo = (*cluster)->ConnectionString();
  pqxx::connection admin(conninfo);
  auto migrations = migrate::LoadMigrations(std::string(MEDGATE_SOURCE_DIR) + "/migrations/shard");
  if (!migrations.ok()) Die(std::string(migrations.status().message()));
  if (auto applied = migrate::Apply(admin, *migrations); !applied.ok()) {
    Die(std::string(applied.status().message()));
  }
  GrantCare(admin, 0, flags.patients);

  RegionConfig region;
  region.id = "fr-1";
  region.db.conninfo = conninfo;
  std::unique_ptr<ConsentCache> cache = NewConsentCache({region});
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!cache->FeedListening("fr-1")) {
    if (absl::Now() > deadline) Die("the consent feed did not come up");
  }

  // Cached: every patient loaded once, then checks answered from memory.
  std::vector<std::string> patients;
  for (int i = 0; i < flags.patients; ++i) patients.push_back(PatientId(i));
  for (const std::string& p : patients) {
    auto d = cache->Check("fr-1", p, Purpose::kCare, kActor, "", absl::Now());
    if (!d.ok() || !d->permit) Die("warm-up check did not permit");
  }
  const ConsentCacheStats before = cache->Stats();
  int permits = 0;
  const int64_t cached_start = Nanos();
  const int64_t cached_cpu_start = CpuNanos();
  for (int i = 0; i < flags.checks; ++i) {
    auto d = cache->Check("fr-1", patients[static_cast<size_t>(i % flags.patients)], Purpose::kCare,
                          kActor, "", absl::Now());
    permits += d.ok() && d->permit;
  }
  const int64_t cached_cpu_ns = CpuNanos() - cached_cpu_start;
  const int64_t cached_ns = Nanos() - cached_start;
  const ConsentCacheStats after = cache->Stats();
  if (permits != flags.checks) Die("a cached check did not permit");

  // Uncached reference: the same decision read from the shard every time.
  pqxx::connection direct(conninfo);
  direct.prepare(LoadCurrentConsentsStatement().name, LoadCurrentConsentsStatement().sql);
  const int64_t uncached_start = Nanos();
  for (int i = 0; i < flags.uncached; ++i) {
    pqxx::nontransaction txn(direct);
    auto records = LoadCurrentConsents(txn, patients[static_cast<size_t>(i % flags.patients)]);
    if (!records.ok()) Die(std::string(records.status().message()));
    if (!Decide(*records, Purpose::kCare, kActor, "", absl::Now()).permit) Die("uncached: no permit");
  }
  const int64_t uncached_ns = Nanos() - uncached_start;

  // Propagation: a cached permit, then a revocation committed on another connection; the time
  // from sending COMMIT until the cache denies.
  std::vector<double> propagation_ms;
  const int base = flags.patients;
  for (int i = 0; i < flags.revocations; ++i) {
    const std::string patient = PatientId(base + i);
    const uint64_t heard = cache->Stats().notifications;
    GrantCare(admin, base + i, base + i + 1);
    // Its own notification first, so it cannot drop the entry loaded below.
    const absl::Time wait_until = absl::Now() + absl::Seconds(10);
    while (cache->Stats().notifications <= heard) {
      if (absl::Now() > wait_until) Die("grant notification not heard within 10 s");
    }
    auto d = cache->Check("fr-1", patient, Purpose::kCare, kActor, "", absl::Now());
    if (!d.ok() || !d->permit) Die("propagation: no permit before the revocation");
    pqxx::work txn(admin);
    txn.exec_params0(
        "INSERT INTO consent_versions (consent_id, version, state, valid_from, valid_until, "
        "evidence_ref, reason, recorded_by, recorded_at, request_id) VALUES "
        "($1, 2, 'revoked', now(), NULL, 'form', 'bench', 'bench', now(), 'r')",
        absl::StrCat("cn_bench_", base + i));
    const int64_t commit_sent = Nanos();
    txn.commit();
    const int64_t give_up = commit_sent + int64_t{10} * 1000 * 1000 * 1000;
    while (true) {
      auto now = cache->Check("fr-1", patient, Purpose::kCare, kActor, "", absl::Now());
      if (now.ok() && !now->permit) break;
      if (Nanos() > give_up) Die("revocation did not reach the cache within 10 s");
      // Leave the CPU to the listener thread: on a busy machine, spinning would delay the very
      // notification being measured.
      std::this_thread::yield();
    }
    propagation_ms.push_back(static_cast<double>(Nanos() - commit_sent) / 1e6);
  }

  std::printf("consent_bench: PostgreSQL 15 on loopback, %d patients, 1 thread\n", flags.patients);
  std::printf(
      "  cached check   (ConsentCache::Check, hit)   %8.1f ns/op CPU, %8.1f ns/op wall  "
      "(%d checks, %llu hits)\n",
      static_cast<double>(cached_cpu_ns) / flags.checks,
      static_cast<double>(cached_ns) / flags.checks, flags.checks,
      static_cast<unsigned long long>(after.hits - before.hits));
  std::printf("  uncached check (SQL on the shard + Decide)  %8.1f us/op wall  (%d lookups)\n",
              static_cast<double>(uncached_ns) / flags.uncached / 1e3, flags.uncached);
  std::printf(
      "  revocation propagation (COMMIT sent -> cache denies)  p50 %.2f ms  p99 %.2f ms  "
      "max %.2f ms  (%d revocations)\n",
      Percentile(propagation_ms, 0.50), Percentile(propagation_ms, 0.99),
      *std::max_element(propagation_ms.begin(), propagation_ms.end()), flags.revocations);
  cache.reset();
  return 0;
}

}  // namespace
}  // namespace medgate::consent

int main(int argc, char** argv) {
  medgate::ConfigureProcess();
  medgate::consent::Flags flags;
  if (!medgate::consent::ParseFlags(argc, argv, flags)) {
    std::fputs(
        "usage: consent_bench [--patients N] [--checks N] [--uncached N] [--revocations N]\n",
        stderr);
    return 2;
  }
  return medgate::consent::Run(flags);
}
