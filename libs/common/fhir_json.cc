// Pieces of FHIR R4 JSON.
#include "libs/common/fhir_json.h"

#include <charconv>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "libs/common/log.h"

namespace medgate::fhir {

std::string String(absl::string_view text) {
  std::string out;
  log::AppendJsonString(out, text);
  return out;
}

std::string Number(double value) {
  // The longest such decimal, of the smallest subnormal, has 326 characters; the largest finite
  // double has 309 digits.
  char buffer[512];
  std::to_chars_result written =
      std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::fixed);
  if (written.ec != std::errc()) {
    written = std::to_chars(buffer, buffer + sizeof(buffer), value);  // not reached
  }
  return std::string(buffer, written.ptr);
}

std::string Instant(absl::Time t) {
  // FHIR's year has four digits: %Y writes year 1 as "1".
  const absl::CivilSecond civil = absl::ToCivilSecond(t, absl::UTCTimeZone());
  return absl::StrCat(absl::StrFormat("%04d", civil.year()),
                      absl::FormatTime("-%m-%dT%H:%M:%E*SZ", t, absl::UTCTimeZone()));
}

std::string ReferenceByIdentifier(absl::string_view type, absl::string_view system,
                                  absl::string_view value) {
  return absl::StrCat("{\"type\":", String(type), ",\"identifier\":{\"system\":", String(system),
                      ",\"value\":", String(value), "}}");
}

}  // namespace medgate::fhir
