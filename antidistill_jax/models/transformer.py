"""Decoder-only transformer for Llama-3.x and Qwen2/Qwen2.5, in flax.nnx.

Attribute names mirror the Hugging Face module tree (`embed_tokens`, `layers[i].self_attn.q_proj`,
`norm`, `lm_head`), so the checkpoint mapping is a rename plus a transpose of linear weights.

Entry points (all shapes explicit):
  model(input_ids_BT, pad_mask_BT=None)       -> logits_BTV (fp32); full forward, any padding.
  model.prefill(input_ids_BT, pad_mask_BT, S) -> (logits_BV at the last slot, KVCache of S slots);
                                                 prompts must be LEFT-padded; attention runs
                                                 over the P prompt tokens only.
  model.decode(token_B, cache)                -> (logits_BV, cache); one new token per row.
  model.refill(cache, rows_R, ids_RP, mask_RP) -> (logits_RV, cache); new prompts into rows of a
                                                 per-row-cursor cache (continuous batching).
  model.step(input_ids_BT, cache)             -> (logits_BTV, cache); T new tokens at cache.end.

Sharding: with `mesh` set (models.shard_model sets it), the residual stream [B, T, D] and the
KV cache [B, K, S, H] (its size-1 axes squeezed out, `models.cache`) are pinned to the layouts
of `models.sharding` (batch over `data`, kv heads over `model`); the weights carry their own
NamedShardings and XLA propagates the rest.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax.models import bilinear, sharding
from antidistill_jax.models.attention import Attention
from antidistill_jax.models.cache import KVCache, prompt_layout, prompt_starts, squeeze
from antidistill_jax.models.config import ModelConfig
from antidistill_jax.models.layers import MLP, RMSNorm, rope_cos_sin


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                            param_dtype=param_dtype)
    self.mlp = MLP(cfg, **kw)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_cache=None, end=None, squeezed=()):
    """-> (x_BTD, (k, v)): the updated cache, or the T new keys/values without one."""
    attn_BTD, kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask_BTS,
                                  kv_cache, end, squeezed)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return x_BTD, kv


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               mesh: Mesh | None = None, rngs: nnx.Rngs):
    """dtype: compute dtype of activations; param_dtype: storage dtype of the weights;
    mesh: the mesh the weights live on (usually left None and set by models.shard_model)."""
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    # An explicit, static attribute (hashable, so it lives in the graphdef and survives
    # nnx.split/merge and jit's static arguments) rather than a mesh inferred from where the
    # parameters happen to be: None means no sharding constraints at all, and a model whose
    # weights were placed by hand says which mesh its activations belong to.
    self.mesh = mesh
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      # [V, D] like HF's lm_head.weight (and like the embedding), so unembedding is one einsum
      # for tied and untied models alike.
      self.lm_head = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                        param_dtype))

  # -- core ---------------------------------------------------------------------------------

  def embed(self, input_ids_BT: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] in the compute dtype."""
    return self.embed_tokens(input_ids_BT).astype(self.dtype)

  def _blocks(self, x_BTD, positions_BT, mask_BTS, kv_layers=None, end=None, squeezed=()):
    """Blocks + final norm -> (h_BTD, per-layer (k, v)): the updated caches when kv_layers
    (per layer (k, v) of [B, K, S, H] without the `squeezed` axes) is given, else the T new
    keys/values [B, K, T, H]."""
    cos_BTH, sin_BTH = rope_cos_sin(positions_BT, jnp.asarray(self.config.inv_freq()), self.dtype)
    x_BTD = self._pin_residual(x_BTD)
    kv_out = []
    for i, layer in enumerate(self.layers):
      with jax.named_scope(f"layer_{i}"):
        kv = None if kv_layers is None else kv_layers[i]
        x_BTD, kv = layer(x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, end, squeezed)
        x_BTD = self._pin_residual(x_BTD)
      kv_out.append(kv)
    return self.norm(x_BTD), kv_out

  def _pin_residual(self, x_BTD):
    return sharding.constrain(x_BTD, sharding.RESIDUAL_AXES, self.mesh)

  def hidden(self, x_BTD, positions_BT, mask_BTS, cache: KVCache | None = None):
    """Blocks + final norm on embeddings x_BTD: hidden states [B, T, D] and the updated cache.

    mask_BTS[b, t, s] says whether query t may attend to key s (s indexes the cache slots when
    a cache is given, the T new tokens otherwise).
    """
    if cache is None:
      return self._blocks(x_BTD, positions_BT, mask_BTS)[0], None
    h_BTD, kv = self._blocks(x_BTD, positions_BT, mask_BTS, list(zip(cache.k, cache.v)),
                             cache.end, cache.squeezed)
    cache = dataclasses.replace(cache, k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv),
                                end=cache.end + x_BTD.shape[1])
    return h_BTD, cache.constrain(self.mesh)

  def unembed_table(self) -> jax.Array:
    """[V, D]: the embedding itself when tied (no copy), else lm_head."""
    return self.embed_tokens.embedding[...] if self.config.tie_embeddings else self.lm_head[...]

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """fp32 logits [..., V] from hidden states; the matmul runs in the compute dtype."""
    table_VD = self.unembed_table().astype(h_BTD.dtype)
    return jnp.einsum("...D,VD->...V", h_BTD, table_VD, preferred_element_type=jnp.float32)

  # -- entry points -------------------------------------------------------------------------

  def __call__(self, input_ids_BT: jax.Array, pad_mask_BT: jax.Array | None = None) -> jax.Array:
    """Full causal forward -> fp32 logits [B, T, V].

    pad_mask_BT (1 = real token) may pad on either side; each row's positions count its real
    tokens only, so a padded row gives the same logits as the row alone.
    """
    return self.logits(self.hidden_states(input_ids_BT, pad_mask_BT))

  def hidden_states(self, input_ids_BT: jax.Array, pad_mask_BT: jax.Array | None = None):
    """The full forward up to the final norm: [B, T, D]; `__call__` without the unembedding
    (losses unembed it in chunks to bound the [B, T, V] memory)."""
    _, t = input_ids_BT.shape
    causal_TT = jnp.tril(jnp.ones((t, t), bool))
    if pad_mask_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), input_ids_BT.shape)
      mask_BTS = causal_TT[None]
    else:
      pad_mask_BT = pad_mask_BT.astype(bool)
      positions_BT = jnp.maximum(jnp.cumsum(pad_mask_BT, axis=1, dtype=jnp.int32) - 1, 0)
      mask_BTS = causal_TT[None] & pad_mask_BT[:, None, :]
    return self.hidden(self.embed(input_ids_BT), positions_BT, mask_BTS)[0]

  def step(self, input_ids_BT: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends T tokens per row at cache.end; fp32 logits [B, T, V] and the new cache."""
    positions_BT, mask_BTS = cache.query_layout(input_ids_BT.shape[1])
    h_BTD, cache = self.hidden(self.embed(input_ids_BT), positions_BT, mask_BTS, cache)
    return self.logits(h_BTD), cache

  def prefill(self, input_ids_BT: jax.Array, pad_mask_BT: jax.Array, max_len: int):
    """Runs LEFT-padded prompts into a fresh cache of `max_len` slots.

    The prompt attends to itself only ([B, P, P] causal + left-pad mask, positions counted from
    each row's first real token); its keys/values then fill slots [0, P) of the cache. Memory
    scales with P^2, not P * max_len: no query may see a slot past the prompt anyway.

    Returns fp32 logits [B, V] at the last prompt slot (the next-token distribution of every
    row) and the cache. Only the last slot is unembedded: no [B, T, V] buffer.
    """
    t = input_ids_BT.shape[1]
    if max_len < t:
      raise ValueError(f"cache length {max_len} is shorter than the padded prompt length {t}.")
    start_B = prompt_starts(pad_mask_BT)
    positions_BT, mask_BTT = prompt_layout(start_B, t)
    h_BTD, kv = self._blocks(self.embed(input_ids_BT), positions_BT, mask_BTT)
    cache = KVCache.from_prompt([k for k, _ in kv], [v for _, v in kv], max_len, start_B,
                                self.dtype)
    return self.logits(h_BTD[:, -1]), cache.constrain(self.mesh)

  def refill(self, cache: KVCache, rows_R: jax.Array, input_ids_RP: jax.Array,
             pad_mask_RP: jax.Array) -> tuple[jax.Array, KVCache]:
    """Prefills R LEFT-padded prompts into rows_R of a per-row-cursor cache
    (`KVCache.with_row_cursors`), leaving the other rows as they are: each prompt attends to
    itself as in `prefill`, its keys/values replace slots [0, P) of its row, and the row's
    start and end are reset. rows_R entries >= B are dropped (padding of a fixed R).

    Returns fp32 logits [R, V] at each prompt's last slot and the cache."""
    t = input_ids_RP.shape[1]
    if cache.end.ndim != 1:
      raise ValueError("refill needs per-row cursors: cache.with_row_cursors().")
    if cache.max_len < t:
      raise ValueError(f"cache length {cache.max_len} is shorter than the padded prompt "
                       f"length {t}.")
    positions_RT, mask_RTT = prompt_layout(prompt_starts(pad_mask_RP), t)
    h_RTD, kv = self._blocks(self.embed(input_ids_RP), positions_RT, mask_RTT)
    write = functools.partial(_write_rows, rows_R=rows_R, squeezed=cache.squeezed)
    cache = dataclasses.replace(cache, k=tuple(write(c, k) for c, (k, _) in zip(cache.k, kv)),
                                v=tuple(write(c, v) for c, (_, v) in zip(cache.v, kv)))
    cache = cache.refilled(rows_R, pad_mask_RP)
    return self.logits(h_RTD[:, -1]), cache.constrain(self.mesh)

  def decode(self, token_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One new token per row -> fp32 logits [B, V] and the cache advanced by one slot."""
    logits_B1V, cache = self.step(token_B[:, None], cache)
    return logits_B1V[:, 0], cache


def _write_rows(cache_BKSH, new_RKPH, rows_R, squeezed):
  """new_RKPH into slots [0, P) of rows_R (entries >= B dropped) of a cache stored without the
  `squeezed` axes."""
  new_RKPH = new_RKPH.astype(cache_BKSH.dtype)
  p = new_RKPH.shape[2]
  if 0 in squeezed:
    # Batch 1: the one row's slots [0, P) are rewritten in place, with the prompt of the rows_R
    # entry that names row 0, or with their own contents where none does (a scatter through
    # the four-axis layout copied the whole cache at every refill).
    hit_R = rows_R == 0
    new_KPH = squeeze(new_RKPH[jnp.argmax(hit_R)][None], squeezed)
    old_KPH = jax.lax.slice_in_dim(cache_BKSH, 0, p, axis=-2)
    new_KPH = jnp.where(jnp.any(hit_R), new_KPH, old_KPH)
    return jax.lax.dynamic_update_slice(cache_BKSH, new_KPH, (0,) * cache_BKSH.ndim)
  new_RKPH = squeeze(new_RKPH, squeezed)  # one KV head: [R, P, H]
  return cache_BKSH.at[rows_R, ..., :p, :].set(new_RKPH, mode="drop")


def stack_tangents(model: Transformer) -> Transformer:
  """Gives every linear map and attention product of `model` the stacked JVP of
  `models.bilinear`, in place: a jax.jvp through the model then reads each weight and each
  cache array once (with its tangent once), where the plain rule reads weights twice. The
  values and derivatives are the same products on the same operands. The unembedding keeps the
  plain rule: under jvp its primal logits are usually dropped, and XLA then never computes
  them. For a model merged inside a traced function (the sampler's proxy); returns it."""
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear):
      module.dot_general = bilinear.dot_general
    elif isinstance(module, Attention):
      module.stack_tangents = True
  return model
