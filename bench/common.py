"""Pieces the benchmarks share: the tiny model shapes, FLOPs per token, and the JSON output."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from antidistill_jax import models

import trace_summary  # bench/trace_summary.py (the script's folder is on sys.path)

# Tiny teacher and proxy whose non-embedding parameter counts are 4:1.
TEACHER_CFG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)
PROXY_CFG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=1)

# config.json fields of the paper's models (hub ids deepseek-ai/DeepSeek-R1-Distill-Qwen-7B and
# Qwen/Qwen2.5-3B).
TEACHER_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                  intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=131072, tie_word_embeddings=False)
PROXY_3B = dict(model_type="qwen2", vocab_size=151936, hidden_size=2048,
                intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=32768, tie_word_embeddings=True)


def median_ms(fn, repeats: int) -> float:
  """Median milliseconds of fn() (its outputs blocked on), after a warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def round_robin_seconds(cells: dict, repeats: int, rounds: dict | None = None) -> dict:
  """cells: name -> (fn, args). Each is warmed up, then timed round-robin, one run of each per
  round (a burst of load on this shared machine hits every cell alike): name -> the seconds of
  its runs. rounds: name -> fewer rounds for some cells (0: neither warmed up nor timed)."""
  rounds = {name: repeats for name in cells} | (rounds or {})
  for name, (fn, args) in cells.items():
    if rounds[name]:
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in cells if rounds[name]}
  for r in range(repeats):
    for name, (fn, args) in cells.items():
      if r < rounds[name]:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - start)
  return times


def reset_peak_rss() -> int:
  """Resets this process's peak resident set (Linux: /proc/self/clear_refs) and returns the
  resident set now, in bytes, so that `peak_rss()` after some work is that work's peak."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
  """The process's peak resident set since the last `reset_peak_rss`, in bytes."""
  return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def flops_per_token(cfg: models.ModelConfig) -> float:
  """2 x the parameters a token passes through (the embedding lookup is free; the unembedding
  matrix is counted once, tied or not)."""
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
  return 2.0 * (cfg.num_params() - lookup)


def save_report(report: dict[str, Any], path: str) -> None:
  """Prints the report as one JSON line (after the table) and, when `path` is given (--out),
  writes it there too: a benchmark writes nothing into the checkout unless asked."""
  print(json.dumps(report))
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)


def kv_bytes(cfg: models.ModelConfig, batch: int, slots: int, dtype) -> int:
  """Bytes of a model's K and V caches for `batch` rows of `slots` positions."""
  per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
  return per_slot * batch * slots * jnp.dtype(dtype).itemsize


# Instructions that are bookkeeping, not work: no thunk or kernel runs for them.
_FREE_OPS = frozenset({"parameter", "get-tuple-element", "constant", "bitcast", "tuple"})


def loop_step_ops(hlo: str) -> dict[str, int]:
  """The instructions of a compiled program's largest loop body (a decode program's step):
  `ops`, those that run (fusions, copies, dots, ...; no parameters, tuples, bitcasts) and
  `copies` among them. From `compiled.as_text()`, so free of timing noise."""
  bodies = [c for c in re.split(r"\n(?=\S.*\{\s*$)", hlo, flags=re.M)
            if "region" in c.split("\n", 1)[0] and "fused" not in c.split("\n", 1)[0]]
  if not bodies:
    return dict(ops=0, copies=0)
  kinds = re.findall(r"= \S+ ([\w-]+)\(", max(bodies, key=len))
  ops = [k for k in kinds if k not in _FREE_OPS]
  return dict(ops=len(ops), copies=ops.count("copy"))


def time_sampler(sampler, params, prompts, rows: int, repeats: int,
                 profile_dir: str | None = None) -> dict[str, Any]:
  """Compiles the sampler's program for one batch, runs it once, then keeps the best of
  `repeats` timed runs: seconds, compile_seconds, program_bytes (XLA's arguments + temporaries +
  outputs), the device's peak bytes where it reports them and the decode step's instruction
  and copy counts (`loop_step_ops`). With profile_dir, one more run
  under the profiler, its trace kept there and summarized (bench/trace_summary.py) as
  `profile`."""
  batch = sampler.batch_inputs(prompts, rows=rows, seed=0)
  prompt_len = max(map(len, prompts))
  start = time.perf_counter()
  compiled = sampler.lower(batch, params, prompt_len).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  program = None
  if mem is not None:
    program = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes)
  run = lambda: jax.block_until_ready(sampler.run_batch(batch, params, prompt_len))
  run()  # warm-up (and the jit cache's hit)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  profile = None
  if profile_dir:
    profile = trace_summary.summarize(profile_dir, trace_summary.traced(run, profile_dir))
  return dict(seconds=best, compile_seconds=compile_s, program_bytes=program,
              peak_device_bytes=stats.get("peak_bytes_in_use"), profile=profile,
              step_ops=loop_step_ops(compiled.as_text()))
