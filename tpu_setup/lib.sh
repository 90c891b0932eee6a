#!/usr/bin/env bash
# Functions behind the tpu_setup/ entry points: create a TPU VM or a multi-host pod slice (queued
# resources), put this repo on every worker, install it with the pinned pyproject.toml, launch
# train.py on all hosts at once, and the GPU-host variant. Every entry point takes --dry-run, which
# prints the exact commands instead of running them. Source this file; do not run it.

set -euo pipefail

# ------------------------------------------------------------------ settings (flags override)
NAME="${TPU_NAME:-spark-tpu}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-v4-8}"
RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
QUEUED=0            # 1: create through queued resources (pods, spot/reserved capacity)
SPOT=0
REPO_URL=""         # clone this on every worker; empty: copy the local checkout
BRANCH="main"
REMOTE_DIR="spark"  # the repo's directory in each worker's home
CONFIG="configs/spark_gemma2_2b.py"
WORKDIR=""          # gs://BUCKET/run (shared by all hosts)
EXTRA=()            # extra train.py flags (after --)
HOSTS=()            # GPU hosts, the first is the coordinator
PORT=12355
DRY_RUN=0

die() { echo "error: $*" >&2; exit 2; }

# Print (dry run) or run one command, its arguments quoted exactly as the shell would need them.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

project_flag() {
  if [[ -n "$PROJECT" ]]; then printf -- '--project=%s' "$PROJECT"; fi
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator) ACCELERATOR="$2"; shift 2 ;;
      --runtime) RUNTIME="$2"; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --spot) SPOT=1; shift ;;
      --repo) REPO_URL="$2"; shift 2 ;;
      --branch) BRANCH="$2"; shift 2 ;;
      --remote_dir) REMOTE_DIR="$2"; shift 2 ;;
      --config) CONFIG="$2"; shift 2 ;;
      --workdir) WORKDIR="$2"; shift 2 ;;
      --hosts) IFS=',' read -r -a HOSTS <<< "$2"; shift 2 ;;
      --port) PORT="$2"; shift 2 ;;
      --dry-run|--dry_run) DRY_RUN=1; shift ;;
      --) shift; EXTRA=("$@"); break ;;
      -h|--help) awk 'NR > 1 && /^# shellcheck/ {exit} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
                 exit 0 ;;
      *) die "unknown flag $1 (see --help)" ;;
    esac
  done
  [[ "$NAME" =~ ^[a-z][-a-z0-9]*$ ]] || die "--name must be lower-case letters, digits and dashes, got '$NAME'"
}

# ------------------------------------------------------------------ TPU
tpu_create() {
  local pf
  pf="$(project_flag)"
  if [[ "$QUEUED" == 1 ]]; then
    local spot=()
    if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
    run gcloud compute tpus queued-resources create "$NAME-qr" --node-id="$NAME" --zone="$ZONE" ${pf:+"$pf"} \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
    echo "# wait until the queued resource is ACTIVE:" >&2
    run gcloud compute tpus queued-resources describe "$NAME-qr" --zone="$ZONE" ${pf:+"$pf"} \
      --format='value(state.state)'
  else
    local spot=()
    if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
    run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" ${pf:+"$pf"} \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

tpu_delete() {
  local pf
  pf="$(project_flag)"
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME-qr" --zone="$ZONE" ${pf:+"$pf"} --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" ${pf:+"$pf"} --quiet
  fi
}

# Run one shell command line on every worker of the slice at once.
tpu_all() {
  local pf
  pf="$(project_flag)"
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" ${pf:+"$pf"} --worker=all --command="$1"
}

# The repo on every worker: a fresh clone of --repo, or this checkout (tracked files) copied over.
tpu_copy_repo() {
  local pf
  pf="$(project_flag)"
  if [[ -n "$REPO_URL" ]]; then
    tpu_all "rm -rf ~/$REMOTE_DIR && git clone --depth 1 --branch $BRANCH $REPO_URL ~/$REMOTE_DIR"
  else
    local tarball="/tmp/$NAME-repo.tar.gz"
    run git -C "$(repo_root)" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:/tmp/repo.tar.gz" --zone="$ZONE" ${pf:+"$pf"} --worker=all
    tpu_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/repo.tar.gz -C ~/$REMOTE_DIR"
  fi
}

# The same pinned install as `make setup`, plus jax's TPU extra (libtpu) at the pinned jax version.
install_cmd() {
  local extra="$1"
  printf '%s' "cd ~/$REMOTE_DIR && (command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -yq python3.11 python3.11-venv)) && python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[$extra]'"
}

tpu_install() {
  tpu_all "$(install_cmd tpu)"
}

need_workdir() {
  [[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path every host can write)"
}

train_cmd() {
  local extra=""
  if [[ ${#EXTRA[@]} -gt 0 ]]; then extra=" $(printf '%q ' "${EXTRA[@]}")"; fi
  printf '%s' ".venv/bin/python train.py --config $CONFIG --workdir $WORKDIR --no_progress$1${extra% }"
}

# train.py on every host at once; jax.distributed.initialize() finds the slice's hosts by itself.
tpu_train() {
  need_workdir
  tpu_all "cd ~/$REMOTE_DIR && nohup $(train_cmd ' --distributed') > ~/train.log 2>&1 &"
  echo "# follow worker 0: gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'" >&2
}

# ------------------------------------------------------------------ GPU hosts
# One host: all its GPUs in one process. Several hosts: one process per host, the first host is
# the coordinator (--coordinator_address HOST0:PORT --num_processes N --process_id I).
repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# Run a command line on a GPU host (localhost: here, in this checkout).
on_host() {
  if [[ "$1" == localhost ]]; then run bash -c "cd $(repo_root) && $2"; else run ssh "$1" "cd ~/$REMOTE_DIR && $2"; fi
}

gpu_setup() {
  [[ ${#HOSTS[@]} -gt 0 ]] || die "--hosts is required (comma-separated; 'localhost' for this machine)"
  need_workdir
  local h
  for h in "${HOSTS[@]}"; do
    if [[ "$h" != localhost ]]; then  # this checkout's tracked files, streamed over ssh
      run bash -c "git -C $(repo_root) archive --format=tar.gz HEAD | ssh $h 'rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf - -C ~/$REMOTE_DIR'"
    fi
    on_host "$h" "$(install_cmd gpu | sed "s|^cd ~/$REMOTE_DIR \&\& ||")"
  done
}

gpu_train() {
  need_workdir
  local n=${#HOSTS[@]} i dist
  for ((i = 0; i < n; i++)); do
    dist=""
    if [[ $n -gt 1 ]]; then dist=" --coordinator_address ${HOSTS[0]}:$PORT --num_processes $n --process_id $i"; fi
    on_host "${HOSTS[$i]}" "nohup $(train_cmd "$dist") > train.log 2>&1 &"
  done
}
