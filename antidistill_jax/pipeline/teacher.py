"""The teacher's side of the experiment: its models, the holdout traces and g, the lambda
calibration, the training traces of every grid point, and the teacher's own accuracy.

Each function computes one stage output into `out` and returns its metrics; `x` is the
`Experiment` (config, splits, models, keys).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from antidistill_jax import errors, files, gradients, models, parallel, sampling, traces
from antidistill_jax.data.prompts import build_prompts
from antidistill_jax.pipeline import evaluating
from antidistill_jax.pipeline.grid import (RESAMPLE_STREAM, Point, calibrated_lams,
                                           calibration_span, kind_of)


def save_model_dir(model, tokenizer, path) -> None:
  """models.save_pretrained + the tokenizer into `path`, local or gs:// (written locally, then
  uploaded). Every process calls it (weights spread over hosts are gathered); process 0
  writes."""
  local = files.is_local(path)
  with tempfile.TemporaryDirectory() as tmp:
    target = os.fspath(path) if local else tmp
    models.save_pretrained(model, target)
    if parallel.is_writer():
      tokenizer.save_pretrained(target)
      if not local:
        files.upload_dir(tmp, path)


def make_models(x, out) -> dict:
  """The teacher, proxy and student checkpoints under out/<role>: tiny random ones
  (config.tiny), or the synthetic task's models trained from scratch (config.scratch)."""
  if x.model_source == "tiny":
    return _tiny(x, out)
  return _scratch(x, out)


def _tiny(x, out) -> dict:
  from antidistill_jax import random_checkpoints
  t = x.config.tiny
  texts = [e.problem + " " + e.solution for which in ("holdout", "train", "test")
           for e in x.split(which)]
  if parallel.is_writer():
    tok = random_checkpoints.train_tokenizer(texts * 2, vocab_size=t.vocab_size)
    specs = {"teacher": (t.seed, dict(t.teacher)), "proxy": (t.seed + 1, dict(t.proxy)),
             "student": (t.seed + 2, dict(t.student))}
    with tempfile.TemporaryDirectory() as tmp:
      for name, (seed, cfg) in specs.items():
        random_checkpoints.make_tiny_checkpoint(os.path.join(tmp, name), tokenizer=tok,
                                                seed=seed, **cfg)
        files.upload_dir(os.path.join(tmp, name), out / name)
  return dict(vocab_size=int(t.vocab_size))


def _scratch(x, out) -> dict:
  """Trains the synthetic task's models from scratch (`scratch`): the teacher on gold traces,
  the proxy on the teacher's traces at tau=1, the student (another family) from random
  weights, or pre-trained on an easier distribution (scratch.student.pretrain)."""
  from antidistill_jax import task_models
  import jax
  c = x.config
  if jax.process_count() > 1:
    raise RuntimeError("the models stage trains tiny models on one process: run it alone "
                       "first (--stages=models without --distributed), then the rest.")
  sc, tok = c.scratch, task_models.task_tokenizer()
  local = tempfile.mkdtemp(prefix="scratch_") if not files.is_local(out) else os.fspath(out)
  step = lambda role: os.path.join(local, role)
  held = task_models.example_rows(tok, x.split("holdout")[:sc.eval_rows])

  def train(role, rows, spec, start_from=None, seed_offset=0):
    cfg = task_models.scratch_config(**dict(spec.train))
    path, history = task_models.train_from_scratch(
        step(role), tokenizer=tok, rows=rows, holdout_rows=held, model_type=spec.model_type,
        shape=dict(spec.shape), config=cfg, start_from=start_from, seed=sc.seed + seed_offset)
    return path, history[-1]

  gold = task_models.example_rows(tok, x.synthetic("train", sc.teacher.traces, 1))
  teacher_path, t_last = train("teacher", gold, sc.teacher)
  # The proxy learns from what the teacher serves: its traces at tau=1 on train problems.
  sampler = sampling.Sampler(models.from_pretrained(teacher_path), tok, mesh=x.mesh)
  served = traces.generate_traces(
      sampler, x.synthetic("train", sc.proxy.traces, 2), os.path.join(local, "served.jsonl"),
      dataset=c.data.grader, system=None, answer_forcing=False, batch_size=sc.batch_size,
      params=sampling.SamplingParams(max_new_tokens=c.sample.max_new_tokens, tau=1.0,
                                     seed=sc.seed))
  _, p_last = train("proxy", traces.read_traces(os.path.join(local, "served.jsonl")),
                    sc.proxy, seed_offset=1)
  if sc.student.pretrain.traces:  # prior knowledge: the same task, easier problems
    easy = x.synthetic("train", sc.student.pretrain.traces, 3, **dict(sc.student.pretrain.task))
    train("student", task_models.example_rows(tok, easy), sc.student, seed_offset=2)
  else:
    save_model_dir(task_models.random_model(tok, model_type=sc.student.model_type,
                                            seed=sc.seed + 2, **dict(sc.student.shape)),
                   tok, step("student"))
  if not files.is_local(out) and parallel.is_writer():
    for role in ("teacher", "proxy", "student"):
      files.upload_dir(step(role), out / role)
  return dict(teacher_train_loss=t_last["train_loss"], proxy_train_loss=p_last["train_loss"],
              served_accuracy=served["statistics"]["accuracy"])


