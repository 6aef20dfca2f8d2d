"""Do K students cost less as one vmapped program than as K programs? And does packing
several examples into a row beat padding each to the batch's longest?

  .venv/bin/python bench/students_vmap.py                  # the main job's student shape
  .venv/bin/python bench/students_vmap.py --students=2,4,8 --shapes=32x64,16x128,32x96

The study (configs/synthetic_study.py) trains 22 students per chain; issue 20 proposed training
replicate students as one `jax.vmap`-ed program over stacked parameters, on the premise that on
a laptop 16 students cost little more than one. This measures that premise at the main job's
student shape (`scratch.student` of configs/synthetic.py: Llama-style, d=64, 3 layers, vocab
261): the gradient program (forward + backward of the completion NLL, `gradients.token_nll`) of
one student on a [rows, positions] batch, against `jax.vmap` of it over K students' stacked
parameters and K batches, per student. Also the same token count laid out as fewer, longer rows
(what packing examples into rows would run), and XLA's flop count of each program.

Prints a table and one JSON line (also written to --out when given).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from antidistill_jax import gradients, task_models

import common  # bench/common.py (the script's folder is on sys.path)

_STUDENTS = flags.DEFINE_list("students", ["2", "4", "8"], "K: students per vmapped program")
_SHAPES = flags.DEFINE_list("shapes", ["32x64", "16x128", "32x96", "20x96"],
                            "batch shapes ROWSxPOSITIONS of the single-student program")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed calls per program")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")

SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)  # configs/synthetic.py scratch.student


def main(argv):
  del argv
  tok = task_models.task_tokenizer()
  make = lambda seed: nnx.split(task_models.random_model(tok, model_type="llama", seed=seed,
                                                         **SHAPE), nnx.Param)
  graphdef, params = make(0)

  def value_and_grad(p, ids, pad, loss):
    def total(p):
      nll, mask = gradients.token_nll(nnx.merge(graphdef, p), ids, pad, loss)
      return jnp.sum(nll * mask)
    return jax.value_and_grad(total)(p)

  one = jax.jit(value_and_grad)
  rng = np.random.default_rng(0)
  rows_out = []
  for shape in _SHAPES.value:
    b, t = (int(v) for v in shape.split("x"))
    ids = jnp.asarray(rng.integers(5, 200, (b, t)), jnp.int32)
    ones = jnp.ones((b, t), jnp.int32)
    flops = one.lower(params, ids, ones, ones).compile().cost_analysis().get("flops")
    ms = common.median_ms(lambda: one(params, ids, ones, ones), _REPEATS.value)
    row = dict(shape=shape, tokens=b * t, flops=flops, single_ms=ms,
               gflops_per_s=flops / ms / 1e6 if flops else None, vmapped={})
    for k in (int(v) for v in _STUDENTS.value):
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[make(s)[1] for s in range(k)])
      many = jax.jit(jax.vmap(value_and_grad))
      stack = lambda a: jnp.stack([a] * k)
      ms_k = common.median_ms(lambda: many(stacked, stack(ids), stack(ones), stack(ones)),
                              max(5, _REPEATS.value // 2))
      row["vmapped"][k] = dict(ms=ms_k, ms_per_student=ms_k / k, speedup=ms * k / ms_k)
    rows_out.append(row)

  print(f"\ngradient program of one student ({SHAPE}), cpus {os.cpu_count()}, "
        f"backend {jax.default_backend()}")
  ks = [int(v) for v in _STUDENTS.value]
  print("| rows x positions | tokens | GFLOP | ms | GFLOP/s | "
        + " | ".join(f"vmap K={k}: ms/student (speed-up)" for k in ks) + " |")
  print("|---|---:|---:|---:|---:|" + "---:|" * len(ks))
  for r in rows_out:
    cells = " | ".join(f"{r['vmapped'][k]['ms_per_student']:.1f} ({r['vmapped'][k]['speedup']:.2f}x)"
                       for k in ks)
    gf = "-" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
    rate = "-" if r["gflops_per_s"] is None else f"{r['gflops_per_s']:.0f}"
    print(f"| {r['shape']} | {r['tokens']} | {gf} | {r['single_ms']:.1f} | {rate} | {cells} |")
  common.save_report(dict(shape=SHAPE, cpus=os.cpu_count(), backend=jax.default_backend(),
                          rows=rows_out), _OUT.value)


if __name__ == "__main__":
  app.run(main)
