// medgate-ctl's commands, the flags each one takes, and the strict reading of its arguments.
#include "services/ctl/command_line.h"

#include <algorithm>
#include <cstddef>
#include <optional>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace medgate::ctl {
namespace {

constexpr char kUsageHead[] =
    R"(usage: medgate-ctl --config FILE --identity NAME [--timeout SECONDS] COMMAND [--flag value ...]

  --identity NAME   use the certificate NAME.crt / NAME.key next to the configured CA
                    (the dev PKI has ops, app, practitioner, device and each service)
  --timeout SECONDS give up on the call after this long, 1 to 86400 (default: 10;
                    300 for upload-record, download-record, and each page of
                    export-vitals and export-records, and of those parts of
                    export-patient; 600 for verify-chain)

)";

constexpr char kUsageTail[] =
    R"(Output is the response as JSON; errors print the gRPC status and exit 1; verify-chain exits 3
when the chain is broken, 4 when it verified but an anchor of it recorded in another log could not
be checked (recorded_anchor_unavailable). A command line that cannot be read (an unknown flag, a flag without its
value, a value given to a flag that takes none, an extra word) exits 2 before anything is sent.
)";

constexpr char kRequestIdUsage[] = "                  [--request-id ID]   (an idempotency key)\n";

// The flags every command takes, given before or after the command.
constexpr absl::string_view kGlobalFlags[] = {"config", "identity", "timeout"};

// The order of the usage's sections.
constexpr absl::string_view kServices[] = {"routing", "consent", "ingest", "sharing",
                                           "consent, ingest, sharing", "audit"};

bool IsFlag(absl::string_view arg) { return absl::StartsWith(arg, "--"); }

