"""The answer-aligned g: the proxy's gradient on the answer tokens of its traces only.

Standard g is the gradient of the proxy's NLL on whole traces, so Delta aims at how traces are
written as much as at what they conclude. The answer-aligned g keeps the trace as context and
takes the loss on the final answer only:

  examples  (prompt + the trace up to its answer, the answer's tokens), per trace
  g_answer  = grad of the proxy's mean NLL on those answer tokens (gradients.proxy_gradient)
  g_aligned = g_answer * |g| / |g_answer|   (standard g's global norm: a lam means as much)

The answer starts where `grading.answer_start` says (the synthetic task: its last "#";
boxed-answer tasks: the last \\boxed; otherwise a "####" line); traces without one are left out
and counted.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from antidistill_jax import gradients, grading
from antidistill_jax.gradients import TokenPair


def answer_token(tokenizer, ids: Sequence[int], start: int) -> int:
  """The index of the token of `ids` that holds character `start` of their decoded text: the
  fewest leading tokens whose text is longer than `start`, minus one (binary search; decoding
  a prefix never gets shorter as tokens are added)."""
  lo, hi = 1, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    if len(tokenizer.decode(list(ids[:mid]), skip_special_tokens=True)) > start:
      hi = mid
    else:
      lo = mid + 1
  return lo - 1


def answer_examples(tokenizer, rows: Sequence[dict[str, Any]], dataset: str
                    ) -> tuple[list[TokenPair], int]:
  """((prompt + reasoning ids, answer ids) per trace with an answer, traces left out)."""
  out, missing = [], 0
  for row in rows:
    ids = list(row["completion_ids"])
    start = grading.answer_start(dataset, row["completion"])
    if start is None or not ids:
      missing += 1
      continue
    k = answer_token(tokenizer, ids, start)
    out.append((list(row["prompt_ids"]) + ids[:k], ids[k:]))
  return out, missing


def aligned_gradient(proxy, tokenizer, rows: Sequence[dict[str, Any]], dataset: str, norm: float,
                     **kwargs) -> tuple[Any, dict]:
  """(g_aligned, metadata): the proxy's gradient on the answers of `rows`, rescaled to global
  norm `norm` (standard g's). kwargs go to gradients.proxy_gradient."""
  examples, missing = answer_examples(tokenizer, rows, dataset)
  if not examples:
    raise ValueError(f"none of the {len(rows)} traces has a final answer "
                     f"(grading.answer_start, dataset {dataset!r}): no answer-aligned g.")
  g, meta = gradients.proxy_gradient(proxy, examples, **kwargs)
  scale = float(norm) / max(float(meta["global_norm"]), 1e-30)
  g = jax.tree.map(lambda x: x * scale, g)
  meta = dict(meta, answer_norm=meta["global_norm"], global_norm=float(norm), scale=scale,
              without_answer=missing,
              answer_tokens=sum(len(a) for _, a in examples) / len(examples))
  return g, meta
