// Key wrapping under a local key-encryption key.
#include "libs/crypto/key_encryption_key.h"

#include <openssl/crypto.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "libs/common/log.h"
#include "libs/crypto/sha256.h"

namespace medgate::crypto {
namespace {

constexpr absl::string_view kWrapLabel = "medgate-kek-wrap-v1";
constexpr absl::string_view kIdLabel = "medgate-kek-id-v1";

std::string WrapAad(absl::string_view context) {
  return absl::StrCat(kWrapLabel, ":", context.size(), ":", context);
}

std::string IdOf(const SecretKey& kek) {
  Sha256 hasher;
  hasher.Update(kIdLabel);
  hasher.Update(kek.bytes());
  std::string digest = hasher.Finish();
  return absl::StrCat("local-", absl::BytesToHexString(absl::string_view(digest).substr(0, 8)));
}

bool IsHex(absl::string_view s) {
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

LocalKeyEncryptionKey::LocalKeyEncryptionKey(SecretKey kek) : kek_(kek), id_(IdOf(kek_)) {}

absl::StatusOr<std::string> LocalKeyEncryptionKey::Wrap(const SecretKey& key,
                                                        absl::string_view context) {
  return Seal(kek_, WrapAad(context), key.bytes());
}

absl::StatusOr<SecretKey> LocalKeyEncryptionKey::Unwrap(absl::string_view wrapped,
                                                        absl::string_view context) {
  absl::StatusOr<std::string> bytes = Open(kek_, WrapAad(context), wrapped);
  if (!bytes.ok()) {
    return absl::DataLossError(absl::StrCat("wrapped key does not unwrap under key-encryption key ",
                                            id_, " (another KEK, another owner, or altered)"));
  }
  absl::StatusOr<SecretKey> key = SecretKey::FromBytes(*bytes);
  OPENSSL_cleanse(bytes->data(), bytes->size());
  if (!key.ok()) return absl::DataLossError("wrapped key has an impossible length");
  return key;
}

absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> ParseHexKeyEncryptionKey(
    absl::string_view hex, absl::string_view source) {
  absl::string_view trimmed = absl::StripAsciiWhitespace(hex);
  if (trimmed.size() != 2 * kKeyBytes || !IsHex(trimmed)) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": a key-encryption key is ", 2 * kKeyBytes,
                     " hex digits (e.g. from `openssl rand -hex 32`)"));
  }
  std::string bytes = absl::HexStringToBytes(trimmed);
  absl::StatusOr<SecretKey> kek = SecretKey::FromBytes(bytes);
  OPENSSL_cleanse(bytes.data(), bytes.size());
  if (!kek.ok()) return kek.status();
  return std::unique_ptr<KeyEncryptionKey>(new LocalKeyEncryptionKey(*kek));
}

absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> LoadKeyEncryptionKeyFile(
    const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("key-encryption key file '", path, "' cannot be read"));
  }
  struct stat st {};
  if (stat(path.c_str(), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    log::Warning("kek_file_permissions",
                 {{"path", path}, {"detail", "readable by group or others; use mode 0600"}});
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> kek =
      ParseHexKeyEncryptionKey(text, absl::StrCat("key-encryption key file '", path, "'"));
  OPENSSL_cleanse(text.data(), text.size());
  return kek;
}

absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> LoadKeyEncryptionKeyEnv(const std::string& name) {
  const char* value = std::getenv(name.c_str());
  if (value == nullptr || *value == '\0') {
    return absl::NotFoundError(absl::StrCat("environment variable ", name, " is not set"));
  }
  return ParseHexKeyEncryptionKey(value, absl::StrCat("environment variable ", name));
}

}  // namespace medgate::crypto
