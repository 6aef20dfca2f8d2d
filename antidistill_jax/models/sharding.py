"""Where each parameter lives on a device mesh: logical axes per weight, and rules mapping
logical axes to mesh axes.

Every weight has one logical layout (declared here once, derived from its path); a rule
table picks the mesh axis for each logical axis. The default shards vocab, attention heads
and the MLP hidden dimension over a `model` axis when the mesh has one (tensor parallelism)
and replicates them otherwise; `{"embed": "data"}` adds FSDP-style sharding over `data`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: Mapping[str, str | None] = {
    "vocab": "model", "heads": "model", "mlp": "model", "embed": None}

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


def partition_spec(path, shape, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
  """PartitionSpec for one parameter; a dimension that the mesh axis does not divide stays
  replicated (logged), so any model loads on any mesh."""
  rules = DEFAULT_RULES if rules is None else rules
  axes = logical_axes(path)
  spec = []
  for dim, logical in zip(shape, axes + (None,) * (len(shape) - len(axes))):
    mesh_axis = rules.get(logical) if logical else None
    if mesh_axis is not None and mesh_axis in mesh.shape:
      if dim % mesh.shape[mesh_axis]:
        logging.warning("%s: dim %d not divisible by mesh axis %r (%d); replicating it.",
                        "/".join(map(str, path)), dim, mesh_axis, mesh.shape[mesh_axis])
        mesh_axis = None
    else:
      mesh_axis = None
    spec.append(mesh_axis)
  return PartitionSpec(*spec)


def named_sharding(path, shape, mesh: Mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


def shard_model(model, mesh: Mesh, rules=None):
  """Moves every parameter of an nnx model onto `mesh` (in place) and returns the model."""
  check_mesh(mesh)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    var.set_value(jax.device_put(value, named_sharding(path, value.shape, mesh, rules)))
  return model
