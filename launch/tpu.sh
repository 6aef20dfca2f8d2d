#!/usr/bin/env bash
# Runs antidistill_jax on every host of a Cloud TPU VM slice.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu.sh setup          # clone/copy + install
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu.sh run --config=configs/generate.py ...
#
# `setup` copies this checkout to ~/antidistill_jax on every worker and installs it with the
# TPU build of jax; `run` starts the same command on all workers at once (JAX multi-host needs
# every process). Checkpoints and data must be readable from every host (GCS or a shared disk).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-antidistill_jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}
case "${1:-}" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" $PROJECT_FLAG --worker=all \
      "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:~/$REMOTE_DIR"
    ssh_all "cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U 'jax[tpu]' && .venv/bin/pip install -q -e ."
    ;;
  run)
    shift
    ssh_all "cd ~/$REMOTE_DIR && .venv/bin/python -m antidistill_jax.main --distributed $*"
    ;;
  *)
    echo "usage: $0 setup | run [flags...]" >&2; exit 2 ;;
esac
