// Sharing throughput: upload and download MiB/s of 1 MiB and 100 MiB records through the sharing
// core (hashing, AES-256-GCM, key handling, audit, one transaction per upload) and through the
// gRPC service over mTLS, next to raw bytea inserts and reads (binary format, as the service
// reads its chunks) of the same bytes in 1 MiB rows,
// OpenSSL AES-256-GCM speed and the gRPC + mTLS transport alone (a no-op service), all measured in
// the same run on one PostgreSQL shard.
//
// Not the real parts here: the patient directory (one patient of acme, in fr-1), consent (a stub
// that permits) and the tenant gate (always active) stand in for the routing and consent
// services. In production each answers from its in-memory cache after a first look-up (a cached
// consent check takes about 0.2 us, consent_bench); those look-ups are not in these figures.
// Everything else is the production code: the sharing core, its gRPC service over mTLS, the key
// vault and PostgreSQL. Each path's downloads are checked against the uploaded bytes' SHA-256
// after the timed rounds.
//
// usage: sharing_bench [--small-rounds N] [--large-rounds N]
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <pqxx/pqxx>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "libs/common/config.h"
#include "libs/common/log.h"
#include "libs/common/process.h"
#include "libs/crypto/chunk_cipher.h"
#include "libs/crypto/key_encryption_key.h"
#include "libs/crypto/sha256.h"
#include "libs/identity/credentials.h"
#include "libs/identity/principal.h"
#include "libs/migrate/migrate.h"
#include "libs/pg/connection.h"
#include "libs/pg/shard_set.h"
#include "libs/routing_client/tenant_gate.h"
#include "libs/server/service_server.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/sharing/sharing_core.h"
#include "services/sharing/sharing_service.h"
#include "services/sharing/sql.h"
#include "tests/support/pg_cluster.h"
#include "tests/support/test_pki.h"
#include "tests/support/test_stack.h"

namespace medgate::sharing {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr char kPatient[] = "pt_bench";
// The reference's read: one bytea in binary format, as the sharing core reads its chunks.
constexpr pg::BinaryQuery kRawSelect("SELECT data FROM raw_chunks WHERE id = $1 AND idx = $2");

// Every patient is acme's and lives in fr-1; reads are never cross-tenant here.
class FixedDirectory final : public PatientDirectory {
 public:
  absl::StatusOr<PatientHome> Resolve(const std::string& patient_id) override {
    return PatientHome{patient_id, "acme", "fr-1", "FR"};
  }
  absl::StatusOr<residency::ResidencyRule> Rule(const std::string& territory) override {
    residency::ResidencyRule rule;
    rule.territory = territory;
    rule.allowed_regions = {"fr-1"};
    rule.version = 1;
    return rule;
  }
  absl::StatusOr<std::vector<std::string>> TenantTerritories(const std::string&) override {
    return std::vector<std::string>{"FR"};
  }
};

// Owners' uploads and downloads do not consult consent; this only satisfies the interface.
class PermitAll final : public consent::ConsentCache {
 public:
  absl::StatusOr<consent::AccessDecision> Check(absl::string_view, absl::string_view,
                                                consent::Purpose, absl::string_view,
                                                absl::string_view, absl::Time) override {
    consent::AccessDecision d;
    d.permit = true;
    d.reason = consent::AccessReason::kPermitted;
    return d;
  }
  void Invalidate(absl::string_view) override {}
};

// gRPC + mTLS alone: an upload's messages are read and counted, a download streams that many bytes
// back in 1 MiB chunks, nothing is hashed, encrypted or stored. Its rate bounds what any
// RecordSharing implementation could reach over this transport on this machine.
class TransportOnly final : public v1::RecordSharing::Service {
 public:
  grpc::Status UploadRecord(grpc::ServerContext*, grpc::ServerReader<v1::UploadRecordRequest>* reader,
                            v1::UploadRecordResponse* response) override {
    v1::UploadRecordRequest message;
    uint64_t bytes = 0;
    while (reader->Read(&message)) {
      if (message.has_chunk()) bytes += message.chunk().data().size();
    }
    response->set_record_id(absl::StrCat(bytes));
    response->set_size_bytes(bytes);
    return grpc::Status::OK;
  }

