// A minimum average rate for the clients of streaming calls.
#ifndef MEDGATE_LIBS_SERVER_TRANSFER_PACE_H_
#define MEDGATE_LIBS_SERVER_TRANSFER_PACE_H_

#include <grpcpp/support/status.h>

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "libs/server/stall_watch.h"

namespace medgate {

// How fast a client moves a transfer: the bytes moved over the time the service waited for the
// client (its reads of a client stream, its writes of a server stream, as the call's StallWatch
// counts them), not the time it spent on its own part (the database, sealing or opening chunks).
// Once the service has waited `grace` in all, a transfer under `min_rate` bytes/s is too slow.
// With the StallWatch, which ends a call whose client does not move at all, it bounds how long a
// client may hold a handler thread by reading or sending a trickle.
class TransferPace {
 public:
  // `what` names the transfer ("download"), `setting` the option that sets `min_rate`
  // ("sharing.download_min_bytes_per_second"), `then` what the client should do ("download
  // again").
  // `watched` (not owned) outlives the pace.
  TransferPace(const StallWatch::Call& watched, absl::string_view what, absl::Duration grace,
               int64_t min_rate, absl::string_view setting, absl::string_view then);

  void Moved(uint64_t bytes) { bytes_ += bytes; }

  // DEADLINE_EXCEEDED saying how slow, or OK.
  grpc::Status Check() const;

 private:
  const StallWatch::Call& watched_;
  const std::string what_;
  const absl::Duration grace_;
  const int64_t min_rate_;
  const std::string setting_;
  const std::string then_;
  uint64_t bytes_ = 0;
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_SERVER_TRANSFER_PACE_H_