bool Contains(const std::vector<absl::string_view>& names, absl::string_view name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

bool IsGlobal(absl::string_view name) {
  return std::find(std::begin(kGlobalFlags), std::end(kGlobalFlags), name) !=
         std::end(kGlobalFlags);
}

bool TakesRequestId(const Command& command) { return Contains(command.value_flags, "request-id"); }

// Whether `name` is a value flag (`--flag value`) of the command, or of any command when `command`
// is null; the same name is never a value flag of one command and a switch of another.
bool IsValueFlag(const Command* command, absl::string_view name) {
  if (IsGlobal(name)) return true;
  if (command != nullptr) return Contains(command->value_flags, name);
  return std::any_of(Commands().begin(), Commands().end(),
                     [&](const Command& c) { return Contains(c.value_flags, name); });
}

bool IsSwitch(const Command* command, absl::string_view name) {
  if (command != nullptr) return Contains(command->switches, name);
  return std::any_of(Commands().begin(), Commands().end(),
                     [&](const Command& c) { return Contains(c.switches, name); });
}

const Command* FindCommand(absl::string_view name) {
  for (const Command& command : Commands()) {
    if (command.name == name) return &command;
  }
  return nullptr;
}

std::string CommandUsage(const Command& command) {
  return absl::StrCat("usage: medgate-ctl --config FILE --identity NAME [--timeout SECONDS] ",
                      command.name,
                      " [--flag value ...]\n", command.usage,
                      TakesRequestId(command) ? kRequestIdUsage : "");
}

// Where the command is: the first word that is not the value of a flag before it. Unknown flags
// are taken to have no value (they are refused anyway).
std::optional<size_t> CommandIndex(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (!IsFlag(args[i])) return i;
    if (IsValueFlag(nullptr, absl::string_view(args[i]).substr(2)) && i + 1 < args.size() &&
        !IsFlag(args[i + 1])) {
      ++i;
    }
  }
  return std::nullopt;
}

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command>* const commands = new std::vector<Command>{
      {"upsert-tenant", "routing",
       {"tenant", "name", "territories", "regions", "request-id", "expected-version"},
       {"inactive", "keep-placed-patients", "drop-region-narrowing"},
       "  upsert-tenant   --tenant ID --name NAME --territories FR,DE [--regions fr-1,...] "
       "[--inactive] [--keep-placed-patients]\n"
       "                  [--expected-version N (get-tenant's version)] [--drop-region-narrowing]\n"},
      {"get-tenant", "routing", {"tenant"}, {}, "  get-tenant      --tenant ID\n"},
      {"put-rule", "routing", {"territory", "regions", "readable-from", "expected-version"},
       {"keep-placed-patients"},
       "  put-rule        --territory BE --regions eu-1,fr-1 [--readable-from BE,FR] "
       "[--expected-version N] [--keep-placed-patients]\n"},
      {"list-rules", "routing", {"territories"}, {}, "  list-rules      [--territories FR,BE]\n"},
      {"list-regions", "routing", {}, {}, "  list-regions\n"},
      {"place-patient", "routing", {"ref", "territory", "request-id"}, {"allow-move"},
       "  place-patient   --ref REF --territory FR [--allow-move]\n"},
      {"assign-device", "routing", {"device", "ref", "request-id"}, {},
       "  assign-device   --device ID --ref REF\n"},
      {"unassign-device", "routing", {"device", "request-id"}, {},
       "  unassign-device --device ID\n"},
      {"grant-consent", "consent",
       {"patient", "purpose", "evidence", "actor", "categories", "request-id"}, {},
       "  grant-consent   --patient ID --purpose CARE|REMOTE_MONITORING|RECORD_SHARING|...\n"
       "                  --evidence REF [--actor SPIFFE_ID] [--categories heart-rate,...]\n"},
      {"upload-record", "sharing",
       {"patient", "file", "kind", "content-type", "file-name", "request-id"}, {},
       "  upload-record   --patient ID --file PATH [--kind document|imaging|report]\n"
       "                  [--content-type TYPE] [--file-name NAME]   (sent in 1 MiB chunks;\n"
       "                  NAME: the record's, the file's own by default)\n"},
      {"download-record", "sharing", {"record", "out", "break-glass"}, {},
       "  download-record --record ID --out PATH [--break-glass REASON]   (prints the record's "
       "metadata)\n"},
      {"erase-record", "sharing", {"record", "reason", "request-id"}, {},
       "  erase-record    --record ID --reason TEXT\n"},
      {"erase-vitals", "ingest", {"patient", "reason", "request-id"}, {},
       "  erase-vitals    --patient ID --reason TEXT   (every stored sample of the patient)\n"},
      {"export-vitals", "ingest", {"patient", "reason", "out", "request-id"}, {},
       "  export-vitals   --patient ID --reason TEXT --out PATH   (every stored sample of the\n"
       "                  patient, as FHIR R4 Observations in NDJSON)\n"},
      {"export-consents", "consent", {"patient", "reason", "out", "request-id"}, {},
       "  export-consents --patient ID --reason TEXT --out PATH   (every version of the\n"
       "                  patient's consents, as FHIR R4 Consents in NDJSON)\n"},
      {"export-records", "sharing", {"patient", "reason", "out", "request-id"}, {},
       "  export-records  --patient ID --reason TEXT --out DIR   (every record of the patient, as\n"
       "                  FHIR R4 DocumentReferences in DIR/DocumentReference.ndjson, each\n"
       "                  record's content in DIR/content/RECORD_ID)\n"},
      {"export-patient", "consent, ingest, sharing", {"patient", "reason", "out", "request-id"},
       {},
       "  export-patient  --patient ID --reason TEXT --out DIR   (everything stored of the\n"
       "                  patient, under one request id: DIR/Consent.ndjson, every version;\n"
       "                  DIR/Observation.ndjson; DIR/DocumentReference.ndjson with each\n"
       "                  record's content in DIR/content/RECORD_ID; all FHIR R4 NDJSON)\n"},
      {"data-report", "audit", {"patient", "request-id"}, {},
       "  data-report     --patient ID   (where the patient's data is, and who accessed it)\n"},
      {"verify-chain", "audit", {"log", "start-seq", "end-seq", "anchor-seq", "anchor-hash"}, {},
       "  verify-chain    --log fr-1|control [--start-seq N] [--end-seq N]\n"
       "                  [--anchor-seq N --anchor-hash BASE64]   (an earlier run's last_seq, "
       "last_hash)\n"},
      {"rebase-anchor", "audit", {"log", "reason", "request-id"}, {},
       "  rebase-anchor   --log fr-1|control --reason TEXT   (anchor the log anew from its head\n"
       "                  once you know why it no longer matches its last anchor: a restore)\n"},
  };
  return *commands;
}

