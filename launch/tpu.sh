#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs this checkout on every worker and runs the experiment on
# all of them at once (JAX multi-host needs every process), from your workstation with gcloud.
#
#   export TPU_NAME=ads-v5e-32 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32
#   launch/tpu.sh create && launch/tpu.sh setup
#   launch/tpu.sh run --config=configs/gsm8k_paper.py --workdir=gs://BUCKET/gsm8k
#   launch/tpu.sh logs
#
# `--dry-run` (or DRY_RUN=1) prints every command, shell-quoted, one per line, and runs none.
# Checkpoints, data and the workdir must be readable from every host (GCS or a shared disk).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh [--dry-run] COMMAND [ARGS...]

commands:
  create         create the slice (QUEUED=1: through a queued resource)
  status         describe the slice (QUEUED=1: the queued resource; wait for ACTIVE)
  setup          copy this checkout to ~/$REMOTE_DIR on every worker, install it with jax[tpu]
  run FLAGS...   start `python -m antidistill_jax.main --distributed FLAGS...` on every worker,
                 detached from the ssh session, appending to ~/antidistill_run.log per worker;
                 rerun the same command to resume (finished stages are kept in the workdir)
  logs [N|all]   follow worker N's log (default 0); `all`: the last LOG_LINES lines of each
  stop           stop the run on every worker
  delete         delete the slice (QUEUED=1: the queued resource and its slice)

environment:
  TPU_NAME, ZONE     required; PROJECT optional (default: gcloud's configured project)
  ACCELERATOR_TYPE   required by create: v4-32, v5litepod-32 (v5e), v5p-64, v6e-16, ...
  RUNTIME_VERSION    TPU software version; default chosen from ACCELERATOR_TYPE
  QUEUED=1           use a queued resource named QUEUED_RESOURCE (default: TPU_NAME)
  SPOT=1             spot capacity for create (can be preempted: recreate, setup, rerun)
  CREATE_FLAGS       extra create flags, e.g. "--reserved" or "--network=NET --subnetwork=SUB"
  REMOTE_DIR         checkout directory on the workers (default: antidistill_jax)
  PYTHON_VERSION     Python of the workers' venv (default: 3.12; the images ship 3.10)
  LOG_LINES          lines per worker for `logs all` (default: 20)
  DRY_RUN=1          same as --dry-run
EOF
}

