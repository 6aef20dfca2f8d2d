"""Antidistillation sampling: one jitted program per batch shape that prefills the teacher (and
the proxies), then decodes with a `lax.scan` whose step adds lam * Delta to the teacher.

Delta(v | x) is the directional derivative of the proxy's log p(v | x) along the gradient g of
the proxy's distillation loss (see `gradients`):
  method="fd":  [log p(v | x; theta + eps g) - log p(v | x; theta - eps g)] / (2 eps), two proxy
                copies formed once, each with its own KV cache;
  method="jvp": the exact jax.jvp of the cached proxy step, carrying the tangent of the cache.

Next-token distribution (log p_T = teacher log-probs, z_T = teacher logits):
  placement="paper":     softmax(log p_T / tau + lam * Delta)          (the paper's Algorithm 1)
  placement="reference": softmax((z_T + lam * Delta) / tau)            (the authors' code;
                         lam_reference = tau * lam_paper)
then top-k / top-p on those logits; tau=0 is greedy on log p_T + lam * Delta. Delta is defined
on the vocabulary both models have (`tokenizer.shared_vocab_size`); the teacher's extra rows
are never sampled when a proxy is used.

Randomness is per prompt: row r at step t draws with fold_in(fold_in(key(seed), r), t), so a
prompt's sample does not depend on the batch it is in, the batch size, or the device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import gradients, parallel
from antidistill_jax.models.transformer import Transformer
from antidistill_jax.tokenizer import shared_vocab_size

METHODS = ("fd", "jvp")
PLACEMENTS = ("paper", "reference")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Static settings of one compiled decode program (hashable: a jit static argument)."""
  max_new_tokens: int
  tau: float = 1.0
  top_p: float | None = None
  top_k: int | None = None
  lam: float = 0.0
  eps: float = 1e-2
  method: str = "fd"
  placement: str = "paper"
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  vocab_size: int | None = None  # ids >= vocab_size are never sampled (None: all rows)
  fd_stacked: bool = True  # fd: one vmapped call over stacked (theta+, theta-), else two calls
  scan_chunk: int = 32  # decode steps per lax.scan; generation stops after the chunk in which
                        # every row has finished

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; expected one of {METHODS}.")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"placement={self.placement!r}; expected one of {PLACEMENTS}.")
    if self.tau < 0:
      raise ValueError(f"tau={self.tau} must be >= 0 (0 is greedy).")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k} must be >= 1.")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
    if self.scan_chunk < 1:
      raise ValueError(f"scan_chunk={self.scan_chunk} must be >= 1.")

  @property
  def chunk(self) -> int:
    return min(self.scan_chunk, self.max_new_tokens)

  @property
  def num_steps(self) -> int:
    """Steps of the buffers and cache: max_new_tokens rounded up to whole chunks."""
    return -(-self.max_new_tokens // self.chunk) * self.chunk

  @property
  def uses_proxy(self) -> bool:
    return self.lam != 0.0


@dataclasses.dataclass
class Generation:
  """Per prompt: the generated ids (EOS included, padding excluded) and the teacher's log-prob
  (at temperature 1, unperturbed) of each of them."""
  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  finished: np.ndarray  # [num_prompts] bool: ended with an EOS id
  decode_steps: int = 0  # decode steps run, summed over batches (stops early once all finish)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(t) for t in self.tokens], np.int32)


# -- the per-step math ------------------------------------------------------------------------


def adjusted_logits(z_T_BV, delta_BV, s: DecodeSettings) -> jax.Array:
  """Logits of the sampling distribution before top-k/top-p (see module docstring)."""
  z_T_BV = z_T_BV.astype(jnp.float32)
  logp_T_BV = jax.nn.log_softmax(z_T_BV, axis=-1)
  lam_delta = 0.0 if delta_BV is None else s.lam * delta_BV
  if s.tau == 0.0:
    out = logp_T_BV + lam_delta
  elif s.placement == "paper":
    out = logp_T_BV / s.tau + lam_delta
  else:
    out = (z_T_BV + lam_delta) / s.tau
  if s.vocab_size is not None and s.vocab_size < out.shape[-1]:
    out = jnp.where(jnp.arange(out.shape[-1]) < s.vocab_size, out, -jnp.inf)
  return out


def filter_logits(logits_BV, top_k: int | None, top_p: float | None) -> jax.Array:
  """Keeps the top_k largest logits, then the smallest set of tokens whose probability mass
  reaches top_p (the token that crosses the threshold is kept, as in transformers); the rest
  become -inf."""
  if top_k is not None and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p is not None and top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # Number of kept tokens: those whose preceding mass is still below top_p (always >= 1).
    keep_B1 = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, keep_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_tokens(keys_B, logits_BV, s: DecodeSettings) -> jax.Array:
  if s.tau == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, s.top_k, s.top_p)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


