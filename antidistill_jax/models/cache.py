"""KV cache for left-padded batched decoding.

Layout: every row of the batch is left-padded to the same prompt length P and the cache has
S >= P + new_tokens slots. Slots [0, end) are written; row b's real tokens start at slot
start_B[b] (its number of left pads). One write cursor `end` serves all rows because left
padding aligns the last prompt token of every row at slot P - 1, so decode writes one
column at a time with a single dynamic_update_slice.

For row b, the token in slot s has position s - start_B[b], and a query in slot q attends
to key slots start_B[b] <= s <= q. The cache is a plain pytree: `lax.scan` carries it, and a
sampler can carry one per model (teacher, proxy+, proxy-) side by side.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from antidistill_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, S, K, H]
  v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
  start_B: jax.Array  # int32 [B]: first real slot of each row
  end: jax.Array  # int32 []: number of written slots

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, start_B=None) -> "KVCache":
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else start_B.astype(jnp.int32)
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               start_B=start_B, end=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def query_layout(self, num_new: int) -> tuple[jax.Array, jax.Array]:
    """Positions [B, T] and attention mask [B, T, S] for `num_new` tokens written at `end`."""
    q_slot_T = self.end + jnp.arange(num_new, dtype=jnp.int32)
    k_slot_S = jnp.arange(self.max_len, dtype=jnp.int32)
    positions_BT = jnp.maximum(q_slot_T[None, :] - self.start_B[:, None], 0)
    mask_BTS = ((k_slot_S[None, None, :] >= self.start_B[:, None, None])
                & (k_slot_S[None, None, :] <= q_slot_T[None, :, None]))
    return positions_BT, mask_BTS
