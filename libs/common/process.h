// Settings every medgate binary applies before it starts any thread.
#ifndef MEDGATE_LIBS_COMMON_PROCESS_H_
#define MEDGATE_LIBS_COMMON_PROCESS_H_

#include "absl/synchronization/mutex.h"

namespace medgate {

inline void ConfigureProcess() {
  // Debian's Abseil is built without NDEBUG, so by default every absl::Mutex lock (gRPC locks
  // with them too) records lock-order graphs under one process-wide lock to detect deadlocks.
  // Tests keep that check; services, tools and benchmarks do not pay for it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_PROCESS_H_
