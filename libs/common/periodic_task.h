// A background task run over and over on a thread of its own: the services' sweeps and upkeep.
#ifndef MEDGATE_LIBS_COMMON_PERIODIC_TASK_H_
#define MEDGATE_LIBS_COMMON_PERIODIC_TASK_H_

#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace medgate {

class PeriodicTask {
 public:
  // Runs `pass` after `first_delay`, then again after the wait each pass returns, until Stop().
  // A pass is given the task, to ask stopping() during a long pass.
  using Pass = std::function<absl::Duration(PeriodicTask& task)>;
  PeriodicTask(absl::Duration first_delay, Pass pass);
  ~PeriodicTask();  // Stop()
  PeriodicTask(const PeriodicTask&) = delete;
  PeriodicTask& operator=(const PeriodicTask&) = delete;

  // Ends the waits at once and waits for a pass in progress to return. Idempotent.
  void Stop();
  // For a long pass, to end early once Stop() was called.
  bool stopping();

 private:
  void Run(absl::Duration first_delay);

  const Pass pass_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts once the rest is set
};

}  // namespace medgate

#endif  // MEDGATE_LIBS_COMMON_PERIODIC_TASK_H_
