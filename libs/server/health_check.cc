// The standard gRPC health check, asked by hand (the health protos are not installed with gRPC).
#include "libs/server/health_check.h"

#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace medgate {

// The health protos are not installed with gRPC: the request (an empty HealthCheckRequest) and
// the response (field 1, a varint) are written and read by hand.
absl::StatusOr<Health> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                   absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::GenericStub stub(channel);
  grpc::Slice empty("");
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                 &response, [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(s);
                   done = true;
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        absl::StrCat("grpc.health.v1.Health/Check: ", status.error_message()));
  }
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("unreadable health response");
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // UNKNOWN (0) is the field's default, which proto3 leaves out: an empty message.
  if (bytes.empty()) return Health::kUnknown;
  if (bytes.size() != 2 || bytes[0] != 0x08 || static_cast<unsigned char>(bytes[1]) > 3) {
    return absl::InternalError(absl::StrCat("unexpected health response of ", bytes.size(),
                                            " bytes"));
  }
  return static_cast<Health>(bytes[1]);
}

absl::string_view HealthName(Health health) {
  switch (health) {
    case Health::kUnknown: return "UNKNOWN";
    case Health::kServing: return "SERVING";
    case Health::kNotServing: return "NOT_SERVING";
    case Health::kServiceUnknown: return "SERVICE_UNKNOWN";
  }
  return "?";
}

}  // namespace medgate
