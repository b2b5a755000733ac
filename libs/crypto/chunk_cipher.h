// Encryption of a record's content chunk by chunk: AES-256-GCM under the record's data key, with
// the record id, the chunk's index and whether it is the last chunk bound as associated data.
#ifndef MEDGATE_LIBS_CRYPTO_CHUNK_CIPHER_H_
#define MEDGATE_LIBS_CRYPTO_CHUNK_CIPHER_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "libs/crypto/aes_gcm.h"

namespace medgate::crypto {

// Plaintext bytes per chunk, at most.
inline constexpr size_t kMaxChunkBytes = size_t{1} << 20;

// The associated data of one chunk. Because it names the record and the position, a chunk moved
// to another record or another index fails to authenticate; because it says whether the chunk is
// the last, a record cut short after any chunk (or extended past its last) is detected too.
std::string ChunkAad(absl::string_view record_id, uint32_t index, bool last);

// Seals one chunk of 1 to kMaxChunkBytes bytes (INVALID_ARGUMENT otherwise).
absl::StatusOr<std::string> EncryptChunk(const SecretKey& key, absl::string_view record_id,
                                         uint32_t index, bool last, absl::string_view plaintext);

// The plaintext of chunk `index` only if it authenticates as that chunk of that record with that
// last-chunk flag: DATA_LOSS naming the chunk otherwise (a sealed chunk longer than a 1 MiB
// chunk's is refused before decrypting). OpenSSL failing to set up is INTERNAL, not damage.
absl::StatusOr<std::string> DecryptChunk(const SecretKey& key, absl::string_view record_id,
                                         uint32_t index, bool last, absl::string_view sealed);

}  // namespace medgate::crypto

#endif  // MEDGATE_LIBS_CRYPTO_CHUNK_CIPHER_H_
