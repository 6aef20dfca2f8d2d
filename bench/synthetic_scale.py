"""How fast tiny models trained from scratch learn the synthetic chain task, on this machine.

  taskset -c 1 .venv/bin/python bench/synthetic_scale.py \\
      --runs="role=teacher,d=96,layers=2,ff=256,batch=32,steps=2000,lr=4e-3" \\
      --runs="role=student,type=llama,d=64,layers=3,ff=192,batch=32,n=3000,epochs=7,lr=3e-3" \\
      --eval_at=0.75,1.0 --sample_n=3000 --overhead

Each run trains with `task_models` (distill.distill, full fine-tuning) on gold `chains` traces
(n examples, `epochs` passes; a run given `steps` gets n = steps * batch, one epoch) and,
at each fraction of its schedule in --eval_at, stops (distill's max_steps), evaluates greedy
accuracy (and with --tau1 at tau=1, unfiltered and with top_p=0.95) on --test_n test problems,
and resumes. Times: train seconds (distill calls, compilation and checkpoint saves included),
seconds per step (median interval between steps, compilation excluded), eval seconds.
--overhead also times a bare jitted train step (value_and_grad + AdamW in one program) of the
first run's shape, to show what distill's per-step host work costs; --sample_n times sampling
traces with run 0's model, plain and antidistilled. Prints a table and one JSON line (also
written to --out when given).
"""

import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from antidistill_jax import distill, gradients, models, sampling, task_models
from antidistill_jax.data.prompts import build_prompts
from antidistill_jax.data import synthetic
import common  # bench/common.py (the script's folder is on sys.path)

_RUNS = flags.DEFINE_multi_string(
    "runs", ["role=teacher,d=96,layers=2,ff=256,batch=32,steps=2000,lr=4e-3",
             "role=student,type=llama,d=64,layers=3,ff=192,batch=32,n=3000,epochs=7,lr=3e-3,"
             "pre_steps=500"],
    "comma-separated key=value: role, type (qwen2/llama), d, layers, ff, heads, kv, batch, "
    "steps or n (+ epochs), lr, wd, warmup, seed; pre_steps > 0 first pre-trains on "
    "task_models.pretraining_rows (2 to pre_max terms) at pre_lr")
_EVAL_AT = flags.DEFINE_list("eval_at", ["0.5", "1.0"], "fractions of the schedule to evaluate at")
_TEST_N = flags.DEFINE_integer("test_n", 256, "test problems")
_TAU1 = flags.DEFINE_bool("tau1", True, "also evaluate at tau=1")
_OVERHEAD = flags.DEFINE_bool("overhead", False, "time a bare jitted train step too")
_SAMPLE_N = flags.DEFINE_integer("sample_n", 0, "time sampling this many train traces at tau=1 "
                                 "with run 0's model, plain and antidistilled (0: skip)")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "prompts per sampling batch")
_PROXY = flags.DEFINE_string("proxy", "d=64,layers=2,ff=192",
                             "the (random) proxy shape of the antidistilled sampling timing")
_TASK = flags.DEFINE_string("task", "order=free,direction=left", "chains options")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")

DEFAULTS = dict(role="teacher", type="qwen2", d=96, layers=2, ff=256, heads=4, kv=2, batch=32,
                steps=0, n=0, epochs=1, lr=2e-3, wd=0.0, warmup=0.05, seed=0,
                pre_steps=0, pre_max=3, pre_lr=2e-3)


def parse_run(text: str) -> dict:
  run = dict(DEFAULTS)
  for item in filter(None, text.split(",")):
    key, value = item.split("=")
    if key not in run:
      raise ValueError(f"unknown run key {key!r}; expected {sorted(run)}.")
    kind = type(DEFAULTS[key])
    run[key] = int(float(value)) if kind is int else kind(value)
  if not run["n"]:
    run["n"], run["epochs"] = run["steps"] * run["batch"], 1
  return run


def task_options() -> dict:
  return dict(item.split("=") for item in _TASK.value.split(",") if item)


def shape(run: dict) -> dict:
  return dict(hidden_size=run["d"], intermediate_size=run["ff"], num_hidden_layers=run["layers"],
              num_attention_heads=run["heads"], num_key_value_heads=run["kv"])


