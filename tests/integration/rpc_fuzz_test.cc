// Random requests to every RPC of the routing, consent, sharing, audit and ingest services, over
// mTLS and real PostgreSQL, as every kind of caller (GDPR art. 32's "regular testing"; OWASP API
// 1, 4, 5).
// Each request is a message of the method's request type filled through reflection with values a
// developer or an attacker may send: the ids of real objects of two tenants, empty, long and
// awkward strings (quotes, wildcards, control and bidirectional characters, NUL), extreme numbers,
// unknown enum values, large repeated fields, sometimes with its bytes damaged afterwards.
//
// Whatever the request, the answer is the caller's (OK, or a status a client can act on, with a
// message saying why), never a server error (INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE...), and
// the services go on: afterwards every audit chain verifies and a well-formed call works.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "libs/crypto/sha256.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/audit.grpc.pb.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/ingest.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "medgate/v1/sharing.grpc.pb.h"
#include "services/ingest/ingest_server.h"
#include "services/sharing/sharing_server.h"
#include "tests/support/directory_services.h"
#include "tests/support/fuzz.h"
#include "tests/support/poll.h"
#include "tests/support/tenants.h"
#include "tests/support/test_stack.h"

namespace medgate {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;
using test_support::TestCert;

constexpr char kKekHex[] = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

// A method under test: its path, whether its client sends a stream, and the port it is served on.
struct Method {
  std::string path;
  std::string service;  // the service identity its server presents ("routing", "audit", ...)
  const Descriptor* request;
  bool client_streaming;
  int port;
};

// What one call got: its status and how many messages came back.
struct Answer {
  grpc::Status status;
  int messages = 0;
};

// Calls `path` with `requests` as raw bytes (a unary call is one message on the same wire) and
// reads every answer, at most 10,000 messages.
Answer CallRaw(const std::shared_ptr<grpc::Channel>& channel, const std::string& path,
               const std::vector<std::string>& requests) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&context, path, &cq);
  const auto step = [&cq](intptr_t tag) {
    void* got = nullptr;
    bool ok = false;
    if (!cq.Next(&got, &ok)) return false;
    EXPECT_EQ(reinterpret_cast<intptr_t>(got), tag);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  bool open = step(1);
  for (const std::string& bytes : requests) {
    if (!open) break;
    grpc::Slice slice(bytes);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, reinterpret_cast<void*>(2));
    open = step(2);
  }
  if (open) {
    call->WritesDone(reinterpret_cast<void*>(3));
    step(3);
  }
  Answer answer;
  grpc::ByteBuffer reply;
  while (answer.messages < 10'000) {
    call->Read(&reply, reinterpret_cast<void*>(4));
    if (!step(4)) break;
    ++answer.messages;
  }
  call->Finish(&answer.status, reinterpret_cast<void*>(5));
  step(5);
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
  return answer;
}

// The objects the random requests name, by the field names that hold them.
struct Objects {
  std::vector<std::string> patients;  // ids
  std::vector<std::string> patient_refs;
  std::vector<std::string> records;
  std::vector<std::string> grants;
  std::vector<std::string> consents;
  std::vector<std::string> devices;
  std::vector<std::string> tenants;
  std::vector<std::string> practitioners;  // SPIFFE ids
  std::vector<std::string> others;         // SPIFFE ids of other kinds
  std::vector<std::string> territories;
  std::vector<std::string> regions;
  std::vector<std::string> codes;  // LOINC
  std::vector<std::string> units;  // UCUM
};

// Strings a caller may send: for a field whose name says what it holds, a real object of that
// kind; otherwise, or when `hostile`, empty, long and awkward strings, and real ids altered.
class RandomStrings {
 public:
  // Adds `more` to the objects requests name (the same id twice is picked twice as often).
  void Add(const Objects& more) {
    const auto add = [this](std::vector<std::string>& to, const std::vector<std::string>& from) {
      to.insert(to.end(), from.begin(), from.end());
      all_.insert(all_.end(), from.begin(), from.end());
    };
    add(objects_.patients, more.patients);
    add(objects_.patient_refs, more.patient_refs);
    add(objects_.records, more.records);
    add(objects_.grants, more.grants);
    add(objects_.consents, more.consents);
    add(objects_.devices, more.devices);
    add(objects_.tenants, more.tenants);
    add(objects_.practitioners, more.practitioners);
    add(objects_.others, more.others);
    add(objects_.territories, more.territories);
    add(objects_.regions, more.regions);
    add(objects_.codes, more.codes);
    add(objects_.units, more.units);
  }

