"""Grouped-query attention as a grouped einsum (no repeated K/V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models.config import ModelConfig
from antidistill_jax.models.layers import apply_rope, linear

# Masked logits get the most negative finite fp32, not -inf: a fully masked row (a left-pad
# query) then softmaxes to a finite uniform row instead of NaN, and exp(min - max) is exactly
# 0, so real rows see exactly zero weight (and zero gradient) on masked keys.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


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
    """Self-attention over the T new tokens.

    Without a cache, keys are the T new tokens themselves (mask_BTS is [B, T, T]). With a
    cache (k, v of [B, S, K, H]), the new keys are written at slot `end` and the queries attend
    over all S slots; returns the updated (k, v) too.
    """
    b, t, _ = x_BTD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q_BTNH = apply_rope(self.q_proj(x_BTD).reshape(b, t, n, h), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(self.k_proj(x_BTD).reshape(b, t, k, h), cos_BTH, sin_BTH)
    v_BTKH = self.v_proj(x_BTD).reshape(b, t, k, h)

    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      zero = jnp.zeros((), jnp.int32)
      k_BSKH = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), (zero, end, zero, zero))
      v_BSKH = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), (zero, end, zero, zero))
      new_cache = (k_BSKH, v_BSKH)
    else:
      k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None

    # Query head n = kv_head * G + g, the same grouping as HF's repeat_kv.
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(q_BTKGH.dtype),
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, _MASK_VALUE)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    out_BTD = self.o_proj(out_BTKGH.reshape(b, t, n * h).astype(x_BTD.dtype))
    return out_BTD, new_cache
