// absl::Duration <-> google.protobuf.Duration, for the API's durations (an ack's retry_after).
#ifndef MEDGATE_LIBS_COMMON_PROTO_DURATION_H_
#define MEDGATE_LIBS_COMMON_PROTO_DURATION_H_

#include <cstdint>

#include <google/protobuf/duration.pb.h>

#include "absl/time/time.h"

namespace medgate {

inline google::protobuf::Duration ToProtoDuration(absl::Duration d) {
  google::protobuf::Duration out;
  const int64_t seconds = absl::IDivDuration(d, absl::Seconds(1), &d);
  out.set_seconds(seconds);
  out.set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d)));
  return out;
}

inline absl::Duration FromProtoDuration(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_PROTO_DURATION_H_
