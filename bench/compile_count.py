"""Compilations of the decode program over the paper's whole sampling grid.

  python bench/compile_count.py                   # tiny random models, both methods

The grid of the authors' GSM8K sweep: ADS at tau in {0.9, 1.0}, eps = 1e-2, lam = b * eps for b
in linspace(0, 15, 20) (b = 0 is plain sampling), and the temperature baseline tau in
linspace(1, 2, 20) at lam = 0: 60 settings. tau, lam, eps and top_p are traced, so the grid
needs one program with the proxy and one without. Counts XLA compilations of the decode program
(jax.monitoring) and the wall time of the sweep; prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from antidistill_jax import gradients, models, random_checkpoints, sampling

import common  # bench/common.py (the script's folder is on sys.path)

_METHODS = flags.DEFINE_list("methods", ["jvp", "fd"], "Delta methods")
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "new tokens per row")
_BATCH = flags.DEFINE_integer("batch", 4, "prompts")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")


def paper_grid(eps: float = 1e-2) -> list[dict]:
  ads = [dict(tau=tau, lam=float(b) * eps, eps=eps) for tau in (0.9, 1.0)
         for b in np.linspace(0, 15, 20)]
  temperature = [dict(tau=float(tau), lam=0.0, eps=eps) for tau in np.linspace(1, 2, 20)]
  return ads + temperature


def main(argv):
  del argv
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(duration)
      if event == "/jax/core/compile/backend_compile_duration"
      and "_decode_program" in str(kw.get("fun_name", "")) else None)
  with tempfile.TemporaryDirectory() as tmp:
    tok = random_checkpoints.train_tokenizer(vocab_size=512)
    teacher = models.from_pretrained(random_checkpoints.make_tiny_checkpoint(
        os.path.join(tmp, "t"), tokenizer=tok, seed=0))
    proxy = models.from_pretrained(random_checkpoints.make_tiny_checkpoint(
        os.path.join(tmp, "p"), tokenizer=tok, seed=1, hidden_size=32, intermediate_size=64))
  rng = np.random.default_rng(0)
  examples = [(rng.integers(0, 300, 8).tolist(), rng.integers(0, 300, 16).tolist())
              for _ in range(4)]
  grad, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  prompts = [rng.integers(0, 300, 12).tolist() for _ in range(_BATCH.value)]
  grid = paper_grid()
  results = []
  for method in _METHODS.value:
    sampler = sampling.Sampler(teacher, tok, proxy=proxy, grad=grad)
    base = sampling.SamplingParams(max_new_tokens=_NEW.value, top_p=0.95, method=method)
    before, start = len(compiles), time.time()
    for point in grid:
      sampler(prompts, dataclasses.replace(base, **point))
    n = len(compiles) - before
    results.append(dict(method=method, settings=len(grid), compiles=n,
                        compile_seconds=float(sum(compiles[before:])),
                        sweep_seconds=time.time() - start))
  print("| method | settings | decode compilations | compile s | sweep s |")
  print("|---|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['method']} | {r['settings']} | {r['compiles']} | {r['compile_seconds']:.1f} | "
          f"{r['sweep_seconds']:.1f} |")
  common.save_report(dict(results=results), _OUT.value)


if __name__ == "__main__":
  app.run(main)
