// Owning pointers to OpenSSL objects, each freed by its own free function, for every library
// that holds them (identity, devpki).
#ifndef MEDGATE_LIBS_COMMON_OPENSSL_PTR_H_
#define MEDGATE_LIBS_COMMON_OPENSSL_PTR_H_

#include <climits>
#include <cstddef>
#include <memory>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "absl/strings/string_view.h"

namespace medgate::openssl {

template <auto kFree>
struct Free {
  template <typename T>
  void operator()(T* object) const {
    kFree(object);
  }
};

using Asn1Enumerated = std::unique_ptr<ASN1_ENUMERATED, Free<ASN1_ENUMERATED_free>>;
using Asn1Integer = std::unique_ptr<ASN1_INTEGER, Free<ASN1_INTEGER_free>>;
using Asn1Time = std::unique_ptr<ASN1_TIME, Free<ASN1_TIME_free>>;
using Bignum = std::unique_ptr<BIGNUM, Free<BN_free>>;
using Bio = std::unique_ptr<BIO, Free<BIO_free>>;
using Certificate = std::unique_ptr<X509, Free<X509_free>>;
using Crl = std::unique_ptr<X509_CRL, Free<X509_CRL_free>>;
using EvpPkey = std::unique_ptr<EVP_PKEY, Free<EVP_PKEY_free>>;
using EvpPkeyCtx = std::unique_ptr<EVP_PKEY_CTX, Free<EVP_PKEY_CTX_free>>;
using Extension = std::unique_ptr<X509_EXTENSION, Free<X509_EXTENSION_free>>;
using GeneralName = std::unique_ptr<GENERAL_NAME, Free<GENERAL_NAME_free>>;
using GeneralNames = std::unique_ptr<GENERAL_NAMES, Free<GENERAL_NAMES_free>>;

// A read-only memory BIO over `bytes`, which must outlive it; null if OpenSSL cannot make one
// (or `bytes` are over INT_MAX long).
inline Bio MemoryBio(absl::string_view bytes) {
  if (bytes.size() > static_cast<size_t>(INT_MAX)) return nullptr;
  return Bio(BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
}

}  // namespace medgate::openssl

#endif  // MEDGATE_LIBS_COMMON_OPENSSL_PTR_H_
