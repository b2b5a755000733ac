// Unit tests of libs/identity's pure parts: SPIFFE id parsing and the per-RPC role check.
#include <gtest/gtest.h>

#include "libs/identity/authz.h"
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

}  // namespace
}  // namespace medgate
