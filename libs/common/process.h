// Settings every medgate binary applies before it starts any thread.
#ifndef MEDGATE_LIBS_COMMON_PROCESS_H_
#define MEDGATE_LIBS_COMMON_PROCESS_H_

#include <sys/resource.h>

#include "absl/synchronization/mutex.h"
#include "libs/common/log.h"

namespace medgate {

inline void ConfigureProcess() {
  // No core dumps: one would write the key-encryption key and the cached patient keys, which
  // exist in plaintext only in memory, to disk.
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  // Debian's Abseil is built without NDEBUG, so by default every absl::Mutex lock (gRPC locks
  // with them too) records lock-order graphs under one process-wide lock to detect deadlocks.
  // Tests keep that check; services, tools and benchmarks do not pay for it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  // Every line on stderr a JSON one, protobuf's too.
  log::RouteProtobufLogs();
}

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_PROCESS_H_
