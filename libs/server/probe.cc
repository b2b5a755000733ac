#include "libs/server/probe.h"

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
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
  if (host == "[::]") return absl::StrCat("[::1]:", port);
  return std::string(listen);
}

int ProbeServices(const MedgateConfig& config, absl::string_view names) {
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
  int result = 0;
  for (const auto& [name, target] : targets) {
    std::string answer;
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeServiceChannel(target, target.tls);
    absl::StatusOr<Health> health =
        channel.ok() ? CheckHealth(*channel, absl::Seconds(3)) : channel.status();
    if (health.ok()) {
      answer = std::string(HealthName(*health));
      if (*health != Health::kServing) result = 1;
    } else {
      answer = health.status().ToString();
      result = 1;
    }
    std::printf("%s: %s\n", name.c_str(), answer.c_str());
  }
  return result;
}

}  // namespace medgate