def num_params(model) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def pretrain(run: dict, tok, test, workdir: str) -> tuple[str, dict]:
  """A model pre-trained on easier chains (another writing style), saved under workdir; its
  record has its time and its accuracy on the real test set."""
  rows = task_models.pretraining_rows(tok, run["pre_steps"] * run["batch"], seed=run["seed"] + 1,
                                     max_terms=run["pre_max"])
  cfg = task_models.scratch_config(batch_size=run["batch"], learning_rate=run["pre_lr"],
                                   eval_every=10**9, checkpoint_every=10**9)
  t0 = time.perf_counter()
  path, _ = task_models.train_from_scratch(os.path.join(workdir, "pre"), tokenizer=tok, rows=rows,
                                           model_type=run["type"], shape=shape(run), config=cfg,
                                           seed=run["seed"])
  train_s = time.perf_counter() - t0
  acc, texts = task_models.accuracy(models.from_pretrained(path), tok, test, tau=0.0)
  return path, dict(pre_train_s=round(train_s, 1), pre_greedy=acc,
                    pre_style=synthetic.style_summary(texts, [e.problem for e in test]))


def train_and_eval(run: dict, tok, test, workdir: str) -> dict:
  start, pre = None, {}
  if run["pre_steps"]:
    start, pre = pretrain(run, tok, test, workdir)
    print(f"  pre-trained: {pre}", flush=True)
  rows = task_models.example_rows(tok, synthetic.chains(run["n"], split="train", seed=run["seed"],
                                                        **task_options()))
  cfg = task_models.scratch_config(batch_size=run["batch"], learning_rate=run["lr"],
                                   weight_decay=run["wd"], warmup_fraction=run["warmup"],
                                   epochs=run["epochs"], seed=run["seed"], eval_every=10**9,
                                   checkpoint_every=10**9)
  pairs = distill.sft_examples(tok, rows, system=None, max_length=cfg.max_length)
  total = distill.num_steps(len(pairs), cfg)
  stamps, train_s, evals, history = [], 0.0, [], []
  for frac in map(float, _EVAL_AT.value):
    model = (models.from_pretrained(start) if start else
             task_models.random_model(tok, model_type=run["type"], seed=run["seed"], **shape(run)))
    t0 = time.perf_counter()
    model, history = distill.distill(model, pairs, [], os.path.join(workdir, "train"), cfg,
                                     max_steps=max(1, round(frac * total)),
                                     on_step=lambda r: stamps.append(time.perf_counter()))
    train_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    acc, texts0 = task_models.accuracy(model, tok, test, tau=0.0)
    evals.append(dict(step=history[-1]["step"], train_s=round(train_s, 1), greedy=acc,
                      loss=round(float(np.mean([h["train_loss"] for h in history[-20:]])), 4),
                      eval_s=round(time.perf_counter() - t0, 1)))
    if _TAU1.value:
      evals[-1]["tau1"], texts1 = task_models.accuracy(model, tok, test, tau=1.0)
      evals[-1]["tau1_top_p"], _ = task_models.accuracy(model, tok, test, tau=1.0, top_p=0.95)
    print(f"  {run['role']} step {evals[-1]['step']}/{total}: {evals[-1]}", flush=True)
  out = dict(run, **pre, params=num_params(model), steps=total, train_s=round(train_s, 1),
             s_per_step=round(float(np.median(np.diff(stamps))), 4), evals=evals,
             first_loss=round(history[0]["train_loss"], 3))
  if _TAU1.value:
    out["tau1"] = evals[-1]["tau1"]
    out["tau1_style"] = synthetic.style_summary(texts1, [e.problem for e in test])
  out["greedy_style"] = synthetic.style_summary(texts0, [e.problem for e in test])
  return out, model


def sampling_time(teacher, tok, n: int) -> dict:
  """Seconds to sample n train traces at tau=1 (top_p 0.95), plain and antidistilled (jvp,
  a random proxy and its gradient on 64 gold traces), after a compiling call."""
  prompts = build_prompts(tok, synthetic.chains(n, split="train", seed=9, **task_options()),
                          10**9, system=None).ids
  proxy_run = parse_run(_PROXY.value)
  proxy = task_models.random_model(tok, model_type=proxy_run["type"], seed=1, **shape(proxy_run))
  rows = task_models.example_rows(tok, synthetic.chains(64, split="holdout", **task_options()))
  grad, _ = gradients.proxy_gradient(proxy, [(r["prompt_ids"], r["completion_ids"]) for r in rows])
  out = {}
  for name, sampler, lam in (
      ("plain", sampling.Sampler(teacher, tok, batch_size=_SAMPLE_BATCH.value), 0.0),
      ("ads_jvp", sampling.Sampler(teacher, tok, proxy=proxy, grad=grad,
                                   batch_size=_SAMPLE_BATCH.value), 1.0)):
    params = sampling.SamplingParams(max_new_tokens=48, tau=1.0, top_p=0.95, lam=lam)
    sampler(prompts[:_SAMPLE_BATCH.value], params)  # compile
    t0 = time.perf_counter()
    gen = sampler(prompts, params)
    out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    out[f"{name}_tokens"] = int(sum(len(t) for t in gen.tokens))
  out["n"] = n
  return out


