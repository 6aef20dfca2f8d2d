"""The draw: one token per row, from logits restricted to a top-k / top-p set chosen on a support.

Gumbel-max. `jax.random.categorical(key, l)` is argmax(l + Gumbel(key)). Drawing from l restricted
to a set S is argmax over S of the same perturbed values y = l + Gumbel, so the token can be drawn
first and the filter asked about that one token, not about the whole vocabulary:

  categorical(keys_B, logits_BV)  the same tokens as `jax.vmap(jax.random.categorical)`.
  filtered_categorical(keys_B, logits_BV, support_BV, top_k, top_p)  the same tokens as
      categorical(where(support's kept set, logits, -inf)), the kept set being
      `filters.filter_logits(support_BV, top_k, top_p)`'s, with no search for its threshold
      on most rows.

Nucleus membership of one token. With x the support, w = exp(x - max x), Z = sum(w) and G(v) the
mass strictly above v, `filters` keeps {x >= t*}, t* the smallest present value with G(t*) < p Z.
G does not increase, so token c is kept iff G(x_c) < p Z, or x_c is the row's maximum (at least
one token is kept). That is one pass over the row with exp inside, no separate normalizer and
no maximum (the sign does not depend on the weights' reference point, so `check` takes x_c):

  sum_v w_v ((1 - p) [x_v > x_c] - p [x_v <= x_c]) < 0.

The first candidate is rejected with probability at most 1 - p when the support is the sampled
logits themselves (delta_on="vocab"): the mass outside the nucleus. More often when they differ
(delta_on="nucleus", more so at large lam).

A step: the first candidate of every row and its check (one pass over [B, V] beside the Gumbel
draw). Only if some row was rejected: narrowing (`_narrow`) for rows whose candidate the check
proved outside: t* > x_c puts the kept set inside {x > x_c}, so the argmax of y over that set is
the next candidate, checked the same way (two passes over the row and one check, not the
filter's dozen), up to `NARROWINGS` times; rows still rejected, and rows the check could not
decide (non-finite values), then run the full filter (`_redraw`) and take the argmax of y inside
their kept sets. Both work on the rejected rows alone, `retry_rows(B)` at a time gathered into
[R, V]. Every row's token is the filter's, so only the cost depends on how many are rejected.

Floating point: the check's signed sum and the filter's masked sums round differently, so a
token whose preceding mass is within float32 rounding (~1e-6) of top_p may be kept by one and
not by the other (as between `filters.filter_logits` and the sorting reference).

Why the perturbed logits are written out ([B, V], once) and reduced twice (max, then the first
index of the max): with a single argmax, XLA:CPU fuses the Gumbel transform (two logs per
element) into the argmax's reduction loop, which then runs 1.6x slower over [32, 152064]
(bench/filters.py, "draw" rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from antidistill_jax import filters


# Narrowed candidates a rejected row may try before the filter's search decides it (`_narrow`):
# a narrowing makes three passes over the row, the filter about a dozen, so four of them cost
# about one search, and a row that needs more is better served by the search.
NARROWINGS = 4


def retry_rows(batch: int) -> int:
  """How many rejected rows one wave of narrowing or of the filter takes: B/16, at least 1. Both
  cost in proportion to their rows (the filter on a 2-core CPU at 152k: 0.9-1.2 ms over [1, V],
  1.7-2.2 ms over [2, V]), and at top_p = 0.95 a step rejects B/20 rows on average, so a wide
  wave mostly works on padding: at B = 8 a step with one rejected row took 1.1-1.4 ms longer
  with one-row filter waves, 1.9-2.6 ms with two-row ones (before narrowing). One wave is
  enough in 94%, 81%, 79% and 78% of steps at B = 8, 16, 32 and 64 (binomial, 0.05 a row)."""
  return max(1, -(-batch // 16))


def perturbed(keys_B, logits_BV) -> jax.Array:
  """logits + each row's Gumbel noise, exactly as `jax.random.categorical(key, logits)` draws it."""
  vocab, dtype = logits_BV.shape[-1], logits_BV.dtype
  return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), dtype))(keys_B) + logits_BV


