// Unit tests of libs/common: status macros, the status mapping, config validation, JSON logging,
// the latency histogram.
#include <google/protobuf/stubs/common.h>
#include <google/protobuf/stubs/logging.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "libs/common/config.h"
#include "libs/common/grpc_status.h"
#include "libs/common/latency_histogram.h"
#include "libs/common/log.h"
#include "libs/common/status_macros.h"
#include "libs/common/validation.h"
#include "tests/support/fuzz.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

absl::Status FailIfNegative(int v) {
  if (v < 0) return absl::InvalidArgumentError("negative");
  return absl::OkStatus();
}

absl::StatusOr<int> Half(int v) {
  if (v % 2 != 0) return absl::InvalidArgumentError("odd");
  return v / 2;
}

absl::StatusOr<int> Quarter(int v) {
  RETURN_IF_ERROR(FailIfNegative(v));
  ASSIGN_OR_RETURN(int half, Half(v));
  ASSIGN_OR_RETURN(int quarter, Half(half));
  return quarter;
}

TEST(StatusMacrosTest, PropagatesErrorsAndValues) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(-4).status().message(), "negative");
  EXPECT_EQ(Quarter(6).status().message(), "odd");  // 6 -> 3 -> odd on the second step
  EXPECT_EQ(Quarter(5).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GrpcStatusTest, RoundTripsEveryCode) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status s(static_cast<absl::StatusCode>(code), code == 0 ? "" : "msg");
    grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("patient p-1 not found")).error_message(),
            "patient p-1 not found");
}

constexpr char kGoodConfig[] = R"(
trust_domain: medgate.test
ca: /pki/ca.crt
limits:
  max_message_bytes: 2097152
  tenant_calls_per_second: 50
  max_health_watches_per_caller: 3
control_db:
  conninfo: host=127.0.0.1 port=5432
regions:
  - id: fr-1
    territories: [FR]
    db: {conninfo: "host=127.0.0.1 port=5433", pool_size: 4}
    keys_db: {conninfo: "host=127.0.0.1 port=5434 dbname=medgate_keys", pool_size: 2}
  - id: de-1
    territories: [DE]
    db: {conninfo: "host=127.0.0.1 port=5435"}
services:
  routing:
    listen: 127.0.0.1:0
    tls: {cert: /pki/routing.crt, key: /pki/routing.key}
)";

TEST(ConfigTest, ParsesAValidConfig) {
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(kGoodConfig);
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->trust_domain, "medgate.test");
  EXPECT_EQ(config->limits.max_message_bytes, 2097152);
  EXPECT_EQ(config->limits.max_concurrent_streams, 1000);  // default
  EXPECT_EQ(config->limits.tenant_calls_per_second, 50);
  EXPECT_EQ(config->limits.tenant_call_burst, 2000);  // default
  EXPECT_EQ(config->limits.max_health_watches_per_caller, 3);
  EXPECT_EQ(config->limits.max_health_watches, 1024);  // default
  ASSERT_EQ(config->regions.size(), 2u);
  EXPECT_EQ(config->regions[0].db.pool_size, 4);
  ASSERT_TRUE(config->regions[0].keys_db.has_value());
  EXPECT_EQ(config->regions[0].keys_db->conninfo, "host=127.0.0.1 port=5434 dbname=medgate_keys");
  EXPECT_EQ(config->regions[0].keys_db->pool_size, 2);
  EXPECT_FALSE(config->regions[1].keys_db.has_value());  // optional: only sharing needs it
  ASSERT_NE(config->FindRegion("fr-1"), nullptr);
  EXPECT_EQ(config->FindRegion("it-1"), nullptr);
  absl::StatusOr<const ServiceEndpoint*> routing = config->Service("routing");
  ASSERT_TRUE(routing.ok());
  EXPECT_EQ((*routing)->address, "127.0.0.1:0");
  EXPECT_EQ((*routing)->tls.ca_path, "/pki/ca.crt");
  // What its clients require of its certificate, by default the service's own SPIFFE id.
  EXPECT_EQ((*routing)->identity, "spiffe://medgate.test/service/routing");
  EXPECT_FALSE(config->Service("consent").ok());
}