# -- proxies --------------------------------------------------------------------------------


def perturbed_states(proxy_state, grad_state, eps: float):
  """theta +- eps * g, formed in fp32 and cast back to each parameter's dtype."""
  def shift(sign):
    return jax.tree.map(
        lambda p, g: (p.astype(jnp.float32) + sign * eps * g.astype(jnp.float32)).astype(p.dtype),
        proxy_state, grad_state)
  return shift(1.0), shift(-1.0)


def _tangent(grad_state, proxy_state):
  """g cast to each parameter's dtype: jax.jvp wants tangents of the primal's dtype."""
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grad_state, proxy_state)


def _fd_delta(z_plus_BV, z_minus_BV, eps):
  # Logit differences: log-prob differences minus a per-row constant, which softmax ignores.
  return (z_plus_BV.astype(jnp.float32) - z_minus_BV.astype(jnp.float32)) / (2.0 * eps)


def _pad_delta(delta_BW, vocab):
  """Delta on the shared vocab W, zero-extended to the teacher's V rows."""
  w = delta_BW.shape[-1]
  if w == vocab:
    return delta_BW
  if w > vocab:
    return delta_BW[:, :vocab]
  return jnp.pad(delta_BW, ((0, 0), (0, vocab - w)))


class _Proxies:
  """Prefill/decode of the proxy side, returning Delta [B, W] at each step.

  fd:  state = (theta+, theta-), stacked on a leading axis of 2 for one vmapped call per step
       (fd_stacked) or a pair for two calls; each copy has its own cache.
  jvp: state = (theta, g); the cache carries its tangent.
  """

  def __init__(self, graphdef, s: DecodeSettings):
    self.graphdef, self.s = graphdef, s

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _fd(self, run, state, *cache):
    """Runs both perturbed copies: returns Delta and their caches."""
    if self.s.fd_stacked:
      z_2BV, cache = jax.vmap(run)(state, *cache)
      return _fd_delta(z_2BV[0], z_2BV[1], self.s.eps), cache
    (z_plus, c_plus), (z_minus, c_minus) = (run(state[i], *(c[i] for c in cache)) for i in (0, 1))
    return _fd_delta(z_plus, z_minus, self.s.eps), (c_plus, c_minus)

  def prefill(self, state, ids_BP, mask_BP, max_len):
    run = lambda st: self._model(st).prefill(ids_BP, mask_BP, max_len)
    if self.s.method == "fd":
      return self._fd(run, state)
    theta, g = state
    (_, cache), (dz_BV, dcache) = jax.jvp(run, (theta,), (g,))
    return dz_BV, (cache, (dcache.k, dcache.v))

  def decode(self, state, token_B, cache):
    if self.s.method == "fd":
      return self._fd(lambda st, c: self._model(st).decode(token_B, c), state, cache)
    theta, g = state
    cache, (dk, dv) = cache

    def run(st, kv):
      k, v = kv
      c = dataclasses.replace(cache, k=k, v=v)
      z_BV, c = self._model(st).decode(token_B, c)
      return z_BV, (c.k, c.v)

    (_, (k, v)), (dz_BV, (dk, dv)) = jax.jvp(run, (theta, (cache.k, cache.v)), (g, (dk, dv)))
    return dz_BV, (dataclasses.replace(cache, k=k, v=v, end=cache.end + 1), (dk, dv))


