"""--migrate_keys: moves the finished outputs of a workdir of the older layout (layout 1) to the
keys of this one, so that its work is found instead of recomputed.

Layout 1 keyed outputs by hashes that included each model's loaded weights
(`gradients.fingerprint`) and sampling settings a point does not use; finished outputs were
marked by <stage>/<key>/done.json, and tiny models sat unkeyed under models/. For the current
config, every (stage, item) gets its layout-1 key by the layout-1 recipe (`legacy_keys`, which
loads the three models once), and where that key's output finished, the folder is renamed to
the new key and recorded. Outputs of other settings stay where they are, unrecorded; work the
old run had not finished is redone under the new keys. Local workdirs only (an object store
has no rename).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from antidistill_jax import errors, files
from antidistill_jax.pipeline import store as store_lib
from antidistill_jax.pipeline.grid import Point
from antidistill_jax.pipeline.inputs import calibrate_settings

key_of = store_lib.key_of


class LegacyKeys:
  """The layout-1 key of each output, for the config of `x` (an Inputs)."""

  def __init__(self, x, fingerprints: dict[str, str]):
    self.x, self.fp = x, fingerprints

  def trace_settings(self) -> dict:
    return self.x.trace_settings()

  def holdout(self) -> str:
    c = self.x.config
    return key_of(stage="holdout", teacher=self.fp["teacher"],
                  examples=self.x.split_hash("holdout"),
                  params=self.x.holdout_params().as_dict(), batch=c.holdout.batch_size,
                  **self.trace_settings())

  def grad(self) -> str:
    return key_of(stage="grad", holdout=self.holdout(), proxy=self.fp["proxy"],
                  micro_batch=self.x.config.grad.micro_batch_size)

  def calibrate(self) -> str:
    c = self.x.config
    return key_of(stage="calibrate", grad=self.grad(), teacher=self.fp["teacher"],
                  examples=self.x.split_hash("holdout"),
                  calibrate=calibrate_settings(c.grid.calibrate),
                  taus=list(c.grid.ads_taus), temperatures=list(c.grid.temperatures),
                  params=self.x.point_params(Point("ads", 1.0, 1.0, c.sample.eps)).as_dict())

  def teacher_side(self, point: Point) -> dict:
    ads = point.lam != 0.0
    return dict(teacher=self.fp["teacher"], proxy=self.fp["proxy"] if ads else None,
                grad=self.grad() if ads else None,
                params=self.x.point_params(point).as_dict(), **self.trace_settings())

  def sample(self, point: Point) -> str:
    return key_of(stage="sample", examples=self.x.split_hash("train"),
                  batch=self.x.config.sample.batch_size, **self.teacher_side(point))

  def attack(self, point: Point, attack: str) -> dict:
    a = self.x.config.attacks
    if attack == "keep_correct":
      return dict(name=attack)
    clean = dict(traces=self.sample(self.x.clean_point(point)), seed=int(a.seed))
    if attack == "clean_mix":
      return dict(name=attack, rows=int(a.clean_mix.rows), **clean)
    return dict(name=attack, rows=int(a.reaimed.clean_rows),
                drop_fraction=float(a.reaimed.drop_fraction),
                micro_batch=int(a.reaimed.micro_batch_size), **clean)

  def distill(self, point: Point, attack: str | None = None) -> str:
    extra = {} if attack is None else dict(attack=self.attack(point, attack))
    return key_of(stage="distill", traces=self.sample(point), holdout=self.holdout(),
                  student=self.fp["student"],
                  distill=dataclasses.asdict(self.x.distill_config()), **extra)

  def eval_parts(self) -> dict:
    c = self.x.config
    return dict(examples=self.x.split_hash("test"), params=self.x.eval_params().as_dict(),
                batch=c.eval.batch_size, **self.trace_settings())

  def eval_student(self, point: Point, attack: str | None = None) -> str:
    return key_of(stage="eval_student", student=self.distill(point, attack), **self.eval_parts())

  def eval_teacher(self, point: Point) -> str:
    return key_of(stage="eval_teacher", examples=self.x.split_hash("test"),
                  batch=self.x.config.eval.batch_size, **self.teacher_side(point))

  def eval_base(self) -> str:
    return key_of(stage="eval_base", student=self.fp["student"], **self.eval_parts())

  def models(self) -> str:
    c = self.x.config
    return key_of(stage="models", scratch=c.scratch.to_dict(),
                  task=c.data.get("task") and c.data.task.to_dict(), seed=c.data.seed)


def migrate(x) -> dict[str, int]:
  """Moves the finished layout-1 outputs of the Experiment x's workdir that x's config would
  make to their new keys and records them; marks the workdir with the current layout. Returns
  {stage: outputs moved}."""
  from antidistill_jax import gradients, models
  root = x.workdir
  if not files.is_local(root):
    raise errors.BadWorkdir(f"--migrate_keys renames folders, which {os.fspath(root)} (an "
                            "object store) cannot: copy the workdir to a local disk first.")
  if (root / "layout.json").exists():
    raise errors.BadWorkdir(f"{os.fspath(root)} has a layout.json already: nothing to migrate.")
  store = x.store
  moved: dict[str, int] = {}

  def move(stage: str, old: str, new: str, fields: dict) -> None:
    src, dst = root / stage / old, root / stage / new
    done = src / "done.json"
    if not done.exists() or store.record(stage, new) is not None:
      return
    metrics = files.read_json(done)["metrics"]
    if old != new:
      if dst.exists():
        raise errors.BadWorkdir(f"cannot move {src} to {dst}: the target exists. Remove it "
                                "(an unfinished output) and migrate again.")
      os.rename(src, dst)
    os.unlink(dst / "done.json")  # the record is the one finished-marker now
    store.publish(stage, new, dict(fields, seconds=0.0, metrics=metrics, migrated_from=old))
    moved[stage] = moved.get(stage, 0) + 1

  source = x.model_source
  if source == "tiny":  # layout 1: models/<role>, unkeyed, finished when models/done.json was
    if (root / "models" / "done.json").exists() and store.record("models", x.models_key()) is None:
      new = root / "models" / x.models_key()
      files.makedirs(new)
      for role in ("teacher", "proxy", "student"):
        os.rename(root / "models" / role, new / role)
      os.unlink(root / "models" / "done.json")
      store.publish("models", x.models_key(), dict(seconds=0.0, metrics={},
                                                   migrated_from="models/"))
      moved["models"] = 1
  fingerprints = {}
  legacy = None
  if source == "scratch":
    legacy = LegacyKeys(x, fingerprints)
    move("models", legacy.models(), x.models_key(), {})
  for role in ("teacher", "proxy", "student"):
    try:
      path = x.model_path(role)
    except errors.MissingInput:
      logging.warning("migrate: no %s checkpoint; nothing after it is moved.", role)
      break
    fingerprints[role] = gradients.fingerprint(models.from_pretrained(path))
  if len(fingerprints) < 3:
    return moved
  legacy = LegacyKeys(x, fingerprints)
  old_key = dict(
      holdout=lambda _: legacy.holdout(), grad=lambda _: legacy.grad(),
      calibrate=lambda _: legacy.calibrate(), sample=legacy.sample,
      distill=lambda s: legacy.distill(s.point, s.attack),
      eval_student=lambda s: legacy.eval_student(s.point, s.attack),
      eval_teacher=legacy.eval_teacher, eval_base=lambda _: legacy.eval_base())
  for stage in x.stages():  # in order: the calibrated lams and the students come from records
    if stage.name in old_key:
      for item in stage.items():
        move(stage.name, old_key[stage.name](item), stage.key(item), stage.fields(item))
  files.create_new(root / "layout.json",
                   (f'{{"layout": {store_lib.LAYOUT}}}\n').encode())
  return moved
