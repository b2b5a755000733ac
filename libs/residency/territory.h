// Territory codes: decides which ISO 3166-1 alpha-2 codes medgate accepts as a patient's residence.
#ifndef MEDGATE_LIBS_RESIDENCY_TERRITORY_H_
#define MEDGATE_LIBS_RESIDENCY_TERRITORY_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace medgate::residency {

// True iff `code` is one of the 249 officially assigned ISO 3166-1 alpha-2 codes, in uppercase.
// Reserved and user-assigned codes (UK, EU, XK, XX, ...) are not assigned, so they are refused:
// a residency rule keyed by a code nobody else agrees on would be a rule nobody can audit.
bool IsAssignedTerritory(absl::string_view code);

// OK iff IsAssignedTerritory(code); otherwise INVALID_ARGUMENT whose message names `field_name`
// and the (escaped, truncated) value, e.g.
// "patient.territory: 'UK' is not an assigned ISO 3166-1 alpha-2 code".
absl::Status ValidateTerritory(absl::string_view code, absl::string_view field_name);

}  // namespace medgate::residency

#endif  // MEDGATE_LIBS_RESIDENCY_TERRITORY_H_
