// medgate-ingest: vitals streams from devices into the patients' home shards.
#include "libs/server/service_main.h"
#include "services/ingest/ingest_server.h"

int main(int argc, char** argv) {
  return medgate::ServiceMain<medgate::ingest::IngestServer>(argc, argv, "medgate-ingest");
}
