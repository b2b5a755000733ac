#include "tests/support/pg_fault_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace medgate::test_support {
namespace {

// The server's CommandComplete message for COMMIT: 'C', length 11, "COMMIT\0".
constexpr absl::string_view kCommitComplete("C\0\0\0\x0b" "COMMIT\0", 12);
// The server's ReadyForQuery message when no transaction is open: 'Z', length 5, 'I'.
constexpr absl::string_view kReadyIdle("Z\0\0\0\x05I", 6);

absl::Status Errno(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Waits until `fd` is readable; false when the proxy stops first.
bool WaitReadable(int fd, int stop_fd) {
  pollfd fds[2] = {{.fd = fd, .events = POLLIN, .revents = 0},
                   {.fd = stop_fd, .events = POLLIN, .revents = 0}};
  while (true) {
    const int n = poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || fds[1].revents != 0) return false;
    if (fds[0].revents != 0) return true;
  }
}

enum class Wait { kReadable, kStopped, kTimedOut };

// Waits at most `timeout_ms` for `fd` (-1: none) to be readable, or the proxy to stop.
Wait WaitFor(int fd, int stop_fd, int timeout_ms) {
  pollfd fds[2] = {{.fd = stop_fd, .events = POLLIN, .revents = 0},
                   {.fd = fd, .events = POLLIN, .revents = 0}};
  while (true) {
    const int n = poll(fds, fd >= 0 ? 2 : 1, timeout_ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || fds[0].revents != 0) return Wait::kStopped;
    if (n == 0) return Wait::kTimedOut;
    return Wait::kReadable;
  }
}

// The length of the longest end of `bytes` that begins `message`.
size_t PartialAtEnd(absl::string_view bytes, absl::string_view message) {
  for (size_t n = std::min(bytes.size(), message.size() - 1); n > 0; --n) {
    if (bytes.substr(bytes.size() - n) == message.substr(0, n)) return n;
  }
  return 0;
}

// Where `message` begins in `bytes`, or npos.
size_t Find(const std::string& bytes, absl::string_view message) {
  return bytes.find(message.data(), 0, message.size());
}

}  // namespace

