// The clock that times how long cached answers live: monotonic, so a stepped host clock changes
// no expiry.
#ifndef MEDGATE_LIBS_COMMON_MONOTONIC_CLOCK_H_
#define MEDGATE_LIBS_COMMON_MONOTONIC_CLOCK_H_

#include <time.h>

#include "absl/time/time.h"

namespace medgate {

// CLOCK_MONOTONIC as an absl::Time, for the `clock` options of TTL caches. Only differences
// between its readings mean anything (it counts from boot, not from the Unix epoch), so it is
// never shown, stored, or compared with absl::Now(). A host clock stepped back by D (NTP, an
// operator) would make an expiry on absl::Now() live TTL + D; this clock does not move with it.
inline absl::Time MonotonicNow() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return absl::UnixEpoch() + absl::Seconds(ts.tv_sec) + absl::Nanoseconds(ts.tv_nsec);
}

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_MONOTONIC_CLOCK_H_
