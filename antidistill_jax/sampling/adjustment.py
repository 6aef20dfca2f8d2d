"""The antidistillation adjustment: Delta, and where lam * Delta enters the teacher's logits.

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
  theta-, one cache and its tangent against two caches) and reads the same bytes per step:
  the proxy's products take `models.bilinear`'s stacked JVP ([x; dx] @ W in one product, plus
  x @ g), so each weight, g, the cache and its tangent are read once (jax.jvp's own rule reads
  each weight twice). It does 1.5x fd's matmul arithmetic; at batch 8 on a 2-core CPU it takes
  1.00-1.01x fd's time at 512 new tokens, 1.08-1.13x at 32 and a median of 1.10x at the tiny
  default width, where the JVP's extra arithmetic and instructions cost about one proxy
  copy's read (bench/RESULTS.md, "Decoding at the roofline").

Next-token distribution (z = the teacher's logits, log p = log_softmax(z)):
  placement="paper":     softmax(log p / tau + lam * Delta)          (the paper's Algorithm 1)
  placement="reference": softmax((z + lam * Delta) / tau)            (the authors' code;
                         lam_reference = tau * lam_paper)
then top-k / top-p (`filters`, no sort) on those logits; tau=0 is greedy on
log p + lam * Delta. Delta is defined on the vocabulary both models have (arrays hold it on
the proxy's W rows, cut or zero-extended to the teacher's V); ids past the tokenizer (padding
rows of the embedding) are never sampled.

method="poe" is the product-of-experts defence (The Distillation Game, arXiv 2605.22737; its
code: the teacher's and the unperturbed proxy's logits mixed as (1 - gamma) z_T + gamma z_P,
then the temperature and top-k/top-p): no Delta and no g, the proxy's own log-probs at every
step, lam carrying gamma in [0, 1]:
  placement="poe":       softmax(((1 - lam) * log p + lam * log p_P) / tau)
(equal to the mix of raw logits: the per-row constants cancel). lam = 0 is temperature sampling;
lam = 1 samples the proxy alone. The sign pulls the teacher toward the proxy, as in that code.

The proxy side (theta +- eps g, (theta, g), or theta for "poe") is prepared once per (method,
eps) and reused by every batch; `_Proxies` runs it inside the decode program.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax import gradients
from antidistill_jax.models.transformer import Transformer, stack_tangents

METHODS = ("jvp", "fd", "poe")
PLACEMENTS = ("paper", "reference")
ADS_METHODS = ("jvp", "fd")  # the methods that compute Delta (and need g)

# fd warns when the realised step (theta+ - theta-), rounded to the proxy's dtype, has a cosine
# below this with g. bench/numerics.py (3M-parameter proxy): step cosines 0.96 (bf16, eps=0.1)
# and 0.95 (fp16, eps=1e-2) still gave Delta cosines of 0.999 with the exact Delta, 0.64 (bf16,
# eps=1e-2) gave 0.92 and 0.23 (bf16, eps=1e-3) gave 0.08: the small entries of g that round
# away carry little of Delta, so the step's cosine, not the count of unmoved weights, decides.
FD_MIN_COSINE = 0.9


# -- the placements ---------------------------------------------------------------------------


def adjusted_logits(teacher_logits_BV, delta_BV, *, lam, tau, placement: str, greedy: bool,
                    vocab_size: int) -> jax.Array:
  """Logits of the sampling distribution before top-k/top-p (see module docstring).

  delta_BV: Delta on the teacher's V rows (placement "poe": the proxy's log-probs), or None (no
  proxy). lam, tau: scalars (traced in the decode program). greedy: tau=0, the argmax is taken
  of log p + lam * Delta ("poe": of (1 - lam) log p + lam log p_P).
  vocab_size: ids from it on are set to -inf.
  """
  teacher_logits_BV = teacher_logits_BV.astype(jnp.float32)
  teacher_logp_BV = jax.nn.log_softmax(teacher_logits_BV, axis=-1)
  lam_delta = 0.0 if delta_BV is None else lam * delta_BV
  if placement == "poe" and delta_BV is not None:
    mixed = (1.0 - lam) * teacher_logp_BV + lam_delta
    out = mixed if greedy else mixed / tau
  elif greedy:
    out = teacher_logp_BV + lam_delta
  elif placement in ("paper", "poe"):  # "poe" without the proxy: temperature sampling
    out = teacher_logp_BV / tau + lam_delta
  else:
    out = (teacher_logits_BV + lam_delta) / tau
  if vocab_size < out.shape[-1]:
    out = jnp.where(jnp.arange(out.shape[-1]) < vocab_size, out, -jnp.inf)
  return out


def _pad_delta(delta_BW, vocab):
  """Delta on the proxy's W rows, cut or zero-extended to the teacher's V rows."""
  w = delta_BW.shape[-1]
  if w == vocab:
    return delta_BW
  if w > vocab:
    return delta_BW[:, :vocab]
  return jnp.pad(delta_BW, ((0, 0), (0, vocab - w)))


# -- preparing the proxy side -----------------------------------------------------------------


def perturbed_states(proxy_state, grad_state, eps):
  """theta +- eps * g, formed in fp32 and rounded to each parameter's dtype."""
  def shift(sign):
    return jax.tree.map(
        lambda p, g: (p.astype(jnp.float32) + sign * eps * g.astype(jnp.float32)).astype(p.dtype),
        proxy_state, grad_state)
  return shift(1.0), shift(-1.0)


