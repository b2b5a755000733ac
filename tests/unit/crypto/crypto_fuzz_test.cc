// Property tests of what the vault reads back from storage: a stored chunk, a wrapped key, or
// any sealed bytes, changed at random (bits flipped, bytes overwritten, cut, extended, spliced
// with another sealed message) or read in another place (another record, index, last-chunk
// flag, context or key) never decrypts: DATA_LOSS every time, and the untouched original
// always does. Seeded: a failure names the MEDGATE_FUZZ_SEED and MEDGATE_FUZZ_ROUNDS that replay
// it.
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "libs/crypto/aes_gcm.h"
#include "libs/crypto/chunk_cipher.h"
#include "libs/crypto/key_encryption_key.h"
#include "tests/support/fuzz.h"

namespace medgate::crypto {
namespace {

std::string RandomText(std::mt19937_64& rng, size_t n) {
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(testing::Uniform(rng, 0, 255));
  return out;
}

// `sealed` changed in one of several ways; never equal to it, nor to `other` (another sealing of
// the same plaintext, which is genuine).
std::string Altered(const std::string& sealed, const std::string& other, std::mt19937_64& rng) {
  std::string out = sealed;
  switch (testing::Uniform(rng, 0, 5)) {
    case 0:  // one bit
      out[testing::Uniform(rng, 0, out.size() - 1)] ^=
          static_cast<char>(1 << testing::Uniform(rng, 0, 7));
      break;
    case 1: {  // a few bytes overwritten with others
      const size_t at = testing::Uniform(rng, 0, out.size() - 1);
      for (size_t i = at; i < std::min(out.size(), at + testing::Uniform(rng, 1, 8)); ++i) {
        out[i] = static_cast<char>(out[i] ^ static_cast<char>(testing::Uniform(rng, 1, 255)));
      }
      break;
    }
    case 2:  // cut short
      out.resize(testing::Uniform(rng, 0, out.size() - 1));
      break;
    case 3:  // extended
      out += RandomText(rng, testing::Uniform(rng, 1, 32));
      break;
    case 4: {  // the head of one sealed message and the tail of another
      const size_t at = testing::Uniform(rng, 1, std::min(out.size(), other.size()) - 1);
      out = sealed.substr(0, at) + other.substr(at);
      break;
    }
    default:  // the tag moved to the front
      out = out.substr(out.size() - kTagBytes) + out.substr(0, out.size() - kTagBytes);
      break;
  }
  return out == sealed || out == other ? out + "x" : out;
}

TEST(CryptoFuzzTest, AChunkChangedOrReadElsewhereNeverDecrypts) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(500);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    const SecretKey key = *SecretKey::FromBytes(RandomText(rng, kKeyBytes));
    const std::string record_id = "rec-" + std::to_string(testing::Uniform(rng, 0, 1000000));
    const uint32_t index = static_cast<uint32_t>(testing::Uniform(rng, 0, 5000));
    const bool last = testing::Uniform(rng, 0, 1) == 1;
    const std::string plaintext = RandomText(rng, testing::Uniform(rng, 1, 3000));
    absl::StatusOr<std::string> sealed = EncryptChunk(key, record_id, index, last, plaintext);
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    absl::StatusOr<std::string> other = EncryptChunk(key, record_id, index, last, plaintext);
    ASSERT_TRUE(other.ok()) << other.status();

    absl::StatusOr<std::string> whole = DecryptChunk(key, record_id, index, last, *sealed);
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_EQ(*whole, plaintext);

    std::string bytes = *sealed;
    std::string id = record_id;
    uint32_t at = index;
    bool is_last = last;
    SecretKey under = key;
    switch (testing::Uniform(rng, 0, 4)) {
      case 0:
        bytes = Altered(*sealed, *other, rng);
        break;
      case 1:
        id = record_id + std::string(1, static_cast<char>(testing::Uniform(rng, 0, 255)));
        break;
      case 2:
        at = index ^ static_cast<uint32_t>(1u << testing::Uniform(rng, 0, 31));
        break;
      case 3:
        is_last = !last;
        break;
      default:
        under = *SecretKey::FromBytes(RandomText(rng, kKeyBytes));
        break;
    }
    absl::StatusOr<std::string> read = DecryptChunk(under, id, at, is_last, bytes);
    EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss) << read.status();
    if (HasFailure()) break;
  }
}

TEST(CryptoFuzzTest, AWrappedKeyChangedOrReadForAnotherOwnerNeverUnwraps) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(500);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    LocalKeyEncryptionKey kek(*SecretKey::FromBytes(RandomText(rng, kKeyBytes)));
    const SecretKey data_key = *SecretKey::FromBytes(RandomText(rng, kKeyBytes));
    const std::string context = "patient-" + std::to_string(testing::Uniform(rng, 0, 1000000));
    absl::StatusOr<std::string> wrapped = kek.Wrap(data_key, context);
    ASSERT_TRUE(wrapped.ok()) << wrapped.status();
    absl::StatusOr<std::string> other = kek.Wrap(data_key, context);
    ASSERT_TRUE(other.ok()) << other.status();
    absl::StatusOr<SecretKey> whole = kek.Unwrap(*wrapped, context);
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_EQ(whole->bytes(), data_key.bytes());

    absl::StatusOr<SecretKey> read;
    switch (testing::Uniform(rng, 0, 2)) {
      case 0:
        read = kek.Unwrap(Altered(*wrapped, *other, rng), context);
        break;
      case 1:
        read = kek.Unwrap(
            *wrapped, context + std::string(1, static_cast<char>(testing::Uniform(rng, 0, 255))));
        break;
      default: {
        LocalKeyEncryptionKey another(*SecretKey::FromBytes(RandomText(rng, kKeyBytes)));
        read = another.Unwrap(*wrapped, context);
        break;
      }
    }
    EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss) << read.status();
    if (HasFailure()) break;
  }
}

// Bytes that were never sealed, of any length, are refused as damage, not read past or crashed on.
TEST(CryptoFuzzTest, BytesNeverSealedAreDataLoss) {
  const uint64_t seed = testing::FuzzSeed();
  const int rounds = testing::FuzzRounds(2000);
  const SecretKey key = SecretKey::Random();
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(testing::FuzzReplay(seed, round));
    std::mt19937_64 rng = testing::FuzzRng(seed, round);
    std::string bytes = RandomText(rng, testing::Uniform(rng, 0, 80));
    if (!bytes.empty() && testing::Uniform(rng, 0, 1) == 1)
      bytes[0] = 1;  // the format's version byte
    EXPECT_EQ(Open(key, "aad", bytes).status().code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(DecryptChunk(key, "rec", 0, true, bytes).status().code(),
              absl::StatusCode::kDataLoss);
    if (HasFailure()) break;
  }
}

}  // namespace
}  // namespace medgate::crypto
