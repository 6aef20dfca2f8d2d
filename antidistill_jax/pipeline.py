"""The paper's experiment as resumable stages over the library.

  holdout -> grad -> sample -> distill -> eval_student
                  \\-> eval_teacher      eval_base      -> report

  holdout       greedy teacher traces on the holdout split             (traces)
  grad          the proxy's gradient g on them                         (gradients)
  sample        training traces for every grid point: ADS and the temperature baseline
  distill       a student per trace set (LoRA SFT), exported merged    (distill)
  eval_student  each distilled student, greedily, on the test split    (evaluation)
  eval_teacher  the teacher on the test split with each point's settings
  eval_base     the undistilled student (the paper's dashed line)
  report        Figure 3, Figure 5 and a table from whatever results exist (report)

Every output lives in workdir/<stage>/<key>/, where key hashes everything that decides it:
config values, the keys of its upstream outputs and the fingerprints of the models (a hash of
the checkpoint's values, `gradients.fingerprint`). A rerun finds finished outputs by key and
does no work; a changed value (lam, the proxy, the split seed) makes a new key and never reuses
a stale output. Half-done work resumes through the library's own machinery (trace files resume
at the last whole batch, distillation from its last orbax checkpoint). `runs.jsonl` lists every
stage run (key, wall time, whether it was reused, metrics); `index/<point>.json` maps each grid
point to its latest results for the report.

Storage: the workdir may be local or `gs://...` (every path goes through `etils.epath`; model
folders on gs:// are copied to local disk to load, `files.local_dir`). Several processes
(`--distributed`): every process runs every stage (batches span all of them), process 0 decides
what is done and alone writes, and the others wait for its files (`parallel.agree`,
`parallel.sync`), so the workdir must be one folder all hosts see: gs:// or a shared disk.

Grid points (`grid`): ADS at each tau in grid.ads_taus with lam = b * eps for b in
grid.ads_lam_over_eps, and the temperature baseline at each tau in grid.temperatures with
lam = 0. `shard=(i, n)` runs the points whose index is i mod n: independent hosts split a grid
explicitly (nothing is inferred from host names); their holdout and grad stages must be done
first (`--stages=holdout,grad` once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from antidistill_jax import attacks as attacks_lib
from antidistill_jax import (data, distill, evaluation, files, gradients, models, monitoring,
                             parallel, sampling, traces)
from antidistill_jax import tokenizer as tok_lib

STAGES = ("models", "holdout", "grad", "calibrate", "sample", "distill", "eval_student",
          "eval_teacher", "eval_base", "report")
PER_POINT = ("sample", "distill", "eval_student", "eval_teacher")


# -- the grid ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
  """One trace set: its sampling settings and a readable, unique name."""
  kind: str  # "ads" or "temperature"
  tau: float
  lam: float
  eps: float

  @property
  def name(self) -> str:
    return f"{self.kind}_tau{self.tau:.4g}_lam{self.lam:.4g}"


def grid(config) -> list[Point]:
  g = config.grid
  eps = float(config.sample.eps)
  # lam = 0 is plain sampling whichever sweep lists it: one trace set, named as a temperature.
  kind = lambda lam: "ads" if lam else "temperature"
  points = [Point(kind(float(b) * eps), float(t), float(b) * eps, eps) for t in g.ads_taus
            for b in g.ads_lam_over_eps]
  points += [Point("temperature", float(t), 0.0, eps) for t in g.temperatures]
  return list(dict.fromkeys(points))  # the same settings twice are one trace set


def shard_points(points: Sequence[Point], shard: tuple[int, int]) -> list[Point]:
  i, n = shard
  if not 0 <= i < n:
    raise ValueError(f"shard {i}/{n}: expected 0 <= i < n.")
  return [p for k, p in enumerate(points) if k % n == i]


def parse_shard(text: str) -> tuple[int, int]:
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard={text!r}: expected i/n, e.g. 0/4.") from None
  shard_points([], (i, n))
  return i, n


def calibrated_lams(ladder: Sequence[tuple[float, float]], best: float, worst: float,
                    points: int) -> list[float]:
  """`points` lams at which the teacher's accuracy is expected to be evenly spaced from `best`
  down to `worst` (both included), read off a measured (lam, accuracy) ladder; duplicates
  merge, so fewer may come back.

  The ladder's accuracies are made non-increasing in lam (a running minimum: noise on a small
  batch) and interpolated linearly in log lam between its rungs (lam = 0 sits one rung below
  the smallest positive lam). A target above the ladder's first accuracy gets the smallest
  positive lam; one below its last gets the largest lam (the ladder is too short: extend it)."""
  ladder = sorted((float(lam), float(acc)) for lam, acc in ladder)
  positive = [lam for lam, _ in ladder if lam > 0]
  if len(positive) < 2:
    raise ValueError("a calibration ladder needs at least two positive lams.")
  floor = math.log(positive[0]) - (math.log(positive[1]) - math.log(positive[0]))
  xs = [math.log(lam) if lam > 0 else floor for lam, _ in ladder]
  ys, low = [], math.inf
  for _, acc in ladder:
    low = min(low, acc)
    ys.append(low)
  targets = ([best + (worst - best) * k / (points - 1) for k in range(points)] if points > 1
             else [(best + worst) / 2])
  lams = []
  for target in targets:
    if target >= ys[0]:
      x = xs[0] if ladder[0][0] > 0 else math.log(positive[0])
    elif target <= ys[-1]:
      x = xs[-1]
    else:
      k = next(i for i in range(1, len(ys)) if ys[i] <= target)
      span = ys[k - 1] - ys[k]
      x = xs[k] if span == 0 else xs[k - 1] + (xs[k] - xs[k - 1]) * (ys[k - 1] - target) / span
    lams.append(float(f"{max(math.exp(x), positive[0]):.3g}"))
  return sorted(set(lams))


# -- keys and files ---------------------------------------------------------------------------


def key_of(**parts) -> str:
  """A short hash of JSON-able parts (sorted keys): the identity of a stage output."""
  blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# -- models -----------------------------------------------------------------------------------


def resolve_checkpoint(spec: str, cache_dir: str) -> str:
  """A local directory for a model spec: a local path as it is; a gs:// folder copied to local
  disk (`files.local_dir`); a hub id fetched with huggingface_hub.snapshot_download (config,
  safetensors, tokenizer files) into cache_dir."""
  if os.path.isdir(spec):
    return spec
  if not files.is_local(spec):
    return files.local_dir(spec)
  if spec.startswith("/") or spec.startswith("."):
    raise FileNotFoundError(f"model directory {spec!r} does not exist.")
  try:
    import huggingface_hub
    return huggingface_hub.snapshot_download(
        spec, cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
  except Exception as e:  # offline, unknown id, no access
    raise FileNotFoundError(
        f"could not fetch hub model {spec!r} ({type(e).__name__}: {e}). Offline, download it "
        f"where there is network (huggingface-cli download {spec} --local-dir DIR) and pass the "
        "local directory instead, e.g. --config.teacher=DIR.") from e


def save_model_dir(model, tokenizer, path) -> None:
  """models.save_pretrained + the tokenizer into `path`, local or gs:// (written locally, then
  uploaded). Every process calls it (weights spread over hosts are gathered); process 0
  writes."""
  local = files.is_local(path)
  with tempfile.TemporaryDirectory() as tmp:
    target = os.fspath(path) if local else tmp
    models.save_pretrained(model, target)
    if parallel.is_writer():
      tokenizer.save_pretrained(target)
      if not local:
        files.upload_dir(tmp, path)


def _tiny_models(config, workdir: epath.Path, texts: Sequence[str]) -> dict[str, str]:
  """Tiny random teacher / proxy / student checkpoints (one tokenizer), built once (by process
  0, while the others wait)."""
  from antidistill_jax import tiny
  root = workdir / "models"
  paths = {name: root / name for name in ("teacher", "proxy", "student")}
  done = root / "done.json"
  if not parallel.agree(done.exists()) and parallel.is_writer():
    t = config.tiny
    tok = tiny.train_tokenizer(list(texts) * 2, vocab_size=t.vocab_size)
    specs = {"teacher": (t.seed, dict(t.teacher)), "proxy": (t.seed + 1, dict(t.proxy)),
             "student": (t.seed + 2, dict(t.student))}
    with tempfile.TemporaryDirectory() as tmp:
      for name, (seed, cfg) in specs.items():
        tiny.make_tiny_checkpoint(os.path.join(tmp, name), tokenizer=tok, seed=seed, **cfg)
        files.upload_dir(os.path.join(tmp, name), paths[name])
    files.write_json(done, dict(models=sorted(paths)))
  parallel.sync("tiny models")
  return {name: os.fspath(p) for name, p in paths.items()}


@dataclasses.dataclass
class Loaded:
  path: str
  model: Any
  tokenizer: Any
  fingerprint: str


# -- the experiment ---------------------------------------------------------------------------


class Experiment:
  """One config, one workdir: stages run in order, each skipping what is finished."""

  def __init__(self, config, workdir: str, *, shard: tuple[int, int] = (0, 1), mesh=None):
    self.config, self.workdir, self.shard, self.mesh = config, epath.Path(workdir), shard, mesh
    self._models: dict[str, Loaded] = {}
    self._splits: dict[str, list] = {}
    self._split_hashes: dict[str, str] = {}
    self.writer = parallel.is_writer()
    self._events = None
    if self.writer:
      files.makedirs(self.workdir)
    if jax.process_count() > 1:
      self._check_shared_workdir()

  def _check_shared_workdir(self) -> None:
    """Every process must see process 0's files: it writes a token, the others look for it."""
    token = self.workdir / ".processes" / f"{int(time.time() * 1e6)}"
    stamp = parallel.agree(int(token.name))
    token = token.parent / str(stamp)
    if self.writer:
      files.makedirs(token.parent)
      token.write_text("written by process 0")
    parallel.sync("workdir token")
    seen = parallel.everywhere(token.exists())  # every process raises, or none
    if self.writer:
      token.unlink()
    if not seen:
      raise RuntimeError(
          f"some processes cannot see files that process 0 wrote to the workdir "
          f"{os.fspath(self.workdir)!r}: with several hosts the workdir must be one folder they "
          "all see, a gs:// bucket path or a shared disk (--workdir=gs://BUCKET/run).")

  @property
  def events(self) -> monitoring.EventWriter:
    """TensorBoard scalars under workdir/tensorboard (process 0): stage metrics, and each
    student's losses while it trains."""
    if self._events is None:
      self._events = monitoring.EventWriter(self.workdir / "tensorboard", enabled=self.writer)
    return self._events

  @property
  def points(self) -> list[Point]:
    """This shard's grid points; with grid.calibrate, the ADS lams the calibrate stage chose."""
    if "_points" not in self.__dict__:
      points = grid(self.config)
      if self.config.grid.get("calibrate"):
        eps, lams = float(self.config.sample.eps), self.calibrated_lams()
        points = ([Point("ads", float(t), lam, eps) for t in self.config.grid.ads_taus
                   for lam in lams] + [p for p in points if p.kind == "temperature"])
      self._points = shard_points(points, self.shard)
    return self._points

  # -- data and models -----------------------------------------------------------------------

  def split(self, which: str):
    """The examples of data.<which> ("holdout", "train" or "test"), truncated to max_<which>."""
    if which not in self._splits:
      d = self.config.data
      name, split = getattr(d, which).split(":")
      if name == "synthetic":
        examples = self._synthetic(split, int(getattr(d, f"max_{which}")))
      else:
        examples = data.load_split(name, split, manual_dir=d.manual_dir or None,
                                   data_dir=d.data_dir or None, seed=d.split_seed)
      limit = getattr(d, f"max_{which}", None)
      self._splits[which] = list(examples[:limit] if limit else examples)
    return self._splits[which]

  def _synthetic(self, split: str, n: int, stream: int = 0, **overrides) -> list:
    """n problems of data.task (chains, with its writing options; default the sums demo).
    stream > 0 draws other problems of the same split (training data for the models stage)."""
    from antidistill_jax.data import synthetic
    d = self.config.data
    task = dict(d.get("task") or {}, **overrides)
    if task.pop("kind", "sums") == "sums":
      return synthetic.sums(n, split=split, seed=d.seed + stream)
    return synthetic.chains(n, split=split, seed=d.seed, stream=stream, **task)

  def split_hash(self, which: str) -> str:
    """traces.examples_sha256 of a split, computed once (every stage key of it needs it)."""
    if which not in self._split_hashes:
      self._split_hashes[which] = traces.examples_sha256(self.split(which))
    return self._split_hashes[which]

  def model(self, role: str) -> Loaded:
    """teacher, proxy or student: loaded once (tiny random ones built when config.tiny.enabled)."""
    if role not in self._models:
      c = self.config
      if c.get("scratch") and c.scratch.enabled:
        path = self.scratch_models()[role]
      elif c.tiny.enabled:
        texts = [e.problem + " " + e.solution
                 for which in ("holdout", "train", "test") for e in self.split(which)]
        path = _tiny_models(c, self.workdir, texts)[role]
      else:
        path = resolve_checkpoint(getattr(c.models, role), os.fspath(files.cache_root() / "hub"))
      path = files.local_dir(path)  # a model folder on gs:// is read from a local copy
      rules = None
      if role == "teacher" and self.mesh is not None and c.mesh.get("fsdp_teacher"):
        rules = dict(models.DEFAULT_RULES, embed="data")  # FSDP over the batch axis
      model = models.from_pretrained(path, dtype=jnp.dtype(c.models.dtype), mesh=self.mesh,
                                     rules=rules)
      tokenizer = tok_lib.load_tokenizer(path)
      self._models[role] = Loaded(path, model, tokenizer, gradients.fingerprint(model))
    return self._models[role]

  # -- bookkeeping ---------------------------------------------------------------------------

  def out_dir(self, stage: str, key: str) -> epath.Path:
    return self.workdir / stage / key

  def _record(self, stage: str, key: str, seconds: float, reused: bool, metrics: dict,
              point: Point | str | None = None) -> None:
    if isinstance(point, Point):
      point = point.name
    line = dict(time=time.time(), stage=stage, key=key, point=point,
                reused=reused, seconds=round(seconds, 3), metrics=metrics)
    summary = (f"{stage}{' ' + point if point else ''} [{key}]: "
               f"{'reused' if reused else f'{seconds:.1f} s'}, "
               + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in metrics.items()))
    logging.info("%s", summary)
    prefix = f"summary/{stage}/{point}" if point else f"summary/{stage}"
    self.events.scalars({f"{prefix}/{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
    if self.writer:  # rewritten whole (an object store has no append); a few hundred lines
      path = self.workdir / "runs.jsonl"
      old = path.read_bytes() if path.exists() else b""
      files.write_atomic(path, old + (json.dumps(line, default=str) + "\n").encode("utf-8"))

  def _index(self, entry: str, **fields) -> None:
    """Merges fields into index/<name>.json (the report's view of a point)."""
    if not self.writer:
      return
    path = self.workdir / "index" / f"{entry}.json"
    files.makedirs(path.parent)
    merged = files.read_json(path) if path.exists() else {}
    merged.update(fields)
    files.write_json(path, merged)

  def _once(self, stage: str, key: str, compute, point: Point | str | None = None) -> dict:
    """Runs compute(out_dir) -> metrics unless out_dir/done.json exists; returns the metrics.
    Process 0's view of done.json decides for every process; after compute, the others wait
    until process 0 has written its outputs."""
    out = self.out_dir(stage, key)
    done = out / "done.json"
    if parallel.agree(done.exists()):
      metrics = files.read_json(done)["metrics"]
      self._record(stage, key, 0.0, True, metrics, point)
      return metrics
    start = time.time()
    if self.writer:
      files.makedirs(out)
    metrics = compute(out)
    seconds = time.time() - start
    if self.writer:
      files.write_json(done, dict(stage=stage, key=key, seconds=seconds, metrics=metrics))
    parallel.sync(f"{stage} {key}")
    self._record(stage, key, seconds, False, metrics, point)
    return metrics

  # -- keys ------------------------------------------------------------------------------------

  def _trace_settings(self) -> dict:
    c = self.config
    settings = dict(system=c.prompts.system or None,
                    max_prompt_length=c.prompts.max_prompt_length, dataset=c.data.grader)
    if not c.prompts.get("answer_forcing", True):  # the synthetic task has no "Final Answer"
      settings["answer_forcing"] = False
    return settings

  def holdout_key(self) -> str:
    c = self.config
    return key_of(stage="holdout", teacher=self.model("teacher").fingerprint,
                  examples=self.split_hash("holdout"),
                  params=self.holdout_params().as_dict(), batch=c.holdout.batch_size,
                  **self._trace_settings())

  def grad_key(self) -> str:
    return key_of(stage="grad", holdout=self.holdout_key(),
                  proxy=self.model("proxy").fingerprint,
                  micro_batch=self.config.grad.micro_batch_size)

  def point_params(self, point: Point) -> sampling.SamplingParams:
    s = self.config.sample
    return sampling.SamplingParams(
        max_new_tokens=s.max_new_tokens, tau=point.tau, lam=point.lam, eps=point.eps,
        method=s.method, placement=s.placement, top_p=s.top_p if point.tau > 0 else None,
        top_k=s.top_k if point.tau > 0 else None, max_length=s.get("max_length") or None,
        seed=s.seed)

  def holdout_params(self) -> sampling.SamplingParams:
    return sampling.SamplingParams(max_new_tokens=self.config.holdout.max_new_tokens, tau=0.0)

  def eval_params(self) -> sampling.SamplingParams:
    return sampling.SamplingParams(max_new_tokens=self.config.eval.max_new_tokens, tau=0.0)

  def _teacher_side(self, point: Point) -> dict:
    """What a teacher-generated output at this point depends on besides its examples."""
    ads = point.lam != 0.0
    return dict(teacher=self.model("teacher").fingerprint,
                proxy=self.model("proxy").fingerprint if ads else None,
                grad=self.grad_key() if ads else None,
                params=self.point_params(point).as_dict(), **self._trace_settings())

  def sample_key(self, point: Point) -> str:
    return key_of(stage="sample", examples=self.split_hash("train"),
                  batch=self.config.sample.batch_size, **self._teacher_side(point))

  def distill_key(self, point: Point, attack: str | None = None) -> str:
    extra = {} if attack is None else dict(attack=self.attack_settings(point, attack))
    return key_of(stage="distill", traces=self.sample_key(point), holdout=self.holdout_key(),
                  student=self.model("student").fingerprint,
                  distill=dataclasses.asdict(self.distill_config()), **extra)

  def eval_student_key(self, point: Point, attack: str | None = None) -> str:
    return key_of(stage="eval_student", student=self.distill_key(point, attack),
                  **self._eval_parts())

  def eval_teacher_key(self, point: Point) -> str:
    return key_of(stage="eval_teacher", examples=self.split_hash("test"),
                  batch=self.config.eval.batch_size, **self._teacher_side(point))

  def eval_base_key(self) -> str:
    return key_of(stage="eval_base", student=self.model("student").fingerprint,
                  **self._eval_parts())

  def _eval_parts(self) -> dict:
    return dict(examples=self.split_hash("test"), params=self.eval_params().as_dict(),
                batch=self.config.eval.batch_size, **self._trace_settings())

  def distill_config(self) -> distill.DistillConfig:
    return distill.DistillConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in self.config.distill.items()})

  # -- attackers (config.attacks) ---------------------------------------------------------------

  def attack_names(self) -> tuple[str, ...]:
    names = (self.config.get("attacks") or {}).get("names", ())
    # --config.attacks.names=a,b arrives as one string: split on commas.
    names = tuple(n.strip() for x in ([names] if isinstance(names, str) else names)
                  for n in str(x).split(",") if n.strip())
    unknown = [n for n in names if n not in attacks_lib.NAMES]
    if unknown:
      raise ValueError(f"unknown attacks {unknown}; expected some of {attacks_lib.NAMES}.")
    return names

  def students(self) -> list[tuple[Point, str | None]]:
    """(point, attack) of every student to distill: each point's own (attack None), then each
    attacker on the points it applies to. The filters (keep_correct, reaimed) run on the
    temperature sets too, so that a filtered ADS student is compared with students filtered
    the same way; clean_mix only on the ADS sets."""
    out = [(p, None) for p in self.points]
    for name in self.attack_names():
      out += [(p, name) for p in self.points if name != "clean_mix" or p.kind == "ads"]
    return out

  @staticmethod
  def entry_name(point: Point, attack: str | None) -> str:
    return point.name if attack is None else f"{point.name}+{attack}"

  def clean_point(self, point: Point) -> Point:
    """The clean traces clean_mix and reaimed use: the plain trace set at the first ADS tau
    (the attacker's reference, the same for every point it attacks)."""
    tau = float(self.config.grid.ads_taus[0]) if self.config.grid.ads_taus else point.tau
    clean = Point("temperature", tau, 0.0, point.eps)
    if clean not in grid(self.config):  # every shard's points, calibrated or not
      raise ValueError(f"attacks clean_mix and reaimed take clean traces from the plain trace "
                       f"set at tau={tau}, which the grid lacks: add {tau} to "
                       "grid.temperatures.")
    return clean

  def attack_settings(self, point: Point, attack: str) -> dict:
    a = self.config.attacks
    if attack == "keep_correct":
      return dict(name=attack)
    clean = dict(traces=self.sample_key(self.clean_point(point)), seed=int(a.seed))
    if attack == "clean_mix":
      return dict(name=attack, rows=int(a.clean_mix.rows), **clean)
    return dict(name=attack, rows=int(a.reaimed.clean_rows),
                drop_fraction=float(a.reaimed.drop_fraction),
                micro_batch=int(a.reaimed.micro_batch_size), **clean)

  def _clean_rows(self, point: Point) -> list[dict]:
    path = self.out_dir("sample", self.sample_key(self.clean_point(point))) / "traces.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"no clean traces for the attackers at {path}: run the sample "
                              "stage first.")
    return traces.read_traces(path)

  # -- stages ----------------------------------------------------------------------------------

  def _traces(self, out: str, role_sampler, examples, params, batch_size: int, split: str):
    meta = traces.generate_traces(role_sampler, examples, out / "traces.jsonl",
                                  params=params, batch_size=batch_size, split=split,
                                  **self._trace_settings())
    s = meta["statistics"]
    return dict(accuracy=s["accuracy"], forced_accuracy=s["forced_accuracy"],
                length_mean=s["length_mean"], rows=meta["counts"]["rows"])

  def teacher_sampler(self, ads: bool) -> sampling.Sampler:
    """The teacher's Sampler, with the proxy and g when ads (kept: one per run)."""
    name = f"_teacher_sampler_{ads}"
    if name not in self.__dict__:
      t = self.model("teacher")
      kw = dict(proxy=self.model("proxy").model, grad=self.gradient()) if ads else {}
      setattr(self, name, sampling.Sampler(t.model, t.tokenizer, mesh=self.mesh, **kw))
    return getattr(self, name)

  # -- models trained from scratch (configs/synthetic.py) --------------------------------------

  def models_key(self) -> str:
    return key_of(stage="models", scratch=self.config.scratch.to_dict(),
                  task=self.config.data.get("task") and self.config.data.task.to_dict(),
                  seed=self.config.data.seed)

  def scratch_models(self) -> dict[str, str]:
    """Paths of the teacher, proxy and student the models stage trained (local copies)."""
    out = self.out_dir("models", self.models_key())
    if not parallel.agree((out / "done.json").exists()):
      raise FileNotFoundError(f"no trained models at {out}: run the models stage first "
                              "(--stages=models).")
    return {role: files.local_dir(out / role) for role in ("teacher", "proxy", "student")}

  def run_models(self) -> None:
    """Trains the synthetic task's models from scratch (`scratch`): the teacher on gold traces,
    the proxy on the teacher's traces at tau=1, the student (another family) from random
    weights, or pre-trained on an easier distribution (scratch.student.pretrain)."""
    c = self.config
    if not (c.get("scratch") and c.scratch.enabled):
      return
    from antidistill_jax import scratch, tiny

    if jax.process_count() > 1:
      raise RuntimeError("the models stage trains tiny models on one process: run it alone "
                         "first (--stages=models without --distributed), then the rest.")

    def compute(out):
      sc, tok = c.scratch, tiny.task_tokenizer()
      local = tempfile.mkdtemp(prefix="scratch_") if not files.is_local(out) else os.fspath(out)
      step = lambda role: os.path.join(local, role)
      held = scratch.example_rows(tok, self.split("holdout")[:sc.eval_rows])

      def train(role, rows, spec, start_from=None, seed_offset=0):
        cfg = scratch.scratch_config(**dict(spec.train))
        path, history = scratch.train_from_scratch(
            step(role), tokenizer=tok, rows=rows, holdout_rows=held,
            model_type=spec.model_type, shape=dict(spec.shape), config=cfg,
            start_from=start_from, seed=sc.seed + seed_offset)
        return path, history[-1]

      gold = scratch.example_rows(tok, self._synthetic("train", sc.teacher.traces, 1))
      teacher, t_last = train("teacher", gold, sc.teacher)
      # The proxy learns from what the teacher serves: its traces at tau=1 on train problems.
      t_model = models.from_pretrained(teacher)
      sampler = sampling.Sampler(t_model, tok, mesh=self.mesh)
      served = traces.generate_traces(
          sampler, self._synthetic("train", sc.proxy.traces, 2),
          os.path.join(local, "served.jsonl"),
          dataset=c.data.grader, system=None, answer_forcing=False, batch_size=sc.batch_size,
          params=sampling.SamplingParams(max_new_tokens=c.sample.max_new_tokens, tau=1.0,
                                         seed=sc.seed))
      _, p_last = train("proxy", traces.read_traces(os.path.join(local, "served.jsonl")),
                            sc.proxy, seed_offset=1)
      if sc.student.get("pretrain"):  # prior knowledge: the same task, easier problems
        easy = self._synthetic("train", sc.student.pretrain.traces, 3,
                               **dict(sc.student.pretrain.task))
        train("student", scratch.example_rows(tok, easy), sc.student, seed_offset=2)
      else:
        save_model_dir(scratch.random_model(tok, model_type=sc.student.model_type,
                                            seed=sc.seed + 2, **dict(sc.student.shape)),
                       tok, step("student"))
      if not files.is_local(out) and parallel.is_writer():
        for role in ("teacher", "proxy", "student"):
          files.upload_dir(step(role), out / role)
      return dict(teacher_train_loss=t_last["train_loss"], proxy_train_loss=p_last["train_loss"],
                  served_accuracy=served["statistics"]["accuracy"])

    self._once("models", self.models_key(), compute)

  def run_holdout(self) -> None:
    c = self.config
    self._once("holdout", self.holdout_key(), lambda out: self._traces(
        out, self.teacher_sampler(False), self.split("holdout"), self.holdout_params(),
        c.holdout.batch_size, "holdout"))

  def holdout_rows(self) -> list[dict]:
    path = self.out_dir("holdout", self.holdout_key()) / "traces.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"no holdout traces at {path}: run the holdout stage first "
                              "(--stages=holdout,grad).")
    return traces.read_traces(path)

  def run_grad(self) -> None:
    def compute(out):
      rows = self.holdout_rows()
      pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows if r["completion_ids"]]
      grad, meta = gradients.proxy_gradient(self.model("proxy").model, pairs,
                                            micro_batch_size=self.config.grad.micro_batch_size,
                                            mesh=self.mesh)
      gradients.save_gradient(out / "grad", grad, meta)
      return dict(mean_loss=meta["mean_loss"], global_norm=meta["global_norm"],
                  sequences=meta["num_sequences"])
    self._once("grad", self.grad_key(), compute)

  def gradient(self):
    if "_grad" not in self.__dict__:
      path = self.out_dir("grad", self.grad_key()) / "grad"
      if not (path.parent / "done.json").exists():
        raise FileNotFoundError(f"no proxy gradient at {path}: run the grad stage first "
                                "(--stages=holdout,grad).")
      self._grad = gradients.load_gradient(path, self.model("proxy").model)[0]
    return self._grad

  # -- lambda calibration (grid.calibrate) ------------------------------------------------------

  def calibrate_key(self) -> str:
    c = self.config
    return key_of(stage="calibrate", grad=self.grad_key(),
                  teacher=self.model("teacher").fingerprint, examples=self.split_hash("holdout"),
                  calibrate=c.grid.calibrate.to_dict(), taus=list(c.grid.ads_taus),
                  temperatures=list(c.grid.temperatures),
                  params=self.point_params(Point("ads", 1.0, 1.0, c.sample.eps)).as_dict())

  def run_calibrate(self) -> None:
    """Chooses the ADS lams so that the teacher's accuracy under them spans the temperature
    sweep's: the teacher's accuracy on grid.calibrate.n holdout problems at each temperature
    and along a ladder of lams (lam = b * eps for b in grid.calibrate.ladder, at the first ADS
    tau), then grid.calibrate.points lams interpolated (in log lam) at accuracies evenly spaced
    from the best temperature accuracy to the worst."""
    c = self.config
    if not c.grid.get("calibrate"):
      return

    def compute(out):
      cal, eps = c.grid.calibrate, float(c.sample.eps)
      examples = self.split("holdout")[:cal.n]
      temps = {float(t): self._teacher_accuracy(Point("temperature", float(t), 0.0, eps),
                                                examples) for t in c.grid.temperatures}
      tau = float(c.grid.ads_taus[0])
      ladder = [(float(b) * eps, self._teacher_accuracy(Point("ads", tau, float(b) * eps, eps),
                                                        examples)) for b in cal.ladder]
      lams = calibrated_lams(ladder, max(temps.values()), min(temps.values()), int(cal.points))
      return dict(lams=lams, temperature_accuracy=temps,
                  ladder=[dict(lam=lam, accuracy=acc) for lam, acc in ladder])

    self._once("calibrate", self.calibrate_key(), compute)

  def calibrated_lams(self) -> list[float]:
    done = self.out_dir("calibrate", self.calibrate_key()) / "done.json"
    if not done.exists():
      raise FileNotFoundError(f"no lambda calibration at {done}: run the calibrate stage "
                              "first (--stages=...,calibrate).")
    return [float(x) for x in files.read_json(done)["metrics"]["lams"]]

  def _teacher_accuracy(self, point: Point, examples) -> float:
    """The teacher's accuracy on `examples` at a point's settings, in memory (no files)."""
    from antidistill_jax import grading
    from antidistill_jax.data.prompts import build_prompts
    sampler = self.teacher_sampler(point.lam != 0.0)
    s = self._trace_settings()
    prompts = build_prompts(sampler.tokenizer, examples, s["max_prompt_length"], system=s["system"])
    gen = sampler(prompts.ids, self.point_params(point))
    texts = [sampler.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
    return grading.accuracy(self.config.data.grader,
                            [examples[i].solution for i in prompts.indices], texts)

  def run_sample(self, point: Point) -> None:
    c = self.config
    key = self.sample_key(point)
    metrics = self._once("sample", key, lambda out: self._traces(
        out, self.teacher_sampler(point.lam != 0.0), self.split("train"),
        self.point_params(point),
        c.sample.batch_size, "train"), point)
    self._index(point.name, name=point.name, point=dataclasses.asdict(point), sample_key=key,
                traces=metrics)

  def run_distill(self, point: Point, attack: str | None = None) -> None:
    key = self.distill_key(point, attack)
    name = self.entry_name(point, attack)

    def compute(out):
      trace_path = self.out_dir("sample", self.sample_key(point)) / "traces.jsonl"
      if not trace_path.exists():
        raise FileNotFoundError(f"no traces for {point.name} at {trace_path}: run the sample "
                                "stage first.")
      student = self.model("student")
      cfg = self.distill_config()
      system = self.config.prompts.system or None
      rows = traces.read_traces(trace_path)
      settings = self.attack_settings(point, attack) if attack else {}
      extra, select, log = {}, None, []
      if attack == "keep_correct":
        rows = attacks_lib.keep_correct(rows)
        if not rows:  # nothing to learn from: the attacker's student stays undistilled
          logging.warning("keep_correct: no trace of %s is correct; no student for %s.",
                          point.name, name)
          return dict(train_rows=0, skipped="no correct traces")
      elif attack == "clean_mix":
        rows = attacks_lib.clean_mix(rows, self._clean_rows(point), settings["rows"],
                                     settings["seed"])
      sft = distill.sft_examples(student.tokenizer, rows, system=system,
                                 max_length=cfg.max_length)
      if attack == "reaimed":
        clean = attacks_lib.draw(self._clean_rows(point), settings["rows"], settings["seed"])
        select = attacks_lib.reaimed_selector(
            distill.sft_examples(student.tokenizer, clean, system=system,
                                 max_length=cfg.max_length), sft,
            drop_fraction=settings["drop_fraction"], micro_batch_size=settings["micro_batch"],
            pad_id=cfg.pad_id, mesh=self.mesh, log=log)
      held = distill.sft_examples(student.tokenizer, self.holdout_rows(), system=system,
                                  max_length=cfg.max_length)
      fresh = models.from_pretrained(student.path, dtype=jnp.dtype(self.config.models.dtype),
                                     mesh=self.mesh)
      def on_step(record):
        self.events.scalars({f"distill/{name}/{k}": v for k, v in record.items()
                             if k != "step"}, step=int(record["step"]))
      trained, history = distill.distill(fresh, sft, held, out / "train", cfg,
                                         mesh=self.mesh, on_step=on_step, select=select)
      save_model_dir(trained, student.tokenizer, out / "student")
      last = history[-1]
      evals = [h for h in history if "holdout_loss" in h]
      if attack:  # traces it trained on (re-aimed: per epoch, after its filter)
        extra = dict(train_rows=len(sft) - (log[-1]["dropped"] if log else 0))
        if log:
          extra["reaimed"] = log
      return dict(train_loss=float(last["train_loss"]), steps=int(last["step"]),
                  holdout_loss=float(evals[-1]["holdout_loss"]) if evals else None, **extra)

    metrics = self._once("distill", key, compute, name)
    fields = {} if attack is None else dict(name=name, point=dataclasses.asdict(point),
                                            attack=attack, base=point.name)
    self._index(name, distill_key=key, distill=metrics,
                curves=os.fspath(self.out_dir("distill", key) / "train" / "curves.json"),
                **fields)

  def run_eval_student(self, point: Point, attack: str | None = None) -> None:
    key = self.eval_student_key(point, attack)

    trained = self.out_dir("distill", self.distill_key(point, attack))
    if attack and parallel.agree((trained / "done.json").exists()) and \
        files.read_json(trained / "done.json")["metrics"].get("skipped"):
      return  # the attacker had nothing to train on (run_distill)

    def compute(out):
      path = trained / "student"
      if not (path / "config.json").exists():
        raise FileNotFoundError(f"no distilled student for {self.entry_name(point, attack)} "
                                f"at {path}: run the distill stage first.")
      model = models.from_pretrained(files.local_dir(path),
                                     dtype=jnp.dtype(self.config.models.dtype),
                                     mesh=self.mesh)
      return self._evaluate(out, sampling.Sampler(model, self.model("student").tokenizer,
                                                  mesh=self.mesh))

    name = self.entry_name(point, attack)
    metrics = self._once("eval_student", key, compute, name)
    self._index(name, student_eval=metrics)

  def _evaluate(self, out, sampler, params=None) -> dict:
    summary = evaluation.evaluate(sampler, self.split("test"), out,
                                  params=params or self.eval_params(),
                                  batch_size=self.config.eval.batch_size, name="eval",
                                  **self._trace_settings())
    return dict(accuracy=summary["accuracy"], forced_accuracy=summary["forced_accuracy"],
                n=summary["n"])

  def run_eval_teacher(self, point: Point) -> None:
    key = self.eval_teacher_key(point)
    metrics = self._once("eval_teacher", key, lambda out: self._evaluate(
        out, self.teacher_sampler(point.lam != 0.0), self.point_params(point)), point)
    self._index(point.name, teacher_eval=metrics)

  def run_eval_base(self) -> None:
    metrics = self._once("eval_base", self.eval_base_key(),
                         lambda out: self._evaluate(out, sampling.Sampler(
                             self.model("student").model, self.model("student").tokenizer,
                             mesh=self.mesh)))
    self._index("base", student_eval=metrics)

  def run_report(self) -> dict:
    from antidistill_jax import report
    if not self.writer:
      return {}
    return report.write_report(self.workdir)

  # -- driver ----------------------------------------------------------------------------------

  def run(self, stages: Sequence[str] = STAGES) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise ValueError(f"unknown stages {unknown}; expected some of {STAGES}.")
    start = time.time()
    for stage in STAGES:
      if stage not in stages:
        continue
      t0 = time.time()
      if stage in ("distill", "eval_student"):
        for point, attack in self.students():
          getattr(self, f"run_{stage}")(point, attack)
      elif stage in PER_POINT:
        for point in self.points:
          getattr(self, f"run_{stage}")(point)
      else:
        getattr(self, f"run_{stage}")()
      monitoring.stage_summary(stage, time.time() - t0)
    self.events.close()
    self._events = None
    monitoring.stage_summary("stages " + ",".join(s for s in STAGES if s in stages),
                             time.time() - start, points=len(self.points)
                             if "_points" in self.__dict__ else "-")
