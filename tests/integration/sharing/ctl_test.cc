// medgate-ctl, the command line ops and developers use, run as a process against the routing,
// consent and sharing services over mTLS and real PostgreSQL: placing a patient, recording
// consent, uploading a record and downloading it. A download writes its file only once all of
// the record arrived and was authenticated.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "libs/crypto/sha256.h"
#include "libs/server/service_server.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/ingest/ingest_server.h"
#include "services/sharing/sharing_server.h"
#include "tests/support/directory_services.h"
#include "tests/support/poll.h"
#include "tests/support/shell.h"
#include "tests/support/tenants.h"
#include "tests/support/test_stack.h"

namespace medgate::sharing {
namespace {

using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using test_support::ReadFile;

constexpr char kKekHex[] = "5a1e6a0c3b2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";

// medgate-ctl's exit code and what it printed (stdout and stderr).
using CtlRun = test_support::ShellRun;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

class CtlTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kek_path_ = new std::string(std::filesystem::temp_directory_path() /
                                ("medgate-ctl-kek-" + std::to_string(getpid())));
    std::ofstream(*kek_path_) << kKekHex << "\n";
    std::filesystem::permissions(*kek_path_, std::filesystem::perms::owner_read |
                                                 std::filesystem::perms::owner_write);
    auto stack = test_support::TestStack::Start({"routing", "consent", "sharing", "audit", "ingest"},
                                                absl::StrCat("sharing:\n  kek_file: ", *kek_path_,
                                                             "\n  audit_anchor_seconds: 1\n"));
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = stack->release();
    auto directory = test_support::DirectoryServices::Start(*stack_);
    ASSERT_TRUE(directory.ok()) << directory.status();
    directory_ = directory->release();
    ASSERT_TRUE(test_support::UpsertTenant(stack_->pki(), directory_->routing().port(), "acme",
                                           {"FR"}, true)
                    .ok());
    auto sharing = SharingServer::Create(stack_->config());
    ASSERT_TRUE(sharing.ok()) << sharing.status();
    sharing_ = sharing->release();
    ASSERT_TRUE(sharing_->Start().ok());
    stack_->SetAddress("sharing", sharing_->port());
    stack_->SetAddress("audit", sharing_->audit_port());
    auto ingest = ingest::IngestServer::Create(stack_->config());
    ASSERT_TRUE(ingest.ok()) << ingest.status();
    ingest_ = ingest->release();
    ASSERT_TRUE(ingest_->Start().ok());
    stack_->SetAddress("ingest", ingest_->port());
    // Until fr-1's consent feed listens, the sharing service's cache keeps nothing it loads.
    ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30), [] {
      return sharing_->consent_cache().FeedListening("fr-1");
    }));
    config_path_ = new std::string(stack_->dir() + "/ctl.yaml");
    ASSERT_TRUE(stack_->WriteConfig(*config_path_).ok());
  }

  static void TearDownTestSuite() {
    if (sharing_ != nullptr) sharing_->Shutdown();
    delete sharing_;
    if (ingest_ != nullptr) ingest_->Shutdown();
    delete ingest_;
    delete directory_;
    delete stack_;
    if (kek_path_ != nullptr) std::filesystem::remove(*kek_path_);
    delete kek_path_;
    delete config_path_;
  }

  // Runs medgate-ctl as `identity` (a certificate of the test PKI: app, practitioner, ops).
  // `shell_prefix` runs before it in the same shell (e.g. a ulimit).
  static CtlRun Ctl(const std::string& identity, const std::string& arguments,
                    const std::string& shell_prefix = "") {
    const std::string command =
        absl::StrCat(shell_prefix, MEDGATE_CTL_BINARY, " --config ", *config_path_, " --identity ",
                     identity, " ", arguments, " 2>&1");
    return test_support::RunShell(command);
  }

  // The audit entries in fr-1 of `patient` whose reason is LIKE `reason_like`, under the request id
  // an export command made up and printed in `output` ("request_id: ctl-export-..."); -1 when it
  // printed none.
  static int64_t EntriesOfPrintedRequest(const std::string& output, const std::string& patient,
                                         const std::string& reason_like) {
    const size_t id_at = output.find("request_id: ctl-export-");
    EXPECT_NE(id_at, std::string::npos) << output;
    if (id_at == std::string::npos) return -1;
    const std::string request_id = output.substr(id_at + 12, output.find('\n', id_at) - id_at - 12);
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    return q.exec_params1("SELECT count(*) FROM audit_log WHERE request_id = $1 AND "
                          "patient_id = $2 AND reason LIKE $3",
                          request_id, patient, reason_like)[0]
        .as<int64_t>();
  }

  // `command` (export-records, export-consents, export-patient) of `patient` to `out`, refused
  // to a practitioner with nothing written, then run by the app: the app's run.
  static CtlRun ExportAfterARefusal(const std::string& command, const std::string& patient,
                                    const std::string& out) {
    const std::string arguments = absl::StrCat(
        command, " --patient ", patient, " --reason 'the patient asked for a copy' --out ", out);
    CtlRun practitioner = Ctl("practitioner", arguments);
    EXPECT_EQ(practitioner.exit_code, 1) << practitioner.output;
    EXPECT_THAT(practitioner.output, HasSubstr("PERMISSION_DENIED"));
    EXPECT_THAT(practitioner.output, HasSubstr("nothing was written"));
    EXPECT_FALSE(std::filesystem::exists(out));
    return Ctl("app", arguments);
  }

  // `identity`'s `command` (a download, an export) with --out `dir`/`out`, past a file size limit
  // of `kib` KiB (as a full disk would fail its writes): exit 1 with the write's error (on the
  // file `failing` of the directory, when given), and nothing at `out`, not even in part.
  static void ExpectAFailedWriteToLeaveNothing(const std::string& identity,
                                               const std::string& command,
                                               const std::string& dir, const std::string& out,
                                               int kib, const std::string& failing = "") {
    CtlRun too_big = Ctl(identity, absl::StrCat(command, " --out ", dir, "/", out),
                         absl::StrCat("ulimit -f ", 2 * kib, "; "));  // in 512-byte blocks
    EXPECT_EQ(too_big.exit_code, 1) << too_big.output;
    EXPECT_THAT(too_big.output,
                HasSubstr(absl::StrCat(failing.empty() ? "" : "/", failing,
                                       "' failed: File too large")));
    EXPECT_FALSE(std::filesystem::exists(dir + "/" + out));
    EXPECT_EQ(CountFiles(dir, out + ".partial"), 0);
  }

  // Runs the medgate-ctl command line `command`, whose --out is `dir`/`out`, in the background
  // until `find` with `find_args` (naming its partial output) finds data written, then stops it
  // with SIGTERM, as a shutdown would: it was writing, exits 143, and leaves nothing at `out`, not
  // even in part.
  static void ExpectAStopToLeaveNothing(const std::string& command, const std::string& find_args,
                                        const std::string& dir, const std::string& out) {
    CtlRun stopped = test_support::RunShell(absl::StrCat(
        command, " >/dev/null 2>&1 & pid=$!; ",
        "for i in $(seq 100); do [ -n \"$(find ", find_args, " -size +0 2>/dev/null)\" ] && "
        "break; sleep 0.05; done; ",
        "find ", find_args, " | wc -l; kill -TERM $pid; wait $pid; echo exit=$?"));
    EXPECT_THAT(stopped.output, StartsWith("1\n")) << stopped.output;  // it was being written
    EXPECT_THAT(stopped.output, HasSubstr("exit=143")) << stopped.output;
    EXPECT_FALSE(std::filesystem::exists(dir + "/" + out));
    EXPECT_EQ(CountFiles(dir, out + ".partial"), 0);
  }

  // Places a patient in FR and records its CARE consent, through medgate-ctl: the patient's id,
  // or empty (and a failure) when either command failed.
  static std::string PlaceWithCare(const std::string& ref) {
    CtlRun placed = Ctl("app", absl::StrCat("place-patient --ref ", ref, " --territory FR"));
    EXPECT_EQ(placed.exit_code, 0) << placed.output;
    const std::string patient = Field(placed.output, "patient_id");
    EXPECT_FALSE(patient.empty()) << placed.output;
    if (placed.exit_code != 0 || patient.empty()) return "";
    CtlRun granted = Ctl("app", absl::StrCat("grant-consent --patient ", patient,
                                             " --purpose CARE --evidence ctl-form"));
    EXPECT_EQ(granted.exit_code, 0) << granted.output;
    return granted.exit_code == 0 ? patient : "";
  }

  // `count` heart rates of `patient` from `device` (seq 1..count, a minute apart from five days
  // ago), stored straight into fr-1.
  static void StoreHeartRates(const std::string& patient, const std::string& device, int count) {
    pqxx::connection c(stack_->clusters().region("fr-1").ConnectionString());
    pqxx::nontransaction q(c);
    q.exec_params0(
        "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
        "measured_at) SELECT 'acme', $2, g, $1, '8867-4', 60 + g % 40, '/min', "
        "now() - interval '5 days' + g * interval '1 minute' FROM generate_series(1, $3) g",
        patient, device, count);
  }

  // Records the patient's GEOLOCATION consent, on `evidence`, through medgate-ctl.
  static bool GrantGeolocation(const std::string& patient, const std::string& evidence) {
    CtlRun granted = Ctl("app", absl::StrCat("grant-consent --patient ", patient,
                                             " --purpose GEOLOCATION --evidence ", evidence));
    EXPECT_EQ(granted.exit_code, 0) << granted.output;
    return granted.exit_code == 0;
  }

  // The value of `"field": "..."` in medgate-ctl's JSON output.
  static std::string Field(const std::string& output, const std::string& field) {
    const std::string key = absl::StrCat("\"", field, "\": \"");
    const size_t at = output.find(key);
    if (at == std::string::npos) return "";
    const size_t start = at + key.size();
    return output.substr(start, output.find('"', start) - start);
  }

  // A server the test runs in place of the stack's service `name` ("sharing" or "audit"): with
  // that service's certificate, which medgate-ctl requires of it, on a port of its own.
  struct InPlaceOf {
    std::string name;
    ServiceServer* server;
    grpc::Service* service;
  };

  // Starts `servers` and writes a configuration naming their ports as their services' addresses,
  // to `file` in the stack's directory: its path, or empty if any of it failed. The stack's own
  // configuration is left as it was.
  static std::string ServeInPlace(const std::vector<InPlaceOf>& servers, const std::string& file) {
    const std::string path = absl::StrCat(stack_->dir(), "/", file);
    absl::Status status;
    for (const InPlaceOf& s : servers) {
      s.server->AddService(s.service);
      status = s.server->Start();
      if (!status.ok()) break;
      stack_->SetAddress(s.name, s.server->port());
    }
    if (status.ok()) status = stack_->WriteConfig(path);
    stack_->SetAddress("sharing", sharing_->port());
    stack_->SetAddress("audit", sharing_->audit_port());
    EXPECT_TRUE(status.ok()) << status;
    return status.ok() ? path : "";
  }

  // Files in `dir` whose name starts with `prefix`.
  static int CountFiles(const std::string& dir, const std::string& prefix) {
    int n = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.path().filename().string().rfind(prefix, 0) == 0) ++n;
    }
    return n;
  }

  static test_support::TestStack* stack_;
  static test_support::DirectoryServices* directory_;
  static SharingServer* sharing_;
  static ingest::IngestServer* ingest_;
  static std::string* kek_path_;
  static std::string* config_path_;
};

