// A TCP proxy in front of a PostgreSQL server that loses a connection the way a network can at
// the worst moment: after the server has committed a transaction, before the client hears so.
// The client then cannot tell a commit that happened from one that did not, which is the case
// the services must answer without acknowledging twice or writing twice.
//
// It also stands for a server that stops answering while its host runs on (its processes frozen,
// its storage hung): connections are still accepted and what clients send is still acknowledged,
// but nothing comes back.
//
// Bytes pass through unchanged (the test servers do not use TLS). The proxy recognises the
// server's CommandComplete message for COMMIT, and its ReadyForQuery, in the byte stream it
// forwards to the client.
#ifndef MEDGATE_TESTS_SUPPORT_PG_FAULT_PROXY_H_
#define MEDGATE_TESTS_SUPPORT_PG_FAULT_PROXY_H_

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace medgate::test_support {

class PgFaultProxy {
 public:
  // Listens on 127.0.0.1 (a free port) and forwards each connection to 127.0.0.1:`server_port`.
  static absl::StatusOr<std::unique_ptr<PgFaultProxy>> Start(int server_port);
  ~PgFaultProxy();
  PgFaultProxy(const PgFaultProxy&) = delete;
  PgFaultProxy& operator=(const PgFaultProxy&) = delete;

  int port() const { return port_; }

  // `conninfo` (a key=value connection string naming the server's port) made to go through the
  // proxy instead.
  std::string Via(absl::string_view conninfo) const;

  // The next COMMIT that the server completes on a connection through the proxy whose client has
  // sent `marker` since this call (a parameter's value or a query's text, say; empty: on any
  // connection): that connection is closed at both ends instead of the completion reaching the
  // client. The transaction stays committed. Later connections and commits pass again.
  // With a marker, the end of a statement that committed by itself (outside a transaction: the
  // server's ReadyForQuery saying idle) is cut too, just before that ReadyForQuery. A marker
  // should be something only the statement of interest sends: a statement's name is also sent
  // when it is prepared, which may end a transaction of its own.
  void CutAtNextCommit(absl::string_view marker = "");

  // Closes every connection through the proxy, and every new one as soon as it is accepted, until
  // Restore(): the server is unreachable for the clients of the proxy and for no one else.
  void Sever();
  void Restore();

  // Holds back what the server sends to the proxy's clients, on the connections open now and on
  // new ones (still accepted and connected to the server), until Thaw() delivers it.
  void Freeze();
  // Freezes once the server has answered the next connection's start-up (its first
  // ReadyForQuery, which passes): that connection is authenticated, and the first statement its
  // client sends gets no answer.
  void FreezeAfterNextStartUp();
  void Thaw();

  // Connections cut so far.
  int cuts() const { return cuts_.load(); }

 private:
  PgFaultProxy() = default;
  void AcceptLoop();
  void Forward(int client, int server);

  int server_port_ = 0;
  int port_ = 0;
  int listener_ = -1;
  int stop_pipe_[2] = {-1, -1};
  std::atomic<bool> armed_{false};
  std::atomic<int> arming_{0};  // which call of CutAtNextCommit armed it
  std::string marker_;           // guarded by mu_
  std::atomic<int> cuts_{0};
  std::atomic<bool> severed_{false};
  std::atomic<bool> frozen_{false};
  std::atomic<bool> freeze_after_start_up_{false};
  std::vector<int> open_sockets_;  // guarded by mu_
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> connections_;
};

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_PG_FAULT_PROXY_H_
