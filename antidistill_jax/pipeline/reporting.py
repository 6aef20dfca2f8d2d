"""The report stage: the index of this config's results, derived from the records, and the
report (`antidistill_jax.report`: Figure 3, Figure 5, the tables) drawn from it.

index/<entry>.json is one file per grid point, per attacked point and `base` (the undistilled
student), in the workdir (or workdir/results/<pipeline.name>: a study's chains share one
workdir), rewritten whole from the records of the current keys of every shard's
points: whatever is finished shows, a partial grid shows what it has. Nothing is merged in
place, so jobs reporting at once write the same files from the same records.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from antidistill_jax import errors, files, parallel
from antidistill_jax.pipeline.grid import grid


def _mean_of(records: list[dict], field: str):
  values = [r[field] for r in records if r.get(field) is not None]
  return sum(values) / len(values) if values else None


def entries(x) -> dict[str, dict]:
  """{entry name: the report's view of it} for every point of the grid (all shards) and every
  attacked point. An entry's `students` lists its replicates (distill and eval records); its
  `distill` and `student_eval` hold their means over the replicates that have one (other
  fields: the first replicate's), with the count (`n_students`), so a table row says how many
  students stand behind it."""
  store = x.store
  found = lambda stage, key: (store.record(stage, key) or {}).get("metrics")
  out = {}
  try:
    points = x.all_points()
  except errors.MissingInput:  # not calibrated yet: the baseline sweeps only
    points = [p for p in grid(x.config, []) if p.kind != "ads"]
  for s in x.students(points):
    if s.entry not in out:
      e = dict(name=s.entry, point=dataclasses.asdict(s.point), students=[])
      if s.attack is None:
        e["sample_key"] = x.sample_key(s.point)
        e["traces"] = found("sample", e["sample_key"])
        if e["traces"] is not None:
          e["traces_path"] = os.fspath(x.out_dir("sample", e["sample_key"]) / "traces.jsonl")
        e["teacher_eval"] = found("eval_teacher", x.eval_teacher_key(s.point))
      else:
        e.update(attack=s.attack, base=s.point.name)
      out[s.entry] = e
    one = dict(replicate=s.replicate, distill_key=x.distill_key(s))
    one["distill"] = found("distill", one["distill_key"])
    if one["distill"] is not None:
      one["curves"] = os.fspath(x.out_dir("distill", one["distill_key"]) / "train" / "curves.json")
    one["student_eval"] = found("eval_student", x.eval_student_key(s))
    out[s.entry]["students"].append({k: v for k, v in one.items() if v is not None})
  for e in out.values():
    distilled = [r["distill"] for r in e["students"] if "distill" in r]
    evaluated = [r["student_eval"] for r in e["students"] if "student_eval" in r]
    if distilled:  # the first replicate's record, its numbers averaged over the replicates
      means = {k: _mean_of(distilled, k) for k in ("holdout_loss", "train_loss", "train_rows")}
      e["distill"] = dict(distilled[0], **{k: v for k, v in means.items() if v is not None},
                          n_students=len(distilled))
      roles = [d["nll_by_role"] for d in distilled if d.get("nll_by_role")]
      if roles:
        e["distill"]["nll_by_role"] = {r: _mean_of(roles, r) for r in roles[0]}
      e["curves"] = next(r["curves"] for r in e["students"] if "curves" in r)
    if evaluated:
      e["student_eval"] = dict(accuracy=_mean_of(evaluated, "accuracy"),
                               forced_accuracy=_mean_of(evaluated, "forced_accuracy"),
                               n=evaluated[0].get("n"), n_students=len(evaluated))
    for k in [k for k, v in e.items() if v is None]:
      del e[k]
  base = found("eval_base", x.eval_base_key())
  if base is not None:
    out["base"] = dict(student_eval=base)
  return out


def report(x, out) -> dict:
  """Rewrites index/ from the records, then report/ from the index, in the config's results
  folder (`Inputs.results_root`: the workdir, or workdir/results/<pipeline.name>)."""
  from antidistill_jax import report as report_lib
  if not parallel.is_writer():
    return {}
  index = x.results_root / "index"
  files.makedirs(index)
  current = entries(x)
  for name, entry in current.items():
    files.write_json(index / f"{name}.json", entry)
  gone = sorted(p for p in index.iterdir() if p.suffix == ".json" and p.stem not in current)
  if gone:  # points of another config (or of this one's earlier grid): their records stay
    logging.warning("the report of %s leaves out %d points not in this config's grid (%s): "
                    "their stage records stay in the workdir; give each config its own "
                    "--config.pipeline.name to keep a report of each.", x.results_root,
                    len(gone), ", ".join(p.stem for p in gone[:5]) + (", ..." if gone[5:] else ""))
  for path in gone:
    path.unlink()
  r = x.config.report
  return report_lib.write_report(x.results_root, student_sd=r.student_sd,
                                 student_sd_source=r.student_sd_source)