TEST(ConfigTest, AServiceIdentityMayBeSetToAnotherServiceOfTheTrustDomain) {
  std::string text = kGoodConfig;
  text += "    identity: spiffe://medgate.test/service/routing-fr\n";
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ((*config->Service("routing"))->identity, "spiffe://medgate.test/service/routing-fr");
  // Anything but a service of this trust domain is refused, naming the key.
  for (const char* bad : {"spiffe://evil.test/service/routing", "spiffe://medgate.test/ops/alice",
                          "spiffe://medgate.test/tenant/acme/device/dev-1",
                          "spiffe://medgate.test/service/", "spiffe://medgate.test/service/a/b",
                          "spiffe://medgate.test/service/a b", "routing"}) {
    SCOPED_TRACE(bad);
    root = ConfigNode::Parse(absl::StrCat(kGoodConfig, "    identity: \"", bad, "\"\n"));
    ASSERT_TRUE(root.ok()) << root.status();
    config = ParseMedgateConfig(*root);
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(), HasSubstr("'services.routing.identity'"));
  }
}

struct BadConfigCase {
  std::string from;
  std::string to;
  std::string key_named;
};

class ConfigErrorTest : public ::testing::TestWithParam<BadConfigCase> {};

TEST_P(ConfigErrorTest, NamesTheOffendingKey) {
  std::string text = kGoodConfig;
  size_t at = text.find(GetParam().from);
  ASSERT_NE(at, std::string::npos);
  text.replace(at, GetParam().from.size(), GetParam().to);
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr("'" + GetParam().key_named + "'"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrorTest,
    ::testing::Values(
        BadConfigCase{"trust_domain: medgate.test", "", "trust_domain"},
        BadConfigCase{"max_message_bytes: 2097152", "max_message_bytes: lots", "limits.max_message_bytes"},
        BadConfigCase{"max_message_bytes: 2097152", "max_message_bytes: 1", "limits.max_message_bytes"},
        BadConfigCase{"max_message_bytes: 2097152", "max_mesage_bytes: 5", "limits.max_mesage_bytes"},
        BadConfigCase{"tenant_calls_per_second: 50", "tenant_calls_per_second: 0",
                      "limits.tenant_calls_per_second"},
        BadConfigCase{"max_health_watches_per_caller: 3", "max_health_watches_per_caller: 0",
                      "limits.max_health_watches_per_caller"},
        BadConfigCase{"territories: [FR]", "territories: [France]", "regions[0].territories[0]"},
        BadConfigCase{"pool_size: 4", "pool_size: 0", "regions[0].db.pool_size"},
        BadConfigCase{"pool_size: 2", "pool_size: 0", "regions[0].keys_db.pool_size"},
        BadConfigCase{"tls: {cert: /pki/routing.crt, key: /pki/routing.key}", "tls: {cert: /pki/routing.crt}", "services.routing.tls.key"},
        BadConfigCase{"- id: fr-1", "- idd: fr-1", "regions[0].idd"},
        // A region id is part of the ids of what the region stores: ids split at their first
        // '.' and hold at most 64 bytes, so a region id with a '.' or of over 30 bytes would make
        // every record uploaded there unreachable.
        BadConfigCase{"- id: fr-1", "- id: fr.1", "regions[0].id"},
        BadConfigCase{"- id: fr-1", "- id: " + std::string(31, 'a'), "regions[0].id"},
        BadConfigCase{"- id: fr-1", "- id: FR-1", "regions[0].id"},
        BadConfigCase{"- id: fr-1", "- id: fr_1", "regions[0].id"},
        BadConfigCase{"- id: fr-1", "- id: \"\"", "regions[0].id"}));

// A conninfo libpq cannot parse is refused when the configuration is read, by every binary, naming
// its key; libpq's own message, which quotes the string (a password with it), is not passed on.
TEST(ConfigTest, AConninfoLibpqCannotParseIsRefusedWithoutQuotingIt) {
  for (const std::string bad : {"host=127.0.0.1 password=hunter2 sesame",
                                "postgresql://medgate:hunter2@db:5432/x?%zz"}) {
    SCOPED_TRACE(bad);
    std::string text = kGoodConfig;
    const std::string from = "conninfo: \"host=127.0.0.1 port=5433\"";
    ASSERT_NE(text.find(from), std::string::npos);
    text.replace(text.find(from), from.size(), "conninfo: \"" + bad + "\"");
    absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
    ASSERT_TRUE(root.ok()) << root.status();
    absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(), HasSubstr("'regions[0].db.conninfo'"));
    EXPECT_THAT(config.status().message(), HasSubstr("not a libpq connection string"));
    EXPECT_THAT(config.status().message(), Not(HasSubstr("hunter2")));
  }
}

