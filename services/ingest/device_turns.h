// One stream of a device stores at a time, in the order the streams opened.
//
// A device's samples are deduplicated by its seq cursor: a seq at or below the highest one stored
// counts as a duplicate. That is exact only if the device's batches are stored in the order the
// device sent them. A stream keeps that order for its own batches; two streams of one device
// (a reconnect while the old connection lingers, or a device sending on two streams at once)
// would not: a later batch of the new stream could commit before an earlier one of the old
// stream, whose samples would then be answered as duplicates without ever being stored.
//
// So a stream opening takes its device's turn from the stream before it: the older stream is
// told to stop reading (`supersede`), and the new one starts reading (`start`) only once the
// older one holds no turn any more, that is once it reads no more and every batch it read is
// answered. A stream superseded while still waiting for its turn never starts.
#ifndef MEDGATE_SERVICES_INGEST_DEVICE_TURNS_H_
#define MEDGATE_SERVICES_INGEST_DEVICE_TURNS_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace medgate::ingest {

// Thread-safe. Turns may outlive it.
class DeviceTurns {
 public:
  // A device's turn, shared by its stream (while it may read) and each batch it read (until
  // answered). The last copy destroyed hands the turn to the newest waiting stream, if any.
  class Turn;

  struct Stream {
    // The stream is to read no more: a newer stream of its device opened. Called at most once,
    // never under a lock of DeviceTurns, possibly on the opening stream's thread.
    std::function<void()> supersede;
    // The stream may read; it holds `turn`. Called at most once (not when Open returned the turn
    // itself), never under a lock of DeviceTurns, on the thread that released the turn before.
    std::function<void(std::shared_ptr<Turn> turn)> start;
  };

  DeviceTurns();

  // A new stream of `device`: its turn if no other stream of the device holds one (`start` is
  // then not called), else nullptr, and `start` is called when the turn comes, unless a newer
  // stream opens first. The stream holding the turn, and the one waiting for it, are superseded.
  std::shared_ptr<Turn> Open(const std::string& device, Stream stream);

  // Devices with a stream holding or waiting for a turn.
  size_t devices() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace medgate::ingest

#endif  // MEDGATE_SERVICES_INGEST_DEVICE_TURNS_H_
