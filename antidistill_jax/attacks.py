"""Attackers: what a distiller can do with the traces it was served before or while training.

Each attacker sees the same served trace set and changes only what the student trains on:

  keep_correct  drops the traces whose final answer is wrong (the attacker can grade them);
  clean_mix     adds a few clean (plain-sampled) traces to the served ones;
  reaimed       trains on the served traces, but at the start of every epoch recomputes its own
                gradient g_s (the student's completion NLL on a few clean traces, at its current
                weights) and skips, for that epoch, the traces whose score under g_s is highest.

The re-aimed score of a trace x is the directional derivative of its log-likelihood along g_s,
  score(x) = d/de sum_t log p(x_t | x_<t; theta_s + e g_s) = <g_s, grad log p(x; theta_s)>,
computed exactly with one JVP. A gradient step on x moves the clean loss by about
lr * score(x), so high-score traces are the ones that would raise the student's clean loss:
antidistillation's own criterion, turned around with the student's gradient in place of the
proxy's. Nothing is resampled.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import gradients, parallel
from antidistill_jax.gradients import TokenPair
from antidistill_jax.models import Transformer

NAMES = ("keep_correct", "clean_mix", "reaimed")
NEEDS_CLEAN = ("clean_mix", "reaimed")  # attackers that read a clean (plain-sampled) trace set


def settings(name: str, config) -> dict:
  """The attacker's settings from config.attacks: what its student depends on besides the
  served traces (and, for NEEDS_CLEAN, the clean trace set)."""
  if name not in NAMES:
    raise ValueError(f"unknown attack {name!r}; expected one of {NAMES}.")
  if name == "keep_correct":
    return dict(name=name)
  if name == "clean_mix":
    return dict(name=name, rows=int(config.clean_mix.rows), seed=int(config.seed))
  return dict(name=name, rows=int(config.reaimed.clean_rows),
              drop_fraction=float(config.reaimed.drop_fraction),
              micro_batch=int(config.reaimed.micro_batch_size), seed=int(config.seed))


def prepare(attack: dict, rows: Sequence[dict[str, Any]], clean: Sequence[dict[str, Any]] | None,
            to_examples: Callable[[Sequence[dict]], list[TokenPair]], *, pad_id: int = 0,
            mesh: Mesh | None = None, log: list | None = None
            ) -> tuple[list[TokenPair], Callable | None] | None:
  """The one call the distill stage makes: (training examples, per-epoch select or None) for
  the student of `attack` (settings()) on the served trace `rows`, or None when the attacker
  leaves nothing to train on. `clean`: the clean trace rows, for NEEDS_CLEAN attackers."""
  name = attack["name"]
  if name == "keep_correct":
    rows = keep_correct(rows)
    return (to_examples(rows), None) if rows else None
  if clean is None:
    raise ValueError(f"attack {name} needs a clean trace set.")
  if name == "clean_mix":
    return to_examples(clean_mix(rows, clean, attack["rows"], attack["seed"])), None
  train = to_examples(rows)
  select = reaimed_selector(to_examples(draw(clean, attack["rows"], attack["seed"])), train,
                            drop_fraction=attack["drop_fraction"],
                            micro_batch_size=attack["micro_batch"], pad_id=pad_id, mesh=mesh,
                            log=log)
  return train, select


def keep_correct(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The trace rows whose answer the grader marked correct."""
  missing = [i for i, r in enumerate(rows) if "correct" not in r]
  if missing:
    raise ValueError(f"trace rows {missing[:5]} have no 'correct' field: keep_correct needs "
                     "graded traces (traces.generate_traces grades them).")
  return [r for r in rows if r["correct"]]


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
