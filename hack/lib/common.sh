# shellcheck shell=bash
# Shared helpers for the hack/ scripts. Source it; do not execute it.
#
#   HACK_DIR      absolute path of hack/
#   REPO_ROOT     absolute path of the repository
#   STATE_ROOT    persistent state of the helper daemons (default /var/lib/faasnet-hack,
#                 override with FAASNET_HACK_STATE)
#   RUN_ROOT      runtime state (pids, sockets; default /run/faasnet-hack,
#                 override with FAASNET_HACK_RUN)

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
STATE_ROOT="${FAASNET_HACK_STATE:-/var/lib/faasnet-hack}"
RUN_ROOT="${FAASNET_HACK_RUN:-/run/faasnet-hack}"
export HACK_DIR REPO_ROOT STATE_ROOT RUN_ROOT

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "missing command '$c' (run hack/install-deps.sh)"
  done
}

# pid_alive PIDFILE: true when the pid recorded in PIDFILE is a running process.
pid_alive() {
  local pidfile="$1" pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(<"$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null
}

# stop_pid PIDFILE [TIMEOUT_S]: TERM the recorded pid, wait, KILL if needed, remove the file.
stop_pid() {
  local pidfile="$1" timeout="${2:-10}" pid i
  if pid_alive "$pidfile"; then
    pid="$(<"$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not exit after ${timeout}s, sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$pidfile"
}

# wait_for DESCRIPTION TIMEOUT_S CMD...: retry CMD every 0.1s until it succeeds.
wait_for() {
  local what="$1" timeout="$2" i
  shift 2
  for ((i = 0; i < timeout * 10; i++)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  log "timed out after ${timeout}s waiting for ${what}"
  return 1
}

# launch_daemon STDOUT_FILE STDERR_FILE CMD...: starts CMD in its own session, detached from
# our stdin and from every inherited descriptor above 2 (locks, pipes of the caller), with
# its stdout and stderr appended to the two files. Prints its pid.
launch_daemon() {
  local out="$1" err="$2"
  shift 2
  (
    local fd
    for fd in /proc/self/fd/*; do
      fd="${fd##*/}"
      if [[ "$fd" =~ ^[0-9]+$ ]] && ((fd > 2)); then
        eval "exec ${fd}>&-" 2>/dev/null || true
      fi
    done
    exec setsid "$@" >>"$out" 2>>"$err" </dev/null
  ) &
  echo $!
}
