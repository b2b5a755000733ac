#include "libs/server/probe.h"

#include <cstdio>
#include <future>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "libs/common/status_macros.h"
#include "libs/identity/credentials.h"
#include "libs/server/health_check.h"

namespace medgate {

absl::StatusOr<std::string> LocalAddressOf(absl::string_view listen) {
  const size_t colon = listen.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) ||
      port < 1 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address '", listen, "' has no port a probe can reach"));
  }
  const absl::string_view host = listen.substr(0, colon);
  if (host == "0.0.0.0" || host.empty()) return absl::StrCat("127.0.0.1:", port);
  // A dual-stack listener falls back to IPv4 where the pod has no IPv6: "localhost" is tried on
  // both.
  if (host == "[::]") return absl::StrCat("localhost:", port);
  return std::string(listen);
}

int ProbeServices(const MedgateConfig& config, absl::string_view names, ProbeKind kind) {
  std::vector<std::pair<std::string, ServiceEndpoint>> targets;
  for (absl::string_view name : absl::StrSplit(names, ',')) {
    absl::StatusOr<const ServiceEndpoint*> endpoint = config.Service(name);
    if (!endpoint.ok()) {
      std::fprintf(stderr, "--probe: %s\n", std::string(endpoint.status().message()).c_str());
      return 2;
    }
    ServiceEndpoint target = **endpoint;
    absl::StatusOr<std::string> local = LocalAddressOf(target.listen);
    if (!local.ok()) {
      std::fprintf(stderr, "--probe: services.%s: %s\n", std::string(name).c_str(),
                   std::string(local.status().message()).c_str());
      return 2;
    }
    // This server, not the Service's address, which may lead to another pod.
    target.address = *local;
    targets.emplace_back(std::string(name), std::move(target));
  }
  // Asked at once, so that a pod's probe takes one deadline however many servers it has.
  std::vector<std::future<absl::StatusOr<Health>>> answers;
  for (const auto& entry : targets) {
    const ServiceEndpoint* target = &entry.second;
    answers.push_back(std::async(std::launch::async, [target, kind]() -> absl::StatusOr<Health> {
      ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                       MakeServiceChannel(*target, target->tls));
      return CheckHealth(channel, kind == ProbeKind::kAlive ? kLivenessDeadline : kProbeDeadline);
    }));
  }
  int result = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const absl::StatusOr<Health> health = answers[i].get();
    const bool passes =
        kind == ProbeKind::kReady
            ? health.ok() && *health == Health::kServing
            : health.ok() || (health.status().code() != absl::StatusCode::kDeadlineExceeded &&
                              health.status().code() != absl::StatusCode::kUnavailable);
    if (!passes) result = 1;
    const std::string answer =
        health.ok() ? std::string(HealthName(*health)) : health.status().ToString();
    std::printf("%s: %s\n", targets[i].first.c_str(), answer.c_str());
  }
  return result;
}

}  // namespace medgate
