// medgate-devsim: simulates N connected devices of a tenant streaming vitals at a rate for a
// duration, through the device SDK, with a live progress line and a final summary.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "libs/common/config.h"
#include "libs/common/latency_histogram.h"
#include "libs/common/process.h"
#include "libs/device_sdk/device_client.h"
#include "libs/devpki/devpki.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"

namespace medgate::devsim {
namespace {

constexpr char kUsage[] = R"(usage: medgate-devsim --config FILE [--tenant demo] [--devices 20] [--rate 5]
                     [--duration 10] [--batch 10] [--state DIR]
  Simulates --devices devices of --tenant, each sending --rate heart-rate samples per second in
  batches of --batch, for --duration seconds. On first use it issues, from the dev CA next to the
  configured CA, the devices' certificates and, unless the dev PKI's app certificate is
  --tenant's, an app certificate of --tenant (spiffe://<trust domain>/tenant/<tenant>/app/devsim);
  on every start it places one patient per device, assigns the device and records
  REMOTE_MONITORING consent, as that app (all idempotent). Certificates and buffers live under
  --state (default <config dir>/devsim)/<trust domain>/<tenant>. Prints a progress line every
  second and a summary at the end; exits 1 unless every sample was acked and stored (the
  simulated samples are all valid: a rejection, e.g. for want of consent, means the stack is not
  working as it should, and the reasons are printed, as is the last error of devices left with
  unacked batches).
)";

// Digits only (no sign, space or trailing junk), within an int.
bool ParseWhole(absl::string_view text, int* out) {
  return !text.empty() && std::all_of(text.begin(), text.end(), absl::ascii_isdigit) &&
         absl::SimpleAtoi(text, out);
}

// Digits with at most one decimal point: no sign, exponent, space, "inf" or "nan".
bool ParseDecimal(absl::string_view text, double* out) {
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return absl::ascii_isdigit(c) || c == '.'; }) &&
         std::count(text.begin(), text.end(), '.') <= 1 && absl::SimpleAtod(text, out);
}

struct Args {
  std::string config;
  std::string tenant = "demo";
  int devices = 20;
  double rate = 5;
  int duration = 10;
  int batch = 10;
  std::string state;
};

google::protobuf::Timestamp Now() {
  absl::Time t = absl::Now();
  google::protobuf::Timestamp ts;
  ts.set_seconds(absl::ToUnixSeconds(t));
  ts.set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(t - absl::FromUnixSeconds(ts.seconds()))));
  return ts;
}

template <typename Stub>
std::unique_ptr<Stub> Connect(const ServiceEndpoint& service, const TlsConfig& tls) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeServiceChannel(service, tls);
  if (!channel.ok()) {
    std::fprintf(stderr, "cannot connect to %s: %s\n", service.address.c_str(),
                 std::string(channel.status().message()).c_str());
    return nullptr;
  }
  return std::make_unique<Stub>(*channel);
}

// `name`'s certificate and key in `dir`, for spiffe://<trust domain>`path`: issued by the dev CA
// on first use, kept for the next runs. Nothing when they cannot be issued (said on stderr).
std::optional<TlsConfig> Certificate(const devpki::Credential& ca, const std::string& dir,
                                     const std::string& name, const MedgateConfig& config,
                                     const std::string& path) {
  const std::string cert = absl::StrCat(dir, "/", name, ".crt");
  const std::string key = absl::StrCat(dir, "/", name, ".key");
  // Kept while the current CA signed it and it is valid for a day more; otherwise (the dev PKI
  // made anew, a year gone by, files missing or unreadable) issued again.
  absl::StatusOr<devpki::Credential> kept_leaf = devpki::Credential::ReadFiles(cert, key);
  if (!kept_leaf.ok() ||
      !devpki::CheckIssuedBy(*kept_leaf, ca, absl::Now() + absl::Hours(24)).ok()) {
    devpki::LeafOptions leaf;
    leaf.common_name = name;
    leaf.uri_sans = {absl::StrCat("spiffe://", config.trust_domain, path)};
    absl::StatusOr<devpki::Credential> issued = devpki::IssueLeaf(ca, leaf);
    const absl::Status kept = issued.ok() ? issued->WriteFiles(cert, key) : issued.status();
    if (!kept.ok()) {
      std::fprintf(stderr, "cannot issue a certificate for %s: %s\n", name.c_str(),
                   std::string(kept.message()).c_str());
      return std::nullopt;
    }
  }
  return TlsConfig{cert, key, config.ca_path, 60};
}

