"""Where the time of a `distill.distill` step goes, at the main job's student shape.

  .venv/bin/python bench/distill_step.py                       # 150 steps, 2 students
  .venv/bin/python bench/distill_step.py --steps=300 --students=3 --holdout=512

The main job (configs/synthetic.py) trains six students of `scratch.student`'s shape with the
config's `distill` settings, one after another in one process. This builds that student
(`task_models.random_model`, the task tokenizer), gold `chains` traces of the config's task as
training data (--train rows, like data.max_train) and a holdout, then calls `distill.distill`
--students times for --steps steps each (a fresh student and workdir each time, as the
pipeline does) and reports:
  - steps/s: the median interval between `on_step` calls (the first step excluded), and the
    seconds of the whole call;
  - host ms/step: the median CPU time of the calling thread between `on_step` calls, i.e. the
    Python work of a step (XLA computes on its own threads): less noisy than wall time on a
    shared machine, and what the loop costs whether or not it overlaps the computation;
  - the first step's latency (setup, tracing, compilation) and XLA compile seconds per jitted
    function (jax.monitoring), per student: later students should reuse the first's programs;
  - a step's parts, timed alone on a fixed batch of the same shape with block_until_ready:
    the gradient program (forward + backward, `value_and_grad` of `gradients.token_nll`) and
    the optimizer program (clip + AdamW) as two jitted calls, and as one fused program; the
    rest of a distill step is host work that does not overlap the programs, and the idle
    cores between two programs (a launch costs a few ms on a CPU).
The main job's own traces are teacher samples: some run past 64 tokens and pad a batch to 96
positions, which costs ~1.7x a 64-position step; gold traces here are all <= 64 tokens.
Wall times on a small shared VM drift by 10-20% from run to run: compare versions by
interleaved runs, or by host ms/step and compile seconds, which hardly drift.
Prints a table and one JSON line (also written to --out when given).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import runpy
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from antidistill_jax import distill, gradients, task_models
from antidistill_jax.data import synthetic

import common  # bench/common.py (the script's folder is on sys.path)

_CONFIG = flags.DEFINE_string(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                           "synthetic.py"), "config file with scratch.student and distill")
_STEPS = flags.DEFINE_integer("steps", 150, "distill steps per student")
_STUDENTS = flags.DEFINE_integer("students", 2, "distill calls in this process")
_TRAIN = flags.DEFINE_integer("train", 3000, "training traces (gold chains)")
_HOLDOUT = flags.DEFINE_integer("holdout", 0, "holdout traces (0: no holdout evaluations)")
_REPEATS = flags.DEFINE_integer("repeats", 30, "timed calls of each program alone")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")


def setup():
  """(distill config, student factory, train pairs, holdout pairs) of the config file."""
  c = runpy.run_path(_CONFIG.value)["get_config"]()
  tok = task_models.task_tokenizer()
  cfg = distill.DistillConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in c.distill.items()})
  cfg = dataclasses.replace(cfg, pad_id=tok.pad_token_id or 0)
  task = {k: tuple(v) if isinstance(v, list) else v for k, v in c.data.task.items()
          if k != "kind"}
  student = c.scratch.student
  make = lambda: task_models.random_model(tok, model_type=student.model_type, seed=0,
                                          **dict(student.shape))
  pairs = lambda n, split: distill.sft_examples(
      tok, task_models.example_rows(tok, synthetic.chains(n, split=split, **task)),
      system=None, max_length=cfg.max_length)
  return cfg, make, pairs(_TRAIN.value, "train"), pairs(_HOLDOUT.value, "holdout")


def program_times(cfg, make, train) -> dict:
  """Milliseconds of the gradient and optimizer programs alone on the first step's batch."""
  model = make()
  graphdef, params = nnx.split(model, nnx.Param)
  picked = [train[i] for i in distill.batch_indices(len(train), cfg, 0)]
  longest = max(len(p) + len(c) for p, c in picked)
  length = -(-longest // cfg.length_multiple) * cfg.length_multiple
  ids, pad, loss = (jnp.asarray(a) for a in gradients.pack_examples(picked, len(picked), length,
                                                                    cfg.pad_id))
  tx = distill.make_optimizer(cfg, distill.num_steps(len(train), cfg))
  opt = tx.init(params)

  def value_and_grad(p):
    def total(p):
      nll, mask = gradients.token_nll(nnx.merge(graphdef, p), ids, pad, loss)
      return jnp.sum(nll * mask)
    return jax.value_and_grad(total)(p)

  def update(p, opt, grad):
    grad = jax.tree.map(lambda g: g / jnp.maximum(jnp.sum(loss[:, 1:]), 1), grad)
    updates, opt = tx.update(grad, opt, p)
    return optax.apply_updates(p, updates), opt

  grad_fn, update_fn = jax.jit(value_and_grad), jax.jit(update)
  fused = jax.jit(lambda p, opt: update(p, opt, value_and_grad(p)[1]))
  _, grad = grad_fn(params)
  return dict(length=length, rows=len(picked),
              grad_ms=common.median_ms(lambda: grad_fn(params), _REPEATS.value),
              optimizer_ms=common.median_ms(lambda: update_fn(params, opt, grad), _REPEATS.value),
              fused_ms=common.median_ms(lambda: fused(params, opt), _REPEATS.value))


def main(argv):
  del argv
  cfg, make, train, holdout = setup()
  cfg = dataclasses.replace(cfg, eval_every=cfg.eval_every if holdout else 10**9)
  compiles: list[tuple[str, float]] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append((str(kw.get("fun_name", "?")), duration))
      if event == "/jax/core/compile/backend_compile_duration" else None)
  students = []
  for i in range(_STUDENTS.value):
    stamps, cpu, before = [], [], len(compiles)

    def on_step(record):
      stamps.append(time.perf_counter())
      cpu.append(time.thread_time())

    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      distill.distill(make(), train, holdout, os.path.join(tmp, "train"), cfg,
                      max_steps=_STEPS.value, on_step=on_step)
      seconds = time.perf_counter() - start
    per_fun = collections.defaultdict(float)
    for name, duration in compiles[before:]:
      per_fun[name] += duration
    interval = float(np.median(np.diff(stamps)))
    students.append(dict(student=i, steps=len(stamps), seconds=seconds,
                         first_step_s=stamps[0] - start, step_ms=1e3 * interval,
                         host_ms=1e3 * float(np.median(np.diff(cpu))),
                         steps_per_s=1 / interval, compile_s=sum(per_fun.values()),
                         compiles={k: round(v, 3) for k, v in sorted(per_fun.items())}))
  parts = program_times(cfg, make, train)
  step_ms = students[-1]["step_ms"]
  parts["rest_ms"] = step_ms - parts["grad_ms"] - parts["optimizer_ms"]

  print(f"\n{len(train)} traces, batch {cfg.batch_size} (micro {cfg.micro_batch_size}), "
        f"holdout {len(holdout)}, {_STEPS.value} steps per student, cpus {os.cpu_count()}")
  print("| student | steps/s | ms/step | host ms/step | first step s | compile s | call s |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for s in students:
    print(f"| {s['student']} | {s['steps_per_s']:.2f} | {s['step_ms']:.1f} | {s['host_ms']:.2f} | "
          f"{s['first_step_s']:.2f} | {s['compile_s']:.2f} | {s['seconds']:.1f} |")
  print(f"\none step ({parts['rows']} rows x {parts['length']} positions), ms:")
  print("| gradient program | optimizer program | both fused | distill step | rest |")
  print("|---:|---:|---:|---:|---:|")
  print(f"| {parts['grad_ms']:.1f} | {parts['optimizer_ms']:.2f} | {parts['fused_ms']:.1f} | "
        f"{step_ms:.1f} | {parts['rest_ms']:.1f} |")
  for s in students:
    print(f"student {s['student']} compiles (s): {s['compiles']}")
  common.save_report(dict(config=_CONFIG.value, train=len(train), holdout=len(holdout),
                          steps=_STEPS.value, cpus=os.cpu_count(), students=students,
                          step_parts=parts), _OUT.value)


if __name__ == "__main__":
  app.run(main)
