"""The experiment as one command: configs/tiny.py end to end through the CLI, a rerun that does
no work, a changed lam that makes new traces, grid sharding, and the report of a partial grid."""

import copy
import glob
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from antidistill_jax import attacks, degeneracy, errors, pipeline, report, traces
from antidistill_jax.pipeline import reporting, teacher
from configs import tiny as tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, *flags, shard=None, wait=True):
  """Runs the README's experiment command in a fresh process; returns its combined output (or
  the running process, wait=False)."""
  env = dict(os.environ, ANTIDISTILL_NO_PROGRESS="1", XLA_FLAGS="")
  command = [sys.executable, "-m", "antidistill_jax.main", "--config=configs/tiny.py",
             f"--workdir={workdir}", *flags] + ([f"--shard={shard}"] if shard else [])
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def runs(workdir):
  """Each run's summary (stages and their computed / reused / waited counts), oldest first."""
  return sorted(pipeline.Store(str(workdir)).runs(), key=lambda r: r["run"])


def records(workdir):
  return pipeline.Store(str(workdir)).records()


def tree_bytes(workdir, stage):
  """{relative path: bytes} of every file a stage wrote."""
  out = {}
  for root, _, names in os.walk(os.path.join(workdir, stage)):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


SHARED = ("models", "holdout", "grad", "eval_base")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """configs/tiny.py run as two concurrent shards (--shard=0/2 and 1/2) on one workdir."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  procs = [cli(workdir, shard=f"{i}/2", wait=False) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
  return workdir


def test_concurrent_shards_share_the_shared_stages_then_a_rerun_does_no_work(finished):
  points = pipeline.grid(tiny_config.get_config())
  first = runs(finished)
  assert len(first) == 2 and all(r["finished"] for r in first)
  done = lambda stage, how: sum(r["stages"][stage][how] for r in first)
  for stage in SHARED:  # run once across the shards: the other job waited or found it done
    assert done(stage, "computed") == 1, stage
    assert done(stage, "waited") + done(stage, "reused") == 1, stage
  for stage in pipeline.PER_POINT:  # each point by its own shard
    assert done(stage, "computed") == len(points) and done(stage, "waited") == 0, stage
  by_stage = {}
  for r in records(finished):
    by_stage.setdefault(r["stage"], []).append(r)
  assert {s: len(v) for s, v in by_stage.items()} == dict(
      models=1, holdout=1, grad=1, eval_base=1, **{s: len(points) for s in pipeline.PER_POINT})
  assert {r["entry"] for r in by_stage["sample"]} == {p.name for p in points}

  before = {s: tree_bytes(finished, s) for s in ("records", "sample", "distill", "eval_teacher")}
  output = cli(finished)  # one job, every point: all found
  again = runs(finished)[-1]
  assert all(c["computed"] == 0 and c["waited"] == 0 for s, c in again["stages"].items()
             if s != "report")
  assert {s: tree_bytes(finished, s) for s in before} == before  # nothing rewritten
  for name in ("figure3.png", "figure5.png", "results.md"):
    assert os.path.getsize(os.path.join(finished, "report", name)) > 0
  table = open(os.path.join(finished, "report", "results.md")).read()
  assert all(p.name in table for p in points) and "undistilled student" in table
  # The terminal: a line per stage and the result, no library chatter.
  lines = [line for line in output.splitlines() if line.strip()]
  assert all(any(line.startswith(f"{s}: ") for line in lines) for s in pipeline.STAGES)
  assert not [line for line in lines if "orbax" in line.lower() or "absl" in line.lower()]
  # TensorBoard (no tensorflow): each student's losses per step, and every stage's metrics.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  tags, steps = set(), []
  for run_dir in {os.path.dirname(p) for p in glob.glob(
      os.path.join(finished, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)}:
    events = EventAccumulator(run_dir)
    events.Reload()
    tags |= set(events.Tags()["scalars"])
    if f"distill/{points[0].name}/train_loss" in events.Tags()["scalars"]:
      steps = [e.step for e in events.Scalars(f"distill/{points[0].name}/train_loss")]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1
  assert {f"summary/eval_teacher/{p.name}/accuracy" for p in points} <= tags


def test_a_rerun_builds_no_model(finished, tmp_path, monkeypatch):
  """Finding finished work needs keys, and keys need no model: with from_pretrained and the
  tiny builder patched to raise, a rerun of the finished run goes through."""
  from antidistill_jax import models, random_checkpoints

  def forbidden(*args, **kwargs):
    raise AssertionError("a model was built to find finished work")

  monkeypatch.setattr(models, "from_pretrained", forbidden)
  monkeypatch.setattr(random_checkpoints, "make_tiny_checkpoint", forbidden)
  experiment = pipeline.Experiment(tiny_config.get_config(), finished)
  counts = experiment.run([s for s in pipeline.STAGES if s != "report"])
  assert all(c["computed"] == 0 and c["reused"] > 0 for s, c in counts.items()
             if s != "calibrate"), counts


def test_checkpoints_are_known_by_their_files(finished, tmp_path, monkeypatch):
  """config.models folders: keys hash the files (cached per file), never loaded weights. The
  same files give the same keys and no model is built on a rerun; one changed byte (the chat
  template, say) gives a new key."""
  import shutil
  from antidistill_jax import models
  monkeypatch.setenv("ANTIDISTILL_CACHE", str(tmp_path / "cache"))
  made = pipeline.Experiment(tiny_config.get_config(), finished)
  config = tiny_config.get_config()
  config.tiny.enabled = False
  for role in ("teacher", "proxy", "student"):
    setattr(config.models, role, str(shutil.copytree(made.model_path(role), tmp_path / role)))
  workdir = str(tmp_path / "run")
  first = pipeline.Experiment(config, workdir)
  assert first.run(["holdout", "eval_base"])["holdout"]["computed"] == 1
  key = first.holdout_key()

  monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: pytest.fail("model built"))
  again = pipeline.Experiment(config, workdir)
  assert again.holdout_key() == key
  assert again.run(["holdout", "eval_base"])["eval_base"]["reused"] == 1
  config_json = tmp_path / "teacher" / "tokenizer_config.json"
  config_json.write_text(config_json.read_text().replace("}", ', "note": 1}', 1))
  assert pipeline.Experiment(config, workdir).holdout_key() != key


def test_keys_hold_only_what_changes_an_output(finished):
  """Temperature points do not use the proxy: their keys ignore sample.method, placement and
  eps, and so do the students and evaluations built on them; the exact JVP ignores eps."""
  base = pipeline.Experiment(tiny_config.get_config(), finished)
  config = tiny_config.get_config()
  config.sample.method, config.sample.placement = "fd", "reference"
  other = pipeline.Experiment(config, finished)
  for point in base.points:
    same = point.kind == "temperature"
    for key in ("sample_key", "distill_key", "eval_student_key", "eval_teacher_key"):
      item = pipeline.Student(point) if key in ("distill_key", "eval_student_key") else point
      assert (getattr(base, key)(item) == getattr(other, key)(item)) == same, (key, point)
  ads = next(p for p in base.points if p.kind == "ads")
  moved = pipeline.Point("ads", ads.tau, ads.lam, ads.eps * 2)  # the same lam, another eps
  assert base.sample_key(moved) == base.sample_key(ads)
  assert other.sample_key(moved) != other.sample_key(ads)  # fd uses eps


def test_tiny_models_are_keyed(finished):
  """Changing config.tiny makes other models (and every key after them), never reuses the
  old ones."""
  base = pipeline.Experiment(tiny_config.get_config(), finished)
  config = tiny_config.get_config()
  config.tiny.teacher.hidden_size = 48
  changed = pipeline.Experiment(config, finished)
  assert changed.models_key() != base.models_key()
  assert changed.holdout_key() != base.holdout_key()
  with pytest.raises(FileNotFoundError, match="run the models stage first"):
    changed.model_path("teacher")


def test_a_changed_lam_samples_new_traces(finished, tmp_path):
  import shutil
  finished = shutil.copytree(finished, tmp_path / "copy")  # the fixture stays as it was
  old = {r["key"]: r for r in records(finished) if r["stage"] == "sample"}
  cli(finished, "--stages=sample", "--config.grid.ads_lam_over_eps=(100.0,)",
      "--config.sample.method=fd")
  counts = runs(finished)[-1]["stages"]["sample"]
  assert counts == dict(computed=1, reused=2, waited=0, seconds=counts["seconds"])
  new = [r for r in records(finished) if r["stage"] == "sample" and r["key"] not in old]
  assert len(new) == 1 and new[0]["entry"] == "ads_tau1_lam1"
  read = lambda key: open(os.path.join(finished, "sample", key, "traces.jsonl")).read()
  ads_old = next(k for k, r in old.items() if r["entry"] == "ads_tau1_lam3")
  assert read(new[0]["key"]) != read(ads_old)


def test_continuous_batching_writes_the_same_traces_under_the_same_keys(finished, tmp_path):
  """sample.slots > 0 (continuous batching) is a speed setting: the same keys, so a finished run
  is reused, and a new point's traces are static batching's (the teacher log-probs to float32
  rounding: a prompt is prefilled in a batch of another size)."""
  import shutil
  copies = [shutil.copytree(finished, tmp_path / name) for name in ("static", "continuous")]
  for copy, slots in zip(copies, (0, 3)):
    cli(copy, "--stages=sample", "--config.grid.ads_lam_over_eps=(100.0,)",
        "--config.sample.method=fd", f"--config.sample.slots={slots}")
    log = "".join(open(p).read() for p in glob.glob(os.path.join(copy, "logs", "*.log")))
    assert ("continuous batching: 8/8 prompts started" in log) == (slots > 0)
    counts = runs(copy)[-1]["stages"]["sample"]
    assert counts == dict(computed=1, reused=2, waited=0, seconds=counts["seconds"])
  static, cont = ({r["key"]: r for r in records(c) if r["stage"] == "sample"} for c in copies)
  assert static.keys() == cont.keys()
  for key in static:
    rows = [traces.read_traces(os.path.join(c, "sample", key, "traces.jsonl")) for c in copies]
    assert len(rows[0]) == len(rows[1]) > 0
    for a, b in zip(*rows):
      assert b.pop("teacher_logprob") == pytest.approx(a.pop("teacher_logprob"), rel=1e-6)
      assert b == a, static[key]["entry"]


def test_stages_need_their_inputs(tmp_path):
  experiment = pipeline.Experiment(tiny_config.get_config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"run the models stage first"):
    experiment.run(["sample"])
  with pytest.raises(ValueError, match="unknown stages"):
    experiment.run(["sampel"])


def test_shards_partition_the_grid():
  config = tiny_config.get_config()
  config.grid.ads_lam_over_eps = (0.0, 1.0, 2.0)
  config.grid.temperatures = (1.0, 1.25, 1.5)
  points = pipeline.grid(config)
  assert len(points) == 5  # ads at tau 1, lam 0 is the temperature point at tau 1: one set
  shards = [pipeline.shard_points(points, (i, 3)) for i in range(3)]
  assert sorted((p for s in shards for p in s), key=points.index) == points
  assert pipeline.parse_shard("2/3") == (2, 3)
  for bad in ("3/3", "x", "1"):
    with pytest.raises(ValueError, match="shard"):
      pipeline.parse_shard(bad)


def test_report_from_a_partial_grid(tmp_path):
  index = tmp_path / "index"
  index.mkdir()
  curves = tmp_path / "curves.json"
  curves.write_text(json.dumps([dict(step=1, train_loss=2.0, holdout_loss=2.5),
                                dict(step=2, train_loss=1.5, holdout_loss=2.7)]))
  full = dict(name="ads_tau1_lam0.1", point=dict(kind="ads", tau=1.0, lam=0.1, eps=0.01),
              traces=dict(accuracy=0.8), teacher_eval=dict(accuracy=0.8, forced_accuracy=0.9),
              student_eval=dict(accuracy=0.3, forced_accuracy=0.35), curves=str(curves),
              distill=dict(holdout_loss=2.7))
  temp = dict(name="temperature_tau1.5_lam0", point=dict(kind="temperature", tau=1.5, lam=0.0,
                                                          eps=0.01),
              teacher_eval=dict(accuracy=0.7, forced_accuracy=0.75),
              student_eval=dict(accuracy=0.5, forced_accuracy=0.5), curves=str(curves))
  sampled_only = dict(name="ads_tau1_lam0.2", point=dict(kind="ads", tau=1.0, lam=0.2, eps=0.01),
                      traces=dict(accuracy=0.6))
  for entry in (full, temp, sampled_only):
    (index / f"{entry['name']}.json").write_text(json.dumps(entry))
  (index / "base.json").write_text(json.dumps(dict(student_eval=dict(accuracy=0.2,
                                                                     forced_accuracy=0.25))))
  written = report.write_report(str(tmp_path))
  for name in ("figure3", "figure5", "table"):
    assert os.path.getsize(written[name]) > 0
  lines = open(written["table"]).read().splitlines()
  row = next(line for line in lines if "ads_tau1_lam0.2" in line)
  assert row.count("| - ") >= 4 and "0.600" in row  # a partial point: what it has, dashes else
  assert any("undistilled student" in line and "0.200" in line for line in lines)


def test_paper_configs_hold_the_papers_grid_and_settings():
  from configs import gsm8k_paper, math_paper, mmlu_paper
  c = gsm8k_paper.get_config()
  points = pipeline.grid(c)
  # 2 x 20 ADS settings + 20 temperatures; lam = 0 at tau 0.9 and 1.0 is plain sampling, and
  # plain sampling at tau 1.0 is also the first temperature: 59 distinct trace sets.
  assert len(points) == 59
  assert sum(p.kind == "ads" for p in points) == 38
  assert max(p.lam for p in points) == pytest.approx(0.15)
  assert c.data.test == "gsm8k:platinum" and c.models.dtype == "bfloat16"
  experiment = pipeline.Experiment(c, "/nonexistent")
  params = experiment.point_params(next(p for p in points if p.kind == "ads"))
  assert (params.placement, params.top_k, params.top_p, params.max_length) == (
      "reference", 50, 0.95, 1024)
  d = experiment.distill_config()
  assert (d.lora_rank, d.lora_alpha, d.learning_rate, d.batch_size, d.epochs, d.max_length) == (
      128, 128.0, 5e-4, 16, 3, 4096)
  assert pipeline.Experiment(math_paper.get_config(), "/x").distill_config().max_length == 2048
  assert mmlu_paper.get_config().data.grader == "mmlu"


def _outputs(workdir):
  """The files that must not depend on interruptions: every trace and evaluation row, the
  students' weights and loss curves (sidecars and done markers hold wall times: left out)."""
  keep = ("traces.jsonl", "eval.jsonl", "model.safetensors", "curves.json")
  out = {}
  for stage in ("sample", "distill", "eval_student", "eval_teacher", "eval_base"):
    out.update({k: v for k, v in tree_bytes(workdir, stage).items()
                if os.path.basename(k) in keep})
  return out


