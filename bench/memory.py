"""Compiled memory of the whole sampling program at the paper's shapes, with no accelerator.

  python bench/memory.py                                  # 7B teacher + 3B proxy
  python bench/memory.py --batch=64 --prompt_len=256 --max_new_tokens=4096 --modes=plain,jvp,fd
  python bench/memory.py --layers=2                       # quick: 2 layers of each model
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/memory.py --mesh=4,2
                                                          # per device on a (data, model) mesh

Weights are abstract (`nnx.eval_shape`, no allocation): a Qwen2.5-7B-shaped teacher
(DeepSeek-R1-Distill-Qwen-7B) and a Qwen2.5-3B-shaped proxy, g in fp32. The program
(prefill of every model + the decode while_loop of lax.scan chunks) is lowered and compiled for
the host backend and XLA's `memory_analysis()` is read: arguments (weights, g or theta +- eps g,
the batch), outputs, and temporaries. The KV caches are created inside the program, so they are
part of the temporaries; the table separates them (computed from the shapes) from the rest:

  other temporaries = temp - KV caches; goal: other <= 10% of (weights + KV caches).

The host (CPU) compiler's buffer assignment is not a GPU's or TPU's, but the buffers the
program needs (caches, carries, per-step logits) are the same. One exception decides the
default dtype: the CPU compiler has no bf16 matmul and converts each bf16 weight operand to an
fp32 temporary (visible in compiled.as_text()), so a bf16 program analysed on CPU reports
temporaries of twice the weights. The default is therefore fp32 weights and caches, for which
the ratio other / (weights + KV) carries over to bf16 on an accelerator (every term halves).
With --mesh=D,M the weights carry the shardings `models.shard_model` gives them on a (data=D,
model=M) mesh of host devices, the batch is split over `data`, and the figures are per device
(XLA compiles one SPMD program per device; the KV / other split is left out, XLA choosing the
caches' per-device layout): what a TPU v5e-8 (16 GiB per chip) needs from each chip, without
one. "total" = arguments + temporaries + outputs.
Prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from antidistill_jax import sampling
from antidistill_jax.models.config import config_from_hf
from antidistill_jax.models.sharding import named_sharding
from antidistill_jax.models.transformer import Transformer

import common  # bench/common.py (the script's folder is on sys.path)

_BATCH = flags.DEFINE_integer("batch", 64, "rows")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "padded prompt length")
_NEW = flags.DEFINE_integer("max_new_tokens", 4096, "new tokens")
_MODES = flags.DEFINE_list("modes", ["plain", "jvp", "fd"], "plain, jvp, fd")
_LAYERS = flags.DEFINE_integer("layers", 0, "layers of each model (0: the real counts)")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus filter (0: off)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")
_DTYPE = flags.DEFINE_string(
    "dtype", "float32", "weights and caches; the host compiler upcasts bf16 matmul operands to "
    "fp32 copies of the weights, so bf16 figures on CPU overstate temporaries")

_MESH = flags.DEFINE_list("mesh", [], "data,model: shard over a mesh of host devices")


def abstract_model(hf: dict, dtype, mesh=None) -> Transformer:
  """The model with abstract weights; on `mesh`, each weight's ShapeDtypeStruct carries the
  sharding models.shard_model would give it, and the model constrains its activations."""
  cfg = config_from_hf(hf)
  model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=dtype,
                                             rngs=nnx.Rngs(0)))
  if mesh is not None:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      v = var.get_value()
      var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=named_sharding(
          path, v.shape, mesh)))
    model.mesh = mesh
  return model


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  teacher_hf, proxy_hf = dict(common.TEACHER_7B), dict(common.PROXY_3B)
  if _LAYERS.value:
    teacher_hf["num_hidden_layers"] = proxy_hf["num_hidden_layers"] = _LAYERS.value
  mesh = None
  if _MESH.value:
    data, model = map(int, _MESH.value)
    mesh = jax.make_mesh((data, model), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
  teacher, proxy = abstract_model(teacher_hf, dtype, mesh), abstract_model(proxy_hf, dtype, mesh)
  theta = nnx.state(proxy, nnx.Param)
  grad = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                     sharding=getattr(x, "sharding", None)), theta)
  b, p, n = _BATCH.value, _PROMPT.value, _NEW.value
  rows = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
  batch = (jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows),
           jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rows),
           jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows))
  base = sampling.SamplingParams(max_new_tokens=n, tau=1.0, top_p=_TOP_P.value or None)
  slots = p + n
  t_cache = common.kv_bytes(teacher.config, b, slots, dtype)
  p_cache = common.kv_bytes(proxy.config, b, slots, dtype)
  results = []
  for mode in _MODES.value:
    params = base if mode == "plain" else dataclasses.replace(base, lam=1.0, method=mode)
    sampler = sampling.Sampler(teacher, vocab_size=151665, proxy=proxy, grad=grad, mesh=mesh)
    start = time.time()
    compiled = sampler.lower(batch, params).compile()
    seconds = time.time() - start
    mem = compiled.memory_analysis()
    weights = mem.argument_size_in_bytes  # the weights (teacher; theta + g or theta+-), the batch
    caches = t_cache + (0 if mode == "plain" else 2 * p_cache)  # fd: two copies; jvp: + tangent
    if mesh is not None:  # XLA picks the caches' per-device layout: no split to estimate
      caches = None
    other = None if caches is None else mem.temp_size_in_bytes - caches
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
             + mem.output_size_in_bytes)
    results.append(dict(
        mode=mode, arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
        temp=mem.temp_size_in_bytes, weights=weights, kv_caches=caches, other_temp=other,
        other_over_weights_and_kv=None if other is None else other / (weights + caches),
        total=total, compile_seconds=seconds))
  report = dict(backend=jax.default_backend(), batch=b, prompt_len=p, max_new_tokens=n,
                mesh=dict(mesh.shape) if mesh is not None else None,
                teacher=teacher_hf, proxy=proxy_hf, dtype=dtype.name, results=results)
  gib = lambda x: "-" if x is None else f"{x / 2**30:.2f}"
  pct = lambda x: "-" if x is None else f"{x:.1%}"
  print(f"batch {b}, prompt {p}, {n} new tokens, {dtype.name} Qwen2.5-7B-shaped teacher + "
        f"3B-shaped proxy ({teacher.config.num_layers} + {proxy.config.num_layers} layers), "
        f"{jax.default_backend()} compiler"
        + (f", per device on mesh {dict(mesh.shape)}" if mesh is not None else ""))
  print("| mode | arguments GiB | KV caches GiB | temp GiB | other temp GiB | "
        "other / (arguments + KV) | total GiB | compile s |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['mode']} | {gib(r['arguments'])} | {gib(r['kv_caches'])} "
          f"| {gib(r['temp'])} | {gib(r['other_temp'])} | {pct(r['other_over_weights_and_kv'])} "
          f"| {gib(r['total'])} | {r['compile_seconds']:.0f} |")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
