// medgate-ctl: a command-line client for operators and developers, over the same mTLS as any client.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "libs/common/config.h"
#include "libs/common/validation.h"
#include "libs/crypto/aes_gcm.h"
#include "libs/crypto/sha256.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/ctl/command_line.h"

namespace medgate::ctl {
namespace {

using Flags = std::map<std::string, std::string>;

// --timeout, set once by Run before any call: 0 leaves each command its own deadline.
std::chrono::seconds g_timeout{0};

// When a call started now gives up: after --timeout if given, else after `command_default`.
std::chrono::system_clock::time_point Deadline(std::chrono::seconds command_default) {
  return std::chrono::system_clock::now() +
         (g_timeout.count() > 0 ? g_timeout : command_default);
}

std::vector<std::string> List(const Flags& flags, const std::string& name) {
  auto it = flags.find(name);
  if (it == flags.end() || it->second.empty()) return {};
  return absl::StrSplit(it->second, ',', absl::SkipEmpty());
}

std::string Get(const Flags& flags, const std::string& name) {
  auto it = flags.find(name);
  return it == flags.end() ? "" : it->second;
}

// A failed call as printed: "DATA_LOSS (15): record ... is damaged ..." (gRPC's codes are absl's).
std::string StatusText(const grpc::Status& status) {
  return absl::StrCat(
      absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())), " (",
      static_cast<int>(status.error_code()), "): ", status.error_message());
}

int Print(const grpc::Status& status, const google::protobuf::Message& response) {
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", StatusText(status).c_str());
    return 1;
  }
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(response, &json, options).ok()) {
    std::fprintf(stderr, "error: the answer could not be printed as JSON\n");
    return 1;
  }
  if (std::fputs(json.c_str(), stdout) < 0 || std::fflush(stdout) != 0) return 1;
  return 0;
}

template <typename Stub, typename Request, typename Response>
int Call(grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Request&, Response*), Stub& stub,
         const Request& request) {
  grpc::ClientContext context;
  context.set_deadline(Deadline(std::chrono::seconds(10)));
  Response response;
  return Print((stub.*rpc)(&context, request, &response), response);
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  return 1;
}

int GrantConsent(v1::Consent::Stub& stub, const Flags& flags) {
  v1::GrantConsentRequest r;
  r.set_request_id(Get(flags, "request-id"));
  r.set_patient_id(Get(flags, "patient"));
  v1::Purpose purpose;
  if (!v1::Purpose_Parse("PURPOSE_" + absl::AsciiStrToUpper(Get(flags, "purpose")), &purpose) ||
      purpose == v1::PURPOSE_UNSPECIFIED) {
    return Fail("--purpose: CARE, REMOTE_MONITORING, RECORD_SHARING, RESEARCH, ... required");
  }
  r.set_purpose(purpose);
  r.set_actor(Get(flags, "actor"));
  r.set_evidence_ref(Get(flags, "evidence"));
  // The data categories the consent is narrowed to; without the flag, every category. Given, it
  // must name some: an empty list would silently grant every category. The service checks names.
  if (flags.contains("categories")) {
    for (absl::string_view category : absl::StrSplit(Get(flags, "categories"), ',')) {
      category = absl::StripAsciiWhitespace(category);
      if (category.empty()) {
        return Fail("--categories: a comma-separated list of data categories (heart-rate, "
                    "imaging, ...), none of them empty; leave the flag out to grant every category");
      }
      r.add_categories(std::string(category));
    }
  }
  return Call(&v1::Consent::Stub::GrantConsent, stub, r);
}

// Reads at most `max` bytes of `file` into `buffer`: the bytes read (fewer only at the file's
// end), or -1 when the read failed.
int64_t ReadChunk(std::ifstream& file, std::string& buffer, size_t max) {
  file.read(buffer.data(), static_cast<std::streamsize>(std::min(max, buffer.size())));
  if (file.bad()) return -1;
  return static_cast<int64_t>(file.gcount());
}

