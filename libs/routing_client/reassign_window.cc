// The device reassignment window, checked across the routing and ingest settings.
#include "libs/routing_client/reassign_window.h"

#include "absl/strings/str_cat.h"
#include "libs/common/status_macros.h"

namespace medgate {
namespace {

absl::StatusOr<int64_t> SectionInt(const MedgateConfig& config, const char* section,
                                   const char* key, int64_t min, int64_t max, int64_t fallback) {
  if (!config.root.Has(section)) return fallback;
  ASSIGN_OR_RETURN(ConfigNode node, config.root.Child(section));
  return node.Int(key, min, max, fallback);
}

}  // namespace

absl::StatusOr<int64_t> DeviceCacheTtlSeconds(const MedgateConfig& config) {
  return SectionInt(config, "ingest", "device_cache_ttl_seconds", 1, 3600,
                    kDefaultDeviceCacheTtlSeconds);
}

absl::StatusOr<int64_t> DeviceReassignWaitSeconds(const MedgateConfig& config) {
  return SectionInt(config, "routing", "device_reassign_wait_seconds", 0, 86400,
                    kDefaultDeviceReassignWaitSeconds);
}

absl::Status CheckDeviceReassignWindow(const MedgateConfig& config) {
  if (!config.Service("routing").ok() || !config.Service("ingest").ok()) return absl::OkStatus();
  ASSIGN_OR_RETURN(int64_t ttl, DeviceCacheTtlSeconds(config));
  ASSIGN_OR_RETURN(int64_t wait, DeviceReassignWaitSeconds(config));
  if (wait > ttl) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "config key 'routing.device_reassign_wait_seconds' (", wait,
      ") must exceed 'ingest.device_cache_ttl_seconds' (", ttl,
      "): a device given to another patient sooner could have samples filed under the former one"));
}

}  // namespace medgate
