// Incremental SHA-256, for hashing content that streams through in chunks.
#ifndef MEDGATE_LIBS_CRYPTO_SHA256_H_
#define MEDGATE_LIBS_CRYPTO_SHA256_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"

struct evp_md_ctx_st;

namespace medgate::crypto {

inline constexpr size_t kSha256Bytes = 32;

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(absl::string_view data);
  // The 32-byte digest of everything updated so far; the hasher starts over afterwards.
  std::string Finish();

  // The digest of `data` in one call.
  static std::string Of(absl::string_view data);

 private:
  struct Deleter {
    void operator()(evp_md_ctx_st* ctx) const;
  };
  std::unique_ptr<evp_md_ctx_st, Deleter> ctx_;
};

}  // namespace medgate::crypto

#endif  // MEDGATE_LIBS_CRYPTO_SHA256_H_
