// The whole main() of a medgate service binary: flags, configuration, start, drain on SIGTERM.
#ifndef MEDGATE_LIBS_SERVER_SERVICE_MAIN_H_
#define MEDGATE_LIBS_SERVER_SERVICE_MAIN_H_

#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "libs/common/config.h"
#include "libs/common/log.h"
#include "libs/common/process.h"
#include "libs/server/probe.h"
#include "libs/server/service_server.h"

namespace medgate {

// `Server` has static Create(const MedgateConfig&) -> StatusOr<unique_ptr<Server>>, Start() and
// RunUntilSignal(). Exit codes: 0 after a drain, 1 when it cannot start, 2 for bad flags/config.
// With `--probe NAME[,NAME...]` (or `--liveness NAME[,NAME...]`) it serves nothing: it asks the
// running servers of those services on this host for their health (libs/server/probe.h), for an
// orchestrator's readiness (or liveness) probe.
template <typename Server>
int ServiceMain(int argc, char** argv, const char* binary) {
  ConfigureProcess();
  ServiceServer::BlockTerminationSignals();
  const bool probe =
      argc == 5 && (std::string(argv[3]) == "--probe" || std::string(argv[3]) == "--liveness");
  if ((argc != 3 && !probe) || std::string(argv[1]) != "--config") {
    std::fprintf(stderr,
                 "usage: %s --config FILE [--probe|--liveness SERVICE[,SERVICE...]]\n", binary);
    return 2;
  }
  MedgateConfig config = LoadConfigOrExit(argv[2]);
  if (probe) {
    return ProbeServices(config, argv[4],
                         std::string(argv[3]) == "--probe" ? ProbeKind::kReady : ProbeKind::kAlive);
  }
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Create(config);
  if (!server.ok()) {
    log::Error("config_invalid", {{"error", server.status().message()}});
    return 2;
  }
  if (absl::Status s = (*server)->Start(); !s.ok()) {
    log::Error("start_failed", {{"error", s.message()}});
    return 1;
  }
  (*server)->RunUntilSignal();
  return 0;
}

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_SERVICE_MAIN_H_