@functools.partial(jax.jit, static_argnames="stacked")
def _leaf_rounding(p, a, b, g, *, stacked: bool = False) -> jax.Array:
  """[weights with g != 0, of those unmoved, <step, g>, |step|^2, |g|^2] of one leaf, where
  step = theta+ - theta- (stacked: a holds both, b is unused)."""
  if stacked:
    a, b = a[0], a[1]
  g = g.astype(jnp.float32)
  step = a.astype(jnp.float32) - b.astype(jnp.float32)
  nonzero = g != 0
  return jnp.stack([jnp.sum(nonzero), jnp.sum(nonzero & (a == p) & (b == p)),
                    jnp.sum(step * g), jnp.sum(step * step), jnp.sum(g * g)]).astype(jnp.float32)


def _fd_rounding(theta, plus, minus, grad, *, stacked: bool = False) -> dict[str, jax.Array]:
  """How much of eps*g survived rounding to the parameter dtype: the fraction of weights with
  g != 0 that did not move, and the cosine between (theta+ - theta-) and g. stacked: `plus` is
  the stacked state and `minus` is None.

  One small program per leaf, not one for the tree: XLA kept every leaf's step alive at once
  (1.6 GB of temporaries for SmolLM2-135M's 0.5 GB of weights)."""
  leaves = jax.tree.leaves
  minus_leaves = leaves(plus) if stacked else leaves(minus)
  total = sum(_leaf_rounding(p, a, b, g, stacked=stacked)
              for p, a, b, g in zip(leaves(theta), leaves(plus), minus_leaves, leaves(grad)))
  moving, unmoved, dot, norm_step, norm_g = (total[i] for i in range(5))
  return dict(unmoved_fraction=unmoved / jnp.maximum(moving, 1.0),
              cosine=dot / jnp.maximum(jnp.sqrt(norm_step * norm_g), 1e-30))


@functools.partial(jax.jit, static_argnames="stacked")
def _fd_state(theta, grad, eps, *, stacked: bool):
  """theta +- eps g, stacked on a leading axis of 2 or as a pair."""
  plus, minus = perturbed_states(theta, grad, eps)
  if stacked:
    return jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus)
  return plus, minus


