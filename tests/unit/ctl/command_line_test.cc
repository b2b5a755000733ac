// medgate-ctl's command line: each command takes its own flags and nothing else, and a line that
// does not say exactly one thing (a dropped flag, a value given to a switch, a flag without its
// value) is refused, naming what is wrong.
#include "services/ctl/command_line.h"

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace medgate::ctl {
namespace {

using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

// The words of `line` (split on spaces: no test value has one), after the global flags.
absl::StatusOr<CommandLine> Parse(const std::string& line) {
  std::vector<std::string> args = {"--config", "medgate.yaml", "--identity", "ops"};
  for (absl::string_view word : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
    args.emplace_back(word);
  }
  return ParseCommandLine(args);
}

// The message of a refused line (empty when it was accepted).
std::string Refusal(const std::string& line) {
  absl::StatusOr<CommandLine> parsed = Parse(line);
  return parsed.ok() ? "" : std::string(parsed.status().message());
}

TEST(ParseCommandLineTest, ReadsEachDocumentedCommand) {
  absl::StatusOr<CommandLine> upsert =
      Parse("upsert-tenant --tenant demo --name Demo --territories FR,DE --regions fr-1 --inactive");
  ASSERT_TRUE(upsert.ok()) << upsert.status();
  EXPECT_EQ(upsert->config_path, "medgate.yaml");
  EXPECT_EQ(upsert->identity, "ops");
  EXPECT_EQ(upsert->command->name, "upsert-tenant");
  EXPECT_EQ(upsert->command->service, "routing");
  EXPECT_THAT(upsert->flags,
              UnorderedElementsAre(Pair("tenant", "demo"), Pair("name", "Demo"),
                                   Pair("territories", "FR,DE"), Pair("regions", "fr-1"),
                                   Pair("inactive", "true")));
  absl::StatusOr<CommandLine> place = Parse("place-patient --allow-move --ref p-1 --territory FR");
  ASSERT_TRUE(place.ok()) << place.status();
  EXPECT_THAT(place->flags, UnorderedElementsAre(Pair("allow-move", "true"), Pair("ref", "p-1"),
                                                 Pair("territory", "FR")));
  for (const std::string line :
       {"get-tenant --tenant demo", "put-rule --territory BE --regions eu-1 --expected-version 3",
        "list-rules", "list-rules --territories FR,BE", "list-regions",
        "assign-device --device d --ref r --request-id q", "unassign-device --device d",
        "grant-consent --patient p --purpose CARE --evidence e --actor a --request-id q",
        "grant-consent --patient p --purpose CARE --evidence e --categories heart-rate,imaging",
        "upload-record --patient p --file f --kind report --content-type text/plain --request-id q",
        "download-record --record r --out o --break-glass why",
        "erase-record --record r --reason why --request-id q",
        "erase-vitals --patient p --reason why --request-id q",
        "export-vitals --patient p --reason why --out o --request-id q",
        "data-report --patient p --request-id q",
        "export-records --patient p --reason why --out o --request-id q",
        "export-consents --patient p --reason why --out o --request-id q",
        "verify-chain --log control --start-seq 1 --end-seq 9 --anchor-seq 1 --anchor-hash AA=="}) {
    EXPECT_TRUE(Parse(line).ok()) << line << ": " << Parse(line).status();
  }
  // The global flags may follow the command, as they always could.
  absl::StatusOr<CommandLine> after =
      ParseCommandLine({"list-regions", "--identity", "ops", "--config", "c.yaml"});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->config_path, "c.yaml");
  // A word that starts with a single dash is a value.
  EXPECT_TRUE(Parse("erase-record --record r --reason -").ok());
}

TEST(ParseCommandLineTest, RefusesAValueGivenToASwitch) {
  EXPECT_THAT(Refusal("place-patient --ref p --territory FR --allow-move false"),
              HasSubstr("--allow-move takes no value, not 'false'"));
  EXPECT_THAT(Refusal("upsert-tenant --tenant t --name n --territories FR --inactive false"),
              HasSubstr("--inactive takes no value, not 'false'"));
  EXPECT_THAT(Refusal("place-patient --ref p --territory FR --allow-move=false"),
              HasSubstr("--allow-move takes no value"));
}

TEST(ParseCommandLineTest, RefusesAValueFlagWithoutItsValue) {
  EXPECT_THAT(Refusal("upsert-tenant --tenant t --name n --territories FR --regions"),
              HasSubstr("--regions needs a value"));
  EXPECT_THAT(Refusal("upsert-tenant --tenant t --name --territories FR"),
              HasSubstr("--name needs a value, not --territories"));
  EXPECT_THAT(Refusal("list-regions --config"), HasSubstr("--config needs a value"));
}

TEST(ParseCommandLineTest, RefusesUnknownFlagsAndFlagsOfOtherCommands) {
  EXPECT_THAT(Refusal("upsert-tenant --tenant t --name n --teritories FR"),
              HasSubstr("unknown flag --teritories of upsert-tenant"));
  EXPECT_THAT(Refusal("upsert-tenant --tenant t --name n --allow-move"),
              HasSubstr("unknown flag --allow-move of upsert-tenant"));
  EXPECT_THAT(Refusal("list-regions --tenant t"), HasSubstr("unknown flag --tenant of list-regions"));
  EXPECT_THAT(Refusal("upsert-tenant --tenant=t"), HasSubstr("give the value as the next word"));
  EXPECT_THAT(Refusal("list-regions --"), HasSubstr("unknown flag --"));
}

TEST(ParseCommandLineTest, RefusesAnExtraWord) {
  // An unquoted name with a space: the flags after it used to be dropped.
  EXPECT_THAT(Refusal("upsert-tenant --tenant demo --name Demo telehealth --territories FR"),
              HasSubstr("unexpected word 'telehealth' after upsert-tenant"));
  EXPECT_THAT(Refusal("list-regions now"), HasSubstr("unexpected word 'now'"));
}

TEST(ParseCommandLineTest, RefusesARepeatedFlag) {
  EXPECT_THAT(Refusal("list-rules --territories FR --territories BE"),
              HasSubstr("--territories given twice"));
  EXPECT_THAT(Refusal("place-patient --ref p --territory FR --allow-move --allow-move"),
              HasSubstr("--allow-move given twice"));
}

TEST(ParseCommandLineTest, RefusesAMissingOrUnknownCommand) {
  EXPECT_THAT(Refusal(""), HasSubstr("no command given"));
  EXPECT_THAT(Refusal("upsert-tenants --tenant t"), HasSubstr("unknown command 'upsert-tenants'"));
  absl::StatusOr<CommandLine> no_identity = ParseCommandLine({"--config", "c", "list-regions"});
  ASSERT_FALSE(no_identity.ok());
  EXPECT_THAT(no_identity.status().message(), HasSubstr("--identity NAME is required"));
}

// --timeout is global: before or after the command, whole seconds from 1 to a day; without it
// each command keeps its own deadline (0 here).
TEST(ParseCommandLineTest, ReadsATimeoutOfWholeSeconds) {
  // The line's --timeout; a line refused fails the test.
  auto timeout = [](const std::string& line) -> std::optional<uint64_t> {
    absl::StatusOr<CommandLine> parsed = Parse(line);
    EXPECT_TRUE(parsed.ok()) << line << ": " << parsed.status();
    if (!parsed.ok()) return std::nullopt;
    return parsed->timeout_seconds;
  };
  EXPECT_EQ(timeout("list-regions"), 0u);
  EXPECT_EQ(timeout("--timeout 1 list-regions"), 1u);
  EXPECT_EQ(timeout("list-regions --timeout 86400"), kMaxTimeoutSeconds);
  absl::StatusOr<CommandLine> after = Parse("download-record --record r --out o --timeout 900");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->timeout_seconds, 900u);
  EXPECT_EQ(after->command->name, "download-record");
  EXPECT_THAT(after->flags, UnorderedElementsAre(Pair("record", "r"), Pair("out", "o")));
  for (const char* value : {"0", "-1", "86401", "5s", "1.5", "+3", "99999999999999999999999"}) {
    EXPECT_THAT(Refusal(absl::StrCat("list-regions --timeout ", value)),
                HasSubstr(absl::StrCat("--timeout: whole seconds from 1 to 86400, not '", value,
                                       "'")))
        << value;
  }
  EXPECT_THAT(Refusal("list-regions --timeout"), HasSubstr("--timeout needs a value"));
  EXPECT_THAT(Refusal("list-regions --timeout 5 --timeout 6"), HasSubstr("--timeout given twice"));
  EXPECT_THAT(Usage(), HasSubstr("--timeout SECONDS"));
}

