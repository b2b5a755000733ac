// Waiting on a condition with a deadline (never a blind sleep): the tests' one way to wait.
#ifndef MEDGATE_TESTS_SUPPORT_POLL_H_
#define MEDGATE_TESTS_SUPPORT_POLL_H_

#include <functional>
#include <thread>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace medgate::test_support {

// True as soon as `done` is; false once `deadline` has passed without it.
inline bool PollUntil(absl::Time deadline, const std::function<bool()>& done) {
  while (true) {
    if (done()) return true;
    if (absl::Now() > deadline) return false;
    std::this_thread::yield();
  }
}

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_POLL_H_
