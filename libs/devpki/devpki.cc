// Builds dev and test certificates with the OpenSSL 3 C API (no openssl CLI, no config files).
#include "libs/devpki/devpki.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "libs/common/status_macros.h"

namespace medgate::devpki {
namespace {

using BioPtr = openssl::Bio;

// OpenSSL reports the cause on a thread-local queue; fold it into the status and leave the queue
// empty so a later, unrelated failure does not inherit stale entries.
absl::Status OpenSslError(absl::string_view what) {
  std::string detail;
  for (unsigned long code = ERR_get_error(); code != 0; code = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    absl::StrAppend(&detail, detail.empty() ? "" : "; ", buf);
  }
  return absl::InternalError(absl::StrCat("devpki: ", what, detail.empty() ? "" : ": ", detail));
}

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  std::string message = absl::StrCat("devpki: ", what, " ", path, ": ", std::strerror(err));
  return err == ENOENT ? absl::NotFoundError(message) : absl::InternalError(message);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  std::string content;
  char buf[8192];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      return ErrnoError("cannot read", path, err);
    }
    if (n == 0) break;
    content.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return content;
}

// Writes through a temporary file and rename, so a concurrent reader (or a rerun after a crash)
// sees the old content or the new, never a truncated PEM.
absl::Status WriteFileAtomically(const std::string& path, const std::string& content, mode_t mode) {
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = mkostemp(tmp.data(), O_CLOEXEC);  // Created 0600: a key is never briefly readable.
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  auto fail = [&](absl::string_view what) {
    int err = errno;
    close(fd);
    unlink(tmp.c_str());
    return ErrnoError(what, tmp, err);
  };
  if (fchmod(fd, mode) != 0) return fail("cannot chmod");
  size_t written = 0;
  while (written < content.size()) {
    ssize_t n = write(fd, content.data() + written, content.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail("cannot write");
    written += static_cast<size_t>(n);
  }
  if (close(fd) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    return ErrnoError("cannot close", tmp, err);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    unlink(tmp.c_str());
    return ErrnoError("cannot rename to", path, err);
  }
  return absl::OkStatus();
}

std::string BioContents(BIO* bio) {
  char* data = nullptr;
  long size = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(size));
}

// Never prompts on a terminal for a passphrase: dev keys are unencrypted, anything else is an
// error.
int NoPassphrase(char* /*buf*/, int /*size*/, int /*rwflag*/, void* /*userdata*/) { return 0; }

absl::StatusOr<EvpPkeyPtr> GenerateP256Key() {
  openssl::EvpPkeyCtx ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) <= 0 ||
      EVP_PKEY_CTX_set_group_name(ctx.get(), "P-256") <= 0) {
    return OpenSslError("cannot set up P-256 key generation");
  }
  EVP_PKEY* key = nullptr;
  if (EVP_PKEY_generate(ctx.get(), &key) <= 0) return OpenSslError("cannot generate P-256 key");
  return EvpPkeyPtr(key);
}

// 127 random bits, top bits set so the DER encoding is always 16 bytes and positive (RFC 5280
// allows up to 20 octets and asks for unpredictable serials).
absl::Status SetRandomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return OpenSslError("cannot draw a serial");
  bytes[0] = static_cast<unsigned char>((bytes[0] & 0x7f) | 0x40);
  openssl::Bignum bn(BN_bin2bn(bytes, sizeof(bytes), nullptr));
  if (bn == nullptr || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert)) == nullptr) {
    return OpenSslError("cannot set serial");
  }
  return absl::OkStatus();
}

absl::Status SetValidity(X509* cert, absl::Duration not_before, absl::Duration not_after) {
  if (not_after <= not_before) {
    return absl::InvalidArgumentError("devpki: not_after must come after not_before");
  }
  absl::Time now = absl::Now();
  if (ASN1_TIME_set(X509_getm_notBefore(cert), absl::ToTimeT(now + not_before)) == nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert), absl::ToTimeT(now + not_after)) == nullptr) {
    return OpenSslError("cannot set validity");
  }
  return absl::OkStatus();
}

absl::Status SetSubject(X509* cert, const std::string& common_name) {
  if (common_name.empty()) return absl::InvalidArgumentError("devpki: empty common name");
  X509_NAME* name = X509_get_subject_name(cert);
  auto add = [name](const char* field, const std::string& value) {
    return X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8,
                                      reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1,
                                      0) == 1;
  };
  if (!add("O", "medgate dev") || !add("CN", common_name)) {
    return OpenSslError("cannot set subject");
  }
  return absl::OkStatus();
}

