"""Attackers: what a distiller can do with the traces it was served before or while training.

Each attacker sees the same served trace set and changes only what the student trains on:

  keep_correct  drops the traces whose final answer is wrong (the attacker can grade them);
  clean_mix     adds a few clean (plain-sampled) traces to the served ones;
  reaimed       trains on the served traces, but at the start of every epoch recomputes its own
                gradient g_s (the student's completion NLL on a few clean traces, at its current
                weights) and skips, for that epoch, the traces whose score under g_s is highest;
  reweight      The Distillation Game's adaptive student (`strategic_fd` in the public code of
                ysfalh/distillation-game): scores each served trace once, before training, by
                a_i = [l_i(theta - e g_s) - l_i(theta + e g_s)] / 2e (l_i: the trace's per-token
                mean NLL; g_s: the student's gradient on a few clean traces) and trains on them
                with weights w_i ~ exp(beta * clip(a_i, -c, c)), normalised to mean 1. The
                attack id "reweight@B" sets beta = B (otherwise attacks.reweight.beta);
  reweight_mass the same scores and weights w_i ~ exp(beta * a_i) (no clip), with |beta| chosen
                per served set so that the most-weighted fifth of the traces holds a fraction
                M of the weight ("reweight_mass@M"; otherwise attacks.reweight.top20_mass;
                beta's sign is attacks.reweight.beta's). The scale of a_i is the student's and
                the data's (a tiny student from scratch: SD ~9; the reference's 3B student:
                |mean| ~0.2-0.4), so a fixed beta is a different attacker on every model; M
                is the same one: the reference's own runs at beta 0.5 had M = 0.22-0.23;
  resample      drops the degenerate traces (`degeneracy`: the public filter of the same code)
                and re-queries the teacher for their prompts, round after round, within a
                budget of Q x the served set's queries ("resample@Q"; Q = 1: the filter alone).
                The re-queried traces are the sample stage's (teacher side: `Resample` items);
                the attacker takes them in the order they were asked for, up to its budget;
  prefill       makes the teacher's every response begin with attacks.prefill.text (the
                defence samples from there; teacher side: `Prefill` items of the sample stage)
                and trains on prefill + continuation. An empty text is no prefill.

The re-aimed score of a trace x is the directional derivative of its log-likelihood along g_s,
  score(x) = d/de sum_t log p(x_t | x_<t; theta_s + e g_s) = <g_s, grad log p(x; theta_s)>,
computed exactly with one JVP. A gradient step on x moves the clean loss by about
lr * score(x), so high-score traces are the ones that would raise the student's clean loss:
antidistillation's own criterion, turned around with the student's gradient in place of the
proxy's. Nothing is resampled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import degeneracy, gradients, parallel
from antidistill_jax.gradients import TokenPair
from antidistill_jax.models import Transformer

NAMES = ("keep_correct", "clean_mix", "reaimed", "reweight", "reweight_mass", "resample",
         "prefill")
REWEIGHT = ("reweight", "reweight_mass")  # they train on every trace, weighted
NEEDS_CLEAN = ("clean_mix", "reaimed") + REWEIGHT  # they read a clean (plain-sampled) trace set
NEEDS_TEACHER = ("resample", "prefill")  # they read the teacher's answers to their own queries
# "name@value" sets this setting
WITH_ARGUMENT = {"reweight": "beta", "reweight_mass": "top20_mass", "resample": "budget"}


def parse(attack: str) -> tuple[str, float | None]:
  """(name, argument) of an attack id: "reaimed" -> ("reaimed", None), "reweight@-0.5" ->
  ("reweight", -0.5). ValueError names what is wrong."""
  name, at, arg = attack.partition("@")
  if name not in NAMES:
    raise ValueError(f"unknown attack {name!r}; expected one of {NAMES}.")
  if not at:
    return name, None
  if name not in WITH_ARGUMENT:
    raise ValueError(f"attack {attack!r}: {name} takes no argument (only "
                     f"{', '.join(f'{n}@{a}' for n, a in WITH_ARGUMENT.items())} do).")
  try:
    return name, float(arg)
  except ValueError:
    raise ValueError(f"attack {attack!r}: {arg!r} is not a number; e.g. {name}@0.5.") from None


def settings(attack: str, config) -> dict:
  """The attacker's settings from config.attacks (and its id's argument): what its student
  depends on besides the served traces (and, for NEEDS_CLEAN, the clean trace set)."""
  name, arg = parse(attack)
  if name == "keep_correct":
    return dict(name=name)
  if name == "clean_mix":
    return dict(name=name, rows=int(config.clean_mix.rows), seed=int(config.seed))
  if name == "reweight":
    r = config.reweight
    return dict(name=name, rows=int(r.clean_rows), beta=float(r.beta if arg is None else arg),
                clip=float(r.clip), micro_batch=int(r.micro_batch_size), seed=int(config.seed))
  if name == "reweight_mass":
    r = config.reweight
    mass = float(r.top20_mass if arg is None else arg)
    if not 0.2 <= mass < 1.0:
      raise ValueError(f"attack reweight_mass@{mass:g}: the most-weighted fifth's share of the "
                       "weight lies in [0.2, 1) (0.2: every weight 1, passive SFT).")
    return dict(name=name, rows=int(r.clean_rows), top20_mass=mass,
                sign=1.0 if float(r.beta) >= 0 else -1.0, micro_batch=int(r.micro_batch_size),
                seed=int(config.seed))
  if name == "prefill":
    return dict(name=name, text=str(config.prefill.text))
  if name == "resample":
    budget = float(config.resample.budget if arg is None else arg)
    if budget < 1.0:
      raise ValueError(f"attack resample@{budget:g}: the budget is total queries over the "
                       "served set's (>= 1; 1 is the filter alone).")
    return dict(name=name, budget=budget, rounds=int(config.resample.rounds),
                rules=dataclasses.asdict(rules(config)))
  return dict(name=name, rows=int(config.reaimed.clean_rows),
              drop_fraction=float(config.reaimed.drop_fraction),
              micro_batch=int(config.reaimed.micro_batch_size), seed=int(config.seed))


def rules(config) -> degeneracy.Rules:
  """The degeneracy rules of config.attacks.resample."""
  r = config.resample
  return degeneracy.Rules(min_foreign_run=int(r.min_foreign_run), min_copies=int(r.min_copies),
                          max_period=int(r.max_period))


@dataclasses.dataclass
class Plan:
  """What an attacker's student trains on: the examples, a per-epoch keep mask (select) and
  per-example loss weights, each None where the attacker sets none."""
  examples: list[TokenPair]
  select: Callable | None = None
  weights: np.ndarray | None = None


def prepare(attack: dict, rows: Sequence[dict[str, Any]], clean: Sequence[dict[str, Any]] | None,
            to_examples: Callable[[Sequence[dict]], list[TokenPair]], *,
            student: Transformer | None = None, rounds: Sequence[Sequence[dict]] | None = None,
            pad_id: int = 0, mesh: Mesh | None = None, log: list | None = None) -> Plan | None:
  """The one call the distill stage makes: the Plan of the student of `attack` (settings())
  on the served trace `rows`, or None when the attacker leaves nothing to train on. `clean`:
  the clean trace rows, for NEEDS_CLEAN attackers; `student`: the undistilled student (reweight
  scores the traces with it); `rounds`: the teacher's re-queried traces (resample); `log`: gets
  the attacker's statistics (dicts)."""
  name = attack["name"]
  if name == "keep_correct":
    rows = keep_correct(rows)
    return Plan(to_examples(rows)) if rows else None
  if name == "prefill":  # `rows` are the prefilled traces: trained on as they are
    return Plan(to_examples(rows))
  if name == "resample":
    if rounds is None:
      raise ValueError("attack resample needs the teacher's re-queried traces (rounds=).")
    rows, stats = resampled(rows, rounds, budget=attack["budget"],
                            rules=degeneracy.Rules(**attack["rules"]))
    if log is not None:
      log.append(stats)
    return Plan(to_examples(rows)) if rows else None
  if clean is None:
    raise ValueError(f"attack {name} needs a clean trace set.")
  if name == "clean_mix":
    return Plan(to_examples(clean_mix(rows, clean, attack["rows"], attack["seed"])))
  train = to_examples(rows)
  reference = to_examples(draw(clean, attack["rows"], attack["seed"]))
  if name in REWEIGHT:
    if student is None:
      raise ValueError(f"attack {name} scores the traces with the student: pass student=.")
    mass = attack.get("top20_mass")
    weights, stats = trace_weights(
        student, reference, train, beta=attack["sign"] if mass else attack["beta"],
        clip=attack.get("clip", math.inf), top20_mass=mass,
        micro_batch_size=attack["micro_batch"], pad_id=pad_id, mesh=mesh)
    if log is not None:
      log.append(stats)
    return Plan(train, weights=weights)
  select = reaimed_selector(reference, train, drop_fraction=attack["drop_fraction"],
                            micro_batch_size=attack["micro_batch"], pad_id=pad_id, mesh=mesh,
                            log=log)
  return Plan(train, select=select)