quote() {  # the arguments shell-quoted as Python's shlex.quote does, joined by spaces
  local a e sq="'\\''" out=()
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      out+=("$a")
    else
      e=${a//\'/$sq}
      out+=("'$e'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

DRY_RUN=${DRY_RUN:-0}
run() {  # every command goes through here: printed on --dry-run, else echoed and executed
  if [[ $DRY_RUN != 0 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

need() {  # need VAR "example": fail with the fix when VAR is unset or empty
  if [[ -z ${!1:-} ]]; then
    echo "error: $1 is not set; export $1=$2 (see launch/tpu.sh --help)" >&2
    exit 2
  fi
}

runtime_version() {  # https://cloud.google.com/tpu/docs/runtimes (PyTorch and JAX)
  if [[ -n ${RUNTIME_VERSION:-} ]]; then echo "$RUNTIME_VERSION"; return; fi
  case $ACCELERATOR_TYPE in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "error: no default TPU software version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE;" \
         "set RUNTIME_VERSION (gcloud compute tpus tpu-vm versions list --zone=$ZONE)" >&2
       exit 2 ;;
  esac
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help|help) usage; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
cmd=$1; shift
case $cmd in
  create|status|setup|run|logs|stop|delete) ;;
  *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac

need TPU_NAME "my-v5e-32"
need ZONE "us-west4-a"
gflags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then gflags+=(--project="$PROJECT"); fi
QR=${QUEUED_RESOURCE:-$TPU_NAME}
REMOTE_DIR=${REMOTE_DIR:-antidistill_jax}
remote="~/$(quote "$REMOTE_DIR")"  # `~` expands on the worker, not here
LOG='~/antidistill_run.log'
PID='~/antidistill_run.pid'

ssh_workers() {  # ssh_workers WORKER COMMAND: run a shell command on worker N or `all`
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker="$1" --command="$2"
}

case $cmd in
  create)
    need ACCELERATOR_TYPE "v5litepod-32"
    version=$(runtime_version)
    extra=()
    if [[ ${SPOT:-0} != 0 ]]; then extra+=(--spot); fi
    read -ra more <<< "${CREATE_FLAGS:-}"
    extra+=(${more[@]+"${more[@]}"})
    if [[ ${QUEUED:-0} != 0 ]]; then
      run gcloud compute tpus queued-resources create "$QR" --node-id="$TPU_NAME" "${gflags[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" \
        ${extra[@]+"${extra[@]}"}
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gflags[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$version" ${extra[@]+"${extra[@]}"}
    fi
    ;;
  status)
    if [[ ${QUEUED:-0} != 0 ]]; then
      run gcloud compute tpus queued-resources describe "$QR" "${gflags[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gflags[@]}"
    fi
    ;;
  setup)
    # Ship the working tree (uncommitted edits included, no venv/git/outputs) as one tarball.
    root=$(cd "$(dirname "$0")/.." && pwd)
    tarball="${TMPDIR:-/tmp}/antidistill_jax-$TPU_NAME.tgz"
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./runs --exclude=./outputs \
      -C "$root" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:antidistill_jax.tgz" "${gflags[@]}" \
      --worker=all
    run rm -f "$tarball"
    # The TPU images ship Python 3.10 and jax needs a newer one: uv provides it in the venv.
    py=$(quote "${PYTHON_VERSION:-3.12}")
    ssh_workers all "set -e; mkdir -p $remote; tar -xzf ~/antidistill_jax.tgz -C $remote;\
 rm ~/antidistill_jax.tgz; cd $remote; python3 -m pip install -q --user -U uv;\
 [ -x .venv/bin/python ] || ~/.local/bin/uv venv -q --python $py .venv;\
 ~/.local/bin/uv pip install -q --python .venv/bin/python -U -e '.[gcs]' 'jax[tpu]'"
    ;;
  run)
    main=".venv/bin/python -m antidistill_jax.main --distributed"
    if [[ $# -gt 0 ]]; then main+=" $(quote "$@")"; fi
    # nohup + redirections: the processes outlive the ssh session; one run at a time per slice.
    ssh_workers all "cd $remote || exit 1;\
 if [ -f $PID ] && kill -0 \"\$(cat $PID)\" 2>/dev/null; then\
 echo \"\$(hostname): a run is still going (pid \$(cat $PID)); launch/tpu.sh stop first\" >&2;\
 exit 1; fi;\
 printf '%s %s\n' \"=== \$(date -u +%FT%TZ)\" $(quote "$main") >> $LOG;\
 PYTHONUNBUFFERED=1 nohup $main >> $LOG 2>&1 < /dev/null & echo \$! > $PID"
    if [[ $DRY_RUN == 0 ]]; then
      echo "started; follow with: launch/tpu.sh logs [N|all]" >&2
    fi
    ;;
  logs)
    worker=${1:-0}
    if [[ $worker == all ]]; then
      ssh_workers all "tail -n $(quote "${LOG_LINES:-20}") $LOG | sed \"s/^/\$(hostname): /\""
    elif [[ $worker =~ ^[0-9]+$ ]]; then
      ssh_workers "$worker" "tail -n 200 -F $LOG"
    else
      echo "error: logs takes a worker number or 'all', not '$worker'" >&2; exit 2
    fi
    ;;
  stop)
    ssh_workers all "if [ -f $PID ]; then kill \"\$(cat $PID)\" 2>/dev/null || true; rm -f $PID; fi"
    ;;
  delete)
    if [[ ${QUEUED:-0} != 0 ]]; then
      run gcloud compute tpus queued-resources delete "$QR" "${gflags[@]}" --force
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gflags[@]}"
    fi
    ;;
esac