test_support::TestStack* CtlTest::stack_ = nullptr;
test_support::DirectoryServices* CtlTest::directory_ = nullptr;
SharingServer* CtlTest::sharing_ = nullptr;
ingest::IngestServer* CtlTest::ingest_ = nullptr;
std::string* CtlTest::kek_path_ = nullptr;
std::string* CtlTest::config_path_ = nullptr;

TEST_F(CtlTest, UploadsAndDownloadsARecordAndLeavesNothingOfAFailedDownload) {
  const std::string patient = PlaceWithCare("ctl-patient-1");
  ASSERT_FALSE(patient.empty());

  const std::string dir = stack_->dir() + "/ctl-files";
  std::filesystem::create_directories(dir);
  std::string content = "Discharge summary\n";
  for (int i = 0; content.size() < 1'500'000; ++i) absl::StrAppend(&content, "line ", i, "\n");
  std::ofstream(dir + "/summary.txt", std::ios::binary) << content;
  CtlRun uploaded = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient, " --file ",
                                                     dir, "/summary.txt --content-type text/plain"));
  ASSERT_EQ(uploaded.exit_code, 0) << uploaded.output;
  const std::string record = Field(uploaded.output, "record_id");
  ASSERT_FALSE(record.empty()) << uploaded.output;

  // Downloaded whole, into a file only its owner may read.
  CtlRun downloaded = Ctl("practitioner", absl::StrCat("download-record --record ", record,
                                                       " --out ", dir, "/copy.txt"));
  ASSERT_EQ(downloaded.exit_code, 0) << downloaded.output;
  EXPECT_EQ(ReadFile(dir + "/copy.txt"), content);
  struct stat st;
  ASSERT_EQ(stat((dir + "/copy.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // A record damaged in the shard: DATA_LOSS, a non-zero exit, and no file (the part that
  // arrived before the damage is not left behind either).
  pqxx::connection shard(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::nontransaction n(shard);
  const std::string flip =
      "UPDATE record_chunks SET ciphertext = set_byte(ciphertext, 5000, "
      "get_byte(ciphertext, 5000) # 1) WHERE record_id = $1 AND chunk_index = 1";
  n.exec_params0(flip, record);
  CtlRun damaged = Ctl("practitioner", absl::StrCat("download-record --record ", record, " --out ",
                                                    dir, "/damaged.txt"));
  EXPECT_NE(damaged.exit_code, 0) << damaged.output;
  EXPECT_THAT(damaged.output, HasSubstr("DATA_LOSS"));
  EXPECT_THAT(damaged.output, HasSubstr("nothing was written to '" + dir + "/damaged.txt'"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/damaged.txt"));
  EXPECT_EQ(CountFiles(dir, "damaged.txt.partial"), 0);
  n.exec_params0(flip, record);  // flipped back

  // A caller who may not read it: refused, no file.
  CtlRun refused = Ctl("globex-practitioner", absl::StrCat("download-record --record ", record,
                                                           " --out ", dir, "/refused.txt"));
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/refused.txt"));
  EXPECT_EQ(CountFiles(dir, "refused.txt.partial"), 0);

  ExpectAFailedWriteToLeaveNothing("practitioner", "download-record --record " + record, dir,
                                   "too-big.txt", 1);

  // --out naming something that is not a regular file is refused before anything is asked.
  CtlRun not_a_file = Ctl("practitioner", absl::StrCat("download-record --record ", record,
                                                       " --out ", dir));
  EXPECT_NE(not_a_file.exit_code, 0);
  EXPECT_THAT(not_a_file.output, HasSubstr("not a regular file"));
  std::filesystem::remove_all(dir);
}

// A RecordSharing server that answers every download with the messages it was given, then OK:
// streams the real service never sends, as something between it and the client might. With
// `stall`, it sends them and then nothing more until the client gives up. Its uploads (once their
// header has arrived) and erasures always wait so. Each wait lasts 5 s at most and then ends the
// call OK (an erasure's or upload's answer, a download short of its header's size): a client that
// did not give up at its own deadline sees that, not DEADLINE_EXCEEDED.
class ScriptedSharing final : public v1::RecordSharing::Service {
 public:
  void Script(std::vector<v1::DownloadRecordResponse> messages, bool stall = false) {
    std::lock_guard<std::mutex> lock(mu_);
    messages_ = std::move(messages);
    stall_ = stall;
  }

  grpc::Status DownloadRecord(grpc::ServerContext* context, const v1::DownloadRecordRequest*,
                              grpc::ServerWriter<v1::DownloadRecordResponse>* writer) override {
    std::vector<v1::DownloadRecordResponse> messages;
    bool stall = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      messages = messages_;
      stall = stall_;
    }
    for (const v1::DownloadRecordResponse& message : messages) {
      if (!writer->Write(message)) break;
    }
    if (stall) WaitForTheClientToGiveUp(*context);
    return grpc::Status::OK;
  }

  // The pages ExportPatientRecords sends: the first for an empty page token, page N for the
  // token "N". With `stall`, the call then waits for its client to give up.
  void ScriptExport(std::vector<std::vector<v1::ExportPatientRecordsResponse>> pages,
                    bool stall = false) {
    std::lock_guard<std::mutex> lock(mu_);
    export_pages_ = std::move(pages);
    stall_ = stall;
  }

  grpc::Status ExportPatientRecords(
      grpc::ServerContext* context, const v1::ExportPatientRecordsRequest* request,
      grpc::ServerWriter<v1::ExportPatientRecordsResponse>* writer) override {
    std::vector<v1::ExportPatientRecordsResponse> messages;
    bool stall = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t page = 0;
      if (!request->page_token().empty() && !absl::SimpleAtoi(request->page_token(), &page)) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "page_token");
      }
      if (page < export_pages_.size()) messages = export_pages_[page];
      stall = stall_;
    }
    for (const v1::ExportPatientRecordsResponse& message : messages) {
      if (!writer->Write(message)) break;
    }
    if (stall) WaitForTheClientToGiveUp(*context);
    return grpc::Status::OK;
  }

  grpc::Status UploadRecord(grpc::ServerContext* context,
                            grpc::ServerReader<v1::UploadRecordRequest>* reader,
                            v1::UploadRecordResponse* response) override {
    v1::UploadRecordRequest header;
    if (!reader->Read(&header)) return grpc::Status::OK;
    WaitForTheClientToGiveUp(*context);
    response->set_record_id("fr-1.r-scripted");
    return grpc::Status::OK;
  }

  grpc::Status EraseRecord(grpc::ServerContext* context, const v1::EraseRecordRequest*,
                           v1::EraseRecordResponse*) override {
    WaitForTheClientToGiveUp(*context);
    return grpc::Status::OK;
  }

 private:
  static void WaitForTheClientToGiveUp(grpc::ServerContext& context) {
    (void)test_support::PollUntil(absl::Now() + absl::Seconds(5),
                                  [&] { return context.IsCancelled(); });
  }

  std::mutex mu_;
  std::vector<v1::DownloadRecordResponse> messages_;
  std::vector<std::vector<v1::ExportPatientRecordsResponse>> export_pages_;
  bool stall_ = false;
};

// medgate-ctl checks what it downloads against the header the stream began with (size_bytes,
// sha256) and the stream's shape (one header, first), and writes --out only when all of it holds.
TEST_F(CtlTest, ADownloadThatDoesNotMatchItsHeaderLeavesNoFile) {
  ScriptedSharing scripted;
  ServiceServer server(stack_->config(), "sharing");
  const std::string config = ServeInPlace({{"sharing", &server, &scripted}}, "ctl-scripted.yaml");
  ASSERT_FALSE(config.empty());

  const std::string dir = stack_->dir() + "/ctl-scripted";
  std::filesystem::create_directories(dir);
  const std::string content(700'000, 'x');
  auto header = [](uint64_t size, const std::string& sha256) {
    v1::DownloadRecordResponse m;
    m.mutable_header()->set_record_id("fr-1.r-scripted");
    m.mutable_header()->set_size_bytes(size);
    m.mutable_header()->set_sha256(sha256);
    return m;
  };
  auto chunk = [](absl::string_view data) {
    v1::DownloadRecordResponse m;
    m.mutable_chunk()->set_data(std::string(data));
    return m;
  };
  const std::string sha = crypto::Sha256::Of(content);
  const absl::string_view first = absl::string_view(content).substr(0, 400'000);
  const absl::string_view rest = absl::string_view(content).substr(400'000);
  auto download = [&](const std::string& out) {
    return test_support::RunShell(absl::StrCat(MEDGATE_CTL_BINARY, " --config ", config,
                                               " --identity practitioner download-record --record "
                                               "fr-1.r-scripted --out ",
                                               dir, "/", out, " 2>&1"));
  };

  // The stream as the service sends it: accepted, the file written.
  scripted.Script({header(content.size(), sha), chunk(first), chunk(rest)});
  CtlRun whole = download("whole.bin");
  ASSERT_EQ(whole.exit_code, 0) << whole.output;
  EXPECT_EQ(ReadFile(dir + "/whole.bin"), content);

  const struct {
    const char* name;
    std::vector<v1::DownloadRecordResponse> messages;
    const char* says;
  } kBroken[] = {
      {"other-content", {header(content.size(), crypto::Sha256::Of("other")), chunk(first),
                         chunk(rest)},
       "the content does not match the header's sha256"},
      {"short", {header(content.size() + 1, sha), chunk(first), chunk(rest)},
       "700000 bytes arrived, the header's size_bytes is 700001"},
      {"long", {header(content.size() - 1, sha), chunk(first), chunk(rest)},
       "more than the header's size_bytes (699999) arrived"},
      {"headless", {chunk(first), chunk(rest)},
       "content arrived before the record's header"},
      {"empty", {}, "the stream ended without the record's header"},
      {"two-headers", {header(content.size(), sha), chunk(first), header(content.size(), sha),
                       chunk(rest)},
       "a second header arrived"},
  };
  for (const auto& broken : kBroken) {
    SCOPED_TRACE(broken.name);
    scripted.Script(broken.messages);
    const std::string out = absl::StrCat(broken.name, ".bin");
    CtlRun run = download(out);
    EXPECT_EQ(run.exit_code, 1) << run.output;
    EXPECT_THAT(run.output, HasSubstr(broken.says));
    EXPECT_THAT(run.output, HasSubstr("nothing was written"));
    EXPECT_FALSE(std::filesystem::exists(dir + "/" + out));
    EXPECT_EQ(CountFiles(dir, out + ".partial"), 0);
  }

  // A stream that stops half way: medgate-ctl gives up at its --timeout (DEADLINE_EXCEEDED) and
  // keeps nothing of what arrived. Without the flag it would wait 300 s; the server stalls 5 s at
  // most, then ends the stream short, which fails otherwise.
  scripted.Script({header(content.size(), sha), chunk(first)}, /*stall=*/true);
  CtlRun stalled = test_support::RunShell(absl::StrCat(
      MEDGATE_CTL_BINARY, " --config ", config, " --identity practitioner --timeout 1 "
      "download-record --record fr-1.r-scripted --out ", dir, "/stalled.bin 2>&1"));
  EXPECT_EQ(stalled.exit_code, 1) << stalled.output;
  // One error line: the call's status, and what became of --out.
  EXPECT_THAT(stalled.output, StartsWith("error: DEADLINE_EXCEEDED (4): "));
  EXPECT_THAT(stalled.output, EndsWith(absl::StrCat("; nothing was written to '", dir,
                                                    "/stalled.bin'\n")));
  EXPECT_EQ(stalled.output.find("error:", 1), std::string::npos) << stalled.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/stalled.bin"));
  EXPECT_EQ(CountFiles(dir, "stalled.bin.partial"), 0);

  // Stopped half way (SIGTERM, as a shutdown sends): the file it was writing goes with it.
  scripted.Script({header(content.size(), sha), chunk(first)}, /*stall=*/true);
  ExpectAStopToLeaveNothing(
      absl::StrCat(MEDGATE_CTL_BINARY, " --config ", config, " --identity practitioner ",
                   "download-record --record fr-1.r-scripted --out ", dir, "/stopped.bin"),
      absl::StrCat(dir, " -name 'stopped.bin.partial-*'"), dir, "stopped.bin");
  server.Shutdown();
  std::filesystem::remove_all(dir);
}

// medgate-ctl checks every record of an export against the size and SHA-256 it was announced
// with, the stream's shape, and that its id can name a file in the export's directory, and makes
// --out only when all of it holds.
TEST_F(CtlTest, AnExportThatDoesNotMatchItsRecordsLeavesNoDirectory) {
  ScriptedSharing scripted;
  ServiceServer server(stack_->config(), "sharing");
  const std::string config =
      ServeInPlace({{"sharing", &server, &scripted}}, "ctl-scripted-export.yaml");
  ASSERT_FALSE(config.empty());
  const std::string dir = stack_->dir() + "/ctl-scripted-export";
  std::filesystem::create_directories(dir + "/in");
  const std::string content(300'000, 'y');
  auto line = [](const std::string& id) {
    return absl::StrCat("{\"resourceType\":\"DocumentReference\",\"url\":\"content/", id,
                        "\"}\n");
  };
  auto record = [&](const std::string& id, uint64_t size, const std::string& sha256) {
    v1::ExportPatientRecordsResponse m;
    m.mutable_record()->set_record_id(id);
    m.mutable_record()->set_document_reference(line(id));
    m.mutable_record()->set_size_bytes(size);
    m.mutable_record()->set_sha256(sha256);
    return m;
  };
  auto chunk = [](absl::string_view data) {
    v1::ExportPatientRecordsResponse m;
    m.set_content(std::string(data));
    return m;
  };
  auto end = [](uint32_t count, const std::string& token = "") {
    v1::ExportPatientRecordsResponse m;
    m.mutable_page_end()->set_record_count(count);
    m.mutable_page_end()->set_next_page_token(token);
    return m;
  };
  const std::string sha = crypto::Sha256::Of(content);
  const absl::string_view first = absl::string_view(content).substr(0, 100'000);
  const absl::string_view rest = absl::string_view(content).substr(100'000);
  // --out two levels down, so that an id climbing out of the export's directory would land in
  // `dir`, where it is looked for below.
  auto command = [&](const std::string& out) {
    return absl::StrCat(MEDGATE_CTL_BINARY, " --config ", config,
                        " --identity app export-records --patient fr-1.p-scripted --reason "
                        "'the patient asked' --out ", dir, "/in/", out);
  };
  auto run = [&](const std::string& out) {
    return test_support::RunShell(command(out) + " 2>&1");
  };

  // Two pages, the second asked for with the first's token.
  scripted.ScriptExport({{record("fr-1.r-1", content.size(), sha), chunk(first), chunk(rest),
                          end(1, "1")},
                         {record("fr-1.r-2", 5, crypto::Sha256::Of("abcde")), chunk("abcde"),
                          end(1)}});
  CtlRun whole = run("whole");
  ASSERT_EQ(whole.exit_code, 0) << whole.output;
  EXPECT_THAT(whole.output, HasSubstr("records: 2\nbytes: 300005\npages: 2\n"));
  EXPECT_EQ(ReadFile(dir + "/in/whole/content/fr-1.r-1"), content);
  EXPECT_EQ(ReadFile(dir + "/in/whole/content/fr-1.r-2"), "abcde");
  EXPECT_EQ(ReadFile(dir + "/in/whole/DocumentReference.ndjson"),
            line("fr-1.r-1") + line("fr-1.r-2"));

  v1::ExportPatientRecordsResponse two_lines = record("fr-1.r-1", content.size(), sha);
  two_lines.mutable_record()->set_document_reference(line("fr-1.r-1") + line("fr-1.r-9"));
  v1::ExportPatientRecordsResponse other_url = record("fr-1.r-1", content.size(), sha);
  other_url.mutable_record()->set_document_reference(line("fr-1.r-9"));
  const struct {
    const char* name;
    std::vector<v1::ExportPatientRecordsResponse> messages;
    const char* says;
  } kBroken[] = {
      {"other-content",
       {record("fr-1.r-1", content.size(), crypto::Sha256::Of("other")), chunk(first),
        chunk(rest), end(1)},
       "record 'fr-1.r-1': its content does not match its sha256"},
      {"short", {record("fr-1.r-1", content.size() + 1, sha), chunk(first), chunk(rest), end(1)},
       "record 'fr-1.r-1': 300000 bytes arrived, its size_bytes is 300001"},
      {"short-before-the-next",
       {record("fr-1.r-1", content.size() + 1, sha), chunk(first), chunk(rest),
        record("fr-1.r-2", 5, crypto::Sha256::Of("abcde")), chunk("abcde"), end(2)},
       "record 'fr-1.r-1': 300000 bytes arrived, its size_bytes is 300001"},
      {"long", {record("fr-1.r-1", content.size() - 1, sha), chunk(first), chunk(rest), end(1)},
       "record 'fr-1.r-1': more than its size_bytes arrived"},
      {"headless", {chunk(first), end(1)}, "content arrived before its record"},
      {"no-end", {record("fr-1.r-1", content.size(), sha), chunk(first), chunk(rest)},
       "the export's page ended without its page_end"},
      {"miscounted", {record("fr-1.r-1", content.size(), sha), chunk(first), chunk(rest), end(2)},
       "the page end counts 2 records, 1 arrived"},
      {"empty-message", {v1::ExportPatientRecordsResponse(), end(0)},
       "a message with nothing in it arrived"},
      {"two-lines", {two_lines, chunk(first), chunk(rest), end(1)},
       "its document_reference is not one line naming content/fr-1.r-1"},
      {"other-url", {other_url, chunk(first), chunk(rest), end(1)},
       "its document_reference is not one line naming content/fr-1.r-1"},
      {"climbing-id", {record("../../escaped", content.size(), sha), chunk(first), chunk(rest),
                       end(1)},
       "a record id that cannot name a file arrived"},
      {"nested-id", {record("a/b", content.size(), sha), chunk(first), chunk(rest), end(1)},
       "a record id that cannot name a file arrived"},
  };
  for (const auto& broken : kBroken) {
    SCOPED_TRACE(broken.name);
    scripted.ScriptExport({broken.messages});
    CtlRun r = run(broken.name);
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_THAT(r.output, HasSubstr(broken.says));
    EXPECT_THAT(r.output, HasSubstr("nothing was written"));
    EXPECT_FALSE(std::filesystem::exists(dir + "/in/" + broken.name));
    EXPECT_EQ(CountFiles(dir + "/in", absl::StrCat(broken.name, ".partial")), 0);
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/escaped"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/in/a"));

  // A page that stops half way: medgate-ctl gives up at its --timeout (DEADLINE_EXCEEDED, not the
  // 300 s a page has by default; the server stalls 5 s at most) and keeps nothing.
  scripted.ScriptExport({{record("fr-1.r-1", content.size(), sha), chunk(first)}}, /*stall=*/true);
  CtlRun stalled = test_support::RunShell(
      absl::StrCat(absl::StrReplaceAll(command("stalled"), {{" export-records", " --timeout 1 "
                                                                               "export-records"}}),
                   " 2>&1"));
  EXPECT_EQ(stalled.exit_code, 1) << stalled.output;
  EXPECT_THAT(stalled.output, StartsWith("error: DEADLINE_EXCEEDED (4): "));
  EXPECT_THAT(stalled.output, HasSubstr("nothing was written"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/in/stalled"));
  EXPECT_EQ(CountFiles(dir + "/in", "stalled.partial"), 0);

  // Stopped half way (SIGTERM, as a shutdown sends): the directory it was writing goes with it.
  scripted.ScriptExport({{record("fr-1.r-1", content.size(), sha), chunk(first)}}, /*stall=*/true);
  ExpectAStopToLeaveNothing(command("stopped"),
                            absl::StrCat(dir, "/in -path '*stopped.partial-*/content/*'"),
                            dir + "/in", "stopped");
  server.Shutdown();
  std::filesystem::remove_all(dir);
}

// An Audit server whose VerifyChain waits until the client gives up, 5 s at most, then answers
// OK: a client that did not give up at its own deadline sees that, not DEADLINE_EXCEEDED.
class StalledAudit final : public v1::Audit::Service {
 public:
  grpc::Status VerifyChain(grpc::ServerContext* context, const v1::VerifyChainRequest*,
                           v1::VerifyChainResponse* response) override {
    (void)test_support::PollUntil(absl::Now() + absl::Seconds(5),
                                  [&] { return context->IsCancelled(); });
    response->set_ok(true);
    return grpc::Status::OK;
  }
};

// --timeout bounds every kind of call, not only downloads: an erasure (a unary call, 10 s by
// default), an upload (300 s) and a chain's verification (600 s) that the server leaves
// unanswered end at the flag's deadline, with DEADLINE_EXCEEDED. The server answers them OK
// after 5 s, so a call that waited for its command's own deadline instead would succeed.
TEST_F(CtlTest, TheTimeoutBoundsEveryKindOfCall) {
  ScriptedSharing scripted;
  ServiceServer server(stack_->config(), "sharing");
  StalledAudit stalled_audit;
  ServiceServer audit_server(stack_->config(), "audit");
  const std::string config = ServeInPlace(
      {{"sharing", &server, &scripted}, {"audit", &audit_server, &stalled_audit}},
      "ctl-timeout.yaml");
  ASSERT_FALSE(config.empty());
  const std::string file = stack_->dir() + "/ctl-timeout.txt";
  {
    std::ofstream out(file, std::ios::binary);
    out << "a note the server never answers for";
  }
  const struct {
    const char* name;
    std::string arguments;
  } kCalls[] = {
      {"erase-record", "erase-record --record fr-1.r-scripted --reason timeout-test"},
      {"upload-record", absl::StrCat("upload-record --patient fr-1.p-scripted --kind document "
                                     "--file ", file)},
      {"verify-chain", "verify-chain --log control"},
  };
  for (const auto& call : kCalls) {
    SCOPED_TRACE(call.name);
    CtlRun run = test_support::RunShell(absl::StrCat(MEDGATE_CTL_BINARY, " --config ", config,
                                                     " --identity practitioner --timeout 1 ",
                                                     call.arguments, " 2>&1"));
    EXPECT_EQ(run.exit_code, 1) << run.output;
    EXPECT_THAT(run.output, StartsWith("error: DEADLINE_EXCEEDED (4): ")) << run.output;
  }
  server.Shutdown();
  audit_server.Shutdown();
  std::filesystem::remove(file);
}

// A file is sent a chunk at a time: uploading one of 64 MiB keeps medgate-ctl's memory far below
// the file's size (reading it whole, as it once did, took twice the file at least). The record
// arrives whole.
TEST_F(CtlTest, UploadsALargeFileWithMemoryBoundedByAChunk) {
  const std::string patient = PlaceWithCare("ctl-patient-2");
  ASSERT_FALSE(patient.empty());

  const std::string dir = stack_->dir() + "/ctl-large";
  std::filesystem::create_directories(dir);
  constexpr size_t kSize = size_t{64} << 20;
  {
    std::ofstream out(dir + "/scan.bin", std::ios::binary);
    std::string block(size_t{1} << 20, '\0');
    for (size_t at = 0; at < kSize; at += block.size()) {
      for (size_t i = 0; i < block.size(); i += 8) {
        const uint64_t v = (at + i) * 0x9E3779B97F4A7C15ull;
        std::memcpy(&block[i], &v, 8);
      }
      out.write(block.data(), static_cast<std::streamsize>(block.size()));
    }
    ASSERT_TRUE(out.good());
  }
  // GNU time prints the process's peak resident memory (KiB) after it ends.
  CtlRun uploaded = Ctl("practitioner",
                        absl::StrCat("upload-record --kind imaging --patient ", patient,
                                     " --file ", dir, "/scan.bin"),
                        "/usr/bin/time -f 'peak_rss_kib=%M' ");
  ASSERT_EQ(uploaded.exit_code, 0) << uploaded.output;
  const std::string record = Field(uploaded.output, "record_id");
  ASSERT_FALSE(record.empty()) << uploaded.output;
  const size_t at = uploaded.output.rfind("peak_rss_kib=");
  ASSERT_NE(at, std::string::npos) << uploaded.output;
  const long peak_kib = std::stol(uploaded.output.substr(at + 13));
  EXPECT_GT(peak_kib, 0);
  RecordProperty("ctl_upload_peak_rss_kib", static_cast<int>(peak_kib));
  // About 30 MiB here, 17 MiB of it the process before any call. Holding the file once would be
  // over 80 MiB; reading it whole as before took 222 MiB.
  if (!kSanitized) {  // sanitizers keep freed memory in quarantine: RSS says nothing there
    EXPECT_LT(peak_kib, 64 * 1024) << "medgate-ctl held " << peak_kib << " KiB for a "
                                   << (kSize >> 20) << " MiB file";
  }

  CtlRun downloaded = Ctl("practitioner", absl::StrCat("download-record --record ", record,
                                                       " --out ", dir, "/copy.bin"));
  ASSERT_EQ(downloaded.exit_code, 0) << downloaded.output;
  EXPECT_EQ(std::filesystem::file_size(dir + "/copy.bin"), kSize);
  EXPECT_TRUE(ReadFile(dir + "/copy.bin") == ReadFile(dir + "/scan.bin"));
  std::filesystem::remove_all(dir);
}

// The file is read twice (its hash, then its bytes). A file whose content differs on the second
// read (here a FIFO fed two different contents of one size) is not sent as hashed: the upload is
// cancelled, medgate-ctl says why, and the shard holds no new record.
TEST_F(CtlTest, AFileThatChangesWhileItIsSentIsNotStored) {
  const std::string patient = PlaceWithCare("ctl-patient-3");
  ASSERT_FALSE(patient.empty());

  const std::string dir = stack_->dir() + "/ctl-changing";
  std::filesystem::create_directories(dir);
  const std::string first(3 * 1024 * 1024 / 2, 'a');
  const std::string second(first.size(), 'b');
  std::ofstream(dir + "/first", std::ios::binary) << first;
  std::ofstream(dir + "/second", std::ios::binary) << second;
  ASSERT_EQ(mkfifo((dir + "/letter").c_str(), 0600), 0) << std::strerror(errno);
  pqxx::connection shard(stack_->clusters().region("fr-1").ConnectionString());
  auto records = [&] {
    pqxx::nontransaction n(shard);
    return n.exec_params1("SELECT count(*) FROM records WHERE patient_id = $1", patient)[0]
        .as<int64_t>();
  };
  ASSERT_EQ(records(), 0);

  // Feeds `a` to medgate-ctl's first read of the FIFO, waits until no process holds the FIFO
  // open any more (the first read's end), then feeds `b` to its second read. Each `cat` waits
  // for its reader to open the FIFO, writes, and closes it. Every wait is bounded, so that a
  // medgate-ctl that reads the file a number of times other than two fails the test, not hangs it.
  const std::string fifo = std::filesystem::canonical(dir).string() + "/letter";  // as /proc shows it
  auto feed = [&](const std::string& a, const std::string& b) {
    auto cat = [&](const std::string& file) {
      return absl::StrCat("timeout 60 sh -c 'cat ", dir, "/", file, " > ", fifo, "'");
    };
    return absl::StrCat("(", cat(a), "; for i in $(seq 6000); do find /proc/[0-9]*/fd -lname ",
                        fifo, " 2>/dev/null | grep -q . || break; sleep 0.01; done; ", cat(b),
                        ") >/dev/null 2>&1 & timeout 120 ");
  };
  CtlRun uploaded = Ctl("practitioner",
                        absl::StrCat("upload-record --patient ", patient, " --file ", fifo),
                        feed("first", "second"));
  EXPECT_EQ(uploaded.exit_code, 1) << uploaded.output;
  EXPECT_THAT(uploaded.output, HasSubstr("changed while it was sent (its content changed)"));
  EXPECT_THAT(uploaded.output, HasSubstr("nothing was stored"));
  EXPECT_EQ(records(), 0);

  // Shorter, or longer, on the second read: refused as well.
  std::ofstream(dir + "/shorter", std::ios::binary) << first.substr(0, first.size() - 1);
  std::ofstream(dir + "/longer", std::ios::binary) << first << "a";
  CtlRun shorter = Ctl("practitioner",
                       absl::StrCat("upload-record --patient ", patient, " --file ", fifo),
                       feed("first", "shorter"));
  EXPECT_EQ(shorter.exit_code, 1) << shorter.output;
  EXPECT_THAT(shorter.output, HasSubstr("changed while it was sent (it is shorter than it was)"));
  CtlRun longer = Ctl("practitioner",
                      absl::StrCat("upload-record --patient ", patient, " --file ", fifo),
                      feed("first", "longer"));
  EXPECT_EQ(longer.exit_code, 1) << longer.output;
  EXPECT_THAT(longer.output, HasSubstr("changed while it was sent (it is longer than it was)"));
  EXPECT_EQ(records(), 0);

  // The same file, unchanged, is stored.
  CtlRun again = Ctl("practitioner",
                     absl::StrCat("upload-record --patient ", patient, " --file ", fifo),
                     feed("first", "first"));
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_EQ(records(), 1);
  std::filesystem::remove_all(dir);
}

// The sharing service records every audit log's head in the others on its own (each second
// here, once a log moved): verify-chain checks a shard's log against its anchor in the control
// log, and says which.
TEST_F(CtlTest, VerifyChainChecksALogAgainstItsAnchorRecordedInAnother) {
  CtlRun run;
  // Each verification is an entry of fr-1's own: the log moves, and is anchored.
  const bool anchored = test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
    run = Ctl("ops", "verify-chain --log fr-1");
    return run.exit_code == 0 && Field(run.output, "recorded_anchor_log") == "control";
  });
  ASSERT_TRUE(anchored) << run.output;
  EXPECT_THAT(run.output, HasSubstr("\"ok\": true"));
  EXPECT_NE(Field(run.output, "recorded_anchor_seq"), "");
  EXPECT_EQ(Field(run.output, "recorded_anchor_unavailable"), "");

  // Ops anchor a log anew from its head, with a reason; the log is then checked against it.
  CtlRun rebased = Ctl("ops", "rebase-anchor --log fr-1 --reason 'INC-1: restored'");
  ASSERT_EQ(rebased.exit_code, 0) << rebased.output;
  EXPECT_THAT(rebased.output, HasSubstr("\"recorded_in\""));
  EXPECT_THAT(rebased.output, HasSubstr("\"control\""));
  const std::string rebased_seq = Field(rebased.output, "anchor_seq");
  ASSERT_NE(rebased_seq, "") << rebased.output;
  CtlRun after = Ctl("ops", "verify-chain --log fr-1");
  EXPECT_EQ(after.exit_code, 0) << after.output;
  EXPECT_EQ(Field(after.output, "recorded_anchor_seq"), rebased_seq) << after.output;
  // The control log's anchors are in the shards: with fr-1 down, the chain still verifies, but
  // not against fr-1's anchor, which verify-chain says with exit code 4.
  ASSERT_TRUE(stack_->clusters().region("fr-1").Stop().ok());
  CtlRun partial = Ctl("ops", "verify-chain --log control");
  ASSERT_TRUE(stack_->clusters().region("fr-1").StartAgain().ok());
  EXPECT_EQ(partial.exit_code, 4) << partial.output;
  EXPECT_THAT(Field(partial.output, "recorded_anchor_unavailable"), HasSubstr("log fr-1"));
  CtlRun no_log = Ctl("ops", "rebase-anchor --reason x");
  EXPECT_EQ(no_log.exit_code, 1);
  EXPECT_THAT(no_log.output, HasSubstr("--log"));
  CtlRun practitioner = Ctl("practitioner", "rebase-anchor --log fr-1 --reason x");
  EXPECT_EQ(practitioner.exit_code, 1);
  EXPECT_THAT(practitioner.output, HasSubstr("PERMISSION_DENIED"));
}

// Ops verify a log's chain and keep its last hash; given back as the next run's anchor, it holds
// while the log only grows, and a wrong anchor is reported as a broken chain (exit 3).
TEST_F(CtlTest, VerifiesAChainAgainstAnAnchorItPrinted) {
  CtlRun first = Ctl("ops", "verify-chain --log control");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_THAT(first.output, HasSubstr("\"ok\": true"));
  const std::string last_seq = Field(first.output, "last_seq");  // uint64 is a JSON string
  const std::string last_hash = Field(first.output, "last_hash");
  ASSERT_FALSE(last_seq.empty()) << first.output;
  ASSERT_FALSE(last_hash.empty()) << first.output;

  CtlRun anchored = Ctl("ops", absl::StrCat("verify-chain --log control --anchor-seq ", last_seq,
                                            " --anchor-hash ", last_hash));
  EXPECT_EQ(anchored.exit_code, 0) << anchored.output;
  // The same seq with another entry's hash: not the log the anchor was taken from.
  CtlRun other = Ctl("ops", absl::StrCat("verify-chain --log control --anchor-seq ", last_seq,
                                         " --anchor-hash ", std::string(43, 'A'), "="));
  EXPECT_EQ(other.exit_code, 3) << other.output;
  EXPECT_THAT(other.output, HasSubstr("CHAIN_FAULT_ANCHOR_MISMATCH"));
  // Only ops may verify; bad flags are refused before anything is asked.
  CtlRun practitioner = Ctl("practitioner", "verify-chain --log control");
  EXPECT_EQ(practitioner.exit_code, 1);
  EXPECT_THAT(practitioner.output, HasSubstr("PERMISSION_DENIED"));
  CtlRun bad = Ctl("ops", "verify-chain --log control --anchor-seq ten");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.output, HasSubstr("--anchor-seq"));
  // The same for every numeric flag (put-rule's used to end the process on an exception).
  CtlRun bad_version = Ctl("ops", "put-rule --territory FR --regions fr-1 --expected-version two");
  EXPECT_EQ(bad_version.exit_code, 1);
  EXPECT_THAT(bad_version.output, HasSubstr("--expected-version"));
  // A version past int64 (the field's type) is refused too, not sent as a negative number.
  CtlRun huge_version = Ctl("ops", "put-rule --territory FR --regions fr-1 "
                                   "--expected-version 9223372036854775808");
  EXPECT_EQ(huge_version.exit_code, 1) << huge_version.output;
  EXPECT_THAT(huge_version.output, HasSubstr("--expected-version"));
}

// A command line that does not say exactly what it seems to (a flag dropped after an unquoted
// word, `--allow-move false` read as true, a flag without its value, a misspelt flag) is refused
// with exit code 2, naming what is wrong, and nothing is sent.
// A record's name is UTF-8, as every proto3 string: a file named in another encoding is refused
// before anything is sent, saying how to name the record, and --file-name names it. A
// --content-type that is not a media type is refused before anything is sent too.
TEST_F(CtlTest, AFileNamedInAnotherEncodingIsGivenANameWithFileName) {
  const std::string patient = PlaceWithCare("ctl-latin1-name");
  ASSERT_FALSE(patient.empty());
  const std::string dir = stack_->dir() + "/ctl-latin1";
  std::filesystem::create_directories(dir);
  const std::string latin1 = dir + "/r\xe9sum\xe9.txt";  // "résumé.txt" in Latin-1
  std::ofstream(latin1, std::ios::binary) << "curriculum";
  pqxx::connection shard(stack_->clusters().region("fr-1").ConnectionString());
  auto records = [&] {
    pqxx::nontransaction n(shard);
    return n.exec_params1("SELECT count(*) FROM records WHERE patient_id = $1", patient)[0]
        .as<int64_t>();
  };
  CtlRun refused = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                    " --file '", latin1, "'"));
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("--file: the file's name 'r\\xe9sum\\xe9.txt' is not "
                                        "valid UTF-8; give the record a name with --file-name"));
  CtlRun bad_name =
      Ctl("practitioner", absl::StrCat("upload-record --patient ", patient, " --file '", latin1,
                                       "' --file-name 'caf\xe9.txt'"));
  EXPECT_NE(bad_name.exit_code, 0) << bad_name.output;
  EXPECT_THAT(bad_name.output,
              HasSubstr("--file-name: the name 'caf\\xe9.txt' is not valid UTF-8"));
  CtlRun bad_type =
      Ctl("practitioner", absl::StrCat("upload-record --patient ", patient, " --file '", latin1,
                                       "' --file-name resume.txt --content-type 'text plain'"));
  EXPECT_NE(bad_type.exit_code, 0) << bad_type.output;
  EXPECT_THAT(bad_type.output,
              HasSubstr("--content-type: not a media type such as application/pdf or "
                        "text/plain; charset=utf-8 (expected '/' after the type at byte 4)"));
  // Given empty, it is refused too, not taken for the default.
  CtlRun empty_type =
      Ctl("practitioner", absl::StrCat("upload-record --patient ", patient, " --file '", latin1,
                                       "' --file-name resume.txt --content-type ''"));
  EXPECT_NE(empty_type.exit_code, 0) << empty_type.output;
  EXPECT_THAT(empty_type.output, HasSubstr("--content-type: must not be empty"));
  EXPECT_EQ(records(), 0);

  CtlRun named =
      Ctl("practitioner", absl::StrCat("upload-record --patient ", patient, " --file '", latin1,
                                       "' --file-name 'r\xc3\xa9sum\xc3\xa9.txt'"));
  ASSERT_EQ(named.exit_code, 0) << named.output;
  const std::string record = Field(named.output, "record_id");
  CtlRun downloaded = Ctl("practitioner", absl::StrCat("download-record --record ", record,
                                                       " --out ", dir, "/copy.txt"));
  ASSERT_EQ(downloaded.exit_code, 0) << downloaded.output;
  EXPECT_EQ(Field(downloaded.output, "file_name"), "r\xc3\xa9sum\xc3\xa9.txt");
  EXPECT_EQ(ReadFile(dir + "/copy.txt"), "curriculum");
  EXPECT_EQ(records(), 1);
}

// grant-consent narrows a consent to the data categories given: CARE for imaging only lets no
// document in; an unknown category is the service's refusal, naming it.
TEST_F(CtlTest, GrantsAConsentNarrowedToCategories) {
  CtlRun placed = Ctl("app", "place-patient --ref ctl-categories --territory FR");
  ASSERT_EQ(placed.exit_code, 0) << placed.output;
  const std::string patient = Field(placed.output, "patient_id");
  ASSERT_FALSE(patient.empty()) << placed.output;
  CtlRun unknown = Ctl("app", absl::StrCat("grant-consent --patient ", patient,
                                           " --purpose CARE --evidence f --categories imaging,mood"));
  EXPECT_EQ(unknown.exit_code, 1) << unknown.output;
  EXPECT_THAT(unknown.output, HasSubstr("categories: 'mood' is not a data category"));
  // An empty list would grant every category: refused before the call.
  for (const std::string list : {"','", "imaging,", "' '"}) {
    CtlRun empty = Ctl("app", absl::StrCat("grant-consent --patient ", patient,
                                           " --purpose CARE --evidence f --categories ", list));
    EXPECT_EQ(empty.exit_code, 1) << list << ": " << empty.output;
    EXPECT_THAT(empty.output, HasSubstr("--categories: a comma-separated list")) << list;
  }
  CtlRun granted = Ctl("app", absl::StrCat("grant-consent --patient ", patient,
                                           " --purpose CARE --evidence f --categories imaging"));
  ASSERT_EQ(granted.exit_code, 0) << granted.output;
  const std::string dir = stack_->dir() + "/ctl-categories";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/letter.txt", std::ios::binary) << "letter";
  CtlRun refused = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                    " --kind document --file ", dir, "/letter.txt"));
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("CATEGORY_NOT_COVERED"));
  CtlRun imaging = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                    " --kind imaging --file ", dir, "/letter.txt"));
  EXPECT_EQ(imaging.exit_code, 0) << imaging.output;
}

