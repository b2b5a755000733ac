#include "services/ingest/device_turns.h"

#include <optional>
#include <utility>

namespace medgate::ingest {

struct DeviceTurns::State {
  struct Device {
    std::function<void()> supersede_holder;  // of the stream holding the turn, until called
    std::optional<Stream> waiting;           // the newest stream waiting for the turn
  };

  mutable std::mutex mu;
  std::map<std::string, Device> devices;  // those whose turn is held

  // The holder's last copy is gone: the waiting stream, if any, holds the turn now.
  static void Release(const std::shared_ptr<State>& state, const std::string& device);
};

class DeviceTurns::Turn {
 public:
  Turn(std::shared_ptr<State> state, std::string device)
      : state_(std::move(state)), device_(std::move(device)) {}
  ~Turn() { State::Release(state_, device_); }
  Turn(const Turn&) = delete;
  Turn& operator=(const Turn&) = delete;

 private:
  const std::shared_ptr<State> state_;
  const std::string device_;
};

void DeviceTurns::State::Release(const std::shared_ptr<State>& state, const std::string& device) {
  std::optional<Stream> next;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    auto it = state->devices.find(device);
    if (it == state->devices.end()) return;
    if (!it->second.waiting.has_value()) {
      state->devices.erase(it);
      return;
    }
    next = std::move(it->second.waiting);
    it->second.waiting.reset();
    it->second.supersede_holder = std::move(next->supersede);
  }
  next->start(std::make_shared<Turn>(state, device));
}

DeviceTurns::DeviceTurns() : state_(std::make_shared<State>()) {}

std::shared_ptr<DeviceTurns::Turn> DeviceTurns::Open(const std::string& device, Stream stream) {
  std::function<void()> supersede_holder;
  std::optional<Stream> passed_over;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto [it, first] = state_->devices.try_emplace(device);
    if (first) {
      it->second.supersede_holder = std::move(stream.supersede);
      return std::make_shared<Turn>(state_, device);
    }
    supersede_holder = std::move(it->second.supersede_holder);
    it->second.supersede_holder = nullptr;
    passed_over = std::move(it->second.waiting);
    it->second.waiting = std::move(stream);
  }
  if (supersede_holder) supersede_holder();
  if (passed_over.has_value() && passed_over->supersede) passed_over->supersede();
  return nullptr;
}

size_t DeviceTurns::devices() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->devices.size();
}

}  // namespace medgate::ingest
