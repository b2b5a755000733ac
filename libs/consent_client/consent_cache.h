// Access decisions from memory for hot paths: consents of each shard cached per patient, with
// changes pushed by PostgreSQL LISTEN/NOTIFY so a revocation reaches every running instance
// within a second, and a cache that cannot stay fresh fails closed.
#ifndef MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_CACHE_H_
#define MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_CACHE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/common/config.h"

namespace medgate::consent {

// The purposes of use (ARCHITECTURE.md). There is deliberately no commercial purpose.
enum class Purpose { kCare = 1, kRemoteMonitoring = 2, kRecordSharing = 3, kResearch = 4, kGeolocation = 5 };

enum class AccessReason {
  kPermitted,
  kNoConsent,
  kRevoked,
  kExpired,
  kActorNotCovered,
  kNotYetValid,
  // The consent that would apply is narrowed to data categories the use is not of.
  kCategoryNotCovered,
};

absl::string_view PurposeName(Purpose purpose);        // "CARE", "REMOTE_MONITORING", ...
absl::string_view AccessReasonName(AccessReason reason);  // "PERMITTED", "NO_CONSENT", ...

struct AccessDecision {
  bool permit = false;
  AccessReason reason = AccessReason::kNoConsent;
  std::string consent_id;       // the consent the decision rests on ("" when none)
  int64_t consent_version = 0;
  // When this decision changes by itself (a period of a consent it considered starts or ends);
  // InfiniteFuture() if never. A change of the consents themselves may come sooner.
  absl::Time valid_until = absl::InfiniteFuture();
};

struct ConsentCacheOptions {
  size_t max_patients = 200000;                       // LRU-evicted beyond this
  // ... and beyond this many bytes of cached consents (estimated: a patient may hold 1,000
  // consents, each narrowed to an actor of up to 512 bytes). A patient's consents larger than a
  // sixteenth of it are not cached: they are read for each check.
  size_t max_bytes = size_t{256} << 20;
  absl::Duration max_staleness = absl::Seconds(30);   // entries older than this are reloaded
  // The change feed unheard from this long (a heartbeat checks it every quarter of it, at most
  // every 500 ms): UNAVAILABLE. It bounds how long a cache may miss a revocation when the feed
  // dies without a word: DOMAIN's "a cache may lag by at most a second".
  absl::Duration fail_closed_after = absl::Seconds(1);
  // A load (a cache miss) waits at most this long for a free connection, and as long for the
  // shard's answer (its statement timeout; DEADLINE_EXCEEDED). A shard that stops answering
  // altogether is left a second later, also DEADLINE_EXCEEDED. Opening a new connection is
  // bounded apart (connect_timeout); a load on a connection found broken is tried once more.
  absl::Duration load_timeout = absl::Seconds(2);
};

// Counters since the cache was created, for metrics and tests.
struct ConsentCacheStats {
  uint64_t hits = 0;           // checks answered from memory
  uint64_t loads = 0;          // checks that read the shard
  uint64_t notifications = 0;  // change notifications received, every region
  uint64_t feed_starts = 0;    // times a region's feed started listening (dropping its entries)
  uint64_t entries = 0;        // patients cached now
  uint64_t bytes = 0;          // their estimated size now
};

// Thread-safe.
class ConsentCache {
 public:
  virtual ~ConsentCache() = default;

  // May `actor` (the caller's verified SPIFFE id; "" is covered by no consent) use
  // `patient_id`'s data for `purpose` at `now`? Default deny. The patient's home region
  // comes from routing. A region whose change feed is down longer than fail_closed_after, or
  // whose shard cannot be read: UNAVAILABLE (callers treat it as deny). A tenant identity is
  // covered by its tenant's tenant-wide consents and by consents narrowed to exactly it
  // (consent_decision.h has the rules); unknown region: FAILED_PRECONDITION.
  // `category` is the data category of the use (consent_decision.h: DataCategories()), "" for
  // a use that is of none in particular: a consent narrowed to categories covers only uses of
  // one of them.
  virtual absl::StatusOr<AccessDecision> Check(absl::string_view region_id,
                                               absl::string_view patient_id, Purpose purpose,
                                               absl::string_view actor, absl::string_view category,
                                               absl::Time now) = 0;

  // The decision Check would give when it can be made from memory now; nullopt when Check would
  // read the shard (the patient's consents are not cached, or were loaded too long ago). Never
  // waits for the database. Implementations without a cache answer nullopt.
  virtual std::optional<absl::StatusOr<AccessDecision>> CheckCached(
      absl::string_view /*region_id*/, absl::string_view /*patient_id*/, Purpose /*purpose*/,
      absl::string_view /*actor*/, absl::string_view /*category*/, absl::Time /*now*/) {
    return std::nullopt;
  }

  // Drops what is cached for a patient (the consent service calls it after its own writes).
  virtual void Invalidate(absl::string_view patient_id) = 0;

  // Whether the change feed of `region_id` is listening now, so that what is cached for it is
  // kept fresh (health probes; tests wait for it before relying on cached answers).
  virtual bool FeedListening(absl::string_view /*region_id*/) const { return true; }

  virtual ConsentCacheStats Stats() const { return {}; }
};

// The cache's bounds from the configuration's consent section, the same for every service that
// holds a cache (consent, ingest, sharing); every key optional:
//   consent:
//     cache: {max_patients, max_mib, max_staleness_ms, fail_closed_after_ms, load_timeout_ms}
absl::StatusOr<ConsentCacheOptions> ParseConsentCacheOptions(const MedgateConfig& config);

// One listener connection and one loading pool per region in `regions`.
std::unique_ptr<ConsentCache> NewConsentCache(const std::vector<RegionConfig>& regions,
                                              ConsentCacheOptions options = {});

}  // namespace medgate::consent

#endif  // MEDGATE_LIBS_CONSENT_CLIENT_CONSENT_CACHE_H_
