// WithConnectionDefaults: the bounded-time connection settings are added where the conninfo does
// not set them, in its own form, and never override what it sets.
#include "libs/pg/conninfo.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "libs/common/config.h"
#include "libs/pg/pool.h"

namespace medgate::pg {
namespace {

// What libpq reads from `conninfo`: the options it sets explicitly.
std::map<std::string, std::string> Parsed(const std::string& conninfo) {
  std::map<std::string, std::string> out;
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  EXPECT_NE(options, nullptr) << (error != nullptr ? error : "");
  if (options == nullptr) {
    PQfreemem(error);
    return out;
  }
  for (const PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val != nullptr) out[o->keyword] = o->val;
  }
  PQconninfoFree(options);
  return out;
}

TEST(ConnInfoTest, AddsTheDefaultsToAKeyValueConnInfo) {
  std::map<std::string, std::string> got =
      Parsed(WithConnectionDefaults("host=127.0.0.1 port=5432 dbname=medgate user=medgate"));
  EXPECT_EQ(got["host"], "127.0.0.1");
  EXPECT_EQ(got["dbname"], "medgate");
  EXPECT_EQ(got["connect_timeout"], "10");
  EXPECT_EQ(got["keepalives"], "1");
  EXPECT_EQ(got["keepalives_idle"], "30");
  EXPECT_EQ(got["keepalives_interval"], "10");
  EXPECT_EQ(got["keepalives_count"], "3");
  EXPECT_EQ(got["tcp_user_timeout"], "60000");
}

TEST(ConnInfoTest, KeepsWhatTheConnInfoSets) {
  std::map<std::string, std::string> got =
      Parsed(WithConnectionDefaults("host=db connect_timeout=3 keepalives_idle=5"));
  EXPECT_EQ(got["connect_timeout"], "3");
  EXPECT_EQ(got["keepalives_idle"], "5");
  EXPECT_EQ(got["keepalives_count"], "3");
}

TEST(ConnInfoTest, AddsTheDefaultsToAUri) {
  std::map<std::string, std::string> plain =
      Parsed(WithConnectionDefaults("postgresql://medgate@db.example:5432/medgate"));
  EXPECT_EQ(plain["host"], "db.example");
  EXPECT_EQ(plain["dbname"], "medgate");
  EXPECT_EQ(plain["connect_timeout"], "10");
  EXPECT_EQ(plain["tcp_user_timeout"], "60000");
  std::map<std::string, std::string> with_query =
      Parsed(WithConnectionDefaults("postgresql://db/medgate?sslmode=require&connect_timeout=4"));
  EXPECT_EQ(with_query["sslmode"], "require");
  EXPECT_EQ(with_query["connect_timeout"], "4");
  EXPECT_EQ(with_query["keepalives"], "1");
}

TEST(ConnInfoTest, LeavesAConnInfoLibpqCannotParseAsItIs) {
  EXPECT_EQ(WithConnectionDefaults("host='unterminated"), "host='unterminated");
  EXPECT_EQ(WithConnectionDefaults("nosuchoption=1"), "nosuchoption=1");
}

// A server that accepts the connection and then says nothing (a stopped or wedged host behind a
// live socket): a pool made from the config gives up on it after connect_timeout instead of
// waiting forever, and says the server is unavailable.
TEST(ConnInfoTest, APoolGivesUpOnAServerThatNeverAnswers) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 8), 0);  // the kernel completes connections; nothing reads them
  socklen_t length = sizeof(addr);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &length), 0);
  DbConfig db;
  db.conninfo = absl::StrCat("host=127.0.0.1 port=", ntohs(addr.sin_port),
                             " dbname=medgate user=medgate sslmode=disable");
  Pool pool(PoolOptions::FromConfig("silent", db));
  absl::StatusOr<Lease> lease = pool.Acquire();
  close(listener);
  ASSERT_FALSE(lease.ok());
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kUnavailable) << lease.status();
}

}  // namespace
}  // namespace medgate::pg
