"""Grouped-query attention (no repeated K/V), fp32 softmax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models import bilinear
from antidistill_jax.models.cache import squeeze
from antidistill_jax.models.config import ModelConfig
from antidistill_jax.models.layers import apply_rope, linear


# The masked logit of jax.nn.dot_product_attention's XLA path.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
           mask_BTS: jax.Array, *, squeezed: tuple[int, ...] = (),
           stack_tangents: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the keys that mask_BTS allows -> [B, T, N, H].

  Keys and values come head-major, [B, K, S, H] (the cache's layout, `models.cache`): the two
  products are then batched over (B, K), their leading axes, as a batched matmul wants them.
  With [B, S, K, H] XLA:CPU copied each layer's whole K and V caches into that order at every
  decode step, two more reads and writes of the cache per step (bench/RESULTS.md, "Decoding
  at the roofline": 1.15-1.35x the tokens/s without them at 512 new tokens, batch 8).

  GQA: query head n = kv_head * G + g (HF's repeat_kv grouping); K/V are never repeated.
  A grouped einsum (jax.nn.dot_product_attention would want [B, S, K, H]); logits and softmax
  in fp32 whatever the input dtype. fp32 inputs take the default matmul precision, so the fp32
  parity tests (jax_default_matmul_precision=float32) see full fp32. For bf16 inputs the
  probabilities P are not rounded to bf16 for the P.V product: P = P_hi + P_lo, both bf16,
  stacked on one axis so V is read once in its own dtype, with fp32 accumulation (P keeps ~16
  bits where one bf16 cast keeps 8). Rounding P to bf16, as jax.nn.dot_product_attention does,
  put our bf16 log-probs further from fp32 than torch's bf16 (SmolLM2-135M: mean error 0.104
  against torch's 0.095 nats); with the split, 0.084 (tests/test_real_model.py). It doubles the
  P.V flops, a small part of a step, and adds no weight or cache reads.
  Masked logits become -0.7 * finfo(fp32).max (jax.nn.dot_product_attention's XLA value), a
  finite value: a fully masked row (a left-pad query) softmaxes to a finite uniform row instead
  of NaN, and its values, gradients and jvp tangents stay finite; real rows give exactly zero
  weight (and zero gradient) to masked keys.

  squeezed: the axes of [B, K, S, H] (0: B, 1: K, both of size 1) that k and v leave out
  (`models.cache`). The products then run on the arrays as they are, their subscripts without
  the squeezed letters, and only the small query and output are reshaped: a size-1 axis
  dropped from the cache by a reshape made XLA:CPU copy the cache at every decode step.

  stack_tangents: both products take `bilinear.stacked`'s JVP, so a jax.jvp through them reads
  K and V once each (q and its tangent, P and its tangent, stacked).

  Plain XLA ops, not a fused kernel: cuDNN flash attention and the TPU Pallas kernels (splash,
  ragged paged attention) are custom_vjp or have no derivatives, so the exact-JVP Delta's
  jax.jvp through the proxy could not pass them; they could serve the teacher only.
  """
  dtype = q_BTNH.dtype
  b, t, n, h = q_BTNH.shape
  kv = 1 if 1 in squeezed else k_BKSH.shape[-3]
  gone = "".join("bk"[axis] for axis in squeezed)
  spec = lambda s: "".join(c for c in s if c not in gone)
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  q_BTKGH = jax.lax.squeeze(q_BTKGH, tuple(2 * axis for axis in squeezed))  # b: 0, k: 2
  mask_BTS = jax.lax.squeeze(mask_BTS, (0,) if 0 in squeezed else ())
  einsum = functools.partial(bilinear.einsum, stack_tangents=stack_tangents,
                             preferred_element_type=jnp.float32)
  logits_BKGTS = einsum(f"{spec('btkgh')},{spec('bksh')}->{spec('bkgts')}", q_BTKGH,
                        k_BKSH.astype(dtype)) * jnp.float32(h ** -0.5)
  mask_BKGTS = jnp.expand_dims(mask_BTS, tuple(spec("bkgts").index(c) for c in spec("kg")))
  logits_BKGTS = jnp.where(mask_BKGTS, logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  # Outputs in the products' own (b, k, ...) order, then the small [B, K, G, T, H] is moved:
  # XLA:CPU cannot run a bf16 x bf16 -> fp32 dot whose output it must permute.
  if dtype == jnp.float32:
    out_BKGTH = einsum(f"{spec('bkgts')},{spec('bksh')}->{spec('bkgth')}", probs_BKGTS,
                       v_BKSH.astype(dtype))
  else:
    hi = probs_BKGTS.astype(dtype)
    lo = (probs_BKGTS - hi.astype(jnp.float32)).astype(dtype)
    c = spec("bkgcts").index("c")
    parts_BKG2TH = einsum(f"{spec('bkgcts')},{spec('bksh')}->{spec('bkgcth')}",
                          jnp.stack([hi, lo], axis=c), v_BKSH.astype(dtype))
    out_BKGTH = (jax.lax.index_in_dim(parts_BKG2TH, 0, c, keepdims=False)
                 + jax.lax.index_in_dim(parts_BKG2TH, 1, c, keepdims=False))
  out_BKGTH = jax.lax.expand_dims(out_BKGTH, squeezed)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(dtype)


def write_at(cache_BKSH: jax.Array, new_BKTH: jax.Array, end: jax.Array,
             squeezed: tuple[int, ...] = ()) -> jax.Array:
  """The T new keys (or values) [B, K, T, H] written at slot `end` of every row (int32 []), or
  at each row's own slot (int32 [B], per-row cursors), of a cache stored without the
  `squeezed` axes (`models.cache`)."""
  new_BKTH = squeeze(new_BKTH.astype(cache_BKSH.dtype), squeezed)
  zero = jnp.zeros((), jnp.int32)
  at = lambda x, e: (zero,) * (x.ndim - 2) + (e, zero)  # slot e of every leading index
  if end.ndim == 0:
    return jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH, at(cache_BKSH, end))
  if 0 in squeezed:  # batch 1: the one row's cursor
    return jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH, at(cache_BKSH, end[0]))
  row = lambda c_KSH, n_KTH, e: jax.lax.dynamic_update_slice(c_KSH, n_KTH, at(c_KSH, e))
  return jax.vmap(row)(cache_BKSH, new_BKTH, end)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(d, n * h, cfg.qkv_bias, **kw)
    self.k_proj = linear(d, k * h, cfg.qkv_bias, **kw)
    self.v_proj = linear(d, k * h, cfg.qkv_bias, **kw)
    self.o_proj = linear(n * h, d, cfg.o_bias, **kw)
    self.stack_tangents = False  # see attend; set by models.stack_tangents

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_cache=None, end=None, squeezed=()):
    """Self-attention over the T new tokens -> (out [B, T, D], (k, v)).

    Without a cache, the keys are the T new tokens themselves (mask_BTS is [B, T, T]) and the
    returned (k, v) are theirs, [B, K, T, H] (prefill copies them into a fresh cache). With a
    cache (k, v of [B, K, S, H] without the `squeezed` axes, `models.cache`), the new keys are
    written at slot `end`, the queries attend over all S slots, and the returned (k, v) is the
    updated cache.
    """
    b, t, _ = x_BTD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q_BTNH = apply_rope(self.q_proj(x_BTD).reshape(b, t, n, h), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(self.k_proj(x_BTD).reshape(b, t, k, h), cos_BTH, sin_BTH)
    k_BKTH = k_BTKH.transpose(0, 2, 1, 3)
    v_BKTH = self.v_proj(x_BTD).reshape(b, t, k, h).transpose(0, 2, 1, 3)

    if kv_cache is None:
      k_BKSH, v_BKSH = k_BKTH, v_BKTH
    else:
      k_cache, v_cache = kv_cache
      k_BKSH = write_at(k_cache, k_BKTH, end, squeezed)
      v_BKSH = write_at(v_cache, v_BKTH, end, squeezed)

    out_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS, squeezed=squeezed,
                      stack_tangents=self.stack_tangents)
    out_BTD = self.o_proj(out_BTNH.reshape(b, t, n * h))
    return out_BTD, (k_BKSH, v_BKSH)
