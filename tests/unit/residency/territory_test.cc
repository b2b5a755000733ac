// Tests that territory validation accepts exactly the assigned ISO 3166-1 alpha-2 codes.
#include "libs/residency/territory.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace medgate::residency {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// The assigned codes written independently of the library's table, as first letter -> second
// letters (from the ISO 3166 Maintenance Agency list), so a typo in either one shows up.
constexpr absl::string_view kSecondLetters[26] = {
    /*A*/ "DEFGILMOQRSTUWXZ",
    /*B*/ "ABDEFGHIJLMNOQRSTVWYZ",
    /*C*/ "ACDFGHIKLMNORUVWXYZ",
    /*D*/ "EJKMOZ",
    /*E*/ "CEGHRST",
    /*F*/ "IJKMOR",
    /*G*/ "ABDEFGHILMNPQRSTUWY",
    /*H*/ "KMNRTU",
    /*I*/ "DELMNOQRST",
    /*J*/ "EMOP",
    /*K*/ "EGHIMNPRWYZ",
    /*L*/ "ABCIKRSTUVY",
    /*M*/ "ACDEFGHKLMNOPQRSTUVWXYZ",
    /*N*/ "ACEFGILOPRUZ",
    /*O*/ "M",
    /*P*/ "AEFGHKLMNRSTWY",
    /*Q*/ "A",
    /*R*/ "EOSUW",
    /*S*/ "ABCDEGHIJKLMNORSTVXYZ",
    /*T*/ "CDFGHJKLMNORTVWZ",
    /*U*/ "AGMSYZ",
    /*V*/ "ACEGINU",
    /*W*/ "FS",
    /*X*/ "",
    /*Y*/ "ET",
    /*Z*/ "AMW",
};

bool ExpectedAssigned(char first, char second) {
  return kSecondLetters[first - 'A'].find(second) != absl::string_view::npos;
}

TEST(TerritoryTest, AcceptsExactlyTheAssignedCodesAmongAllTwoLetterPairs) {
  int assigned = 0;
  for (char first = 'A'; first <= 'Z'; ++first) {
    for (char second = 'A'; second <= 'Z'; ++second) {
      const std::string code = {first, second};
      const bool expected = ExpectedAssigned(first, second);
      EXPECT_EQ(IsAssignedTerritory(code), expected) << code;
      EXPECT_EQ(ValidateTerritory(code, "territory").ok(), expected) << code;
      if (expected) ++assigned;
    }
  }
  EXPECT_EQ(assigned, 249);
}

TEST(TerritoryTest, AcceptsCommonAndRecentlyAssignedCodes) {
  for (absl::string_view code : {"FR", "DE", "BE", "NL", "LU", "AT", "IT", "ES", "PT", "IE", "GB",
                                 "US", "CH", "NO", "IS", "LI", "AX", "BQ", "CW", "SS", "SX"}) {
    EXPECT_TRUE(IsAssignedTerritory(code)) << code;
    EXPECT_TRUE(ValidateTerritory(code, "territory").ok()) << code;
  }
}

TEST(TerritoryTest, RefusesReservedAndUserAssignedCodes) {
  // UK and EU are exceptionally reserved; XK (Kosovo), XX, AA, QM and ZZ are user-assigned.
  for (absl::string_view code : {"UK", "EU", "EZ", "UN", "AC", "CP", "DG", "EA", "IC", "TA", "XK",
                                 "XX", "AA", "QM", "QZ", "ZZ", "AN", "CS", "YU"}) {
    EXPECT_FALSE(IsAssignedTerritory(code)) << code;
    const absl::Status status = ValidateTerritory(code, "patient.territory");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << code;
    EXPECT_THAT(std::string(status.message()),
                AllOf(HasSubstr("patient.territory"), HasSubstr(absl::StrCat("'", code, "'")),
                      HasSubstr("not an assigned")))
        << code;
  }
}

TEST(TerritoryTest, RefusesMalformedCodesWithAShapeHint) {
  for (absl::string_view code :
       {"fr", "Fr", "fR", "FRA", "F", "", " FR", "FR ", "F1", "12", "F-", "ÉS", "FR\n"}) {
    EXPECT_FALSE(IsAssignedTerritory(code)) << code;
    const absl::Status status = ValidateTerritory(code, "rules[3].territory");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << code;
    EXPECT_THAT(std::string(status.message()),
                AllOf(HasSubstr("rules[3].territory: '"), HasSubstr("two uppercase letters")))
        << code;
  }
}

TEST(TerritoryTest, MessageNamesFieldAndValue) {
  EXPECT_EQ(ValidateTerritory("fr", "patient.territory").message(),
            "patient.territory: 'fr' is not an ISO 3166-1 alpha-2 code (two uppercase letters, "
            "e.g. 'FR')");
  EXPECT_EQ(ValidateTerritory("UK", "tenant.served_territories").message(),
            "tenant.served_territories: 'UK' is not an assigned ISO 3166-1 alpha-2 code");
  EXPECT_THAT(std::string(ValidateTerritory("", "territory").message()),
              HasSubstr("territory: ''"));
}

TEST(TerritoryTest, MessageEscapesAndTruncatesHostileValues) {
  const std::string hostile = "F\nR\x01" + std::string(1000, 'A');
  const absl::Status status = ValidateTerritory(hostile, "territory");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(status.message()),
            "territory: 'F\\nR\\001AAAAAAAAAAAA...' is not an ISO 3166-1 alpha-2 code (two "
            "uppercase letters, e.g. 'FR')");
}

}  // namespace
}  // namespace medgate::residency
