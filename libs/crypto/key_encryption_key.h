// Key wrapping: data keys are stored only wrapped by a key-encryption key (KEK). The interface is
// what a KMS client would implement; LocalKeyEncryptionKey holds the KEK in process memory,
// loaded from a file or an environment variable.
#ifndef MEDGATE_LIBS_CRYPTO_KEY_ENCRYPTION_KEY_H_
#define MEDGATE_LIBS_CRYPTO_KEY_ENCRYPTION_KEY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "libs/crypto/aes_gcm.h"

namespace medgate::crypto {

// Thread-safe.
class KeyEncryptionKey {
 public:
  virtual ~KeyEncryptionKey() = default;

  // A stable, non-secret name of this KEK, stored next to each wrapped key so that a rotation
  // knows which keys to rewrap and a wrong KEK is reported as such.
  virtual const std::string& id() const = 0;

  // Wraps `key`. `context` (e.g. the owner's id) is authenticated with it, so a wrapped key
  // copied to another owner's row does not unwrap. A remote KMS may fail: UNAVAILABLE.
  virtual absl::StatusOr<std::string> Wrap(const SecretKey& key, absl::string_view context) = 0;

  // The key inside `wrapped`: DATA_LOSS if it was altered, wrapped for another context or by
  // another KEK; another code (INTERNAL, UNAVAILABLE) when it could not be tried.
  virtual absl::StatusOr<SecretKey> Unwrap(absl::string_view wrapped,
                                           absl::string_view context) = 0;
};

// AES-256-GCM key wrapping under a 256-bit KEK held in memory.
class LocalKeyEncryptionKey final : public KeyEncryptionKey {
 public:
  // The id is derived from the KEK (a truncated SHA-256 of a labelled copy), so the same KEK has
  // the same id everywhere and the id reveals nothing usable about the key.
  explicit LocalKeyEncryptionKey(SecretKey kek);

  const std::string& id() const override { return id_; }
  absl::StatusOr<std::string> Wrap(const SecretKey& key, absl::string_view context) override;
  absl::StatusOr<SecretKey> Unwrap(absl::string_view wrapped, absl::string_view context) override;

 private:
  const SecretKey kek_;
  const std::string id_;
};

// A KEK written as 64 hex digits (surrounding whitespace ignored), e.g. by `openssl rand -hex 32`.
// INVALID_ARGUMENT naming `source` for anything else; the value itself is never echoed.
absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> ParseHexKeyEncryptionKey(
    absl::string_view hex, absl::string_view source);

// Reads the KEK from a file (NOT_FOUND if it cannot be read).
absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> LoadKeyEncryptionKeyFile(const std::string& path);

// Reads the KEK from an environment variable (NOT_FOUND if unset or empty), then overwrites its
// value in the environment and removes the variable: it is read once, is not inherited by child
// processes, and no longer shows in /proc/PID/environ. It writes the environment: call it before
// any other thread starts.
absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> LoadKeyEncryptionKeyEnv(const std::string& name);

}  // namespace medgate::crypto

#endif  // MEDGATE_LIBS_CRYPTO_KEY_ENCRYPTION_KEY_H_