std::string Usage() {
  std::string usage = kUsageHead;
  for (absl::string_view service : kServices) {
    absl::StrAppend(&usage, "commands (", absl::StrContains(service, ',') ? "services" : "service",
                    ": ", service, "):\n");
    for (const Command& command : Commands()) {
      if (command.service == service) absl::StrAppend(&usage, command.usage);
    }
  }
  std::vector<absl::string_view> with_request_id;
  for (const Command& command : Commands()) {
    if (TakesRequestId(command)) with_request_id.push_back(command.name);
  }
  absl::StrAppend(&usage, "These also take [--request-id ID], an idempotency key:\n  ",
                  absl::StrJoin(with_request_id, ", "), "\n", kUsageTail);
  return usage;
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args) {
  const std::optional<size_t> command_at = CommandIndex(args);
  const Command* command = command_at ? FindCommand(args[*command_at]) : nullptr;
  auto refuse = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(
        absl::StrCat(problem, "\n\n", command != nullptr ? CommandUsage(*command) : Usage()));
  };
  const std::string of_command = command != nullptr ? absl::StrCat(" of ", command->name) : "";
  CommandLine line;
  std::set<std::string> given;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (!IsFlag(arg)) {
      if (i == command_at) {
        if (command == nullptr) return refuse(absl::StrCat("unknown command '", arg, "'"));
        line.command = command;
        continue;
      }
      return refuse(absl::StrCat("unexpected word '", arg, "' after ", args[*command_at],
                                 " (a value with spaces must be quoted)"));
    }
    const absl::string_view name = absl::string_view(arg).substr(2);
    const size_t equals = name.find('=');
    if (equals != absl::string_view::npos) {
      const absl::string_view flag = name.substr(0, equals);
      if (IsSwitch(command, flag)) {
        return refuse(absl::StrCat("--", flag, " takes no value, not '", name.substr(equals + 1),
                                   "' (give --", flag, " for true, nothing for false)"));
      }
      return refuse(absl::StrCat("'", arg, "': give the value as the next word (--", flag,
                                 " VALUE)"));
    }
    if (IsSwitch(command, name)) {
      // The word after a switch is its value only by mistake (`--allow-move false`).
      if (i + 1 < args.size() && !IsFlag(args[i + 1]) && i + 1 != command_at) {
        return refuse(absl::StrCat("--", name, " takes no value, not '", args[i + 1], "' (give --",
                                   name, " for true, nothing for false)"));
      }
      if (!given.insert(std::string(name)).second) {
        return refuse(absl::StrCat("--", name, " given twice"));
      }
      line.flags[std::string(name)] = "true";
      continue;
    }
    if (!IsValueFlag(command, name)) {
      return refuse(absl::StrCat("unknown flag --", name, of_command));
    }
    if (i + 1 == args.size() || IsFlag(args[i + 1])) {
      return refuse(absl::StrCat("--", name, " needs a value",
                                 i + 1 == args.size() ? "" : absl::StrCat(", not ", args[i + 1])));
    }
    if (!given.insert(std::string(name)).second) {
      return refuse(absl::StrCat("--", name, " given twice"));
    }
    const std::string& value = args[++i];
    if (name == "config") {
      line.config_path = value;
    } else if (name == "identity") {
      line.identity = value;
    } else if (name == "timeout") {
      if (!ParseDecimal(value, kMaxTimeoutSeconds, &line.timeout_seconds) ||
          line.timeout_seconds == 0) {
        line.timeout_seconds = 0;
        return refuse(absl::StrCat("--timeout: whole seconds from 1 to ", kMaxTimeoutSeconds,
                                   ", not '", value, "'"));
      }
    } else {
      line.flags[std::string(name)] = value;
    }
  }
  if (line.config_path.empty()) return refuse("--config FILE is required");
  if (line.identity.empty()) return refuse("--identity NAME is required");
  if (command == nullptr) return refuse("no command given");
  return line;
}

bool ParseDecimal(absl::string_view text, uint64_t max, uint64_t* out) {
  if (text.empty() || !std::all_of(text.begin(), text.end(), absl::ascii_isdigit)) return false;
  uint64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value > max) return false;
  *out = value;
  return true;
}

}  // namespace medgate::ctl
