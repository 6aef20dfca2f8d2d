"""Antidistillation sampling: one jitted program per shape that prefills the teacher (and the
proxy), then decodes with a `lax.scan` whose step adds lam * Delta to the teacher.

  sampler = Sampler(teacher, tokenizer, proxy=proxy, grad=g)          # once per run
  out = sampler(prompts, SamplingParams(max_new_tokens=1024, tau=0.9, top_p=0.95, lam=0.08))

Delta(v | x) is the directional derivative of the proxy's log p(v | x) along the gradient g of
the proxy's distillation loss (see `gradients`):
  method="jvp" (default): the exact jax.jvp of the cached proxy step, carrying the tangent of
                the cache. Exact in any parameter dtype: in bfloat16 the tangent is computed in
                bf16 arithmetic with fp32 accumulation, with no cancellation.
  method="fd":  [log p(v | x; theta + eps g) - log p(v | x; theta - eps g)] / (2 eps), the
                paper's central difference, two proxy copies with their own KV caches. In
                bfloat16 most eps*g fall below half an ulp of their weight, so the difference is
                rounding noise (bench/numerics.py: cosine 0.03 with the exact Delta at eps=1e-3,
                0.94 at the paper's 1e-2); preparing fd measures how much of eps*g survived the
                rounding and warns.
  jvp is the default because it is exact at the same memory (theta + g against theta+ and
  theta-, one cache and its tangent against two caches) and reads the same bytes per step; it
  does more arithmetic (each matmul's tangent is two matmuls), which cost 0.99-1.26x fd's time
  on a 2-core CPU (bench/RESULTS.md).

Next-token distribution (log p_T = teacher log-probs, z_T = teacher logits):
  placement="paper":     softmax(log p_T / tau + lam * Delta)          (the paper's Algorithm 1)
  placement="reference": softmax((z_T + lam * Delta) / tau)            (the authors' code;
                         lam_reference = tau * lam_paper)
then top-k / top-p (`filters`, no sort) on those logits; tau=0 is greedy on
log p_T + lam * Delta. Delta is defined on the vocabulary both models have; ids past the
tokenizer (padding rows of the embedding) are never sampled.

Compilation. tau, lam, eps and top_p are traced values: one compiled program serves a whole
sweep for a given (batch, prompt bucket, max_new_tokens, method, placement, filter kind,
greedy or not, proxy or not). lam = 0 compiles the plain teacher program, with no proxy work.
The proxy side (theta +- eps g, or (theta, g)) is prepared once per (method, eps) by its own
jitted function and reused by every batch.

Randomness is per prompt: row r at step t draws with fold_in(fold_in(key(seed), r), t), so a
prompt's sample does not depend on the batch it is in, the batch size, or the device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import filters, gradients, parallel
from antidistill_jax import tokenizer as tok_lib
from antidistill_jax.models.cache import KVCache
from antidistill_jax.models.transformer import Transformer

METHODS = ("jvp", "fd")
PLACEMENTS = ("paper", "reference")

# fd warns when the realised step (theta+ - theta-), rounded to the proxy's dtype, has a cosine
# below this with g. bench/numerics.py (3M-parameter proxy): step cosines 0.96 (bf16, eps=0.1)
# and 0.95 (fp16, eps=1e-2) still gave Delta cosines of 0.999 with the exact Delta, 0.64 (bf16,
# eps=1e-2) gave 0.92 and 0.23 (bf16, eps=1e-3) gave 0.08: the small entries of g that round
# away carry little of Delta, so the step's cosine, not the count of unmoved weights, decides.
FD_MIN_COSINE = 0.9


# -- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample: the one settings object of `Sampler`, `traces` and the pipeline.

  max_new_tokens: decode steps at most (a compile-time shape).
  tau: temperature; 0 is greedy. lam: weight of Delta (0: plain sampling, no proxy work).
  eps: finite-difference step (method="fd" only). method: "jvp" (exact) or "fd".
  placement: "paper" or "reference" (module docstring).
  top_p, top_k: nucleus / top-k filters after the adjustment (None: off).
  max_length: cap on the LEFT-PADDED prompt plus new tokens, as Hugging Face `generate`'s
    max_length counts it (the authors' script: 1024); a batch then decodes at most
    max_length - (its longest prompt) tokens. None: max_new_tokens for every batch.
  seed: randomness (per global prompt index, see module docstring).
  """
  max_new_tokens: int
  tau: float = 1.0
  lam: float = 0.0
  eps: float = 1e-2
  method: str = "jvp"
  placement: str = "paper"
  top_p: float | None = None
  top_k: int | None = None
  max_length: int | None = None
  seed: int = 0

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
    if self.method == "fd" and self.lam != 0.0 and not self.eps > 0:
      raise ValueError(f"eps={self.eps} must be > 0 for method='fd'.")

  @classmethod
  def reference(cls, *, tau: float, lam: float = 0.0, eps: float = 1e-2, method: str = "fd",
                max_length: int = 1024, seed: int = 0) -> "SamplingParams":
    """The authors' sampler: Delta added to the raw teacher logits before the temperature
    (lam here = tau * lam_paper), then Hugging Face's default top_k=50 and top_p=0.95 (greedy
    when tau=0), and max_length=1024 counting the left-padded prompt. fd at eps as theirs;
    `method="jvp"` gives the exact derivative their eps approximates."""
    sampled = tau > 0
    return cls(max_new_tokens=max_length, tau=tau, lam=lam, eps=eps, method=method,
               placement="reference", top_p=0.95 if sampled else None,
               top_k=50 if sampled else None, max_length=max_length, seed=seed)

  @property
  def uses_proxy(self) -> bool:
    return self.lam != 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


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
  limit: jax.Array  # i32 []: decode steps of this batch (<= num_steps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """The carry of the decode scan: next-token inputs, caches and per-row flags."""
  z_T_BV: jax.Array  # teacher logits for the next token (fp32)
  delta_BW: jax.Array | None  # Delta on the proxy's rows (None without a proxy)
  cache_T: KVCache
  cache_P: Any  # fd: the perturbed copies' caches; jvp: (cache, (dk, dv)); None without proxy
  done_B: jax.Array  # bool: the row has emitted an EOS
  first_bad: jax.Array  # i32 []: first step with non-finite sampling logits, -1 if none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutputs:
  """Per-step outputs, [num_steps, B] each (steps never run: pad, 0, True)."""
  tokens_NB: jax.Array
  logp_NB: jax.Array  # teacher log-prob of the token, temperature 1, unperturbed
  stopped_NB: jax.Array  # row had finished (EOS or limit) before this step


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


