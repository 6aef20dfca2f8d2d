"""Static against continuous batching: useful tokens per second on traces of uneven length.

  python bench/batching.py                                  # tiny random models, CPU-sized
  python bench/batching.py --max_new_tokens=1024 --prompts=512 --slots=64 --teacher=DIR --proxy=DIR --dtype=bfloat16

Random models have no EOS habit, so each prompt gets a cap on its new tokens drawn from a
length distribution shaped like R1's GSM8K traces (`Sampler(...)(..., budgets=)`): a gamma
with mean 0.46 x the cap (~470 of 1,024 tokens) and shape 4, clipped to [1, cap], and a share
(--at_cap, 5%) of rows that run to the cap, as degenerate traces do. A row that reaches its
cap stops exactly as one that emits EOS there would, so both batchings generate the same
tokens (tests/test_continuous.py) and only the time differs. Useful tokens = the tokens of the
traces (sum of the caps); static batching also spends steps on rows that have finished.

For each mode (plain sampling, ADS-jvp) and batching: seconds of a whole call (compiled
beforehand by a first call on the same prompts), useful tokens/s, and the slot occupancy
(useful tokens / (slots x decode steps)). Prints a table and one JSON line.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from antidistill_jax import gradients, sampling

import common  # bench/common.py (the script's folder is on sys.path)
import sampling as sampling_bench  # bench/sampling.py: the tiny pair and its flags

_PROMPTS = flags.DEFINE_integer("prompts", 96, "prompts per call")
_SLOTS = flags.DEFINE_integer("slots", 16, "batch rows (static) and slots (continuous)")
_REFILL = flags.DEFINE_integer("refill_rows", 0, "continuous prefill width (0: slots / 4)")
_MEAN = flags.DEFINE_float("mean_fraction", 0.46, "mean trace length / max_new_tokens")
_AT_CAP = flags.DEFINE_float("at_cap", 0.05, "share of traces that run to the cap")
_BATCH_MODES = flags.DEFINE_list("batch_modes", ["plain", "jvp"], "plain and/or jvp, fd")
_TIMES = flags.DEFINE_integer("times", 2, "timed calls per cell (best is kept)")
_CHUNK = flags.DEFINE_integer("scan_chunk", 16, "decode steps per scan chunk")


def trace_lengths(n: int, cap: int, mean_fraction: float, at_cap: float,
                  rng: np.random.Generator) -> np.ndarray:
  """The length distribution of the module docstring: int32 [n] in [1, cap]."""
  shape = 4.0
  lengths = rng.gamma(shape, mean_fraction * cap / shape, n)
  lengths = np.clip(np.round(lengths), 1, cap).astype(np.int32)
  lengths[rng.random(n) < at_cap] = cap
  return lengths


def main(argv):
  del argv
  dtype = jnp.dtype(sampling_bench._DTYPE.value)
  with tempfile.TemporaryDirectory() as tmp:
    teacher, proxy = sampling_bench.load_pair(tmp, dtype)
  rng = np.random.default_rng(0)
  vocab = min(teacher.config.vocab_size, proxy.config.vocab_size)
  examples = [(rng.integers(0, vocab, 32).tolist(), rng.integers(0, vocab, 64).tolist())
              for _ in range(4)]
  grad, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  cap, n = sampling_bench._NEW_TOKENS.value, _PROMPTS.value
  plen = sampling_bench._PROMPT_LEN.value
  prompts = [rng.integers(0, vocab, rng.integers(plen // 2, plen + 1)).tolist() for _ in range(n)]
  budgets = trace_lengths(n, cap, _MEAN.value, _AT_CAP.value, rng)
  useful = int(budgets.sum())
  base = sampling.SamplingParams(max_new_tokens=cap, tau=1.0, top_p=sampling_bench._TOP_P.value)
  results = []
  for mode in _BATCH_MODES.value:
    params = base if mode == "plain" else dataclasses.replace(base, lam=1.0, method=mode)
    rates = {}
    for batching in ("static", "continuous"):
      sampler = sampling.Sampler(
          teacher, vocab_size=teacher.config.vocab_size, proxy=proxy, grad=grad,
          batch_size=_SLOTS.value, batching=batching, refill_rows=_REFILL.value or None,
          scan_chunk=_CHUNK.value)
      sampler(prompts, params, budgets=budgets.tolist())  # compiles
      best, out = float("inf"), None
      for _ in range(_TIMES.value):
        start = time.perf_counter()
        out = sampler(prompts, params, budgets=budgets.tolist())
        best = min(best, time.perf_counter() - start)
      assert int(out.lengths.sum()) == useful, (out.lengths.sum(), useful)
      steps = out.decode_steps
      rates[batching] = useful / best
      results.append(dict(mode=mode, batching=batching, seconds=best,
                          useful_tokens_per_s=useful / best, decode_steps=steps,
                          occupancy=useful / (_SLOTS.value * steps),
                          speedup=rates[batching] / rates["static"]))
  report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                dtype=dtype.name, prompts=n, slots=_SLOTS.value, max_new_tokens=cap,
                prompt_len=plen, scan_chunk=_CHUNK.value,
                refill_rows=_REFILL.value or max(1, _SLOTS.value // 4),
                lengths=dict(mean=float(budgets.mean()), median=float(np.median(budgets)),
                             at_cap=float(np.mean(budgets == cap)), useful_tokens=useful),
                results=results)
  print(f"device: {report['device']} ({report['platform']}), {n} prompts, {_SLOTS.value} "
        f"slots, cap {cap}, trace lengths mean {budgets.mean():.0f} median "
        f"{np.median(budgets):.0f}, {np.mean(budgets == cap):.0%} at the cap")
  print(f"{'mode':6} {'batching':10} {'seconds':>8} {'useful tok/s':>12} {'steps':>6} "
        f"{'occupancy':>9} {'speedup':>7}")
  for r in results:
    print(f"{r['mode']:6} {r['batching']:10} {r['seconds']:8.2f} {r['useful_tokens_per_s']:12.1f} "
          f"{r['decode_steps']:6d} {r['occupancy']:9.2f} {r['speedup']:7.2f}")
  common.save_report(report, sampling_bench._OUT.value)


if __name__ == "__main__":
  app.run(main)
