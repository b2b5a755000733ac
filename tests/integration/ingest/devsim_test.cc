// medgate-devsim, run as a process against routing, consent and ingest over mTLS and real
// PostgreSQL: it enrolls its devices, streams, and says by its exit code whether every sample it
// produced was stored; a run whose samples are refused (here for a withdrawn consent) fails,
// naming why.
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "libs/devpki/devpki.h"
#include "libs/identity/credentials.h"
#include "medgate/v1/consent.grpc.pb.h"
#include "medgate/v1/routing.grpc.pb.h"
#include "services/ingest/ingest_server.h"
#include "tests/support/directory_services.h"
#include "tests/support/shell.h"
#include "tests/support/tenants.h"
#include "tests/support/test_stack.h"

namespace medgate::ingest {
namespace {

using ::testing::HasSubstr;
using test_support::TestStack;

// Rows stored for devsim's devices of `tenant` in `region`.
int64_t StoredSamples(TestStack& stack, const std::string& region,
                      const std::string& tenant = "acme") {
  pqxx::connection c(stack.clusters().region(region).ConnectionString());
  pqxx::nontransaction n(c);
  return n.exec_params1("SELECT count(*) FROM vitals WHERE tenant_id = $1 AND device_id LIKE 'sim-%'",
                        tenant)[0]
      .as<int64_t>();
}

// Who recorded the consents devsim's enrolments granted to `tenant`'s patients in `region`.
std::set<std::string> ConsentRecorders(TestStack& stack, const std::string& region,
                                       const std::string& tenant) {
  pqxx::connection c(stack.clusters().region(region).ConnectionString());
  pqxx::nontransaction n(c);
  std::set<std::string> recorders;
  for (const auto& row : n.exec_params(
           "SELECT DISTINCT v.recorded_by FROM consent_versions v JOIN consents c USING "
           "(consent_id) WHERE c.tenant_id = $1 AND v.request_id LIKE 'devsim-consent-%'",
           tenant)) {
    recorders.insert(row[0].c_str());
  }
  return recorders;
}

TEST(DevsimTest, ExitsZeroOnlyWhenEverySampleItProducedIsStored) {
  auto started = TestStack::Start({"routing", "consent", "ingest"}, "");
  ASSERT_TRUE(started.ok()) << started.status();
  TestStack& stack = **started;
  auto directory = test_support::DirectoryServices::Start(stack);
  ASSERT_TRUE(directory.ok()) << directory.status();
  ASSERT_TRUE(test_support::UpsertTenant(stack.pki(), (*directory)->routing().port(), "acme",
                                         {"FR"}, true)
                  .ok());
  auto ingest = IngestServer::Create(stack.config());
  ASSERT_TRUE(ingest.ok()) << ingest.status();
  ASSERT_TRUE((*ingest)->Start().ok());
  stack.SetAddress("ingest", (*ingest)->port());
  const std::string config = stack.dir() + "/devsim.yaml";
  ASSERT_TRUE(stack.WriteConfig(config).ok());
  // The test PKI's directory holds the dev CA and acme's app certificate, as a dev stack's does
  // (demo's there): devsim issues its devices' certificates from it, and enrolls them as that app.
  const std::string command =
      absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                   " --tenant acme --devices 2 --rate 20 --duration 2 --batch 5 --state ",
                   stack.dir(), "/devsim 2>&1");