def adjusted_logits(z_T_BV, delta_BV, knobs: Knobs, s: _Static) -> jax.Array:
  """Logits of the sampling distribution before top-k/top-p (see module docstring)."""
  z_T_BV = z_T_BV.astype(jnp.float32)
  logp_T_BV = jax.nn.log_softmax(z_T_BV, axis=-1)
  lam_delta = 0.0 if delta_BV is None else knobs.lam * delta_BV
  if s.greedy:
    out = logp_T_BV + lam_delta
  elif s.placement == "paper":
    out = logp_T_BV / knobs.tau + lam_delta
  else:
    out = (z_T_BV + lam_delta) / knobs.tau
  if s.vocab_size < out.shape[-1]:
    out = jnp.where(jnp.arange(out.shape[-1]) < s.vocab_size, out, -jnp.inf)
  return out


def sample_tokens(keys_B, logits_BV, knobs: Knobs, s: _Static) -> jax.Array:
  if s.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filters.filter_logits(logits_BV, s.top_k, knobs.top_p if s.top_p else None)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


# -- the proxy side ---------------------------------------------------------------------------


def perturbed_states(proxy_state, grad_state, eps):
  """theta +- eps * g, formed in fp32 and rounded to each parameter's dtype."""
  def shift(sign):
    return jax.tree.map(
        lambda p, g: (p.astype(jnp.float32) + sign * eps * g.astype(jnp.float32)).astype(p.dtype),
        proxy_state, grad_state)
  return shift(1.0), shift(-1.0)


