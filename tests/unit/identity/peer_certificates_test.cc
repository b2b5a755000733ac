// PeerCertificates: a peer certificate checked again after its handshake, against its expiry and
// the CRLs of a directory, with real certificates and CRLs (devpki) in a private directory.
#include "libs/identity/peer_certificates.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "libs/devpki/devpki.h"

namespace medgate {
namespace {

using ::testing::HasSubstr;

// A CRL of `ca` as PEM, issued at `issued`, listing `entries` (serial in upper-case hex, and an
// RFC 5280 reason code, or -1 for none), under `issuer` (default: the CA's subject as it is),
// a delta CRL over base CRL number `delta_of` unless it is negative: what devpki::CreateCrlPem
// cannot make.
std::string CrlPem(const devpki::Credential& ca, absl::Time issued,
                   const std::vector<std::pair<std::string, int>>& entries,
                   const X509_NAME* issuer = nullptr, int delta_of = -1) {
  X509_CRL* crl = X509_CRL_new();
  X509_CRL_set_version(crl, 1);
  if (delta_of >= 0) {
    ASN1_INTEGER* base = ASN1_INTEGER_new();
    ASN1_INTEGER_set(base, delta_of);
    X509_CRL_add1_ext_i2d(crl, NID_delta_crl, base, /*crit=*/1, 0);
    ASN1_INTEGER_free(base);
  }
  X509_CRL_set_issuer_name(crl, issuer != nullptr ? issuer : X509_get_subject_name(ca.cert()));
  ASN1_TIME* last = ASN1_TIME_set(nullptr, absl::ToTimeT(issued));
  ASN1_TIME* next = ASN1_TIME_set(nullptr, absl::ToTimeT(issued + absl::Hours(24)));
  X509_CRL_set1_lastUpdate(crl, last);
  X509_CRL_set1_nextUpdate(crl, next);
  for (const auto& [serial, reason] : entries) {
    X509_REVOKED* revoked = X509_REVOKED_new();
    BIGNUM* bn = nullptr;
    BN_hex2bn(&bn, serial.c_str());
    ASN1_INTEGER* number = BN_to_ASN1_INTEGER(bn, nullptr);
    X509_REVOKED_set_serialNumber(revoked, number);
    X509_REVOKED_set_revocationDate(revoked, last);
    if (reason >= 0) {
      ASN1_ENUMERATED* code = ASN1_ENUMERATED_new();
      ASN1_ENUMERATED_set(code, reason);
      X509_REVOKED_add1_ext_i2d(revoked, NID_crl_reason, code, 0, 0);
      ASN1_ENUMERATED_free(code);
    }
    X509_CRL_add0_revoked(crl, revoked);
    ASN1_INTEGER_free(number);
    BN_free(bn);
  }
  X509_CRL_sort(crl);
  X509_CRL_sign(crl, ca.key(), EVP_sha256());
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509_CRL(bio, crl);
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(size));
  BIO_free(bio);
  ASN1_TIME_free(last);
  ASN1_TIME_free(next);
  X509_CRL_free(crl);
  return pem;
}

class PeerCertificatesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string path = ::testing::TempDir() + "/peer-certificates-XXXXXX";
    ASSERT_NE(::mkdtemp(path.data()), nullptr);
    dir_ = path;
    crl_dir_ = dir_ + "/crl";
    std::filesystem::create_directories(crl_dir_);
    absl::StatusOr<devpki::Credential> ca = devpki::CreateCa({});
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::make_unique<devpki::Credential>(*std::move(ca));
    ASSERT_TRUE(ca_->WriteFiles(dir_ + "/ca.crt", dir_ + "/ca.key").ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  struct Leaf {
    std::string pem;
    std::string serial;
  };
  Leaf Issue(const devpki::Credential& ca, absl::Duration valid = absl::Hours(24 * 365)) {
    devpki::LeafOptions options;
    options.uri_sans = {"spiffe://medgate.test/tenant/acme/device/d"};
    options.not_after = valid;
    absl::StatusOr<devpki::Credential> leaf = devpki::IssueLeaf(ca, options);
    EXPECT_TRUE(leaf.ok()) << leaf.status();
    absl::StatusOr<std::string> pem = leaf->CertPem();
    EXPECT_TRUE(pem.ok()) << pem.status();
    return Leaf{*pem, leaf->SerialHex()};
  }

  PeerCertificatesOptions Options() const {
    PeerCertificatesOptions options;
    options.crl_dir = crl_dir_;
    options.ca_path = dir_ + "/ca.crt";
    options.rescan = absl::ZeroDuration();  // the tests call Rescan()
    return options;
  }

  // Checks `leaf` at `at`.
  absl::Status CheckAt(PeerCertificates& peers, const Leaf& leaf, absl::Time at) {
    absl::StatusOr<std::shared_ptr<const PeerCertificate>> read = peers.Read(leaf.pem);
    if (!read.ok()) return read.status();
    return peers.Check(**read, at);
  }

  std::string dir_;
  std::string crl_dir_;
  std::unique_ptr<devpki::Credential> ca_;
};

TEST_F(PeerCertificatesTest, ACertificateIsRefusedOnceItHasExpired) {
  PeerCertificates peers(Options());
  const Leaf leaf = Issue(*ca_, absl::Hours(2));
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> read = peers.Read(leaf.pem);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ((*read)->serial_hex, leaf.serial);
  EXPECT_TRUE(peers.Check(**read, absl::Now()).ok());
  absl::Status expired = peers.Check(**read, (*read)->not_after + absl::Seconds(1));
  EXPECT_EQ(expired.code(), absl::StatusCode::kUnauthenticated) << expired;
  EXPECT_THAT(std::string(expired.message()), HasSubstr("expired at"));
  // The handshake's verification stands until the expiry, to the second.
  EXPECT_TRUE(peers.Check(**read, (*read)->not_after).ok());

  absl::StatusOr<std::shared_ptr<const PeerCertificate>> garbage = peers.Read("not a certificate");
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kUnauthenticated) << garbage.status();
}

// Of a CA's CRLs, the one it issued last decides: a certificate it lists is revoked, and one a
// CRL issued before listed but this one does not (a hold released) is not. A new CRL counts once
// the directory is looked at again; a check reads nothing from disk.
TEST_F(PeerCertificatesTest, ACertificateTheLatestCrlOfItsCaListsIsRevoked) {
  PeerCertificates peers(Options());
  const Leaf held = Issue(*ca_);
  const Leaf left = Issue(*ca_);
  const absl::Time at = absl::Now();
  EXPECT_TRUE(CheckAt(peers, held, at).ok());
  EXPECT_TRUE(CheckAt(peers, left, at).ok());
  EXPECT_EQ(peers.crls_in_force(), 0u);

  ASSERT_TRUE(devpki::WriteCrl(*ca_, {held.serial}, crl_dir_).ok());
  EXPECT_TRUE(CheckAt(peers, held, at).ok()) << "the directory was read by a check";
  peers.Rescan();
  absl::Status revoked = CheckAt(peers, held, at);
  EXPECT_EQ(revoked.code(), absl::StatusCode::kUnauthenticated) << revoked;
  EXPECT_THAT(std::string(revoked.message()), HasSubstr(absl::StrCat("serial ", held.serial)));
  EXPECT_THAT(std::string(revoked.message()), HasSubstr("revoked"));
  EXPECT_TRUE(CheckAt(peers, left, at).ok());
  EXPECT_EQ(peers.crls_in_force(), 1u);
  EXPECT_EQ(peers.revoked(), 1u);

  // CRLs give their issue time to the second.
  absl::SleepFor(absl::Milliseconds(1100));
  ASSERT_TRUE(devpki::WriteCrl(*ca_, {left.serial}, crl_dir_).ok());
  peers.Rescan();
  EXPECT_TRUE(CheckAt(peers, held, at).ok());
  EXPECT_EQ(CheckAt(peers, left, at).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(peers.crls_in_force(), 1u);

  // A CRL file replaced in place, by one issued later still, is read again.
  absl::SleepFor(absl::Milliseconds(1100));
  absl::StatusOr<std::string> both = devpki::CreateCrlPem(*ca_, {held.serial, left.serial});
  ASSERT_TRUE(both.ok()) << both.status();
  for (const auto& entry : std::filesystem::directory_iterator(crl_dir_)) {
    std::ofstream(entry.path(), std::ios::trunc) << *both;
  }
  peers.Rescan();
  EXPECT_EQ(CheckAt(peers, held, at).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckAt(peers, left, at).code(), absl::StatusCode::kUnauthenticated);

  // A checker made now reads the directory at once.
  PeerCertificates fresh(Options());
  EXPECT_EQ(fresh.revoked(), 2u);
  EXPECT_EQ(CheckAt(fresh, held, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
}

// Its own thread looks at the directory every `rescan`.
TEST_F(PeerCertificatesTest, ANewCrlIsPickedUpWithoutACall) {
  PeerCertificatesOptions options = Options();
  options.rescan = absl::Milliseconds(50);
  PeerCertificates peers(options);
  const Leaf leaf = Issue(*ca_);
  ASSERT_TRUE(devpki::WriteCrl(*ca_, {leaf.serial}, crl_dir_).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (peers.revoked() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(CheckAt(peers, leaf, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
}

// Only a CRL that a CA of ca_path signed releases anything. One under the CA's name signed by
// another key (which OpenSSL's look-up would find under the same file name) revokes what it
// lists, but, issued later, does not release what the real CA revoked. A CRL of another CA (an
// intermediate's, say) revokes that CA's certificates only. Files that are not CRLs, or not
// named as CRLs, are skipped.
TEST_F(PeerCertificatesTest, OnlyCrlsSignedByTheCaRelease) {
  const Leaf leaf = Issue(*ca_);
  const Leaf other = Issue(*ca_);
  const Leaf third = Issue(*ca_);
  absl::StatusOr<devpki::Credential> impostor = devpki::CreateCa({});  // the same name
  ASSERT_TRUE(impostor.ok()) << impostor.status();
  absl::StatusOr<devpki::Credential> stranger = devpki::CreateCa({.common_name = "another CA"});
  ASSERT_TRUE(stranger.ok()) << stranger.status();
  const Leaf strangers = Issue(*stranger);

  ASSERT_TRUE(devpki::WriteCrl(*impostor, {other.serial}, crl_dir_).ok());
  ASSERT_TRUE(devpki::WriteCrl(*stranger, {third.serial, strangers.serial}, crl_dir_).ok());
  std::ofstream(crl_dir_ + "/0badf00d.r0") << "not a CRL";
  absl::StatusOr<std::string> real = devpki::CreateCrlPem(*ca_, {leaf.serial});
  ASSERT_TRUE(real.ok()) << real.status();
  std::ofstream(crl_dir_ + "/notes.pem") << *real;  // not a CRL's name: OpenSSL reads no such file
  PeerCertificates first(Options());
  EXPECT_EQ(first.crls_in_force(), 2u);
  EXPECT_EQ(CheckAt(first, other, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(CheckAt(first, third, absl::Now()).ok()) << "a serial of another CA's CRL";
  EXPECT_EQ(CheckAt(first, strangers, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(CheckAt(first, leaf, absl::Now()).ok());

  ASSERT_TRUE(devpki::WriteCrl(*ca_, {leaf.serial}, crl_dir_).ok());
  absl::SleepFor(absl::Milliseconds(1100));
  ASSERT_TRUE(devpki::WriteCrl(*impostor, {}, crl_dir_).ok());
  PeerCertificates later(Options());
  EXPECT_EQ(CheckAt(later, leaf, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(CheckAt(later, third, absl::Now()).ok());
}

// A CA whose key was replaced keeps its name: the CA file holds both certificates, and a CRL
// signed by either is the CA's (here the newer key's CRL releases what the older key's revoked).
TEST_F(PeerCertificatesTest, ACrlSignedByAnyOfTheCasWithItsIssuersNameCounts) {
  absl::StatusOr<devpki::Credential> renewed = devpki::CreateCa({});  // the same name
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  absl::StatusOr<std::string> old_pem = ca_->CertPem();
  absl::StatusOr<std::string> new_pem = renewed->CertPem();
  ASSERT_TRUE(old_pem.ok() && new_pem.ok());
  std::ofstream(dir_ + "/ca.crt", std::ios::trunc) << *old_pem << *new_pem;
  const Leaf held = Issue(*ca_);
  ASSERT_TRUE(devpki::WriteCrl(*ca_, {held.serial}, crl_dir_).ok());
  PeerCertificates peers(Options());
  EXPECT_EQ(CheckAt(peers, held, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  absl::SleepFor(absl::Milliseconds(1100));
  ASSERT_TRUE(devpki::WriteCrl(*renewed, {}, crl_dir_).ok());
  peers.Rescan();
  EXPECT_TRUE(CheckAt(peers, held, absl::Now()).ok());
  EXPECT_EQ(peers.crls_in_force(), 1u);
}

// A CA's CRL may spell its name otherwise than its certificates do (another string type, case,
// spacing): OpenSSL compares names in a canonical form, so the handshake takes it as the CA's
// CRL, and so does the check of open connections. Here the CA's UTF8String name is spelled as
// PrintableString, in capitals, with runs of spaces.
TEST_F(PeerCertificatesTest, ACrlThatSpellsItsCasNameOtherwiseIsItsCasCrl) {
  const X509_NAME* subject = X509_get_subject_name(ca_->cert());
  std::unique_ptr<X509_NAME, decltype(&X509_NAME_free)> respelled(X509_NAME_new(),
                                                                  &X509_NAME_free);
  for (int i = 0; i < X509_NAME_entry_count(subject); ++i) {
    const X509_NAME_ENTRY* entry = X509_NAME_get_entry(subject, i);
    const ASN1_STRING* data = X509_NAME_ENTRY_get_data(entry);
    std::string text(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
                     static_cast<size_t>(ASN1_STRING_length(data)));
    std::string spelled = "  ";
    for (char c : text) {
      spelled += c == ' ' ? std::string("   ") : std::string(1, absl::ascii_toupper(c));
    }
    spelled += " ";
    ASSERT_EQ(ASN1_STRING_type(data), V_ASN1_UTF8STRING);
    ASSERT_EQ(X509_NAME_add_entry_by_OBJ(respelled.get(), X509_NAME_ENTRY_get_object(entry),
                                         V_ASN1_PRINTABLESTRING,
                                         reinterpret_cast<const unsigned char*>(spelled.data()),
                                         static_cast<int>(spelled.size()), -1, 0),
              1);
  }
  ASSERT_EQ(X509_NAME_cmp(respelled.get(), subject), 0) << "OpenSSL takes them as one name";
  const unsigned char* der_a = nullptr;
  const unsigned char* der_b = nullptr;
  size_t size_a = 0;
  size_t size_b = 0;
  ASSERT_EQ(X509_NAME_get0_der(respelled.get(), &der_a, &size_a), 1);
  ASSERT_EQ(X509_NAME_get0_der(subject, &der_b, &size_b), 1);
  ASSERT_NE(std::string(reinterpret_cast<const char*>(der_a), size_a),
            std::string(reinterpret_cast<const char*>(der_b), size_b))
      << "their bytes differ";

  const Leaf held = Issue(*ca_);
  const Leaf other = Issue(*ca_);
  std::ofstream(crl_dir_ + "/00000000.r0")
      << CrlPem(*ca_, absl::Now() - absl::Hours(1), {{held.serial, -1}}, respelled.get());
  PeerCertificates peers(Options());
  EXPECT_EQ(peers.crls_in_force(), 1u);
  absl::Status revoked = CheckAt(peers, held, absl::Now());
  EXPECT_EQ(revoked.code(), absl::StatusCode::kUnauthenticated) << revoked;
  EXPECT_TRUE(CheckAt(peers, other, absl::Now()).ok());

  // The same CA's later CRL, in its certificates' spelling, is its latest: it releases `held`.
  std::ofstream(crl_dir_ + "/00000000.r1")
      << CrlPem(*ca_, absl::Now() - absl::Minutes(1), {{other.serial, -1}});
  peers.Rescan();
  EXPECT_EQ(peers.crls_in_force(), 1u);
  EXPECT_TRUE(CheckAt(peers, held, absl::Now()).ok());
  EXPECT_EQ(CheckAt(peers, other, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
}

// A look at the directory that cannot read all of it keeps what was revoked before: a CRL file
// half written, or a CA file missing for a moment, releases nothing. Read whole again, the
// directory decides alone.
TEST_F(PeerCertificatesTest, ADirectoryReadOnlyInPartKeepsWhatWasRevoked) {
  const Leaf leaf = Issue(*ca_);
  absl::StatusOr<std::string> path = devpki::WriteCrl(*ca_, {leaf.serial}, crl_dir_);
  ASSERT_TRUE(path.ok()) << path.status();
  PeerCertificates peers(Options());
  ASSERT_EQ(CheckAt(peers, leaf, absl::Now()).code(), absl::StatusCode::kUnauthenticated);

  std::ofstream(*path, std::ios::trunc) << "-----BEGIN X509 CRL-----\nMIIB";  // cut short
  peers.Rescan();
  EXPECT_EQ(CheckAt(peers, leaf, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  std::filesystem::rename(dir_ + "/ca.crt", dir_ + "/ca.crt.moved");
  absl::SleepFor(absl::Milliseconds(1100));
  absl::StatusOr<std::string> none = devpki::CreateCrlPem(*ca_, {});
  ASSERT_TRUE(none.ok()) << none.status();
  std::ofstream(*path, std::ios::trunc) << *none;
  peers.Rescan();
  EXPECT_EQ(CheckAt(peers, leaf, absl::Now()).code(), absl::StatusCode::kUnauthenticated)
      << "released by a CRL no CA could verify";
  std::filesystem::rename(dir_ + "/ca.crt.moved", dir_ + "/ca.crt");
  peers.Rescan();
  EXPECT_TRUE(CheckAt(peers, leaf, absl::Now()).ok());
  EXPECT_EQ(peers.revoked(), 0u);
}

// A look that could not read all of the directory is tried again after `partial_retry`, even
// when no file seems to have changed: here a CRL file read half written, then completed within
// the same size and time stamp, which the rescans alone (by name, size and time) never read again.
TEST_F(PeerCertificatesTest, ALookThatReadPartOfTheDirectoryIsTriedAgain) {
  const Leaf leaf = Issue(*ca_);
  absl::StatusOr<std::string> crl = devpki::CreateCrlPem(*ca_, {leaf.serial});
  ASSERT_TRUE(crl.ok()) << crl.status();
  const std::string path = crl_dir_ + "/00000000.r0";
  // As long as the CRL, but not one yet.
  std::ofstream(path) << std::string(crl->size(), '-');
  const auto stamp = std::filesystem::last_write_time(path);
  PeerCertificatesOptions options = Options();
  options.rescan = absl::Milliseconds(20);
  options.partial_retry = absl::Milliseconds(300);
  PeerCertificates peers(options);
  ASSERT_TRUE(CheckAt(peers, leaf, absl::Now()).ok()) << "nothing could be read yet";

  std::ofstream(path, std::ios::trunc) << *crl;
  std::filesystem::last_write_time(path, stamp);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  absl::Status checked;
  do {
    absl::SleepFor(absl::Milliseconds(20));
    checked = CheckAt(peers, leaf, absl::Now());
  } while (checked.ok() && absl::Now() < deadline);
  EXPECT_EQ(checked.code(), absl::StatusCode::kUnauthenticated) << checked;
  EXPECT_EQ(peers.crls_in_force(), 1u);
}

// A delta CRL (RFC 5280 5.2.4) lists what was revoked since its base: what it lists is refused,
// but as it is not the CA's whole list, it releases nothing the CA's latest CRL revoked, even
// issued later.
TEST_F(PeerCertificatesTest, ADeltaCrlRefusesWhatItListsAndReleasesNothing) {
  const Leaf in_base = Issue(*ca_);
  const Leaf in_delta = Issue(*ca_);
  const Leaf neither = Issue(*ca_);
  std::ofstream(crl_dir_ + "/00000000.r0")
      << CrlPem(*ca_, absl::Now() - absl::Hours(1), {{in_base.serial, -1}});
  std::ofstream(crl_dir_ + "/00000000.r1")
      << CrlPem(*ca_, absl::Now() - absl::Minutes(1), {{in_delta.serial, -1}}, nullptr,
                /*delta_of=*/1);
  PeerCertificates peers(Options());
  EXPECT_EQ(peers.crls_in_force(), 2u);
  EXPECT_EQ(CheckAt(peers, in_base, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckAt(peers, in_delta, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(CheckAt(peers, neither, absl::Now()).ok());
}

// A peer that sent its intermediate CA with its certificate is refused once its CA's CRL revokes
// the intermediate; its own certificate alone, which no CRL lists, is not. Of what it sent, only
// its issuers count: not the root, nor a CA that issued none of them.
TEST_F(PeerCertificatesTest, APeerWhoseIntermediateCaIsRevokedIsRefused) {
  devpki::CaOptions options;
  options.common_name = "medgate issuing CA";
  absl::StatusOr<devpki::Credential> intermediate = devpki::IssueIntermediateCa(*ca_, options);
  ASSERT_TRUE(intermediate.ok()) << intermediate.status();
  options.common_name = "medgate former issuing CA";
  absl::StatusOr<devpki::Credential> former = devpki::IssueIntermediateCa(*ca_, options);
  ASSERT_TRUE(former.ok()) << former.status();
  absl::StatusOr<std::string> intermediate_pem = intermediate->CertPem();
  absl::StatusOr<std::string> former_pem = former->CertPem();
  absl::StatusOr<std::string> root_pem = ca_->CertPem();
  ASSERT_TRUE(intermediate_pem.ok() && former_pem.ok() && root_pem.ok());
  const Leaf leaf = Issue(*intermediate);
  // As gRPC gives it; with the leaf first; with the root, and a CA that issued nothing of it.
  for (const std::string& chain :
       {*intermediate_pem, leaf.pem + *intermediate_pem,
        *former_pem + *intermediate_pem + *root_pem}) {
    PeerCertificates peers(Options());
    absl::StatusOr<std::shared_ptr<const PeerCertificate>> read = peers.Read(leaf.pem, chain);
    ASSERT_TRUE(read.ok()) << read.status();
    ASSERT_EQ((*read)->issuers.size(), 1u);
    EXPECT_EQ((*read)->issuers[0].serial_hex, intermediate->SerialHex());
    EXPECT_TRUE(peers.Check(**read, absl::Now()).ok());
  }

  ASSERT_TRUE(
      devpki::WriteCrl(*ca_, {intermediate->SerialHex(), former->SerialHex()}, crl_dir_).ok());
  PeerCertificates peers(Options());
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> read =
      peers.Read(leaf.pem, *intermediate_pem);
  ASSERT_TRUE(read.ok()) << read.status();
  absl::Status refused = peers.Check(**read, absl::Now());
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnauthenticated) << refused;
  EXPECT_THAT(std::string(refused.message()),
              HasSubstr(absl::StrCat("issuing CA (serial ", intermediate->SerialHex())));
  EXPECT_TRUE(CheckAt(peers, leaf, absl::Now()).ok()) << "the leaf alone is listed nowhere";
  // A revoked CA sent along that issued none of the peer's chain refuses nothing.
  const Leaf other = Issue(*ca_);
  read = peers.Read(other.pem, *former_pem);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(peers.Check(**read, absl::Now()).ok());

  // A chain is bounded: kMaxChain certificates are read, one more is refused, as is a chain
  // over kMaxChainBytes or one that does not parse.
  std::string chain;
  for (size_t i = 0; i < PeerCertificates::kMaxChain; ++i) chain += *former_pem;
  read = peers.Read(other.pem, chain);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(peers.Check(**read, absl::Now()).ok());
  chain += *former_pem;
  read = peers.Read(other.pem, chain);
  ASSERT_TRUE(read.ok()) << read.status();
  refused = peers.Check(**read, absl::Now());
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("over 16 certificates"));
  EXPECT_EQ(peers.Read(other.pem, std::string(PeerCertificates::kMaxChainBytes + 1, 'x'))
                .status()
                .code(),
            absl::StatusCode::kUnauthenticated);
  std::string cut = *former_pem;
  cut.replace(cut.size() / 2, 8, "!!!!!!!!");
  read = peers.Read(other.pem, *former_pem + cut);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_THAT(std::string(peers.Check(**read, absl::Now()).message()), HasSubstr("does not parse"));
}

// An entry whose reason is removeFromCRL releases its certificate (a hold lifted), as OpenSSL
// reads it; any other reason, or none, revokes.
TEST_F(PeerCertificatesTest, AnEntryRemovedFromTheCrlRevokesNothing) {
  const Leaf released = Issue(*ca_);
  const Leaf held = Issue(*ca_);
  const Leaf left = Issue(*ca_);
  std::ofstream(crl_dir_ + "/00000000.r0")
      << CrlPem(*ca_, absl::Now() - absl::Minutes(1),
                {{released.serial, CRL_REASON_REMOVE_FROM_CRL},
                 {held.serial, CRL_REASON_CERTIFICATE_HOLD},
                 {left.serial, -1}});
  PeerCertificates peers(Options());
  EXPECT_TRUE(CheckAt(peers, released, absl::Now()).ok());
  EXPECT_EQ(CheckAt(peers, held, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(CheckAt(peers, left, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(peers.revoked(), 2u);
}

// A CRL issued ahead of this host's clock (beyond 5 minutes of skew) releases nothing yet, and is
// read again once its time has come, though no file changed.
TEST_F(PeerCertificatesTest, ACrlIssuedInTheFutureCountsOnceItsTimeHasCome) {
  const Leaf held = Issue(*ca_);
  std::ofstream(crl_dir_ + "/00000000.r0")
      << CrlPem(*ca_, absl::Now() - absl::Hours(1), {{held.serial, CRL_REASON_CERTIFICATE_HOLD}});
  const absl::Time ahead = absl::Now() + absl::Minutes(5) + absl::Seconds(2);
  std::ofstream(crl_dir_ + "/00000000.r1") << CrlPem(*ca_, ahead, {});
  PeerCertificates peers(Options());
  EXPECT_EQ(CheckAt(peers, held, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  peers.Rescan();
  EXPECT_EQ(CheckAt(peers, held, absl::Now()).code(), absl::StatusCode::kUnauthenticated)
      << "released before its time";
  absl::SleepFor(ahead - absl::Minutes(5) - absl::Now() + absl::Milliseconds(500));
  peers.Rescan();
  EXPECT_TRUE(CheckAt(peers, held, absl::Now()).ok());
}

// Decoded certificates are kept up to the bound, then all forgotten, and read again as needed.
TEST_F(PeerCertificatesTest, KeptCertificatesAreBounded) {
  PeerCertificatesOptions options = Options();
  options.max_cached = 2;
  PeerCertificates peers(options);
  std::vector<Leaf> leaves = {Issue(*ca_), Issue(*ca_), Issue(*ca_)};
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> first = peers.Read(leaves[0].pem);
  ASSERT_TRUE(first.ok());
  absl::StatusOr<std::shared_ptr<const PeerCertificate>> again = peers.Read(leaves[0].pem);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(first->get(), again->get()) << "decoded a second time";
  EXPECT_EQ(peers.cached(), 1u);
  for (int round = 0; round < 2; ++round) {
    for (const Leaf& leaf : leaves) {
      absl::StatusOr<std::shared_ptr<const PeerCertificate>> read = peers.Read(leaf.pem);
      ASSERT_TRUE(read.ok()) << read.status();
      EXPECT_EQ((*read)->serial_hex, leaf.serial);
      EXPECT_LE(peers.cached(), 2u);
    }
  }
}

// The bounds on what is read: a CRL file over max_crl_bytes, or past the first max_crl_files
// (by name), is not read; the read is partial, and keeps what a whole read revoked before.
TEST_F(PeerCertificatesTest, CrlFilesBeyondTheBoundsAreNotRead) {
  const Leaf first = Issue(*ca_);
  const Leaf second = Issue(*ca_);
  std::ofstream(crl_dir_ + "/00000000.r0")
      << CrlPem(*ca_, absl::Now() - absl::Hours(1), {{first.serial, -1}});
  std::ofstream(crl_dir_ + "/00000000.r1")
      << CrlPem(*ca_, absl::Now() - absl::Hours(2), {{second.serial, -1}});
  PeerCertificatesOptions one_file = Options();
  one_file.max_crl_files = 1;
  PeerCertificates by_count(one_file);
  EXPECT_EQ(by_count.crls_in_force(), 1u);
  EXPECT_EQ(CheckAt(by_count, first, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(CheckAt(by_count, second, absl::Now()).ok()) << ".r1 was read";

  PeerCertificatesOptions small = Options();
  small.max_crl_bytes = 64;
  PeerCertificates by_size(small);
  EXPECT_EQ(by_size.crls_in_force(), 0u);
  EXPECT_TRUE(CheckAt(by_size, first, absl::Now()).ok());

  // Read whole first, then over the bound: what was revoked stays revoked.
  PeerCertificates whole(Options());
  ASSERT_EQ(CheckAt(whole, first, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
  std::ofstream(crl_dir_ + "/00000000.r0", std::ios::app) << std::string(17u << 20, '\n');
  whole.Rescan();
  EXPECT_EQ(CheckAt(whole, first, absl::Now()).code(), absl::StatusCode::kUnauthenticated);
}

// Without a CRL directory nothing is revoked, and nothing is read.
TEST_F(PeerCertificatesTest, NoCrlDirectoryRevokesNothing) {
  const Leaf leaf = Issue(*ca_);
  ASSERT_TRUE(devpki::WriteCrl(*ca_, {leaf.serial}, crl_dir_).ok());
  EXPECT_EQ(PeerCertificates(Options()).revoked(), 1u);
  PeerCertificatesOptions options = Options();
  options.crl_dir.clear();
  PeerCertificates peers(options);
  EXPECT_EQ(peers.crls_in_force(), 0u);
  EXPECT_TRUE(CheckAt(peers, leaf, absl::Now() + absl::Hours(2)).ok());
}

}  // namespace
}  // namespace medgate
