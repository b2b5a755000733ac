// The standard gRPC health check, asked by hand (the health protos are not installed with gRPC).
#include "tests/support/health_check.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/poll.h"

namespace medgate::test_support {

// The health protos are not installed with gRPC: the request (an empty HealthCheckRequest) and
// the response (field 1, a varint) are written and read by hand.
absl::StatusOr<Health> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                   absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::GenericStub stub(channel);
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                 &response, [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(s);
                   done = true;
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        absl::StrCat("grpc.health.v1.Health/Check: ", status.error_message()));
  }
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("unreadable health response");
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // UNKNOWN (0) is the field's default, which proto3 leaves out: an empty message.
  if (bytes.empty()) return Health::kUnknown;
  if (bytes.size() != 2 || bytes[0] != 0x08 || static_cast<unsigned char>(bytes[1]) > 3) {
    return absl::InternalError(absl::StrCat("unexpected health response of ", bytes.size(),
                                            " bytes"));
  }
  return static_cast<Health>(bytes[1]);
}

absl::string_view HealthName(Health health) {
  switch (health) {
    case Health::kUnknown: return "UNKNOWN";
    case Health::kServing: return "SERVING";
    case Health::kNotServing: return "NOT_SERVING";
    case Health::kServiceUnknown: return "SERVICE_UNKNOWN";
  }
  return "?";
}

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
