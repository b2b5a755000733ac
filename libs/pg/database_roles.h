// The PostgreSQL roles the services connect as. The configuration's connection strings name the
// role that owns the schema (medgate-migrate connects as it); each service replaces that user with
// its own role, which the migrations grant only what the service does (migrations/*/
// *_service_roles.sql). No service role may change or delete audit entries, append them other than
// through the chaining functions, or alter a table.
#ifndef MEDGATE_LIBS_PG_DATABASE_ROLES_H_
#define MEDGATE_LIBS_PG_DATABASE_ROLES_H_

#include <array>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "libs/common/config.h"

namespace medgate::pg {

inline constexpr absl::string_view kRoutingRole = "medgate_routing";
inline constexpr absl::string_view kConsentRole = "medgate_consent";
inline constexpr absl::string_view kIngestRole = "medgate_ingest";
// The sharing binary's: record sharing and the Audit service it also serves.
inline constexpr absl::string_view kSharingRole = "medgate_sharing";
inline constexpr std::array<absl::string_view, 4> kServiceRoles = {kRoutingRole, kConsentRole,
                                                                   kIngestRole, kSharingRole};

// `conninfo` (keyword/value or URI form) with its user replaced by `role`, in keyword/value form;
// every other setting (password, passfile, TLS) is kept. INVALID_ARGUMENT if libpq cannot parse
// it; the message does not quote it, since it may hold a password.
absl::StatusOr<std::string> ConninfoAs(const std::string& conninfo, absl::string_view role);

// `config` with every database's connection string (control, shards, key vaults) made `role`'s.
// INVALID_ARGUMENT naming the config key of a connection string libpq cannot parse.
absl::StatusOr<MedgateConfig> ConfigAs(const MedgateConfig& config, absl::string_view role);

}  // namespace medgate::pg

#endif  // MEDGATE_LIBS_PG_DATABASE_ROLES_H_
