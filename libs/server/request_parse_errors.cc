// A request message that does not parse is the client's error, and the answer says so.
#include "libs/server/request_parse_errors.h"

#include "absl/strings/str_cat.h"

namespace medgate {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RequestParseErrors final : public grpc::experimental::Interceptor {
 public:
  explicit RequestParseErrors(const char* method) : method_(method == nullptr ? "" : method) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // The server hands the interceptors no message when it could not parse the request (or the
    // call sent none); the handler is then not run, and the only status sent is gRPC's.
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      unparsed_ = true;
    }
    if (unparsed_ && methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status sent = methods->GetSendStatus();
      // Any other code (RESOURCE_EXHAUSTED when every handler thread is busy) is sent as is.
      if (sent.error_code() == grpc::StatusCode::INTERNAL) {
        methods->ModifySendStatus(RequestParseError(method_, sent));
      }
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  bool unparsed_ = false;
};

}  // namespace

grpc::experimental::Interceptor* RequestParseErrorsFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  using Type = grpc::experimental::ServerRpcInfo::Type;
  if (info->type() != Type::UNARY && info->type() != Type::SERVER_STREAMING) return nullptr;
  return new RequestParseErrors(info->method());
}

grpc::Status RequestParseError(absl::string_view method, const grpc::Status& received) {
  // gRPC's words for a call that sent no message (its ByteBuffer left unset).
  if (received.error_message() == "No payload" ||
      received.error_message() == "Couldn't initialize byte buffer reader") {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("the call to ", method, " carried no request message"));
  }
  return grpc::Status(
      grpc::StatusCode::INVALID_ARGUMENT,
      absl::StrCat("the request to ", method,
                   " did not parse as its request message: every string field must be valid "
                   "UTF-8, and the bytes must be that message in protobuf wire format"));
}

}  // namespace medgate
