// Where a readiness probe reaches the server of its own pod.
#include "libs/server/probe.h"

#include <gtest/gtest.h>

namespace medgate {
namespace {

TEST(LocalAddressOfTest, AWildcardListenerIsReachedOnLoopback) {
  EXPECT_EQ(*LocalAddressOf("0.0.0.0:8443"), "127.0.0.1:8443");
  EXPECT_EQ(*LocalAddressOf("[::]:8444"), "localhost:8444");  // IPv6, or IPv4 where it falls back
  EXPECT_EQ(*LocalAddressOf(":50051"), "127.0.0.1:50051");
}

TEST(LocalAddressOfTest, ASpecificAddressIsReachedAsItIs) {
  EXPECT_EQ(*LocalAddressOf("127.0.0.1:55501"), "127.0.0.1:55501");
  EXPECT_EQ(*LocalAddressOf("10.1.2.3:8443"), "10.1.2.3:8443");
}

TEST(LocalAddressOfTest, AnAddressWithoutAPortToReachIsRefused) {
  for (const char* listen : {"127.0.0.1:0", "0.0.0.0", "host:http", "[::]:70000", ""}) {
    absl::StatusOr<std::string> address = LocalAddressOf(listen);
    EXPECT_EQ(address.status().code(), absl::StatusCode::kInvalidArgument) << listen;
    EXPECT_NE(address.status().message().find("no port a probe can reach"),
              absl::string_view::npos)
        << listen;
  }
}

}  // namespace
}  // namespace medgate
