// ingest_bench: vitals write throughput and ack latency, measured in one run on one machine and
// one schema: (a) a raw binary COPY client committing 1,000-row transactions (the reference,
// measured before and after (c) on the same growing table, and averaged),
// (b) one INSERT per sample (the naive baseline), (c) medgate end to end over mTLS with many
// device streams; then ack latency at 70% of (c)'s peak, and the process's peak RSS.
//
//   build/release/bench/ingest_bench [--devices 1000] [--batch 50] [--seconds 10] [--streams 0]
//                                    [--load-percent 70] [--lanes N] [--linger-ms N] [--max-rows N]
// --streams N additionally holds N idle device streams open and reports RSS with them.
// --load-percent P measures the ack latency at P% of the peak instead (the target is at 70%).
// --lanes, --linger-ms and --max-rows set the service's writers_per_region, linger_ms and
// max_rows_per_transaction for the run.
#include <libpq-fe.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <pqxx/pqxx>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "libs/common/process.h"
#include "libs/devpki/devpki.h"
#include "libs/identity/credentials.h"
#include "libs/pg/sql_array.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/consent/consent_server.h"
#include "services/routing/routing_server.h"
#include "tests/support/test_stack.h"

extern char** environ;

namespace medgate::bench {
namespace {

struct Args {
  int devices = 1000;
  int batch = 50;
  int seconds = 10;
  int streams = 0;
  int lanes = 0;      // ingest.writers_per_region; 0: the service's default
  int linger_ms = -1; // ingest.linger_ms; -1: the service's default
  int max_rows = 0;   // ingest.max_rows_per_transaction; 0: the service's default
  int load_percent = 70;
};

long StatusKb(const std::string& path, const std::string& key) {
  std::ifstream status(path);
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
  }
  return -1;
}

long PeakRssKb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

// --- (a) raw binary COPY -------------------------------------------------------------------------
void PutU16(std::string& b, uint16_t v) { b.push_back(static_cast<char>(v >> 8)); b.push_back(static_cast<char>(v)); }
void PutU32(std::string& b, uint32_t v) { for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<char>(v >> s)); }
void PutU64(std::string& b, uint64_t v) { for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<char>(v >> s)); }
void PutText(std::string& b, const std::string& s) { PutU32(b, static_cast<uint32_t>(s.size())); b += s; }
void PutI64(std::string& b, int64_t v) { PutU32(b, 8); PutU64(b, static_cast<uint64_t>(v)); }
void PutF64(std::string& b, double d) { uint64_t v; std::memcpy(&v, &d, 8); PutU32(b, 8); PutU64(b, v); }

// Writes `transactions` COPY transactions of 1,000 rows. With `devices` > 1 the rows are those
// medgate stores for the same load: `batch`-row runs of each device in turn, each device with its
// own patient, so the indexes see the same key mix; with one device every row lands on the indexes'
// rightmost pages (PostgreSQL's cheapest insert path).
double RawCopy(const std::string& conninfo, int transactions, int devices, int batch,
               const std::string& prefix) {
  PGconn* conn = PQconnectdb(conninfo.c_str());
  if (PQstatus(conn) != CONNECTION_OK) {
    std::fprintf(stderr, "raw copy: %s\n", PQerrorMessage(conn));
    return 0;
  }
  const int64_t pg_epoch_us = 946684800LL * 1000000;
  std::vector<std::string> device_ids;
  std::vector<std::string> patient_ids;
  for (int d = 0; d < devices; ++d) {
    device_ids.push_back(absl::StrCat(prefix, d));
    patient_ids.push_back(absl::StrCat("pt_", prefix, d));
  }
  std::vector<int64_t> seqs(static_cast<size_t>(devices), 0);
  absl::Time start = absl::Now();
  size_t device = 0;
  int in_run = 0;
  for (int t = 0; t < transactions; ++t) {
    PQclear(PQexec(conn, "BEGIN"));
    PQclear(PQexec(conn, "COPY vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
                         "measured_at, latitude, longitude, accuracy_m) FROM STDIN (FORMAT binary)"));
    std::string buf("PGCOPY\n\377\r\n\0", 11);
    PutU32(buf, 0);
    PutU32(buf, 0);
    const int64_t now_us = absl::ToUnixMicros(absl::Now()) - pg_epoch_us;
    for (int i = 0; i < 1000; ++i) {
      if (in_run == batch) {
        in_run = 0;
        device = (device + 1) % device_ids.size();
      }
      ++in_run;
      const int64_t seq = ++seqs[device];
      PutU16(buf, 11);
      PutText(buf, "bench");
      PutText(buf, device_ids[device]);
      PutI64(buf, seq);
      PutText(buf, patient_ids[device]);
      PutText(buf, "8867-4");
      PutF64(buf, static_cast<double>(60 + seq % 60));
      PutText(buf, "/min");
      PutI64(buf, now_us);
      for (int k = 0; k < 3; ++k) PutU32(buf, 0xffffffff);  // NULL location
    }
    PutU16(buf, 0xffff);
    PQputCopyData(conn, buf.data(), static_cast<int>(buf.size()));
    PQputCopyEnd(conn, nullptr);
    PGresult* r = PQgetResult(conn);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) std::fprintf(stderr, "copy: %s\n", PQerrorMessage(conn));
    PQclear(r);
    PQclear(PQexec(conn, "COMMIT"));
  }
  double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
  PQfinish(conn);
  return transactions * 1000.0 / elapsed;
}