def trace_rows(x, point: Point, prefill: str = "") -> list[dict]:
  """A finished trace set of a point (with `prefill`: the prefill attacker's)."""
  what = f"{'prefilled ' if prefill else ''}traces of {point.name}"
  return traces.read_traces(x.output("sample", x.sample_key(point, prefill), what)
                            / "traces.jsonl")


def write_traces(x, out, sampler, examples, params, batch_size: int, split: str,
                 prefill: str = "") -> dict:
  meta = traces.generate_traces(sampler, examples, out / "traces.jsonl", params=params,
                                batch_size=batch_size, split=split, prefill=prefill,
                                **x.trace_settings())
  s = meta["statistics"]
  return dict(accuracy=s["accuracy"], forced_accuracy=s["forced_accuracy"],
              length_mean=s["length_mean"], rows=meta["counts"]["rows"])


def holdout(x, out) -> dict:
  """The teacher's greedy traces on the holdout split: the data g is computed on (its first
  grad.rows, unless grad.tau), and the clean traces students' NLL is measured on."""
  return write_traces(x, out, x.teacher_sampler(False), x.split("holdout"), x.holdout_params(),
                      x.config.holdout.batch_size, "holdout")


def holdout_rows(x) -> list[dict]:
  return traces.read_traces(x.output("holdout", x.holdout_key(), "holdout traces")
                            / "traces.jsonl")


def _split_holdout(x) -> tuple[list[dict], list[dict]]:
  """(the traces g is computed on, the traces students' NLL is measured on): with grad.rows,
  the first rows and the rest; otherwise all of them, twice."""
  rows, n = holdout_rows(x), x.grad_rows
  if not n:
    return rows, rows
  if n >= len(rows):
    raise errors.BadValue(f"grad.rows={n} leaves none of the {len(rows)} holdout traces for "
                          "the students' NLL: lower grad.rows or raise data.max_holdout.")
  return rows[:n], rows[n:]


def grad_rows(x) -> list[dict]:
  return _split_holdout(x)[0]


def nll_rows(x) -> list[dict]:
  return _split_holdout(x)[1]


def grad(x, out, which: str = "standard") -> dict:
  """g: the gradient of the proxy's completion NLL on the holdout traces (the first
  grad.rows), or with grad.tau > 0 on the teacher's traces sampled at grad.tau on those
  problems (out/traces.jsonl). which="aligned": the answer-aligned g on g's traces."""
  if which == "aligned":
    return aligned_grad(x, out)
  rows = grad_rows(x)
  if float(x.config.grad.tau):
    problems = x.split("holdout")[:len(rows)]
    write_traces(x, out, x.teacher_sampler(False), problems, x.grad_trace_params(),
                 x.config.holdout.batch_size, "holdout")
    rows = traces.read_traces(out / "traces.jsonl")
  pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows if r["completion_ids"]]
  g, meta = gradients.proxy_gradient(x.model("proxy").model, pairs,
                                     micro_batch_size=x.config.grad.micro_batch_size,
                                     mesh=x.mesh)
  gradients.save_gradient(out / "grad", g, meta)
  return dict(mean_loss=meta["mean_loss"], global_norm=meta["global_norm"],
              sequences=meta["num_sequences"])


