# Shared helpers for medgate's scripts (sourced, not run).
set -euo pipefail

MEDGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MEDGATE_ROOT
# The local stack of scripts/up and scripts/down: its state, and the build it runs.
MEDGATE_STATE="$MEDGATE_ROOT/.medgate"
MEDGATE_RELEASE="$MEDGATE_ROOT/build/release"

# The services scripts/up starts, in start order (routing first: the others resolve through it).
# Each service adds itself here when it exists: name|binary (under the Release build).
SERVICES=(
  "routing|services/routing/medgate-routing"
  "consent|services/consent/medgate-consent"
  "ingest|services/ingest/medgate-ingest"
  "sharing|services/sharing/medgate-sharing"
)

log() { printf '\033[1m[medgate]\033[0m %s\n' "$*" >&2; }
die() { printf '[medgate] error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a PostgreSQL server command: PostgreSQL refuses to run as root, so root uses 'postgres'
# (from '/': the current directory may be out of its reach; every path given is absolute).
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pg_bindir() { pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin; }

# --- where the PostgreSQL data directories live --------------------------------------------------
# In .medgate/pg, unless root runs the stack from a checkout the postgres user cannot reach (one
# cloned into /root, which is 0700): then in /var/lib/medgate/<hash of the checkout's path>, a
# directory of that user's own. Once that directory exists it is kept, so that scripts/up and
# scripts/down always agree on it.

# The directory outside the checkout (whether it exists or not).
pg_outside_dir() {
  local real
  real=$(cd "$MEDGATE_ROOT" && pwd -P)
  echo "/var/lib/medgate/$(printf '%s' "$real" | sha256sum | cut -c1-12)"
}

# Whether the postgres user can reach .medgate/pg. scripts/up makes the checkout and .medgate
# traversable itself; the folders above the checkout are left as they are, and must be.
pg_user_reaches_checkout() {
  [ "$(id -u)" -eq 0 ] || return 0  # the servers run as the user who runs the scripts
  id -u postgres >/dev/null 2>&1 || return 0  # not installed yet: nothing runs as postgres
  as_pg_user test -x "$(dirname "$MEDGATE_ROOT")"
}

# The directory holding this checkout's data directories (and the password initdb reads).
pg_state_dir() {
  local outside
  outside=$(pg_outside_dir)
  if [ "$(id -u)" -eq 0 ] && [ -d "$outside" ]; then
    echo "$outside"
  elif pg_user_reaches_checkout; then
    echo "$MEDGATE_STATE/pg"
  else
    echo "$outside"
  fi
}

# Creates the directory pg_state_dir names, reachable by the postgres user (scripts/up).
pg_state_prepare() {
  local dir=$1
  if [ "$dir" = "$MEDGATE_STATE/pg" ]; then
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
      chmod o+x "$MEDGATE_ROOT" "$MEDGATE_STATE" || true
      chown postgres "$dir"
    fi
  else
    mkdir -p /var/lib/medgate
    chmod 0755 /var/lib/medgate
    install -d -m 0700 -o postgres -g postgres "$dir"
    # Whose directory this is, for people; written as its owner (a link there is not followed
    # with root's rights).
    (cd "$MEDGATE_ROOT" && pwd -P) | as_pg_user tee "$dir/checkout" >/dev/null
  fi
}

# --- processes of the stack ----------------------------------------------------------------------
# Whether process $1 runs the binary $2 (a pidfile left from before a reboot may name a PID that
# another program has been given since). A binary rebuilt under a running process reads
# '<path> (deleted)'; a zombie has no binary, and does not run. Another user's process (the
# postgres servers) cannot have its binary read without CAP_SYS_PTRACE, which containers drop:
# its command name, which anyone may read, is compared instead.
pid_runs() {
  local pid=$1 want exe comm
  [[ "$pid" =~ ^[1-9][0-9]*$ ]] || return 1
  want=$(readlink -m "$2")
  if exe=$(readlink "/proc/$pid/exe" 2>/dev/null); then
    [ "$exe" = "$want" ] || [ "$exe" = "$want (deleted)" ]
    return
  fi
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  [ "$comm" = "$(basename "$want" | cut -c1-15)" ]
}

# The binary of service $1 in the Release build.
service_binary() {
  local entry
  for entry in "${SERVICES[@]}"; do
    if [ "${entry%%|*}" = "$1" ]; then echo "$MEDGATE_RELEASE/${entry#*|}"; return; fi
  done
  echo "$MEDGATE_RELEASE/services/$1/medgate-$1"
}

# How long a service drains its calls after SIGTERM: limits.drain_seconds of the stack's
# configuration, or its default (libs/common/config.h).
drain_seconds() {
  local s
  s=$(grep -o 'drain_seconds: *[0-9][0-9]*' "$MEDGATE_STATE/medgate.yaml" 2>/dev/null |
      grep -o '[0-9]*$' | tail -n 1) || true
  echo "${s:-20}"
}

# Stops the named services of scripts/up: SIGTERM to each, as long as their drain may take plus
# 5 s for them to exit, then SIGKILL. A pidfile is removed once its process is gone, or when it
# names no process of that service (which is not signalled). Non-zero if one survives.
stop_services() {
  local name pid pidfile binary wait_s deadline status=0 i
  local names=() pids=()
  for name in "$@"; do
    pidfile="$MEDGATE_STATE/run/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null) || pid=
    binary=$(service_binary "$name")
    if pid_runs "$pid" "$binary"; then
      kill -TERM "$pid" 2>/dev/null || true
      names+=("$name"); pids+=("$pid")
    else
      if [[ "$pid" =~ ^[1-9][0-9]*$ ]] && kill -0 "$pid" 2>/dev/null; then
        log "$name: its pidfile names pid $pid, which does not run $binary (left from before a reboot?): not signalled"
      fi
      rm -f "$pidfile"
    fi
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  wait_s=$(( $(drain_seconds) + 5 ))
  alive() { local p; for p in "${pids[@]}"; do [ -z "$p" ] || return 0; done; return 1; }
  reap() {  # forgets the processes that exited, removing their pidfiles
    for i in "${!pids[@]}"; do
      if [ -n "${pids[$i]}" ] && ! pid_runs "${pids[$i]}" "$(service_binary "${names[$i]}")"; then
        rm -f "$MEDGATE_STATE/run/${names[$i]}.pid"
        log "stopped ${names[$i]}"
        pids[$i]=
      fi
    done
  }
  deadline=$((SECONDS + wait_s))
  while reap; alive && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if alive; then
    for i in "${!pids[@]}"; do
      [ -n "${pids[$i]}" ] || continue
      log "${names[$i]} (pid ${pids[$i]}) still runs ${wait_s}s after SIGTERM: SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    done
    deadline=$((SECONDS + 5))
    while reap; alive && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    for i in "${!pids[@]}"; do
      [ -n "${pids[$i]}" ] || continue
      log "${names[$i]} (pid ${pids[$i]}) survived SIGKILL: its pidfile is kept"
      status=1
    done
  fi
  return $status
}

# Whether process $1 is the postmaster of data directory $2: PostgreSQL, started with that
# directory (pg_ctl gives it on the command line, which every user may read).
pg_postmaster_of() {
  local want arg prev=""
  pid_runs "$1" "$(pg_bindir)/postgres" || return 1
  [ -r "/proc/$1/cmdline" ] || return 1
  want=$(readlink -m "$2")
  while IFS= read -r -d '' arg; do
    if [ "$prev" = "-D" ] && [ "$(readlink -m "$arg")" = "$want" ]; then return 0; fi
    prev=$arg
  done < "/proc/$1/cmdline"
  return 1
}

# Whether the PostgreSQL server of data directory $1 runs: pg_ctl's answer, checked against the
# process its postmaster.pid names (which, left from before a reboot, may be another program, or
# another server's process).
pg_running() {
  local pid
  as_pg_user "$(pg_bindir)/pg_ctl" -D "$1" status >/dev/null 2>&1 || return 1
  pid=$(as_pg_user head -n 1 "$1/postmaster.pid" 2>/dev/null) || return 1
  pg_postmaster_of "$pid" "$1"
}

# The PID a stale postmaster.pid of data directory $1 names when a process that is not this
# directory's server has it (pg_ctl would take that process for the server); nothing otherwise.
pg_stale_pid() {
  local pid
  pid=$(as_pg_user head -n 1 "$1/postmaster.pid" 2>/dev/null) || return 0
  if [[ "$pid" =~ ^[1-9][0-9]*$ ]] && kill -0 "$pid" 2>/dev/null &&
     ! pg_postmaster_of "$pid" "$1"; then
    echo "$pid"
  fi
}
