// A client-side deadline for statements on a connection whose server may stop answering.
#ifndef MEDGATE_LIBS_PG_STATEMENT_WATCH_H_
#define MEDGATE_LIBS_PG_STATEMENT_WATCH_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/time/time.h"

namespace medgate::pg {

// Ends what a connection is waiting for once its limit has passed: the connection's socket is
// shut down, so that the blocked libpq call returns and libpqxx throws broken_connection. The
// server's statement_timeout cannot do this when the server process itself has stopped answering
// (frozen, or stuck on hung storage) while its host runs on: that host's kernel still
// acknowledges what is sent, so neither TCP keepalives nor tcp_user_timeout end the wait either
// (they do end it, after tcp_user_timeout, when the whole host is gone). One thread for all the
// scopes of a watch.
class StatementWatch {
 public:
  // `answers`, when given, asks whether the server still answers at all (AcceptsConnections, for
  // one): a kSinceLastAnswer scope whose connection has been quiet for its limit is then ended
  // only if it does not. A quiet connection is not always a server that stopped: its caller may
  // be busy between two statements (another database's call inside a transaction), or its
  // server on a statement (a lock wait) within the statement timeout. Called on the watch's
  // thread, not more than once a second.
  explicit StatementWatch(std::function<bool()> answers = nullptr);
  ~StatementWatch();
  StatementWatch(const StatementWatch&) = delete;
  StatementWatch& operator=(const StatementWatch&) = delete;

  // Watches `socket` (a connection's, open when the scope starts) for `limit` from now. The
  // scope holds a duplicate of it, so that what it shuts down is that socket even if libpq closes
  // its descriptor meanwhile and the number is reused. The connection cannot be used once the
  // scope fired: it is to be dropped, not returned to a pool.
  class Scope {
   public:
    enum class Limit {
      kTotal,  // the scope may last `limit` in all
      // The scope is ended once it has lasted `limit` and nothing has arrived on the socket for
      // `limit` either (a TCP socket's last received data, as the kernel reports it), and the
      // watch's `answers`, if any, says the server does not answer: a server that answers each
      // statement in time may run a transaction of any length. On a socket that is not TCP, the
      // quiet time is the scope's.
      kSinceLastAnswer,
    };
    Scope(StatementWatch& watch, int socket, absl::Duration limit, Limit kind = Limit::kTotal);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    // The limit passed and the socket was shut down.
    bool fired();

   private:
    friend class StatementWatch;
    StatementWatch& watch_;
    const int socket_;  // the duplicate, -1 if it could not be made (then never shut down)
    const absl::Duration limit_;
    const Limit kind_;
    std::chrono::steady_clock::time_point due_;  // the watch's next look (moved on by answers)
    bool fired_ = false;
  };

 private:
  void Run();

  const std::function<bool()> answers_;
  std::mutex mu_;
  // The last answer of answers_, and when it was asked (mu_).
  // Until when Run waits (mu_; unset: for a notification): a scope due later needs no wake-up.
  std::optional<std::chrono::steady_clock::time_point> waiting_until_;
  bool last_answered_ = false;
  std::optional<std::chrono::steady_clock::time_point> last_asked_;
  std::condition_variable cv_;
  std::set<Scope*> scopes_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once the rest is set
};

// How long AcceptsConnections waits, as medgate's watches ask it.
inline constexpr absl::Duration kServerAnswersWithin = absl::Seconds(3);

// Whether the server of `conninfo` completes a new connection (or refuses it itself, as when it
// has no connection slot left) within `within`: a server that stopped answering does not.
bool AcceptsConnections(const std::string& conninfo, absl::Duration within);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_STATEMENT_WATCH_H_
