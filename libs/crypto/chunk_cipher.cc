// Chunk encryption of record content.
#include "libs/crypto/chunk_cipher.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace medgate::crypto {
namespace {

constexpr absl::string_view kChunkAadLabel = "medgate-record-chunk-v1";

void AppendU32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8)
    out.push_back(static_cast<char>((v >> shift) & 0xff));
}

}  // namespace

std::string ChunkAad(absl::string_view record_id, uint32_t index, bool last) {
  // Length-prefixed fields, so no two (record, index, last) triples share an encoding.
  std::string aad;
  aad.reserve(kChunkAadLabel.size() + record_id.size() + 13);
  aad.append(kChunkAadLabel.data(), kChunkAadLabel.size());
  AppendU32(aad, static_cast<uint32_t>(record_id.size()));
  aad.append(record_id.data(), record_id.size());
  AppendU32(aad, index);
  aad.push_back(last ? '\1' : '\0');
  return aad;
}

absl::StatusOr<std::string> EncryptChunk(const SecretKey& key, absl::string_view record_id,
                                         uint32_t index, bool last, absl::string_view plaintext) {
  if (plaintext.empty() || plaintext.size() > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a chunk is 1 to ", kMaxChunkBytes, " bytes, got ", plaintext.size()));
  }
  return Seal(key, ChunkAad(record_id, index, last), plaintext);
}

absl::StatusOr<std::string> DecryptChunk(const SecretKey& key, absl::string_view record_id,
                                         uint32_t index, bool last, absl::string_view sealed) {
  if (sealed.size() > kMaxChunkBytes + kSealOverheadBytes) {
    return absl::DataLossError(absl::StrCat("chunk ", index, " is ", sealed.size(),
                                            " bytes sealed, more than a chunk can be"));
  }
  absl::StatusOr<std::string> plaintext = Open(key, ChunkAad(record_id, index, last), sealed);
  // Only a chunk that does not authenticate is damaged; OpenSSL failing to set up is not.
  if (!plaintext.ok() && plaintext.status().code() != absl::StatusCode::kDataLoss) {
    return plaintext.status();
  }
  if (!plaintext.ok()) {
    return absl::DataLossError(absl::StrCat("chunk ", index, " does not authenticate (",
                                            plaintext.status().message(), ")"));
  }
  if (plaintext->empty() || plaintext->size() > kMaxChunkBytes) {
    return absl::DataLossError(absl::StrCat("chunk ", index, " has an impossible size"));
  }
  return plaintext;
}

}  // namespace medgate::crypto
