// pg::StatementWatch on a socket pair: a read blocked past its limit returns, one that ends in
// time is left alone, and a quiet one is left alone while the server answers (asked at most once
// a second, whatever the number of scopes).
#include "libs/pg/statement_watch.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

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

// Quiet scopes of a watch whose server answers are left alone, however long past their limit;
// the server is asked once for all of them, and not more than once a second. Once it no longer
// answers, they are ended.
TEST(StatementWatchTest, QuietScopesAreEndedOnlyOnceTheServerNoLongerAnswers) {
  std::atomic<int> asked{0};
  std::atomic<bool> answers{true};
  StatementWatch watch([&] {
    asked.fetch_add(1);
    return answers.load();
  });
  SocketPair first;
  SocketPair second;
  StatementWatch::Scope a(watch, first.client(), absl::Milliseconds(50),
                          StatementWatch::Scope::Limit::kSinceLastAnswer);
  StatementWatch::Scope b(watch, second.client(), absl::Milliseconds(80),
                          StatementWatch::Scope::Limit::kSinceLastAnswer);
  // Both quiet for 2.5 s, 30 to 50 times their limits (a socket pair is not TCP: quiet since its
  // scope began).
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_FALSE(a.fired());
  EXPECT_FALSE(b.fired());
  // Asked at about 50 ms, 1.05 s and 2.05 s: once for both scopes each time. A slow machine asks
  // less often, never more.
  EXPECT_GE(asked.load(), 1);
  EXPECT_LE(asked.load(), 3);
  ASSERT_EQ(::send(first.server(), "x", 1, 0), 1);
  char byte = 0;
  ASSERT_EQ(::recv(first.client(), &byte, 1, 0), 1);  // the socket still carries data

  answers.store(false);
  ASSERT_TRUE(Readable(first.client()));
  ASSERT_TRUE(Readable(second.client()));
  EXPECT_EQ(::recv(second.client(), &byte, 1, 0), 0);
  EXPECT_TRUE(a.fired());
  EXPECT_TRUE(b.fired());
}

}  // namespace
}  // namespace medgate::pg