TEST_F(CtlTest, ExportsAPatientsVitalsToAFileAndErasesThem) {
  CtlRun placed = Ctl("app", "place-patient --ref ctl-vitals --territory FR");
  ASSERT_EQ(placed.exit_code, 0) << placed.output;
  const std::string patient = Field(placed.output, "patient_id");
  ASSERT_FALSE(patient.empty()) << placed.output;
  // 6,000 readings in the patient's shard: two pages of the export.
  StoreHeartRates(patient, "dev-ctl", 6000);
  const std::string dir = stack_->dir() + "/ctl-vitals";
  std::filesystem::create_directories(dir);
  const std::string out = dir + "/observations.ndjson";
  const std::string why = "--reason 'the patient asked for a copy (ticket 77)'";

  CtlRun no_out = Ctl("app", absl::StrCat("export-vitals --patient ", patient, " ", why));
  EXPECT_EQ(no_out.exit_code, 1) << no_out.output;
  EXPECT_THAT(no_out.output, HasSubstr("--out: the file to write to is required"));
  CtlRun practitioner = Ctl("practitioner", absl::StrCat("export-vitals --patient ", patient, " ",
                                                         why, " --out ", out));
  EXPECT_EQ(practitioner.exit_code, 1) << practitioner.output;
  EXPECT_THAT(practitioner.output, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(practitioner.output, HasSubstr("nothing was written"));
  EXPECT_FALSE(std::filesystem::exists(out));

  CtlRun exported = Ctl("app", absl::StrCat("export-vitals --patient ", patient, " ", why,
                                            " --out ", out));
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_THAT(exported.output, HasSubstr("observations: 6000\npages: 2\n"));
  // Health data: only its owner may read the file.
  EXPECT_EQ(std::filesystem::status(out).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  std::ifstream file(out);
  std::string line;
  int lines = 0;
  int of_patient = 0;
  while (std::getline(file, line)) {
    ++lines;
    if (absl::StartsWith(line, "{\"resourceType\":\"Observation\",") &&
        absl::StrContains(line, absl::StrCat("\"value\":\"", patient, "\"")) &&
        absl::StrContains(line, "\"code\":\"8867-4\"")) {
      ++of_patient;
    }
  }
  EXPECT_EQ(lines, 6000);
  EXPECT_EQ(of_patient, 6000);
  // Both pages' audit entries carry the one request id the command made up and printed.
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: observations=%"), 2);
  // No file is left beside it.
  int files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1);

  // Where the patient's data is: the 6,000 samples in fr-1, nothing in the other regions.
  CtlRun reported = Ctl("app", absl::StrCat("data-report --patient ", patient));
  ASSERT_EQ(reported.exit_code, 0) << reported.output;
  EXPECT_THAT(reported.output, HasSubstr("\"home_region_id\": \"fr-1\""));
  EXPECT_THAT(reported.output, HasSubstr("\"kind\": \"vitals\",\n   \"count\": \"6000\""));
  // The two other regions asked; a zero is left out of the JSON: no rows there, none unanswered.
  EXPECT_THAT(reported.output, HasSubstr("\"other_regions_asked\": 2"));
  EXPECT_THAT(reported.output, ::testing::Not(HasSubstr("\"rows_elsewhere\":")));
  EXPECT_THAT(reported.output, ::testing::Not(HasSubstr("\"other_regions_unanswered\":")));
  EXPECT_THAT(reported.output, ::testing::Not(HasSubstr("\"region_id\":"))) << "region names are ops'";

  CtlRun erased = Ctl("app", absl::StrCat("erase-vitals --patient ", patient, " ", why));
  ASSERT_EQ(erased.exit_code, 0) << erased.output;
  EXPECT_THAT(erased.output, HasSubstr("\"erased_count\": \"6000\""));
  CtlRun empty = Ctl("app", absl::StrCat("export-vitals --patient ", patient, " ", why,
                                         " --out ", out));
  ASSERT_EQ(empty.exit_code, 0) << empty.output;
  EXPECT_THAT(empty.output, HasSubstr("observations: 0\npages: 1\n"));
  EXPECT_EQ(std::filesystem::file_size(out), 0u);
}

TEST_F(CtlTest, ExportsAPatientsRecordsToADirectory) {
  const std::string patient = PlaceWithCare("ctl-export-records");
  ASSERT_FALSE(patient.empty());
  const std::string dir = stack_->dir() + "/ctl-export-records";
  std::filesystem::create_directories(dir);
  std::string summary = "Discharge summary\n";
  for (int i = 0; summary.size() < 1'200'000; ++i) absl::StrAppend(&summary, "line ", i, "\n");
  std::ofstream(dir + "/summary.txt", std::ios::binary) << summary;
  std::ofstream(dir + "/note.txt", std::ios::binary) << "a short note";
  std::vector<std::string> records;
  for (const char* file : {"summary.txt", "note.txt"}) {
    CtlRun uploaded = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                       " --content-type text/plain --file ", dir,
                                                       "/", file));
    ASSERT_EQ(uploaded.exit_code, 0) << uploaded.output;
    records.push_back(Field(uploaded.output, "record_id"));
  }
  const std::string out = dir + "/export";
  const std::string why = "--reason 'the patient asked for a copy (ticket 78)'";
  CtlRun exported = ExportAfterARefusal("export-records", patient, out);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_THAT(exported.output,
              HasSubstr(absl::StrCat("records: 2\nbytes: ", summary.size() + 12, "\npages: 1\n")));
  EXPECT_EQ(ReadFile(out + "/content/" + records[0]), summary);
  EXPECT_EQ(ReadFile(out + "/content/" + records[1]), "a short note");
  // Newest first, a line each, naming the content beside it.
  const std::vector<std::string> lines =
      absl::StrSplit(ReadFile(out + "/DocumentReference.ndjson"), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[0], HasSubstr(absl::StrCat("\"url\":\"content/", records[1], "\"")));
  EXPECT_THAT(lines[1], HasSubstr(absl::StrCat("\"url\":\"content/", records[0], "\"")));
  EXPECT_THAT(lines[1], HasSubstr("\"title\":\"summary.txt\""));
  // Health data: only its owner may enter the directory or read the files.
  EXPECT_EQ(std::filesystem::status(out).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_all);
  EXPECT_EQ(std::filesystem::status(out + "/content/" + records[0]).permissions() &
                std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  // Each record's audit entry carries the request id the command made up and printed.
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: bytes=%"), 2);
  // --out must not exist: an export never writes into a directory already there.
  CtlRun again =
      Ctl("app", absl::StrCat("export-records --patient ", patient, " ", why, " --out ", out));
  EXPECT_EQ(again.exit_code, 1) << again.output;
  EXPECT_THAT(again.output, HasSubstr("exists; name a directory that does not"));

  ExpectAFailedWriteToLeaveNothing("app",
                                   absl::StrCat("export-records --patient ", patient, " ", why),
                                   dir, "too-big", 1, "content/" + records[0]);

  // A record damaged in the shard: DATA_LOSS, and no directory, not even in part.
  pqxx::connection shard(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::nontransaction n(shard);
  const std::string flip =
      "UPDATE record_chunks SET ciphertext = set_byte(ciphertext, 10, "
      "get_byte(ciphertext, 10) # 1) WHERE record_id = $1 AND chunk_index = 1";
  n.exec_params0(flip, records[0]);
  CtlRun damaged = Ctl("app", absl::StrCat("export-records --patient ", patient, " ", why,
                                           " --out ", dir, "/damaged"));
  n.exec_params0(flip, records[0]);  // flipped back
  EXPECT_EQ(damaged.exit_code, 1) << damaged.output;
  EXPECT_THAT(damaged.output, HasSubstr("DATA_LOSS"));
  EXPECT_THAT(damaged.output, HasSubstr(records[0]));
  EXPECT_FALSE(std::filesystem::exists(dir + "/damaged"));
  EXPECT_EQ(CountFiles(dir, "damaged.partial"), 0);
}

TEST_F(CtlTest, ExportsAPatientsConsentsToAFile) {
  const std::string patient = PlaceWithCare("ctl-export-consents");
  ASSERT_FALSE(patient.empty());
  ASSERT_TRUE(GrantGeolocation(patient, "app-event-3"));
  const std::string dir = stack_->dir() + "/ctl-export-consents";
  std::filesystem::create_directories(dir);
  const std::string out = dir + "/consents.ndjson";
  CtlRun exported = ExportAfterARefusal("export-consents", patient, out);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_THAT(exported.output, HasSubstr("consents: 2\nversions: 2\npages: 1\n"));
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: consents=2 versions=2 %"),
            1);
  EXPECT_EQ(std::filesystem::status(out).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  const std::vector<std::string> lines = absl::StrSplit(ReadFile(out), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u);
  for (const std::string& line : lines) {
    EXPECT_THAT(line, StartsWith("{\"resourceType\":\"Consent\","));
    EXPECT_THAT(line, HasSubstr(absl::StrCat("\"value\":\"", patient, "\"")));
  }
  EXPECT_THAT(lines[0], HasSubstr("\"code\":\"CARE\""));
  EXPECT_THAT(lines[1], HasSubstr("\"code\":\"GEOLOCATION\""));
  EXPECT_THAT(lines[1], HasSubstr("app-event-3"));
}

TEST_F(CtlTest, ExportsEverythingOfAPatientToOneDirectoryOrNothing) {
  const std::string patient = PlaceWithCare("ctl-export-patient");
  ASSERT_FALSE(patient.empty());
  ASSERT_TRUE(GrantGeolocation(patient, "app-event-9"));
  StoreHeartRates(patient, "dev-ctl-patient", 30);
  const std::string dir = stack_->dir() + "/ctl-export-patient";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/letter.txt", std::ios::binary) << "Dear colleague,\n";
  CtlRun uploaded = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                     " --content-type text/plain --file ", dir,
                                                     "/letter.txt"));
  ASSERT_EQ(uploaded.exit_code, 0) << uploaded.output;
  const std::string record = Field(uploaded.output, "record_id");

  const std::string out = dir + "/export";
  CtlRun exported = ExportAfterARefusal("export-patient", patient, out);
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_THAT(exported.output,
              HasSubstr("consents: 2\nconsent versions: 2\nobservations: 30\nrecords: 1\n"
                        "bytes: 16\n"));
  const std::vector<std::string> consents =
      absl::StrSplit(ReadFile(out + "/Consent.ndjson"), '\n', absl::SkipEmpty());
  ASSERT_EQ(consents.size(), 2u);
  EXPECT_THAT(consents[1], HasSubstr("app-event-9"));
  const std::vector<std::string> observations =
      absl::StrSplit(ReadFile(out + "/Observation.ndjson"), '\n', absl::SkipEmpty());
  ASSERT_EQ(observations.size(), 30u);
  for (const std::string& line : observations) {
    EXPECT_THAT(line, StartsWith("{\"resourceType\":\"Observation\","));
    EXPECT_THAT(line, HasSubstr(absl::StrCat("\"value\":\"", patient, "\"")));
  }
  const std::vector<std::string> documents =
      absl::StrSplit(ReadFile(out + "/DocumentReference.ndjson"), '\n', absl::SkipEmpty());
  ASSERT_EQ(documents.size(), 1u);
  EXPECT_THAT(documents[0], HasSubstr(absl::StrCat("\"url\":\"content/", record, "\"")));
  EXPECT_EQ(ReadFile(out + "/content/" + record), "Dear colleague,\n");
  EXPECT_EQ(std::filesystem::status(out).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_all);
  // Each part is audited where the patient's data is, under the one request id printed.
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: consents=2 versions=2 %"),
            1);
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: observations=30%"), 1);
  EXPECT_EQ(EntriesOfPrintedRequest(exported.output, patient, "EXPORTED: bytes=16%"), 1);

  // Its last part too: the consents and vitals fit in 64 KiB, a record of 200 KiB does not.
  std::ofstream(dir + "/scan.txt", std::ios::binary) << std::string(200 * 1024, 's');
  CtlRun scan = Ctl("practitioner", absl::StrCat("upload-record --patient ", patient,
                                                 " --content-type text/plain --file ", dir,
                                                 "/scan.txt"));
  ASSERT_EQ(scan.exit_code, 0) << scan.output;
  ExpectAFailedWriteToLeaveNothing(
      "app", absl::StrCat("export-patient --patient ", patient, " --reason 'a copy of everything'"),
      dir, "too-big", 64, "content/" + Field(scan.output, "record_id"));

  // The last part fails (a record damaged in the shard): the consents and vitals already read
  // are not left behind either.
  pqxx::connection shard(stack_->clusters().region("fr-1").ConnectionString());
  pqxx::nontransaction n(shard);
  const std::string flip =
      "UPDATE record_chunks SET ciphertext = set_byte(ciphertext, 3, "
      "get_byte(ciphertext, 3) # 1) WHERE record_id = $1 AND chunk_index = 0";
  n.exec_params0(flip, record);
  CtlRun damaged = Ctl("app", absl::StrCat("export-patient --patient ", patient,
                                           " --reason 'the patient asked for a copy' --out ", dir,
                                           "/damaged"));
  n.exec_params0(flip, record);  // flipped back
  EXPECT_EQ(damaged.exit_code, 1) << damaged.output;
  EXPECT_THAT(damaged.output, HasSubstr("the patient's records: DATA_LOSS"));
  EXPECT_THAT(damaged.output, HasSubstr(record));
  EXPECT_THAT(damaged.output, HasSubstr("nothing was written"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/damaged"));
  EXPECT_EQ(CountFiles(dir, "damaged.partial"), 0);
}

TEST_F(CtlTest, RefusesACommandLineItCannotReadBeforeAnythingIsSent) {
  pqxx::connection control(stack_->clusters().control().ConnectionString());
  auto tenant = [&] {
    pqxx::nontransaction n(control);
    pqxx::result rows = n.exec(
        "SELECT display_name || '|' || array_to_string(territories, ',') || '|' || "
        "coalesce(array_to_string(region_ids, ','), '-') || '|' || active::text "
        "FROM tenants WHERE tenant_id = 'ctl-strict'");
    return rows.empty() ? std::string("none") : rows[0][0].as<std::string>();
  };
  auto acme_patients = [&] {
    pqxx::nontransaction n(control);
    return n.exec1("SELECT count(*) FROM patients WHERE tenant_id = 'acme'")[0].as<int64_t>();
  };
  CtlRun created = Ctl("ops", "upsert-tenant --tenant ctl-strict --name Strict --territories FR");
  ASSERT_EQ(created.exit_code, 0) << created.output;
  const std::string tenant_before = tenant();
  ASSERT_EQ(tenant_before, "Strict|FR|-|true");
  const int64_t patients_before = acme_patients();

  struct Case {
    std::string identity;
    std::string arguments;
    std::string problem;
  };
  const Case cases[] = {
      {"app", "place-patient --ref ctl-strict-patient --territory FR --allow-move false",
       "--allow-move takes no value, not 'false'"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict --territories FR --inactive false",
       "--inactive takes no value, not 'false'"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict --territories FR,DE --regions",
       "--regions needs a value"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict --regions --territories FR,DE",
       "--regions needs a value, not --territories"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict --territories FR,DE --bogus",
       "unknown flag --bogus of upsert-tenant"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict --teritories FR,DE",
       "unknown flag --teritories of upsert-tenant"},
      {"ops", "upsert-tenant --tenant ctl-strict --name Strict telehealth --territories FR,DE",
       "unexpected word 'telehealth' after upsert-tenant"},
  };
  for (const Case& c : cases) {
    CtlRun run = Ctl(c.identity, c.arguments);
    EXPECT_EQ(run.exit_code, 2) << c.arguments << "\n" << run.output;
    EXPECT_THAT(run.output, HasSubstr(c.problem)) << c.arguments;
    EXPECT_THAT(run.output, HasSubstr("usage: medgate-ctl")) << c.arguments;
    EXPECT_EQ(tenant(), tenant_before) << c.arguments;
    EXPECT_EQ(acme_patients(), patients_before) << c.arguments;
  }

  // "unspecified" names the enums' zero value, not a kind or purpose: refused here, before the
  // call, as any other word that is not one.
  CtlRun no_kind = Ctl("practitioner", "upload-record --patient fr-1.p-x --kind unspecified "
                                       "--file /dev/null");
  EXPECT_EQ(no_kind.exit_code, 1) << no_kind.output;
  EXPECT_THAT(no_kind.output, HasSubstr("--kind: document, imaging or report"));
  CtlRun no_purpose =
      Ctl("app", "grant-consent --patient p-x --purpose unspecified --evidence form");
  EXPECT_EQ(no_purpose.exit_code, 1) << no_purpose.output;
  EXPECT_THAT(no_purpose.output, HasSubstr("--purpose: CARE"));
}

// A pod's readiness and liveness probes (helm/medgate): the service's binary asks the servers
// running on this host, on their own ports and with their own certificates, for their standard
// gRPC health; ready when every one is SERVING, alive when every one answers.
TEST_F(CtlTest, TheProbesAskTheRunningServersForTheirHealth) {
  // As in a pod: each service listens on a port of its own, and its address (the Service's, which
  // may lead to another pod) is not where the probe goes. Here the addresses lead nowhere.
  // A configuration in which sharing and audit listen on `sharing` and `audit`.
  auto probe_config = [&](int sharing, int audit) {
    std::string yaml = ReadFile(*config_path_);
    for (const auto& [service, address_port, listen_port] :
         {std::tuple<std::string, int, int>{"sharing", sharing_->port(), sharing},
          {"audit", sharing_->audit_port(), audit}}) {
      const std::string from = absl::StrCat("  ", service, ":\n    address: 127.0.0.1:",
                                            address_port, "\n    listen: 127.0.0.1:0\n");
      const size_t at = yaml.find(from);
      EXPECT_NE(at, std::string::npos) << from;
      if (at == std::string::npos) continue;
      yaml.replace(at, from.size(),
                   absl::StrCat("  ", service, ":\n    address: 127.0.0.1:1\n",
                                "    listen: 127.0.0.1:", listen_port, "\n"));
    }
    const std::string path = absl::StrCat(stack_->dir(), "/probe-", sharing, "-", audit, ".yaml");
    std::ofstream(path) << yaml;
    return path;
  };
  const std::string config = probe_config(sharing_->port(), sharing_->audit_port());
  auto probe = [&](const std::string& services, const std::string& with = "") {
    return test_support::RunShell(absl::StrCat(MEDGATE_SHARING_BINARY, " --config ",
                                                with.empty() ? config : with, " --probe ",
                                                services, " 2>&1"));
  };
  // The liveness probe asks the same, and passes on any answer.
  auto alive = [&](const std::string& services, const std::string& with = "") {
    return test_support::RunShell(absl::StrCat(MEDGATE_SHARING_BINARY, " --config ",
                                                with.empty() ? config : with, " --liveness ",
                                                services, " 2>&1"));
  };
  const test_support::ShellRun serving = probe("sharing,audit");
  EXPECT_EQ(serving.exit_code, 0) << serving.output;
  const test_support::ShellRun living = alive("sharing,audit");
  EXPECT_EQ(living.exit_code, 0) << living.output;
  EXPECT_THAT(serving.output, HasSubstr("sharing: SERVING"));
  EXPECT_THAT(serving.output, HasSubstr("audit: SERVING"));

  const test_support::ShellRun unknown = probe("sharing,billing");
  EXPECT_EQ(unknown.exit_code, 2) << unknown.output;
  EXPECT_THAT(unknown.output, HasSubstr("services.billing"));

  // A server that takes the connection and never answers: the probe gives up at its deadline
  // and fails, saying which server did not answer; the other is still asked.
  const int silent = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(silent, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(silent, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(silent, 4), 0);
  ASSERT_EQ(getsockname(silent, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const test_support::ShellRun hung =
      probe("sharing,audit", probe_config(sharing_->port(), ntohs(addr.sin_port)));
  EXPECT_EQ(hung.exit_code, 1) << hung.output;
  EXPECT_THAT(hung.output, HasSubstr("sharing: SERVING"));
  EXPECT_THAT(hung.output, HasSubstr("audit: DEADLINE_EXCEEDED"));
  // The liveness probe fails on it too: a server that never answers is wedged.
  const test_support::ShellRun hung_alive =
      alive("sharing,audit", probe_config(sharing_->port(), ntohs(addr.sin_port)));
  EXPECT_EQ(hung_alive.exit_code, 1) << hung_alive.output;
  EXPECT_THAT(hung_alive.output, HasSubstr("audit: DEADLINE_EXCEEDED"));
  close(silent);

  // With every region's shard down the service cannot serve, and the probe fails until one is
  // back.
  test_support::PgClusterSet& clusters = stack_->clusters();
  for (test_support::PgCluster* region : clusters.regions()) ASSERT_TRUE(region->Stop().ok());
  test_support::ShellRun down;
  // Each server finds the shards gone on its own health round (every 2 s): the probe fails as
  // soon as one does, and names each server that is not serving.
  const bool failed = test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
    down = probe("sharing,audit");
    return down.exit_code == 1 && absl::StrContains(down.output, "sharing: NOT_SERVING") &&
           absl::StrContains(down.output, "audit: NOT_SERVING");
  });
  // Not serving, yet alive: restarting the pods would not bring the shards back.
  const test_support::ShellRun down_alive = alive("sharing,audit");
  for (test_support::PgCluster* region : clusters.regions()) {
    ASSERT_TRUE(region->StartAgain().ok());
  }
  // As the suite set it up: fr-1's consent feed listening again.
  ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30), [] {
    return sharing_->consent_cache().FeedListening("fr-1");
  }));
  EXPECT_TRUE(failed) << down.output;
  EXPECT_EQ(down_alive.exit_code, 0) << down_alive.output;
  EXPECT_THAT(down_alive.output, HasSubstr("sharing: NOT_SERVING"));
  test_support::ShellRun back;
  EXPECT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30), [&] {
    back = probe("sharing,audit");
    return back.exit_code == 0;
  })) << back.output;
}

}  // namespace
}  // namespace medgate::sharing