def delta(proxy: Transformer, grad, input_ids_BT, *, eps: float = 1e-2, method: str = "fd",
          pad_mask_BT=None) -> jax.Array:
  """Delta [B, V] (fp32) at the last position of each row, by a full forward (no cache).

  The analysis entry point: fd gives [log p(.; theta+eps g) - log p(.; theta-eps g)] / 2eps,
  jvp the exact derivative of log p(.; theta) along g. Rows may be left-padded (pad_mask_BT).
  """
  gradients.check_compatible(proxy, grad)
  graphdef, theta = nnx.split(proxy)
  ids = jnp.asarray(input_ids_BT)

  def logp_last(state):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, pad_mask_BT)[:, -1], axis=-1)

  if method == "fd":
    plus, minus = perturbed_states(theta, grad, eps)
    return (logp_last(plus) - logp_last(minus)) / (2.0 * eps)
  if method == "jvp":
    return jax.jvp(logp_last, (theta,), (_tangent(grad, theta),))[1].astype(jnp.float32)
  raise ValueError(f"method={method!r}; expected one of {METHODS}.")


# -- the compiled program ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("teacher_def", "proxy_def", "s"))
def _decode_program(teacher_def, teacher_state, proxy_def, proxy_state, ids_BP, mask_BP,
                    row_keys_B, *, s: DecodeSettings):
  """Prefill, then a while_loop over chunks of `s.chunk` decode steps, each a lax.scan; the loop
  ends once every row has finished (or after max_new_tokens). Returns tokens [N, B], teacher
  log-probs [N, B], was-done-before-step flags [N, B] (True for steps never run), done [B], the
  first step with non-finite adjusted logits (-1 if none) and the number of steps run."""
  b, p = ids_BP.shape
  n, chunk = s.num_steps, s.chunk
  max_len = p + n
  teacher = nnx.merge(teacher_def, teacher_state)
  z_T_BV, cache_T = teacher.prefill(ids_BP, mask_BP, max_len)
  vocab = z_T_BV.shape[-1]
  proxies = _Proxies(proxy_def, s) if s.uses_proxy else None
  if proxies is not None:
    delta_BV, cache_P = proxies.prefill(proxy_state, ids_BP, mask_BP, max_len)
  else:
    delta_BV, cache_P = None, None
  eos = jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)

  def step(carry, t):
    z_T_BV, delta_BV, cache_T, cache_P, done_B, first_bad = carry
    delta_BV = None if delta_BV is None else _pad_delta(delta_BV, vocab)
    logits_BV = adjusted_logits(z_T_BV, delta_BV, s)
    valid_V = jnp.arange(vocab) < (s.vocab_size or vocab)
    bad = jnp.any(~jnp.isfinite(logits_BV) & valid_V)
    first_bad = jnp.where((first_bad < 0) & bad, t, first_bad)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
    token_B = sample_tokens(keys_B, logits_BV, s)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(z_T_BV.astype(jnp.float32)),
                                 token_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(done_B, s.pad_id, token_B)
    out = (token_B, jnp.where(done_B, 0.0, logp_B), done_B)
    done_B = done_B | jnp.isin(token_B, eos)
    z_T_BV, cache_T = teacher.decode(token_B, cache_T)
    if proxies is not None:
      delta_BV, cache_P = proxies.decode(proxy_state, token_B, cache_P)
    return (z_T_BV, delta_BV, cache_T, cache_P, done_B, first_bad), out

  def run_chunk(loop):
    c, carry, (tokens_NB, logp_NB, was_done_NB) = loop
    first = c * chunk
    carry, (tokens_CB, logp_CB, was_done_CB) = jax.lax.scan(
        step, carry, first + jnp.arange(chunk, dtype=jnp.int32))
    at = (first, jnp.zeros((), jnp.int32))
    outs = (jax.lax.dynamic_update_slice(tokens_NB, tokens_CB, at),
            jax.lax.dynamic_update_slice(logp_NB, logp_CB, at),
            jax.lax.dynamic_update_slice(was_done_NB, was_done_CB, at))
    return c + 1, carry, outs

  def more(loop):
    c, carry, _ = loop
    return (c * chunk < s.max_new_tokens) & ~jnp.all(carry[4])

  carry = (z_T_BV, delta_BV, cache_T, cache_P, jnp.zeros((b,), bool), jnp.array(-1, jnp.int32))
  outs = (jnp.full((n, b), s.pad_id, jnp.int32), jnp.zeros((n, b), jnp.float32),
          jnp.ones((n, b), bool))
  c, carry, (tokens_NB, logp_NB, was_done_NB) = jax.lax.while_loop(
      more, run_chunk, (jnp.zeros((), jnp.int32), carry, outs))
  m = s.max_new_tokens
  return (tokens_NB[:m], logp_NB[:m], was_done_NB[:m], carry[4], carry[5],
          jnp.minimum(c * chunk, m))


