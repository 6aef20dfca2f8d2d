"""How exact is Delta in each proxy dtype: fd at several eps and the exact JVP, against the fp32 JVP.

  python bench/numerics.py                              # tiny random Qwen2 proxy, offline
  python bench/numerics.py --proxy=DIR --dtypes=float32,bfloat16

The proxy is loaded in each dtype from one checkpoint; g is the fp32 gradient of its
completion NLL on --sequences random sequences (`gradients.proxy_gradient`), and the reference is
`sampling.delta(method="jvp")` of the fp32 proxy. For each (dtype, method, eps) the table gives
the cosine of Delta with the reference (centred per row, as softmax ignores a per-row constant;
mean over --rows prefixes) and the norm ratio, and for fd how much of eps*g survived rounding
theta +- eps*g to the dtype: the fraction of weights with g != 0 that did not move, and the
cosine of the realised (theta+ - theta-) with g (what `sampling` warns on below 0.99).
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from antidistill_jax import gradients, models, random_checkpoints, sampling
from antidistill_jax.sampling import adjustment

import common  # bench/common.py (the script's folder is on sys.path)

_PROXY = flags.DEFINE_string("proxy", "", "proxy HF dir (default: tiny random Qwen2)")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16", "float16"], "proxy dtypes")
_EPS = flags.DEFINE_list("eps", ["1e-3", "1e-2", "1e-1"], "fd steps")
_SEQUENCES = flags.DEFINE_integer("sequences", 32, "sequences of the gradient")
_ROWS = flags.DEFINE_integer("rows", 8, "prefixes Delta is compared on")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")

PROXY_CFG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2)


def centred_cosine(a, b) -> float:
  a = np.asarray(a, np.float64) - np.mean(a, -1, keepdims=True)
  b = np.asarray(b, np.float64) - np.mean(b, -1, keepdims=True)
  return float(np.mean(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def norm_ratio(a, b) -> float:
  a = np.asarray(a, np.float64) - np.mean(a, -1, keepdims=True)
  b = np.asarray(b, np.float64) - np.mean(b, -1, keepdims=True)
  return float(np.mean(np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    path = _PROXY.value or random_checkpoints.make_tiny_checkpoint(
        os.path.join(tmp, "proxy"), seed=1, **PROXY_CFG)
    proxies = {d: models.from_pretrained(path, dtype=jnp.dtype(d)) for d in _DTYPES.value}
    reference_proxy = models.from_pretrained(path, dtype=jnp.float32)
  vocab = reference_proxy.config.vocab_size
  rng = np.random.default_rng(0)
  examples = [(rng.integers(0, vocab, 16).tolist(), rng.integers(0, vocab, 48).tolist())
              for _ in range(_SEQUENCES.value)]
  grad, meta = gradients.proxy_gradient(reference_proxy, examples, micro_batch_size=8)
  abs_g = np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree.leaves(grad)])
  ids = jnp.asarray(rng.integers(0, vocab, (_ROWS.value, 24)))
  exact = np.asarray(sampling.delta(reference_proxy, grad, ids, method="jvp"))

  results = []
  for dtype, proxy in proxies.items():
    theta = nnx.split(proxy)[1]
    cells = [("jvp", None)] + [("fd", float(e)) for e in _EPS.value]
    for method, eps in cells:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the table reports what it warns on
        d = np.asarray(sampling.delta(proxy, grad, ids, method=method, eps=eps or 1e-2))
      row = dict(dtype=dtype, method=method, eps=eps, cosine=centred_cosine(d, exact),
                 norm_ratio=norm_ratio(d, exact), finite=bool(np.all(np.isfinite(d))))
      if method == "fd":
        plus, minus = sampling.perturbed_states(theta, grad, eps)
        stats = jax.device_get(adjustment._fd_rounding(theta, plus, minus, grad))
        row.update(unmoved_fraction=float(stats["unmoved_fraction"]),
                   step_cosine=float(stats["cosine"]))
      results.append(row)

  report = dict(device=str(jax.devices()[0].device_kind), proxy=path if _PROXY.value else PROXY_CFG,
                proxy_params=reference_proxy.config.num_params(), gradient=meta,
                median_abs_g=float(np.median(abs_g)), rows=_ROWS.value, results=results)
  print(f"proxy {report['proxy_params'] / 1e6:.2f}M params, g over {meta['num_sequences']} "
        f"sequences, median |g| {report['median_abs_g']:.2e}, global norm {meta['global_norm']:.3g}")
  print("| proxy dtype | method | eps | cosine with exact | norm ratio | weights unmoved | "
        "step cosine |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    eps = "-" if r["eps"] is None else f"{r['eps']:g}"
    unmoved = f"{r['unmoved_fraction']:.1%}" if "unmoved_fraction" in r else "-"
    step = f"{r['step_cosine']:.3f}" if "step_cosine" in r else "-"
    print(f"| {r['dtype']} | {r['method']} | {eps} | {r['cosine']:.3f} | {r['norm_ratio']:.2f} | "
          f"{unmoved} | {step} |")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