def _fd_rounding(theta, plus, minus, grad) -> dict[str, jax.Array]:
  """How much of eps*g survived rounding to the parameter dtype: the fraction of weights with
  g != 0 that did not move, and the cosine between (theta+ - theta-) and g."""
  moving = unmoved = dot = norm_step = norm_g = 0.0
  for p, a, b, g in zip(*(jax.tree.leaves(t) for t in (theta, plus, minus, grad))):
    g = g.astype(jnp.float32)
    step = a.astype(jnp.float32) - b.astype(jnp.float32)
    nonzero = g != 0
    moving += jnp.sum(nonzero)
    unmoved += jnp.sum(nonzero & (a == p) & (b == p))
    dot += jnp.sum(step * g)
    norm_step += jnp.sum(step * step)
    norm_g += jnp.sum(g * g)
  return dict(unmoved_fraction=unmoved / jnp.maximum(moving, 1.0),
              cosine=dot / jnp.maximum(jnp.sqrt(norm_step * norm_g), 1e-30))


@functools.partial(jax.jit, static_argnames="stacked")
def _prepare_fd(theta, grad, eps, *, stacked: bool):
  plus, minus = perturbed_states(theta, grad, eps)
  stats = _fd_rounding(theta, plus, minus, grad)
  state = jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus) if stacked else (plus, minus)
  return state, stats


@functools.partial(jax.jit, static_argnames="stacked", donate_argnames="previous")
def _reprepare_fd(theta, grad, eps, previous, *, stacked: bool):
  """_prepare_fd at a new eps, writing into the buffers of the previous eps's state: a sweep
  over eps holds two proxy copies, not four."""
  del previous
  return _prepare_fd(theta, grad, eps, stacked=stacked)


def warn_if_fd_rounds_away(stats: dict, eps: float, dtype) -> None:
  """Warns when theta +- eps g, rounded to `dtype`, lost a material part of eps*g."""
  unmoved, cosine = float(stats["unmoved_fraction"]), float(stats["cosine"])
  if cosine < FD_MIN_COSINE:
    message = (
        f"method='fd' with a {jnp.dtype(dtype).name} proxy at eps={eps}: {unmoved:.1%} of the "
        f"weights with a non-zero gradient did not move under theta + eps*g, and the realised "
        f"step has cosine {cosine:.3f} with g: the finite difference is partly rounding noise. Use method='jvp' (exact in any dtype; the default), raise eps, or load the proxy "
        "in float32.")
    logging.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _tangent(grad_state, proxy_state):
  """g cast to each parameter's dtype: jax.jvp wants tangents of the primal's dtype."""
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grad_state, proxy_state)


