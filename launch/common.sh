# shellcheck shell=bash
# What launch/tpu_pod.sh and launch/xpk.sh share, sourced by them from this directory. It runs
# on the launching machine only: the workers / containers get the code and the env file it
# writes, never this file. The functions read and set the calling script's variables (they set
# commit, workdir, args and shown; read repo, allow_dirty and dry_run), as inline code would.

# die MESSAGE: the one-line refusal, "$0: MESSAGE" on stderr, and exit status 2.
die() {
  echo "$0: $1" >&2
  exit 2
}

# pin_local_commit WHO: the commit to run, into $commit: $COMMIT (default HEAD) of the local
# checkout $repo. Uncommitted changes there are not sent (WHO, e.g. "the workers", would not get
# them), so a tree with any is refused unless --allow-dirty ($allow_dirty) or --dry-run
# ($dry_run), which only warn.
# shellcheck disable=SC2154  # repo, allow_dirty and dry_run are the calling script's
pin_local_commit() {
  local note
  commit="$(git -C "$repo" rev-parse --verify "${COMMIT:-HEAD}^{commit}")"
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
    if [[ $allow_dirty == 0 && $dry_run == 0 ]]; then
      die "$repo has uncommitted changes, which $1 would not get: commit them, or pass --allow-dirty to run commit ${commit:0:12} without them"
    fi
    note=""; [[ $allow_dirty == 0 ]] && note=" (a real run refuses them without --allow-dirty)"
    echo "$0: warning: running commit ${commit:0:12}; the uncommitted changes in $repo stay here$note" >&2
  fi
  return 0
}

# resolve_workdir NAME: the run directory into $workdir: the last --workdir (or --workdir=) among
# the csd-jax arguments in args, else $WORKDIR, else gs://$BUCKET/csd-jax/NAME; a directory taken
# from the environment is appended to args as --workdir. $workdir is empty when none is given.
resolve_workdir() {
  local i
  workdir=""
  for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == "--workdir" && $((i + 1)) -lt ${#args[@]} ]] && workdir="${args[$((i + 1))]}"
    [[ "${args[$i]}" == --workdir=* ]] && workdir="${args[$i]#--workdir=}"
  done
  if [[ -z "$workdir" ]]; then
    if [[ -n "${WORKDIR:-}" ]]; then workdir="$WORKDIR"
    elif [[ -n "${BUCKET:-}" ]]; then workdir="gs://${BUCKET#gs://}"; workdir="${workdir%/}/csd-jax/$1"
    fi
    [[ -n "$workdir" ]] && args+=(--workdir "$workdir")
  fi
  return 0
}

# require_gs_workdir MESSAGE: refuse (die MESSAGE) unless $workdir is a gs:// location: the
# hosts of a slice share no local disk, so every one must write its shards to the bucket.
require_gs_workdir() {
  [[ "$workdir" == gs://* ]] || die "$1"
}

# write_env_file FILE STYLE: the variables to forward that are set here (HF_*, WANDB_*, XLA and
# TPU flags below, every JAX_*, and the names in FORWARD_ENV) into FILE, made mode 600 before
# anything is written to it, one a line; the same lines into $shown with the values of secrets
# (TOKEN, KEY, SECRET, PASSWORD in the name) masked, for --dry-run. STYLE "shell": `export
# NAME=VALUE` with the value %q-quoted, for bash to source; STYLE "docker": `NAME=VALUE`
# literally, for a docker --env-file, which cannot carry a newline (such a value is refused).
# The locals are prefixed so that ${!name} still finds the caller's variables of any name.
write_env_file() {
  local _ef_file="$1" _ef_style="$2" _ef_name _ef_line _ef_masked
  local -a _ef_names=(HF_TOKEN HF_HUB_OFFLINE HF_HOME HF_ENDPOINT WANDB_API_KEY WANDB_MODE
                      WANDB_PROJECT WANDB_ENTITY WANDB_BASE_URL XLA_FLAGS LIBTPU_INIT_ARGS
                      TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL)
  local -a _ef_extra _ef_jax
  read -ra _ef_extra <<< "${FORWARD_ENV:-}"
  mapfile -t _ef_jax < <(compgen -e | grep '^JAX_' || true)
  : > "$_ef_file"; chmod 600 "$_ef_file"
  shown=""
  for _ef_name in "${_ef_names[@]}" "${_ef_jax[@]}" "${_ef_extra[@]}"; do
    [[ "$_ef_name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "FORWARD_ENV holds '$_ef_name', not a variable name"
    [[ -n "${!_ef_name+x}" ]] || continue
    if [[ "$_ef_style" == shell ]]; then
      _ef_line="$(printf 'export %s=%q' "$_ef_name" "${!_ef_name}")"
      _ef_masked="export $_ef_name=***"
    else
      [[ "${!_ef_name}" != *$'\n'* ]] || die "$_ef_name holds a newline, which an env file cannot carry"
      _ef_line="$_ef_name=${!_ef_name}"
      _ef_masked="$_ef_name=***"
    fi
    printf '%s\n' "$_ef_line" >> "$_ef_file"
    if [[ "$_ef_name" =~ TOKEN|KEY|SECRET|PASSWORD ]]; then shown+="$_ef_masked"$'\n'
    else shown+="$_ef_line"$'\n'; fi
  done
}
