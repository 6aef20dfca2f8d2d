"""The decode program: one jitted function per shape that prefills the teacher (and the proxy)
on left-padded prompts, then decodes with a `lax.scan` whose step samples from the teacher's
logits adjusted by lam * Delta (`adjustment`).

Compilation. tau, lam, eps, top_p and where Delta applies are traced values (`Knobs`): one
compiled program serves a whole sweep for a given (batch, prompt bucket, max_new_tokens,
method, placement, filter kind, greedy or not, proxy or not) (`_Static`). lam = 0 compiles the
plain teacher program, with no proxy work.

The loop is a `lax.while_loop` over chunks of `_Static.chunk` steps, each a `lax.scan`, so a
batch stops after the chunk in which all its rows finished. Its carry (`DecodeState`) holds
next-token logits [B, V], never [B, T, V]; its outputs (`DecodeOutputs`) are per-step token
ids and log-probs [L, B].

Randomness is per prompt: row r at step t draws with fold_in(row_key_r, t), where the Sampler
makes row_key_r = fold_in(key(seed), r) from the global prompt index r.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from antidistill_jax.models.cache import KVCache
from antidistill_jax.sampling import draw
from antidistill_jax.sampling.adjustment import _pad_delta, _Proxies, adjusted_logits


@dataclasses.dataclass(frozen=True)
class _Static:
  """What a compiled decode program depends on (hashable: a jit static argument)."""
  num_steps: int  # max_new_tokens rounded up to whole chunks
  chunk: int
  greedy: bool
  top_k: int | None
  top_p: bool  # whether the nucleus filter runs (its value is traced)
  uses_proxy: bool
  method: str
  placement: str
  fd_stacked: bool
  jvp_stacked: bool
  eos_ids: tuple[int, ...]
  pad_id: int
  vocab_size: int  # ids >= vocab_size are never sampled


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Knobs:
  """The traced settings of a decode program: a sweep changes these without recompiling."""
  tau: jax.Array  # f32 []
  lam: jax.Array  # f32 []
  top_p: jax.Array  # f32 []; 1.0 keeps everything
  nucleus: jax.Array  # bool []: top-k/top-p choose the support on the teacher's own logits,
  #                     and lam * Delta reweights inside it (SamplingParams.delta_on)
  limit: jax.Array  # i32 []: decode steps of this batch (<= num_steps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """The carry of the decode scan: next-token inputs, caches and per-row flags."""
  teacher_logits_BV: jax.Array  # teacher logits for the next token (fp32)
  delta_BW: jax.Array | None  # Delta on the proxy's rows (None without a proxy)
  teacher_cache: KVCache
  proxy_cache: Any  # fd: the perturbed copies' caches; jvp: (cache, (dk, dv)); None without proxy
  done_B: jax.Array  # bool: the row has emitted an EOS
  first_bad: jax.Array  # i32 []: first step with non-finite sampling logits, -1 if none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutputs:
  """Per-step outputs, [L, B] each, L = num_steps (steps never run: pad, 0, True)."""
  tokens_LB: jax.Array
  logp_LB: jax.Array  # teacher log-prob of the token, temperature 1, unperturbed
  stopped_LB: jax.Array  # row had finished (EOS or limit) before this step


def sample_tokens(keys_B, logits_BV, knobs: Knobs, s: _Static, support_BV=None) -> jax.Array:
  """One token per row from logits_BV after top-k/top-p. support_BV (default logits_BV): the
  logits whose top-k/top-p set is kept; logits_BV's values are sampled inside it. The token is
  drawn first and only its membership checked (`draw`): the tokens of
  jax.random.categorical(key, logits_BV masked to the kept set)."""
  if s.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  top_p = knobs.top_p if s.top_p else None
  return draw.filtered_categorical(keys_B, logits_BV, support_BV, s.top_k, top_p)


@dataclasses.dataclass(frozen=True)
class _Models:
  """The teacher and the proxy side inside a decode program."""
  teacher: Any  # Transformer
  proxies: _Proxies | None
  proxy_state: Any

  @classmethod
  def merge(cls, teacher_def, teacher_state, proxy_def, proxy_state, s: _Static) -> "_Models":
    proxies = (_Proxies(proxy_def, s.method, s.fd_stacked, s.jvp_stacked) if s.uses_proxy
               else None)
    return cls(nnx.merge(teacher_def, teacher_state), proxies, proxy_state)


def eos_array(s: _Static) -> jax.Array:
  return jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)


def advance(models: _Models, st: DecodeState, keys_B, stopped_B, t, knobs: Knobs,
            s: _Static) -> tuple[DecodeState, jax.Array, jax.Array]:
  """One decode step of every row: samples a token from the adjusted logits (`pad_id` where
  stopped_B), takes its teacher log-prob (0 where stopped) and feeds it to the teacher and the
  proxy side. keys_B: this step's key of each row; t: the step index first_bad records.
  Returns the state (done_B unchanged), token_B and logp_B."""
  vocab = st.teacher_logits_BV.shape[-1]
  valid_V = jnp.arange(vocab) < s.vocab_size
  delta_BV = None if st.delta_BW is None else _pad_delta(st.delta_BW, vocab)
  logits_BV = adjusted_logits(st.teacher_logits_BV, delta_BV, lam=knobs.lam, tau=knobs.tau,
                              placement=s.placement, greedy=s.greedy, vocab_size=s.vocab_size)
  bad = jnp.any(~jnp.isfinite(logits_BV) & valid_V & ~stopped_B[:, None])
  first_bad = jnp.where((st.first_bad < 0) & bad, t, st.first_bad)
  if models.proxies is not None and not s.greedy and (s.top_k is not None or s.top_p):
    # delta_on="nucleus": the support is the teacher's own (lam = 0) top-k/top-p set.
    plain = lambda: adjusted_logits(st.teacher_logits_BV, None, lam=0.0, tau=knobs.tau,
                                    placement=s.placement, greedy=False,
                                    vocab_size=s.vocab_size)
    token_B = jax.lax.cond(knobs.nucleus,
                           lambda: sample_tokens(keys_B, logits_BV, knobs, s, plain()),
                           lambda: sample_tokens(keys_B, logits_BV, knobs, s))
  else:
    token_B = sample_tokens(keys_B, logits_BV, knobs, s)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(st.teacher_logits_BV.astype(jnp.float32)),
                               token_B[:, None], axis=-1)[:, 0]
  token_B = jnp.where(stopped_B, s.pad_id, token_B)
  logp_B = jnp.where(stopped_B, 0.0, logp_B)
  teacher_logits_BV, teacher_cache = models.teacher.decode(token_B, st.teacher_cache)
  delta_BW, proxy_cache = st.delta_BW, st.proxy_cache
  if models.proxies is not None:
    delta_BW, proxy_cache = models.proxies.decode(models.proxy_state, token_B, proxy_cache)
  return (DecodeState(teacher_logits_BV, delta_BW, teacher_cache, proxy_cache, st.done_B,
                      first_bad), token_B, logp_B)


@functools.partial(jax.jit, static_argnames=("teacher_def", "proxy_def", "s"))
def _decode_program(teacher_def, teacher_state, proxy_def, proxy_state, ids_BP, mask_BP,
                    row_keys_B, knobs: Knobs, budget_B, *, s: _Static):
  """Prefill, then a while_loop over chunks of `s.chunk` decode steps, each a lax.scan; the loop
  ends once every row has finished, at an EOS or after min(knobs.limit, budget_B) steps (int32
  [B]: each row's own cap). Returns the DecodeOutputs, the final done flags [B] (EOS), the
  first step with non-finite adjusted logits (-1 if none) and the number of steps run."""
  b, p = ids_BP.shape
  max_len = p + s.num_steps
  models = _Models.merge(teacher_def, teacher_state, proxy_def, proxy_state, s)
  teacher_logits_BV, teacher_cache = models.teacher.prefill(ids_BP, mask_BP, max_len)
  delta_BW = proxy_cache = None
  if models.proxies is not None:
    delta_BW, proxy_cache = models.proxies.prefill(proxy_state, ids_BP, mask_BP, max_len)
  eos = eos_array(s)
  limit_B = jnp.minimum(budget_B, knobs.limit)

  def step(st: DecodeState, t):
    stopped_B = st.done_B | (t >= limit_B)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
    st, token_B, logp_B = advance(models, st, keys_B, stopped_B, t, knobs, s)
    done_B = st.done_B | (~stopped_B & jnp.isin(token_B, eos))
    return dataclasses.replace(st, done_B=done_B), (token_B, logp_B, stopped_B)

  def run_chunk(loop):
    c, st, outs = loop
    first = c * s.chunk
    st, (tokens_CB, logp_CB, stopped_CB) = jax.lax.scan(
        step, st, first + jnp.arange(s.chunk, dtype=jnp.int32))
    at = (first, jnp.zeros((), jnp.int32))
    outs = DecodeOutputs(jax.lax.dynamic_update_slice(outs.tokens_LB, tokens_CB, at),
                         jax.lax.dynamic_update_slice(outs.logp_LB, logp_CB, at),
                         jax.lax.dynamic_update_slice(outs.stopped_LB, stopped_CB, at))
    return c + 1, st, outs

  def more(loop):
    c, st, _ = loop
    return ~jnp.all(st.done_B | (c * s.chunk >= limit_B))

  n = s.num_steps
  st = DecodeState(teacher_logits_BV, delta_BW, teacher_cache, proxy_cache,
                   jnp.zeros((b,), bool), jnp.array(-1, jnp.int32))
  outs = DecodeOutputs(jnp.full((n, b), s.pad_id, jnp.int32), jnp.zeros((n, b), jnp.float32),
                       jnp.ones((n, b), bool))
  c, st, outs = jax.lax.while_loop(more, run_chunk, (jnp.zeros((), jnp.int32), st, outs))
  return outs, st.done_B, st.first_bad, jnp.minimum(c * s.chunk, jnp.max(limit_B))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads ragged id lists to [rows, length]; extra rows repeat the first prompt."""
  length = length or max(len(p) for p in prompts)
  rows = rows or len(prompts)
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for i in range(rows):
    p = prompts[i] if i < len(prompts) else prompts[0]
    ids[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return ids, mask
