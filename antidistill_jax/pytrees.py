"""Flat views of nnx states: {"layers/0/mlp/up_proj/kernel": array}.

Flat string-keyed dicts are what orbax stores, optax updates and error messages name; the
nnx State is rebuilt from them against a template of the same structure.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx


def path_name(path) -> str:
  return "/".join(map(str, path))


def flatten(state) -> dict[str, Any]:
  """{name: array} of an nnx.State (a flat dict passes through)."""
  if isinstance(state, Mapping) and all(isinstance(k, str) and "/" in k for k in state):
    return dict(state)
  return {path_name(p): v.get_value() if hasattr(v, "get_value") else v
          for p, v in nnx.to_flat_state(state)}


def unflatten_like(template, flat: Mapping[str, Any]):
  """An nnx.State shaped like `template` holding the arrays of `flat` (template unchanged)."""
  return nnx.from_flat_state([(p, v.replace(flat[path_name(p)]))
                              for p, v in nnx.to_flat_state(template)])


def fingerprint(tree, salt: str = "") -> str:
  """A short hash of an nnx.State or flat dict: per leaf its name, shape, dtype, and sum and
  sum of squares rounded to 6 digits (stable across devices and summation orders)."""
  import hashlib

  import jax.numpy as jnp
  h = hashlib.sha256(salt.encode())
  for name, x in sorted(flatten(tree).items()):
    x32 = jnp.asarray(x, jnp.float32)
    h.update(f"{name}:{x.shape}:{x.dtype}:{float(jnp.sum(x32)):.5e}:"
             f"{float(jnp.sum(x32 * x32)):.5e}".encode())
  return h.hexdigest()[:16]
