// AES-256-GCM sealing with OpenSSL EVP, and the 256-bit secret keys it takes.
#ifndef MEDGATE_LIBS_CRYPTO_AES_GCM_H_
#define MEDGATE_LIBS_CRYPTO_AES_GCM_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace medgate::crypto {

inline constexpr size_t kKeyBytes = 32;
inline constexpr size_t kNonceBytes = 12;
inline constexpr size_t kTagBytes = 16;
// A sealed message: format version (1 byte) || nonce || ciphertext || tag.
inline constexpr size_t kSealOverheadBytes = 1 + kNonceBytes + kTagBytes;
// EVP takes int lengths; nothing medgate seals comes close.
inline constexpr size_t kMaxSealBytes = size_t{1} << 30;

// A 256-bit key. Its bytes are wiped when it is destroyed; it is never logged or printed.
class SecretKey {
 public:
  // A fresh key from OpenSSL's CSPRNG.
  static SecretKey Random();
  // INVALID_ARGUMENT unless `bytes` is exactly 32 bytes.
  static absl::StatusOr<SecretKey> FromBytes(absl::string_view bytes);

  SecretKey(const SecretKey& other) = default;
  SecretKey& operator=(const SecretKey& other) = default;
  ~SecretKey();

  absl::string_view bytes() const {
    return absl::string_view(reinterpret_cast<const char*>(bytes_.data()), bytes_.size());
  }
  const uint8_t* data() const { return bytes_.data(); }

 private:
  SecretKey() = default;
  std::array<uint8_t, kKeyBytes> bytes_{};
};

// `n` bytes from OpenSSL's CSPRNG.
std::string RandomBytes(size_t n);

// Encrypts and authenticates `plaintext`, and authenticates `aad`, under a fresh random nonce.
// INVALID_ARGUMENT for a plaintext over kMaxSealBytes; INTERNAL if OpenSSL fails.
absl::StatusOr<std::string> Seal(const SecretKey& key, absl::string_view aad,
                                 absl::string_view plaintext);

// The plaintext of a Seal() output, only if it authenticates under `key` and `aad`: otherwise
// DATA_LOSS (altered, truncated, another key or another aad); no partial plaintext is returned.
absl::StatusOr<std::string> Open(const SecretKey& key, absl::string_view aad,
                                 absl::string_view sealed);

}  // namespace medgate::crypto

#endif  // MEDGATE_LIBS_CRYPTO_AES_GCM_H_
