// The regional shards: region id -> connection pool.
#include "absl/strings/string_view.h"
#include "libs/pg/shard_set.h"

#include "absl/strings/str_cat.h"

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
    return absl::NotFoundError(absl::StrCat("region '", region_id, "' is not configured"));
  }
  return it->second.get();
}

std::vector<std::string> ShardSet::RegionIds() const {
  std::vector<std::string> ids;
  for (const auto& [id, pool] : pools_) ids.push_back(id);
  return ids;
}

absl::Status ShardSet::PingAll() const {
  for (const auto& [id, pool] : pools_) {
    if (absl::Status s = pool->Ping(); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("region ", id, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace medgate::pg
