"""The teacher's cost per served token under each defence of the matrix, against plain sampling.

  python bench/defences.py --workdir=runs/study --out=docs/matrix/cost.json

Loads a matrix chain (configs/matrix.py, --arm and --seed) from a workdir where its models, g,
the answer-aligned g and the lambda calibrations are finished, and samples --prompts training
problems at each of the chain's points, the pipeline's own way (`traces.generate_traces` with
`Inputs.point_sampler` and `point_params`: the same programs, batch size and settings as the
sample stage), into a temporary folder. The points are timed round-robin (--repeats rounds,
each point once per round, after one untimed warm-up each: compilation excluded), so a change
in the machine's load touches every kind alike. Cost per token: the best round's seconds over
the tokens the teacher served (EOS-terminated traces, so a defence whose traces run longer or
shorter pays for what it writes, and a static batch waits for its longest row); per kind, the
mean over its points, as a ratio to the temperature points'.

Writes a table and JSON (--out: the matrix report, antidistill_jax/matrix.py, reads
`cost.json` from its own folder for its "cost per token" column).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from antidistill_jax import pipeline, study, traces

import common  # bench/common.py (the script's folder is on sys.path)

_CONFIG = flags.DEFINE_string("config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                     "matrix.py"), "the matrix's config file")
_ARM = flags.DEFINE_string("arm", "matrix", "its arm")
_SEED = flags.DEFINE_integer("seed", 6, "the chain's seed (a finished matrix chain: its "
                            "calibrated points are the ones timed)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "workdir holding the chain's records")
_PROMPTS = flags.DEFINE_integer("prompts", 512, "training problems sampled per point and round")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds (the best is kept per point)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here")


def main(argv):
  del argv
  config = study.chain_config(study.file_loader(_CONFIG.value),
                              study.Chain(_ARM.value, _SEED.value))
  x = pipeline.Experiment(config, _WORKDIR.value)
  points = [p for p in x.all_points() if p.kind != "control"]  # the control is plain sampling
  examples = x.split("train")[:_PROMPTS.value]
  best = {p: float("inf") for p in points}
  tokens = {}
  with tempfile.TemporaryDirectory() as tmp:
    def run(p, name):
      path = os.path.join(tmp, f"{p.name}_{name}.jsonl")
      start = time.perf_counter()
      meta = traces.generate_traces(x.point_sampler(p), examples, path,
                                    params=x.point_params(p),
                                    batch_size=config.sample.batch_size, split="train",
                                    **x.trace_settings())
      return time.perf_counter() - start, meta["statistics"]["generated_tokens"]
    for p in points:  # warm-up: compiles each program
      run(p, "warmup")
    for r in range(_REPEATS.value):
      for p in points:
        seconds, tokens[p] = run(p, f"r{r}")
        best[p] = min(best[p], seconds)
  per_token = {p: best[p] / tokens[p] for p in points}
  plain = float(np.mean([v for p, v in per_token.items() if p.kind == "temperature"]))
  kinds = {}
  for kind in dict.fromkeys(p.kind for p in points):
    mine = [per_token[p] for p in points if p.kind == kind]
    kinds[kind] = dict(seconds_per_token=float(np.mean(mine)),
                       ratio=float(np.mean(mine)) / plain, points=len(mine))
  rows = [dict(point=p.name, kind=p.kind, seconds=best[p], tokens=tokens[p],
               microseconds_per_token=1e6 * per_token[p], ratio=per_token[p] / plain)
          for p in points]
  report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                config=f"{os.path.basename(_CONFIG.value)}:{_ARM.value}", seed=_SEED.value,
                prompts=len(examples), batch_size=int(config.sample.batch_size),
                repeats=_REPEATS.value, kinds=kinds, points=rows)
  print(f"device: {report['device']} ({report['platform']}); {report['config']} seed "
        f"{_SEED.value}; {len(examples)} prompts per point, batch {report['batch_size']}, best "
        f"of {_REPEATS.value} interleaved rounds")
  print(f"{'point':32} {'tokens':>8} {'s':>7} {'us/token':>9} {'x plain':>8}")
  for r in rows:
    print(f"{r['point']:32} {r['tokens']:8d} {r['seconds']:7.2f} "
          f"{r['microseconds_per_token']:9.1f} {r['ratio']:8.2f}")
  for kind, v in kinds.items():
    print(f"{kind:32} {v['points']:8d} points {1e6 * v['seconds_per_token']:9.1f} us/token "
          f"{v['ratio']:8.2f}x")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
