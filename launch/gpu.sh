#!/usr/bin/env bash
# Runs antidistill_jax on one multi-GPU host: one process sees every local GPU (choose them with
# CUDA_VISIBLE_DEVICES), so no --distributed is needed.
#
#   launch/gpu.sh setup                # .venv with this checkout and jax[cuda12]
#   launch/gpu.sh run --config=configs/gsm8k_paper.py --workdir=runs/gsm8k [--config.key=value ...]
#
# `--dry-run` (or DRY_RUN=1) prints the commands, shell-quoted, one per line, and runs none.
# PYTHON picks the interpreter for the venv (default python3; jax needs 3.11 or newer).
set -euo pipefail

usage() { echo "usage: launch/gpu.sh [--dry-run] setup | run FLAGS..." >&2; }

quote() {  # the arguments shell-quoted as Python's shlex.quote does, joined by spaces
  local a e sq="'\\''" out=()
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_@%+=:,./-]* ]]; then out+=("$a"); else e=${a//\'/$sq}; out+=("'$e'"); fi
  done
  printf '%s\n' "${out[*]}"
}

DRY_RUN=${DRY_RUN:-0}
run() {  # printed on --dry-run, else executed
  if [[ $DRY_RUN != 0 ]]; then quote "$@"; else "$@"; fi
}

if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
run cd "$(cd "$(dirname "$0")/.." && pwd)"
case ${1:-} in
  setup)
    run "${PYTHON:-python3}" -m venv .venv
    run .venv/bin/pip install -q -U pip
    run .venv/bin/pip install -q -e '.[gcs]' 'jax[cuda12]'
    ;;
  run)
    shift
    run .venv/bin/python -m antidistill_jax.main "$@"
    ;;
  -h|--help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac
