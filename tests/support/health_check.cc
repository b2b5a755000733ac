// Waiting for a server's health, and a shard outage seen through it.
#include "tests/support/health_check.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/poll.h"

namespace medgate::test_support {

absl::Status WaitForHealth(const std::shared_ptr<grpc::Channel>& channel, Health want,
                           absl::Time deadline) {
  absl::StatusOr<Health> last = absl::DeadlineExceededError("not asked before the deadline");
  const bool reached = PollUntil(deadline, [&] {
    // No call outlives the deadline by more than a moment.
    last = CheckHealth(channel, std::max(deadline - absl::Now(), absl::Milliseconds(100)));
    if (last.ok() && *last == want) return true;
    absl::SleepFor(absl::Milliseconds(20));  // the servers' probes run every second or two
    return false;
  });
  if (reached) return absl::OkStatus();
  return absl::DeadlineExceededError(
      absl::StrCat("health is not ", HealthName(want), " by the deadline; the last answer: ",
                   last.ok() ? HealthName(*last) : last.status().ToString()));
}

absl::Status ExpectServingWhileAnyRegionAnswers(const std::shared_ptr<grpc::Channel>& channel,
                                                PgClusterSet& clusters, const std::string& first,
                                                absl::Time deadline) {
  absl::Status result = [&]() -> absl::Status {
    if (absl::Status s = WaitForHealth(channel, Health::kServing, deadline); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("before any shard stopped: ", s.message()));
    }
    for (PgCluster* region : clusters.regions()) {
      if (absl::Status s = region->Stop(); !s.ok()) return s;
    }
    if (absl::Status s = WaitForHealth(channel, Health::kNotServing, deadline); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("with every shard down: ", s.message()));
    }
    if (absl::Status s = clusters.region(first).StartAgain(); !s.ok()) return s;
    if (absl::Status s = WaitForHealth(channel, Health::kServing, deadline); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("with ", first, " back and the other shards down: ",
                                                 s.message()));
    }
    return absl::OkStatus();
  }();
  for (PgCluster* region : clusters.regions()) {
    if (region->running()) continue;
    if (absl::Status s = region->StartAgain(); !s.ok() && result.ok()) result = s;
  }
  return result;
}

}  // namespace medgate::test_support
