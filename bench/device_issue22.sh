#!/usr/bin/env bash
# Issue 22's GPU rows in one device call, sized for a 15-minute lease (at most 9 min 15 s of
# commands; each step has its own time limit, so one slow step cannot eat the rest):
#
#   bash bench/device_issue22.sh "$OUT"           # on the device machine, from the repo root
#   bash bench/device_issue22.sh /tmp/out smoke   # the same steps at toy sizes, any host
#
# 1. jvp against fd against plain at the paper's widths, a quarter of the depth, batch 1 and 16
#    (goal: jvp/fd <= 1.05), with the HBM bandwidth each step needs (goal: plain >= 80%, ADS
#    >= 75% of the HBM's), and each batch-16 cell once under the profiler: the device's busy time
#    against the wall time and its kernels by kind and by name (bench/trace_summary.py; the
#    raw traces stay on the device machine, only their summaries come back in jvp_fd.json);
# 2. static against continuous batching on R1-like trace lengths (goal: >= 1.6x useful tokens/s);
# 3. top-p (the draw-first path, and the old filter-then-categorical one) against the
#    unfiltered draw at the 152k vocabulary (goal: <= 2x a plain draw);
# 4. the full-depth 7B + 3B pair, ADS-jvp at batch 64, prompt 256, 256 new tokens: step time,
#    peak memory and compile time (the first row of issue 22's item 4; 1,024 and 2,048 tokens
#    cost 4-8x the decode time and no more compilation).
# Each step writes NAME.json (the benchmark's JSON) and NAME.txt (its table) into the folder.
# The device image's own python and jax are used (no virtual environment travels).
set -u
out=${1:?usage: bench/device_issue22.sh OUT_DIR [smoke]}
smoke=${2:-}
python=${PYTHON:-python}
mkdir -p "$out"
cd "$(dirname "$0")/.."

step() {  # step NAME SECONDS SCRIPT ARGS...: one benchmark under its own time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $*"
  local start=$SECONDS
  timeout "$limit" "$python" "$@" --out="$out/$name.json" > "$out/$name.txt" 2>&1
  local rc=$?
  grep -v "^I[0-9]\|^W[0-9]\|^{" "$out/$name.txt" | tail -25
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
}

"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true

if [ "$smoke" = smoke ]; then
  step jvp_fd 300 bench/scale.py --layers=1 --batch_sizes=2 --max_new_tokens=8 --prompt_len=16 \
      --modes=plain,fd,jvp --repeats=1 --dtype=float32 --profile_dir=/tmp/issue22_profile
  step batching 300 bench/batching.py --max_new_tokens=32 --prompts=24 --slots=8 --times=1
  step top_p 300 bench/filters.py --vocabs=4096 --repeats=2 --sorted_repeats=1
  exit 0
fi
step jvp_fd 200 bench/scale.py --pair=paper --depth_divisor=4 --batch_sizes=1,16 \
    --max_new_tokens=128 --modes=plain,fd,jvp --repeats=2 --profile_dir=/tmp/issue22_profile \
    --profile_batch_sizes=16
step batching 90 bench/batching.py --max_new_tokens=1024 --prompts=256 --slots=64 --times=1
step top_p 45 bench/filters.py --vocabs=152064 --repeats=5  # x 8 key sets
step full_depth 220 bench/scale.py --pair=paper --batch_sizes=64 --max_new_tokens=256 \
    --modes=jvp --repeats=1
