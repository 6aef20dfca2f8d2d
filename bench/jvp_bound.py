"""What the exact JVP's extra product costs on this machine: the proxy's matmuls alone, fd vs jvp.

  python bench/jvp_bound.py --width=4 --batch_sizes=1,8,16,64

An exact first-order tangent of a bilinear map needs three products: y = x W and dy = dx W + x g
(the rank of multiplication in the dual numbers R[e]/(e^2) is 3), and `models.bilinear` does it
as two dots, [x; dx] @ W (2B rows, W read once) and x @ g (B rows). The finite difference needs
two, x+ @ (W + eps g) and x- @ (W - eps g), B rows each, and is not exact. Both read two
weight-sized operands, so where a step is bound by memory they cost the same and where it is
bound by arithmetic the JVP costs 1.5x. Which one this machine is, at each batch, bounds the
jvp/fd ratio any exact sampler can reach on it.

The probe is the proxy's MLP at the sampler bench's widths (`bench/sampling.py --width`): L
layers of h + (silu(h Wg) * (h Wu)) Wd, in a scan, weights float32. Per batch: ms of plain (one
weight copy), fd (two copies, two chains), jvp (jax.jvp through `models.bilinear.stacked`
products) and jvp_plain (jax.jvp's own rule: three dots, W read twice), and how one layer
stack's [rows, D] @ Wg scales with its rows (B, 2B, 3B: 1.0x at 2B is memory-bound, 2.0x is
arithmetic-bound); all cells timed round-robin, --repeats rounds after a warm-up, median and
min. Prints JSON and a table.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from antidistill_jax.models import bilinear

import common  # bench/common.py (the script's folder is on sys.path)

_WIDTH = flags.DEFINE_integer("width", 4, "the proxy's hidden and MLP widths times this")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "16", "64"], "rows")
_REPEATS = flags.DEFINE_integer("repeats", 40, "interleaved timed rounds")
_OUT = flags.DEFINE_string("out", "", "also write the JSON here")


def mlp_chain(matmul, weights, h_BD):
  """L residual MLP layers; weights (Wg [L, D, F], Wu [L, D, F], Wd [L, F, D])."""
  def layer(h_BD, w):
    wg_DF, wu_DF, wd_FD = w
    return h_BD + matmul(jax.nn.silu(matmul(h_BD, wg_DF)) * matmul(h_BD, wu_DF), wd_FD), None
  return jax.lax.scan(layer, h_BD, weights)[0]


def programs():
  plain_mm = lambda a, b: a @ b
  stacked_mm = bilinear.stacked(plain_mm)

  def plain(w, g, h):
    del g
    return mlp_chain(plain_mm, w, h)

  def fd(w_plus, w_minus, h):  # two weight copies, as the sampler's fd keeps them
    return mlp_chain(plain_mm, w_plus, h), mlp_chain(plain_mm, w_minus, h)

  def jvp(w, g, h):
    return jax.jvp(lambda w: mlp_chain(stacked_mm, w, h), (w,), (g,))

  def jvp_plain(w, g, h):
    return jax.jvp(lambda w: mlp_chain(plain_mm, w, h), (w,), (g,))

  return {name: jax.jit(f) for name, f in
          dict(plain=plain, fd=fd, jvp=jvp, jvp_plain=jvp_plain).items()}


def interleaved_ms(cells: dict, repeats: int) -> dict[str, dict[str, float]]:
  """cells: name -> (fn, args), timed round-robin (`common.round_robin_seconds`): min and
  median ms."""
  return {name: dict(min=1e3 * float(np.min(t)), median=1e3 * float(np.median(t)))
          for name, t in common.round_robin_seconds(cells, repeats).items()}


def main(argv):
  del argv
  cfg = common.PROXY_CFG
  d, f, layers = (cfg["hidden_size"] * _WIDTH.value, cfg["intermediate_size"] * _WIDTH.value,
                  cfg["num_hidden_layers"])
  keys = jax.random.split(jax.random.key(0), 7)
  shapes = [(layers, d, f), (layers, d, f), (layers, f, d)]
  w = tuple(jax.random.normal(k, s) / s[1] ** 0.5 for k, s in zip(keys[:3], shapes))
  g = tuple(jax.random.normal(k, s) / s[1] ** 0.5 for k, s in zip(keys[3:6], shapes))
  eps = 1e-2
  w_plus = jax.tree.map(lambda a, b: a + eps * b, w, g)
  w_minus = jax.tree.map(lambda a, b: a - eps * b, w, g)
  fns = programs()
  stack_mm = jax.jit(lambda w_LDF, h_RD: jnp.einsum("rd,ldf->lrf", h_RD, w_LDF))
  rows = []
  for batch in map(int, _BATCH_SIZES.value):
    h = jax.random.normal(keys[6], (batch, d))
    cells = {name: (fn, (w_plus, w_minus, h) if name == "fd" else (w, g, h))
             for name, fn in fns.items()}
    for k in (1, 2, 3):
      cells[f"rows_{k}B"] = (stack_mm, (w[0], jax.random.normal(keys[6], (k * batch, d))))
    ms = interleaved_ms(cells, _REPEATS.value)
    row = dict(batch=batch, ms={name: {s: round(v, 3) for s, v in m.items()}
                                for name, m in ms.items()})
    for stat in ("min", "median"):
      row[stat] = dict(jvp_over_fd=round(ms["jvp"][stat] / ms["fd"][stat], 3),
                       jvp_plain_over_fd=round(ms["jvp_plain"][stat] / ms["fd"][stat], 3),
                       rows_2x=round(ms["rows_2B"][stat] / ms["rows_1B"][stat], 3),
                       rows_3x=round(ms["rows_3B"][stat] / ms["rows_1B"][stat], 3))
    rows.append(row)
    print(json.dumps(row), flush=True)
  params = sum(a.size for a in w)
  result = dict(bench="jvp_bound", backend=jax.default_backend(), device=str(jax.devices()[0]),
                width=_WIDTH.value, hidden=d, mlp=f, layers=layers, params=params,
                repeats=_REPEATS.value, rows=rows)
  print(json.dumps(result))
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(result, fh, indent=1)
  print(f"\nThe proxy's MLP alone ({layers} layers, D={d}, F={f}: {params / 1e6:.1f}M float32 "
        f"parameters), {jax.default_backend()}, ms, median (min) of {_REPEATS.value} "
        "interleaved runs; ratios of medians (of mins)\n")
  print("| batch | plain | fd | jvp (stacked) | jvp_plain | jvp / fd | jvp_plain / fd "
        "| product at 2B / B rows | at 3B / B |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    m, a, b = r["ms"], r["median"], r["min"]
    cell = lambda name: f"{m[name]['median']:.2f} ({m[name]['min']:.2f})"
    ratio = lambda key: f"{a[key]:.2f} ({b[key]:.2f})"
    print(f"| {r['batch']} | {cell('plain')} | {cell('fd')} | {cell('jvp')} | "
          f"{cell('jvp_plain')} | {ratio('jvp_over_fd')} | {ratio('jvp_plain_over_fd')} | "
          f"{ratio('rows_2x')} | {ratio('rows_3x')} |")


if __name__ == "__main__":
  app.run(main)
