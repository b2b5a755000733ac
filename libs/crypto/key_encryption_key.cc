// Key wrapping under a local key-encryption key.
#include "libs/crypto/key_encryption_key.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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
  // Only a key that does not authenticate is damaged; OpenSSL failing to set up is not.
  if (!bytes.ok() && bytes.status().code() != absl::StatusCode::kDataLoss) return bytes.status();
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
  // Without blocking: a FIFO at the path would hold the start in open() until someone writes.
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("key-encryption key file '", path,
                                            "' cannot be read: ", std::strerror(errno)));
  }
  // A key others may read unwraps every patient key; one they may write can be swapped for
  // theirs, under which new patient keys would be wrapped. Refused, not warned about.
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int error = errno;
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat("key-encryption key file '", path,
                                                      "' cannot be checked: ",
                                                      std::strerror(error)));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "key-encryption key file '", path, "' is not a regular file (a FIFO, a device or a "
        "directory); give the path of the file holding the key"));
  }
  // Owned by another account (root aside), the file is that account's to replace.
  if (st.st_uid != geteuid() && st.st_uid != 0) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "key-encryption key file '", path, "' is owned by uid ", st.st_uid, ", not by this "
        "service's (uid ", geteuid(), ") or root: another account could swap the key; chown it"));
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "key-encryption key file '", path, "' is open to its group or others (mode ",
        absl::StrFormat("%04o", st.st_mode & 07777), "); make it readable by its owner only "
        "(chmod 0400 or 0600)"));
  }
  // Read into one buffer of our own, wiped afterwards (a stream's buffers would be freed with
  // the key's digits in them). A KEK file is 64 hex digits and a newline; more than the buffer
  // holds is not one.
  std::array<char, 1024> text;
  size_t size = 0;
  ssize_t n = 0;
  while (size < text.size() &&
         ((n = read(fd, text.data() + size, text.size() - size)) > 0 || (n < 0 && errno == EINTR))) {
    if (n > 0) size += static_cast<size_t>(n);
  }
  const int read_errno = errno;
  close(fd);
  absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> kek;
  if (n < 0) {
    kek = absl::NotFoundError(absl::StrCat("key-encryption key file '", path,
                                           "' cannot be read: ", std::strerror(read_errno)));
  } else if (size == text.size()) {
    kek = absl::InvalidArgumentError(absl::StrCat("key-encryption key file '", path, "': over ",
                                                  text.size() - 1, " bytes, not a key"));
  } else {
    kek = ParseHexKeyEncryptionKey(absl::string_view(text.data(), size),
                                   absl::StrCat("key-encryption key file '", path, "'"));
  }
  OPENSSL_cleanse(text.data(), text.size());
  return kek;
}

absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> LoadKeyEncryptionKeyEnv(const std::string& name) {
  // The variable's own bytes in the environment, which /proc/PID/environ shows for the process's
  // initial environment, and which every child process would inherit.
  const std::string prefix = name + "=";
  std::vector<char*> values;  // the first is what getenv() answers; all are wiped
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, prefix.c_str(), prefix.size()) == 0) {
      values.push_back(*entry + prefix.size());
    }
  }
  if (values.empty() || *values.front() == '\0') {
    return absl::NotFoundError(absl::StrCat("environment variable ", name, " is not set"));
  }
  absl::StatusOr<std::unique_ptr<KeyEncryptionKey>> kek =
      ParseHexKeyEncryptionKey(values.front(), absl::StrCat("environment variable ", name));
  // Read once: the key is wiped from the environment, and the variable removed.
  for (char* value : values) OPENSSL_cleanse(value, std::strlen(value));
  ::unsetenv(name.c_str());
  return kek;
}

}  // namespace medgate::crypto