// `issuer` may be `cert` itself (self-signed); the context uses it for authorityKeyIdentifier.
absl::Status AddExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  openssl::Extension ext(
      X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (ext == nullptr || X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpenSslError(absl::StrCat("cannot add extension ", OBJ_nid2sn(nid), "=", value));
  }
  return absl::OkStatus();
}

// Built as GENERAL_NAMEs rather than through the "URI:a,DNS:b" config syntax, so a value containing
// a comma cannot turn into a second name.
absl::Status AddSubjectAltNames(X509* cert, const LeafOptions& options) {
  if (options.uri_sans.empty() && options.dns_sans.empty() && options.ip_sans.empty()) {
    return absl::OkStatus();
  }
  openssl::GeneralNames names(sk_GENERAL_NAME_new_null());
  if (names == nullptr) return OpenSslError("cannot allocate SANs");
  auto push = [&names](int type, ASN1_STRING* value) -> absl::Status {
    openssl::GeneralName name(GENERAL_NAME_new());
    if (name == nullptr) {
      ASN1_STRING_free(value);
      return OpenSslError("cannot allocate SAN");
    }
    GENERAL_NAME_set0_value(name.get(), type, value);
    if (sk_GENERAL_NAME_push(names.get(), name.get()) == 0) return OpenSslError("cannot add SAN");
    name.release();  // Now owned by the stack.
    return absl::OkStatus();
  };
  auto push_ia5 = [&push](int type, const std::string& text) -> absl::Status {
    if (text.empty()) return absl::InvalidArgumentError("devpki: empty SAN");
    ASN1_IA5STRING* value = ASN1_IA5STRING_new();
    if (value == nullptr ||
        ASN1_STRING_set(value, text.data(), static_cast<int>(text.size())) != 1) {
      ASN1_IA5STRING_free(value);
      return OpenSslError("cannot encode SAN");
    }
    return push(type, value);
  };
  for (const std::string& uri : options.uri_sans) {
    RETURN_IF_ERROR(push_ia5(GEN_URI, uri));
  }
  for (const std::string& dns : options.dns_sans) {
    RETURN_IF_ERROR(push_ia5(GEN_DNS, dns));
  }
  for (const std::string& ip : options.ip_sans) {
    ASN1_OCTET_STRING* value = a2i_IPADDRESS(ip.c_str());
    if (value == nullptr) {
      ERR_clear_error();
      return absl::InvalidArgumentError(absl::StrCat("devpki: not an IP address: ", ip));
    }
    RETURN_IF_ERROR(push(GEN_IPADD, value));
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), /*crit=*/0, X509V3_ADD_DEFAULT) !=
      1) {
    return OpenSslError("cannot add subjectAltName");
  }
  return absl::OkStatus();
}

// The parts every certificate shares: fresh key, version 3, random serial, subject, validity.
absl::StatusOr<Credential> NewUnsignedCertificate(const std::string& common_name,
                                                  absl::Duration not_before,
                                                  absl::Duration not_after) {
  ASSIGN_OR_RETURN(EvpPkeyPtr key, GenerateP256Key());
  X509Ptr cert(X509_new());
  if (cert == nullptr || X509_set_version(cert.get(), X509_VERSION_3) != 1 ||
      X509_set_pubkey(cert.get(), key.get()) != 1) {
    return OpenSslError("cannot start certificate");
  }
  RETURN_IF_ERROR(SetRandomSerial(cert.get()));
  RETURN_IF_ERROR(SetSubject(cert.get(), common_name));
  RETURN_IF_ERROR(SetValidity(cert.get(), not_before, not_after));
  return Credential(std::move(key), std::move(cert));
}

}  // namespace

Credential::Credential(EvpPkeyPtr key, X509Ptr cert)
    : key_(std::move(key)), cert_(std::move(cert)) {}

absl::StatusOr<Credential> Credential::FromPem(const std::string& cert_pem,
                                               const std::string& key_pem) {
  BioPtr cert_bio(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
  BioPtr key_bio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  if (cert_bio == nullptr || key_bio == nullptr) return OpenSslError("cannot allocate BIO");
  X509Ptr cert(PEM_read_bio_X509(cert_bio.get(), nullptr, NoPassphrase, nullptr));
  if (cert == nullptr) return OpenSslError("cannot parse certificate PEM");
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, NoPassphrase, nullptr));
  if (key == nullptr) return OpenSslError("cannot parse private key PEM");
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError("devpki: private key does not match certificate");
  }
  return Credential(std::move(key), std::move(cert));
}