def first_argmax(y_BV) -> jax.Array:
  """`jnp.argmax(y_BV, -1)` (the first maximum) as a max and a compare: two consumers, so XLA
  writes y_BV out instead of fusing its producer into one reduction (the module docstring).
  A row with a NaN gets its first NaN, or its first maximum where that comes earlier: XLA:CPU's
  row max may skip a NaN, and ranking NaN above the maximum cost 1-5% of the draw (the sampler
  raises on any step with non-finite logits, so those tokens are never used)."""
  max_B1 = jnp.max(y_BV, axis=-1, keepdims=True)
  return jnp.argmax((y_BV == max_B1) | jnp.isnan(y_BV), axis=-1).astype(jnp.int32)


def categorical(keys_B, logits_BV) -> jax.Array:
  """One token per row ([B] int32): the tokens of `jax.vmap(jax.random.categorical)` (for a row
  with a NaN, `first_argmax`'s rule)."""
  return first_argmax(perturbed(keys_B, logits_BV))


def filtered_categorical(keys_B, logits_BV, support_BV=None, top_k: int | None = None,
                         top_p=None) -> jax.Array:
  """One token per row ([B] int32) from logits_BV inside support_BV's top-k / top-p set.
  top_k: a static int or None; top_p: None, a float or a traced scalar (>= 1: no nucleus).
  The tokens of the filter, then `jax.random.categorical`, with the same keys:
  categorical(filters.filter_logits(logits_BV, top_k, top_p)) without a support, and
  categorical(where(isfinite(filters.filter_logits(support_BV, top_k, top_p)), logits_BV, -inf))
  with one, up to the rounding noted in the module docstring."""
  own = support_BV is None
  y_BV = perturbed(keys_B, logits_BV)
  skip_p = top_p is None or (isinstance(top_p, (int, float)) and top_p >= 1.0)
  if own and top_k is None and skip_p:
    return first_argmax(y_BV)
  support_BV = logits_BV if own else support_BV
  x_BV = support_BV.astype(jnp.float32)
  if top_k is not None and top_k < x_BV.shape[-1]:
    x_BV = filters.top_k_masked(x_BV, top_k)[0]
  if skip_p:
    return first_argmax(_inside(y_BV, x_BV, own))
  p = jnp.asarray(top_p, jnp.float32)
  c_B = first_argmax(y_BV if top_k is None else jnp.where(x_BV > -jnp.inf, y_BV, -jnp.inf))
  ok_B, outside_B = check(x_BV, c_B, p)

  rows = retry_rows(x_BV.shape[0])

  def redraw(c_B):
    c_B, settled_B = _narrow(y_BV, x_BV, p, c_B, ok_B, outside_B, rows)
    search = lambda c: _redraw(y_BV, support_BV, own, top_k, p, c, settled_B, rows)
    return jax.lax.cond(jnp.any(~settled_B), search, lambda c: c, c_B)
  return jax.lax.cond(jnp.any(~ok_B), redraw, lambda c: c, c_B)


def _inside(y_BV, filtered_BV, own: bool) -> jax.Array:
  """y restricted to a filter's output (filtered: -inf where the filter dropped a token), as the
  old path drew: categorical(filtered) when the filter ran on the sampled logits themselves
  (own: their NaN or +inf tokens stay drawable), categorical(where(isfinite(filtered), logits,
  -inf)) when it ran on a separate support."""
  if own:
    return jnp.where(filtered_BV == -jnp.inf, -jnp.inf, y_BV)
  return jnp.where(jnp.isfinite(filtered_BV), y_BV, -jnp.inf)


def check(x_BV, c_B, p) -> tuple[jax.Array, jax.Array]:
  """(kept_B, outside_B): token c_B is in x_BV's top-p nucleus; it is proven outside (t* > x_c,
  what narrowing needs). Rows where neither holds are left to the filter.

  One signed sum, weights relative to the candidate, w = exp(x - x_c), so no pass for the row's
  maximum. x_c is the maximum (kept at any p) iff nothing lies above it; at p = 0 the sum is then
  exactly 0. A token 88 or more above x_c overflows to +inf, which proves c outside for any
  float32 p < 1, while the weights on the other side are at most 1. A NaN in the row, x_c =
  +-inf, or an overflow at p >= 1 (0 * inf) makes the sum NaN: undecided. A +inf in the row
  with x_c finite makes it +inf: outside, and no later candidate of that row is ever kept (its
  sum stays +inf or NaN), so the filter decides it. At p >= 1 nothing is proven outside (the
  kept set is every token > -inf)."""
  xc_B1 = jnp.take_along_axis(x_BV, c_B[:, None], axis=-1)
  w_BV = jnp.exp(x_BV - xc_B1)
  q = jnp.minimum(p, 1.0)
  signed_B = jnp.sum(jnp.where(x_BV > xc_B1, (1.0 - q) * w_BV, -q * w_BV), axis=-1)
  kept_B = (signed_B < 0.0) | ((signed_B == 0.0) & (q == 0.0))
  return kept_B, ~kept_B & ~jnp.isnan(signed_B) & (q < 1.0)


