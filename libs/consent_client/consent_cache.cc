// The consent cache: striped LRU of patients' current consents, kept fresh by one LISTEN
// connection per region, loading misses through a bounded pool, failing closed when a region's
// change feed has been silent for too long.
#include "libs/consent_client/consent_cache.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <ctime>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include <pqxx/pqxx>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/consent_client/consent_decision.h"
#include "libs/consent_client/consent_store.h"
#include "libs/pg/conninfo.h"
#include "libs/pg/pg_status.h"
#include "libs/pg/pool.h"
#include "libs/pg/statement_watch.h"

namespace medgate::consent {
namespace {

constexpr char kChannel[] = "consent_changed";
constexpr size_t kMaxStripes = 16;
// How long the listener waits for a notification before checking whether it must stop or send a
// heartbeat: bounds shutdown time, not how fast notifications are handled.
constexpr long kAwaitMicros = 100000;
constexpr absl::Duration kMaxHeartbeat = absl::Milliseconds(500);
constexpr absl::Duration kMinBackoff = absl::Milliseconds(50);
// A feed listener stuck this long (at least; twice the fail-closed limit if longer) on one wait
// or round trip has its connection shut and starts over.
constexpr absl::Duration kMinFeedStall = absl::Seconds(2);
constexpr absl::Duration kMaxBackoff = absl::Milliseconds(500);
// How long past load_timeout (the shard's statement timeout for a load) a load waits for a shard
// that does not end its statement: one that has stopped answering.
constexpr absl::Duration kFrozenShardGrace = absl::Seconds(1);

// Durations on the hot path are compared as monotonic nanoseconds, immune to the wall clock being
// stepped. The coarse clock (a few milliseconds of resolution) costs a fraction of the precise
// one, and staleness and fail-closed bounds are seconds.
int64_t MonoNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// Calls `fn` with the payload of each notification on `channel`.
class Receiver final : public pqxx::notification_receiver {
 public:
  Receiver(pqxx::connection_base& connection, const std::string& channel,
           std::function<void(const std::string&)> fn)
      : pqxx::notification_receiver(connection, channel), fn_(std::move(fn)) {}
  void operator()(const std::string& payload, int) override { fn_(payload); }

