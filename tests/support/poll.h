// Waiting on a condition with a deadline (never a blind sleep): the tests' one way to wait.
#ifndef MEDGATE_TESTS_SUPPORT_POLL_H_
#define MEDGATE_TESTS_SUPPORT_POLL_H_

#include <functional>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace medgate::test_support {

// True as soon as `done` is; false once `deadline` has passed without it.
inline bool PollUntil(absl::Time deadline, const std::function<bool()>& done) {
  while (true) {
    if (done()) return true;
    if (absl::Now() > deadline) return false;
    // A short sleep, not a spin: on a 2-core machine a spinning poll takes the CPU the awaited
    // thread needs.
    absl::SleepFor(absl::Milliseconds(2));
  }
}

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_POLL_H_