// The file is read twice, a chunk at a time: once for its size and SHA-256, which the header
// declares, then to send it. Memory stays at one chunk whatever the file's size. A file that
// changes between the two reads is not sent as it was hashed: the upload is cancelled before its
// last chunk, and the server stores nothing.
int UploadRecord(v1::RecordSharing::Stub& stub, const Flags& flags) {
  const std::string path = Get(flags, "file");
  v1::RecordKind kind;
  const std::string kind_flag = Get(flags, "kind").empty() ? "document" : Get(flags, "kind");
  if (!v1::RecordKind_Parse("RECORD_KIND_" + absl::AsciiStrToUpper(kind_flag), &kind) ||
      kind == v1::RECORD_KIND_UNSPECIFIED) {
    return Fail("--kind: document, imaging or report");
  }
  // The record's name is UTF-8, as every proto3 string: a file named in another encoding (an
  // old Latin-1 disk) is given one instead of being refused by the service.
  const std::string file_name = Get(flags, "file-name").empty()
                                    ? std::filesystem::path(path).filename().string()
                                    : Get(flags, "file-name");
  if (!IsValidUtf8(file_name)) {
    const char* which = Get(flags, "file-name").empty() ? "--file: the file's" : "--file-name: the";
    return Fail(absl::StrCat(which, " name '", absl::CHexEscape(file_name),
                             "' is not valid UTF-8; give the record a name with --file-name"));
  }
  // Given empty, refused below as the service would refuse it.
  const std::string content_type =
      flags.contains("content-type") ? Get(flags, "content-type") : "application/octet-stream";
  // Refused here, before the file is read, as the service would refuse it (255 bytes: its bound).
  if (absl::Status valid = ValidateMediaType(content_type, "--content-type", 255); !valid.ok()) {
    return Fail(std::string(valid.message()));
  }
  constexpr size_t kChunk = size_t{1} << 20;  // the largest chunk the service takes
  std::string buffer(kChunk, '\0');
  uint64_t size = 0;
  std::string sha256;
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) return Fail("--file: cannot read '" + path + "'");
    crypto::Sha256 hasher;
    for (int64_t n; (n = ReadChunk(in, buffer, buffer.size())) != 0;) {
      if (n < 0) return Fail("--file: reading '" + path + "' failed");
      hasher.Update(absl::string_view(buffer.data(), static_cast<size_t>(n)));
      size += static_cast<uint64_t>(n);
    }
    sha256 = hasher.Finish();
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return Fail("--file: cannot read '" + path + "'");

  grpc::ClientContext context;
  context.set_deadline(Deadline(std::chrono::seconds(300)));
  v1::UploadRecordResponse response;
  auto writer = stub.UploadRecord(&context, &response);
  v1::UploadRecordRequest message;
  v1::UploadRecordHeader* header = message.mutable_header();
  header->set_request_id(Get(flags, "request-id"));
  header->set_patient_id(Get(flags, "patient"));
  header->set_kind(kind);
  header->set_content_type(content_type);
  header->set_file_name(file_name);
  header->set_size_bytes(size);
  header->set_sha256(sha256);
  // An empty file is its header alone.
  bool open = size == 0 ? writer->Write(message, grpc::WriteOptions().set_last_message())
                        : writer->Write(message);
  crypto::Sha256 sent;
  uint64_t at = 0;
  std::string changed;
  while (open && at < size) {
    const size_t wanted = static_cast<size_t>(std::min<uint64_t>(kChunk, size - at));
    const int64_t n = ReadChunk(in, buffer, wanted);
    if (n < 0) {
      changed = "reading it failed";
      break;
    }
    if (static_cast<size_t>(n) < wanted) {
      changed = "it is shorter than it was";
      break;
    }
    const absl::string_view piece(buffer.data(), wanted);
    sent.Update(piece);
    at += wanted;
    message.mutable_chunk()->set_data(piece.data(), piece.size());
    if (at < size) {
      open = writer->Write(message);
    } else if (in.peek() != std::ifstream::traits_type::eof()) {
      changed = "it is longer than it was";
    } else if (sent.Finish() != sha256) {
      changed = "its content changed";
    } else {
      open = writer->Write(message, grpc::WriteOptions().set_last_message());
    }
  }
  if (!changed.empty()) {
    context.TryCancel();
    writer->Finish();
    return Fail("--file: '" + path + "' changed while it was sent (" + changed +
                "); the upload was cancelled and nothing was stored");
  }
  return Print(writer->Finish(), response);
}

// What a stop (Ctrl-C, SIGTERM, SIGHUP) removes before the process ends: the partial file or
// directory a download or an export is writing beside --out (OutFile, OutDir). Files are created
// in it under the same lock, so nothing is added once it was removed.
std::mutex g_partial_mu;
std::string g_partial;  // guarded by g_partial_mu; empty when nothing is being written

// One thread takes the stop signals for the whole process: it removes g_partial and exits
// 128 + the signal. Called before any other thread starts (gRPC's inherit the signals blocked).
void WatchStopSignals() {
  sigset_t stops;
  sigemptyset(&stops);
  sigaddset(&stops, SIGINT);
  sigaddset(&stops, SIGTERM);
  sigaddset(&stops, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stops, nullptr);
  std::signal(SIGXFSZ, SIG_IGN);  // past a file size limit: a failed write, not a killed process
  std::thread([stops] {
    int signal = 0;
    sigwait(&stops, &signal);
    std::lock_guard<std::mutex> lock(g_partial_mu);
    std::error_code ignored;
    if (!g_partial.empty()) std::filesystem::remove_all(g_partial, ignored);
    _exit(128 + signal);
  }).detach();
}

// Health data goes to --out only once all of it arrived and was checked: it is written to a file
// only its owner may read, beside --out, renamed over --out when the command succeeded, and
// removed otherwise (no partial or unverified plaintext is left behind).
class OutFile {
 public:
  OutFile() = default;
  OutFile(const OutFile&) = delete;
  OutFile& operator=(const OutFile&) = delete;

  // An error message when --out cannot be written beside.
  std::string Open(const std::string& out_path) {
    out_path_ = out_path;
    if (out_path.empty()) return "--out: the file to write to is required";
    std::error_code error;
    if (std::filesystem::exists(out_path, error) &&
        !std::filesystem::is_regular_file(out_path, error)) {
      return "--out: '" + out_path + "' exists and is not a regular file";
    }
    // Interrupted (Ctrl-C, a stop), the part received so far is removed too, even if just made.
    std::lock_guard<std::mutex> lock(g_partial_mu);
    std::string tmp_path = out_path + ".partial-XXXXXX";
    fd_ = mkostemp(tmp_path.data(), O_CLOEXEC);  // created 0600, exclusively
    if (fd_ < 0) {
      return absl::StrCat("--out: cannot write beside '", out_path, "': ", std::strerror(errno));
    }
    tmp_path_ = std::move(tmp_path);  // only a file this created is removed
    g_partial = tmp_path_;
    return "";
  }
  ~OutFile() {
    if (fd_ >= 0) close(fd_);
    std::lock_guard<std::mutex> lock(g_partial_mu);
    if (!tmp_path_.empty()) std::remove(tmp_path_.c_str());
    g_partial.clear();
  }