TEST(ConfigTest, ARegionIdOfThirtyBytesIsAccepted) {
  std::string text = kGoodConfig;
  const std::string longest(kMaxConfiguredRegionIdBytes, 'a');
  text.replace(text.find("- id: fr-1"), 10, "- id: " + longest);
  absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
  ASSERT_TRUE(root.ok()) << root.status();
  absl::StatusOr<MedgateConfig> config = ParseMedgateConfig(*root);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->regions[0].id, longest);
}

TEST(ConfigTest, RejectsNonYamlAndNonMap) {
  EXPECT_FALSE(ConfigNode::Parse("a: [unclosed").ok());
  EXPECT_FALSE(ConfigNode::Parse("- just\n- a list\n").ok());
  EXPECT_EQ(ConfigNode::LoadFile("/nonexistent/medgate.yaml").status().code(),
            absl::StatusCode::kNotFound);
  // An endless file is refused once past the bound, not read until memory runs out.
  absl::StatusOr<ConfigNode> endless = ConfigNode::LoadFile("/dev/zero");
  EXPECT_EQ(endless.status().code(), absl::StatusCode::kInvalidArgument) << endless.status();
  EXPECT_THAT(std::string(endless.status().message()), ::testing::HasSubstr("over 8388608 bytes"));
}

// What a hand-edited file may hold that names no setting is refused with the line or key, as
// every other mistake is, never thrown out of the reader (every binary exited with an uncaught
// exception on a key that was a list).
TEST(ConfigTest, KeysThatAreNotNamesOrGivenTwiceAreRefused) {
  const auto refused = [](const std::string& text) {
    absl::StatusOr<ConfigNode> root = ConfigNode::Parse(text);
    EXPECT_FALSE(root.ok()) << text;
    return std::string(root.status().message());
  };
  EXPECT_THAT(refused(absl::StrCat(kGoodConfig, "? [a, b]\n: 1\n")),
              AllOf(HasSubstr("a key must be a single value, not a list"), HasSubstr("line 22")));
  EXPECT_THAT(refused(absl::StrCat(kGoodConfig, "  ? {a: 1}\n  : {listen: x}\n")),
              HasSubstr("not a map (in 'services')"));
  EXPECT_THAT(refused(absl::StrCat(kGoodConfig, "regions: []\n")),
              HasSubstr("config key 'regions': given twice (line 22)"));
  EXPECT_THAT(refused(absl::StrCat(kGoodConfig, "    listen: 127.0.0.1:1\n")),
              HasSubstr("config key 'services.routing.listen': given twice"));
  // An alias of a list that holds it, and lists nested past any configuration's depth.
  EXPECT_THAT(refused("trust_domain: t\nloop: &l [*l]\n"), HasSubstr("nested more than 32"));
  EXPECT_THAT(refused(absl::StrCat("deep: ", std::string(40, '['), std::string(40, ']'), "\n")),
              HasSubstr("config key 'deep[0][0]"));
  // Many aliases of one list of aliases: a small file, far too many values.
  std::string laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n";
  for (char c = 'b'; c <= 'h'; ++c) {
    absl::StrAppend(&laughs, std::string(1, c), ": &", std::string(1, c), " [");
    for (int i = 0; i < 10; ++i) {
      absl::StrAppend(&laughs, i > 0 ? ", " : "", "*", std::string(1, static_cast<char>(c - 1)));
    }
    absl::StrAppend(&laughs, "]\n");
  }
  EXPECT_THAT(refused(laughs), HasSubstr("more than 100000 values"));
  // Keys that are numbers or quoted are names like any other.
  absl::StatusOr<ConfigNode> fine = ConfigNode::Parse("a: {1: x, \"b c\": y}\n");
  EXPECT_TRUE(fine.ok()) << fine.status();
}