  grpc::Status DownloadRecord(grpc::ServerContext*, const v1::DownloadRecordRequest* request,
                              grpc::ServerWriter<v1::DownloadRecordResponse>* writer) override {
    uint64_t bytes = 0;
    if (!absl::SimpleAtoi(request->record_id(), &bytes)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "record_id: a byte count");
    }
    v1::DownloadRecordResponse message;
    for (uint64_t sent = 0; sent < bytes; sent += kMiB) {
      message.mutable_chunk()->set_data(chunk_.data(), std::min<uint64_t>(kMiB, bytes - sent));
      if (!writer->Write(message)) break;
    }
    return grpc::Status::OK;
  }

 private:
  const std::string chunk_ = crypto::RandomBytes(kMiB);
};

double Seconds(const std::function<void()>& fn) {
  auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Check(const absl::Status& status, absl::string_view what) {
  if (status.ok()) return;
  std::fprintf(stderr, "sharing_bench: %s: %s\n", std::string(what).c_str(),
               std::string(status.message()).c_str());
  std::exit(1);
}

void Check(const grpc::Status& status, absl::string_view what) {
  if (status.ok()) return;
  std::fprintf(stderr, "sharing_bench: %s: %s\n", std::string(what).c_str(),
               status.error_message().c_str());
  std::exit(1);
}

struct Totals {
  double upload_s = 0;
  double download_s = 0;
  double bytes = 0;
  double UploadMiBs() const { return bytes / kMiB / upload_s; }
  double DownloadMiBs() const { return bytes / kMiB / download_s; }
};

class Bench {
 public:
  // Uploads send `message_bytes` a message (and give the core as many a Write).
  Bench(test_support::PgCluster& shard, const std::string& dir, size_t message_bytes)
      : shard_(shard), message_bytes_(message_bytes) {
    raw_ = std::make_unique<pg::Connection>(shard.ConnectionString());
    pqxx::work setup(*raw_);
    // The same layout and storage as record_chunks, without encryption, keys or audit.
    setup.exec0(
        "CREATE TABLE raw_chunks (id text NOT NULL, idx integer NOT NULL, "
        "data bytea NOT NULL, PRIMARY KEY (id, idx))");
    setup.exec0("ALTER TABLE raw_chunks ALTER COLUMN data SET STORAGE EXTERNAL");
    setup.commit();
    raw_->prepare("raw_insert", "INSERT INTO raw_chunks (id, idx, data) VALUES ($1, $2, $3)");

    auto pki = test_support::TestPki::Create(dir);
    Check(pki.status(), "test PKI");
    pki_ = *std::move(pki);
    auto root = ConfigNode::Parse(absl::StrCat(
        "trust_domain: ", pki_->trust_domain(), "\nca: ", pki_->ca_path(), "\n",
        "limits: {drain_seconds: 1}\n",
        "regions:\n  - {id: fr-1, territories: [FR], db: {conninfo: \"", shard.ConnectionString(),
        "\"}, keys_db: {conninfo: \"", shard.ConnectionString(test_support::kKeysDatabase),
        "\"}}\n", "services:\n  sharing:\n    listen: 127.0.0.1:0\n    tls: {cert: ",
        pki_->server().cert_path, ", key: ", pki_->server().key_path, "}\n    identity: ",
        pki_->server_identity(), "\n"));
    Check(root.status(), "config");
    auto config = ParseMedgateConfig(*root);
    Check(config.status(), "config");
    config_ = std::make_unique<MedgateConfig>(*std::move(config));
    shards_ = std::make_unique<pg::ShardSet>(config_->regions, sql::ShardStatements());
    upload_shards_ = std::make_unique<pg::ShardSet>(config_->regions, sql::ShardStatements());
    auto kek =
        crypto::ParseHexKeyEncryptionKey(absl::BytesToHexString(crypto::RandomBytes(32)), "bench");
    Check(kek.status(), "KEK");
    kek_ = *std::move(kek);
    auto vault = KeyVault::Create(config_->regions, *kek_);
    Check(vault.status(), "key vault");
    vault_ = *std::move(vault);
    SharingOptions options;
    options.trust_domain = pki_->trust_domain();
    core_ = std::make_unique<SharingCore>(*shards_, *upload_shards_, directory_, consent_, *vault_,
                                          options);
    // Every call passes the tenant gate as in production; the bench's one tenant is active (the
    // answer is cached, as routing's would be).
    tenant_gate_ = NewCachedTenantGate([](absl::Span<const std::string> ids) {
      std::vector<TenantStatus> out;
      for (const std::string& id : ids) out.push_back({.tenant_id = id, .found = true, .active = true});
      return absl::StatusOr<std::vector<TenantStatus>>(std::move(out));
    });
    server_ = std::make_unique<ServiceServer>(*config_, "sharing");
    // As medgate-sharing runs it: the caller's certificate checked again before each chunk.
    service_ = std::make_unique<SharingService>(*core_, pki_->trust_domain(), tenant_gate_.get(),
                                                server_->peer_certificates());
    server_->AddService(service_.get());
    Check(server_->Start(), "server");
    const test_support::TestCert& me = pki_->practitioner();
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", server_->port()),
                               TlsConfig{me.cert_path, me.key_path, pki_->ca_path(), 60},
                                         pki_->server_identity());
    Check(channel.status(), "channel");
    stub_ = v1::RecordSharing::NewStub(*channel);
    transport_server_ = std::make_unique<ServiceServer>(*config_, "sharing");
    transport_server_->AddService(&transport_);
    Check(transport_server_->Start(), "transport-only server");
    auto transport_channel = MakeChannel(absl::StrCat("127.0.0.1:", transport_server_->port()),
                                         TlsConfig{me.cert_path, me.key_path, pki_->ca_path(), 60},
                                         pki_->server_identity());
    Check(transport_channel.status(), "channel");
    transport_stub_ = v1::RecordSharing::NewStub(*transport_channel);
    absl::StatusOr<Principal> practitioner =
        ParseSpiffeId(pki_->SpiffeId("/tenant/acme/practitioner/p-1"), pki_->trust_domain());
    Check(practitioner.status(), "practitioner");
    ctx_.principal = *practitioner;
    ctx_.request_id = "bench";
    ctx_.origin = "bench";
  }

  ~Bench() {
    transport_server_->Shutdown();
    server_->Shutdown();
  }

  // --- raw bytea: the reference ----------------------------------------------------------------

  void RawInsert(const std::string& id, absl::string_view data) {
    if (data.size() <= kMiB) {
      // One statement that commits on its own, as the sharing core stores a one-chunk record: in a
      // transaction, BEGIN and COMMIT were two more round trips, which slowed the reference.
      pqxx::nontransaction n(*raw_);
      n.exec_prepared0("raw_insert", id, int64_t{0}, pqxx::binarystring(data.data(), data.size()));
      return;
    }
    pqxx::work txn(*raw_);
    for (size_t off = 0, idx = 0; off < data.size(); off += kMiB, ++idx) {
      absl::string_view slice = data.substr(off, kMiB);
      txn.exec_prepared0("raw_insert", id, static_cast<int64_t>(idx),
                         pqxx::binarystring(slice.data(), slice.size()));
    }
    txn.commit();
  }

  // `hasher`, when given, takes every byte read (untimed checks only).
  uint64_t RawRead(const std::string& id, size_t size, crypto::Sha256* hasher = nullptr) {
    uint64_t got = 0;
    for (size_t off = 0, idx = 0; off < size; off += kMiB, ++idx) {
      // In binary format, as the sharing core reads a chunk: as text, a bytea is hex.
      absl::StatusOr<pg::BinaryResult> rows = kRawSelect.Run(*raw_, {id, absl::StrCat(idx)});
      Check(rows.status(), "raw select");
      const std::string bytes(rows->bytes(0, 0));
      if (hasher != nullptr) hasher->Update(bytes);
      got += bytes.size();
    }
    return got;
  }

  std::string NextRequestId() { return absl::StrCat("bench-upload-", ++uploads_); }

  // --- the sharing core ------------------------------------------------------------------------

  std::string CoreUpload(absl::string_view data, const std::string& sha) {
    // Each upload carries its own request id, as a client that retries safely sends (looked up
    // from the header when the record has several chunks; a one-chunk record's is checked by
    // its unique index when stored).
    UploadHeader header{kPatient,    RecordKind::kImaging, "application/dicom",
                        "scan.dcm",  data.size(),          sha,
                        NextRequestId()};
    auto upload = core_->StartUpload(ctx_, header);
    Check(upload.status(), "StartUpload");
    for (size_t off = 0; off < data.size(); off += message_bytes_) {
      Check((*upload)->Write(data.substr(off, message_bytes_)), "Write");
    }
    auto result = (*upload)->Finish();
    Check(result.status(), "Finish");
    return result->record_id;
  }

  uint64_t CoreDownload(const std::string& record_id, crypto::Sha256* hasher = nullptr) {
    auto download = core_->OpenDownload(ctx_, record_id, "");
    Check(download.status(), "OpenDownload");
    std::string chunk;
    uint64_t got = 0;
    while (true) {
      auto more = (*download)->Next(&chunk);
      Check(more.status(), "Next");
      if (!*more) break;
      if (hasher != nullptr) hasher->Update(chunk);
      got += chunk.size();
    }
    return got;
  }

  // --- the gRPC service over mTLS --------------------------------------------------------------

  std::string GrpcUpload(v1::RecordSharing::Stub& stub, absl::string_view data,
                         const std::string& sha) {
    grpc::ClientContext context;
    v1::UploadRecordResponse response;
    auto writer = stub.UploadRecord(&context, &response);
    v1::UploadRecordRequest message;
    v1::UploadRecordHeader* header = message.mutable_header();
    header->set_patient_id(kPatient);
    header->set_kind(v1::RECORD_KIND_IMAGING);
    header->set_content_type("application/dicom");
    header->set_file_name("scan.dcm");
    header->set_size_bytes(data.size());
    header->set_sha256(sha);
    header->set_request_id(NextRequestId());
    bool open = writer->Write(message);
    for (size_t off = 0; open && off < data.size(); off += message_bytes_) {
      message.mutable_chunk()->set_data(std::string(data.substr(off, message_bytes_)));
      open = writer->Write(message);
    }
    if (open) writer->WritesDone();
    Check(writer->Finish(), "UploadRecord");
    return response.record_id();
  }

  uint64_t GrpcDownload(v1::RecordSharing::Stub& stub, const std::string& record_id,
                        crypto::Sha256* hasher = nullptr) {
    grpc::ClientContext context;
    v1::DownloadRecordRequest request;
    request.set_record_id(record_id);
    auto reader = stub.DownloadRecord(&context, request);
    v1::DownloadRecordResponse message;
    uint64_t got = 0;
    while (reader->Read(&message)) {
      if (!message.has_chunk()) continue;
      if (hasher != nullptr) hasher->Update(message.chunk().data());
      got += message.chunk().data().size();
    }
    Check(reader->Finish(), "DownloadRecord");
    return got;
  }

  // Empties the content tables between record sizes, so every size starts from the same state.
  void Reset() {
    pqxx::connection c(shard_.ConnectionString());
    pqxx::work txn(c);
    txn.exec0("TRUNCATE raw_chunks, record_chunks, records, record_keys, share_grants");
    txn.commit();
  }

  // One record size: `rounds` records per path, interleaved so drift affects all paths alike.
  std::map<std::string, Totals> Measure(const std::string& data, int rounds) {
    const std::string sha = crypto::Sha256::Of(data);
    std::map<std::string, Totals> totals;
    auto verify = [&](uint64_t got, absl::string_view what) {
      if (got != data.size()) {
        std::fprintf(stderr, "sharing_bench: %s returned %llu bytes, not %zu\n",
                     std::string(what).c_str(), static_cast<unsigned long long>(got), data.size());
        std::exit(1);
      }
    };
    // Warm-up (connections, prepared statements, TLS), not counted.
    RawInsert("warm", data.substr(0, kMiB));
    CoreDownload(CoreUpload(data.substr(0, kMiB), crypto::Sha256::Of(data.substr(0, kMiB))));
    GrpcDownload(*stub_, GrpcUpload(*stub_, data.substr(0, kMiB),
                                    crypto::Sha256::Of(data.substr(0, kMiB))));
    GrpcDownload(*transport_stub_, GrpcUpload(*transport_stub_, data.substr(0, kMiB),
                                              crypto::Sha256::Of(data.substr(0, kMiB))));
    for (int round = 0; round < rounds; ++round) {
      const std::string raw_id = absl::StrCat("raw-", round);
      std::string core_id;
      std::string grpc_id;
      std::string transport_id;
      const std::vector<std::pair<std::string, std::function<void()>>> uploads = {
          {"raw", [&] { RawInsert(raw_id, data); }},
          {"core", [&] { core_id = CoreUpload(data, sha); }},
          {"grpc", [&] { grpc_id = GrpcUpload(*stub_, data, sha); }},
          {"transport", [&] { transport_id = GrpcUpload(*transport_stub_, data, sha); }}};
      const std::vector<std::pair<std::string, std::function<void()>>> downloads = {
          {"raw", [&] { verify(RawRead(raw_id, data.size()), "raw read"); }},
          {"core", [&] { verify(CoreDownload(core_id), "core download"); }},
          {"grpc", [&] { verify(GrpcDownload(*stub_, grpc_id), "gRPC download"); }},
          {"transport",
           [&] { verify(GrpcDownload(*transport_stub_, transport_id), "transport download"); }}};
      // The paths take turns going first: a cost that recurs every so many bytes of WAL (a new
      // 16 MB segment is zero-filled and flushed) would otherwise fall on the same path every
      // time, since each round writes the same amount.
      for (size_t k = 0; k < uploads.size(); ++k) {
        const auto& [path, upload] = uploads[(static_cast<size_t>(round) + k) % uploads.size()];
        totals[path].upload_s += Seconds(upload);
      }
      for (size_t k = 0; k < downloads.size(); ++k) {
        const auto& [path, download] = downloads[(static_cast<size_t>(round) + k) % downloads.size()];
        totals[path].download_s += Seconds(download);
      }
      for (auto& [path, t] : totals) t.bytes += static_cast<double>(data.size());
      if (round == rounds - 1) {
        // Untimed: what each storing path gives back is the bytes uploaded, not just as many.
        const std::vector<std::pair<std::string, std::function<void(crypto::Sha256*)>>> reads = {
            {"raw read", [&](crypto::Sha256* h) { RawRead(raw_id, data.size(), h); }},
            {"core download", [&](crypto::Sha256* h) { CoreDownload(core_id, h); }},
            {"gRPC download", [&](crypto::Sha256* h) { GrpcDownload(*stub_, grpc_id, h); }}};
        for (const auto& [what, read] : reads) {
          crypto::Sha256 hasher;
          read(&hasher);
          if (hasher.Finish() != sha) {
            std::fprintf(stderr, "sharing_bench: %s returned other bytes than were uploaded\n",
                         what.c_str());
            std::exit(1);
          }
        }
      }
    }
    Reset();
    return totals;
  }

 private:
  test_support::PgCluster& shard_;
  const size_t message_bytes_;
  std::unique_ptr<pg::Connection> raw_;
  uint64_t uploads_ = 0;
  std::unique_ptr<test_support::TestPki> pki_;
  std::unique_ptr<MedgateConfig> config_;
  std::unique_ptr<pg::ShardSet> shards_;
  std::unique_ptr<pg::ShardSet> upload_shards_;
  FixedDirectory directory_;
  PermitAll consent_;
  std::unique_ptr<crypto::KeyEncryptionKey> kek_;
  std::unique_ptr<KeyVault> vault_;
  std::unique_ptr<SharingCore> core_;
  std::unique_ptr<TenantGate> tenant_gate_;
  std::unique_ptr<SharingService> service_;
  std::unique_ptr<ServiceServer> server_;
  std::unique_ptr<v1::RecordSharing::Stub> stub_;
  TransportOnly transport_;
  std::unique_ptr<ServiceServer> transport_server_;
  std::unique_ptr<v1::RecordSharing::Stub> transport_stub_;
  CallContext ctx_;
};

