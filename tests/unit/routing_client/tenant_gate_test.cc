// Unit tests of the cached tenant gate, with a fake fetcher and a fake clock.
#include "libs/routing_client/tenant_gate.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <thread>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "tests/unit/routing_client/wall_clock_step.h"

namespace medgate {
namespace {

class TenantGateTest : public ::testing::Test {
 protected:
  void TearDown() override { ResetWallClock(); }

  // With the fake clock `now_`, or else the gate's own default clock and `ttl`.
  std::unique_ptr<TenantGate> MakeGate(bool fake_clock = true,
                                       absl::Duration ttl = absl::Seconds(2),
                                       TenantGateOptions options = {}) {
    options.ttl = ttl;
    options.max_cached = 2;
    if (fake_clock) options.clock = [this] { return now_; };
    return NewCachedTenantGate(
        [this](absl::Span<const std::string> ids) -> absl::StatusOr<std::vector<TenantStatus>> {
          fetched_.insert(fetched_.end(), ids.begin(), ids.end());
          if (!fetch_error_.ok()) return fetch_error_;
          std::vector<TenantStatus> out;
          for (const std::string& id : ids) {
            auto it = registered_.find(id);
            out.push_back({.tenant_id = wrong_answer_ ? "other" : id,
                           .found = it != registered_.end(),
                           .active = it != registered_.end() && it->second});
          }
          return out;
        },
        options);
  }

