// medgate-consent: per-patient, per-purpose consents and access decisions.
#include "libs/server/service_main.h"
#include "services/consent/consent_server.h"

int main(int argc, char** argv) {
  return medgate::ServiceMain<medgate::consent::ConsentServer>(argc, argv, "medgate-consent");
}