// Each enrolment call may take this long.
constexpr absl::Duration kCallDeadline = absl::Seconds(10);

// Places the device's patient, assigns the device, records consent. Each step is idempotent (the
// grant's request id is the device's, so a second run records no new consent version), and all
// of them run on every start: a run stopped half-way is completed by the next.
bool Enroll(const MedgateConfig& config, const TlsConfig& app, const std::string& device) {
  auto routing_endpoint = config.Service("routing");
  if (!routing_endpoint.ok()) {
    std::fprintf(stderr, "%s\n", std::string(routing_endpoint.status().message()).c_str());
    return false;
  }
  auto routing = Connect<v1::TenantRouting::Stub>(**routing_endpoint, app);
  if (routing == nullptr) return false;
  v1::PlacePatientRequest place;
  place.set_patient_ref(absl::StrCat("sim-patient-", device));
  place.set_territory("FR");
  v1::PlacePatientResponse placed;
  grpc::ClientContext c1;
  c1.set_deadline(absl::ToChronoTime(absl::Now() + kCallDeadline));
  grpc::Status s = routing->PlacePatient(&c1, place, &placed);
  if (!s.ok()) {
    std::fprintf(stderr, "place patient for %s: %s\n", device.c_str(), s.error_message().c_str());
    return false;
  }
  v1::AssignDeviceRequest assign;
  assign.set_device_id(device);
  assign.set_patient_ref(place.patient_ref());
  v1::AssignDeviceResponse assigned;
  grpc::ClientContext c2;
  c2.set_deadline(absl::ToChronoTime(absl::Now() + kCallDeadline));
  s = routing->AssignDevice(&c2, assign, &assigned);
  if (!s.ok()) {
    std::fprintf(stderr, "assign %s: %s\n", device.c_str(), s.error_message().c_str());
    return false;
  }
  auto consent_endpoint = config.Service("consent");
  if (!consent_endpoint.ok()) return true;  // no consent service configured
  auto consent = Connect<v1::Consent::Stub>(**consent_endpoint, app);
  if (consent == nullptr) return false;
  v1::GrantConsentRequest grant;
  grant.set_request_id(absl::StrCat("devsim-consent-", device));
  grant.set_patient_id(placed.patient_id());
  grant.set_purpose(v1::PURPOSE_REMOTE_MONITORING);
  grant.set_evidence_ref("devsim");
  v1::GrantConsentResponse granted;
  grpc::ClientContext c3;
  c3.set_deadline(absl::ToChronoTime(absl::Now() + kCallDeadline));
  s = consent->GrantConsent(&c3, grant, &granted);
  if (!s.ok()) {
    std::fprintf(stderr, "consent for %s: %s\n", device.c_str(), s.error_message().c_str());
    return false;
  }
  return true;
}

