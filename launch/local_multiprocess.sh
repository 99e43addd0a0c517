#!/usr/bin/env bash
# N csd-jax processes on this machine, joined through jax.distributed (a real multi-host run:
# each process owns its devices and reads its own slice of the data; CPU collectives use gloo).
#
#   launch/local_multiprocess.sh [--dry-run] N -- train --config configs/tiny.yaml --workdir W
#
# Environment: PORT (default 12355), DEVICES_PER_PROCESS (CPU devices per process, default 1),
# CSD_JAX (the command; default: csd-jax on PATH, else this checkout's .venv: see find_cli).
# Logs: W/logs/process_<i>.log (W from --workdir, else ./logs). Exits with the first non-zero
# status of the processes.
set -euo pipefail

# The csd-jax command, as the words of the array `cli`: $CSD_JAX if set (it may hold words, e.g.
# "python -m csd_jax.cli"), else csd-jax on PATH, else the checkout's .venv/bin/csd-jax, else
# `python -m csd_jax.cli` with the checkout on PYTHONPATH. A venv need not be activated.
find_cli() {
  local repo="$1" python
  if [[ -n "${CSD_JAX:-}" ]]; then
    read -ra cli <<< "$CSD_JAX"
    [[ ${#cli[@]} -gt 0 ]] && command -v "${cli[0]}" > /dev/null && return 0
    echo "$0: CSD_JAX='$CSD_JAX' is not a command" >&2
    return 127
  fi
  if command -v csd-jax > /dev/null; then cli=(csd-jax); return 0; fi
  if [[ -x "$repo/.venv/bin/csd-jax" ]]; then cli=("$repo/.venv/bin/csd-jax"); return 0; fi
  for python in "$repo/.venv/bin/python" python3 python; do
    if command -v "$python" > /dev/null \
        && PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "import csd_jax" 2> /dev/null
    then
      export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
      cli=("$python" -m csd_jax.cli)
      return 0
    fi
  done
  echo "$0: cannot find csd-jax (not on PATH, no $repo/.venv): activate the venv where it is" \
       "installed, set CSD_JAX to the command, or run 'pip install -e .' in $repo/.venv" >&2
  return 127
}

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 || "$2" != "--" ]]; then
  echo "usage: $0 [--dry-run] N -- <csd-jax arguments>" >&2
  exit 2
fi
n="$1"; shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$n'" >&2; exit 2; }
port="${PORT:-12355}"
devices="${DEVICES_PER_PROCESS:-1}"
find_cli "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 127

logdir="./logs"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[$i]}" == "--workdir" && $((i + 1)) -lt ${#args[@]} ]]; then
    logdir="${args[$((i + 1))]}/logs"
  fi
done

pids=()
for ((i = 0; i < n; i++)); do
  env_vars=(CSD_JAX_COORDINATOR="127.0.0.1:${port}" CSD_JAX_NUM_PROCESSES="$n"
            CSD_JAX_PROCESS_ID="$i" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
            XLA_FLAGS="--xla_force_host_platform_device_count=${devices}")
  if [[ $dry_run == 1 ]]; then
    echo "env ${env_vars[*]} ${cli[*]} $* > $logdir/process_$i.log 2>&1 &"
    continue
  fi
  mkdir -p "$logdir"
  env "${env_vars[@]}" "${cli[@]}" "$@" > "$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
[[ $dry_run == 1 ]] && exit 0

trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [[ $status == 0 ]] && status=$rc; }
done
echo "processes finished (status $status); logs in $logdir"
exit "$status"
