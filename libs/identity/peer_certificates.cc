// Expiry and revocation of peer certificates, checked after the handshake.
#include "libs/identity/peer_certificates.h"

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <utility>
#include <vector>

#include <grpc/grpc_security_constants.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "libs/common/log.h"
#include "libs/common/openssl_ptr.h"
#include "libs/identity/principal.h"

namespace medgate {
namespace {

using openssl::Bio;
using openssl::Certificate;
using openssl::Crl;
using openssl::MemoryBio;

absl::Status Unauthenticated(absl::string_view why) {
  return absl::UnauthenticatedError(absl::StrCat("client identity refused: ", why));
}

// Upper-case hex, as BN_bn2hex prints it ("-" first for a negative serial, which no CA should
// issue but a CRL and a certificate then print alike).
std::string SerialHex(const ASN1_INTEGER* serial) {
  openssl::Bignum bn(ASN1_INTEGER_to_BN(serial, nullptr));
  if (bn == nullptr) return "";
  char* hex = BN_bn2hex(bn.get());
  if (hex == nullptr) return "";
  std::string out(hex);
  OPENSSL_free(hex);
  return out;
}

// OpenSSL's white space (ossl_isspace): what its canonical names trim and collapse.
bool IsNameSpace(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

// A string value as X509_NAME_cmp compares it: the text types as UTF-8 with white space trimmed,
// inner runs of it one space, and ASCII letters in lower case; other types as they are, with
// their type. Empty if it cannot be converted.
std::string CanonicalValue(const ASN1_STRING* value) {
  constexpr unsigned long kTextTypes = B_ASN1_UTF8STRING | B_ASN1_BMPSTRING |
                                       B_ASN1_UNIVERSALSTRING | B_ASN1_PRINTABLESTRING |
                                       B_ASN1_T61STRING | B_ASN1_IA5STRING |
                                       B_ASN1_VISIBLESTRING;
  const int type = ASN1_STRING_type(value);
  if ((ASN1_tag2bit(type) & kTextTypes) == 0) {
    const auto* data = reinterpret_cast<const char*>(ASN1_STRING_get0_data(value));
    const std::string raw(data, static_cast<size_t>(ASN1_STRING_length(value)));
    return absl::StrCat("t", type, ":", raw.size(), ":", raw);
  }
  unsigned char* converted = nullptr;
  const int length = ASN1_STRING_to_UTF8(&converted, value);
  if (length < 0) {
    ERR_clear_error();
    return "";
  }
  const std::unique_ptr<unsigned char, void (*)(unsigned char*)> utf8(
      converted, [](unsigned char* bytes) { OPENSSL_free(bytes); });
  absl::string_view text(reinterpret_cast<const char*>(utf8.get()), static_cast<size_t>(length));
  while (!text.empty() && IsNameSpace(text.front())) text.remove_prefix(1);
  while (!text.empty() && IsNameSpace(text.back())) text.remove_suffix(1);
  std::string canonical;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (IsNameSpace(c)) {
      canonical += ' ';
      while (i + 1 < text.size() && IsNameSpace(text[i + 1])) ++i;
    } else {
      canonical += c < 0x80 ? absl::ascii_tolower(static_cast<char>(c)) : static_cast<char>(c);
    }
  }
  return absl::StrCat("u:", canonical.size(), ":", canonical);
}

// The name as X509_NAME_cmp tells names apart, as bytes that read back one way only: its
// relative names in order, each the sorted set of its attributes (type and canonical value).
// OpenSSL keeps its own canonical encoding private. A CA's CRLs may spell its name otherwise than
// the certificates it issued (other string types, case or spacing) and still be its CRLs, as
// they are in a handshake. A value that cannot be read as text leaves the name's DER as it is.
std::string CanonicalName(const X509_NAME* name) {
  std::vector<std::vector<std::string>> relative_names;
  int set = -1;
  for (int i = 0; i < X509_NAME_entry_count(name); ++i) {
    const X509_NAME_ENTRY* entry = X509_NAME_get_entry(name, i);
    if (relative_names.empty() || X509_NAME_ENTRY_set(entry) != set) {
      relative_names.emplace_back();
      set = X509_NAME_ENTRY_set(entry);
    }
    const ASN1_OBJECT* object = X509_NAME_ENTRY_get_object(entry);
    const int oid_length = OBJ_obj2txt(nullptr, 0, object, /*no_name=*/1);
    std::string oid(oid_length > 0 ? static_cast<size_t>(oid_length) + 1 : 0, '\0');
    if (oid_length > 0 &&
        OBJ_obj2txt(oid.data(), static_cast<int>(oid.size()), object, /*no_name=*/1) ==
            oid_length) {
      oid.resize(static_cast<size_t>(oid_length));
    } else {
      oid.clear();
    }
    const std::string value = CanonicalValue(X509_NAME_ENTRY_get_data(entry));
    if (oid.empty() || value.empty()) {
      ERR_clear_error();
      const unsigned char* der = nullptr;
      size_t size = 0;
      if (X509_NAME_get0_der(name, &der, &size) != 1) return "";
      return absl::StrCat("der:", absl::string_view(reinterpret_cast<const char*>(der), size));
    }
    relative_names.back().push_back(absl::StrCat(oid.size(), ":", oid, value));
  }
  std::string key = absl::StrCat("name:", relative_names.size(), ":");
  for (std::vector<std::string>& attributes : relative_names) {
    std::sort(attributes.begin(), attributes.end());
    absl::StrAppend(&key, attributes.size(), ":");
    for (const std::string& attribute : attributes) absl::StrAppend(&key, attribute);
  }
  return key;
}

// The issuer's canonical name, then the serial's hex: the name's key is self-delimiting, so the
// pair reads back one way only.
// Kept as its SHA-256: a fixed 32 bytes, however long the name and the serial.
std::string RevokedKey(absl::string_view issuer, const ASN1_INTEGER* serial) {
  const std::string key = absl::StrCat(issuer, SerialHex(serial));
  std::string digest(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(),
         reinterpret_cast<unsigned char*>(digest.data()));
  return digest;
}

// A serial as a refusal prints it: at most 64 hex digits (RFC 5280 allows 40).
std::string PrintedSerial(const ASN1_INTEGER* serial) {
  std::string hex = SerialHex(serial);
  if (hex.size() > 64) hex = absl::StrCat(hex.substr(0, 64), "...");
  return hex;
}

absl::StatusOr<absl::Time> TimeOf(const ASN1_TIME* time) {
  struct tm tm {};
  if (time == nullptr || ASN1_TIME_to_tm(time, &tm) != 1) {
    return absl::InvalidArgumentError("an unreadable time");
  }
  return absl::FromTimeT(timegm(&tm));
}

// OpenSSL's hashed-directory names for CRLs: eight hex digits, ".r", a number.
bool IsCrlName(absl::string_view name) {
  if (name.size() < 11 || name.substr(8, 2) != ".r") return false;
  for (char c : name.substr(0, 8)) {
    if (!absl::ascii_isxdigit(c) || absl::ascii_isupper(c)) return false;
  }
  for (char c : name.substr(10)) {
    if (!absl::ascii_isdigit(c)) return false;
  }
  return true;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return in ? out.str() : std::string();
}

std::vector<Certificate> ReadCas(const std::string& path) {
  std::vector<Certificate> cas;
  const std::string pem = ReadAll(path);
  Bio bio = MemoryBio(pem);
  while (bio != nullptr) {
    Certificate ca(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (ca == nullptr) break;
    cas.push_back(std::move(ca));
  }
  ERR_clear_error();  // the end of the file reads as an error
  return cas;
}

void SkipCrl(const std::string& path, absl::string_view why) {
  log::Write(log::Level::kError, "crl_skipped", {{"path", path}, {"why", why}});
}

}  // namespace

struct PeerCertificates::Revocations {
  std::string fingerprint;
  absl::flat_hash_set<std::string> revoked;
  size_t crls = 0;
  // When the directory must be read again though no file changed: a partial read is tried again,
  // and a CRL issued in the future counts once its time has come.
  absl::Time read_again = absl::InfiniteFuture();
};

namespace {

constexpr absl::Duration kClockSkew = absl::Minutes(5);

// Whether the CRL entry releases its certificate rather than revoking it (RFC 5280 5.3.1).
bool RemovesFromCrl(const X509_REVOKED* entry) {
  openssl::Asn1Enumerated reason(static_cast<ASN1_ENUMERATED*>(
      X509_REVOKED_get_ext_d2i(entry, NID_crl_reason, nullptr, nullptr)));
  return reason != nullptr && ASN1_ENUMERATED_get(reason.get()) == CRL_REASON_REMOVE_FROM_CRL;
}

}  // namespace

PeerCertificates::PeerCertificates(PeerCertificatesOptions options)
    : options_(std::move(options)) {
  std::shared_ptr<const Revocations> first = options_.crl_dir.empty()
                                                 ? std::make_shared<const Revocations>()
                                                 : Scan(Fingerprint(), nullptr);
  {
    absl::MutexLock lock(&mu_);
    revocations_ = std::move(first);
  }
  if (!options_.crl_dir.empty() && options_.rescan > absl::ZeroDuration()) {
    rescanner_ = std::thread([this] { RescanLoop(); });
  }
}

PeerCertificates::~PeerCertificates() {
  stopping_.Notify();
  if (rescanner_.joinable()) rescanner_.join();
}

void PeerCertificates::RescanLoop() {
  while (!stopping_.WaitForNotificationWithTimeout(options_.rescan)) Rescan();
}

void PeerCertificates::Rescan() {
  if (options_.crl_dir.empty()) return;
  absl::MutexLock one_look(&rescan_mu_);
  std::shared_ptr<const Revocations> current;
  {
    absl::MutexLock lock(&mu_);
    current = revocations_;
  }
  const std::string fingerprint = Fingerprint();
  if (fingerprint == current->fingerprint && absl::Now() < current->read_again) return;
  std::shared_ptr<const Revocations> fresh = Scan(fingerprint, current.get());
  absl::MutexLock lock(&mu_);
  revocations_ = std::move(fresh);
}

absl::StatusOr<std::shared_ptr<const PeerCertificate>> PeerCertificates::Read(
    absl::string_view pem, absl::string_view chain) {
  if (chain.size() > kMaxChainBytes) {
    return Unauthenticated(absl::StrCat("the peer sent a certificate chain of over ",
                                        kMaxChainBytes, " bytes"));
  }
  // With a chain, the digest is of both: a PEM text ends each certificate with a line that no
  // certificate's text holds, so the two parts read back one way only.
  std::string digest(SHA256_DIGEST_LENGTH, '\0');
  {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> sha(EVP_MD_CTX_new(),
                                                               &EVP_MD_CTX_free);
    constexpr absl::string_view kSeparator = "\n--chain--\n";
    if (sha == nullptr || EVP_DigestInit_ex(sha.get(), EVP_sha256(), nullptr) != 1 ||
        EVP_DigestUpdate(sha.get(), pem.data(), pem.size()) != 1 ||
        (!chain.empty() &&
         (EVP_DigestUpdate(sha.get(), kSeparator.data(), kSeparator.size()) != 1 ||
          EVP_DigestUpdate(sha.get(), chain.data(), chain.size()) != 1)) ||
        EVP_DigestFinal_ex(sha.get(), reinterpret_cast<unsigned char*>(digest.data()),
                           nullptr) != 1) {
      ERR_clear_error();
      return Unauthenticated("cannot digest the peer certificate");
    }
  }
  {
    absl::MutexLock lock(&cache_mu_);
    auto it = by_digest_.find(digest);
    if (it != by_digest_.end()) return it->second;
  }
  absl::StatusOr<Certificate> cert = ReadPeerCertificate(pem);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<absl::Time> not_after = TimeOf(X509_get0_notAfter(cert->get()));
  if (!not_after.ok()) return Unauthenticated("cannot read the peer certificate's expiry");
  auto read = std::make_shared<PeerCertificate>();
  read->not_after = *not_after;
  read->serial_hex = PrintedSerial(X509_get0_serialNumber(cert->get()));
  read->revoked_key =
      RevokedKey(CanonicalName(X509_get_issuer_name(cert->get())),
                 X509_get0_serialNumber(cert->get()));
  if (!chain.empty()) {
    // What the peer sent with its certificate, at most kMaxChain certificates. A refusal is kept
    // as an answer too, so that a call does not parse the chain again.
    std::vector<Certificate> sent;
    Bio bio = MemoryBio(chain);
    while (bio != nullptr) {
      Certificate next(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
      if (next == nullptr) {
        // The end of the text reads as "no start line"; anything else is a certificate that
        // does not parse.
        const unsigned long error = ERR_peek_last_error();
        if (ERR_GET_REASON(error) != PEM_R_NO_START_LINE) {
          read->refusal = "a certificate of the chain the peer sent does not parse";
        }
        break;
      }
      if (sent.size() == kMaxChain) {
        read->refusal = absl::StrCat("the peer sent over ", kMaxChain,
                                     " certificates in its chain");
        break;
      }
      sent.push_back(std::move(next));
    }
    ERR_clear_error();
    // Of those, its issuers, from its certificate's up: a certificate the chain does not need
    // (an old intermediate left in a bundle), and the self-signed root, are not its issuers.
    X509* current = cert->get();
    for (size_t step = 0; step < sent.size() && read->refusal.empty(); ++step) {
      X509* issuer = nullptr;
      for (const Certificate& candidate : sent) {
        if (candidate.get() != current && X509_cmp(candidate.get(), current) != 0 &&
            X509_check_issued(candidate.get(), current) == X509_V_OK) {
          issuer = candidate.get();
          break;
        }
      }
      if (issuer == nullptr || X509_check_issued(issuer, issuer) == X509_V_OK) break;
      read->issuers.push_back({PrintedSerial(X509_get0_serialNumber(issuer)),
                               RevokedKey(CanonicalName(X509_get_issuer_name(issuer)),
                                          X509_get0_serialNumber(issuer))});
      current = issuer;
    }
  }
  absl::MutexLock lock(&cache_mu_);
  if (by_digest_.size() >= options_.max_cached) by_digest_.clear();
  by_digest_.emplace(std::move(digest), read);
  return read;
}

absl::StatusOr<std::shared_ptr<const PeerCertificate>> PeerCertificates::OfCall(
    const grpc::AuthContext& context) {
  std::vector<grpc::string_ref> pems = context.FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME);
  if (pems.size() != 1) return Unauthenticated("no verified client certificate");
  std::vector<grpc::string_ref> chains =
      context.FindPropertyValues(GRPC_X509_PEM_CERT_CHAIN_PROPERTY_NAME);
  if (chains.size() > 1) return Unauthenticated("more than one client certificate chain");
  absl::string_view chain;
  if (!chains.empty()) chain = absl::string_view(chains[0].data(), chains[0].size());
  return Read(absl::string_view(pems[0].data(), pems[0].size()), chain);
}

absl::Status PeerCertificates::Check(const PeerCertificate& certificate, absl::Time now) const {
  if (!certificate.refusal.empty()) return Unauthenticated(certificate.refusal);
  if (now > certificate.not_after) {
    return Unauthenticated(absl::StrCat(
        "the client certificate expired at ",
        absl::FormatTime(absl::RFC3339_sec, certificate.not_after, absl::UTCTimeZone()),
        ", after this connection was opened; connect again with a current one"));
  }
  if (options_.crl_dir.empty()) return absl::OkStatus();  // nothing can be revoked: no lock
  absl::ReaderMutexLock lock(&mu_);
  if (revocations_->revoked.contains(certificate.revoked_key)) {
    return Unauthenticated(absl::StrCat(
        "the client certificate (serial ", certificate.serial_hex,
        ") has been revoked by its CA's CRL since this connection was opened; this identity is "
        "no longer accepted"));
  }
  for (const PeerCertificate::Issuer& issuer : certificate.issuers) {
    if (revocations_->revoked.contains(issuer.revoked_key)) {
      return Unauthenticated(absl::StrCat(
          "the client certificate's issuing CA (serial ", issuer.serial_hex,
          ") has been revoked by its own CA's CRL since this connection was opened; no "
          "certificate it issued is accepted any more"));
    }
  }
  return absl::OkStatus();
}

PeerCertificates::CallCheck PeerCertificates::ForCall(const grpc::ServerContextBase& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return CallCheck(*this, Unauthenticated("no TLS peer"));
  return CallCheck(*this, OfCall(*auth));
}

absl::Status PeerCertificates::CallCheck::Check() const {
  if (!certificate_.ok()) return certificate_.status();
  return peers_.Check(**certificate_, absl::Now());
}

size_t PeerCertificates::cached() const {
  absl::MutexLock lock(&cache_mu_);
  return by_digest_.size();
}

size_t PeerCertificates::crls_in_force() const {
  absl::MutexLock lock(&mu_);
  return revocations_->crls;
}

size_t PeerCertificates::revoked() const {
  absl::MutexLock lock(&mu_);
  return revocations_->revoked.size();
}

// The CA file's and each CRL file's size and modification time, by name. A file replaced in place
// (a Kubernetes Secret's files are links into a directory swapped at once) changes its time.
std::string PeerCertificates::Fingerprint() const {
  std::error_code error;
  auto stamp = [&error](const std::filesystem::path& path) {
    const uintmax_t size = std::filesystem::file_size(path, error);
    const auto time = std::filesystem::last_write_time(path, error);
    return absl::StrCat(error ? "?" : "", size, "@", time.time_since_epoch().count());
  };
  std::vector<std::string> entries = {absl::StrCat("ca:", stamp(options_.ca_path))};
  for (std::filesystem::directory_iterator it(options_.crl_dir, error), end;
       !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (IsCrlName(name)) entries.push_back(absl::StrCat(name, ":", stamp(it->path())));
  }
  if (error) entries.push_back(absl::StrCat("error:", error.message()));
  std::sort(entries.begin() + 1, entries.end());
  return absl::StrJoin(entries, "|");
}

std::shared_ptr<const PeerCertificates::Revocations> PeerCertificates::Scan(
    const std::string& fingerprint, const Revocations* previous) const {
  auto scanned = std::make_shared<Revocations>();
  scanned->fingerprint = fingerprint;
  bool read_all = true;  // every file read, every CRL verified
  const std::vector<Certificate> cas = ReadCas(options_.ca_path);
  if (cas.empty()) {
    read_all = false;
    log::Write(log::Level::kError, "crl_ca_unreadable",
               {{"ca_path", options_.ca_path}, {"why", "no certificate could be read from it"}});
  }
  std::vector<std::filesystem::path> paths;
  std::error_code error;
  for (std::filesystem::directory_iterator it(options_.crl_dir, error), end;
       !error && it != end; it.increment(error)) {
    if (IsCrlName(it->path().filename().string())) paths.push_back(it->path());
  }
  if (error) {
    read_all = false;
    log::Write(log::Level::kError, "crl_dir_unreadable",
               {{"crl_dir", options_.crl_dir}, {"why", error.message()}});
  }
  std::sort(paths.begin(), paths.end());
  if (paths.size() > options_.max_crl_files) {
    read_all = false;
    log::Write(log::Level::kError, "crl_files_over_bound",
               {{"crl_dir", options_.crl_dir}, {"files", static_cast<uint64_t>(paths.size())},
                {"read", static_cast<uint64_t>(options_.max_crl_files)}});
    paths.resize(options_.max_crl_files);
  }
  // Of each CA's CRLs, the one issued last; those issued at the same second count together.
  struct Latest {
    absl::Time issued;
    std::vector<Crl> crls;
  };
  absl::flat_hash_map<std::string, Latest> by_issuer;  // CAs of ca_path, and others'
  std::vector<Crl> refuse_only;  // CRLs that may refuse but release nothing
  // Issuers of ca_path with a verified CRL, and those with CRLs none of them verifies.
  absl::flat_hash_set<std::string> verified_issuers;
  absl::flat_hash_set<std::string> unverified_issuers;
  const absl::Time now = absl::Now();
  for (const std::filesystem::path& path : paths) {
    const uintmax_t size = std::filesystem::file_size(path, error);
    if (error || size > options_.max_crl_bytes) {
      read_all = false;
      SkipCrl(path.string(), error ? error.message()
                                   : absl::StrCat("larger than ", options_.max_crl_bytes, " bytes"));
      continue;
    }
    const std::string pem = ReadAll(path.string());
    Bio bio = MemoryBio(pem);
    int read = 0;
    while (bio != nullptr) {
      Crl crl(PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr));
      if (crl == nullptr) break;
      ++read;
      const X509_NAME* issuer = X509_CRL_get_issuer(crl.get());
      // A CA whose key was replaced under the same name is in the file twice: either may sign.
      bool named = false;
      bool verified = false;
      for (const Certificate& ca : cas) {
        if (X509_NAME_cmp(X509_get_subject_name(ca.get()), issuer) != 0) continue;
        named = true;
        if (X509_CRL_verify(crl.get(), X509_get0_pubkey(ca.get())) == 1) {
          verified = true;
          break;
        }
      }
      ERR_clear_error();
      absl::StatusOr<absl::Time> issued = TimeOf(X509_CRL_get0_lastUpdate(crl.get()));
      openssl::Asn1Integer delta(static_cast<ASN1_INTEGER*>(
          X509_CRL_get_ext_d2i(crl.get(), NID_delta_crl, nullptr, nullptr)));
      absl::string_view refuse_only_why;
      if (named && !verified) {
        unverified_issuers.insert(CanonicalName(issuer));
        refuse_only_why = "its signature is not its issuer's";
      } else if (delta != nullptr) {
        refuse_only_why = "a delta CRL";
      } else if (!issued.ok()) {
        refuse_only_why = "its issue time cannot be read";
      } else if (*issued > now + kClockSkew) {
        refuse_only_why = "issued in the future (read again then)";
        scanned->read_again = std::min(scanned->read_again, *issued - kClockSkew);
      }
      if (verified) verified_issuers.insert(CanonicalName(issuer));
      if (!refuse_only_why.empty()) {
        SkipCrl(path.string(), absl::StrCat(refuse_only_why,
                                            ": what it lists is refused, it releases nothing"));
        refuse_only.push_back(std::move(crl));
        continue;
      }
      Latest& latest = by_issuer[CanonicalName(issuer)];
      if (latest.crls.empty() || *issued > latest.issued) {
        latest.issued = *issued;
        latest.crls.clear();
      } else if (*issued < latest.issued) {
        continue;
      }
      latest.crls.push_back(std::move(crl));
    }
    ERR_clear_error();
    if (read == 0) {
      read_all = false;
      SkipCrl(path.string(), "it holds no PEM CRL");
    }
  }
  auto add = [&scanned](const Crl& crl) {
    ++scanned->crls;
    const std::string issuer = CanonicalName(X509_CRL_get_issuer(crl.get()));
    STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl.get());
    for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
      const X509_REVOKED* entry = sk_X509_REVOKED_value(revoked, i);
      if (RemovesFromCrl(entry)) continue;
      scanned->revoked.insert(RevokedKey(issuer, X509_REVOKED_get0_serialNumber(entry)));
    }
  };
  for (const auto& [issuer, latest] : by_issuer) {
    for (const Crl& crl : latest.crls) add(crl);
  }
  for (const Crl& crl : refuse_only) add(crl);
  // A CRL under a CA's name that no CA verifies, while none of that CA's does: its real CRL may
  // be the file half written. (Beside a verified one, it is an old key's, or a forgery.)
  for (const std::string& issuer : unverified_issuers) {
    if (!verified_issuers.contains(issuer)) read_all = false;
  }
  if (!read_all) {
    if (previous != nullptr) {
      scanned->revoked.insert(previous->revoked.begin(), previous->revoked.end());
    }
    scanned->read_again = std::min(scanned->read_again, now + options_.partial_retry);
  }
  log::Write(log::Level::kInfo, "crls_loaded",
             {{"crl_dir", options_.crl_dir}, {"crls", static_cast<uint64_t>(scanned->crls)},
              {"revoked", static_cast<uint64_t>(scanned->revoked.size())},
              {"read_all", read_all}});
  return scanned;
}

}  // namespace medgate
