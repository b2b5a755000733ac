// medgate-routing: tenants, residency rules, patient placement and device assignment.
#include <cstdio>
#include <string>

#include "libs/common/config.h"
#include "libs/common/log.h"
#include "services/routing/routing_server.h"

int main(int argc, char** argv) {
  medgate::ServiceServer::BlockTerminationSignals();
  if (argc != 3 || std::string(argv[1]) != "--config") {
    std::fputs("usage: medgate-routing --config FILE\n", stderr);
    return 2;
  }
  medgate::MedgateConfig config = medgate::LoadConfigOrExit(argv[2]);
  absl::StatusOr<std::unique_ptr<medgate::routing::RoutingServer>> server =
      medgate::routing::RoutingServer::Create(config);
  if (!server.ok()) {
    medgate::log::Error("config_invalid", {{"error", server.status().message()}});
    return 2;
  }
  if (absl::Status s = (*server)->Start(); !s.ok()) {
    medgate::log::Error("start_failed", {{"error", s.message()}});
    return 1;
  }
  (*server)->RunUntilSignal();
  return 0;
}
