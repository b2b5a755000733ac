// The routing and consent services that the service under test resolves patients, devices and
// consents through: started in-process on a TestStack's configuration, their addresses written
// into it (so services created afterwards, and a configuration file written afterwards, reach
// them).
#ifndef MEDGATE_TESTS_SUPPORT_DIRECTORY_SERVICES_H_
#define MEDGATE_TESTS_SUPPORT_DIRECTORY_SERVICES_H_

#include <memory>

#include "absl/status/statusor.h"
#include "services/consent/consent_server.h"
#include "services/routing/routing_server.h"
#include "tests/support/test_stack.h"

namespace medgate::test_support {

class DirectoryServices {
 public:
  // Starts routing, then consent (which resolves patients through routing).
  static absl::StatusOr<std::unique_ptr<DirectoryServices>> Start(TestStack& stack);
  ~DirectoryServices();  // shuts consent down, then routing

  routing::RoutingServer& routing() { return *routing_; }
  consent::ConsentServer& consent() { return *consent_; }

 private:
  DirectoryServices() = default;

  std::unique_ptr<routing::RoutingServer> routing_;
  std::unique_ptr<consent::ConsentServer> consent_;
};

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_DIRECTORY_SERVICES_H_
