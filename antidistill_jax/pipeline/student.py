"""The student's side: a student distilled from each trace set (and from what each attacker
makes of it), every student evaluated, and the undistilled student as the baseline.

Each function computes one stage output into `out` and returns its metrics; `x` is the
`Experiment`.
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import logging

from antidistill_jax import attacks, distill, files, models, sampling
from antidistill_jax.pipeline import evaluating, teacher
from antidistill_jax.pipeline.grid import Student
from antidistill_jax.pipeline.teacher import nll_rows, save_model_dir, trace_rows


def distill_one(x, s: Student, out) -> dict:
  """A student fine-tuned on a point's traces (LoRA SFT or full), exported merged to
  out/student; with an attacker, on what that attacker makes of the traces. Its holdout NLL
  is measured on clean teacher traces (those g never saw, with grad.rows)."""
  point, attack = s.point, s.attack
  student = x.model("student")
  cfg = x.distill_config(s.replicate)
  system = x.config.prompts.system or None
  to_examples = lambda rows: distill.sft_examples(student.tokenizer, rows, system=system,
                                                  max_length=cfg.max_length)
  prefilled = attack is not None and attacks.parse(attack)[0] == "prefill"
  rows, log = trace_rows(x, point, x.prefill if prefilled else ""), []
  fresh = models.from_pretrained(student.path, dtype=jnp.dtype(x.config.models.dtype),
                                 mesh=x.mesh)
  if attack is None:
    plan = attacks.Plan(to_examples(rows))
  else:
    settings = x.attack(point, attack)
    clean = trace_rows(x, x.clean_point(point)) if settings["name"] in attacks.NEEDS_CLEAN \
        else None
    rounds = teacher.resampled_rounds(x, point) if settings["name"] in attacks.NEEDS_TEACHER \
        else None
    plan = attacks.prepare(settings, rows, clean, to_examples, student=fresh, rounds=rounds,
                           pad_id=cfg.pad_id, mesh=x.mesh, log=log)
    if plan is None:  # nothing to learn from: the attacker's student stays undistilled
      logging.warning("%s: nothing of %s to train on; no student.", attack, point.name)
      why = "no correct traces" if settings["name"] == "keep_correct" else "no clean traces"
      return dict(train_rows=0, skipped=why, **({settings["name"]: log[-1]} if log else {}))
  examples = plan.examples
  held_rows = nll_rows(x)
  held = to_examples(held_rows)
  name = s.name

  def on_step(record):
    x.events.scalars({f"distill/{name}/{k}": v for k, v in record.items() if k != "step"},
                     step=int(record["step"]))

  trained, history = distill.distill(fresh, examples, held, out / "train", cfg, mesh=x.mesh,
                                     on_step=on_step, select=plan.select,
                                     weights=plan.weights)
  save_model_dir(trained, student.tokenizer, out / "student")
  last = history[-1]
  evals = [h for h in history if "holdout_loss" in h]
  metrics = dict(train_loss=float(last["train_loss"]), steps=int(last["step"]),
                 holdout_loss=float(evals[-1]["holdout_loss"]) if evals else None)
  if x.config.data.grader == "synthetic":
    metrics["nll_by_role"] = nll_by_role(trained, held_rows, held, cfg, x.mesh)
  if attack:  # traces it trained on (re-aimed: per epoch, after its filter)
    metrics["train_rows"] = len(examples) - (log[-1].get("dropped", 0) if log else 0)
    if log:
      metrics[settings["name"]] = log if plan.select is not None else log[-1]
  return metrics


def nll_by_role(model, rows: list[dict], examples, cfg, mesh) -> dict | None:
  """The student's mean NLL (nats/token) on the clean traces' answer, writing-choice and
  reasoning tokens (`synthetic.token_roles`; the EOS token counts as answer). The task's
  tokenizer has one token per UTF-8 byte, so a character's role goes to each of its bytes; None
  when the token counts say otherwise (another tokenizer)."""
  from antidistill_jax import parallel
  from antidistill_jax.data import synthetic
  nlls = distill.completion_nlls(model, examples, cfg, mesh=mesh,
                                 rows=parallel.round_rows(cfg.micro_batch_size, mesh))
  sums = {r: 0.0 for r in synthetic.ROLES}
  counts = {r: 0 for r in synthetic.ROLES}
  for row, nll in zip(rows, nlls):
    text = row["completion"]
    roles = [r for ch, r in zip(text, synthetic.token_roles(text)) for _ in ch.encode()]
    roles += ["answer"]  # EOS
    roles = roles[:len(nll)] if len(nll) in (len(roles), len(roles) - 1) else None
    if roles is None:
      logging.warning("nll_by_role: %d tokens for %d characters; not one token per character.",
                      len(nll), len(row["completion"]))
      return None
    for role, value in zip(roles, nll):
      sums[role] += float(value)
      counts[role] += 1
  return {r: sums[r] / counts[r] for r in synthetic.ROLES if counts[r]}


def trained(x, students: list[Student]) -> list[Student]:
  """The students that exist: an attacker may have left nothing to train on."""
  out = []
  for s in students:
    record = x.store.record("distill", x.distill_key(s))
    if record is None or not record["metrics"].get("skipped"):
      out.append(s)
  return out


def evaluate_student(x, s: Student, out) -> dict:
  """A distilled student, greedily, on the test split."""
  path = x.output("distill", x.distill_key(s), f"distilled student {s.name}") / "student"
  model = models.from_pretrained(files.local_dir(path), dtype=jnp.dtype(x.config.models.dtype),
                                 mesh=x.mesh)
  return evaluating.evaluate_with(x, out, sampling.Sampler(model, x.model("student").tokenizer,
                                                mesh=x.mesh))


def evaluate_base(x, out) -> dict:
  """The undistilled student (the paper's dashed line)."""
  s = x.model("student")
  return evaluating.evaluate_with(x, out, sampling.Sampler(s.model, s.tokenizer, mesh=x.mesh))
