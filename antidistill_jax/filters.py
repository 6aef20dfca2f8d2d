"""Top-k / top-p (nucleus) logit filters without sorting the vocabulary.

`filter_logits` keeps exactly the tokens `filter_logits_sorted` keeps (the transformers
convention: in descending order, token i is kept iff the probability mass strictly before it
is < top_p; at least one token; every token tied with the last kept value is kept). It never
sorts [B, V]: XLA's sort costs O(V log V) compare-exchanges per row (the sorting filter takes
20 ms for [32, 4096] on a 2-core CPU, 1.0 s for [32, 152064]), while everything here is a
handful of linear passes (0.6-1 ms and 21-26 ms; bench/filters.py).

The nucleus is a threshold on the logit value. With w = exp(x - max) and Z = sum(w), let
G(t) = sum(w[x > t]), the mass strictly above t. The kept set is {x >= t*}, where t* is the
smallest present value with G(t*) < p Z. It is found in three stages:

  1. Candidates. When p Z <= E (the E = `_CANDIDATES` largest weights could hold the
     nucleus, i.e. a peaked distribution, the common case for a trained model), the exact E
     largest values give t* directly if their mass reaches p Z.
  2. Search. Otherwise a bracket lo < t* <= hi, with G(lo) >= p Z > G(hi), is narrowed by
     passes over [B, V], each one masked sum at one pivot. The pivot interpolates the crossing
     inside the bracket (count density taken as uniform in value, so mass ~ exp(x)) and then
     overshoots it by ~sqrt(n) elements towards the farther end, so that both ends close in.
     For 32 near-uniform rows (the slowest row sets the count) that is 6 passes at V=4096 and
     8 at V=152064, where bisection needs 9 and 14; heavy-tailed rows take up to 11. After 32
     passes the pivot falls back to bisection of the float's order-preserving int32 key,
     which ends in at most 32 more.
  3. Resolution. The search stops when the bracket provably holds one value that must be t*
     (its largest or smallest: one max-reduction) or at most `_RESOLVE_K` elements (counted
     by mass: each weighs more than w(lo)); those are taken with a top-k and t* read off their
     cumulative mass.

Top-k values come from `top_values`: per-chunk maxima, the k best chunks, then a top-k over
their elements, exact and 4-10x cheaper than `lax.top_k` over [B, 152064] on CPU; on TPU,
where `lax.top_k` sorts, it turns a [B, V] sort into two small ones.

Floating point: masses here are masked sums over the vocabulary, the reference's are a cumsum
over the sorted row, so a token whose preceding mass is within float32 rounding (~1e-6) of
top_p may be kept by one and not by the other.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Weights below exp(-80) of the maximum (still normal float32) are never kept for top_p < 1:
# the search starts no lower, so w(lo) > 0 and the count bound m_in / w(lo) stays meaningful.
_FLOOR = 80.0
# Relative slack on w(lo) in the exit tests, for exp's and the sums' rounding.
_SLACK = 1.0 - 1e-4
# Interpolated passes before the pivot falls back to key bisection (a bound, never reached by
# the distributions in bench/filters.py).
_INTERP_PASSES = 32
# Overshoot of the interpolated pivot, in sqrt(elements between the estimate and the nearer end).
_OVERSHOOT = 1.5


def filter_logits_sorted(logits_BV, top_k: int | None, top_p) -> jax.Array:
  """Reference filter (sorts the vocabulary): keeps the top_k largest logits, then the smallest
  set of tokens whose probability mass reaches top_p (the token that crosses the threshold is
  kept, as in transformers); the rest become -inf. The tests compare `filter_logits` against
  it; a user may also choose it (it is exact up to the cumsum's rounding, and slow)."""
  if top_k is not None and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # Number of kept tokens: those whose preceding mass is still below top_p (always >= 1).
    keep_B1 = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, keep_B1 - 1, axis=-1)
    filtered_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    logits_BV = jnp.where(jnp.asarray(top_p) >= 1.0, logits_BV, filtered_BV)
  return logits_BV