 private:
  std::function<void(const std::string&)> fn_;
};

struct Region {
  std::string id;
  std::string conninfo;  // credentials: never logged
  std::unique_ptr<pg::Pool> pool;
  // Bumped whenever the feed (re)starts listening: entries loaded under an older epoch may have
  // missed notifications and are not used.
  std::atomic<uint64_t> epoch{0};
  // Last time the feed was known to be listening (MonoNanos).
  std::atomic<int64_t> alive_at{0};
  std::atomic<bool> listening{false};
  std::atomic<uint64_t> notifications{0};
  std::atomic<uint64_t> feed_starts{0};
  std::thread listener;
  // A copy (dup) of the feed connection's socket while it is open, -1 otherwise, under feed_mu;
  // and when the listener last came back from a wait or a round trip (MonoNanos). A listener
  // stuck longer than the stall limit (a backend that stopped answering: its kernel still acks,
  // so no TCP timeout ends the wait) has its socket shut by the watchdog, and reconnects.
  std::mutex feed_mu;
  int feed_socket = -1;
  std::atomic<int64_t> progress_at{0};
};

struct Entry {
  std::string patient_id;
  const Region* region;
  uint64_t region_epoch;
  int64_t loaded_at;  // MonoNanos
  std::vector<ConsentRecord> consents;
  size_t bytes = 0;   // EntryBytes, counted in its stripe's bytes
};

// What an entry takes in memory, about: its own size, its list and index nodes, and its strings.
size_t EntryBytes(absl::string_view patient_id, const std::vector<ConsentRecord>& consents) {
  size_t bytes = sizeof(Entry) + 64 + 2 * patient_id.size();
  for (const ConsentRecord& c : consents) {
    bytes += sizeof(ConsentRecord) + c.consent_id.size() + c.tenant_id.size() + c.actor.size();
    for (const std::string& category : c.categories) bytes += sizeof(std::string) + category.size();
  }
  return bytes;
}

// One lock's worth of the cache. The epoch changes with every invalidation, so that a load that
// raced with one does not store what it read. Locks here are std::mutex rather than absl::Mutex:
// this one is the hot path, and Debian's Abseil runs deadlock detection on every absl::Mutex
// acquisition (and is not instrumented for ThreadSanitizer).
struct Stripe {
  std::mutex mu;
  std::list<Entry> lru;  // most recently used first
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index;
  size_t bytes = 0;  // the entries' EntryBytes
  uint64_t epoch = 0;
  uint64_t hits = 0;  // counted under the lock the check holds anyway
  uint64_t loads = 0;
};

class PgConsentCache final : public ConsentCache {
 public:
  PgConsentCache(const std::vector<RegionConfig>& regions, ConsentCacheOptions options)
      : options_(options),
        max_staleness_ns_(absl::ToInt64Nanoseconds(options.max_staleness)),
        fail_closed_ns_(absl::ToInt64Nanoseconds(options.fail_closed_after)),
        heartbeat_ns_(
            absl::ToInt64Nanoseconds(std::min(kMaxHeartbeat, options.fail_closed_after / 4))),
        stall_ns_(absl::ToInt64Nanoseconds(
            std::max(kMinFeedStall, 2 * options.fail_closed_after))),
        stripe_count_(std::clamp<size_t>(options.max_patients, 1, kMaxStripes)),
        stripe_capacity_(std::max<size_t>(1, options.max_patients / stripe_count_)),
        stripe_bytes_(std::max<size_t>(1, options.max_bytes / stripe_count_)),
        stripes_(std::make_unique<Stripe[]>(stripe_count_)) {
    const int64_t now = MonoNanos();
    for (const RegionConfig& config : regions) {
      auto region = std::make_unique<Region>();
      region->id = config.id;
      region->conninfo = config.db.conninfo;
      pg::PoolOptions pool = pg::PoolOptions::FromConfig(config.id, config.db);
      pool.acquire_timeout = options_.load_timeout;
      pool.statement_timeout = options_.load_timeout;
      pool.statements = {LoadCurrentConsentsStatement()};
      region->pool = std::make_unique<pg::Pool>(std::move(pool));
      // Not yet listening, but not failed either: give the feed the same grace as an outage.
      region->alive_at = now;
      regions_.emplace(config.id, std::move(region));
    }
    for (auto& [id, region] : regions_) {
      Region* r = region.get();
      r->listener = std::thread([this, r] { ListenLoop(*r); });
    }
    watchdog_ = std::thread([this] { WatchFeeds(); });
  }

  ~PgConsentCache() override {
    {
      std::lock_guard<std::mutex> lock(stop_mu_);
      stopping_ = true;
    }
    stop_cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    for (auto& [id, region] : regions_) {
      if (region->listener.joinable()) region->listener.join();
    }
  }

  absl::StatusOr<AccessDecision> Check(absl::string_view region_id, absl::string_view patient_id,
                                       Purpose purpose, absl::string_view actor,
                                       absl::string_view category, absl::Time now) override {
    return *Answer(region_id, patient_id, purpose, actor, category, now, /*may_load=*/true);
  }

  std::optional<absl::StatusOr<AccessDecision>> CheckCached(absl::string_view region_id,
                                                            absl::string_view patient_id,
                                                            Purpose purpose,
                                                            absl::string_view actor,
                                                            absl::string_view category,
                                                            absl::Time now) override {
    return Answer(region_id, patient_id, purpose, actor, category, now, /*may_load=*/false);
  }

