"""Command-line entry point.

  python -m antidistill_jax.main     # the default: configs/quick.py in runs/quick, tiny
                                     # models trained from scratch, offline, ~7 min on 2 CPUs
  python -m antidistill_jax.main --config=configs/tiny.py --workdir=runs/tiny [--stages=a,b]
      [--shard=i/n] [--config.key=value ...]            # the experiment (antidistill_jax.pipeline)
  python -m antidistill_jax.main --config=configs/generate.py [--config.models.teacher=DIR]
                                                        # the sampling demo

An experiment config (job="experiment") runs `pipeline.Experiment` in --workdir (default
runs/<config name>; --migrate_keys first moves an older workdir's finished outputs to the
current keys); the generate demo (job="generate") loads a teacher through `models.from_pretrained`, renders
the prompts with its chat template and samples with `sampling.generate`, plainly and, with a
proxy, antidistilled.

The experiment's log (absl and python logging at INFO and above: ours, orbax's, jax's) goes to
<workdir>/logs/<UTC time>-<host>-<pid>.log, named on the first line it prints; the terminal
gets warnings only, unless --verbosity=0 (INFO) or -v=1 (DEBUG). A bad flag or config value, a
missing input or an unusable workdir ends in one line, `error: ...`, with exit status 2.
"""

import atexit
import dataclasses
import json
import logging as py_logging
import os
import socket
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from antidistill_jax import errors, files

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


_CONFIG = config_flags.DEFINE_config_file("config", _config_path("configs/quick.py"))
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
_MIGRATE = flags.DEFINE_bool(
    "migrate_keys", False, "a workdir written by an older antidistill_jax: move its finished "
    "outputs to this config's keys (renames folders; loads each model once), then run")

# Exit status of a usage error (bad flag or config value, missing input, unusable workdir), as
# argparse and the shells use; a crash exits 1.
USAGE_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# A log record with this attribute set goes to the log file only (the traceback behind an error
# the terminal shows as one line).
FILE_ONLY = "antidistill_file_only"
_LOG_FILE: str | None = None  # this process's log file, once route_logs made it


# -- flags checked before anything runs ------------------------------------------------------


def parse_stages(names, stages) -> tuple[str, ...]:
  """--stages as a tuple (all of `stages` when not given); errors.BadValue naming the unknown."""
  if not names:
    return tuple(stages)
  unknown = [s for s in names if s not in stages]
  if unknown:
    raise errors.BadValue(f"--stages={','.join(names)}: unknown stage(s) {', '.join(unknown)}; "
                          f"pick from {','.join(stages)}.")
  return tuple(names)


# -- logs: everything to a file in the workdir, warnings to the terminal ----------------------


def _terminal_level() -> int:
  """WARNING, or the level --verbosity / -v asks for when the user gave it (0: INFO, 1: DEBUG)."""
  verbosity = flags.FLAGS["verbosity"]
  if not verbosity.present:
    return py_logging.WARNING
  v = verbosity.value
  return logging.converter.absl_to_standard(v) if v <= 1 else py_logging.DEBUG - (v - 1)


def _not_an_absent_plugin(record: py_logging.LogRecord) -> bool:
  """False for JAX's "Unable to initialize backend 'tpu': ... Failed to open libtpu.so: ...
  No such file or directory": every run without libtpu probes for it, and the line reads like
  a fault. A TPU library that is installed and fails to start still gets through."""
  message = record.getMessage()
  return not ("Unable to initialize backend" in message and "No such file or directory" in message)


