// The RecordSharing gRPC adapter: identity and role check, proto <-> SharingCore values. Streams
// use the synchronous API: each message is handled as it arrives, blocking on the database, so a
// slow database slows the stream down instead of filling memory.
#ifndef MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_
#define MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_

#include <string>

#include "libs/identity/authz.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/sharing/sharing_core.h"

namespace medgate::sharing {

class SharingService final : public v1::RecordSharing::Service {
 public:
  SharingService(SharingCore& core, std::string trust_domain);

  grpc::Status UploadRecord(grpc::ServerContext* context,
                            grpc::ServerReader<v1::UploadRecordRequest>* reader,
                            v1::UploadRecordResponse* response) override;
  grpc::Status ShareRecord(grpc::ServerContext* context, const v1::ShareRecordRequest* request,
                           v1::ShareRecordResponse* response) override;
  grpc::Status RevokeShare(grpc::ServerContext* context, const v1::RevokeShareRequest* request,
                           v1::RevokeShareResponse* response) override;
  grpc::Status ListRecords(grpc::ServerContext* context, const v1::ListRecordsRequest* request,
                           v1::ListRecordsResponse* response) override;
  grpc::Status DownloadRecord(grpc::ServerContext* context,
                              const v1::DownloadRecordRequest* request,
                              grpc::ServerWriter<v1::DownloadRecordResponse>* writer) override;
  grpc::Status ArchiveRecord(grpc::ServerContext* context, const v1::ArchiveRecordRequest* request,
                             v1::ArchiveRecordResponse* response) override;
  grpc::Status EraseRecord(grpc::ServerContext* context, const v1::EraseRecordRequest* request,
                           v1::EraseRecordResponse* response) override;
  grpc::Status ErasePatientRecords(grpc::ServerContext* context,
                                   const v1::ErasePatientRecordsRequest* request,
                                   v1::ErasePatientRecordsResponse* response) override;

 private:
  absl::StatusOr<CallContext> Begin(grpc::ServerContext* context, absl::string_view method,
                                    const std::string& request_id);

  SharingCore& core_;
  const RpcPolicy policy_;
};


}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_
