// Parses certificates with the OpenSSL C API for tests; see x509_inspect.h.
#include "tests/support/x509_inspect.h"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace medgate::test_support {
namespace {

struct Deleter {
  void operator()(BIO* bio) const { BIO_free(bio); }
  void operator()(X509* cert) const { X509_free(cert); }
  void operator()(X509_STORE* store) const { X509_STORE_free(store); }
  void operator()(X509_STORE_CTX* ctx) const { X509_STORE_CTX_free(ctx); }
  void operator()(GENERAL_NAMES* names) const { GENERAL_NAMES_free(names); }
};
template <typename T>
using Owned = std::unique_ptr<T, Deleter>;

absl::StatusOr<Owned<X509>> ParseCert(const std::string& pem) {
  Owned<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Owned<X509> cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (cert == nullptr) {
    ERR_clear_error();
    return absl::InvalidArgumentError("x509_inspect: cannot parse certificate PEM");
  }
  return cert;
}

std::string Ia5(const ASN1_IA5STRING* s) {
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<size_t>(ASN1_STRING_length(s)));
}

std::string IpText(const ASN1_OCTET_STRING* s) {
  char text[INET6_ADDRSTRLEN] = {};
  int length = ASN1_STRING_length(s);
  int family = length == 4 ? AF_INET : length == 16 ? AF_INET6 : 0;
  if (family == 0 || inet_ntop(family, ASN1_STRING_get0_data(s), text, sizeof(text)) == nullptr) {
    return absl::StrCat("(", length, "-byte address)");
  }
  return text;
}

}  // namespace

absl::StatusOr<SubjectAltNames> ReadSubjectAltNames(const std::string& cert_pem) {
  absl::StatusOr<Owned<X509>> cert = ParseCert(cert_pem);
  if (!cert.ok()) return cert.status();
  SubjectAltNames sans;
  Owned<GENERAL_NAMES> names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert->get(), NID_subject_alt_name, nullptr, nullptr)));
  if (names == nullptr) return sans;
  sans.present = true;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
    switch (name->type) {
      case GEN_URI:
        sans.uris.push_back(Ia5(name->d.uniformResourceIdentifier));
        break;
      case GEN_DNS:
        sans.dns.push_back(Ia5(name->d.dNSName));
        break;
      case GEN_IPADD:
        sans.ips.push_back(IpText(name->d.iPAddress));
        break;
      default:
        break;
    }
  }
  return sans;
}

absl::StatusOr<int> VerifyCertificate(const std::string& ca_pem, const std::string& cert_pem,
                                      bool as_client) {
  absl::StatusOr<Owned<X509>> ca = ParseCert(ca_pem);
  if (!ca.ok()) return ca.status();
  absl::StatusOr<Owned<X509>> cert = ParseCert(cert_pem);
  if (!cert.ok()) return cert.status();
  Owned<X509_STORE> store(X509_STORE_new());
  Owned<X509_STORE_CTX> ctx(X509_STORE_CTX_new());
  if (store == nullptr || ctx == nullptr || X509_STORE_add_cert(store.get(), ca->get()) != 1 ||
      X509_STORE_CTX_init(ctx.get(), store.get(), cert->get(), nullptr) != 1 ||
      X509_STORE_CTX_set_purpose(
          ctx.get(), as_client ? X509_PURPOSE_SSL_CLIENT : X509_PURPOSE_SSL_SERVER) != 1) {
    ERR_clear_error();
    return absl::InternalError("x509_inspect: cannot set up verification");
  }
  X509_verify_cert(ctx.get());
  int error = X509_STORE_CTX_get_error(ctx.get());
  ERR_clear_error();
  return error;
}

}  // namespace medgate::test_support
