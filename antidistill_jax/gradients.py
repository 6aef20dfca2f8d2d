"""The antidistillation direction g: the gradient of the proxy student's distillation loss.

  l(theta) = (1/N) sum_n (1/|c_n|) sum_{t in c_n} -log p(x_t | x_<t; theta)

over N held-out teacher traces (prompt p_n, completion c_n), loss on completion tokens only,
theta the proxy's parameters.
g = grad l is taken with `jax.grad` over the proxy's nnx.Param state in fp32 (fp32 parameters
and fp32 compute, also for a bf16 proxy, as in the reference), summed over fixed-shape
micro-batches (bounded memory, few compilations) and divided by N once, with the batch sharded
over a mesh's `data` axis when one is given. It is computed once per proxy and trace set and
saved with orbax next to metadata that lets a later run check it belongs to the proxy it is
used with (the same checkpoint in fp32 or bf16 passes the check; see `fingerprint`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import files, parallel, pytrees
from antidistill_jax.models.transformer import Transformer
from antidistill_jax.pytrees import flatten, unflatten_like

# One training sequence as token ids: (prompt ids, completion ids); the loss is on the
# completion only. distill trains on the same pairs.
TokenPair = tuple[Sequence[int], Sequence[int]]


# -- loss ----------------------------------------------------------------------------------


LOSS_CHUNK = 256  # positions unembedded at a time by token_nll


def token_nll(model: Transformer, ids_BT, pad_mask_BT, loss_mask_BT,
              chunk: int | None = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
  """NLL [B, T-1] of each next token and its weight [B, T-1] (loss_mask of the target, fp32).

  Token t is scored by the logits at t - 1; sequences are right-padded (pad_mask_BT = 0).
  The unembedding and log-softmax run over C = `chunk` positions at a time (M chunks) under
  jax.checkpoint, so neither the forward nor the backward pass holds more than a [B, C, V]
  slice of the logits (a 152k vocabulary makes the whole [B, T, V] the largest tensor of training).
  chunk=None computes them in one piece.
  """
  h_BTD = model.hidden_states(ids_BT, pad_mask_BT)[:, :-1]
  targets_BT = ids_BT[:, 1:]
  t = h_BTD.shape[1]

  def nll(h_BCD, targets_BC):
    logp_BCV = jax.nn.log_softmax(model.logits(h_BCD), axis=-1)
    return -jnp.take_along_axis(logp_BCV, targets_BC[..., None], axis=-1)[..., 0]

  if chunk is None or t <= chunk:
    nll_BT = nll(h_BTD, targets_BT)
  else:
    n = -(-t // chunk)
    pad = n * chunk - t
    h_MBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(
        h_BTD.shape[0], n, chunk, -1).swapaxes(0, 1)
    targets_MBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(-1, n, chunk).swapaxes(0, 1)
    nll_MBC = jax.lax.map(lambda xs: jax.checkpoint(nll)(*xs), (h_MBCD, targets_MBC))
    nll_BT = nll_MBC.swapaxes(0, 1).reshape(h_BTD.shape[0], -1)[:, :t]
  return nll_BT, loss_mask_BT[:, 1:].astype(jnp.float32)


def sequence_nll(model: Transformer, ids_BT, pad_mask_BT, loss_mask_BT) -> jax.Array:
  """Per-row mean NLL [B] of the tokens where loss_mask_BT is 1 (0 for rows with none)."""
  nll_BT, mask_BT = token_nll(model, ids_BT, pad_mask_BT, loss_mask_BT)
  return jnp.sum(nll_BT * mask_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)


def pack_examples(examples: Sequence[TokenPair], rows: int, length: int, pad_id: int = 0):
  """Right-padded ids, pad mask and completion (loss) mask, each [rows, length] int32."""
  ids = np.full((rows, length), pad_id, np.int32)
  pad = np.zeros((rows, length), np.int32)
  loss = np.zeros((rows, length), np.int32)
  for i, (prompt, completion) in enumerate(examples):
    seq = list(prompt) + list(completion)
    if len(seq) > length:
      raise ValueError(f"example {i} has {len(seq)} tokens, more than length={length}.")
    ids[i, :len(seq)] = seq
    pad[i, :len(seq)] = 1
    loss[i, len(prompt):len(seq)] = 1
  return ids, pad, loss


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="acc")
def _accumulate(graphdef, params, acc, ids_BT, pad_BT, loss_BT, weight_B):
  """acc + grad of sum_b weight_b * nll_b, and that sum."""
  def total(p):
    return jnp.sum(weight_B * sequence_nll(nnx.merge(graphdef, p), ids_BT, pad_BT, loss_BT))
  value, grad = jax.value_and_grad(total)(params)
  return jax.tree.map(jnp.add, acc, grad), value


def fp32_split(proxy: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of an fp32 twin of `proxy`: its nnx.Param state cast to fp32 (same tree,
  same shardings) and its graph with every module's compute `dtype` set to fp32.

  Casting the parameters alone is not enough: a bf16-loaded proxy's graphdef carries bf16 as
  the compute dtype (Transformer.dtype, the Linear/Embed `dtype`), so its activations would be
  bf16 whatever the parameters; that moves g by ~0.5%. The reference computes g in fp32. The
  twin is the proxy's own graph (merged anew: the proxy is untouched), so every other static
  setting of the proxy (its mesh, say) carries over.
  """
  graphdef, params = nnx.split(proxy, nnx.Param)
  twin = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  for _, node in nnx.iter_graph(twin):
    if isinstance(node, nnx.Module) and getattr(node, "dtype", None) is not None:
      node.dtype = jnp.dtype(jnp.float32)
  return nnx.split(twin, nnx.Param)