absl::StatusOr<Credential> Credential::ReadFiles(const std::string& cert_path,
                                                 const std::string& key_path) {
  ASSIGN_OR_RETURN(std::string cert_pem, ReadFile(cert_path));
  ASSIGN_OR_RETURN(std::string key_pem, ReadFile(key_path));
  absl::StatusOr<Credential> credential = FromPem(cert_pem, key_pem);
  if (!credential.ok()) {
    return absl::Status(
        credential.status().code(),
        absl::StrCat(credential.status().message(), " (", cert_path, ", ", key_path, ")"));
  }
  return credential;
}

absl::StatusOr<std::string> Credential::CertPem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509(bio.get(), cert_.get()) != 1) {
    return OpenSslError("cannot encode certificate PEM");
  }
  return BioContents(bio.get());
}

absl::StatusOr<std::string> Credential::KeyPem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr ||
      PEM_write_bio_PrivateKey(bio.get(), key_.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return OpenSslError("cannot encode private key PEM");
  }
  return BioContents(bio.get());
}

std::string Credential::SerialHex() const {
  openssl::Bignum bn(
      ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert_.get()), nullptr));
  if (bn == nullptr) return "";
  char* hex = BN_bn2hex(bn.get());
  if (hex == nullptr) return "";
  std::string result(hex);
  OPENSSL_free(hex);
  return result;
}

std::vector<std::string> Credential::UriSans() const {
  std::vector<std::string> uris;
  openssl::GeneralNames names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert_.get(), NID_subject_alt_name, nullptr, nullptr)));
  if (names == nullptr) return uris;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
    if (name->type != GEN_URI) continue;
    const ASN1_IA5STRING* uri = name->d.uniformResourceIdentifier;
    uris.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)),
                      static_cast<size_t>(ASN1_STRING_length(uri)));
  }
  return uris;
}

absl::Status Credential::WriteFiles(const std::string& cert_path,
                                    const std::string& key_path) const {
  ASSIGN_OR_RETURN(std::string cert_pem, CertPem());
  ASSIGN_OR_RETURN(std::string key_pem, KeyPem());
  // Key first: a crash in between leaves a key without its certificate, which a rerun of
  // medgate-devpki treats as missing and reissues.
  RETURN_IF_ERROR(WriteFileAtomically(key_path, key_pem, 0600));
  return WriteFileAtomically(cert_path, cert_pem, 0644);
}

absl::StatusOr<Credential> CreateCa(const CaOptions& options) {
  ASSIGN_OR_RETURN(Credential ca, NewUnsignedCertificate(options.common_name, options.not_before,
                                                         options.not_after));
  X509* cert = ca.cert();
  if (X509_set_issuer_name(cert, X509_get_subject_name(cert)) != 1) {
    return OpenSslError("cannot set issuer");
  }
  // The subject key identifier must exist before leaves can point at it with their
  // authorityKeyIdentifier.
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"}}) {
    RETURN_IF_ERROR(AddExtension(cert, cert, nid, value));
  }
  if (X509_sign(cert, ca.key(), EVP_sha256()) <= 0) return OpenSslError("cannot sign CA");
  return ca;
}

absl::StatusOr<Credential> IssueIntermediateCa(const Credential& ca, const CaOptions& options) {
  ASSIGN_OR_RETURN(Credential intermediate,
                   NewUnsignedCertificate(options.common_name, options.not_before,
                                          options.not_after));
  X509* cert = intermediate.cert();
  if (X509_set_issuer_name(cert, X509_get_subject_name(ca.cert())) != 1) {
    return OpenSslError("cannot set issuer");
  }
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"},
                            std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    RETURN_IF_ERROR(AddExtension(cert, ca.cert(), nid, value));
  }
  if (X509_sign(cert, ca.key(), EVP_sha256()) <= 0) {
    return OpenSslError("cannot sign intermediate CA");
  }
  return intermediate;
}

absl::StatusOr<Credential> IssueLeaf(const Credential& ca, const LeafOptions& options) {
  ASSIGN_OR_RETURN(Credential leaf, NewUnsignedCertificate(options.common_name, options.not_before,
                                                           options.not_after));
  X509* cert = leaf.cert();
  if (X509_set_issuer_name(cert, X509_get_subject_name(ca.cert())) != 1) {
    return OpenSslError("cannot set issuer");
  }
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:FALSE"},
                            std::pair{NID_key_usage, "critical,digitalSignature"},
                            std::pair{NID_ext_key_usage, "serverAuth,clientAuth"},
                            std::pair{NID_subject_key_identifier, "hash"},
                            std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    RETURN_IF_ERROR(AddExtension(cert, ca.cert(), nid, value));
  }
  RETURN_IF_ERROR(AddSubjectAltNames(cert, options));
  if (X509_sign(cert, ca.key(), EVP_sha256()) <= 0) return OpenSslError("cannot sign leaf");
  return leaf;
}

