// medgate-routing: tenants, residency rules, patient placement and device assignment.
#include "libs/server/service_main.h"
#include "services/routing/routing_server.h"

int main(int argc, char** argv) {
  return medgate::ServiceMain<medgate::routing::RoutingServer>(argc, argv, "medgate-routing");
}