def _narrow(y_BV, x_BV, p, c_B, ok_B, outside_B, rows: int) -> tuple[jax.Array, jax.Array]:
  """Up to `NARROWINGS` more candidates for each row whose candidate is proven outside, R =
  `rows` rows at a time: the argmax of y over {x > x_c}, x_c the last candidate's support value,
  then its check. The kept set is {x >= t*} with t* > x_c (up to the check's rounding: the
  module docstring), so it lies inside {x > x_c}: a candidate that maximizes y over that
  superset and is kept is the argmax over the kept set (the first index among ties, too).
  Returns (c_B, ok_B): rows still not kept go to `_redraw`."""
  batch = y_BV.shape[0]
  floor_B = jnp.take_along_axis(x_BV, c_B[:, None], axis=-1)[:, 0]
  left = lambda outside_B, tries_B: outside_B & (tries_B < NARROWINGS)

  def wave(carry):
    c_B, ok_B, outside_B, floor_B, tries_B = carry
    idx_R = jnp.nonzero(left(outside_B, tries_B), size=rows, fill_value=batch)[0]
    take = lambda a: jnp.take(a, idx_R, axis=0, mode="clip")
    x_RV, floor_R1 = take(x_BV), take(floor_B)[:, None]
    c_R = first_argmax(jnp.where(x_RV > floor_R1, take(y_BV), -jnp.inf))
    ok_R, outside_R = check(x_RV, c_R, p)
    # max: never lower (a row whose y is -inf over the whole set draws its first index).
    floor_R = jnp.maximum(jnp.take_along_axis(x_RV, c_R[:, None], axis=-1), floor_R1)[:, 0]
    put = lambda a, v: a.at[idx_R].set(v, mode="drop")
    return (put(c_B, c_R), put(ok_B, ok_R), put(outside_B, outside_R), put(floor_B, floor_R),
            put(tries_B, take(tries_B) + 1))

  carry = (c_B, ok_B, outside_B, floor_B, jnp.zeros((batch,), jnp.int32))
  c_B, ok_B, *_ = jax.lax.while_loop(lambda c: jnp.any(left(c[2], c[4])), wave, carry)
  return c_B, ok_B


def _redraw(y_BV, support_BV, own, top_k, p, c_B, ok_B, rows: int) -> jax.Array:
  """The rows whose candidate was rejected, R = `rows` at a time gathered into [R, V]: the full
  filter on each wave's support rows (its search runs over R rows, not B), then the argmax of y
  inside the kept set. Returns c_B with those rows replaced. A finite row's kept set is its own
  up to rounding: the filter's first stage runs for a batch when any of its rows could use it,
  which can move a row's threshold across a token whose preceding mass is within rounding of p.
  A row with a NaN or +inf has no nucleus, and what the filter keeps there can depend on the rows
  filtered with it (all B on the old path, R here), so such a row's token may differ from the
  old path's; the decode flags those steps (non-finite logits)."""
  batch = y_BV.shape[0]

  def wave(carry):
    c_B, ok_B = carry
    idx_R = jnp.nonzero(~ok_B, size=rows, fill_value=batch)[0]  # fill: out of bounds, dropped
    take = lambda a: jnp.take(a, idx_R, axis=0, mode="clip")
    filtered_RV = filters.filter_logits(take(support_BV), top_k, p)
    c_R = first_argmax(_inside(take(y_BV), filtered_RV, own))
    return c_B.at[idx_R].set(c_R, mode="drop"), ok_B.at[idx_R].set(True, mode="drop")

  c_B, _ = jax.lax.while_loop(lambda carry: jnp.any(~carry[1]), wave, (c_B, ok_B))
  return c_B