  // nullopt only when `may_load` is false and the decision would need a load.
  std::optional<absl::StatusOr<AccessDecision>> Answer(absl::string_view region_id,
                                                       absl::string_view patient_id,
                                                       Purpose purpose, absl::string_view actor,
                                                       absl::string_view category, absl::Time now,
                                                       bool may_load) {
    auto it = regions_.find(region_id);
    if (it == regions_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("region '", region_id, "' is not configured for consent checks"));
    }
    Region& region = *it->second;
    if (static_cast<int>(purpose) < static_cast<int>(Purpose::kCare) ||
        static_cast<int>(purpose) > static_cast<int>(Purpose::kGeolocation)) {
      return absl::InvalidArgumentError("purpose: not a known purpose");
    }
    if (!category.empty() && !IsDataCategory(category)) {
      return absl::InvalidArgumentError("category: not a known data category");
    }
    const int64_t mono = MonoNanos();
    if (mono - region.alive_at.load(std::memory_order_acquire) > fail_closed_ns_) {
      return absl::UnavailableError(
          absl::StrCat("consent change feed of region ", region.id, " has been down for more than ",
                       absl::FormatDuration(options_.fail_closed_after), ": failing closed"));
    }
    Stripe& stripe = StripeOf(patient_id);
    uint64_t stripe_epoch;
    {
      std::lock_guard<std::mutex> lock(stripe.mu);
      auto hit = stripe.index.find(patient_id);
      if (hit != stripe.index.end()) {
        Entry& entry = *hit->second;
        if (entry.region == &region &&
            entry.region_epoch == region.epoch.load(std::memory_order_acquire) &&
            mono - entry.loaded_at < max_staleness_ns_) {
          stripe.lru.splice(stripe.lru.begin(), stripe.lru, hit->second);
          ++stripe.hits;
          return Decide(entry.consents, purpose, actor, category, now);
        }
        if (!may_load) return std::nullopt;  // left for Check to drop and load again
        Remove(stripe, hit);
      }
      if (!may_load) return std::nullopt;
      stripe_epoch = stripe.epoch;
      ++stripe.loads;
    }
    // Read before loading: an epoch that moves while the load runs means it may be stale.
    const uint64_t region_epoch = region.epoch.load(std::memory_order_acquire);
    absl::StatusOr<std::vector<ConsentRecord>> consents = Load(region, patient_id);
    if (!consents.ok()) return consents.status();
    AccessDecision decision = Decide(*consents, purpose, actor, category, now);
    {
      std::lock_guard<std::mutex> lock(stripe.mu);
      if (stripe.epoch == stripe_epoch &&
          region.epoch.load(std::memory_order_acquire) == region_epoch &&
          !stripe.index.contains(patient_id)) {
        const size_t bytes = EntryBytes(patient_id, *consents);
        // A patient whose consents would take more than the stripe's bytes is read each time.
        if (bytes <= stripe_bytes_) {
          while (!stripe.lru.empty() && (stripe.lru.size() >= stripe_capacity_ ||
                                         stripe.bytes + bytes > stripe_bytes_)) {
            Remove(stripe, stripe.index.find(stripe.lru.back().patient_id));
          }
          stripe.lru.push_front(Entry{std::string(patient_id), &region, region_epoch, mono,
                                      *std::move(consents), bytes});
          stripe.index.emplace(stripe.lru.front().patient_id, stripe.lru.begin());
          stripe.bytes += bytes;
        }
      }
    }
    return decision;
  }

  bool FeedListening(absl::string_view region_id) const override {
    auto it = regions_.find(region_id);
    // Listening, and heard from within the fail-closed limit: a connection that stopped answering
    // is not a feed, though LISTEN once took effect on it.
    return it != regions_.end() && it->second->listening.load(std::memory_order_acquire) &&
           MonoNanos() - it->second->alive_at.load(std::memory_order_acquire) <= fail_closed_ns_;
  }

  ConsentCacheStats Stats() const override {
    ConsentCacheStats stats;
    for (size_t i = 0; i < stripe_count_; ++i) {
      std::lock_guard<std::mutex> lock(stripes_[i].mu);
      stats.hits += stripes_[i].hits;
      stats.loads += stripes_[i].loads;
      stats.entries += stripes_[i].lru.size();
      stats.bytes += stripes_[i].bytes;
    }
    for (const auto& [id, region] : regions_) {
      stats.notifications += region->notifications.load(std::memory_order_acquire);
      stats.feed_starts += region->feed_starts.load(std::memory_order_acquire);
    }
    return stats;
  }

