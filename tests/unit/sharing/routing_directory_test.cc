// Unit tests of the sharing service's RoutingDirectory caches, against a fake routing server
// (only its residency rules answer here; the rest of routing is tested in its own service tests).
#include "services/sharing/routing_directory.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tests/unit/routing_client/wall_clock_step.h"

namespace medgate::sharing {
namespace {

// Answers every territory's rule with the regions it is told to, at a version that counts changes.
class FakeRules final : public v1::TenantRouting::Service {
 public:
  void SetRegion(const std::string& region) {
    std::lock_guard<std::mutex> lock(mu_);
    region_ = region;
    ++version_;
  }
  int calls() const { return calls_.load(); }

  grpc::Status ListResidencyRules(grpc::ServerContext*, const v1::ListResidencyRulesRequest* request,
                                  v1::ListResidencyRulesResponse* response) override {
    ++calls_;
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& territory : request->territories()) {
      v1::ResidencyRule* rule = response->add_rules();
      rule->set_territory(territory);
      rule->add_region_ids(region_);
      rule->set_version(version_);
    }
    return grpc::Status::OK;
  }

 private:
  std::mutex mu_;
  std::string region_ = "fr-1";
  int64_t version_ = 1;
  std::atomic<int> calls_{0};
};

class RoutingDirectoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&fake_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials());
  }
  void TearDown() override {
    ResetWallClock();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }

  std::unique_ptr<RoutingDirectory> Directory(RoutingDirectoryOptions options) {
    return std::make_unique<RoutingDirectory>(NewRoutingClient(channel_), channel_, control_,
                                              std::move(options));
  }

  static std::string RegionOf(const absl::StatusOr<residency::ResidencyRule>& rule) {
    if (!rule.ok()) return rule.status().ToString();
    return rule->allowed_regions.empty() ? "" : rule->allowed_regions[0];
  }

  FakeRules fake_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  // Never connected: these tests look up rules only, which come from routing.
  pg::Pool control_{ControlOptions()};

  static pg::PoolOptions ControlOptions() {
    pg::PoolOptions options;
    options.name = "control";
    options.conninfo = "host=/nonexistent";
    return options;
  }
};

TEST_F(RoutingDirectoryTest, ReusesARuleForItsTtlThenAsksAgain) {
  std::atomic<int64_t> now_ms{0};
  RoutingDirectoryOptions options;
  options.ttl = absl::Seconds(10);
  options.clock = [&] { return absl::UnixEpoch() + absl::Milliseconds(now_ms.load()); };
  auto directory = Directory(options);
  EXPECT_EQ(RegionOf(directory->Rule("FR")), "fr-1");
  fake_.SetRegion("fr-2");
  now_ms = 9999;
  EXPECT_EQ(RegionOf(directory->Rule("FR")), "fr-1");  // still cached
  EXPECT_EQ(fake_.calls(), 1);
  now_ms = 10000;
  EXPECT_EQ(RegionOf(directory->Rule("FR")), "fr-2");
  EXPECT_EQ(fake_.calls(), 2);
}

TEST_F(RoutingDirectoryTest, AWallClockSteppedBackDoesNotExtendACachedRule) {
  RoutingDirectoryOptions options;  // the default clock
  options.ttl = absl::Milliseconds(200);
  auto directory = Directory(options);
  EXPECT_EQ(RegionOf(directory->Rule("FR")), "fr-1");
  fake_.SetRegion("fr-2");  // a rule narrowed at routing
  ASSERT_TRUE(StepWallClock(-absl::Hours(1)));
  // Far longer than the TTL, far shorter than the step (timed on the steady clock).
  std::string region;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  do {
    region = RegionOf(directory->Rule("FR"));
    if (region != "fr-1") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(region, "fr-2");
}

}  // namespace
}  // namespace medgate::sharing