def aligned_grad(x, out) -> dict:
  """The answer-aligned g (`aligned`): the proxy's gradient on the answer tokens of g's own
  traces, rescaled to g's global norm."""
  from antidistill_jax import aligned
  standard = x.output("grad", x.grad_key(), "proxy gradient")
  rows = (traces.read_traces(standard / "traces.jsonl") if float(x.config.grad.tau)
          else grad_rows(x))
  rows = [r for r in rows if r["completion_ids"]]
  norm = float(gradients.global_norm(x.gradient()))
  proxy = x.model("proxy")
  g, meta = aligned.aligned_gradient(proxy.model, proxy.tokenizer, rows, x.config.data.grader,
                                     norm, micro_batch_size=x.config.grad.micro_batch_size,
                                     mesh=x.mesh)
  gradients.save_gradient(out / "grad", g, meta)
  return dict(mean_loss=meta["mean_loss"], global_norm=meta["global_norm"],
              answer_norm=meta["answer_norm"], sequences=meta["num_sequences"],
              without_answer=meta["without_answer"], answer_tokens=meta["answer_tokens"])


def accuracy(x, point: Point, examples, path) -> float:
  """The teacher's raw accuracy on `examples` at a point's settings: the same trace path as
  every other accuracy (traces.generate_traces, resumable), without answer forcing."""
  meta = traces.generate_traces(x.point_sampler(point), examples, path,
                                params=x.point_params(point), batch_size=x.config.sample.batch_size,
                                split="holdout", **dict(x.trace_settings(), answer_forcing=False))
  return meta["statistics"]["accuracy"]


def calibrate(x, out, which: str = "standard") -> dict:
  """Chooses the ADS lams so that the teacher's accuracy under them spans the temperature
  sweep's: the teacher's accuracy on grid.calibrate.n holdout problems at each temperature
  and along a ladder of lams (lam = b * eps for b in grid.calibrate.ladder, at the first ADS
  tau), then grid.calibrate.points lams interpolated (in log lam) at accuracies evenly spaced
  from the best temperature accuracy to the worst (of the taus in grid.calibrate.between, when
  it names some). With grid.calibrate.logprob_drops, `calibrate_logprob` instead.
  which="aligned": the same for ADS with the answer-aligned g (its own lams)."""
  c = x.config
  cal, eps = c.grid.calibrate, float(c.sample.eps)
  kind = kind_of(which)
  if cal.logprob_drops:
    return calibrate_logprob(x, kind)
  outside = [t for t in cal.between if float(t) not in [float(u) for u in c.grid.temperatures]]
  if outside:
    raise errors.BadValue(f"grid.calibrate.between={tuple(cal.between)}: {outside} not in "
                          f"grid.temperatures={tuple(c.grid.temperatures)}; name taus of the "
                          "temperature sweep.")
  examples = x.split("holdout")[:cal.n]
  temps = {float(t): accuracy(x, Point("temperature", float(t), 0.0, eps), examples,
                              out / f"temperature_{k}.jsonl")
           for k, t in enumerate(c.grid.temperatures)}
  tau = float(c.grid.ads_taus[0])
  ladder = [(float(b) * eps, accuracy(x, Point(kind, tau, float(b) * eps, eps), examples,
                                      out / f"ladder_{k}.jsonl"))
            for k, b in enumerate(cal.ladder)]
  best, worst = calibration_span(temps, cal.between)
  lams = calibrated_lams(ladder, best, worst, int(cal.points))
  return dict(lams=lams, temperature_accuracy=temps,
              ladder=[dict(lam=lam, accuracy=acc) for lam, acc in ladder])