  std::string For(const FieldDescriptor& field, bool hostile, std::mt19937_64& rng) const {
    using testing::Uniform;
    // Not UTF-8: the request does not parse (rarely, as protobuf logs each one it writes).
    if (Uniform(rng, 0, 400) == 0) return "\xff" + Pick(all_, rng);
    if (!hostile) {
      if (const std::vector<std::string>* kind = KindOf(field.name())) return Pick(*kind, rng);
      if (field.name() == "request_id") return absl::StrCat("fuzz-", rng() % 100'000);
      if (field.name() == "page_token") return "";
      if (absl::StrContains(field.name(), "reason")) return "the patient is unconscious in A&E";
      return "plain words";
    }
    static const std::vector<std::string> kAwkward = {
        "", " ", "'", "\"", "\\", "%", "_", "*", "'; DROP TABLE records; --", "{a,b}", "NULL",
        "\n", "\t", "\x01", std::string("\0", 1), std::string("a\0b", 3), "\xc3\xa9",
        "\xe2\x80\xae" "fdp.exe", "\xf0\x9d\x84\x9e", "../../etc/passwd", "-1", "0", "1e309",
        "2026-12-03T00:00:00Z", "fr-1", "FR", "fr", "XX", "eu-1,de-1"};
    const std::string id = Pick(all_, rng);
    switch (Uniform(rng, 0, 7)) {
      case 0:
        return id;  // a real id of another kind
      case 1:
        return Pick(kAwkward, rng);
      case 2: {  // a real id with one character changed, cut or doubled
        std::string s = id;
        if (s.empty()) return s;
        const size_t at = Uniform(rng, 0, s.size() - 1);
        switch (Uniform(rng, 0, 2)) {
          case 0:
            s[at] = static_cast<char>(Uniform(rng, 0x20, 0x7e));
            break;
          case 1:
            s.resize(at);
            break;
          default:
            s.insert(at, 1, s[at]);
        }
        return s;
      }
      case 3:
        return std::string(Uniform(rng, 0, 3) == 0 ? Uniform(rng, 1'000, 70'000)
                                                   : Uniform(rng, 60, 300),
                           static_cast<char>(Uniform(rng, 'a', 'z')));
      case 4:
        return absl::StrCat(id, Pick(kAwkward, rng));
      case 5: {
        std::string s(Uniform(rng, 1, 40), ' ');
        for (char& c : s) c = static_cast<char>(Uniform(rng, 0x20, 0x7e));
        return s;
      }
      case 6:
        return absl::AsciiStrToUpper(id);
      default:
        return absl::StrCat(" ", id);
    }
  }

 private:
  static const std::string& Pick(const std::vector<std::string>& from, std::mt19937_64& rng) {
    return from[testing::Uniform(rng, 0, from.size() - 1)];
  }

  // The objects a field of this name holds, or nullptr.
  const std::vector<std::string>* KindOf(const std::string& name) const {
    if (absl::StrContains(name, "patient_ref")) return &objects_.patient_refs;
    if (absl::StrContains(name, "patient")) return &objects_.patients;
    if (absl::StrContains(name, "record")) return &objects_.records;
    if (absl::StrContains(name, "grant_id")) return &objects_.grants;
    if (absl::StrContains(name, "consent")) return &objects_.consents;
    if (absl::StrContains(name, "device")) return &objects_.devices;
    if (absl::StrContains(name, "tenant")) return &objects_.tenants;
    if (name == "grantee" || name == "actor" || name == "owner") return &objects_.practitioners;
    if (absl::StrContains(name, "territor")) return &objects_.territories;
    if (absl::StrContains(name, "region")) return &objects_.regions;
    if (absl::StrContains(name, "loinc")) return &objects_.codes;
    if (absl::StrContains(name, "ucum")) return &objects_.units;
    return nullptr;
  }

  Objects objects_;
  std::vector<std::string> all_;
};

int64_t RandomInteger(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  using testing::Uniform;
  switch (Uniform(rng, 0, 5)) {
    case 0:
      return lo;
    case 1:
      return hi;
    case 2:
      return 0;
    case 3:
      return -1 < lo ? 1 : -1;
    case 4:
      return static_cast<int64_t>(Uniform(rng, 0, 100));
    default:
      return static_cast<int64_t>(rng());
  }
}

double RandomDouble(std::mt19937_64& rng) {
  static const double kValues[] = {0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324,
                                   std::numeric_limits<double>::quiet_NaN(),
                                   std::numeric_limits<double>::infinity(),
                                   -std::numeric_limits<double>::infinity()};
  return kValues[testing::Uniform(rng, 0, std::size(kValues) - 1)];
}

// Fills `message`, nested messages down to `depth` levels. A plausible request sets nine fields
// in ten with values of the kind each holds (ids of real objects, known enum values, small
// counts, times around now); a hostile one sets two thirds of them with anything.
void Fill(Message& message, std::mt19937_64& rng, const RandomStrings& strings, bool hostile,
          int depth) {
  using testing::Uniform;
  const Descriptor* d = message.GetDescriptor();
  const Reflection* r = message.GetReflection();
  if (d->full_name() == "google.protobuf.Timestamp" && !hostile) {
    const int64_t now = absl::ToUnixSeconds(absl::Now());
    // Mostly ahead (expiries), some behind (measurements, ranges).
    r->SetInt64(&message, d->FindFieldByName("seconds"),
                now + static_cast<int64_t>(Uniform(rng, 0, 40 * 86400)) - 10 * 86400);
    return;
  }
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (hostile ? Uniform(rng, 0, 2) == 0 : Uniform(rng, 0, 9) == 0) continue;
    if (f->containing_oneof() != nullptr && r->HasOneof(message, f->containing_oneof())) continue;
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && depth <= 0) continue;
    // Each field of a plausible request may still be hostile, one in twenty.
    const bool wild = hostile || Uniform(rng, 0, 19) == 0;
    const int n = !f->is_repeated()                   ? 1
                  : wild && Uniform(rng, 0, 9) == 0   ? static_cast<int>(Uniform(rng, 5, 400))
                                                      : static_cast<int>(Uniform(rng, 0, 3));
    for (int k = 0; k < n; ++k) {
      const bool add = f->is_repeated();
      switch (f->cpp_type()) {
        case FieldDescriptor::CPPTYPE_INT32: {
          const auto v = static_cast<int32_t>(wild ? RandomInteger(rng, INT32_MIN, INT32_MAX)
                                                   : static_cast<int64_t>(Uniform(rng, 0, 50)));
          add ? r->AddInt32(&message, f, v) : r->SetInt32(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_INT64: {
          const int64_t v = wild ? RandomInteger(rng, INT64_MIN, INT64_MAX)
                                 : static_cast<int64_t>(Uniform(rng, 0, 50));
          add ? r->AddInt64(&message, f, v) : r->SetInt64(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_UINT32: {
          const auto v = static_cast<uint32_t>(wild ? RandomInteger(rng, 0, UINT32_MAX)
                                                    : static_cast<int64_t>(Uniform(rng, 0, 50)));
          add ? r->AddUInt32(&message, f, v) : r->SetUInt32(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_UINT64: {
          const uint64_t v = wild ? static_cast<uint64_t>(RandomInteger(rng, 0, INT64_MAX)) *
                                        (Uniform(rng, 0, 3) == 0 ? 2 : 1)
                                  : Uniform(rng, 0, 50);
          add ? r->AddUInt64(&message, f, v) : r->SetUInt64(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_DOUBLE: {
          const double v = wild ? RandomDouble(rng) : static_cast<double>(Uniform(rng, 0, 200));
          add ? r->AddDouble(&message, f, v) : r->SetDouble(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_FLOAT: {
          const auto v = static_cast<float>(wild ? RandomDouble(rng) : Uniform(rng, 0, 200));
          add ? r->AddFloat(&message, f, v) : r->SetFloat(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_BOOL: {
          const bool v = Uniform(rng, 0, 1) == 1;
          add ? r->AddBool(&message, f, v) : r->SetBool(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_ENUM: {
          // A known value (but the unset 0 when plausible); proto3 enums also carry numbers no
          // version defines.
          const google::protobuf::EnumDescriptor* e = f->enum_type();
          int v = e->value(static_cast<int>(Uniform(rng, 0, e->value_count() - 1)))->number();
          if (wild && Uniform(rng, 0, 2) == 0) {
            v = static_cast<int>(RandomInteger(rng, INT32_MIN, INT32_MAX));
          } else if (!wild && v == 0 && e->value_count() > 1) {
            v = e->value(1)->number();
          }
          add ? r->AddEnumValue(&message, f, v) : r->SetEnumValue(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_STRING: {
          std::string v;
          if (f->type() == FieldDescriptor::TYPE_BYTES) {
            v.resize(!wild || Uniform(rng, 0, 1) == 0 ? 32 : Uniform(rng, 0, 64));
            for (char& c : v) c = static_cast<char>(rng());
          } else {
            v = strings.For(*f, wild, rng);
          }
          add ? r->AddString(&message, f, v) : r->SetString(&message, f, v);
          break;
        }
        case FieldDescriptor::CPPTYPE_MESSAGE: {
          Message* child = add ? r->AddMessage(&message, f) : r->MutableMessage(&message, f);
          Fill(*child, rng, strings, hostile, depth - 1);
          break;
        }
      }
    }
  }
}

// The request's bytes, damaged one time in five: a byte changed, the end cut, bytes appended.
std::string Damage(std::string bytes, std::mt19937_64& rng) {
  using testing::Uniform;
  if (Uniform(rng, 0, 4) != 0) return bytes;
  switch (Uniform(rng, 0, 2)) {
    case 0:
      if (!bytes.empty()) bytes[Uniform(rng, 0, bytes.size() - 1)] = static_cast<char>(rng());
      break;
    case 1:
      bytes.resize(Uniform(rng, 0, bytes.size()));
      break;
    default:
      for (uint64_t n = Uniform(rng, 1, 8); n > 0; --n) bytes += static_cast<char>(rng());
  }
  return bytes;
}

// A status that says the server failed, not the request. UNIMPLEMENTED is the documented
// answer of PlacePatient with allow_move (moves are not offered yet) and a server error anywhere
// else: every method called here is served.
bool IsServerError(const std::string& method, grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNIMPLEMENTED:
      return method != "/medgate.v1.TenantRouting/PlacePatient";
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::DATA_LOSS:
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::CANCELLED:
      return true;
    default:
      return false;
  }
}

class RpcFuzzTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kek_path_ = new std::string(std::filesystem::temp_directory_path() /
                                ("medgate-fuzz-kek-" + std::to_string(getpid())));
    std::ofstream(*kek_path_) << kKekHex << "\n";
    std::filesystem::permissions(*kek_path_, std::filesystem::perms::owner_read |
                                                 std::filesystem::perms::owner_write);
    auto stack = test_support::TestStack::Start(
        {"routing", "consent", "sharing", "audit", "ingest"},
        absl::StrCat("sharing:\n  kek_file: ", *kek_path_, "\n"));
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = stack->release();
    auto directory = test_support::DirectoryServices::Start(*stack_);
    ASSERT_TRUE(directory.ok()) << directory.status();
    directory_ = directory->release();
    for (const auto& [tenant, territories] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{{"acme", {"FR", "DE"}},
                                                                       {"globex", {"FR"}}}) {
      grpc::Status made = test_support::UpsertTenant(stack_->pki(), directory_->routing().port(),
                                                     tenant, territories, true);
      ASSERT_TRUE(made.ok()) << made.error_message();
    }
    auto sharing = sharing::SharingServer::Create(stack_->config());
    ASSERT_TRUE(sharing.ok()) << sharing.status();
    sharing_ = sharing->release();
    ASSERT_TRUE(sharing_->Start().ok());
    stack_->SetAddress("sharing", sharing_->port());
    stack_->SetAddress("audit", sharing_->audit_port());
    auto ingest = ingest::IngestServer::Create(stack_->config());
    ASSERT_TRUE(ingest.ok()) << ingest.status();
    ingest_ = ingest->release();
    ASSERT_TRUE(ingest_->Start().ok());
    ASSERT_TRUE(test_support::PollUntil(absl::Now() + absl::Seconds(30), [] {
      return sharing_->consent_cache().FeedListening("fr-1");
    }));
  }

  static void TearDownTestSuite() {
    if (ingest_ != nullptr) ingest_->Shutdown();
    delete ingest_;
    if (sharing_ != nullptr) sharing_->Shutdown();
    delete sharing_;
    delete directory_;
    delete stack_;
    if (kek_path_ != nullptr) std::filesystem::remove(*kek_path_);
    delete kek_path_;
    delete rules_;
  }

  static std::string Id(const std::string& path) { return stack_->pki().SpiffeId(path); }

  static std::shared_ptr<grpc::Channel> Channel(int port, const TestCert& cert,
                                                const std::string& service) {
    auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port),
                               TlsConfig{cert.cert_path, cert.key_path,
                                         stack_->pki().ca_path(), 60},
                               Id("/service/" + service));
    EXPECT_TRUE(channel.ok()) << channel.status();
    return *channel;
  }
  static std::shared_ptr<grpc::Channel> Routing(const TestCert& as) {
    return Channel(directory_->routing().port(), as, "routing");
  }
  static std::shared_ptr<grpc::Channel> Consent(const TestCert& as) {
    return Channel(directory_->consent().port(), as, "consent");
  }

  // The objects the random requests name: a patient of acme in FR with CARE and RECORD_SHARING
  // consents, its device, one record, a grant of it to another practitioner of acme.
  // Sets up the objects the requests name, as generation `generation`. The first records the
  // residency rules; every later one first puts back the tenants and rules the requests may have
  // changed. Each places a new patient of each tenant, grants the acme patient's consents,
  // assigns it a device, uploads and shares a record.
  static Objects Seed(int generation) {
    test_support::TestPki& pki = stack_->pki();
    Objects out;
    const std::string g = absl::StrCat("-", generation);
    if (generation == 0) {
      v1::ListResidencyRulesRequest list;
      list.set_page_size(100);
      v1::ListResidencyRulesResponse listed;
      grpc::ClientContext context;
      grpc::Status s = v1::TenantRouting::NewStub(Routing(pki.ops()))
                           ->ListResidencyRules(&context, list, &listed);
      EXPECT_TRUE(s.ok()) << s.error_message();
      EXPECT_TRUE(listed.next_page_token().empty());
      rules_ = new std::vector<v1::ResidencyRule>(listed.rules().begin(), listed.rules().end());
    }
    bool tenant_changed = false;
    for (const auto& [tenant, territories] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{{"acme", {"FR", "DE"}},
                                                                       {"globex", {"FR"}}}) {
      v1::GetTenantRequest get;
      get.set_tenant_id(tenant);
      v1::GetTenantResponse got;
      grpc::ClientContext context;
      grpc::Status s =
          v1::TenantRouting::NewStub(Routing(pki.ops()))->GetTenant(&context, get, &got);
      if (s.ok() && got.tenant().active() && got.tenant().region_ids().empty() &&
          std::vector<std::string>(got.tenant().territories().begin(),
                                   got.tenant().territories().end()) == territories) {
        continue;
      }
      grpc::Status made = test_support::UpsertTenant(stack_->pki(), directory_->routing().port(),
                                                     tenant, territories, true);
      EXPECT_TRUE(made.ok()) << made.error_message();
      tenant_changed = true;
    }
    // A suspended tenant is let in again once the services' cached answers expire (2 s).
    if (tenant_changed && generation > 0) absl::SleepFor(absl::Milliseconds(2500));
    for (const v1::ResidencyRule& rule : *rules_) {
      v1::PutResidencyRuleRequest put;
      put.set_request_id(absl::StrCat("fuzz-rule-", rule.territory(), g));
      *put.mutable_rule() = rule;
      put.set_keep_placed_patients(true);
      v1::PutResidencyRuleResponse answer;
      grpc::ClientContext context;
      grpc::Status s = v1::TenantRouting::NewStub(Routing(pki.ops()))
                           ->PutResidencyRule(&context, put, &answer);
      EXPECT_TRUE(s.ok()) << rule.territory() << ": " << s.error_message();
    }
    v1::PlacePatientRequest place;
    // A new patient each time: a consent the requests revoked is granted again on a new patient,
    // as a consent keeps at most 99 versions.
    place.set_patient_ref("fuzz-patient" + g);
    place.set_territory("FR");
    v1::PlacePatientResponse placed;
    {
      grpc::ClientContext context;
      grpc::Status s = v1::TenantRouting::NewStub(Routing(pki.app()))
                           ->PlacePatient(&context, place, &placed);
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    const std::string patient = placed.patient_id();
    std::vector<std::string> consent_ids;
    for (v1::Purpose purpose : {v1::PURPOSE_CARE, v1::PURPOSE_RECORD_SHARING,
                                v1::PURPOSE_REMOTE_MONITORING}) {
      v1::GrantConsentRequest grant;
      grant.set_request_id(absl::StrCat("fuzz-consent-", static_cast<int>(purpose), g));
      grant.set_patient_id(patient);
      grant.set_purpose(purpose);
      grant.set_evidence_ref("signed-form-1");
      v1::GrantConsentResponse granted;
      grpc::ClientContext context;
      grpc::Status s =
          v1::Consent::NewStub(Consent(pki.app()))->GrantConsent(&context, grant, &granted);
      EXPECT_TRUE(s.ok()) << s.error_message();
      consent_ids.push_back(granted.consent_id());
    }
    {
      v1::AssignDeviceRequest assign;
      assign.set_request_id("fuzz-assign" + g);
      assign.set_device_id("dev-1");
      assign.set_patient_ref("fuzz-patient" + g);
      v1::AssignDeviceResponse assigned;
      grpc::ClientContext context;
      grpc::Status s = v1::TenantRouting::NewStub(Routing(pki.app()))
                           ->AssignDevice(&context, assign, &assigned);
      // Later, the device may have been given to another patient by a request.
      if (generation == 0) {
        EXPECT_TRUE(s.ok()) << s.error_message();
      }
    }
    const std::string content = "discharge letter: nothing to report";
    v1::UploadRecordResponse uploaded;
    {
      grpc::ClientContext context;
      auto stub = v1::RecordSharing::NewStub(Channel(sharing_->port(), pki.practitioner(),
                                                     "sharing"));
      auto writer = stub->UploadRecord(&context, &uploaded);
      v1::UploadRecordRequest header;
      header.mutable_header()->set_request_id("fuzz-upload" + g);
      header.mutable_header()->set_patient_id(patient);
      header.mutable_header()->set_kind(v1::RECORD_KIND_DOCUMENT);
      header.mutable_header()->set_content_type("text/plain");
      header.mutable_header()->set_file_name("letter.txt");
      header.mutable_header()->set_size_bytes(content.size());
      header.mutable_header()->set_sha256(crypto::Sha256::Of(content));
      v1::UploadRecordRequest chunk;
      chunk.mutable_chunk()->set_data(content);
      EXPECT_TRUE(writer->Write(header) && writer->Write(chunk));
      writer->WritesDone();
      grpc::Status s = writer->Finish();
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    v1::ShareRecordResponse shared;
    {
      v1::ShareRecordRequest share;
      share.set_record_id(uploaded.record_id());
      share.set_grantee(Id("/tenant/acme/practitioner/p-2"));
      share.mutable_expires_at()->set_seconds(absl::ToUnixSeconds(absl::Now() + absl::Hours(1)));
      grpc::ClientContext context;
      grpc::Status s = v1::RecordSharing::NewStub(Channel(sharing_->port(), pki.practitioner(),
                                                          "sharing"))
                           ->ShareRecord(&context, share, &shared);
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    v1::PlacePatientResponse other;
    {
      // A patient of the other tenant, whose id acme's callers may send.
      grpc::ClientContext context;
      place.set_patient_ref("fuzz-globex-patient" + g);
      grpc::Status s = v1::TenantRouting::NewStub(Routing(pki.globex_app()))
                           ->PlacePatient(&context, place, &other);
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    out.patients = {patient, other.patient_id()};
    out.patient_refs = {"fuzz-patient" + g, "fuzz-globex-patient" + g, "fuzz-new-patient" + g};
    out.records = {uploaded.record_id()};
    out.grants = {shared.grant_id()};
    out.consents = consent_ids;
    out.devices = {"dev-1", "dev-2"};
    out.tenants = {"acme", "globex", "initech"};
    out.practitioners = {Id("/tenant/acme/practitioner/p-1"), Id("/tenant/acme/practitioner/p-2"),
                         Id("/tenant/globex/practitioner/p-1")};
    // Identities of other kinds, sent as ids of other kinds are.
    out.others = {Id("/tenant/acme/device/dev-1"), Id("/ops/alice"), Id("/service/sharing")};
    out.territories = {"FR", "DE", "US"};
    out.regions = {"fr-1", "de-1", "eu-1"};
    out.codes = {"8867-4", "59408-5", "8480-6", "2339-0", "15074-8"};
    out.units = {"/min", "%", "mm[Hg]", "mg/dL", "mmol/L"};
    return out;
  }

  static std::vector<Method> Methods() {
    std::vector<Method> methods;
    const auto add = [&](const google::protobuf::ServiceDescriptor* service,
                         const std::string& identity, int port) {
      for (int i = 0; i < service->method_count(); ++i) {
        const google::protobuf::MethodDescriptor* m = service->method(i);
        methods.push_back(Method{absl::StrCat("/", service->full_name(), "/", m->name()),
                                 identity, m->input_type(), m->client_streaming(), port});
      }
    };
    add(google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            v1::TenantRouting::service_full_name()),
        "routing", directory_->routing().port());
    add(google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            v1::Consent::service_full_name()),
        "consent", directory_->consent().port());
    add(google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            v1::RecordSharing::service_full_name()),
        "sharing", sharing_->port());
    add(google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            v1::Audit::service_full_name()),
        "audit", sharing_->audit_port());
    add(google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            v1::DeviceIngest::service_full_name()),
        "ingest", ingest_->port());
    return methods;
  }

  static std::string* kek_path_;
  static std::vector<v1::ResidencyRule>* rules_;  // as the stack made them
  static test_support::TestStack* stack_;
  static test_support::DirectoryServices* directory_;
  static sharing::SharingServer* sharing_;
  static ingest::IngestServer* ingest_;
};

std::string* RpcFuzzTest::kek_path_ = nullptr;
std::vector<v1::ResidencyRule>* RpcFuzzTest::rules_ = nullptr;
test_support::TestStack* RpcFuzzTest::stack_ = nullptr;
test_support::DirectoryServices* RpcFuzzTest::directory_ = nullptr;
sharing::SharingServer* RpcFuzzTest::sharing_ = nullptr;
ingest::IngestServer* RpcFuzzTest::ingest_ = nullptr;

TEST_F(RpcFuzzTest, RandomRequestsToEveryRpcGetTheCallersAnswerNeverAServerError) {
  RandomStrings strings;
  strings.Add(Seed(0));
  ASSERT_FALSE(HasFailure());
  const std::vector<Method> methods = Methods();
  ASSERT_EQ(methods.size(), 33u);
  test_support::TestPki& pki = stack_->pki();
  // The services' own certificates, as they call one another (a stream of messages each way is
  // sent as CallRaw sends a client's stream: all of it, then the answers are read).
  const auto service_cert = [](const std::string& name) {
    const TlsConfig& tls = stack_->config().services.at(name).tls;
    return TestCert{tls.cert_path, tls.key_path, "", "", ""};
  };
  const TestCert sharing_service = service_cert("sharing");
  const TestCert consent_service = service_cert("consent");
  const TestCert ingest_service = service_cert("ingest");  // the only one that resolves devices
  const std::vector<std::pair<std::string, const TestCert*>> callers = {
      {"acme app", &pki.app()},          {"acme practitioner", &pki.practitioner()},
      {"acme device", &pki.device()},    {"globex app", &pki.globex_app()},
      {"globex practitioner", &pki.globex_practitioner()},
      {"ops", &pki.ops()},               {"routing service", &pki.service()},
      {"sharing service", &sharing_service},  {"consent service", &consent_service},
      {"ingest service", &ingest_service}};
  // One channel per caller and server, as clients keep them.
  std::map<std::pair<int, std::string>, std::shared_ptr<grpc::Channel>> channels;
  for (const Method& m : methods) {
    for (const auto& [who, cert] : callers) {
      auto& channel = channels[{m.port, who}];
      if (channel == nullptr) channel = Channel(m.port, *cert, m.service);
    }
  }

  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(3000);
  // Per method: how many calls ended with each code, printed at the end.
  std::map<std::string, std::map<grpc::StatusCode, int>> codes;
  std::map<std::string, std::set<size_t>> refused;  // per method, callers whose kind may not call
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    // Requests change the world (suspend a tenant, revoke consents, erase records): every 250
    // rounds it is set up again, with new objects.
    if (round > 0 && round % 250 == 0) strings.Add(Seed(round / 250));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const Method& method = methods[testing::Uniform(rng, 0, methods.size() - 1)];
    // Half the requests are plausible, so that calls get past validation to the checks of who may
    // do what to which object, and to the database: they are sent by a caller whose kind of
    // identity has not been refused the method ("... may not call <Method>").
    const bool hostile = testing::Uniform(rng, 0, 1) == 0;
    std::vector<size_t> candidates;
    for (size_t i = 0; i < callers.size(); ++i) {
      if (hostile || !refused[method.path].contains(i)) candidates.push_back(i);
    }
    if (candidates.empty()) candidates.push_back(0);
    const size_t caller = candidates[testing::Uniform(rng, 0, candidates.size() - 1)];
    const auto& [who, cert] = callers[caller];
    std::unique_ptr<Message> request(
        google::protobuf::MessageFactory::generated_factory()->GetPrototype(method.request)->New());
    std::vector<std::string> sent;
    const int messages =
        method.client_streaming ? static_cast<int>(testing::Uniform(rng, 0, 4)) : 1;
    for (int i = 0; i < messages; ++i) {
      request->Clear();
      Fill(*request, rng, strings, hostile, 3);
      std::string bytes = request->SerializeAsString();
      sent.push_back(hostile ? Damage(std::move(bytes), rng) : std::move(bytes));
    }
    const Answer answer = CallRaw(channels.at({method.port, who}), method.path, sent);
    ++codes[method.path][answer.status.error_code()];
    if (answer.status.error_code() == grpc::StatusCode::PERMISSION_DENIED &&
        absl::StrContains(answer.status.error_message(), " may not call ")) {
      refused[method.path].insert(caller);
    }
    // The call, for a failure message (a request's strings may be 70,000 bytes long).
    const auto call = [&] {
      return absl::StrCat(method.path, " as ", who, ": ", answer.status.error_code(), " ",
                          answer.status.error_message(), "\nrequest: ",
                          request->ShortDebugString().substr(0, 2000));
    };
    EXPECT_FALSE(IsServerError(method.path, answer.status.error_code())) << call();
    if (!answer.status.ok()) {
      EXPECT_FALSE(answer.status.error_message().empty()) << "no message: " << call();
    }
  }

  int ok = 0;
  for (const auto& [path, by_code] : codes) {
    std::vector<std::string> parts;
    for (const auto& [code, n] : by_code) {
      parts.push_back(absl::StrCat(static_cast<int>(code), ":", n));
      if (code == grpc::StatusCode::OK) ok += n;
    }
    std::printf("%-50s %s\n", path.c_str(), absl::StrJoin(parts, " ").c_str());
  }
  // The requests reach past validation often enough to mean something.
  EXPECT_GT(ok, rounds / 50) << "calls answered OK";

  // The services go on, and no audit chain was broken by what they were sent.
  auto audit = v1::Audit::NewStub(Channel(sharing_->audit_port(), pki.ops(), "audit"));
  for (const std::string region : {"fr-1", "de-1", "eu-1", ""}) {
    v1::VerifyChainRequest request;
    if (region.empty()) {
      request.mutable_log()->set_control(true);
    } else {
      request.mutable_log()->set_region_id(region);
    }
    v1::VerifyChainResponse response;
    grpc::ClientContext context;
    grpc::Status status = audit->VerifyChain(&context, request, &response);
    ASSERT_TRUE(status.ok()) << region << ": " << status.error_message();
    EXPECT_TRUE(response.ok()) << region << ": " << response.detail();
    if (region == "fr-1" || region.empty()) {
      EXPECT_GT(response.entries_checked(), 0u) << region;
    }
  }
  v1::GetTenantRequest get;
  get.set_tenant_id("acme");
  v1::GetTenantResponse got;
  grpc::ClientContext context;
  grpc::Status status =
      v1::TenantRouting::NewStub(Routing(pki.ops()))->GetTenant(&context, get, &got);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

}  // namespace
}  // namespace medgate
