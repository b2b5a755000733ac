// Tests that every TLS connection a medgate binary makes, gRPC's included, releases its idle
// record buffers (libs/identity/tls_buffers.cc).
#include <dlfcn.h>
#include <openssl/ssl.h>

#include <memory>

#include <gtest/gtest.h>

namespace medgate {
namespace {

struct CtxFree {
  void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};
struct SslFree {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};

TEST(TlsBuffersTest, ConnectionsReleaseTheirBuffersWhenIdle) {
  std::unique_ptr<SSL_CTX, CtxFree> ctx(SSL_CTX_new(TLS_method()));
  ASSERT_NE(ctx, nullptr);
  std::unique_ptr<SSL, SslFree> ssl(SSL_new(ctx.get()));
  ASSERT_NE(ssl, nullptr);
  EXPECT_NE(SSL_get_mode(ssl.get()) & SSL_MODE_RELEASE_BUFFERS, 0u);

  // libssl's own SSL_new does not set the mode: the binary's definition is what sets it.
  using SslNew = SSL* (*)(SSL_CTX*);
  auto libssl_new = reinterpret_cast<SslNew>(dlsym(RTLD_NEXT, "SSL_new"));
  ASSERT_NE(libssl_new, nullptr);
  std::unique_ptr<SSL, SslFree> plain(libssl_new(ctx.get()));
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(SSL_get_mode(plain.get()) & SSL_MODE_RELEASE_BUFFERS, 0u);
}

TEST(TlsBuffersTest, LibrariesBindToTheBinarysDefinition) {
  // gRPC's calls to SSL_new resolve through the global scope, as this lookup does: it must find
  // the executable's exported definition, not libssl's.
  EXPECT_EQ(dlsym(RTLD_DEFAULT, "SSL_new"), reinterpret_cast<void*>(&SSL_new));
  EXPECT_NE(dlsym(RTLD_DEFAULT, "SSL_new"), dlsym(RTLD_NEXT, "SSL_new"));
}

}  // namespace
}  // namespace medgate
