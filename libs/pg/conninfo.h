// Connection settings every medgate connection to PostgreSQL has unless its conninfo says
// otherwise: a server that stops answering (a host gone, a network partition) is given up on in
// bounded time instead of holding the caller for the kernel's TCP timeouts (minutes).
#ifndef MEDGATE_LIBS_PG_CONNINFO_H_
#define MEDGATE_LIBS_PG_CONNINFO_H_

#include <string>

#include "absl/time/time.h"

namespace medgate::pg {

// `conninfo` (key=value or URI form) with those it does not set of: connect_timeout=10 (s),
// keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3 (an idle
// connection to a dead peer is closed within about a minute) and tcp_user_timeout=60000 (ms: sent
// data left unacknowledged that long closes it). A conninfo libpq cannot parse is returned as it
// is, for the connection attempt to report.
std::string WithConnectionDefaults(const std::string& conninfo);

// How long a session of ours may sit idle inside a transaction before the server ends it:
// four statement timeouts, at least a minute. A client host that dies (or is cut off) between two
// statements of a transaction leaves its session and its locks (device cursors, the audit chain's
// head) to the server's own TCP keepalive otherwise, about two hours by default.
absl::Duration IdleInTransactionTimeout(absl::Duration statement_timeout);

// How long a pool's caller waits on a server that sends nothing before giving it up as not
// answering (frozen, its storage hung, its host paused): the statement timeout and 5 s more. A
// server that answers ends any statement of ours by its statement_timeout; one that does not
// cannot, and its host's kernel still acknowledges what is sent, so TCP's own timeouts do not end
// the wait either.
absl::Duration UnansweredLimit(absl::Duration statement_timeout);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_CONNINFO_H_
