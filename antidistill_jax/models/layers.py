"""Building blocks: RMSNorm, rotary embeddings, SwiGLU MLP.

Parameterization follows Hugging Face exactly (norm multiplies by w, rope in rotate_half form,
linear kernels are HF weights transposed to [in, out]) so that a gradient direction over our
parameter tree means the same thing as one over the PyTorch model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models.config import ModelConfig


class RMSNorm(nnx.Module):
  """x / rms(x) * w, computed in fp32 and cast back to the input dtype before the scale."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x32 = x_BTD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x_BTD.dtype)
    return self.scale[...].astype(x_BTD.dtype) * normed


def rope_cos_sin(positions_BT: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, H] for integer positions; angles in fp32, cast to `dtype` like HF.
  inv_freq holds the R = H/2 rotary frequencies; each angle serves both halves of the head."""
  angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
  angles_BTH = jnp.concatenate([angles_BTR, angles_BTR], axis=-1)
  return jnp.cos(angles_BTH).astype(dtype), jnp.sin(angles_BTH).astype(dtype)


def apply_rope(x_BTXH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
  """HF rotate_half rope on [B, T, X, H], X any number of heads (N queries, K keys)."""
  half = x_BTXH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTXH[..., half:], x_BTXH[..., :half]], axis=-1)
  return x_BTXH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


def linear(d_in: int, d_out: int, use_bias: bool, *, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-optional projection with the model's init; kernel is [in, out]."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(d, f, b, **kw)
    self.up_proj = linear(d, f, b, **kw)
    self.down_proj = linear(f, d, b, **kw)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
    return self.down_proj(h_BTF)
