// A clock_gettime that the test executable exports in front of libc's, so every caller in the
// process (absl::Now through the C++ library, gRPC) reads the stepped CLOCK_REALTIME.
#include "tests/unit/routing_client/wall_clock_step.h"

#include <dlfcn.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "absl/time/clock.h"

namespace medgate {
namespace {

std::atomic<int64_t> offset_nanos{0};

using ClockGettime = int (*)(clockid_t, timespec*);

ClockGettime LibcClockGettime() {
  static const ClockGettime libc =
      reinterpret_cast<ClockGettime>(dlsym(RTLD_NEXT, "clock_gettime"));
  return libc;
}

}  // namespace

bool StepWallClock(absl::Duration by) {
  const absl::Time before = absl::Now();
  offset_nanos.store(absl::ToInt64Nanoseconds(by));
  // The threshold is half the step, so the test's own elapsed time does not matter.
  const absl::Time target = before + by / 2;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    const absl::Time now = absl::Now();
    if (by < absl::ZeroDuration() ? now < target : now > target) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

void ResetWallClock() { offset_nanos.store(0); }

}  // namespace medgate

extern "C" int clock_gettime(clockid_t clock, timespec* ts) {
  const int result = medgate::LibcClockGettime()(clock, ts);
  if (result != 0 || (clock != CLOCK_REALTIME && clock != CLOCK_REALTIME_COARSE)) return result;
  const int64_t offset = medgate::offset_nanos.load(std::memory_order_relaxed);
  if (offset == 0) return result;
  const int64_t nanos = int64_t{ts->tv_sec} * 1000000000 + ts->tv_nsec + offset;
  ts->tv_sec = nanos / 1000000000;
  ts->tv_nsec = nanos % 1000000000;
  return result;
}