  // False once a write failed (Commit says why): nothing more needs to be fetched.
  bool Write(absl::string_view data) {
    while (write_error_ == 0 && !data.empty()) {
      const ssize_t n = write(fd_, data.data(), data.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        write_error_ = n < 0 ? errno : ENOSPC;
        break;
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    return write_error_ == 0;
  }
  // Flushes the file to disk and renames it over --out: an error message when it could not.
  std::string Commit() {
    if (write_error_ == 0 && fsync(fd_) != 0) write_error_ = errno;
    close(fd_);
    fd_ = -1;
    if (write_error_ != 0) {
      return absl::StrCat("--out: writing '", tmp_path_, "' failed: ", std::strerror(write_error_));
    }
    std::lock_guard<std::mutex> lock(g_partial_mu);
    if (std::rename(tmp_path_.c_str(), out_path_.c_str()) != 0) {
      return absl::StrCat("--out: cannot rename '", tmp_path_, "' to '", out_path_, "': ",
                          std::strerror(errno));
    }
    g_partial.clear();  // a signal from now on leaves --out in place
    tmp_path_.clear();
    return "";
  }

 private:
  std::string out_path_;
  std::string tmp_path_;
  int fd_ = -1;
  int write_error_ = 0;
};

// The record's content goes to --out (OutFile) once it was authenticated and matched the size and
// SHA-256 its header announced.
int DownloadRecord(v1::RecordSharing::Stub& stub, const Flags& flags) {
  const std::string out_path = Get(flags, "out");
  OutFile out;
  if (std::string problem = out.Open(out_path); !problem.empty()) return Fail(problem);
  grpc::ClientContext context;
  context.set_deadline(Deadline(std::chrono::seconds(300)));
  v1::DownloadRecordRequest request;
  request.set_record_id(Get(flags, "record"));
  request.set_break_glass_reason(Get(flags, "break-glass"));
  auto reader = stub.DownloadRecord(&context, request);
  v1::DownloadRecordResponse message;
  v1::Record header;
  bool have_header = false;
  crypto::Sha256 hasher;
  uint64_t received = 0;
  // The server checks the record before it ends the stream; the content is checked here too,
  // against the header it announced, so that what reaches --out is what was uploaded, whatever
  // happened on the way (as the protocol asks of every client).
  std::string broken;  // the stream breaks the protocol: first break seen
  while (reader->Read(&message)) {
    if (message.has_header()) {
      if (have_header) {
        broken = "a second header arrived";
        break;
      }
      header = message.header();
      have_header = true;
    } else if (message.has_chunk()) {
      if (!have_header) {
        broken = "content arrived before the record's header";
        break;
      }
      const std::string& data = message.chunk().data();
      received += data.size();
      if (received > header.size_bytes()) {
        broken = absl::StrCat("more than the header's size_bytes (", header.size_bytes(),
                              ") arrived");
        break;
      }
      hasher.Update(data);
      out.Write(data);
    }
  }
  if (!broken.empty()) context.TryCancel();
  const grpc::Status status = reader->Finish();
  if (status.ok() && broken.empty()) {
    if (!have_header) {
      broken = "the stream ended without the record's header";
    } else if (received != header.size_bytes()) {
      broken = absl::StrCat(received, " bytes arrived, the header's size_bytes is ",
                            header.size_bytes());
    } else if (hasher.Finish() != header.sha256()) {
      broken = "the content does not match the header's sha256";
    }
  }
  // A check that failed says more than the CANCELLED it ended the call with.
  if (!broken.empty()) {
    return Fail(absl::StrCat("record '", request.record_id(), "': ", broken,
                             "; nothing was written to '", out_path, "'"));
  }
  if (!status.ok()) {
    return Fail(absl::StrCat(StatusText(status), "; nothing was written to '", out_path, "'"));
  }
  if (std::string problem = out.Commit(); !problem.empty()) return Fail(problem);
  return Print(status, header);
}

// One request id for every page of an export, so that the audit entries of one export name it
// alike: --request-id, or one made up (and printed at the end).
std::string ExportRequestId(const Flags& flags) {
  std::string id = Get(flags, "request-id");
  if (id.empty()) id = absl::StrCat("ctl-export-", absl::BytesToHexString(crypto::RandomBytes(12)));
  return id;
}

// What an export read, page after page, or why it stopped: its pages' bytes went to the file(s)
// given to it, which keep nothing unless the whole export succeeded.
struct ExportRun {
  uint64_t count = 0;     // observations, consents or records
  uint64_t versions = 0;  // consents: every version of each
  uint64_t bytes = 0;     // records: their content's bytes
  uint64_t pages = 0;
  // Why the export stopped before its last page (a failed call, a stream that breaks the
  // protocol); empty when it did not, or when a write failed (the file says why).
  std::string failed;
  bool write_failed = false;
};

// Appends an export's bytes to the file it is written to: false once a write failed.
using Append = std::function<bool(absl::string_view)>;

// A patient's vitals as FHIR R4 Observations, one JSON resource a line, to `append`.
ExportRun FetchVitals(v1::DeviceIngest::Stub& stub, v1::ExportVitalsRequest request,
                      const Append& append) {
  ExportRun run;
  do {
    grpc::ClientContext context;
    context.set_deadline(Deadline(std::chrono::seconds(300)));
    auto reader = stub.ExportVitals(&context, request);
    v1::ExportVitalsResponse message;
    std::string next_token;
    while (!run.write_failed && reader->Read(&message)) {
      run.write_failed = !append(message.ndjson());
      run.count += message.observation_count();
      next_token = message.next_page_token();
    }
    if (run.write_failed) {
      // The file cannot take more: the pages left are not fetched.
      context.TryCancel();
      reader->Finish();
      return run;
    }
    const grpc::Status status = reader->Finish();
    if (!status.ok()) {
      run.failed = absl::StrCat(StatusText(status), " (after ", run.count, " observations in ",
                                run.pages, " pages)");
      return run;
    }
    ++run.pages;
    request.set_page_token(next_token);
  } while (!request.page_token().empty());
  return run;
}

// An export request for the patient --patient, for --reason, under `request_id`.
template <typename Request>
Request PatientExportRequest(const Flags& flags, const std::string& request_id) {
  Request request;
  request.set_request_id(request_id);
  request.set_patient_id(Get(flags, "patient"));
  request.set_reason(Get(flags, "reason"));
  return request;
}

// Writes what `fetch` reads to --out (OutFile), which appears once the last page arrived: the
// export's run, or nothing once it failed (and said why).
std::optional<ExportRun> ExportToFile(const Flags& flags,
                                      const std::function<ExportRun(const Append&)>& fetch) {
  const std::string out_path = Get(flags, "out");
  OutFile out;
  std::string problem = out.Open(out_path);
  if (problem.empty()) {
    const ExportRun run = fetch([&out](absl::string_view data) { return out.Write(data); });
    if (!run.failed.empty()) {
      problem = absl::StrCat(run.failed, "; nothing was written to '", out_path, "'");
    } else if (problem = out.Commit(); problem.empty()) {  // and says why a write failed
      return run;
    }
  }
  Fail(problem);
  return std::nullopt;
}

// A patient's vitals to --out (OutFile).
int ExportVitals(v1::DeviceIngest::Stub& stub, const Flags& flags) {
  const auto request =
      PatientExportRequest<v1::ExportVitalsRequest>(flags, ExportRequestId(flags));
  const std::optional<ExportRun> run =
      ExportToFile(flags, [&](const Append& append) { return FetchVitals(stub, request, append); });
  if (!run) return 1;
  std::printf(
      "observations: %llu\npages: %llu\nfile: %s\nformat: FHIR R4 Observation, NDJSON\n"
      "request_id: %s\n",
      static_cast<unsigned long long>(run->count), static_cast<unsigned long long>(run->pages),
      Get(flags, "out").c_str(), request.request_id().c_str());
  return 0;
}

// An export's files go to the directory --out only once all of them arrived and were checked:
// they are written into a directory only its owner may read, beside --out, renamed to --out when
// the command succeeded, and removed otherwise, also when a signal (Ctrl-C, a stop) ends the
// process first (WatchStopSignals).
class OutDir {
 public:
  OutDir() = default;
  OutDir(const OutDir&) = delete;
  OutDir& operator=(const OutDir&) = delete;

  // An error message when --out cannot be made.
  std::string Open(const std::string& out_path) {
    out_path_ = out_path;
    if (out_path.empty()) return "--out: the directory to write the export to is required";
    std::error_code error;
    if (std::filesystem::exists(out_path, error) || error) {
      return "--out: '" + out_path + "' exists; name a directory that does not";
    }
    // Interrupted (Ctrl-C, a stop), what was written so far is removed too, even if just made.
    std::lock_guard<std::mutex> lock(g_partial_mu);
    std::string tmp_path = out_path + ".partial-XXXXXX";
    if (mkdtemp(tmp_path.data()) == nullptr) {  // created 0700
      return absl::StrCat("--out: cannot write beside '", out_path, "': ", std::strerror(errno));
    }
    tmp_path_ = std::move(tmp_path);  // only a directory this created is removed
    g_partial = tmp_path_;
    if (mkdir((tmp_path_ + "/content").c_str(), 0700) != 0) return Failed("content");
    return "";
  }
  ~OutDir() {
    if (fd_ >= 0) close(fd_);
    std::lock_guard<std::mutex> lock(g_partial_mu);
    std::error_code ignored;
    if (!tmp_path_.empty()) std::filesystem::remove_all(tmp_path_, ignored);
    g_partial.clear();
  }

  // Starts the file `name` (a path inside the directory), ending the one before: false once a
  // write failed (Commit says why).
  bool Start(const std::string& name) {
    if (!EndFile()) return false;
    file_ = name;
    std::lock_guard<std::mutex> lock(g_partial_mu);  // as Open's mkdir
    fd_ = open((tmp_path_ + "/" + name).c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd_ < 0) Failed(name);
    return fd_ >= 0;
  }
  // Appends to the file started last.
  bool Write(absl::string_view data) {
    while (problem_.empty() && !data.empty()) {
      const ssize_t n = write(fd_, data.data(), data.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (n == 0) errno = ENOSPC;
        Failed(file_);
        break;
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    return problem_.empty();
  }
  // Why a write failed; empty while none did.
  const std::string& problem() const { return problem_; }
  // Ends the last file and renames the directory to --out: an error message when it could not.
  // The directories' entries are flushed to disk too, so that an export said to be written is,
  // after a crash as well; a directory made at --out meanwhile is not replaced.
  std::string Commit() {
    EndFile();
    if (problem_.empty()) SyncDirectory(tmp_path_ + "/content", "content");
    if (problem_.empty()) SyncDirectory(tmp_path_, ".");
    if (!problem_.empty()) return problem_;
    std::lock_guard<std::mutex> lock(g_partial_mu);
    if (renameat2(AT_FDCWD, tmp_path_.c_str(), AT_FDCWD, out_path_.c_str(), RENAME_NOREPLACE) !=
        0) {
      return absl::StrCat("--out: cannot rename '", tmp_path_, "' to '", out_path_, "': ",
                          std::strerror(errno));
    }
    g_partial.clear();  // a signal from now on leaves --out in place
    tmp_path_.clear();
    const std::filesystem::path parent = std::filesystem::path(out_path_).parent_path();
    const std::string parent_path = parent.empty() ? std::string(".") : parent.string();
    const int fd = open(parent_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
      const std::string why = std::strerror(errno);
      if (fd >= 0) close(fd);
      return absl::StrCat("--out: '", out_path_, "' was written, but flushing '", parent_path,
                          "' failed: ", why);
    }
    close(fd);
    return "";
  }

 private:
  std::string Failed(const std::string& name) {
    if (problem_.empty()) {
      problem_ = absl::StrCat("--out: writing '", tmp_path_, "/", name, "' failed: ",
                              std::strerror(errno));
    }
    return problem_;
  }
  void SyncDirectory(const std::string& path, const std::string& name) {
    const int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) Failed(name);
    if (fd >= 0) close(fd);
  }
  // Flushes the file started last to disk.
  bool EndFile() {
    if (fd_ >= 0) {
      if (problem_.empty() && fsync(fd_) != 0) Failed(file_);
      close(fd_);
      fd_ = -1;
    }
    return problem_.empty();
  }

  std::string out_path_;
  std::string tmp_path_;
  std::string file_;
  std::string problem_;
  int fd_ = -1;
};

constexpr int kExportRecordsPerPage = 5;

// Whether `id` may name a file in an export's content directory.
bool SafeFileName(const std::string& id) {
  return !id.empty() && id != "." && id != ".." && id.size() <= 255 &&
         std::all_of(id.begin(), id.end(), [](char c) {
           return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' ||
                  c == '_';
         });
}

// A patient's records into `out` (an OutDir): each record's content in content/<record_id>,
// checked against the size and SHA-256 its record announced, page after page; `index` gets
// their FHIR R4 DocumentReferences, a line each, for DocumentReference.ndjson.
ExportRun FetchRecords(v1::RecordSharing::Stub& stub, v1::ExportPatientRecordsRequest request,
                       OutDir& out, std::string* index) {
  // Each page has the command's deadline (300 s): five records of up to 256 MiB each, so that a
  // page of the largest records needs about 4.3 MB/s, not the 17 of the service's default page.
  request.set_page_size(kExportRecordsPerPage);
  ExportRun run;
  std::string& broken = run.failed;  // the stream breaks the protocol: first break seen
  do {
    grpc::ClientContext context;
    context.set_deadline(Deadline(std::chrono::seconds(300)));
    auto reader = stub.ExportPatientRecords(&context, request);
    v1::ExportPatientRecordsResponse message;
    v1::ExportedRecord current;
    bool in_record = false;
    crypto::Sha256 hasher;
    uint64_t received = 0;
    auto end_record = [&] {
      if (!in_record) return;
      in_record = false;
      if (received != current.size_bytes()) {
        broken = absl::StrCat(received, " bytes arrived, its size_bytes is ", current.size_bytes());
      } else if (hasher.Finish() != current.sha256()) {
        broken = "its content does not match its sha256";
      } else {
        ++run.count;
        run.bytes += received;
        *index += current.document_reference();
      }
      if (!broken.empty()) broken = absl::StrCat("record '", current.record_id(), "': ", broken);
    };
    bool ended = false;
    uint32_t page_records = 0;
    std::string next_token;
    while (broken.empty() && !ended && reader->Read(&message)) {
      if (message.has_record()) {
        end_record();
        if (!broken.empty()) break;
        current = message.record();
        ++page_records;
        if (!SafeFileName(current.record_id())) {
          broken = "a record id that cannot name a file arrived";
          break;
        }
        // One line of DocumentReference.ndjson, naming the content written beside it.
        const std::string& line = current.document_reference();
        if (line.empty() || line.find('\n') != line.size() - 1 ||
            !absl::StrContains(line, absl::StrCat("\"url\":\"content/", current.record_id(),
                                                  "\""))) {
          broken = absl::StrCat("record '", current.record_id(),
                                "': its document_reference is not one line naming "
                                "content/", current.record_id());
          break;
        }
        in_record = true;  // the hasher started over at the record before's end
        received = 0;
        if (!out.Start("content/" + current.record_id())) break;
      } else if (message.has_content()) {
        if (!in_record) {
          broken = "content arrived before its record";
          break;
        }
        received += message.content().size();
        if (received > current.size_bytes()) {
          broken = absl::StrCat("record '", current.record_id(),
                                "': more than its size_bytes arrived");
          break;
        }
        hasher.Update(message.content());
        if (!out.Write(message.content())) break;
      } else if (message.has_page_end()) {
        end_record();
        ended = true;
        next_token = message.page_end().next_page_token();
        if (broken.empty() && message.page_end().record_count() != page_records) {
          broken = absl::StrCat("the page end counts ", message.page_end().record_count(),
                                " records, ", page_records, " arrived");
        }
      } else {
        broken = "a message with nothing in it arrived";
      }
    }
    // Stopped reading before the stream's end: nothing more is wanted from it.
    run.write_failed = broken.empty() && !out.problem().empty();
    if (!broken.empty() || run.write_failed) context.TryCancel();
    const grpc::Status status = reader->Finish();
    if (!broken.empty() || run.write_failed) return run;
    if (!status.ok()) {
      broken = absl::StrCat(StatusText(status), " (after ", run.count, " records in ", run.pages,
                            " pages)");
      return run;
    }
    if (!ended) {
      broken = "the export's page ended without its page_end";
      return run;
    }
    ++run.pages;
    request.set_page_token(next_token);
  } while (!request.page_token().empty());
  return run;
}

// What stopped an export into `out` (an OutDir at --out `out_path`): the message to fail with,
// `part` (e.g. "the patient's vitals: ") before the export's own; empty when nothing did.
std::string StoppedExport(const ExportRun& run, const OutDir& out, const std::string& out_path,
                          absl::string_view part = "") {
  if (run.write_failed) return out.problem();
  if (run.failed.empty()) return "";
  return absl::StrCat(part, run.failed, "; nothing was written to '", out_path, "'");
}

// A patient's records to --out (OutDir): DocumentReference.ndjson, one FHIR R4 DocumentReference a
// line, and each record's content in content/<record_id>.
int ExportRecords(v1::RecordSharing::Stub& stub, const Flags& flags) {
  const std::string out_path = Get(flags, "out");
  OutDir out;
  if (std::string problem = out.Open(out_path); !problem.empty()) return Fail(problem);
  const auto request =
      PatientExportRequest<v1::ExportPatientRecordsRequest>(flags, ExportRequestId(flags));
  std::string index;  // DocumentReference.ndjson, written last
  const ExportRun run = FetchRecords(stub, request, out, &index);
  if (std::string problem = StoppedExport(run, out, out_path); !problem.empty()) {
    return Fail(problem);
  }
  if (!out.Start("DocumentReference.ndjson") || !out.Write(index)) return Fail(out.problem());
  if (std::string problem = out.Commit(); !problem.empty()) return Fail(problem);
  std::printf(
      "records: %llu\nbytes: %llu\npages: %llu\ndirectory: %s\n"
      "format: FHIR R4 DocumentReference, NDJSON, content in content/<record_id>\n"
      "request_id: %s\n",
      static_cast<unsigned long long>(run.count), static_cast<unsigned long long>(run.bytes),
      static_cast<unsigned long long>(run.pages), out_path.c_str(), request.request_id().c_str());
  return 0;
}

// A patient's consents as FHIR R4 Consents, every version a line, to `append`.
ExportRun FetchConsents(v1::Consent::Stub& stub, v1::ExportConsentsRequest request,
                        const Append& append) {
  ExportRun run;
  do {
    grpc::ClientContext context;
    context.set_deadline(Deadline(std::chrono::seconds(10)));
    v1::ExportConsentsResponse response;
    const grpc::Status status = stub.ExportConsents(&context, request, &response);
    if (!status.ok()) {
      run.failed = absl::StrCat(StatusText(status), " (after ", run.count, " consents in ",
                                run.pages, " pages)");
      return run;
    }
    if (!append(response.ndjson())) {
      run.write_failed = true;
      return run;
    }
    run.count += response.consent_count();
    run.versions += response.resource_count();
    ++run.pages;
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return run;
}

// A patient's consents to --out (OutFile).
int ExportConsents(v1::Consent::Stub& stub, const Flags& flags) {
  const auto request =
      PatientExportRequest<v1::ExportConsentsRequest>(flags, ExportRequestId(flags));
  const std::optional<ExportRun> run = ExportToFile(
      flags, [&](const Append& append) { return FetchConsents(stub, request, append); });
  if (!run) return 1;
  std::printf(
      "consents: %llu\nversions: %llu\npages: %llu\nfile: %s\n"
      "format: FHIR R4 Consent (every version), NDJSON\nrequest_id: %s\n",
      static_cast<unsigned long long>(run->count), static_cast<unsigned long long>(run->versions),
      static_cast<unsigned long long>(run->pages), Get(flags, "out").c_str(),
      request.request_id().c_str());
  return 0;
}

// The stubs export-patient calls, one per service holding a part of the patient's data.
struct PatientStubs {
  std::unique_ptr<v1::Consent::Stub> consent;
  std::unique_ptr<v1::DeviceIngest::Stub> ingest;
  std::unique_ptr<v1::RecordSharing::Stub> sharing;
};

// Everything stored of a patient, to --out (OutDir) under one request id: Consent.ndjson (every
// version), Observation.ndjson (every sample), DocumentReference.ndjson and content/<record_id>
// (every record). The directory appears once all three exports succeeded; the three are read one
// after the other, each as its own export command would read it.
int ExportPatient(PatientStubs& stubs, const Flags& flags) {
  const std::string out_path = Get(flags, "out");
  OutDir out;
  if (std::string problem = out.Open(out_path); !problem.empty()) return Fail(problem);
  const std::string request_id = ExportRequestId(flags);
  const Append append = [&out](absl::string_view data) { return out.Write(data); };
  auto stopped = [&](absl::string_view part, const ExportRun& run) {
    return StoppedExport(run, out, out_path, absl::StrCat("the patient's ", part, ": "));
  };

  const auto consents_request = PatientExportRequest<v1::ExportConsentsRequest>(flags, request_id);
  if (!out.Start("Consent.ndjson")) return Fail(out.problem());
  const ExportRun consents = FetchConsents(*stubs.consent, consents_request, append);
  if (std::string problem = stopped("consents", consents); !problem.empty()) return Fail(problem);

  const auto vitals_request = PatientExportRequest<v1::ExportVitalsRequest>(flags, request_id);
  if (!out.Start("Observation.ndjson")) return Fail(out.problem());
  const ExportRun vitals = FetchVitals(*stubs.ingest, vitals_request, append);
  if (std::string problem = stopped("vitals", vitals); !problem.empty()) return Fail(problem);

  const auto records_request =
      PatientExportRequest<v1::ExportPatientRecordsRequest>(flags, request_id);
  std::string index;
  const ExportRun records = FetchRecords(*stubs.sharing, records_request, out, &index);
  if (std::string problem = stopped("records", records); !problem.empty()) return Fail(problem);
  if (!out.Start("DocumentReference.ndjson") || !out.Write(index)) return Fail(out.problem());
  if (std::string problem = out.Commit(); !problem.empty()) return Fail(problem);
  std::printf(
      "consents: %llu\nconsent versions: %llu\nobservations: %llu\nrecords: %llu\nbytes: %llu\n"
      "directory: %s\n"
      "format: FHIR R4, NDJSON: Consent.ndjson (every version), Observation.ndjson, "
      "DocumentReference.ndjson with content in content/<record_id>\n"
      "request_id: %s\n",
      static_cast<unsigned long long>(consents.count),
      static_cast<unsigned long long>(consents.versions),
      static_cast<unsigned long long>(vitals.count),
      static_cast<unsigned long long>(records.count),
      static_cast<unsigned long long>(records.bytes), out_path.c_str(), request_id.c_str());
  return 0;
}

// Numeric flag `name` (0 when absent); false, with a message, when it is not a decimal number of
// at most `max`.
bool NumberFlag(const Flags& flags, const std::string& name, uint64_t max, uint64_t* out) {
  *out = 0;
  auto it = flags.find(name);
  if (it == flags.end() || ParseDecimal(it->second, max, out)) return true;
  Fail(absl::StrCat("--", name, ": a non-negative integer of at most ", max, ", not '", it->second,
                    "'"));
  return false;
}

// --log as an audit log reference; false, with a message, when it is missing.
bool LogFlag(const Flags& flags, v1::AuditLogRef* out) {
  const std::string log = Get(flags, "log");
  if (log.empty()) {
    Fail("--log: a region id (fr-1, ...) or control");
    return false;
  }
  if (log == "control") {
    out->set_control(true);
  } else {
    out->set_region_id(log);
  }
  return true;
}

int VerifyChain(v1::Audit::Stub& stub, const Flags& flags) {
  v1::VerifyChainRequest r;
  if (!LogFlag(flags, r.mutable_log())) return 1;
  uint64_t start = 0, end = 0, anchor = 0;
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (!NumberFlag(flags, "start-seq", kMax, &start) || !NumberFlag(flags, "end-seq", kMax, &end) ||
      !NumberFlag(flags, "anchor-seq", kMax, &anchor)) {
    return 1;
  }
  r.set_start_seq(start);
  r.set_end_seq(end);
  r.set_anchor_seq(anchor);
  std::string hash;
  if (!absl::Base64Unescape(Get(flags, "anchor-hash"), &hash)) {
    return Fail("--anchor-hash: base64, as verify-chain prints last_hash");
  }
  r.set_anchor_hash(hash);
  grpc::ClientContext context;
  // A whole log is walked entry by entry: a generous deadline.
  context.set_deadline(Deadline(std::chrono::seconds(600)));
  v1::VerifyChainResponse response;
  const int printed = Print(stub.VerifyChain(&context, r, &response), response);
  if (printed != 0) return printed;
  if (!response.ok()) return 3;  // the chain is broken: its own exit code
  // The chain verified, but an anchor of it recorded in another log could not be checked.
  return response.recorded_anchor_unavailable().empty() ? 0 : 4;
}

int Run(int argc, char** argv) {
  // Read whole before anything is sent: a command line that says something else than what the
  // operator meant (a dropped flag, `--allow-move false`) must not act.
  absl::StatusOr<CommandLine> line =
      ParseCommandLine(std::vector<std::string>(argv + 1, argv + argc));
  if (!line.ok()) {
    std::fprintf(stderr, "error: %s", std::string(line.status().message()).c_str());
    return 2;
  }
  g_timeout = std::chrono::seconds(line->timeout_seconds);
  const std::string command(line->command->name);
  WatchStopSignals();  // before gRPC starts its threads
  const std::string service(line->command->service);
  const Flags& flags = line->flags;
  MedgateConfig config = LoadConfigOrExit(line->config_path);
  // Beside the CA's certificate (in the working directory when `ca` names no directory).
  const std::filesystem::path pki = std::filesystem::path(config.ca_path).parent_path();
  TlsConfig tls{(pki / (line->identity + ".crt")).string(),
                (pki / (line->identity + ".key")).string(), config.ca_path, 60};
  // A channel to the configured service `name`; null, with the error printed, when there is none.
  auto channel_to = [&](absl::string_view name) -> std::shared_ptr<grpc::Channel> {
    absl::StatusOr<const ServiceEndpoint*> endpoint = config.Service(name);
    absl::StatusOr<std::shared_ptr<grpc::Channel>> made =
        endpoint.ok() ? MakeServiceChannel(**endpoint, tls) : endpoint.status();
    if (made.ok()) return *made;
    std::fprintf(stderr, "error: %s\n", std::string(made.status().message()).c_str());
    return nullptr;
  };
  if (command == "export-patient") {
    PatientStubs stubs;
    std::shared_ptr<grpc::Channel> consent = channel_to("consent");
    std::shared_ptr<grpc::Channel> ingest = consent ? channel_to("ingest") : nullptr;
    std::shared_ptr<grpc::Channel> sharing = ingest ? channel_to("sharing") : nullptr;
    if (sharing == nullptr) return 2;
    stubs.consent = v1::Consent::NewStub(consent);
    stubs.ingest = v1::DeviceIngest::NewStub(ingest);
    stubs.sharing = v1::RecordSharing::NewStub(sharing);
    return ExportPatient(stubs, flags);
  }
  const std::shared_ptr<grpc::Channel> channel = channel_to(service);
  if (channel == nullptr) return 2;
  if (command == "grant-consent") return GrantConsent(*v1::Consent::NewStub(channel), flags);
  if (command == "export-consents") return ExportConsents(*v1::Consent::NewStub(channel), flags);
  if (command == "verify-chain") return VerifyChain(*v1::Audit::NewStub(channel), flags);
  if (command == "rebase-anchor") {
    v1::RebaseAnchorRequest r;
    if (!LogFlag(flags, r.mutable_log())) return 1;
    r.set_reason(Get(flags, "reason"));
    r.set_request_id(Get(flags, "request-id"));
    auto audit = v1::Audit::NewStub(channel);
    return Call(&v1::Audit::Stub::RebaseAnchor, *audit, r);
  }
  if (command == "data-report") {
    v1::PatientDataReportRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.set_patient_id(Get(flags, "patient"));
    auto audit = v1::Audit::NewStub(channel);
    return Call(&v1::Audit::Stub::PatientDataReport, *audit, r);
  }
  if (service == "sharing") {
    auto sharing = v1::RecordSharing::NewStub(channel);
    if (command == "upload-record") return UploadRecord(*sharing, flags);
    if (command == "download-record") return DownloadRecord(*sharing, flags);
    if (command == "export-records") return ExportRecords(*sharing, flags);
    if (command == "erase-record") {
      v1::EraseRecordRequest r;
      r.set_request_id(Get(flags, "request-id"));
      r.set_record_id(Get(flags, "record"));
      r.set_reason(Get(flags, "reason"));
      return Call(&v1::RecordSharing::Stub::EraseRecord, *sharing, r);
    }
  }
  if (command == "erase-vitals") {
    v1::EraseVitalsRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.set_patient_id(Get(flags, "patient"));
    r.set_reason(Get(flags, "reason"));
    grpc::ClientContext context;
    // A patient's years of samples are deleted 10,000 a transaction: a generous deadline.
    context.set_deadline(Deadline(std::chrono::seconds(600)));
    v1::EraseVitalsResponse response;
    return Print(v1::DeviceIngest::NewStub(channel)->EraseVitals(&context, r, &response),
                 response);
  }
  if (command == "export-vitals") {
    return ExportVitals(*v1::DeviceIngest::NewStub(channel), flags);
  }
  auto stub = v1::TenantRouting::NewStub(channel);
  using S = v1::TenantRouting::Stub;
  if (command == "upsert-tenant") {
    v1::UpsertTenantRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.mutable_tenant()->set_tenant_id(Get(flags, "tenant"));
    r.mutable_tenant()->set_display_name(Get(flags, "name"));
    for (const auto& t : List(flags, "territories")) r.mutable_tenant()->add_territories(t);
    for (const auto& id : List(flags, "regions")) r.mutable_tenant()->add_region_ids(id);
    r.mutable_tenant()->set_active(!flags.contains("inactive"));
    r.set_keep_placed_patients(flags.contains("keep-placed-patients"));
    r.set_drop_region_narrowing(flags.contains("drop-region-narrowing"));
    uint64_t expected = 0;
    if (!NumberFlag(flags, "expected-version", std::numeric_limits<int64_t>::max(), &expected)) {
      return 1;
    }
    r.set_expected_version(static_cast<int64_t>(expected));
    return Call(&S::UpsertTenant, *stub, r);
  }
  if (command == "get-tenant") {
    v1::GetTenantRequest r;
    r.set_tenant_id(Get(flags, "tenant"));
    return Call(&S::GetTenant, *stub, r);
  }
  if (command == "put-rule") {
    v1::PutResidencyRuleRequest r;
    r.mutable_rule()->set_territory(Get(flags, "territory"));
    for (const auto& id : List(flags, "regions")) r.mutable_rule()->add_region_ids(id);
    for (const auto& t : List(flags, "readable-from")) r.mutable_rule()->add_readable_from_territories(t);
    uint64_t expected = 0;
    if (!NumberFlag(flags, "expected-version", std::numeric_limits<int64_t>::max(), &expected)) {
      return 1;
    }
    r.set_expected_version(static_cast<int64_t>(expected));
    r.set_keep_placed_patients(flags.contains("keep-placed-patients"));
    return Call(&S::PutResidencyRule, *stub, r);
  }
  if (command == "list-rules") {
    v1::ListResidencyRulesRequest r;
    for (const auto& t : List(flags, "territories")) r.add_territories(t);
    return Call(&S::ListResidencyRules, *stub, r);
  }
  if (command == "list-regions") return Call(&S::ListRegions, *stub, v1::ListRegionsRequest());
  if (command == "place-patient") {
    v1::PlacePatientRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.set_patient_ref(Get(flags, "ref"));
    r.set_territory(Get(flags, "territory"));
    r.set_allow_move(flags.contains("allow-move"));
    return Call(&S::PlacePatient, *stub, r);
  }
  if (command == "assign-device") {
    v1::AssignDeviceRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.set_device_id(Get(flags, "device"));
    r.set_patient_ref(Get(flags, "ref"));
    return Call(&S::AssignDevice, *stub, r);
  }
  if (command == "unassign-device") {
    v1::UnassignDeviceRequest r;
    r.set_request_id(Get(flags, "request-id"));
    r.set_device_id(Get(flags, "device"));
    return Call(&S::UnassignDevice, *stub, r);
  }
  // Every command of Commands() is handled above.
  std::fprintf(stderr, "error: command '%s' is not implemented\n", command.c_str());
  return 2;
}

}  // namespace
}  // namespace medgate::ctl

int main(int argc, char** argv) { return medgate::ctl::Run(argc, argv); }
