"""Decode throughput and memory of plain, ADS-fd (stacked and paired) and ADS-jvp sampling.

  python bench/sampling.py                                   # tiny random models, 4:1 params
  python bench/sampling.py --teacher=DIR --proxy=DIR --dtype=bfloat16 --batch_sizes=1,16,64
  python bench/sampling.py --modes=nofilter,plain --vocab=152064 --batch_sizes=32   # top-p cost

Modes: nofilter (plain sampling, no top-p), plain (top-p --top_p), fd, fd_pair (fd as two
calls), jvp, jvp_plain (jvp with jax.jvp's own rule: each proxy weight read twice per step). Every mode but nofilter filters with --top_p.

For each mode and batch size: tokens/s of the compiled prefill + scan (compile excluded, the
best of --repeats runs), the compiled program's memory (arguments + temporaries, from XLA's
memory analysis, so it works on CPU too), where the device reports it, peak device memory, and
the decode step's instructions that run and the copies among them (common.loop_step_ops).
The ADS overhead (plain tokens/s / ADS tokens/s) is printed next to the FLOP-proportional
ideal 1 + 2 C_proxy / C_teacher (the proxy's two passes). Prints a table and writes JSON.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from antidistill_jax import gradients, models, random_checkpoints, sampling

import common  # bench/common.py (the script's folder is on sys.path)

_TEACHER = flags.DEFINE_string("teacher", "", "teacher HF dir (default: tiny random)")
_PROXY = flags.DEFINE_string("proxy", "", "proxy HF dir (default: tiny random)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute and parameter dtype")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "batch sizes")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "generated tokens per row")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per cell (best is kept)")
_MODES = flags.DEFINE_list("modes", ["plain", "fd", "fd_pair", "jvp"], "modes to run")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus filter of every mode but nofilter")
_VOCAB = flags.DEFINE_integer("vocab", 512, "tiny models' vocabulary (table rows)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")
_WIDTH = flags.DEFINE_integer(
    "width", 1, "tiny models' widths (hidden, MLP, heads) times this: at 4 the weights (~50M + "
    "13M parameters) outgrow the CPU's caches and a step streams them from memory, as on a GPU")
_TEACHER_KV_HEADS = flags.DEFINE_integer(
    "teacher_kv_heads", 0, "tiny teacher's KV heads before --width (0: its config's 2)")
_PROXY_KV_HEADS = flags.DEFINE_integer(
    "proxy_kv_heads", 0, "tiny proxy's KV heads before --width (0: its config's 1). Caches "
    "store no size-1 axis (one KV head, batch 1): XLA:CPU copied such caches 4 times per "
    "decode step before (bench/RESULTS.md)")

TEACHER_CFG, PROXY_CFG = common.TEACHER_CFG, common.PROXY_CFG


flops_per_token = common.flops_per_token


def load_pair(tmp: str, dtype):
  if _TEACHER.value:
    return (models.from_pretrained(_TEACHER.value, dtype=dtype),
            models.from_pretrained(_PROXY.value or _TEACHER.value, dtype=dtype))
  tok = random_checkpoints.train_tokenizer(vocab_size=512)
  def wide(cfg, kv_heads):
    cfg = dict(cfg, num_key_value_heads=kv_heads or cfg["num_key_value_heads"])
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return {k: v * _WIDTH.value if k in keys else v for k, v in cfg.items()}
  paths = [random_checkpoints.make_tiny_checkpoint(os.path.join(tmp, name), tokenizer=tok,
                                                   seed=seed,
                                                   vocab_size=max(_VOCAB.value, len(tok)),
                                                   **wide(cfg, kv))
           for name, seed, cfg, kv in (("teacher", 0, TEACHER_CFG, _TEACHER_KV_HEADS.value),
                                       ("proxy", 1, PROXY_CFG, _PROXY_KV_HEADS.value))]
  return tuple(models.from_pretrained(p, dtype=dtype) for p in paths)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  with tempfile.TemporaryDirectory() as tmp:
    teacher, proxy = load_pair(tmp, dtype)
  rng = np.random.default_rng(0)
  vocab = min(teacher.config.vocab_size, proxy.config.vocab_size)
  examples = [(rng.integers(0, vocab, 32).tolist(), rng.integers(0, vocab, 64).tolist())
              for _ in range(4)]
  grad, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  c_t, c_p = flops_per_token(teacher.config), flops_per_token(proxy.config)
  ideal = 1.0 + 2.0 * c_p / c_t
  rows_v = teacher.config.vocab_size  # random ids, no tokenizer: every row may be sampled
  ads = dict(proxy=proxy, grad=grad, vocab_size=rows_v)
  samplers = {
      "nofilter": sampling.Sampler(teacher, vocab_size=rows_v),
      "plain": sampling.Sampler(teacher, vocab_size=rows_v),
      "fd": sampling.Sampler(teacher, **ads),
      "fd_pair": sampling.Sampler(teacher, fd_stacked=False, **ads),
      "jvp": sampling.Sampler(teacher, **ads),
      "jvp_plain": sampling.Sampler(teacher, jvp_stacked=False, **ads),
  }
  base = sampling.SamplingParams(max_new_tokens=_NEW_TOKENS.value, tau=1.0, top_p=_TOP_P.value)
  params = {
      "nofilter": dataclasses.replace(base, top_p=None), "plain": base,
      "fd": dataclasses.replace(base, lam=1.0, method="fd"),
      "fd_pair": dataclasses.replace(base, lam=1.0, method="fd"),
      "jvp": dataclasses.replace(base, lam=1.0, method="jvp"),
      "jvp_plain": dataclasses.replace(base, lam=1.0, method="jvp"),
  }
  results = []
  for b in map(int, _BATCH_SIZES.value):
    prompts = [rng.integers(0, vocab, _PROMPT_LEN.value).tolist() for _ in range(b)]
    plain_rate = None
    for mode in _MODES.value:
      timed = common.time_sampler(samplers[mode], params[mode], prompts, b, _REPEATS.value)
      seconds, mem_bytes = timed["seconds"], timed["program_bytes"]
      peak = timed["peak_device_bytes"]
      rate = b * _NEW_TOKENS.value / seconds
      plain_rate = rate if plain_rate is None else plain_rate  # the first mode is the baseline
      results.append(dict(mode=mode, batch=b, tokens_per_s=rate, seconds=seconds,
                          program_bytes=mem_bytes, peak_device_bytes=peak,
                          step_ops=timed["step_ops"],
                          overhead=(plain_rate / rate) if plain_rate else None))
  report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                num_devices=jax.device_count(), dtype=dtype.name,
                teacher_params=teacher.config.num_params(), proxy_params=proxy.config.num_params(),
                flops_ratio_proxy_teacher=c_p / c_t, ideal_overhead=ideal,
                prompt_len=_PROMPT_LEN.value, max_new_tokens=_NEW_TOKENS.value, results=results)
  print(f"device: {report['device']} ({report['platform']}), dtype {dtype.name}, teacher "
        f"{report['teacher_params'] / 1e6:.2f}M / proxy {report['proxy_params'] / 1e6:.2f}M "
        f"params, ideal ADS overhead 1 + 2*C_p/C_t = {ideal:.2f}")
  print(f"{'mode':8} {'batch':>5} {'tokens/s':>10} {'overhead':>8} {'program MiB':>11} "
        f"{'peak MiB':>9} {'step ops (copies)':>17}")
  for r in results:
    overhead = f"{r['overhead']:.2f}" if r["overhead"] else "-"
    mib = lambda x: f"{x / 2**20:.1f}" if x else "-"
    print(f"{r['mode']:8} {r['batch']:5d} {r['tokens_per_s']:10.1f} {overhead:>8} "
          f"{mib(r['program_bytes']):>11} {mib(r['peak_device_bytes']):>9} "
          f"{r['step_ops']['ops']:>9} ({r['step_ops']['copies']})")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
