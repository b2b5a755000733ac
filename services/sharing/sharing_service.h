// The RecordSharing gRPC adapter: identity and role check, proto <-> SharingCore values. Streams
// use the synchronous API: each message is handled as it arrives, blocking on the database, so a
// slow database slows the stream down instead of filling memory.
#ifndef MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_
#define MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/time/time.h"
#include "libs/common/bounded_counts.h"
#include "libs/identity/authz.h"
#include "libs/identity/peer_certificates.h"
#include "libs/server/stall_watch.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/sharing/sharing_core.h"

namespace medgate::sharing {

class SharingService final : public v1::RecordSharing::Service {
 public:
  // `tenant_gate` (not owned) refuses the identities of suspended or unregistered tenants.
  // `peers` (the server's, ServiceServer::peer_certificates; never null) checks the caller's
  // certificate again between the messages of an upload or a download: one that has expired or
  // been revoked since the call began ends it UNAUTHENTICATED.
  SharingService(SharingCore& core, std::string trust_domain, TenantGate* tenant_gate,
                 std::shared_ptr<PeerCertificates> peers);

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
  grpc::Status ExportPatientRecords(
      grpc::ServerContext* context, const v1::ExportPatientRecordsRequest* request,
      grpc::ServerWriter<v1::ExportPatientRecordsResponse>* writer) override;

 private:
  absl::StatusOr<CallContext> Begin(grpc::ServerContext* context, absl::string_view method,
                                    const std::string& request_id);

  SharingCore& core_;
  const std::shared_ptr<PeerCertificates> peers_;
  // Uploads whose header has not come yet, by tenant: at most the uploads the tenant may have in
  // progress in every region together (sharing.max_uploads_per_tenant each), so that streams
  // that send nothing cannot hold the server's threads.
  BoundedCounts<std::string> awaiting_header_;
  const int max_awaiting_header_;
  StallWatch upload_watch_;
  StallWatch download_watch_;
  RpcPolicy policy_;
};


}  // namespace medgate::sharing

#endif  // MEDGATE_SERVICES_SHARING_SHARING_SERVICE_H_
