// A device handed to another patient: routing lets it feed the new patient only after
// routing.device_reassign_wait_seconds since its unassignment, and ingest uses a device's answer
// for ingest.device_cache_ttl_seconds. The wait must exceed the TTL, or a sample an ingest still
// files under the former patient could be the new patient's. Both services read both settings
// here and refuse a configuration that breaks the rule.
#ifndef MEDGATE_LIBS_ROUTING_CLIENT_REASSIGN_WINDOW_H_
#define MEDGATE_LIBS_ROUTING_CLIENT_REASSIGN_WINDOW_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "libs/common/config.h"

namespace medgate {

inline constexpr int64_t kDefaultDeviceCacheTtlSeconds = 30;
inline constexpr int64_t kDefaultDeviceReassignWaitSeconds = 35;

// ingest.device_cache_ttl_seconds (1 to 3600, default 30).
absl::StatusOr<int64_t> DeviceCacheTtlSeconds(const MedgateConfig& config);
// routing.device_reassign_wait_seconds (0 to 86400, default 35).
absl::StatusOr<int64_t> DeviceReassignWaitSeconds(const MedgateConfig& config);

// When `config` runs both routing and ingest: INVALID_ARGUMENT, naming both settings, unless the
// wait exceeds the TTL. A configuration without one of the two services is not checked here
// (each service's own file is then the operator's to keep consistent).
absl::Status CheckDeviceReassignWindow(const MedgateConfig& config);

}  // namespace medgate

#endif  // MEDGATE_LIBS_ROUTING_CLIENT_REASSIGN_WINDOW_H_