_prepare_jvp = jax.jit(lambda theta, grad: (theta, _tangent(grad, theta)))


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

  fd:  state = ((theta+, theta-) stacked on a leading axis of 2, for one vmapped call per
       step, or a pair for two calls, eps); each copy has its own cache. The difference is
       divided by the traced eps.
  jvp: state = (theta, g); the cache carries its tangent.
  """

  def __init__(self, graphdef, method: str, fd_stacked: bool):
    self.graphdef, self.method, self.fd_stacked = graphdef, method, fd_stacked

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _fd(self, run, state, *cache):
    """Runs both perturbed copies: returns Delta and their caches."""
    params, eps = state
    if self.fd_stacked:
      z_2BV, cache = jax.vmap(run)(params, *cache)
      return _fd_delta(z_2BV[0], z_2BV[1], eps), cache
    (z_plus, c_plus), (z_minus, c_minus) = (run(params[i], *(c[i] for c in cache))
                                            for i in (0, 1))
    return _fd_delta(z_plus, z_minus, eps), (c_plus, c_minus)

  def prefill(self, state, ids_BP, mask_BP, max_len):
    run = lambda st: self._model(st).prefill(ids_BP, mask_BP, max_len)
    if self.method == "fd":
      return self._fd(run, state)
    theta, g = state
    (_, cache), (dz_BV, dcache) = jax.jvp(run, (theta,), (g,))
    return dz_BV, (cache, (dcache.k, dcache.v))

  def decode(self, state, token_B, cache):
    if self.method == "fd":
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


def delta(proxy: Transformer, grad, input_ids_BT, *, method: str = "jvp", eps: float = 1e-2,
          pad_mask_BT=None) -> jax.Array:
  """Delta [B, V] (fp32) at the last position of each row, by a full forward (no cache).

  The analysis entry point: jvp gives the exact derivative of log p(.; theta) along g, fd
  [log p(.; theta+eps g) - log p(.; theta-eps g)] / 2eps in the proxy's dtype (warning when
  the rounding ate eps*g). Rows may be left-padded (pad_mask_BT).
  """
  gradients.check_compatible(proxy, grad)
  graphdef, theta = nnx.split(proxy)
  ids = jnp.asarray(input_ids_BT)

  def logp_last(state):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, pad_mask_BT)[:, -1], axis=-1)

  if method == "fd":
    plus, minus = perturbed_states(theta, grad, eps)
    warn_if_fd_rounds_away(_fd_rounding(theta, plus, minus, grad), eps, proxy.dtype)
    return (logp_last(plus) - logp_last(minus)) / (2.0 * eps)
  if method == "jvp":
    return jax.jvp(logp_last, (theta,), (_tangent(grad, theta),))[1].astype(jnp.float32)
  raise ValueError(f"method={method!r}; expected one of {METHODS}.")


# -- the compiled program ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("teacher_def", "proxy_def", "s"))
def _decode_program(teacher_def, teacher_state, proxy_def, proxy_state, ids_BP, mask_BP,
                    row_keys_B, knobs: Knobs, *, s: _Static):
  """Prefill, then a while_loop over chunks of `s.chunk` decode steps, each a lax.scan; the loop
  ends once every row has finished or after knobs.limit steps. Returns the DecodeOutputs, the
  final done flags [B], the first step with non-finite adjusted logits (-1 if none) and the
  number of steps run."""
  b, p = ids_BP.shape
  max_len = p + s.num_steps
  teacher = nnx.merge(teacher_def, teacher_state)
  z_T_BV, cache_T = teacher.prefill(ids_BP, mask_BP, max_len)
  vocab = z_T_BV.shape[-1]
  proxies = _Proxies(proxy_def, s.method, s.fd_stacked) if s.uses_proxy else None
  delta_BW = cache_P = None
  if proxies is not None:
    delta_BW, cache_P = proxies.prefill(proxy_state, ids_BP, mask_BP, max_len)
  eos = jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)
  valid_V = jnp.arange(vocab) < s.vocab_size

  def step(st: DecodeState, t):
    stopped_B = st.done_B | (t >= knobs.limit)
    delta_BV = None if st.delta_BW is None else _pad_delta(st.delta_BW, vocab)
    logits_BV = adjusted_logits(st.z_T_BV, delta_BV, knobs, s)
    bad = jnp.any(~jnp.isfinite(logits_BV) & valid_V & ~stopped_B[:, None])
    first_bad = jnp.where((st.first_bad < 0) & bad, t, st.first_bad)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
    token_B = sample_tokens(keys_B, logits_BV, knobs, s)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(st.z_T_BV.astype(jnp.float32)),
                                 token_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(stopped_B, s.pad_id, token_B)
    out = (token_B, jnp.where(stopped_B, 0.0, logp_B), stopped_B)
    done_B = st.done_B | (~stopped_B & jnp.isin(token_B, eos))
    z_T_BV, cache_T = teacher.decode(token_B, st.cache_T)
    delta_BW, cache_P = st.delta_BW, st.cache_P
    if proxies is not None:
      delta_BW, cache_P = proxies.decode(proxy_state, token_B, cache_P)
    return DecodeState(z_T_BV, delta_BW, cache_T, cache_P, done_B, first_bad), out

  def run_chunk(loop):
    c, st, outs = loop
    first = c * s.chunk
    st, (tokens_CB, logp_CB, stopped_CB) = jax.lax.scan(
        step, st, first + jnp.arange(s.chunk, dtype=jnp.int32))
    at = (first, jnp.zeros((), jnp.int32))
    outs = DecodeOutputs(jax.lax.dynamic_update_slice(outs.tokens_NB, tokens_CB, at),
                         jax.lax.dynamic_update_slice(outs.logp_NB, logp_CB, at),
                         jax.lax.dynamic_update_slice(outs.stopped_NB, stopped_CB, at))
    return c + 1, st, outs

  def more(loop):
    c, st, _ = loop
    return (c * s.chunk < knobs.limit) & ~jnp.all(st.done_B)

  n = s.num_steps
  st = DecodeState(z_T_BV, delta_BW, cache_T, cache_P, jnp.zeros((b,), bool),
                   jnp.array(-1, jnp.int32))
  outs = DecodeOutputs(jnp.full((n, b), s.pad_id, jnp.int32), jnp.zeros((n, b), jnp.float32),
                       jnp.ones((n, b), bool))
  c, st, outs = jax.lax.while_loop(more, run_chunk, (jnp.zeros((), jnp.int32), st, outs))
  return outs, st.done_B, st.first_bad, jnp.minimum(c * s.chunk, knobs.limit)


# -- host side --------------------------------------------------------------------------------


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


def _is_abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


class Sampler:
  """Samples from a teacher, antidistilled by a proxy along g when params.lam != 0.

  Built once per (teacher, proxy, g) and called with `SamplingParams` for each setting of a
  sweep; it keeps the split models, the proxy side prepared for the last (method, eps), and
  the jit cache keyed by shapes and the static part of the settings.

  tokenizer: gives the EOS ids, the pad id and the number of real tokens; rows of the
    embedding past it are padding and are never sampled. Without a tokenizer, pass
    vocab_size (and eos_ids / pad_id).
  vocab_size: ids that may be sampled (default: len(tokenizer), and at most the rows both
    teacher and proxy have).
  batch_size: prompts per compiled call (default: all prompts of a call).
  prompt_multiple: padded prompt lengths are multiples of it, so few shapes compile.
  mesh: batches are sharded over its `data` axis (rows padded to a multiple of its size).
  scan_chunk: decode steps per lax.scan chunk; a batch stops after the chunk in which all its
    rows finished (outputs do not depend on it).
  fd_stacked: fd runs its two proxy copies as one vmapped call (default; bench/sampling.py).
  """

  def __init__(self, teacher: Transformer, tokenizer=None, *, proxy: Transformer | None = None,
               grad: Any = None, vocab_size: int | None = None,
               eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
               batch_size: int | None = None, prompt_multiple: int = 16,
               mesh: Mesh | None = None, scan_chunk: int = 32, fd_stacked: bool = True):
    if tokenizer is None and vocab_size is None:
      raise ValueError(
          "Sampler needs the tokenizer (or vocab_size=): rows of the embedding table past the "
          "tokenizer are padding, and sampling them gives ids that cannot be decoded.")
    if (proxy is None) != (grad is None):
      raise ValueError("pass the proxy and its gradient together (proxy=..., grad=...).")
    if scan_chunk < 1:
      raise ValueError(f"scan_chunk={scan_chunk} must be >= 1.")
    self.teacher = teacher
    self.tokenizer = tokenizer
    self.config = teacher.config
    limit = teacher.config.vocab_size
    if tokenizer is not None:
      limit = min(limit, len(tokenizer))
    if proxy is not None:
      gradients.check_compatible(proxy, grad)
      limit = min(limit, tok_lib.shared_vocab_size(teacher.config, proxy.config, tokenizer))
    self.vocab_size = min(limit, vocab_size) if vocab_size is not None else limit
    if eos_ids is None:
      eos_ids = tok_lib.eos_ids(tokenizer, teacher.config) if tokenizer is not None else ()
    self.eos_ids = tuple(int(e) for e in eos_ids)
    if pad_id is None:
      pad_id = getattr(tokenizer, "pad_token_id", None)
    self.pad_id = int(pad_id or 0)
    self.batch_size, self.prompt_multiple, self.mesh = batch_size, prompt_multiple, mesh
    self.scan_chunk, self.fd_stacked = scan_chunk, fd_stacked
    self.teacher_def, self.teacher_state = nnx.split(teacher)
    self.proxy = proxy
    self.proxy_def = self._theta = None
    if proxy is not None:
      self.proxy_def, self._theta = nnx.split(proxy)
    self.grad = grad
    self._prepared_key, self._prepared = None, None

  # -- pieces ------------------------------------------------------------------------------

  def _static(self, params: SamplingParams) -> _Static:
    if params.uses_proxy and self.proxy is None:
      raise ValueError(f"lam={params.lam} needs a proxy and its gradient: "
                       "Sampler(teacher, tokenizer, proxy=..., grad=...).")
    chunk = min(self.scan_chunk, params.max_new_tokens)
    return _Static(
        num_steps=_round_up(params.max_new_tokens, chunk), chunk=chunk,
        greedy=params.tau == 0.0, top_k=params.top_k,
        top_p=params.top_p is not None and params.top_p < 1.0,
        uses_proxy=params.uses_proxy,
        # Without a proxy the method does not matter: every method shares the plain program.
        method=params.method if params.uses_proxy else "",
        placement=params.placement,
        fd_stacked=self.fd_stacked and params.uses_proxy, eos_ids=self.eos_ids, pad_id=self.pad_id,
        vocab_size=self.vocab_size)

  def proxy_state(self, params: SamplingParams):
    """The prepared proxy side for params (None at lam=0): cached per (method, eps)."""
    if not params.uses_proxy:
      return None
    key = (params.method, params.eps if params.method == "fd" else None)
    if key == self._prepared_key:
      return self._prepared
    theta, grad = self._theta, self.grad
    eps = jnp.float32(params.eps)
    if _is_abstract(theta):  # abstract weights (memory analysis): shapes only
      if params.method == "jvp":
        state = jax.eval_shape(_prepare_jvp, theta, grad)
      else:
        state = (jax.eval_shape(functools.partial(_prepare_fd, stacked=self.fd_stacked),
                                theta, grad, eps)[0], eps)
    elif params.method == "jvp":
      self._prepared = None
      state = _prepare_jvp(theta, grad)
    else:
      previous = self._prepared
      self._prepared = None
      if previous is not None and self._prepared_key[0] == "fd":
        params_state, stats = _reprepare_fd(theta, grad, eps, previous[0],
                                            stacked=self.fd_stacked)
      else:
        params_state, stats = _prepare_fd(theta, grad, eps, stacked=self.fd_stacked)
      warn_if_fd_rounds_away(jax.device_get(stats), params.eps, self.proxy.dtype)
      state = (params_state, eps)
    self._prepared_key, self._prepared = key, state
    return state

  def knobs(self, params: SamplingParams, prompt_len: int) -> Knobs:
    """The traced settings for a batch whose longest prompt has `prompt_len` tokens."""
    limit = params.max_new_tokens
    if params.max_length is not None:
      limit = min(limit, params.max_length - prompt_len)
      if limit < 1:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room under "
                         f"max_length={params.max_length}; drop it or raise max_length.")
    return Knobs(tau=jnp.float32(params.tau if params.tau > 0 else 1.0),
                 lam=jnp.float32(params.lam), top_p=jnp.float32(params.top_p or 1.0),
                 limit=jnp.int32(limit))

  def batch_inputs(self, prompts: Sequence[Sequence[int]], rows: int, seed: int,
                   first_row: int = 0):
    """Left-padded ids and mask [rows, P] and per-row keys [rows], placed on the mesh."""
    length = _round_up(max(len(p) for p in prompts), self.prompt_multiple)
    ids, mask = left_pad(prompts, self.pad_id, length, rows)
    row_idx = jnp.asarray(first_row + np.arange(rows), jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_idx)
    return parallel.shard_batch((jnp.asarray(ids), jnp.asarray(mask), keys), self.mesh)

  def _args(self, batch, params: SamplingParams, prompt_len: int):
    return ((self.teacher_def, self.teacher_state, self.proxy_def if params.uses_proxy else None,
             self.proxy_state(params), *batch, self.knobs(params, prompt_len)),
            dict(s=self._static(params)))

  def run_batch(self, batch, params: SamplingParams, prompt_len: int):
    """The jitted program on one placed batch (ids, mask, keys): (DecodeOutputs, done [B],
    first bad step, steps run), on device."""
    args, kw = self._args(batch, params, prompt_len)
    return _decode_program(*args, **kw)

  def lower(self, batch, params: SamplingParams, prompt_len: int | None = None):
    """The lowered program for one batch (HLO text, compile().memory_analysis()); batch may
    hold jax.ShapeDtypeStructs, and so may the models' states."""
    prompt_len = batch[0].shape[1] if prompt_len is None else prompt_len
    args, kw = self._args(batch, params, prompt_len)
    return _decode_program.lower(*args, **kw)

  # -- the call ------------------------------------------------------------------------------

  def __call__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
               first_row: int = 0) -> Generation:
    """Samples a continuation of each prompt (token-id lists of any lengths).

    first_row: global index of prompts[0]; rows draw randomness by global index, so a resumed
      run (first_row > 0) reproduces an uninterrupted one.
    """
    if not prompts:
      return Generation([], [], np.zeros((0,), bool), 0)
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token.")
    rows = self.config.vocab_size
    bad = [i for i, p in enumerate(prompts) if min(p) < 0 or max(p) >= rows]
    if bad:
      raise ValueError(f"prompts {bad[:10]} hold token ids outside [0, {rows}), the teacher's "
                       "embedding rows; tokenize them with the teacher's tokenizer.")
    longest = max(len(p) for p in prompts)
    limit = self.config.max_position_embeddings
    if longest + params.max_new_tokens > limit and params.max_length is None:
      raise ValueError(
          f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
          f"teacher's max_position_embeddings={limit}; drop or truncate long prompts "
          "(data.prompts does it with max_prompt_length).")
    batch_size = self.batch_size or len(prompts)
    rows = parallel.round_rows(min(batch_size, len(prompts)), self.mesh)
    out_tokens, out_logp, out_done = [], [], []
    t0, n_tokens, decode_steps = time.time(), 0, 0
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      batch = self.batch_inputs(chunk, rows, params.seed, first_row + start)
      outs, done_B, first_bad, steps = parallel.to_host(
          self.run_batch(batch, params, max(len(p) for p in chunk)))
      decode_steps += int(steps)
      if first_bad >= 0:
        where = (f"non-finite sampling logits at decode step {int(first_bad)} (prompts {start}.."
                 f"{start + len(chunk) - 1}) with tau={params.tau}, teacher dtype "
                 f"{self.teacher.dtype.name}")
        if not params.uses_proxy:
          raise FloatingPointError(f"{where}, no proxy: the teacher's own logits are not finite; "
                                   "check its weights, or run it in float32/bfloat16.")
        raise FloatingPointError(
            f"{where}, lam={params.lam}, eps={params.eps}, method={params.method}, proxy dtype "
            f"{self.proxy.dtype.name}. Lower lam, use method='jvp' or a larger eps, or run the "
            "proxy in float32/bfloat16 instead of float16.")
      for i in range(len(chunk)):
        n = int(np.sum(~outs.stopped_NB[:, i]))
        out_tokens.append(outs.tokens_NB[:n, i].tolist())
        out_logp.append(outs.logp_NB[:n, i].astype(np.float32))
        out_done.append(bool(done_B[i]))
        n_tokens += n
      logging.info("generated %d/%d prompts, %d tokens (%.1f tokens/s)", start + len(chunk),
                   len(prompts), n_tokens, n_tokens / max(time.time() - t0, 1e-9))
    return Generation(out_tokens, out_logp, np.array(out_done, bool), decode_steps)


def generate(teacher: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
             tokenizer=None, *, first_row: int = 0, **sampler_kwargs) -> Generation:
  """One-shot `Sampler(teacher, tokenizer, **sampler_kwargs)(prompts, params)`; keep a Sampler
  to sample several settings (the proxy side is then prepared once per (method, eps))."""
  return Sampler(teacher, tokenizer, **sampler_kwargs)(prompts, params, first_row=first_row)