// --- (b) one INSERT per sample -------------------------------------------------------------------
double InsertPerSample(const std::string& conninfo, int samples) {
  pqxx::connection c(conninfo);
  c.prepare("ins", "INSERT INTO vitals (tenant_id, device_id, seq, patient_id, loinc, value, ucum, "
                   "measured_at) VALUES ('bench', 'naive', $1, 'pt_bench_naive', '8867-4', 72, "
                   "'/min', now() - interval '1 minute')");
  // Autocommit: each INSERT is one round trip and one commit, as a naive client's would be (in a
  // pqxx::work, BEGIN and COMMIT were two more round trips a sample, which slowed the baseline).
  pqxx::nontransaction n(c);
  absl::Time start = absl::Now();
  for (int i = 1; i <= samples; ++i) n.exec_prepared0("ins", i);
  return samples / absl::ToDoubleSeconds(absl::Now() - start);
}

// --- (c) medgate end to end ----------------------------------------------------------------------
google::protobuf::Timestamp Ts(absl::Time t) {
  google::protobuf::Timestamp ts;
  ts.set_seconds(absl::ToUnixSeconds(t));
  ts.set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(ts.seconds()))));
  return ts;
}

struct LoadResult {
  uint64_t stored = 0;
  double seconds = 0;
  std::vector<double> latencies_ms;
  std::vector<int> slow_per_second;  // acks over 25 ms, by the second their batch was sent
  uint64_t retryable = 0;
};

// Continues a device's seq across runs so later runs are not duplicates.
struct DeviceIdentity {
  std::string id;
  uint64_t seq = 0;
  uint64_t batch_seq = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::DeviceIngest::Stub> stub;
};

// One device's stream: sends a batch, waits for its ack, sends the next (closed loop); or, when
// `interval` is set, a pacer thread sends each batch at its time (open loop, for latency at a
// fixed load). Reactions never block.
class DeviceLoad final : public grpc::ClientBidiReactor<v1::VitalsBatch, v1::IngestAck> {
 public:
  DeviceLoad(DeviceIdentity& device, int batch, absl::Time until, absl::Duration interval,
             absl::Duration offset, absl::Time measure_from, bool time_first_batch,
             std::atomic<int>& running)
      : batch_size_(batch), until_(until), interval_(interval), measure_from_(measure_from),
        running_(running), batch_seq_(device.batch_seq), seq_(device.seq),
        first_batch_untimed_(!time_first_batch) {
    running_.fetch_add(1);
    device.stub->async()->StreamVitals(&context_, this);
    next_send_ = absl::Now() + offset;
    if (interval_ > absl::ZeroDuration()) {
      // Open loop: devices start spread over one interval, so their batches do not arrive in bursts.
      waiting_ = true;
      due_us_.store(absl::ToUnixMicros(next_send_));
    } else {
      Next();
    }
    StartCall();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) Done();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    std::lock_guard<std::mutex> lock(mu_);
    // A stream's first batch waits for the stream's set-up on both sides.
    const bool untimed = first_batch_untimed_;
    first_batch_untimed_ = false;
    if (!untimed && due_at_ >= measure_from_) {
      latencies_.push_back(absl::ToDoubleMilliseconds(absl::Now() - due_at_));
      if (latencies_.back() > 25) slow_sent_.push_back(due_at_);
    }
    if (ack_.has_retryable_error()) {
      ++retryable_;
    } else {
      stored_ += ack_.stored_count();
    }
    if (absl::Now() >= until_) {
      finishing_ = true;
      StartWritesDone();
      return;
    }
    if (interval_ > absl::ZeroDuration()) {
      next_send_ += interval_;
      waiting_ = true;  // the pacer sends the next batch at next_send_
      due_us_.store(absl::ToUnixMicros(next_send_));
      return;
    }
    Next();
  }
  void OnDone(const grpc::Status&) override { Done(); }
  void Cancel() { context_.TryCancel(); }

  // Called by the pacer thread: sends the next batch when its time has come.
  void Pace(absl::Time now) {
    // The pacer visits every device each millisecond: only a due one takes the lock.
    if (absl::ToUnixMicros(now) < due_us_.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!waiting_ || finishing_ || now < next_send_) return;
    waiting_ = false;
    due_us_.store(std::numeric_limits<int64_t>::max());
    Next();
  }

  uint64_t stored() { std::lock_guard<std::mutex> l(mu_); return stored_; }
  uint64_t retryable() { std::lock_guard<std::mutex> l(mu_); return retryable_; }
  std::vector<double> latencies() { std::lock_guard<std::mutex> l(mu_); return latencies_; }
  std::vector<absl::Time> slow_sent() { std::lock_guard<std::mutex> l(mu_); return slow_sent_; }

 private:
  void Next() {
    batch_.Clear();
    batch_.set_batch_seq(++batch_seq_);
    absl::Time now = absl::Now();
    google::protobuf::Timestamp ts = Ts(now);
    for (int i = 0; i < batch_size_; ++i) {
      v1::VitalSample* s = batch_.add_samples();
      s->set_seq(++seq_);
      s->set_loinc_code("8867-4");
      s->set_value(60 + static_cast<double>(seq_ % 60));
      s->set_ucum_unit("/min");
      *s->mutable_measured_at() = ts;
    }
    // Timed from when the batch was due, not from when it left: with one batch in flight a
    // stream, a late ack delays the next batch, and that wait is latency too (open loop: the
    // pacer's time; closed loop: now).
    due_at_ = interval_ > absl::ZeroDuration() ? std::min(now, next_send_) : now;
    StartRead(&ack_);
    StartWrite(&batch_);
  }
  void Done() {
    std::lock_guard<std::mutex> l(mu_);
    finishing_ = true;
    if (!done_) {
      done_ = true;
      running_.fetch_sub(1);
    }
  }

  grpc::ClientContext context_;
  v1::VitalsBatch batch_;
  v1::IngestAck ack_;
  const int batch_size_;
  const absl::Time until_;
  const absl::Duration interval_;
  const absl::Time measure_from_;  // batches sent earlier are not timed
  std::atomic<int>& running_;
  uint64_t& batch_seq_;  // continued across runs, so a later run is not a resend
  uint64_t& seq_;
  absl::Time due_at_;  // when the batch in flight was due
  absl::Time next_send_;
  std::atomic<int64_t> due_us_{std::numeric_limits<int64_t>::max()};  // next_send_, for the pacer
  std::mutex mu_;
  bool waiting_ = false;
  bool first_batch_untimed_;
  bool finishing_ = false;
  uint64_t stored_ = 0;
  uint64_t retryable_ = 0;
  bool done_ = false;
  std::vector<double> latencies_;
  std::vector<absl::Time> slow_sent_;  // due times of batches acked after more than 25 ms
};

