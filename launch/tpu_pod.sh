#!/usr/bin/env bash
# csd-jax on every worker of a TPU VM slice: one process per worker host (JAX finds the other
# workers itself), the code pinned to ONE commit on every worker, then the logs collected here.
#
#   launch/tpu_pod.sh [--dry-run] [--allow-dirty] [--shared-fs] TPU_NAME ZONE -- \
#       train --config configs/X.yaml [key=value ...]
#
# The run directory: `--workdir` among the csd-jax arguments, else $WORKDIR, else
# gs://$BUCKET/csd-jax/TPU_NAME. It must be a gs:// location (the workers share no disk: Orbax
# writes each worker's shards there, and re-running the same command resumes from it after a
# preemption); --shared-fs accepts another path, for a filesystem every worker mounts (NFS).
#
# The code: REPO, a git URL or a local checkout (default: this one), at COMMIT (default: the
# checkout's HEAD, or the URL's HEAD as `git ls-remote` gives it). A local checkout is sent as
# `git archive COMMIT` (a tree with uncommitted changes is refused: commit them, or pass
# --allow-dirty to send HEAD without them); a URL is cloned on every worker. Each worker
# unpacks into ~/csd-jax-COMMIT, installs it into a venv there ('.[tpu]') and runs csd-jax.
#
# Environment sent to the workers, where set here: HF_TOKEN HF_HUB_OFFLINE HF_HOME
# HF_ENDPOINT WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY WANDB_BASE_URL XLA_FLAGS
# LIBTPU_INIT_ARGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL, every JAX_*, and the names listed in
# FORWARD_ENV. They travel in a file (scp, then sourced and deleted), never on a command line.
# PROJECT: the gcloud project (optional). --dry-run prints every command instead of running it
# (secret values masked).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh  # die, pin_local_commit, resolve_workdir, ...
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 [--dry-run] [--allow-dirty] [--shared-fs] TPU_NAME ZONE -- <csd-jax arguments>" >&2
  exit 2
}
dry_run=0; allow_dirty=0; shared_fs=0
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --allow-dirty) allow_dirty=1 ;;
    --shared-fs) shared_fs=1 ;;
    *) echo "$0: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 3 && "$3" == "--" ]] || usage
tpu="$1"; zone="$2"; shift 3
[[ $# -gt 0 ]] || { echo "$0: no csd-jax arguments after --: e.g. -- train --config configs/X.yaml" >&2; exit 2; }
args=("$@")

# The run directory: the arguments' --workdir, else WORKDIR, else the bucket's default.
resolve_workdir "$tpu"
[[ -n "$workdir" ]] || die "no run directory: set BUCKET (gs://BUCKET/csd-jax/$tpu) or WORKDIR=gs://..., or pass --workdir gs://... (a pod's workers share no local disk)"
[[ $shared_fs == 1 ]] || require_gs_workdir "--workdir $workdir is not a gs:// location, and a pod's workers share no local disk: use gs://BUCKET/..., or --shared-fs for a filesystem every worker mounts"

# The code, pinned to one commit.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="${REPO:-$here}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [[ "$repo" =~ ^(https?|ssh|git)://|^git@ ]]; then
  commit="${COMMIT:-}"
  [[ -z "$commit" || "$commit" =~ ^[0-9a-f]{40}$ ]] \
    || { echo "$0: COMMIT=$commit: give the full 40-digit commit id for a URL" >&2; exit 2; }
  if [[ -z "$commit" ]]; then
    commit="$(git ls-remote "$repo" HEAD 2> /dev/null | cut -f1)" || commit=""
    [[ -n "$commit" ]] || { echo "$0: cannot read HEAD of $repo: set COMMIT to the commit to run" >&2; exit 2; }
  fi
  # shellcheck disable=SC2088  # the tilde expands on the workers, in their home directories
  code_dir="~/csd-jax-$commit"
  fetch="test -d $code_dir || { git clone -q $(printf '%q' "$repo") $code_dir.tmp && git -C $code_dir.tmp checkout -q --detach $commit && mv $code_dir.tmp $code_dir; }"
  archive=()
else
  if [[ ! -d "$repo" ]] || ! git -C "$repo" rev-parse --git-dir > /dev/null 2>&1; then
    echo "$0: REPO=$repo is neither a git URL nor a git checkout: point REPO at one" >&2
    exit 2
  fi
  pin_local_commit "the workers"
  archive=(git -C "$repo" archive --format=tar.gz -o "$tmp/csd-jax-$commit.tar.gz" "$commit")
  # shellcheck disable=SC2088  # the tilde expands on the workers, in their home directories
  code_dir="~/csd-jax-$commit"
  fetch="test -d $code_dir || { mkdir -p $code_dir.tmp && tar -xzf ~/csd-jax-$commit.tar.gz -C $code_dir.tmp && mv $code_dir.tmp $code_dir; }; rm -f ~/csd-jax-$commit.tar.gz"
fi

# The environment, in a file: only the variables set here.
env_file="$tmp/csd-jax-env.sh"
write_env_file "$env_file" shell

project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")
send=(gcloud compute tpus tpu-vm scp "$env_file" ${archive[@]:+"$tmp/csd-jax-$commit.tar.gz"}
      "$tpu:~/" --zone "$zone" "${project_flag[@]}" --worker=all)
quoted=$(printf ' %q' "${args[@]}")
remote="set -eo pipefail; set -a; . ~/csd-jax-env.sh; set +a; rm -f ~/csd-jax-env.sh; \
$fetch; cd $code_dir && { test -x .venv/bin/csd-jax || python3 -m venv .venv; } && \
.venv/bin/pip install -q -e '.[tpu]' && .venv/bin/csd-jax$quoted 2>&1 | tee ~/csd-jax-\$(hostname).log"
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all
     --command "$remote")
collect=(gcloud compute tpus tpu-vm scp "$tpu:~/csd-jax-*.log" ./tpu-logs/ --zone "$zone"
         "${project_flag[@]}" --worker=all)

if [[ $dry_run == 1 ]]; then
  echo "# commit $commit; run directory $workdir; $env_file holds:"
  printf '%s' "$shown" | sed 's/^/#   /'
  [[ ${#archive[@]} -gt 0 ]] && { printf '%q ' "${archive[@]}"; echo; }
  printf '%q ' "${send[@]}"; echo
  printf '%q ' "${ssh[@]}"; echo
  echo "mkdir -p ./tpu-logs"
  printf '%q ' "${collect[@]}"; echo
  exit 0
fi
[[ ${#archive[@]} -gt 0 ]] && "${archive[@]}"
"${send[@]}"
status=0
"${ssh[@]}" || status=$?
mkdir -p ./tpu-logs
"${collect[@]}" || echo "$0: could not collect the workers' logs" >&2
echo "commit $commit, run directory $workdir; logs in ./tpu-logs (status $status)"
exit "$status"