# -- host-side driver -------------------------------------------------------------------------


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


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


@dataclasses.dataclass(frozen=True)
class Program:
  """One decode program: static settings, the split teacher and the prepared proxy side.

  Calling it on a batch (ids, mask, row keys) runs the jitted prefill + scan; `lower` exposes
  the compiled program (memory analysis, HLO) for benchmarks.
  """
  settings: DecodeSettings
  teacher_def: Any
  teacher_state: Any
  proxy_def: Any = None
  proxy_state: Any = None

  def _args(self, ids_BP, mask_BP, row_keys_B):
    return (self.teacher_def, self.teacher_state, self.proxy_def, self.proxy_state, ids_BP,
            mask_BP, row_keys_B)

  def __call__(self, ids_BP, mask_BP, row_keys_B):
    return _decode_program(*self._args(ids_BP, mask_BP, row_keys_B), s=self.settings)

  def lower(self, ids_BP, mask_BP, row_keys_B):
    return _decode_program.lower(*self._args(ids_BP, mask_BP, row_keys_B), s=self.settings)


def build_program(teacher: Transformer, *, max_new_tokens: int, tau: float = 1.0,
                  top_p: float | None = None, top_k: int | None = None,
                  eos_ids: Sequence[int] = (), pad_id: int = 0,
                  proxy: Transformer | None = None, grad: Any = None, lam: float = 0.0,
                  eps: float = 1e-2, method: str = "fd", placement: str = "paper",
                  vocab_size: int | None = None, fd_stacked: bool = True,
                  scan_chunk: int = 32) -> Program:
  """Validates the settings and prepares the proxy side once (theta +- eps g, or (theta, g));
  see `generate` for the arguments."""
  proxy_def = proxy_state = None
  if lam != 0.0:
    if proxy is None or grad is None:
      raise ValueError(f"lam={lam} needs a proxy model and its gradient (grad=...).")
    gradients.check_compatible(proxy, grad)
    shared = shared_vocab_size(teacher.config, proxy.config)
    vocab_size = shared if vocab_size is None else min(vocab_size, shared)
    proxy_def, theta = nnx.split(proxy)
    if method == "fd":
      plus, minus = perturbed_states(theta, grad, eps)
      proxy_state = (jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus) if fd_stacked
                     else (plus, minus))
    else:
      proxy_state = (theta, _tangent(grad, theta))
  s = DecodeSettings(max_new_tokens=max_new_tokens, tau=float(tau), top_p=top_p, top_k=top_k,
                     lam=float(lam), eps=float(eps), method=method, placement=placement,
                     eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                     vocab_size=vocab_size, fd_stacked=fd_stacked, scan_chunk=scan_chunk)
  teacher_def, teacher_state = nnx.split(teacher)
  return Program(s, teacher_def, teacher_state, proxy_def, proxy_state)


def batch_inputs(prompts: Sequence[Sequence[int]], *, rows: int, seed: int, first_row: int = 0,
                 pad_id: int = 0, prompt_multiple: int = 16, mesh: Mesh | None = None):
  """Left-padded ids and mask [rows, P] and per-row keys [rows] for one batch; with a mesh,
  placed with the batch sharded over `data`."""
  length = _round_up(max(len(p) for p in prompts), prompt_multiple)
  ids, mask = left_pad(prompts, pad_id, length, rows)
  row_idx = jnp.asarray(first_row + np.arange(rows), jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_idx)
  return parallel.shard_batch((jnp.asarray(ids), jnp.asarray(mask), keys), mesh)


