// pg::StatementWatch on a socket pair: a read blocked past its limit returns, one that ends in
// time is left alone.
#include "libs/pg/statement_watch.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace medgate::pg {
namespace {

// Whether `fd` has something to read (or its end) within 10 s: a watch that never fires fails the
// test rather than hang it.
bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 10000) == 1;
}

class SocketPair {
 public:
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0); }
  ~SocketPair() {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  int client() const { return fds_[0]; }
  int server() const { return fds_[1]; }

 private:
  int fds_[2] = {-1, -1};
};

TEST(StatementWatchTest, AReadBlockedPastItsLimitReturnsAndTheScopeSaysSo) {
  StatementWatch watch;
  SocketPair pair;
  char byte = 0;
  StatementWatch::Scope scope(watch, pair.client(), absl::Milliseconds(50));
  // Nothing is ever written: without the watch this read would wait for good.
  ASSERT_TRUE(Readable(pair.client()));
  EXPECT_EQ(::recv(pair.client(), &byte, 1, 0), 0);
  EXPECT_TRUE(scope.fired());
}

TEST(StatementWatchTest, AScopeThatEndsInTimeLeavesItsSocketAlone) {
  StatementWatch watch;
  SocketPair pair;
  {
    StatementWatch::Scope scope(watch, pair.client(), absl::Milliseconds(100));
    ASSERT_EQ(::send(pair.server(), "x", 1, 0), 1);
    char byte = 0;
    ASSERT_EQ(::recv(pair.client(), &byte, 1, 0), 1);
    EXPECT_FALSE(scope.fired());
  }
  // Past the ended scope's limit, and past a later one's that fires on another socket: the first
  // socket still carries data both ways.
  SocketPair other;
  {
    StatementWatch::Scope scope(watch, other.client(), absl::Milliseconds(300));
    ASSERT_TRUE(Readable(other.client()));
    char byte = 0;
    EXPECT_EQ(::recv(other.client(), &byte, 1, 0), 0);
    EXPECT_TRUE(scope.fired());
  }
  ASSERT_EQ(::send(pair.server(), "y", 1, 0), 1);
  ASSERT_TRUE(Readable(pair.client()));
  char byte = 0;
  EXPECT_EQ(::recv(pair.client(), &byte, 1, 0), 1);
  EXPECT_EQ(byte, 'y');
  ASSERT_EQ(::send(pair.client(), "z", 1, 0), 1);
}

// The scope shuts the socket itself down, not a descriptor number: closed by its owner during the
// scope and the number reused, the new socket is left alone.
TEST(StatementWatchTest, ADescriptorClosedAndReusedDuringTheScopeIsLeftAlone) {
  StatementWatch watch;
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  StatementWatch::Scope scope(watch, fds[0], absl::Milliseconds(100));
  const int number = fds[0];
  ::close(fds[0]);
  SocketPair reused;  // takes the lowest free numbers: the one just closed
  ASSERT_EQ(reused.client(), number);
  ASSERT_TRUE(Readable(fds[1]));  // the watched socket's peer sees it shut down
  char byte = 0;
  EXPECT_EQ(::recv(fds[1], &byte, 1, 0), 0);
  EXPECT_TRUE(scope.fired());
  ASSERT_EQ(::send(reused.server(), "y", 1, 0), 1);
  EXPECT_EQ(::recv(reused.client(), &byte, 1, 0), 1);
  ::close(fds[1]);
}

}  // namespace
}  // namespace medgate::pg
