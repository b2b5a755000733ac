// Tests medgate_devpki and the medgate-devpki tool by verifying their output with OpenSSL.
#include "libs/devpki/devpki.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/x509_inspect.h"

namespace medgate::devpki {
namespace {

using ::medgate::test_support::ReadSubjectAltNames;
using ::medgate::test_support::SubjectAltNames;
using ::medgate::test_support::VerifyCertificate;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::string Pem(const Credential& credential) {
  absl::StatusOr<std::string> pem = credential.CertPem();
  EXPECT_TRUE(pem.ok()) << pem.status();
  return pem.value_or("");
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A fresh directory under gtest's temporary directory, removed when the test ends.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name)
      : path_(absl::StrCat(::testing::TempDir(), "devpki_test_", name, "_", getpid())) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() { std::filesystem::remove_all(path_); }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class DevpkiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<Credential> ca = CreateCa(CaOptions());
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_.emplace(*std::move(ca));
  }

  Credential Issue(const LeafOptions& options) {
    absl::StatusOr<Credential> leaf = IssueLeaf(*ca_, options);
    EXPECT_TRUE(leaf.ok()) << leaf.status();
    return *std::move(leaf);
  }

  std::optional<Credential> ca_;
};

TEST_F(DevpkiTest, CaIsSelfSignedCertSigningCa) {
  X509* ca = ca_->cert();
  EXPECT_EQ(X509_check_ca(ca), 1);
  EXPECT_TRUE(X509_get_extension_flags(ca) & EXFLAG_SS);
  EXPECT_TRUE(X509_get_key_usage(ca) & KU_KEY_CERT_SIGN);
  EXPECT_EQ(EVP_PKEY_get_base_id(ca_->key()), EVP_PKEY_EC);
  EXPECT_EQ(EVP_PKEY_get_bits(ca_->key()), 256);
  EXPECT_EQ(X509_verify(ca, X509_get0_pubkey(ca)), 1);
}

TEST_F(DevpkiTest, LeafVerifiesAsClientAndServer) {
  LeafOptions options;
  options.uri_sans = {"spiffe://medgate.test/service/routing"};
  options.dns_sans = {"localhost"};
  options.ip_sans = {"127.0.0.1"};
  Credential leaf = Issue(options);

  EXPECT_EQ(VerifyCertificate(Pem(*ca_), Pem(leaf), /*as_client=*/true).value_or(-1), X509_V_OK);
  EXPECT_EQ(VerifyCertificate(Pem(*ca_), Pem(leaf), /*as_client=*/false).value_or(-1), X509_V_OK);
  EXPECT_EQ(X509_check_ca(leaf.cert()), 0);
  EXPECT_EQ(X509_get_extended_key_usage(leaf.cert()) & (XKU_SSL_SERVER | XKU_SSL_CLIENT),
            static_cast<uint32_t>(XKU_SSL_SERVER | XKU_SSL_CLIENT));
  EXPECT_TRUE(CheckIssuedBy(leaf, *ca_, absl::Now()).ok());
}

TEST_F(DevpkiTest, SansReadBackAsIssued) {
  LeafOptions options;
  options.uri_sans = {"spiffe://medgate.test/tenant/acme/app/backend"};
  options.dns_sans = {"localhost", "api.medgate.test"};
  options.ip_sans = {"127.0.0.1", "::1"};
  Credential leaf = Issue(options);

  absl::StatusOr<SubjectAltNames> sans = ReadSubjectAltNames(Pem(leaf));
  ASSERT_TRUE(sans.ok()) << sans.status();
  EXPECT_THAT(sans->uris, ElementsAre("spiffe://medgate.test/tenant/acme/app/backend"));
  EXPECT_THAT(sans->dns, ElementsAre("localhost", "api.medgate.test"));
  EXPECT_THAT(sans->ips, ElementsAre("127.0.0.1", "::1"));
  EXPECT_THAT(leaf.UriSans(), ElementsAre("spiffe://medgate.test/tenant/acme/app/backend"));
}

TEST_F(DevpkiTest, TwoUriSansAndNoSans) {
  LeafOptions two;
  two.uri_sans = {"spiffe://a.test/x", "spiffe://a.test/y"};
  absl::StatusOr<SubjectAltNames> two_sans = ReadSubjectAltNames(Pem(Issue(two)));
  ASSERT_TRUE(two_sans.ok());
  EXPECT_THAT(two_sans->uris, ElementsAre("spiffe://a.test/x", "spiffe://a.test/y"));

  Credential none = Issue(LeafOptions());
  absl::StatusOr<SubjectAltNames> no_sans = ReadSubjectAltNames(Pem(none));
  ASSERT_TRUE(no_sans.ok());
  EXPECT_FALSE(no_sans->present);
  EXPECT_THAT(none.UriSans(), IsEmpty());
  // Still a valid certificate: refusing it is the server's job, not the PKI's.
  EXPECT_EQ(VerifyCertificate(Pem(*ca_), Pem(none)).value_or(-1), X509_V_OK);
}

TEST_F(DevpkiTest, ExpiredLeafFailsWithCertHasExpired) {
  LeafOptions options;
  options.uri_sans = {"spiffe://medgate.test/tenant/acme/app/backend"};
  options.not_before = -absl::Hours(48);
  options.not_after = -absl::Hours(24);
  Credential leaf = Issue(options);
  EXPECT_EQ(VerifyCertificate(Pem(*ca_), Pem(leaf)).value_or(-1), X509_V_ERR_CERT_HAS_EXPIRED);
  EXPECT_FALSE(CheckIssuedBy(leaf, *ca_, absl::Now()).ok());
  EXPECT_TRUE(CheckIssuedBy(leaf, *ca_, absl::Now() - absl::Hours(36)).ok());
}

// A CRL is signed by the CA, names it as issuer, revokes the serials asked for and no other, and
// goes into a hashed directory by the names OpenSSL looks it up by, each CRL by the next one.
TEST_F(DevpkiTest, CrlsRevokeTheSerialsAskedForUnderTheCasHashedNames) {
  Credential revoked = Issue(LeafOptions());
  Credential kept = Issue(LeafOptions());
  absl::StatusOr<std::string> pem = CreateCrlPem(*ca_, {revoked.SerialHex()});
  ASSERT_TRUE(pem.ok()) << pem.status();
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem->data(), pem->size()),
                                                &BIO_free);
  std::unique_ptr<X509_CRL, decltype(&X509_CRL_free)> crl(
      PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr), &X509_CRL_free);
  ASSERT_NE(crl, nullptr);
  EXPECT_EQ(X509_CRL_verify(crl.get(), ca_->key()), 1);
  EXPECT_EQ(X509_NAME_cmp(X509_CRL_get_issuer(crl.get()), X509_get_subject_name(ca_->cert())), 0);
  X509_REVOKED* entry = nullptr;
  EXPECT_EQ(X509_CRL_get0_by_cert(crl.get(), &entry, revoked.cert()), 1);
  EXPECT_EQ(X509_CRL_get0_by_cert(crl.get(), &entry, kept.cert()), 0);
  EXPECT_EQ(CreateCrlPem(*ca_, {"not-hex"}).status().code(), absl::StatusCode::kInvalidArgument);

  ScratchDir dir("crl");
  int ok = 0;
  char hash[16];
  std::snprintf(hash, sizeof(hash), "%08lx",
                X509_NAME_hash_ex(X509_get_subject_name(ca_->cert()), nullptr, nullptr, &ok));
  ASSERT_EQ(ok, 1);
  absl::StatusOr<std::string> first = WriteCrl(*ca_, {revoked.SerialHex()}, dir.path());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, absl::StrCat(dir.path(), "/", hash, ".r0"));
  absl::StatusOr<std::string> second = WriteCrl(*ca_, {}, dir.path());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(*second, absl::StrCat(dir.path(), "/", hash, ".r1"));
  EXPECT_THAT(ReadText(*first), ::testing::StartsWith("-----BEGIN X509 CRL-----"));
  EXPECT_EQ(CreateCrlPem(*ca_, {}, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A directory already holding 1,000 CRLs of the CA gets no more.
  for (int index = 2; index < 1000; ++index) {
    std::ofstream(absl::StrCat(dir.path(), "/", hash, ".r", index)) << "x";
  }
  absl::StatusOr<std::string> full = WriteCrl(*ca_, {}, dir.path());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_THAT(std::string(full.status().message()), ::testing::HasSubstr("1000 CRLs"));
}

TEST_F(DevpkiTest, LeafOfAnotherCaDoesNotVerify) {
  absl::StatusOr<Credential> other_ca = CreateCa(CaOptions());
  ASSERT_TRUE(other_ca.ok());
  absl::StatusOr<Credential> leaf = IssueLeaf(*other_ca, LeafOptions());
  ASSERT_TRUE(leaf.ok());
  int error = VerifyCertificate(Pem(*ca_), Pem(*leaf)).value_or(-1);
  EXPECT_TRUE(error == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ||
              error == X509_V_ERR_CERT_SIGNATURE_FAILURE)
      << X509_verify_cert_error_string(error);
  EXPECT_FALSE(CheckIssuedBy(*leaf, *ca_, absl::Now()).ok());
}

TEST_F(DevpkiTest, EveryLeafGetsItsOwnSerialAndKey) {
  Credential a = Issue(LeafOptions());
  Credential b = Issue(LeafOptions());
  EXPECT_NE(a.SerialHex(), b.SerialHex());
  EXPECT_EQ(a.SerialHex().size(), 32u);
  EXPECT_NE(EVP_PKEY_eq(a.key(), b.key()), 1);
}

TEST_F(DevpkiTest, RejectsBadOptions) {
  LeafOptions bad_ip;
  bad_ip.ip_sans = {"localhost"};
  EXPECT_EQ(IssueLeaf(*ca_, bad_ip).status().code(), absl::StatusCode::kInvalidArgument);
  LeafOptions empty_uri;
  empty_uri.uri_sans = {""};
  EXPECT_EQ(IssueLeaf(*ca_, empty_uri).status().code(), absl::StatusCode::kInvalidArgument);
  LeafOptions backwards;
  backwards.not_after = backwards.not_before - absl::Hours(1);
  EXPECT_EQ(IssueLeaf(*ca_, backwards).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DevpkiTest, FilesRoundTripWithPrivateKeyMode) {
  ScratchDir scratch("roundtrip");
  const std::string& dir = scratch.path();
  ASSERT_TRUE(ca_->WriteFiles(dir + "/ca.crt", dir + "/ca.key").ok());
  struct stat st;
  ASSERT_EQ(stat((dir + "/ca.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  absl::StatusOr<Credential> reread = Credential::ReadFiles(dir + "/ca.crt", dir + "/ca.key");
  ASSERT_TRUE(reread.ok()) << reread.status();
  EXPECT_EQ(X509_cmp(reread->cert(), ca_->cert()), 0);
  EXPECT_EQ(EVP_PKEY_eq(reread->key(), ca_->key()), 1);
  // The re-read CA keeps issuing leaves that chain to the original certificate.
  absl::StatusOr<Credential> leaf = IssueLeaf(*reread, LeafOptions());
  ASSERT_TRUE(leaf.ok());
  EXPECT_EQ(VerifyCertificate(Pem(*ca_), Pem(*leaf)).value_or(-1), X509_V_OK);

  EXPECT_EQ(Credential::ReadFiles(dir + "/missing.crt", dir + "/ca.key").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(DevpkiTest, FromPemRejectsKeyOfAnotherCertificate) {
  Credential leaf = Issue(LeafOptions());
  absl::StatusOr<std::string> wrong_key = ca_->KeyPem();
  ASSERT_TRUE(wrong_key.ok());
  EXPECT_EQ(Credential::FromPem(Pem(leaf), *wrong_key).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The tool as scripts/up runs it: a complete PKI on the first run, nothing rewritten on the second,
// only the missing piece on the third.
TEST(DevpkiToolTest, CreatesPkiOnceAndCompletesIt) {
  ScratchDir scratch("tool");
  const std::string dir = scratch.path() + "/nested/pki";
  std::string command =
      absl::StrCat(MEDGATE_DEVPKI_TOOL, " --dir ", dir, " --trust-domain medgate.local >/dev/null");
  ASSERT_EQ(std::system(command.c_str()), 0);

  const std::map<std::string, std::string> expected = {
      {"routing", "/service/routing"},
      {"consent", "/service/consent"},
      {"ingest", "/service/ingest"},
      {"sharing", "/service/sharing"},
      {"audit", "/service/audit"},
      {"ops", "/ops/admin"},
      {"app", "/tenant/demo/app/backend"},
      {"practitioner", "/tenant/demo/practitioner/dr-martin"},
      {"device", "/tenant/demo/device/dev-0001"},
  };
  const std::string ca_pem = ReadText(dir + "/ca.crt");
  std::map<std::string, std::string> first_run;
  for (const auto& [name, path] : expected) {
    SCOPED_TRACE(name);
    std::string pem = ReadText(absl::StrCat(dir, "/", name, ".crt"));
    first_run[name] = pem;
    EXPECT_EQ(VerifyCertificate(ca_pem, pem, /*as_client=*/true).value_or(-1), X509_V_OK);
    absl::StatusOr<SubjectAltNames> sans = ReadSubjectAltNames(pem);
    ASSERT_TRUE(sans.ok());
    EXPECT_THAT(sans->uris, ElementsAre("spiffe://medgate.local" + path));
    if (path.starts_with("/service/")) {
      EXPECT_EQ(VerifyCertificate(ca_pem, pem, /*as_client=*/false).value_or(-1), X509_V_OK);
      EXPECT_THAT(sans->dns, ElementsAre("localhost"));
      EXPECT_THAT(sans->ips, ElementsAre("127.0.0.1"));
    }
    struct stat st;
    ASSERT_EQ(stat(absl::StrCat(dir, "/", name, ".key").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }

  ASSERT_EQ(std::system(command.c_str()), 0);
  EXPECT_EQ(ReadText(dir + "/ca.crt"), ca_pem);
  for (const auto& [name, pem] : first_run) {
    EXPECT_EQ(ReadText(absl::StrCat(dir, "/", name, ".crt")), pem) << name;
  }

  std::filesystem::remove(dir + "/ingest.crt");
  ASSERT_EQ(std::system(command.c_str()), 0);
  EXPECT_EQ(ReadText(dir + "/ca.crt"), ca_pem);
  EXPECT_NE(ReadText(dir + "/ingest.crt"), first_run["ingest"]);
  EXPECT_EQ(VerifyCertificate(ca_pem, ReadText(dir + "/ingest.crt")).value_or(-1), X509_V_OK);
  EXPECT_EQ(ReadText(dir + "/routing.crt"), first_run["routing"]);
}

}  // namespace
}  // namespace medgate::devpki
