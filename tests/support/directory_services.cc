#include "tests/support/directory_services.h"

#include "libs/common/status_macros.h"

namespace medgate::test_support {

absl::StatusOr<std::unique_ptr<DirectoryServices>> DirectoryServices::Start(TestStack& stack) {
  std::unique_ptr<DirectoryServices> services(new DirectoryServices());
  ASSIGN_OR_RETURN(services->routing_, routing::RoutingServer::Create(stack.config()));
  RETURN_IF_ERROR(services->routing_->Start());
  stack.SetAddress("routing", services->routing_->port());
  ASSIGN_OR_RETURN(services->consent_, consent::ConsentServer::Create(stack.config()));
  RETURN_IF_ERROR(services->consent_->Start());
  stack.SetAddress("consent", services->consent_->port());
  return services;
}

DirectoryServices::~DirectoryServices() {
  if (consent_ != nullptr) consent_->Shutdown();
  if (routing_ != nullptr) routing_->Shutdown();
}

}  // namespace medgate::test_support
