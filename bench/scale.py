"""Decode speed and memory at real model shapes on an accelerator: plain, ADS-fd and ADS-jvp.

  python bench/scale.py                                  # 7B-shaped teacher + 3B-shaped proxy
  python bench/scale.py --pair=small --batch_sizes=1,16  # 1.5B + 0.5B shapes
  python bench/scale.py --layers=2 --batch_sizes=2 --max_new_tokens=32   # smoke test, any host

Weights are random (normal, std 0.02) in --dtype, drawn on the device, so no checkpoint is
read; the shapes are the hub configs' (bench/common.py). g is random too (std 1e-3, in
--dtype). Random weights give near-uniform next-token distributions: top-p's worst case.

For each batch size and mode: tokens/s of prefill + decode (the best of --repeats runs after
compilation), the overhead over plain, the FLOP-proportional ideal 1 + 2 C_proxy / C_teacher,
XLA's program memory, the device's peak bytes, and the HBM bandwidth the decode would need at
that speed if every step read every weight and the mean KV cache once ("GB/s needed"). Prints a
table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from antidistill_jax import sampling
from antidistill_jax.models.config import config_from_hf
from antidistill_jax.models.transformer import Transformer

import common  # bench/common.py and bench/trace_summary.py (the script's folder is on sys.path)
import trace_summary

_PAIR = flags.DEFINE_enum("pair", "paper", ["paper", "small"],
                          "paper: 7B teacher + 3B proxy; small: 1.5B + 0.5B (Qwen2.5 shapes)")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "parameter and compute dtype")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "batch sizes")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "prompt tokens")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "generated tokens per row")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed runs per cell (best is kept)")
_MODES = flags.DEFINE_list("modes", ["plain", "fd", "jvp"], "plain, fd, fd_pair, jvp")
_LAYERS = flags.DEFINE_integer("layers", 0, "layers of each model (0: the real counts)")
_DEPTH = flags.DEFINE_integer("depth_divisor", 1, "divide both models' layer counts by this "
                              "(keeps their ratio; compile time grows with depth)")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus filter")
_EPS = flags.DEFINE_float("eps", 0.1, "fd step (0.1 keeps bf16 weights moving; bench/numerics)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "also run each cell once under jax.profiler, keep its trace in "
    "DIR/<mode>_b<batch> and summarize where the device time goes (bench/trace_summary.py)")
_PROFILE_BATCHES = flags.DEFINE_list("profile_batch_sizes", [], "with --profile_dir, profile "
                                     "only these batch sizes (default: every one)")

# Qwen2.5-1.5B and -0.5B config.json fields (tied embeddings, 151936 rows).
TEACHER_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    max_position_embeddings=32768, tie_word_embeddings=True)
PROXY_0_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                  intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=32768, tie_word_embeddings=True)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _normal(key, std, shape, dtype):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _draw(tree, std: float, seed: int, dtype=None):
  """normal(0, std) leaves shaped like tree's, one small program per distinct shape (a single
  program drawing every leaf of a 7B model took 3m45s to compile on an H100)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      _normal(k, std, x.shape, dtype or x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else jnp.zeros(x.shape, x.dtype) for k, x in zip(keys, leaves)])


def random_model(hf: dict, dtype, seed: int) -> Transformer:
  """A model of hf's shape with normal(0, 0.02) weights drawn on the device."""
  cfg = config_from_hf(hf)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=dtype,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, _draw(state, 0.02, seed))


def random_grad(proxy: Transformer, dtype, seed: int):
  return _draw(nnx.state(proxy, nnx.Param), 1e-3, seed, dtype)


def nbytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def step_bytes(mode: str, t_weights: int, p_weights: int, t_cache: int, p_cache: int) -> int:
  """Bytes one decode step must read at least: weights and the mean KV cache of each model
  (fd: two proxy copies and caches; jvp: theta and g, the cache and its tangent)."""
  if mode == "plain":
    return t_weights + t_cache
  return t_weights + t_cache + 2 * p_weights + 2 * p_cache


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  t_hf, p_hf = ((common.TEACHER_7B, common.PROXY_3B) if _PAIR.value == "paper"
                else (TEACHER_1_5B, PROXY_0_5B))
  t_hf, p_hf = dict(t_hf), dict(p_hf)
  if _LAYERS.value:
    t_hf["num_hidden_layers"] = p_hf["num_hidden_layers"] = _LAYERS.value
  for hf in (t_hf, p_hf):
    hf["num_hidden_layers"] = max(1, round(hf["num_hidden_layers"] / _DEPTH.value))
  start = time.perf_counter()
  teacher, proxy = random_model(t_hf, dtype, 0), random_model(p_hf, dtype, 1)
  grad = random_grad(proxy, dtype, 2)
  jax.block_until_ready((nnx.state(teacher), nnx.state(proxy), grad))
  init_s = time.perf_counter() - start
  print(f"random weights drawn in {init_s:.0f} s: teacher {t_hf['num_hidden_layers']} layers, "
        f"proxy {p_hf['num_hidden_layers']}", flush=True)
  c_t, c_p = common.flops_per_token(teacher.config), common.flops_per_token(proxy.config)
  ideal = 1.0 + 2.0 * c_p / c_t
  vocab = min(t_hf["vocab_size"], p_hf["vocab_size"])
  samplers = {"fd_pair": sampling.Sampler(teacher, vocab_size=vocab, proxy=proxy, grad=grad,
                                          fd_stacked=False)}
  shared = sampling.Sampler(teacher, vocab_size=vocab, proxy=proxy, grad=grad)
  base = sampling.SamplingParams(max_new_tokens=_NEW_TOKENS.value, tau=1.0, top_p=_TOP_P.value)
  settings = {"plain": base,
              "fd": dataclasses.replace(base, lam=1.0, method="fd", eps=_EPS.value),
              "fd_pair": dataclasses.replace(base, lam=1.0, method="fd", eps=_EPS.value),
              "jvp": dataclasses.replace(base, lam=1.0, method="jvp")}
  t_w = nbytes(nnx.state(teacher, nnx.Param))
  p_w = nbytes(nnx.state(proxy, nnx.Param))
  kv = lambda cfg, b: common.kv_bytes(cfg, b, _PROMPT_LEN.value + _NEW_TOKENS.value // 2, dtype)
  rng = np.random.default_rng(0)
  results = []
  for b in map(int, _BATCH_SIZES.value):
    prompts = [rng.integers(0, vocab, _PROMPT_LEN.value).tolist() for _ in range(b)]
    plain_rate = None
    for mode in _MODES.value:
      print(f"batch {b}, {mode}: compiling and timing", flush=True)
      sampler = samplers.get(mode, shared)
      profiled = _PROFILE_DIR.value and (not _PROFILE_BATCHES.value
                                         or str(b) in _PROFILE_BATCHES.value)
      profile_dir = os.path.join(_PROFILE_DIR.value, f"{mode}_b{b}") if profiled else None
      timed = common.time_sampler(sampler, settings[mode], prompts, b, _REPEATS.value,
                                  profile_dir)
      seconds, compile_s = timed["seconds"], timed["compile_seconds"]
      program, peak = timed["program_bytes"], timed["peak_device_bytes"]
      rate = b * _NEW_TOKENS.value / seconds
      if mode == "plain":
        plain_rate = rate
      need = step_bytes(mode, t_w, p_w, kv(teacher.config, b), kv(proxy.config, b))
      results.append(dict(
          mode=mode, batch=b, tokens_per_s=rate, seconds=seconds, compile_seconds=compile_s,
          step_ms=1e3 * seconds / _NEW_TOKENS.value, program_bytes=program,
          peak_device_bytes=peak, bytes_per_step=need,
          gb_per_s_needed=need * _NEW_TOKENS.value / seconds / 1e9,
          overhead=(plain_rate / rate) if plain_rate else None, profile=timed["profile"]))
      print({k: v for k, v in results[-1].items() if k != "profile"}, flush=True)
  report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                jax=jax.__version__, pair=_PAIR.value, dtype=dtype.name, teacher=t_hf,
                proxy=p_hf, teacher_params=teacher.config.num_params(),
                proxy_params=proxy.config.num_params(), ideal_overhead=ideal,
                prompt_len=_PROMPT_LEN.value, max_new_tokens=_NEW_TOKENS.value,
                top_p=_TOP_P.value, eps=_EPS.value, init_seconds=init_s, results=results)
  print(f"device: {report['device']} ({report['platform']}, jax {jax.__version__}), "
        f"{dtype.name}, teacher {report['teacher_params'] / 1e9:.2f}B / proxy "
        f"{report['proxy_params'] / 1e9:.2f}B params, prompt {_PROMPT_LEN.value}, "
        f"{_NEW_TOKENS.value} new tokens, ideal ADS overhead {ideal:.2f}")
  print("| mode | batch | tokens/s | ms/step | overhead | GB/s needed | program GiB | "
        "peak GiB | compile s |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  gib = lambda x: f"{x / 2**30:.1f}" if x else "-"
  for r in results:
    overhead = f"{r['overhead']:.2f}" if r["overhead"] else "-"
    print(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
          f"{overhead} | {r['gb_per_s_needed']:.0f} | {gib(r['program_bytes'])} | "
          f"{gib(r['peak_device_bytes'])} | {r['compile_seconds']:.0f} |")
  for r in results:
    if r["profile"]:
      print(f"\nWhere the time goes, {r['mode']} at batch {r['batch']} "
            f"({_NEW_TOKENS.value} new tokens, one profiled run):")
      print(trace_summary.table(r["profile"]))
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