absl::StatusOr<std::string> CreateCrlPem(const Credential& ca,
                                         const std::vector<std::string>& revoked_serials,
                                         absl::Duration next_update) {
  if (next_update <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("devpki: a CRL's next update must be ahead of now");
  }
  openssl::Crl crl(X509_CRL_new());
  if (crl == nullptr) return OpenSslError("cannot allocate CRL");
  const absl::Time now = absl::Now();
  openssl::Asn1Time last(
      ASN1_TIME_set(nullptr, absl::ToTimeT(now - absl::Hours(1))));
  openssl::Asn1Time next(
      ASN1_TIME_set(nullptr, absl::ToTimeT(now + next_update)));
  openssl::Asn1Time revoked_at(ASN1_TIME_set(nullptr, absl::ToTimeT(now)));
  if (last == nullptr || next == nullptr || revoked_at == nullptr ||
      X509_CRL_set_version(crl.get(), 1) != 1 ||  // v2
      X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(ca.cert())) != 1 ||
      X509_CRL_set1_lastUpdate(crl.get(), last.get()) != 1 ||
      X509_CRL_set1_nextUpdate(crl.get(), next.get()) != 1) {
    return OpenSslError("cannot set up CRL");
  }
  for (const std::string& serial : revoked_serials) {
    BIGNUM* raw = nullptr;
    if (serial.empty() || BN_hex2bn(&raw, serial.c_str()) != static_cast<int>(serial.size())) {
      BN_free(raw);
      ERR_clear_error();
      return absl::InvalidArgumentError(
          absl::StrCat("devpki: '", serial, "' is not a serial number in hex"));
    }
    openssl::Bignum bn(raw);
    openssl::Asn1Integer number(BN_to_ASN1_INTEGER(bn.get(), nullptr));
    X509_REVOKED* revoked = X509_REVOKED_new();
    if (number == nullptr || revoked == nullptr ||
        X509_REVOKED_set_serialNumber(revoked, number.get()) != 1 ||
        X509_REVOKED_set_revocationDate(revoked, revoked_at.get()) != 1 ||
        X509_CRL_add0_revoked(crl.get(), revoked) != 1) {
      X509_REVOKED_free(revoked);
      return OpenSslError("cannot add a revoked certificate to the CRL");
    }
  }
  if (X509_CRL_sort(crl.get()) != 1 || X509_CRL_sign(crl.get(), ca.key(), EVP_sha256()) <= 0) {
    return OpenSslError("cannot sign CRL");
  }
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509_CRL(bio.get(), crl.get()) != 1) {
    return OpenSslError("cannot encode CRL PEM");
  }
  return BioContents(bio.get());
}

absl::StatusOr<std::string> WriteCrl(const Credential& ca,
                                     const std::vector<std::string>& revoked_serials,
                                     const std::string& dir, absl::Duration next_update) {
  ASSIGN_OR_RETURN(std::string pem, CreateCrlPem(ca, revoked_serials, next_update));
  int ok = 0;
  const unsigned long hash =
      X509_NAME_hash_ex(X509_get_subject_name(ca.cert()), nullptr, nullptr, &ok);
  if (ok != 1) return OpenSslError("cannot hash the CA's name");
  char name[16];
  std::snprintf(name, sizeof(name), "%08lx", hash);
  for (int index = 0; index < 1000; ++index) {
    const std::string path = absl::StrCat(dir, "/", name, ".r", index);
    struct stat st;
    if (stat(path.c_str(), &st) == 0) continue;
    if (errno != ENOENT) return ErrnoError("cannot look at", path, errno);
    RETURN_IF_ERROR(WriteFileAtomically(path, pem, 0644));
    return path;
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("devpki: ", dir, " already holds 1000 CRLs of this CA; remove old ones"));
}

absl::Status CheckIssuedBy(const Credential& leaf, const Credential& ca, absl::Time at) {
  if (X509_verify(leaf.cert(), X509_get0_pubkey(ca.cert())) != 1) {
    ERR_clear_error();
    return absl::FailedPreconditionError("devpki: certificate is not signed by this CA");
  }
  time_t t = absl::ToTimeT(at);
  // X509_cmp_time answers -1 when the certificate's time is earlier than `t`, 1 when later, 0 when
  // it cannot tell; only a definite answer counts as valid.
  if (X509_cmp_time(X509_get0_notBefore(leaf.cert()), &t) != -1 ||
      X509_cmp_time(X509_get0_notAfter(leaf.cert()), &t) != 1) {
    return absl::FailedPreconditionError("devpki: certificate is outside its validity period");
  }
  return absl::OkStatus();
}

}  // namespace medgate::devpki
