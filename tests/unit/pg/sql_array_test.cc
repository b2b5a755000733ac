// The text[] literal and PostgreSQL's text form of arrays, read without a server (the round trip
// through one is pg_pool_test's).
#include "libs/pg/sql_array.h"

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace medgate::pg {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::vector<std::string> Parsed(absl::string_view text) {
  absl::StatusOr<std::vector<std::string>> values = ParseArrayText(text);
  EXPECT_TRUE(values.ok()) << text << ": " << values.status();
  return values.value_or(std::vector<std::string>{"<not parsed>"});
}

TEST(ParseArrayTextTest, ReadsWhatTheServerWrites) {
  EXPECT_THAT(Parsed("{}"), IsEmpty());
  EXPECT_THAT(Parsed("{fr-1,de-1}"), ElementsAre("fr-1", "de-1"));
  // The server leaves a single quote unquoted (libpqxx 6.4's parser read past the text's end).
  EXPECT_THAT(Parsed("{'Z}"), ElementsAre("'Z"));
  EXPECT_THAT(Parsed("{O'Brien,'}"), ElementsAre("O'Brien", "'"));
  EXPECT_THAT(Parsed(R"({"a\"b","c\\d","x,y","{}"," ",""})"),
              ElementsAre("a\"b", "c\\d", "x,y", "{}", " ", ""));
  // An unquoted NULL, in any case, is a NULL element (skipped); quoted or escaped, it is text.
  EXPECT_THAT(Parsed(R"({NULL,"NULL",null,\NULL,a})"), ElementsAre("NULL", "NULL", "a"));
  EXPECT_THAT(Parsed("{日本,é😀}"), ElementsAre("日本", "é😀"));
  EXPECT_THAT(Parsed("[0:1]={a,b}"), ElementsAre("a", "b"));
}

TEST(ParseArrayTextTest, RefusesWhatIsNotAOneDimensionalArray) {
  for (absl::string_view text :
       {"", "a", "{", "}", "{a", "{a,", "{\"a}", "{\"a\\", "{a,,b}", "{,a}", "{a,}", "{{a}}",
        "{a}x", "{\"a\"b}", "{a\"b}", "[0:1]{a}", "[0:1", "{a\\"}) {
    absl::StatusOr<std::vector<std::string>> values = ParseArrayText(text);
    EXPECT_EQ(values.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(values.status().message()), HasSubstr("not a one-dimensional array"))
        << text;
  }
}

TEST(TextArrayLiteralTest, QuotesEveryElementAndEscapesQuotesAndBackslashes) {
  EXPECT_EQ(TextArrayLiteral({}), "{}");
  EXPECT_EQ(TextArrayLiteral({"a", "", "NULL", "x\"y\\z", "{,}"}),
            R"({"a","","NULL","x\"y\\z","{,}"})");
  // What the literal says, read back as the server reads it.
  const std::vector<std::string> values = {"'", "a b", "\\\"", ",", "null"};
  EXPECT_EQ(Parsed(TextArrayLiteral(values)), values);
}

}  // namespace
}  // namespace medgate::pg
