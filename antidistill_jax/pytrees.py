"""Flat views of nnx states: {"layers/0/mlp/up_proj/kernel": array}.

Flat string-keyed dicts are what orbax stores, optax updates and error messages name; the
nnx State is rebuilt from them against a template of the same structure.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def path_name(path) -> str:
  return "/".join(map(str, path))


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def flatten(tree) -> dict[str, Any]:
  """{name: array} of an nnx.State, or of a (possibly nested) plain dict of arrays.

  The kind of container is checked, never guessed from the keys: a flat dict keeps its keys
  as they are, whether or not they hold a "/" (the untied `lm_head` has none).
  """
  if isinstance(tree, nnx.State):
    return {path_name(p): _value(v) for p, v in nnx.to_flat_state(tree)}
  if not isinstance(tree, Mapping):
    raise TypeError(f"flatten takes an nnx.State or a dict of arrays, not {type(tree).__name__}.")
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
    else:
      flat[str(key)] = _value(value)
  return flat


def unflatten_like(template, flat: Mapping[str, Any]):
  """An nnx.State shaped like `template` holding the arrays of `flat` (template unchanged)."""
  return nnx.from_flat_state([(p, v.replace(flat[path_name(p)]))
                              for p, v in nnx.to_flat_state(template)])


# -- fingerprints ----------------------------------------------------------------------------

_FINGERPRINT_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two independent 32-bit checksums per leaf


def _mix32(x):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnames="seeds")
def _checksums(x, seeds=_FINGERPRINT_SEEDS):
  """Per seed, sum_i w_i * bits_i mod 2^32 over the elements of `x` rounded to bfloat16.

  bits_i is the bf16 bit pattern (-0 counted as +0); w_i is an odd pseudo-random weight made
  from the element's flat index. Integer sums are exact and associative, so the result does
  not depend on the sharding or the reduction order; odd weights make every change of a single
  element change the checksum, and a random weight per element makes moved or permuted values
  count (a sum or a sum of squares would not see them).
  """
  x16 = x.astype(jnp.bfloat16)
  x16 = jnp.where(x16 == 0, jnp.zeros_like(x16), x16)
  bits = jax.lax.bitcast_convert_type(x16, jnp.uint16).astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  for dim, size in enumerate(x.shape):  # row-major flat index (mod 2^32)
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim)
  return jnp.stack([jnp.sum(bits * (_mix32(index ^ jnp.uint32(s)) | jnp.uint32(1)),
                            dtype=jnp.uint32) for s in seeds])


def fingerprint(tree, salt: str = "") -> str:
  """A short hash of an nnx.State or flat dict of arrays: per leaf its name, shape and two
  32-bit checksums of its values rounded to bfloat16 (see `_checksums`), not its dtype.

  Rounding first makes a checkpoint the same whether it is held in fp32 or bf16 (an fp32
  checkpoint loaded as bf16 rounds to exactly those values); values that differ below bf16
  precision are the same here. Only 2 numbers per leaf leave the device.
  """
  h = hashlib.sha256(salt.encode())
  for name, x in sorted(flatten(tree).items()):
    sums = np.asarray(jax.device_get(_checksums(jnp.asarray(x))))
    h.update(f"{name}:{tuple(x.shape)}:{':'.join(map(str, sums.tolist()))};".encode())
  return h.hexdigest()[:16]
