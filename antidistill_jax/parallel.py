"""Device meshes and batch placement.

Everything shards the batch over a `data` mesh axis; model weights may also shard over a
`model` axis (see `models.sharding`). Meshes use AxisType.Auto: the models let XLA propagate
activation shardings (GSPMD), and `jax.make_mesh` would otherwise make Explicit axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
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
  """Places each array with its leading (batch) axis split over `data`; no-op without a mesh.

  Every process passes the same whole batch and keeps the rows of its own devices
  (`jax.make_array_from_callback`), so this works on one host and on many."""
  if mesh is None:
    return tuple(arrays)
  data = NamedSharding(mesh, PartitionSpec(DATA))
  return tuple(_place(a, data) for a in arrays)


def replicate(arrays, mesh: Mesh | None):
  """Places each array whole on every device of the mesh; no-op without a mesh."""
  if mesh is None:
    return tuple(arrays)
  return tuple(_place(a, NamedSharding(mesh, PartitionSpec())) for a in arrays)


def _place(array, sharding: NamedSharding) -> jax.Array:
  if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):  # typed keys: place their data
    return jax.random.wrap_key_data(_place(jax.random.key_data(array), sharding),
                                    impl=jax.random.key_impl(array))
  host = np.asarray(array)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
  """numpy copies of (possibly sharded) arrays. An array spread over several hosts is gathered
  whole on every process (process_allgather: all processes must call this together); an array
  this process holds entirely is copied locally, with no collective."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    spread = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable
    tree = jax.tree.map(
        lambda x: multihost_utils.process_allgather(x, tiled=True) if spread(x) else x, tree)
  return jax.device_get(tree)


# -- several processes (multi-host jobs) ----------------------------------------------------------
# Every process runs the same program; only process 0 writes files. Decisions read from files
# (is a stage done? where does a trace file resume?) are process 0's, broadcast, so that every
# process takes the same branch and meets the same collectives.


def is_writer() -> bool:
  """True on the process that writes files: process 0 (the only one on one host)."""
  return jax.process_index() == 0


def agree(value: int) -> int:
  """Process 0's value of a small integer (or bool), on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def everywhere(flag: bool) -> bool:
  """True on every process when `flag` is true on all of them (an all-gather)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def sync(name: str) -> None:
  """Waits until every process reaches this point (after process 0 wrote what others read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
