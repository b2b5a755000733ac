// A task run periodically on its own thread.
#include "libs/common/periodic_task.h"

#include <utility>

namespace medgate {

PeriodicTask::PeriodicTask(absl::Duration first_delay, Pass pass)
    : pass_(std::move(pass)), thread_([this, first_delay] { Run(first_delay); }) {}

PeriodicTask::~PeriodicTask() { Stop(); }

void PeriodicTask::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

bool PeriodicTask::stopping() {
  absl::MutexLock lock(&mu_);
  return stopping_;
}

void PeriodicTask::Run(absl::Duration wait) {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), wait);
      if (stopping_) return;
    }
    wait = pass_(*this);
  }
}

}  // namespace medgate
