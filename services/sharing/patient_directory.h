// What the sharing service needs to know from the control plane, as an interface over plain
// values: where a patient lives, the residency rule of a territory, the territories of a tenant.
#ifndef MEDGATE_SERVICES_SHARING_PATIENT_DIRECTORY_H_
#define MEDGATE_SERVICES_SHARING_PATIENT_DIRECTORY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "libs/residency/placement.h"

namespace medgate::sharing {

struct PatientHome {
  std::string patient_id;
  std::string tenant_id;
  std::string region_id;
  std::string territory;
};

// Thread-safe. Answers may be cached for a few seconds.
class PatientDirectory {
 public:
  virtual ~PatientDirectory() = default;

  // NOT_FOUND for a patient that was never placed; UNAVAILABLE when routing cannot be asked.
  virtual absl::StatusOr<PatientHome> Resolve(const std::string& patient_id) = 0;

  // The current residency rule of `territory`; FAILED_PRECONDITION when there is none (fail
  // closed).
  virtual absl::StatusOr<residency::ResidencyRule> Rule(const std::string& territory) = 0;

  // The territories an active tenant serves; FAILED_PRECONDITION for an unknown or inactive tenant.
  virtual absl::StatusOr<std::vector<std::string>> TenantTerritories(
      const std::string& tenant_id) = 0;
};

}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_PATIENT_DIRECTORY_H_
