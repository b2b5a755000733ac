// The minimum rate of a streaming call's client.
#include "libs/server/transfer_pace.h"

#include "absl/strings/str_cat.h"
#include "libs/common/log.h"

namespace medgate {

TransferPace::TransferPace(const StallWatch::Call& watched, absl::string_view what,
                           absl::Duration grace, int64_t min_rate, absl::string_view setting,
                           absl::string_view then)
    : watched_(watched),
      what_(what),
      grace_(grace),
      min_rate_(min_rate),
      setting_(setting),
      then_(then) {}

grpc::Status TransferPace::Check() const {
  const absl::Duration waited = watched_.blocked_in_all();
  const double seconds = absl::ToDoubleSeconds(waited);
  if (waited <= grace_ ||
      static_cast<double>(bytes_) >= static_cast<double>(min_rate_) * seconds) {
    return grpc::Status::OK;
  }
  log::Warning("transfer_too_slow", {{"transfer", what_}, {"bytes", bytes_}});
  return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                      absl::StrCat("the ", what_, " went at ",
                                   static_cast<int64_t>(static_cast<double>(bytes_) / seconds),
                                   " bytes/s, under the minimum of ", min_rate_, " (", setting_,
                                   "); ", then_));
}

}  // namespace medgate
