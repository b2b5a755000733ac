// Idle TLS connections give their record buffers back to the allocator, and no TLS session is
// resumed (below).
//
// OpenSSL gives every connection a read and a write record buffer of about 17 KiB each and keeps
// them for the connection's life. With SSL_MODE_RELEASE_BUFFERS it frees them whenever they are
// empty, which for a device stream sending a batch every few seconds is nearly all the time:
// 10,000 held device streams allocate about 390 MiB less (measured with bench/ingest_bench).
// gRPC creates its SSL objects itself and has no setting for this mode, so every medgate binary
// defines SSL_new: the dynamic linker binds every library's SSL_new calls to the executable's
// definition first, and this one makes the connection with libssl's SSL_new, then sets the mode.
// The definition is linked into each binary (see medgate_binary and medgate_test in the top-level
// CMakeLists.txt), which also exports it.
#include <dlfcn.h>
#include <openssl/ssl.h>

extern "C" SSL* SSL_new(SSL_CTX* ctx) {
  using SslNew = SSL* (*)(SSL_CTX*);
  static const SslNew libssl_new = reinterpret_cast<SslNew>(dlsym(RTLD_NEXT, "SSL_new"));
  if (libssl_new == nullptr) return nullptr;  // libssl not loaded: no connection can be made
  SSL* ssl = libssl_new(ctx);
  if (ssl != nullptr) {
    SSL_set_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
    // No session tickets: a resumed session skips the client certificate's verification, so a
    // certificate that has since expired would go on being accepted (the auth context keeps the
    // original one). Servers issue none; every connection verifies its certificate afresh.
    SSL_set_options(ssl, SSL_OP_NO_TICKET);
    SSL_set_num_tickets(ssl, 0);
  }
  return ssl;
}