  void Invalidate(absl::string_view patient_id) override {
    Stripe& stripe = StripeOf(patient_id);
    std::lock_guard<std::mutex> lock(stripe.mu);
    ++stripe.epoch;
    auto it = stripe.index.find(patient_id);
    if (it == stripe.index.end()) return;
    Remove(stripe, it);
  }

 private:
  Stripe& StripeOf(absl::string_view patient_id) {
    return stripes_[absl::Hash<absl::string_view>{}(patient_id) % stripe_count_];
  }

  // Drops a cached patient; the stripe's lock is held.
  static void Remove(Stripe& stripe,
                     absl::flat_hash_map<std::string, std::list<Entry>::iterator>::iterator at) {
    stripe.bytes -= at->second->bytes;
    stripe.lru.erase(at->second);
    stripe.index.erase(at);
  }

  bool Stopping() {
    std::lock_guard<std::mutex> lock(stop_mu_);
    return stopping_;
  }

  // Shuts the socket of a feed whose listener has been stuck past the stall limit, so that its
  // blocked round trip fails and the listener reconnects.
  void WatchFeeds() {
    while (WaitUnlessStopping(absl::Nanoseconds(heartbeat_ns_))) {
      for (auto& [id, region] : regions_) {
        std::lock_guard<std::mutex> lock(region->feed_mu);
        const int64_t stuck_for = MonoNanos() - region->progress_at.load(std::memory_order_acquire);
        if (region->feed_socket < 0 || stuck_for <= stall_ns_) continue;
        log::Warning("consent_feed_stalled",
                     {{"region", id}, {"stuck_ms", stuck_for / 1000000}});
        ::shutdown(region->feed_socket, SHUT_RDWR);
        region->progress_at.store(MonoNanos(), std::memory_order_release);  // once per stall
      }
    }
  }

  // Publishes (or, with -1, withdraws and closes) the copy of the feed's socket the watchdog may
  // shut.
  static void PublishFeedSocket(Region& region, int socket) {
    std::lock_guard<std::mutex> lock(region.feed_mu);
    if (region.feed_socket >= 0) ::close(region.feed_socket);
    region.feed_socket = socket < 0 ? -1 : ::fcntl(socket, F_DUPFD_CLOEXEC, 0);
    region.progress_at.store(MonoNanos(), std::memory_order_release);
  }

  // Waits for `d` unless the cache is being destroyed; false when it is.
  bool WaitUnlessStopping(absl::Duration d) {
    std::unique_lock<std::mutex> lock(stop_mu_);
    return !stop_cv_.wait_for(lock, absl::ToChronoNanoseconds(d), [this] { return stopping_; });
  }

  // One round trip on a pooled connection; a connection found broken (the shard restarted since
  // it was opened) is replaced once. A slow shard ends the statement itself at load_timeout (its
  // statement_timeout: DEADLINE_EXCEEDED, the connection kept); one that stops answering (frozen,
  // its storage hung) cannot, and is left kFrozenShardGrace later, its connection dropped.
  absl::StatusOr<std::vector<ConsentRecord>> Load(Region& region, absl::string_view patient_id) {
    absl::Status status;
    for (int attempt = 0; attempt < 2; ++attempt) {
      absl::StatusOr<pg::Lease> lease = region.pool->Acquire();
      if (!lease.ok()) return lease.status();
      absl::StatusOr<std::vector<ConsentRecord>> loaded;
      bool fired = false;
      {
        pg::StatementWatch::Scope watch(load_watch_, lease->connection().sock(),
                                        options_.load_timeout + kFrozenShardGrace);
        try {
          pqxx::nontransaction txn(lease->connection());
          loaded = LoadCurrentConsents(txn, patient_id);
        } catch (const std::exception& e) {
          loaded = pg::StatusFromException(e);
        }
        fired = watch.fired();
      }
      if (fired) {
        // Its socket is shut: the connection goes, whatever the statement returned.
        lease->MarkBroken();
        if (loaded.ok()) return loaded;
        return absl::DeadlineExceededError(absl::StrCat(
            "consents of region ", region.id, " not read within ",
            absl::FormatDuration(options_.load_timeout + kFrozenShardGrace),
            " (consent.cache.load_timeout_ms and ", absl::FormatDuration(kFrozenShardGrace),
            " more): the shard does not answer"));
      }
      if (loaded.ok() || loaded.status().code() != absl::StatusCode::kUnavailable) return loaded;
      status = loaded.status();
      lease->MarkBroken();
    }
    return status;
  }

