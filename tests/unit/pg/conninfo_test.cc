// WithConnectionDefaults: the bounded-time connection settings are added where the conninfo does
// not set them, in its own form, and never override what it sets.
#include "libs/pg/conninfo.h"

#include <libpq-fe.h>

#include <map>
#include <string>

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace medgate::pg
