"""Device meshes and batch placement.

Everything shards the batch over a `data` mesh axis; model weights may also shard over a
`model` axis (see `models.sharding`). Meshes use AxisType.Auto: the models let XLA propagate
activation shardings (GSPMD), and `jax.make_mesh` would otherwise make Explicit axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh with Auto axes; data=-1 takes every device not used by `model`."""
  devices = list(devices or jax.devices())
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"{len(devices)} devices do not split into model={model} groups.")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, "
                     f"{len(devices)} given.")
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def data_size(mesh: Mesh | None) -> int:
  """Number of batch shards: rows of a batch must be a multiple of it."""
  return 1 if mesh is None else mesh.shape[DATA]


def round_rows(rows: int, mesh: Mesh | None) -> int:
  """`rows` rounded up to a multiple of the data-axis size."""
  k = data_size(mesh)
  return -(-rows // k) * k


def shard_batch(arrays, mesh: Mesh | None):
  """Places each array with its leading (batch) axis split over `data`; no-op without a mesh."""
  if mesh is None:
    return tuple(arrays)
  data = NamedSharding(mesh, PartitionSpec(DATA))
  return tuple(jax.device_put(a, data) for a in arrays)


def to_host(tree):
  """numpy copies of (possibly sharded) arrays; on a multi-host job every process gathers the
  whole array (process_allgather), so all hosts see the same results."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