def route_logs(workdir: str) -> str:
  """Sends absl and python logging (ours, orbax's, jax's) at INFO and above (lower if
  --verbosity asks) to a new file, and to the terminal (stderr) WARNING and above unless
  --verbosity / -v asks for more (--verbosity=0: INFO). Returns the file's path.

  The file is <workdir>/logs/<UTC time>-<host>-<pid>.log: one per process and run, created,
  never appended to, so jobs sharing a workdir do not mix their lines. A remote workdir
  (gs://) cannot be appended to: the file is written under files.cache_root()/logs and copied
  to <workdir>/logs/ when the process exits (a killed job leaves it in the cache only; the path
  printed at start says where)."""
  name = (f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{socket.gethostname()}-"
          f"{os.getpid()}.log")
  remote = not files.is_local(workdir)
  folder = os.path.join(files.cache_root(), "logs") if remote else os.path.join(workdir, "logs")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, name)
  terminal = _terminal_level()
  root = py_logging.getLogger()
  # absl's handler (app.run puts it on the root logger) and any other stderr handler: the
  # terminal's level; records marked FILE_ONLY skip them.
  absl_handler = logging.get_absl_handler()
  to_terminal = [h for h in root.handlers if h is absl_handler or (
      isinstance(h, py_logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__))]
  if not to_terminal:  # not under app.run: python's lastResort stops once a file handler exists
    to_terminal = [py_logging.StreamHandler(sys.stderr)]
    to_terminal[0].setFormatter(logging.PythonFormatter())
    root.addHandler(to_terminal[0])
  for handler in to_terminal:
    handler.setLevel(terminal)
    handler.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
  global _LOG_FILE
  _LOG_FILE = path
  to_file = py_logging.FileHandler(path, mode="x", encoding="utf-8")
  to_file.setFormatter(logging.PythonFormatter())  # absl's "I1204 18:25:25.49 pid file:line]"
  to_file.setLevel(min(py_logging.INFO, terminal))
  root.addHandler(to_file)
  # The root level gates every logger without its own (absl sets it from --verbosity): it must
  # let INFO through to the file even when the terminal wants only warnings.
  root.setLevel(min(py_logging.INFO, terminal))
  py_logging.captureWarnings(True)  # warnings.warn: once on the terminal, and in the file
  py_logging.getLogger("jax._src.xla_bridge").addFilter(_not_an_absent_plugin)
  if remote:
    def upload():
      to_file.flush()
      target = f"{workdir.rstrip('/')}/logs/{name}"
      try:
        with open(path, "rb") as f:
          files.write_atomic(target, f.read())
      except Exception as e:  # pylint: disable=broad-except  (exiting: say where the log is)
        print(f"could not copy the log to {target} ({type(e).__name__}: {e}); it is at {path}",
              file=sys.stderr)
    atexit.register(upload)
  return path


# -- usage errors: one line, no traceback -----------------------------------------------------


def _log_to_file_only(message: str) -> None:
  """Logs `message` and the exception being handled to the log file, if route_logs made one."""
  if _LOG_FILE:
    py_logging.getLogger(__name__).error(message, exc_info=True, extra={FILE_ONLY: True})