def bare_step_time(run: dict, tok, steps: int = 50) -> float:
  """Seconds per step of one jitted (grad + AdamW) program on a fixed batch of the run's shape."""
  model = task_models.random_model(tok, model_type=run["type"], seed=0, **shape(run))
  graphdef, params = nnx.split(model, nnx.Param)
  rows = task_models.example_rows(tok, synthetic.chains(run["batch"], split="train"))
  pairs = distill.sft_examples(tok, rows, system=None, max_length=128)
  ids, pad, loss = (jnp.asarray(a) for a in gradients.pack_examples(pairs, len(pairs), 64))
  tx = optax.adamw(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def f(p):
      nll, mask = gradients.token_nll(nnx.merge(graphdef, p), ids, pad, loss)
      return jnp.sum(nll * mask) / jnp.sum(mask)
    value, grad = jax.value_and_grad(f)(params)
    updates, opt = tx.update(grad, opt, params)
    return optax.apply_updates(params, updates), opt, value

  params, opt, v = step(params, opt)
  v.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt, v = step(params, opt)
  float(v)
  return (time.perf_counter() - t0) / steps


def print_table(report: dict) -> None:
  print(f"\ncpus {report['cpus']}, prompt+trace tokens mean {report['tokens_mean']:.1f} max "
        f"{report['tokens_max']}, test n={report['test_n']}; acc = greedy/tau=1/tau=1 top-p 0.95 "
        "at each step")
  print(f"{'role':8} {'type':6} {'d':>3} {'L':>2} {'ff':>4} {'params':>7} {'batch':>5} "
        f"{'n':>6} {'steps':>5} {'lr':>7} {'train s':>7} {'s/step':>6} {'pre s':>5} "
        f"{'pre acc':>7}  step:acc")
  for r in report["runs"]:
    nan = float("nan")
    curve = " ".join(f"{e['step']}:{e['greedy']:.3f}/{e.get('tau1', nan):.3f}/"
                     f"{e.get('tau1_top_p', nan):.3f}" for e in r["evals"])
    print(f"{r['role']:8} {r['type']:6} {r['d']:3d} {r['layers']:2d} {r['ff']:4d} "
          f"{r['params']:7d} {r['batch']:5d} {r['n']:6d} {r['steps']:5d} {r['lr']:7.1e} "
          f"{r['train_s']:7.1f} {r['s_per_step']:6.4f} {r.get('pre_train_s', 0.0):5.1f} "
          f"{r.get('pre_greedy', float('nan')):7.3f}  {curve}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  tok = task_models.task_tokenizer()
  test = synthetic.chains(_TEST_N.value, split="test", seed=0, **task_options())
  lengths = [len(r["prompt_ids"]) + len(r["completion_ids"])
             for r in task_models.example_rows(tok, test)]
  results = []
  root = tempfile.mkdtemp(prefix="synthetic_scale_")
  try:
    for i, text in enumerate(_RUNS.value):
      run = parse_run(text)
      print(f"run {i}: {run}", flush=True)
      record, model = train_and_eval(run, tok, test, os.path.join(root, str(i)))
      results.append(record)
      if i == 0 and _SAMPLE_N.value:
        sample = sampling_time(model, tok, _SAMPLE_N.value)
        print(f"  sampling: {sample}", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  report = dict(device=str(jax.devices()[0].device_kind), cpus=len(os.sched_getaffinity(0)),
                jax=jax.__version__, task=task_options(), test_n=_TEST_N.value,
                tokens_mean=float(np.mean(lengths)), tokens_max=int(max(lengths)), runs=results)
  if _SAMPLE_N.value:
    report["sampling"] = sample
  if _OVERHEAD.value:
    run = parse_run(_RUNS.value[0])
    report["bare_s_per_step"] = round(bare_step_time(run, tok), 4)
  print_table(report)
  if "sampling" in report:
    print(f"sampling {sample['n']} traces at tau=1 with run 0's model (batch "
          f"{_SAMPLE_BATCH.value}): plain {sample['plain_s']} s, antidistilled (jvp, proxy "
          f"{_PROXY.value}) {sample['ads_jvp_s']} s")
  if "bare_s_per_step" in report:
    print(f"bare jitted step of run 0's shape: {report['bare_s_per_step']} s/step "
          f"(distill: {results[0]['s_per_step']})")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
