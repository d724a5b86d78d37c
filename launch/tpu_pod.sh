#!/usr/bin/env bash
# Run one `pewm` command on every worker (host) of a Cloud TPU VM slice.
#
# Usage:
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [options] -- pewm <job> ...
#
#   launch/tpu_pod.sh --tpu=my-v5p --zone=us-east5-a --setup --python=python3.11 -- \
#       pewm run --config=configs/pewm_base.py:v5p-128 --workdir=gs://BUCKET/runs/base --resume
#
# Every worker gets PEWM_MULTIHOST=1 (jax.distributed.initialize() reads the slice's topology
# from the TPU VM metadata), cds into --repo_dir, activates <repo_dir>/.venv when it exists, and
# execs the command. Run the same line again after a preemption: --resume continues from the
# latest checkpoint in --workdir, which must be a path every worker sees (gs://...).
#
# Options (--opt=value or --opt value):
#   --tpu NAME         TPU VM name (required)
#   --zone ZONE        its zone (required)
#   --project P        GCP project (default: gcloud's configured project)
#   --repo_dir DIR     the repository on each worker (default ~/pewm-jax)
#   --setup            first put the repository on every worker and install it (see below);
#                      without a command, only that
#   --git_url URL      with --setup: git clone/pull URL on the workers instead of copying the
#                      local checkout (tracked and untracked-not-ignored files, as a tarball)
#   --python PY        with --setup: interpreter for <repo_dir>/.venv (default python3; the
#                      project needs Python >= 3.11, newer than some TPU VM images ship)
#   --env KEY=VALUE    extra environment variable on every worker (repeatable)
#   --log_dir DIR      write each worker's output to DIR/<worker>.log here instead of the terminal
#   --detach           start the command under nohup on each worker and return; output goes to
#                      <repo_dir>/pewm_tpu_pod.log there, the pid to <repo_dir>/pewm_tpu_pod.pid
#   --stop             send SIGTERM to a detached run (the trainer saves and exits 0); no command
#   --dry_run          print the gcloud commands instead of running them
#
# --setup installs with `pip install -e ".[gcs]" "jax[tpu]"` into <repo_dir>/.venv, not the
# README's `pip install -e ".[test]"`: on TPU the jax[tpu] extra brings libtpu, the gcs extra
# reads and writes gs:// workdirs, and the test extra (CPU PyTorch) is not needed.
# The remote shell must be bash (the TPU VM default): the command is quoted with bash's printf %q.
# Running on all workers at once needs your key in an ssh agent:
# `ssh-add ~/.ssh/google_compute_engine`.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# shellcheck disable=SC2088  # the ~ is expanded on the worker, not here
TPU="" ZONE="" PROJECT="" REPO_DIR="~/pewm-jax" GIT_URL="" PYTHON="python3" LOG_DIR=""
SETUP=0 DETACH=0 STOP=0 DRY_RUN=0
EXTRA_ENV=()
CMD=()

while (($#)); do
  opt="$1"; shift
  case "$opt" in
    --) CMD=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --setup) SETUP=1; continue ;;
    --detach) DETACH=1; continue ;;
    --stop) STOP=1; continue ;;
    --dry_run|--dry-run) DRY_RUN=1; continue ;;
    --*=*) name="${opt%%=*}"; value="${opt#*=}" ;;
    --*) name="$opt"; (($#)) || die "$opt needs a value"; value="$1"; shift ;;
    *) die "unexpected argument '$opt'; put the command after --" ;;
  esac
  case "$name" in
    --tpu) TPU="$value" ;;
    --zone) ZONE="$value" ;;
    --project) PROJECT="$value" ;;
    --repo_dir) REPO_DIR="$value" ;;
    --git_url) GIT_URL="$value" ;;
    --python) PYTHON="$value" ;;
    --log_dir) LOG_DIR="$value" ;;
    --env)
      [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$value'"
      EXTRA_ENV+=("$value") ;;
    *) die "unknown option '$name' (see --help)" ;;
  esac