int Run(const Args& args) {
  MedgateConfig config = LoadConfigOrExit(args.config);
  // The dev PKI's files, beside the CA's certificate (in the working directory when `ca` names
  // no directory).
  const std::filesystem::path pki_dir = std::filesystem::path(config.ca_path).parent_path();
  auto in_pki = [&pki_dir](const char* name) { return (pki_dir / name).string(); };
  const std::string state = args.state.empty()
      ? (std::filesystem::path(args.config).parent_path() / "devsim").string() : args.state;
  absl::StatusOr<devpki::Credential> ca =
      devpki::Credential::ReadFiles(in_pki("ca.crt"), in_pki("ca.key"));
  if (!ca.ok()) {
    std::fprintf(stderr, "the dev CA is needed to issue device and app certificates: %s\n",
                 std::string(ca.status().message()).c_str());
    return 2;
  }
  auto ingest = config.Service("ingest");
  if (!ingest.ok()) {
    std::fprintf(stderr, "%s\n", std::string(ingest.status().message()).c_str());
    return 2;
  }

  // Declared before the clients, so destroyed after them: a client's ack callback uses them.
  std::mutex latency_mu;
  // Bounded whatever the run's length: percentiles are read as their bucket's upper bound (at
  // most 19% above the true value).
  LatencyHistogram latencies;
  std::atomic<uint64_t> retryable{0};
  std::map<std::string, uint64_t> rejected_by_reason;  // under latency_mu
  std::atomic<uint64_t> rejected_whole{0};  // samples of the batches refused whole
  std::vector<std::unique_ptr<device::DeviceClient>> devices;
  // Certificates and buffers per tenant and trust domain: a device of another run's tenant is
  // another device.
  const std::string device_dir =
      absl::StrCat(state, "/", config.trust_domain, "/", args.tenant);
  std::error_code made;
  std::filesystem::create_directories(device_dir, made);
  if (made) {
    std::fprintf(stderr, "--state: cannot make the directory '%s': %s\n", device_dir.c_str(),
                 made.message().c_str());
    return 2;
  }
  std::error_code ignored;
  if (std::filesystem::exists(state + "/certs", ignored)) {
    std::fprintf(stderr, "devsim: %s/certs and %s/sim-*.buffer are an earlier version's and are "
                 "not used (the devices are now under %s); remove them once nothing there is "
                 "still to send\n", state.c_str(), state.c_str(), device_dir.c_str());
  }
  // The devices are enrolled by an app of their own tenant: the routing service takes the
  // tenant of a patient placed, or a device assigned, from the caller's certificate. The dev
  // PKI's app enrolls its own tenant's, as it always has: a consent grant is repeated, not
  // recorded again, only by the app that recorded it, so another app would undo a withdrawal.
  // Another tenant's devices are enrolled by an app of theirs issued here.
  std::optional<TlsConfig> app;
  absl::StatusOr<devpki::Credential> pki_app =
      devpki::Credential::ReadFiles(in_pki("app.crt"), in_pki("app.key"));
  const std::string app_prefix =
      absl::StrCat("spiffe://", config.trust_domain, "/tenant/", args.tenant, "/app/");
  if (pki_app.ok() && absl::c_any_of(pki_app->UriSans(), [&](const std::string& uri) {
        return absl::StartsWith(uri, app_prefix);
      })) {
    app = TlsConfig{in_pki("app.crt"), in_pki("app.key"), config.ca_path, 60};
  } else {
    app = Certificate(*ca, device_dir, "app", config,
                      absl::StrCat("/tenant/", args.tenant, "/app/devsim"));
  }
  if (!app) return 1;
  for (int i = 0; i < args.devices; ++i) {
    const std::string id = absl::StrCat("sim-", i);
    const std::optional<TlsConfig> tls =
        Certificate(*ca, device_dir, id, config, absl::StrCat("/tenant/", args.tenant, "/device/", id));
    if (!tls) return 1;
    if (!Enroll(config, *app, id)) return 1;
    device::DeviceOptions options;
    options.address = (*ingest)->address;
    options.server_identity = (*ingest)->identity;
    options.tls = *tls;
    options.buffer_path = absl::StrCat(device_dir, "/", id, ".buffer");
    absl::StatusOr<std::unique_ptr<device::DeviceClient>> client = device::DeviceClient::Open(options);
    if (!client.ok()) {
      std::fprintf(stderr, "%s: %s\n", id.c_str(), std::string(client.status().message()).c_str());
      return 1;
    }
    (*client)->OnAck([&](const v1::IngestAck& ack, absl::Duration latency) {
      if (ack.has_retryable_error()) {
        retryable.fetch_add(1);
        return;
      }
      std::lock_guard<std::mutex> lock(latency_mu);
      latencies.Record(latency);
      for (const v1::SampleRejection& r : ack.rejections()) {
        ++rejected_by_reason[std::string(
            absl::StripPrefix(v1::RejectReason_Name(r.reason()), "REJECT_REASON_"))];
      }
    });
    (*client)->OnRejected([&](const v1::VitalsBatch& batch, const absl::Status& why) {
      std::lock_guard<std::mutex> lock(latency_mu);
      rejected_by_reason[absl::StrCat("batch refused whole (", why.message(), ")")] +=
          static_cast<uint64_t>(batch.samples_size());
      rejected_whole.fetch_add(static_cast<uint64_t>(batch.samples_size()));
    });
    (*client)->Start();
    devices.push_back(*std::move(client));
  }

  // Each device produces samples at the rate, sealed into batches of args.batch.
  const absl::Duration batch_every = absl::Seconds(args.batch / std::max(args.rate, 0.001));
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Seconds(args.duration);
  std::mt19937 rng(42);
  std::normal_distribution<double> heart(72, 8);
  uint64_t produced = 0;
  uint64_t refused = 0;  // samples a device's SDK did not take (its buffer full or unwritable)
  std::string refused_why;
  absl::Time next_batch = start;
  absl::Time next_print = start + absl::Seconds(1);
  while (absl::Now() < end) {
    absl::Time now = absl::Now();
    if (now >= next_batch) {
      for (auto& d : devices) {
        std::vector<v1::VitalSample> samples;
        for (int k = 0; k < args.batch; ++k) {
          v1::VitalSample s;
          s.set_loinc_code("8867-4");
          s.set_ucum_unit("/min");
          s.set_value(std::clamp(std::round(heart(rng)), 40.0, 180.0));
          *s.mutable_measured_at() = Now();
          samples.push_back(std::move(s));
        }
        if (absl::StatusOr<uint64_t> sent = d->Send(std::move(samples)); sent.ok()) {
          produced += static_cast<uint64_t>(args.batch);
        } else {
          refused += static_cast<uint64_t>(args.batch);
          refused_why = std::string(sent.status().message());
        }
      }
      next_batch += batch_every;
    }
    if (now >= next_print) {
      // Samples the server answered: stored, duplicates, and rejected (alone or with their batch).
      uint64_t acked = rejected_whole.load();
      size_t pending = 0;
      for (auto& d : devices) {
        const device::DeviceStats s = d->stats();
        acked += s.samples_stored + s.samples_duplicate + s.samples_rejected;
        pending += d->pending();
      }
      std::fprintf(stderr, "\r[%3.0fs] devices %d  produced %llu  acked %llu  unacked batches %zu  retries %llu   ",
                   absl::ToDoubleSeconds(now - start), args.devices,
                   static_cast<unsigned long long>(produced), static_cast<unsigned long long>(acked),
                   pending, static_cast<unsigned long long>(retryable.load()));
      next_print += absl::Seconds(1);
    }
    absl::SleepFor(std::min(next_batch, next_print) - absl::Now());
  }
  std::fprintf(stderr, "\n");
  // One deadline for all of them, not 30 s each in turn.
  const absl::Time drain_deadline = absl::Now() + absl::Seconds(30);
  bool drained = true;
  for (auto& d : devices) {
    drained = d->WaitUntilAcked(std::max(absl::ZeroDuration(), drain_deadline - absl::Now())).ok() &&
              drained;
  }
  device::DeviceStats total;
  // Devices left with unacked batches, by their last error: why they were not acked.
  std::map<std::string, int> unacked_by_error;
  for (auto& d : devices) {
    d->Stop();
    device::DeviceStats s = d->stats();
    if (d->pending() > 0) {
      ++unacked_by_error[!s.last_stream_error.empty()  ? s.last_stream_error
                         : !s.last_dial_error.empty() ? absl::StrCat("cannot connect: ",
                                                                      s.last_dial_error)
                                                      : "none reported"];
    }
    total.batches_sent += s.batches_sent;
    total.batches_acked += s.batches_acked;
    total.batches_rejected += s.batches_rejected;
    total.samples_stored += s.samples_stored;
    total.samples_duplicate += s.samples_duplicate;
    total.samples_rejected += s.samples_rejected;
    total.retries += s.retries;
  }
  const LatencyHistogram::Summary latency = latencies.TakeSummary();
  std::printf("devsim summary: devices=%d duration=%ds samples_produced=%llu batches_sent=%llu "
              "batches_acked=%llu batches_rejected=%llu stored=%llu duplicates=%llu rejected=%llu "
              "retries=%llu "
              "refused_by_sdk=%llu ack_latency_p50=%.2fms ack_latency_p99=%.2fms all_acked=%s\n",
              args.devices, args.duration, static_cast<unsigned long long>(produced),
              static_cast<unsigned long long>(total.batches_sent),
              static_cast<unsigned long long>(total.batches_acked),
              static_cast<unsigned long long>(total.batches_rejected),
              static_cast<unsigned long long>(total.samples_stored),
              static_cast<unsigned long long>(total.samples_duplicate),
              // Rejected alone (in an ack) or with their batch (refused whole).
              static_cast<unsigned long long>(total.samples_rejected + rejected_whole.load()),
              static_cast<unsigned long long>(total.retries),
              static_cast<unsigned long long>(refused), latency.p50_ms, latency.p99_ms,
              drained ? "yes" : "no");
  for (const auto& [error, n] : unacked_by_error) {
    std::fprintf(stderr, "devsim: %d devices still have unacked batches; their last error: %s\n",
                 n, error.c_str());
  }
  if (refused > 0) {
    std::fprintf(stderr, "devsim: %llu samples were not taken by the device SDK: %s\n",
                 static_cast<unsigned long long>(refused), refused_why.c_str());
  }
  uint64_t rejected = 0;
  {
    std::lock_guard<std::mutex> lock(latency_mu);
    for (const auto& [reason, n] : rejected_by_reason) {
      std::fprintf(stderr, "devsim: %llu samples rejected: %s\n",
                   static_cast<unsigned long long>(n), reason.c_str());
      rejected += n;
    }
  }
  return drained && refused == 0 && rejected == 0 ? 0 : 1;
}

}  // namespace
}  // namespace medgate::devsim