// Latencies count only for batches sent after `warmup` (streams opening, pacing settling) and,
// when there is a warm-up, not for a stream's first batch; the run lasts `warmup + duration`.
LoadResult RunLoad(std::vector<DeviceIdentity>& devices, int batch, absl::Duration duration,
                   absl::Duration interval, absl::Duration warmup = absl::ZeroDuration()) {
  std::atomic<int> running{0};
  std::vector<std::unique_ptr<DeviceLoad>> loads;
  const absl::Time start = absl::Now();
  const absl::Time until = start + warmup + duration;
  for (size_t i = 0; i < devices.size(); ++i) {
    absl::Duration offset = interval * (static_cast<double>(i) / static_cast<double>(devices.size()));
    loads.push_back(std::make_unique<DeviceLoad>(devices[i], batch, until, interval, offset,
                                                 start + warmup,
                                                 /*time_first_batch=*/warmup == absl::ZeroDuration(),
                                                 running));
  }
  while (running.load() > 0 && absl::Now() < until + absl::Seconds(60)) {
    if (interval > absl::ZeroDuration()) {
      absl::Time now = absl::Now();
      for (auto& l : loads) l->Pace(now);
      absl::SleepFor(absl::Milliseconds(1));
    } else {
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  LoadResult result;
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  // Streams still open past the deadline are cancelled; a reactor is freed only after its OnDone.
  for (auto& l : loads) l->Cancel();
  const absl::Time drain = absl::Now() + absl::Seconds(30);
  while (running.load() > 0 && absl::Now() < drain) absl::SleepFor(absl::Milliseconds(10));
  if (running.load() > 0) {
    std::fprintf(stderr, "%d streams did not finish; leaking their reactors\n", running.load());
    for (auto& l : loads) (void)l.release();
    return result;
  }
  for (auto& l : loads) {
    result.stored += l->stored();
    result.retryable += l->retryable();
    auto lat = l->latencies();
    result.latencies_ms.insert(result.latencies_ms.end(), lat.begin(), lat.end());
    for (absl::Time t : l->slow_sent()) {
      size_t second = static_cast<size_t>(std::max(0.0, absl::ToDoubleSeconds(t - start)));
      if (result.slow_per_second.size() <= second) result.slow_per_second.resize(second + 1);
      ++result.slow_per_second[second];
    }
  }
  std::sort(result.latencies_ms.begin(), result.latencies_ms.end());
  return result;
}

// The disk under the shard, probed while a load runs: every 10 ms, one 8 KiB write and its
// fdatasync, on a file of its own in the shard's directory (the same disk). A commit is acked only after
// the WAL's flush, so a flush that stalls here stalls every commit waiting on it: the probe shows
// the floor the disk puts under the ack latency, in the same seconds as the acks.
class DiskProbe {
 public:
  explicit DiskProbe(std::string path) : path_(std::move(path)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~DiskProbe() { Stop(); }

  void Stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    unlink(path_.c_str());
  }
  // Sorted latencies (ms) and, by second since the probe started, the flushes over 25 ms.
  std::vector<double> latencies_ms() const {
    std::vector<double> out = latencies_ms_;
    std::sort(out.begin(), out.end());
    return out;
  }
  const std::vector<int>& slow_per_second() const { return slow_per_second_; }
  const std::string& error() const { return error_; }

 private:
  void Run() {
    const int fd = open(path_.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
      error_ = absl::StrCat("cannot open ", path_, ": ", std::strerror(errno));
      return;
    }
    const std::string block(8192, 'p');
    const absl::Time start = absl::Now();
    for (int i = 0; !stop_.load(); ++i) {
      const absl::Time before = absl::Now();
      if (pwrite(fd, block.data(), block.size(), static_cast<off_t>(i % 128) * 8192) < 0 ||
          fdatasync(fd) != 0) {
        error_ = absl::StrCat("write or fdatasync of ", path_, ": ", std::strerror(errno));
        break;
      }
      const double ms = absl::ToDoubleMilliseconds(absl::Now() - before);
      latencies_ms_.push_back(ms);
      if (ms > 25) {
        const auto second = static_cast<size_t>(absl::ToDoubleSeconds(before - start));
        if (slow_per_second_.size() <= second) slow_per_second_.resize(second + 1);
        ++slow_per_second_[second];
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    close(fd);
  }

  const std::string path_;
  std::atomic<bool> stop_{false};
  std::vector<double> latencies_ms_;
  std::vector<int> slow_per_second_;
  std::string error_;
  std::thread thread_;
};

// Opens every device's TLS connection before anything is measured, and says how long that took.
// False when some are still not ready after `timeout`: figures would then cover fewer devices.
bool ConnectAll(std::vector<DeviceIdentity>& devices, absl::Duration timeout) {
  const absl::Time start = absl::Now();
  int ready = 0;
  while (absl::Now() < start + timeout) {
    ready = 0;
    for (DeviceIdentity& d : devices) {
      if (d.channel->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_READY) ++ready;
    }
    if (ready == static_cast<int>(devices.size())) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::fprintf(stderr, "%d of %zu device connections ready in %.1f s\n", ready, devices.size(),
               absl::ToDoubleSeconds(absl::Now() - start));
  return ready == static_cast<int>(devices.size());
}

// The value of `key` in a one-line JSON object of scalars (the service's log lines).
std::string JsonField(const std::string& line, const std::string& key) {
  const std::string marker = absl::StrCat("\"", key, "\":");
  size_t at = line.find(marker);
  if (at == std::string::npos) return "";
  at += marker.size();
  if (at < line.size() && line[at] == '"') {
    const size_t end = line.find('"', at + 1);
    return end == std::string::npos ? "" : line.substr(at + 1, end - at - 1);
  }
  const size_t end = line.find_first_of(",}", at);
  return line.substr(at, end == std::string::npos ? std::string::npos : end - at);
}

double Pct(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(p * sorted.size()))];
}

int Run(const Args& args) {
  // Each stream is a TLS connection (two descriptors in this process: client and server end).
  rlimit files{};
  getrlimit(RLIMIT_NOFILE, &files);
  files.rlim_cur = files.rlim_max;
  setrlimit(RLIMIT_NOFILE, &files);
  if (std::getenv("MEDGATE_PG_TMPDIR") == nullptr) setenv("MEDGATE_PG_TMPDIR", "/var/tmp", 1);
  std::fprintf(stderr, "starting PostgreSQL servers (under %s) and services...\n",
               std::getenv("MEDGATE_PG_TMPDIR"));
  auto stack = test_support::TestStack::Start(
      {"routing", "consent", "ingest"},
      absl::StrCat("ingest: {tenant_samples_per_second: 10000000, tenant_burst: 10000000, "
                   "stats_interval_ms: 1000",
                   args.lanes > 0 ? absl::StrCat(", writers_per_region: ", args.lanes) : "",
                   args.linger_ms >= 0 ? absl::StrCat(", linger_ms: ", args.linger_ms) : "",
                   args.max_rows > 0 ? absl::StrCat(", max_rows_per_transaction: ", args.max_rows) : "",
                   "}\n"
                   "limits: {drain_seconds: 1, max_concurrent_streams: 20000}\n"));
  if (!stack.ok()) {
    std::fprintf(stderr, "%s\n", std::string(stack.status().message()).c_str());
    return 1;
  }
  auto& pki = (*stack)->pki();
  const std::string shard = (*stack)->clusters().region("fr-1").ConnectionString();
  const std::string control = (*stack)->clusters().control().ConnectionString();
  // The test harness runs PostgreSQL without durability and with 32 MB of shared buffers; a write
  // benchmark runs on what production has: durable commits, and memory and WAL for the load (the
  // harness's max_wal_size of 64 MB would force a checkpoint every second or two under it).
  for (test_support::PgCluster* cluster :
       {&(*stack)->clusters().region("fr-1"), &(*stack)->clusters().control()}) {
    if (absl::Status s = cluster->UseProductionSettings({}); !s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  absl::StatusOr<std::string> shard_settings = (*stack)->clusters().region("fr-1").DescribeSettings();
  if (!shard_settings.ok()) {
    std::fprintf(stderr, "%s\n", std::string(shard_settings.status().message()).c_str());
    return 1;
  }

  std::fprintf(stderr, "(a) raw binary COPY, 1,000-row transactions...\n");
  const double raw_before = RawCopy(shard, 300, args.devices, args.batch, "ra-");
  double raw_one_device = RawCopy(shard, 300, 1, args.batch, "r1-");
  std::fprintf(stderr, "(b) one INSERT per sample...\n");
  double naive = InsertPerSample(shard, 3000);

  auto routing = *routing::RoutingServer::Create((*stack)->config());
  if (!routing->Start().ok()) return 1;
  (*stack)->SetAddress("routing", routing->port());
  auto consent = *consent::ConsentServer::Create((*stack)->config());
  if (!consent->Start().ok()) return 1;
  (*stack)->SetAddress("consent", consent->port());
  // The ingest service runs as its own process, as in production, so its memory is its own.
  const int ingest_port = (*stack)->ReservePort("ingest");
  const std::string config_path = (*stack)->dir() + "/medgate.yaml";
  if (!(*stack)->WriteConfig(config_path).ok()) return 1;
  const std::string ingest_log = (*stack)->dir() + "/ingest.log";
  pid_t ingest_pid = 0;
  {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 2, ingest_log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    std::string binary = MEDGATE_INGEST_BINARY;
    std::vector<char*> argv = {binary.data(), const_cast<char*>("--config"),
                               const_cast<char*>(config_path.c_str()), nullptr};
    if (posix_spawn(&ingest_pid, binary.c_str(), &actions, nullptr, argv.data(), environ) != 0) {
      std::fprintf(stderr, "cannot start %s\n", binary.c_str());
      return 1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  const std::string ingest_status = absl::StrCat("/proc/", ingest_pid, "/status");

  // The bench tenant, its patients, devices and consents, seeded with SQL for speed.
  {
    auto ops = v1::TenantRouting::NewStub(*MakeChannel(
        absl::StrCat("127.0.0.1:", routing->port()),
        TlsConfig{pki.ops().cert_path, pki.ops().key_path, pki.ca_path(), 60},
        pki.SpiffeId("/service/routing")));
    v1::UpsertTenantRequest r;
    r.mutable_tenant()->set_tenant_id("bench");
    r.mutable_tenant()->set_display_name("bench");
    r.mutable_tenant()->add_territories("FR");
    r.mutable_tenant()->set_active(true);
    v1::UpsertTenantResponse response;
    grpc::ClientContext context;
    if (!ops->UpsertTenant(&context, r, &response).ok()) return 1;
  }
  const int total_devices = std::max(args.devices, args.streams);
  std::vector<std::string> ids;
  for (int i = 0; i < total_devices; ++i) ids.push_back(absl::StrCat("bd-", i));
  {
    pqxx::connection c(control);
    pqxx::work w(c);
    w.exec_params0("INSERT INTO patients (patient_id, tenant_id, territory, region_id, rule_version) "
                   "SELECT 'pt_' || d, 'bench', 'FR', 'fr-1', 1 FROM unnest($1::text[]) d",
                   pg::TextArrayLiteral(ids));
    w.exec_params0("INSERT INTO devices (tenant_id, device_id, patient_id) "
                   "SELECT 'bench', d, 'pt_' || d FROM unnest($1::text[]) d", pg::TextArrayLiteral(ids));
    w.commit();
    pqxx::connection s(shard);
    pqxx::work ws(s);
    ws.exec_params0("INSERT INTO consents (consent_id, patient_id, tenant_id, purpose, actor) "
                    "SELECT 'cs_' || d, 'pt_' || d, 'bench', 'REMOTE_MONITORING', '' FROM unnest($1::text[]) d",
                    pg::TextArrayLiteral(ids));
    ws.exec_params0("INSERT INTO consent_versions (consent_id, version, state, valid_from, evidence_ref, "
                    "reason, recorded_by, recorded_at, request_id) SELECT 'cs_' || d, 1, 'granted', "
                    "now() - interval '1 day', 'bench', '', 'bench', now(), 'bench' FROM unnest($1::text[]) d",
                    pg::TextArrayLiteral(ids));
    ws.commit();
  }
  std::fprintf(stderr, "issuing %d device certificates...\n", total_devices);
  auto ca = devpki::Credential::FromPem(pki.ca().cert_pem, pki.ca().key_pem);
  if (!ca.ok()) return 1;
  std::vector<DeviceIdentity> devices;
  for (const std::string& id : ids) {
    devpki::LeafOptions leaf;
    leaf.common_name = id;
    leaf.uri_sans = {pki.SpiffeId(absl::StrCat("/tenant/bench/device/", id))};
    auto cred = devpki::IssueLeaf(*ca, leaf);
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = pki.ca_pem();
    ssl.pem_cert_chain = *cred->CertPem();
    ssl.pem_private_key = *cred->KeyPem();
    grpc::ChannelArguments channel_args;
    channel_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    // As the device SDK's channels (libs/identity/credentials.h, ChannelOptions::bdp_probe).
    channel_args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    DeviceIdentity d;
    d.id = id;
    d.channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", ingest_port),
                                          grpc::SslCredentials(ssl), channel_args);
    d.stub = v1::DeviceIngest::NewStub(d.channel);
    devices.push_back(std::move(d));
  }
  std::vector<DeviceIdentity> load_devices;
  for (int i = 0; i < args.devices; ++i) load_devices.push_back(std::move(devices[static_cast<size_t>(i)]));

  std::fprintf(stderr, "(c) medgate end to end: %d devices, batches of %d, %ds...\n", args.devices,
               args.batch, args.seconds);
  // Every device's connection is open before the clock starts: a TLS handshake per device is
  // paid once in production, not per batch.
  if (!ConnectAll(load_devices, absl::Seconds(300))) return 1;
  // Warm-up: streams, caches.
  uint64_t acked_stored = RunLoad(load_devices, args.batch, absl::Seconds(2), absl::ZeroDuration()).stored;
  // Checkpoints (started by WAL volume or time) slow the shard while they run: each phase reports
  // how many started during it.
  auto checkpoints = [&shard] {
    pqxx::connection c(shard);
    pqxx::nontransaction n(c);
    return n.exec1("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")[0].as<long>();
  };
  const long checkpoints_before_peak = checkpoints();
  LoadResult peak = RunLoad(load_devices, args.batch, absl::Seconds(args.seconds), absl::ZeroDuration());
  acked_stored += peak.stored;
  const long checkpoints_in_peak = checkpoints() - checkpoints_before_peak;
  if (peak.stored == 0) {
    std::fprintf(stderr, "ingest_bench: (c) stored no sample (%llu retryable acks); the service's "
                 "log is above\n", static_cast<unsigned long long>(peak.retryable));
    return 1;
  }
  double peak_rate = peak.stored / peak.seconds;
  // The closed-loop peak leaves up to a second of queued batches behind: they drain first.
  absl::SleepFor(absl::Seconds(3));
  // 70% of peak (or --load-percent), open loop: each device sends a batch every `interval`.
  const double load = args.load_percent / 100.0;
  double per_device_batches = load * peak_rate / args.batch / args.devices;
  absl::Duration interval = absl::Seconds(1.0 / std::max(per_device_batches, 0.01));
  std::fprintf(stderr, "latency at %d%% of peak (%.0f samples/s)...\n", args.load_percent,
               load * peak_rate);
  // The 70% run starts on a drained service (above). Its first second (1,000 streams opening at
  // once) is not timed, nor is any device's first batch (at a low load the devices' first batches
  // are spread over an interval longer than that second).
  const absl::Duration at70_warmup = absl::Seconds(1);
  const absl::Time at70_start = absl::Now() + at70_warmup;
  const long checkpoints_before_at70 = checkpoints();
  DiskProbe disk(
      (std::filesystem::path((*stack)->clusters().region("fr-1").log_path()).parent_path() /
       "medgate_disk_probe").string());
  LoadResult at70 =
      RunLoad(load_devices, args.batch, absl::Seconds(args.seconds), interval, at70_warmup);
  const absl::Time at70_end = absl::Now();
  acked_stored += at70.stored;
  disk.Stop();
  const long checkpoints_in_at70 = checkpoints() - checkpoints_before_at70;

  std::fprintf(stderr, "acks over 25 ms at %d%%, by second of the run:", args.load_percent);
  for (int n : at70.slow_per_second) std::fprintf(stderr, " %d", n);
  std::fprintf(stderr, "\nthe disk's fdatasyncs over 25 ms, by the same seconds:");
  for (int n : disk.slow_per_second()) std::fprintf(stderr, " %d", n);
  std::fprintf(stderr, "\n");
  // (a) again, on the table as (c) left it: rows go into ever larger indexes, so a reference taken
  // only before (c) would favour it. The reference is the mean of the two, which bracket (c).
  absl::SleepFor(absl::Seconds(1));
  std::fprintf(stderr, "(a) again, after (c)...\n");
  const double raw_after = RawCopy(shard, 300, args.devices, args.batch, "rb-");
  const double raw = (raw_before + raw_after) / 2;
  // The ingest process's peak through (c) and the latency run, before the streams' phase resets it.
  const long ingest_peak_kb = StatusKb(ingest_status, "VmHWM:");
  long rss_streams = -1;          // the peak from the streams' connection to the end of the hold
  long rss_streams_sampled = -1;  // the most a sampler saw while they were held
  LoadResult held;
  if (args.streams > 0) {
    std::fprintf(stderr, "holding %d concurrent device streams...\n", args.streams);
    std::vector<DeviceIdentity> idle(std::make_move_iterator(devices.begin() + args.devices),
                                     std::make_move_iterator(devices.end()));
    for (auto& d : load_devices) idle.push_back(std::move(d));
    idle.resize(static_cast<size_t>(args.streams));
    // The verdict is on the process's peak from here on (VmHWM, reset now): the connection storm
    // of 10,000 handshakes and the hold, with nothing a sampler could miss between two samples.
    {
      std::ofstream clear(absl::StrCat("/proc/", ingest_pid, "/clear_refs"));
      clear << "5";
      clear.flush();
      if (!clear) {
        std::fprintf(stderr, "ingest_bench: cannot reset the ingest process's peak RSS "
                             "(/proc/%d/clear_refs)\n", static_cast<int>(ingest_pid));
        return 1;
      }
    }
    if (!ConnectAll(idle, absl::Seconds(600))) return 1;
    // RSS while the streams are open, sampled every 100 ms, for information.
    std::atomic<bool> holding{true};
    std::atomic<long> held_rss_kb{0};
    std::thread sampler([&] {
      while (holding.load()) {
        held_rss_kb.store(std::max(held_rss_kb.load(), StatusKb(ingest_status, "VmRSS:")));
        absl::SleepFor(absl::Milliseconds(100));
      }
    });
    // Every stream sends a one-sample batch every 5 s for 15 s; 9,000 of the devices are new to
    // the service, as after a restart of it with a fleet reconnecting.
    held = RunLoad(idle, 1, absl::Seconds(15), absl::Seconds(5));
    acked_stored += held.stored;
    holding.store(false);
    sampler.join();
    rss_streams_sampled = held_rss_kb.load();
    rss_streams = StatusKb(ingest_status, "VmHWM:");
  }

  // The samples/s above come from acks: every sample acked as stored must be in the shard (a
  // stream cancelled at a run's end may have had a batch committed whose ack it never read).
  int64_t rows_stored = 0;
  {
    pqxx::connection c(shard);
    pqxx::nontransaction n(c);
    rows_stored = n.exec1("SELECT count(*) FROM vitals WHERE tenant_id = 'bench' AND "
                          "device_id LIKE 'bd-%'")[0].as<int64_t>();
  }
  if (rows_stored < static_cast<int64_t>(acked_stored)) {
    std::fprintf(stderr, "ingest_bench: %llu samples were acked as stored, but the shard holds %lld\n",
                 static_cast<unsigned long long>(acked_stored), static_cast<long long>(rows_stored));
    return 1;
  }
  std::printf("\ningest_bench (same machine, same schema, one run; PostgreSQL on disk: %s)\n",
              shard_settings->c_str());
  std::printf("  (a) raw binary COPY, 1,000-row transactions : %10.0f samples/s  (reference: the rows (c) "
              "stores, %d devices x %d-row runs; mean of %.0f before (c) and %.0f after)\n",
              raw, args.devices, args.batch, raw_before, raw_after);
  std::printf("      same, all rows of one device            : %10.0f samples/s  (for information: "
              "rightmost-page index inserts)\n", raw_one_device);
  std::printf("  (b) one INSERT per sample                  : %10.0f samples/s  (naive baseline)\n", naive);
  std::printf("  (c) medgate end to end, %5d devices, mTLS : %10.0f samples/s  (%d-sample batches, %.0fs)\n",
              args.devices, peak_rate, args.batch, peak.seconds);
  std::printf("      acked as stored over every phase: %llu; rows in the shard: %lld (checked: none "
              "acked is missing)\n", static_cast<unsigned long long>(acked_stored),
              static_cast<long long>(rows_stored));
  // Three decimals and a verdict: a ratio just under its target must not read as meeting it.
  const double over_raw = peak_rate / raw;
  const double over_naive = peak_rate / naive;
  std::printf("  ratio (c)/(a) = %.3f   (target >= 1.0: %s)\n", over_raw,
              over_raw >= 1.0 ? "met" : "NOT met");
  std::printf("  ratio (c)/(b) = %.1f   (target >= 50: %s)\n", over_naive,
              over_naive >= 50 ? "met" : "NOT met");
  const double p99_at_load = Pct(at70.latencies_ms, 0.99);
  // The target is for 70% of peak: a run at another load gets no verdict.
  const char* p99_verdict =
      args.load_percent != 70 ? "no verdict at this load" : p99_at_load <= 25 ? "met" : "NOT met";
  std::printf("  ack latency at %d%% of peak: p50 %.1f ms, p99 %.1f ms  (target p99 <= 25 ms at "
              "70%%: %s; %zu acks, %llu retryable)\n",
              args.load_percent, Pct(at70.latencies_ms, 0.5), p99_at_load, p99_verdict,
              at70.latencies_ms.size(), static_cast<unsigned long long>(at70.retryable));
  std::printf("  ack latency at peak:        p50 %.1f ms, p99 %.1f ms\n", Pct(peak.latencies_ms, 0.5),
              Pct(peak.latencies_ms, 0.99));
  std::printf("  (each ack timed from when its batch was due; the %d%% run stored %.0f samples/s "
              "over its %.1f s, warm-up included, for %.0f intended)\n",
              args.load_percent, at70.stored / at70.seconds, at70.seconds, load * peak_rate);
  {
    // The floor under the ack latency: an ack waits for its commit's WAL flush.
    const std::vector<double> flushes = disk.latencies_ms();
    const auto over = static_cast<long>(
        flushes.end() - std::upper_bound(flushes.begin(), flushes.end(), 25.0));
    if (!disk.error().empty() || flushes.empty()) {
      std::printf("  the shard's disk during the %d%% run: not measured (%s)\n", args.load_percent,
                  disk.error().c_str());
    } else {
      std::printf("  the shard's disk during the %d%% run (8 KiB write + fdatasync every 10 ms): "
                  "p50 %.1f ms, p99 %.1f ms, max %.1f ms, %ld of %zu over 25 ms  (the floor: an ack "
                  "waits for its commit's flush)\n",
                  args.load_percent, Pct(flushes, 0.5), Pct(flushes, 0.99), flushes.back(), over,
                  flushes.size());
    }
  }
  std::printf("  checkpoints started during (c): %ld, during the %d%% run: %ld\n", checkpoints_in_peak,
              args.load_percent, checkpoints_in_at70);
  std::printf("  peak RSS of the ingest process: %.0f MiB (load generator process: %.0f MiB)\n",
              ingest_peak_kb / 1024.0, PeakRssKb() / 1024.0);
  if (rss_streams >= 0) {
    // The target is for 10,000 streams: a run with another count gets no verdict.
    const double rss_mib = rss_streams / 1024.0;
    const char* rss_verdict =
        args.streams != 10000 ? "no verdict for this count" : rss_mib <= 1024 ? "met" : "NOT met";
    std::printf("  peak RSS of the ingest process connecting and holding %d concurrent device "
                "streams: %.0f MiB  (target <= 1024 MiB with 10,000: %s; sampled while held: "
                "%.0f MiB)\n",
                args.streams, rss_mib, rss_verdict, rss_streams_sampled / 1024.0);
    std::printf("    those streams, a one-sample batch every 5 s each for 15 s: %zu acks, p50 %.1f ms, "
                "p99 %.1f ms\n", held.latencies_ms.size(), Pct(held.latencies_ms, 0.5),
                Pct(held.latencies_ms, 0.99));
  }
  std::fflush(stdout);
  kill(ingest_pid, SIGTERM);
  int wstatus = 0;
  waitpid(ingest_pid, &wstatus, 0);
  {
    // The writers' own account of their transactions (size and where the time went), and the
    // ack latency the service measured itself.
    std::ifstream log(ingest_log);
    std::string line;
    std::vector<std::string> p50s;
    std::vector<std::string> p99s;
    double worst_p99 = 0;
    while (std::getline(log, line)) {
      if (line.find("vitals_writer_stats") != std::string::npos) std::fprintf(stderr, "%s\n", line.c_str());
      // The service's own ack latency (batch read -> ack handed to gRPC), one line a second:
      // those whose whole second lies in the 70% run.
      absl::Time ts;
      double p50 = 0;
      double p99 = 0;
      if (line.find("ingest_ack_latency") != std::string::npos &&
          absl::ParseTime(absl::RFC3339_full, JsonField(line, "ts"), &ts, nullptr) &&
          ts >= at70_start + absl::Milliseconds(1500) && ts <= at70_end &&
          absl::SimpleAtod(JsonField(line, "p50_ms"), &p50) &&
          absl::SimpleAtod(JsonField(line, "p99_ms"), &p99)) {
        p50s.push_back(absl::StrCat(static_cast<int>(p50 + 0.5)));
        p99s.push_back(absl::StrCat(static_cast<int>(p99 + 0.5)));
        worst_p99 = std::max(worst_p99, p99);
      }
    }
    std::printf("  ack latency inside medgate-ingest at %d%% (batch read -> ack sent), by second:\n"
                "    p50 ms: %s\n    p99 ms: %s  (worst second %.1f ms)\n",
                args.load_percent, absl::StrJoin(p50s, " ").c_str(),
                absl::StrJoin(p99s, " ").c_str(), worst_p99);
  }
  consent->Shutdown();
  routing->Shutdown();
  return 0;
}

}  // namespace
}  // namespace medgate::bench

int main(int argc, char** argv) {
  medgate::ConfigureProcess();
  medgate::bench::Args args;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    int value = std::stoi(argv[i + 1]);
    if (flag == "--devices") args.devices = value;
    else if (flag == "--batch") args.batch = value;
    else if (flag == "--seconds") args.seconds = value;
    else if (flag == "--streams") args.streams = value;
    else if (flag == "--lanes") args.lanes = value;
    else if (flag == "--linger-ms") args.linger_ms = value;
    else if (flag == "--max-rows") args.max_rows = value;
    else if (flag == "--load-percent") args.load_percent = std::clamp(value, 1, 100);
  }
  return medgate::bench::Run(args);
}
