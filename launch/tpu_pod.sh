#!/usr/bin/env bash
# csd-jax on every worker of a TPU VM slice (one process per worker host; JAX finds the other
# workers itself), then the logs collected here.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- train --config configs/X.yaml --workdir W
#
# The workdir should be on storage every worker sees (a GCS path with gcsfuse, or NFS): Orbax
# writes each worker's shards there and the run resumes from it after a preemption: re-run
# the same command. Environment: REPO (git URL or path of csd-jax on the workers, default
# ~/csd-jax, cloned beforehand), PROJECT (gcloud project, optional).
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE -- <csd-jax arguments>" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 3
repo="${REPO:-~/csd-jax}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")
quoted=$(printf ' %q' "$@")
remote="cd $repo && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' && \
.venv/bin/csd-jax$quoted 2>&1 | tee ~/csd-jax-\$(hostname).log"
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all
     --command "$remote")
collect=(gcloud compute tpus tpu-vm scp "$tpu:~/csd-jax-*.log" ./tpu-logs/ --zone "$zone"
         "${project_flag[@]}" --worker=all)
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${ssh[@]}"; echo
  echo "mkdir -p ./tpu-logs"
  printf '%q ' "${collect[@]}"; echo
  exit 0
fi
"${ssh[@]}"
mkdir -p ./tpu-logs
"${collect[@]}"
echo "logs in ./tpu-logs"
