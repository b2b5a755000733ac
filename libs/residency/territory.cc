// Territory codes: the official ISO 3166-1 alpha-2 list and the validation of every input code.
#include "libs/residency/territory.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace medgate::residency {
namespace {

// Every officially assigned code (ISO 3166 Maintenance Agency; same as Debian iso-codes 4.15).
// Kept sorted so lookup is a binary search; the static_asserts below catch a careless edit.
// One row per first letter keeps additions and removals easy to review, hence no clang-format.
// clang-format off
constexpr std::array<absl::string_view, 249> kAssignedTerritories = {
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ",
    "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW",
    "CX", "CY", "CZ",
    "DE", "DJ", "DK", "DM", "DO", "DZ",
    "EC", "EE", "EG", "EH", "ER", "ES", "ET",
    "FI", "FJ", "FK", "FM", "FO", "FR",
    "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT",
    "GU", "GW", "GY",
    "HK", "HM", "HN", "HR", "HT", "HU",
    "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT",
    "JE", "JM", "JO", "JP",
    "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ",
    "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY",
    "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS",
    "MT", "MU", "MV", "MW", "MX", "MY", "MZ",
    "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ",
    "OM",
    "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY",
    "QA",
    "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ",
    "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW", "TZ",
    "UA", "UG", "UM", "US", "UY", "UZ",
    "VA", "VC", "VE", "VG", "VI", "VN", "VU",
    "WF", "WS",
    "YE", "YT",
    "ZA", "ZM", "ZW",
};
// clang-format on

static_assert(std::is_sorted(kAssignedTerritories.begin(), kAssignedTerritories.end()));
static_assert(std::adjacent_find(kAssignedTerritories.begin(), kAssignedTerritories.end()) ==
              kAssignedTerritories.end());

constexpr std::size_t kMaxShown = 16;

bool IsUpper(char c) { return c >= 'A' && c <= 'Z'; }

}  // namespace

bool IsAssignedTerritory(absl::string_view code) {
  return code.size() == 2 &&
         std::binary_search(kAssignedTerritories.begin(), kAssignedTerritories.end(), code);
}

absl::Status ValidateTerritory(absl::string_view code, absl::string_view field_name) {
  if (IsAssignedTerritory(code)) return absl::OkStatus();
  // Escaped and capped because the value comes from a caller and ends up in logs and messages.
  const std::string shown = code.size() <= kMaxShown
                                ? absl::CEscape(code)
                                : absl::StrCat(absl::CEscape(code.substr(0, kMaxShown)), "...");
  // Distinguishing the shape error from the unassigned code tells the caller what to fix:
  // "fr" and "FRA" are near misses of FR, while "UK" is a well-formed code that is not assigned.
  if (code.size() != 2 || !IsUpper(code[0]) || !IsUpper(code[1])) {
    return absl::InvalidArgumentError(
        absl::StrCat(field_name, ": '", shown,
                     "' is not an ISO 3166-1 alpha-2 code (two uppercase letters, e.g. 'FR')"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field_name, ": '", shown, "' is not an assigned ISO 3166-1 alpha-2 code"));
}

}  // namespace medgate::residency
