// medgate-sharing: encrypted patient records with grants and audited downloads, and the Audit
// service (who accessed a patient's data, chain verification).
#include "libs/server/service_main.h"
#include "services/sharing/sharing_server.h"

int main(int argc, char** argv) {
  return medgate::ServiceMain<medgate::sharing::SharingServer>(argc, argv, "medgate-sharing");
}
