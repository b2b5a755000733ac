// Steps this test process's wall clock, as libc answers CLOCK_REALTIME, leaving the host's and
// the monotonic clock alone: what NTP or an operator stepping the host clock looks like to a
// process, without the privilege or the harm of doing it.
#ifndef MEDGATE_TESTS_UNIT_ROUTING_CLIENT_WALL_CLOCK_STEP_H_
#define MEDGATE_TESTS_UNIT_ROUTING_CLIENT_WALL_CLOCK_STEP_H_

#include "absl/time/time.h"

namespace medgate {

// From now on, CLOCK_REALTIME reads `by` later than the host's (negative: earlier), until
// ResetWallClock. Returns once absl::Now() has followed the step, or false if it did not within
// a few seconds (absl interpolates between its readings of the kernel clock).
bool StepWallClock(absl::Duration by);
void ResetWallClock();

}  // namespace medgate

#endif  // MEDGATE_TESTS_UNIT_ROUTING_CLIENT_WALL_CLOCK_STEP_H_