  void OnNotification(Region& region, const std::string& payload) {
    region.alive_at.store(MonoNanos(), std::memory_order_release);
    if (payload.empty()) {
      // Not one of ours (the trigger always names the patient): be safe, forget the region.
      region.epoch.fetch_add(1, std::memory_order_acq_rel);
    } else {
      Invalidate(payload);
    }
    region.notifications.fetch_add(1, std::memory_order_acq_rel);
  }

  void ListenLoop(Region& region) {
    absl::Duration backoff = kMinBackoff;
    bool was_up = true;  // so that a feed that never comes up is reported once
    while (!Stopping()) {
      bool listened = false;
      absl::Status status = ListenOnce(region, listened);
      if (listened) {
        backoff = kMinBackoff;
        was_up = true;
      }
      if (Stopping()) break;
      if (was_up) {
        log::Warning("consent_feed_down", {{"region", region.id}, {"error", status.message()}});
        was_up = false;
      }
      if (!WaitUnlessStopping(backoff)) break;
      backoff = std::min(backoff * 2, kMaxBackoff);
    }
  }

  // Listens until the connection fails or the cache stops. `listened` tells whether LISTEN took
  // effect (the feed was up for a while).
  absl::Status ListenOnce(Region& region, bool& listened) {
    std::unique_ptr<pqxx::connection> connection;
    std::unique_ptr<Receiver> receiver;
    absl::Status status;
    try {
      connection = std::make_unique<pqxx::connection>(pg::WithConnectionDefaults(region.conninfo));
      PublishFeedSocket(region, connection->sock());
      {
        pqxx::nontransaction setup(*connection);
        setup.exec0("SET application_name = 'medgate-consent-feed'");
        setup.exec0(absl::StrCat("SET statement_timeout = ",
                                 absl::ToInt64Milliseconds(options_.load_timeout)));
      }
      receiver = std::make_unique<Receiver>(
          *connection, kChannel,
          [this, &region](const std::string& payload) { OnNotification(region, payload); });
      // libpqxx swallows a LISTEN that fails on a broken connection: confirm it took effect.
      {
        pqxx::nontransaction check(*connection);
        pqxx::row listening = check.exec1(
            "SELECT count(*) FROM pg_listening_channels() c WHERE c = 'consent_changed'");
        if (listening[0].as<int>() != 1) {
          throw pqxx::broken_connection("LISTEN consent_changed did not take effect");
        }
      }
      const int backend = connection->backendpid();
      // Whatever changed while nobody listened was missed: forget this region's entries.
      region.epoch.fetch_add(1, std::memory_order_acq_rel);
      region.alive_at.store(MonoNanos(), std::memory_order_release);
      region.listening.store(true, std::memory_order_release);
      region.feed_starts.fetch_add(1, std::memory_order_acq_rel);
      listened = true;
      log::Info("consent_feed_up", {{"region", region.id}});
      int64_t last_beat = MonoNanos();
      while (!Stopping()) {
        connection->await_notification(0, kAwaitMicros);
        region.progress_at.store(MonoNanos(), std::memory_order_release);
        // libpqxx 6 silently reconnects a broken connection on next use; a new backend may have
        // missed notifications, so that counts as a failure.
        if (connection->backendpid() != backend) {
          throw pqxx::broken_connection("listener connection was re-established");
        }
        const int64_t now = MonoNanos();
        if (now - last_beat >= heartbeat_ns_) {
          // A round trip proves the connection (and so the feed) is alive, which silence alone
          // does not.
          pqxx::nontransaction beat(*connection);
          beat.exec1("SELECT 1");
          region.progress_at.store(MonoNanos(), std::memory_order_release);
          last_beat = now;
          region.alive_at.store(MonoNanos(), std::memory_order_release);
        }
      }
    } catch (const std::exception& e) {
      status = pg::StatusFromException(e);
    }
    region.listening.store(false, std::memory_order_release);
    PublishFeedSocket(region, -1);
    // Close first, so that dropping the receiver does not reconnect to send UNLISTEN.
    if (connection) connection->disconnect();
    receiver.reset();
    connection.reset();
    return status;
  }