@functools.partial(jax.jit, static_argnames="stacked", donate_argnames="previous")
def _fd_state_into(theta, grad, eps, previous, *, stacked: bool):
  """_fd_state at a new eps, writing into the buffers of the previous eps's state: a sweep
  over eps holds two proxy copies, not four."""
  del previous
  return _fd_state(theta, grad, eps, stacked=stacked)


def _prepare_fd(theta, grad, eps, *, stacked: bool, previous=None):
  """The fd proxy state and its rounding statistics (`_fd_rounding`): the state is the only
  proxy-sized allocation (one program for both peaked at 2.7x the state: SmolLM2-135M's 1.1 GB
  pair at +2.9 GB). previous: the state of another eps, whose buffers are reused."""
  if previous is None:
    state = _fd_state(theta, grad, eps, stacked=stacked)
  else:
    state = _fd_state_into(theta, grad, eps, previous, stacked=stacked)
  if stacked:
    return state, _fd_rounding(theta, state, None, grad, stacked=True)
  return state, _fd_rounding(theta, *state, grad)


def warn_if_fd_rounds_away(stats: dict, eps: float, dtype) -> None:
  """Warns when theta +- eps g, rounded to `dtype`, lost a material part of eps*g."""
  unmoved, cosine = float(stats["unmoved_fraction"]), float(stats["cosine"])
  if cosine < FD_MIN_COSINE:
    message = (
        f"method='fd' with a {jnp.dtype(dtype).name} proxy at eps={eps}: {unmoved:.1%} of the "
        f"weights with a non-zero gradient did not move under theta + eps*g, and the realised "
        f"step has cosine {cosine:.3f} with g: the finite difference is partly rounding noise. "
        "Use method='jvp' (exact in any dtype; the default), raise eps, or load the proxy "
        "in float32.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # once: main routes it to the log too


def _tangent(grad_state, proxy_state):
  """g cast to each parameter's dtype: jax.jvp wants tangents of the primal's dtype."""
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grad_state, proxy_state)


def _prepare_jvp(theta, grad):
  """(theta, g in theta's dtypes), eagerly: where the dtypes match both are the caller's own
  buffers (a jitted version returned copies of both: two more proxy-sized arrays, 1.1 GB for
  SmolLM2-135M in fp32); a bf16 proxy with an fp32 g holds one bf16 copy of g."""
  return theta, _tangent(grad, theta)


# -- Delta at each decode step ----------------------------------------------------------------


def _fd_delta(plus_logits_BV, minus_logits_BV, eps):
  # Logit differences: log-prob differences minus a per-row constant, which softmax ignores.
  return (plus_logits_BV.astype(jnp.float32) - minus_logits_BV.astype(jnp.float32)) / (2.0 * eps)