TEST(LogTest, FormatsOneEscapedJsonObject) {
  std::string line = log::FormatLine(log::Level::kWarning, "db_down",
                                     {{"region", "fr-1"}, {"attempt", 3}, {"ok", false},
                                      {"note", "quote\" and\nnewline"}});
  EXPECT_THAT(line, HasSubstr("\"level\":\"warning\""));
  EXPECT_THAT(line, HasSubstr("\"event\":\"db_down\""));
  EXPECT_THAT(line, HasSubstr("\"region\":\"fr-1\""));
  EXPECT_THAT(line, HasSubstr("\"attempt\":3"));
  EXPECT_THAT(line, HasSubstr("\"ok\":false"));
  EXPECT_THAT(line, HasSubstr("\"note\":\"quote\\\" and\\nnewline\""));
  EXPECT_EQ(line.front(), '{');
  EXPECT_EQ(line.back(), '}');
  EXPECT_EQ(line.find('\n'), std::string::npos);
}

// Protobuf's own messages (a request string that is not UTF-8 makes it log one) come out as JSON
// lines like every other, its errors as warnings: a client causes them.
TEST(LogTest, AThrottleLetsOneLineThroughPerIntervalAndCountsTheOthers) {
  log::Throttle throttle(absl::Seconds(10));
  const absl::Time start = absl::FromUnixSeconds(1000000);
  uint64_t held_back = 99;
  EXPECT_TRUE(throttle.Allow(start, held_back));
  EXPECT_EQ(held_back, 0u);
  EXPECT_FALSE(throttle.Allow(start + absl::Seconds(1), held_back));
  EXPECT_FALSE(throttle.Allow(start + absl::Seconds(9), held_back));
  EXPECT_TRUE(throttle.Allow(start + absl::Seconds(10), held_back));
  EXPECT_EQ(held_back, 2u);
  EXPECT_TRUE(throttle.Allow(start + absl::Seconds(25), held_back));
  EXPECT_EQ(held_back, 0u);
}

TEST(LogTest, ProtobufMessagesAreJsonLines) {
  log::RouteProtobufLogs();
  ::testing::internal::CaptureStderr();
  GOOGLE_LOG(ERROR) << "String field 'medgate.v1.X.y' contains invalid UTF-8 data";
  const std::string out = ::testing::internal::GetCapturedStderr();
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.front(), '{') << out;
  EXPECT_EQ(out.find("[libprotobuf"), std::string::npos) << out;
  EXPECT_THAT(out, HasSubstr("\"level\":\"warning\""));
  EXPECT_THAT(out, HasSubstr("\"event\":\"protobuf\""));
  EXPECT_THAT(out, HasSubstr("contains invalid UTF-8 data"));
}

TEST(ValidationTest, NamesTheFieldAndTheRule) {
  EXPECT_TRUE(ValidateIdentifier("dev-1.a_b", "device_id", 16).ok());
  EXPECT_EQ(ValidateIdentifier("", "device_id", 16).message(), "device_id: must not be empty");
  EXPECT_EQ(ValidateIdentifier(std::string(17, 'a'), "device_id", 16).message(),
            "device_id: at most 16 bytes, got 17");
  EXPECT_THAT(std::string(ValidateIdentifier("a/b", "device_id", 16).message()),
              HasSubstr("only letters"));
  EXPECT_TRUE(ValidateText("scan #42 (signed)", "evidence_ref", 64).ok());
  EXPECT_EQ(ValidateText("a\tb", "reason", 64).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateText("", "reason", 64).message(), "reason: must not be empty");
}

