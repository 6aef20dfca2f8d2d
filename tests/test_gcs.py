"""gs:// workdirs, with no network: a fake `gs` filesystem (tests/fake_gcs.py) that keeps a
bucket's objects under a local folder.
The pipeline's own files (traces and their resume folders, evaluations, records and claims, the
index, the report, TensorBoard events, model folders) go through it. orbax's checkpoints (the proxy
gradient, distillation state) use tensorstore's own GCS driver, which this cannot fake: those
stages are left out here."""

import json
import os

import pytest
from etils import epath

import fake_gcs
from antidistill_jax import files, pipeline
from fake_gcs import FakeGCS
from configs import tiny as tiny_config


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A fake bucket gs://bucket, stored under tmp_path/gcs; a fresh local cache."""
  monkeypatch.setattr(FakeGCS, "root", str(tmp_path / "gcs"))
  fake_gcs.register(tmp_path / "gcs")
  monkeypatch.setenv("ANTIDISTILL_CACHE", str(tmp_path / "cache"))
  (tmp_path / "gcs" / "bucket").mkdir(parents=True)
  yield tmp_path / "gcs" / "bucket"
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_files_write_read_and_copy_folders(bucket, tmp_path):
  files.write_json("gs://bucket/a/b.json", {"x": 1})
  assert json.loads((bucket / "a" / "b.json").read_text()) == {"x": 1}
  assert files.read_json("gs://bucket/a/b.json") == {"x": 1}
  local = tmp_path / "folder"
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "w.bin").write_bytes(b"\0\1")
  (local / "c.txt").write_text("c")
  files.upload_dir(local, "gs://bucket/model")
  assert (bucket / "model" / "sub" / "w.bin").read_bytes() == b"\0\1"
  copy = files.local_dir("gs://bucket/model")
  assert copy.startswith(str(tmp_path / "cache"))
  assert open(os.path.join(copy, "sub", "w.bin"), "rb").read() == b"\0\1"
  assert files.local_dir(str(local)) == str(local)  # local folders are used in place
  with pytest.raises(FileNotFoundError, match="no folder 'gs://bucket/missing'"):
    files.local_dir("gs://bucket/missing")


def _run_without_orbax(workdir):
  """Every stage that needs no orbax checkpoint: holdout traces, the temperature points'
  trace sets and teacher evaluations, the undistilled student, the report."""
  config = tiny_config.get_config()
  config.grid.ads_lam_over_eps = ()  # ADS needs g, an orbax checkpoint
  experiment = pipeline.Experiment(config, workdir)
  experiment.run(["models", "holdout", "sample", "eval_teacher", "eval_base", "report"])
  return experiment


def _tree(root):
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      out[os.path.relpath(os.path.join(base, name), root)] = os.path.join(base, name)
  return out


def test_a_gs_workdir_holds_what_a_local_one_does(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
  remote = _run_without_orbax("gs://bucket/run")
  local = _run_without_orbax(str(tmp_path / "local_run"))
  assert remote.holdout_key() == local.holdout_key()  # the same models, read back from gs://

  in_bucket, on_disk = _tree(bucket / "run"), _tree(tmp_path / "local_run")
  same_files = lambda t: {k for k in t if not k.startswith(("tensorboard", "report", "runs/"))}
  assert same_files(in_bucket) == same_files(on_disk)
  assert not [k for k in in_bucket if ".partial" in k or ".tmp" in k]
  for rel in in_bucket:
    if rel.endswith("traces.jsonl") or rel.endswith("eval.jsonl"):
      rows = lambda p: [json.loads(l)["completion_ids"] for l in open(p)]
      assert rows(in_bucket[rel]) == rows(on_disk[rel]), rel
  records = pipeline.Store("gs://bucket/run").records()
  assert sorted({r["stage"] for r in records}) == ["eval_base", "eval_teacher", "holdout",
                                                    "models", "sample"]
  assert len(pipeline.Store("gs://bucket/run").runs()) == 1
  for name in ("report/results.md", "report/results.json"):  # no student: no plot
    assert os.path.getsize(in_bucket[name]) > 0
  assert any("tensorboard/events.out.tfevents" in k for k in in_bucket)
  assert sorted(os.listdir(tmp_path)) == ["cache", "gcs", "local_run"]


def test_trace_generation_resumes_in_a_bucket(bucket, monkeypatch):
  """Killed after its first batch, a gs:// trace set resumes there (batch files are whole
  objects) and ends equal to an uninterrupted run."""
  from antidistill_jax import sampling
  config = tiny_config.get_config()
  config.data.max_train = 8
  config.sample.batch_size = 4
  config.grid.ads_lam_over_eps = ()
  config.grid.temperatures = (1.0,)
  experiment = pipeline.Experiment(config, "gs://bucket/run")
  experiment.run(["models"])
  point = experiment.points[0]
  real = sampling.Sampler.__call__
  calls = []

  def dying(self, prompts, params, first_row=0):
    calls.append(first_row)
    if len(calls) == 3:  # the second batch's trace call (each batch also forces answers)
      raise KeyboardInterrupt
    return real(self, prompts, params, first_row=first_row)

  monkeypatch.setattr(sampling.Sampler, "__call__", dying)
  with pytest.raises(KeyboardInterrupt):
    experiment.run(["sample"])
  out = experiment.out_dir("sample", experiment.sample_key(point))
  partial = epath.Path(os.fspath(out / "traces.jsonl") + ".partial")
  assert sorted(p.name for p in partial.iterdir()) == ["000000000.jsonl", "state.json"]
  calls.clear()
  monkeypatch.setattr(sampling.Sampler, "__call__", real)
  experiment.run(["sample"])
  resumed = (out / "traces.jsonl").read_bytes()
  fresh = pipeline.Experiment(config, "gs://bucket/fresh")
  fresh.run(["models", "sample"])
  assert resumed == (fresh.out_dir("sample", fresh.sample_key(point)) / "traces.jsonl").read_bytes()
