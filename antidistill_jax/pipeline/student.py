"""The student's side: a student distilled from each trace set (and from what each attacker
makes of it), every student evaluated, and the undistilled student as the baseline.

Each function computes one stage output into `out` and returns its metrics; `x` is the
`Experiment`.
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import logging

from antidistill_jax import attacks, distill, files, models, sampling, traces
from antidistill_jax.pipeline import evaluating
from antidistill_jax.pipeline.grid import Point
from antidistill_jax.pipeline.teacher import holdout_rows, save_model_dir


def trace_rows(x, point: Point) -> list[dict]:
  return traces.read_traces(x.output("sample", x.sample_key(point), f"traces of {point.name}")
                            / "traces.jsonl")


def distill_one(x, point: Point, attack: str | None, out) -> dict:
  """A student fine-tuned on a point's traces (LoRA SFT or full), exported merged to
  out/student; with an attacker, on what that attacker makes of the traces."""
  student = x.model("student")
  cfg = x.distill_config()
  system = x.config.prompts.system or None
  to_examples = lambda rows: distill.sft_examples(student.tokenizer, rows, system=system,
                                                  max_length=cfg.max_length)
  rows, log, select = trace_rows(x, point), [], None
  if attack is None:
    examples = to_examples(rows)
  else:
    settings = x.attack(point, attack)
    clean = trace_rows(x, x.clean_point(point)) if attack in attacks.NEEDS_CLEAN else None
    plan = attacks.prepare(settings, rows, clean, to_examples, pad_id=cfg.pad_id, mesh=x.mesh,
                           log=log)
    if plan is None:  # nothing to learn from: the attacker's student stays undistilled
      logging.warning("%s: nothing of %s to train on; no student.", attack, point.name)
      return dict(train_rows=0, skipped="no correct traces")  # keep_correct's only way out
    examples, select = plan
  held = to_examples(holdout_rows(x))
  fresh = models.from_pretrained(student.path, dtype=jnp.dtype(x.config.models.dtype),
                                 mesh=x.mesh)
  name = x.entry_name(point, attack)

  def on_step(record):
    x.events.scalars({f"distill/{name}/{k}": v for k, v in record.items() if k != "step"},
                     step=int(record["step"]))

  trained, history = distill.distill(fresh, examples, held, out / "train", cfg, mesh=x.mesh,
                                     on_step=on_step, select=select)
  save_model_dir(trained, student.tokenizer, out / "student")
  last = history[-1]
  evals = [h for h in history if "holdout_loss" in h]
  metrics = dict(train_loss=float(last["train_loss"]), steps=int(last["step"]),
                 holdout_loss=float(evals[-1]["holdout_loss"]) if evals else None)
  if attack:  # traces it trained on (re-aimed: per epoch, after its filter)
    metrics["train_rows"] = len(examples) - (log[-1]["dropped"] if log else 0)
    if log:
      metrics["reaimed"] = log
  return metrics


def trained(x, students) -> list:
  """The students that exist: an attacker may have left nothing to train on."""
  out = []
  for point, attack in students:
    record = x.store.record("distill", x.distill_key(point, attack))
    if record is None or not record["metrics"].get("skipped"):
      out.append((point, attack))
  return out


def evaluate_student(x, point: Point, attack: str | None, out) -> dict:
  """A distilled student, greedily, on the test split."""
  path = x.output("distill", x.distill_key(point, attack),
                  f"distilled student {x.entry_name(point, attack)}") / "student"
  model = models.from_pretrained(files.local_dir(path), dtype=jnp.dtype(x.config.models.dtype),
                                 mesh=x.mesh)
  return evaluating.evaluate_with(x, out, sampling.Sampler(model, x.model("student").tokenizer,
                                                mesh=x.mesh))


def evaluate_base(x, out) -> dict:
  """The undistilled student (the paper's dashed line)."""
  s = x.model("student")
  return evaluating.evaluate_with(x, out, sampling.Sampler(s.model, s.tokenizer, mesh=x.mesh))