def calibrate_logprob(x, kind: str = "ads") -> dict:
  """The ADS lams at which the teacher's mean log-prob per generated token, on the first
  grid.calibrate.n holdout prompts at the first ADS tau, falls by each of
  grid.calibrate.logprob_drops nats below plain sampling with the same seeds
  (`sampling.calibration`, the demo's target): a lam that means the same on every model. Two
  decode compiles however many lams the searches try; a drop that collapses the text warns."""
  from antidistill_jax.sampling import calibration
  c = x.config
  cal = c.grid.calibrate
  point = Point(kind, float(c.grid.ads_taus[0]), 1.0, float(c.sample.eps))
  sampler, params = x.point_sampler(point), x.point_params(point)
  settings = x.trace_settings()
  # The prompts generate_traces would keep at these settings.
  limit = traces.prompt_limit(sampler, params, settings["max_prompt_length"],
                              settings.get("answer_forcing", True))
  prompts = build_prompts(sampler.tokenizer, x.split("holdout")[:cal.n], limit,
                          system=settings["system"]).ids
  lams, searches = [], []
  for drop in cal.logprob_drops:
    lam, ladder = calibration.lam_for_logprob_drop(sampler, prompts, params, float(drop))
    calibration.warn_if_collapsed(dict(ladder)[lam], lam, "grid.calibrate.logprob_drops")
    lams.append(lam)
    searches.append(dict(target=float(drop), lam=lam,
                         ladder=[dict(lam=a, drop=d) for a, d in ladder]))
  return dict(lams=sorted(lams), target="logprob_drop", searches=searches)


def sample(x, point: Point, out, prefill: str = "") -> dict:
  """A grid point's training traces: the teacher at (tau, lam) on the train split; with
  `prefill`, every response made to begin with it (the prefill attacker's set)."""
  return write_traces(x, out, x.point_sampler(point), x.split("train"),
                      x.point_params(point), x.config.sample.batch_size, "train",
                      prefill=prefill)


def resample(x, point: Point, out) -> dict:
  """The resampling attacker's re-queries of a point's traces (attacks.resampled): round r
  asks the teacher again, at sampling stream RESAMPLE_STREAM + r - 1, for every prompt whose
  latest trace breaks a degeneracy rule; out/round_<r>/ holds its prompts (flagged.json: their
  indices in the train split) and traces. Stops after attacks.resample.rounds rounds or when
  nothing is flagged."""
  from antidistill_jax import attacks, degeneracy
  rules = attacks.rules(x.config.attacks)
  latest = trace_rows(x, point)
  train, asked, served = x.split("train"), [], len(latest)
  sampler = x.point_sampler(point)
  for r in range(1, int(x.config.attacks.resample.rounds) + 1):
    flagged = [row["index"] for row in latest if degeneracy.check(row, rules)]
    asked.append(len(flagged))
    if not flagged:
      break
    folder = out / f"round_{r}"
    files.makedirs(folder)
    files.write_json(folder / "flagged.json", flagged)
    params = x.point_params(dataclasses.replace(point, stream=RESAMPLE_STREAM + r - 1))
    write_traces(x, folder, sampler, [train[i] for i in flagged], params,
                 x.config.sample.batch_size, "train")
    latest = _round_rows(folder)
  return dict(served=served, requeried=asked)


def _round_rows(folder) -> list[dict]:
  """A round's traces, each row's index mapped back to its prompt's index in the train split."""
  flagged = files.read_json(folder / "flagged.json")
  rows = traces.read_traces(folder / "traces.jsonl")
  if len(rows) != len(flagged):
    raise errors.BadValue(f"{os.fspath(folder)}: {len(rows)} traces for {len(flagged)} "
                          "re-queried prompts; rerun the sample stage.")
  return [dict(row, index=flagged[row["index"]]) for row in rows]


def resampled_rounds(x, point: Point) -> list[list[dict]]:
  """The rounds resample() wrote for a point, in order (what attacks.resampled reads)."""
  out = x.output("sample", x.resample_key(point), f"re-queries of {point.name}")
  rounds = []
  while (out / f"round_{len(rounds) + 1}" / "flagged.json").exists():
    rounds.append(_round_rows(out / f"round_{len(rounds) + 1}"))
  return rounds


def evaluate(x, point: Point, out) -> dict:
  """The teacher on the test split at a point's settings (what its users get)."""
  return evaluating.evaluate_with(x, out, x.point_sampler(point), x.point_params(point))