  test_support::ShellRun run = test_support::RunShell(command);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr(" rejected=0 "));
  EXPECT_THAT(run.output, HasSubstr("all_acked=yes"));
  const int64_t stored = StoredSamples(stack, "fr-1");
  // Every sample it produced was stored (none rejected, none refused by the SDK): as many as its
  // summary says it produced, however many the machine's pace let it make.
  EXPECT_GT(stored, 0);
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("samples_produced=", stored, " ")));
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("stored=", stored, " ")));
  EXPECT_THAT(run.output, HasSubstr("refused_by_sdk=0 "));
  EXPECT_EQ(ConsentRecorders(stack, "fr-1", "acme"),
            std::set<std::string>{stack.pki().SpiffeId("/tenant/acme/app/backend")});

  // The first device's patient withdraws REMOTE_MONITORING. The next run's enrolment repeats its
  // recorded grant (same request id), which does not undo the withdrawal: that device's samples
  // are refused, and the run fails saying so.
  auto channel = [&](int port, const std::string& service) {
    return *MakeChannel(absl::StrCat("127.0.0.1:", port),
                        TlsConfig{stack.pki().app().cert_path, stack.pki().app().key_path,
                                  stack.pki().ca_path(), 60},
                        stack.pki().SpiffeId(absl::StrCat("/service/", service)));
  };
  v1::PlacePatientRequest place;
  place.set_patient_ref("sim-patient-sim-0");
  place.set_territory("FR");
  v1::PlacePatientResponse placed;
  grpc::ClientContext placing;
  ASSERT_TRUE(v1::TenantRouting::NewStub(channel((*directory)->routing().port(), "routing"))
                  ->PlacePatient(&placing, place, &placed)
                  .ok());
  v1::RevokeConsentRequest revoke;
  revoke.mutable_key()->set_patient_id(placed.patient_id());
  revoke.mutable_key()->set_purpose(v1::PURPOSE_REMOTE_MONITORING);
  revoke.set_reason("the patient withdrew");
  revoke.set_request_id("devsim-test-withdrawal");
  v1::RevokeConsentResponse revoked;
  grpc::ClientContext revoking;
  grpc::Status withdrawn = v1::Consent::NewStub(channel((*directory)->consent().port(), "consent"))
                               ->RevokeConsent(&revoking, revoke, &revoked);
  ASSERT_TRUE(withdrawn.ok()) << withdrawn.error_message();

  run = test_support::RunShell(command);
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("samples rejected: NO_CONSENT\n"));
  EXPECT_THAT(run.output, ::testing::Not(HasSubstr(" rejected=0 ")));
  // The other device's samples were stored all the same.
  EXPECT_GT(StoredSamples(stack, "fr-1"), stored);

  // Another tenant's devices are enrolled by an app of that tenant, which devsim issues itself:
  // placed and assigned in acme (the tenant of the PKI's app certificate, which devsim once used
  // for every tenant), beta's devices were refused by ingest and their batches never acked.
  ASSERT_TRUE(test_support::UpsertTenant(stack.pki(), (*directory)->routing().port(), "beta",
                                         {"FR"}, true)
                  .ok());
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant beta --devices 2 --rate 20 --duration 1 "
                                            "--batch 5 --state ",
                                            stack.dir(), "/devsim 2>&1"));
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("all_acked=yes"));
  const int64_t beta_stored = StoredSamples(stack, "fr-1", "beta");
  EXPECT_GT(beta_stored, 0);
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("stored=", beta_stored)));
  EXPECT_EQ(ConsentRecorders(stack, "fr-1", "beta"),
            std::set<std::string>{stack.pki().SpiffeId("/tenant/beta/app/devsim")});

  // A certificate devsim cannot issue (here a directory where its file goes) stops the run,
  // saying why.
  std::filesystem::create_directories(
      absl::StrCat(stack.dir(), "/devsim/", stack.config().trust_domain, "/acme/sim-2.crt"));
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant acme --devices 3 --duration 1 --state ",
                                            stack.dir(), "/devsim 2>&1"));
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("cannot issue a certificate for sim-2: "));
  EXPECT_THAT(run.output, ::testing::Not(HasSubstr("devsim summary")));

  // A flag at the end without its value is refused before anything runs (it used to be dropped,
  // and the fleet ran at the default rate).
  const int64_t before = StoredSamples(stack, "fr-1");
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant acme --devices 2 --duration 1 --state ",
                                            stack.dir(), "/devsim --rate 2>&1"));
  EXPECT_EQ(run.exit_code, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--rate needs a value"));
  EXPECT_THAT(run.output, ::testing::Not(HasSubstr("devsim summary")));
  EXPECT_EQ(StoredSamples(stack, "fr-1"), before);

  // A device certificate the dev CA did not sign (left by a dev PKI made anew) is issued again,
  // and the device streams: it used to be kept, and every handshake failed. (beta's sim-0: acme's
  // has no consent now.)
  const std::string device_files =
      absl::StrCat(stack.dir(), "/devsim/", stack.config().trust_domain, "/beta/sim-0");
  {
    absl::StatusOr<devpki::Credential> other_ca = devpki::CreateCa({});
    ASSERT_TRUE(other_ca.ok()) << other_ca.status();
    devpki::LeafOptions leaf;
    leaf.uri_sans = {stack.pki().SpiffeId("/tenant/beta/device/sim-0")};
    absl::StatusOr<devpki::Credential> stale = devpki::IssueLeaf(*other_ca, leaf);
    ASSERT_TRUE(stale.ok()) << stale.status();
    ASSERT_TRUE(stale->WriteFiles(device_files + ".crt", device_files + ".key").ok());
  }
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant beta --devices 1 --duration 1 --state ",
                                            stack.dir(), "/devsim 2>&1"));
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("all_acked=yes"));
  absl::StatusOr<devpki::Credential> ca = devpki::Credential::ReadFiles(
      stack.pki().ca_path(),
      (std::filesystem::path(stack.pki().ca_path()).parent_path() / "ca.key").string());
  ASSERT_TRUE(ca.ok()) << ca.status();
  absl::StatusOr<devpki::Credential> reissued =
      devpki::Credential::ReadFiles(device_files + ".crt", device_files + ".key");
  ASSERT_TRUE(reissued.ok()) << reissued.status();
  EXPECT_TRUE(devpki::CheckIssuedBy(*reissued, *ca, absl::Now()).ok());

  // A --state that cannot be a directory is refused with exit 2, not an uncaught exception.
  const std::string not_a_directory = stack.dir() + "/devsim-state-file";
  { std::ofstream(not_a_directory) << "x"; }
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant acme --devices 1 --duration 1 --state ",
                                            not_a_directory, " 2>&1"));
  EXPECT_EQ(run.exit_code, 2) << run.output;
  EXPECT_THAT(run.output, HasSubstr("--state: cannot make the directory"));

  // An ingest whose messages are bounded below devsim's batches (limits.max_message_bytes):
  // every batch is refused whole and dropped. The run fails, and its summary counts them with
  // their samples.
  {
    MedgateConfig narrow = stack.config();
    narrow.limits.max_message_bytes = 1024;
    auto small = IngestServer::Create(narrow);
    ASSERT_TRUE(small.ok()) << small.status();
    ASSERT_TRUE((*small)->Start().ok());
    stack.SetAddress("ingest", (*small)->port());
    const std::string narrow_config = stack.dir() + "/devsim-narrow.yaml";
    ASSERT_TRUE(stack.WriteConfig(narrow_config).ok());
    run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", narrow_config,
                                              " --tenant beta --devices 1 --rate 100 --duration 1 "
                                              "--batch 100 --state ",
                                              stack.dir(), "/devsim 2>&1"));
    (*small)->Shutdown();
    stack.SetAddress("ingest", (*ingest)->port());
    EXPECT_EQ(run.exit_code, 1) << run.output;
    EXPECT_THAT(run.output, HasSubstr("all_acked=yes"));
    EXPECT_THAT(run.output, HasSubstr("batches_acked=0 "));
    EXPECT_THAT(run.output, HasSubstr("samples rejected: batch refused whole ("));
    EXPECT_THAT(run.output, ::testing::ContainsRegex("batches_rejected=[1-9][0-9]* "));
    const size_t at = run.output.find("samples_produced=");
    ASSERT_NE(at, std::string::npos) << run.output;
    const std::string produced =
        run.output.substr(at + 17, run.output.find(' ', at) - (at + 17));
    EXPECT_THAT(run.output, HasSubstr(absl::StrCat(" rejected=", produced, " "))) << run.output;
    EXPECT_THAT(run.output, ::testing::ContainsRegex(absl::StrCat(
                                "batches_rejected=", std::stoull(produced) / 100, " ")));
  }

  // Ingest gone: the run ends after its 30 s drain with the batches unacked, and says why.
  (*ingest)->Shutdown();
  run = test_support::RunShell(absl::StrCat(MEDGATE_DEVSIM_BINARY, " --config ", config,
                                            " --tenant acme --devices 1 --duration 1 --state ",
                                            stack.dir(), "/devsim 2>&1"));
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("all_acked=no"));
  EXPECT_THAT(run.output, HasSubstr("devsim: 1 devices still have unacked batches; their last "
                                    "error: UNAVAILABLE"));
}

}  // namespace
}  // namespace medgate::ingest
