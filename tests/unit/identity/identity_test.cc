// Unit tests of libs/identity's pure parts: SPIFFE id parsing and the per-RPC role check.
#include <gtest/gtest.h>

#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

#include "libs/identity/authz.h"
#include "libs/identity/credentials.h"
#include "libs/identity/principal.h"

namespace medgate {
namespace {

constexpr char kTd[] = "medgate.test";

TEST(ParseSpiffeIdTest, ParsesEveryForm) {
  struct Case {
    const char* uri;
    PrincipalKind kind;
    const char* tenant;
    const char* name;
  };
  for (const Case& c : {
           Case{"spiffe://medgate.test/tenant/acme/device/dev-1", PrincipalKind::kDevice, "acme", "dev-1"},
           Case{"spiffe://medgate.test/tenant/acme/practitioner/p.1", PrincipalKind::kPractitioner, "acme", "p.1"},
           Case{"spiffe://medgate.test/tenant/acme/app/backend", PrincipalKind::kApp, "acme", "backend"},
           Case{"spiffe://medgate.test/service/routing", PrincipalKind::kService, "", "routing"},
           Case{"spiffe://medgate.test/ops/alice", PrincipalKind::kOps, "", "alice"},
       }) {
    absl::StatusOr<Principal> p = ParseSpiffeId(c.uri, kTd);
    ASSERT_TRUE(p.ok()) << c.uri << ": " << p.status();
    EXPECT_EQ(p->kind, c.kind);
    EXPECT_EQ(p->tenant, c.tenant);
    EXPECT_EQ(p->name, c.name);
    EXPECT_EQ(p->spiffe_id, c.uri);
    EXPECT_EQ(p->IsTenantScoped(), c.kind != PrincipalKind::kService && c.kind != PrincipalKind::kOps);
  }
}

TEST(ParseSpiffeIdTest, RefusesEverythingElse) {
  for (const char* uri : {
           "spiffe://evil.test/tenant/acme/app/backend",   // another trust domain
           "spiffe://medgate.test.evil/ops/alice",         // look-alike trust domain
           "https://medgate.test/ops/alice",               // not spiffe
           "spiffe://medgate.test/robot/x",                // unknown form
           "spiffe://medgate.test/tenant/acme/robot/x",    // unknown tenant kind
           "spiffe://medgate.test/tenant/acme/app",        // too short
           "spiffe://medgate.test/tenant/acme/app/a/b",    // too long
           "spiffe://medgate.test/tenant//app/backend",    // empty segment
           "spiffe://medgate.test/ops/al ice",             // invalid character
           "spiffe://medgate.test/service/../ops",         // path trickery (invalid segment)
           // Dot segments, which the SPIFFE spec forbids (a normalising tool reads another id).
           "spiffe://medgate.test/tenant/../device/d",
           "spiffe://medgate.test/tenant/acme/device/..",
           "spiffe://medgate.test/ops/..",
           "spiffe://medgate.test/service/.",
           "",
       }) {
    absl::StatusOr<Principal> p = ParseSpiffeId(uri, kTd);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kUnauthenticated) << uri;
  }
}

TEST(RpcPolicyTest, AllowsListedKindsAndDeniesByDefault) {
  RpcPolicy policy(kTd, {{"PlacePatient", {PrincipalKind::kApp, PrincipalKind::kPractitioner}},
                         {"UpsertTenant", {PrincipalKind::kOps}}});
  Principal app = *ParseSpiffeId("spiffe://medgate.test/tenant/acme/app/backend", kTd);
  Principal device = *ParseSpiffeId("spiffe://medgate.test/tenant/acme/device/d", kTd);
  Principal ops = *ParseSpiffeId("spiffe://medgate.test/ops/alice", kTd);
  EXPECT_TRUE(policy.Check(app, "PlacePatient").ok());
  EXPECT_EQ(policy.Check(device, "PlacePatient").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(policy.Check(app, "UpsertTenant").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(policy.Check(ops, "UpsertTenant").ok());
  // An RPC nobody listed is denied to everybody, ops included.
  EXPECT_EQ(policy.Check(ops, "DropEverything").code(), absl::StatusCode::kPermissionDenied);
}

// A rule may narrow a service RPC to some services, by name: their identities are the configured
// ones where the configuration names one, spiffe://TD/service/NAME otherwise. Other identities'
// rules are untouched.
TEST(RpcPolicyTest, AServiceRuleAdmitsOnlyTheNamedServicesIdentities) {
  const ServiceIdentities configured = {{"ingest", "spiffe://medgate.test/service/ingest-eu"}};
  RpcPolicy policy(kTd,
                   {{"ResolveDevices", {PrincipalKind::kService}, 1, {"ingest"}},
                    {"ResolvePatients", {PrincipalKind::kService}, 1, {"ingest", "consent"}},
                    {"ListRegions", {PrincipalKind::kService, PrincipalKind::kOps}},
                    {"ListResidencyRules", {PrincipalKind::kService, PrincipalKind::kOps}, 1,
                     {"sharing"}}},
                   configured);
  auto service = [](const std::string& name) {
    return *ParseSpiffeId(absl::StrCat("spiffe://medgate.test/service/", name), kTd);
  };
  const Principal ops = *ParseSpiffeId("spiffe://medgate.test/ops/alice", kTd);
  EXPECT_TRUE(policy.Check(service("ingest-eu"), "ResolveDevices").ok());
  absl::Status by_default_name = policy.Check(service("ingest"), "ResolveDevices");
  EXPECT_EQ(by_default_name.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(by_default_name.message(),
            "the service identity spiffe://medgate.test/service/ingest may not call "
            "ResolveDevices: only ingest may");
  EXPECT_EQ(policy.Check(service("consent"), "ResolveDevices").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(policy.Check(service("consent"), "ResolvePatients").ok());
  EXPECT_TRUE(policy.Check(service("ingest-eu"), "ResolvePatients").ok());
  EXPECT_EQ(policy.Check(service("sharing"), "ResolvePatients").code(),
            absl::StatusCode::kPermissionDenied);
  // Unnarrowed: any service; narrowed for services only: ops as before.
  EXPECT_TRUE(policy.Check(service("anything"), "ListRegions").ok());
  EXPECT_TRUE(policy.Check(ops, "ListResidencyRules").ok());
  EXPECT_TRUE(policy.Check(service("sharing"), "ListResidencyRules").ok());
  EXPECT_EQ(policy.Check(service("routing"), "ListResidencyRules").code(),
            absl::StatusCode::kPermissionDenied);
}

// A gate answering from a fixed set of active tenants, counting what it was asked.
class SetTenantGate final : public TenantGate {
 public:
  explicit SetTenantGate(std::set<std::string> active) : active_(std::move(active)) {}
  absl::Status CheckActive(absl::string_view tenant, double calls) override {
    asked.emplace_back(tenant);
    counted.push_back(calls);
    if (active_.contains(std::string(tenant))) return absl::OkStatus();
    return absl::PermissionDeniedError(absl::StrCat("tenant '", tenant, "' is suspended"));
  }
  std::vector<std::string> asked;
  std::vector<double> counted;  // what each call counted as

 private:
  const std::set<std::string> active_;
};

// A method declared to count as several calls is counted so by the gate; others as one.
TEST(RpcPolicyTest, TheGateCountsEachMethodAsDeclared) {
  RpcPolicy policy(kTd, {{"PlacePatient", {PrincipalKind::kApp}},
                         {"ReadVitals", {PrincipalKind::kApp}, 10}});
  SetTenantGate gate({"acme"});
  policy.set_tenant_gate(&gate);
  Principal acme = *ParseSpiffeId("spiffe://medgate.test/tenant/acme/app/backend", kTd);
  EXPECT_TRUE(policy.Check(acme, "PlacePatient").ok());
  EXPECT_TRUE(policy.Check(acme, "ReadVitals").ok());
  EXPECT_EQ(gate.counted, (std::vector<double>{1, 10}));
}

TEST(RpcPolicyTest, TenantGateDecidesForTenantIdentitiesOnly) {
  RpcPolicy policy(kTd, {{"PlacePatient", {PrincipalKind::kApp, PrincipalKind::kPractitioner}},
                         {"UpsertTenant", {PrincipalKind::kOps}},
                         {"Resolve", {PrincipalKind::kService}}});
  SetTenantGate gate({"acme"});
  policy.set_tenant_gate(&gate);
  Principal acme = *ParseSpiffeId("spiffe://medgate.test/tenant/acme/app/backend", kTd);
  Principal globex = *ParseSpiffeId("spiffe://medgate.test/tenant/globex/practitioner/p", kTd);
  Principal ops = *ParseSpiffeId("spiffe://medgate.test/ops/alice", kTd);
  Principal service = *ParseSpiffeId("spiffe://medgate.test/service/ingest", kTd);
  EXPECT_TRUE(policy.Check(acme, "PlacePatient").ok());
  absl::Status suspended = policy.Check(globex, "PlacePatient");
  EXPECT_EQ(suspended.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(suspended.message(), "tenant 'globex' is suspended");
  // Without the gate, the role alone decides.
  EXPECT_TRUE(policy.CheckRole(globex, "PlacePatient").ok());
  // Ops and services have no tenant: never asked about.
  EXPECT_TRUE(policy.Check(ops, "UpsertTenant").ok());
  EXPECT_TRUE(policy.Check(service, "Resolve").ok());
  // A role refusal comes first, without asking the gate.
  EXPECT_EQ(policy.Check(acme, "UpsertTenant").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(gate.asked, (std::vector<std::string>{"acme", "globex"}));
  // The refusal names the kind with its article.
  EXPECT_EQ(policy.Check(ops, "PlacePatient").message(), "an ops identity may not call PlacePatient");
  EXPECT_EQ(policy.Check(acme, "Resolve").message(), "an app identity may not call Resolve");
  EXPECT_EQ(policy.Check(globex, "Resolve").message(),
            "a practitioner identity may not call Resolve");
}

// The integer channel argument `key` of `args`, if set.
std::optional<int> IntArg(const grpc::ChannelArguments& args, const char* key) {
  const grpc_channel_args c = args.c_channel_args();
  for (size_t i = 0; i < c.num_args; ++i) {
    if (std::string(c.args[i].key) == key && c.args[i].type == GRPC_ARG_INTEGER) {
      return c.args[i].value.integer;
    }
  }
  return std::nullopt;
}

// A channel's reconnects follow the client's own backoff when it has one; gRPC's otherwise.
TEST(ChannelArgumentsTest, ReconnectBackoffsAreSetOnlyWhenGiven) {
  const grpc::ChannelArguments defaults = ChannelArgumentsFor(ChannelOptions{});
  EXPECT_EQ(IntArg(defaults, GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS), std::nullopt);
  EXPECT_EQ(IntArg(defaults, GRPC_ARG_MAX_RECONNECT_BACKOFF_MS), std::nullopt);
  EXPECT_EQ(IntArg(defaults, GRPC_ARG_KEEPALIVE_TIME_MS), std::nullopt);
  EXPECT_EQ(IntArg(defaults, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL), 1);

  const grpc::ChannelArguments set = ChannelArgumentsFor(
      ChannelOptions{.bdp_probe = false,
                     .keepalive_time = absl::Seconds(60),
                     .keepalive_timeout = absl::Seconds(20),
                     .reconnect_backoff_initial = absl::Milliseconds(100),
                     .reconnect_backoff_max = absl::Seconds(30)});
  EXPECT_EQ(IntArg(set, GRPC_ARG_HTTP2_BDP_PROBE), 0);
  EXPECT_EQ(IntArg(set, GRPC_ARG_KEEPALIVE_TIME_MS), 60000);
  EXPECT_EQ(IntArg(set, GRPC_ARG_KEEPALIVE_TIMEOUT_MS), 20000);
  EXPECT_EQ(IntArg(set, GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS), 100);
  EXPECT_EQ(IntArg(set, GRPC_ARG_MAX_RECONNECT_BACKOFF_MS), 30000);

  // gRPC takes an int of milliseconds: a longer duration is its largest, not a wrapped one.
  const grpc::ChannelArguments longest =
      ChannelArgumentsFor(ChannelOptions{.reconnect_backoff_max = absl::Hours(24 * 365)});
  EXPECT_EQ(IntArg(longest, GRPC_ARG_MAX_RECONNECT_BACKOFF_MS), std::numeric_limits<int>::max());
}

}  // namespace
}  // namespace medgate
