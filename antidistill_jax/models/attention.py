"""Grouped-query attention through `jax.nn.dot_product_attention` (no repeated K/V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models.config import ModelConfig
from antidistill_jax.models.layers import apply_rope, linear


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           mask_BTS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the keys that mask_BTS allows -> [B, T, N, H].

  jax.nn.dot_product_attention does what the grouped einsum did, checked in jax 0.10.2:
  - GQA: query head n = kv_head * G + g (HF's repeat_kv grouping); the XLA path vmaps over G,
    so K/V are never repeated.
  - Precision: logits in fp32 whatever the input dtype (bf16 inputs use the BF16_BF16_F32 dot
    algorithm), softmax in fp32, probabilities cast to the value dtype for the second matmul.
    fp32 inputs use the default matmul precision, so the fp32 parity tests
    (jax_default_matmul_precision=float32) see full fp32.
  - Masked logits become -0.7 * finfo(fp32).max, a finite value: a fully masked row (a left-pad
    query) softmaxes to a finite uniform row instead of NaN, and its values, gradients and jvp
    tangents stay finite; real rows give exactly zero weight (and zero gradient) to masked keys.
  Measured on CPU: bitwise the same output as the previous grouped einsum, fp32 and bf16
  (B=4, T=S=64, 28 query / 4 kv heads, left-padded rows).

  implementation=None lets JAX choose. In jax 0.10.2 None *is* the XLA path; cuDNN flash
  attention ('cudnn') must be asked for, and we do not: it is a custom_vjp, so the exact-JVP
  Delta's jax.jvp through the proxy could not pass it, and it has no fp32 (should a later JAX
  make None pick cuDNN, that jvp fails loudly; pass 'xla' then). On TPU the fast
  paths are the Pallas kernels (splash attention for prefill, ragged paged attention for
  decode, which would also skip the cache slots not yet written, where the XLA path reads all
  S); the same objections hold (splash is a custom_vjp, ragged paged attention has no
  derivatives at all), so they could serve the teacher only, and this code runs on GPU/CPU.
  """
  dtype = q_BTNH.dtype
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask=mask_BTS[:, None],
      implementation=None)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(d, n * h, cfg.qkv_bias, **kw)
    self.k_proj = linear(d, k * h, cfg.qkv_bias, **kw)
    self.v_proj = linear(d, k * h, cfg.qkv_bias, **kw)
    self.o_proj = linear(n * h, d, cfg.o_bias, **kw)

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
      zero = jnp.zeros((), jnp.int32)
      k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), (zero, end, zero, zero))
      v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), (zero, end, zero, zero))

    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    out_BTD = self.o_proj(out_BTNH.reshape(b, t, n * h))
    return out_BTD, (k_BSKH, v_BSKH)
