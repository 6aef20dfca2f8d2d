"""Command-line entry point.

  python -m antidistill_jax.main     # the default: configs/synthetic.py in runs/synthetic,
                                     # tiny models trained from scratch, offline, < 10 min on CPU
  python -m antidistill_jax.main --config=configs/tiny.py --workdir=runs/tiny [--stages=a,b]
      [--shard=i/n] [--config.key=value ...]            # the experiment (antidistill_jax.pipeline)
  python -m antidistill_jax.main --config=configs/generate.py [--config.checkpoint=DIR]
                                                        # the sampling demo

An experiment config (one with a `grid`) runs `pipeline.Experiment` in --workdir (default
runs/<config name>); the generate demo loads a teacher through `models.from_pretrained`, renders
the prompts with its chat template and samples with `sampling.generate`, plainly and, with a
proxy, antidistilled.
"""

import dataclasses
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

# configs/ ships inside the package (setup.py maps it to antidistill_jax/configs), so the
# default and `--config=configs/NAME.py` work from a checkout and from `pip install .` alike.
_PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CHECKOUT_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def _config_path(path: str) -> str:
  """`path` if it exists, else the packaged file of the same name under configs/."""
  base, _, overrides = path.partition(":")  # config_flags' "file.py:arg" form
  if os.path.exists(base) or not base.startswith("configs" + os.sep):
    return path
  for root in (_PACKAGED_CONFIGS, _CHECKOUT_CONFIGS):
    candidate = os.path.join(root, base[len("configs" + os.sep):])
    if os.path.exists(candidate):
      return os.path.normpath(candidate) + (":" + overrides if overrides else "")
  return path


_CONFIG = config_flags.DEFINE_config_file("config", _config_path("configs/synthetic.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "experiment outputs, local or gs:// (default: "
                               "runs/<config name>)")
_STAGES = flags.DEFINE_list("stages", None, "stages to run (default: all), in pipeline order")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run grid points i, i+n, ... (independent hosts)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (multi-host TPU/GPU jobs; "
    "launch/tpu.sh sets it). On TPU pods and SLURM/Open MPI clusters it finds its peers itself; "
    "elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed, where the "
    "cluster is not detected)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (--distributed)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (--distributed)")


def _checkpoint(path: str, workdir: str, name: str, **tiny_config) -> str:
  """`path`, or a tiny random checkpoint built once under workdir/name."""
  from antidistill_jax import tiny
  if path:
    return path
  path = os.path.join(workdir, name)
  if not os.path.exists(os.path.join(path, "config.json")):
    logging.info("building a tiny random %s at %s", name, path)
    tiny.make_tiny_checkpoint(path, **tiny_config)
  return path


def run_generate(config) -> dict[str, list[str]]:
  """Plain samples of the prompts, and antidistilled ones when config.lam != 0.

  The antidistillation direction g is the proxy's gradient on the teacher's greedy answers to
  the same prompts: enough to show the mechanics; the experiment uses a holdout split.
  """
  import jax.numpy as jnp

  from antidistill_jax import gradients, models, sampling
  from antidistill_jax import tokenizer as tok_lib

  teacher_path = _checkpoint(config.checkpoint, config.workdir, "tiny_teacher")
  dtype = jnp.dtype(config.dtype)
  teacher = models.from_pretrained(teacher_path, dtype=dtype)
  tokenizer = tok_lib.load_tokenizer(teacher_path)
  prompts = [tok_lib.prompt_ids(tokenizer, p, system=config.system_prompt or None)
             for p in config.prompts]
  params = sampling.SamplingParams(
      max_new_tokens=config.max_new_tokens, tau=config.tau,
      top_p=config.top_p if config.tau > 0 else None, seed=config.seed,
      lam=config.lam, eps=config.eps, method=config.method)
  eos = tok_lib.eos_ids(teacher_path, teacher.config)  # generation_config.json's too
  plain = sampling.Sampler(teacher, tokenizer, eos_ids=eos)
  runs = {"plain": (plain, dataclasses.replace(params, lam=0.0))}
  if config.lam:
    proxy_path = _checkpoint(config.proxy, config.workdir, "tiny_proxy", seed=1, hidden_size=32,
                             intermediate_size=64, tokenizer=tokenizer)
    proxy = models.from_pretrained(proxy_path, dtype=dtype)
    greedy = plain(prompts, sampling.SamplingParams(max_new_tokens=config.max_new_tokens, tau=0.0))
    grad, meta = gradients.proxy_gradient(proxy, list(zip(prompts, greedy.tokens)),
                                          micro_batch_size=len(prompts))
    logging.info("proxy gradient: %s", meta)
    ads = sampling.Sampler(teacher, tokenizer, eos_ids=eos, proxy=proxy, grad=grad)
    runs[f"antidistilled (lam={config.lam}, method={config.method})"] = (ads, params)
  texts = {}
  for name, (sampler, p) in runs.items():
    start = time.time()
    out = sampler(prompts, p)
    seconds = time.time() - start
    texts[name] = [tokenizer.decode(t) for t in out.tokens]
    print(f"\n===== {name}: {int(out.lengths.sum())} tokens in {seconds:.1f}s (compile included)")
    for prompt, text, logp in zip(config.prompts, texts[name], out.logprobs):
      print(f"\n### {prompt}\n{text!r}\n(mean teacher log-prob {logp.mean():.3f})")
  return texts


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    import jax
    # CPU hosts need a collectives backend (JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo also sets it).
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())
  config = _CONFIG.value
  if "grid" not in config:  # the generation demo
    run_generate(config)
    return
  from antidistill_jax import parallel, pipeline
  workdir = _WORKDIR.value
  if not workdir:
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = os.path.join("runs", name)
    logging.info("no --workdir: writing to %s", workdir)
  import jax
  m = config.mesh
  # Every device of the job (all hosts' after --distributed): batches over `data`, weights over
  # `model`. One device needs no mesh.
  mesh = parallel.make_mesh(data=m.data, model=m.model) if jax.device_count() > 1 else None
  experiment = pipeline.Experiment(config, workdir, shard=pipeline.parse_shard(_SHARD.value),
                                   mesh=mesh)
  stages = _STAGES.value or pipeline.STAGES
  experiment.run(stages)
  report = experiment.workdir / "report"
  if "report" in stages and experiment.writer and (report / "results.md").exists():
    written = [(what, report / name) for what, name in (
        ("Figure 3", "figure3.png"), ("Figure 5", "figure5.png"), ("All results", "results.json"))]
    print(f"\n{(report / 'results.md').read_text()}\n"
          + "\n".join(f"{what}: {path}" for what, path in written if path.exists()))


def run():
  """Console entry: resolves --config=configs/NAME.py against the packaged configs first."""
  import sys
  argv = [f"--config={_config_path(a[len('--config='):])}" if a.startswith("--config=") else a
          for a in sys.argv]
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