def proxy_gradient(proxy: Transformer, examples: Sequence[TokenPair], *, micro_batch_size: int = 8,
                   length_multiple: int = 64, pad_id: int = 0,
                   mesh: Mesh | None = None) -> tuple[nnx.State, dict[str, Any]]:
  """g = grad of the mean completion-only NLL of `proxy` on `examples`, in fp32.

  fp32 parameters and fp32 compute whatever the proxy's own dtypes (see fp32_split); the proxy
  is not modified. Returns (g as an nnx.State shaped like the proxy's nnx.Param state, fp32
  leaves; metadata dict).
  """
  if not examples:
    raise ValueError("proxy_gradient needs at least one (prompt, completion) example.")
  empty = [i for i, (_, c) in enumerate(examples) if len(c) == 0]
  if empty:
    raise ValueError(f"examples {empty[:10]} have empty completions: no loss tokens.")
  graphdef, params = fp32_split(proxy)
  acc = jax.tree.map(jnp.zeros_like, params)
  rows = parallel.round_rows(micro_batch_size, mesh)
  # Longest first: the bucketed lengths then shrink monotonically and few shapes compile.
  order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) + len(examples[i][1])))
  total_loss, n_tokens, t0 = 0.0, 0, time.time()
  for start in range(0, len(order), rows):
    batch = [examples[i] for i in order[start:start + rows]]
    longest = max(len(p) + len(c) for p, c in batch)
    ids, pad, loss = pack_examples(batch, rows, -(-longest // length_multiple) * length_multiple,
                                   pad_id)
    weight = (np.arange(rows) < len(batch)).astype(np.float32)
    arrays = parallel.shard_batch([jnp.asarray(x) for x in (ids, pad, loss, weight)], mesh)
    acc, value = _accumulate(graphdef, params, acc, *arrays)
    total_loss += float(value)
    n_tokens += int(sum(len(c) for _, c in batch))
    logging.info("proxy gradient: %d/%d sequences (%.0f tokens/s)", start + len(batch),
                 len(examples), n_tokens / max(time.time() - t0, 1e-9))
  n = len(examples)
  grad = jax.tree.map(lambda g: g / n, acc)
  norm = float(global_norm(grad))
  if not np.isfinite(norm):  # a g of NaNs would be saved as done and blamed on lam later
    raise FloatingPointError(
        f"the gradient of the model's loss on {n} sequences is not finite (global norm {norm}, "
        f"mean loss {total_loss / n}): its weights or its logits hold a NaN or an overflow. "
        "Check the checkpoint, or load it in float32 or bfloat16 (--config.models.dtype) "
        "rather than float16. Nothing was saved.")
  metadata = dict(proxy_fingerprint=fingerprint(proxy), num_sequences=n,
                  num_completion_tokens=n_tokens, mean_loss=total_loss / n, global_norm=norm)
  return grad, metadata


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# -- identity and validation --------------------------------------------------------------


# config.json keys that say how a checkpoint was stored or written, not what it computes.
_STORAGE_KEYS = ("torch_dtype", "dtype", "transformers_version")


def fingerprint(model: Transformer) -> str:
  """A short hash of a model's checkpoint: its config.json and its parameter values rounded
  to bf16 (see pytrees.fingerprint). The same checkpoint loaded in fp32 or bf16, on one device
  or sharded, has one fingerprint; other weights (another seed, a fine-tune, a perturbed or
  permuted matrix) have another."""
  hf = {k: v for k, v in model.config.hf_config.items() if k not in _STORAGE_KEYS}
  return pytrees.fingerprint(nnx.state(model, nnx.Param), salt=json.dumps(hf, sort_keys=True))


def check_compatible(proxy: Transformer, grad) -> None:
  """Raises ValueError naming every leaf that is missing, extra, or mis-shaped in `grad`."""
  want = {k: tuple(v.shape) for k, v in flatten(nnx.state(proxy, nnx.Param)).items()}
  have = {k: tuple(v.shape) for k, v in flatten(grad).items()}
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = sorted(f"{k}: gradient {have[k]} vs proxy {want[k]}"
                  for k in set(want) & set(have) if want[k] != have[k])
  if missing or extra or shapes:
    raise ValueError(
        "gradient does not match the proxy's parameters: "
        + (f"missing leaves {missing}; " if missing else "")
        + (f"extra leaves {extra}; " if extra else "")
        + (f"mis-shaped leaves {shapes}; " if shapes else "")
        + "recompute it with gradients.proxy_gradient for this proxy checkpoint.")


# -- storage ---------------------------------------------------------------------------------


def save_gradient(path: str | os.PathLike[str], grad, metadata: dict[str, Any]) -> None:
  """Writes g (orbax, one array per parameter) and its metadata (JSON) under `path`."""
  flat = flatten(grad)
  meta = dict(metadata, leaves={k: list(v.shape) for k, v in flat.items()})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(files.absolute(path),
              args=ocp.args.Composite(grad=ocp.args.StandardSave(flat),
                                      metadata=ocp.args.JsonSave(meta)), force=True)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
  path = files.absolute(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no gradient checkpoint at {os.fspath(path)!r}; compute one with "
                            "gradients.proxy_gradient and save it with gradients.save_gradient.")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    return ckpt.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def load_gradient(path: str | os.PathLike[str], proxy: Transformer, *,
                  check_fingerprint: bool = True) -> tuple[nnx.State, dict[str, Any]]:
  """Reads g for `proxy`, validating names and shapes (and the proxy fingerprint) first, and
  places each leaf like the proxy's own parameter."""
  path = files.absolute(path)
  meta = load_metadata(path)
  check_compatible(proxy, {k: np.empty(v, np.uint8) for k, v in meta["leaves"].items()})
  if check_fingerprint and meta.get("proxy_fingerprint") != fingerprint(proxy):
    raise ValueError(
        f"gradient at {os.fspath(path)!r} was computed for proxy "
        f"{meta.get('proxy_fingerprint')}, not for this proxy ({fingerprint(proxy)}); recompute it, or pass check_fingerprint=False.")
  _, params = nnx.split(proxy)
  target = {name: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=getattr(x, "sharding", None))
            for name, x in flatten(params).items()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    flat = ckpt.restore(path, args=ocp.args.Composite(grad=ocp.args.StandardRestore(target)))["grad"]
  return unflatten_like(params, flat), meta
