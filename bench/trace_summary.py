"""Where a jitted program's device time goes: one run under `jax.profiler`, summarized here.

  python bench/trace_summary.py TRACE_DIR [WALL_SECONDS]   # summarize a trace already taken

`traced(fn, folder)` runs fn once under `jax.profiler.trace(folder)` and returns its wall
seconds; `summarize(folder, wall_s)` reads the newest `*.xplane.pb` under the folder with
`jax.profiler.ProfileData` (no TensorBoard) and returns the device's busy time (the union of
its kernels' intervals) against the wall time, the busy time by kind of kernel (matmul,
attention, reduction, rng, copy, elementwise, other) and the kernels that took the most.
A GPU's kernels are the CUDA kernels on its streams (planes "/device:GPU:N"); a CPU has no
device plane, so there the XLA thunks on the host's worker threads stand in (coarser names).
bench/scale.py --profile_dir uses it per (mode, batch); issue 22 asks where the time between
a step's bandwidth floor and its measured time goes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import Any, Callable

import jax

# Kinds of kernel, by name (lowercase), first match wins.
KINDS = (
    ("attention", r"fmha|flash|attention|cudnn"),
    # ynn: XLA:CPU's YNNPACK fusions, built around a dot
    ("matmul", r"gemm|cublas|cutlass|matmul|\bdot|dot[._]|xmma|wgmma|triton_gemm|ynn"),
    ("rng", r"threefry|philox|rng|random"),
    ("reduction", r"reduc|argmax|argmin"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic.update.slice|scatter|gather|concatenate"),
    ("elementwise", r"fusion|loop|elementwise|convert|select|compare"),
)
# Host-side bookkeeping on the CPU's worker threads, not work.
_CPU_NOISE = re.compile(r"^(ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|end: )")


def kind(name: str) -> str:
  low = name.lower()
  for label, pattern in KINDS:
    if re.search(pattern, low):
      return label
  return "other"


def traced(fn: Callable[[], Any], folder: str) -> float:
  """Runs fn once (its outputs blocked on) under the profiler; returns the wall seconds."""
  os.makedirs(folder, exist_ok=True)
  with jax.profiler.trace(folder):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - start
  return wall


def _union_ns(intervals: list[tuple[int, int]]) -> int:
  busy, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      busy += e - s
      end = e
    elif e > end:
      busy += e - end
      end = e
  return busy


def _event_name(event) -> str:
  """The HLO op a kernel ran for where the trace says, else the kernel's own name."""
  stats = dict(event.stats)
  if stats.get("hlo_op"):
    return str(stats["hlo_op"])
  if stats.get("long_name"):
    return f"{event.name} [{str(stats['long_name'])[:60]}]"
  return event.name


def _kernels(profile) -> tuple[str, list[tuple[str, int, int]]]:
  """(where, [(name, start_ns, end_ns)]) for the first device plane, or the CPU's XLA threads."""
  planes = list(profile.planes)
  devices = [p for p in planes if p.name.startswith("/device:") and "host" not in p.name.lower()]
  if devices:
    plane = devices[0]
    # Kernels are on the stream lines; lines derived from them (XLA Ops, XLA Modules, Steps)
    # would count them twice.
    streams = [l for l in plane.lines if l.name.startswith("Stream")]
    lines = streams or [l for l in plane.lines
                        if not re.match(r"XLA (Modules|Ops)|Steps|Source", l.name)]
    where = plane.name
  else:
    plane = next(p for p in planes if p.name == "/host:CPU")
    lines = [l for l in plane.lines if l.name.startswith("tf_XLA")]
    where = "/host:CPU (XLA worker threads)"
  out = []
  for line in lines:
    for e in line.events:
      if e.duration_ns > 0 and not _CPU_NOISE.match(e.name):
        out.append((_event_name(e), int(e.start_ns), int(e.start_ns + e.duration_ns)))
  return where, out


def summarize(folder: str, wall_s: float | None = None, top: int = 12) -> dict[str, Any]:
  """The newest trace under folder, summarized (see the module docstring)."""
  paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {folder}: take a trace first "
                            "(bench/trace_summary.traced or jax.profiler.trace)")
  path = max(paths, key=os.path.getmtime)
  where, kernels = _kernels(jax.profiler.ProfileData.from_file(path))
  busy_ns = _union_ns([(s, e) for _, s, e in kernels])
  by_kind: dict[str, int] = {}
  by_name: dict[str, list[int]] = {}
  for name, s, e in kernels:
    label = kind(name)
    by_kind[label] = by_kind.get(label, 0) + (e - s)
    entry = by_name.setdefault(name, [0, 0])
    entry[0] += 1
    entry[1] += e - s
  total_ns = sum(by_kind.values()) or 1
  span_ns = (max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)) if kernels else 0
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return dict(
      trace=path, where=where, kernels=len(kernels), wall_s=wall_s,
      span_s=span_ns / 1e9, busy_s=busy_ns / 1e9,
      busy_fraction=(busy_ns / 1e9 / wall_s) if wall_s else None,
      kinds={k: round(v / total_ns, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      top=[dict(name=n, kind=kind(n), calls=c, ms=round(ns / 1e6, 3),
                share=round(ns / total_ns, 4)) for n, (c, ns) in ranked])


def table(summary: dict[str, Any]) -> str:
  busy = summary["busy_fraction"]
  head = (f"{summary['where']}: {summary['kernels']} kernels, busy {summary['busy_s'] * 1e3:.1f} ms"
          + (f" of {summary['wall_s'] * 1e3:.1f} ms wall ({100 * busy:.0f}%)" if busy else ""))
  kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["kinds"].items())
  rows = ["| kernel | kind | calls | ms | share |", "|---|---|---:|---:|---:|"]
  rows += [f"| {t['name'][:70]} | {t['kind']} | {t['calls']} | {t['ms']:.2f} | "
           f"{100 * t['share']:.1f}% |" for t in summary["top"]]
  return "\n".join([head, "busy time by kind: " + kinds, ""] + rows)


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  result = summarize(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else None)
  print(table(result))
  print(json.dumps(result))