  absl::Time now_ = absl::FromUnixSeconds(1'800'000'000);
  std::map<std::string, bool> registered_ = {{"acme", true}, {"paused", false}};
  absl::Status fetch_error_;
  bool wrong_answer_ = false;
  std::vector<std::string> fetched_;
};

TEST_F(TenantGateTest, AnswersFromRoutingAndNamesTheRefusal) {
  auto gate = MakeGate();
  EXPECT_TRUE(gate->CheckActive("acme").ok());
  absl::Status paused = gate->CheckActive("paused");
  EXPECT_EQ(paused.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(paused.message().find("'paused' is suspended"), absl::string_view::npos);
  absl::Status stranger = gate->CheckActive("stranger");
  EXPECT_EQ(stranger.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(stranger.message().find("not registered"), absl::string_view::npos);
}

// An active tenant's identities start calls at most at the configured rate after its burst; the
// refusal says which limits and when to retry. Each tenant has its own count, refused calls
// (of a suspended tenant) are not counted, and time gives calls back.
TEST_F(TenantGateTest, AnActiveTenantsCallsAreBoundedByTheCallRate) {
  registered_["globex"] = true;
  ServerLimits limits;
  limits.tenant_calls_per_second = 10;
  limits.tenant_call_burst = 3;
  auto gate = MakeGate(/*fake_clock=*/true, absl::Seconds(2), TenantGateOptions::FromLimits(limits));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(gate->CheckActive("acme").ok()) << i;
  absl::Status refused = gate->CheckActive("acme");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("limits.tenant_calls_per_second"), absl::string_view::npos)
      << refused;
  EXPECT_NE(refused.message().find("retry in 100 ms"), absl::string_view::npos) << refused;
  // Another tenant is not charged for acme's calls.
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(gate->CheckActive("globex").ok()) << i;
  // A suspended tenant is refused for that, and its refusals count nothing.
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(gate->CheckActive("paused").code(), absl::StatusCode::kPermissionDenied);
  }
  registered_["paused"] = true;
  now_ += absl::Seconds(3);  // its answer expires: it is active now
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(gate->CheckActive("paused").ok()) << i;
  // Three seconds later acme has its burst again (at most): three calls, not four.
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(gate->CheckActive("acme").ok()) << i;
  EXPECT_EQ(gate->CheckActive("acme").code(), absl::StatusCode::kResourceExhausted);
  now_ += absl::Milliseconds(100);  // one call's worth at 10 a second
  EXPECT_TRUE(gate->CheckActive("acme").ok());
  EXPECT_EQ(gate->CheckActive("acme").code(), absl::StatusCode::kResourceExhausted);
  // A call that counts as two waits for two calls' worth; one that counts as more than the burst
  // takes the whole burst, or it could never pass.
  now_ += absl::Milliseconds(100);
  absl::Status costly = gate->CheckActive("acme", 2);
  EXPECT_EQ(costly.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(costly.message().find("this call counts as 2"), absl::string_view::npos) << costly;
  now_ += absl::Milliseconds(100);
  EXPECT_TRUE(gate->CheckActive("acme", 2).ok());
  now_ += absl::Seconds(1);
  EXPECT_TRUE(gate->CheckActive("acme", 50).ok());
  EXPECT_FALSE(gate->CheckActive("acme").ok());
}

TEST_F(TenantGateTest, CachesForItsTtlThenAsksAgain) {
  auto gate = MakeGate();
  ASSERT_TRUE(gate->CheckActive("acme").ok());
  registered_["acme"] = false;  // suspended in routing
  now_ += absl::Seconds(1);
  EXPECT_TRUE(gate->CheckActive("acme").ok());  // cached answer, within the TTL
  EXPECT_EQ(fetched_.size(), 1u);
  now_ += absl::Seconds(1);  // the TTL has passed
  EXPECT_EQ(gate->CheckActive("acme").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(fetched_.size(), 2u);
  // A refusal is cached for the TTL too, and lifted after it.
  registered_["acme"] = true;
  EXPECT_EQ(gate->CheckActive("acme").code(), absl::StatusCode::kPermissionDenied);
  now_ += absl::Seconds(2);
  EXPECT_TRUE(gate->CheckActive("acme").ok());
  EXPECT_EQ(fetched_.size(), 3u);
}

// The host clock stepped back (by NTP, by an operator) must not keep a suspended tenant served
// past the TTL: expiry is timed on a clock that the step does not move.
TEST_F(TenantGateTest, AWallClockSteppedBackDoesNotExtendAnAnswer) {
  auto gate = MakeGate(/*fake_clock=*/false, absl::Milliseconds(200));
  ASSERT_TRUE(gate->CheckActive("acme").ok());
  registered_["acme"] = false;  // suspended in routing
  ASSERT_TRUE(StepWallClock(-absl::Hours(1)));
  // Waits for the suspension, far longer than the TTL but far shorter than the step (on the
  // steady clock: test_support::PollUntil's deadline is on the wall clock, stepped here).
  absl::Status status;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  do {
    status = gate->CheckActive("acme");
    if (!status.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
}

TEST_F(TenantGateTest, FailsClosedAndCachesNoFailure) {
  auto gate = MakeGate();
  fetch_error_ = absl::UnavailableError("routing ResolveTenants: connection refused");
  absl::Status down = gate->CheckActive("acme");
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(down.message().find("cannot learn whether tenant 'acme' may act"),
            absl::string_view::npos);
  // Routing refusing the service itself is not a decision about the tenant.
  fetch_error_ = absl::PermissionDeniedError("routing ResolveTenants: a app identity may not call");
  EXPECT_EQ(gate->CheckActive("acme").code(), absl::StatusCode::kUnavailable);
  fetch_error_ = absl::OkStatus();
  EXPECT_TRUE(gate->CheckActive("acme").ok());  // asked again at once
  EXPECT_EQ(fetched_.size(), 3u);
  // An answer about another tenant is an error, not a decision.
  wrong_answer_ = true;
  EXPECT_EQ(gate->CheckActive("paused").code(), absl::StatusCode::kInternal);
}

TEST_F(TenantGateTest, HoldsAtMostItsCapacity) {
  auto gate = MakeGate();  // capacity 2
  ASSERT_TRUE(gate->CheckActive("acme").ok());
  ASSERT_FALSE(gate->CheckActive("paused").ok());
  ASSERT_FALSE(gate->CheckActive("stranger").ok());  // evicts acme, the least recently used
  ASSERT_TRUE(gate->CheckActive("acme").ok());
  EXPECT_EQ(fetched_, (std::vector<std::string>{"acme", "paused", "stranger", "acme"}));
}

// When an answer is missing under load, the calls that miss it together wait for one fetch and
// share its answer, a failure included (which is not cached: the next call asks again).
TEST(CachedTenantGateConcurrency, ConcurrentMissesShareOneFetch) {
  for (const bool fail : {false, true}) {
    absl::Notification release;
    std::atomic<int> fetches{0};
    CachedTenantGate gate(
        [&](absl::Span<const std::string> ids) -> absl::StatusOr<std::vector<TenantStatus>> {
          fetches.fetch_add(1);
          release.WaitForNotification();
          if (fail) return absl::DeadlineExceededError("routing did not answer");
          return std::vector<TenantStatus>{{.tenant_id = ids[0], .found = true, .active = true}};
        },
        TenantGateOptions{});
    constexpr int kCalls = 8;
    std::vector<absl::Status> results(kCalls);
    std::vector<std::thread> calls;
    for (int i = 0; i < kCalls; ++i) {
      calls.emplace_back([&, i] { results[static_cast<size_t>(i)] = gate.CheckActive("acme"); });
    }
    // Every call but the one fetching comes to wait for its answer.
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (gate.waiting_for_fetch() < kCalls - 1 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    EXPECT_EQ(gate.waiting_for_fetch(), static_cast<size_t>(kCalls - 1));
    release.Notify();
    for (std::thread& t : calls) t.join();
    EXPECT_EQ(fetches.load(), 1);
    for (const absl::Status& s : results) {
      if (fail) {
        EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
        EXPECT_NE(s.message().find("routing did not answer"), absl::string_view::npos) << s;
      } else {
        EXPECT_TRUE(s.ok()) << s;
      }
    }
    EXPECT_EQ(gate.CheckActive("acme").ok(), !fail);
    EXPECT_EQ(fetches.load(), fail ? 2 : 1);
  }
}

// Routing that takes the connection but never answers: the gate's look-up ends at its deadline
// and the call is refused as retryable, instead of holding the caller's thread.
TEST(RoutingTenantGate, ALookUpEndsAtItsDeadline) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(listener, 16), 0);  // connections complete in the backlog; nothing is read
  socklen_t length = sizeof(address);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length), 0);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", ntohs(address.sin_port)),
                                     grpc::InsecureChannelCredentials());
  std::unique_ptr<TenantGate> gate =
      NewRoutingTenantGate(channel, TenantGateOptions{}, absl::Milliseconds(200));
  absl::Status status = gate->CheckActive("acme");
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("routing ResolveTenants"), absl::string_view::npos) << status;
  close(listener);
}

}  // namespace
}  // namespace medgate
