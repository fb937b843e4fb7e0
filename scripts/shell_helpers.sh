# Sourced by the shell scripts: their -h/--help, and the launcher of the stages that run on several processes.

# help_if_asked SCRIPT ARGS...: with -h or --help among ARGS, print SCRIPT's header comment (line 2 up to
# `set -euo pipefail`) and exit.
help_if_asked() {
  local arg
  for arg in "${@:2}"; do
    case "$arg" in -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo pipefail/d;s/^# \{0,1\}//;p}' "$1"; exit 0 ;; esac
  done
}

# set_launcher N [MIXED_PRECISION]: LAUNCHER is python for one process, else accelerate launch over N processes.
set_launcher() {
  LAUNCHER=(python)
  if [ "$1" -gt 1 ]; then
    LAUNCHER=(accelerate launch --num_processes "$1")
    if [ -n "${2:-}" ]; then LAUNCHER+=(--mixed_precision "$2"); fi
  fi
}