done

[[ -n "$TPU" ]] || die "--tpu=NAME is required"
[[ -n "$ZONE" ]] || die "--zone=ZONE is required"
if ((STOP)); then
  ((${#CMD[@]} == 0)) || die "--stop takes no command"
elif ((!SETUP)); then
  ((${#CMD[@]} > 0)) || die "give the command after --, e.g. -- pewm run --config=... --workdir=gs://..."
fi

# A path for the remote shell: a leading ~/ stays unquoted so it expands there, the rest is quoted.
# shellcheck disable=SC2088  # a literal ~ on purpose
remote_path() {
  if [[ "$1" == "~" ]]; then printf '~'
  elif [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"
  else printf '%q' "$1"
  fi
}
REPO="$(remote_path "$REPO_DIR")"

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

# Single-quotes a word for display unless it is plain (copy-pasteable into a POSIX shell).
shquote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs one command, or with --dry_run prints it (quoted so that it can be pasted into a shell).
run() {
  if ((DRY_RUN)); then
    local word line=""
    for word in "$@"; do line+="$(shquote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

# Runs a shell command line on every worker.
on_all_workers() {
  local ssh=(gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all)
  if [[ -n "$LOG_DIR" ]]; then
    ((DRY_RUN)) || mkdir -p "$LOG_DIR"
    ssh+=(--output-directory="$LOG_DIR")
  fi
  run "${ssh[@]}" --command="$1"
}

if ((STOP)); then
  on_all_workers "kill -TERM \"\$(cat $REPO/pewm_tpu_pod.pid)\""
  exit 0
fi

if ((SETUP)); then
  if [[ -n "$GIT_URL" ]]; then
    on_all_workers "set -e; if [ -d $REPO/.git ]; then git -C $REPO pull --ff-only; else git clone $(printf %q "$GIT_URL") $REPO; fi"
  else
    src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if ((DRY_RUN)); then
      tarball="/tmp/pewm-jax-src.tar.gz"
      echo "# tar the checkout $src (git ls-files -co --exclude-standard) into $tarball"
    else
      tmp="$(mktemp -d)"
      trap 'rm -rf "$tmp"' EXIT
      tarball="$tmp/pewm-jax-src.tar.gz"
      # The files git would track (including new, not ignored ones): no runs/, venvs or caches.
      (cd "$src" && git ls-files -co --exclude-standard -z | tar czf "$tarball" --null -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU:pewm-jax-src.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $REPO; tar xzf ~/pewm-jax-src.tar.gz -C $REPO; rm ~/pewm-jax-src.tar.gz"
  fi
  # For TPU: the package with gs:// support plus jax[tpu] (libtpu), not the README's ".[test]".
  on_all_workers "set -e; cd $REPO; [ -d .venv ] || $(printf %q "$PYTHON") -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e \".[gcs]\" \"jax[tpu]\""
fi

((${#CMD[@]} > 0)) || exit 0  # --setup alone

# The per-worker command: environment, repository, venv, then exec the user's command.
env_words="PEWM_MULTIHOST=1"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  env_words+=" ${kv%%=*}=$(printf %q "${kv#*=}")"
done
remote="cd $REPO && { if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi; } && export PATH=\"\$PATH:\$HOME/.local/bin\" $env_words && exec$(printf ' %q' "${CMD[@]}")"
if ((DETACH)); then
  # nohup: the run survives the end of this ssh session; its pid is the trainer's (exec).
  remote="cd $REPO || exit 1; nohup bash -c $(printf %q "$remote") > pewm_tpu_pod.log 2>&1 < /dev/null & echo \$! > pewm_tpu_pod.pid; echo \"started on \$(hostname): pid \$!, log $REPO/pewm_tpu_pod.log\""
fi
on_all_workers "$remote"