int main(int argc, char** argv) {
  medgate::ConfigureProcess();
  medgate::devsim::Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    std::string* text = nullptr;
    int* whole = nullptr;
    double* decimal = nullptr;
    if (flag == "--config") text = &args.config;
    else if (flag == "--tenant") text = &args.tenant;
    else if (flag == "--devices") whole = &args.devices;
    else if (flag == "--rate") decimal = &args.rate;
    else if (flag == "--duration") whole = &args.duration;
    else if (flag == "--batch") whole = &args.batch;
    else if (flag == "--state") text = &args.state;
    if (text == nullptr && whole == nullptr && decimal == nullptr) {
      std::fprintf(stderr, "devsim: unknown %s '%s'\n%s",
                   absl::StartsWith(flag, "--") ? "flag" : "argument", flag.c_str(),
                   medgate::devsim::kUsage);
      return 2;
    }
    // Every flag takes a value: one missing is refused rather than the default silently used.
    if (i + 1 == argc || absl::StartsWith(argv[i + 1], "--")) {
      std::fprintf(stderr, "devsim: %s needs a value\n%s", flag.c_str(), medgate::devsim::kUsage);
      return 2;
    }
    const std::string value = argv[++i];
    bool parsed = true;
    if (text != nullptr) *text = value;
    if (whole != nullptr) parsed = medgate::devsim::ParseWhole(value, whole);
    if (decimal != nullptr) parsed = medgate::devsim::ParseDecimal(value, decimal);
    if (!parsed) {
      std::fprintf(stderr, "devsim: cannot use %s '%s'\n%s", flag.c_str(), value.c_str(),
                   medgate::devsim::kUsage);
      return 2;
    }
  }
  if (args.config.empty() || args.devices < 1 || args.devices > 5000 || args.batch < 1 ||
      args.batch > 1000 || args.duration < 1 || !std::isfinite(args.rate) || args.rate <= 0) {
    std::fputs(medgate::devsim::kUsage, stderr);
    return 2;
  }
  return medgate::devsim::Run(args);
}
