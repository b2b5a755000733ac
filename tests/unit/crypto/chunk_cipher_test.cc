// Unit tests of record chunk encryption: a record's chunks cannot be altered, swapped, dropped,
// reordered or moved to another record without detection.
#include "libs/crypto/chunk_cipher.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace medgate::crypto {
namespace {

using ::testing::HasSubstr;

struct Sealed {
  std::vector<std::string> chunks;
};

// Encrypts `parts` as the chunks of `record_id`, the last one flagged.
Sealed EncryptAll(const SecretKey& key, const std::string& record_id,
                  const std::vector<std::string>& parts) {
  Sealed out;
  for (size_t i = 0; i < parts.size(); ++i) {
    auto c =
        EncryptChunk(key, record_id, static_cast<uint32_t>(i), i + 1 == parts.size(), parts[i]);
    EXPECT_TRUE(c.ok()) << c.status();
    out.chunks.push_back(*c);
  }
  return out;
}

// Decrypts the stored chunks the way a download does: by position, last flag on the final one.
absl::StatusOr<std::string> DecryptAll(const SecretKey& key, const std::string& record_id,
                                       const std::vector<std::string>& stored) {
  std::string out;
  for (size_t i = 0; i < stored.size(); ++i) {
    absl::StatusOr<std::string> p =
        DecryptChunk(key, record_id, static_cast<uint32_t>(i), i + 1 == stored.size(), stored[i]);
    if (!p.ok()) return p.status();
    out += *p;
  }
  return out;
}

class ChunkCipherTest : public ::testing::Test {
 protected:
  SecretKey key_ = SecretKey::Random();
  std::vector<std::string> parts_ = {std::string(kMaxChunkBytes, 'a'), std::string(1000, 'b'),
                                     "the end"};
};

TEST_F(ChunkCipherTest, RoundTripsAFullSizeChunkAndTheRest) {
  Sealed sealed = EncryptAll(key_, "fr-1.r1", parts_);
  EXPECT_EQ(sealed.chunks[0].size(), kMaxChunkBytes + kSealOverheadBytes);
  auto plain = DecryptAll(key_, "fr-1.r1", sealed.chunks);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(*plain, parts_[0] + parts_[1] + parts_[2]);
}

TEST_F(ChunkCipherTest, RefusesEmptyAndOversizedChunks) {
  EXPECT_EQ(EncryptChunk(key_, "r", 0, true, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncryptChunk(key_, "r", 0, true, std::string(kMaxChunkBytes + 1, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ChunkCipherTest, TamperedChunkIsDataLossNamingIt) {
  Sealed sealed = EncryptAll(key_, "r", parts_);
  sealed.chunks[1][40] = static_cast<char>(sealed.chunks[1][40] ^ 0x80);
  auto plain = DecryptAll(key_, "r", sealed.chunks);
  EXPECT_EQ(plain.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(plain.status().message()), HasSubstr("chunk 1"));
}

TEST_F(ChunkCipherTest, SwappedChunksAreDetected) {
  std::vector<std::string> parts = {"one", "two", "three"};
  Sealed sealed = EncryptAll(key_, "r", parts);
  std::swap(sealed.chunks[0], sealed.chunks[1]);
  EXPECT_EQ(DecryptAll(key_, "r", sealed.chunks).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ChunkCipherTest, ReorderedChunksAreDetected) {
  std::vector<std::string> parts = {"one", "two", "three", "four"};
  Sealed sealed = EncryptAll(key_, "r", parts);
  std::vector<std::string> reordered = {sealed.chunks[2], sealed.chunks[0], sealed.chunks[1],
                                        sealed.chunks[3]};
  EXPECT_EQ(DecryptAll(key_, "r", reordered).status().code(), absl::StatusCode::kDataLoss);
  // Moving the last chunk earlier fails too, on its position and on its last flag.
  std::vector<std::string> last_first = {sealed.chunks[3], sealed.chunks[1], sealed.chunks[2],
                                         sealed.chunks[0]};
  EXPECT_EQ(DecryptAll(key_, "r", last_first).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ChunkCipherTest, DroppedChunksAreDetected) {
  std::vector<std::string> parts = {"one", "two", "three"};
  Sealed sealed = EncryptAll(key_, "r", parts);
  // The last chunk dropped: the new last one was not sealed as last.
  std::vector<std::string> truncated = {sealed.chunks[0], sealed.chunks[1]};
  EXPECT_EQ(DecryptAll(key_, "r", truncated).status().code(), absl::StatusCode::kDataLoss);
  // A middle chunk dropped: the last one is now at the wrong index.
  std::vector<std::string> gap = {sealed.chunks[0], sealed.chunks[2]};
  EXPECT_EQ(DecryptAll(key_, "r", gap).status().code(), absl::StatusCode::kDataLoss);
  // Extra data past the last chunk: the old last is no longer last.
  std::vector<std::string> extended = {sealed.chunks[0], sealed.chunks[1], sealed.chunks[2],
                                       sealed.chunks[2]};
  EXPECT_EQ(DecryptAll(key_, "r", extended).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(ChunkCipherTest, ChunksDoNotMoveBetweenRecordsOrKeys) {
  std::vector<std::string> parts = {"same content"};
  Sealed a = EncryptAll(key_, "fr-1.a", parts);
  EXPECT_EQ(DecryptAll(key_, "fr-1.b", a.chunks).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecryptAll(SecretKey::Random(), "fr-1.a", a.chunks).status().code(),
            absl::StatusCode::kDataLoss);
  // Record ids are length-prefixed in the AAD: no id/index combination collides.
  EXPECT_NE(ChunkAad("r1", 0x00000102, false), ChunkAad("r", 0x31000001, false));
  EXPECT_NE(ChunkAad("r", 0, true), ChunkAad("r", 0, false));
}

}  // namespace
}  // namespace medgate::crypto
