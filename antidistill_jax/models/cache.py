"""KV cache for left-padded batched decoding.

Layout: every row of the batch is left-padded to the same prompt length P and the cache has
S >= P + new_tokens slots. Slots [0, end) are written; row b's real tokens start at slot
start_B[b] (its number of left pads). One write cursor `end` serves all rows because left
padding aligns the last prompt token of every row at slot P - 1, so decode writes one
column at a time with a single dynamic_update_slice.

For row b, the token in slot s has position s - start_B[b], and a query in slot q attends
to key slots start_B[b] <= s <= q. The cache is a plain pytree: `lax.scan` carries it, and a
sampler can carry one per model (teacher, proxy+, proxy-) side by side.

Per-row cursors (continuous batching, `sampling.continuous`): `end` may instead be int32 [B],
each row writing at its own slot; a row is then refilled with a new prompt in place
(`Transformer.refill` writes its keys/values into slots [0, P) of that row and `refilled`
resets its start and end), while the other rows go on decoding. Slots past a row's end hold
stale keys of an earlier prompt; the mask never reaches them.

Size-1 axes: the arrays store [B, K, S, H] without the axes of size 1 among (B, K) (one KV
head, MQA; or batch 1), and `squeezed` (static) names the axes left out: [B, S, H] for one KV
head, [K, S, H] at batch 1, [S, H] for both. XLA:CPU copied a cache that kept such an axis four
times per decode step (bench/RESULTS.md, "caches with a size-1 axis"): it fused the slot update
with the reshape that drops the axis for the attention product, so the update was not in place.
Carried and used without the axis (`attention.write_at` and `attend` take `squeezed`), the
cache is updated in place. A cache built by hand with all four axes (squeezed = ()) works too.

Prefill does not attend over the S slots: the prompt attends to itself ([B, P, P], see
`prompt_layout`) and its keys/values fill slots [0, P) of a fresh cache (`from_prompt`). At
the paper's scale (batch 64, 28 heads, P = 256, S = 256 + 4096) that is 0.47 GB of fp32
logits per layer instead of 8 GB.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from antidistill_jax.models import sharding


def _layout(q_slot, k_slot_S, start_B):
  """Positions [B, T] of the query slots (q_slot: [T] shared by the rows, or [B, T]) and mask
  [B, T, S]: start_B[b] <= key slot <= query slot. Left-pad queries (slot < start) get
  position 0 and an all-False row."""
  q_slot_BT = q_slot if q_slot.ndim == 2 else q_slot[None, :]
  positions_BT = jnp.maximum(q_slot_BT - start_B[:, None], 0)
  mask_BTS = ((k_slot_S[None, None, :] >= start_B[:, None, None])
              & (k_slot_S[None, None, :] <= q_slot_BT[:, :, None]))
  return positions_BT, mask_BTS


def prompt_starts(mask_BP: jax.Array) -> jax.Array:
  """First real slot [B] of LEFT-padded prompts: the number of pads."""
  return (mask_BP.shape[1] - jnp.sum(mask_BP.astype(jnp.int32), axis=1)).astype(jnp.int32)


def prompt_layout(start_B: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """Positions [B, P] and causal + left-pad mask [B, P, P] of a LEFT-padded prompt attending
  to itself; the same positions and mask as `KVCache.query_layout` at end = 0, cut to P keys."""
  slots_P = jnp.arange(length, dtype=jnp.int32)
  return _layout(slots_P, slots_P, start_B.astype(jnp.int32))


def size_1_axes(b: int, k: int) -> tuple[int, ...]:
  """The axes of [B, K, S, H] that a cache of batch b and k KV heads does not store."""
  return tuple(axis for axis, n in ((0, b), (1, k)) if n == 1)


def squeeze(x_BKSH: jax.Array, squeezed: tuple[int, ...]) -> jax.Array:
  """[B, K, S, H] (or [B, K, T, H]) without the `squeezed` axes."""
  return jax.lax.squeeze(x_BKSH, squeezed) if squeezed else x_BKSH


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, K, S, H] without the `squeezed` axes
  v: tuple[jax.Array, ...]  # per layer, as k
  start_B: jax.Array  # int32 [B]: first real slot of each row
  end: jax.Array  # int32 [] (or [B], per-row cursors): number of written slots
  # Static: the axes of [B, K, S, H] (0: B, 1: K, each of size 1) the arrays leave out.
  squeezed: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

  @classmethod
  def from_prompt(cls, k_layers, v_layers, max_len: int, start_B: jax.Array, dtype) -> "KVCache":
    """A cache of `max_len` slots holding the prompt's keys/values (per layer [B, K, P, H]) in
    slots [0, P), zeros after, and end = P; size-1 (B, K) axes squeezed out. A pad, not a
    scatter: jvp/grad pass through it."""
    b, k, p, _ = k_layers[0].shape
    squeezed = size_1_axes(b, k)
    def fill(x_BKPH):
      x = squeeze(x_BKPH.astype(dtype), squeezed)
      return jnp.pad(x, ((0, 0),) * (x.ndim - 2) + ((0, max_len - p), (0, 0)))
    return cls(k=tuple(map(fill, k_layers)), v=tuple(map(fill, v_layers)),
               start_B=start_B.astype(jnp.int32), end=jnp.asarray(p, jnp.int32),
               squeezed=squeezed)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[-2]

  def query_layout(self, num_new: int) -> tuple[jax.Array, jax.Array]:
    """Positions [B, T] and attention mask [B, T, S] for `num_new` tokens written at `end`."""
    q_slot = self.end[..., None] + jnp.arange(num_new, dtype=jnp.int32)  # [T] or [B, T]
    return _layout(q_slot, jnp.arange(self.max_len, dtype=jnp.int32), self.start_B)

  def with_row_cursors(self) -> "KVCache":
    """The same cache with one write cursor per row (`end` int32 [B])."""
    end_B = jnp.broadcast_to(self.end, self.start_B.shape).astype(jnp.int32)
    return dataclasses.replace(self, end=end_B)

  def refilled(self, rows_R: jax.Array, mask_RP: jax.Array) -> "KVCache":
    """Start and end of rows_R reset for LEFT-padded prompts mask_RP whose keys/values now fill
    their slots [0, P) (`Transformer.refill` writes those); rows_R entries >= B are ignored."""
    start_B = self.start_B.at[rows_R].set(prompt_starts(mask_RP), mode="drop")
    end_B = self.end.at[rows_R].set(mask_RP.shape[1], mode="drop")
    return dataclasses.replace(self, start_B=start_B, end=end_B)

  def constrain(self, mesh) -> "KVCache":
    """k/v pinned to batch over `data`, kv heads over `model` (replicated when the model axis
    does not divide K); the cache itself without a mesh."""
    axes = tuple(a for i, a in enumerate(sharding.CACHE_AXES) if i not in self.squeezed)
    pin = lambda x: sharding.constrain(x, axes, mesh)
    return dataclasses.replace(self, k=tuple(map(pin, self.k)), v=tuple(map(pin, self.v)))