def keep_correct(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The trace rows whose answer the grader marked correct."""
  missing = [i for i, r in enumerate(rows) if "correct" not in r]
  if missing:
    raise ValueError(f"trace rows {missing[:5]} have no 'correct' field: keep_correct needs "
                     "graded traces (traces.generate_traces grades them).")
  return [r for r in rows if r["correct"]]


def resampled(rows: Sequence[dict[str, Any]], rounds: Sequence[Sequence[dict[str, Any]]], *,
              budget: float, rules: degeneracy.Rules) -> tuple[list[dict[str, Any]], dict]:
  """(the traces the attacker keeps, statistics) after filtering and re-querying.

  rows: the served traces (one query per prompt, N of them); rounds[r]: the teacher's answers
  to round r's re-queries, in the order asked (round r asks again for every prompt whose
  latest trace breaks a rule; each row's "index" is its prompt's, as in rows). The attacker
  takes the first floor((budget - 1) * N) re-queries, each replacing its prompt's trace, and
  keeps the prompts whose latest trace breaks no rule, in prompt order. A budget of 1 is the
  filter alone; rules that flag nothing keep every row as it is."""
  n = len(rows)
  extra = int(math.floor((budget - 1.0) * n + 1e-9))
  latest = {r["index"]: r for r in rows}
  order = [r["index"] for r in rows]
  flagged_first = {i for i in order if degeneracy.check(latest[i], rules)}
  used = 0
  for k, answers in enumerate(rounds):
    for r in answers:
      if used >= extra:
        break
      i = r["index"]
      if i not in latest or degeneracy.check(latest[i], rules) is None:
        raise ValueError(f"re-queried trace of prompt {i} (round {k + 1}) answers no flagged "
                         "trace: the resample rounds were made with other rules or other "
                         "traces; rerun the sample stage for this config.")
      latest[i] = r
      used += 1
  reasons = [degeneracy.check(latest[i], rules) for i in order]
  kept = [latest[i] for i, why in zip(order, reasons) if why is None]
  stats = dict(budget=float(budget), served=n, flagged=len(flagged_first), requeried=used,
               queries=(n + used) / max(n, 1), kept=len(kept),
               still_script=reasons.count("script"), still_repeat=reasons.count("repeat"),
               replaced_kept=sum(1 for i, why in zip(order, reasons)
                                 if why is None and i in flagged_first))
  logging.info("resampling attacker: %s", stats)
  return kept, stats


def draw(clean: Sequence[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
  """n rows drawn without replacement from clean (seeded), in their original order."""
  if n > len(clean):
    raise ValueError(f"the attacker wants {n} clean traces but the clean set has {len(clean)}: "
                     "lower attacks.clean_mix.rows / attacks.reaimed.clean_rows or sample more "
                     "clean traces.")
  pick = np.random.default_rng(seed).choice(len(clean), n, replace=False)
  return [clean[i] for i in sorted(pick)]


def clean_mix(rows: Sequence[dict[str, Any]], clean: Sequence[dict[str, Any]], n: int,
              seed: int = 0) -> list[dict[str, Any]]:
  """rows followed by n rows drawn from clean (draw)."""
  return list(rows) + draw(clean, n, seed)


@functools.partial(jax.jit, static_argnames="graphdef")
def _scores(graphdef, params, tangent, ids_BT, pad_BT, loss_BT):
  """[B]: d/de of each row's summed completion log-likelihood at params + e * tangent."""
  def loglik(p):
    nll_BT, mask_BT = gradients.token_nll(nnx.merge(graphdef, p), ids_BT, pad_BT, loss_BT)
    return -jnp.sum(nll_BT * mask_BT, axis=1)
  return jax.jvp(loglik, (params,), (tangent,))[1]