@pytest.mark.parametrize("stage", ["sample", "distill"])
def test_sigkill_during_a_stage_then_a_rerun_equals_an_uninterrupted_run(finished, tmp_path,
                                                                         stage):
  import random
  import signal
  import time
  delay = random.Random().uniform(0.0, 1.5)
  workdir = str(tmp_path / "killed")
  env = dict(os.environ, ANTIDISTILL_NO_PROGRESS="1", XLA_FLAGS="")
  proc = subprocess.Popen(
      [sys.executable, "-m", "antidistill_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not os.path.isdir(os.path.join(workdir, stage)) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, f"the run ended before the kill ({delay:.2f} s)"
  cli(workdir)
  assert _outputs(workdir) == _outputs(finished), f"killed {delay:.2f} s into {stage}"


def test_a_hub_id_offline_names_the_local_alternative(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match=r"could not fetch hub model 'org/no-such-model'"
                                              r".*--config.models.teacher=DIR"):
    pipeline.resolve_checkpoint("org/no-such-model", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.resolve_checkpoint(str(tmp_path / "missing"), str(tmp_path))


def test_the_installed_package_finds_its_configs(tmp_path):
  """`pip install .` (not editable) ships configs/: --config=configs/NAME.py resolves to the
  packaged file from any directory, the default config (the README's main job) among them."""
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", str(target), ROOT], check=True, capture_output=True, timeout=600)
  assert (target / "antidistill_jax" / "configs" / "gsm8k_paper.py").exists()
  env = dict(os.environ, PYTHONPATH=str(target), ANTIDISTILL_NO_PROGRESS="1", XLA_FLAGS="")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "antidistill_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--stages=models,holdout,grad"], cwd=elsewhere, env=env,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where = subprocess.run([sys.executable, "-c", "import antidistill_jax; print(antidistill_jax.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(target))  # the installed copy ran, not the checkout
  default = subprocess.run(
      [sys.executable, "-c", "import runpy; from antidistill_jax import main; "
       "path = main.flags.FLAGS['config'].config_filename; "
       "print(path, runpy.run_path(path)['get_config']().grid.temperatures)"],
      cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  # quick.py loads synthetic_study.py, synthetic.py and base.py beside it in the package.
  assert default.stdout.split()[0] == str(target / "antidistill_jax" / "configs" / "quick.py")
  assert default.stdout.split(" ", 1)[1].strip() == "(1.0, 1.6)"
  assert [r["stage"] for r in records(tmp_path / "run")] == ["models", "holdout", "grad"]


def test_a_mesh_shards_the_models_and_fsdp_the_teacher(tmp_path):
  from antidistill_jax import parallel
  config = tiny_config.get_config()
  config.mesh.fsdp_teacher = True
  mesh = parallel.make_mesh(data=2, model=4)
  experiment = pipeline.Experiment(config, str(tmp_path), mesh=mesh)
  experiment.run(["models"])
  teacher, proxy = experiment.model("teacher").model, experiment.model("proxy").model
  assert tuple(teacher.layers[0].mlp.up_proj.kernel[...].sharding.spec) == ("data", "model")
  assert tuple(proxy.layers[0].mlp.up_proj.kernel[...].sharding.spec) == (None, "model")
  assert teacher.mesh is mesh and proxy.mesh is mesh


def test_calibrated_lams_span_the_temperature_accuracies():
  ladder = [(0.0, 0.98), (0.1, 0.97), (0.2, 0.9), (0.4, 0.7), (0.8, 0.4), (1.6, 0.1)]
  lams = pipeline.calibrated_lams(ladder, best=0.97, worst=0.55, points=3)
  # 0.97 at 0.1; 0.76 = 0.9 - 0.7 * 0.2: 0.2 * 2**0.7; 0.55 = 0.7 - 0.5 * 0.3: 0.4 * 2**0.5
  assert lams == [0.1, 0.325, 0.566]
  # A noisy rise is ignored (running minimum); a target beyond the ladder takes its end.
  assert pipeline.calibrated_lams([(0.0, 0.9), (0.1, 0.95), (0.2, 0.5)], 0.9, 0.0, 2) == [0.1, 0.2]
  # 0.6 lies 3/4 of the way from 0.9 (the rise at 0.1 counts as 0.9) to 0.5: 0.1 * 2**0.75.
  noisy = [(0.0, 0.9), (0.1, 0.95), (0.2, 0.5), (0.4, 0.3)]
  assert pipeline.calibrated_lams(noisy, 0.9, 0.3, 3) == [0.1, 0.168, 0.4]
  with pytest.raises(ValueError, match="two positive lams"):
    pipeline.calibrated_lams([(0.0, 1.0), (0.1, 0.5)], 1.0, 0.5, 2)


def test_lams_calibrated_to_a_logprob_drop(tmp_path):
  """grid.calibrate.logprob_drops: the calibrate stage finds, per target, the lam at which the
  teacher's mean log-prob per token on the holdout prompts falls that far below plain sampling
  (the demo's target); the grid's ADS points take those lams, and sampling again at a chosen lam
  with the same seeds reproduces its recorded drop. Asking for both targets fails at once."""
  from antidistill_jax.data.prompts import build_prompts
  from antidistill_jax.sampling import calibration
  c = tiny_config.get_config()
  c.grid.calibrate.logprob_drops = (0.01, 0.03)  # a random teacher is nearly uniform
  experiment = pipeline.Experiment(c, str(tmp_path))
  experiment.run(["models", "holdout", "grad", "calibrate"])
  (record,) = [r for r in records(tmp_path) if r["stage"] == "calibrate"]
  searches = record["metrics"]["searches"]
  assert [s["target"] for s in searches] == [0.01, 0.03]
  lams = experiment.calibrated_lams()
  assert lams == sorted(s["lam"] for s in searches) and lams[0] < lams[1]
  assert sorted(p.lam for p in experiment.points if p.kind == "ads") == lams
  sampler = experiment.teacher_sampler(True)
  prompts = build_prompts(sampler.tokenizer, experiment.split("holdout"),
                          c.prompts.max_prompt_length, system=None).ids
  params = experiment.point_params(pipeline.Point("ads", 1.0, 1.0, c.sample.eps))
  for search in searches:
    ladder = {x["lam"]: x["drop"] for x in search["ladder"]}
    drop = calibration.logprob_drop(sampler, prompts, params, search["lam"])
    assert drop == pytest.approx(ladder[search["lam"]])
    assert abs(drop - search["target"]) == min(abs(d - search["target"]) for d in ladder.values())
  c.grid.calibrate.points = 2
  with pytest.raises(errors.BadValue, match="one target"):
    pipeline.Experiment(c, str(tmp_path / "both")).run()


@pytest.mark.slow
def test_the_synthetic_config_runs_at_reduced_size(tmp_path, monkeypatch):
  """configs/synthetic.py (models trained from scratch, lambda calibration, both sweeps) end to
  end at a size that checks it runs, not that it shows the effect."""
  from antidistill_jax import grading
  from configs import synthetic
  # The barely trained teacher writes no "#": its answer is said to be its second half, so that
  # the answer-aligned g has answers to take (the rule itself: tests/test_aligned.py).
  monkeypatch.setattr(grading, "answer_start", lambda dataset, text: len(text) // 2)
  c = synthetic.get_config()
  c.data.max_holdout, c.data.max_train, c.data.max_test = 16, 32, 16
  c.scratch.eval_rows = 8
  c.scratch.teacher.traces, c.scratch.proxy.traces = 64, 32
  c.scratch.student.pretrain.traces = 32
  c.scratch.batch_size = 32
  for role in ("teacher", "proxy"):
    c.scratch[role].train.epochs = 1
  c.grid.temperatures = (1.0, 2.0)
  c.grid.calibrate.n, c.grid.calibrate.points, c.grid.calibrate.ladder = 16, 2, (0.0, 10.0, 100.0)
  c.grid.aligned = True  # a twin of each ADS point with the answer-aligned g
  c.distill.epochs, c.distill.eval_every = 1, 1
  # as --config.attacks.names=a,b,c gives it
  c.attacks.names = ("keep_correct,clean_mix,reaimed,reweight@0,resample@1,resample@2,prefill",)
  c.attacks.prefill.text = "1+"
  c.attacks.clean_mix.rows, c.attacks.reaimed.clean_rows, c.attacks.reweight.clean_rows = 4, 8, 8
  # Rules that flag the barely trained teacher's traces: two copies of a token in a row.
  c.attacks.resample.min_copies, c.attacks.resample.rounds = 2, 2
  experiment = pipeline.Experiment(c, str(tmp_path))
  experiment.run()
  stages = [r["stage"] for r in records(tmp_path)]
  assert stages[:6] == ["models", "holdout", "grad", "grad", "calibrate", "calibrate"]
  lams = experiment.calibrated_lams()
  assert 1 <= len(lams) <= 2 and all(lam > 0 for lam in lams)
  aligned_lams = experiment.calibrated_lams("aligned")
  kinds = sorted(p.kind for p in experiment.points)
  assert kinds == ["ads"] * len(lams) + ["aligned"] * len(aligned_lams) + ["temperature"] * 2
  # The answer-aligned g: its own grad record at g's norm, its own calibration (the same
  # ladder of lams, other accuracies: another g), its own trace sets.
  grads = {r.get("entry", "standard"): r for r in records(tmp_path) if r["stage"] == "grad"}
  assert sorted(grads) == ["aligned", "standard"]
  assert grads["aligned"]["key"] == experiment.grad_key("aligned") != experiment.grad_key()
  np.testing.assert_allclose(grads["aligned"]["metrics"]["global_norm"],
                             grads["standard"]["metrics"]["global_norm"], rtol=1e-5)
  assert grads["aligned"]["metrics"]["answer_norm"] != grads["aligned"]["metrics"]["global_norm"]
  calibrations = {r.get("entry", "standard"): r["metrics"] for r in records(tmp_path)
                  if r["stage"] == "calibrate"}
  ladder = lambda which: [r["lam"] for r in calibrations[which]["ladder"]]
  assert ladder("aligned") == ladder("standard")
  rung = lambda which: [r["completion"] for r in traces.read_traces(experiment.out_dir(
      "calibrate", experiment.calibrate_key(which)) / "ladder_1.jsonl")]
  assert rung("aligned") != rung("standard")  # the same lam, another g
  assert calibrations["aligned"]["lams"] == aligned_lams
  for p in (p for p in experiment.points if p.kind == "aligned"):
    ads = pipeline.Point("ads", p.tau, p.lam, p.eps)
    assert experiment.point_params(p) == experiment.point_params(ads)
    assert experiment.teacher_side(p)["grad"] == experiment.grad_key("aligned")
    assert experiment.sample_key(p) != experiment.sample_key(ads)
  # Each trained model is a checkpoint the pipeline loaded: the student is another family.
  assert experiment.model("student").model.config.model_type != \
      experiment.model("teacher").model.config.model_type
  entries, base = report.collect(str(tmp_path))
  assert len(entries) == len(experiment.points) and base["student_eval"]["n"] == 16
  assert os.path.exists(tmp_path / "report" / "figure3.png")
  # Attackers: one student per (attack, point it applies to), each its own distill key; the
  # barely trained teacher writes no correct trace, so keep_correct has nothing to train on.
  ads = [p for p in experiment.points if p.kind != "temperature"]  # both ADS kinds
  attacked = report.collect_attacks(str(tmp_path))
  assert sorted(attacked) == ["clean_mix", "keep_correct", "prefill", "reaimed", "resample@1",
                              "resample@2", "reweight@0"]
  # Prefill: each point's prefilled set (its own key) begins every response with the text, and
  # its student trained on all of it; an empty text reads the point's own traces instead.
  for p in experiment.points:
    key = experiment.sample_key(p, "1+")
    assert key != experiment.sample_key(p) == \
        pipeline.Experiment(c, str(tmp_path)).sample_key(p)
    rows = traces.read_traces(experiment.out_dir("sample", key) / "traces.jsonl")
    assert rows and all(r["completion"].startswith("1+") for r in rows)
    entry = {e["base"]: e for e in attacked["prefill"]}[p.name]
    assert entry["distill"]["train_rows"] == len(rows) and entry["student_eval"]["n"] == 16
  empty = copy.deepcopy(c)
  empty.attacks.prefill.text = ""
  no_prefill = pipeline.Experiment(empty, str(tmp_path))
  assert no_prefill.prefill_items() == [] and all(
      no_prefill.attack(p, "prefill")["traces"] == no_prefill.sample_key(p)
      for p in experiment.points)
  assert len(attacked["keep_correct"]) == len(experiment.points)
  assert all(e["distill"] == dict(train_rows=0, skipped="no correct traces", n_students=1)
             and "student_eval" not in e for e in attacked["keep_correct"])
  assert sorted(e["base"] for e in attacked["clean_mix"]) == sorted(p.name for p in ads)
  assert sorted(e["base"] for e in attacked["reaimed"]) == sorted(
      p.name for p in experiment.points)  # a filter: the temperature sets are filtered too
  for name in ("clean_mix", "reaimed"):
    assert all(e["student_eval"]["n"] == 16 for e in attacked[name])
  assert all(e["distill"]["train_rows"] == 32 + 4 for e in attacked["clean_mix"])
  assert all([r["dropped"] for r in e["distill"]["reaimed"]] == [8]
             for e in attacked["reaimed"])  # 25% of 32, re-aimed once per epoch
  # Reweighting at beta = 0 is passive SFT: each of its students is the point's own student.
  plain = {e["name"]: e for e in entries}
  assert sorted(e["base"] for e in attacked["reweight@0"]) == sorted(plain)
  for e in attacked["reweight@0"]:
    assert e["distill"]["reweight"]["weight_max"] == e["distill"]["reweight"]["weight_min"] == 1
    assert e["distill"]["holdout_loss"] == plain[e["base"]]["distill"]["holdout_loss"]
    assert e["student_eval"]["accuracy"] == plain[e["base"]]["student_eval"]["accuracy"]
  # The report's attacked points carry a reweighting student's weight concentration (beta 0:
  # none, the top fifth of 32 traces holds 6/32), and no other attacker's.
  points = json.loads((tmp_path / "report" / "results.json").read_text())["attacked_points"]
  weighted = [p for p in points if p["attack"] == "reweight@0"]
  assert len(weighted) == len(plain) and all(
      p["beta"] == 0 and p["top20_mass"] == pytest.approx(6 / 32) for p in weighted)
  assert not any("top20_mass" in p for p in points if p["attack"] != "reweight@0")
  # Resampling: the sample stage re-queried each point's flagged prompts (rounds at their own
  # streams); the filter alone (budget 1) asks nothing, budget 2 at most one more query per
  # prompt, and every trace a student trained on breaks no rule.
  rules = attacks.rules(c.attacks)
  for p in experiment.points:
    served = traces.read_traces(experiment.out_dir("sample", experiment.sample_key(p))
                                / "traces.jsonl")
    flagged = [r["index"] for r in served if degeneracy.check(r, rules)]
    rounds = teacher.resampled_rounds(experiment, p)
    assert flagged and [r["index"] for r in rounds[0]] == flagged
    assert rounds[0][0]["completion_ids"] != served[flagged[0]]["completion_ids"] or \
        len(rounds[0]) > 1
    entry = {e["base"]: e for e in attacked["resample@2"]}[p.name]["distill"]["resample"]
    assert entry["flagged"] == len(flagged) and 1.0 < entry["queries"] <= 2.0
    assert entry["requeried"] == min(len(served), sum(len(r) for r in rounds))
    alone = {e["base"]: e for e in attacked["resample@1"]}[p.name]["distill"]
    assert alone["resample"]["queries"] == 1.0
    assert alone.get("train_rows", 0) == len(served) - len(flagged)
  assert {experiment.resample_key(p) for p in experiment.points} == {
      r["key"] for r in records(tmp_path) if r["stage"] == "sample"
      and r["entry"].endswith("+resample")}
  # Another budget reads the same re-queries: no budget is in their key.
  other = copy.deepcopy(c)
  other.attacks.names = ("resample@4",)
  assert pipeline.Experiment(other, str(tmp_path)).resample_key(ads[0]) == \
      experiment.resample_key(ads[0])
  keys = {experiment.distill_key(s) for s in experiment.students()}
  assert len(keys) == len(experiment.students()) == len(experiment.points) * 7 + len(ads)
  text = (tmp_path / "report" / "results.md").read_text()
  assert "| clean_mix |" in text and "| reaimed |" in text
  # The defence x attacker matrix reads this report: a cell per defence kind and attacker
  # that trained students (keep_correct trained none here), passive included.
  from antidistill_jax import matrix
  results = json.loads((tmp_path / "report" / "results.json").read_text())
  cells = {(c["kind"], c["rank"], c["attack"]): c
           for c in matrix.matrix_cells([matrix.seed_cells(results)])}
  for kind in ("ads", "aligned"):
    for attack in ("none", "clean_mix", "reaimed", "prefill", "resample@2", "reweight@0"):
      assert cells[(kind, 0, attack)]["summary"]["n"] == 1, (kind, attack)


def test_the_report_leaves_out_another_configs_points_and_says_so(tmp_path):
  """index/ is derived from the records: an entry of a point not in this config's grid is
  removed (its records stay), with one warning naming it and how to keep both reports."""
  x = pipeline.Experiment(tiny_config.get_config(), str(tmp_path))
  x.store.open()
  index = x.results_root / "index"
  index.mkdir()
  (index / "old_point.json").write_text("{}")
  with mock.patch.object(reporting.logging, "warning") as warning:
    reporting.report(x, None)
  assert sorted(os.listdir(index)) == sorted(f"{p.name}.json" for p in pipeline.grid(x.config))
  [(args, _)] = warning.call_args_list
  assert args[0] % args[1:] == (
      f"the report of {tmp_path} leaves out 1 points not in this config's grid (old_point): "
      "their stage records stay in the workdir; give each config its own "
      "--config.pipeline.name to keep a report of each.")


def test_ads_points_are_compared_at_the_same_teacher_accuracy():
  entry = lambda kind, lam, teacher, student, loss, answer: dict(
      name=f"{kind}{lam}", point=dict(kind=kind, tau=1.0, lam=lam, eps=0.01),
      teacher_eval=dict(accuracy=teacher), student_eval=dict(accuracy=student),
      distill=dict(holdout_loss=loss, nll_by_role=dict(answer=answer)))
  entries = [entry("temperature", 0.0, 0.9, 0.6, 0.2, 1.0),
             entry("temperature", 0.0, 0.5, 0.3, 0.4, 2.0),
             entry("ads", 0.1, 0.7, 0.5, 0.6, 1.8), entry("ads", 0.05, 0.95, 0.7, 0.1, 0.5)]
  inside, outside = report.matched(entries)
  assert inside["temperature_student"] == pytest.approx(0.45)  # halfway between 0.6 and 0.3
  assert inside["gap"] == pytest.approx(0.05) and inside["loss_gap"] == pytest.approx(0.3)
  # the answer tokens' NLL against the sweep's, halfway between 1.0 and 2.0: ADS minus it
  assert inside["role_loss_gaps"] == dict(answer=pytest.approx(0.3))
  assert outside["temperature_student"] is None and outside["gap"] is None  # above the sweep
  assert outside["role_loss_gaps"] == dict(answer=None)
  text = report.seeds_table({"a": [inside], "b": [dict(inside, gap=0.15)]})
  assert "| 1 | 2 |" in text and "+0.100 ± 0.071" not in text and "0.100 ± 0.071" in text


def test_the_report_gives_one_runs_gap_a_ci_from_a_measured_student_sd(tmp_path):
  """report.student_sd (configs/quick.py: the study's): the matched table is followed by the
  gap with its CI from student noise and the gap the run can detect; results.json has them."""
  index = tmp_path / "index"
  index.mkdir()
  for name, kind, teacher, student in (("t1", "temperature", 0.9, 0.6),
                                       ("t2", "temperature", 0.5, 0.3), ("a", "ads", 0.7, 0.4)):
    (index / f"{name}.json").write_text(json.dumps(dict(
        name=name, point=dict(kind=kind, tau=1.0, lam=0.1 * (kind == "ads"), eps=0.01),
        teacher_eval=dict(accuracy=teacher), student_eval=dict(accuracy=student, n_students=1))))
  report.write_report(tmp_path, student_sd=0.04, student_sd_source="a study")
  # gap 0.4 - 0.45; se = 0.04 sqrt(1 + 0.5^2 + 0.5^2) = 0.0490; 1.96 se = 0.096; 2.80 se = 0.137
  text = (tmp_path / "report" / "results.md").read_text()
  assert ("At its ADS point, this run's student gap is **-5.0 points, 95% CI [-14.6, +4.6]**"
          in text)
  assert "SD 4.0 points: a study" in text and "detects a gap above 13.7 points" in text
  gap = json.loads((tmp_path / "report" / "results.json").read_text())["run_gap"]
  assert gap["mean"] == pytest.approx(-0.05) and gap["sd"] == pytest.approx(0.04 * 1.5 ** 0.5)
  report.write_report(tmp_path)  # no student_sd: no CI claimed
  assert "this run's student gap" not in (tmp_path / "report" / "results.md").read_text()


def test_attacked_students_are_compared_with_like_attacked_temperature_students(tmp_path):
  """keep_correct applies to the temperature sweep too, so its ADS students are matched
  against keep_correct temperature students; clean_mix only against the plain sweep. Teacher
  accuracy comes from the attacked point's own entry (attackers do not change the teacher)."""
  index = tmp_path / "index"
  index.mkdir()

  def write(name, kind, lam, teacher=None, student=None, attack=None):
    base = name.split("+")[0]
    e = dict(name=name, point=dict(kind=kind, tau=1.0, lam=lam, eps=0.01),
             student_eval=dict(accuracy=student), distill=dict(holdout_loss=0.1, train_rows=7))
    if attack:
      e.update(attack=attack, base=base)
    else:
      e["teacher_eval"] = dict(accuracy=teacher)
    (index / f"{name}.json").write_text(json.dumps(e))

  write("t9", "temperature", 0.0, 0.9, 0.6)
  write("t5", "temperature", 0.0, 0.5, 0.2)
  write("a7", "ads", 0.1, 0.7, 0.3)
  write("t9+keep_correct", "temperature", 0.0, student=0.8, attack="keep_correct")
  write("t5+keep_correct", "temperature", 0.0, student=0.6, attack="keep_correct")
  write("a7+keep_correct", "ads", 0.1, student=0.5, attack="keep_correct")
  write("a7+clean_mix", "ads", 0.1, student=0.35, attack="clean_mix")
  entries, _ = report.collect(str(tmp_path))
  assert sorted(e["name"] for e in entries) == ["a7", "t5", "t9"]  # attacked ones apart
  rows = {r["attack"]: r for r in report.attack_rows(str(tmp_path))}
  assert rows["keep_correct"]["teacher"] == 0.7 and rows["keep_correct"]["against"] == "attacked"
  assert rows["keep_correct"]["temperature_student"] == pytest.approx(0.7)  # 0.8 .. 0.6
  assert rows["keep_correct"]["gap"] == pytest.approx(-0.2)
  assert rows["clean_mix"]["temperature_student"] == pytest.approx(0.4)  # 0.6 .. 0.2, plain
  assert rows["clean_mix"]["gap"] == pytest.approx(-0.05)
  assert rows["clean_mix"]["unattacked_ads_student"] == 0.3
  text = report.attack_seeds_table({"s0": list(rows.values()), "s1": list(rows.values())})
  assert "| keep_correct | 1 | 2 |" in text and "-0.200 ± 0.000" in text


def test_product_of_experts_points_sample_with_the_proxy_and_no_g(finished, tmp_path):
  """grid.poe_taus x grid.poe_gammas: "poe" points sample with method "poe" and lam = gamma;
  their keys hold the proxy but not g (changing g's settings leaves them, moves ADS points);
  gamma 0 is the temperature point of that tau. The report matches them like a defence."""
  import shutil
  workdir = shutil.copytree(finished, tmp_path / "copy")
  config = tiny_config.get_config()
  config.grid.update(dict(poe_taus=(1.0,), poe_gammas=(0.0, 0.5)))
  x = pipeline.Experiment(config, str(workdir))
  poe = [p for p in x.points if p.kind == "poe"]
  assert [(p.tau, p.lam) for p in poe] == [(1.0, 0.5)]
  assert sum(p.kind == "temperature" and p.tau == 1.0 for p in x.points) == 1  # gamma 0
  params = x.point_params(poe[0])
  assert params.method == "poe" and params.lam == 0.5 and params.uses_proxy
  other_g = tiny_config.get_config()
  other_g.grid.update(dict(poe_taus=(1.0,), poe_gammas=(0.0, 0.5)))
  other_g.grad.micro_batch_size = 3  # g's key moves with its settings
  y = pipeline.Experiment(other_g, str(workdir))
  assert y.grad_key() != x.grad_key()
  assert y.sample_key(poe[0]) == x.sample_key(poe[0])
  ads = next(p for p in x.points if p.kind == "ads")
  assert y.sample_key(ads) != x.sample_key(ads)
  x.run(["sample", "eval_teacher", "distill", "eval_student", "report"])
  meta = json.load(open(os.path.join(workdir, "sample", x.sample_key(poe[0]),
                                     "traces.jsonl.meta.json")))
  assert meta["config"]["method"] == "poe" and meta["config"]["lam"] == 0.5
  rows = json.load(open(os.path.join(workdir, "report", "results.json")))["matched"]
  assert [r["kind"] for r in rows if r["name"] == poe[0].name] == ["poe"]
