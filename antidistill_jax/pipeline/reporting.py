"""The report stage: the index of this config's results, derived from the records, and the
report (`antidistill_jax.report`: Figure 3, Figure 5, the tables) drawn from it.

workdir/index/<entry>.json is one file per grid point, per attacked student and `base` (the
undistilled student), rewritten whole from the records of the current keys of every shard's
points: whatever is finished shows, a partial grid shows what it has. Nothing is merged in
place, so jobs reporting at once write the same files from the same records.
"""

from __future__ import annotations

import dataclasses
import os

from antidistill_jax import errors, files, parallel
from antidistill_jax.pipeline.grid import grid


def entries(x) -> dict[str, dict]:
  """{entry name: the report's view of it} for every point of the grid (all shards)."""
  store = x.store
  found = lambda stage, key: (store.record(stage, key) or {}).get("metrics")
  out = {}
  try:
    points = x.all_points()
  except errors.MissingInput:  # not calibrated yet: the temperature sweep only
    points = [p for p in grid(x.config, []) if p.kind == "temperature"]
  for point, attack in x.students(points):
    name = x.entry_name(point, attack)
    e = dict(name=name, point=dataclasses.asdict(point))
    if attack is None:
      e["sample_key"] = x.sample_key(point)
      e["traces"] = found("sample", e["sample_key"])
      e["teacher_eval"] = found("eval_teacher", x.eval_teacher_key(point))
    else:
      e.update(attack=attack, base=point.name)
    e["distill_key"] = x.distill_key(point, attack)
    e["distill"] = found("distill", e["distill_key"])
    if e["distill"] is not None:
      e["curves"] = os.fspath(x.out_dir("distill", e["distill_key"]) / "train" / "curves.json")
    e["student_eval"] = found("eval_student", x.eval_student_key(point, attack))
    out[name] = {k: v for k, v in e.items() if v is not None}
  base = found("eval_base", x.eval_base_key())
  if base is not None:
    out["base"] = dict(student_eval=base)
  return out


def report(x, out) -> dict:
  """Rewrites workdir/index/ from the records, then workdir/report/ from the index."""
  from antidistill_jax import report as report_lib
  if not parallel.is_writer():
    return {}
  index = x.workdir / "index"
  files.makedirs(index)
  current = entries(x)
  for name, entry in current.items():
    files.write_json(index / f"{name}.json", entry)
  for path in index.iterdir():  # a point no longer in the grid (another config's) leaves
    if path.suffix == ".json" and path.stem not in current:
      path.unlink()
  return report_lib.write_report(x.workdir)