TEST(ParseCommandLineTest, ARefusalEndsWithTheCommandsUsage) {
  const std::string refusal = Refusal("place-patient --ref p --territory FR --allow-move no");
  EXPECT_THAT(refusal, HasSubstr("usage: medgate-ctl"));
  EXPECT_THAT(refusal, HasSubstr("place-patient   --ref REF --territory FR [--allow-move]"));
  EXPECT_THAT(refusal, HasSubstr("[--request-id ID]"));
  EXPECT_THAT(refusal, ::testing::Not(HasSubstr("upsert-tenant")));
  // Without a known command: every command's.
  EXPECT_THAT(Refusal("--bogus"), HasSubstr("upsert-tenant"));
  EXPECT_THAT(Refusal("--bogus"), HasSubstr("verify-chain"));
}

TEST(UsageTest, ShowsEveryCommandOnceAndNamesEveryFlag) {
  const std::string usage = Usage();
  for (const Command& command : Commands()) {
    // Its own lines, under its service's heading: the name alone also appears in other lines.
    const std::string lines(command.usage);
    ASSERT_FALSE(lines.empty()) << command.name;
    const size_t at = usage.find(lines);
    ASSERT_NE(at, std::string::npos) << command.name << " is not in the usage";
    EXPECT_EQ(usage.find(lines, at + 1), std::string::npos) << command.name << " twice";
    const size_t heading = usage.rfind("commands (", at);
    ASSERT_NE(heading, std::string::npos) << command.name;
    EXPECT_EQ(usage.substr(heading, usage.find('\n', heading) - heading),
              absl::StrCat("commands (",
                           absl::StrContains(command.service, ',') ? "services" : "service", ": ",
                           command.service, "):"))
        << command.name;
    for (const auto& flags : {command.value_flags, command.switches}) {
      for (absl::string_view flag : flags) {
        EXPECT_THAT(std::string(command.usage) + usage, HasSubstr("--" + std::string(flag)))
            << command.name << " --" << flag;
      }
    }
  }
}

TEST(ParseDecimalTest, TakesDigitsOnlyWithinTheLimit) {
  uint64_t value = 7;
  EXPECT_TRUE(ParseDecimal("0", 10, &value));
  EXPECT_EQ(value, 0u);
  EXPECT_TRUE(ParseDecimal("18446744073709551615", std::numeric_limits<uint64_t>::max(), &value));
  EXPECT_EQ(value, std::numeric_limits<uint64_t>::max());
  EXPECT_TRUE(ParseDecimal("10", 10, &value));
  for (const char* bad : {"", "11", "1x", "x1", " 1", "1 ", "+1", "-1", "1.0", "0x1"}) {
    EXPECT_FALSE(ParseDecimal(bad, 10, &value)) << "'" << bad << "'";
  }
  EXPECT_FALSE(ParseDecimal("18446744073709551616", std::numeric_limits<uint64_t>::max(), &value));
  EXPECT_EQ(value, 10u);  // unchanged by a refusal
}

}  // namespace
}  // namespace medgate::ctl
