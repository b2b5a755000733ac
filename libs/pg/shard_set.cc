// The regional shards: region id -> connection pool.
#include "libs/pg/shard_set.h"

#include <iterator>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace medgate::pg {

ShardSet::ShardSet(const std::vector<RegionConfig>& regions,
                   const std::vector<Statement>& statements) {
  for (const RegionConfig& region : regions) {
    PoolOptions options = PoolOptions::FromConfig(region.id, region.db);
    options.statements = statements;
    pools_.emplace(region.id, std::make_unique<Pool>(std::move(options)));
  }
}

absl::StatusOr<Pool*> ShardSet::Get(absl::string_view region_id) const {
  auto it = pools_.find(region_id);
  if (it == pools_.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "region '", region_id, "' is not configured in this service: its data cannot be reached "
        "here until the service's configuration lists it as routing does"));
  }
  return it->second.get();
}

std::vector<std::string> ShardSet::RegionIds() const {
  std::vector<std::string> ids;
  for (const auto& [id, pool] : pools_) ids.push_back(id);
  return ids;
}

absl::Status ShardSet::PingAny() const {
  if (pools_.empty()) return absl::UnavailableError("no region is configured");
  const size_t first = last_answered_.load(std::memory_order_relaxed) % pools_.size();
  std::vector<std::string> failures;
  for (size_t k = 0; k < pools_.size(); ++k) {
    const size_t index = (first + k) % pools_.size();
    const auto& [id, pool] = *std::next(pools_.begin(), static_cast<std::ptrdiff_t>(index));
    absl::Status s = pool->Ping();
    if (s.ok()) {
      last_answered_.store(index, std::memory_order_relaxed);
      return s;
    }
    failures.push_back(absl::StrCat("region ", id, ": ", s.message()));
  }
  return absl::UnavailableError(
      absl::StrCat("no shard answers: ", absl::StrJoin(failures, "; ")));
}

}  // namespace medgate::pg
