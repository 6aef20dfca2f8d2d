"""Where each parameter lives on a device mesh: logical axes per weight, and rules mapping
logical axes to mesh axes.

Every weight has one logical layout (declared here once, derived from its path); a rule
table picks the mesh axis for each logical axis. The default shards vocab, attention heads
and the MLP hidden dimension over a `model` axis when the mesh has one (tensor parallelism)
and replicates them otherwise; `{"embed": "data"}` adds FSDP-style sharding over `data`.

Activations and the KV cache have their own logical axes and rule table (ACTIVATION_RULES):
batch over `data`, kv heads over `model`. The model pins them with `constrain` when it knows
its mesh (`Transformer.mesh`, set by `shard_model`), so the cache that the decode loop carries
keeps one layout instead of whatever GSPMD propagation picks for each program.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": "model", "heads": "model", "mlp": "model", "embed": None}

# Separate names from the weights' so that a weight rule such as {"embed": "data"} (FSDP) never
# lands on an activation's model dimension next to its batch on `data`.
ACTIVATION_RULES: Mapping[str, str | None] = {"batch": "data", "kv_heads": "model"}
RESIDUAL_AXES = ("batch", None, None)  # [B, T, D]: replicated D, as between Megatron blocks
CACHE_AXES = ("batch", "kv_heads", None, None)  # [B, K, S, H]

_LINEAR_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def logical_axes(path: Sequence[str | int]) -> tuple[str, ...]:
  """Logical axis names of the parameter at `path` (a flat nnx state path)."""
  name = path[-1]
  if name == "embedding" or path[0] == "lm_head":
    return ("vocab", "embed")
  if name == "scale":
    return ("embed",)
  module = path[-2]
  if module in _LINEAR_AXES:
    axes = _LINEAR_AXES[module]
    return axes if name == "kernel" else axes[1:]
  # LoRA factors and other extra leaves are replicated.
  return ()


def check_mesh(mesh: Mesh) -> None:
  """The model's layers let XLA propagate shardings (GSPMD): weights need Auto mesh axes.

  `jax.make_mesh` makes Explicit axes by default, under which every gather and contraction
  over a sharded dimension must state its output sharding; the model does not.
  """
  explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t != jax.sharding.AxisType.Auto]
  if explicit:
    raise ValueError(
        f"mesh axes {explicit} are not Auto: build the mesh for model weights with "
        "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)).")


def _spec(axes, shape, mesh: Mesh, rules: Mapping[str, str | None]):
  """(PartitionSpec, [(dim index, mesh axis) left replicated because it does not divide])."""
  spec, replicated = [], []
  axes = tuple(axes) + (None,) * (len(shape) - len(axes))
  for i, (dim, logical) in enumerate(zip(shape, axes)):
    mesh_axis = rules.get(logical) if logical else None
    if mesh_axis is None or mesh_axis not in mesh.shape:
      mesh_axis = None
    elif dim % mesh.shape[mesh_axis]:
      replicated.append((i, mesh_axis))
      mesh_axis = None
    spec.append(mesh_axis)
  return PartitionSpec(*spec), replicated


def partition_spec(path, shape, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
  """PartitionSpec for one parameter; a dimension that the mesh axis does not divide stays
  replicated (logged), so any model loads on any mesh."""
  spec, replicated = _spec(logical_axes(path), shape, mesh,
                           DEFAULT_RULES if rules is None else rules)
  for i, mesh_axis in replicated:
    logging.warning("%s: dim %d not divisible by mesh axis %r (%d); replicating it.",
                    "/".join(map(str, path)), shape[i], mesh_axis, mesh.shape[mesh_axis])
  return spec


def activation_spec(axes, shape, mesh: Mesh) -> PartitionSpec:
  """PartitionSpec of an activation or cache array under ACTIVATION_RULES. A dimension that its
  mesh axis does not divide is replicated without a warning: that is the expected layout of,
  e.g., Qwen2.5-3B's 2 kv heads on a model axis of 4 (7B's 4 kv heads do shard)."""
  return _spec(axes, shape, mesh, ACTIVATION_RULES)[0]


def constrain(x: jax.Array, axes, mesh: Mesh | None) -> jax.Array:
  """x pinned to its logical `axes` on `mesh` (with_sharding_constraint); x itself when the
  model has no mesh. Under jax.vmap (stacked parameter copies) the mapped axis is left
  unconstrained; under jvp/grad the tangents and cotangents get the same layout."""
  if mesh is None:
    return x
  spec = activation_spec(axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def named_sharding(path, shape, mesh: Mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


def shard_model(model, mesh: Mesh, rules=None):
  """Moves every parameter of an nnx model onto `mesh` (in place), records the mesh as
  `model.mesh` (so a Transformer constrains its activations and cache to it) and returns the
  model."""
  check_mesh(mesh)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    var.set_value(jax.device_put(value, named_sharding(path, value.shape, mesh, rules)))
  model.mesh = mesh
  return model
