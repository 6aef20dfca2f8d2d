"""Continuous batching: B slots decode a queue of Q prompts; a slot whose prompt has finished
takes the next prompt, prefilled into that slot's cache rows, while the other slots go on.

A static batch decodes until its longest row ends; traces of uneven length (clean GSM8K traces
average ~470 tokens under a 1,024 cap, degenerate ones run to it) leave most slots idle for the
tail. Here the queue moves through the slots instead:

  prefill the first B prompts (as a static batch would), caches get per-row cursors
  while prompts remain or a slot is busy:
    refill: while a slot is free and prompts remain, prefill the next R prompts
            (`Transformer.refill`, teacher and proxy side) into the first R free slots
    decode `chunk` steps (lax.scan of `decode.advance`, the static program's step)

all inside one jitted while-loop: the shapes never change as slots turn over, so nothing
recompiles. A slot freed mid-chunk waits for the chunk's end (at most chunk - 1 idle steps).

Token identity. Prompt q draws its step-t token with fold_in(key_q, t), as in a static batch,
and its cache row holds its own prompt and tokens only (per-row positions and masks), so its
trace does not depend on which slot it lands in or who shares the batch: the tokens equal
static batching's at the same padded prompt length and cache length, and the teacher log-probs
agree to float32 rounding (a prompt may be prefilled in a batch of another size, which moves the
last bits of a matmul; tests/test_continuous.py, tests/test_pipeline.py).

The host drives the program in segments of `segment` chunks (the carry stays on device between
them) to log progress and rates; the segment count does not change the tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from antidistill_jax.sampling.decode import (DecodeState, Knobs, _Models, _Static, advance,
                                             eos_array)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Queue:
  """The prompts of one call, on device: `count` real prompts, then dummy rows (at least the
  slots, and R more, so that the first fill and a refill's slice of R rows stay inside)."""
  ids_QP: jax.Array  # int32, LEFT-padded
  mask_QP: jax.Array  # int32
  keys_Q: jax.Array  # per-prompt random keys
  budget_Q: jax.Array  # int32: each prompt's cap on new tokens (also capped by knobs.limit)
  count: jax.Array  # int32 []: real prompts (Q without the dummy rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
  """The carry of the continuous program between chunks."""
  decode: DecodeState  # done_B: the slot's prompt has finished (or the slot has none)
  prompt_B: jax.Array  # int32: the prompt a slot serves (-1: none yet or none left)
  step_B: jax.Array  # int32: tokens the slot's prompt has generated
  next_prompt: jax.Array  # int32 []: the first prompt not yet given a slot
  tokens_QL: jax.Array  # int32 generated ids (pad after the end)
  logp_QL: jax.Array  # f32 teacher log-probs (0 after the end)
  length_Q: jax.Array  # int32 tokens generated
  eos_Q: jax.Array  # bool: ended with an EOS id
  steps: jax.Array  # int32 []: decode steps run


def _first_fill(models: _Models, queue: Queue, slots: int, s: _Static) -> Slots:
  """The first `slots` prompts prefilled as one static batch; caches with per-row cursors."""
  p = queue.ids_QP.shape[1]
  max_len = p + s.num_steps
  ids_BP, mask_BP = queue.ids_QP[:slots], queue.mask_QP[:slots]
  teacher_logits_BV, teacher_cache = models.teacher.prefill(ids_BP, mask_BP, max_len)
  delta_BW = proxy_cache = None
  if models.proxies is not None:
    delta_BW, proxy_cache = models.proxies.prefill(models.proxy_state, ids_BP, mask_BP, max_len)
    proxy_cache = models.proxies.with_row_cursors(proxy_cache)
  prompt_B = jnp.arange(slots, dtype=jnp.int32)
  prompt_B = jnp.where(prompt_B < queue.count, prompt_B, -1)
  q, n = queue.ids_QP.shape[0], s.num_steps
  st = DecodeState(teacher_logits_BV, delta_BW, teacher_cache.with_row_cursors(), proxy_cache,
                   (prompt_B < 0) | (queue.budget_Q[:slots] <= 0), jnp.array(-1, jnp.int32))
  return Slots(st, prompt_B, jnp.zeros((slots,), jnp.int32),
               jnp.minimum(queue.count, slots).astype(jnp.int32),
               jnp.full((q, n), s.pad_id, jnp.int32), jnp.zeros((q, n), jnp.float32),
               jnp.zeros((q,), jnp.int32), jnp.zeros((q,), bool), jnp.zeros((), jnp.int32))


def _free(sl: Slots) -> jax.Array:
  return sl.decode.done_B


def _refill(models: _Models, queue: Queue, sl: Slots, refill_rows: int) -> Slots:
  """The next `refill_rows` prompts (fewer where fewer remain or fewer slots are free) into the
  first free slots, in slot order."""
  b = sl.prompt_B.shape[0]
  free_B = _free(sl)
  rank_B = jnp.cumsum(free_B) - 1  # among the free slots
  n = jnp.minimum(jnp.minimum(refill_rows, queue.count - sl.next_prompt), jnp.sum(free_B))
  r_R = jnp.arange(refill_rows, dtype=jnp.int32)
  is_slot_RB = free_B[None, :] & (rank_B[None, :] == r_R[:, None])
  rows_R = jnp.where(r_R < n, jnp.argmax(is_slot_RB, axis=1), b).astype(jnp.int32)  # b: dropped
  start = (sl.next_prompt, jnp.zeros((), jnp.int32))
  ids_RP = jax.lax.dynamic_slice(queue.ids_QP, start, (refill_rows, queue.ids_QP.shape[1]))
  mask_RP = jax.lax.dynamic_slice(queue.mask_QP, start, (refill_rows, queue.ids_QP.shape[1]))
  budget_R = jax.lax.dynamic_slice(queue.budget_Q, start[:1], (refill_rows,))
  st = sl.decode
  teacher_logits_RV, teacher_cache = models.teacher.refill(st.teacher_cache, rows_R, ids_RP,
                                                           mask_RP)
  teacher_logits_BV = st.teacher_logits_BV.at[rows_R].set(teacher_logits_RV, mode="drop")
  delta_BW, proxy_cache = st.delta_BW, st.proxy_cache
  if models.proxies is not None:
    delta_RW, proxy_cache = models.proxies.refill(models.proxy_state, proxy_cache, rows_R, ids_RP,
                                                  mask_RP)
    delta_BW = delta_BW.at[rows_R].set(delta_RW, mode="drop")
  st = DecodeState(teacher_logits_BV, delta_BW, teacher_cache, proxy_cache,
                   st.done_B.at[rows_R].set(budget_R <= 0, mode="drop"), st.first_bad)
  return dataclasses.replace(
      sl, decode=st, prompt_B=sl.prompt_B.at[rows_R].set(sl.next_prompt + r_R, mode="drop"),
      step_B=sl.step_B.at[rows_R].set(0, mode="drop"), next_prompt=sl.next_prompt + n)


def _chunk(models: _Models, queue: Queue, sl: Slots, knobs: Knobs, s: _Static) -> Slots:
  """`s.chunk` decode steps of every slot; finished prompts' outputs are written."""
  eos = eos_array(s)
  q = queue.keys_Q.shape[0]

  def step(sl: Slots, _):
    stopped_B = sl.decode.done_B
    prompt_B = jnp.maximum(sl.prompt_B, 0)
    keys_B = jax.vmap(jax.random.fold_in)(queue.keys_Q[prompt_B], sl.step_B)
    st, token_B, logp_B = advance(models, sl.decode, keys_B, stopped_B, sl.steps, knobs, s)
    out_B = jnp.where(stopped_B, q, prompt_B)  # q: dropped
    eos_B = ~stopped_B & jnp.isin(token_B, eos)
    step_B = sl.step_B + ~stopped_B
    done_B = stopped_B | eos_B | (step_B >= jnp.minimum(queue.budget_Q[prompt_B], knobs.limit))
    return dataclasses.replace(
        sl, decode=dataclasses.replace(st, done_B=done_B), step_B=step_B,
        tokens_QL=sl.tokens_QL.at[out_B, sl.step_B].set(token_B, mode="drop"),
        logp_QL=sl.logp_QL.at[out_B, sl.step_B].set(logp_B, mode="drop"),
        length_Q=sl.length_Q.at[out_B].set(step_B, mode="drop"),
        eos_Q=sl.eos_Q.at[out_B].set(eos_B, mode="drop"), steps=sl.steps + 1), None

  return jax.lax.scan(step, sl, None, length=s.chunk)[0]


def _busy(queue: Queue, sl: Slots) -> jax.Array:
  return (sl.next_prompt < queue.count) | ~jnp.all(_free(sl))


@functools.partial(jax.jit, static_argnames=("teacher_def", "proxy_def", "slots", "s"))
def start_program(teacher_def, teacher_state, proxy_def, proxy_state, queue: Queue, *,
                  slots: int, s: _Static) -> Slots:
  """The first `slots` prompts prefilled: the carry of `run_program`."""
  models = _Models.merge(teacher_def, teacher_state, proxy_def, proxy_state, s)
  return _first_fill(models, queue, slots, s)


@functools.partial(jax.jit, static_argnames=("teacher_def", "proxy_def", "refill_rows", "s"),
                   donate_argnames="sl")
def run_program(teacher_def, teacher_state, proxy_def, proxy_state, queue: Queue, sl: Slots,
                knobs: Knobs, max_chunks: jax.Array, *, refill_rows: int, s: _Static) -> Slots:
  """Up to max_chunks rounds of (refill the free slots, decode one chunk), fewer once the queue
  is empty and every slot is done. The carry is donated: its caches are updated in place."""
  models = _Models.merge(teacher_def, teacher_state, proxy_def, proxy_state, s)

  def refill_more(sl):
    return (sl.next_prompt < queue.count) & jnp.any(_free(sl))

  def round_(loop):
    c, sl = loop
    sl = jax.lax.while_loop(refill_more, lambda sl: _refill(models, queue, sl, refill_rows), sl)
    return c + 1, _chunk(models, queue, sl, knobs, s)

  def more(loop):
    c, sl = loop
    return (c < max_chunks) & _busy(queue, sl)

  return jax.lax.while_loop(more, round_, (jnp.zeros((), jnp.int32), sl))[1]


@jax.jit
def busy_flag(queue: Queue, sl: Slots) -> jax.Array:
  """Whether the program has work left (read by the host between segments)."""
  return _busy(queue, sl)