def usage_error(message: str) -> None:
  """Ends the process as a usage error: `error: <message>` on stderr, exit status USAGE_EXIT."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag (or --config.* value) reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(f"{e} (--helpshort lists the flags)")


def _checkpoint(path: str, workdir: str, name: str, **tiny_config) -> str:
  """`path` (a .gguf file: its converted folder), or a tiny random checkpoint built once under
  workdir/name."""
  from antidistill_jax import random_checkpoints
  if path.endswith(".gguf") and os.path.isfile(path):
    from antidistill_jax.models import gguf
    return gguf.local_folder(path)
  if path:
    return path
  path = os.path.join(workdir, name)
  if not os.path.exists(os.path.join(path, "config.json")):
    logging.info("building a tiny random %s at %s", name, path)
    random_checkpoints.make_tiny_checkpoint(path, **tiny_config)
  return path


def _examples(config, spec: str, n: int, flag: str) -> list:
  """The first n examples of DATASET:SPLIT, read as the experiment reads data (data.*)."""
  from antidistill_jax.pipeline.inputs import load_examples
  return load_examples(config.data, spec, f"--config.generate.{flag}")[:int(n)]


def _grad_prompts(config, tokenizer, prompts, context: int) -> tuple[list[list[int]], str]:
  """The prompts g is computed on, and what they are (for the terminal). Held-out prompts
  longer than the teacher's context less sample.max_new_tokens are left out, as the demo's
  own prompts would fail."""
  g = config.generate
  if not g.holdout:
    return prompts, (f"the {len(prompts)} prompts above (--config.generate.holdout=gsm8k:train "
                     "takes held-out problems instead)")
  from antidistill_jax.data.prompts import build_prompts
  limit = context - config.sample.max_new_tokens
  held = build_prompts(tokenizer, _examples(config, g.holdout, g.holdout_n, "holdout"), limit,
                       system=config.prompts.system or None).ids
  if not held:
    raise errors.BadValue(f"--config.generate.holdout={g.holdout}: no problem of the first "
                          f"{g.holdout_n} fits in {limit} tokens (the teacher's context less "
                          "sample.max_new_tokens).")
  return held, f"{len(held)} problems of {g.holdout}"


def run_generate(config) -> dict[str, list[str]]:
  """Plain samples of config.generate.problems (or the first generate.problems_n problems of
  generate.problems_from), and antidistilled ones when generate.lam != 0.

  The antidistillation direction g is the proxy's gradient on the teacher's greedy answers to
  the first generate.holdout_n problems of generate.holdout (held out, as the experiment's),
  or, without one, to the demo's own prompts (enough to show the mechanics).
  """
  import jax.numpy as jnp
  import numpy as np

  from antidistill_jax import gradients, models, sampling
  from antidistill_jax import tokenizer as tok_lib
  from antidistill_jax.sampling import calibration
  from antidistill_jax.data.prompts import user_message

  g, s = config.generate, config.sample
  teacher_path = _checkpoint(config.models.teacher, g.workdir, "tiny_teacher")
  dtype = jnp.dtype(config.models.dtype)
  teacher = models.from_pretrained(teacher_path, dtype=dtype)
  tokenizer = tok_lib.load_tokenizer(teacher_path)
  problems = list(g.problems)
  if g.problems_from:  # a dataset's first problems instead
    problems = [e.problem for e in _examples(config, g.problems_from, g.problems_n,
                                             "problems_from")]
  # The authors' layout, as the experiment's (data.prompts): system turn, problem.strip() + "\n".
  prompts = [tok_lib.prompt_ids(tokenizer, user_message(p), system=config.prompts.system or None)
             for p in problems]
  params = sampling.SamplingParams(
      max_new_tokens=s.max_new_tokens, tau=g.tau, top_p=s.top_p if g.tau > 0 else None,
      seed=s.seed, lam=g.lam, eps=s.eps, method=s.method, delta_on=s.delta_on)
  eos = tok_lib.eos_ids(teacher_path, teacher.config)  # generation_config.json's too
  plain = sampling.Sampler(teacher, tokenizer, eos_ids=eos)
  runs = {"plain": (plain, dataclasses.replace(params, lam=0.0))}
  if g.lam:
    proxy_path = _checkpoint(config.models.proxy, g.workdir, "tiny_proxy", seed=1, hidden_size=32,
                             intermediate_size=64, tokenizer=tokenizer)
    # One model in memory where teacher and proxy are one checkpoint (nothing mutates weights).
    same = os.path.realpath(proxy_path) == os.path.realpath(teacher_path)
    proxy = teacher if same else models.from_pretrained(proxy_path, dtype=dtype)
    g_prompts, source = _grad_prompts(config, tokenizer, prompts,
                                      teacher.config.max_position_embeddings)
    greedy = plain(g_prompts, sampling.SamplingParams(max_new_tokens=s.max_new_tokens, tau=0.0))
    # Two sequences per micro-batch: the backward pass of 8 SmolLM2 rows of 256 positions
    # (49k-token logits in fp32) peaked at 7 GB over the weights; 2 keep the demo near 3 GB.
    grad, meta = gradients.proxy_gradient(proxy, list(zip(g_prompts, greedy.tokens)),
                                          micro_batch_size=min(2, len(g_prompts)))
    print(f"g: the proxy's gradient on the teacher's greedy answers to {source}")
    logging.info("proxy gradient: %s", meta)
    ads = sampling.Sampler(teacher, tokenizer, eos_ids=eos, proxy=proxy, grad=grad)
    if g.logprob_drop > 0:
      lam, ladder = calibration.lam_for_logprob_drop(ads, prompts, params, g.logprob_drop)
      print(f"lam {lam:.4g}: the teacher's mean log-prob per token drops by "
            f"{dict(ladder)[lam]:.2f} nats from plain sampling (target {g.logprob_drop}; "
            f"{len(ladder)} lams tried)")
      params = dataclasses.replace(params, lam=lam)
    runs[f"antidistilled (lam={params.lam:.4g}, method={s.method})"] = (ads, params)
  texts, rows, mean_logp = {}, [], {}
  for name, (sampler, p) in runs.items():
    start = time.time()
    out = sampler(prompts, p)
    seconds = time.time() - start
    texts[name] = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    tokens = int(out.lengths.sum())
    logps = [float(np.mean(lp)) if len(lp) else float("nan") for lp in out.logprobs]
    mean_logp[name] = calibration.mean_logprob(out)
    print(f"\n===== {name}: lam {p.lam:g}, {tokens} tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s, compile included), mean teacher "
          f"log-prob {mean_logp[name]:.3f} per token")
    if p.lam:
      calibration.warn_if_collapsed(mean_logp["plain"] - mean_logp[name], p.lam,
                                    "--config.generate.lam or --config.generate.logprob_drop")
    for problem, text, logp in zip(problems, texts[name], logps):
      print(f"\n### {problem}\n{text}\n(mean teacher log-prob {logp:.3f} per token)")
      rows.append(dict(mode=name.split(" ")[0], lam=float(p.lam), tau=float(p.tau),
                       problem=problem, text=text, teacher_logprob=logp))
  path = os.path.join(g.workdir, "samples.jsonl")
  files.makedirs(g.workdir)
  files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
  print(f"\nsamples: {path}")
  return texts


def main(argv):
  del argv
  if _CONFIG.value.job != "generate":  # the experiment: flags checked, logs routed, first
    from antidistill_jax import pipeline  # its import starts no jax backend (distributed below)
    shard = pipeline.parse_shard(_SHARD.value)
    stages = parse_stages(_STAGES.value, pipeline.STAGES)
    workdir = _WORKDIR.value
    if not workdir:
      config_file = config_flags.get_config_filename(flags.FLAGS["config"])
      workdir = os.path.join("runs", os.path.splitext(os.path.basename(config_file))[0])
    pipeline.check_workdir(workdir)
    print(f"workdir {workdir}, log {route_logs(workdir)}", file=sys.stderr, flush=True)
  else:  # the demo: its text on the terminal, the library's INFO lines in its workdir's log
    print(f"log {route_logs(_CONFIG.value.generate.workdir)}", file=sys.stderr, flush=True)
  if _DISTRIBUTED.value:
    import jax
    # CPU hosts need a collectives backend (JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo also sets it).
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())
  import jax
  logging.info("jax %s backend: %d %s device(s), %d process(es)", jax.default_backend(),
               jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
  config = _CONFIG.value
  if config.job == "generate":  # the sampling demo (configs/generate.py)
    run_generate(config)
    return
  from antidistill_jax import parallel, pipeline
  m = config.mesh
  # Every device of the job (all hosts' after --distributed): batches over `data`, weights over
  # `model`. One device needs no mesh.
  try:
    mesh = parallel.make_mesh(data=m.data, model=m.model) if jax.device_count() > 1 else None
  except ValueError as e:
    raise errors.BadValue(f"--config.mesh.data={m.data} --config.mesh.model={m.model}: {e} "
                          "Set --config.mesh.model to a divisor of the device count and "
                          "--config.mesh.data=-1 (every other device).") from None
  if config.job == "study":  # experiments over arms and seeds (configs/synthetic_study.py)
    from antidistill_jax import study
    config_flag = flags.FLAGS["config"]
    load = study.file_loader(config_flags.get_config_filename(config_flag),
                             config_flags.get_override_values(config_flag))
    study.run_study(config, load, workdir, shard=shard, mesh=mesh, stages=stages)
    return
  experiment = pipeline.Experiment(config, workdir, shard=shard, mesh=mesh)
  if _MIGRATE.value:
    moved = experiment.migrate_keys()
    print(f"migrated {sum(moved.values())} finished outputs to the new keys: "
          + (", ".join(f"{s} {n}" for s, n in moved.items()) or "none matched this config"),
          flush=True)
  experiment.run(stages)
  report = experiment.workdir / "report"
  if "report" in stages and experiment.writer and (report / "results.md").exists():
    written = [(what, report / name) for what, name in (
        ("Figure 3", "figure3.png"), ("Figure 5", "figure5.png"), ("All results", "results.json"))]
    print(f"\n{(report / 'results.md').read_text()}\n"
          + "\n".join(f"{what}: {path}" for what, path in written if path.exists()))


def run():
  """Console entry: resolves --config=configs/NAME.py against the packaged configs first.

  A bad flag and an errors.UserError raised anywhere in the run (a bad value, a missing input,
  an unusable workdir) end as one line on stderr, exit status USAGE_EXIT; the traceback behind
  it, and behind any crash, goes to the run's log file (route_logs) when there is one."""
  argv = [f"--config={_config_path(a[len('--config='):])}" if a.startswith("--config=") else a
          for a in sys.argv]
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except errors.UserError as e:
    _log_to_file_only("usage error")
    usage_error(str(e))
  except KeyboardInterrupt:
    _log_to_file_only("interrupted")
    print("interrupted: what finished is kept in the workdir; run the same command again to "
          "resume (finished stages, trace rows and training checkpoints are reused).",
          file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT)
  except Exception:
    _log_to_file_only("crashed")
    raise


if __name__ == "__main__":
  run()