absl::StatusOr<std::unique_ptr<PgFaultProxy>> PgFaultProxy::Start(int server_port) {
  std::unique_ptr<PgFaultProxy> proxy(new PgFaultProxy());
  proxy->server_port_ = server_port;
  if (pipe2(proxy->stop_pipe_, O_CLOEXEC) != 0) return Errno("pipe2");
  proxy->listener_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (proxy->listener_ < 0) return Errno("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (bind(proxy->listener_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Errno("bind");
  }
  if (listen(proxy->listener_, 64) != 0) return Errno("listen");
  socklen_t len = sizeof(addr);
  if (getsockname(proxy->listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return Errno("getsockname");
  }
  proxy->port_ = ntohs(addr.sin_port);
  proxy->acceptor_ = std::thread([p = proxy.get()] { p->AcceptLoop(); });
  return proxy;
}

PgFaultProxy::~PgFaultProxy() {
  if (stop_pipe_[1] >= 0) {
    const char stop = 's';
    while (write(stop_pipe_[1], &stop, 1) < 0 && errno == EINTR) {
    }
  }
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::thread> connections;
  {
    std::lock_guard<std::mutex> lock(mu_);
    connections.swap(connections_);
  }
  for (std::thread& t : connections) t.join();
  if (listener_ >= 0) close(listener_);
  for (int fd : stop_pipe_) {
    if (fd >= 0) close(fd);
  }
}

std::string PgFaultProxy::Via(absl::string_view conninfo) const {
  std::string out(conninfo);
  const size_t at = out.find("port=");
  if (at == std::string::npos) return absl::StrCat(out, " port=", port_);
  size_t end = at + 5;
  while (end < out.size() && out[end] >= '0' && out[end] <= '9') ++end;
  out.replace(at + 5, end - at - 5, std::to_string(port_));
  return out;
}

void PgFaultProxy::CutAtNextCommit(absl::string_view marker) {
  std::lock_guard<std::mutex> lock(mu_);
  marker_ = std::string(marker);
  arming_.fetch_add(1);
  armed_.store(true);
}

void PgFaultProxy::Sever() {
  std::lock_guard<std::mutex> lock(mu_);
  severed_.store(true);
  for (int fd : open_sockets_) shutdown(fd, SHUT_RDWR);
}

void PgFaultProxy::Restore() { severed_.store(false); }

void PgFaultProxy::Freeze() { frozen_.store(true); }

void PgFaultProxy::FreezeAfterNextStartUp() { freeze_after_start_up_.store(true); }

void PgFaultProxy::Thaw() { frozen_.store(false); }

void PgFaultProxy::AcceptLoop() {
  while (WaitReadable(listener_, stop_pipe_[0])) {
    const int client = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    if (severed_.load()) {
      close(client);
      continue;
    }
    const int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(server_port_));
    if (server < 0 || connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      if (server >= 0) close(server);
      close(client);
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (severed_.load()) {  // severed while this one connected
      close(server);
      close(client);
      continue;
    }
    open_sockets_.push_back(client);
    open_sockets_.push_back(server);
    connections_.emplace_back([this, client, server] { Forward(client, server); });
  }
}

void PgFaultProxy::Forward(int client, int server) {
  // Which arming this connection's client sent the marker under (0: none).
  std::atomic<int> marked{0};
  std::atomic<bool> client_done{false};
  // The client's bytes go to the server unchanged, on a thread of their own.
  std::thread upstream([this, client, server, &marked, &client_done] {
    char buf[65536];
    std::string tail;  // the end of the previous read, for a marker split between two
    while (WaitReadable(client, stop_pipe_[0])) {
      const ssize_t n = recv(client, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      if (armed_.load()) {
        std::string marker;
        int arming;
        {
          std::lock_guard<std::mutex> lock(mu_);
          marker = marker_;
          arming = arming_.load();
        }
        tail.append(buf, static_cast<size_t>(n));
        if (!marker.empty() && tail.find(marker) != std::string::npos) marked.store(arming);
        if (tail.size() > marker.size()) tail.erase(0, tail.size() - marker.size());
      }
      if (!SendAll(server, buf, static_cast<size_t>(n))) break;
    }
    client_done.store(true);
    shutdown(server, SHUT_RDWR);
    shutdown(client, SHUT_RDWR);
  });
  // The server's bytes go to the client, except from a COMMIT's completion on when armed. While
  // armed, the end of what has arrived that could begin one waits for the next bytes (the server
  // always sends a message whole, and more follows it).
  std::string held;
  std::string frozen;  // what the server sent while the proxy was frozen, not yet looked at
  bool started = false;  // the server's first ReadyForQuery has passed
  char buf[65536];
  while (true) {
    if (frozen_.load()) {
      // Nothing is read from the server; the wait ends with the client or the proxy.
      if (client_done.load() || WaitFor(-1, stop_pipe_[0], 20) == Wait::kStopped) break;
      continue;
    }
    if (frozen.empty()) {
      const Wait wait = WaitFor(server, stop_pipe_[0], 20);
      if (wait == Wait::kStopped) break;
      if (wait == Wait::kTimedOut) continue;
      const ssize_t n = recv(server, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      if (frozen_.load()) {  // frozen while this was on its way
        frozen.append(buf, static_cast<size_t>(n));
        continue;
      }
      held.append(buf, static_cast<size_t>(n));
    } else {
      held.append(frozen);
      frozen.clear();
    }
    if (!started) {
      if (const size_t at = Find(held, kReadyIdle); at != std::string::npos) {
        started = true;
        bool expected = true;
        if (freeze_after_start_up_.compare_exchange_strong(expected, false)) {
          // The start-up's answer passes; what follows it waits for Thaw().
          const size_t end = at + kReadyIdle.size();
          if (!SendAll(client, held.data(), end)) break;
          frozen = held.substr(end);
          held.clear();
          frozen_.store(true);
          continue;
        }
      }
    }
    size_t pass = held.size();
    bool cut = false;
    bool mine = armed_.load();
    bool marked_here = false;
    if (mine) {
      std::lock_guard<std::mutex> lock(mu_);
      marked_here = !marker_.empty() && marked.load() == arming_.load();
      mine = marker_.empty() || marked_here;
    }
    if (mine) {
      size_t at = Find(held, kCommitComplete);
      if (marked_here) at = std::min(at, Find(held, kReadyIdle));
      if (at != std::string::npos) {
        bool expected = true;
        cut = armed_.compare_exchange_strong(expected, false);
        pass = cut ? at : held.size();
      } else {
        size_t partial = PartialAtEnd(held, kCommitComplete);
        if (marked_here) partial = std::max(partial, PartialAtEnd(held, kReadyIdle));
        pass = held.size() - partial;
      }
    }
    if (!SendAll(client, held.data(), pass)) break;
    held.erase(0, pass);
    if (cut) {
      cuts_.fetch_add(1);
      break;
    }
  }
  shutdown(client, SHUT_RDWR);
  shutdown(server, SHUT_RDWR);
  upstream.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::erase(open_sockets_, client);
    std::erase(open_sockets_, server);
  }
  close(client);
  close(server);
}

}  // namespace medgate::test_support
