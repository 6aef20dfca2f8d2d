"""What the stages read: the config, the data splits, the models, and the keys.

`Inputs` loads each split and model once, on first use, and computes every stage key without
loading a model (`identity`). Keys hash what changes an output and nothing else: a sampling
setting that a point does not use (the proxy's method and eps at lam = 0, eps for the exact
JVP, the seed for greedy decoding) is left out (`sampling_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax.numpy as jnp
from etils import epath

from antidistill_jax import (attacks, distill, errors, files, models, monitoring, parallel,
                             sampling, traces)
from antidistill_jax import tokenizer as tok_lib
from antidistill_jax.pipeline import identity
from antidistill_jax.pipeline.grid import (REPLICATE_STRIDE, RESAMPLE_STREAM, STREAM_STRIDE,
                                           Point, Prefill, Resample, Student, gradient_of,
                                           grid, kind_of, shard_points)
from antidistill_jax.pipeline.store import Store, key_of

ROLES = ("teacher", "proxy", "student")

# What each stage reads that exists before any stage runs: data splits and checkpoints.
SPLITS_READ = dict(models=("holdout",), holdout=("holdout",), grad=("holdout",),
                   calibrate=("holdout",), sample=("train",), eval_student=("test",),
                   eval_teacher=("test",), eval_base=("test",))
# grad reads the teacher's traces as the proxy's ids: their vocabularies are checked for it too.
ROLES_READ = dict(holdout=("teacher",), grad=("teacher", "proxy"), calibrate=("teacher", "proxy"),
                  sample=("teacher", "proxy"), distill=("student",), eval_student=("student",),
                  eval_teacher=("teacher", "proxy"), eval_base=("student",))


def results_root(workdir, name: str = ""):
  """Where a config's index/ and report/ go: the workdir, or workdir/results/<name> with
  pipeline.name (the chains of a study, which share a workdir)."""
  workdir = epath.Path(workdir)
  return workdir / "results" / name if name else workdir


def resolve_checkpoint(spec: str, cache_dir: str, flag: str = "--config.models.teacher") -> str:
  """A local directory for a model spec: a local path as it is; a llama.cpp .gguf file converted
  once (`models.gguf.local_folder`); a gs:// folder copied to local disk (`files.local_dir`); a
  hub id fetched with huggingface_hub.snapshot_download (config, safetensors, tokenizer files)
  into cache_dir. flag: the option that gave spec, named in errors."""
  if os.path.isdir(spec):
    return spec
  if spec.endswith(".gguf") and os.path.isfile(spec):
    from antidistill_jax.models import gguf
    return gguf.local_folder(spec)
  if not files.is_local(spec):
    return files.local_dir(spec)
  # A hub id is ORG/NAME (or NAME): more slashes, or a leading / or ., is a path.
  if spec.startswith("/") or spec.startswith(".") or not spec or spec.count("/") > 1:
    raise errors.MissingInput(f"model directory {spec!r} does not exist: pass a checkpoint "
                              f"folder, a .gguf file or a hub id ({flag}=DIR).")
  try:
    import huggingface_hub
    return huggingface_hub.snapshot_download(
        spec, cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
  except Exception as e:  # offline, unknown id, no access
    raise errors.MissingInput(
        f"could not fetch hub model {spec!r} ({type(e).__name__}: {e}). Offline, download it "
        f"where there is network (huggingface-cli download {spec} --local-dir DIR) and pass the "
        f"local directory instead, e.g. {flag}=DIR.") from e


@dataclasses.dataclass
class Loaded:
  path: str
  model: Any
  tokenizer: Any


def sampling_key(params: sampling.SamplingParams) -> dict:
  """The settings that change what a sampler writes: the proxy's (method, placement, eps,
  delta_on) only when lam != 0, eps only for the finite difference, the seed only when
  sampling."""
  d = params.as_dict()
  if not d["lam"]:
    for k in ("method", "placement", "eps", "delta_on"):
      d.pop(k, None)
  elif d["method"] != "fd":
    d.pop("eps")
  if not d["tau"]:
    d.pop("seed")
  return d


def calibrate_settings(cal) -> dict:
  """grid.calibrate as keys record it: logprob_drops only when set (a field added later, so
  calibrations made before it keep their keys)."""
  d = cal.to_dict()
  if not d.get("logprob_drops"):
    d.pop("logprob_drops", None)
  return d


def load_examples(d, spec: str, flag: str, *, example: str = "gsm8k:train") -> list:
  """The examples of DATASET:SPLIT `spec`, read as data.* (`d`) says: manual_dir, data_dir,
  split_seed. A spec that is not DATASET:SPLIT, or a split that does not load, is a UserError
  naming `flag` (the option that gave spec) and the fix."""
  from antidistill_jax import data
  if not spec or ":" not in spec:
    raise errors.BadValue(f"{flag}={spec!r}: expected DATASET:SPLIT, e.g. {flag}={example}.")
  if spec.startswith("jsonl:"):  # jsonl:PATH[:SPLIT], PATH itself may hold colons (gs://)
    path, _, split = spec.rpartition(":")
    name, split = (path, split) if split in data.JSONL_SPLITS else (spec, "all")
  elif spec.count(":") == 1:
    name, split = spec.split(":")
  else:
    raise errors.BadValue(f"{flag}={spec!r}: expected DATASET:SPLIT, e.g. {flag}={example}, "
                          "or jsonl:PATH[:all|train|holdout].")
  try:
    return data.load_split(name, split, manual_dir=d.manual_dir or None,
                           data_dir=d.data_dir or None, seed=d.split_seed)
  except (ValueError, FileNotFoundError) as e:
    hint = (f" Name a split it has (e.g. {flag}={name}:{example.split(':')[1]}), or put its "
            "source files in --config.data.manual_dir." if "has no split" in str(e) else
            " Put the source files in --config.data.manual_dir=FOLDER, or run where the "
            "dataset can be downloaded.")
    raise errors.MissingInput(f"{flag}={spec}: {e}{hint}") from e


class Inputs:
  """One config and one workdir: the splits, models, settings and keys the stages read."""

  def __init__(self, config, workdir: str, *, shard: tuple[int, int] = (0, 1), mesh=None):
    self.config, self.shard, self.mesh = config, shard, mesh
    shard_points([], shard)  # a bad shard fails before any work
    self.store = Store(workdir)
    self.workdir = self.store.root
    self.writer = parallel.is_writer()
    self._splits: dict[str, list] = {}
    self._hashes: dict[str, str] = {}
    self._models: dict[str, Loaded] = {}
    self._ids: dict[str, str] = {}
    self._samplers: dict[str | None, sampling.Sampler] = {}
    self._grads: dict[str, Any] = {}
    self._events = None

  def _check_shared_workdir(self) -> None:
    """Every process must see process 0's files: it writes a token, the others look for it."""
    token = self.workdir / ".processes" / str(parallel.agree(int(time.time() * 1e6)))
    if self.writer:
      files.makedirs(token.parent)
      token.write_text("written by process 0")
    parallel.sync("workdir token")
    seen = parallel.everywhere(token.exists())  # every process raises, or none
    if self.writer:
      token.unlink()
    if not seen:
      raise errors.BadWorkdir(
          f"some processes cannot see files that process 0 wrote to the workdir "
          f"{os.fspath(self.workdir)!r}: with several hosts the workdir must be one folder they "
          "all see, a gs:// bucket path or a shared disk (--workdir=gs://BUCKET/run).")

  @property
  def events(self) -> monitoring.EventWriter:
    """TensorBoard scalars under workdir/tensorboard (process 0)."""
    if self._events is None:
      self._events = monitoring.EventWriter(self.workdir / "tensorboard", enabled=self.writer)
    return self._events

  @property
  def results_root(self):
    return results_root(self.workdir, str(self.config.pipeline.name))

  def out_dir(self, stage: str, key: str):
    return self.store.out_dir(stage, key)

  def output(self, stage: str, key: str, what: str):
    """The output folder of a finished (stage, key); names the missing stage otherwise."""
    if self.store.record(stage, key) is None:
      raise errors.MissingInput(f"no {what} (stage {stage}, key {key}) in "
                                f"{os.fspath(self.workdir)}: run the {stage} stage first "
                                f"(--stages={stage},...).")
    return self.store.out_dir(stage, key)

  # -- data ------------------------------------------------------------------------------------

  def split(self, which: str) -> list:
    """The examples of data.<which> ("holdout", "train" or "test"), truncated to max_<which>."""
    if which not in self._splits:
      d = self.config.data
      spec = getattr(d, which)
      limit = int(getattr(d, f"max_{which}", 0) or 0)
      if spec.startswith("synthetic:"):
        examples = self.synthetic(spec.split(":")[1], limit)
      else:
        examples = load_examples(d, spec, f"--config.data.{which}",
                                 example=f"gsm8k:{'test' if which == 'test' else which}")
      self._splits[which] = list(examples[:limit] if limit else examples)
    return self._splits[which]

  def synthetic(self, split: str, n: int, stream: int = 0, **overrides) -> list:
    """n problems of data.task (chains, with its writing options; default the sums demo).
    stream > 0 draws other problems of the same split (training data for the models stage)."""
    from antidistill_jax.data import synthetic
    d = self.config.data
    task = dict(d.get("task") or {}, **overrides)
    if task.pop("kind", "sums") == "sums":
      return synthetic.sums(n, split=split, seed=d.seed + stream)
    return synthetic.chains(n, split=split, seed=d.seed, stream=stream, **task)

  def split_hash(self, which: str) -> str:
    if which not in self._hashes:
      self._hashes[which] = traces.examples_sha256(self.split(which))
    return self._hashes[which]

  def preflight(self, stages: Sequence[str]) -> None:
    """Checks, before any stage runs, what needs no work: every split the stages read loads
    (and is cached for them), every checkpoint they read exists, the teacher and the proxy
    share a vocabulary, and the tokenizers have the chat template and EOS the prompts need.
    Each failure is a UserError naming the flag and the fix, raised in seconds instead of
    hours into a run."""
    c = self.config
    self._check_settings(stages)
    cal = c.grid.calibrate
    if "calibrate" in stages and int(cal.points) > 0 and cal.logprob_drops:
      raise errors.BadValue(
          f"grid.calibrate.points={cal.points} and grid.calibrate.logprob_drops="
          f"{tuple(cal.logprob_drops)}: the lams come from one target, the teacher's accuracy "
          "(points) or its log-prob drop (logprob_drops); set the other to 0 / ().")
    if "calibrate" in stages and any(not float(d) > 0 for d in cal.logprob_drops):
      raise errors.BadValue(f"grid.calibrate.logprob_drops={tuple(cal.logprob_drops)}: each "
                            "target is a positive number of nats per token (e.g. (0.5, 1.0)).")
    splits = {w for s in stages for w in SPLITS_READ.get(s, ())}
    if "models" in stages and self.model_source == "tiny":
      splits |= {"holdout", "train", "test"}  # its tokenizer is trained on all three
    for which in ("holdout", "train", "test"):
      if which not in splits:
        continue
      self.split(which)  # a bad or missing split is a UserError naming its flag
      if not self._splits[which]:
        cap = getattr(c.data, f"max_{which}", 0)  # 0: no cap
        raise errors.BadValue(
            f"--config.data.{which}={getattr(c.data, which)}: the split has no examples"
            + (f" (--config.data.max_{which}={cap})" if cap else "") + "; name a split that "
            "has some, or check its source files (--config.data.manual_dir).")
    if self.model_source != "checkpoints":
      return  # the models stage makes them
    roles = [r for r in ROLES if any(r in ROLES_READ.get(s, ()) for s in stages)]
    paths = {r: self.model_path(r) for r in roles}  # a missing one names its flag
    for role, path in paths.items():  # a folder that is not a model: found now, not when loaded
      try:
        models.check_checkpoint(path)
      except (ValueError, OSError) as e:
        raise errors.MissingInput(
            f"--config.models.{role}={getattr(c.models, role)}: {path} is not a checkpoint this "
            f"code can load: {' '.join(str(e).split())} Pass a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer files), a .gguf file or a hub id.") from e
    toks = {r: tok_lib.load_tokenizer(p) for r, p in paths.items()}
    if "teacher" in toks and "proxy" in toks and toks["teacher"].get_vocab() != \
        toks["proxy"].get_vocab():
      raise errors.BadValue(
          f"the teacher ({c.models.teacher}) and the proxy ({c.models.proxy}) have different "
          "vocabularies: Delta adds the proxy's log-probs to the teacher's token by token, so "
          "they must share a tokenizer. Pick a proxy of the teacher's family "
          "(--config.models.proxy=...).")
    for role, tok in toks.items():
      if role == "proxy":
        continue  # the proxy reads the teacher's prompts
      if not getattr(tok, "chat_template", None):
        raise errors.BadValue(f"the {role} tokenizer ({paths[role]}) has no chat template: "
                              "prompts are chat turns. Use an instruct/chat checkpoint, or add "
                              "a chat_template to its tokenizer_config.json.")
      if tok.eos_token_id is None:
        raise errors.BadValue(f"the {role} tokenizer ({paths[role]}) has no EOS token: traces "
                              "could not end. Set eos_token in its tokenizer_config.json.")

  def _check_settings(self, stages: Sequence[str]) -> None:
    """Builds now the settings the stages will build from the config (each sampler's, the
    distiller's), so that a value out of range (top_p 1.5, a negative tau, a batch that is no
    multiple of its micro-batch) fails before any stage runs, naming its config group, not
    hours in when the first stage that uses it starts."""
    c, stages = self.config, set(stages)
    builds = []
    if stages & {"holdout", "grad"}:
      builds.append(("holdout", self.holdout_params))
      if float(c.grad.tau) > 0:
        builds.append(("grad", self.grad_trace_params))
    if stages & {"calibrate", "sample", "eval_teacher"}:
      builds += [("sample or grid", functools.partial(self.point_params, p)) for p in grid(c)]
    if stages & {"eval_student", "eval_teacher", "eval_base"}:
      builds.append(("eval", self.eval_params))
    if "distill" in stages:
      builds.append(("distill", self.distill_config))
    for group, build in builds:
      try:
        build()
      except ValueError as e:
        flags = " or ".join(f"--config.{g}.<field>" for g in group.split(" or "))
        raise errors.BadValue(f"{e} From the config's {group} settings: set it with {flags} "
                              "(found before any stage ran).") from None

  # -- models ----------------------------------------------------------------------------------

  @property
  def model_source(self) -> str:
    """"scratch" (trained by the models stage), "tiny" (random, built by the models stage) or
    "checkpoints" (config.models: local folders, gs:// folders or hub ids)."""
    c = self.config
    if c.scratch.enabled:
      return "scratch"
    if c.tiny.enabled:
      return "tiny"
    return "checkpoints"

  def model_path(self, role: str) -> str:
    """A local folder holding the role's checkpoint."""
    if self.model_source == "checkpoints":
      spec = getattr(self.config.models, role)
      return resolve_checkpoint(spec, os.fspath(files.cache_root() / "hub"),
                                f"--config.models.{role}")
    out = self.output("models", self.models_key(), "trained or tiny models")
    return files.local_dir(out / role)

  def model_id(self, role: str) -> str:
    """What a key knows of a model: the models stage's key for the ones it makes, a hash of
    the checkpoint's files otherwise. Nothing is loaded."""
    if role not in self._ids:
      if self.model_source == "checkpoints":
        self._ids[role] = identity.checkpoint_id(self.model_path(role))
      else:
        self._ids[role] = f"{self.models_key()}/{role}"
    return self._ids[role]

  def model(self, role: str) -> Loaded:
    """teacher, proxy or student, loaded once."""
    if role not in self._models:
      c = self.config
      path = self.model_path(role)
      rules = None
      if role == "teacher" and self.mesh is not None and c.mesh.fsdp_teacher:
        rules = dict(models.DEFAULT_RULES, embed="data")  # FSDP over the batch axis
      model = models.from_pretrained(path, dtype=jnp.dtype(c.models.dtype), mesh=self.mesh,
                                     rules=rules)
      self._models[role] = Loaded(path, model, tok_lib.load_tokenizer(path))
    return self._models[role]

  def gradient(self, which: str = "standard"):
    """g ("standard") or the answer-aligned g ("aligned"), loaded once."""
    if which not in self._grads:
      from antidistill_jax import gradients
      out = self.output("grad", self.grad_key(which), f"{which} proxy gradient")
      self._grads[which] = gradients.load_gradient(out / "grad", self.model("proxy").model)[0]
    return self._grads[which]

  def teacher_sampler(self, ads: bool, which: str = "standard") -> sampling.Sampler:
    """The teacher's Sampler, with the proxy and g (`which` of them) when ads; one each."""
    name = which if ads else None
    if name not in self._samplers:
      t = self.model("teacher")
      kw = dict(proxy=self.model("proxy").model, grad=self.gradient(which)) if ads else {}
      slots = int(self.config.sample.get("slots", 0) or 0)
      if slots:  # the same traces as static batches (tests/test_continuous.py): not in keys
        kw.update(batching="continuous", batch_size=slots)
      self._samplers[name] = sampling.Sampler(t.model, t.tokenizer, mesh=self.mesh, **kw)
    return self._samplers[name]

  def point_sampler(self, point: Point) -> sampling.Sampler:
    """The teacher's Sampler for a grid point: plain at lam 0, with the proxy otherwise (and
    the answer-aligned g for kind "aligned")."""
    return self.teacher_sampler(point.lam != 0.0, gradient_of(point.kind))

  # -- settings --------------------------------------------------------------------------------

  def trace_settings(self) -> dict:
    c = self.config
    settings = dict(system=c.prompts.system or None,
                    max_prompt_length=c.prompts.max_prompt_length, dataset=c.data.grader)
    if not c.prompts.answer_forcing:  # the synthetic task has no "Final Answer"
      settings["answer_forcing"] = False
    return settings

  def point_params(self, point: Point) -> sampling.SamplingParams:
    s = self.config.sample
    poe = point.kind == "poe"  # the product of experts: its own method, lam = gamma
    return sampling.SamplingParams(
        max_new_tokens=s.max_new_tokens, tau=point.tau, lam=point.lam, eps=point.eps,
        method="poe" if poe else s.method, placement="paper" if poe else s.placement,
        delta_on=s.delta_on,
        top_p=s.top_p if point.tau > 0 else None,
        top_k=s.top_k if point.tau > 0 else None, max_length=s.max_length or None,
        seed=s.seed + point.stream * STREAM_STRIDE)

  def holdout_params(self) -> sampling.SamplingParams:
    return sampling.SamplingParams(max_new_tokens=self.config.holdout.max_new_tokens, tau=0.0)

  def grad_trace_params(self) -> sampling.SamplingParams:
    """The traces g is computed on when grad.tau > 0: sampled like the holdout's, at grad.tau."""
    return sampling.SamplingParams(max_new_tokens=self.config.holdout.max_new_tokens,
                                   tau=float(self.config.grad.tau), seed=self.config.sample.seed)

  def eval_params(self) -> sampling.SamplingParams:
    return sampling.SamplingParams(max_new_tokens=self.config.eval.max_new_tokens, tau=0.0)

  def distill_config(self, replicate: int = 0) -> distill.DistillConfig:
    """distill.* as a DistillConfig; replicate r > 0 trains with seed distill.seed + r * stride
    (its own data order and initialisation). Every trace set's r-th student gets the same seed:
    common random numbers between the sets of one chain."""
    cfg = distill.DistillConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in self.config.distill.items()})
    return dataclasses.replace(cfg, seed=cfg.seed + replicate * REPLICATE_STRIDE)

  @property
  def grad_rows(self) -> int:
    """Holdout traces g is computed on (the first ones; 0: all)."""
    return int(self.config.grad.rows)

  def attack_names(self) -> tuple[str, ...]:
    names = self.config.attacks.names
    # --config.attacks.names=a,b arrives as one string: split on commas.
    names = tuple(n.strip() for x in ([names] if isinstance(names, str) else names)
                  for n in str(x).split(",") if n.strip())
    for n in names:
      try:
        attacks.parse(n)
      except ValueError as e:
        raise errors.BadValue(f"--config.attacks.names: {e}") from None
    return names

  # -- keys: what changes an output, and nothing else -------------------------------------------

  def models_key(self) -> str:
    c = self.config
    if self.model_source == "scratch":
      return key_of(stage="models", source="scratch", scratch=c.scratch.to_dict(),
                    task=c.data.get("task") and c.data.task.to_dict(), seed=c.data.seed,
                    served_tokens=c.sample.max_new_tokens, holdout=self.split_hash("holdout"))
    return key_of(stage="models", source="tiny", tiny=c.tiny.to_dict(),
                  texts=[self.split_hash(w) for w in ("holdout", "train", "test")])

  def _model(self, role: str) -> dict:
    return dict(id=self.model_id(role), dtype=self.config.models.dtype)

  def holdout_key(self) -> str:
    return key_of(stage="holdout", teacher=self._model("teacher"),
                  examples=self.split_hash("holdout"),
                  params=sampling_key(self.holdout_params()),
                  batch=self.config.holdout.batch_size, **self.trace_settings())

  def grad_key(self, which: str = "standard") -> str:
    """g's key; the answer-aligned g's ("aligned") adds the answer rule to g's (it reads g's
    traces and takes g's norm)."""
    if which == "aligned":
      return key_of(stage="grad", aligned="answer_start", standard=self.grad_key(),
                    dataset=self.config.data.grader)
    if which != "standard":
      raise ValueError(f"no gradient {which!r}: 'standard' or 'aligned'.")
    extra = dict(rows=self.grad_rows) if self.grad_rows else {}
    if float(self.config.grad.tau):  # g's own traces: the teacher, the problems, the settings
      extra["traces"] = dict(teacher=self._model("teacher"), examples=self.split_hash("holdout"),
                             params=sampling_key(self.grad_trace_params()),
                             batch=self.config.holdout.batch_size, **self.trace_settings())
    return key_of(stage="grad", holdout=self.holdout_key(), proxy=self._model("proxy"),
                  micro_batch=self.config.grad.micro_batch_size, **extra)

  def teacher_side(self, point: Point) -> dict:
    """What a teacher-generated output at this point depends on besides its examples."""
    ads = point.lam != 0.0  # the proxy takes part (ADS, or the product of experts without g)
    g = ads and point.kind != "poe"
    return dict(teacher=self._model("teacher"), proxy=self._model("proxy") if ads else None,
                grad=self.grad_key(gradient_of(point.kind)) if g else None,
                params=sampling_key(self.point_params(point)), **self.trace_settings())

  def calibrate_key(self, which: str = "standard") -> str:
    """The ADS lams' calibration ("standard") or the answer-aligned ADS's ("aligned")."""
    c = self.config
    return key_of(stage="calibrate", examples=self.split_hash("holdout"),
                  calibrate=calibrate_settings(c.grid.calibrate), taus=list(c.grid.ads_taus),
                  temperatures=list(c.grid.temperatures),
                  **self.teacher_side(Point(kind_of(which), 1.0, 1.0, float(c.sample.eps))))

  def sample_key(self, point: Point, prefill: str = "") -> str:
    """A point's trace set; with `prefill`, the one whose responses begin with it."""
    extra = dict(prefill=prefill) if prefill else {}
    return key_of(stage="sample", examples=self.split_hash("train"),
                  batch=self.config.sample.batch_size, **self.teacher_side(point), **extra)

  @property
  def prefill(self) -> str:
    """The prefill attacker's text ("" when it is not named, or names none)."""
    return str(self.config.attacks.prefill.text) if self._named("prefill") else ""

  def prefill_items(self) -> list[Prefill]:
    """This shard's Prefill items (one per point) when the prefill attacker has a text."""
    return [Prefill(p) for p in self._attacked_points()] if self.prefill else []

  def _named(self, attacker: str) -> bool:
    """Whether attacks.names has the attacker `attacker` (at any value: resample@2)."""
    return any(attacks.parse(n)[0] == attacker for n in self.attack_names())

  def _attacked(self, point: Point) -> bool:
    """Whether attackers apply to the point's kind (attacks.kinds; (): every kind)."""
    allowed = tuple(self.config.attacks.kinds)
    return not allowed or point.kind in allowed

  def _attacked_points(self) -> list[Point]:
    """This shard's points of the kinds attackers apply to."""
    return [p for p in self.points if self._attacked(p)]

  def resample_key(self, point: Point) -> str:
    """The teacher's answers to the resampling attacker's re-queries of a point's traces: its
    traces, the rules that flag them, the rounds, and the first round's sampling settings."""
    r = self.config.attacks.resample
    first = dataclasses.replace(point, stream=RESAMPLE_STREAM)
    return key_of(stage="sample", resample=dict(
        traces=self.sample_key(point), rounds=int(r.rounds),
        rules=dataclasses.asdict(attacks.rules(self.config.attacks))),
        examples=self.split_hash("train"), batch=self.config.sample.batch_size,
        **self.teacher_side(first))

  def resample_items(self) -> list[Resample]:
    """This shard's Resample items (one per point) when a resampling attacker is named."""
    if not self._named("resample"):
      return []
    return [Resample(p) for p in self._attacked_points()]

  def attack(self, point: Point, name: str) -> dict:
    """An attacker's settings, with the key of the clean traces (or re-queries) it reads."""
    settings = attacks.settings(name, self.config.attacks)
    if settings["name"] in attacks.NEEDS_CLEAN:
      settings["traces"] = self.sample_key(self.clean_point(point))
    if settings["name"] == "resample":
      settings["requeries"] = self.resample_key(point)
    if settings["name"] == "prefill":  # an empty one reads the point's own traces
      settings["traces"] = self.sample_key(point, settings["text"])
    return settings

  def distill_key(self, s: Student) -> str:
    extra = {} if s.attack is None else dict(attack=self.attack(s.point, s.attack))
    if self.grad_rows:  # the NLL is measured on the holdout traces after g's
      extra["nll_rows"] = f"{self.grad_rows}:"
    return key_of(stage="distill", traces=self.sample_key(s.point), holdout=self.holdout_key(),
                  student=self._model("student"),
                  distill=dataclasses.asdict(self.distill_config(s.replicate)), **extra)

  def _eval_parts(self) -> dict:
    return dict(examples=self.split_hash("test"), params=sampling_key(self.eval_params()),
                batch=self.config.eval.batch_size, **self.trace_settings())

  def eval_student_key(self, s: Student) -> str:
    return key_of(stage="eval_student", student=self.distill_key(s),
                  dtype=self.config.models.dtype, **self._eval_parts())

  def eval_teacher_key(self, point: Point) -> str:
    return key_of(stage="eval_teacher", examples=self.split_hash("test"),
                  batch=self.config.eval.batch_size, **self.teacher_side(point))

  def eval_base_key(self) -> str:
    return key_of(stage="eval_base", student=self._model("student"), **self._eval_parts())

  # -- the grid --------------------------------------------------------------------------------

  @property
  def calibrates(self) -> bool:
    """grid.calibrate.points > 0 or grid.calibrate.logprob_drops: the ADS lams come from the
    calibrate stage."""
    cal = self.config.grid.calibrate
    return int(cal.points) > 0 or bool(cal.logprob_drops)

  def calibrated_lams(self, which: str = "standard") -> list[float]:
    out = self.store.record("calibrate", self.calibrate_key(which))
    if out is None:
      raise errors.MissingInput(f"no lambda calibration in {os.fspath(self.workdir)}: run the "
                                "calibrate stage first (--stages=...,calibrate).")
    return [float(x) for x in out["metrics"]["lams"]]

  def all_points(self) -> list[Point]:
    """Every shard's points; with grid.calibrate, at the lams the calibrate stage chose."""
    if not self.calibrates:
      return grid(self.config)
    aligned = self.calibrated_lams("aligned") if self.config.grid.aligned else None
    return grid(self.config, self.calibrated_lams(), aligned)

  @property
  def points(self) -> list[Point]:
    """This shard's points."""
    return shard_points(self.all_points(), self.shard)

  def students(self, points: Sequence[Point] | None = None) -> list[Student]:
    """Every student: each point's own (attack None), then each attacker on the points it
    applies to, each grid.students times (replicates, replicate-major: a partial run has
    whole first replicates). The filters (keep_correct, reaimed) run on the temperature sets
    too, so that a filtered ADS student is compared with students filtered the same way;
    clean_mix only on the ADS sets (and the control's, which stands in for a defence);
    attackers only on the point kinds in attacks.kinds when it names some, attacks.students
    times when it is set (> 0)."""
    points = self.points if points is None else points
    kinds = [(p, None) for p in points]
    for name in self.attack_names():
      kinds += [(p, name) for p in points if (name != "clean_mix" or p.kind != "temperature")
                and self._attacked(p)]
    replicates = int(self.config.grid.students)
    attacked = int(self.config.attacks.students) or replicates
    return [Student(p, a, r) for r in range(max(replicates, attacked)) for p, a in kinds
            if r < (replicates if a is None else attacked)]

  def clean_point(self, point: Point) -> Point:
    """The clean traces clean_mix and reaimed use: the plain trace set at the first ADS tau
    (the attacker's reference, the same for every point it attacks)."""
    tau = float(self.config.grid.ads_taus[0]) if self.config.grid.ads_taus else point.tau
    clean = Point("temperature", tau, 0.0, point.eps)
    if clean not in grid(self.config):
      raise errors.BadValue(f"attacks clean_mix and reaimed take clean traces from the plain "
                            f"trace set at tau={tau}, which the grid lacks: add {tau} to "
                            "grid.temperatures.")
    return clean

