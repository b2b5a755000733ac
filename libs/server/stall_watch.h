// A watchdog for synchronous streaming handlers blocked on their client.
#ifndef MEDGATE_LIBS_SERVER_STALL_WATCH_H_
#define MEDGATE_LIBS_SERVER_STALL_WATCH_H_

#include <grpcpp/server_context.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/time/time.h"

namespace medgate {

// Ends streaming calls whose client has not moved for a limit while a synchronous handler waited
// on it: a client stream that sent nothing while the handler waited for its next message, a server
// stream that took nothing (its flow-control window full) while the handler waited to write. The
// blocked read or write returns and the client gets DEADLINE_EXCEEDED with `message`, so a client
// that stops reading cannot hold a handler thread. Time the handler spends on its own part (the
// database, sealing) does not count. One thread for all the calls of one watch.
class StallWatch {
 public:
  StallWatch(absl::Duration limit, std::string message);
  ~StallWatch();

  // One call, watched while it exists.
  class Call {
   public:
    Call(StallWatch& watch, grpc::ServerContext& context);
    ~Call();
    // Around each blocking read or write of the stream.
    void Blocked();
    void Unblocked();
    // How long the call has blocked on its client in all (what a TransferPace measures against).
    absl::Duration blocked_in_all() const { return blocked_in_all_; }
    // The watch ended the call.
    bool fired();

   private:
    friend class StallWatch;
    StallWatch& watch_;
    grpc::ServerContext& context_;
    std::optional<std::chrono::steady_clock::time_point> blocked_since_;
    absl::Duration blocked_in_all_;  // the handler's thread only
    bool fired_ = false;
  };

 private:
  using Clock = std::chrono::steady_clock;
  void Run();

  const std::chrono::milliseconds limit_;
  const std::string message_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<Call*> calls_;
  bool stopping_ = false;
  // The watcher waits without a deadline (no call was blocked): the next block must wake it.
  // Otherwise it need not: with one fixed limit a new block is never due before the others.
  bool waiting_for_a_block_ = false;
  std::thread thread_;  // last: starts once the rest is set
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_STALL_WATCH_H_