TEST(ValidationTest, MediaTypesAreTypeSlashSubtypeWithTokenOrQuotedParameters) {
  for (const char* accepted :
       {"application/pdf", "application/dicom", "image/jpeg", "text/plain; charset=utf-8",
        "text/plain;charset=UTF-8", "text/plain ; charset=utf-8", "application/fhir+json",
        "application/vnd.ms-excel", "multipart/related; type=\"application/dicom\"; boundary=x",
        "text/plain; note=\"a \\\"quoted\\\" word\"", "application/x-type-marker",
        "model/x3d+xml", "application/1d-interleaved-parityfec"}) {
    EXPECT_TRUE(ValidateMediaType(accepted, "content_type", 255).ok()) << accepted;
  }
  // Each refusal names the field, and what is wrong where.
  for (const auto& [refused, why] : std::vector<std::pair<std::string, std::string>>{
           {"pdf", "expected '/' after the type at byte 3"},
           {"/pdf", "expected the type, starting with a letter or digit at byte 0"},
           {"application/", "expected the subtype, starting with a letter or digit at byte 12"},
           {"application/.pdf", "expected the subtype, starting with a letter or digit at byte 12"},
           {"application/pdf/x", "expected ';' before a parameter at byte 15"},
           {"application/pdf;", "expected a parameter name at byte 16"},
           {"application/pdf; charset", "expected '=' after the parameter name at byte 24"},
           {"application/pdf; charset=", "expected a parameter value (a token or a quoted "
                                          "string) at byte 25"},
           {"text/plain; a=\"open", "the quoted string at byte 14 is not closed"},
           {"text/plain; a=\"ends in \\\"", "the quoted string at byte 14 is not closed"},
           {"text/plain; a=b c", "expected ';' before a parameter at byte 16"},
           {"text/plain;  a=b", "two spaces in a row at byte 11"},
           {"text/plain; charset=utf-8; Charset=latin1",
            "the parameter 'charset' at byte 27 is given twice"},
           {" text/plain", "a space at either end at byte 0"},
           {"text/plain ", "a space at either end at byte 10"},
           {"text/pl\xc3\xa4in", "a byte past ASCII at byte 7"},
           {"application/pdf,text/plain", "expected ';' before a parameter at byte 15"},
           {"application/<script>",
            "expected the subtype, starting with a letter or digit at byte 12"},
           {absl::StrCat("application/", std::string(128, 'x')),
            "the subtype at byte 12 is longer than 127 characters"}}) {
    const absl::Status status = ValidateMediaType(refused, "header.content_type", 255);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << refused;
    EXPECT_EQ(status.message(),
              absl::StrCat("header.content_type: not a media type such as application/pdf or "
                           "text/plain; charset=utf-8 (",
                           why, ")"))
        << refused;
  }
  EXPECT_EQ(ValidateMediaType("", "content_type", 255).message(),
            "content_type: must not be empty");
  EXPECT_EQ(ValidateMediaType("text/plain\n", "content_type", 255).message(),
            "content_type: control characters are not allowed");
  EXPECT_EQ(ValidateMediaType(absl::StrCat("text/", std::string(120, 'x')), "content_type", 64)
                .message(),
            "content_type: at most 64 bytes, got 125");
}

// Cut before a character, never inside one: "é" is 2 bytes, "€" 3, "😀" 4.
TEST(ValidationTest, ValidateDistinctNamesTheFirstRepeatAndWhatItRepeats) {
  EXPECT_TRUE(ValidateDistinct({}, "list").ok());
  EXPECT_TRUE(ValidateDistinct({"a", "b", "c"}, "list").ok());
  EXPECT_EQ(ValidateDistinct({"a", "b", "b", "a"}, "list"),
            absl::InvalidArgumentError("list[2]: 'b' is already listed at list[1]"));
  EXPECT_EQ(ValidateDistinct({"fr-1", "fr-1"}, "rule.region_ids", "region "),
            absl::InvalidArgumentError(
                "rule.region_ids[1]: region 'fr-1' is already listed at rule.region_ids[0]"));
}

TEST(ValidationTest, TruncateUtf8CutsBetweenCharacters) {
  EXPECT_EQ(TruncateUtf8("abc", 16), "abc");
  EXPECT_EQ(TruncateUtf8("abcdef", 4), "abcd");
  EXPECT_EQ(TruncateUtf8("abc\xc3\xa9", 4), "abc");      // "abcé": é would be cut
  EXPECT_EQ(TruncateUtf8("abc\xc3\xa9", 5), "abc\xc3\xa9");
  EXPECT_EQ(TruncateUtf8("a\xe2\x82\xac", 2), "a");     // "a€"
  EXPECT_EQ(TruncateUtf8("a\xe2\x82\xac", 3), "a");
  EXPECT_EQ(TruncateUtf8("\xf0\x9f\x98\x80z", 3), "");  // "😀z"
  EXPECT_EQ(TruncateUtf8("\xf0\x9f\x98\x80z", 4), "\xf0\x9f\x98\x80");
  EXPECT_EQ(TruncateUtf8("", 0), "");
}

