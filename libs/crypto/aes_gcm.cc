// AES-256-GCM sealing with OpenSSL EVP.
#include "libs/crypto/aes_gcm.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace medgate::crypto {
namespace {

constexpr char kFormatV1 = 0x01;

struct CtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter>;

unsigned char* Bytes(std::string& s, size_t offset) {
  return reinterpret_cast<unsigned char*>(s.data()) + offset;
}
const unsigned char* Bytes(absl::string_view s, size_t offset = 0) {
  return reinterpret_cast<const unsigned char*>(s.data()) + offset;
}

}  // namespace

SecretKey SecretKey::Random() {
  SecretKey key;
  // RAND_bytes fails only when the CSPRNG cannot be seeded: no key is better than a weak one.
  if (RAND_bytes(key.bytes_.data(), static_cast<int>(key.bytes_.size())) != 1) std::abort();
  return key;
}

absl::StatusOr<SecretKey> SecretKey::FromBytes(absl::string_view bytes) {
  if (bytes.size() != kKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a key is ", kKeyBytes, " bytes, got ", bytes.size()));
  }
  SecretKey key;
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(key.bytes_.data()));
  return key;
}

SecretKey::~SecretKey() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (n > 0 && RAND_bytes(Bytes(out, 0), static_cast<int>(n)) != 1) std::abort();
  return out;
}

absl::StatusOr<std::string> Seal(const SecretKey& key, absl::string_view aad,
                                 absl::string_view plaintext) {
  if (plaintext.size() > kMaxSealBytes || aad.size() > kMaxSealBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxSealBytes, " bytes are sealed at once"));
  }
  std::string out(kSealOverheadBytes + plaintext.size(), '\0');
  out[0] = kFormatV1;
  if (RAND_bytes(Bytes(out, 1), kNonceBytes) != 1) return absl::InternalError("RAND_bytes failed");
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  const size_t body = 1 + kNonceBytes;
  if (!ctx || EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, kNonceBytes, nullptr) != 1 ||
      EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), Bytes(out, 1)) != 1 ||
      (!aad.empty() && EVP_EncryptUpdate(ctx.get(), nullptr, &len, Bytes(aad),
                                         static_cast<int>(aad.size())) != 1) ||
      EVP_EncryptUpdate(ctx.get(), Bytes(out, body), &len, Bytes(plaintext),
                        static_cast<int>(plaintext.size())) != 1) {
    return absl::InternalError("AES-256-GCM encryption failed");
  }
  int final_len = 0;
  if (EVP_EncryptFinal_ex(ctx.get(), Bytes(out, body + static_cast<size_t>(len)), &final_len) !=
          1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagBytes,
                          Bytes(out, body + plaintext.size())) != 1) {
    return absl::InternalError("AES-256-GCM encryption failed");
  }
  return out;
}

absl::StatusOr<std::string> Open(const SecretKey& key, absl::string_view aad,
                                 absl::string_view sealed) {
  if (sealed.size() < kSealOverheadBytes || sealed.size() > kMaxSealBytes + kSealOverheadBytes) {
    return absl::DataLossError("sealed data has an impossible length");
  }
  if (sealed[0] != kFormatV1) return absl::DataLossError("sealed data has an unknown format");
  const size_t text_len = sealed.size() - kSealOverheadBytes;
  const size_t body = 1 + kNonceBytes;
  std::string out(text_len, '\0');
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  // The tag is checked by EVP_DecryptFinal_ex; the output is discarded unless it passes.
  std::string tag(sealed.substr(body + text_len, kTagBytes));
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, kNonceBytes, nullptr) != 1 ||
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), Bytes(sealed, 1)) != 1 ||
      (!aad.empty() && EVP_DecryptUpdate(ctx.get(), nullptr, &len, Bytes(aad),
                                         static_cast<int>(aad.size())) != 1) ||
      EVP_DecryptUpdate(ctx.get(), Bytes(out, 0), &len, Bytes(sealed, body),
                        static_cast<int>(text_len)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagBytes, tag.data()) != 1) {
    // What was decrypted before the failure is unauthenticated (and, for a wrapped key, key
    // bytes): wiped as after a failed tag.
    OPENSSL_cleanse(out.data(), out.size());
    return absl::InternalError("AES-256-GCM decryption failed");
  }
  int final_len = 0;
  if (EVP_DecryptFinal_ex(ctx.get(), Bytes(out, static_cast<size_t>(len)), &final_len) != 1) {
    OPENSSL_cleanse(out.data(), out.size());
    return absl::DataLossError("authentication failed");
  }
  return out;
}

}  // namespace medgate::crypto
