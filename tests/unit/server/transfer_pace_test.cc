// TransferPace: a transfer's rate is the bytes moved over the time its call blocked on the client,
// as the call's StallWatch counted it, checked once that time passes the grace.
#include "libs/server/transfer_pace.h"

#include <grpcpp/server_context.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "libs/server/stall_watch.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;

TEST(TransferPaceTest, CountsOnlyTheTimeBlockedOnTheClientAndNamesItsSetting) {
  // A watch whose limit is never reached here: it only counts.
  StallWatch watch(absl::Hours(1), "idle");
  grpc::ServerContext context;
  StallWatch::Call call(watch, context);
  TransferPace pace(call, "read", absl::Milliseconds(50), 1000, "ingest.read_min_bytes_per_second",
                    "read the page again");
  // Time spent outside a blocking read or write does not count, however long: within the grace.
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_TRUE(pace.Check().ok());
  EXPECT_EQ(call.blocked_in_all(), absl::ZeroDuration());

  // Past the grace while blocked, 10 bytes (under 1,000 a second for at least 100 ms) is too slow.
  call.Blocked();
  absl::SleepFor(absl::Milliseconds(100));
  call.Unblocked();
  EXPECT_GE(call.blocked_in_all(), absl::Milliseconds(100));
  pace.Moved(10);
  grpc::Status slow = pace.Check();
  EXPECT_EQ(slow.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_THAT(slow.error_message(), HasSubstr("under the minimum of 1000"));
  EXPECT_THAT(slow.error_message(), HasSubstr("(ingest.read_min_bytes_per_second)"));
  EXPECT_THAT(slow.error_message(), HasSubstr("read the page again"));

  // Enough bytes for any time blocked so far: fast enough again.
  pace.Moved(1'000'000'000);
  EXPECT_TRUE(pace.Check().ok());
}

}  // namespace
}  // namespace medgate
