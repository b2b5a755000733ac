// Unit tests of AES-256-GCM sealing and SHA-256.
#include "libs/crypto/aes_gcm.h"

#include <gtest/gtest.h>

#include "absl/strings/escaping.h"
#include "libs/crypto/sha256.h"

namespace medgate::crypto {
namespace {

TEST(AesGcmTest, RoundTripsAndNeverRepeatsCiphertext) {
  SecretKey key = SecretKey::Random();
  const std::string plaintext = "discharge letter, page 1";
  auto a = Seal(key, "aad", plaintext);
  auto b = Seal(key, "aad", plaintext);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), plaintext.size() + kSealOverheadBytes);
  EXPECT_NE(*a, *b);  // fresh nonce each time
  EXPECT_EQ(a->find(plaintext), std::string::npos);
  auto opened = Open(key, "aad", *a);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, plaintext);
  auto empty = Seal(key, "", "");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*Open(key, "", *empty), "");
}

TEST(AesGcmTest, AnyAlteredByteOrOtherKeyOrAadIsDataLoss) {
  SecretKey key = SecretKey::Random();
  auto sealed = Seal(key, "aad", "0123456789abcdef");
  ASSERT_TRUE(sealed.ok());
  for (size_t i = 0; i < sealed->size(); ++i) {
    std::string altered = *sealed;
    altered[i] = static_cast<char>(altered[i] ^ 0x01);
    EXPECT_EQ(Open(key, "aad", altered).status().code(), absl::StatusCode::kDataLoss) << i;
  }
  EXPECT_EQ(Open(SecretKey::Random(), "aad", *sealed).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Open(key, "aae", *sealed).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Open(key, "aad", sealed->substr(0, sealed->size() - 1)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(Open(key, "aad", "short").status().code(), absl::StatusCode::kDataLoss);
}

TEST(AesGcmTest, KeysComeOnlyInTheirSize) {
  EXPECT_EQ(SecretKey::FromBytes(std::string(31, 'k')).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto key = SecretKey::FromBytes(std::string(32, 'k'));
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(key->bytes(), std::string(32, 'k'));
  EXPECT_NE(SecretKey::Random().bytes(), SecretKey::Random().bytes());
  EXPECT_EQ(RandomBytes(17).size(), 17u);
}

TEST(Sha256Test, MatchesKnownDigestsIncrementally) {
  EXPECT_EQ(absl::BytesToHexString(Sha256::Of("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Sha256 hasher;
  hasher.Update("a");
  hasher.Update("");
  hasher.Update("bc");
  EXPECT_EQ(absl::BytesToHexString(hasher.Finish()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Finish starts over.
  hasher.Update("abc");
  EXPECT_EQ(hasher.Finish(), Sha256::Of("abc"));
}

}  // namespace
}  // namespace medgate::crypto
