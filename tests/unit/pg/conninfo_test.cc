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
#include "libs/pg/database_roles.h"
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
TEST(ConnInfoTest, ConninfoAsReplacesTheUserAndKeepsTheRest) {
  absl::StatusOr<std::string> as =
      ConninfoAs("host=db port=5433 dbname=fr user=owner password='it\\'s \\\\ secret' "
                 "sslmode=verify-full passfile=/run/pgpass", kIngestRole);
  ASSERT_TRUE(as.ok()) << as.status();
  std::map<std::string, std::string> got = Parsed(*as);
  EXPECT_EQ(got["user"], "medgate_ingest");
  EXPECT_EQ(got["password"], "it's \\ secret");
  EXPECT_EQ(got["host"], "db");
  EXPECT_EQ(got["port"], "5433");
  EXPECT_EQ(got["dbname"], "fr");
  EXPECT_EQ(got["sslmode"], "verify-full");
  EXPECT_EQ(got["passfile"], "/run/pgpass");
  EXPECT_EQ(got.size(), 7u) << *as;

  // A URI, and a conninfo without a user.
  as = ConninfoAs("postgresql://owner:pw@db:5434/fr?sslmode=require", kSharingRole);
  ASSERT_TRUE(as.ok()) << as.status();
  got = Parsed(*as);
  EXPECT_EQ(got["user"], "medgate_sharing");
  EXPECT_EQ(got["password"], "pw");
  EXPECT_EQ(got["port"], "5434");
  EXPECT_EQ(got["sslmode"], "require");
  as = ConninfoAs("host=db", kRoutingRole);
  ASSERT_TRUE(as.ok()) << as.status();
  EXPECT_EQ(Parsed(*as)["user"], "medgate_routing");
}

TEST(ConnInfoTest, ConninfoAsRefusesWhatLibpqCannotParseWithoutQuotingIt) {
  absl::StatusOr<std::string> as = ConninfoAs("host=db password='s3cret", kIngestRole);
  ASSERT_EQ(as.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(as.status().message()).find("s3cret"), std::string::npos)
      << as.status();
}

TEST(ConnInfoTest, ConfigAsMakesEveryDatabaseTheRoles) {
  MedgateConfig config;
  config.control_db = DbConfig{.conninfo = "host=control user=owner"};
  RegionConfig fr;
  fr.id = "fr-1";
  fr.db.conninfo = "host=fr user=owner";
  fr.db.pool_size = 3;
  fr.keys_db = DbConfig{.conninfo = "host=fr dbname=keys user=owner"};
  RegionConfig de;
  de.id = "de-1";
  de.db.conninfo = "host=de user=owner";
  config.regions = {fr, de};
  absl::StatusOr<MedgateConfig> as = ConfigAs(config, kConsentRole);
  ASSERT_TRUE(as.ok()) << as.status();
  for (const std::string* conninfo :
       {&as->control_db->conninfo, &as->regions[0].db.conninfo, &as->regions[0].keys_db->conninfo,
        &as->regions[1].db.conninfo}) {
    EXPECT_EQ(Parsed(*conninfo)["user"], "medgate_consent") << *conninfo;
  }
  EXPECT_EQ(Parsed(as->regions[0].keys_db->conninfo)["dbname"], "keys");
  EXPECT_EQ(as->regions[0].db.pool_size, 3);
  EXPECT_FALSE(as->regions[1].keys_db.has_value());
  // The original is left as it was.
  EXPECT_EQ(config.regions[0].db.conninfo, "host=fr user=owner");

  config.regions[1].keys_db = DbConfig{.conninfo = "host='de"};
  as = ConfigAs(config, kConsentRole);
  ASSERT_EQ(as.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(as.status().message(),
            "config key 'regions[1].keys_db.conninfo': not a libpq connection string "
            "(keyword=value or URI)");
}

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
