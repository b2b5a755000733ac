// What the crypto library reports when OpenSSL itself fails (no cipher context: memory): not
// damage. A download or an erasure must not take a record that could not be decrypted *now* for
// one that never will be. This executable defines EVP_CIPHER_CTX_new in front of libcrypto's, for
// the library code linked into it, and can make the next calls fail.
#include <dlfcn.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <atomic>
#include <string>

#include "libs/crypto/aes_gcm.h"
#include "libs/crypto/chunk_cipher.h"
#include "libs/crypto/key_encryption_key.h"

namespace {

std::atomic<int> failures_armed{0};
std::atomic<int> contexts_made{0};

}  // namespace

extern "C" EVP_CIPHER_CTX* EVP_CIPHER_CTX_new() {
  using New = EVP_CIPHER_CTX* (*)();
  static const New libcrypto = reinterpret_cast<New>(dlsym(RTLD_NEXT, "EVP_CIPHER_CTX_new"));
  int armed = failures_armed.load();
  while (armed > 0) {
    if (failures_armed.compare_exchange_weak(armed, armed - 1)) return nullptr;
  }
  ++contexts_made;
  return libcrypto();
}

namespace medgate::crypto {
namespace {

using ::testing::HasSubstr;

class OpenSslFailureTest : public ::testing::Test {
 protected:
  void TearDown() override { failures_armed = 0; }
};

TEST_F(OpenSslFailureTest, TheInterposedContextIsTheOneTheLibraryUses) {
  const int before = contexts_made.load();
  ASSERT_TRUE(Seal(SecretKey::Random(), "aad", "text").ok());
  EXPECT_GT(contexts_made.load(), before);
  failures_armed = 1;
  EXPECT_EQ(Seal(SecretKey::Random(), "aad", "text").status().code(), absl::StatusCode::kInternal);
}

TEST_F(OpenSslFailureTest, AChunkNotDecryptedForWantOfAContextIsNotDamaged) {
  SecretKey key = SecretKey::Random();
  absl::StatusOr<std::string> sealed = EncryptChunk(key, "fr-1.r1", 0, true, "content");
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  failures_armed = 1;
  absl::StatusOr<std::string> plaintext = DecryptChunk(key, "fr-1.r1", 0, true, *sealed);
  EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kInternal) << plaintext.status();
  // The same chunk decrypts once OpenSSL can.
  plaintext = DecryptChunk(key, "fr-1.r1", 0, true, *sealed);
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(*plaintext, "content");
}

TEST_F(OpenSslFailureTest, AKeyNotUnwrappedForWantOfAContextIsNotDamaged) {
  auto kek = ParseHexKeyEncryptionKey(std::string(64, 'a'), "test");
  ASSERT_TRUE(kek.ok()) << kek.status();
  absl::StatusOr<std::string> wrapped = (*kek)->Wrap(SecretKey::Random(), "patient-key/p/k");
  ASSERT_TRUE(wrapped.ok()) << wrapped.status();
  failures_armed = 1;
  EXPECT_EQ((*kek)->Unwrap(*wrapped, "patient-key/p/k").status().code(),
            absl::StatusCode::kInternal);
  EXPECT_TRUE((*kek)->Unwrap(*wrapped, "patient-key/p/k").ok());
}

TEST_F(OpenSslFailureTest, AnOversizedSealedChunkIsRefusedBeforeDecrypting) {
  SecretKey key = SecretKey::Random();
  absl::StatusOr<std::string> sealed =
      Seal(key, ChunkAad("fr-1.r1", 0, true), std::string(kMaxChunkBytes + 1, 'x'));
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  const int before = contexts_made.load();
  absl::StatusOr<std::string> plaintext = DecryptChunk(key, "fr-1.r1", 0, true, *sealed);
  EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(plaintext.status().message()), HasSubstr("more than a chunk can be"));
  EXPECT_EQ(contexts_made.load(), before);  // nothing was decrypted
}

}  // namespace
}  // namespace medgate::crypto
