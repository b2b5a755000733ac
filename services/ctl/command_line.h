// medgate-ctl's commands, the flags each one takes, and the strict reading of its arguments.
#ifndef MEDGATE_SERVICES_CTL_COMMAND_LINE_H_
#define MEDGATE_SERVICES_CTL_COMMAND_LINE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace medgate::ctl {

struct Command {
  absl::string_view name;
  // The service it calls: routing, consent, ingest, sharing or audit; or the services, as
  // "consent, ingest, sharing" (export-patient).
  absl::string_view service;
  std::vector<absl::string_view> value_flags;  // each given as `--flag value`
  std::vector<absl::string_view> switches;     // boolean flags: `--flag`, true when given
  absl::string_view usage;                     // its lines in the usage text
};

// Every command, in the usage text's order.
const std::vector<Command>& Commands();

// The whole usage text.
std::string Usage();

// The longest --timeout: a day.
inline constexpr uint64_t kMaxTimeoutSeconds = 86400;

// A command line as read: the flags hold only flags of `command` (names without the "--"); a
// switch that was given holds "true".
struct CommandLine {
  std::string config_path;
  std::string identity;
  // --timeout: the call's deadline in seconds from its start; 0 when not given (the command's
  // own: 10 s, 300 s for uploads and downloads, 600 s for verify-chain).
  uint64_t timeout_seconds = 0;
  const Command* command = nullptr;
  std::map<std::string, std::string> flags;
};

// Reads argv[1..]. INVALID_ARGUMENT, with a message naming the flag or word at fault followed by
// the command's usage (the whole usage when there is no known command), for an unknown command or
// flag, a flag given twice, a value flag with no value (at the end, or before another --flag), a
// switch given a value (`--allow-move false`), an extra word, a --timeout that is not 1 to
// kMaxTimeoutSeconds whole seconds, or no --config, --identity or command.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args);

// A non-negative decimal integer of at most `max`: digits only (no sign, space or trailing junk).
bool ParseDecimal(absl::string_view text, uint64_t max, uint64_t* out);

}  // namespace medgate::ctl

#endif  // MEDGATE_SERVICES_CTL_COMMAND_LINE_H_
