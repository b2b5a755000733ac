# Shared helpers for medgate's scripts (sourced, not run).
set -euo pipefail

MEDGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MEDGATE_ROOT

log() { printf '\033[1m[medgate]\033[0m %s\n' "$*" >&2; }
die() { printf '[medgate] error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a PostgreSQL server command: PostgreSQL refuses to run as root, so root uses 'postgres'.
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() { pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin; }
