"""Grouped-query attention (no repeated K/V), fp32 softmax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models import bilinear
from antidistill_jax.models.config import ModelConfig
from antidistill_jax.models.layers import apply_rope, linear


# The masked logit of jax.nn.dot_product_attention's XLA path, used by the bf16 path too.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           mask_BTS: jax.Array, *, stack_tangents: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the keys that mask_BTS allows -> [B, T, N, H].

  GQA: query head n = kv_head * G + g (HF's repeat_kv grouping); K/V are never repeated.
  Logits and softmax in fp32 whatever the input dtype.
  - fp32 inputs: jax.nn.dot_product_attention (its XLA path), default matmul precision, so the
    fp32 parity tests (jax_default_matmul_precision=float32) see full fp32.
  - bf16 inputs: a grouped einsum in which the probabilities P are not rounded to bf16 for the
    P.V product: P = P_hi + P_lo, both bf16, stacked on one axis so V is read once in its own
    dtype, with fp32 accumulation (P keeps ~16 bits where one bf16 cast keeps 8). Rounding P to
    bf16, as dot_product_attention does, put our bf16 log-probs further from fp32 than torch's
    bf16 (SmolLM2-135M: mean error 0.104 against torch's 0.095 nats); with the split, 0.084
    (tests/test_real_model.py). It doubles the P.V flops, a small part of a step, and adds no
    weight or cache reads.
  Masked logits become -0.7 * finfo(fp32).max in both paths, a finite value: a fully masked
  row (a left-pad query) softmaxes to a finite uniform row instead of NaN, and its values,
  gradients and jvp tangents stay finite; real rows give exactly zero weight (and zero
  gradient) to masked keys.

  stack_tangents: both products take `bilinear.stacked`'s JVP, so a jax.jvp through them reads
  K and V once each (q and its tangent, P and its tangent, stacked); fp32 inputs then take the
  grouped einsum too, with P in fp32.

  Plain XLA ops, not a fused kernel: cuDNN flash attention ('cudnn', which implementation=None
  does not pick in jax 0.10.2) and the TPU Pallas kernels (splash, ragged paged attention) are
  custom_vjp or have no derivatives, so the exact-JVP Delta's jax.jvp through the proxy could
  not pass them; they could serve the teacher only.
  """
  dtype = q_BTNH.dtype
  if dtype == jnp.float32 and not stack_tangents:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype),
                                        mask=mask_BTS[:, None], implementation=None)
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  einsum = functools.partial(bilinear.einsum, stack_tangents=stack_tangents,
                             preferred_element_type=jnp.float32)
  logits_BKGTS = einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(dtype)) * jnp.float32(h ** -0.5)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  if dtype == jnp.float32:
    return einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH.astype(dtype)).reshape(b, t, n, h)
  hi = probs_BKGTS.astype(dtype)
  lo = (probs_BKGTS - hi.astype(jnp.float32)).astype(dtype)
  parts_2BTKGH = einsum("bkgcts,bskh->cbtkgh", jnp.stack([hi, lo], axis=3), v_BSKH.astype(dtype))
  out_BTKGH = parts_2BTKGH[0] + parts_2BTKGH[1]
  return out_BTKGH.reshape(b, t, n, h).astype(dtype)


def write_at(cache_BSKH: jax.Array, new_BTKH: jax.Array, end: jax.Array) -> jax.Array:
  """The T new keys (or values) written at slot `end` of every row (int32 []), or at each row's
  own slot (int32 [B], per-row cursors)."""
  new_BTKH = new_BTKH.astype(cache_BSKH.dtype)
  zero = jnp.zeros((), jnp.int32)
  if end.ndim == 0:
    return jax.lax.dynamic_update_slice(cache_BSKH, new_BTKH, (zero, end, zero, zero))
  row = lambda c_SKH, n_TKH, e: jax.lax.dynamic_update_slice(c_SKH, n_TKH, (e, zero, zero))
  return jax.vmap(row)(cache_BSKH, new_BTKH, end)


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

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_cache=None, end=None):
    """Self-attention over the T new tokens -> (out [B, T, D], (k, v)).

    Without a cache, the keys are the T new tokens themselves (mask_BTS is [B, T, T]) and the
    returned (k, v) are theirs, [B, T, K, H] (prefill copies them into a fresh cache). With a
    cache (k, v of [B, S, K, H]), the new keys are written at slot `end`, the queries attend
    over all S slots, and the returned (k, v) is the updated cache.
    """
    b, t, _ = x_BTD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q_BTNH = apply_rope(self.q_proj(x_BTD).reshape(b, t, n, h), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(self.k_proj(x_BTD).reshape(b, t, k, h), cos_BTH, sin_BTH)
    v_BTKH = self.v_proj(x_BTD).reshape(b, t, k, h)

    if kv_cache is None:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
    else:
      k_cache, v_cache = kv_cache
      k_BSKH = write_at(k_cache, k_BTKH, end)
      v_BSKH = write_at(v_cache, v_BTKH, end)

    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, stack_tangents=self.stack_tangents)
    out_BTD = self.o_proj(out_BTNH.reshape(b, t, n * h))
    return out_BTD, (k_BSKH, v_BSKH)
