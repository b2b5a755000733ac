// A request message that does not parse is the client's error, and the answer says so.
#ifndef MEDGATE_LIBS_SERVER_REQUEST_PARSE_ERRORS_H_
#define MEDGATE_LIBS_SERVER_REQUEST_PARSE_ERRORS_H_

#include <memory>
#include <string>

#include <grpcpp/support/server_interceptor.h>
#include <grpcpp/support/status.h>

#include "absl/strings/string_view.h"

namespace medgate {

// gRPC 1.51 answers a unary or server-streaming call whose request message does not parse with
// INTERNAL and an empty message ("Couldn't initialize byte buffer reader" for a call that sent
// none), before any handler runs: a server error, to the client and to whoever watches error
// rates, for what the client sent. A proto3 string that is not UTF-8 is the usual cause; C++
// clients log an error and send it. This interceptor turns that answer into INVALID_ARGUMENT
// saying what to fix.
//
// Streams that read their messages themselves (client streaming, bidirectional) answer in their
// handlers (ingest's StreamVitals, sharing's UploadRecord) and get no interceptor.
class RequestParseErrorsFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;
};

// The status for a request of `method` (as "/package.Service/Method") that did not parse;
// `received` is what gRPC made of it (INTERNAL), which tells a call that sent no message apart.
grpc::Status RequestParseError(absl::string_view method, const grpc::Status& received);

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_REQUEST_PARSE_ERRORS_H_