  const ConsentCacheOptions options_;
  const int64_t max_staleness_ns_;
  const int64_t fail_closed_ns_;
  const int64_t heartbeat_ns_;
  const int64_t stall_ns_;  // a feed listener stuck this long is shut (WatchFeeds)
  const size_t stripe_count_;
  const size_t stripe_capacity_;
  const size_t stripe_bytes_;
  std::unique_ptr<Stripe[]> stripes_;
  pg::StatementWatch load_watch_;  // Load's deadline on a shard that stops answering
  std::map<std::string, std::unique_ptr<Region>, std::less<>> regions_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;  // guarded by stop_mu_
  std::thread watchdog_;   // WatchFeeds; started after regions_ is complete
};

}  // namespace

std::unique_ptr<ConsentCache> NewConsentCache(const std::vector<RegionConfig>& regions,
                                              ConsentCacheOptions options) {
  return std::make_unique<PgConsentCache>(regions, options);
}

absl::StatusOr<ConsentCacheOptions> ParseConsentCacheOptions(const MedgateConfig& config) {
  ConsentCacheOptions o;
  if (!config.root.Has("consent")) return o;
  ASSIGN_OR_RETURN(ConfigNode consent, config.root.Child("consent"));
  RETURN_IF_ERROR(consent.OnlyKeys({"cache"}));
  if (!consent.Has("cache")) return o;
  ASSIGN_OR_RETURN(ConfigNode cache, consent.Child("cache"));
  RETURN_IF_ERROR(cache.OnlyKeys(
      {"max_patients", "max_mib", "max_staleness_ms", "fail_closed_after_ms", "load_timeout_ms"}));
  ASSIGN_OR_RETURN(int64_t max_patients,
                   cache.Int("max_patients", 1, 100000000, static_cast<int64_t>(o.max_patients)));
  ASSIGN_OR_RETURN(int64_t max_mib,
                   cache.Int("max_mib", 1, 1 << 20, static_cast<int64_t>(o.max_bytes >> 20)));
  ASSIGN_OR_RETURN(int64_t staleness, cache.Int("max_staleness_ms", 100, 86400000,
                                                absl::ToInt64Milliseconds(o.max_staleness)));
  // At most a second, the bound on how long a cache may miss a revocation (DOMAIN.md); at least
  // 250 ms, so that the feed's heartbeat fits several times into it.
  ASSIGN_OR_RETURN(int64_t fail_closed, cache.Int("fail_closed_after_ms", 250, 1000,
                                                  absl::ToInt64Milliseconds(o.fail_closed_after)));
  ASSIGN_OR_RETURN(int64_t load_timeout, cache.Int("load_timeout_ms", 10, 60000,
                                                   absl::ToInt64Milliseconds(o.load_timeout)));
  o.max_patients = static_cast<size_t>(max_patients);
  o.max_bytes = static_cast<size_t>(max_mib) << 20;
  o.max_staleness = absl::Milliseconds(staleness);
  o.fail_closed_after = absl::Milliseconds(fail_closed);
  o.load_timeout = absl::Milliseconds(load_timeout);
  return o;
}

}  // namespace medgate::consent