class _Proxies:
  """Prefill/decode of the proxy side, returning Delta [B, W] at each step.

  poe: state = theta; returns the proxy's log-probs [B, W] instead of Delta.
  fd:  state = ((theta+, theta-) stacked on a leading axis of 2, for one vmapped call per
       step, or a pair for two calls, eps); each copy has its own cache. The difference is
       divided by the traced eps.
  jvp: state = (theta, g); the cache carries its tangent. jvp_stacked: the proxy's products
       take models.bilinear's stacked JVP (each weight read once; False: jax.jvp's own rule,
       kept for benchmarks).
  """

  def __init__(self, graphdef, method: str, fd_stacked: bool, jvp_stacked: bool = True):
    self.graphdef, self.method, self.fd_stacked = graphdef, method, fd_stacked
    self.jvp_stacked = jvp_stacked

  def _poe(self, logits_BW):
    return jax.nn.log_softmax(logits_BW.astype(jnp.float32), axis=-1)

  def _model(self, state) -> Transformer:
    model = nnx.merge(self.graphdef, state)
    # jvp: each weight and cache array read once per step, with its tangent (models.bilinear).
    return stack_tangents(model) if self.method == "jvp" and self.jvp_stacked else model

  def _fd(self, run, state, *cache):
    """Runs both perturbed copies: returns Delta and their caches."""
    params, eps = state
    if self.fd_stacked:
      logits_2BW, cache = jax.vmap(run)(params, *cache)
      return _fd_delta(logits_2BW[0], logits_2BW[1], eps), cache
    (plus_logits, plus_cache), (minus_logits, minus_cache) = (
        run(params[i], *(c[i] for c in cache)) for i in (0, 1))
    return _fd_delta(plus_logits, minus_logits, eps), (plus_cache, minus_cache)

  def prefill(self, state, ids_BP, mask_BP, max_len):
    run = lambda st: self._model(st).prefill(ids_BP, mask_BP, max_len)
    if self.method == "poe":
      logits_BW, cache = run(state)
      return self._poe(logits_BW), cache
    if self.method == "fd":
      return self._fd(run, state)
    theta, g = state
    (_, cache), (dlogits_BW, dcache) = jax.jvp(run, (theta,), (g,))
    return dlogits_BW, (cache, (dcache.k, dcache.v))

  def refill(self, state, cache, rows_R, ids_RP, mask_RP):
    """`Transformer.refill` of the proxy side: Delta [R, W] of the new prompts, and the caches
    (per-row cursors) with them in rows_R."""
    refill = lambda model, c: model.refill(c, rows_R, ids_RP, mask_RP)
    if self.method == "poe":
      logits_RW, cache = refill(self._model(state), cache)
      return self._poe(logits_RW), cache
    if self.method == "fd":
      return self._fd(lambda st, c: refill(self._model(st), c), state, cache)
    theta, g = state
    cache, (dk, dv) = cache

    def run(st, kv):
      logits_RW, c = refill(self._model(st), dataclasses.replace(cache, k=kv[0], v=kv[1]))
      return logits_RW, (c.k, c.v)

    (_, (k, v)), (dlogits_RW, (dk, dv)) = jax.jvp(run, (theta, (cache.k, cache.v)),
                                                  (g, (dk, dv)))
    cache = dataclasses.replace(cache, k=k, v=v).refilled(rows_R, mask_RP)
    return dlogits_RW, (cache, (dk, dv))

  def with_row_cursors(self, cache):
    """The proxy side's caches with per-row cursors (`KVCache.with_row_cursors`)."""
    if self.method == "poe":
      return cache.with_row_cursors()
    if self.method == "fd" and self.fd_stacked:
      return jax.vmap(lambda c: c.with_row_cursors())(cache)
    if self.method == "fd":
      return tuple(c.with_row_cursors() for c in cache)
    cache, tangents = cache
    return cache.with_row_cursors(), tangents

  def decode(self, state, token_B, cache):
    if self.method == "poe":
      logits_BW, cache = self._model(state).decode(token_B, cache)
      return self._poe(logits_BW), cache
    if self.method == "fd":
      return self._fd(lambda st, c: self._model(st).decode(token_B, c), state, cache)
    theta, g = state
    cache, (dk, dv) = cache

    def run(st, kv):
      k, v = kv
      c = dataclasses.replace(cache, k=k, v=v)
      logits_BW, c = self._model(st).decode(token_B, c)
      return logits_BW, (c.k, c.v)

    (_, (k, v)), (dlogits_BW, (dk, dv)) = jax.jvp(run, (theta, (cache.k, cache.v)), (g, (dk, dv)))
    return dlogits_BW, (dataclasses.replace(cache, k=k, v=v, end=cache.end + 1), (dk, dv))


# -- Delta for analysis -----------------------------------------------------------------------


def delta(proxy: Transformer, grad, input_ids_BT, *, method: str = "jvp", eps: float = 1e-2,
          pad_mask_BT=None) -> jax.Array:
  """Delta [B, W] (fp32, W the proxy's rows) at the last position of each row, by a full
  forward (no cache).

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