def generate(teacher: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             tau: float = 1.0, top_p: float | None = None, top_k: int | None = None,
             seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
             proxy: Transformer | None = None, grad: Any = None, lam: float = 0.0,
             eps: float = 1e-2, method: str = "fd", placement: str = "paper",
             vocab_size: int | None = None, batch_size: int | None = None,
             prompt_multiple: int = 16, first_row: int = 0, mesh: Mesh | None = None,
             fd_stacked: bool = True, scan_chunk: int = 32) -> Generation:
  """Samples continuations of `prompts` (token-id lists, any lengths) from the teacher,
  antidistilled by `proxy` along `grad` when lam != 0.

  batch_size: prompts per compiled call (default: all). Prompt lengths are padded up to a
    multiple of `prompt_multiple` so few shapes compile.
  first_row: global index of prompts[0]; rows draw randomness by global index, so a resumed
    run (first_row > 0) reproduces an uninterrupted one.
  vocab_size: ids that may be sampled (default: the shared vocab of teacher and proxy when a
    proxy is used, else every teacher row).
  mesh: shards each batch over its `data` axis (batch padded to a multiple of its size).
  fd_stacked: run the two fd proxies as one vmapped call (default; see bench/sampling.py).
  scan_chunk: decode steps per lax.scan chunk; a batch stops after the chunk in which all its
    rows reached EOS (outputs do not depend on it).
  """
  if not prompts:
    return Generation([], [], np.zeros((0,), bool), 0)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt: every prompt needs at least one token.")
  longest = max(len(p) for p in prompts)
  limit = teacher.config.max_position_embeddings
  if longest + max_new_tokens > limit:
    raise ValueError(
        f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the teacher's "
        f"max_position_embeddings={limit}; drop or truncate long prompts "
        "(data.prompts does it with max_prompt_length).")
  program = build_program(teacher, max_new_tokens=max_new_tokens, tau=tau, top_p=top_p,
                          top_k=top_k, eos_ids=eos_ids, pad_id=pad_id, proxy=proxy, grad=grad,
                          lam=lam, eps=eps, method=method, placement=placement,
                          vocab_size=vocab_size, fd_stacked=fd_stacked, scan_chunk=scan_chunk)
  batch_size = batch_size or len(prompts)
  rows = parallel.round_rows(min(batch_size, len(prompts)), mesh)
  out_tokens, out_logp, out_done = [], [], []
  t0, n_tokens, decode_steps = time.time(), 0, 0
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    batch = batch_inputs(chunk, rows=rows, seed=seed, first_row=first_row + start, pad_id=pad_id,
                         prompt_multiple=prompt_multiple, mesh=mesh)
    tokens_NB, logp_NB, was_done_NB, done_B, first_bad, steps = parallel.to_host(
        program(*batch))
    decode_steps += int(steps)
    if first_bad >= 0:
      raise FloatingPointError(
          f"non-finite sampling logits at decode step {int(first_bad)} (prompts {start}.."
          f"{start + len(chunk) - 1}) with lam={lam}, eps={eps}, tau={tau}, method={method}, "
          f"teacher dtype {teacher.dtype.name}"
          + (f", proxy dtype {proxy.dtype.name}" if proxy is not None and lam else "")
          + ". Lower lam, raise eps, or run the proxy in float32/bfloat16 instead of float16.")
    for i in range(len(chunk)):
      n = int(np.sum(~was_done_NB[:, i]))
      out_tokens.append(tokens_NB[:n, i].tolist())
      out_logp.append(logp_NB[:n, i].astype(np.float32))
      out_done.append(bool(done_B[i]))
      n_tokens += n
    logging.info("generated %d/%d prompts, %d tokens (%.1f tokens/s)", start + len(chunk),
                 len(prompts), n_tokens, n_tokens / max(time.time() - t0, 1e-9))
  return Generation(out_tokens, out_logp, np.array(out_done, bool), decode_steps)
