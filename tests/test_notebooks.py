"""The Colab notebooks run: their code cells are executed in order (shell lines like `!pip`
skipped), headless, in a temporary folder."""

import json
import os
import re

import matplotlib
import pytest
from etils import epath

from antidistill_jax import pipeline

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def code_cells(name: str) -> list[str]:
  """The source of each code cell, without its `!` and `%` lines."""
  with open(os.path.join(NOTEBOOKS, name)) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  for cell in notebook["cells"]:  # committed without outputs
    assert cell["metadata"] == {}
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  return ["".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
          for cell in notebook["cells"] if cell["cell_type"] == "code"]


def run_cells(name: str, sources: list[str], namespace: dict) -> None:
  for i, source in enumerate(sources):
    exec(compile(source, f"{name} code cell {i}", "exec"), namespace)  # noqa: S102


@pytest.mark.slow
def test_quickstart_runs_the_experiment_and_shows_its_results(tmp_path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("QUICKSTART_SIZE", "reduced")
  monkeypatch.setenv("QUICKSTART_REAL_MODEL", "0")  # tests/test_real_model.py covers the demo
  namespace = {}
  run_cells("quickstart.ipynb", code_cells("quickstart.ipynb"), namespace)
  assert namespace["config"].data.max_train == 32  # the reduced size
  workdir = tmp_path / "runs" / "quick_reduced"
  # Every stage ran (the report is derived: no record), each grid point through each of its
  # stages, and the report holds the table, the matched comparison and both figures.
  records = namespace["records"]
  assert records == pipeline.Store(str(workdir)).records()
  points = {p.name for p in namespace["experiment"].points}
  assert {r["stage"] for r in records} == set(pipeline.STAGES) - {"report"}
  for stage in pipeline.PER_POINT:
    assert {r["entry"] for r in records if r["stage"] == stage} == points, stage
  for name in ("results.md", "figure3.png", "figure5.png"):
    assert os.path.getsize(workdir / "report" / name) > 0, name
  assert "| undistilled student |" in namespace["results_md"]
  assert "against the temperature sweep at the same teacher accuracy" in namespace["results_md"]
  # The trace comparison: the same test problems under an ADS point and a temperature point.
  comparison = namespace["comparison"]
  assert len(comparison) == 3
  for row in comparison:
    assert row["ads"]["point"].startswith("ads_") and row["ads"]["point"] in points
    assert row["temperature"]["point"].startswith("temperature_")
    for label in ("ads", "temperature"):
      assert row[label]["tokens"] and isinstance(row[label]["text"], str)
      assert isinstance(row[label]["correct"], bool)
  # Delta by central difference matches the exact JVP with a float32 proxy.
  assert len(namespace["cosines"]) == 3 and min(namespace["cosines"]) > 0.99


def test_gsm8k_tpu_notebook_builds_its_experiment_offline(tmp_path, monkeypatch):
  """Every cell compiles; the cells before the first stage (which downloads the models) run
  offline: they set up the paper's models in bfloat16 with a model axis and the whole grid, and
  a user's edits of the settings cell reach the config and the mesh."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("ANTIDISTILL_CACHE", str(tmp_path / "cache"))  # where downloads would go
  sources = code_cells("gsm8k_tpu.ipynb")
  for i, source in enumerate(sources):
    compile(source, f"gsm8k_tpu.ipynb code cell {i}", "exec")
  settings = next(i for i, s in enumerate(sources) if "TEACHER =" in s)
  first_stage = next(i for i, s in enumerate(sources) if re.search(r"\brun(_stage)?\(", s))
  assert settings < first_stage

  def run(**edits):
    namespace = {}
    run_cells("gsm8k_tpu.ipynb", sources[:settings + 1], namespace)
    namespace.update(edits)
    run_cells("gsm8k_tpu.ipynb", sources[settings + 1:first_stage], namespace)
    return namespace

  namespace = run()
  config = namespace["config"]
  assert (config.models.teacher, config.models.proxy, config.models.student) == (
      "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-3B", "meta-llama/Llama-3.2-3B")
  assert config.models.dtype == "bfloat16" and config.data.test == "gsm8k:platinum"
  assert dict(namespace["mesh"].shape) == {"data": 2, "model": 4}  # the tests' 8 devices
  experiment = namespace["experiment"]
  assert experiment.config is config and experiment.mesh is namespace["mesh"]
  assert not os.path.exists(tmp_path / "runs" / "gsm8k")  # set up, nothing written yet
  kinds = [p.kind for p in namespace["points"]]  # the paper's grid: 20 lams x 2 taus, 20 temps
  assert (kinds.count("ads"), kinds.count("temperature")) == (38, 21)
  edited = run(TEACHER="/ckpt/teacher", PROXY="/ckpt/proxy", STUDENT="/ckpt/student",
               DTYPE="float32", MODEL_AXIS=2, WORKDIR=str(tmp_path / "edited"))
  c = edited["config"]
  assert (c.models.teacher, c.models.proxy, c.models.student, c.models.dtype) == (
      "/ckpt/teacher", "/ckpt/proxy", "/ckpt/student", "float32")
  assert dict(edited["mesh"].shape) == {"data": 4, "model": 2}
  assert edited["experiment"].workdir == epath.Path(tmp_path / "edited")
  assert not (tmp_path / "cache").exists()  # nothing was fetched
