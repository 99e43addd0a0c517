#!/usr/bin/env bash
# csd-jax as an xpk workload on a GKE TPU cluster (as MaxText runs: `xpk workload create`), one
# container per TPU VM host of every slice; JAX finds the other hosts itself.
#
#   launch/xpk.sh [--dry-run] [--allow-dirty] CLUSTER TPU_TYPE -- \
#       train --config configs/X.yaml [key=value ...]
#
# The run directory: `--workdir` among the csd-jax arguments, else $WORKDIR, else
# gs://$BUCKET/csd-jax/WORKLOAD; it must be gs:// (the hosts share no disk; re-running with the
# same directory resumes the run).
# The code, pinned to ONE commit: with DOCKER_IMAGE (an image with csd-jax[tpu] installed), that
# image as it is; otherwise `git archive COMMIT` of REPO (default: this checkout; COMMIT
# default HEAD; a tree with uncommitted changes is refused unless --allow-dirty) is unpacked
# into a directory that xpk layers onto BASE_DOCKER_IMAGE (default python:3.12-bookworm)
# (`--script-dir`), and the container installs it ('.[tpu]') before it runs csd-jax.
# Environment: NUM_SLICES (default 1), WORKLOAD (default csd-jax-<commit>-<time>), PROJECT,
# ZONE; sent to the containers through xpk's --env-file, where set here: HF_TOKEN
# HF_HUB_OFFLINE HF_HOME HF_ENDPOINT WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY
# WANDB_BASE_URL XLA_FLAGS LIBTPU_INIT_ARGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL, every JAX_*,
# and the names in FORWARD_ENV. --dry-run prints the commands (secret values masked).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh  # die, pin_local_commit, resolve_workdir, ...
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 [--dry-run] [--allow-dirty] CLUSTER TPU_TYPE -- <csd-jax arguments>" >&2
  exit 2
}
dry_run=0; allow_dirty=0
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --allow-dirty) allow_dirty=1 ;;
    *) echo "$0: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 3 && "$3" == "--" ]] || usage
cluster="$1"; tpu_type="$2"; shift 3
[[ $# -gt 0 ]] || { echo "$0: no csd-jax arguments after --: e.g. -- train --config configs/X.yaml" >&2; exit 2; }
args=("$@")
slices="${NUM_SLICES:-1}"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_SLICES must be a positive integer, got '$slices'" >&2; exit 2; }

# The code, pinned to one commit (or the prebuilt image).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="${REPO:-$here}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
image=()
if [[ -n "${DOCKER_IMAGE:-}" ]]; then
  image=(--docker-image "$DOCKER_IMAGE")
  tag="$(printf '%s' "${DOCKER_IMAGE##*[:@]}" | tr -c 'a-z0-9' '-' | cut -c1-12)"
  archive=()
else
  git -C "$repo" rev-parse --git-dir > /dev/null 2>&1 \
    || { echo "$0: REPO=$repo is not a git checkout: point REPO at one, or set DOCKER_IMAGE" >&2; exit 2; }
  pin_local_commit "the image"
  tag="${commit:0:8}"
  mkdir -p "$tmp/code"
  archive=(git -C "$repo" archive --format=tar -o "$tmp/code.tar" "$commit")
  image=(--base-docker-image "${BASE_DOCKER_IMAGE:-python:3.12-bookworm}" --script-dir "$tmp/code")
fi
workload="${WORKLOAD:-csd-jax-$tag-$(date +%m%d%H%M%S)}"

# The run directory: the arguments' --workdir, else WORKDIR, else the bucket's default.
resolve_workdir "$workload"
require_gs_workdir "the run directory '${workdir}' is not a gs:// location, and the hosts share no disk: set BUCKET or WORKDIR=gs://..., or pass --workdir gs://..."

# The environment, in a docker --env-file (NAME=value, literal): only the variables set here.
env_file="$tmp/env"
write_env_file "$env_file" docker

quoted=$(printf ' %q' "${args[@]}")
if [[ -n "${DOCKER_IMAGE:-}" ]]; then
  command="csd-jax$quoted"
else
  command="pip install -q -e '.[tpu]' && csd-jax$quoted"
fi
project_flags=()
[[ -n "${PROJECT:-}" ]] && project_flags+=(--project "$PROJECT")
[[ -n "${ZONE:-}" ]] && project_flags+=(--zone "$ZONE")
create=(xpk workload create --cluster "$cluster" --workload "$workload" "${image[@]}"
        --tpu-type "$tpu_type" --num-slices "$slices" "${project_flags[@]}"
        --env-file "$env_file" --command "$command")

if [[ $dry_run == 1 ]]; then
  echo "# ${commit:+commit $commit; }run directory $workdir; $env_file holds:"
  printf '%s' "$shown" | sed 's/^/#   /'
  if [[ ${#archive[@]} -gt 0 ]]; then
    printf '%q ' "${archive[@]}"; echo
    printf '%q ' tar -xf "$tmp/code.tar" -C "$tmp/code"; echo
  fi
  printf '%q ' "${create[@]}"; echo
  exit 0
fi
if [[ ${#archive[@]} -gt 0 ]]; then
  "${archive[@]}"
  tar -xf "$tmp/code.tar" -C "$tmp/code"
fi
"${create[@]}"
echo "workload $workload${commit:+ (commit ${commit:0:12})}, run directory $workdir; follow it with: xpk workload list --cluster $cluster"
