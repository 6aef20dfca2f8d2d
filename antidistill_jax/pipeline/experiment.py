"""The experiment: its stages in order, each run by the one loop (`loop.run_stage`).

  models -> holdout -> grad -> calibrate -> sample -> distill -> eval_student
                                                 +-> eval_teacher        eval_base -> report

What each stage reads and writes is in the package docstring; what it computes is in
`teacher` (models, holdout, grad, calibrate, sample, eval_teacher), `student` (distill,
eval_student, eval_base) and `reporting` (report); what it reads (splits, models, keys) in
`inputs`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
from absl import logging

from antidistill_jax import errors
from antidistill_jax.pipeline import loop, reporting, student, teacher
from antidistill_jax.pipeline.grid import Prefill, Resample
from antidistill_jax.pipeline.inputs import Inputs

STAGES = ("models", "holdout", "grad", "calibrate", "sample", "distill", "eval_student",
          "eval_teacher", "eval_base", "report")
PER_POINT = ("sample", "distill", "eval_student", "eval_teacher")


class Experiment(Inputs):
  """One config, one workdir: the stages in order, each skipping what is finished."""

  # -- the stages ------------------------------------------------------------------------------

  def stages(self) -> list[loop.Stage]:
    """The experiment, in order (each reads only what the ones before it wrote)."""
    one = lambda: [None]
    point = lambda p: dict(entry=p.name, point=dataclasses.asdict(getattr(p, "point", p)))
    student_fields = lambda s: dict(entry=s.name, point=dataclasses.asdict(s.point),
                                    attack=s.attack, replicate=s.replicate)
    return [
        loop.Stage("models", lambda: [None] if self.model_source != "checkpoints" else [],
                   lambda _: self.models_key(), lambda _, out: teacher.make_models(self, out)),
        loop.Stage("holdout", one, lambda _: self.holdout_key(),
                   lambda _, out: teacher.holdout(self, out)),
        loop.Stage("grad", self._gradients, self.grad_key,
                   lambda which, out: teacher.grad(self, out, which),
                   lambda which: dict(entry=which) if which != "standard" else {}),
        loop.Stage("calibrate", self._calibrations, self.calibrate_key,
                   lambda which, out: teacher.calibrate(self, out, which),
                   lambda which: dict(entry=which) if which != "standard" else {}),
        # The grid's trace sets, then the resampling attacker's re-queries of them.
        loop.Stage("sample", lambda: self.points + self.resample_items() + self.prefill_items(),
                   self._sample_key,
                   self._sample, point),
        # Each student, and each evaluation, reads only earlier stages: jobs on one workdir
        # share these stages' items (loop.Stage.independent).
        loop.Stage("distill", self.students, self.distill_key,
                   lambda s, out: student.distill_one(self, s, out), student_fields,
                   independent=True),
        loop.Stage("eval_student", lambda: student.trained(self, self.students()),
                   self.eval_student_key,
                   lambda s, out: student.evaluate_student(self, s, out), student_fields,
                   independent=True),
        loop.Stage("eval_teacher", lambda: self.points, self.eval_teacher_key,
                   lambda p, out: teacher.evaluate(self, p, out), point, independent=True),
        loop.Stage("eval_base", one, lambda _: self.eval_base_key(),
                   lambda _, out: student.evaluate_base(self, out), lambda _: dict(entry="base")),
        loop.Stage("report", one, None, lambda _, out: reporting.report(self, out)),
    ]

  def _gradients(self) -> list[str]:
    """g, and the answer-aligned g when grid.aligned asks for it."""
    return ["standard", "aligned"] if self.config.grid.aligned else ["standard"]

  def _calibrations(self) -> list[str]:
    """The ADS lams' calibration, and the answer-aligned ADS's (its own lams) with grid.aligned."""
    return self._gradients() if self.calibrates else []

  def _sample_key(self, item) -> str:
    if isinstance(item, Resample):
      return self.resample_key(item.point)
    if isinstance(item, Prefill):
      return self.sample_key(item.point, self.prefill)
    return self.sample_key(item)

  def _sample(self, item, out) -> dict:
    if isinstance(item, Resample):
      return teacher.resample(self, item.point, out)
    if isinstance(item, Prefill):
      return teacher.sample(self, item.point, out, prefill=self.prefill)
    return teacher.sample(self, item, out)

  def _on_record(self, stage: loop.Stage, item, outcome: loop.Outcome) -> None:
    record = outcome.record
    entry = record.get("entry")
    metrics = record.get("metrics") or {}
    logging.info("%s%s [%s]: %s, %s", stage.name, f" {entry}" if entry else "", record["key"],
                 outcome.how, metrics)
    prefix = f"summary/{stage.name}/{entry}" if entry else f"summary/{stage.name}"
    self.events.scalars({f"{prefix}/{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)

  def migrate_keys(self) -> dict[str, int]:
    """Moves the finished outputs of an older workdir (layout 1) to this config's keys
    (`migrate`); returns {stage: outputs moved}. Process 0 works, the others wait."""
    from antidistill_jax import parallel
    from antidistill_jax.pipeline import migrate
    moved = migrate.migrate(self) if self.writer else {}
    parallel.sync("migrate keys")
    return moved

  def run(self, stages: Sequence[str] = STAGES) -> dict[str, dict]:
    """Runs the named stages in pipeline order; returns {stage: counts} (also written to
    workdir/runs/<run>.json)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise errors.BadValue(f"--stages: unknown stages {unknown}; expected some of "
                            f"{','.join(STAGES)}.")
    if self.writer:
      self.store.open()  # a file, or an older layout: refused before any work
    if jax.process_count() > 1:
      self._check_shared_workdir()
    self.preflight(stages)  # inputs that need no work: checked before any stage runs
    start = time.time()
    timeout = float(self.config.pipeline.wait_timeout_s)
    poll = float(self.config.pipeline.poll_s)
    done = {}
    try:
      for stage in self.stages():
        if stage.name in stages:
          done[stage.name] = loop.run_stage(self.store, stage, timeout_s=timeout, poll_s=poll,
                                            on_record=self._on_record)
    finally:
      if self._events is not None:
        self._events.close()
        self._events = None
      if self.writer:
        self.store.write_run(dict(run=self.store.run_id, host=self.store.host,
                                  pid=self.store.pid, shard=list(self.shard),
                                  seconds=round(time.time() - start, 3), stages=done,
                                  finished=len(done) == len(stages)))
    return done