// OpenSSL AES-256-GCM and SHA-256 over 1 MiB chunks, as the upload and download paths use them.
void CipherSpeeds(double* encrypt, double* decrypt, double* sha) {
  const crypto::SecretKey key = crypto::SecretKey::Random();
  const std::string chunk = crypto::RandomBytes(kMiB);
  constexpr int kChunks = 512;
  std::vector<std::string> sealed(1);
  double e = Seconds([&] {
    for (int i = 0; i < kChunks; ++i) sealed[0] = *crypto::EncryptChunk(key, "r", 0, true, chunk);
  });
  double d = Seconds([&] {
    for (int i = 0; i < kChunks; ++i) {
      if (!crypto::DecryptChunk(key, "r", 0, true, sealed[0]).ok()) std::exit(1);
    }
  });
  double h = Seconds([&] {
    crypto::Sha256 hasher;
    for (int i = 0; i < kChunks; ++i) hasher.Update(chunk);
    hasher.Finish();
  });
  *encrypt = kChunks / e;
  *decrypt = kChunks / d;
  *sha = kChunks / h;
}

int Main(int argc, char** argv) {
  ConfigureProcess();
  int small_rounds = 40;
  int large_rounds = 5;
  int message_kib = 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    int* target = flag == "--small-rounds"   ? &small_rounds
                  : flag == "--large-rounds" ? &large_rounds
                  : flag == "--message-kib"  ? &message_kib
                                             : nullptr;
    if (target == nullptr || !absl::SimpleAtoi(argv[i + 1], target) || *target < 1 ||
        (target == &message_kib && *target > 1024)) {
      std::fputs(
          "usage: sharing_bench [--small-rounds N] [--large-rounds N] [--message-kib 1..1024]\n",
          stderr);
      return 2;
    }
  }
  log::SetMinLevel(log::Level::kWarning);
  // On disk, not on the memory filesystem the test harness prefers: a flushed commit is real.
  if (std::getenv("MEDGATE_PG_TMPDIR") == nullptr) setenv("MEDGATE_PG_TMPDIR", "/var/tmp", 1);
  auto shard = test_support::PgCluster::Start("fr-1");
  Check(shard.status(), "PostgreSQL");
  // Durable commits and production's memory, not the test harness's settings: the reference and
  // the sharing paths all pay for a flushed commit, as they do in production.
  // 100 MiB records write 100 MiB of WAL each: with 4 GB of WAL allowed, no checkpoint starts
  // mid-run and falls on whichever path happens to be running, and with 2 GB of WAL files ready
  // (the run writes about 1.7 GB) no statement waits for a new one to be created.
  test_support::PgCluster::ProductionSettings settings;
  settings.max_wal_size = "4GB";
  settings.min_wal_size = "2GB";
  Check((*shard)->UseProductionSettings(settings), "PostgreSQL settings");
  absl::StatusOr<std::string> shard_settings = (*shard)->DescribeSettings();
  Check(shard_settings.status(), "PostgreSQL settings");
  {
    pqxx::connection c((*shard)->ConnectionString());
    auto migrations =
        migrate::LoadMigrations(std::string(MEDGATE_SOURCE_DIR) + "/migrations/shard");
    Check(migrations.status(), "migrations");
    Check(migrate::Apply(c, *migrations).status(), "migrations");
    // The region's key vault, a database of its own on the same server.
    pqxx::nontransaction(c).exec0(absl::StrCat("CREATE DATABASE ", test_support::kKeysDatabase));
    auto vault_migrations =
        migrate::LoadMigrations(std::string(MEDGATE_SOURCE_DIR) + "/migrations/vault");
    Check(vault_migrations.status(), "key vault migrations");
    pqxx::connection v((*shard)->ConnectionString(test_support::kKeysDatabase));
    Check(migrate::Apply(v, *vault_migrations).status(), "key vault migrations");
  }
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("medgate-sharing-bench-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  double encrypt = 0, decrypt = 0, sha = 0;
  CipherSpeeds(&encrypt, &decrypt, &sha);
  std::map<std::string, std::map<std::string, Totals>> results;
  {
    Bench bench(**shard, dir, static_cast<size_t>(message_kib) * 1024);
    const std::string large = crypto::RandomBytes(100 * kMiB);
    results["1 MiB"] = bench.Measure(large.substr(0, kMiB), small_rounds);
    results["100 MiB"] = bench.Measure(large, large_rounds);
  }
  std::filesystem::remove_all(dir);

  std::printf(
      "sharing_bench: one PostgreSQL 15 shard on loopback, on disk (%s), 1 MiB storage chunks, "
      "uploads sent in %d KiB messages; 1 MiB records x %d, 100 MiB records x %d per path\n",
      shard_settings->c_str(), message_kib, small_rounds, large_rounds);
  std::printf(
      "OpenSSL AES-256-GCM, 1 MiB chunks: encrypt %.0f MiB/s, decrypt %.0f MiB/s; "
      "SHA-256 %.0f MiB/s\n",
      encrypt, decrypt, sha);
  std::printf("(patient directory, consent and tenant gate: in-memory stand-ins for the routing and "
              "consent services' caches; downloads checked against the uploads' SHA-256)\n\n");
  // The target: upload and download rates >= 0.8 x the raw insert rate of the same
  // bytes. Downloads are also shown against the raw select, both read in binary format.
  std::printf("%-8s %-34s %12s %10s %14s %10s %10s\n", "record", "path", "upload MiB/s",
              "x insert", "download MiB/s", "x insert", "x select");
  std::string verdicts;
  for (const char* size : {"1 MiB", "100 MiB"}) {
    const Totals& raw = results[size]["raw"];
    for (const auto& [key, label] : std::vector<std::pair<std::string, std::string>>{
             {"raw", "raw bytea insert/select (ref)"},
             {"core", "sharing core (encrypt+hash+audit)"},
             {"grpc", "RecordSharing over gRPC+mTLS"},
             {"transport", "gRPC+mTLS alone (no-op handler)"}}) {
      const Totals& t = results[size][key];
      std::printf("%-8s %-34s %12.1f %10.2f %14.1f %10.2f %10.2f\n", size, label.c_str(),
                  t.UploadMiBs(), t.UploadMiBs() / raw.UploadMiBs(), t.DownloadMiBs(),
                  t.DownloadMiBs() / raw.UploadMiBs(), t.DownloadMiBs() / raw.DownloadMiBs());
    }
    for (const auto& [key, label] : std::vector<std::pair<std::string, std::string>>{
             {"core", "through the sharing core"}, {"grpc", "over gRPC + mTLS"}}) {
      for (const bool upload : {true, false}) {
        const Totals& t = results[size][key];
        const double ratio = (upload ? t.UploadMiBs() : t.DownloadMiBs()) / raw.UploadMiBs();
        // Three decimals: a ratio just under 0.8 must not read as 0.80 beside "NOT met".
        absl::StrAppend(&verdicts, "\n  ", size, upload ? " uploads " : " downloads ", label,
                        ": ", ratio >= 0.8 ? "met" : "NOT met", " (",
                        absl::StrFormat("%.3f", ratio), ")");
      }
    }
  }
  std::printf("\ntarget upload and download >= 0.80 x raw bytea insert:%s\n", verdicts.c_str());
  return 0;
}

}  // namespace
}  // namespace medgate::sharing

int main(int argc, char** argv) { return medgate::sharing::Main(argc, argv); }