def filter_logits(logits_BV, top_k: int | None, top_p) -> jax.Array:
  """Keeps the top_k largest logits, then the nucleus of mass top_p; the rest become -inf.

  Same kept set as `filter_logits_sorted`, without a sort. top_k: a static int or None.
  top_p: None, a Python float or a traced scalar (one compiled program serves a sweep);
  top_p >= 1 keeps everything. -inf logits (masked vocabulary) are never kept unless
  everything is kept.
  """
  x_BV = logits_BV.astype(jnp.float32)
  vocab = x_BV.shape[-1]
  skip_p = top_p is None or (isinstance(top_p, (int, float)) and top_p >= 1.0)
  if top_k is not None and top_k < vocab:
    x_BV, vals_BE = top_k_masked(x_BV, top_k)
    if skip_p:
      return jnp.where(x_BV == -jnp.inf, -jnp.inf, logits_BV)
    p = jnp.asarray(top_p, jnp.float32)
    # The top_k values already hold the whole nucleus: no pass over [B, V] beyond a tie count.
    threshold_B1 = _threshold_within_top_k(x_BV, vals_BE, p)
  elif skip_p:
    return logits_BV
  else:
    p = jnp.asarray(top_p, jnp.float32)
    threshold_B1 = nucleus_threshold(x_BV, p)
  kept_BV = x_BV >= threshold_B1
  # top_p >= 1 (traced) keeps every token the top-k left.
  kept_BV = kept_BV | ((p >= 1.0) & (x_BV > -jnp.inf))
  return jnp.where(kept_BV, logits_BV, -jnp.inf)


def top_k_masked(x_BV, k: int) -> tuple[jax.Array, jax.Array]:
  """x_BV with every value below each row's k-th largest set to -inf (ties with it kept), and the
  k largest values ([B, k], descending)."""
  vals_BE = top_values(x_BV, k)
  return jnp.where(x_BV < vals_BE[:, -1:], -jnp.inf, x_BV), vals_BE


