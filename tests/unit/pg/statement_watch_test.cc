// pg::StatementWatch on a socket pair: a read blocked past its limit returns, one that ends in
// time is left alone.
#include "libs/pg/statement_watch.h"

#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace medgate::pg {
namespace {

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
  EXPECT_EQ(::recv(pair.client(), &byte, 1, 0), 0);
  EXPECT_TRUE(scope.fired());
}

TEST(StatementWatchTest, AScopeThatEndsInTimeLeavesItsSocketAlone) {
  StatementWatch watch;
  SocketPair pair;
  {
    StatementWatch::Scope scope(watch, pair.client(), absl::Seconds(30));
    ASSERT_EQ(::send(pair.server(), "x", 1, 0), 1);
    char byte = 0;
    ASSERT_EQ(::recv(pair.client(), &byte, 1, 0), 1);
    EXPECT_FALSE(scope.fired());
  }
  // A later, shorter scope on another socket fires while the first is gone: the first socket
  // still carries data both ways.
  SocketPair other;
  {
    StatementWatch::Scope scope(watch, other.client(), absl::Milliseconds(20));
    char byte = 0;
    EXPECT_EQ(::recv(other.client(), &byte, 1, 0), 0);
    EXPECT_TRUE(scope.fired());
  }
  ASSERT_EQ(::send(pair.server(), "y", 1, 0), 1);
  char byte = 0;
  EXPECT_EQ(::recv(pair.client(), &byte, 1, 0), 1);
  EXPECT_EQ(byte, 'y');
}

}  // namespace
}  // namespace medgate::pg
