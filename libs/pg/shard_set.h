// The regional shards: region id -> connection pool, built from the configuration.
#ifndef MEDGATE_LIBS_PG_SHARD_SET_H_
#define MEDGATE_LIBS_PG_SHARD_SET_H_

#include <atomic>
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "libs/common/config.h"
#include "libs/pg/pool.h"

namespace medgate::pg {

class ShardSet {
 public:
  // One pool per configured region; `statements` are prepared on every shard connection.
  ShardSet(const std::vector<RegionConfig>& regions, const std::vector<Statement>& statements);

  // FAILED_PRECONDITION for a region that is not configured: the service's configuration is out
  // of step with routing's placements, which a caller must not take for "no such patient"
  // (NOT_FOUND would end an erasure's retries as if there were nothing to erase).
  absl::StatusOr<Pool*> Get(absl::string_view region_id) const;
  std::vector<std::string> RegionIds() const;

  // OK while any shard answers (a service that can serve some regions' patients is up: one
  // region down must not take the others with it); otherwise UNAVAILABLE naming every region's
  // failure. Pings the region that answered last first, so an unreachable one does not delay
  // every call by its connect timeout.
  absl::Status PingAny() const;

 private:
  std::map<std::string, std::unique_ptr<Pool>, std::less<>> pools_;
  mutable std::atomic<size_t> last_answered_{0};  // index in pools_' order
};

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_SHARD_SET_H_
