"""Hugging Face checkpoints <-> nnx Transformer.

Loading is lazy and strict. The model is first built abstractly (`nnx.eval_shape`: shapes, no
memory); then each parameter is read from safetensors on its own, converted, and placed
(optionally straight onto a mesh with its NamedSharding), so host memory peaks near one
tensor, not one model. Every file tensor must map to a parameter and every parameter must be
filled, with the right shape; otherwise the error names the tensor and both shapes.

Names: our flat state path joined with '.' is the HF name after `model.` (`lm_head` stays
top-level); `kernel` is HF `weight` transposed ([in, out] vs [out, in]); `scale` and
`embedding` are HF `weight`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from antidistill_jax import parallel
from antidistill_jax.models import sharding as sharding_lib
from antidistill_jax.models.config import ModelConfig, config_to_hf, load_config
from antidistill_jax.models.transformer import Transformer
from antidistill_jax.pytrees import path_name, unflatten_like

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: names the tensor(s) and the shapes."""


def hf_name(path: tuple[str | int, ...]) -> tuple[str, bool]:
  """(HF tensor name, transposed?) of the parameter at flat state path `path`."""
  *head, leaf = [str(p) for p in path]
  transposed = leaf == "kernel"
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  if head == [] and leaf == "lm_head":
    return "lm_head.weight", False
  return "model." + ".".join(head + [leaf]), transposed


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, param_dtype=None) -> Transformer:
  """The model with ShapeDtypeStruct leaves: costs no memory."""
  return nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                                            rngs=nnx.Rngs(0)))


def _tensor_files(path: str) -> dict[str, str]:
  """Maps each tensor name to the safetensors file holding it (single file or sharded)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(path, v))})
    if missing:
      raise FileNotFoundError(f"{index} lists shard files that are missing in {path}: {missing}")
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(
        f"No {SINGLE_FILE} or {INDEX_FILE} in {path!r}. Only safetensors checkpoints are read; "
        "convert a pytorch_model.bin with transformers' save_pretrained(safe_serialization=True).")
  with safe_open(single, framework="numpy") as f:
    return {k: single for k in f.keys()}


def check_checkpoint(path: str | os.PathLike[str]) -> ModelConfig:
  """The checkpoint's config, once its weight files are known to be there (their headers
  read, no tensor): what `from_pretrained` would refuse, found without loading anything.
  FileNotFoundError or ValueError naming the problem otherwise."""
  cfg = load_config(path)
  _tensor_files(os.fspath(path))
  return cfg


def _read_tensors(files: Mapping[str, str], names) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) one tensor at a time, opening each file once per run of names."""
  by_file: dict[str, list[str]] = {}
  for name in names:
    by_file.setdefault(files[name], []).append(name)
  for file, file_names in by_file.items():
    with safe_open(file, framework="numpy") as f:
      for name in file_names:
        yield name, f.get_tensor(name)


def from_pretrained(path: str | os.PathLike[str], *, dtype=jnp.float32, param_dtype=None,
                    mesh: Mesh | None = None, rules=None) -> Transformer:
  """Loads a local HF Qwen2/Llama directory into a Transformer.

  dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
  mesh/rules: place each parameter with `models.sharding` rules; without a mesh, parameters
  go to the default device.
  """
  path = os.fspath(path)
  if mesh is not None:
    sharding_lib.check_mesh(mesh)
  cfg = load_config(path)
  param_dtype = jnp.dtype(param_dtype or dtype)
  model = abstract_model(cfg, dtype, param_dtype)
  graphdef, state = nnx.split(model)
  shapes = {path_name(p): (p, tuple(v.get_value().shape)) for p, v in nnx.to_flat_state(state)}
  files = _tensor_files(path)

  wanted = {}  # HF name -> (our flat name, transposed)
  for name, (p, _) in shapes.items():
    hf, transposed = hf_name(p)
    wanted[hf] = (name, transposed)
  unmapped = sorted(n for n in files if n not in wanted and not _IGNORED.match(n)
                    and not (n == "lm_head.weight" and cfg.tie_embeddings))
  missing = sorted(n for n in wanted if n not in files)
  if unmapped or missing:
    raise CheckpointError(
        f"checkpoint {path!r} does not match the {cfg.model_type} config: "
        + (f"tensors with no parameter: {unmapped}. " if unmapped else "")
        + (f"parameters with no tensor: {missing}." if missing else "")
        + " Check that config.json belongs to these weights and that every shard is present.")

  values: dict[str, Any] = {}
  for hf, array in _read_tensors(files, wanted):
    name, transposed = wanted[hf]
    p, expected = shapes[name]
    shape = tuple(array.shape[::-1]) if transposed else tuple(array.shape)
    if shape != expected:
      hf_expected = expected[::-1] if transposed else expected
      raise CheckpointError(f"tensor {hf!r} in {path!r} has shape {tuple(array.shape)}, the "
                            f"config implies {hf_expected} (parameter {name}).")
    if not np.all(np.isfinite(array.astype(np.float32))):
      raise CheckpointError(f"tensor {hf!r} in {path!r} holds NaN or inf values.")
    host = (array.T if transposed else array).astype(param_dtype)
    if mesh is None:
      values[name] = jnp.asarray(host)
    else:
      s = sharding_lib.named_sharding(p, host.shape, mesh, rules)
      values[name] = jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx])
    del array, host
  logging.info("loaded %s (%s, %.1fM parameters) from %s", cfg.model_type, param_dtype.name,
               cfg.num_params() / 1e6, path)
  model = nnx.merge(graphdef, unflatten_like(state, values))
  model.mesh = mesh  # activations and KV caches are then constrained on it (models.sharding)
  return model


def save_pretrained(model: Transformer, path: str | os.PathLike[str], *, dtype=None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json + safetensors (sharded with an index past max_shard_bytes) that
  transformers' AutoModelForCausalLM.from_pretrained loads. dtype: storage dtype of the
  files (default: the parameters' own). Only process 0 writes."""
  path = os.fspath(path)
  cfg = model.config
  tensors: dict[str, np.ndarray] = {}
  for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = hf_name(p)
    array = np.asarray(parallel.to_host(var.get_value()))
    array = array.T if transposed else array
    tensors[name] = np.ascontiguousarray(array.astype(dtype) if dtype is not None else array)
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  file_dtype = dtype if dtype is not None else next(iter(tensors.values())).dtype
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, file_dtype), f, indent=2, sort_keys=True)

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors without it
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