def top_values(x_BV, k: int) -> jax.Array:
  """The k largest values of each row, descending (ties repeated), as `lax.top_k(x, k)[0]`.

  Two stages when V splits into at least 2k chunks: every chunk holding one of the k largest
  values has its maximum among the k largest chunk maxima, so a top-k over the maxima, a gather
  of those k chunks and a top-k over their k * chunk elements are exact."""
  batch, vocab = x_BV.shape
  for chunk in (64, 32, 16):
    if vocab % chunk == 0 and vocab // chunk >= 2 * k and k * chunk < vocab // 2:
      x_BMC = x_BV.reshape(batch, vocab // chunk, chunk)
      _, idx_BE = jax.lax.top_k(jnp.max(x_BMC, axis=-1), k)
      picked_BEC = jnp.take_along_axis(x_BMC, idx_BE[:, :, None], axis=1)
      return _top_k_values(picked_BEC.reshape(batch, k * chunk), k)
  return _top_k_values(x_BV, k)


def _top_k_values(x_BX, k: int) -> jax.Array:
  # The values are gathered through the indices: when only `lax.top_k(...)[0]` is used, XLA:CPU
  # may rewrite the TopK into a full sort of the row (measured: 10x slower for [32, 1024]).
  _, idx_BE = jax.lax.top_k(x_BX, k)
  return jnp.take_along_axis(x_BX, idx_BE, axis=-1)


def _threshold_within_top_k(x_BV, vals_BE, p) -> jax.Array:
  """t* when the top-k filter ran first: the nucleus lies inside the top_k values.

  Tokens tied with the k-th value beyond the list are kept by top-k and count in the
  normalizer; they only need counting (they all weigh w(kth))."""
  m_B1 = _finite_or_zero(vals_BE[:, :1])
  w_BE = jnp.exp(vals_BE - m_B1)
  ties_B1 = jnp.sum(x_BV >= vals_BE[:, -1:], axis=-1, keepdims=True) - vals_BE.shape[-1]
  z_B1 = jnp.sum(w_BE, axis=-1, keepdims=True) + ties_B1.astype(jnp.float32) * w_BE[:, -1:]
  return _crossing(vals_BE, w_BE, jnp.zeros_like(z_B1), p * z_B1)


def _crossing(cands_BE, w_BE, g_hi_B1, pz_B1) -> jax.Array:
  """t* from descending candidates that hold the crossing: the last candidate whose preceding
  mass (g_hi plus the candidates before it) is below p Z; at least the first."""
  before_BE = g_hi_B1 + jnp.cumsum(w_BE, axis=-1) - w_BE
  n_B1 = jnp.sum((before_BE < pz_B1) & (cands_BE > -jnp.inf), axis=-1, keepdims=True)
  return jnp.take_along_axis(cands_BE, jnp.maximum(n_B1, 1) - 1, axis=-1)


def _finite_or_zero(v):
  return jnp.where(jnp.isfinite(v), v, 0.0)


# Candidates (stage 1) and the largest bracket resolved by a top-k (stage 3). XLA:CPU's TopK
# costs 2-3x more from k=64 on (0.34 ms against 0.10 ms for k=32 over [32, 1024]).
_CANDIDATES = 16
_RESOLVE_K = 32


def nucleus_threshold(x_BV, p) -> jax.Array:
  """t* per row ([B, 1]): keep x >= t*. x float32, may hold -inf; p a float32 scalar."""
  vocab = x_BV.shape[-1]
  max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  valid_B1 = max_B1 > -jnp.inf  # a row of -inf keeps everything (it stays -inf)
  m_B1 = _finite_or_zero(max_B1)
  w_BV = jnp.exp(x_BV - m_B1)
  z_B1 = jnp.sum(w_BV, axis=-1, keepdims=True)
  pz_B1 = p * z_B1
  done_B1 = ~valid_B1 | (p >= 1.0)

  # Stage 1: candidates, only when some row's nucleus could fit in E weights of at most 1.
  k = min(_CANDIDATES, vocab)
  def with_candidates():
    cands_BE = top_values(x_BV, k)
    w_BE = jnp.exp(cands_BE - m_B1)
    before_BE = jnp.cumsum(w_BE, axis=-1) - w_BE
    # Found when the crossing is inside the list (or the list is the whole row).
    found_B1 = (jnp.sum(before_BE < pz_B1, axis=-1, keepdims=True) < k) | (k == vocab)
    # Unresolved rows search below the last (E-th) candidate c: G(c) <= mass of the first E-1
    # < p Z.
    hi_B1 = cands_BE[:, -1:]
    g_hi_B1 = jnp.sum(jnp.where(cands_BE > hi_B1, w_BE, 0.0), axis=-1, keepdims=True)
    return found_B1, _crossing(cands_BE, w_BE, jnp.zeros_like(z_B1), pz_B1), hi_B1, g_hi_B1
  def without_candidates():
    return jnp.zeros_like(done_B1), m_B1, m_B1, jnp.zeros_like(z_B1)
  if k < vocab:
    found_B1, cand_t_B1, hi_B1, g_hi_B1 = jax.lax.cond(
        jnp.any(~done_B1 & (pz_B1 <= k)), with_candidates, without_candidates)
  else:  # tiny vocabularies: the whole row is the candidate list
    found_B1, cand_t_B1, hi_B1, g_hi_B1 = with_candidates()
  done_B1 = done_B1 | found_B1

  # Stages 2 and 3, only when some row is left.
  def with_search():
    return _search_threshold(x_BV, w_BV, m_B1, z_B1, p, hi_B1, g_hi_B1, done_B1)
  t_B1 = jax.lax.cond(jnp.any(~done_B1), with_search, lambda: m_B1)
  t_B1 = jnp.where(found_B1, cand_t_B1, t_B1)
  return jnp.where(valid_B1, t_B1, -jnp.inf)


class _SearchState(NamedTuple):
  """Bracket lo < t* <= hi of each row ([B, 1] each), in weights w = exp(x - max):
  g_hi = G(hi) < p Z, m_in = mass in (lo, hi], so G(lo) = g_hi + m_in >= p Z.
  last: +1 if the last pass moved hi, -1 if lo, 0 before the first; gain: overshoot factor."""
  lo: jax.Array
  hi: jax.Array
  g_hi: jax.Array
  m_in: jax.Array
  last: jax.Array
  gain: jax.Array


class _Exits(NamedTuple):
  """Which stopping rule holds for each row ([B, 1] booleans)."""
  adjacent: jax.Array
  use_min: jax.Array
  use_max: jax.Array
  few: jax.Array

  @property
  def any(self):
    return self.adjacent | self.use_min | self.use_max | self.few


def _search_threshold(x_BV, w_BV, m_B1, z_B1, p, hi_B1, g_hi_B1, done_B1) -> jax.Array:
  """Stages 2 and 3 for the rows not done: t* ([B, 1]; garbage where done)."""
  pz_B1 = p * z_B1
  # The search starts just below the smallest finite logit, or at the floor (-inf -> floor).
  # Below 0.0 the next float is subnormal, which XLA:CPU flushes to -0.0 (not below it): the
  # smallest normal float's negative is.
  min_B1 = jnp.min(jnp.maximum(x_BV, m_B1 - _FLOOR), axis=-1, keepdims=True)
  lo_B1 = jnp.minimum(jnp.nextafter(min_B1, -jnp.inf), min_B1 - jnp.finfo(jnp.float32).tiny)
  state = _SearchState(lo_B1, hi_B1, g_hi_B1, z_B1 - g_hi_B1, jnp.zeros(lo_B1.shape, jnp.int32),
                       jnp.ones_like(lo_B1))
  state = _search(x_BV, w_BV, m_B1, pz_B1, state, done_B1)

  # Stage 3: read t* off the bracket.
  exit_ = _exits(state, m_B1, pz_B1)
  inside_BV = (x_BV > state.lo) & (x_BV <= state.hi)
  t_B1 = state.hi  # adjacent (and, for an empty bracket from rounding, keeps what lies above hi)
  by_extreme_B1 = ~done_B1 & (exit_.use_min | exit_.use_max)
  def with_extreme(t_B1):
    signed_BV = jnp.where(exit_.use_min, -x_BV, x_BV)
    extreme_B1 = jnp.max(jnp.where(inside_BV, signed_BV, -jnp.inf), axis=-1, keepdims=True)
    extreme_B1 = jnp.where(exit_.use_min, -extreme_B1, extreme_B1)
    return jnp.where(by_extreme_B1 & (extreme_B1 > -jnp.inf), extreme_B1, t_B1)
  t_B1 = jax.lax.cond(jnp.any(by_extreme_B1), with_extreme, lambda t: t, t_B1)
  by_top_k_B1 = ~done_B1 & ~(exit_.adjacent | exit_.use_min | exit_.use_max)
  def with_top_k(t_B1):
    # (min: tiny vocabularies never get here, stage 1 covers them, but this is still traced)
    cands_BE = top_values(jnp.where(inside_BV, x_BV, -jnp.inf), min(_RESOLVE_K, x_BV.shape[-1]))
    t_top_B1 = _crossing(cands_BE, jnp.exp(cands_BE - m_B1), state.g_hi, pz_B1)
    return jnp.where(by_top_k_B1 & (t_top_B1 > -jnp.inf), t_top_B1, t_B1)
  return jax.lax.cond(jnp.any(by_top_k_B1), with_top_k, lambda t: t, t_B1)


def _exits(s: _SearchState, m_B1, pz_B1) -> _Exits:
  """Stopping rules. Every element inside weighs more than w(lo), so:
  adjacent: no float lies strictly between lo and hi, t* = hi.
  use_min: the excess G(lo) - p Z is below one element's weight, so dropping the smallest
           value inside brings G under p Z: t* = min inside.
  use_max: the mass still needed below hi is below one element's weight (or one element is
           inside): t* = max inside.
  few: at most _RESOLVE_K elements inside: a top-k over them finds t*."""
  need_B1 = pz_B1 - s.g_hi
  w_lo_B1 = jnp.exp(s.lo - m_B1) * _SLACK
  adjacent = jnp.nextafter(s.lo, jnp.inf) >= s.hi
  use_min = ~adjacent & (s.m_in - need_B1 < w_lo_B1)
  use_max = ~adjacent & ~use_min & ((need_B1 <= w_lo_B1) | (s.m_in < 2.0 * w_lo_B1))
  few = s.m_in < (_RESOLVE_K + 1) * w_lo_B1
  return _Exits(adjacent, use_min, use_max, few)


def _pivot(s: _SearchState, m_B1, pz_B1, passes) -> jax.Array:
  """Next pivot, strictly inside (lo, hi).

  Uniform count density in value: the mass in (t, hi] grows like exp(hi) - exp(t), which puts
  the crossing at t0. Aim ~sqrt(n) elements past it towards the farther end (the estimate's
  own error is ~sqrt(n)), so that the pass moves that end close to t* and the bracket shrinks
  from both sides; when the same end moves twice running, the model is off: double the aim."""
  width_B1 = s.hi - s.lo
  frac_B1 = jnp.clip((pz_B1 - s.g_hi) / s.m_in, 0.0, 1.0)  # of the bracket's mass, from hi down
  span_B1 = -jnp.expm1(-width_B1)  # 1 - w(lo) / w(hi)
  t0_B1 = s.hi + jnp.log1p(-frac_B1 * span_B1)
  density_B1 = s.m_in / (jnp.exp(s.hi - m_B1) * span_B1)  # elements per unit of logit
  above_B1 = density_B1 * (s.hi - t0_B1)
  below_B1 = density_B1 * (t0_B1 - s.lo)
  shift_B1 = jnp.maximum(_OVERSHOOT * jnp.sqrt(jnp.minimum(above_B1, below_B1) + 1.0), 0.5)
  shift_B1 = s.gain * shift_B1 / density_B1
  t_B1 = jnp.where(below_B1 > above_B1, t0_B1 - shift_B1, t0_B1 + shift_B1)
  t_B1 = jnp.clip(t_B1, s.lo + width_B1 / 64, s.hi - width_B1 / 64)
  t_B1 = jnp.where((t_B1 > s.lo) & (t_B1 < s.hi), t_B1, s.lo + width_B1 / 2)
  # Guaranteed end: bisection of the order-preserving int32 keys (at most 32 more passes).
  key_lo_B1, key_hi_B1 = _key(s.lo), _key(s.hi)
  # floor((a + b) / 2) without int32 overflow.
  t_key_B1 = _from_key((key_lo_B1 >> 1) + (key_hi_B1 >> 1) + (key_lo_B1 & key_hi_B1 & 1))
  return jnp.where(passes >= _INTERP_PASSES, t_key_B1, t_B1)


def _search(x_BV, w_BV, m_B1, pz_B1, state: _SearchState, done_B1) -> _SearchState:
  """Passes until every row meets an exit. Each pass is one masked sum over [B, V]."""

  def active(s):
    return ~done_B1 & ~_exits(s, m_B1, pz_B1).any

  def body(carry):
    s, passes = carry
    t_B1 = _pivot(s, m_B1, pz_B1, passes)
    upper_B1 = jnp.sum(jnp.where((x_BV > t_B1) & (x_BV <= s.hi), w_BV, 0.0), axis=-1,
                       keepdims=True)
    g_t_B1 = s.g_hi + upper_B1
    move_B1 = active(s)
    down_B1 = move_B1 & (g_t_B1 < pz_B1)  # t* <= t: hi comes down
    up_B1 = move_B1 & ~down_B1  # G(t) >= p Z: lo comes up
    last_B1 = jnp.where(down_B1, 1, jnp.where(up_B1, -1, s.last))
    new = _SearchState(
        lo=jnp.where(up_B1, t_B1, s.lo),
        hi=jnp.where(down_B1, t_B1, s.hi),
        g_hi=jnp.where(down_B1, g_t_B1, s.g_hi),
        m_in=jnp.where(down_B1, s.m_in - upper_B1, jnp.where(up_B1, upper_B1, s.m_in)),
        last=last_B1,
        gain=jnp.where(last_B1 == s.last, jnp.minimum(2.0 * s.gain, 1e6), 1.0))
    return new, passes + 1

  state, _ = jax.lax.while_loop(lambda c: jnp.any(active(c[0])), body, (state, jnp.int32(0)))
  return state


def _key(v):
  """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_key(k):
  return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k), jnp.float32)
