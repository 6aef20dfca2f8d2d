"""Products whose forward-mode derivative reads the right-hand operand once.

For a bilinear y = f(a, b) (a matmul x @ W, or q against a cache), jax.jvp computes
f(a, b) and f(da, b) as two products, each reading b, plus f(a, db): three operand-sized reads
where the primal alone needs one. `stacked(f)` computes the first two as one product of b with
a and da stacked on a new leading axis (a vmap over a, b unbatched: XLA folds the stack into
a's free dimensions, so b is read once), then adds f(a, db):

  f([a; da], b) -> (y, f(da, b));   dy = f(da, b) + f(a, db)

The primal is the same product as f(a, b) on the same operands; only the row count of the one
dot changes. Used by the exact-JVP Delta's proxy (`sampling.adjustment`), where a decode step
reads theta, g and the cache and its tangent once each, the same bytes as the finite
difference's two proxy copies and two caches. Reverse mode passes through too (JAX transposes
the rule), but nothing uses it there: training keeps the plain products.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import custom_derivatives


def _is_zero(t) -> bool:
  return isinstance(t, custom_derivatives.SymbolicZero)


def stacked(f: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
  """f(a, b), bilinear in (a, b), with the JVP rule of the module docstring. A zero tangent
  (symbolic: an operand jvp does not differentiate) takes the plain product."""

  @functools.partial(jax.custom_jvp)
  def product(a, b):
    return f(a, b)

  def rule(primals, tangents):
    a, b = primals
    da, db = tangents
    if _is_zero(da):
      y = f(a, b)
      dy = jnp.zeros_like(y) if _is_zero(db) else f(a, db)
      return y, dy
    both = jax.vmap(f, in_axes=(0, None))(jnp.stack([a, da.astype(a.dtype)]), b)
    y, dy = both[0], both[1]
    if not _is_zero(db):
      dy = dy + f(a, db)
    return y, dy

  product.defjvp(rule, symbolic_zeros=True)
  return product


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
  """jax.lax.dot_general with the stacked JVP: a drop-in for nnx.Linear's `dot_general`."""
  f = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                        precision=precision, preferred_element_type=preferred_element_type,
                        out_sharding=out_sharding)
  return stacked(f)(lhs, rhs)


def einsum(spec: str, a, b, *, stack_tangents: bool = False, **kwargs):
  """jnp.einsum(spec, a, b, **kwargs), with the stacked JVP when stack_tangents."""
  f = functools.partial(jnp.einsum, spec, **kwargs)
  return stacked(f)(a, b) if stack_tangents else f(a, b)