def trace_scores(model: Transformer, grad, examples: Sequence[TokenPair], *,
                 micro_batch_size: int = 64, length_multiple: int = 32, pad_id: int = 0,
                 mesh: Mesh | None = None) -> np.ndarray:
  """score [len(examples)]: <grad, grad_theta log p(completion | prompt; theta)> per example,
  exact (a JVP in fp32; grad shaped like the model's nnx.Param state, as proxy_gradient's)."""
  graphdef, params = gradients.fp32_split(model)
  gradients.check_compatible(model, grad)
  tangent = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, params)
  rows = parallel.round_rows(micro_batch_size, mesh)
  out = np.zeros(len(examples), np.float64)
  for start in range(0, len(examples), rows):
    batch = examples[start:start + rows]
    longest = max(len(p) + len(c) for p, c in batch)
    arrays = gradients.pack_examples(batch, rows, -(-longest // length_multiple) *
                                     length_multiple, pad_id)
    placed = parallel.shard_batch([jnp.asarray(a) for a in arrays], mesh)
    out[start:start + len(batch)] = np.asarray(parallel.to_host(
        _scores(graphdef, params, tangent, *placed)))[:len(batch)]
  return out


def reaimed_selector(clean: Sequence[TokenPair], train: Sequence[TokenPair], *,
                     drop_fraction: float, micro_batch_size: int = 64, pad_id: int = 0,
                     mesh: Mesh | None = None, log: list | None = None
                     ) -> Callable[[Transformer, int], np.ndarray]:
  """select(student, epoch) -> keep mask [len(train)] for distill.distill: recomputes g_s (the
  student's completion NLL on `clean`, at its current weights) and drops the drop_fraction of
  `train` with the highest score under it. Appends each epoch's statistics to `log`."""
  if not 0.0 <= drop_fraction < 1.0:
    raise ValueError(f"drop_fraction={drop_fraction} must be in [0, 1).")
  if not clean:
    raise ValueError("the re-aimed attacker needs some clean traces for its gradient.")

  def select(student: Transformer, epoch: int) -> np.ndarray:
    g, meta = gradients.proxy_gradient(student, clean, micro_batch_size=micro_batch_size,
                                       pad_id=pad_id, mesh=mesh)
    scores = trace_scores(student, g, train, micro_batch_size=micro_batch_size, pad_id=pad_id,
                          mesh=mesh)
    n_drop = int(round(drop_fraction * len(train)))
    keep = np.ones(len(train), bool)
    if n_drop:
      keep[np.argsort(-scores, kind="stable")[:n_drop]] = False
    stats = dict(epoch=epoch, clean_loss=float(meta["mean_loss"]), dropped=int(n_drop),
                 score_mean=float(scores.mean()), score_kept_mean=float(scores[keep].mean()),
                 score_dropped_mean=float(scores[~keep].mean()) if n_drop else None)
    logging.info("re-aimed attacker, epoch %d: %s", epoch, stats)
    if log is not None:
      log.append(stats)
    return keep

  return select


def top_fifth_mass(w: np.ndarray) -> float:
  """The share of the weight held by the most-weighted fifth of the examples (at least one)."""
  top = np.sort(w)[::-1][:max(1, len(w) // 5)]
  return float(top.sum() / w.sum())


def _exp_weights(z: np.ndarray) -> np.ndarray:
  """exp(z) normalised to mean 1, computed without overflow."""
  w = np.exp(z - z.max())
  return w / w.mean()


def beta_for_mass(a: np.ndarray, mass: float, sign: float = 1.0) -> float:
  """The beta (of `sign`) at which weights exp(beta * a) give the most-weighted fifth the
  share `mass` of the weight (top_fifth_mass). The share grows with |beta| (the fifth is the
  fifth of largest sign * a, and d log share / d|beta| = its mean minus the weighted mean),
  from k/n at beta 0 (k = the fifth's size) towards 1; bisection to 1e-6 of the share.
  ValueError where it cannot be reached (scores all equal, or mass below k/n)."""
  a = np.asarray(a, np.float64) * np.sign(sign)
  share = lambda b: top_fifth_mass(_exp_weights(b * a))
  floor = share(0.0)
  if mass < floor - 1e-12:
    raise ValueError(f"top-fifth mass {mass:g} is below {floor:.4f}, every weight 1's.")
  if mass <= floor + 1e-12:
    return 0.0
  sd = float(a.std())
  if sd == 0:
    raise ValueError("every trace has the same score: no beta concentrates the weights.")
  lo, hi = 0.0, 1.0 / sd
  while share(hi) < mass:
    lo, hi = hi, 2 * hi
    if hi > 1e6 / sd:
      raise ValueError(f"top-fifth mass {mass:g} is out of reach: the largest-scored fifth's "
                       "scores tie with the rest's.")
  while hi - lo > 1e-9 * hi:
    mid = (lo + hi) / 2
    if share(mid) < mass:
      lo = mid
    else:
      hi = mid
    if abs(share(hi) - mass) < 1e-6:
      break
  return float(np.sign(sign) * hi)


def trace_weights(student: Transformer, clean: Sequence[TokenPair], train: Sequence[TokenPair], *,
                  beta: float, clip: float = 10.0, top20_mass: float | None = None,
                  micro_batch_size: int = 64, pad_id: int = 0,
                  mesh: Mesh | None = None) -> tuple[np.ndarray, dict]:
  """(weights [len(train)], statistics): the adaptive student's loss weights, fixed before
  training.

  g_s = grad of the student's mean completion NLL on `clean` (gradients.proxy_gradient: the
  mean over traces of each one's per-token mean; the reference code averages over a batch's
  tokens); a_i = -<g_s, grad l_i> with l_i the trace's per-token mean NLL, which is the
  reference's central difference [l_i(theta - e g_s) - l_i(theta + e g_s)] / 2e at e -> 0,
  computed exactly (trace_scores / the trace's completion length); w_i = exp(beta *
  clip(a_i, -clip, clip)), normalised to mean 1. Signs as in the reference: a gradient step on
  trace i moves the clean loss by about lr * a_i, so beta > 0 (the reference's 0.5) weights up
  the traces that would raise it, beta < 0 those that would lower it, and beta = 0 is passive
  SFT (every weight exactly 1). top20_mass (reweight_mass): |beta| is chosen on these scores so
  that the most-weighted fifth holds that share of the weight (beta_for_mass; `beta` gives
  only the sign) and nothing is clipped."""
  g, meta = gradients.proxy_gradient(student, clean, micro_batch_size=micro_batch_size,
                                     pad_id=pad_id, mesh=mesh)
  lengths = np.array([len(c) for _, c in train], np.float64)
  a = trace_scores(student, g, train, micro_batch_size=micro_batch_size, pad_id=pad_id,
                   mesh=mesh) / np.maximum(lengths, 1.0)
  if top20_mass is None:  # the reference's rule, as it computes it
    w = np.exp(beta * np.clip(a, -clip, clip))
    w = w / w.mean()
  else:
    beta, clip = beta_for_mass(a, top20_mass, sign=beta), math.inf
    w = _exp_weights(beta * a)
  stats = dict(clean_loss=float(meta["mean_loss"]), beta=float(beta), a_mean=float(a.mean()),
               a_sd=float(a.std()), clipped=int(np.sum(np.abs(a) > clip)),
               weight_max=float(w.max()), weight_min=float(w.min()), top20_mass=top_fifth_mass(w))
  logging.info("reweighting attacker: %s", stats)
  return w.astype(np.float32), stats