TEST(ValidationTest, IsValidUtf8RefusesWhatIsNotUtf8) {
  for (absl::string_view ok : {"", "abc", "r\xc3\xa9sum\xc3\xa9", "\xe2\x82\xac",
                               "\xf0\x9f\x98\x80", "\xed\x9f\xbf", "\xee\x80\x80",
                               "\xf4\x8f\xbf\xbf", "\x7f"}) {
    EXPECT_TRUE(IsValidUtf8(ok)) << absl::CHexEscape(ok);
  }
  for (absl::string_view bad : {"r\xe9sum\xe9",        // Latin-1
                                "\xc0\xaf", "\xe0\x80\xaf",  // overlong "/"
                                "\xed\xa0\x80",          // a surrogate
                                "\xf4\x90\x80\x80",      // past U+10FFFF
                                "\xc3", "\xe2\x82", "a\xf0\x9f\x98",  // cut short
                                "\x80", "\xbf", "\xf8\x88\x80\x80\x80", "\xff"}) {
    EXPECT_FALSE(IsValidUtf8(bad)) << absl::CHexEscape(bad);
  }
}

// IsValidUtf8 says what protobuf's parser says of a proto3 string: random bytes, mostly UTF-8
// sequences (the ranges' ends among them), some changed, cut or overlong, get the same answer.
TEST(ValidationTest, IsValidUtf8AgreesWithProtobufOnRandomBytes) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(20000);
  static const uint32_t kEnds[] = {0x0,    0x7F,   0x80,   0x7FF,   0x800,    0xFFF,
                                   0x1000, 0xD7FF, 0xE000, 0xFFFF,  0x10000,  0x3FFFF,
                                   0x40000, 0xFFFFF, 0x100000, 0x10FFFF};
  auto encode = [](uint32_t c, std::string& out) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  };
  int valid = 0;
  for (int round = 0; round < rounds; ++round) {
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    std::string text;
    const uint64_t pieces = testing::Uniform(rng, 0, 6);
    for (uint64_t i = 0; i < pieces; ++i) {
      switch (testing::Uniform(rng, 0, 5)) {
        case 0:  // a range's end, or one past it (surrogates and past U+10FFFF included)
          encode(kEnds[testing::Uniform(rng, 0, std::size(kEnds) - 1)] +
                     static_cast<uint32_t>(testing::Uniform(rng, 0, 1)),
                 text);
          break;
        case 1:  // any code point, surrogates included, or a little past the last
          encode(static_cast<uint32_t>(testing::Uniform(rng, 0, 0x11FFFF)), text);
          break;
        case 2:  // any byte
          text.push_back(static_cast<char>(testing::Uniform(rng, 0, 255)));
          break;
        case 3: {  // an overlong form of an ASCII character
          const uint32_t c = static_cast<uint32_t>(testing::Uniform(rng, 0, 0x7F));
          text.push_back(static_cast<char>(0xC0 | (c >> 6)));
          text.push_back(static_cast<char>(0x80 | (c & 0x3F)));
          break;
        }
        default:
          text += "ok";
      }
    }
    if (!text.empty() && testing::Uniform(rng, 0, 9) == 0) {
      text.resize(testing::Uniform(rng, 0, text.size() - 1));  // cut short
    }
    const bool want = google::protobuf::internal::IsStructurallyValidUTF8(text);
    valid += want ? 1 : 0;
    ASSERT_EQ(IsValidUtf8(text), want)
        << absl::CHexEscape(text) << ", " << testing::FuzzReplay(seed, round);
  }
  // Both answers were drawn often.
  EXPECT_GT(valid, rounds / 10);
  EXPECT_LT(valid, rounds - rounds / 10);
}

