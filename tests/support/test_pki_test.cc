// Tests that TestPki's cast of certificates is what mTLS tests rely on.
#include "tests/support/test_pki.h"

#include <openssl/x509.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/x509_inspect.h"

namespace medgate::test_support {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

class TestPkiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string dir = absl::StrCat(::testing::TempDir(), "test_pki_test_", getpid());
    std::filesystem::remove_all(dir);
    absl::StatusOr<std::unique_ptr<TestPki>> pki = TestPki::Create(dir);
    ASSERT_TRUE(pki.ok()) << pki.status();
    pki_ = *std::move(pki);
  }
  static void TearDownTestSuite() {
    if (pki_ != nullptr) std::filesystem::remove_all(pki_->dir());
    pki_.reset();
  }

  static int Verify(const TestCert& cert, bool as_client = true) {
    return VerifyCertificate(pki_->ca_pem(), cert.cert_pem, as_client).value_or(-1);
  }
  static std::vector<std::string> Uris(const TestCert& cert) {
    absl::StatusOr<SubjectAltNames> sans = ReadSubjectAltNames(cert.cert_pem);
    EXPECT_TRUE(sans.ok()) << sans.status();
    return sans.ok() ? sans->uris : std::vector<std::string>{};
  }

  static inline std::unique_ptr<TestPki> pki_;
};

TEST_F(TestPkiTest, GoodIdentitiesVerifyWithTheirUri) {
  ASSERT_NE(pki_, nullptr);
  const std::vector<std::pair<const TestCert*, std::string>> good = {
      {&pki_->server(), "spiffe://medgate.test/service/test-server"},
      {&pki_->service(), "spiffe://medgate.test/service/routing"},
      {&pki_->ops(), "spiffe://medgate.test/ops/alice"},
      {&pki_->device(), "spiffe://medgate.test/tenant/acme/device/dev-1"},
      {&pki_->practitioner(), "spiffe://medgate.test/tenant/acme/practitioner/p-1"},
      {&pki_->app(), "spiffe://medgate.test/tenant/acme/app/backend"},
      {&pki_->globex_device(), "spiffe://medgate.test/tenant/globex/device/dev-1"},
      {&pki_->globex_practitioner(), "spiffe://medgate.test/tenant/globex/practitioner/p-1"},
      {&pki_->globex_app(), "spiffe://medgate.test/tenant/globex/app/backend"},
      {&pki_->other_trust_domain(), "spiffe://evil.test/tenant/acme/app/backend"},
      {&pki_->unknown_form(), "spiffe://medgate.test/robot/x"},
  };
  for (const auto& [cert, uri] : good) {
    SCOPED_TRACE(uri);
    EXPECT_EQ(Verify(*cert), X509_V_OK);
    EXPECT_THAT(Uris(*cert), ElementsAre(uri));
    EXPECT_EQ(ReadText(cert->cert_path), cert->cert_pem);
    EXPECT_EQ(ReadText(cert->key_path), cert->key_pem);
  }
  EXPECT_EQ(pki_->SpiffeId("/ops/alice"), "spiffe://medgate.test/ops/alice");
}

TEST_F(TestPkiTest, ServerCertificateServesLocalhost) {
  ASSERT_NE(pki_, nullptr);
  EXPECT_EQ(Verify(pki_->server(), /*as_client=*/false), X509_V_OK);
  absl::StatusOr<SubjectAltNames> sans = ReadSubjectAltNames(pki_->server().cert_pem);
  ASSERT_TRUE(sans.ok());
  EXPECT_THAT(sans->dns, ElementsAre("localhost"));
  EXPECT_THAT(sans->ips, ElementsAre("127.0.0.1"));
}

TEST_F(TestPkiTest, BadCertificatesAreBadInTheIntendedWay) {
  ASSERT_NE(pki_, nullptr);
  EXPECT_EQ(Verify(pki_->rogue_signed()), X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
  EXPECT_THAT(Uris(pki_->rogue_signed()),
              ElementsAre("spiffe://medgate.test/tenant/acme/app/backend"));
  EXPECT_EQ(
      VerifyCertificate(pki_->rogue_ca().cert_pem, pki_->rogue_signed().cert_pem).value_or(-1),
      X509_V_OK);

  EXPECT_EQ(Verify(pki_->expired()), X509_V_ERR_CERT_HAS_EXPIRED);
  EXPECT_THAT(Uris(pki_->expired()), ElementsAre("spiffe://medgate.test/tenant/acme/app/backend"));

  EXPECT_EQ(Verify(pki_->two_uris()), X509_V_OK);
  EXPECT_THAT(Uris(pki_->two_uris()), ElementsAre("spiffe://medgate.test/tenant/acme/app/backend",
                                                  "spiffe://medgate.test/ops/alice"));

  EXPECT_EQ(Verify(pki_->no_san()), X509_V_OK);
  absl::StatusOr<SubjectAltNames> none = ReadSubjectAltNames(pki_->no_san().cert_pem);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->present);
  EXPECT_THAT(none->uris, IsEmpty());
}

TEST_F(TestPkiTest, IssueServerRotatesSerialAndKey) {
  ASSERT_NE(pki_, nullptr);
  absl::StatusOr<TestCert> rotated = pki_->IssueServer("server-rotated");
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  EXPECT_NE(rotated->serial, pki_->server().serial);
  EXPECT_NE(rotated->key_pem, pki_->server().key_pem);
  EXPECT_EQ(Verify(*rotated, /*as_client=*/false), X509_V_OK);
  EXPECT_EQ(Uris(*rotated), Uris(pki_->server()));
  EXPECT_EQ(ReadText(rotated->cert_path), rotated->cert_pem);
}

TEST_F(TestPkiTest, OtherTrustDomainIsHonoured) {
  std::string dir = absl::StrCat(::testing::TempDir(), "test_pki_test_td_", getpid());
  absl::StatusOr<std::unique_ptr<TestPki>> pki = TestPki::Create(dir, "other.test");
  ASSERT_TRUE(pki.ok()) << pki.status();
  EXPECT_THAT(Uris((*pki)->app()), ElementsAre("spiffe://other.test/tenant/acme/app/backend"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace medgate::test_support