TEST(LatencyHistogramTest, PercentilesAreBucketBoundsNeverBelowTheTrueValue) {
  LatencyHistogram h;
  // 1..100 ms: the true p50 is 50 ms, p90 90 ms, p99 99 ms, the maximum 100 ms.
  for (int ms = 1; ms <= 100; ++ms) h.Record(absl::Milliseconds(ms));
  LatencyHistogram::Summary s = h.TakeSummary();
  EXPECT_EQ(s.count, 100u);
  EXPECT_DOUBLE_EQ(s.max_ms, 100.0);
  // Buckets grow by 2^(1/4): a reported percentile is at most 19% above the true one.
  EXPECT_GE(s.p50_ms, 50.0);
  EXPECT_LE(s.p50_ms, 50.0 * 1.19);
  EXPECT_GE(s.p90_ms, 90.0);
  EXPECT_LE(s.p90_ms, 90.0 * 1.19);
  EXPECT_GE(s.p99_ms, 99.0);
  EXPECT_LE(s.p99_ms, 100.0);  // capped by the exact maximum
}

TEST(LatencyHistogramTest, OneSlowOutlierInTwoHundredShowsInTheMaxOnly) {
  LatencyHistogram h;
  for (int i = 0; i < 199; ++i) h.Record(absl::Microseconds(500));
  h.Record(absl::Seconds(3));
  LatencyHistogram::Summary s = h.TakeSummary();
  EXPECT_EQ(s.count, 200u);
  EXPECT_LE(s.p50_ms, 0.5 * 1.19);
  EXPECT_LE(s.p99_ms, 0.5 * 1.19);  // rank 198 of 200 is still a 0.5 ms sample
  EXPECT_DOUBLE_EQ(s.max_ms, 3000.0);
}

TEST(LatencyHistogramTest, LatenciesBeyondTheLastBoundAreCountedAndReportedByTheMaximum) {
  LatencyHistogram h;
  h.Record(absl::Seconds(30));
  h.Record(absl::ZeroDuration());
  h.Record(-absl::Milliseconds(5));  // a clock step: counted as zero, not lost
  LatencyHistogram::Summary s = h.TakeSummary();
  EXPECT_EQ(s.count, 3u);
  EXPECT_DOUBLE_EQ(s.max_ms, 30000.0);
  EXPECT_DOUBLE_EQ(s.p99_ms, 30000.0);
  EXPECT_LE(s.p50_ms, LatencyHistogram::UpperBoundMs(0));
}

TEST(LatencyHistogramTest, TakeSummaryStartsOver) {
  LatencyHistogram h;
  h.Record(absl::Milliseconds(7));
  EXPECT_EQ(h.TakeSummary().count, 1u);
  LatencyHistogram::Summary empty = h.TakeSummary();
  EXPECT_EQ(empty.count, 0u);
  EXPECT_DOUBLE_EQ(empty.max_ms, 0.0);
  h.Record(absl::Milliseconds(2));
  LatencyHistogram::Summary again = h.TakeSummary();
  EXPECT_EQ(again.count, 1u);
  EXPECT_DOUBLE_EQ(again.max_ms, 2.0);
  EXPECT_GE(again.p50_ms, 2.0);
}

TEST(LatencyWindowTest, TheFirstRecordAfterTheIntervalClosesTheWindowWithEverythingInIt) {
  LatencyWindow window(absl::Seconds(10));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_FALSE(window.Record(absl::Milliseconds(5), t0).has_value());  // opens the window
  EXPECT_FALSE(window.Record(absl::Milliseconds(40), t0 + absl::Seconds(3)).has_value());
  EXPECT_FALSE(window.Record(absl::Milliseconds(7), t0 + absl::Seconds(9)).has_value());
  std::optional<LatencyWindow::Closed> closed =
      window.Record(absl::Milliseconds(6), t0 + absl::Seconds(12));
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->length, absl::Seconds(12));
  EXPECT_EQ(closed->summary.count, 4u);
  EXPECT_DOUBLE_EQ(closed->summary.max_ms, 40.0);
  // The next window starts where this one closed and holds only what came after.
  EXPECT_FALSE(window.Record(absl::Milliseconds(2), t0 + absl::Seconds(21)).has_value());
  closed = window.Record(absl::Milliseconds(3), t0 + absl::Seconds(22));
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->length, absl::Seconds(10));
  EXPECT_EQ(closed->summary.count, 2u);
  EXPECT_DOUBLE_EQ(closed->summary.max_ms, 3.0);
}

}  // namespace
}  // namespace medgate
